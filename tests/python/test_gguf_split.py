"""Split GGUF models as gguf-py writes them (GGUFWriter(split_max_tensors=…), the writer
behind llama.cpp's convert_hf_to_gguf.py --split-max-*): cersa reads the parts as one model
from any part, and stores exactly what it stores for the same model in one file; dense
tensors match gguf-py's own reading of each part (GGUFReader + gguf.quants.dequantize)."""
import json

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from safetensors.numpy import load_file

# MiniLM excerpt matrices in three encodings, plus 1-D tensors: 8 tensors, split 3 per part.
QUANT = {
    "encoder.layer.0.attention.self.query.weight": T.Q8_0,
    "encoder.layer.0.attention.self.key.weight": T.Q4_0,
    "encoder.layer.0.intermediate.dense.weight": T.Q5_1,
}


def write(path, tensors, split_max_tensors=0):
    w = gguf.GGUFWriter(str(path), "bert", split_max_tensors=split_max_tensors)
    w.add_name("MiniLM excerpt (split)")
    for name, arr, qtype in tensors:
        if qtype is None:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def model(fixture_path):
    src = load_file(fixture_path("minilm-excerpt/model.safetensors"))
    names = list(QUANT) + [
        "encoder.layer.0.attention.self.value.weight",  # F32
        "encoder.layer.0.output.dense.weight",  # F16
        "encoder.layer.0.attention.self.query.bias",
        "encoder.layer.0.output.LayerNorm.weight",
        "encoder.layer.0.intermediate.dense.bias",
    ]
    out = []
    for name in names:
        arr = src[name]
        if name.endswith("output.dense.weight"):
            arr = arr.astype(np.float16)
        out.append((name, arr, QUANT.get(name)))
    return out


def convert(run_cersa, src, out, *extra):
    # f32 factors and dense copies: numpy has no bfloat16 (the default for quantized sources).
    run_cersa("convert", src, out, "--dtype", "f32", "--quiet", *extra)
    manifest = json.load(open(out / "cersa.json"))
    stored = {}
    for shard in manifest["shards"]:
        stored.update(load_file(str(out / shard["file"])))
    return manifest, stored


def test_split_model_converts_like_one_file(run_cersa, tmp_path, fixture_path):
    tensors = model(fixture_path)
    write(tmp_path / "whole.gguf", tensors)
    write(tmp_path / "m.gguf", tensors, split_max_tensors=3)
    parts = sorted(p.name for p in tmp_path.glob("m-*-of-*.gguf"))
    assert parts == [f"m-0000{i}-of-00003.gguf" for i in (1, 2, 3)], parts

    want_manifest, want = convert(run_cersa, tmp_path / "whole.gguf", tmp_path / "out-whole")
    assert any(k.endswith(".cersa_u") for k in want), "something is factored"
    for start in parts[0], parts[2]:
        manifest, got = convert(run_cersa, tmp_path / start, tmp_path / f"out-{start}")
        assert [f["file"] for f in manifest["source"]["files"]] == parts
        assert manifest["source"]["details"]["split_count"] == 3
        assert manifest["source"]["details"]["name"] == "MiniLM excerpt (split)"
        assert manifest["tensors"] == want_manifest["tensors"]
        assert sorted(got) == sorted(want)
        for k in want:
            assert got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes(), k

    # Dense tensors against gguf-py's reading of the parts.
    _, dense = convert(run_cersa, tmp_path / parts[1], tmp_path / "out-dense", "--exclude", "*")
    seen = 0
    for part in parts:
        for t in gguf.GGUFReader(str(tmp_path / part)).tensors:
            ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            ours = dense[t.name]
            assert ours.size == ref.size, t.name
            np.testing.assert_array_equal(ours.reshape(-1), ref.reshape(-1), err_msg=t.name)
            seen += 1
    assert seen == len(tensors)
