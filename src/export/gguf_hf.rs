//! `export --to gguf` of a checkpoint converted from a Hugging Face directory: llama.cpp's
//! tensor names, hyperparameters and tokenizer, made from the side files `convert` kept
//! (`config.json`, `tokenizer.json`, `tokenizer_config.json`), as llama.cpp's
//! `convert_hf_to_gguf.py` writes them for the Llama family: `LlamaForCausalLM` and
//! `MistralForCausalLM` (architecture `llama`), `Qwen2ForCausalLM` (architecture `qwen2`:
//! the same names, Q/K/V biases, no row permutation as llama.cpp runs it with NeoX rope).
//!
//! What it maps, and what it refuses with an error naming the cause:
//! - names: `model.embed_tokens` → `token_embd`, `model.norm` → `output_norm`, `lm_head` →
//!   `output`, and per layer the attention (`attn_q/k/v/output`), MLP (`ffn_gate/up/down`)
//!   and norms (`attn_norm`, `ffn_norm`); `rotary_emb.inv_freq` buffers are dropped; any other
//!   name is refused (listing it).
//! - for `llama`, Q and K rows (weights and biases) are permuted as `convert_hf_to_gguf.py`'s
//!   `LlamaModel.permute` does (llama.cpp's rope there pairs neighbouring dimensions per
//!   head; transformers pairs dimension i with i + d/2).
//! - hyperparameters from `config.json`; `rope_scaling` other than none or `linear` is
//!   refused (llama.cpp needs extra tensors for `llama3`/`yarn`).
//! - tokenizer: byte-level BPE `tokenizer.json` (tokenizer model `gpt2`: tokens, types,
//!   merges) with its special tokens and chat template from `tokenizer_config.json`.
//!   SentencePiece-style tokenizers (byte fallback, `tokenizer.model`) are refused. The
//!   pre-tokenizer name (`tokenizer.ggml.pre`) is left out: llama.cpp identifies it by
//!   hashing the tokenization of a test text with the original tokenizer, which cersa
//!   cannot run; llama.cpp then warns and uses its default pre-tokenizer.

use crate::error::{ConvertError, Result};
use cersa_loader::Checkpoint;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// How a tensor's rows are reordered on the way out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RowPermutation {
    /// Heads the rows form (the query heads for Q, the key/value heads for K).
    pub heads: usize,
}

impl RowPermutation {
    /// Source row of output row `row` of a matrix with `rows` rows: per head, the rows
    /// `[h, 2, half]` become `[h, half, 2]` (numpy `reshape(h, 2, half).swapaxes(1, 2)`).
    pub fn source_row(&self, row: usize, rows: usize) -> usize {
        let per_head = rows / self.heads;
        let half = per_head / 2;
        let (h, within) = (row / per_head, row % per_head);
        let (i, j) = (within / 2, within % 2);
        h * per_head + j * half + i
    }

    /// Applies the permutation to row-major `rows × (bytes.len() / rows)` elements given as
    /// bytes.
    pub fn apply<T: Copy>(&self, values: &[T], rows: usize) -> Vec<T> {
        let cols = values.len() / rows.max(1);
        let mut out = Vec::with_capacity(values.len());
        for r in 0..rows {
            let s = self.source_row(r, rows);
            out.extend_from_slice(&values[s * cols..(s + 1) * cols]);
        }
        out
    }
}

/// One checkpoint tensor's place in the GGUF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Mapped {
    /// llama.cpp's name.
    pub name: String,
    /// Rows reordered (Q and K).
    pub permute: Option<RowPermutation>,
}

/// The metadata pairs and the name of every tensor, for the Llama family.
pub(super) struct HfMapping {
    /// Encoded metadata pairs (key, type, value), in the order written.
    pub kv: Vec<u8>,
    /// Number of pairs.
    pub kv_count: u64,
    /// Checkpoint name → output (`None`: dropped).
    pub names: BTreeMap<String, Option<Mapped>>,
    /// What the export could not carry over, for the report.
    pub notes: Vec<String>,
}

