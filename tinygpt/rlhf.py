"""Online RL for language models: PPO (RLHF with a reward model) and GRPO / RLOO (verifiable rewards).

Design choices:
- One backbone plays every role. The policy is base + frozen SFT adapter(s) + a fresh trainable
  LoRA adapter; the reference is the same model with only that new adapter switched off
  (`disable_lora(names=[...])`); the PPO value head is a linear layer on the policy's final hidden
  states (`ValueNetwork`; or its own small backbone with `--value-model`, trained too and saved,
  backbone and head, as `value.tinygpt` in the run folder). Only the reward model is
  a second network, optionally in bf16. Full fine-tuning (`--full`) needs a frozen copy as
  reference, the one case that doubles the weights.
- An iteration is: rollout (the batched KV-cache `generate`, CUDA-graph decode), scoring (reward,
  reference log-probs, values and the behaviour log-probs recomputed by the training forward, so
  the first PPO ratio is exactly 1), advantages, then `epochs` passes over shuffled minibatches.
- Sequences are laid out with `logprobs.make_batch` (packed rows, no padding waste) and scored with
  `logprobs.target_logprobs` (chunked head, no (N, V) logits kept): the same log-prob path as
  DPO/KTO. Per-token quantities live in (N, L) tensors (sequence x response token) for GAE and
  whitening, and are gathered to the flat (M,) layout of a minibatch for the loss.
- The behaviour distribution is the one sampled from: the head is cut to the tokenizer's
  vocabulary and divided by the sampling temperature in both `generate` and the loss.
  top-k/top-p sampling makes the rollouts slightly off-policy (the loss sees the full distribution).
- The optimizer step is the engine's (`Engine.train_step`: AdamW, AMP, clipping, lr schedule,
  accumulation, DDP, NaN guard); this module only supplies the loss and the minibatches. PPO's
  outer loop (rollout, then several epochs, with an early stop when the approximate KL between
  the new and the rollout policy exceeds `max_kl`) is the small loop here.
- PPO rewards: the reward model's score at the last response token, minus `kl_coef` times a
  per-token KL estimate (k1 or k3) to the reference; GAE; advantages whitened over real tokens;
  clipped policy and value losses, entropy bonus. `kl_target` turns on the adaptive KL controller.
- GRPO: G completions per prompt, group-relative advantages (`losses.group_advantages`: GRPO with
  or without std scaling, or RLOO's leave-one-out), no value network, an optional k3 KL term in
  the loss. The loss is a token-level mean over the minibatch (long and short answers weigh by
  their tokens, no per-sequence length normalisation).
- Under torchrun each rank rolls out its own prompts; the engine averages gradients.
"""
from __future__ import annotations

import copy
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .chat import encode_segments
from .errors import UserError
from .generate import generate
from .logprobs import make_batch, target_logprobs
from .rewards import FunctionReward, ModelReward  # noqa: F401  (re-exported)
from .losses import (entropy_from_logits, explained_variance, gae, group_advantages, kl_penalty,
                     masked_mean, masked_whiten, ppo_policy_loss, ppo_value_loss)


@dataclass
class RLConfig:
    iterations: int = 100          # rollout + update rounds
    batch: int = 8                 # prompts per iteration (per rank)
    group_size: int = 1            # completions per prompt (GRPO's G)
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    minibatch: int = 8             # sequences per optimizer step
    epochs: int = 4                # passes over each rollout
    clip: float = 0.2
    kl_coef: float = 0.05
    kl_kind: str = "k1"            # PPO reward penalty estimator (GRPO's loss term is always k3)
    kl_target: float = 0.0         # > 0: adaptive KL controller (Ziegler et al. 2019)
    kl_horizon: int = 10000
    max_kl: float = 0.0            # > 0: stop an iteration's epochs when approx KL exceeds it
    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 0.1
    vf_clip: float = 0.2
    ent_coef: float = 0.0
    whiten: bool = True
    rloo: bool = False
    normalize_std: bool = True
    n_samples: int = 4             # completions written to samples.jsonl per iteration
    save_every: int = 0            # iterations


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
    from .checkpoint import save_model
    tensors = {**value.backbone.state_dict_for_save(),
               **{f"value_head.{k}": v for k, v in value.head.state_dict().items()}}
    save_model(path, SimpleNamespace(config=value.backbone.config, state_dict_for_save=lambda: tensors), tokenizer,
               {**(extra or {}), "head": "value"})


