//! Partitioned conversion: `convert --part I/N` on every part, then `cersa assemble`, gives
//! the bytes of one `cersa convert` run; parts of another run, missing, doubled or altered
//! parts are refused before anything is written; a killed part resumes.

use crate::util::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Converts every part of `n` (in reverse order, with alternating thread counts) and
/// returns the part directories.
fn convert_parts(src: &Path, root: &Path, n: usize, extra: &[&str]) -> Vec<PathBuf> {
    (0..n)
        .rev()
        .map(|i| {
            let dir = root.join(format!("part-{i}"));
            let spec = format!("{i}/{n}");
            let threads = if i % 2 == 0 { "1" } else { "2" };
            let mut args = vec![
                "convert",
                s(src),
                s(&dir),
                "-q",
                "--part",
                &spec,
                "--threads",
                threads,
            ];
            args.extend_from_slice(extra);
            cersa_ok(&args);
            dir
        })
        .collect()
}

fn assemble(out: &Path, parts: &[PathBuf]) -> std::process::Output {
    let mut args = vec!["assemble".to_string(), s(out).into(), "-q".into()];
    args.extend(parts.iter().map(|p| s(p).to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    cersa(&refs)
}

fn part_record(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("cersa-part.json")).unwrap()).unwrap()
}

#[test]
fn assembled_parts_are_byte_identical_to_one_run() {
    let cases: &[(&str, &[&str], &[usize])] = &[
        // Several shards (the cap splits the output), Q8_0 factors, dense tensors.
        (
            "minilm-excerpt/model.safetensors",
            &["--max-shard-size", "400KB", "--dtype", "q8_0"],
            &[1, 3, 4],
        ),
        (
            "minilm-excerpt/model.safetensors",
            &["--energy", "0.95", "--energy", "*attention*=0.8"],
            &[2],
        ),
        // GGUF: quantized tensors, the source-metadata side file.
        (
            "gguf/minilm-mixed.gguf",
            &["--max-shard-size", "100KB"],
            &[3],
        ),
        // Integer, bool and 1-D tensors beside matrices.
        ("mixed/model.safetensors", &[], &[2, 5]),
    ];
    for (fixture_name, extra, counts) in cases {
        let dir = tmp();
        let src = fixture(fixture_name);
        let one = dir.path().join("one");
        let mut args = vec!["convert", s(&src), s(&one), "-q"];
        args.extend_from_slice(extra);
        cersa_ok(&args);
        let expected = contents(&one);
        for &n in *counts {
            let root = dir.path().join(format!("parts-{n}"));
            let parts = convert_parts(&src, &root, n, extra);
            // Every tensor is in exactly one part, and the parts' lists agree.
            let records: Vec<_> = parts.iter().map(|p| part_record(p)).collect();
            let list = &records[0]["tensors"];
            let n_tensors = list.as_array().unwrap().len();
            assert!(records.iter().all(|r| &r["tensors"] == list));
            let held: usize = parts.iter().map(|p| stored_names(p).len()).sum();
            assert_eq!(held, n_tensors, "{fixture_name} {n} parts");
            if n > 1 && n_tensors >= n {
                // Each part does some of the work.
                for p in &parts {
                    assert!(!stored_names(p).is_empty(), "{}", p.display());
                }
            }
            let out = dir.path().join(format!("assembled-{n}"));
            let done = assemble(&out, &parts);
            assert!(
                done.status.success(),
                "{fixture_name} {n}: {}",
                String::from_utf8_lossy(&done.stderr)
            );
            assert!(
                contents(&out) == expected,
                "{fixture_name} {extra:?}: {n} parts assembled differ from one run"
            );
            cersa_ok(&["verify", s(&out), "--source", s(&src), "-q"]);
        }
    }
}

/// Source names held by a part (its manifest's tensors).
fn stored_names(dir: &Path) -> Vec<String> {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("cersa.json")).unwrap()).unwrap();
    m["tensors"].as_object().unwrap().keys().cloned().collect()
}

