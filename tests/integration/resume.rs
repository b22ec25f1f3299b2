//! Crash safety: `cersa convert` is SIGKILLed at random points (by time and by journal
//! progress) on a multi-shard conversion; an OUT_DIR that exists must always be complete,
//! and `--resume` must finish with bytes identical to an uninterrupted run.

use crate::util::*;
use cersa_loader::{Checkpoint, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SHARD_SIZE: &str = "4KB";

/// A source of 48 tensors: matrices (factored), biases and a few excluded ones.
fn make_source(dir: &Path) -> PathBuf {
    let path = dir.join("model.safetensors");
    let mut tensors = Vec::new();
    for l in 0..16 {
        let (m, n) = (48 + l % 3 * 8, 40);
        // Low-rank plus noise so ranks differ between tensors.
        let a = noise(100 + l as u64, m * 4);
        let b = noise(200 + l as u64, 4 * n);
        let e = noise(300 + l as u64, m * n);
        let w: Vec<f32> = (0..m * n)
            .map(|k| {
                let (i, j) = (k / n, k % n);
                (0..4).map(|t| a[i * 4 + t] * b[t * n + j]).sum::<f32>() + 0.05 * e[k]
            })
            .collect();
        tensors.push((format!("layer.{l:02}.weight"), vec![m, n], w));
        tensors.push((
            format!("layer.{l:02}.bias"),
            vec![m],
            noise(400 + l as u64, m),
        ));
        tensors.push((
            format!("layer.{l:02}.norm.weight"),
            vec![8, 8],
            noise(500 + l as u64, 64),
        ));
    }
    let refs: Vec<_> = tensors
        .iter()
        .map(|(n, s, v)| (n.as_str(), s.clone(), v.clone()))
        .collect();
    write_f32(&path, &refs);
    path
}

fn partial_dir(out: &Path) -> PathBuf {
    let name = out.file_name().unwrap().to_string_lossy();
    out.with_file_name(format!(".{name}.cersa-partial"))
}

fn spawn(src: &Path, out: &Path, threads: &str, resume: bool) -> Child {
    let mut cmd = Command::new(bin());
    cmd.args([
        "convert",
        s(src),
        s(out),
        "-q",
        "--max-shard-size",
        SHARD_SIZE,
    ]);
    cmd.args(["--threads", threads]);
    if resume {
        cmd.arg("--resume");
    }
    cmd.stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cersa")
}

/// An OUT_DIR that exists must be a complete, checksummed checkpoint equal to the clean one.
fn assert_complete_if_present(out: &Path, clean: &[(String, Vec<u8>)], what: &str) {
    if out.exists() {
        Checkpoint::open_with(
            out,
            OpenOptions {
                verify_checksums: true,
            },
        )
        .unwrap_or_else(|e| panic!("{what}: incomplete OUT_DIR visible: {e}"));
        assert!(
            contents(out) == clean,
            "{what}: OUT_DIR differs from clean run"
        );
    }
}

fn journal_lines(out: &Path) -> usize {
    std::fs::read_to_string(partial_dir(out).join("journal.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[test]
fn sigkill_at_random_points_then_resume_gives_identical_bytes() {
    let dir = tmp();
    let src = make_source(dir.path());
    let clean_dir = dir.path().join("clean");
    let t0 = Instant::now();
    cersa_ok(&[
        "convert",
        s(&src),
        s(&clean_dir),
        "-q",
        "--max-shard-size",
        SHARD_SIZE,
        "--threads",
        "1",
    ]);
    let clean_time = t0.elapsed();
    let clean = contents(&clean_dir);
    let shards = clean.len() - 1;
    assert!(
        shards >= 5,
        "only {shards} shards; the harness needs several"
    );

    let seed = std::env::var("CERSA_RESUME_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_cafe_u64);
    let mut rng = Rng(seed | 1);
    // Trials until 22 kills landed before the end (a few runs finish first), at most 40.
    let mut trials = 0;
    let mut interrupted = 0;
    let mut stats = Vec::new();
    for trial in 0..40 {
        if interrupted >= 22 {
            break;
        }
        trials += 1;
        let out = dir.path().join(format!("out{trial}"));
        let threads = ["1", "2", "3"][trial % 3];
        let mut child = spawn(&src, &out, threads, false);
        let by_progress = trial % 2 == 1;
        let what = format!("trial {trial} (seed {seed:#x})");
        if by_progress {
            // Kill once the journal holds a random number of closed shards (1 header line).
            // (The last shard is closed by the final commit, never journaled.)
            let target = 1 + rng.below(shards as u64 - 1) as usize;
            let deadline = Instant::now() + Duration::from_secs(60);
            while journal_lines(&out) < 1 + target && Instant::now() < deadline {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                assert_complete_if_present(&out, &clean, &what);
                std::thread::sleep(Duration::from_micros(300));
            }
            // And a little later, so kills also land inside a shard.
            std::thread::sleep(Duration::from_micros(rng.below(3000)));
        } else {
            let max = clean_time.as_micros() as u64 * 7 / 10;
            std::thread::sleep(Duration::from_micros(rng.below(max)));
        }
        child.kill().ok(); // SIGKILL
        let status = child.wait().unwrap();
        assert_complete_if_present(&out, &clean, &what);
        if status.success() || out.exists() {
            // Finished before the kill (or killed between the commit rename and exit): the
            // output was checked complete above, and no partial directory is left.
            assert!(out.exists() && !partial_dir(&out).exists(), "{what}");
            stats.push("finished".to_string());
            continue;
        }
        interrupted += 1;
        let journaled = journal_lines(&out).saturating_sub(1);
        // Every third interrupted trial kills the resumed run as well before resuming again.
        if interrupted % 3 == 0 {
            let mut again = spawn(&src, &out, "2", true);
            std::thread::sleep(Duration::from_micros(
                rng.below(clean_time.as_micros() as u64 / 2),
            ));
            again.kill().ok();
            let st = again.wait().unwrap();
            assert_complete_if_present(&out, &clean, &what);
            if st.success() || out.exists() {
                stats.push(format!("{journaled} shards, finished on 1st resume"));
                assert!(contents(&out) == clean, "{what}");
                continue;
            }
        }
        // A kept shard must be reused, not rewritten: same inode after the final rename.
        let kept_inode = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(partial_dir(&out).join(".shard-00001.safetensors"))
                .ok()
                .filter(|_| journal_lines(&out) > 1)
                .map(|m| m.ino())
        };
        let resumed = spawn(&src, &out, ["2", "1", "4"][trial % 3], true)
            .wait_with_output()
            .unwrap();
        assert!(
            resumed.status.success(),
            "{what}: resume failed: {}",
            String::from_utf8_lossy(&resumed.stderr)
        );
        assert!(!partial_dir(&out).exists(), "{what}: partial dir left");
        assert!(
            contents(&out) == clean,
            "{what}: resumed output differs from the clean run"
        );
        if let Some(ino) = kept_inode {
            use std::os::unix::fs::MetadataExt;
            let first = out.join(format!("cersa-00001-of-{shards:05}.safetensors"));
            assert_eq!(
                std::fs::metadata(first).unwrap().ino(),
                ino,
                "{what}: shard 1 redone"
            );
        }
        stats.push(format!("{journaled} shards kept"));
    }
    eprintln!("kill/resume trials ({shards} shards, clean run {clean_time:?}): {stats:?}");
    assert!(
        interrupted >= 20,
        "only {interrupted}/{trials} kills landed before the end: {stats:?}"
    );
}

#[test]
fn ctrl_c_keeps_a_resumable_state_and_says_how_to_resume() {
    let dir = tmp();
    let src = make_source(dir.path());
    let clean_dir = dir.path().join("clean");
    cersa_ok(&[
        "convert",
        s(&src),
        s(&clean_dir),
        "-q",
        "--max-shard-size",
        SHARD_SIZE,
    ]);
    let out = dir.path().join("out");
    let child = spawn(&src, &out, "1", false);
    let deadline = Instant::now() + Duration::from_secs(60);
    while journal_lines(&out) < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.success() {
        eprintln!("ctrl_c: the run won the race against the signal; nothing checked");
        return;
    }
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(stderr.contains("--resume"), "{stderr}");
    assert!(stderr.contains("partial output kept in"), "{stderr}");
    assert!(!out.exists());
    assert!(partial_dir(&out).join("journal.jsonl").is_file());
    cersa_ok(&[
        "convert",
        s(&src),
        s(&out),
        "-q",
        "--max-shard-size",
        SHARD_SIZE,
        "--resume",
    ]);
    assert!(contents(&out) == contents(&clean_dir));
}

#[test]
fn resume_refuses_other_options_and_keeps_the_partial_output() {
    let dir = tmp();
    let src = make_source(dir.path());
    let out = dir.path().join("out");
    let mut child = spawn(&src, &out, "1", false);
    let deadline = Instant::now() + Duration::from_secs(60);
    while journal_lines(&out) < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
    child.kill().ok();
    if child.wait().unwrap().success() {
        eprintln!("resume_refuses: the run finished before the kill; nothing checked");
        return;
    }
    let before = contents(&partial_dir(&out));
    let stderr = cersa_fails(
        &[
            "convert",
            s(&src),
            s(&out),
            "-q",
            "--max-shard-size",
            SHARD_SIZE,
            "--energy",
            "0.5",
            "--resume",
        ],
        2,
    );
    assert!(
        stderr.contains("different source or different options"),
        "{stderr}"
    );
    assert!(
        contents(&partial_dir(&out)) == before,
        "partial output changed"
    );
    // --resume with nothing to resume is a plain conversion.
    let fresh = dir.path().join("fresh");
    cersa_ok(&["convert", s(&src), s(&fresh), "-q", "--resume"]);
    Checkpoint::open(&fresh).unwrap();
}

/// A write error (here EFBIG from a file-size limit, standing in for a full disk): exit 2,
/// a message naming the file and saying the partial output is kept, and `--resume` (without
/// the limit) finishes with the bytes of a clean run.
#[test]
fn write_error_keeps_partial_output_for_resume() {
    let dir = tmp();
    let src = make_source(dir.path());
    let clean_dir = dir.path().join("clean");
    cersa_ok(&["convert", s(&src), s(&clean_dir), "-q"]);
    let out = dir.path().join("out");
    let (code, stderr) = convert_with_16k_file_cap(&src, &out, "");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("File too large"), "{stderr}");
    assert!(stderr.contains("partial output kept in"), "{stderr}");
    assert!(stderr.contains("--resume"), "{stderr}");
    assert!(!out.exists());
    cersa_ok(&["convert", s(&src), s(&out), "-q", "--resume"]);
    assert!(contents(&out) == contents(&clean_dir));
}

/// A source rewritten while it is converted is caught between tensors, not only at the end.
#[test]
fn source_changed_mid_run_stops_with_an_error() {
    let dir = tmp();
    let src = make_source(dir.path());
    let out = dir.path().join("out");
    let child = spawn(&src, &out, "1", false);
    let deadline = Instant::now() + Duration::from_secs(60);
    while journal_lines(&out) < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
    // Same bytes, new mtime: what a re-download in place looks like to a stat.
    let f = std::fs::File::options().write(true).open(&src).unwrap();
    f.set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    drop(f);
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.success() {
        eprintln!("source_changed: the run finished before the change; nothing checked");
        return;
    }
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("changed during conversion"), "{stderr}");
    assert!(stderr.contains("model.safetensors"), "{stderr}");
    assert!(!out.exists());
    assert!(!partial_dir(&out).exists());
}

fn lock_file(out: &Path) -> PathBuf {
    let name = out.file_name().unwrap().to_string_lossy();
    out.with_file_name(format!(".{name}.cersa-lock"))
}

/// While another process holds the output's lock, convert (fresh, `--resume`, `--overwrite`)
/// into that path stops with a clear error and touches nothing; once it is released the
/// same command runs and removes the lock file.
#[test]
fn a_held_output_lock_refuses_every_writer_and_touches_nothing() {
    let dir = tmp();
    let src = make_source(dir.path());
    let out = dir.path().join("out");
    // A partial run to resume, then the lock held by this (test) process.
    std::fs::create_dir_all(partial_dir(&out)).unwrap();
    std::fs::write(partial_dir(&out).join("journal.jsonl"), "{}\n").unwrap();
    let lock = std::fs::File::create(lock_file(&out)).unwrap();
    lock.lock().unwrap();
    let before = listing(dir.path());
    for extra in [&[][..], &["--resume"], &["--overwrite"]] {
        let mut args = vec!["convert", s(&src), s(&out), "-q"];
        args.extend_from_slice(extra);
        let err = cersa_fails(&args, 2);
        assert!(
            err.contains("another cersa run is writing this output")
                && err.contains(".out.cersa-lock"),
            "{extra:?}: {err}"
        );
        assert_eq!(listing(dir.path()), before, "{extra:?} touched files");
    }
    drop(lock);
    std::fs::remove_dir_all(partial_dir(&out)).unwrap();
    cersa_ok(&["convert", s(&src), s(&out), "-q"]);
    assert!(Checkpoint::open(&out).is_ok());
    assert!(
        !lock_file(&out).exists(),
        "the lock file is removed after the run"
    );
}

/// Two real runs: the second starts while the first is stopped (SIGSTOP) mid-conversion;
/// it is refused, and the first then completes with the bytes of a clean run.
#[test]
fn a_second_convert_into_a_running_output_is_refused() {
    let dir = tmp();
    let src = make_source(dir.path());
    let clean_dir = dir.path().join("clean");
    cersa_ok(&[
        "convert",
        s(&src),
        s(&clean_dir),
        "-q",
        "--max-shard-size",
        SHARD_SIZE,
    ]);
    let out = dir.path().join("out");
    let child = spawn(&src, &out, "1", false);
    let pid = child.id().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    while journal_lines(&out) < 1 && !out.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(100));
    }
    let _ = Command::new("kill").args(["-STOP", &pid]).status();
    let running = !out.exists();
    if running {
        for extra in [&[][..], &["--resume"]] {
            let mut args = vec!["convert", s(&src), s(&out), "-q"];
            args.extend_from_slice(extra);
            let err = cersa_fails(&args, 2);
            assert!(err.contains("another cersa run"), "{extra:?}: {err}");
        }
    } else {
        eprintln!("lock: the first run finished before it could be stopped; nothing raced");
    }
    let _ = Command::new("kill").args(["-CONT", &pid]).status();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(contents(&out) == contents(&clean_dir));
}

fn listing(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut all = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            let len = std::fs::metadata(&p).unwrap().len();
            all.push((p, len));
        }
    }
    all.sort();
    all
}
