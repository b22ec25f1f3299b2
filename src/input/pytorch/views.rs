//! Tensors as views of storages: the dotted-name flattening of the state dict, the
//! storages it references, the bounds of each view, and reading a view's row-major bytes
//! (in place when contiguous, gathered element by element when strided).

use super::pickle::{StorageRef, TensorRef, Value};
use crate::error::{ConvertError, Result};
use crate::input::mapped::COPY_CHUNK;
use cersa_loader::Dtype;
use std::collections::HashMap;
use std::ops::Range;

/// Most tensors in one checkpoint.
const MAX_TENSORS: usize = 1 << 20;
/// Deepest nesting of dicts/lists walked when flattening.
const MAX_DEPTH: usize = 32;
/// Most values visited when flattening. The memo lets a pickle share one container many
/// times (a 70-byte pickle of 32 nested `(x, x)` tuples has 2^32 paths), so the walk is
/// bounded by visits, not only by depth and tensor count.
const MAX_VISITS: usize = 4 * MAX_TENSORS;

/// Byte range in the file of each storage, by key.
pub type Storages = HashMap<String, Range<usize>>;

/// A tensor of the checkpoint: its view and the file bytes of its whole storage.
pub(super) struct StoredTensor {
    pub view: TensorRef,
    /// Byte range of the whole storage in the file.
    pub storage: Range<usize>,
}

impl StoredTensor {
    /// Whether the view is the row-major contiguous run `offset..offset+numel`.
    fn contiguous(&self) -> bool {
        let v = &self.view;
        let mut expect = 1u64;
        for (d, s) in v.shape.iter().zip(&v.stride).rev() {
            if *d > 1 && *s != expect {
                return false;
            }
            // check_view bounded the element count, not the product of a suffix of the
            // dimensions: an empty view ([0, 2^32, 2^32]) overflows it. Saturating is
            // exact up to the element count, and an empty view reads nothing either way.
            expect = expect.saturating_mul(*d);
        }
        true
    }

    /// File byte range of the tensor when it is a contiguous run of its storage.
    pub fn contiguous_range(&self) -> Option<Range<usize>> {
        if !self.contiguous() {
            return None;
        }
        let size = self.view.storage.dtype.size();
        let numel: u64 = self.view.shape.iter().product();
        if numel == 0 {
            // An empty view's offset is not bounded by check_view: address nothing.
            return Some(self.storage.start..self.storage.start);
        }
        // check_view bounded offset + numel by the storage, so these cannot overflow.
        let start = self.storage.start + self.view.offset as usize * size;
        Some(start..start + numel as usize * size)
    }

