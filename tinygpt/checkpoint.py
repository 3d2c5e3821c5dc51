""".tinygpt model files: one safetensors file holds the weights, the resolved ModelConfig, the
tokenizer (JSON) and a format version, so sampling needs nothing else.

Design choices:
- Loading builds the model on the meta device and assigns the file's tensors (no copy, no random
  initialisation); int8 files swap in `Int8Linear` layers first (`quantize.swap_int8_modules`).
- Heads other than the LM head (reward, value) are their own tensors in the same file and are
  taken out by their loaders (`reward_model`, `rollout`) before `gpt_from_tensors`.
- Writes are atomic (`io.save_tensors`).
"""
from __future__ import annotations

import torch

from .config import ModelConfig
from .errors import UserError
from .io import load_tensors, save_tensors
from .model import GPT, rope_tables
from .quantize import swap_int8_modules
from .tokenizer import Tokenizer

FORMAT_VERSION = "1"


# ---- .tinygpt model files -----------------------------------------------------------------------
def save_model(path, model, tokenizer, extra: dict | None = None) -> None:
    """Write weights + resolved config + tokenizer into one safetensors file, atomically."""
    meta = {"format": "tinygpt", "version": FORMAT_VERSION, "config": model.config.to_json(),
            "tokenizer": tokenizer.to_json(), "tokenizer_config": tokenizer.config_json()}
    meta.update(extra or {})
    save_tensors(path, model.state_dict_for_save(), meta)


def read_model_file(path, device="cpu"):
    """(state_dict, ModelConfig, Tokenizer, metadata) from a .tinygpt file."""
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
    with torch.device("meta"):
        model = GPT(cfg)
    if quantization:  # int8 files: swap in Int8Linear layers so the int8 tensors load as-is
        swap_int8_modules(model, tensors, quantization, path)
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"{what} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})",
                        str(path))
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    materialise_buffers(model)
    return model


def materialise_buffers(model) -> None:
    """Buffers that are not saved (RoPE tables) are rebuilt after loading onto the meta device."""
    c = model.config
    if c.pos_emb == "rope":
        cos, sin = rope_tables(c.head_dim, c.block_size, c.rope_theta)
        model.rope_cos, model.rope_sin = cos, sin
        model._buffers["rope_cos"], model._buffers["rope_sin"] = cos, sin
