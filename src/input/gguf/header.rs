//! A strict GGUF (v2, v3) header parser over the bytes of a memory map.
//!
//! Every count and length read from the file is hostile: it is checked against a cap and
//! against the bytes actually left before anything is allocated or skipped, all offset
//! arithmetic is checked, and every tensor's data range is checked against the file.
//! Metadata values are walked, not stored, except the few keys the manifest records.

use super::ggml::{unsupported_name, GgmlType, SUPPORTED};

/// Longest metadata key or tensor name accepted (ggml itself caps tensor names at 64).
pub const MAX_NAME_LEN: u64 = 64 << 10;
/// Longest metadata string value accepted (chat templates are tens of KiB).
pub const MAX_STRING_LEN: u64 = 16 << 20;
/// Most tensors accepted in one file (the largest real models have a few thousand).
pub const MAX_TENSORS: u64 = 1 << 20;
/// Deepest nesting of metadata arrays accepted.
const MAX_ARRAY_DEPTH: u32 = 4;
/// GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;
/// Default of `general.alignment`.
const DEFAULT_ALIGNMENT: u64 = 32;
/// Largest `general.alignment` accepted.
const MAX_ALIGNMENT: u64 = 1 << 30;
/// Smallest tensor-info record: name length (8) + n_dims (4) + type (4) + offset (8).
const MIN_TENSOR_INFO: u64 = 24;
/// Smallest metadata pair: key length (8) + value type (4) + a one-byte value.
const MIN_KV: u64 = 13;

