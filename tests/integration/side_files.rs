//! Hugging Face side files (issue 16): `convert` copies `config.json` and the tokenizer
//! files next to the source into the CERSA directory byte for byte and lists them in the
//! manifest's `side_files`; `merge` carries them over; the validator checks them.

use crate::util::*;
use cersa_loader::adapter::{manifest_sha256, Adapter, Base, LayerInfo, Mode};
use cersa_loader::{Checkpoint, IssueKind, TensorView};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Side files written by [`with_side_files`], in name order.
const FILES: &[(&str, &[u8])] = &[
    (
        "config.json",
        b"{\"model_type\": \"bert\", \"hidden_size\": 8}\n",
    ),
    ("special_tokens_map.json", b"{\"unk_token\": \"[UNK]\"}"),
    (
        "tokenizer.json",
        b"{\"version\": \"1.0\", \"model\": {}}\r\n\xef\xbb\xbf",
    ),
    ("tokenizer_config.json", b"{\"do_lower_case\": true}"),
    ("vocab.txt", b"[PAD]\n[UNK]\nhello\n"),
];

/// A source directory: a small safetensors checkpoint, the side files, and a file that is
/// not one (`README.md`, never copied).
fn with_side_files(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let tensors: Vec<_> = (0..4)
        .map(|l| (format!("layer.{l}.weight"), vec![24, 16], noise(l, 24 * 16)))
        .collect();
    let refs: Vec<_> = tensors
        .iter()
        .map(|(n, s, v)| (n.as_str(), s.clone(), v.clone()))
        .collect();
    write_f32(&src.join("model.safetensors"), &refs);
    for (name, bytes) in FILES {
        std::fs::write(src.join(name), bytes).unwrap();
    }
    std::fs::write(src.join("README.md"), "not a side file").unwrap();
    src
}

fn manifest_json(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("cersa.json")).unwrap()).unwrap()
}

/// All files of a directory, sorted by name, with their bytes.
fn contents(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect();
    v.sort();
    v
}

/// Asserts `out` holds [`FILES`] byte for byte and its manifest lists exactly them.
fn assert_side_files(out: &Path) {
    // A GGUF source's own metadata file is generated, not copied (tested in export.rs).
    let mut listed = manifest_json(out)["side_files"].clone();
    if let Some(list) = listed.as_array_mut() {
        list.retain(|f| f["file"] != cersa::side_files::SOURCE_METADATA);
    }
    let expected: Vec<serde_json::Value> = FILES
        .iter()
        .map(|(name, bytes)| {
            serde_json::json!({
                "file": name,
                "bytes": bytes.len(),
                "sha256": cersa_loader::writer::hex(&Sha256::digest(bytes)),
            })
        })
        .collect();
    assert_eq!(listed, serde_json::Value::from(expected));
    for (name, bytes) in FILES {
        assert_eq!(&std::fs::read(out.join(name)).unwrap(), bytes, "{name}");
    }
    assert!(!out.join("README.md").exists());
}

/// No sibling `.OUT.cersa-*` directory and no `OUT`.
fn assert_nothing_left(out: &Path) {
    assert!(!out.exists(), "{} exists after a failed run", out.display());
    let name = out.file_name().unwrap().to_string_lossy().into_owned();
    let left: Vec<_> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(&name))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn side_files_are_copied_byte_for_byte_listed_and_validated() {
    let dir = tmp();
    let src = with_side_files(dir.path());
    let out = dir.path().join("out");
    cersa_ok(&["convert", s(&src), s(&out), "-q", "--threads", "1"]);
    assert_side_files(&out);
    assert_eq!(cersa_loader::validate(&out), vec![]);
    cersa_ok(&["verify", s(&out), "-q"]);

    // The same output from the file inside the directory, and with more threads.
    let from_file = dir.path().join("from_file");
    let file = src.join("model.safetensors");
    cersa_ok(&["convert", s(&file), s(&from_file), "-q", "--threads", "3"]);
    assert!(contents(&from_file) == contents(&out));

    // An edited side file is reported by the validator, and `open` still reads tensors.
    std::fs::write(out.join("config.json"), b"{}").unwrap();
    std::fs::remove_file(out.join("vocab.txt")).unwrap();
    let kinds: Vec<_> = cersa_loader::validate(&out)
        .into_iter()
        .map(|i| (i.kind, i.file))
        .collect();
    assert_eq!(
        kinds,
        [
            (IssueKind::SideFileMismatch, "config.json".to_string()),
            (IssueKind::SideFileMissing, "vocab.txt".to_string()),
        ]
    );
    let ckpt = Checkpoint::open(&out).unwrap();
    assert_eq!(ckpt.manifest().side_files.len(), FILES.len());
    let verdict = cersa(&["verify", s(&out), "-q"]);
    assert_eq!(verdict.status.code(), Some(1));
    let text = String::from_utf8_lossy(&verdict.stdout).into_owned()
        + &String::from_utf8_lossy(&verdict.stderr);
    assert!(
        text.contains("config.json") && text.contains("vocab.txt"),
        "{text}"
    );
}