fn refuse(path: &Path, reason: String) -> ConvertError {
    ConvertError::Source {
        path: path.to_path_buf(),
        reason,
    }
}

/// Reads a side file the checkpoint lists, as JSON (`None` when it lists none of that name).
pub(super) fn side_json(ckpt: &Checkpoint, name: &str) -> Result<Option<Value>> {
    if !ckpt.manifest().side_files.iter().any(|f| f.file == name) {
        return Ok(None);
    }
    let path = ckpt.dir().join(name);
    let bytes = cersa_loader::regular::read_regular(&path)
        .map_err(|e| ConvertError::io(&path, "read", e))?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| refuse(&path, format!("not JSON: {e}")))
}

/// The mapping of a checkpoint whose side files hold a Hugging Face `config.json`.
pub(super) fn hf_mapping(ckpt: &Checkpoint) -> Result<HfMapping> {
    let config_path = ckpt.dir().join("config.json");
    let config = side_json(ckpt, "config.json")?.ok_or_else(|| {
        refuse(
            ckpt.dir(),
            format!(
                "--to gguf needs the GGUF source's metadata (side file {}) or, for a Hugging \
                 Face source of the Llama family, its config.json and tokenizer among the side \
                 files; this checkpoint, converted from {}, has neither",
                crate::side_files::SOURCE_METADATA,
                ckpt.manifest().source.format
            ),
        )
    })?;
    let hp = Hyper::from_config(&config, &config_path)?;
    let arch = hp.arch;
    let key = |k: &str| format!("{arch}.{k}");
    let mut kv = KvWriter::default();
    kv.string("general.architecture", arch);
    kv.string("general.type", "model");
    // A hub id names the model; a local path would only leak the converting machine's layout.
    if let Some(name) = config.get("_name_or_path").and_then(Value::as_str) {
        if !name.is_empty() && !Path::new(name).is_absolute() && !name.starts_with('.') {
            kv.string("general.name", name);
        }
    }
    kv.u32(&key("vocab_size"), hp.vocab as u32);
    kv.u32(&key("context_length"), hp.context as u32);
    kv.u32(&key("embedding_length"), hp.hidden as u32);
    kv.u32(&key("block_count"), hp.layers as u32);
    kv.u32(&key("feed_forward_length"), hp.ffn as u32);
    kv.u32(&key("rope.dimension_count"), hp.head_dim as u32);
    kv.u32(&key("attention.head_count"), hp.heads as u32);
    kv.u32(&key("attention.head_count_kv"), hp.kv_heads as u32);
    if hp.head_dim * hp.heads != hp.hidden {
        kv.u32(&key("attention.key_length"), hp.head_dim as u32);
        kv.u32(&key("attention.value_length"), hp.head_dim as u32);
    }
    kv.f32(&key("rope.freq_base"), hp.rope_theta as f32);
    kv.f32(&key("attention.layer_norm_rms_epsilon"), hp.rms_eps as f32);
    if let Some(factor) = hp.linear_rope_factor {
        kv.string(&key("rope.scaling.type"), "linear");
        kv.f32(&key("rope.scaling.factor"), factor as f32);
    }
    let mut notes = Vec::new();
    tokenizer(ckpt, &config, &hp, &mut kv, &mut notes)?;
    let mut names = BTreeMap::new();
    let mut unknown = Vec::new();
    for name in ckpt.manifest().tensors.keys() {
        match map_name(name, &hp) {
            Some(m) => {
                names.insert(name.clone(), m);
            }
            None => unknown.push(name.as_str()),
        }
    }
    if !unknown.is_empty() {
        let shown: Vec<&str> = unknown.iter().take(8).copied().collect();
        return Err(refuse(
            ckpt.dir(),
            format!(
                "--to gguf maps the Llama family's tensor names to llama.cpp's; {} tensor(s) \
                 have no llama.cpp name: {}{}",
                unknown.len(),
                shown.join(", "),
                if unknown.len() > shown.len() {
                    ", …"
                } else {
                    ""
                }
            ),
        ));
    }
    Ok(HfMapping {
        kv_count: kv.count,
        kv: kv.bytes,
        names,
        notes,
    })
}

