"""Load CERSA v1 checkpoints into PyTorch and Hugging Face transformers, and fine-tune
inside their principal subspace.

- :func:`load_hf` — a transformers model whose factored linear layers are
  :class:`CersaLinear` (the dense W of those layers is never allocated);
- :func:`open_checkpoint` — the checkpoint's tensors as ``torch.Tensor`` s, read lazily
  from the memory-mapped shards;
- :class:`CersaLinear`, :func:`patch_linears`, :func:`linear_from_checkpoint` — the
  modules, in the ``frozen``, ``scale``, ``core``, ``factors`` and ``cersa`` modes (``MODES``);
- :class:`PackedCersaLinear` — what ``load_hf(…, packed=True)`` makes of a layer with
  quantized factors: the U8 block rows kept as stored (0.27× of the f32 factor bytes for
  Q8_0, 0.14× for Q4_0) and dequantized in each forward; U and V frozen, so every mode but
  ``factors`` (:mod:`cersa_torch.packed`);
- :class:`DenseSubspaceLinear` — what ``load_hf`` makes of a matrix the converter kept
  dense (``no-saving``, ``planned``) in a trainable mode: W frozen and exact plus the mode's
  adaptation in W's own top-r subspace, computed at load (:mod:`cersa_torch.dense`);
- :func:`save_adapter`, :func:`load_adapter` — the trained part as a ``cersa-adapter`` file
  (the Rust crate's format: ``cersa merge`` folds it into a new checkpoint);
  :func:`save_bases` — the bases of the dense-subspace layers, which ``load_hf(…, bases=)``
  reads instead of recomputing their SVDs;
- :func:`load_cersa` — a numpy reader (numpy + safetensors only, no torch);
- :func:`calibrate` — each linear layer's input statistics G = Σ x xᵀ from the dense model
  run over calibration text, the file ``cersa convert --calibration`` reads
  (``docs/calibration.md``; also ``python -m cersa_torch.calibrate``);
- :func:`perplexity`, :func:`embedding_similarity` — the function a converted model keeps,
  measured against the dense one (also ``python -m cersa_torch.evaluate``);
- :mod:`cersa_torch.memory` — the bytes a fine-tune will hold per mode, from the manifest
  alone, against the dense model with LoRA (also ``python -m cersa_torch.memory DIR``).

The format is specified in ``formats/cersa-v1.md``; every size read from a file is checked
against the manifest before use (:class:`CersaFormatError` names the file and tensor).
Quantized factors (format revision 1.1: ``quant`` Q8_0, Q5_0 or Q4_0, U8 rows of GGML
blocks) are dequantized on read, so both readers hand out float U [m, r] and Vᵀ [r, n];
``TorchCheckpoint.packed_factors`` hands out the stored rows instead.
Stacked mixture-of-experts tensors (format revision 1.3) are read one expert at a time
(``reconstruct_expert``; ``load_hf`` fills fused experts parameters, frozen: docs/experts.md).
Per-expert checkpoints (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek: one matrix per expert, which
transformers fuses on loading) get a :class:`~cersa_torch.moe.CersaExperts` in ``load_hf``:
one ``CersaLinear`` per expert matrix, trainable in the load mode (:mod:`cersa_torch.moe`).
Both readers refuse a directory with the first issue the Rust loader reports (sha256 and
non-finite factors included unless ``verify_checksums=False``).
Names are imported on first use, so ``load_cersa`` works without torch installed.
"""
from ._manifest import MANIFEST_FILE, SUFFIX_S, SUFFIX_U, SUFFIX_VT, CersaFormatError

MODES = ("frozen", "scale", "core", "factors", "cersa")

_LAZY = {
    "load_cersa": "._numpy",
    "CersaCheckpoint": "._numpy",
    "CersaLinear": ".modules",
    "DenseSubspaceLinear": ".dense",
    "PackedCersaLinear": ".packed",
    "linear_from_checkpoint": ".modules",
    "patch_linears": ".modules",
    "open_checkpoint": ".checkpoint",
    "TorchCheckpoint": ".checkpoint",
    "load_hf": ".hf",
    "save_adapter": ".adapter",
    "load_adapter": ".adapter",
    "save_bases": ".adapter",
    "calibrate": ".calibrate",
    "perplexity": ".evaluate",
    "embedding_similarity": ".evaluate",
}

__all__ = ["MANIFEST_FILE", "SUFFIX_U", "SUFFIX_S", "SUFFIX_VT", "CersaFormatError", "MODES",
           *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        # Importing the submodule .calibrate set the package attribute of that name to the
        # module: the function replaces it.
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cersa_torch' has no attribute {name!r}")