/// What is wrong with a GGUF file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    /// The first four bytes are not `GGUF`.
    #[error("not a GGUF file: magic {found:02x?}, expected \"GGUF\"")]
    BadMagic {
        /// The bytes found (fewer when the file is shorter).
        found: Vec<u8>,
    },
    /// A version other than 2 or 3.
    #[error("GGUF version {found} is not supported (expected 2 or 3){hint}")]
    UnsupportedVersion {
        /// The version field.
        found: u32,
        /// Extra explanation (big-endian files, v1).
        hint: &'static str,
    },
    /// The file ends inside a structure.
    #[error("file ends while reading {what} at byte {at}: {need} bytes needed, {left} left")]
    Truncated {
        /// What was being read.
        what: String,
        /// Offset it starts at.
        at: usize,
        /// Bytes it needs.
        need: u64,
        /// Bytes left in the file.
        left: usize,
    },
    /// A string length above the cap.
    #[error("{what}: string length {len} exceeds the cap of {cap} bytes")]
    StringTooLong {
        /// Which string.
        what: String,
        /// Declared length.
        len: u64,
        /// The cap.
        cap: u64,
    },
    /// An array count that cannot fit in the file.
    #[error("metadata `{key}`: array of {count} elements cannot fit in the {left} bytes left (each element takes at least {min_elem} bytes)")]
    ArrayTooLong {
        /// Metadata key.
        key: String,
        /// Declared count.
        count: u64,
        /// Bytes left.
        left: usize,
        /// Smallest element size of the array's type.
        min_elem: u64,
    },
    /// A tensor or metadata count above its cap or beyond what the file can hold.
    #[error(
        "header declares {count} {what}, but at most {max} can fit (cap or bytes left in the file)"
    )]
    CountTooLarge {
        /// `tensors` or `metadata pairs`.
        what: &'static str,
        /// Declared count.
        count: u64,
        /// The most accepted.
        max: u64,
    },
    /// A metadata value type id that GGUF does not define, or arrays nested too deep.
    #[error("metadata `{key}`: {reason}")]
    BadValue {
        /// Metadata key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A string that is not UTF-8 where the format requires it.
    #[error("{what} is not valid UTF-8")]
    BadUtf8 {
        /// Which string.
        what: String,
    },
    /// `general.alignment` is zero, not a power of two, or absurd.
    #[error("general.alignment {0} must be a power of two between 1 and 2^30")]
    BadAlignment(u64),
    /// More than GGML_MAX_DIMS dimensions.
    #[error("tensor `{tensor}`: {n_dims} dimensions (GGUF allows at most {MAX_DIMS})")]
    TooManyDims {
        /// Tensor name.
        tensor: String,
        /// Declared count.
        n_dims: u32,
    },
    /// The element count or byte size of a tensor overflows.
    #[error("tensor `{tensor}`: dimensions {ne:?} overflow (element count or byte size does not fit in 64 bits)")]
    DimsOverflow {
        /// Tensor name.
        tensor: String,
        /// Dimensions as stored (innermost first).
        ne: Vec<u64>,
    },
    /// A GGML type this crate does not decode.
    #[error("tensor `{tensor}`: type {type_name} is not supported; supported: {SUPPORTED}. This is an error even when the tensor is not selected for factoring, because CERSA shards are safetensors and cannot hold ggml blocks")]
    UnsupportedType {
        /// Tensor name.
        tensor: String,
        /// Type name and id.
        type_name: String,
    },
    /// A quantized tensor whose rows are not whole blocks.
    #[error("tensor `{tensor}`: row length {ne0} is not a multiple of the {type_name} block size {block}")]
    PartialBlock {
        /// Tensor name.
        tensor: String,
        /// Row length (`ne[0]`).
        ne0: u64,
        /// Type name.
        type_name: &'static str,
        /// Elements per block.
        block: usize,
    },
    /// Tensor data not inside the file.
    #[error("tensor `{tensor}`: data at offset {offset} (+{bytes} bytes) after the data section start {data_start} lies outside the file ({file_len} bytes)")]
    DataOutOfBounds {
        /// Tensor name.
        tensor: String,
        /// Offset relative to the data section.
        offset: u64,
        /// Bytes it needs.
        bytes: u64,
        /// Absolute start of the data section.
        data_start: u64,
        /// File length.
        file_len: usize,
    },
    /// A tensor offset that is not a multiple of the alignment.
    #[error("tensor `{tensor}`: offset {offset} is not a multiple of the alignment {alignment}")]
    Misaligned {
        /// Tensor name.
        tensor: String,
        /// Offset relative to the data section.
        offset: u64,
        /// `general.alignment`.
        alignment: u64,
    },
    /// Two tensors with one name.
    #[error("tensor `{0}` is listed twice")]
    DuplicateTensor(String),
    /// A tensor not at the running sum of the padded sizes before it, which llama.cpp's
    /// reader requires (so no two tensors share bytes).
    #[error("tensor `{tensor}`: data offset {offset}, but the layout GGUF readers require puts it at {expected} (the sizes of the tensors listed before it, each padded to the alignment): {}", if .offset < .expected { "its bytes would overlap the tensor before it" } else { "a gap before it" })]
    OffsetNotSequential {
        /// Tensor name.
        tensor: String,
        /// Offset relative to the data section.
        offset: u64,
        /// The running sum of the padded sizes before it.
        expected: u64,
    },
}

/// One tensor of a GGUF file.
#[derive(Debug, Clone)]
pub struct GgufTensor {
    /// Name as stored.
    pub name: String,
    /// Dimensions as stored, innermost first (`ne[0]` = row length).
    pub ne: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Absolute byte range of the data in the file.
    pub range: std::ops::Range<usize>,
}

/// The parsed header of a GGUF file.
#[derive(Debug, Clone)]
pub struct GgufHeader {
    /// 2 or 3.
    pub version: u32,
    /// `general.alignment` (32 when absent).
    pub alignment: u64,
    /// `general.architecture`, when present and a string.
    pub architecture: Option<String>,
    /// `general.name`, when present and a string.
    pub name: Option<String>,
    /// Number of metadata pairs.
    pub kv_count: u64,
    /// Every metadata pair's key and the byte range of the whole pair (key, type, value)
    /// in the file, in file order: what `export --to gguf` copies verbatim.
    pub metadata: Vec<(String, std::ops::Range<usize>)>,
    /// The `split.*` keys of one part of a split model (llama.cpp `gguf-split`, gguf-py's
    /// `split_max_tensors`/`split_max_size`), when present.
    pub split: Option<SplitKeys>,
    /// Tensors in the order listed.
    pub tensors: Vec<GgufTensor>,
    /// Absolute offset of the data section.
    pub data_start: u64,
}

