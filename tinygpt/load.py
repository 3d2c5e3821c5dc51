"""Loading any model path: a `.tinygpt` file, a local Hugging Face folder or a `.gguf` file, with
LoRA adapters stacked on it. Every command loads through `load_model_and_tokenizer`.
"""
from __future__ import annotations

from pathlib import Path

from .checkpoint import check_finite, load_model
from .errors import UserError
from .interop.gguf import load_gguf
from .interop.hf import load_hf
from .lora import load_adapters


def load_model_and_tokenizer(path, lora=(), device="cpu", dtype=None, allow_nonfinite: bool = False):
    """(model in eval mode, tokenizer) from a `.tinygpt` file, a Hugging Face folder or a `.gguf`.

    lora: adapter paths, or (path, weight) pairs, stacked on the base in order. Weights or
    adapters holding NaN or infinite values are refused unless `allow_nonfinite`."""
    p = Path(path)
    if p.is_dir():
        model, tok = load_hf(p)
    elif p.suffix == ".gguf":
        model, tok = load_gguf(p)
    elif not p.exists():
        raise UserError(f"model not found: {p}", None, "pass a .tinygpt file, a Hugging Face folder or a .gguf")
    else:
        model, tok, _ = load_model(p, allow_nonfinite=allow_nonfinite)
    if p.is_dir() or p.suffix == ".gguf":
        check_finite(model.state_dict(), p, allow_nonfinite)
    model.to(device=device, dtype=dtype) if dtype else model.to(device)
    if lora:
        specs = [(x, 1.0) if isinstance(x, (str, Path)) else tuple(x) for x in lora]
        load_adapters(model, specs, tokenizer=tok, allow_nonfinite=allow_nonfinite)
        model.to(device)
    model.eval()
    return model, tok
