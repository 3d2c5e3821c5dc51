"""Batched sampling with a pre-allocated KV cache.

Design choices:
- Prompts of different lengths share one batch by LEFT padding: every row's next token is written
  to the same cache slot, so a decode step is one (B, 1) forward with static shapes. Each row's
  position ids start at 0 at its first real token, and a key-padding mask hides the pad slots, so a
  row's output does not depend on what it is batched with.
- Prefill processes all prompt tokens in one forward; decode then appends one token per step.
- Sampling: temperature, top-k, top-p (nucleus), greedy at temperature 0; per-row stop on any of
  `stop_ids` (EOS, `<|im_end|>`); rows that stopped keep decoding padding but emit nothing.
- The log-prob of every sampled token under the temperature-scaled distribution is returned
  (before top-k/top-p filtering): what PPO/GRPO need as the behaviour policy's log-probs.
- Ids past the tokenizer's vocabulary (padding rows of the embedding) are never sampled.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import UserError
from .model import KVCache


@dataclass
class Generation:
    tokens: list[list[int]]        # new tokens per row (stop token included when it was hit)
    logprobs: list[list[float]]    # log-prob of each new token
    finished: list[bool]           # row hit a stop token (else ran out of max_new_tokens)


def filter_logits(logits, top_k: int = 0, top_p: float = 1.0):
    """Mask (B, V) logits outside the top-k and outside the top-p nucleus with -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass BEFORE it already reaches top_p (the first token always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits


def sample_next(logits, temperature: float, top_k: int, top_p: float, generator=None):
    """logits (B, V) float32 -> (next ids (B,), their log-probs (B,))."""
    if temperature <= 0:
        nxt = logits.argmax(-1)
        return nxt, F.log_softmax(logits, -1).gather(-1, nxt[:, None])[:, 0]
    scaled = logits / temperature
    logp = F.log_softmax(scaled, -1)
    probs = filter_logits(scaled, top_k, top_p).softmax(-1)
    nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return nxt, logp.gather(-1, nxt[:, None])[:, 0]


def _model_dtype(model):
    p = next(model.parameters())
    return p.dtype if p.is_floating_point() else torch.float32


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int = 128, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, stop_ids=(), vocab_limit: int | None = None,
             seed: int | None = None, pad_id: int = 0, on_token=None) -> Generation:
    """Generate continuations for a batch of token-id prompts.
    on_token(row, token_id) is called for every emitted token (streaming)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("empty prompt", None, "give at least one token of prompt")
    cfg = model.config
    device = next(model.parameters()).device
    B, P = len(prompts), max(len(p) for p in prompts)
    total = P + max_new_tokens
    if total > cfg.block_size:
        raise UserError(f"prompt ({P} tokens) + --max-new-tokens ({max_new_tokens}) exceeds the model's "
                        f"context of {cfg.block_size}", None, "shorten the prompt or lower --max-new-tokens")
    was_training = model.training
    model.eval()
    pads = torch.tensor([P - len(p) for p in prompts], device=device)                   # (B,)
    idx = torch.tensor([[pad_id] * (P - len(p)) + list(p) for p in prompts], device=device)  # (B, P)
    slots_all = torch.arange(total, device=device)
    key_valid = slots_all[None, :] >= pads[:, None]                                    # (B, total)
    key_valid[:, P:] = False
    pos_all = (slots_all[None, :] - pads[:, None]).clamp(min=0)                        # (B, total)
    cache = KVCache(cfg, B, total, device, _model_dtype(model))
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)

    def step(tokens, slots):
        # a query sees valid keys at or before its own slot, and always itself (no empty rows)
        see = key_valid[:, None, :] & (slots_all[None, None, :] <= slots[None, :, None])  # (B, T, total)
        see |= slots_all[None, None, :] == slots[None, :, None]
        logits = model(tokens, pos=pos_all[:, slots], mask=see[:, None], cache=cache, slots=slots)
        logits = logits[:, -1].float()
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits[:, vocab_limit:] = float("-inf")
        return logits

    logits = step(idx, slots_all[:P])
    stop = torch.tensor(sorted(set(stop_ids)), device=device, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out_tok, out_lp = [], []
    for t in range(max_new_tokens):
        nxt, lp = sample_next(logits, temperature, top_k, top_p, gen)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out_tok.append(nxt)
        out_lp.append(lp)
        if on_token is not None:
            for b in (~done).nonzero()[:, 0].tolist():
                on_token(b, int(nxt[b]))
        done_before = done
        done = done | torch.isin(nxt, stop)
        out_tok[-1] = torch.where(done_before, torch.full_like(nxt, -1), nxt)  # -1 marks "after stop"
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        s = P + t
        key_valid[:, s] = True
        logits = step(nxt[:, None], slots_all[s:s + 1])
    toks = torch.stack(out_tok, 1).tolist()                                             # (B, n)
    lps = torch.stack(out_lp, 1).tolist()
    model.train(was_training)
    tokens, logprobs = [], []
    for b in range(B):
        n = next((i for i, v in enumerate(toks[b]) if v == -1), len(toks[b]))
        tokens.append(toks[b][:n])
        logprobs.append(lps[b][:n])
    return Generation(tokens, logprobs, done.tolist())
