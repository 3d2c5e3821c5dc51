"""The pieces of online RL the PPO and GRPO stages are built from: prompts and episodes, the value
network, the actor-critic module the engine optimises, the rollout buffer, the adaptive KL
controller.

Design choices:
- One backbone plays every role. The policy is base + frozen SFT adapter(s) + a fresh trainable
  LoRA adapter; the reference is the same model with only that new adapter switched off; the PPO
  value head is a linear layer on the policy's final hidden states (`ValueNetwork`; or its own
  small backbone, trained too and saved, backbone and head, as `value.tinygpt` in the run folder).
- Sequences are laid out with `logprobs.make_batch` (packed rows, no padding waste) and scored
  with `logprobs.target_logprobs` (chunked head, no (N, V) logits kept): the same log-prob path as
  DPO/KTO. Per-token quantities live in (N, L) tensors (sequence x response token) for GAE and
  whitening, and are gathered to the flat (M,) layout of a minibatch for the loss.
- The behaviour distribution is the one sampled from: the head is cut to the tokenizer's
  vocabulary and divided by the sampling temperature in both `generate` and the loss.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .chat import encode_segments
from .checkpoint import gpt_from_tensors, read_model_file, save_model, split_head
from .errors import UserError
from .logprobs import make_batch, target_logprobs
from .losses import entropy_from_logits


@dataclass
class Prompt:
    messages: list                 # the conversation (ends with a user turn)
    answer: str | None
    text: str                      # rendered with the chat template + generation prompt
    ids: list[int]


@dataclass
class Episode:
    prompt: Prompt
    tokens: list[int]              # response, stop token included when it stopped
    text: str                      # decoded response, special tokens kept
    finished: bool
    logprobs: list[float]          # behaviour log-probs from the sampler


# ---- networks ---------------------------------------------------------------------------------
class ValueNetwork(nn.Module):
    """Scalar value per position. Shared (default): a linear head on the policy's final hidden
    states, no extra backbone. Separate: `backbone` (a GPT) reads the tokens itself."""

    def __init__(self, n_embd: int, backbone: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(n_embd, 1)
        nn.init.zeros_(self.head.weight)   # start at V = 0: no random baseline in the first updates
        nn.init.zeros_(self.head.bias)

    def forward(self, h_sel, batch=None):
        """h_sel (M, C) policy hidden states at the scored positions (or None when separate) -> (M,)."""
        if self.backbone is not None:
            h = self.backbone.hidden(batch.idx, pos=batch.pos, mask=batch.attn_mask())   # (R, T, C)
            h_sel = h.reshape(-1, h.shape[-1]).index_select(0, batch.sel)                # (M, C)
        return self.head(h_sel.to(self.head.weight.dtype)).squeeze(-1).float()


VALUE_FILE = "value.tinygpt"   # a separate value network, saved in the run folder


def save_value_network(path, value: ValueNetwork, tokenizer, extra: dict | None = None) -> None:
    """A separate value network as one .tinygpt file (atomic): its backbone's tensors, the head as
    `value_head.weight` / `value_head.bias`, and the metadata `"head": "value"`."""
    tensors = {**value.backbone.state_dict_for_save(),
               **{f"value_head.{k}": v for k, v in value.head.state_dict().items()}}
    save_model(path, SimpleNamespace(config=value.backbone.config, state_dict_for_save=lambda: tensors), tokenizer,
               {**(extra or {}), "head": "value"})


def load_value_network(path, device="cpu") -> ValueNetwork:
    """The ValueNetwork written by `save_value_network` (e.g. to continue PPO with it)."""
    tensors, cfg, _, meta = read_model_file(path)
    if meta.get("head") != "value":
        raise UserError("not a value network file (no value head)", str(path), "give the run folder's value.tinygpt")
    tensors, head = split_head(tensors, meta, cfg, path)
    head = {k.split(".", 1)[1]: v for k, v in head.items()}
    backbone = gpt_from_tensors(tensors, cfg, path, what="value network file")
    value = ValueNetwork(cfg.n_embd, backbone)
    value.head.load_state_dict(head)
    return value.to(device)


def _head(policy, vocab_limit):
    """The output head cut to the real vocabulary (a view: no copy, gradients still flow)."""
    return SimpleNamespace(weight=policy.lm_head.weight[:vocab_limit])


def policy_hidden(policy, batch):
    """Final hidden states (M, C) at the positions whose next token is scored."""
    h = policy.hidden(batch.idx, pos=batch.pos, mask=batch.attn_mask())                  # (R, T, C)
    return h.reshape(-1, h.shape[-1]).index_select(0, batch.sel)


class ActorCritic(nn.Module):
    """Policy (+ value head). forward(batch) -> (log-probs (M,), values (M,) or None, entropy (M,)
    or None) at a TokenBatch's scored positions. The engine (and DDP) get THIS module."""

    def __init__(self, policy, value: ValueNetwork | None, vocab_limit: int, temperature: float = 1.0):
        super().__init__()
        self.policy, self.value = policy, value
        self.vocab_limit, self.temperature = vocab_limit, temperature

    def forward(self, batch, values: bool = True, entropy: bool = False):
        h = policy_hidden(self.policy, batch)                                               # (M, C)
        hs = h / self.temperature if self.temperature != 1.0 else h   # logits / T = (h / T) W^T
        head = _head(self.policy, self.vocab_limit)
        logp = target_logprobs(head, hs, batch.target)                                      # (M,)
        v = self.value(h, batch) if values and self.value is not None else None
        ent = None
        if entropy:
            ent = torch.cat([entropy_from_logits(F.linear(c, head.weight.to(c.dtype)))
                             for c in hs.split(1024)]) if hs.shape[0] else hs.new_zeros(0)
        return logp, v, ent


