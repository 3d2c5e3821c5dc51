"""Files: `.tinygpt` models, training state for `--resume`, and atomic writes.

Design choices:
- A model is ONE safetensors file. Its metadata holds the resolved ModelConfig (JSON), the tokenizer
  JSON and its roles/chat template, and a format version, so sampling needs nothing else.
- Training state (optimizer moments, step, RNG states, data position) is a safetensors file of
  tensors plus a JSON file of scalars, both in the run folder. No pickle anywhere: loading a file
  can never execute code.
- Every write goes to a temp file in the same folder, is fsync'ed, then renamed over the target:
  a crash leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from .errors import UserError

FORMAT_VERSION = "1"


# ---- atomic writes ----------------------------------------------------------------------------
def _umask() -> int:
    """The process umask. Linux reports it in /proc; elsewhere it is read by setting it and
    putting it back (os.umask can only set)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path):
    """Yield a temp path in the target's folder; on success fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; give the mode a plain open() would
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        try:  # make the rename itself durable
            dfd = os.open(path.parent, os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)
        except OSError:
            pass
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_tensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Save a dict of tensors as safetensors, atomically. Tensors are made contiguous on CPU."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, st_save(flat, metadata={k: str(v) for k, v in (metadata or {}).items()}))


def load_tensors(path, device="cpu") -> tuple[dict, dict]:
    """Load (tensors, metadata) from a safetensors file, with a user error for bad files."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise UserError(f"not a valid safetensors file ({str(e).splitlines()[0][:100]})", str(path)) from None
    return tensors, meta


def fingerprint(state_dict: dict) -> str:
    """A short, stable hash of a set of weights (names, shapes, dtypes and values)."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


# ---- .tinygpt model files -----------------------------------------------------------------------
def save_model(path, model, tokenizer, extra: dict | None = None) -> None:
    """Write weights + resolved config + tokenizer into one safetensors file, atomically."""
    meta = {"format": "tinygpt", "version": FORMAT_VERSION, "config": model.config.to_json(),
            "tokenizer": tokenizer.to_json(), "tokenizer_config": tokenizer.config_json()}
    meta.update(extra or {})
    save_tensors(path, model.state_dict_for_save(), meta)


def read_model_file(path, device="cpu"):
    """(state_dict, ModelConfig, Tokenizer, metadata) from a .tinygpt file."""
    from .config import ModelConfig
    from .tokenizer import Tokenizer
    tensors, meta = load_tensors(path, device)
    if meta.get("format") != "tinygpt":
        raise UserError("not a tinygpt model file (no tinygpt metadata)", str(path),
                        "pass a .tinygpt file or a Hugging Face model folder")
    if meta.get("version") != FORMAT_VERSION:
        raise UserError(f"unsupported model file version {meta.get('version')}", str(path),
                        f"this tinygpt reads version {FORMAT_VERSION}")
    cfg = ModelConfig.from_json(meta["config"])
    tok = Tokenizer.from_json(meta["tokenizer"], meta.get("tokenizer_config"))
    return tensors, cfg, tok, meta


def load_model(path, device="cpu", dtype=None):
    """(GPT, Tokenizer, metadata) from a .tinygpt file; weights bit-exact as saved."""
    tensors, cfg, tok, meta = read_model_file(path)
    model = gpt_from_tensors(tensors, cfg, path, meta.get("quantization"))
    model.to(device=device, dtype=dtype) if dtype else model.to(device)
    return model, tok, meta


def gpt_from_tensors(tensors: dict, cfg, path, quantization: str | None = None, what: str = "model file"):
    """A GPT (on the CPU) whose weights ARE `tensors`: no copy, no re-initialisation. Tensors of
    heads other than the LM head (reward, value) must be taken out first."""
    from .model import GPT
    with torch.device("meta"):
        model = GPT(cfg)
    if quantization:  # int8 files: swap in Int8Linear layers so the int8 tensors load as-is
        from .quantize import swap_int8_modules
        swap_int8_modules(model, tensors, quantization, path)
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"{what} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})",
                        str(path))
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    _materialise_buffers(model)
    return model


def _materialise_buffers(model) -> None:
    """Buffers that are not saved (RoPE tables) are rebuilt after loading onto the meta device."""
    from .model import rope_tables
    c = model.config
    if c.pos_emb == "rope":
        cos, sin = rope_tables(c.head_dim, c.block_size, c.rope_theta)
        model.rope_cos, model.rope_sin = cos, sin
        model._buffers["rope_cos"], model._buffers["rope_sin"] = cos, sin
