//! A strict safetensors parser over `&[u8]` and a streaming shard writer.
//!
//! Every size read from a file is treated as hostile: the header length is capped and
//! checked against the file, shapes use checked arithmetic, and the tensors must cover the
//! data section exactly (the rules of huggingface/safetensors).

use crate::dtype::Dtype;
use crate::error::SafetensorsError;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io::Write;

/// Header length cap. huggingface/safetensors uses 100 MB; a header describing every
/// tensor of a 400B-parameter model stays below 10 MB, so anything larger is hostile.
pub const MAX_HEADER_SIZE: u64 = 100_000_000;

/// One tensor entry of a safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape, row-major (last dimension contiguous).
    pub shape: Vec<usize>,
    /// Byte range inside the data section.
    pub begin: usize,
    /// End of the byte range (exclusive) inside the data section.
    pub end: usize,
}

impl TensorEntry {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A parsed and validated safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The `__metadata__` map (empty when absent).
    pub metadata: BTreeMap<String, String>,
    /// Tensors in the order of their data offsets.
    pub tensors: Vec<TensorEntry>,
    /// Absolute file offset of the data section (8 + header length).
    pub data_start: usize,
}

impl Header {
    /// Absolute byte range of `entry` in the file.
    pub fn file_range(&self, entry: &TensorEntry) -> std::ops::Range<usize> {
        self.data_start + entry.begin..self.data_start + entry.end
    }