def load_value_network(path, device="cpu") -> ValueNetwork:
    """The ValueNetwork written by `save_value_network` (e.g. to continue PPO with it)."""
    from .checkpoint import gpt_from_tensors, read_model_file
    tensors, cfg, _, meta = read_model_file(path)
    head = {k.split(".", 1)[1]: tensors.pop(k) for k in list(tensors) if k.startswith("value_head.")}
    if meta.get("head") != "value" or set(head) != {"weight", "bias"}:
        raise UserError("not a value network file (no value head)", str(path), "give the run folder's value.tinygpt")
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


# ---- trainers ---------------------------------------------------------------------------------
class _RLTrainer:
    """Shared rollout / scoring / update loop. Subclasses give `advantages` and `loss_step`.

    policy: the GPT being trained (its trainable parameters are optimised). reference: the name of
    the trainable adapter (reference = policy with it switched off), a frozen model, or None (no
    KL). prompts: `Prompt`s (see `encode_prompts`). reward: callable episodes -> (N,) scores."""

    kind = "rl"
    uses_value = False

    def __init__(self, policy, tokenizer, prompts: list, reward, cfg: RLConfig, tcfg, out,
                 value: ValueNetwork | None = None, reference="rl", stop_ids=None, device=None,
                 rank: int = 0, world: int = 1, log=print, extra_meta: dict | None = None):
        from .train.engine import Engine, run_dir_for
        if not prompts:
            raise UserError("no prompts to train on", None, "give a --prompts file with rows")
        if isinstance(reference, str):   # else the reference would be the policy itself: KL 0, every weight trained
            from .lora import lora_modules
            if not any(reference in m.lora_A for m in lora_modules(policy).values()):
                raise ValueError(f"reference={reference!r} names the trainable LoRA adapter, but the policy has no "
                                 f"adapter of that name: call apply_lora(policy, ..., name={reference!r}) first, "
                                 "or pass a frozen reference model (or None for no KL)")
        self.policy, self.tok, self.prompts, self.reward = policy, tokenizer, prompts, reward
        self.cfg, self.out, self.log, self.rank, self.world = cfg, out, log, rank, world
        self.reference, self.extra_meta = reference, dict(extra_meta or {})
        self.device = device or next(policy.parameters()).device
        self.vocab_limit = min(tokenizer.vocab_size, policy.config.vocab_size)
        self.pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        self.stop_ids = list(tokenizer.stop_ids() if stop_ids is None else stop_ids)
        if value is not None:
            value.to(self.device)
        self.net = ActorCritic(policy, value, self.vocab_limit, cfg.temperature)
        self.kl = AdaptiveKL(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        n_seq = cfg.batch * cfg.group_size
        self.minibatch = min(cfg.minibatch, n_seq)
        steps = cfg.iterations * cfg.epochs * math.ceil(n_seq / self.minibatch)
        # one micro-batch per optimizer step: the minibatch size is the memory knob
        self.tcfg = replace(tcfg, steps=steps, accum=1)
        self.engine = Engine(self.net, self.tcfg, self.loss_step, None, out, None, None,
                             self.device, rank, world, log)       # minibatches come from the buffer
        self.run_dir = run_dir_for(out)
        g = torch.Generator().manual_seed(tcfg.seed)
        self.order = torch.randperm(len(prompts), generator=g).tolist()

    # ---- rollout and scoring -------------------------------------------------------------------
    def rollout(self, it: int) -> list[Episode]:
        """Sample `group_size` completions for each of this iteration's `batch` prompts."""
        cfg = self.cfg
        start = (it * self.world + self.rank) * cfg.batch
        chosen = [self.prompts[self.order[(start + j) % len(self.order)]] for j in range(cfg.batch)]
        flat = [p for p in chosen for _ in range(cfg.group_size)]
        g = generate(self.policy, [p.ids for p in flat], cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                     cfg.top_p, self.stop_ids, self.vocab_limit, seed=self.tcfg.seed * 1_000_003 + it * self.world
                     + self.rank, pad_id=self.pad)
        return [Episode(p, t, self.tok.decode(t), f, lp) for p, t, f, lp in zip(flat, g.tokens, g.finished, g.logprobs)]

    def _reference_ctx(self):
        if isinstance(self.reference, str):
            from .lora import disable_lora
            return disable_lora(self.policy, names=[self.reference])
        return nullcontext(self.reference)

    def _needs_reference(self) -> bool:
        return self.reference is not None and (self.kl.coef > 0 or self.cfg.kl_target > 0)

    @torch.no_grad()
    def score(self, episodes: list[Episode]):
        """Rewards, behaviour/reference log-probs, values and advantages -> (RolloutBuffer, info)."""
        seqs = [(e.prompt.ids + e.tokens, [0] * len(e.prompt.ids) + [1] * len(e.tokens)) for e in episodes]
        N, L = len(seqs), max(len(e.tokens) for e in episodes)
        lengths = torch.tensor([len(e.tokens) for e in episodes], device=self.device)
        mask = (torch.arange(L, device=self.device)[None, :] < lengths[:, None]).float()  # (N, L)
        old = torch.zeros(N, L, device=self.device)
        ent = torch.zeros(N, L, device=self.device)
        ref = torch.zeros(N, L, device=self.device) if self._needs_reference() else None
        values = torch.zeros(N, L, device=self.device) if self.uses_value else None
        self.net.eval()
        with self.engine.autocast():
            for s in range(0, N, self.minibatch):
                b = make_batch(seqs[s:s + self.minibatch], self.pad, self.device)
                lp, v, e = self.net(b, values=self.uses_value, entropy=True)
                rows = slice(s, s + b.n_seqs)
                old[rows], ent[rows] = _per_token(b, lp, L), _per_token(b, e, L)
                if values is not None:
                    values[rows] = _per_token(b, v, L)
                if ref is not None:
                    with self._reference_ctx() as rmodel:
                        h = policy_hidden(rmodel, b) / self.cfg.temperature
                        ref[rows] = _per_token(b, target_logprobs(_head(rmodel, self.vocab_limit), h, b.target), L)
        self.net.train()
        scores = self.reward(episodes).to(self.device).float()                              # (N,)
        tensors, info = self.advantages(scores, old, ref, values, mask)
        kl = ((old - ref) * mask).sum(1).mean().item() if ref is not None else 0.0
        info.update(reward_mean=scores.mean().item(), reward_std=scores.std().item() if N > 1 else 0.0,
                    kl=kl, kl_coef=self.kl.coef, entropy=masked_mean(ent, mask).item(),
                    response_len=lengths.float().mean().item(),
                    finished=sum(e.finished for e in episodes) / N, tokens=int(lengths.sum()))
        self.kl.update(kl, N * self.world)
        buf = RolloutBuffer(seqs, mask, old_logp=old, ref_logp=ref, **tensors)
        return buf, info, scores

    # ---- update --------------------------------------------------------------------------------
    def update(self, buf: RolloutBuffer, it: int) -> dict:
        """`epochs` passes of shuffled minibatches through the engine's optimizer step."""
        gen = torch.Generator().manual_seed(self.tcfg.seed * 7919 + it)
        sums: dict = {}
        n = 0
        for epoch in range(self.cfg.epochs):
            for idx in buf.minibatches(self.minibatch, gen):
                loss, norm, lr, finite, m = self.engine.train_step([buf.gather(idx, self.pad, self.device)])
                self.engine.step += 1
                n += 1
                for k, v in {**m, "loss": loss, "grad_norm": norm, "lr": lr, "skipped": float(not finite)}.items():
                    sums[k] = sums.get(k, 0.0) + v
                if self.cfg.max_kl > 0 and m.get("approx_kl", 0.0) > self.cfg.max_kl:
                    return {**{k: v / n for k, v in sums.items()}, "updates": n, "early_stop": 1}
        return {**{k: v / max(n, 1) for k, v in sums.items()}, "updates": n, "early_stop": 0}

    def _policy_terms(self, model, mb, values: bool):
        logp, v, ent = model(mb["batch"], values=values, entropy=self.cfg.ent_coef > 0)
        ones = torch.ones_like(logp)
        pg, clip_frac, approx_kl = ppo_policy_loss(logp, mb["old_logp"], mb["advantages"], ones, self.cfg.clip)
        metrics = {"policy_loss": pg.detach(), "clip_frac": clip_frac, "approx_kl": approx_kl,
                   "tokens": mb["batch"].n_tokens}
        loss = pg
        if ent is not None:
            loss = loss - self.cfg.ent_coef * ent.mean()
        return loss, logp, v, metrics

    # ---- loop ----------------------------------------------------------------------------------
    def train(self) -> dict:
        """Run `iterations` rounds; write metrics.jsonl and samples.jsonl in the run folder and the
        trained adapter (or model) to `out`. Returns the last iteration's metrics."""
        main = self.rank == 0
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        files = [open(self.run_dir / n, "w") for n in ("metrics.jsonl", "samples.jsonl")] if main else []
        bar = None
        if main and not self.tcfg.quiet:
            from tqdm import tqdm
            bar = tqdm(total=self.cfg.iterations, dynamic_ncols=True, disable=None)   # only on a terminal
        last: dict = {}
        try:
            for it in range(self.cfg.iterations):
                last = self.iteration(it, files[1] if files else None)
                if files:
                    files[0].write(json.dumps(last) + "\n")
                    files[0].flush()
                if bar:
                    bar.update(1)
                    bar.set_postfix(reward=f"{last['reward_mean']:.3f}", kl=f"{last['kl']:.3f}", refresh=False)
                if self.cfg.save_every and (it + 1) % self.cfg.save_every == 0:
                    self.save()
        except KeyboardInterrupt:
            self.log("interrupted: saving")
            self.save()
            raise
        finally:
            if bar:
                bar.close()
            for f in files:
                f.close()
        self.save()
        return last

    def iteration(self, it: int, samples_file=None) -> dict:
        t0 = _clock(self.device)
        episodes = self.rollout(it)
        t1 = _clock(self.device)
        buf, info, scores = self.score(episodes)
        t2 = _clock(self.device)
        stats = self.update(buf, it)
        t3 = _clock(self.device)
        if samples_file is not None:
            for e, r in list(zip(episodes, scores.tolist()))[:self.cfg.n_samples]:
                samples_file.write(json.dumps({"iteration": it + 1, "prompt": e.prompt.text, "completion": e.text,
                                               "reward": r}) + "\n")
            samples_file.flush()
        self.engine.tokens_seen += int(stats.get("tokens", 0) * stats.get("updates", 0))   # as the engine counts
        return {"iteration": it + 1, "step": it + 1, "tokens_seen": self.engine.tokens_seen, **info, **stats,
                "time_generate": t1 - t0, "time_score": t2 - t1, "time_train": t3 - t2}

    def save(self) -> None:
        if self.rank != 0:
            return
        from .checkpoint import save_model, save_tensors
        meta = {"stage": self.kind, **self.extra_meta}
        if isinstance(self.reference, str):
            from .lora import save_adapter
            save_adapter(self.policy, self.out, self.reference, meta)
        else:
            save_model(self.out, self.policy, self.tok, meta)
        if self.net.value is not None and self.net.value.backbone is None:
            save_tensors(self.run_dir / "value_head.safetensors", dict(self.net.value.head.state_dict()))
        elif self.net.value is not None:   # its own backbone was trained too: keep all of it
            save_value_network(self.run_dir / VALUE_FILE, self.net.value, self.tok, meta)


def _clock(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class PPOTrainer(_RLTrainer):
    """PPO with a value head, per-token KL penalty in the reward, GAE and clipped losses.
    `value`: a ValueNetwork (default: a fresh head shared with the policy backbone)."""

    kind = "ppo"
    uses_value = True

    def __init__(self, policy, tokenizer, prompts, reward, cfg: RLConfig, tcfg, out, value=None, **kw):
        super().__init__(policy, tokenizer, prompts, reward, cfg, tcfg, out,
                         value if value is not None else ValueNetwork(policy.config.n_embd), **kw)

    def advantages(self, scores, old, ref, values, mask):
        N = mask.shape[0]
        kl_tok = kl_penalty(old, ref, self.cfg.kl_kind) * mask if ref is not None else torch.zeros_like(mask)
        rewards = -self.kl.coef * kl_tok                                                     # (N, L)
        last = mask.sum(1).long() - 1                                                        # (N,)
        rewards[torch.arange(N, device=mask.device), last] += scores   # score at the last response token
        adv, ret = gae(rewards, values, mask, self.cfg.gamma, self.cfg.lam)
        if self.cfg.whiten:
            adv = masked_whiten(adv, mask)
        ev = explained_variance(values, ret, mask).item()
        return {"advantages": adv, "returns": ret, "values": values}, {"explained_var": ev}

    def loss_step(self, model, mb):
        loss, logp, v, metrics = self._policy_terms(model, mb, values=True)
        vf, vf_clip = ppo_value_loss(v, mb["values"], mb["returns"], torch.ones_like(v), self.cfg.vf_clip)
        loss = loss + self.cfg.vf_coef * vf
        n = logp.numel()
        return loss * n, n, {**metrics, "value_loss": vf.detach(), "value_clip_frac": vf_clip}


class GRPOTrainer(_RLTrainer):
    """GRPO / RLOO: group-relative advantages over `group_size` completions per prompt, no value
    network, optional k3 KL to the reference in the loss."""

    kind = "grpo"

    def __init__(self, policy, tokenizer, prompts, reward, cfg: RLConfig, tcfg, out, **kw):
        if cfg.group_size < 2:
            raise UserError(f"--group-size must be >= 2 for a group baseline, got {cfg.group_size}")
        super().__init__(policy, tokenizer, prompts, reward, cfg, tcfg, out, None, **kw)

    def advantages(self, scores, old, ref, values, mask):
        adv = group_advantages(scores, self.cfg.group_size, self.cfg.normalize_std, self.cfg.rloo)  # (N,)
        solved = (scores.view(-1, self.cfg.group_size).std(1) == 0).float().mean().item()
        return {"advantages": adv[:, None] * mask}, {"zero_std_groups": solved}

    def loss_step(self, model, mb):
        loss, logp, _, metrics = self._policy_terms(model, mb, values=False)
        if mb["ref_logp"] is not None and self.kl.coef > 0:
            kl = kl_penalty(logp, mb["ref_logp"], "k3").mean()
            loss = loss + self.kl.coef * kl
            metrics["kl_loss"] = kl.detach()
        n = logp.numel()
        return loss * n, n, metrics


# ---- from files -------------------------------------------------------------------------------
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


@dataclass
class RLArgs:
    model: str                                   # base .tinygpt (or Hugging Face folder)
    prompts: str                                 # prompt file (any SFT / preference / prompt format)
    out: str                                     # .lora (default) or .tinygpt (--full)
    lora: tuple = ()                             # frozen adapters [(path, weight)] (the SFT policy)
    reward: str | None = None                    # reward model .tinygpt
    reward_fn: str | None = None                 # built-in name or module:function
    reward_dtype: str = "auto"
    value_model: str | None = None               # PPO: separate value backbone (.tinygpt)
    template: str | None = None
    full: bool = False
    lora_rank: int = 16
    lora_alpha: float = 32.0
    device: str = "auto"
    skip_bad_rows: bool = False


def _build_reward(args: RLArgs, tok, template, device):
    if bool(args.reward) == bool(args.reward_fn):
        raise UserError("give exactly one of --reward (a reward model) and --reward-fn (a function)")
    if args.reward_fn:
        from .rewards import get_reward_fn
        return FunctionReward(get_reward_fn(args.reward_fn))
    from .reward import load_reward_model
    from .train.engine import resolve_dtype
    rm = load_reward_model(args.reward, device)
    rm.to(resolve_dtype(args.reward_dtype, device)).requires_grad_(False)
    return ModelReward(rm, tok, template)


def _template_for(args: RLArgs, tok):
    from .chat import get_template
    spec = args.template
    if spec is None and args.lora:   # the SFT adapter records the template it was trained with
        from .lora import read_adapter
        spec = read_adapter(args.lora[0][0])[1]["extra"].get("sft_template")
    template = get_template(spec, tok)
    vocab = tok.tk.get_vocab(with_added_tokens=True)
    missing = [t for t in template.special_tokens if t not in vocab]
    if missing:
        raise UserError(f"the tokenizer lacks the chat template's tokens {', '.join(missing)}", args.model,
                        "run SFT with this template first, or pick another --template")
    return template


def run_rl(kind: str, args: RLArgs, cfg: RLConfig, tcfg, log=print) -> dict:
    """Build policy, reference, value and reward from files and train: kind 'ppo' or 'grpo'."""
    from . import load_model_and_tokenizer
    from .data.formats import load_prompts
    from .lora import apply_lora, merge_and_unload
    from .train.engine import resolve_dtype, setup_device
    if tcfg.resume:
        raise UserError(f"--resume is not supported by '{kind}'", None, "start a new run")
    device, rank, world = setup_device(args.device)
    # LoRA: the frozen base may live in bf16, the adapter trains in float32; --full keeps fp32 weights
    dtype = torch.float32 if args.full else resolve_dtype(tcfg.dtype, device)
    model, tok = load_model_and_tokenizer(args.model, lora=list(args.lora), device=device, dtype=dtype)
    template = _template_for(args, tok)
    stop_ids = set(tok.stop_ids())
    for s in template.stop_strings:
        ids = tok.encode(s)
        if len(ids) == 1:
            stop_ids.add(ids[0])
    reward = _build_reward(args, tok, template, device)
    rows = load_prompts(args.prompts, args.skip_bad_rows)
    prompts, dropped = encode_prompts(tok, template, rows, model.config.block_size - cfg.max_new_tokens)
    if dropped:
        log(f"dropped {dropped} prompt(s) longer than the context minus --max-new-tokens")
    if not prompts:
        raise UserError("no usable prompts", args.prompts, "check the file or lower --max-new-tokens")
    extra = {"template": template.name, "stacked_on": json.dumps([str(p) for p, _ in args.lora])}
    if args.full:
        merge_and_unload(model)
        reference = copy.deepcopy(model).requires_grad_(False).eval()
        model.requires_grad_(True)
    else:
        torch.manual_seed(tcfg.seed)              # the adapter's random A is part of the run's seed
        apply_lora(model, args.lora_rank, args.lora_alpha, name=kind)
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.data = p.data.float()   # adapters train in float32 over a possibly bf16 base
        reference = kind
    value = None
    if args.value_model:
        if kind != "ppo":
            raise UserError("--value-model is for ppo only (grpo has no value network)")
        vmodel, vtok = load_model_and_tokenizer(args.value_model, device=device)
        if vtok.to_json() != tok.to_json():
            raise UserError("the value model's tokenizer differs from the policy's", args.value_model,
                            "use a value model with the same tokenizer")
        value = ValueNetwork(vmodel.config.n_embd, vmodel.requires_grad_(True).train())
    log(f"{kind}: {len(prompts)} prompts, template {template.name}, "
        f"{'full fine-tuning' if args.full else f'LoRA rank {args.lora_rank}'}, device {device}")
    cls = PPOTrainer if kind == "ppo" else GRPOTrainer
    kw = {"value": value} if kind == "ppo" else {}
    trainer = cls(model, tok, prompts, reward, cfg, tcfg, args.out, reference=reference, stop_ids=sorted(stop_ids),
                  device=device, rank=rank, world=world, log=log, extra_meta=extra, **kw)
    return trainer.train()
