//! Inputs that are not regular files (a FIFO, a device, a socket, a directory) where a
//! file is expected: every command refuses them by name and cause, before opening them
//! for reading, so nothing blocks (a FIFO used to make `convert` wait forever).

use crate::util::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `cersa ARGS`, killing it after 30 s (the failure this file tests is a hang);
/// returns (exit code, stderr and stdout).
fn cersa_within(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cersa");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut err).unwrap();
            return (status.code(), err);
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("cersa {args:?} still runs after 30 s: it blocked on a non-regular file");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn mkfifo(path: &Path) {
    let made = Command::new("mkfifo").arg(path).status().expect("mkfifo");
    assert!(made.success());
}

/// Asserts `cersa ARGS` exits 2 naming `path` and `what`.
fn refused(args: &[&str], path: &Path, what: &str) {
    let (code, err) = cersa_within(args);
    assert_eq!(code, Some(2), "cersa {args:?}: {err}");
    assert!(err.contains(s(path)), "cersa {args:?}: {err}");
    assert!(
        err.contains(&format!("{what} where a regular file is expected")),
        "cersa {args:?}: {err}"
    );
}

#[test]
fn sources_that_are_not_regular_files_are_refused_without_blocking() {
    let dir = tmp();
    let d = dir.path();
    let out = d.join("out");
    for name in [
        "model.safetensors",
        "model.gguf",
        "pytorch_model.bin",
        "weights",
    ] {
        let fifo = d.join(name);
        mkfifo(&fifo);
        for args in [
            vec!["convert", s(&fifo), s(&out), "-q"],
            vec!["inspect", s(&fifo), "-q"],
            vec!["plan", s(&fifo), "--budget", "0.5", "-q"],
        ] {
            refused(&args, &fifo, "a FIFO (named pipe)");
        }
        assert!(!out.exists(), "convert left {out:?} for {name}");
    }
    refused(
        &["convert", "/dev/zero", s(&out), "-q"],
        Path::new("/dev/zero"),
        "a device",
    );
    let sock = d.join("sock.safetensors");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    refused(&["inspect", s(&sock)], &sock, "a socket");

    // A shard of a sharded checkpoint: a FIFO, then a directory.
    let sharded = d.join("sharded");
    std::fs::create_dir(&sharded).unwrap();
    write_f32(
        &sharded.join("model-00001-of-00002.safetensors"),
        &[("a.weight", vec![8, 8], noise(1, 64))],
    );
    let index = serde_json::json!({
        "metadata": {},
        "weight_map": {
            "a.weight": "model-00001-of-00002.safetensors",
            "b.weight": "model-00002-of-00002.safetensors"
        }
    });
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let shard = sharded.join("model-00002-of-00002.safetensors");
    mkfifo(&shard);
    refused(
        &["convert", s(&sharded), s(&out), "-q"],
        &shard,
        "a FIFO (named pipe)",
    );
    std::fs::remove_file(&shard).unwrap();
    std::fs::create_dir(&shard).unwrap();
    refused(
        &["convert", s(&sharded), s(&out), "-q"],
        &shard,
        "a directory",
    );
    assert!(!out.exists());
}

#[test]
fn side_inputs_and_checkpoint_files_that_are_not_regular_files_are_refused() {
    let dir = tmp();
    let d = dir.path();
    let src = d.join("model.safetensors");
    write_f32(
        &src,
        &[("layer.0.proj.weight", vec![16, 12], noise(3, 16 * 12))],
    );
    let fifo = d.join("calib.safetensors");
    mkfifo(&fifo);
    let out = d.join("out");
    refused(
        &["convert", s(&src), s(&out), "--calibration", s(&fifo), "-q"],
        &fifo,
        "a FIFO (named pipe)",
    );
    refused(
        &["convert", s(&src), s(&out), "--plan", s(&fifo), "-q"],
        &fifo,
        "a FIFO (named pipe)",
    );

    // A converted checkpoint whose shard, then manifest, is swapped for a FIFO.
    cersa_ok(&["convert", s(&src), s(&out), "-q", "--force-factor"]);
    let shard: PathBuf = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .unwrap();
    std::fs::remove_file(&shard).unwrap();
    mkfifo(&shard);
    for args in [
        vec!["inspect", s(&out)],
        vec!["verify", s(&out), "-q"],
        vec!["export", s(&out), s(&d.join("exported"))],
    ] {
        let (code, err) = cersa_within(&args);
        assert!(matches!(code, Some(1 | 2)), "cersa {args:?}: {err}");
        assert!(
            err.contains("a FIFO (named pipe) where a regular file is expected"),
            "cersa {args:?}: {err}"
        );
    }
    let manifest = out.join("cersa.json");
    std::fs::remove_file(&manifest).unwrap();
    mkfifo(&manifest);
    let (code, err) = cersa_within(&["inspect", s(&out)]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("a FIFO (named pipe)"), "{err}");
}