#[test]
fn source_without_side_files_has_no_side_files_field() {
    let dir = tmp();
    let src = dir.path().join("model.safetensors");
    write_f32(&src, &[("w", vec![16, 12], noise(7, 16 * 12))]);
    let out = dir.path().join("out");
    cersa_ok(&["convert", s(&src), s(&out), "-q"]);
    let manifest = manifest_json(&out);
    assert!(manifest.get("side_files").is_none(), "{manifest}");
    let names: Vec<_> = contents(&out).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["cersa-00001-of-00001.safetensors", "cersa.json"]);
}

#[cfg(unix)]
#[test]
fn fifo_named_config_json_is_refused_without_hanging() {
    let dir = tmp();
    let src = with_side_files(dir.path());
    std::fs::remove_file(src.join("config.json")).unwrap();
    let made = Command::new("mkfifo")
        .arg(src.join("config.json"))
        .status()
        .expect("run mkfifo");
    assert!(made.success());
    let out = dir.path().join("out");
    let mut child = Command::new(bin())
        .args(["convert", s(&src), s(&out), "-q"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("convert hangs on a FIFO named config.json");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("config.json") && stderr.contains("FIFO"),
        "{stderr}"
    );
    assert_nothing_left(&out);
}

#[test]
fn oversized_side_file_fails_and_leaves_no_output() {
    let dir = tmp();
    let src = with_side_files(dir.path());
    // Sparse: 64 MiB + 1 byte without writing them.
    let big = std::fs::File::create(src.join("tokenizer.model")).unwrap();
    big.set_len(cersa::side_files::MAX_SIDE_FILE_BYTES + 1)
        .unwrap();
    let out = dir.path().join("out");
    let err = cersa_fails(&["convert", s(&src), s(&out), "-q"], 2);
    assert!(
        err.contains("tokenizer.model") && err.contains("cap"),
        "{err}"
    );
    assert_nothing_left(&out);
}

/// A write error of the manifest (EFBIG, files capped at 16 KiB) keeps the partial output;
/// `--resume` copies the side files again and ends with the bytes of a clean run.
#[test]
fn resume_gives_the_side_files_of_a_clean_run() {
    let dir = tmp();
    let src = with_side_files(dir.path());
    // Enough tensors that cersa.json outgrows 16 KiB; the shards stay under it.
    let tensors: Vec<_> = (0..120)
        .map(|l| (format!("layer.{l:03}.weight"), vec![12, 10], noise(l, 120)))
        .collect();
    let refs: Vec<_> = tensors
        .iter()
        .map(|(n, s, v)| (n.as_str(), s.clone(), v.clone()))
        .collect();
    write_f32(&src.join("model.safetensors"), &refs);
    let clean = dir.path().join("clean");
    let shard = ["--max-shard-size", "4KB"];
    let mut args = vec!["convert", s(&src), s(&clean), "-q"];
    args.extend(shard);
    cersa_ok(&args);
    assert!(std::fs::metadata(clean.join("cersa.json")).unwrap().len() > 16 << 10);
    let out = dir.path().join("out");
    let (code, stderr) = convert_with_16k_file_cap(&src, &out, "--max-shard-size 4KB");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("partial output kept in"), "{stderr}");
    let mut args = vec!["convert", s(&src), s(&out), "-q", "--resume"];
    args.extend(shard);
    cersa_ok(&args);
    assert_side_files(&out);
    assert!(contents(&out) == contents(&clean));
}

