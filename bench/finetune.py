#!/usr/bin/env python3
"""Fine-tuning inside the τ subspace vs LoRA (issue 16): same data, same token budget, same
seed, on SmolLM2-135M-Instruct through transformers, on CPU.

    python3 bench/finetune.py target/release/cersa WORKDIR [--steps 30] [--batch 4]
                              [--length 64] [--taus 0.90,0.95] [--train-taus 0.90,0.95]
                              [--modes core,cersa,scale] [--threads 1] [--full]
                              [--frozen-dense] [--force-factor] [--only TEXT]
                              [--whitened-budgets 0.8] [--calib-tokens 16384]

Model: the SmolLM2-135M-Instruct Q4_1 GGUF (bench/fetch_smollm2.py) as a dense f32
Hugging Face directory (bench/quality.py). Text: bench/quality.py's split of CPython's
documentation prose: even topics are the training text, odd topics held out.

Runs, each in its own process (so its peak RSS is its own):
- `dense`: the model as it is; `cersa-τ-frozen` for each τ of --taus: `cersa convert
  --energy τ`, loaded by `cersa_torch.load_hf` (frozen) — held-out perplexity only;
- trained for --steps steps of --batch chunks of --length tokens (AdamW, the same batches in
  the same order for every run): CERSA at each τ of --train-taus in the --modes `core`
  (k = 8), `cersa` (the paper's trainable r×r core initialized to diag σ) and `scale`,
  loaded by `load_hf`'s default: the matrices kept dense (`no-saving`) are frozen and exact
  with the same adaptation in their own top-r subspace (`dense_subspace=True`, issue 16);
  with --frozen-dense, the same modes with those matrices dense and frozen
  (`dense_subspace=False`, the earlier default); PEFT LoRA r = 8 (α = 16) on every
  attention and MLP projection of the dense model; with --full, full fine-tuning of the
  dense model; with --force-factor, `core` on a conversion at each train τ with
  `--force-factor` (every matrix factored: the third trainable path for those matrices).
With --whitened-budgets B,…: for each byte budget B (a ratio of the source's bytes), a
whitened conversion under the planner (`cersa convert --budget Bx --calibration`, the
statistics G = Σ xxᵀ of every linear layer's inputs on --calib-tokens of the *training*
text, as bench/quality.py collects them), frozen and trained in --modes: the compressed
checkpoint that still works, as a fine-tuning start.
Learning rates, fixed and not tuned: 1e-3 for core, scale and LoRA; 1e-4 for the paper's
core and full fine-tuning (both move whole weight matrices).

Printed per run: trainable parameters, layers with a dense-base subspace adapter, bytes of
frozen weights held (parameters without
gradient and buffers), peak RSS, seconds per step (mean after the first), training loss at
the first and last step, held-out perplexity before and after training. A markdown table
goes to stdout and WORKDIR/finetune.json.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LR = {"core": 1e-3, "scale": 1e-3, "lora": 1e-3, "cersa": 1e-4, "full": 1e-4}


def batches(tok, args):
    import quality

    train, held = quality.texts()
    n_train = args.steps * args.batch
    train_ids = quality.chunks(tok, train, args.length, (n_train + 1) * args.length)[:n_train]
    held_ids = quality.chunks(tok, held, args.length, args.held_chunks * args.length)
    return train_ids.reshape(args.steps, args.batch, args.length), held_ids


def child(spec, args):
    """One run, in this process: returns its figures."""
    import torch
    import transformers

    sys.path.insert(0, os.path.join(ROOT, "python"))
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import cersa_torch
    import quality

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense_dir = quality.smollm2_dense(args.work)
    tok = transformers.AutoTokenizer.from_pretrained(dense_dir)
    train, held = batches(tok, args)
    kind, mode = spec["kind"], spec.get("mode")
    if kind == "cersa":
        t0 = time.perf_counter()
        model = cersa_torch.load_hf(spec["dir"], mode=mode, k=8,
                                    auto_class=transformers.AutoModelForCausalLM,
                                    dense_subspace=spec.get("dense_subspace", True))
        load_s = time.perf_counter() - t0
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
        if mode == "lora":
            import peft
            cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                  "gate_proj", "up_proj", "down_proj"])
            model = peft.get_peft_model(model, cfg)
        elif mode != "full":
            for p in model.parameters():
                p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    frozen += sum(b.numel() * b.element_size() for b in model.buffers())
    from cersa_torch.dense import DenseSubspaceLinear
    out = {"run": spec["name"], "trainable": sum(p.numel() for p in params),
           "dense_adapted": sum(isinstance(m, DenseSubspaceLinear) for m in model.modules()),
           "frozen_bytes": frozen, "ppl_before": quality.perplexity(model.eval(), held)}
    if kind == "cersa":
        out["load_s"] = load_s
    if params:
        opt = torch.optim.AdamW(params, lr=LR[mode], weight_decay=0.0)
        model.train()
        losses, times = [], []
        for step in range(args.steps):
            t = time.perf_counter()
            ids = train[step]
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
            losses.append(loss.item())
        out.update(loss_first=losses[0], loss_last=losses[-1],
                   s_per_step=sum(times[1:]) / max(1, len(times) - 1), lr=LR[mode],
                   ppl_after=quality.perplexity(model.eval(), held))
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def whitened(args, dense_dir, budget):
    """(directory, stored/source bytes) of the whitened conversion of the dense model under
    byte budget ``budget``, with calibration statistics from the training text."""
    import quality
    import torch
    import transformers

    calib = os.path.join(args.work, f"calib-{args.calib_tokens}.safetensors")
    if not os.path.exists(calib):
        tok = transformers.AutoTokenizer.from_pretrained(dense_dir)
        train, _ = quality.texts()
        ids = quality.chunks(tok, train, 512, args.calib_tokens)
        dense = transformers.AutoModelForCausalLM.from_pretrained(dense_dir,
                                                                  dtype=torch.float32).eval()

        def feed(model):
            for row in ids:
                model(input_ids=row[None])

        stats = quality.capture_stats(dense, feed, quality.checkpoint_names(dense_dir))
        quality.write_calibration(calib, stats, dense_dir, ids.numel())
        del dense, stats
    out = os.path.join(args.work, f"smollm2-whitened-{budget:.2f}")
    info = quality.convert(args.cersa, dense_dir, out, None, calib, budget)
    return out, info["byte_ratio"]


def peak_rss_mib():
    """This process's peak RSS: VmHWM of its own address space. (ru_maxrss is not: exec
    keeps the high-water mark of the address space it replaced, the parent's under vfork.)"""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cersa")
    ap.add_argument("work")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--held-chunks", type=int, default=24)
    ap.add_argument("--taus", default="0.90,0.95")
    ap.add_argument("--train-taus", default="0.90,0.95")
    ap.add_argument("--modes", default="core,cersa,scale")
    ap.add_argument("--frozen-dense", action="store_true",
                    help="also train with the matrices kept dense frozen (dense_subspace=False)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--force-factor", action="store_true",
                    help="also train core adapters on a --force-factor conversion")
    ap.add_argument("--only", help="run only the runs whose name contains this text")
    ap.add_argument("--whitened-budgets", default="",
                    help="byte budgets of whitened planned conversions to train, e.g. 0.8")
    ap.add_argument("--calib-tokens", type=int, default=16384,
                    help="training-text tokens for the whitened conversions' statistics")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    if args.child:
        print(json.dumps(child(json.loads(args.child), args)))
        return
    import quality

    os.makedirs(args.work, exist_ok=True)
    dense_dir = quality.smollm2_dense(args.work)
    train_taus = sorted(float(t) for t in args.train_taus.split(","))
    modes = args.modes.split(",")
    taus = sorted({float(t) for t in args.taus.split(",")} | set(train_taus))
    dirs = {}
    for tau in taus:
        d = os.path.join(args.work, f"smollm2-{tau:.2f}")
        info = quality.convert(args.cersa, dense_dir, d, tau)
        dirs[tau] = (d, info["byte_ratio"])
    specs = [{"name": "dense", "kind": "dense", "bytes": 1.0}]
    specs += [{"name": f"cersa τ{t:.2f} frozen", "kind": "cersa", "mode": "frozen",
               "dir": dirs[t][0], "bytes": dirs[t][1]}
              for t in sorted(float(x) for x in args.taus.split(","))]
    for tt in train_taus:
        specs += [{"name": f"cersa τ{tt:.2f} {m}", "kind": "cersa", "mode": m,
                   "dir": dirs[tt][0], "bytes": dirs[tt][1]} for m in modes]
        if args.frozen_dense:
            specs += [{"name": f"cersa τ{tt:.2f} {m}, dense frozen", "kind": "cersa",
                       "mode": m, "dir": dirs[tt][0], "bytes": dirs[tt][1],
                       "dense_subspace": False} for m in modes]
    for tt in train_taus if args.force_factor else []:
        # The other trainable path for matrices the rule keeps dense: factor them anyway.
        d = os.path.join(args.work, f"smollm2-{tt:.2f}-forced")
        if not os.path.exists(os.path.join(d, "cersa.json")):
            subprocess.run([args.cersa, "convert", dense_dir, d, "--energy", str(tt),
                            "--force-factor", "--overwrite", "-q"], check=True)
        t = json.load(open(os.path.join(d, "cersa.json")))["totals"]
        specs.append({"name": f"cersa τ{tt:.2f} --force-factor core", "kind": "cersa",
                      "mode": "core", "dir": d, "bytes": t["stored_bytes"] / t["source_bytes"]})
    for budget in sorted(float(b) for b in args.whitened_budgets.split(",") if b):
        d, ratio = whitened(args, dense_dir, budget)
        specs += [{"name": f"cersa whitened {budget:.2f}× {m}", "kind": "cersa", "mode": m,
                   "dir": d, "bytes": ratio} for m in ["frozen", *modes]]
        if args.frozen_dense:
            specs += [{"name": f"cersa whitened {budget:.2f}× {m}, dense frozen",
                       "kind": "cersa", "mode": m, "dir": d, "bytes": ratio,
                       "dense_subspace": False} for m in modes]
    specs.append({"name": "dense + LoRA r8", "kind": "dense", "mode": "lora", "bytes": 1.0})
    if args.full:
        specs.append({"name": "dense, full fine-tune", "kind": "dense", "mode": "full",
                      "bytes": 1.0})
    if args.only:
        specs = [sp for sp in specs if args.only in sp["name"]]
    passthrough = ["--steps", str(args.steps), "--batch", str(args.batch), "--length",
                   str(args.length), "--held-chunks", str(args.held_chunks), "--threads",
                   str(args.threads)]
    rows = []
    for spec in specs:
        p = subprocess.run([sys.executable, __file__, args.cersa, args.work, *passthrough,
                            "--child", json.dumps(spec)], check=True, capture_output=True,
                           text=True)
        row = json.loads(p.stdout.strip().splitlines()[-1])
        row["byte_ratio"] = spec["bytes"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    json.dump({"args": vars(args), "runs": rows}, open(os.path.join(args.work, "finetune.json"),
                                                       "w"), indent=1)
    print(f"SmolLM2-135M-Instruct, {args.steps} steps × {args.batch} × {args.length} tokens, "
          f"{args.threads} thread(s); held-out perplexity on {args.held_chunks} × {args.length} tokens\n")
    print("| run | stored bytes | trainable | dense-base adapters | frozen weights held "
          "| peak RSS | s/step | loss first → last | held-out ppl before → after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [r["run"], f"{r['byte_ratio']:.3f}×", f"{r['trainable'] / 1e6:.2f} M",
                 str(r.get("dense_adapted", 0)),
                 f"{r['frozen_bytes'] / 2**20:.0f} MiB", f"{r['peak_rss_mib']:.0f} MiB"]
        if "ppl_after" in r:
            cells += [f"{r['s_per_step']:.2f}", f"{r['loss_first']:.2f} → {r['loss_last']:.2f}",
                      f"{r['ppl_before']:.1f} → {r['ppl_after']:.1f}"]
        else:
            cells += ["", "", f"{r['ppl_before']:.1f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