/// The hyperparameters the mapping needs.
struct Hyper {
    /// llama.cpp's architecture name (`llama`, `qwen2`).
    arch: &'static str,
    /// Q/K rows are permuted for llama.cpp's rope (`llama`).
    permute_qk: bool,
    vocab: usize,
    context: usize,
    hidden: usize,
    layers: usize,
    ffn: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    rope_theta: f64,
    rms_eps: f64,
    linear_rope_factor: Option<f64>,
}

impl Hyper {
    fn from_config(c: &Value, path: &Path) -> Result<Self> {
        let arch = c
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .unwrap_or("");
        let model_type = c.get("model_type").and_then(Value::as_str).unwrap_or("");
        let (gguf_arch, permute_qk) = match (arch, model_type) {
            ("LlamaForCausalLM" | "MistralForCausalLM", _) | ("", "llama" | "mistral") => {
                ("llama", true)
            }
            ("Qwen2ForCausalLM", _) | ("", "qwen2") => ("qwen2", false),
            _ => {
                return Err(refuse(
                    path,
                    format!(
                        "architecture {arch:?} (model_type {model_type:?}): --to gguf maps the \
                         Llama family (LlamaForCausalLM, MistralForCausalLM, \
                         Qwen2ForCausalLM) only; export --to safetensors and use llama.cpp's \
                         convert_hf_to_gguf.py"
                    ),
                ))
            }
        };
        let int = |key: &str| -> Result<usize> {
            c.get(key)
                .and_then(Value::as_u64)
                .and_then(|v| usize::try_from(v).ok())
                .filter(|&v| v > 0 && v <= u32::MAX as usize)
                .ok_or_else(|| {
                    refuse(
                        path,
                        format!("`{key}` is missing or not a positive integer"),
                    )
                })
        };
        let hidden = int("hidden_size")?;
        let heads = int("num_attention_heads")?;
        let kv_heads = match c.get("num_key_value_heads") {
            None | Some(Value::Null) => heads,
            Some(_) => int("num_key_value_heads")?,
        };
        let head_dim = match c.get("head_dim") {
            None | Some(Value::Null) => hidden / heads,
            Some(_) => int("head_dim")?,
        };
        if heads % kv_heads != 0 || head_dim % 2 != 0 || head_dim == 0 {
            return Err(refuse(
                path,
                format!(
                    "{heads} attention heads, {kv_heads} key/value heads and head size \
                     {head_dim} do not form a Llama attention"
                ),
            ));
        }
        let float = |key: &str, default: f64| -> Result<f64> {
            match c.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v
                    .as_f64()
                    .filter(|x| x.is_finite() && *x > 0.0)
                    .ok_or_else(|| refuse(path, format!("`{key}` is not a positive number"))),
            }
        };
        // transformers 5 writes `rope_parameters` (theta and scaling in one object);
        // earlier versions `rope_theta` and `rope_scaling`.
        let rope = c.get("rope_parameters").filter(|v| v.is_object());
        let rope_theta = match rope.and_then(|r| r.get("rope_theta")) {
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| {
                    refuse(
                        path,
                        "`rope_parameters.rope_theta` is not a positive number".into(),
                    )
                })?,
            None => float("rope_theta", 10000.0)?,
        };
        let scaling = c.get("rope_scaling").filter(|v| !v.is_null()).or(rope);
        let linear_rope_factor = match scaling {
            None => None,
            Some(s) => {
                let kind = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                match kind {
                    "default" => None,
                    "linear" => Some(s.get("factor").and_then(Value::as_f64).ok_or_else(|| {
                        refuse(path, "rope_scaling `linear` without a factor".into())
                    })?),
                    other => {
                        return Err(refuse(
                            path,
                            format!(
                                "rope_scaling type {other:?} is not mapped (llama.cpp needs \
                                 extra tensors for it); use convert_hf_to_gguf.py"
                            ),
                        ))
                    }
                }
            }
        };
        Ok(Hyper {
            arch: gguf_arch,
            permute_qk,
            vocab: int("vocab_size")?,
            context: int("max_position_embeddings")?,
            hidden,
            layers: int("num_hidden_layers")?,
            ffn: int("intermediate_size")?,
            heads,
            kv_heads,
            head_dim,
            rope_theta,
            rms_eps: float("rms_norm_eps", 1e-6)?,
            linear_rope_factor,
        })
    }
}