/// `split.no` (0-based part index), `split.count` and `split.tensors.count` (tensors in
/// all parts together) of one part of a split model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitKeys {
    /// `split.no`.
    pub no: u64,
    /// `split.count`.
    pub count: u64,
    /// `split.tensors.count`, when present.
    pub tensors: Option<u64>,
}

type R<T> = std::result::Result<T, GgufError>;

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn left(&self) -> usize {
        self.b.len() - self.pos
    }

    fn take(&mut self, n: u64, what: impl Fn() -> String) -> R<&'a [u8]> {
        let out = usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n))
            .and_then(|end| self.b.get(self.pos..end))
            .ok_or_else(|| GgufError::Truncated {
                what: what(),
                at: self.pos,
                need: n,
                left: self.left(),
            })?;
        self.pos += out.len();
        Ok(out)
    }

    fn u32(&mut self, what: impl Fn() -> String) -> R<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    fn u64(&mut self, what: impl Fn() -> String) -> R<u64> {
        let b = self.take(8, what)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    /// A length-prefixed string's bytes, the length checked against `cap` first.
    fn string_bytes(&mut self, cap: u64, what: &dyn Fn() -> String) -> R<&'a [u8]> {
        let len = self.u64(|| format!("length of {}", what()))?;
        if len > cap {
            return Err(GgufError::StringTooLong {
                what: what(),
                len,
                cap,
            });
        }
        self.take(len, what)
    }

    fn utf8(&mut self, cap: u64, what: &dyn Fn() -> String) -> R<String> {
        let b = self.string_bytes(cap, what)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| GgufError::BadUtf8 { what: what() })
    }
}

/// Metadata value type ids.
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;

