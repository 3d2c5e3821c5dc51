""".tinygpt model files: one safetensors file holds the weights, the resolved ModelConfig, the
tokenizer (JSON) and a format version, so sampling needs nothing else.

Design choices:
- Loading builds the model on the meta device and assigns the file's tensors (no copy, no random
  initialisation); int8 files swap in `Int8Linear` layers first (`quantize.swap_int8_modules`).
- Heads other than the LM head (reward, value) are their own tensors in the same file and are
  taken out by their loaders (`reward_model`, `rollout`) before `gpt_from_tensors`.
- Writes are atomic (`io.save_tensors`) and carry a content checksum, checked on load.
- A file is verified before anything is built from it: its metadata is parsed and typed (the
  config within `config.LIMITS`), the layer count and the embedding shape are read from the
  tensor names and shapes, then every tensor's shape and dtype is compared with a model of that
  config described on the meta device (no memory). Floating-point tensors must be float32,
  float16 or bfloat16 (int8 only in a quantized file's linear weights), and all finite unless
  `allow_nonfinite` (for inspecting a diverged model). `tinygpt verify` runs the same checks
  reading one tensor at a time.
"""
from __future__ import annotations

import torch

from .config import ModelConfig
from .errors import UserError
from .io import load_tensors, nonfinite, save_tensors, warn_if_unfinished
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


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# heads besides the LM head, by the file's `head` metadata: tensor name -> shape for a config
HEADS = {"reward": {"score.weight": lambda c: (1, c.n_embd)},
         "value": {"value_head.weight": lambda c: (1, c.n_embd), "value_head.bias": lambda c: (1,)}}


def split_head(tensors: dict, meta: dict, cfg, path) -> tuple[dict, dict]:
    """(backbone entries, head entries) of a file whose metadata names a head (reward, value),
    the head's tensors checked by name and shape. Entries are tensors or (dtype, shape) pairs."""
    kind = meta.get("head")
    if kind is None:
        return tensors, {}
    if kind not in HEADS:
        raise UserError(f"unknown head {kind!r} in the model file", str(path), f"known: {', '.join(HEADS)}")
    head = {k: tensors[k] for k in HEADS[kind] if k in tensors}
    for k, shape in HEADS[kind].items():
        got = None if k not in head else tuple(head[k][1] if isinstance(head[k], tuple) else head[k].shape)
        if got != shape(cfg):
            raise UserError(f"the {kind} head {k} is {got}, not {shape(cfg)}", str(path), "the file is damaged")
    return {k: v for k, v in tensors.items() if k not in head}, head


def parse_model_meta(meta: dict, path):
    """(ModelConfig, Tokenizer) from a .tinygpt file's metadata, or a one-line UserError."""
    if meta.get("format") != "tinygpt":
        raise UserError("not a tinygpt model file (no tinygpt metadata)", str(path),
                        "pass a .tinygpt file or a Hugging Face model folder")
    if meta.get("version") != FORMAT_VERSION:
        raise UserError(f"unsupported model file version {meta.get('version')}", str(path),
                        f"this tinygpt reads version {FORMAT_VERSION}")
    if "config" not in meta or "tokenizer" not in meta:
        raise UserError("the model file's metadata lacks its config or tokenizer", str(path), "write the file again")
    try:
        cfg = ModelConfig.from_json(meta["config"])
    except UserError as e:
        raise UserError(e.what, str(path), "the file is damaged or was not written by tinygpt") from None
    try:
        tok = Tokenizer.from_json(meta["tokenizer"], meta.get("tokenizer_config"))
    except Exception as e:  # tokenizers and json raise several types for a malformed tokenizer
        raise UserError(f"the model file's tokenizer cannot be read ({str(e).splitlines()[0][:80]})",
                        str(path), "the file is damaged or was not written by tinygpt") from None
    return cfg, tok


def read_model_file(path, device="cpu", allow_nonfinite: bool = False):
    """(state_dict, ModelConfig, Tokenizer, metadata) from a .tinygpt file (checksum checked,
    non-finite tensors refused unless `allow_nonfinite`)."""
    tensors, meta = load_tensors(path, device)
    cfg, tok = parse_model_meta(meta, path)
    check_finite(tensors, path, allow_nonfinite)
    warn_if_unfinished(meta, path)
    return tensors, cfg, tok, meta


def check_finite(tensors: dict, path, allow: bool = False) -> None:
    bad = [] if allow else nonfinite(tensors)
    if bad:
        raise UserError(f"{len(bad)} tensor(s) hold NaN or infinite values (the first: {bad[0]})", str(path),
                        "the model diverged; use an earlier checkpoint (--allow-nonfinite loads it to inspect)")


def load_model(path, device="cpu", dtype=None, allow_nonfinite: bool = False):
    """(GPT, Tokenizer, metadata) from a .tinygpt file; weights bit-exact as saved."""
    tensors, cfg, tok, meta = read_model_file(path, allow_nonfinite=allow_nonfinite)
    model = gpt_from_tensors(tensors, cfg, path, meta.get("quantization"))
    model.to(device=device, dtype=dtype) if dtype else model.to(device)
    return model, tok, meta


def check_shapes(shapes: dict, cfg, path, quantization: str | None = None, what: str = "model file"):
    """Compare tensor {name: (dtype, shape)} with what a GPT of `cfg` holds, before building or
    allocating anything real; returns the meta-device GPT (int8 layers swapped in when quantized)."""
    def fail(msg):
        return UserError(f"{what} does not match its config: {msg}", str(path), "the file is damaged")
    layers = {int(k.split(".")[2]) for k in shapes if k.startswith("model.layers.") and k.split(".")[2].isdigit()}
    if layers != set(range(cfg.n_layer)):
        raise fail(f"n_layer is {cfg.n_layer} but the tensors hold {len(layers)} layer(s)")
    emb = shapes.get("model.embed_tokens.weight")
    if emb is None or tuple(emb[1]) != (cfg.vocab_size, cfg.n_embd):
        raise fail(f"the embedding is {None if emb is None else tuple(emb[1])}, not "
                   f"({cfg.vocab_size}, {cfg.n_embd})")
    with torch.device("meta"):
        model = GPT(cfg)
    if quantization:  # int8 files: swap in Int8Linear layers so the int8 tensors load as-is
        swap_int8_modules(model, {k: torch.empty(0, dtype=d) for k, (d, _) in shapes.items()}, quantization, path)
    want = {k: v for k, v in model.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    missing, unexpected = sorted(set(want) - set(shapes)), sorted(set(shapes) - set(want))
    if missing or unexpected:
        raise fail(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, t in want.items():
        dtype, shape = shapes[k]
        if tuple(shape) != tuple(t.shape):
            raise fail(f"{k} is {tuple(shape)}, not {tuple(t.shape)}")
        ok = dtype == t.dtype if t.dtype == torch.int8 else dtype in FLOAT_DTYPES
        if not ok:
            raise fail(f"{k} is {str(dtype).removeprefix('torch.')}, not a floating-point weight")
    return model


def gpt_from_tensors(tensors: dict, cfg, path, quantization: str | None = None, what: str = "model file"):
    """A GPT (on the CPU) whose weights ARE `tensors`: no copy, no re-initialisation. Tensors of
    heads other than the LM head (reward, value) must be taken out first."""
    model = check_shapes({k: (v.dtype, v.shape) for k, v in tensors.items()}, cfg, path, quantization, what)
    model.load_state_dict(tensors, strict=False, assign=True)
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
