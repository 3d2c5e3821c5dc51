"""The output head and its summed cross-entropy in one function, a chunk of positions at a time.

`head_cross_entropy(h, weight, targets, chunk)` equals
`token_cross_entropy(h @ weight.T, targets, reduction="sum")`, but the (N, V) logits never all
exist: each chunk's logits (chunk, V) are formed, turned into the chunk's loss AND its gradients
(softmax - one-hot, times h for the weight, times W for h), and dropped. The gradients are kept
(h's (N, C), the weight's (V, C) in float32 when it trains) and backward only scales them by the
incoming scalar, which is exact because the loss is a plain sum. Against a checkpointed chunk
(forward, then forward again in backward, then backward) this skips the second head forward.

`ids` / `rows`: a head whose rows `ids` come from a separate trainable (k, C) tensor `rows` (the
template tokens' rows of a LoRA run) over a frozen `weight`; only the rows' (k, C) gradient is
formed. Positions whose target is `ignore_index` do not count, as in `token_cross_entropy`.

Inside a compiled step the function runs as it is (`torch.compiler.disable`: a graph break), since
a traced autograd.Function that forms gradients in forward came out with zero gradients on CUDA;
on CUDA each chunk's softmax and gradient are one compiled function of their own instead.
"""
from __future__ import annotations

import torch

from ..device import compute_dtype


def _chunk_loss_and_grad(logits, t, keep, need: bool):
    """logits (c, V) in the compute dtype, t (c, 1) ids, keep (c, 1) bools -> (the chunk's summed
    loss in float32, d loss / d logits (c, V) in the compute dtype, or None when not `need`)."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1, keepdim=True)                                  # (c, 1)
    loss = ((lse - x.gather(1, t)) * keep).sum()
    if not need:
        return loss, None
    p = (x - lse).exp()                                                              # softmax (c, V)
    g = torch.where(torch.arange(x.shape[1], device=x.device) == t, p - 1, p) * keep  # minus the one-hot
    return loss, g.to(logits.dtype)


_compiled_chunk = None


def _fused_chunk(device):
    """`_chunk_loss_and_grad`, compiled on CUDA (one pass to reduce, one to write the gradient,
    instead of a float32 copy and a kernel per operation); as it is elsewhere."""
    global _compiled_chunk
    if device.type != "cuda":
        return _chunk_loss_and_grad
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_chunk_loss_and_grad, dynamic=False)
    return _compiled_chunk


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk, ignore_index, ids, rows):
        # h (N, C) in the compute dtype; weight (V, C); targets (N,); rows (k, C) or None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_r = rows is not None and ctx.needs_input_grad[6]
        w = weight.to(h.dtype)
        if rows is not None:
            w = w.index_copy(0, ids, rows.to(h.dtype))                              # (V, C)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        gh = torch.empty_like(h) if need_h else None
        acc = torch.promote_types(weight.dtype, torch.float32)                      # float32, or float64
        gw = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_w else None
        gr = torch.zeros(rows.shape, dtype=acc, device=h.device) if need_r else None
        need = need_h or need_w or need_r
        step = _fused_chunk(h.device)
        for s in range(0, h.shape[0], chunk):
            hc, t = h[s:s + chunk], targets[s:s + chunk]
            keep = (t != ignore_index)[:, None]                                     # (c, 1)
            loss, g = step(hc @ w.t(), t.clamp(min=0)[:, None], keep, need)       # logits (c, V)
            total += loss
            if not need:
                continue
            if need_h:
                gh[s:s + chunk] = g @ w                                             # (c, C)
            if need_w:
                gw += (g.t() @ hc).to(acc)                                          # (V, C)
            if need_r:
                gr += (g[:, ids].t() @ hc).to(acc)                                  # (k, C)
        ctx.save_for_backward(gh, gw, gr)
        ctx.dtypes = (weight.dtype, rows.dtype if rows is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad):
        gh, gw, gr = ctx.saved_tensors
        dh = gh * grad.to(gh.dtype) if gh is not None else None
        dw = (gw * grad).to(ctx.dtypes[0]) if gw is not None else None
        dr = (gr * grad).to(ctx.dtypes[1]) if gr is not None else None
        return dh, dw, None, None, None, None, dr


@torch.compiler.disable
def head_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                       ignore_index: int = -100, ids: torch.Tensor | None = None,
                       rows: torch.Tensor | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy of hidden states h (..., C) through the head `weight` (V, C)
    against targets (...), `chunk` positions at a time (see the module notes). Computed in the
    autocast dtype when autocast is on (as the head's matmul would be), softmax in float32."""
    h = h.reshape(-1, h.shape[-1]).to(compute_dtype(h))                             # (N, C)
    return _HeadCrossEntropy.apply(h, weight, targets.reshape(-1), max(1, chunk), ignore_index, ids, rows)