    /// Streams the row-major bytes of a strided view of `storage` (the storage's bytes) in
    /// bounded chunks, walking the index odometer; `outside` is the error for an element
    /// outside the storage.
    pub fn gather(
        &self,
        storage: &[u8],
        sink: &mut dyn FnMut(&[u8]) -> Result<()>,
        outside: &dyn Fn() -> ConvertError,
    ) -> Result<()> {
        let v = &self.view;
        let size = v.storage.dtype.size();
        let numel: u64 = v.shape.iter().product();
        let dims = v.shape.len();
        let mut idx = vec![0u64; dims];
        let mut buf = Vec::with_capacity(COPY_CHUNK.min(numel as usize * size));
        for _ in 0..numel {
            let elem: u64 = v.offset + idx.iter().zip(&v.stride).map(|(a, s)| a * s).sum::<u64>();
            let at = elem as usize * size;
            buf.extend_from_slice(storage.get(at..at + size).ok_or_else(outside)?);
            if buf.len() >= COPY_CHUNK {
                sink(&buf)?;
                buf.clear();
            }
            for d in (0..dims).rev() {
                idx[d] += 1;
                if idx[d] < v.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        if !buf.is_empty() {
            sink(&buf)?;
        }
        Ok(())
    }
}

/// Checks that every element the view addresses lies inside the storage.
pub(super) fn check_view(
    v: &TensorRef,
    storage: &Range<usize>,
    dtype: Dtype,
) -> std::result::Result<(), String> {
    let size = dtype.size() as u64;
    let have = (storage.end - storage.start) as u64 / size;
    if v.storage.numel > have {
        return Err(format!(
            "storage `{}` announces {} elements but holds {have}",
            v.storage.key, v.storage.numel
        ));
    }
    let mut numel = 1u64;
    let mut last = v.offset;
    for (&d, &s) in v.shape.iter().zip(&v.stride) {
        numel = numel.checked_mul(d).ok_or("element count overflows")?;
        if d > 0 {
            last = (d - 1)
                .checked_mul(s)
                .and_then(|x| x.checked_add(last))
                .ok_or("view extent overflows")?;
        }
    }
    if numel > 0 && last >= have {
        return Err(format!(
            "view (offset {}, size {:?}, stride {:?}) needs {} elements but storage `{}` holds {have}",
            v.offset,
            v.shape,
            v.stride,
            last + 1,
            v.storage.key
        ));
    }
    numel
        .checked_mul(size)
        .filter(|&b| b <= isize::MAX as u64)
        .ok_or("tensor too large")?;
    Ok(())
}

/// Collects `(dotted name, tensor)` for every tensor under `v`.
pub(super) fn flatten(
    v: &Value,
    prefix: String,
    depth: usize,
    out: &mut Vec<(String, TensorRef)>,
    skipped: &mut usize,
) -> std::result::Result<(), String> {
    let mut visits = MAX_VISITS;
    flatten_within(v, prefix, depth, out, skipped, &mut visits)
}

/// [`flatten`] visiting at most `visits` more values.
fn flatten_within(
    v: &Value,
    prefix: String,
    depth: usize,
    out: &mut Vec<(String, TensorRef)>,
    skipped: &mut usize,
    visits: &mut usize,
) -> std::result::Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!(
            "containers nested deeper than {MAX_DEPTH} (or cyclic)"
        ));
    }
    *visits = visits.checked_sub(1).ok_or_else(|| {
        format!(
            "the pickle's containers reach more than {MAX_VISITS} values (containers shared \
             through the memo many times over)"
        )
    })?;
    let join = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match v {
        Value::Tensor(t) => {
            if out.len() >= MAX_TENSORS {
                return Err(format!("more than {MAX_TENSORS} tensors"));
            }
            out.push((prefix, (**t).clone()));
        }
        Value::Dict(d) => {
            for (k, v) in d.borrow().iter() {
                let key = match k {
                    Value::Str(s) => s.to_string(),
                    Value::Int(i) => i.to_string(),
                    _ => {
                        *skipped += 1;
                        continue;
                    }
                };
                flatten_within(v, join(&key), depth + 1, out, skipped, visits)?;
            }
        }
        Value::List(l) => {
            for (i, v) in l.borrow().iter().enumerate() {
                flatten_within(v, join(&i.to_string()), depth + 1, out, skipped, visits)?;
            }
        }
        Value::Tuple(t) => {
            for (i, v) in t.iter().enumerate() {
                flatten_within(v, join(&i.to_string()), depth + 1, out, skipped, visits)?;
            }
        }
        _ => *skipped += 1,
    }
    Ok(())
}

/// Every storage the pickle references, by key, with its dtype (a key with two dtypes is
/// refused: the byte length of its storage would be ambiguous).
pub(super) fn storage_refs(v: &Value) -> std::result::Result<HashMap<String, StorageRef>, String> {
    let mut found = Vec::new();
    flatten(v, String::new(), 0, &mut found, &mut 0)?;
    let mut refs: HashMap<String, StorageRef> = HashMap::new();
    for (_, t) in found {
        if let Some(prev) = refs.get(&t.storage.key) {
            if prev.dtype != t.storage.dtype {
                return Err(format!(
                    "storage `{}` used as {} and as {}",
                    t.storage.key, prev.dtype, t.storage.dtype
                ));
            }
        }
        refs.insert(t.storage.key.clone(), t.storage);
    }
    Ok(refs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_bounds_use_checked_arithmetic() {
        let storage = StorageRef {
            dtype: Dtype::F32,
            key: "0".into(),
            numel: 4,
        };
        let view = |offset, shape: Vec<u64>, stride: Vec<u64>| TensorRef {
            storage: storage.clone(),
            offset,
            shape,
            stride,
        };
        let range = 0..16;
        assert!(check_view(&view(0, vec![2, 2], vec![2, 1]), &range, Dtype::F32).is_ok());
        // Transposed view of the same storage.
        assert!(check_view(&view(0, vec![2, 2], vec![1, 2]), &range, Dtype::F32).is_ok());
        let e = check_view(&view(1, vec![2, 2], vec![2, 1]), &range, Dtype::F32).unwrap_err();
        assert!(e.contains("needs 5 elements"), "{e}");
        let e = check_view(
            &view(0, vec![u64::MAX, 2], vec![u64::MAX, 1]),
            &range,
            Dtype::F32,
        )
        .unwrap_err();
        assert!(e.contains("overflows"), "{e}");
        // Empty tensors address nothing.
        assert!(check_view(&view(99, vec![0, 3], vec![3, 1]), &range, Dtype::F32).is_ok());
    }
}
