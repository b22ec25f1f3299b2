//! The zip layout of `torch.save` (torch ≥ 1.6): `<prefix>/data.pkl` holds the state-dict
//! pickle, whose persistent ids name storages stored as `<prefix>/data/<key>`. Entries are
//! STORED (torch never compresses them), so tensors are read in place through the memory
//! map. The zip central directory is parsed here (a few dozen lines) instead of pulling in
//! a zip crate.

use super::pickle::{self, Value};
use super::views::Storages;
use std::ops::Range;

struct ZipEntry {
    name: String,
    data: Range<usize>,
}

fn le16(b: &[u8], at: usize) -> std::result::Result<u64, String> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]) as u64)
        .ok_or_else(|| "zip structure truncated".to_string())
}

fn le32(b: &[u8], at: usize) -> std::result::Result<u64, String> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as u64)
        .ok_or_else(|| "zip structure truncated".to_string())
}

fn le64(b: &[u8], at: usize) -> std::result::Result<u64, String> {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| "zip structure truncated".to_string())
}

fn to_usize(v: u64, what: &str, len: usize) -> std::result::Result<usize, String> {
    usize::try_from(v)
        .ok()
        .filter(|&x| x <= len)
        .ok_or_else(|| format!("zip {what} {v} is past the end of the file ({len} bytes)"))
}

/// Parses the zip central directory (with zip64 records) and locates each entry's data.
fn zip_entries(b: &[u8]) -> std::result::Result<Vec<ZipEntry>, String> {
    // The end-of-central-directory record is in the last 22 + 65535 bytes.
    let lo = b.len().saturating_sub(22 + 65535);
    let eocd = (lo..b.len().saturating_sub(21))
        .rev()
        .find(|&i| b.get(i..i + 4) == Some(b"PK\x05\x06"))
        .ok_or("zip archive truncated: end of central directory not found")?;
    let mut count = le16(b, eocd + 10)?;
    let mut cd_size = le32(b, eocd + 12)?;
    let mut cd_off = le32(b, eocd + 16)?;
    if count == 0xffff || cd_size == 0xffff_ffff || cd_off == 0xffff_ffff {
        let loc = eocd
            .checked_sub(20)
            .filter(|&l| b.get(l..l + 4) == Some(b"PK\x06\x07"))
            .ok_or("zip64 end-of-central-directory locator missing")?;
        let rec = to_usize(le64(b, loc + 8)?, "zip64 record offset", b.len())?;
        if b.get(rec..rec + 4) != Some(b"PK\x06\x06") {
            return Err("zip64 end-of-central-directory record missing".into());
        }
        count = le64(b, rec + 32)?;
        cd_size = le64(b, rec + 40)?;
        cd_off = le64(b, rec + 48)?;
    }
    let cd_off = to_usize(cd_off, "central directory offset", b.len())?;
    let cd_end = to_usize(
        (cd_off as u64).saturating_add(cd_size),
        "central directory end",
        b.len(),
    )?;
    // Each central record is at least 46 bytes: a count the directory cannot hold is junk.
    if count > cd_size / 46 {
        return Err(format!(
            "zip lists {count} entries in a {cd_size}-byte directory"
        ));
    }
    let mut entries = Vec::with_capacity(count as usize);
    let mut at = cd_off;
    for _ in 0..count {
        if at + 46 > cd_end || b.get(at..at + 4) != Some(b"PK\x01\x02") {
            return Err("zip central directory is corrupt".into());
        }
        let method = le16(b, at + 10)?;
        let mut csize = le32(b, at + 20)?;
        let mut usize_ = le32(b, at + 24)?;
        let name_len = le16(b, at + 28)? as usize;
        let extra_len = le16(b, at + 30)? as usize;
        let comment_len = le16(b, at + 32)? as usize;
        let mut local = le32(b, at + 42)?;
        let name = b
            .get(at + 46..at + 46 + name_len)
            .ok_or("zip entry name truncated")?;
        let name = String::from_utf8_lossy(name).into_owned();
        // zip64 extended information: present fields replace the 0xffffffff ones, in order.
        let extra = b
            .get(at + 46 + name_len..at + 46 + name_len + extra_len)
            .ok_or("zip extra field truncated")?;
        let mut e = 0;
        while e + 4 <= extra.len() {
            let id = le16(extra, e)?;
            let len = le16(extra, e + 2)? as usize;
            if id == 1 {
                let mut f = e + 4;
                for v in [&mut usize_, &mut csize, &mut local] {
                    if *v == 0xffff_ffff {
                        *v = le64(extra, f)?;
                        f += 8;
                    }
                }
            }
            e += 4 + len;
        }
        at += 46 + name_len + extra_len + comment_len;
        let local = to_usize(local, "local header offset", b.len())?;
        if b.get(local..local + 4) != Some(b"PK\x03\x04") {
            return Err(format!("zip entry `{name}`: local header missing"));
        }
        let start = local + 30 + le16(b, local + 26)? as usize + le16(b, local + 28)? as usize;
        if method != 0 || csize != usize_ {
            return Err(format!(
                "zip entry `{name}` is compressed (method {method}); torch writes entries \
                 stored, so this archive was repacked — unzip and re-zip it with -0"
            ));
        }
        let end = to_usize(
            (start as u64).saturating_add(csize),
            &format!("entry `{name}` end"),
            b.len(),
        )?;
        entries.push(ZipEntry {
            name,
            data: start..end,
        });
    }
    Ok(entries)
}

