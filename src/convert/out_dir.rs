//! The output directory: a run writes into the sibling `.OUT.cersa-partial` and renames it
//! to `OUT` only once it is complete. With `--overwrite` an existing CERSA directory at
//! `OUT` is renamed aside to `.OUT.cersa-replaced` just before that rename and removed
//! after it, so at every moment one complete output exists (a crash in between leaves both
//! hidden siblings; the next successful run removes the stale one).

//!
//! Two runs into the same `OUT` at once are refused: each holds an exclusive `flock` on the
//! sibling `.OUT.cersa-lock` from before it touches the partial directory until it has
//! renamed it into place (the kernel drops the lock of a killed run, so `--resume` after a
//! crash is never locked out).

use crate::error::{ConvertError, Result};
use crate::journal;
use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};

/// The exclusive lock of one output path, released (and its file removed) on drop.
#[derive(Debug)]
struct OutputLock {
    path: PathBuf,
    // Held open: closing the descriptor releases the flock.
    _file: Option<File>,
}

impl OutputLock {
    fn acquire(out: &Path) -> Result<Self> {
        let (_, path) = sibling(out, "lock")?;
        let locked = || ConvertError::OutputLocked {
            out: out.to_path_buf(),
            lock: path.clone(),
        };
        // A run that removed the file after we opened it but before we locked it leaves us
        // holding a lock on an unlinked inode while a third run locks a new file: recheck
        // that the path is still our file, and retry if not.
        for _ in 0..8 {
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| ConvertError::io(&path, "create lock file", e))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => return Err(locked()),
                // Filesystems without flock: proceed unlocked, as before locks existed.
                Err(TryLockError::Error(e)) if lock_unsupported(&e) => {
                    return Ok(OutputLock { path, _file: None })
                }
                Err(TryLockError::Error(e)) => {
                    return Err(ConvertError::io(&path, "lock", e));
                }
            }
            if same_file(&file, &path) {
                return Ok(OutputLock {
                    path,
                    _file: Some(file),
                });
            }
        }
        Err(locked())
    }
}

fn lock_unsupported(e: &std::io::Error) -> bool {
    // As some network filesystems answer.
    e.kind() == std::io::ErrorKind::Unsupported
        || matches!(e.raw_os_error(), Some(libc::ENOLCK | libc::EOPNOTSUPP))
}

#[cfg(unix)]
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_file: &File, _path: &Path) -> bool {
    true
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still held, so a waiting run's recheck sees the change.
        if self._file.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Where a run writes before its output appears.
#[derive(Debug)]
pub(crate) struct Staging {
    /// The sibling partial directory the run writes into.
    pub partial: PathBuf,
    /// It holds an interrupted run to resume (see [`crate::journal`]).
    pub resumable: bool,
    /// An existing CERSA directory at the output path is replaced on commit.
    replace: bool,
    /// Held for the whole run (dropped with the staging).
    _lock: OutputLock,
}

/// `.NAME.cersa-SUFFIX` beside `out`, and the parent directory (created if missing).
fn sibling(out: &Path, suffix: &str) -> Result<(PathBuf, PathBuf)> {
    let name = out.file_name().ok_or_else(|| {
        ConvertError::Options(format!("output path {} has no file name", out.display()))
    })?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let path = parent.join(format!(".{}.cersa-{suffix}", name.to_string_lossy()));
    Ok((parent, path))
}

/// Whether `out` is absent or an empty directory (both are simply taken).
fn is_free(out: &Path) -> bool {
    !out.exists()
        || std::fs::read_dir(out)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false)
}

/// Errors unless `out` is a CERSA directory: `--overwrite` replaces nothing else, so a
/// user's other directory is never deleted.
fn check_replaceable(out: &Path) -> Result<()> {
    let refuse = |reason: &str| ConvertError::NotReplaceable {
        path: out.to_path_buf(),
        reason: reason.to_string(),
    };
    if !out.is_dir() {
        return Err(refuse("it is not a directory"));
    }
    let manifest = out.join(cersa_loader::MANIFEST_FILE);
    let text = cersa_loader::regular::read_regular(&manifest)
        .map_err(|_| refuse("it holds no readable cersa.json (not a CERSA directory)"))?;
    let format = serde_json::from_slice::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("format")?.as_str().map(str::to_owned));
    if format.as_deref() != Some(cersa_loader::FORMAT_NAME) {
        return Err(refuse("its cersa.json is not of format `cersa`"));
    }
    Ok(())
}