/// llama.cpp's name of a Llama-family tensor; `Some(None)` for buffers it drops.
fn map_name(name: &str, hp: &Hyper) -> Option<Option<Mapped>> {
    let plain = |n: &str| {
        Some(Some(Mapped {
            name: n.to_string(),
            permute: None,
        }))
    };
    match name {
        "model.embed_tokens.weight" => return plain("token_embd.weight"),
        "model.norm.weight" => return plain("output_norm.weight"),
        "lm_head.weight" => return plain("output.weight"),
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok().filter(|&l| l < hp.layers)?;
    if rest.ends_with("rotary_emb.inv_freq") {
        return Some(None);
    }
    let (module, suffix) = rest.rsplit_once('.')?;
    if !matches!(suffix, "weight" | "bias") {
        return None;
    }
    let (short, permute) = match module {
        "input_layernorm" => ("attn_norm", None),
        "post_attention_layernorm" => ("ffn_norm", None),
        "self_attn.q_proj" => ("attn_q", Some(hp.heads).filter(|_| hp.permute_qk)),
        "self_attn.k_proj" => ("attn_k", Some(hp.kv_heads).filter(|_| hp.permute_qk)),
        "self_attn.v_proj" => ("attn_v", None),
        "self_attn.o_proj" => ("attn_output", None),
        "mlp.gate_proj" => ("ffn_gate", None),
        "mlp.up_proj" => ("ffn_up", None),
        "mlp.down_proj" => ("ffn_down", None),
        _ => return None,
    };
    Some(Some(Mapped {
        name: format!("blk.{layer}.{short}.{suffix}"),
        permute: permute.map(|heads| RowPermutation { heads }),
    }))
}

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

/// The tokenizer pairs of a byte-level BPE `tokenizer.json`.
fn tokenizer(
    ckpt: &Checkpoint,
    config: &Value,
    hp: &Hyper,
    kv: &mut KvWriter,
    notes: &mut Vec<String>,
) -> Result<()> {
    let path = ckpt.dir().join("tokenizer.json");
    let Some(tok) = side_json(ckpt, "tokenizer.json")? else {
        return Err(refuse(
            ckpt.dir(),
            "--to gguf needs the tokenizer (tokenizer.json among the side files): the source \
             directory had none when it was converted"
                .into(),
        ));
    };
    let model = tok.get("model").cloned().unwrap_or(Value::Null);
    let kind = model.get("type").and_then(Value::as_str).unwrap_or("");
    let byte_fallback = model
        .get("byte_fallback")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if kind != "BPE" || byte_fallback {
        return Err(refuse(
            &path,
            format!(
                "tokenizer model {kind:?}{}: only byte-level BPE tokenizers (GPT-2 style) are \
                 mapped to GGUF; use convert_hf_to_gguf.py for SentencePiece-style ones",
                if byte_fallback {
                    " with byte fallback"
                } else {
                    ""
                }
            ),
        ));
    }
    let vocab = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| refuse(&path, "model.vocab is missing".into()))?;
    let mut by_id: BTreeMap<usize, (String, i32)> = BTreeMap::new();
    for (token, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| refuse(&path, format!("vocab entry {token:?} has no integer id")))?;
        by_id.insert(id as usize, (token.clone(), NORMAL));
    }
    for added in tok
        .get("added_tokens")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (Some(id), Some(content)) = (
            added.get("id").and_then(Value::as_u64),
            added.get("content").and_then(Value::as_str),
        ) else {
            continue;
        };
        let special = added
            .get("special")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        by_id.insert(
            id as usize,
            (
                content.to_string(),
                if special { CONTROL } else { USER_DEFINED },
            ),
        );
    }
    if let Some((&id, (token, _))) = by_id.iter().next_back().filter(|(&id, _)| id >= hp.vocab) {
        return Err(refuse(
            &path,
            format!(
                "token {token:?} has id {id}, beyond config.json's vocab_size {} (the embedding \
                 has no row for it)",
                hp.vocab
            ),
        ));
    }
    let size = hp.vocab;
    let mut tokens = Vec::with_capacity(size);
    let mut types = Vec::with_capacity(size);
    let mut padded = 0usize;
    for id in 0..size {
        match by_id.get(&id) {
            Some((t, ty)) => {
                tokens.push(t.clone());
                types.push(*ty);
            }
            None => {
                // As convert_hf_to_gguf.py fills ids the tokenizer does not use.
                tokens.push(format!("[PAD{id}]"));
                types.push(USER_DEFINED);
                padded += 1;
            }
        }
    }
    if padded > 0 {
        notes.push(format!("{padded} unused token id(s) named [PADn]"));
    }
    let merges: Vec<String> = match model.get("merges").and_then(Value::as_array) {
        Some(m) => m
            .iter()
            .map(|e| match e {
                Value::String(s) => Some(s.clone()),
                Value::Array(pair) => match pair.as_slice() {
                    [Value::String(a), Value::String(b)] => Some(format!("{a} {b}")),
                    _ => None,
                },
                _ => None,
            })
            .collect::<Option<_>>()
            .ok_or_else(|| {
                refuse(
                    &path,
                    "model.merges holds an entry that is not a pair".into(),
                )
            })?,
        None => Vec::new(),
    };
    kv.string("tokenizer.ggml.model", "gpt2");
    kv.strings("tokenizer.ggml.tokens", &tokens);
    kv.i32s("tokenizer.ggml.token_type", &types);
    kv.strings("tokenizer.ggml.merges", &merges);
    notes.push("tokenizer.ggml.pre left out: llama.cpp uses its default pre-tokenizer".into());

    let tconfig = side_json(ckpt, "tokenizer_config.json")?.unwrap_or(Value::Null);
    let id_of = |field: &str| -> Option<u32> {
        let text = match tconfig.get(field)? {
            Value::String(s) => s.clone(),
            Value::Object(o) => o.get("content")?.as_str()?.to_string(),
            _ => return None,
        };
        tokens.iter().position(|t| *t == text).map(|i| i as u32)
    };
    let config_id = |key: &str| config.get(key).and_then(Value::as_u64).map(|v| v as u32);
    for (key, field, fallback) in [
        ("tokenizer.ggml.bos_token_id", "bos_token", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token", "eos_token_id"),
        ("tokenizer.ggml.unknown_token_id", "unk_token", ""),
        (
            "tokenizer.ggml.padding_token_id",
            "pad_token",
            "pad_token_id",
        ),
    ] {
        if let Some(id) = id_of(field).or_else(|| config_id(fallback)) {
            kv.u32(key, id);
        }
    }
    for (key, field) in [
        ("tokenizer.ggml.add_bos_token", "add_bos_token"),
        ("tokenizer.ggml.add_eos_token", "add_eos_token"),
    ] {
        if let Some(b) = tconfig.get(field).and_then(Value::as_bool) {
            kv.bool(key, b);
        }
    }
    if let Some(template) = tconfig.get("chat_template").and_then(Value::as_str) {
        kv.string("tokenizer.chat_template", template);
    }
    Ok(())
}

