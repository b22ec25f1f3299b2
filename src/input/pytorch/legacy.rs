//! The legacy layout of `torch.save` (before torch 1.6, or `_use_new_zipfile_serialization=
//! False`): pickles of the magic number, protocol version and sys_info, then the state
//! dict, then the list of storage keys, then each storage as an 8-byte little-endian
//! element count followed by its raw bytes.

use super::pickle::{self, Value};
use super::views::{storage_refs, Storages};

/// The magic number that opens a legacy checkpoint (`0x1950a86a20f9469cfc6c`), LE bytes.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/// The state-dict pickle's value and the byte range of each storage of the legacy
/// checkpoint `bytes`.
pub fn read_legacy(bytes: &[u8]) -> std::result::Result<(Value, Storages), String> {
    let magic = pickle::unpickle(bytes).map_err(|e| format!("legacy magic number: {e}"))?;
    match &magic.value {
        pickle::Value::BigInt(b) if **b == LEGACY_MAGIC => {}
        _ => return Err("not a PyTorch checkpoint: legacy magic number missing".into()),
    }
    let mut at = magic.end;
    let rest = |at: usize| bytes.get(at..).ok_or("file ends early".to_string());
    let proto = pickle::unpickle(rest(at)?).map_err(|e| format!("protocol version: {e}"))?;
    if proto.value.as_int() != Some(1001) {
        return Err("legacy protocol version is not 1001".into());
    }
    at += proto.end;
    let sys = pickle::unpickle(rest(at)?).map_err(|e| format!("sys_info: {e}"))?;
    if let Value::Dict(d) = &sys.value {
        for (k, v) in d.borrow().iter() {
            if matches!(k, Value::Str(s) if &**s == "little_endian")
                && matches!(v, Value::Bool(false))
            {
                return Err("big-endian checkpoints are not supported".into());
            }
        }
    }
    at += sys.end;
    let main = pickle::unpickle(rest(at)?).map_err(|e| format!("state dict pickle: {e}"))?;
    at += main.end;
    let keys = pickle::unpickle(rest(at)?).map_err(|e| format!("storage key list: {e}"))?;
    at += keys.end;
    let refs = storage_refs(&main.value)?;
    let Value::List(keys) = &keys.value else {
        return Err("storage key list is not a list".into());
    };
    let mut storages = Storages::new();
    for k in keys.borrow().iter() {
        let Value::Str(key) = k else {
            return Err("storage key is not a string".into());
        };
        let numel_bytes: [u8; 8] = bytes
            .get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| format!("storage `{key}`: file truncated before its size"))?;
        let numel = u64::from_le_bytes(numel_bytes);
        at += 8;
        // A storage only the key list names (no tensor uses it) is still skipped by
        // size, which needs its dtype: refuse rather than guess.
        let dtype = refs
            .get(&**key)
            .map(|r| r.dtype)
            .ok_or_else(|| format!("storage `{key}` is listed but no tensor uses it"))?;
        let len = numel
            .checked_mul(dtype.size() as u64)
            .and_then(|l| usize::try_from(l).ok())
            .and_then(|l| at.checked_add(l).map(|e| (l, e)))
            .filter(|&(_, e)| e <= bytes.len())
            .ok_or_else(|| {
                format!(
                    "storage `{key}`: {numel} elements of {dtype} run past the end of the file \
                     ({} bytes)",
                    bytes.len()
                )
            })?;
        storages.insert(key.to_string(), at..len.1);
        at = len.1;
    }
    Ok((main.value, storages))
}
