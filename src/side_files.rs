//! Hugging Face side files (`config.json`, tokenizer files, …): `cersa convert` and
//! `cersa merge` copy them byte for byte from the source directory into the output, and
//! list them in the manifest's `side_files`, so the CERSA directory alone rebuilds the
//! model and its tokenizer (spec §1).
//!
//! Only regular files are copied (a symlink to one is followed, as in a Hugging Face cache
//! snapshot); anything else under one of these names (a directory, a FIFO, a socket, a
//! device) is refused with an error naming it, and a file is opened without blocking, so a
//! FIFO never hangs the run. Each file is capped at [`MAX_SIDE_FILE_BYTES`].

use crate::error::{ConvertError, Result};
use crate::input::Source;
use cersa_loader::manifest::SideFile;
use cersa_loader::writer::hex;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The side files copied when present, in name order (the order of the manifest list).
pub const SIDE_FILES: &[&str] = &[
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "config.json",
    "generation_config.json",
    "merges.txt",
    "preprocessor_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
];

/// The side file `convert` writes itself for a GGUF source: the source's metadata pairs
/// in a GGUF file with no tensors ([`crate::input::Source::gguf_metadata`]). Carried by
/// `merge`, read by `export --to gguf`; never copied from a source directory.
pub const SOURCE_METADATA: &str = "source-metadata.gguf";

/// Largest side file copied (64 MiB); a larger one is an error naming it.
pub const MAX_SIDE_FILE_BYTES: u64 = 64 << 20;

/// The directory the source's files are in (the source directory, or the directory of a
/// single checkpoint file), where its side files are looked for.
pub fn source_dir(src: &dyn Source) -> Option<PathBuf> {
    let first = src.files().first()?;
    let depth = Path::new(&first.file).components().count();
    let mut dir = src.file_path(0).to_path_buf();
    for _ in 0..depth {
        if !dir.pop() {
            return None;
        }
    }
    if dir.as_os_str().is_empty() {
        dir = PathBuf::from(".");
    }
    Some(dir)
}

/// Copies the [`SIDE_FILES`] present in `from` into `to` (replacing what an interrupted
/// run left there), and lists them with their sizes and sha256.
pub fn copy_side_files(from: &Path, to: &Path) -> Result<Vec<SideFile>> {
    let mut out = Vec::new();
    for name in SIDE_FILES {
        if let Some(file) = copy_one(&from.join(name), &to.join(name), name)? {
            out.push(file);
        }
    }
    Ok(out)
}

fn refuse(path: &Path, reason: String) -> ConvertError {
    ConvertError::Source {
        path: path.to_path_buf(),
        reason,
    }
}

/// What `meta` is, for the error that refuses it.
fn kind_of(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_block_device() || t.is_char_device() {
            return "a device";
        }
    }
    "not a regular file"
}

/// Opens `path` for reading without blocking on a FIFO (where the platform allows).
fn open_nonblocking(path: &Path) -> std::io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    options.open(path)
}

/// Copies `src` to `dest` if `src` exists; errors when it is not a regular file, is over
/// the cap, or cannot be read or written.
fn copy_one(src: &Path, dest: &Path, name: &str) -> Result<Option<SideFile>> {
    match std::fs::symlink_metadata(src) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ConvertError::io(src, "stat side file", e)),
        Ok(_) => {}
    }
    let not_regular = |meta: &std::fs::Metadata| {
        refuse(
            src,
            format!(
                "side file {name} is {}; only regular files are copied into the CERSA \
                 directory — replace it with a regular file or remove it",
                kind_of(meta)
            ),
        )
    };
    // Follows a symlink (Hugging Face cache snapshots link into `blobs/`).
    let meta = std::fs::metadata(src).map_err(|e| ConvertError::io(src, "stat side file", e))?;
    if !meta.is_file() {
        return Err(not_regular(&meta));
    }
    let too_large = |len: u64| {
        refuse(
            src,
            format!(
                "side file {name} is {len} bytes, over the {MAX_SIDE_FILE_BYTES}-byte cap \
                 on side files"
            ),
        )
    };
    if meta.len() > MAX_SIDE_FILE_BYTES {
        return Err(too_large(meta.len()));
    }
    let mut input = open_nonblocking(src).map_err(|e| ConvertError::io(src, "open", e))?;
    // Checked again on the open file: the name may have been replaced since the stat.
    let meta = input
        .metadata()
        .map_err(|e| ConvertError::io(src, "stat side file", e))?;
    if !meta.is_file() {
        return Err(not_regular(&meta));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    (&mut input)
        .take(MAX_SIDE_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ConvertError::io(src, "read", e))?;
    if bytes.len() as u64 > MAX_SIDE_FILE_BYTES {
        return Err(too_large(bytes.len() as u64));
    }
    let mut f = File::create(dest).map_err(|e| ConvertError::io(dest, "create", e))?;
    f.write_all(&bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| ConvertError::io(dest, "write", e))?;
    Ok(Some(SideFile {
        file: name.to_string(),
        bytes: bytes.len() as u64,
        sha256: hex(&Sha256::digest(&bytes)),
    }))
}

