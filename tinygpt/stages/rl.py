"""`tinygpt ppo` and `tinygpt grpo`: online RL for language models on the engine.

Design choices:
- An RL stage is a `Stage` with an `iteration(engine, it)` hook: rollout (the batched KV-cache
  `generate`, CUDA-graph decode), scoring (reward, reference log-probs, values and the behaviour
  log-probs recomputed by the training forward, so the first PPO ratio is exactly 1), advantages,
  then `epochs` passes over shuffled minibatches, each one `engine.train_step`. The engine counts
  iterations (`--steps`, alias `--iterations`) and gives RL what every stage gets: --resume (with
  the adaptive KL coefficient), the NaN stop, progress, metrics/samples.jsonl, checkpoints, Ctrl-C.
- Rollout i is a pure function of the seed, i and the weights (each completion has its own seed
  from (seed, i, its global row)), the shuffle of iteration i of (seed, i): resume == uninterrupted.
- Under torchrun each rank rolls out and scores `--batch` prompts of the iteration's global batch
  (batch x ranks); the scored rows are gathered to every rank (`train.parallel.gather_rows`), so
  advantages, the minibatch shuffle and the metrics see the global batch, and each rank trains on
  its slice of every global minibatch: N ranks of `--batch B` update as one process of `--batch NB`
  (and a run resumes on another number of ranks).
- PPO rewards: the reward model's score at the last response token, minus `kl_coef` times a per-token
  KL estimate (k1 or k3) to the reference; GAE; whitened advantages; clipped policy and value losses,
  entropy bonus. `kl_target` turns on the adaptive KL controller.
  An iteration's epochs stop early when the approximate KL to the rollout policy passes `max_kl`.
- GRPO: G completions per prompt, group-relative advantages (`losses.group_advantages`: centred
  on the group mean and divided by the group's std, the batch's std or nothing, or RLOO's
  leave-one-out), no value network, an optional k3 KL term in the loss. `--loss-type` picks how
  the clipped surrogate is normalised (`losses.rl`): dapo (the default, as in TRL: a token-level
  mean over the minibatch: answers weigh by their tokens), grpo (per-sequence means), dr_grpo (a
  constant denominator, no std scaling), gspo (a sequence-level ratio); `--epsilon-low/-high` clip
  asymmetrically (DAPO's clip-higher).
- top-k/top-p sampling makes the rollouts slightly off-policy (the loss sees the full distribution).
"""
from __future__ import annotations

import json
import math
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch

