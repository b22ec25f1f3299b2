//! Opening inputs that must be regular files. A FIFO named `model.safetensors` would make a
//! plain `open` block forever, a device or socket is never a checkpoint: they are refused
//! from their metadata before any `open`, and the file actually opened is checked again (a
//! path swapped in between cannot block either: it is opened non-blocking).

use std::fs::{File, Metadata};
use std::io::{Error, ErrorKind, Read};
use std::path::Path;

/// What a non-regular file is, in words (`None` for a regular file).
fn not_regular(meta: &Metadata) -> Option<&'static str> {
    let t = meta.file_type();
    if t.is_file() {
        return None;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return Some("a FIFO (named pipe)");
        }
        if t.is_socket() {
            return Some("a socket");
        }
        if t.is_block_device() || t.is_char_device() {
            return Some("a device");
        }
    }
    Some(if t.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    })
}

fn refuse(what: &str) -> Error {
    Error::new(
        ErrorKind::InvalidInput,
        format!("{what} where a regular file is expected"),
    )
}

/// Fails unless `path` (following symlinks) is a regular file; does not open it.
pub fn check_regular(path: &Path) -> std::io::Result<Metadata> {
    let meta = std::fs::metadata(path)?;
    match not_regular(&meta) {
        Some(what) => Err(refuse(what)),
        None => Ok(meta),
    }
}

/// Opens `path` for reading if it is a regular file (see the module docs).
pub fn open_regular(path: &Path) -> std::io::Result<File> {
    check_regular(path)?;
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // No effect on a regular file; keeps a FIFO swapped in after the check from
        // blocking the open.
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path)?;
    match not_regular(&file.metadata()?) {
        Some(what) => Err(refuse(what)),
        None => Ok(file),
    }
}

/// The whole contents of `path` if it is a regular file (`std::fs::read` otherwise).
pub fn read_regular(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut file = open_regular(path)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_a_device_a_socket_and_a_directory_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("model.safetensors");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.unwrap().success());
        let sock = dir.path().join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        for (path, what) in [
            (fifo.as_path(), "a FIFO (named pipe)"),
            (Path::new("/dev/null"), "a device"),
            (sock.as_path(), "a socket"),
            (dir.path(), "a directory"),
        ] {
            let err = open_regular(path).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{path:?}");
            assert!(err.to_string().starts_with(what), "{path:?}: {err}");
            assert!(read_regular(path).is_err());
        }
        let file = dir.path().join("f");
        std::fs::write(&file, b"abc").unwrap();
        assert_eq!(read_regular(&file).unwrap(), b"abc");
    }
}