    /// Finds a tensor by name.
    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// The header object, kept as an ordered list so duplicate names are detected
/// (a plain map would silently keep the last one).
struct RawHeader {
    metadata: Option<BTreeMap<String, String>>,
    entries: Vec<(String, RawEntry)>,
    duplicate: Option<String>,
}

impl<'de> Deserialize<'de> for RawHeader {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawHeader;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object of tensor entries")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawHeader, A::Error> {
                let mut out = RawHeader {
                    metadata: None,
                    entries: Vec::new(),
                    duplicate: None,
                };
                let mut seen = HashSet::new();
                while let Some(key) = map.next_key::<String>()? {
                    if !seen.insert(key.clone()) && out.duplicate.is_none() {
                        out.duplicate = Some(key.clone());
                    }
                    if key == "__metadata__" {
                        out.metadata = Some(map.next_value()?);
                    } else {
                        let e: RawEntry = map
                            .next_value()
                            .map_err(|e| de::Error::custom(format!("tensor `{key}`: {e}")))?;
                        out.entries.push((key, e));
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
}

/// Parses and validates the header of a complete safetensors file held in `file`; the
/// error is the first problem found.
pub fn parse(file: &[u8]) -> Result<Header, SafetensorsError> {
    let mut problems = Vec::new();
    match parse_reporting(file, &mut problems, false) {
        Some(header) => Ok(header),
        None => Err(problems
            .pop()
            .expect("a header is only refused with a reason")),
    }
}

/// Like [`parse`], but appends every problem it can find to `problems` (with `all`; else
/// only the first): each entry's dtype, shape and offsets, then the layout of the data
/// section. Problems that make the rest unreadable (length, JSON) end the parse. Returns
/// the header only when nothing was wrong.
pub fn parse_reporting(
    file: &[u8],
    problems: &mut Vec<SafetensorsError>,
    all: bool,
) -> Option<Header> {
    let before = problems.len();
    // Pushes `e`; true when the caller wants no more problems.
    let stop = |e: SafetensorsError, problems: &mut Vec<SafetensorsError>| {
        problems.push(e);
        !all
    };
    // Problems after which nothing more can be read end the parse whatever `all` says.
    let file_len = file.len() as u64;
    let Some(len_bytes) = file.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
        problems.push(SafetensorsError::TooShort(file_len));
        return None;
    };
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_SIZE {
        problems.push(SafetensorsError::HeaderTooLarge {
            found: header_len,
            cap: MAX_HEADER_SIZE,
        });
        return None;
    }
    let data_start = 8 + header_len; // cannot overflow: header_len is capped
    let Some(header_bytes) = file.get(8..data_start as usize) else {
        problems.push(SafetensorsError::HeaderPastEnd {
            header: header_len,
            file: file_len,
        });
        return None;
    };
    let raw = std::str::from_utf8(header_bytes)
        .map_err(|e| SafetensorsError::InvalidJson(format!("not UTF-8: {e}")))
        .and_then(|text| {
            serde_json::from_str::<RawHeader>(text)
                .map_err(|e| SafetensorsError::InvalidJson(e.to_string()))
        });
    let raw = match raw {
        Ok(raw) => raw,
        Err(e) => {
            problems.push(e);
            return None;
        }
    };
    if let Some(name) = raw.duplicate {
        if stop(SafetensorsError::DuplicateName(name), problems) {
            return None;
        }
    }
    let data_len = file_len - data_start;
    let mut tensors = Vec::with_capacity(raw.entries.len());
    for (name, e) in raw.entries {
        match entry(name, e, data_len) {
            Ok(t) => tensors.push(t),
            Err(problem) => {
                if stop(problem, problems) {
                    return None;
                }
            }
        }
    }
    if problems.len() > before {
        // Offsets of rejected entries are unknown: the layout check would only add noise.
        return None;
    }
    tensors.sort_by_key(|t| (t.begin, t.end));
    let mut expected = 0usize;
    for t in &tensors {
        if t.begin != expected {
            let e = SafetensorsError::NotContiguous {
                tensor: t.name.clone(),
                expected: expected as u64,
                found: t.begin as u64,
            };
            if stop(e, problems) {
                return None;
            }
        }
        // `max`: after an overlap the next tensor is compared with the furthest end, so
        // one misplaced tensor is reported once.
        expected = expected.max(t.end);
    }
    if expected as u64 != data_len {
        problems.push(SafetensorsError::TrailingBytes(data_len - expected as u64));
    }
    (problems.len() == before).then(|| Header {
        metadata: raw.metadata.unwrap_or_default(),
        tensors,
        data_start: data_start as usize,
    })
}

/// One header entry checked against its dtype and the data section of `data_len` bytes.
fn entry(name: String, e: RawEntry, data_len: u64) -> Result<TensorEntry, SafetensorsError> {
    let dtype = Dtype::parse(&e.dtype).ok_or_else(|| SafetensorsError::UnknownDtype {
        tensor: name.clone(),
        dtype: e.dtype.clone(),
    })?;
    let overflow = || SafetensorsError::ShapeOverflow {
        tensor: name.clone(),
        shape: e.shape.clone(),
    };
    let numel = e
        .shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(overflow)?;
    let nbytes = numel
        .checked_mul(dtype.size() as u64)
        .ok_or_else(overflow)?;
    let [begin, end] = e.data_offsets;
    if begin > end || end > data_len {
        return Err(SafetensorsError::OffsetOutOfBounds {
            tensor: name,
            begin,
            end,
            data_len,
        });
    }
    if end - begin != nbytes {
        return Err(SafetensorsError::SizeMismatch {
            tensor: name,
            expected: nbytes,
            found: end - begin,
        });
    }
    // All values are now bounded by the file length, so they fit in usize.
    let shape = e
        .shape
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| overflow()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(TensorEntry {
        name,
        dtype,
        shape,
        begin: begin as usize,
        end: end as usize,
    })
}

/// Upper bound on the bytes one tensor entry named `name` with `ndims` dimensions adds to a
/// header from [`serialize_header`] (the longest dtype name, 20 digits per dimension and
/// per offset, the separating comma).
pub fn header_entry_bound(name: &str, ndims: usize) -> u64 {
    let name = serde_json::to_string(name)
        .expect("string serializes")
        .len();
    let fixed = r#":{"dtype":"F8_E5M2","shape":[],"data_offsets":[,]},"#.len();
    (name + fixed + ndims * 21 + 2 * 20) as u64
}

/// Serializes a header for `tensors` (name, dtype, shape, byte length, in data order)
/// with `metadata`, padded with spaces to a multiple of 8 bytes, including the 8-byte
/// length prefix. Keys are written in data order, `__metadata__` first.
pub fn serialize_header(
    metadata: &BTreeMap<String, String>,
    tensors: &[(String, Dtype, Vec<usize>, usize)],
) -> Vec<u8> {
    let mut json = String::from("{");
    let mut first = true;
    if !metadata.is_empty() {
        json.push_str("\"__metadata__\":");
        json.push_str(&serde_json::to_string(metadata).expect("string map serializes"));
        first = false;
    }
    let mut offset = 0usize;
    for (name, dtype, shape, len) in tensors {
        if !first {
            json.push(',');
        }
        first = false;
        json.push_str(&serde_json::to_string(name).expect("string serializes"));
        json.push_str(&format!(
            ":{{\"dtype\":\"{}\",\"shape\":{},\"data_offsets\":[{},{}]}}",
            dtype,
            serde_json::to_string(shape).expect("shape serializes"),
            offset,
            offset + len
        ));
        offset += len;
    }
    json.push('}');
    let mut bytes = json.into_bytes();
    while bytes.len() % 8 != 0 {
        bytes.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + bytes.len());
    out.extend((bytes.len() as u64).to_le_bytes());
    out.extend(bytes);
    out
}

/// Writes a complete safetensors file from in-memory tensors (used by tests and
/// fixture generators; the converter streams through [`crate::writer::CheckpointWriter`]).
pub fn write_file(
    path: &std::path::Path,
    metadata: &BTreeMap<String, String>,
    tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)],
) -> std::io::Result<()> {
    let list: Vec<_> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), *d, s.clone(), b.len()))
        .collect();
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    f.write_all(&serialize_header(metadata, &list))?;
    for (_, _, _, b) in tensors {
        f.write_all(b)?;
    }
    f.into_inner().map_err(|e| e.into_error())?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend(header.as_bytes());
        v.extend(data);
        v
    }

    #[test]
    fn parses_valid() {
        let f = file(
            r#"{"__metadata__":{"a":"b"},"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"U8","shape":[],"data_offsets":[8,9]}}"#,
            &[0; 9],
        );
        let h = parse(&f).unwrap();
        assert_eq!(h.tensors.len(), 2);
        assert_eq!(h.metadata["a"], "b");
        assert_eq!(h.get("y").unwrap().shape, Vec::<usize>::new());
    }

    #[test]
    fn rejects_hostile_headers() {
        assert_eq!(parse(&[1, 2]), Err(SafetensorsError::TooShort(2)));
        let mut f = u64::MAX.to_le_bytes().to_vec();
        f.extend([0; 8]);
        assert!(matches!(
            parse(&f),
            Err(SafetensorsError::HeaderTooLarge { .. })
        ));
        let mut f = 1000u64.to_le_bytes().to_vec();
        f.extend(b"{}");
        assert!(matches!(
            parse(&f),
            Err(SafetensorsError::HeaderPastEnd { .. })
        ));
        let f = file(
            r#"{"x":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}}"#,
            &[0; 8],
        );
        assert!(matches!(
            parse(&f),
            Err(SafetensorsError::ShapeOverflow { .. })
        ));
        let f = file(
            r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"x":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#,
            &[0; 16],
        );
        assert_eq!(parse(&f), Err(SafetensorsError::DuplicateName("x".into())));
        let f = file(
            r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            &[0; 12],
        );
        assert!(matches!(
            parse(&f),
            Err(SafetensorsError::NotContiguous { .. })
        ));
        let f = file(
            r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            &[0; 12],
        );
        assert_eq!(parse(&f), Err(SafetensorsError::TrailingBytes(4)));
        let f = file(
            r#"{"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            &[0; 8],
        );
        assert!(matches!(
            parse(&f),
            Err(SafetensorsError::SizeMismatch { .. })
        ));
        let f = file(
            r#"{"x":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}}"#,
            &[0; 8],
        );
        assert!(matches!(
            parse(&f),
            Err(SafetensorsError::UnknownDtype { .. })
        ));
        let f = file(
            r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,80]}}"#,
            &[0; 8],
        );
        assert!(matches!(
            parse(&f),
            Err(SafetensorsError::OffsetOutOfBounds { .. })
        ));
    }

    #[test]
    fn serialize_parse_round_trip() {
        let meta = BTreeMap::from([("format".to_string(), "cersa".to_string())]);
        let tensors = vec![
            ("b".to_string(), Dtype::F16, vec![3, 1], 6),
            ("a\"q".to_string(), Dtype::I64, vec![1], 8),
        ];
        let mut f = serialize_header(&meta, &tensors);
        assert_eq!((f.len() - 8) % 8, 0);
        f.extend([7u8; 14]);
        let h = parse(&f).unwrap();
        assert_eq!(h.tensors[0].name, "b");
        assert_eq!(h.tensors[1].name, "a\"q");
        assert_eq!(h.tensors[1].begin, 6);
        assert_eq!(h.metadata, meta);
    }
}