/// GGUF metadata pairs, encoded as the file holds them.
#[derive(Default)]
struct KvWriter {
    bytes: Vec<u8>,
    count: u64,
}

/// GGUF value type ids.
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;

impl KvWriter {
    fn str_bytes(&mut self, s: &str) {
        self.bytes
            .extend_from_slice(&(s.len() as u64).to_le_bytes());
        self.bytes.extend_from_slice(s.as_bytes());
    }
    fn key(&mut self, key: &str, ty: u32) {
        self.count += 1;
        self.str_bytes(key);
        self.bytes.extend_from_slice(&ty.to_le_bytes());
    }
    fn string(&mut self, key: &str, v: &str) {
        self.key(key, T_STRING);
        self.str_bytes(v);
    }
    fn u32(&mut self, key: &str, v: u32) {
        self.key(key, T_U32);
        self.bytes.extend_from_slice(&v.to_le_bytes());
    }
    fn f32(&mut self, key: &str, v: f32) {
        self.key(key, T_F32);
        self.bytes.extend_from_slice(&v.to_le_bytes());
    }
    fn bool(&mut self, key: &str, v: bool) {
        self.key(key, T_BOOL);
        self.bytes.push(u8::from(v));
    }
    fn strings(&mut self, key: &str, v: &[String]) {
        self.key(key, T_ARRAY);
        self.bytes.extend_from_slice(&T_STRING.to_le_bytes());
        self.bytes
            .extend_from_slice(&(v.len() as u64).to_le_bytes());
        for s in v {
            self.str_bytes(s);
        }
    }
    fn i32s(&mut self, key: &str, v: &[i32]) {
        self.key(key, T_ARRAY);
        self.bytes.extend_from_slice(&T_I32.to_le_bytes());
        self.bytes
            .extend_from_slice(&(v.len() as u64).to_le_bytes());
        for x in v {
            self.bytes.extend_from_slice(&x.to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_matches_numpy_reshape_swapaxes() {
        // numpy: np.arange(8).reshape(2, 2, 2).swapaxes(1, 2).reshape(8) = [0 2 1 3 4 6 5 7]
        let p = RowPermutation { heads: 2 };
        let rows: Vec<usize> = (0..8).map(|r| p.source_row(r, 8)).collect();
        assert_eq!(rows, [0, 2, 1, 3, 4, 6, 5, 7]);
        // One head of 6 rows: reshape(1, 2, 3).swapaxes(1, 2) = [0 3 1 4 2 5]
        let p = RowPermutation { heads: 1 };
        let v: Vec<u8> = (0..12).collect(); // 6 rows × 2 columns
        assert_eq!(p.apply(&v, 6), [0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11]);
    }

    #[test]
    fn names_follow_llama_cpp() {
        let hp = Hyper::from_config(
            &serde_json::json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 10,
                "max_position_embeddings": 128, "num_hidden_layers": 2, "intermediate_size": 96}),
            Path::new("config.json"),
        )
        .unwrap();
        let m = |n: &str| map_name(n, &hp);
        assert_eq!(
            m("model.layers.1.self_attn.k_proj.weight")
                .unwrap()
                .unwrap(),
            Mapped {
                name: "blk.1.attn_k.weight".into(),
                permute: Some(RowPermutation { heads: 2 }),
            }
        );
        assert_eq!(
            m("model.layers.0.mlp.down_proj.weight")
                .unwrap()
                .unwrap()
                .name,
            "blk.0.ffn_down.weight"
        );
        assert_eq!(m("lm_head.weight").unwrap().unwrap().name, "output.weight");
        assert_eq!(
            m("model.layers.0.self_attn.rotary_emb.inv_freq"),
            Some(None)
        );
        assert_eq!(m("model.layers.2.mlp.up_proj.weight"), None); // beyond block_count
        assert_eq!(m("model.layers.0.mlp.experts.weight"), None);
        let err = Hyper::from_config(
            &serde_json::json!({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}),
            Path::new("config.json"),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("Llama family"), "{err}");
    }
}