/// The state-dict pickle's value and the byte range of each storage (`<prefix>/data/<key>`)
/// of the zip archive `b`.
pub fn read_zip(b: &[u8]) -> std::result::Result<(Value, Storages), String> {
    let entries = zip_entries(b)?;
    let pkl = entries
        .iter()
        .find(|e| {
            e.name
                .strip_suffix("data.pkl")
                .is_some_and(|p| p.ends_with('/') && p.matches('/').count() == 1)
        })
        .ok_or("zip archive has no <dir>/data.pkl (not a torch.save checkpoint)")?;
    let prefix = pkl.name.strip_suffix("data.pkl").unwrap_or_default();
    if let Some(order) = entries
        .iter()
        .find(|e| e.name == format!("{prefix}byteorder"))
    {
        if b.get(order.data.clone()) != Some(b"little") {
            return Err("big-endian checkpoints are not supported".into());
        }
    }
    let root = pickle::unpickle(b.get(pkl.data.clone()).unwrap_or(&[]))
        .map_err(|e| format!("{}: {e}", pkl.name))?
        .value;
    let data_dir = format!("{prefix}data/");
    let storages = entries
        .into_iter()
        .filter_map(|e| {
            let key = e.name.strip_prefix(&data_dir)?.to_string();
            Some((key, e.data))
        })
        .collect();
    Ok((root, storages))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// End-of-central-directory record announcing `count` entries in `size` bytes at `off`.
    fn eocd(count: u16, size: u32, off: u32) -> Vec<u8> {
        let mut e = b"PK\x05\x06\0\0\0\0".to_vec();
        e.extend_from_slice(&count.to_le_bytes());
        e.extend_from_slice(&count.to_le_bytes());
        e.extend_from_slice(&size.to_le_bytes());
        e.extend_from_slice(&off.to_le_bytes());
        e.extend_from_slice(&[0, 0]);
        e
    }

    #[test]
    fn zip_hostile_directory_fields_are_refused() {
        let mut f = b"PK\x03\x04".to_vec();
        f.extend([0u8; 46]);
        f.extend(eocd(0xfffe, 46, 4));
        let e = zip_entries(&f).err().unwrap();
        assert!(e.contains("65534 entries in a 46-byte directory"), "{e}");
        let mut f = b"PK\x03\x04".to_vec();
        f.extend(eocd(1, 0xffff_fff0, 0));
        let e = zip_entries(&f).err().unwrap();
        assert!(e.contains("past the end of the file"), "{e}");
        let e = zip_entries(b"PK\x03\x04 no directory").err().unwrap();
        assert!(e.contains("truncated"), "{e}");
    }
}
