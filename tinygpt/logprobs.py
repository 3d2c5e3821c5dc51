"""Sequence log-probabilities: the one `sequence_logprobs` every preference and RL stage uses.

Design choices:
- Sequences are (ids, mask) pairs; mask is 1 on the tokens that are scored (a response). A batch
  lays them out once, on the CPU, into a `TokenBatch`: either PACKED (first-fit into rows of a
  fixed length, each sequence its own document with positions restarting at 0, attention
  block-diagonal via `packed_mask`) or PADDED (one sequence per row, right padding, plain causal
  attention, which is exact because padding only follows real tokens). Chosen and rejected of
  many pairs go through ONE forward pass either way.
- Only scored positions reach the head: the final hidden states are gathered at the M positions
  whose NEXT token is scored, and the vocabulary projection runs over chunks of them, so the
  (M, V) float32 logits are never all alive at once.
  * Frozen head (LoRA, and every reference pass): a custom autograd function computes, chunk by
    chunk, log p(target) and its gradient with respect to the hidden state, (onehot - softmax) W,
    already in the forward pass; backward is one multiply. No logits are kept and none recomputed.
  * Trainable head (full fine-tuning): each chunk is checkpointed and recomputed in backward.
- `chunked_head_loss` is the same two paths for any per-position loss of the logits (distillation:
  a divergence to a teacher's distribution): the loss function sees one chunk of logits at a time.
- DDP hooks only run through `forward`, so the training pass goes through `LogProbModel`, a thin
  module whose forward returns the per-target log-probs. Stages hand it (not the bare GPT) to the
  engine; `sequence_logprobs` accepts a GPT, a LogProbModel or a DDP-wrapped LogProbModel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .device import compute_dtype
from .model import packed_mask

DEFAULT_CHUNK = 1024   # positions per vocabulary-projection chunk


@dataclass
class TokenBatch:
    """N sequences laid out in R rows of T tokens (all index tensors on the target device).

    idx/pos (R, T): token ids and position ids; doc (R, T) document id per position (None when
    padded: plain causal attention suffices); sel (M,) flat indices into R*T of the positions
    whose next token is scored; target (M,) those next tokens; seq (M,) which sequence each
    belongs to; rank (M,) its order within that sequence; ends (N,) flat index of each sequence's
    last token (reward heads read it)."""
    idx: torch.Tensor
    pos: torch.Tensor
    doc: torch.Tensor | None
    sel: torch.Tensor
    target: torch.Tensor
    seq: torch.Tensor
    rank: torch.Tensor
    ends: torch.Tensor
    n_seqs: int
    max_scored: int
    n_tokens: int           # real (non-pad) tokens in the batch
    _mask: object = None

    def attn_mask(self):
        """Block-diagonal mask of the packed rows (built once: policy and reference share it)."""
        if self.doc is not None and self._mask is None:
            self._mask = packed_mask(self.doc)
        return self._mask


def first_fit(lengths, ids, row_len: int, room: list[int], rows: list[list[int]],
              max_rows: int | None = None) -> bool:
    """Place sequences `ids` (with `lengths`) first-fit into rows of free space `room`, opening
    rows of `row_len` up to `max_rows`. All or nothing: returns False (rows untouched) when one
    does not fit."""
    new_room, new_rows = list(room), [list(r) for r in rows]
    for i, n in zip(ids, lengths):
        r = next((r for r, free in enumerate(new_room) if n <= free), None)
        if r is None:
            if max_rows is not None and len(new_rows) >= max_rows:
                return False
            new_room.append(row_len)
            new_rows.append([])
            r = len(new_rows) - 1
        new_rows[r].append(i)
        new_room[r] -= n
    room[:], rows[:] = new_room, new_rows
    return True


def _pack_rows(lengths: list[int], row_len: int) -> list[list[int]]:
    """First-fit decreasing: sequence indices per row, each row's lengths summing to <= row_len."""
    order = sorted(range(len(lengths)), key=lambda j: -lengths[j])
    room: list[int] = []
    rows: list[list[int]] = []
    first_fit([lengths[i] for i in order], order, row_len, room, rows)
    return rows