from ..checkpoint import save_model
from ..data.prompts import load_prompts
from ..device import DTYPE_NAMES
from ..errors import UserError
from ..generate import generate
from ..io import save_tensors
from ..load import load_model_and_tokenizer
from ..lora import disable_lora, lora_modules, save_adapter
from ..losses import (
    GRPO_LOSS_TYPES,
    REWARD_SCALES,
    aggregate_tokens,
    explained_variance,
    gae,
    group_advantages,
    grpo_policy_loss,
    kl_penalty,
    loss_units,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from ..options import above, at_least, between, option
from ..rollout import (
    VALUE_FILE,
    ActorCritic,
    AdaptiveKL,
    Episode,
    RolloutBuffer,
    ValueNetwork,
    encode_prompts,
    save_value_network,
    score_sequences,
    synced_clock,
)
from ..train.engine import run_dir_for
from ..train.parallel import gather_padded, gather_rows, row_seeds
from ..train.stage import Stage, TrainOptions
from ..verifiers import reward_source
from .common import (
    LoRAOptions,
    ModelOptions,
    RowCheckOptions,
    SamplingOptions,
    TemplateOptions,
    check_inputs,
    check_out,
    compile_blocks,
    default_lr,
    load_opts_model,
    lora_specs,
    make_trainable,
    reference_for,
    resolve_plan,
    resolve_template,
    stop_ids,
    template_record,
    template_tokens,
)


@dataclass
class RLOptions(ModelOptions, TemplateOptions, RowCheckOptions, LoRAOptions, SamplingOptions, TrainOptions):
    """Prompts, the reward, and the rollout and update settings PPO and GRPO share."""

    group = "online RL"
    prompts: str | None = option(None, "prompt file (SFT, preference, {prompt} or {question, answer} rows)",
                                 required=True)
    reward: str | None = option(None, "reward model .tinygpt (from 'tinygpt reward')")
    reward_fn: str | None = option(None, "verifiable reward: gsm8k, synth, format or module:function")
    reward_dtype: str = option("auto", "precision of the reward model", choices=DTYPE_NAMES)
    steps: int | None = option(100, "rollout + update rounds", aliases=("--iterations",), check=at_least(1))
    batch: int = option(8, "prompts per iteration (per rank)", check=at_least(1))
    group_size: int = option(1, "completions per prompt", check=at_least(1))
    max_new_tokens: int | None = option(None, "longest completion", auto="64, at most ctx/2", check=at_least(1))
    temperature: float = option(1.0, "sampling temperature of the rollouts (> 0)", check=above(0))
    minibatch: int = option(8, "sequences per optimizer step, over all ranks (0: the whole rollout)", check=at_least(0))
    ppo_epochs: int = option(4, "passes over each rollout", check=at_least(1))
    clip: float = option(0.2, "policy ratio clip", check=above(0))
    kl_coef: float = option(0.05, "KL-to-reference coefficient (0: no reference)", check=at_least(0))
    kl_target: float = option(0.0, "adaptive KL controller target (0: fixed)", check=at_least(0))
    kl_horizon: int = option(10000, "adaptive KL controller horizon, in sequences", check=at_least(1))
    max_kl: float = option(0.0, "stop an iteration's epochs above this approximate KL (0: off)", check=at_least(0))
    samples: int = option(4, "completions per iteration written to samples.jsonl", check=at_least(0))
    lr: float | None = option(None, "peak learning rate", auto="1e-5 (1e-6 with --full) x 2048/width",
                              check=between(0, 1, lo_open=True))
    lr_schedule: str = option("constant", "learning-rate schedule", choices=("cosine", "linear", "constant", "wsd"))
    weight_decay: float = option(0.0, "AdamW weight decay (matrices only)", check=at_least(0))

    def check(self) -> None:
        if self.reward and self.reward_fn:
            raise UserError("both --reward and --reward-fn given", None, "give one of them")
        super().check()

    def fsdp_blocker(self) -> str:
        return "its rollouts run the policy outside the sharded model"

    def require(self) -> None:
        super().require()
        if not (self.reward or self.reward_fn):
            raise UserError("no reward: give --reward (a reward model) or --reward-fn (a function)", None,
                            f"see 'tinygpt {self.command} --help'")


@dataclass
class PPOOptions(RLOptions):
    command = "ppo"
    group = "PPO"
    value_model: str | None = option(None, "separate value backbone (.tinygpt, same tokenizer)",
                                     auto="a head on the policy")
    kl_kind: str = option("k1", "per-token KL estimator in the reward", choices=("k1", "k3"))
    gamma: float = option(1.0, "discount", check=between(0, 1))
    lam: float = option(0.95, "GAE lambda", check=between(0, 1))
    vf_coef: float = option(0.1, "value loss coefficient", check=at_least(0))
    vf_clip: float = option(0.2, "value clip", check=above(0))
    ent_coef: float = option(0.0, "entropy bonus", check=at_least(0))
    whiten: bool = option(True, "do not whiten advantages", negate="--no-whiten")


@dataclass
class GRPOOptions(RLOptions):
    command = "grpo"
    group = "GRPO"
    group_size: int = option(4, "completions per prompt (the group)", check=at_least(2))
    minibatch: int = option(0, "sequences per optimizer step, over all ranks (0: the whole rollout)", check=at_least(0))
    ppo_epochs: int = option(1, "passes over each rollout", check=at_least(1))
    rloo: bool = option(False, "leave-one-out baseline (RLOO) instead of the group mean")
    normalize_std: bool = option(True, "do not divide advantages by the group's std (= --scale-rewards none)",
                                 negate="--no-std")
    scale_rewards: str | None = option(None, "what divides the centred rewards: the group's std, the batch's, or "
                                       "nothing", choices=REWARD_SCALES, auto="group; none for dr_grpo")
    loss_type: str = option("dapo", "normalisation of the clipped surrogate: dapo (token mean), grpo (mean of "
                            "per-sequence means), dr_grpo (sum / (sequences x max-new-tokens)), gspo "
                            "(sequence-level ratio)", choices=GRPO_LOSS_TYPES)
    epsilon_low: float | None = option(None, "the ratio is clipped below at 1 - epsilon-low",
                                       auto="--clip; 3e-4 for gspo", check=above(0))
    epsilon_high: float | None = option(None, "the ratio is clipped above at 1 + epsilon-high (DAPO: 0.28)",
                                        auto="--epsilon-low; 4e-4 for gspo", check=above(0))

    def check(self) -> None:
        if self.scale_rewards and not self.normalize_std and self.scale_rewards != "none":
            raise UserError(f"--no-std and --scale-rewards {self.scale_rewards} contradict each other", None,
                            "give one of them")
        if self.rloo and self.scale_rewards not in (None, "none"):
            raise UserError("--rloo uses the raw leave-one-out baseline: --scale-rewards does not apply", None,
                            "drop --scale-rewards")
        super().check()


class RLTrainer(Stage):
    """Shared rollout / scoring / update loop. Subclasses give `advantages` and `loss_step`.

    PPOTrainer(PPOOptions(model="base.tinygpt", lora=["sft.lora"], prompts="p.jsonl", reward="rm.tinygpt",
               out="ppo.lora")).train()
    Python callers may pass `model`/`tokenizer` loaded, `prompts` as `rollout.Prompt`s, `reward` as a
    callable episodes -> (N,) scores, `stop_ids` (default: the tokenizer's and the template's), and
    `reference`: the name of a trainable adapter already on the model (reference = policy with it
    off), a frozen model, or False for no KL; without `reference` the stage adds the fresh adapter
    (or, with --full, the frozen copy) itself."""

    kind = "rl"
    uses_value = False
    compile_step = False           # --compile: the policy's blocks, for its training forwards only

    def __init__(self, options, model=None, tokenizer=None, prompts=None, reward=None, value=None,
                 reference=None, stop_ids=None, log=None):
        super().__init__(options, log)
        self.policy, self.tok, self.prompts, self.reward = model, tokenizer, prompts, reward
        self.value, self.reference, self.stop_ids = value, reference, stop_ids

    # ---- set-up ---------------------------------------------------------------------------------
    def setup(self, run) -> None:
        o = self.opts
        check_out(o.out, o.full)
        self.device, self.rank, self.world, self.run_dir = run.device, run.rank, run.world, run_dir_for(o.out)
        if self.policy is None:
            check_inputs(o, ("--prompts", o.prompts), ("--reward", o.reward), ("--value-model", self._value_path()))
            # LoRA: the frozen base may live in bf16, the adapter trains in float32; --full keeps fp32 weights
            self.policy, self.tok = load_opts_model(o, device=run.device, dtype=torch.float32 if o.full else run.dtype)
        self.policy.set_dropout(0.0)         # rollout and update log-probs must be the same function
        if o.max_new_tokens is None:         # leave room for prompts in a small model's context
            self.opts = o = replace(o, max_new_tokens=min(64, self.policy.config.block_size // 2))
        self.template = resolve_template(o.template, self.tok, o.model, lora_specs(o))
        if self.prompts is None:             # prompts given as token ids need no template tokens
            template_tokens(self.policy, self.tok, self.template, may_add=False, where=str(o.model))
        if self.stop_ids is None:
            self.stop_ids = stop_ids(self.tok, self.template)
        if self.reward is None:
            if not (o.reward or o.reward_fn):
                raise UserError("no reward: give --reward (a reward model) or --reward-fn (a function)")
            self.reward = reward_source(o.reward_fn, o.reward, o.reward_dtype, self.tok, self.template, run.device)
        if self.prompts is None:
            self.prompts = self._load_prompts(run.log)
        if not self.prompts:
            raise UserError("no prompts to train on", o.prompts, "give a --prompts file with rows")
        if self.reference is None:
            make_trainable(self.policy, o, self.kind)
            self.reference = reference_for(self.policy, o.full, self.kind)
        elif self.reference is False:
            self.reference = None
        elif isinstance(self.reference, str) and not any(self.reference in m.lora_A
                                                         for m in lora_modules(self.policy).values()):
            raise ValueError(f"reference={self.reference!r} names the trainable adapter, but the policy has none "
                             "of that name (apply_lora(..., name=...) first, or pass no reference)")
        self._setup_value(run)
        if o.compile:
            compile_blocks(self.policy, training_only=True)
        self.vocab_limit = min(self.tok.vocab_size, self.policy.config.vocab_size)
        self.pad = self.tok.pad_id if self.tok.pad_id is not None else 0
        self.model = self.net = ActorCritic(self.policy, self.value, self.vocab_limit, o.temperature)
        self.kl = AdaptiveKL(o.kl_coef, o.kl_target, o.kl_horizon)
        n_seq = o.batch * o.group_size * run.world                     # sequences of an iteration, all ranks
        self.minibatch = min(o.minibatch or n_seq, n_seq)
        if self.minibatch < run.world:
            raise UserError(f"--minibatch {self.minibatch} is smaller than the {run.world} ranks", None,
                            f"give --minibatch {run.world} or more (sequences per step over all ranks)")
        self.updates_per_iteration = o.ppo_epochs * math.ceil(n_seq / self.minibatch)
        self.plan = resolve_plan(o, o.steps, lr=default_lr(o, 1e-6 if o.full else 1e-5, self.policy, run.log))
        self.order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(o.seed)).tolist()
        run.log(f"{self.kind}: {len(self.prompts)} prompts, template {self.template.name}, "
                f"{'full fine-tuning' if o.full else f'LoRA rank {o.lora_rank}'}, device {run.device}")

    def _value_path(self):
        return None

    def _setup_value(self, run) -> None:
        pass

    def _load_prompts(self, log) -> list:
        o = self.opts
        rows, report = load_prompts(o.prompts, o.skip_bad_rows, o.strict)   # warns of skipped rows
        prompts, dropped = encode_prompts(self.tok, self.template, rows,
                                          self.policy.config.block_size - o.max_new_tokens)
        if dropped:
            log(f"dropped {dropped} prompt(s) longer than the context minus --max-new-tokens")
        if not prompts:
            raise UserError("no usable prompts", o.prompts, "check the file or lower --max-new-tokens")
        return prompts

    def schedule_steps(self) -> int:
        return self.plan.steps * self.updates_per_iteration

    def resume_key(self) -> dict:
        o = self.opts
        return {"kind": self.kind, "model": self.policy.config.to_json(), "prompts": len(self.prompts),
                "prompts_per_iteration": o.batch * self.world, "group_size": o.group_size, "seed": o.seed,
                "full": o.full, "minibatch": self.minibatch, "epochs": o.ppo_epochs}

    def state_dict(self) -> dict:
        return {"kl_coef": self.kl.coef}

    def load_state_dict(self, state: dict) -> None:
        self.kl.coef = state.get("kl_coef", self.kl.coef)

    # ---- rollout and scoring -------------------------------------------------------------------
    def rollout(self, it: int) -> list[Episode]:
        """Sample `group_size` completions for each of this iteration's `batch` prompts."""
        o = self.opts
        start = (it * self.world + self.rank) * o.batch
        chosen = [self.prompts[self.order[(start + j) % len(self.order)]] for j in range(o.batch)]
        flat = [p for p in chosen for _ in range(o.group_size)]
        seeds = row_seeds(o.seed, it, start * o.group_size, len(flat))
        g = generate(self.policy, [p.ids for p in flat], o.max_new_tokens, o.temperature, o.top_k, o.top_p,
                     self.stop_ids, self.vocab_limit, seed=seeds, pad_id=self.pad)
        return [Episode(p, t, self.tok.decode(t), f, lp) for p, t, f, lp in zip(flat, g.tokens, g.finished, g.logprobs)]

    def _reference_ctx(self):
        if isinstance(self.reference, str):
            return disable_lora(self.policy, names=[self.reference])
        return nullcontext(self.reference)

    def _needs_reference(self) -> bool:
        return self.reference is not None and (self.kl.coef > 0 or self.opts.kl_target > 0)

    @torch.no_grad()
    def score(self, episodes: list[Episode], engine=None):
        """Rewards, behaviour/reference log-probs and values of this rank's episodes, gathered over
        ranks, and the advantages of all of them -> (RolloutBuffer, info, scores) of the global
        batch (`self.episodes`: its episodes, in global row order)."""
        engine = engine or self.engine
        seqs = [(e.prompt.ids + e.tokens, [0] * len(e.prompt.ids) + [1] * len(e.tokens)) for e in episodes]
        self.net.eval()
        with engine.autocast():
            t = score_sequences(self.net, seqs, max(len(e.tokens) for e in episodes), self.minibatch, self.pad,
                                self.device, self.uses_value, self._reference_ctx if self._needs_reference() else None)
        self.net.train()
        t["scores"] = self.reward(episodes).to(self.device).float()                           # (N,)
        t = gather_padded(t, self.world, self.device)          # every rank: the global batch (N_all, L_all)
        self.episodes = gather_rows(episodes, self.world)
        seqs = gather_rows(seqs, self.world)
        N, old, ref, scores = len(seqs), t["old"], t["ref"], t["scores"]
        lengths = torch.tensor([len(e.tokens) for e in self.episodes], device=self.device)
        mask = (torch.arange(old.shape[1], device=self.device)[None, :] < lengths[:, None]).float()  # (N, L)
        tensors, info = self.advantages(scores, old, ref, t["values"], mask)
        kl = ((old - ref) * mask).sum(1).mean().item() if ref is not None else 0.0
        info.update(reward_mean=scores.mean().item(), reward_std=scores.std().item() if N > 1 else 0.0,
                    kl=kl, kl_coef=self.kl.coef, entropy=masked_mean(t["ent"], mask).item(),
                    response_len=lengths.float().mean().item(),
                    finished=sum(e.finished for e in self.episodes) / N, response_tokens=int(lengths.sum()))
        self.kl.update(kl, N)
        buf = RolloutBuffer(seqs, mask, old_logp=old, ref_logp=ref, **tensors)
        return buf, info, scores

    # ---- update --------------------------------------------------------------------------------
    def update(self, engine, buf: RolloutBuffer, it: int) -> dict:
        """`epochs` passes of shuffled minibatches, each one optimizer step of the engine."""
        gen = torch.Generator().manual_seed(self.opts.seed * 7919 + it)
        sums: dict = {}
        n = 0
        for _ in range(self.opts.ppo_epochs):
            for idx in buf.minibatches(self.minibatch, gen):     # this rank trains on its slice of each
                share = idx.tensor_split(self.world)[self.rank]
                m = engine.train_step([buf.gather(share, self.pad, self.device)])
                m["skipped"] = float(not m.pop("finite"))
                n += 1
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v
                if self.opts.max_kl > 0 and m.get("approx_kl", 0.0) > self.opts.max_kl:
                    return {**{k: v / n for k, v in sums.items()}, "updates": n, "early_stop": 1}
        return {**{k: v / max(n, 1) for k, v in sums.items()}, "updates": n, "early_stop": 0}

    def _policy_terms(self, model, mb, values: bool):
        logp, v, ent = model(mb["batch"], values=values, entropy=self.opts.ent_coef > 0 if values else False)
        ones = torch.ones_like(logp)
        pg, clip_frac, approx_kl = ppo_policy_loss(logp, mb["old_logp"], mb["advantages"], ones, self.opts.clip)
        metrics = {"policy_loss": pg.detach(), "clip_frac": clip_frac, "approx_kl": approx_kl,
                   "tokens": mb["batch"].n_tokens}
        loss = pg
        if ent is not None:
            loss = loss - self.opts.ent_coef * ent.mean()
        return loss, logp, v, metrics

    # ---- the protocol ---------------------------------------------------------------------------
    def iteration(self, engine, it: int) -> dict:
        t0 = synced_clock(self.device)
        episodes = self.rollout(it)
        t1 = synced_clock(self.device)
        buf, info, scores = self.score(episodes, engine)
        t2 = synced_clock(self.device)
        stats = self.update(engine, buf, it)
        t3 = synced_clock(self.device)
        if self.rank == 0 and self.opts.samples:
            engine.write_samples([{"step": it + 1, "prompt": e.prompt.text, "completion": e.text, "reward": r}
                                  for e, r in list(zip(self.episodes, scores.tolist()))[:self.opts.samples]])
        return {"iteration": it + 1, **info, **stats, "time_generate": t1 - t0, "time_score": t2 - t1,
                "time_train": t3 - t2}

    def progress(self, last: dict) -> dict:
        return {"reward": f"{last['reward_mean']:.3f}", "kl": f"{last['kl']:.3f}"}

    def summary(self, last: dict) -> str:
        return (f"iteration {last['iteration']}: reward {last['reward_mean']:.4f}, kl {last['kl']:.4f} "
                f"-> {self.opts.out}")

    def save(self, final: bool) -> None:
        if self.rank != 0:
            return
        o = self.opts
        meta = {"stage": self.kind, **template_record(self.template), **self.artifact_metadata(),
                "stacked_on": json.dumps([str(p) for p, _ in lora_specs(o)])}
        if isinstance(self.reference, str):
            save_adapter(self.policy, o.out, self.reference, meta)
        else:
            save_model(o.out, self.policy, self.tok, meta)
        if self.value is not None and self.value.backbone is None:
            save_tensors(self.run_dir / "value_head.safetensors", dict(self.value.head.state_dict()))
        elif self.value is not None:   # its own backbone was trained too: keep all of it
            save_value_network(self.run_dir / VALUE_FILE, self.value, self.tok, meta)
        if final:
            self.log(f"saved {o.out}")


class PPOTrainer(RLTrainer):
    """PPO with a value head, per-token KL penalty in the reward, GAE and clipped losses.
    `value`: a ValueNetwork (default: a fresh head shared with the policy backbone)."""

    Options = PPOOptions
    name = kind = "ppo"
    uses_value = True

    def _value_path(self):
        return self.opts.value_model

    def _setup_value(self, run) -> None:
        if self.value is None and self.opts.value_model:
            vmodel, vtok = load_model_and_tokenizer(self.opts.value_model, device=run.device)
            if vtok.to_json() != self.tok.to_json():
                raise UserError("the value model's tokenizer differs from the policy's", self.opts.value_model,
                                "use a value model with the same tokenizer")
            vmodel.set_dropout(0.0)
            self.value = ValueNetwork(vmodel.config.n_embd, vmodel.requires_grad_(True).train())
        if self.value is None:
            self.value = ValueNetwork(self.policy.config.n_embd)
        self.value.to(run.device)

    def advantages(self, scores, old, ref, values, mask):
        o, N = self.opts, mask.shape[0]
        kl_tok = kl_penalty(old, ref, o.kl_kind) * mask if ref is not None else torch.zeros_like(mask)
        rewards = -self.kl.coef * kl_tok                                                     # (N, L)
        last = mask.sum(1).long() - 1                                                        # (N,)
        rewards[torch.arange(N, device=mask.device), last] += scores   # score at the last response token
        adv, ret = gae(rewards, values, mask, o.gamma, o.lam)
        if o.whiten:
            adv = masked_whiten(adv, mask)
        ev = explained_variance(values, ret, mask).item()
        return {"advantages": adv, "returns": ret, "values": values}, {"explained_var": ev}

    def loss_step(self, model, mb):
        loss, logp, v, metrics = self._policy_terms(model, mb, values=True)
        vf, vf_clip = ppo_value_loss(v, mb["values"], mb["returns"], torch.ones_like(v), self.opts.vf_clip)
        loss = loss + self.opts.vf_coef * vf
        n = logp.numel()
        return loss * n, n, {**metrics, "value_loss": vf.detach(), "value_clip_frac": vf_clip}


class GRPOTrainer(RLTrainer):
    """GRPO / RLOO: group-relative advantages over `group_size` completions per prompt, no value
    network, optional k3 KL to the reference in the loss."""

    Options = GRPOOptions
    name = kind = "grpo"

    def resume_key(self) -> dict:
        return {**super().resume_key(), "loss_type": self.opts.loss_type, "clip": list(self.clip_range()),
                "scale_rewards": self.reward_scale()}

    def reward_scale(self) -> str:
        """--scale-rewards, else none for --no-std and dr_grpo, else group."""
        o = self.opts
        if o.scale_rewards:
            return o.scale_rewards
        return "none" if not o.normalize_std or o.loss_type == "dr_grpo" else "group"

    def clip_range(self) -> tuple[float, float]:
        """(epsilon_low, epsilon_high): given, else --clip (GSPO: the paper's 3e-4, 4e-4)."""
        o, gspo = self.opts, self.opts.loss_type == "gspo"
        low = o.epsilon_low if o.epsilon_low is not None else (3e-4 if gspo else o.clip)
        high = o.epsilon_high if o.epsilon_high is not None else (4e-4 if gspo and o.epsilon_low is None else low)
        return low, high

    def advantages(self, scores, old, ref, values, mask):
        o = self.opts
        adv = group_advantages(scores, o.group_size, o.normalize_std, o.rloo, scale=self.reward_scale())   # (N,)
        solved = (scores.view(-1, o.group_size).std(1) == 0).float().mean().item()
        return {"advantages": adv[:, None] * mask}, {"zero_std_groups": solved}

    def loss_step(self, model, mb):
        o, b = self.opts, mb["batch"]
        logp, _, _ = model(b, values=False)                                                   # (M,)
        pg, clip_frac, approx_kl = grpo_policy_loss(logp, mb["old_logp"], mb["advantages"], b.seq, b.n_seqs,
                                                    o.loss_type, *self.clip_range(), o.max_new_tokens)
        metrics = {"policy_loss": pg.detach(), "clip_frac": clip_frac, "approx_kl": approx_kl, "tokens": b.n_tokens}
        loss = pg
        if mb["ref_logp"] is not None and self.kl.coef > 0:
            kl = aggregate_tokens(kl_penalty(logp, mb["ref_logp"], "k3"), b.seq, b.n_seqs, o.loss_type,
                                  o.max_new_tokens)
            loss = loss + self.kl.coef * kl
            metrics["kl_loss"] = kl.detach()
        n = loss_units(o.loss_type, logp.numel(), b.n_seqs)    # the units the loss is a mean over
        return loss * n, n, metrics