/// Writes the generated side file `name` into `to` and lists it.
pub fn write_generated(to: &Path, name: &str, bytes: &[u8]) -> Result<SideFile> {
    let dest = to.join(name);
    let mut f = File::create(&dest).map_err(|e| ConvertError::io(&dest, "create", e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| ConvertError::io(&dest, "write", e))?;
    Ok(SideFile {
        file: name.to_string(),
        bytes: bytes.len() as u64,
        sha256: hex(&Sha256::digest(bytes)),
    })
}

/// Inserts `file` into the name-ordered list `files` (replacing one of the same name).
pub fn insert_side_file(files: &mut Vec<SideFile>, file: SideFile) {
    files.retain(|f| f.file != file.file);
    let at = files.partition_point(|f| f.file < file.file);
    files.insert(at, file);
}

/// Copies a CERSA checkpoint's side files into `to` (`merge`, `export`), checking that
/// every one its manifest lists is still there. `generated`: also [`SOURCE_METADATA`]
/// (a CERSA directory keeps it, a Hugging Face export does not need it).
pub fn carry_side_files(
    ckpt: &cersa_loader::Checkpoint,
    to: &Path,
    generated: bool,
) -> Result<Vec<SideFile>> {
    let mut copied = copy_side_files(ckpt.dir(), to)?;
    let listed = |name: &str| ckpt.manifest().side_files.iter().any(|f| f.file == name);
    if generated && listed(SOURCE_METADATA) {
        let (from, dest) = (ckpt.dir().join(SOURCE_METADATA), to.join(SOURCE_METADATA));
        if let Some(file) = copy_one(&from, &dest, SOURCE_METADATA)? {
            insert_side_file(&mut copied, file);
        }
    }
    let skipped = |name: &str| !generated && name == SOURCE_METADATA;
    if let Some(lost) = ckpt
        .manifest()
        .side_files
        .iter()
        .find(|listed| !skipped(&listed.file) && !copied.iter().any(|f| f.file == listed.file))
    {
        return Err(ConvertError::Source {
            path: ckpt.dir().join(&lost.file),
            reason: "the checkpoint lists this side file in its manifest but it is missing \
                     (or not a side file cersa copies); restore it"
                .into(),
        });
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_present_files_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("src"), dir.path().join("out"));
        std::fs::create_dir_all(&from).unwrap();
        std::fs::create_dir_all(&to).unwrap();
        std::fs::write(from.join("tokenizer.json"), b"{\"t\":1}").unwrap();
        std::fs::write(from.join("config.json"), b"{}").unwrap();
        std::fs::write(from.join("notes.txt"), b"not copied").unwrap();
        let files = copy_side_files(&from, &to).unwrap();
        let names: Vec<_> = files.iter().map(|f| f.file.as_str()).collect();
        assert_eq!(names, ["config.json", "tokenizer.json"]);
        assert_eq!(files[0].bytes, 2);
        assert_eq!(
            files[0].sha256,
            "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        assert_eq!(
            std::fs::read(to.join("tokenizer.json")).unwrap(),
            b"{\"t\":1}"
        );
        assert!(!to.join("notes.txt").exists());
    }

    #[test]
    fn refuses_a_directory_and_an_oversized_file() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("src"), dir.path().join("out"));
        std::fs::create_dir_all(from.join("config.json")).unwrap();
        std::fs::create_dir_all(&to).unwrap();
        let err = copy_side_files(&from, &to).unwrap_err().to_string();
        assert!(err.contains("config.json is a directory"), "{err}");
        std::fs::remove_dir(from.join("config.json")).unwrap();
        let big = File::create(from.join("vocab.txt")).unwrap();
        big.set_len(MAX_SIDE_FILE_BYTES + 1).unwrap();
        let err = copy_side_files(&from, &to).unwrap_err().to_string();
        assert!(err.contains("vocab.txt") && err.contains("cap"), "{err}");
        assert!(!to.join("vocab.txt").exists());
    }
}
