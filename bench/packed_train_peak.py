#!/usr/bin/env python3
"""Peak memory and time of one training step through packed quantized factors (issue 16):
`PackedCersaLinear` before and after its factor products became autograd functions that
save no dequantized factor, against the dequantize-at-load `CersaLinear` (f32).

    python3 bench/packed_train_peak.py CERSA_DIR [--tokens 256] [--k 8] [--repeats 3] [--threads 1]

CERSA_DIR is a checkpoint converted with a quantized `--dtype` (q8_0, q5_0 or q4_0). As in
`bench/packed_forward.py`, every quantized factored layer is built on its own (f32 compute,
`core` mode with k = min(k, r), B perturbed off zero so that A gets a gradient too) and fed
x [tokens, n] (f32, requires_grad: the input of a layer inside a model needs its gradient).
One step = the forward pass of all layers, graphs kept, loss = Σ (y ⊙ w).sum() with a fixed
w per output size, then one backward pass (gradients of x, A, B). Variants:

- `f32 at load`: `CersaLinear` with U, Vᵀ dequantized to f32 once (`load_hf(packed=False)`);
- `packed, before`: `PackedCersaLinear` run through `CersaLinear.forward` (the factors read
  through the `u`/`vt` properties, i.e. the module as it was before this change: autograd
  saves the dequantized U and Vᵀ of every layer until the backward pass);
- `packed, after`: `PackedCersaLinear.forward` (autograd functions that save the U8 rows
  only and dequantize again in the backward pass).

Figures, per variant, each variant in a fresh child process:

- `held`: bytes of the layers' parameters and buffers (what the model holds between steps);
- `saved`: bytes autograd keeps for the backward pass beyond what is held anyway (unique
  storages of the tensors `torch.autograd.graph.saved_tensors_hooks` sees, less the layers'
  own parameters/buffers and the inputs x, w): exact, deterministic;
- `step peak`: the child's VmHWM during one step (reset through /proc/self/clear_refs after
  a warm-up step) less its VmRSS just before it: what the step adds at its peak, measured
  (glibc's malloc thresholds fixed at 64 KiB so that freed blocks leave the RSS);
- `held + peak`: the two added, the layers' part of a training step's peak;
- `ms/step`: forward + backward, best of `repeats`, in another child with glibc's defaults.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))

from cersa_torch._quant import dequantize_torch  # noqa: E402
from cersa_torch.checkpoint import open_checkpoint  # noqa: E402
from cersa_torch.modules import CersaLinear  # noqa: E402
from cersa_torch.packed import PackedCersaLinear  # noqa: E402

VARIANTS = ["f32 at load", "packed, before", "packed, after"]


class PackedBefore(PackedCersaLinear):
    """The packed layer as it was: `CersaLinear.forward` reading the dequantizing `u`/`vt`."""
    forward = CersaLinear.forward


def status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def build(cersa_dir, variant, k):
    ckpt = open_checkpoint(cersa_dir)
    layers = []
    for name, info in sorted(ckpt.manifest["tensors"].items()):
        if info["kind"] != "factored" or "quant" not in info:
            continue
        raw_u, s, raw_vt, q, (m, n) = ckpt.packed_factors(name, torch.float32)
        raw_u, s, raw_vt = raw_u.clone(), s.clone(), raw_vt.clone()  # held, not mapped
        kk = min(k, s.shape[0])
        torch.manual_seed(len(layers))  # the same A in every variant
        if variant == "f32 at load":
            layer = CersaLinear(dequantize_torch(raw_u, q, m).t().contiguous(), s,
                                dequantize_torch(raw_vt, q, n), mode="core", k=kk)
        else:
            cls = PackedBefore if variant == "packed, before" else PackedCersaLinear
            layer = cls(raw_u, s, raw_vt, q, (m, n), mode="core", k=kk)
        with torch.no_grad():
            layer.b.copy_(0.01 * torch.randn(layer.b.shape,
                                             generator=torch.Generator().manual_seed(7)))
        layers.append(layer)
    if not layers:
        sys.exit(f"{cersa_dir}: no quantized factored layer (convert with --dtype q8_0)")
    return layers


def model_child(args):
    """``--model``: one training step of the whole model ``load_hf`` builds (core k, packed or
    not, ``dense_subspace=False``: the dense matrices frozen), on [1, tokens] random ids."""
    import transformers

    import cersa_torch

    if args.child == "packed, before":
        PackedCersaLinear.forward = CersaLinear.forward
    torch.manual_seed(0)
    model = cersa_torch.load_hf(args.cersa_dir, auto_class=transformers.AutoModelForCausalLM,
                                mode="core", k=args.k, packed=args.child != "f32 at load",
                                dense_subspace=False).eval()  # eval: no dropout
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".b"):
                p.copy_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens),
                        generator=torch.Generator().manual_seed(0))
    held_t = list(model.parameters()) + list(model.buffers())
    held = sum(t.numel() * t.element_size() for t in
               {t.untyped_storage().data_ptr(): t for t in held_t}.values())
    own = {t.untyped_storage().data_ptr() for t in held_t} | {ids.untyped_storage().data_ptr()}
    layers = sum(isinstance(m, CersaLinear) for m in model.modules())
    quants = sorted({m.quant for m in model.modules() if isinstance(m, PackedCersaLinear)})

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    def grad_sum():
        return float(sum(p.grad.double().abs().sum() for p in model.parameters()
                         if p.grad is not None))
    measure(args, step, own, lambda: model(input_ids=ids, labels=ids).loss, held, layers,
            quants, grad_sum)


def measure(args, step, own, forward, held, layers, quants, grad_sum):
    """Saved-for-backward bytes of one forward (storages not in ``own``), the VmHWM rise of
    one step after a warm-up, the best time of ``repeats`` steps; prints one JSON line."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in own:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    saved = sum(seen.values())
    del loss, seen
    step()  # warm-up
    step()
    rss0 = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    step()
    peak = status_kib("VmHWM") - rss0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"variant": args.child, "layers": layers, "held": held,
                      "saved": saved, "peak_kib": peak, "step_s": min(times),
                      "quants": quants, "grad_abs_sum": grad_sum()}))


