"""Interoperability: import Hugging Face / GGUF checkpoints, export to transformers, PEFT and GGUF.

Design choices:
- Our parameter names ARE Hugging Face Llama's, so Llama, Qwen2 and Qwen3 are name-for-name
  copies; only GPT-2 needs a real map (Conv1D layout, fused c_attn). See `hf.py` and `gguf.py`.
- Which Hugging Face class a model becomes is decided by its shape alone (`hf.family_of`); a shape
  no class can express (ReLU^2 MLP, RoPE with LayerNorm, ...) is refused with the reason instead of
  being exported as something that computes a different function.
- Adapters given with `--lora` are merged into the weights before a full-model export; `--format
  peft` instead keeps the LAST adapter separate and writes it as a PEFT adapter folder.
- Output folders are built in a temporary sibling folder and renamed into place at the end, so an
  interrupted export never leaves half a folder behind. Nothing is downloaded: every input is a
  local file or folder.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError

# ChatML, written for models that have no template of their own (the tokenizers we train reserve
# <|im_start|>/<|im_end|>); renders exactly as tinygpt.chat's built-in "chatml".
CHATML_JINJA = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
                " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|im_start|>assistant\\n' }}{% endif %}")

EXPORT_FORMATS = ("hf", "peft", "gguf")
HF_DTYPES = ("f32", "f16", "bf16")
GGUF_DTYPES = ("f32", "f16", "q8_0")


@contextmanager
def atomic_dir(path):
    """Yield a temp folder next to `path`; on success it replaces `path` (an old folder is removed
    only after the new one is complete)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out exists and is not a folder: {path}", None, "choose a folder name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def chat_template_of(tok) -> str:
    return tok.chat_template or CHATML_JINJA


def import_model(src, out) -> dict:
    """Convert a Hugging Face folder or a .gguf file into a .tinygpt file; returns a summary."""
    from ..checkpoint import save_model
    src = Path(src)
    if src.is_dir():
        from .hf import load_hf
        model, tok = load_hf(src)
    elif src.suffix == ".gguf":
        from .gguf import load_gguf
        model, tok = load_gguf(src)
    elif not src.exists():
        raise UserError(f"not found: {src}", None, "pass a Hugging Face model folder or a .gguf file")
    else:
        raise UserError(f"cannot import {src.name}", str(src), "pass a Hugging Face model folder or a .gguf file")
    save_model(out, model, tok, {"source": str(src)})
    return {"params": model.num_params(), "vocab": model.config.vocab_size, "layers": model.config.n_layer}


def export_model(src, out, fmt: str, lora=(), dtype: str | None = None, base_out=None) -> dict:
    """Export a model (a .tinygpt, an HF folder or a .gguf) with `lora` (path, weight) pairs.
    fmt "hf" / "gguf": adapters merged, full model written. fmt "peft": the last adapter becomes a
    PEFT adapter folder at `out` (earlier adapters merged into the base), and the base is written
    as a transformers folder at `base_out` when given. Returns a summary dict."""
    from .. import load_model_and_tokenizer
    from ..lora import merge_and_unload
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"unknown --format {fmt!r}", None, f"choose one of {', '.join(EXPORT_FORMATS)}")
    allowed = GGUF_DTYPES if fmt == "gguf" else HF_DTYPES
    dtype = dtype or ("f16" if fmt == "gguf" else "f32")
    if dtype not in allowed:
        raise UserError(f"--dtype {dtype} is not available for --format {fmt}", None, f"choose one of {', '.join(allowed)}")
    if fmt == "peft" and not lora:
        raise UserError("--format peft needs a --lora adapter", None, "pass --lora FILE.lora")
    model, tok = load_model_and_tokenizer(src, lora=list(lora))   # adapters stacked, in order
    from ..quantize import dequantize_model
    dequantize_model(model)   # int8 files export their dequantized weights (formats hold floats)
    if fmt == "peft":
        from .hf import export_hf, export_peft
        last = list(model._lora_meta)[-1]
        rows = model._lora_meta[last].get("trained_tokens")
        if rows and not base_out:   # loading wrote them into the base: only an exported base has them
            raise UserError(f"the adapter also trained the rows of {', '.join(rows)}, which a PEFT LoRA folder "
                            "does not hold", str(lora[-1][0]), "pass --base-out DIR: the base written there carries them")
        info = export_peft(model, last, out, base_out=base_out)
        if base_out:   # what remains: the base with the earlier adapters (and any tokens they added)
            export_hf(merge_and_unload(model), tok, base_out, dtype)
        return info
    if lora:
        merge_and_unload(model)
    if fmt == "hf":
        from .hf import export_hf
        return {"family": export_hf(model, tok, out, dtype)}
    from .gguf import export_gguf
    return export_gguf(model, tok, out, dtype)
