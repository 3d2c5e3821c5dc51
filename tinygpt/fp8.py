"""Float8 training matmuls (`--fp8`): the blocks' linear layers multiply in float8.

Design choices:
- Dynamic per-tensor scaling, the recipe PyTorch's torchao calls "tensorwise": every call, each
  operand is scaled so that its largest magnitude lands on the format's largest finite value, cast
  to float8, and multiplied by `torch._scaled_mm` (the float8 tensor cores of GPUs of compute
  capability 8.9 and up: Ada, Hopper, Blackwell), accumulating in float32 and writing the autocast
  dtype. Activations and weights use e4m3 (more mantissa); gradients e5m2 (more range).
- Only the matmuls change. The master weights, their gradients (written in the weight's dtype by
  the float8 matmul itself), the optimizer, norms, embeddings, attention and the output head stay
  as they are; the head stays out, as in torchtitan's float8 recipe, because the logits are where
  a float8 rounding error costs the most loss. `Float8Linear` is `nn.Linear` with another forward
  and the same parameters, so state dicts, checkpoints and tied weights are untouched.
- Backward saves the float8 copies of x and W made in forward (half the bytes of bf16) and
  computes dx = dy8 @ W8 and dW = dy8^T @ x8, each only when its input needs a gradient (a frozen
  weight costs no dW).
- `torch._scaled_mm` wants its first operand row-major, its second column-major and every
  dimension of both a multiple of 16; `_mm` checks the layouts (the CPU kernel would accept any,
  so tests catch a layout the GPU refuses), and a call whose shapes do not fit runs the plain
  linear instead (decode steps of one token, a width that is not a multiple of 16).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .device import compute_dtype
from .errors import UserError

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
MIN_CAPABILITY = (8, 9)
BLOCK_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def to_float8(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x scaled into `dtype`, the float32 scalar that multiplies it back): amax(|x|) maps to the
    format's largest finite value; values are saturated, never inf."""
    top = torch.finfo(dtype).max
    amax = x.detach().abs().amax().float().clamp(min=1e-12)
    scale = top / amax
    return (x.float() * scale).clamp(-top, top).to(dtype), scale.reciprocal()


def _mm(a, b, scale_a, scale_b, out_dtype, fast_accum: bool = False):
    """a (M, K) row-major @ b (K, N) column-major, float8 -> out_dtype (M, N)."""
    assert a.is_contiguous() and b.t().is_contiguous(), "float8 matmul operands in the wrong layout"
    return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype, use_fast_accum=fast_accum)


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """The same (R, C) matrix stored column by column."""
    return t.t().contiguous().t()


class _Float8Matmul(torch.autograd.Function):
    """x (M, K) @ w (N, K)^T -> (M, N) in out_dtype, float8 on both passes."""

    @staticmethod
    def forward(ctx, x, w, out_dtype):
        x8, sx = to_float8(x, E4M3)
        w8, sw = to_float8(w, E4M3)
        ctx.save_for_backward(x8, sx, w8, sw)
        ctx.dtypes = (x.dtype, w.dtype)
        return _mm(x8, w8.t(), sx, sw, out_dtype, fast_accum=True)

    @staticmethod
    def backward(ctx, dy):
        x8, sx, w8, sw = ctx.saved_tensors
        dy8, sdy = to_float8(dy.contiguous(), E5M2)                            # (M, N)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _mm(dy8, _column_major(w8), sdy, sw, ctx.dtypes[0])           # (M, N) @ (N, K)
        if ctx.needs_input_grad[1]:
            dw = _mm(dy8.t().contiguous(), _column_major(x8), sdy, sx, ctx.dtypes[1])   # (N, M) @ (M, K)
        return dx, dw, None


def fits_float8(m: int, k: int, n: int) -> bool:
    """Whether an (m, k) @ (k, n) product meets `_scaled_mm`'s multiple-of-16 rule on both passes."""
    return m % 16 == 0 and k % 16 == 0 and n % 16 == 0


def float8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) with the matmul in float8: x (..., K), weight (N, K) -> (..., N),
    in the autocast dtype when autocast is on (as F.linear), else x's dtype."""
    *lead, k = x.shape
    n = weight.shape[0]
    if not fits_float8(math.prod(lead), k, n):
        return F.linear(x, weight, bias)
    out_dtype = compute_dtype(x)
    y = _Float8Matmul.apply(x.reshape(-1, k), weight, out_dtype).view(*lead, n)
    return y if bias is None else y + bias.to(y.dtype)


class Float8Linear(nn.Linear):
    """nn.Linear whose matmul runs in float8 (same parameters, same state dict)."""

    def forward(self, x):
        return float8_linear(x, self.weight, self.bias)


def check_float8(device: torch.device) -> None:
    """Refuse --fp8 where float8 matmuls do not run: a GPU below compute capability 8.9, MPS, or a
    CPU build without them."""
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if tuple(cap) < MIN_CAPABILITY:
            raise UserError(f"--fp8 needs float8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell); "
                            f"{torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}", None, "leave out --fp8")
        return
    try:
        one = torch.ones(16, 16, device=device).to(E4M3)
        _mm(one, one.t(), torch.ones((), device=device), torch.ones((), device=device), torch.float32)
    except (RuntimeError, TypeError, NotImplementedError) as e:
        raise UserError(f"--fp8: float8 matmuls do not run on {device.type} with this PyTorch ({e})".split("\n")[0],
                        None, "leave out --fp8") from None


def convert_to_float8(model: nn.Module, device: torch.device) -> int:
    """Make the blocks' plain linear layers (q/k/v/o, gate/up/down, shared experts included) float8
    in place; returns how many. Layers wrapped by LoRA, routers, routed experts and the head stay."""
    check_float8(device)
    count = 0
    for name, m in model.named_modules():
        if type(m) is nn.Linear and name.rsplit(".", 1)[-1] in BLOCK_TARGETS:
            m.__class__ = Float8Linear
            count += 1
    if not count:
        raise UserError("--fp8 found no plain linear layer in the blocks to run in float8 (LoRA wraps them)", None,
                        "leave out --fp8, or train every weight")
    return count
