//! Faults from outside the process: a source truncated while it is read through its memory
//! map (SIGBUS, turned into a clear error naming the file) and a disk that fills during
//! `convert` (a real size-limited tmpfs; the partial output is kept and `--resume` after
//! space is freed gives the bytes of an uninterrupted run).

use crate::util::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn spawn(args: &[&str]) -> Child {
    Command::new(bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cersa")
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success(), "kill {sig}");
}

/// Stops `child` once `ready` holds (or after 30 s), truncates `src` to its first 4 KiB
/// (the header stays, every tensor's bytes are gone) and lets it run on.
fn truncate_under(child: Child, src: &Path, ready: impl Fn() -> bool) -> Output {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    signal(&child, "-STOP");
    std::fs::File::options()
        .write(true)
        .open(src)
        .unwrap()
        .set_len(4096)
        .unwrap();
    signal(&child, "-CONT");
    child.wait_with_output().unwrap()
}

#[test]
fn a_source_truncated_while_mapped_is_a_clear_error_not_a_bus_error() {
    let dir = tmp();
    let src = slow_source(dir.path());
    // inspect reads tensor after tensor from the map and never re-stats the file: the
    // next read faults.
    let child = spawn(&["inspect", s(&src), "-q", "--threads", "1", "--json"]);
    let started = Instant::now();
    let output = truncate_under(child, &src, || {
        started.elapsed() > Duration::from_millis(300)
    });
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("error: {}: the file shrank", src.display()))
            && stderr.contains("SIGBUS at byte")
            && stderr.contains("truncated or rewritten"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty(), "no half report");

    // convert, two threads reading ahead: the fault or the between-tensor check stops it,
    // either way naming the file, with exit 2 and no output directory.
    let src = slow_source(dir.path());
    let out = dir.path().join("out");
    let child = spawn(&[
        "convert",
        s(&src),
        s(&out),
        "-q",
        "--threads",
        "2",
        "--max-shard-size",
        "4MB",
    ]);
    let partial = dir.path().join(".out.cersa-partial");
    let journal = partial.join("journal.jsonl");
    let output = truncate_under(child, &src, || {
        std::fs::read_to_string(&journal).is_ok_and(|t| t.lines().count() >= 2)
    });
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(s(&src)), "{stderr}");
    assert!(
        stderr.contains("the file shrank") || stderr.contains("changed during conversion"),
        "{stderr}"
    );
    assert!(!out.exists(), "no output directory after the fault");
}

/// A size-limited tmpfs mounted for the test and unmounted on drop.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(path: PathBuf, size: &str) -> Option<Self> {
        std::fs::create_dir_all(&path).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                s(&path),
            ])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|st| st.success());
        ok.then_some(SmallDisk(path))
    }

    fn resize(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}"), s(&self.0)])
            .status()
            .unwrap();
        assert!(ok.success(), "remount");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_keeps_the_partial_output_and_resume_finishes_it() {
    let dir = tmp();
    let src = dir.path().join("model.safetensors");
    let names: Vec<String> = (0..24).map(|l| format!("layer.{l:02}.weight")).collect();
    let tensors: Vec<_> = (names.iter().zip(1..))
        .map(|(name, seed)| (name.as_str(), vec![128, 128], noise(seed, 128 * 128)))
        .collect();
    write_f32(&src, &tensors);
    let args = |out: &Path| {
        let o = s(out).to_string();
        vec![
            "convert".to_string(),
            s(&src).to_string(),
            o,
            "-q".into(),
            "--max-shard-size".into(),
            "256KB".into(),
        ]
    };
    let clean = dir.path().join("clean");
    let argv = args(&clean);
    cersa_ok(&argv.iter().map(String::as_str).collect::<Vec<_>>());
    let total: u64 = contents(&clean).iter().map(|(_, b)| b.len() as u64).sum();

    // Not root, or no tmpfs: this check needs a real small filesystem (CI runs as root).
    let Some(disk) = SmallDisk::mount(dir.path().join("small"), "640k") else {
        panic!("mounting a tmpfs failed: run the integration tests as root");
    };
    assert!(
        total > 1 << 20,
        "the output ({total} B) must not fit the small disk"
    );
    let out = disk.0.join("out");
    let argv = args(&out);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let err = cersa_fails(&argv, 2);
    assert!(
        err.contains("No space left on device") && err.contains("partial output kept in"),
        "{err}"
    );
    assert!(!out.exists(), "nothing that looks complete");
    let partial = disk.0.join(".out.cersa-partial");
    assert!(partial.join("journal.jsonl").is_file(), "{err}");

    disk.resize("64m");
    let resumed: Vec<&str> = argv.iter().copied().chain(["--resume"]).collect();
    cersa_ok(&resumed);
    assert!(contents(&out) == contents(&clean), "resumed bytes differ");
    drop(disk);
}