def make_batch(seqs, pad_id: int = 0, device="cpu", pack: bool = True, row_len: int | None = None,
               multiple: int = 1, layout: list[list[int]] | None = None, rows: int = 0,
               pow2_rows: bool = False) -> TokenBatch:
    """Lay out sequences [(ids, mask), ...] into a TokenBatch. Position j is selected when
    mask[j + 1] == 1 (it predicts a scored token). pack=False: one sequence per row. Rows are
    `row_len` long (default: the longest sequence), rounded up to `multiple`; `layout` (sequence
    indices per row) overrides the packing, and `rows` pads to at least that many rows, `pow2_rows`
    to a power of two (static or few shapes for compiled kernels)."""
    lengths = [len(ids) for ids, _ in seqs]
    longest = max(lengths)
    T = max(row_len or longest, longest)
    T = -(-T // multiple) * multiple
    if layout is None:
        layout = _pack_rows(lengths, T) if pack else [[i] for i in range(len(seqs))]
    if pow2_rows:
        rows = max(rows, 1 << max(len(layout) - 1, 0).bit_length())
    layout = layout + [[] for _ in range(rows - len(layout))]
    R = len(layout)
    idx = torch.full((R, T), pad_id, dtype=torch.long)
    pos = torch.zeros((R, T), dtype=torch.long)
    doc = torch.full((R, T), -1, dtype=torch.long)
    sel, target, seq, rank, ends = [], [], [], [], [0] * len(seqs)
    max_scored = 0
    for r, members in enumerate(layout):
        start = 0
        for i in members:
            ids, mask = seqs[i]
            n = len(ids)
            idx[r, start:start + n] = torch.tensor(ids, dtype=torch.long)
            pos[r, start:start + n] = torch.arange(n)
            doc[r, start:start + n] = i
            scored = [j for j in range(n - 1) if mask[j + 1]]
            sel += [r * T + start + j for j in scored]
            target += [ids[j + 1] for j in scored]
            seq += [i] * len(scored)
            rank += range(len(scored))
            max_scored = max(max_scored, len(scored))
            ends[i] = r * T + start + n - 1
            start += n
        # padding: each pad position its own document, so it attends only to itself
        doc[r, start:] = -1 - torch.arange(T - start)
    t = lambda x: torch.tensor(x, dtype=torch.long).to(device, non_blocking=True)  # noqa: E731
    return TokenBatch(idx.to(device), pos.to(device), doc.to(device) if pack else None, t(sel), t(target),
                      t(seq), t(rank), t(ends), len(seqs), max_scored, sum(lengths))


# ---- per-target log-probs from hidden states --------------------------------------------------
class _FrozenHeadLogprobs(torch.autograd.Function):
    """log p(target) for hidden states h (M, C) under a FROZEN head W (V, C), chunked.
    The gradient w.r.t. h, (onehot(target) - softmax) @ W, is computed in forward (chunk by
    chunk, while each chunk's logits exist anyway) and saved: backward is grad[:, None] * it."""

    @staticmethod
    def forward(ctx, h, weight, target, chunk: int):
        need_grad = ctx.needs_input_grad[0]
        out = torch.empty(h.shape[0], device=h.device, dtype=torch.float32)
        grad_h = torch.empty_like(h) if need_grad else None
        for s in range(0, h.shape[0], chunk):
            logits = (h[s:s + chunk] @ weight.t()).float()                # (c, V)
            t = target[s:s + chunk]
            lse = torch.logsumexp(logits, dim=-1)                         # (c,)
            out[s:s + chunk] = logits.gather(1, t[:, None]).squeeze(1) - lse
            if need_grad:  # in place: one (c, V) float32 buffer becomes onehot - softmax
                g = logits.sub_(lse[:, None]).exp_().neg_()
                g.scatter_add_(1, t[:, None], torch.ones_like(g[:, :1]))
                grad_h[s:s + chunk] = (g.to(weight.dtype) @ weight).to(h.dtype)
        if need_grad:
            ctx.save_for_backward(grad_h)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        return grad_out[:, None].to(grad_h.dtype) * grad_h, None, None, None


def _chunk_logprobs(h, weight, target):
    return -F.cross_entropy(F.linear(h, weight).float(), target, reduction="none")


def target_logprobs(head: nn.Linear, h: torch.Tensor, target: torch.Tensor, chunk: int = DEFAULT_CHUNK):
    """log p(target) (M,) float32 for hidden states h (M, C) through the output head."""
    h = h.to(compute_dtype(h))
    if not head.weight.requires_grad or not torch.is_grad_enabled():
        return _FrozenHeadLogprobs.apply(h, head.weight.to(h.dtype), target, chunk)
    parts = [checkpoint(_chunk_logprobs, h[s:s + chunk], head.weight, target[s:s + chunk], use_reentrant=False)
             for s in range(0, h.shape[0], chunk)]
    return torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)


