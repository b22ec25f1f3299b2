//! The one place that maps files into memory.
#![allow(unsafe_code)]

use crate::error::{Error, Result};
use memmap2::{Mmap, UncheckedAdvice};
use std::path::Path;

/// A read-only memory map of a whole file.
#[derive(Debug)]
pub struct MappedFile {
    map: Option<Mmap>,
}

impl MappedFile {
    /// Maps `path` read-only.
    ///
    /// # Safety
    /// The caller must ensure the file is not truncated or modified while the map is
    /// alive: a truncated file makes reads through the map raise SIGBUS, and a modified
    /// file changes bytes that were already validated. CERSA outputs are written once and
    /// never modified in place; converters compare size and mtime of sources before and
    /// after use.
    pub unsafe fn open(path: &Path) -> Result<Self> {
        let file = crate::regular::open_regular(path).map_err(|e| Error::io(path, "open", e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(path, "stat", e))?
            .len();
        if len == 0 {
            // mmap of an empty file fails on Linux; an empty slice says the same.
            return Ok(MappedFile { map: None });
        }
        // SAFETY: read-only map; the caller upholds that the file is not changed while
        // mapped (see the `# Safety` section above).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, "mmap", e))?;
        Ok(MappedFile { map: Some(map) })
    }

    /// The mapped bytes.
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// Drops the pages of `range` from this process's resident set (they stay in the page
    /// cache and are faulted back in on the next access). Used to keep RSS bounded while
    /// streaming through files larger than memory. Best effort: errors are ignored.
    pub fn release(&self, range: std::ops::Range<usize>) {
        let Some(map) = &self.map else { return };
        let page = 4096usize;
        // Only whole pages inside the range, so neighbours being read are not affected.
        let start = range.start.div_ceil(page) * page;
        let end = (range.end.min(map.len()) / page) * page;
        if end > start {
            // SAFETY: the map is read-only and shared, so MADV_DONTNEED only discards
            // page-table entries; later reads refault the same file contents. No
            // reference into these pages is used to observe a change.
            let _ = unsafe {
                map.unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }
}