def child(args):
    torch.set_num_threads(args.threads)
    if args.model:
        return model_child(args)
    layers = build(args.cersa_dir, args.child, args.k)
    g = torch.Generator().manual_seed(0)
    xs = {n: torch.randn(args.tokens, n, generator=g).requires_grad_(True)
          for n in sorted({ly.in_features for ly in layers})}
    ws = {m: torch.randn(m, generator=g) for m in sorted({ly.out_features for ly in layers})}
    held = sum(t.numel() * t.element_size() for ly in layers
               for t in list(ly.parameters()) + list(ly.buffers()))

    def step():
        for t in list(xs.values()) + [p for ly in layers for p in ly.parameters()]:
            t.grad = None
        loss = 0
        for ly in layers:
            loss = loss + (ly(xs[ly.in_features]) * ws[ly.out_features]).sum()
        loss.backward()

    own = {t.untyped_storage().data_ptr() for ly in layers
           for t in list(ly.parameters()) + list(ly.buffers())}
    own |= {t.untyped_storage().data_ptr() for t in list(xs.values()) + list(ws.values())}
    measure(args, step, own,
            lambda: sum((ly(xs[ly.in_features]) * ws[ly.out_features]).sum() for ly in layers),
            held, len(layers), sorted({ly.quant for ly in layers if hasattr(ly, "quant")}),
            lambda: float(sum(x.grad.double().abs().sum() for x in xs.values())))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cersa_dir")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", action="store_true",
                    help="one step of the whole load_hf model instead of the bare layers")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    rows = []
    for v in VARIANTS:
        cmd = [sys.executable, os.path.abspath(__file__), args.cersa_dir, "--child", v,
               "--tokens", str(args.tokens), "--k", str(args.k),
               "--repeats", str(args.repeats), "--threads", str(args.threads)]
        cmd += ["--model"] if args.model else []
        # glibc would keep freed step memory in its heap (its mmap threshold grows with the
        # sizes freed), so the RSS before a step would already hold the previous step's peak:
        # fixed thresholds hand every large block back to the system when freed.
        # That slows every allocation down, so the time comes from a second child run with
        # glibc's defaults.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
        mem, timed = (json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True,
                                                env=e).stdout.strip().splitlines()[-1])
                      for e in (env, None))
        rows.append(dict(mem, step_s=timed["step_s"]))
    quants = rows[1]["quants"]
    what = (f"whole model (load_hf, {rows[0]['layers']} CersaLinear layers), ids [1, "
            f"{args.tokens}]" if args.model else
            f"{rows[0]['layers']} factored layers, x [{args.tokens}, n]")
    print(f"{args.cersa_dir}: {what} ({', '.join(quants)}), core k={args.k}, f32, "
          f"{args.threads} thread(s), ms/step best of {args.repeats}")
    print(f"{'factors':<15} {'MiB held':>9} {'MiB saved':>10} {'MiB step peak':>14} "
          f"{'held + peak':>12} {'ms/step':>8}")
    for r in rows:
        print(f"{r['variant']:<15} {r['held'] / 2**20:>9.1f} {r['saved'] / 2**20:>10.1f} "
              f"{r['peak_kib'] / 1024:>14.1f} {(r['held'] / 2**20 + r['peak_kib'] / 1024):>12.1f} "
              f"{r['step_s'] * 1e3:>8.1f}")
    g = [r["grad_abs_sum"] for r in rows]
    print("Σ|grad| per variant (x's, or the model's parameters'; the same function): "
          + ", ".join(f"{v:.6e}" for v in g))


if __name__ == "__main__":
    main()