class _FrozenHeadLoss(torch.autograd.Function):
    """Per-position values fn(h W^T, *args) (K, M) under a FROZEN head W, chunk by chunk. The
    gradient of row 0 (the loss) w.r.t. each chunk of h is taken in forward, by autograd on that
    chunk's logits while they exist, and saved (M, C): backward is one multiply, no logits kept."""

    @staticmethod
    def forward(ctx, h, weight, fn, chunk: int, *args):
        need = ctx.needs_input_grad[0]
        grad_h = torch.empty_like(h) if need else None
        outs = []
        for s in range(0, max(h.shape[0], 1), chunk):
            part = [a[s:s + chunk] if torch.is_tensor(a) else a for a in args]
            hc = h[s:s + chunk].detach().requires_grad_(need)
            with torch.enable_grad():
                vals = fn(hc @ weight.t().to(hc.dtype), *part)                     # (K, c)
                if need:
                    grad_h[s:s + chunk] = torch.autograd.grad(vals[0].sum(), hc)[0]
            outs.append(vals.detach())
        if need:
            ctx.save_for_backward(grad_h)
        ctx.n_args = len(args)
        return torch.cat(outs, dim=-1)

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        return (grad_out[0][:, None].to(grad_h.dtype) * grad_h, None, None, None) + (None,) * ctx.n_args


def _chunk_values(h, weight, fn, *args):
    return fn(F.linear(h, weight.to(h.dtype)), *args)


def chunked_head_loss(h: torch.Tensor, weight: torch.Tensor, fn, *args, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """fn(logits (c, V), *args sliced to the same c positions) -> (K, c) per-position values whose
    row 0 is a loss, over hidden states h (M, C) and the head weight (V, C), a chunk of positions at
    a time: (K, M). The (M, V) logits are never all alive. A frozen head gets its gradient in
    forward (`_FrozenHeadLoss`); a trainable one has each chunk checkpointed and recomputed in
    backward. Only row 0 carries a gradient; `args` may hold None (passed through)."""
    h = h.to(compute_dtype(h))
    if not weight.requires_grad or not torch.is_grad_enabled():
        return _FrozenHeadLoss.apply(h, weight.detach(), fn, chunk, *args)
    parts = []
    for s in range(0, max(h.shape[0], 1), chunk):
        part = [a[s:s + chunk] if torch.is_tensor(a) else a for a in args]
        parts.append(checkpoint(_chunk_values, h[s:s + chunk], weight, fn, *part, use_reentrant=False))
    return torch.cat(parts, dim=-1)


class LogProbModel(nn.Module):
    """A GPT whose forward returns log p(target) (M,) at a TokenBatch's selected positions.
    Hand THIS to the engine (and so to DDP) in stages that score sequences."""

    def __init__(self, gpt: nn.Module, chunk: int = DEFAULT_CHUNK):
        super().__init__()
        self.gpt, self.chunk = gpt, chunk

    def forward(self, batch: TokenBatch) -> torch.Tensor:
        h = self.gpt.hidden(batch.idx, pos=batch.pos, mask=batch.attn_mask())  # (R, T, C)
        h = h.reshape(-1, h.shape[-1]).index_select(0, batch.sel)             # (M, C)
        return target_logprobs(self.gpt.lm_head, h, batch.target, self.chunk)


def sequence_logprobs(model, batch: TokenBatch, per_token: bool = False):
    """Summed log-probs of each sequence's scored tokens in ONE forward pass.

    model: a GPT, a LogProbModel, or a DDP-wrapped LogProbModel (called through its forward).
    Returns (sum_logp (N,) float32, n_tokens (N,) float32, per_token (N, L) float32 or None):
    per_token[i, k] is the log-prob of sequence i's k-th scored token (0 past its end)."""
    scorer = model if isinstance(model, nn.Module) and not hasattr(model, "lm_head") else LogProbModel(model)
    lp = scorer(batch)                                                       # (M,)
    N = batch.n_seqs
    total = torch.zeros(N, device=lp.device, dtype=torch.float32).index_add(0, batch.seq, lp)
    count = torch.bincount(batch.seq, minlength=N).float()
    tokens = None
    if per_token:
        tokens = lp.new_zeros(N, max(batch.max_scored, 1)).index_put((batch.seq, batch.rank), lp)
    return total, count, tokens
