"""Weight-only int8 quantization with one scale per output channel.

Design choices:
- Every nn.Linear (attention, MLP, an untied lm_head) becomes an `Int8Linear`: int8 weights
  (out, in) plus a float scale per output row, scale = max|w_row| / 127, q = round(w / scale).
  Embeddings and norms stay in floating point (they are small, and a tied head IS the embedding,
  so it is left alone too).
- Dequantization happens on the fly: y = (x @ q^T) * scale + b. The scale is per output channel,
  so it applies to the matmul's output, never materialising a scaled float weight. Weights stay
  int8 in memory (about 4x smaller than float32); compute is in the activations' dtype.
- A quantized .tinygpt is an ordinary .tinygpt whose `...weight` tensors are int8, with
  `...weight_scale` beside them and metadata `quantization: int8`. `checkpoint.load_model` calls
  `swap_int8_modules` before loading, so `sample`, `chat` and `eval` use such files unchanged.
- LoRA adapters are merged before quantizing; adapters cannot be stacked on an int8 model (their
  base fingerprint is that of the float weights, so they are refused with a clear error).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError

QUANT_INT8 = "int8"


class Int8Linear(nn.Module):
    """A Linear layer with int8 weights (out, in) and float32 per-output-channel scales (out,)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, lin: nn.Linear) -> "Int8Linear":
        w = lin.weight.detach().float()                                    # (out, in)
        scale = w.abs().amax(dim=1) / 127.0                                # (out,)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))      # all-zero rows: any scale works
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, device=w.device)
        m.weight.copy_(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        m.weight_scale.copy_(scale)
        if lin.bias is not None:
            m.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        return m

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale.float()[:, None]  # (out, in)

    def forward(self, x):
        y = F.linear(x, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype)   # (..., out)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def _linears(model) -> dict[str, nn.Linear]:
    """Linear layers to quantize: all of them except a head tied to the embedding."""
    tied = getattr(model.config, "tie_embeddings", False)
    return {n: m for n, m in model.named_modules()
            if type(m) is nn.Linear and not (tied and n == "lm_head")}


def _replace(model, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_model(model) -> int:
    """Replace every eligible nn.Linear by an Int8Linear, in place; returns how many."""
    mods = _linears(model)
    if not mods:
        raise UserError("nothing to quantize: the model has no floating-point linear layers", None,
                        "is it already int8?")
    for name, lin in mods.items():
        _replace(model, name, Int8Linear.from_linear(lin))
    model._base_fingerprint = None
    return len(mods)


@torch.no_grad()
def dequantize_model(model) -> int:
    """Replace every Int8Linear by an nn.Linear holding its dequantized weights (for export); returns how many."""
    mods = {n: m for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    for name, q in mods.items():
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=q.weight.device)
        lin.weight.copy_(q.dequantized())
        if q.bias is not None:
            lin.bias.copy_(q.bias)
        _replace(model, name, lin)
    return len(mods)


def swap_int8_modules(model, tensors: dict, method: str, where) -> None:
    """Called by `checkpoint.load_model` on a (meta-device) model before loading a quantized file:
    Linear layers whose stored weight is int8 become Int8Linear, so the tensors load as they are."""
    if method != QUANT_INT8:
        raise UserError(f"unknown quantization '{method}'", str(where), "this tinygpt reads int8 files")
    for name, lin in _linears(model).items():
        w = tensors.get(f"{name}.weight")
        if w is not None and w.dtype == torch.int8:
            _replace(model, name, Int8Linear(lin.in_features, lin.out_features, lin.bias is not None, device="meta"))