/// Size of a fixed-size metadata value type, `None` for string/array/unknown.
fn fixed_size(t: u32) -> Option<u64> {
    match t {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

/// A metadata value the manifest may record.
enum Kept {
    Uint(u64),
    Int(i64),
    Text(String),
    Other,
}

/// Reads (or skips) one value of type `t`; returns it when it is a scalar or a string.
fn value(c: &mut Cursor, key: &str, t: u32, depth: u32) -> R<Kept> {
    let what = || format!("value of metadata `{key}`");
    if let Some(n) = fixed_size(t) {
        let b = c.take(n, what)?;
        return Ok(match t {
            0 => Kept::Uint(b[0].into()),
            2 => Kept::Uint(u16::from_le_bytes([b[0], b[1]]).into()),
            4 => Kept::Uint(u32::from_le_bytes(b.try_into().expect("4")).into()),
            10 => Kept::Uint(u64::from_le_bytes(b.try_into().expect("8"))),
            1 => Kept::Int((b[0] as i8).into()),
            3 => Kept::Int(i16::from_le_bytes([b[0], b[1]]).into()),
            5 => Kept::Int(i32::from_le_bytes(b.try_into().expect("4")).into()),
            11 => Kept::Int(i64::from_le_bytes(b.try_into().expect("8"))),
            _ => Kept::Other,
        });
    }
    match t {
        T_STRING => {
            let b = c.string_bytes(MAX_STRING_LEN, &what)?;
            Ok(match std::str::from_utf8(b) {
                Ok(s) => Kept::Text(s.to_owned()),
                Err(_) => Kept::Other,
            })
        }
        T_ARRAY => {
            if depth >= MAX_ARRAY_DEPTH {
                return Err(GgufError::BadValue {
                    key: key.into(),
                    reason: format!("arrays nested deeper than {MAX_ARRAY_DEPTH}"),
                });
            }
            let et = c.u32(|| format!("element type of metadata `{key}`"))?;
            let count = c.u64(|| format!("element count of metadata `{key}`"))?;
            // Strings take at least their 8-byte length, arrays their 12-byte header.
            let min_elem = match et {
                T_STRING => 8,
                T_ARRAY => 12,
                t => fixed_size(t).ok_or_else(|| GgufError::BadValue {
                    key: key.into(),
                    reason: format!("unknown array element type {t}"),
                })?,
            };
            let fits = (c.left() as u64) / min_elem;
            if count > fits {
                return Err(GgufError::ArrayTooLong {
                    key: key.into(),
                    count,
                    left: c.left(),
                    min_elem,
                });
            }
            if et != T_STRING && et != T_ARRAY {
                c.take(count * min_elem, what)?;
            } else {
                for _ in 0..count {
                    value(c, key, et, depth + 1)?;
                }
            }
            Ok(Kept::Other)
        }
        t => Err(GgufError::BadValue {
            key: key.into(),
            reason: format!("unknown value type {t}"),
        }),
    }
}

/// Parses and validates the header and tensor table of the GGUF file `b`.
pub fn parse(b: &[u8]) -> R<GgufHeader> {
    let mut c = Cursor { b, pos: 0 };
    if b.get(..4) != Some(b"GGUF") {
        return Err(GgufError::BadMagic {
            found: b.iter().take(4).copied().collect(),
        });
    }
    c.pos = 4;
    let version = c.u32(|| "version".into())?;
    if version != 2 && version != 3 {
        let hint = match version {
            1 => " (GGUF v1 used 32-bit counts; convert it with a current llama.cpp)",
            v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
                " (this looks like a big-endian GGUF, which is not supported)"
            }
            _ => "",
        };
        return Err(GgufError::UnsupportedVersion {
            found: version,
            hint,
        });
    }
    let n_tensors = c.u64(|| "tensor count".into())?;
    let n_kv = c.u64(|| "metadata count".into())?;
    let max_kv = c.left() as u64 / MIN_KV;
    if n_kv > max_kv {
        return Err(GgufError::CountTooLarge {
            what: "metadata pairs",
            count: n_kv,
            max: max_kv,
        });
    }
    let mut alignment = DEFAULT_ALIGNMENT;
    let (mut architecture, mut name) = (None, None);
    let (mut split_no, mut split_count, mut split_tensors) = (None, None, None);
    let mut metadata = Vec::with_capacity(n_kv as usize);
    for i in 0..n_kv {
        let pair_start = c.pos;
        let key = c.utf8(MAX_NAME_LEN, &|| format!("metadata key #{i}"))?;
        let t = c.u32(|| format!("value type of metadata `{key}`"))?;
        let v = value(&mut c, &key, t, 0)?;
        metadata.push((key.clone(), pair_start..c.pos));
        match (key.as_str(), v) {
            ("general.alignment", Kept::Uint(a)) => {
                if a == 0 || !a.is_power_of_two() || a > MAX_ALIGNMENT {
                    return Err(GgufError::BadAlignment(a));
                }
                alignment = a;
            }
            ("general.alignment", _) => {
                return Err(GgufError::BadValue {
                    key,
                    reason: "must be an unsigned integer".into(),
                })
            }
            ("general.architecture", Kept::Text(s)) => architecture = Some(s),
            ("general.name", Kept::Text(s)) => name = Some(s),
            ("split.no" | "split.count" | "split.tensors.count", v) => {
                let v = match v {
                    Kept::Uint(u) => u,
                    Kept::Int(i) if i >= 0 => i as u64,
                    _ => {
                        return Err(GgufError::BadValue {
                            key,
                            reason: "must be a non-negative integer".into(),
                        })
                    }
                };
                match key.as_str() {
                    "split.no" => split_no = Some(v),
                    "split.count" => split_count = Some(v),
                    _ => split_tensors = Some(v),
                }
            }
            _ => {}
        }
    }
    let split = match (split_no, split_count) {
        (None, None) => None,
        (Some(no), Some(count)) if no < count => Some(SplitKeys {
            no,
            count,
            tensors: split_tensors,
        }),
        (no, count) => {
            return Err(GgufError::BadValue {
                key: "split.no".into(),
                reason: format!(
                    "split.no {} and split.count {} do not name a part (0 ≤ no < count)",
                    no.map_or("absent".into(), |v| v.to_string()),
                    count.map_or("absent".into(), |v| v.to_string())
                ),
            })
        }
    };
    let max_tensors = (c.left() as u64 / MIN_TENSOR_INFO).min(MAX_TENSORS);
    if n_tensors > max_tensors {
        return Err(GgufError::CountTooLarge {
            what: "tensors",
            count: n_tensors,
            max: max_tensors,
        });
    }
    let mut raw = Vec::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let tname = c.utf8(MAX_NAME_LEN, &|| format!("name of tensor #{i}"))?;
        let n_dims = c.u32(|| format!("dimension count of tensor `{tname}`"))?;
        if n_dims > MAX_DIMS {
            return Err(GgufError::TooManyDims {
                tensor: tname,
                n_dims,
            });
        }
        let ne = (0..n_dims)
            .map(|_| c.u64(|| format!("dimensions of tensor `{tname}`")))
            .collect::<R<Vec<u64>>>()?;
        let type_id = c.u32(|| format!("type of tensor `{tname}`"))?;
        let offset = c.u64(|| format!("offset of tensor `{tname}`"))?;
        raw.push((tname, ne, type_id, offset));
    }
    let data_start = (c.pos as u64).next_multiple_of(alignment);
    let mut tensors = Vec::with_capacity(raw.len());
    let mut seen = std::collections::HashSet::new();
    // Where the next tensor must start (llama.cpp's gguf reader: offsets are the running
    // sum of the sizes before, each padded to the alignment).
    let mut expected = 0u64;
    for (tname, ne, type_id, offset) in raw {
        if !seen.insert(tname.clone()) {
            return Err(GgufError::DuplicateTensor(tname));
        }
        let ty = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnsupportedType {
            tensor: tname.clone(),
            type_name: unsupported_name(type_id),
        })?;
        let bytes = tensor_bytes(&tname, &ne, ty)?;
        if offset % alignment != 0 {
            return Err(GgufError::Misaligned {
                tensor: tname,
                offset,
                alignment,
            });
        }
        let range = data_start
            .checked_add(offset)
            .and_then(|s| Some((s, s.checked_add(bytes)?)))
            .filter(|&(_, e)| e <= b.len() as u64)
            .ok_or_else(|| GgufError::DataOutOfBounds {
                tensor: tname.clone(),
                offset,
                bytes,
                data_start,
                file_len: b.len(),
            })?;
        if offset != expected {
            return Err(GgufError::OffsetNotSequential {
                tensor: tname,
                offset,
                expected,
            });
        }
        // Within the file (checked above), so the padded end cannot overflow.
        expected = (offset + bytes).next_multiple_of(alignment);
        tensors.push(GgufTensor {
            name: tname,
            ne,
            ty,
            // Both ends are ≤ b.len(), so they fit in usize.
            range: range.0 as usize..range.1 as usize,
        });
    }
    Ok(GgufHeader {
        version,
        alignment,
        architecture,
        name,
        kv_count: n_kv,
        metadata,
        split,
        tensors,
        data_start,
    })
}

/// Bytes of a tensor of type `ty` with dimensions `ne`, all arithmetic checked.
fn tensor_bytes(tensor: &str, ne: &[u64], ty: GgmlType) -> R<u64> {
    let overflow = || GgufError::DimsOverflow {
        tensor: tensor.into(),
        ne: ne.to_vec(),
    };
    let (block, block_bytes) = ty.block();
    let ne0 = ne.first().copied().unwrap_or(1);
    if ne0 % block as u64 != 0 {
        return Err(GgufError::PartialBlock {
            tensor: tensor.into(),
            ne0,
            type_name: ty.name(),
            block,
        });
    }
    let rows = ne
        .iter()
        .skip(1)
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(overflow)?;
    // numel must fit in usize on this machine, as values are decoded into memory.
    ne0.checked_mul(rows)
        .filter(|&n| usize::try_from(n).is_ok() && n <= i64::MAX as u64)
        .ok_or_else(overflow)?;
    (ne0 / block as u64)
        .checked_mul(block_bytes as u64)
        .and_then(|row| row.checked_mul(rows))
        .ok_or_else(overflow)
}
