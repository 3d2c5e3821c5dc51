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

    def attn_mask(self):
        from .model import packed_mask
        return None if self.doc is None else packed_mask(self.doc)


def _pack_rows(lengths: list[int], row_len: int) -> list[list[int]]:
    """First-fit decreasing: sequence indices per row, each row's lengths summing to <= row_len."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(row_len - lengths[i])
    return rows


def make_batch(seqs, pad_id: int = 0, device="cpu", pack: bool = True, row_len: int | None = None,
               multiple: int = 1) -> TokenBatch:
    """Lay out sequences [(ids, mask), ...] into a TokenBatch. Position j is selected when
    mask[j + 1] == 1 (it predicts a scored token). pack=False: one sequence per row. Rows are
    `row_len` long (default: the longest sequence), rounded up to `multiple`."""
    lengths = [len(ids) for ids, _ in seqs]
    longest = max(lengths)
    T = max(row_len or longest, longest)
    T = -(-T // multiple) * multiple
    layout = _pack_rows(lengths, T) if pack else [[i] for i in range(len(seqs))]
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
    dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
    h = h.to(dtype)
    if not head.weight.requires_grad or not torch.is_grad_enabled():
        return _FrozenHeadLogprobs.apply(h, head.weight.to(dtype), target, chunk)
    parts = [checkpoint(_chunk_logprobs, h[s:s + chunk], head.weight, target[s:s + chunk], use_reentrant=False)
             for s in range(0, h.shape[0], chunk)]
    return torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)


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
