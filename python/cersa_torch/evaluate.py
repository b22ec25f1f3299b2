"""How much of the dense model's function a CERSA checkpoint keeps: held-out perplexity for
causal LMs, cosine of mean-pooled sentence embeddings for encoders.

Why: the energy τ a checkpoint keeps says nothing direct about the function (SmolLM2-135M at
τ=0.90 frozen: perplexity 3.5 M vs 19.8 dense); these are the numbers that do.

    python -m cersa_torch.evaluate CERSA_DIR --dense MODEL_DIR --text FILE [--json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from typing import Iterable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

REPORT_VERSION = 1


def _device(model) -> torch.device:
    return next(iter(model.parameters())).device


def perplexity(model, tokenizer, texts: Union[str, Sequence[str]], max_length: int = 512,
               max_sequences: Optional[int] = None) -> float:
    """exp of the mean next-token NLL over non-overlapping chunks of ``max_length`` tokens
    (the texts tokenized and joined as :func:`cersa_torch.calibrate` does; every token after
    a chunk's first is predicted once)."""
    from .calibrate import token_chunks

    chunks = token_chunks(tokenizer, texts, max_length,
                          max_sequences if max_sequences is not None else sys.maxsize)
    device = _device(model)
    nll, count = 0.0, 0
    with torch.no_grad():
        for chunk in chunks:
            ids = torch.tensor([chunk], dtype=torch.long, device=device)
            logits = model(input_ids=ids).logits[0, :-1].double()
            nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += len(chunk) - 1
    if count == 0:
        raise ValueError("perplexity: the texts give no token to predict")
    return math.exp(nll / count)


def _embeddings(model, batch) -> torch.Tensor:
    out = model(**batch)
    hidden = out.last_hidden_state.double()
    mask = batch["attention_mask"].unsqueeze(-1).double()
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def embedding_similarity(dense_model, other_model, tokenizer, texts: Sequence[str],
                         batch_size: int = 16) -> dict:
    """Cosine similarity, per text, of the two models' mean-pooled (attention-mask weighted)
    sentence embeddings: ``{"mean", "min", "texts"}``."""
    if isinstance(texts, str):
        texts = [texts]
    cos: List[float] = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            batch = dict(tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                                   return_tensors="pt"))
            a = _embeddings(dense_model, {k: v.to(_device(dense_model)) for k, v in batch.items()})
            b = _embeddings(other_model, {k: v.to(_device(other_model)) for k, v in batch.items()})
            cos.extend(F.cosine_similarity(a, b.to(a.device), dim=-1).tolist())
    if not cos:
        raise ValueError("embedding_similarity: no texts")
    return {"mean": sum(cos) / len(cos), "min": min(cos), "texts": len(cos)}


def sentences(text: str, min_words: int = 4, max_sentences: Optional[int] = None) -> List[str]:
    """Sentences of a prose text (split after . ! ? followed by space; whitespace collapsed),
    those of at least ``min_words`` words, for embedding comparisons."""
    flat = re.sub(r"\s+", " ", text).strip()
    out = [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'“‘_])", flat) if len(s.split()) >= min_words]
    return out[:max_sentences] if max_sentences is not None else out


def is_causal_lm(config) -> bool:
    """A causal LM: ``is_decoder`` set, or an architecture ending in ForCausalLM/LMHeadModel."""
    archs = getattr(config, "architectures", None) or []
    return bool(getattr(config, "is_decoder", False)) or any(
        a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)


def stored_ratio(cersa_dir: str) -> Optional[float]:
    """``totals.stored_bytes / totals.source_bytes`` of the checkpoint's manifest."""
    totals = json.load(open(os.path.join(cersa_dir, "cersa.json"))).get("totals") or {}
    if not totals.get("source_bytes"):
        return None
    return totals["stored_bytes"] / totals["source_bytes"]


def evaluate(cersa_dir, dense_dir, text: str, max_length: int = 512,
             max_sequences: Optional[int] = None, max_sentences: int = 512) -> dict:
    """The report of the CLI: dense vs CERSA (``load_hf``, frozen) on ``text``."""
    import transformers

    from .hf import _model_class, load_hf

    cersa_dir, dense_dir = os.fspath(cersa_dir), os.fspath(dense_dir)
    config = transformers.AutoConfig.from_pretrained(dense_dir)
    dense = _model_class(config, None).from_pretrained(dense_dir, dtype=torch.float32).eval()
    cersa = load_hf(cersa_dir, config=dense_dir if not os.path.isfile(
        os.path.join(cersa_dir, "config.json")) else None)
    tokenizer = transformers.AutoTokenizer.from_pretrained(dense_dir)
    report = {"report_version": REPORT_VERSION, "cersa_dir": cersa_dir, "dense_dir": dense_dir,
              "stored_ratio": stored_ratio(cersa_dir)}
    if is_causal_lm(config):
        report.update(metric="perplexity", max_length=max_length,
                      dense=perplexity(dense, tokenizer, text, max_length, max_sequences),
                      cersa=perplexity(cersa, tokenizer, text, max_length, max_sequences))
    else:
        sims = embedding_similarity(dense, cersa, tokenizer,
                                    sentences(text, max_sentences=max_sentences))
        report.update(metric="embedding_cosine", cosine_mean=sims["mean"],
                      cosine_min=sims["min"], sentences=sims["texts"])
    return report


def main(argv: Optional[Iterable[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cersa_torch.evaluate",
                                description="Dense vs CERSA: perplexity (causal LMs) or "
                                "sentence-embedding cosine (encoders) on a text.")
    p.add_argument("cersa_dir")
    p.add_argument("--dense", required=True, help="the dense Hugging Face model directory")
    p.add_argument("--text", required=True, metavar="FILE", help="held-out UTF-8 text")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-sequences", type=int, default=None)
    p.add_argument("--max-sentences", type=int, default=512)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    a = p.parse_args(argv)
    report = evaluate(a.cersa_dir, a.dense, open(a.text, encoding="utf-8").read(),
                      a.max_length, a.max_sequences, a.max_sentences)
    if a.json:
        print(json.dumps(report, indent=2))
    elif report["metric"] == "perplexity":
        print(f"perplexity: dense {report['dense']:.3f}, CERSA {report['cersa']:.3f} "
              f"(stored/source bytes {report['stored_ratio']:.3f})")
    else:
        print(f"embedding cosine over {report['sentences']} sentences: mean "
              f"{report['cosine_mean']:.4f}, min {report['cosine_min']:.4f} "
              f"(stored/source bytes {report['stored_ratio']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