# ---- rollouts ---------------------------------------------------------------------------------
class RolloutBuffer:
    """One iteration's sequences and their per-token tensors (N, L) (N sequences, L the longest
    response): mask, old_logp, ref_logp, values, advantages, returns (absent ones are None)."""

    def __init__(self, seqs: list, mask: torch.Tensor, **tensors):
        self.seqs, self.mask, self.t = seqs, mask, tensors

    def __len__(self) -> int:
        return len(self.seqs)

    def minibatches(self, size: int, generator: torch.Generator | None = None):
        """Shuffled index tensors of `size` sequences (the last one may be smaller)."""
        order = torch.randperm(len(self), generator=generator)
        return [order[s:s + size] for s in range(0, len(self), size)]

    def gather(self, idx: torch.Tensor, pad_id: int, device) -> dict:
        """Minibatch `idx`: its TokenBatch and each per-token tensor in the flat (M,) layout."""
        batch = make_batch([self.seqs[i] for i in idx.tolist()], pad_id, device)
        rows = idx.to(device)[batch.seq]                                   # (M,) sequence of each token
        out = {"batch": batch}
        for k, v in self.t.items():
            out[k] = None if v is None else v[rows, batch.rank]            # (M,)
        return out


@torch.no_grad()
def score_sequences(net: ActorCritic, seqs: list, L: int, chunk: int, pad_id: int, device, values: bool,
                    reference_ctx=None) -> dict:
    """The behaviour log-probs `old`, entropies `ent`, `values` (or None) and reference log-probs
    `ref` (when `reference_ctx()` gives the reference model; else None) of rollout sequences,
    each (N, L) by response position, computed `chunk` sequences at a time."""
    N = len(seqs)
    t = {"old": torch.zeros(N, L, device=device), "ent": torch.zeros(N, L, device=device),
         "ref": torch.zeros(N, L, device=device) if reference_ctx else None,
         "values": torch.zeros(N, L, device=device) if values else None}
    for s in range(0, N, chunk):
        b = make_batch(seqs[s:s + chunk], pad_id, device)
        lp, v, e = net(b, values=values, entropy=True)
        rows = slice(s, s + b.n_seqs)
        t["old"][rows], t["ent"][rows] = _per_token(b, lp, L), _per_token(b, e, L)
        if values:
            t["values"][rows] = _per_token(b, v, L)
        if reference_ctx:
            with reference_ctx() as rmodel:
                h = policy_hidden(rmodel, b) / net.temperature
                t["ref"][rows] = _per_token(b, target_logprobs(_head(rmodel, net.vocab_limit), h, b.target), L)
    return t


def _per_token(batch, flat: torch.Tensor, L: int) -> torch.Tensor:
    """(M,) values at scored positions -> (N, L) by sequence and response position."""
    return flat.new_zeros(batch.n_seqs, L, dtype=torch.float32).index_put((batch.seq, batch.rank), flat.float())


class AdaptiveKL:
    """kl_coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon (Ziegler et al. 2019)."""

    def __init__(self, coef: float, target: float, horizon: int):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target > 0:
            err = max(-0.2, min(0.2, kl / self.target - 1))
            self.coef *= 1 + err * n / self.horizon



def encode_prompts(tok, template, rows, max_len: int) -> tuple[list[Prompt], int]:
    """(messages, answer) rows -> Prompts rendered with the template; rows longer than `max_len`
    tokens are dropped (their count is returned)."""
    out, dropped = [], 0
    for messages, answer in rows:
        segments = template.render(messages, add_generation_prompt=True)
        ids, _ = encode_segments(tok, segments)   # segment by segment, exactly as SFT encoded them
        text = "".join(seg.text for seg in segments)
        if len(ids) > max_len or not ids:
            dropped += 1
            continue
        out.append(Prompt(messages, answer, text, ids))
    return out, dropped


def synced_clock(device) -> float:
    """Seconds, taken after the GPU's queued work, so each phase of an iteration is timed alone."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
