"""`cersa export --to gguf` checked with the real consumers: gguf-py's GGUFReader reads the
file, every metadata key of the source comes back with the same type and value, every
tensor dequantizes (gguf-py) to W = U·diag(σ)·Vᵀ recomposed here by numpy in float64 within
its type's rounding, and the block types are bit-equal to `gguf.quants.quantize`. With
SmolLM2-135M (when cached), transformers' own GGUF loader loads the export and its
perplexity follows the source's."""
import json
import os

import gguf
import numpy as np
import pytest
from helpers import smollm2, stored_tensors

TAU = "0.9"


def recomposed(cersa_dir):
    """Every tensor of the checkpoint in float64, row-major in its source shape."""
    manifest, stored = stored_tensors(cersa_dir)
    out = {}
    for name, info in manifest["tensors"].items():
        if info.get("rank"):
            u, s, vt = (stored[f"{name}.cersa_{k}"].astype(np.float64) for k in "u s vt".split())
            out[name] = ((u * s) @ vt).reshape(info["shape"])
        else:
            out[name] = stored[name].astype(np.float64)
    return manifest, out


def fields(reader):
    """{key: (types, values)} of a GGUFReader's metadata, without the GGUF.* header fields."""
    out = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        values = [bytes(np.asarray(f.parts[i]).tobytes()) for i in f.data]
        out[key] = (list(f.types), values)
    return out


