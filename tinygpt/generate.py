"""Batched sampling with a pre-allocated KV cache.

Design choices:
- Prompts of different lengths share one batch by LEFT padding: every row's next token is written
  to the same cache slot, so a decode step is one (B, 1) forward with static shapes. Each row's
  position ids start at 0 at its first real token, and a key-padding mask hides the pad slots, so a
  row's output does not depend on what it is batched with.
- Prefill processes all prompt tokens in one forward and applies the head to the last position
  only (no (B, P, V) logits); decode then appends one token per step.
- A decode step is a pure function of three small device tensors: the previous tokens (B, 1), the
  slot index (1,) and the per-row pad counts (B,). Its position ids and attention mask are derived
  from them on the device, so the step has no Python-side state and no host sync. On CUDA it is
  captured once as a CUDA graph (one replay instead of hundreds of kernel launches per token) and
  the graph, its cache and buffers are kept on the model for the next call of the same shape and
  the same weights/adapters (`release_graphs(model)` frees them).
- Sampling stays outside the graph (a handful of kernels, and it may use a seeded generator):
  temperature, top-k, top-p (nucleus), greedy at temperature 0. Multinomial sampling uses the
  exponential-race trick (argmax p / E, E ~ Exp(1)), which never syncs with the host.
- `seed` is one generator for the batch, or one seed PER ROW (a list): each row then draws its
  noise from its own generator, one draw per step, so its samples depend only on its seed and
  prompt, never on the other rows of the batch (what `tinygpt generate` needs for a data set
  that does not change with --batch or a resume). It costs one small kernel per row per step.
- Per-row stop on any of `stop_ids` (EOS, `<|im_end|>`); rows that stopped keep decoding padding
  but emit nothing. Whether every row is done is checked only every `check_every` steps (one host
  sync), except on the streaming path (`on_token`), which reads each token anyway.
- `filter_logits_rows` / `sample_rows` are the same filters and race with per-row settings (B,)
  tensors, for a server batch whose rows asked for different temperatures, top-k and top-p; row b
  equals the scalar path with row b's settings. `capture_graph` is the warm-up-and-capture both
  this module and the server's slot engine use.
- The log-prob of every sampled token under the temperature-scaled distribution is returned
  (before top-k/top-p filtering): what PPO/GRPO need as the behaviour policy's log-probs.
- Ids past the tokenizer's vocabulary (padding rows of the embedding) are never sampled: the
  logits are cut to `vocab_limit` columns, so log-probs are normalised over real tokens only.
  A width that is not a multiple of 8 is computed as W h^T (`_last_logits`: aligned GEMM output).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError
from .model import KVCache
from .moe import graph_capturable


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


def filter_logits_rows(logits, top_k, top_p):
    """`filter_logits` with each row its own settings: logits (B, V), top_k (B,) ints (0 = off),
    top_p (B,) floats (1 = off). Row b equals filter_logits(logits[b:b+1], top_k[b], top_p[b])."""
    V = logits.shape[-1]
    sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)                    # (B, V)
    k = torch.where((top_k > 0) & (top_k < V), top_k, V)
    kth = sorted_logits.gather(-1, (k - 1)[:, None])                                    # (B, 1)
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = sorted_logits.softmax(-1)
    drop = ((probs.cumsum(-1) - probs) >= top_p[:, None]) & (top_p[:, None] < 1.0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)


def sample_rows(logits, temperature, top_k, top_p, race=None, filtered: bool = True):
    """`sample_next` with each row its own settings: logits (B, V) float32, temperature / top_k /
    top_p (B,) (temperature 0 = greedy). race (B, V): Exp(1) draws for the exponential race (None
    when every row is greedy). filtered=False skips top-k/top-p (no row asks for them).
    Returns (next ids (B,), their log-probs (B,), log-probs of the whole vocabulary (B, V))."""
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    logp = F.log_softmax(scaled, -1)                                                    # (B, V)
    nxt = logits.argmax(-1)
    if race is not None:
        probs = (filter_logits_rows(scaled, top_k, top_p) if filtered else scaled).softmax(-1)
        nxt = torch.where(greedy, nxt, (probs / race).argmax(-1))
    return nxt, logp.gather(-1, nxt[:, None])[:, 0], logp


def sample_next(logits, temperature: float, top_k: int, top_p: float, generator=None):
    """logits (B, V) float32 -> (next ids (B,), their log-probs (B,)). generator: None, one
    torch.Generator, or a list of B (one per row)."""
    if temperature <= 0:  # greedy; the log-prob is under the untempered distribution
        nxt = logits.argmax(-1)
        return nxt, F.log_softmax(logits, -1).gather(-1, nxt[:, None])[:, 0]
    scaled = logits / temperature
    logp = F.log_softmax(scaled, -1)                                                  # (B, V)
    probs = filter_logits(scaled, top_k, top_p).softmax(-1)
    # argmax_v p_v / E_v with E ~ Exp(1) is a draw from p (the exponential race); no host sync
    race = torch.empty_like(probs)
    if isinstance(generator, (list, tuple)):          # one generator per row
        for row, g in zip(race, generator):
            row.exponential_(1.0, generator=g)
    else:
        race.exponential_(1.0, generator=generator)
    nxt = (probs / race).argmax(-1)
    return nxt, logp.gather(-1, nxt[:, None])[:, 0]


def _model_dtype(model):
    p = next(model.parameters())
    return p.dtype if p.is_floating_point() else torch.float32


def _last_logits(model, h, vocab_limit):
    """Head on the last position only: h (B, T, C) -> float32 logits (B, V') cut to the vocabulary.
    When V' is not a multiple of 8 (GPT-2's 50,257), a plain head computes W[:V'] h^T (V', B) and
    reads it transposed: written as h W^T, the GEMM's output rows of V' values are not 16-byte
    aligned and cuBLAS falls back to a slow kernel (a third of a batch-64 decode step's time)."""
    last, head = h[:, -1], model.lm_head                                               # (B, C)
    width = vocab_limit or head.weight.shape[0]
    if width % 8 and type(head) is nn.Linear and head.bias is None:
        return (head.weight[:width] @ last.t()).t().float()                           # (B, V')
    logits = head(last).float()                                                        # (B, V)
    return logits[:, :vocab_limit] if vocab_limit is not None else logits


class _DecodeState:
    """Static buffers of one batched generation shape: the KV cache and the decode-step inputs.
    `step()` reads only these buffers, so it can be captured as a CUDA graph and replayed."""

    def __init__(self, model, B: int, total: int, vocab_limit, device, dtype):
        self.model, self.vocab_limit, self.total = model, vocab_limit, total
        self.cache = KVCache(model.config, B, total, device, dtype)
        self.slots_all = torch.arange(total, device=device)                            # (L,)
        self.pads = torch.zeros(B, dtype=torch.long, device=device)                    # (B,)
        self.tok = torch.zeros(B, 1, dtype=torch.long, device=device)                  # (B, 1)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)                    # (1,)
        self.graph = self.out = None

    def key_valid(self, upto):
        """(B, L) keys a query at slot `upto` may see: real prompt tokens and everything generated."""
        return (self.slots_all[None, :] >= self.pads[:, None]) & (self.slots_all[None, :] <= upto)

    def prefill(self, idx):
        """idx (B, P) left-padded prompts -> logits (B, V') of the next token."""
        P = idx.shape[1]
        q = self.slots_all[:P]
        see = (self.slots_all[None, None, :] >= self.pads[:, None, None]) & \
              (self.slots_all[None, None, :] <= q[None, :, None])                    # (B, P, L)
        see |= self.slots_all[None, None, :] == q[None, :, None]  # pad queries see themselves: no NaN
        pos = (q[None, :] - self.pads[:, None]).clamp(min=0)                           # (B, P)
        h = self.model.hidden(idx, pos=pos, mask=see[:, None], cache=self.cache, slots=q)
        return _last_logits(self.model, h, self.vocab_limit)

    def step(self):
        """One decode step from the buffers: writes slot `self.slot`, returns logits (B, V')."""
        pos = (self.slot[None, :] - self.pads[:, None]).clamp(min=0)                   # (B, 1)
        see = self.key_valid(self.slot)[:, None, None, :]                               # (B, 1, 1, L)
        h = self.model.hidden(self.tok, pos=pos, mask=see, cache=self.cache, slots=self.slot)
        return _last_logits(self.model, h, self.vocab_limit)

    def capture(self, first_slot: int):
        """Record `step` as a CUDA graph. Runs before prefill: the warm-up writes garbage only at
        the first decode slot, which the first real decode step overwrites."""
        self.slot.fill_(first_slot)
        self.graph, self.out = capture_graph(self.step)

    def decode(self, tok, slot: int):
        """Next logits after feeding tok (B,) at cache slot `slot`."""
        self.tok.copy_(tok[:, None])
        self.slot.fill_(slot)
        if self.graph is None:
            return self.step()
        self.graph.replay()
        return self.out


def capture_graph(fn, pool=None):
    """(CUDA graph, its output) of `fn()`, a function of static buffers only. Two warm-up calls on
    a side stream first (lazy kernel selection, allocator pools): `fn` must tolerate running three
    times. `pool` shares one memory pool between graphs that never run at the same time."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


def _structure_key(model) -> tuple:
    """What a captured decode graph depends on besides its inputs: parameter storage (an
    in-place update is fine, a replaced tensor is not) and the adapters' on/off/merge/scale state."""
    params = tuple(p.data_ptr() for p in model.parameters())
    lora = tuple((m.enabled, tuple(m.lora_A), tuple(sorted(m.merged)), tuple(m.scale.values()),
                  tuple(sorted(getattr(m, "disabled", ()))))
                 for m in model.modules() if hasattr(m, "lora_A"))
    return params, lora


class _GraphSlot:
    """Holds the kept decode graph on the model; a copy of the model (deepcopy) starts empty."""

    def __init__(self, key=None, state=None):
        self.key, self.state = key, state

    def __deepcopy__(self, memo):
        return _GraphSlot()


def _decode_state(model, B, total, vocab_limit, device, dtype, use_graph: bool) -> _DecodeState:
    if not use_graph:
        return _DecodeState(model, B, total, vocab_limit, device, dtype)
    key = (B, total, vocab_limit, str(device), dtype, _structure_key(model))
    slot = getattr(model, "_decode_graph", None)
    if slot is not None and slot.key == key:
        return slot.state
    release_graphs(model)                      # free the old cache before allocating a new one
    state = _DecodeState(model, B, total, vocab_limit, device, dtype)
    state.capture(first_slot=total - 1)
    model._decode_graph = _GraphSlot(key, state)
    return state


def release_graphs(model) -> None:
    """Free the CUDA graph, KV cache and buffers kept on `model` by the last generation."""
    slot = getattr(model, "_decode_graph", None)
    if slot is not None and slot.state is not None:
        model._decode_graph = None
        torch.cuda.empty_cache()


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int = 128, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, stop_ids=(), vocab_limit: int | None = None,
             seed: int | list[int] | None = None, pad_id: int = 0, on_token=None, cuda_graph: bool | None = None,
             check_every: int = 16) -> Generation:
    """Generate continuations for a batch of token-id prompts.

    seed: None (the global generator), one seed for the batch, or a list of one seed per row.
    on_token(row, token_id) is called for every emitted token (streaming; a slower path).
    cuda_graph: replay the decode step as a CUDA graph (default: on CUDA, unless streaming)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("empty prompt", None, "give at least one token of prompt")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    cfg = model.config
    device = next(model.parameters()).device
    B, P = len(prompts), max(len(p) for p in prompts)
    total = P + max_new_tokens
    if total > cfg.block_size:
        raise UserError(f"prompt ({P} tokens) + --max-new-tokens ({max_new_tokens}) exceeds the model's "
                        f"context of {cfg.block_size}", None, "shorten the prompt or lower --max-new-tokens")
    if cuda_graph is None:
        cuda_graph = device.type == "cuda" and on_token is None and graph_capturable(model)
    if cuda_graph:  # round the prompt width up (more left padding) so graphs are reused across calls
        P = max(P, min(-(-P // 32) * 32, cfg.block_size - max_new_tokens))
        total = P + max_new_tokens
    was_training = model.training
    model.eval()
    try:
        state = _decode_state(model, B, total, vocab_limit, device, _model_dtype(model), cuda_graph)
        state.pads.copy_(torch.tensor([P - len(p) for p in prompts]))
        idx = torch.tensor([[pad_id] * (P - len(p)) + list(p) for p in prompts], device=device)  # (B, P)
        gen = None
        if isinstance(seed, (list, tuple)):
            if len(seed) != B:
                raise ValueError(f"{len(seed)} seeds for {B} prompts")
            gen = [torch.Generator(device=device).manual_seed(int(s)) for s in seed]
        elif seed is not None:
            gen = torch.Generator(device=device)
            gen.manual_seed(seed)
        logits = state.prefill(idx)
        toks, lps, done = _decode_loop(state, logits, P, max_new_tokens, temperature, top_k, top_p,
                                       stop_ids, gen, pad_id, on_token, check_every)
    finally:
        model.train(was_training)
    tokens, logprobs = [], []
    for b in range(B):
        n = next((i for i, v in enumerate(toks[b]) if v == -1), len(toks[b]))
        tokens.append(toks[b][:n])
        logprobs.append(lps[b][:n])
    return Generation(tokens, logprobs, done)


def _decode_loop(state, logits, P, max_new, temperature, top_k, top_p, stop_ids, gen, pad_id,
                 on_token, check_every):
    """Sample/decode until every row stopped or max_new tokens. Returns host lists
    (tokens (B, n) with -1 after a row's stop, log-probs (B, n), finished (B,))."""
    B, device = logits.shape[0], logits.device
    stop = torch.tensor(sorted(set(stop_ids)), device=device, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out_tok = torch.full((B, max_new), -1, dtype=torch.long, device=device)            # (B, N)
    out_lp = torch.zeros(B, max_new, device=device)                                    # (B, N)
    n = max_new
    for t in range(max_new):
        nxt, lp = sample_next(logits, temperature, top_k, top_p, gen)
        out_tok[:, t] = torch.where(done, -1, nxt)          # -1 marks "after this row's stop"
        out_lp[:, t] = lp
        if on_token is not None:
            for b, (tk, d) in enumerate(zip(nxt.tolist(), done.tolist())):
                if not d:
                    on_token(b, tk)
        done = done | torch.isin(nxt, stop)
        if t == max_new - 1:
            break
        if (on_token is not None or (t + 1) % check_every == 0) and bool(done.all()):
            n = t + 1
            break
        logits = state.decode(torch.where(done, pad_id, nxt), P + t)
    return out_tok[:, :n].tolist(), out_lp[:, :n].tolist(), done.tolist()