/// Checks `out` and creates (or, when resuming, reuses) the sibling partial directory the
/// output is written into. A non-empty `out` is an error unless `overwrite` and it is a
/// CERSA directory.
pub(crate) fn prepare_output(out: &Path, resume: bool, overwrite: bool) -> Result<Staging> {
    let (parent, tmp) = sibling(out, "partial")?;
    std::fs::create_dir_all(&parent)
        .map_err(|e| ConvertError::io(&parent, "create directory", e))?;
    let lock = OutputLock::acquire(out)?;
    let replace = !is_free(out);
    if replace {
        if !overwrite {
            return Err(ConvertError::OutputExists(out.to_path_buf()));
        }
        check_replaceable(out)?;
    }
    let staging = |resumable, lock| Staging {
        partial: tmp.clone(),
        resumable,
        replace,
        _lock: lock,
    };
    if resume && tmp.join(journal::JOURNAL_FILE).is_file() {
        return Ok(staging(true, lock));
    }
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .map_err(|e| ConvertError::io(&tmp, "remove stale partial output", e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| ConvertError::io(&tmp, "create directory", e))?;
    Ok(staging(false, lock))
}

/// Renames the complete partial directory to `out`, replacing what `prepare_output`
/// accepted there: an empty directory, or (checked again now) a CERSA directory.
pub(crate) fn commit(staging: &Staging, out: &Path) -> Result<()> {
    let (parent, replaced) = sibling(out, "replaced")?;
    let tmp = &staging.partial;
    let aside = staging.replace && !is_free(out);
    if aside {
        check_replaceable(out)?;
        if replaced.exists() {
            // Left by a run that crashed between the two renames below.
            std::fs::remove_dir_all(&replaced)
                .map_err(|e| ConvertError::io(&replaced, "remove stale replaced output", e))?;
        }
        std::fs::rename(out, &replaced)
            .map_err(|e| ConvertError::io(out, "move the replaced output aside", e))?;
    } else if out.exists() {
        // An empty directory is replaced (rename(2) onto an empty directory is atomic).
        std::fs::remove_dir(out)
            .map_err(|e| ConvertError::io(out, "replace empty directory", e))?;
    }
    if let Err(e) = std::fs::rename(tmp, out) {
        if aside {
            // Put the previous output back: a failed run never leaves neither.
            let _ = std::fs::rename(&replaced, out);
        }
        return Err(ConvertError::io(out, "rename into place", e));
    }
    // Persist the rename; best effort on filesystems without directory fsync.
    let _ = std::fs::File::open(&parent).and_then(|d| d.sync_all());
    if replaced.exists() {
        std::fs::remove_dir_all(&replaced).map_err(|e| {
            ConvertError::io(
                &replaced,
                "remove the replaced output (the new output is in place)",
                e,
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cersa_dir(path: &Path, format: &str) {
        std::fs::create_dir_all(path).unwrap();
        std::fs::write(
            path.join("cersa.json"),
            format!(r#"{{"format":"{format}"}}"#),
        )
        .unwrap();
    }

    #[test]
    fn overwrite_replaces_only_a_cersa_directory() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        cersa_dir(&out, "cersa");
        std::fs::write(out.join("old"), "1").unwrap();
        assert!(matches!(
            prepare_output(&out, false, false),
            Err(ConvertError::OutputExists(_))
        ));
        let staging = prepare_output(&out, false, true).unwrap();
        std::fs::write(staging.partial.join("new"), "2").unwrap();
        // A stale aside directory from a crashed run is cleared too.
        cersa_dir(&dir.path().join(".out.cersa-replaced"), "cersa");
        commit(&staging, &out).unwrap();
        assert!(out.join("new").is_file() && !out.join("old").exists());
        // Releasing the lock removes its file.
        drop(staging);
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["out"]);

        for (what, make) in [
            (
                "other format",
                &(|p: &Path| cersa_dir(p, "other")) as &dyn Fn(&Path),
            ),
            ("no manifest", &|p: &Path| {
                std::fs::create_dir_all(p).unwrap();
                std::fs::write(p.join("notes.txt"), "mine").unwrap();
            }),
            ("a file", &|p: &Path| std::fs::write(p, "mine").unwrap()),
        ] {
            let other = dir.path().join(what);
            make(&other);
            let err = prepare_output(&other, false, true).unwrap_err();
            assert!(
                matches!(err, ConvertError::NotReplaceable { .. }),
                "{what}: {err}"
            );
            assert!(other.exists(), "{what}");
        }
    }
}