def rich_source(path, **writer_options):
    """A GGUF file written by gguf-py with every metadata value type (arrays of strings,
    ints, floats, nested arrays) and tensors of several types, one with rows that are not
    whole 32-value blocks."""
    rng = np.random.default_rng(7)
    w = gguf.GGUFWriter(str(path), "llama", **writer_options)
    w.add_name("cersa export test")
    w.add_uint32("llama.block_count", 1)
    w.add_int32("test.int32", -5)
    w.add_float32("test.f32", 0.25)
    w.add_uint64("test.u64", 1 << 40)
    w.add_int64("test.i64", -(1 << 40))
    w.add_float64("test.f64", 1e-300)
    w.add_bool("test.bool", True)
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -100)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_string("tokenizer.chat_template", "{% for m in messages %}{{ m.content }}{% endfor %}")
    w.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "héllo", "世界", ""])
    w.add_array("tokenizer.ggml.scores", [0.0, -1.5, 2.25, 3.0, 4.0])
    w.add_array("test.nested", [[1, 2], [3]])
    low = rng.standard_normal((96, 6)) @ rng.standard_normal((6, 64))
    w.add_tensor("blk.0.attn_q.weight", (low + 0.05 * rng.standard_normal((96, 64))).astype(np.float32))
    w.add_tensor("blk.0.ffn_up.weight", rng.standard_normal((64, 40)).astype(np.float16))
    q = rng.standard_normal((128, 64)).astype(np.float32)
    w.add_tensor("blk.0.attn_k.weight", gguf.quants.quantize(q, gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    w.add_tensor("token_embd.weight", rng.standard_normal((10, 64)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


EXPECTED = {  # --dtype → GGML type of 2-D tensors whose rows are whole blocks
    "source": None, "f32": "F32", "bf16": "BF16", "q8_0": "Q8_0", "q5_0": "Q5_0", "q4_0": "Q4_0",
}


@pytest.mark.parametrize("dtype", sorted(EXPECTED))
def test_gguf_export_keeps_metadata_and_recomposes_every_tensor(run_cersa, tmp_path, dtype):
    src = tmp_path / "src.gguf"
    rich_source(src)
    ck, out = tmp_path / "ck", tmp_path / "out"
    # f32 factors and dense copies, so numpy reads the checkpoint as stored.
    run_cersa("convert", src, ck, "--energy", TAU, "--dtype", "f32", "--include", "*.weight",
              "-q")
    report = json.loads(run_cersa("export", ck, out, "--to", "gguf", "--dtype", dtype,
                                  "--json", "-q").stdout)
    path = out / "model.gguf"
    assert report["file"] == str(path) and report["bytes"] == os.path.getsize(path)
    source, exported = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(path))
    assert fields(exported) == fields(source)
    assert report["metadata_keys"] == len(fields(source))

    manifest, want = recomposed(ck)
    src_types = {t.name: t.tensor_type.name for t in source.tensors}
    assert sorted(t.name for t in exported.tensors) == sorted(src_types)
    assert manifest["tensors"]["blk.0.attn_q.weight"]["rank"] < 64, "something was factored"
    types = {}
    for t in exported.tensors:
        w = want[t.name]
        shape = [int(d) for d in reversed(t.shape)]
        assert shape == list(w.shape), t.name
        ty = t.tensor_type.name
        types[ty] = types.get(ty, 0) + 1
        if EXPECTED[dtype] is None:
            # The source's float type; BF16 where the source was quantized.
            assert ty == (src_types[t.name] if src_types[t.name] in ("F32", "F16") else "BF16")
        elif w.ndim == 1:
            assert ty == "F32", t.name
        elif w.shape[-1] % 32 and dtype.startswith("q"):
            assert ty == "F16" and t.name in report["fallbacks"], t.name
        else:
            assert ty == EXPECTED[dtype], t.name
        got = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(w.shape)
        if ty in ("Q8_0", "Q5_0", "Q4_0"):
            # Bit-equal to gguf-py's quantizer of the f32-rounded W.
            ref = gguf.quants.quantize(w.astype(np.float32), t.tensor_type)
            assert np.array_equal(np.asarray(t.data).reshape(-1), ref.reshape(-1)), t.name
        else:
            rounding = {"F32": 2**-24, "F16": 2**-11, "BF16": 2**-8}[ty]
            assert np.all(np.abs(got - w) <= rounding * np.abs(w) + 1e-30), t.name
    assert types == report["types"]


def test_gguf_export_refuses_what_it_cannot_map(run_cersa, tmp_path, fixture_path):
    ck = tmp_path / "ck"
    run_cersa("convert", fixture_path("minilm-excerpt/model.safetensors"), ck, "-q")
    p = run_cersa("export", ck, tmp_path / "out", "--to", "gguf", check=False)
    assert p.returncode == 2
    assert "converted from safetensors" in p.stderr and "source-metadata.gguf" in p.stderr
    assert not (tmp_path / "out").exists()
    p = run_cersa("export", ck, tmp_path / "out2", "--dtype", "q8_0", check=False)
    assert p.returncode == 2 and "needs --to gguf" in p.stderr


def test_split_gguf_metadata_is_the_unsplit_models(run_cersa, tmp_path):
    """A model split by gguf-py exports the metadata of the unsplit file (split.* dropped)."""
    rich_source(tmp_path / "m.gguf", split_max_tensors=2)
    parts = sorted(p for p in os.listdir(tmp_path) if p.startswith("m-"))
    assert len(parts) == 3, parts
    ck, out = tmp_path / "ck", tmp_path / "out"
    run_cersa("convert", tmp_path / parts[0], ck, "-q")
    run_cersa("export", ck, out, "--to", "gguf", "-q")
    first = fields(gguf.GGUFReader(str(tmp_path / parts[0])))
    want = {k: v for k, v in first.items() if not k.startswith("split.")}
    assert len(want) < len(first)
    assert fields(gguf.GGUFReader(str(out / "model.gguf"))) == want


# ------------------------------------------------------------------ SmolLM2 through transformers


@pytest.mark.skipif(not os.path.exists(smollm2()), reason="SmolLM2 GGUF not downloaded "
                    "(python3 bench/fetch_smollm2.py)")
def test_smollm2_gguf_export_loads_in_transformers(run_cersa, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    src = smollm2()
    ck, out = tmp_path / "ck", tmp_path / "out"
    run_cersa("convert", src, ck, "--energy", "0.95", "-q")
    report = json.loads(run_cersa("export", ck, out, "--to", "gguf", "--json", "-q").stdout)
    manifest = json.load(open(ck / "cersa.json"))
    factored = {n: e["rel_error"] for n, e in manifest["tensors"].items() if e.get("rank")}
    assert report["recomposed"] == len(factored) > 50
    assert fields(gguf.GGUFReader(str(out / "model.gguf"))) == fields(gguf.GGUFReader(src))

    def load(path):
        d, f = os.path.split(path)
        return transformers.AutoModelForCausalLM.from_pretrained(
            d, gguf_file=f, torch_dtype=torch.float32).eval()

    dense, exported = load(src), load(str(out / "model.gguf"))
    # transformers maps GGUF names to its own and un-permutes q/k rows; a permutation keeps
    # Frobenius norms, so each weight's distance to the source's is the manifest's
    # rel_error (plus the BF16 rounding of the export), and unfactored ones are equal.
    gguf_name = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    sd, se = dense.state_dict(), exported.state_dict()
    checked = 0
    for key, a in sd.items():
        parts = key.split(".")
        name = None
        if len(parts) == 6 and parts[1] == "layers":
            name = f"blk.{parts[2]}.{gguf_name.get(parts[3] + '.' + parts[4], '?')}.weight"
        b = se[key]
        if name in factored:
            rel = float(torch.linalg.norm(b.double() - a.double()) / torch.linalg.norm(a.double()))
            assert abs(rel - factored[name]) < 5e-3, (key, rel, factored[name])
            checked += 1
        elif key != "lm_head.weight" or not dense.config.tie_word_embeddings:
            # Unfactored: the source's values, through BF16 for quantized ones.
            assert torch.allclose(a, b, rtol=2**-8, atol=1e-6), key
    assert checked == len(factored)

    tok = transformers.AutoTokenizer.from_pretrained(str(out), gguf_file="model.gguf")
    text = ("The history of the printing press begins in the fifteenth century, when movable "
            "type made books cheaper to produce and ideas faster to spread across Europe. ") * 8
    ids = tok(text, return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        p_dense, p_exp = (float(torch.exp(m(ids, labels=ids).loss)) for m in (dense, exported))
    assert np.isfinite(p_exp) and p_exp < 4 * p_dense, (p_dense, p_exp)
