//! A memory-mapped source file and the bookkeeping every format shares: the one place
//! sources map files, the stamp checked before output is committed, bounded reads of a
//! tensor's bytes and the chunked pass-through of dense copies.

use super::{FileStamp, FloatData, Precision, TensorMeta};
use crate::error::{ConvertError, Result};
use cersa_loader::dtype::{decode_f32, decode_f64};
use cersa_loader::mmap::MappedFile;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Bytes handed to the sink per chunk of a dense pass-through; pages are released after
/// each chunk so resident memory stays bounded whatever the tensor size.
pub(crate) const COPY_CHUNK: usize = 32 << 20;

/// One mapped source file.
pub(crate) struct Mapped {
    path: PathBuf,
    map: MappedFile,
    stamp: FileStamp,
}

impl Mapped {
    /// Stamps and maps `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let stamp = FileStamp::of(path)?;
        // SAFETY (of the contract): `stamp` is checked again before the output is
        // committed (`check_unchanged`), so a file changed under the map is reported, not
        // trusted.
        #[allow(unsafe_code)]
        let map = unsafe { MappedFile::open(path)? };
        Ok(Mapped {
            path: path.to_path_buf(),
            map,
            stamp,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        self.map.bytes()
    }

    /// Drops the pages of `range` from the resident set (see [`MappedFile::release`]).
    pub fn release(&self, range: Range<usize>) {
        self.map.release(range)
    }

    /// The file's own name (without its directory).
    pub fn file_name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// An error about `tensor` of this file.
    pub fn tensor_error(&self, tensor: &str, reason: String) -> ConvertError {
        ConvertError::Tensor {
            path: self.path.clone(),
            tensor: tensor.to_string(),
            reason,
        }
    }

    /// Bytes `range` of the file, which hold tensor `tensor`.
    pub fn tensor_bytes(&self, range: Range<usize>, tensor: &str) -> Result<&[u8]> {
        self.bytes()
            .get(range)
            .ok_or_else(|| self.tensor_error(tensor, "data outside the mapped file".into()))
    }

    /// Decodes the bytes `range` of tensor `meta` to floats in its precision.
    pub fn read_float(&self, range: Range<usize>, meta: &TensorMeta) -> Result<FloatData> {
        let out = decode_float(meta, self.tensor_bytes(range.clone(), &meta.name)?);
        self.release(range);
        out.ok_or_else(|| {
            let reason = format!("dtype {} cannot be decoded to floats", meta.dense_dtype);
            self.tensor_error(&meta.name, reason)
        })
    }

    /// Streams bytes `range` of tensor `tensor` to `sink` in [`COPY_CHUNK`] chunks.
    pub fn copy_range(
        &self,
        range: Range<usize>,
        tensor: &str,
        sink: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let mut start = range.start;
        while start < range.end {
            let end = (start + COPY_CHUNK).min(range.end);
            sink(self.tensor_bytes(start..end, tensor)?).map_err(|e| self.shrank(e, tensor))?;
            self.release(start..end);
            start = end;
        }
        Ok(())
    }

    /// A write straight from the map's pages fails with EFAULT, not SIGBUS, when the file
    /// was truncated under the map: that is this file's fault, not the output's.
    fn shrank(&self, e: ConvertError, tensor: &str) -> ConvertError {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        let mut efault = false;
        while let Some(c) = cause {
            let io = c.downcast_ref::<std::io::Error>();
            efault |= io.is_some_and(|io| io.raw_os_error() == Some(libc::EFAULT));
            cause = c.source();
        }
        match efault {
            true => self.tensor_error(
                tensor,
                format!(
                    "the file shrank while it was being read through a memory map ({e}): \
                         it was truncated or rewritten by another process"
                ),
            ),
            false => e,
        }
    }

    /// Fails when the file's size or mtime differs from when it was mapped.
    pub fn check_unchanged(&self) -> Result<()> {
        self.stamp.check(&self.path)
    }
}

/// `bytes` (of [`TensorMeta::dense_dtype`]) decoded in the tensor's float precision;
/// `None` when the tensor is not a float tensor or the bytes do not fit the dtype.
pub(crate) fn decode_float(meta: &TensorMeta, bytes: &[u8]) -> Option<FloatData> {
    match meta.float? {
        Precision::F64 => decode_f64(meta.dense_dtype, bytes).map(FloatData::F64),
        Precision::F32 => decode_f32(meta.dense_dtype, bytes).map(FloatData::F32),
    }
}