#[test]
fn merge_carries_the_side_files_over() {
    let dir = tmp();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::copy(
        fixture("minilm-excerpt/model.safetensors"),
        src.join("model.safetensors"),
    )
    .unwrap();
    for (name, bytes) in FILES {
        std::fs::write(src.join(name), bytes).unwrap();
    }
    let base = dir.path().join("base");
    cersa_ok(&["convert", s(&src), s(&base), "-q", "--energy", "0.8"]);
    let layer = "encoder.layer.0.attention.self.query.weight";
    let ckpt = Checkpoint::open(&base).unwrap();
    let TensorView::Factored(f) = ckpt.get(layer).unwrap() else {
        panic!("{layer} is factored at τ = 0.8");
    };
    let scaled = f.s.to_f32().unwrap().iter().map(|v| v * 1.1).collect();
    let adapter = Adapter {
        manifest_sha256: manifest_sha256(&base).unwrap(),
        layers: BTreeMap::from([(
            layer.to_string(),
            LayerInfo {
                mode: Mode::Scale,
                rank: f.rank,
                matrix_shape: f.matrix_shape,
                base: Base::Factored,
            },
        )]),
        tensors: BTreeMap::from([(format!("{layer}.adapter_s"), scaled)]),
    };
    let adapter_path = dir.path().join("adapter.safetensors");
    adapter.write(&adapter_path).unwrap();
    let merged = dir.path().join("merged");
    cersa_ok(&["merge", s(&base), s(&adapter_path), s(&merged)]);
    assert_side_files(&merged);
    assert_eq!(cersa_loader::validate(&merged), vec![]);

    // A listed side file gone from the base is an error naming it; nothing is written.
    std::fs::remove_file(base.join("tokenizer.json")).unwrap();
    let again = dir.path().join("again");
    let err = cersa_fails(&["merge", s(&base), s(&adapter_path), s(&again)], 2);
    assert!(err.contains("tokenizer.json"), "{err}");
    assert_nothing_left(&again);
}

/// A GGUF file takes the side files of the directory it is in.
#[test]
fn gguf_file_takes_the_side_files_of_its_directory() {
    let dir = tmp();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    for (name, bytes) in FILES {
        std::fs::write(src.join(name), bytes).unwrap();
    }
    let tensors = [("blk.0.attn_q.weight", vec![16, 24], noise(3, 24 * 16))];
    let file = src.join("model.gguf");
    std::fs::write(&file, gguf_bytes(&[], &tensors)).unwrap();
    let out = dir.path().join("out");
    cersa_ok(&["convert", s(&file), s(&out), "-q"]);
    assert_side_files(&out);
    assert_eq!(cersa_loader::validate(&out), vec![]);
}

/// A symlink to a regular file is followed (Hugging Face cache snapshots link into
/// `blobs/`); one to a directory is refused, not walked.
#[cfg(unix)]
#[test]
fn symlinks_to_files_are_followed_and_to_directories_refused() {
    let dir = tmp();
    let src = with_side_files(dir.path());
    let blobs = dir.path().join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::rename(src.join("tokenizer.json"), blobs.join("abc123")).unwrap();
    std::os::unix::fs::symlink(blobs.join("abc123"), src.join("tokenizer.json")).unwrap();
    let out = dir.path().join("out");
    cersa_ok(&["convert", s(&src), s(&out), "-q"]);
    assert_side_files(&out);
    assert!(!std::fs::symlink_metadata(out.join("tokenizer.json"))
        .unwrap()
        .file_type()
        .is_symlink());

    std::os::unix::fs::symlink(&blobs, src.join("merges.txt")).unwrap();
    let again = dir.path().join("again");
    let err = cersa_fails(&["convert", s(&src), s(&again), "-q"], 2);
    assert!(
        err.contains("merges.txt") && err.contains("a directory"),
        "{err}"
    );
    assert_nothing_left(&again);
}