#[test]
fn assemble_refuses_parts_that_do_not_make_one_run() {
    let dir = tmp();
    let src = fixture("mixed/model.safetensors");
    let parts = convert_parts(&src, &dir.path().join("a"), 3, &[]);
    let other = convert_parts(&src, &dir.path().join("b"), 3, &["--energy", "0.5"]);
    let four = convert_parts(&src, &dir.path().join("c"), 4, &[]);
    let out = dir.path().join("out");
    let (p0, p1, p2) = (parts[2].clone(), parts[1].clone(), parts[0].clone());
    let cases: Vec<(&str, Vec<PathBuf>, &str)> = vec![
        ("missing", vec![p0.clone(), p2.clone()], "part(s) 1 missing"),
        (
            "doubled",
            vec![p0.clone(), p1.clone(), p1.clone(), p2.clone()],
            "given twice",
        ),
        (
            "other options",
            vec![p0.clone(), other[1].clone(), p2.clone()],
            "not a part of the same conversion",
        ),
        (
            "other count",
            vec![p0.clone(), p1.clone(), four[0].clone()],
            "not a part of the same conversion",
        ),
        (
            "not a part",
            vec![fixture("mixed"), p1.clone(), p2.clone()],
            "cersa-part.json",
        ),
    ];
    for (what, given, needle) in cases {
        let done = assemble(&out, &given);
        let err = String::from_utf8_lossy(&done.stderr);
        assert_eq!(done.status.code(), Some(2), "{what}: {err}");
        assert!(err.contains(needle), "{what}: {err}");
        assert!(!out.exists(), "{what}: output written");
    }

    // The output may not be one of the parts, even with --overwrite.
    let err = cersa_fails(
        &[
            "assemble",
            s(&p0),
            s(&p0),
            s(&p1),
            s(&p2),
            "--overwrite",
            "-q",
        ],
        2,
    );
    assert!(err.contains("the output is one of the parts"), "{err}");
    assert!(p0.join("cersa-part.json").is_file());

    // A part whose shard changed after it was written fails its sha256 check.
    let shard = std::fs::read_dir(&p1)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .unwrap();
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&shard, &bytes).unwrap();
    let done = assemble(&out, &[p0, p1, p2]);
    let err = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(2), "{err}");
    assert!(err.contains("sha256"), "{err}");
    assert!(!out.exists());
}

