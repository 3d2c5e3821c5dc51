"""Preference optimisation without a reward model: DPO (and IPO, hinge, robust, SimPO), ORPO, KTO.

Design choices:
- One stage, three small losses. `PreferenceTrainer` owns the set-up (policy, reference, data);
  `DPOTrainer`, `ORPOTrainer` and `KTOTrainer` only say how summed log-probs become a loss (the
  formulas themselves live in `losses.py`). The engine does the rest.
- The policy is the loaded model (base + any `--lora` adapters, frozen) plus ONE fresh adapter
  named `default`, the only trainable weights. The reference is the same model with that adapter
  switched off (`disable_lora(names=[...])`): base + SFT, no second copy in memory. `--full`
  trains every weight instead (input adapters merged first) against a frozen copy.
- `--precompute-ref`: reference log-probs of every training item are computed once before
  training and cached in the run folder as safetensors, keyed by a hash of the tokenized data,
  the model files and the settings; a later run with the same key reuses them. A cached
  reference equals the live one (same passes, same batches of items, same dtype).
- Chosen and rejected go through ONE forward (packed rows, block-diagonal attention), and
  log-probs come from hidden states in chunks (`logprobs.py`), never as full (N, V) logits.
- Metrics per step: rewards/chosen, rewards/rejected, rewards/margin, rewards/accuracy,
  logps/chosen, logps/rejected (sums over response tokens), as metrics.jsonl columns.
- Defaults follow the published recipes (beta 0.1, lr 5e-6 with LoRA, 1e-6 full, one epoch) at
  width 2048; narrower models get the rate scaled by 2048 / width (`common.default_lr`).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..checkpoint import save_model
from ..data.pairs import ItemBatches, cache_key, load_items
from ..device import autocast
from ..errors import UserError
from ..io import load_tensors, save_tensors
from ..logprobs import LogProbModel, sequence_logprobs
from ..lora import disable_lora, save_adapter
from ..losses import DPO_LOSS_TYPES, dpo_loss, kto_loss, orpo_loss, simpo_loss
from ..options import above, at_least, between, option
from ..train.engine import run_dir_for
from ..train.stage import AUTO_VAL_EVERY, Stage, TrainOptions
from .common import (
    CheckpointingOptions,
    LoRAOptions,
    ModelOptions,
    PairDataOptions,
    check_inputs,
    check_out,
    compile_blocks,
    default_lr,
    epochs_to_steps,
    load_opts_model,
    lora_specs,
    make_trainable,
    reference_for,
    resolve_plan,
    resolve_template,
    split_items,
    template_record,
    template_tokens,
    weights_key,
)

NEW = "default"                       # name of the adapter being trained
DPO_LOSSES = DPO_LOSS_TYPES + ("simpo",)


@dataclass
class PreferenceOptions(ModelOptions, PairDataOptions, LoRAOptions, CheckpointingOptions, TrainOptions):
    """Options the DPO family, ORPO and KTO share."""

    group = "preference"
    steps: int | None = option(None, "optimizer steps", auto="--epochs", check=at_least(1))
    weight_decay: float = option(0.0, "AdamW weight decay (matrices only)", check=at_least(0))
    val_every: int | None = option(None, "validation every N steps", auto=AUTO_VAL_EVERY,
                                   check=at_least(0))


@dataclass
class DPOOptions(PreferenceOptions):
    command = "dpo"
    loss: str = option("sigmoid", "DPO variant", choices=DPO_LOSSES)
    beta: float | None = option(None, "strength of the KL-like regulariser", auto="0.1 (2.0 for simpo)",
                                check=above(0))
    label_smoothing: float = option(0.0, "assumed label noise (sigmoid, robust, simpo)", check=between(0, 0.5))
    simpo_gamma: float = option(0.5, "SimPO target reward margin", check=at_least(0))
    lr: float | None = option(None, "peak learning rate", auto="5e-6 (1e-6 with --full) x 2048/width",
                              check=between(0, 1, lo_open=True))
    pack_rows: int = option(0, "fill this many rows of --max-length per micro-batch with as many pairs as fit "
                            "(static shapes; --batch then ignored)", check=at_least(0))
    precompute_ref: bool = option(False, "compute reference log-probs once and cache them in the run folder")

    def check(self) -> None:
        if self.loss == "robust" and self.label_smoothing == 0.5:
            raise UserError("--label-smoothing must be below 0.5 for --loss robust")
        super().check()


@dataclass
class ORPOOptions(PreferenceOptions):
    command = "orpo"
    orpo_lambda: float = option(0.1, "weight of the odds-ratio term (TRL calls it beta)", flag="--lambda",
                                aliases=("--beta",), check=at_least(0))
    lr: float | None = option(None, "peak learning rate", auto="8e-6 x 2048/width",
                              check=between(0, 1, lo_open=True))
    pack_rows: int = option(0, "fill this many rows of --max-length per micro-batch with as many pairs as fit "
                            "(static shapes; --batch then ignored)", check=at_least(0))


@dataclass
class KTOOptions(PreferenceOptions):
    command = "kto"
    beta: float | None = option(0.1, "strength of the KL-like regulariser", check=above(0))
    desirable_weight: float = option(1.0, "weight of desirable completions", check=above(0))
    undesirable_weight: float = option(1.0, "weight of undesirable completions", check=above(0))
    lr: float | None = option(None, "peak learning rate", auto="5e-6 x 2048/width",
                              check=between(0, 1, lo_open=True))
    precompute_ref: bool = option(False, "compute reference log-probs once and cache them in the run folder")


def compute_dpo_loss(pi_c, pi_r, ref_c, ref_r, n_c, n_r, beta: float = 0.1, loss_type: str = "sigmoid",
                     label_smoothing: float = 0.0, simpo_gamma: float = 0.5):
    """DPO-family loss from summed response log-probs (B,) and response lengths (B,).
    ref_* are ignored by SimPO (reference-free). Returns (loss (B,), metrics dict of scalars)."""
    if loss_type == "simpo":
        loss, rc, rr = simpo_loss(pi_c, pi_r, n_c, n_r, beta, simpo_gamma, label_smoothing)
    else:
        loss, rc, rr = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, loss_type, label_smoothing, n_c, n_r)
    return loss, pair_metrics(rc, rr, pi_c, pi_r)


def pair_metrics(rc, rr, pi_c, pi_r) -> dict:
    return {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(), "rewards/margin": (rc - rr).mean(),
            "rewards/accuracy": (rc > rr).float().mean(), "logps/chosen": pi_c.detach().mean(),
            "logps/rejected": pi_r.detach().mean()}


def _unwrap(model):
    return getattr(model, "module", model)


class PreferenceTrainer(Stage):
    """Shared set-up: policy (fresh LoRA or full), reference, batches, saving. Subclasses set
    `kind` ("pair" or "kto"), `needs_ref`, `beta`, and implement `loss(...)`.

    DPOTrainer(DPOOptions(model="base.tinygpt", lora=["sft.lora"], data="prefs.jsonl", out="dpo.lora")).train()
    `model`/`tokenizer` may be given loaded (adapters in `options.lora` are then only recorded), and
    `items`/`val_items` already tokenized (`data.pairs.tokenize_pairs` / `tokenize_unpaired`)."""

    kind = "pair"
    needs_ref = True
    compile_step = False              # data-dependent Python around the model: the blocks are compiled

    def __init__(self, options, model=None, tokenizer=None, items=None, val_items=(), log=None):
        super().__init__(options, log)
        self.gpt, self.tok = model, tokenizer
        self.items, self.val_items = items, list(val_items)

    @property
    def beta(self) -> float:
        return self.opts.beta

    # ---- set-up ---------------------------------------------------------------------------------
    def setup(self, run) -> None:
        o = self.opts
        check_out(o.out, o.full)
        self.device, self.rank, self.world, self.dtype = run.device, run.rank, run.world, run.dtype
        if self.gpt is None:
            check_inputs(o, ("--data", o.data))
            self.gpt, self.tok = load_opts_model(o)
        self.gpt.grad_checkpointing = o.grad_checkpointing
        self.gpt.set_dropout(0.0)        # policy and reference log-probs must not be noisy (TRL does the same)
        self.template = resolve_template(o.template, self.tok, o.model, lora_specs(o))
        template_tokens(self.gpt, self.tok, self.template, may_add=o.full, where=f"--template {self.template.name}")
        max_length = min(o.max_length, self.gpt.config.block_size)
        if self.items is None:
            items, n = load_items(o.data, self.kind, self.tok, self.template, o.format, o.skip_bad_rows, max_length,
                                  min(o.max_prompt_length, max_length - 1), o.seed, o.strict)
            run.log(f"{len(items)} examples from {o.data} ({n['skipped']} rows skipped, {n['dropped']} identical "
                    "after truncation)")
            self.items, self.val_items = split_items(items, o.val_split, o.seed)
        self.gpt.to(run.device)
        ref_key = self._reference_key(max_length) if getattr(o, "precompute_ref", False) else None
        count = make_trainable(self.gpt, o, NEW)
        if not o.full:
            run.log(f"training a rank-{o.lora_rank} LoRA adapter ({count / 1e6:.2f}M parameters) on top of the "
                    "loaded model")
        self.ref_model = reference_for(self.gpt, o.full, NEW) if o.full and self.needs_ref else None
        self.model = self.scorer = LogProbModel(self.gpt)
        if o.compile:
            compile_blocks(self.gpt)
        pack_rows = getattr(o, "pack_rows", 0)
        self.batches = ItemBatches(self.items, self.kind, o.batch, o.seed, run.device, self.tok.pad_id or 0, o.packing,
                                   max_length if pack_rows else None, run.rank, run.world, pack_rows)
        steps = o.steps or epochs_to_steps(o.epochs or 1.0, self.batches.per_epoch, o.accum * run.world)
        lr = default_lr(o, self.base_lr[1] if o.full else self.base_lr[0], self.gpt, run.log)
        self.plan = resolve_plan(o, steps, lr=lr, validates=bool(self.val_items))
        self._key = {"method": o.command, "loss": getattr(o, "loss", None), "beta": self.beta, "batch": o.batch,
                     "micro_batches_per_step": o.accum * run.world, "full": o.full, "data": cache_key(self.items)}
        self.ref_table = self.val_ref_table = None
        if ref_key is not None and self.needs_ref:
            self.ref_table = self._load_or_compute_ref(ref_key, self.items, self.batches)
            if self.val_items:   # validation needs the reference too, and the copy is about to go
                self.val_ref_table = self._load_or_compute_ref(ref_key, self.val_items,
                                                               self._eval_batches(self.val_items))
            self.ref_model = None                 # the copy is no longer needed: free its memory

    def resume_key(self) -> dict:
        return self._key

    def _reference_key(self, max_length: int):
        """What the reference log-probs depend on besides the items: the model files' bytes (or, for a
        model given in memory, its weights) and the row length."""
        return weights_key(self.opts.model, lora_specs(self.opts), self.gpt), max_length

    # ---- reference ------------------------------------------------------------------------------
    def _ref_context(self):
        return nullcontext() if self.opts.full else disable_lora(self.gpt, names=[NEW])

    @torch.no_grad()
    def reference(self, tbs, ids, live: bool = False, table=None):
        """Reference summed log-probs of the batch's two member groups: ((B,), (B,)), looked up
        in `table` (default: the training items' precomputed table) unless `live`."""
        table = self.ref_table if table is None else table
        if table is not None and not live:
            t = table[ids]                                               # (B, 2)
            return t[:, 0], t[:, 1]
        if self.opts.full and self.ref_model is None:
            raise RuntimeError("the frozen reference copy was freed after precomputing its log-probs; "
                               "only the precomputed items have a reference")
        model = self.ref_model if self.ref_model is not None else self.scorer
        with self._ref_context():
            sums = torch.cat([sequence_logprobs(model, tb)[0] for tb in tbs])   # (2B,)
        B = len(ids)
        return sums[:B], sums[B:]

    def _load_or_compute_ref(self, ref_key, items, batches) -> torch.Tensor:
        """Reference log-probs (len(items), 2) of `items`, row = item id, cached by content key."""
        key = cache_key(items, self.kind, ref_key, self.dtype, self.opts.full, self.opts.packing)
        path = run_dir_for(self.opts.out) / f"ref-logps-{key}.safetensors"
        if path.exists():
            self.log(f"reusing cached reference log-probs {path}")
            return load_tensors(path, self.device)[0]["ref"]
        self.log(f"computing reference log-probs for {len(items)} items")
        table = torch.zeros(len(items), 2, device=self.device)
        with autocast(self.device, self.dtype):
            for tbs, ids in batches.fixed():
                table[ids] = torch.stack(self.reference(tbs, ids, live=True), dim=1).float()   # (B, 2)
        if self.rank == 0:
            save_tensors(path, {"ref": table}, {"key": key, "items": len(items)})
        return table

    def _eval_batches(self, items) -> ItemBatches:
        return ItemBatches(items, self.kind, self.opts.batch, 0, self.device, self.tok.pad_id or 0, self.opts.packing)

    # ---- the loss step ---------------------------------------------------------------------------
    def batch(self, i: int):
        return self.batches(i)

    def loss_step(self, model, batch):
        tbs, ids = batch
        B = len(ids)
        pi, n, _ = sequence_logprobs(model, tbs[0])                     # (2B,) or (B,): policy, with grad
        ref = self.reference(tbs, ids) if self.needs_ref else (None, None)
        loss, metrics = self.loss(model, pi, n, ref, tbs, ids)
        metrics["tokens"] = sum(tb.n_tokens for tb in tbs)
        return loss.sum(), B, metrics

    def loss(self, model, pi, n, ref, tbs, ids):
        raise NotImplementedError

    # ---- validation, saving ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, items=None) -> dict:
        """Mean loss, reward margin (chosen minus rejected, or desirable minus undesirable) and
        pairwise accuracy over held-out items (default: the validation split)."""
        items = self.val_items if items is None else items
        evals = self._eval_batches(items)
        table = self.val_ref_table if items is self.val_items else None
        was = self.scorer.training
        self.scorer.eval()
        tot: dict = {}
        with autocast(self.device, self.dtype):
            for tbs, ids in evals.fixed():
                pi, n, _ = sequence_logprobs(self.scorer, tbs[0])
                ref = self.reference(tbs, ids, live=table is None, table=table) if self.needs_ref else (None, None)
                loss, m = self.loss(self.scorer, pi, n, ref, tbs, ids)
                for k, v in (("loss", loss.sum()), ("margin", m["rewards/margin"] * len(ids)),
                             ("accuracy", m["rewards/accuracy"] * len(ids))):
                    tot[k] = tot.get(k, 0.0) + float(v)
        self.scorer.train(was)
        return {f"val_{k}": v / len(items) for k, v in tot.items()}

    def validate(self, _model) -> dict:
        return self.evaluate()

    def save(self, final: bool) -> None:
        meta = {"stage": self.opts.command, **template_record(self.template), **self.artifact_metadata()}
        if self.opts.full:
            save_model(self.opts.out, self.gpt, self.tok, meta)
        else:
            save_adapter(self.gpt, self.opts.out, NEW, meta)
        if final and self.rank == 0:
            self.log(f"saved {self.opts.out}")


class DPOTrainer(PreferenceTrainer):
    """DPO and its variants (`--loss`: sigmoid, ipo, hinge, robust, simpo)."""

    Options = DPOOptions
    name = "dpo"
    base_lr = (5e-6, 1e-6)             # LoRA, --full: at width 2048 (see common.default_lr)

    @property
    def needs_ref(self) -> bool:
        return self.opts.loss != "simpo"     # SimPO is reference-free

    @property
    def beta(self) -> float:
        return self.opts.beta if self.opts.beta is not None else (2.0 if self.opts.loss == "simpo" else 0.1)

    def loss(self, model, pi, n, ref, tbs, ids):
        B, o = len(ids), self.opts
        return compute_dpo_loss(pi[:B], pi[B:], ref[0], ref[1], n[:B], n[B:], self.beta, o.loss,
                                o.label_smoothing, o.simpo_gamma)


class ORPOTrainer(PreferenceTrainer):
    """ORPO: SFT loss on the chosen reply plus an odds-ratio penalty; no reference model."""

    Options = ORPOOptions
    name = "orpo"
    base_lr = (8e-6, 8e-6)
    needs_ref = False
    beta = None

    def loss(self, model, pi, n, ref, tbs, ids):
        B = len(ids)
        loss, rc, rr = orpo_loss(pi[:B], pi[B:], n[:B], n[B:], lam=self.opts.orpo_lambda)
        return loss, pair_metrics(rc, rr, pi[:B], pi[B:])


class KTOTrainer(PreferenceTrainer):
    """KTO over unpaired completions; the KL reference point comes from each item's mismatched
    prompt/completion partner (policy and reference, no gradient), averaged over ranks."""

    Options = KTOOptions
    name = "kto"
    base_lr = (5e-6, 5e-6)
    kind = "kto"

    def setup(self, run) -> None:
        super().setup(run)
        self.labels = torch.tensor([it[2] for it in self.items], dtype=torch.bool, device=self.device)

    def loss(self, model, pi, n, ref, tbs, ids):
        with torch.no_grad():
            kl_pi = sequence_logprobs(_unwrap(model), tbs[1])[0]        # (B,)
            d = (kl_pi - ref[1]).mean()
            if self.world > 1:
                dist.all_reduce(d)
                d = d / self.world
        labels = self.labels[ids]                                        # (B,) desirable?
        o = self.opts
        loss, rewards, z0 = kto_loss(pi, ref[0], labels, d.view(1), torch.zeros(1, device=d.device), self.beta,
                                     o.desirable_weight, o.undesirable_weight)
        good, bad = rewards[labels], rewards[~labels]
        rc = good.mean() if len(good) else rewards.new_zeros(())
        rr = bad.mean() if len(bad) else rewards.new_zeros(())
        return loss, {"rewards/chosen": rc, "rewards/rejected": rr, "rewards/margin": rc - rr,
                      "rewards/accuracy": ((rewards > 0) == labels).float().mean(), "kl": z0,
                      "logps/chosen": pi.detach()[labels].mean() if len(good) else rc,
                      "logps/rejected": pi.detach()[~labels].mean() if len(bad) else rr}

    @torch.no_grad()
    def evaluate(self, items=None) -> dict:
        items = self.val_items if items is None else items
        saved = self.labels
        self.labels = torch.tensor([it[2] for it in items], dtype=torch.bool, device=self.device)
        try:
            return super().evaluate(items)
        finally:
            self.labels = saved