#[test]
fn part_auto_reads_slurm_and_kubernetes_indices() {
    let dir = tmp();
    let src = fixture("mixed/model.safetensors");
    let run = |out: &Path, env: &[(&str, &str)], extra: &[&str]| {
        let mut cmd = Command::new(bin());
        cmd.args(["convert", s(&src), s(out), "-q", "--part", "auto"])
            .args(extra);
        for var in [
            "SLURM_ARRAY_TASK_ID",
            "SLURM_ARRAY_TASK_MIN",
            "SLURM_ARRAY_TASK_MAX",
            "SLURM_ARRAY_TASK_COUNT",
            "SLURM_ARRAY_TASK_STEP",
            "JOB_COMPLETION_INDEX",
        ] {
            cmd.env_remove(var);
        }
        cmd.envs(env.iter().copied()).output().unwrap()
    };
    let slurm = dir.path().join("slurm");
    let done = run(
        &slurm,
        &[
            ("SLURM_ARRAY_TASK_ID", "12"),
            ("SLURM_ARRAY_TASK_MIN", "10"),
            ("SLURM_ARRAY_TASK_MAX", "13"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
            ("SLURM_ARRAY_TASK_STEP", "1"),
        ],
        &[],
    );
    assert!(done.status.success(), "{:?}", done);
    let r = part_record(&slurm);
    assert_eq!(
        (r["part"].as_u64(), r["parts"].as_u64()),
        (Some(2), Some(4))
    );

    let k8s = dir.path().join("k8s");
    let done = run(&k8s, &[("JOB_COMPLETION_INDEX", "1")], &["--parts", "3"]);
    assert!(done.status.success(), "{:?}", done);
    let r = part_record(&k8s);
    assert_eq!(
        (r["part"].as_u64(), r["parts"].as_u64()),
        (Some(1), Some(3))
    );

    for (env, extra, needle) in [
        (
            &[("JOB_COMPLETION_INDEX", "1")][..],
            &[][..],
            "give the Job's completions as --parts N",
        ),
        (&[][..], &["--parts", "3"][..], "no array job"),
        (
            &[("JOB_COMPLETION_INDEX", "0")][..],
            &["--parts", "2", "--budget", "0.5"][..],
            "plan once with `cersa plan",
        ),
        (
            &[("JOB_COMPLETION_INDEX", "3")][..],
            &["--parts", "3"][..],
            "not below the number of parts",
        ),
    ] {
        let out = dir.path().join("refused");
        let done = run(&out, env, extra);
        let err = String::from_utf8_lossy(&done.stderr);
        assert_eq!(done.status.code(), Some(2), "{err}");
        assert!(err.contains(needle), "{needle}: {err}");
        assert!(!out.exists());
    }
}

#[test]
fn sigterm_stops_a_part_like_ctrl_c_and_keeps_it_resumable() {
    let dir = tmp();
    let src = slow_source(dir.path());
    let part = dir.path().join("part-0");
    let child = Command::new(bin())
        .args([
            "convert",
            s(&src),
            s(&part),
            "-q",
            "--part",
            "0/2",
            "--threads",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let partial = dir.path().join(".part-0.cersa-partial");
    let start = std::time::Instant::now();
    while !partial.join("journal.jsonl").exists() && start.elapsed().as_secs() < 30 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    let pid = child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        eprintln!("the part finished before SIGTERM; nothing checked");
        return;
    }
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--resume"), "{err}");
    assert!(partial.is_dir() && !part.exists());
}

#[test]
fn a_killed_part_resumes_and_the_assembly_is_unchanged() {
    let dir = tmp();
    let src = slow_source(dir.path());
    let extra = ["--max-shard-size", "1MB"];
    let one = dir.path().join("one");
    cersa_ok(&["convert", s(&src), s(&one), "-q", "--max-shard-size", "1MB"]);
    let root = dir.path().join("parts");
    let mut parts: Vec<PathBuf> = (0..3).map(|i| root.join(format!("part-{i}"))).collect();
    // Parts 0 and 2 finish; part 1 is killed once it has closed a shard.
    for i in [0, 2] {
        let spec = format!("{i}/3");
        cersa_ok(&[
            "convert",
            s(&src),
            s(&parts[i]),
            "-q",
            "--part",
            &spec,
            extra[0],
            extra[1],
        ]);
    }
    let partial = root.join(".part-1.cersa-partial");
    let mut child = Command::new(bin())
        .args(["convert", s(&src), s(&parts[1]), "-q", "--part", "1/3"])
        .args(["--threads", "1", extra[0], extra[1]])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let journal = partial.join("journal.jsonl");
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(60) {
        let closed = std::fs::read_to_string(&journal)
            .map(|t| t.lines().count() > 1)
            .unwrap_or(false);
        if closed || child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().ok(); // SIGKILL
    child.wait().unwrap();
    let killed = !parts[1].exists();
    if killed {
        // The others are intact, and the assembly refuses the missing part.
        let done = assemble(
            &dir.path().join("early"),
            &[parts[0].clone(), parts[2].clone()],
        );
        assert_eq!(done.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&done.stderr).contains("part(s) 1 missing"));
        assert!(partial.is_dir());
        cersa_ok(&[
            "convert",
            s(&src),
            s(&parts[1]),
            "-q",
            "--part",
            "1/3",
            "--resume",
            extra[0],
            extra[1],
        ]);
    } else {
        eprintln!("part 1 finished before the kill; resume not exercised");
    }
    // A requeued task whose part is complete: --resume is a no-op, without it an error.
    let before = contents(&parts[0]);
    let again = ["convert", s(&src), s(&parts[0]), "-q", "--part", "0/3"];
    let err = cersa_fails(&again, 2);
    assert!(err.contains("already exists"), "{err}");
    let mut resumed = again.to_vec();
    resumed.extend(["--resume", extra[0], extra[1]]);
    cersa_ok(&resumed);
    assert!(contents(&parts[0]) == before);
    // Another part's options do not count as complete.
    resumed[5] = "0/2";
    let err = cersa_fails(&resumed, 2);
    assert!(err.contains("already exists"), "{err}");
    parts.reverse();
    let out = dir.path().join("out");
    let done = assemble(&out, &parts);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(contents(&out) == contents(&one));
}
