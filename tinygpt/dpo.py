"""Preference optimisation without a reward model: DPO (and IPO, hinge, robust, SimPO), ORPO, KTO.

Design choices:
- One trainer, three small loss steps. `PreferenceTrainer` owns the model set-up, the reference
  and the data; `DPOTrainer`, `ORPOTrainer` and `KTOTrainer` only say how summed log-probs become
  a loss (the formulas themselves live in `losses.py`). The engine does the rest.
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
- Defaults follow the published recipes (beta 0.1, lr 5e-6 with LoRA, 1e-6 full, one epoch);
  very small models learn faster with larger learning rates, which the caller passes.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import load_tensors, save_model, save_tensors
from .errors import UserError
from .logprobs import LogProbModel, sequence_logprobs
from .lora import apply_lora, disable_lora, merge_and_unload, save_adapter
from .losses import DPO_LOSS_TYPES, dpo_loss, kto_loss, orpo_loss, simpo_loss
from .preference import ItemBatches, cache_key, split_items
from .train.engine import Engine, run_dir_for

NEW = "default"                       # name of the adapter being trained
DPO_LOSSES = DPO_LOSS_TYPES + ("simpo",)


@dataclass
class PreferenceConfig:
    method: str = "dpo"               # dpo | orpo | kto
    loss: str = "sigmoid"             # dpo only: sigmoid | ipo | hinge | robust | simpo
    beta: float | None = None         # None: 0.1 (dpo, kto), 2.0 (simpo)
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    orpo_lambda: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    full: bool = False
    precompute_ref: bool = False
    pack: bool = True
    pack_rows: int = 0                # > 0: batches fill this many rows of max_length (static shapes)
    max_length: int = 1024            # row length when packing by token budget
    epochs: float = 1.0               # used when tcfg.steps is 0

    def resolved_beta(self) -> float:
        return self.beta if self.beta is not None else (2.0 if self.loss == "simpo" else 0.1)


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


class PreferenceTrainer:
    """Shared set-up: policy (fresh LoRA or full), reference, batches, engine, saving.
    Subclasses set `kind` ("pair" or "kto"), `needs_ref`, and implement `loss(...)`."""

    kind = "pair"

    def __init__(self, model, tokenizer, items, cfg: PreferenceConfig, tcfg, out, val_items=(),
                 device=None, rank: int = 0, world: int = 1, log=print, ref_key=()):
        self.cfg, self.tcfg, self.tok, self.out, self.log = cfg, tcfg, tokenizer, Path(out), log
        self.check(cfg)
        self.items, self.val_items = items, list(val_items)
        self.device = device or next(model.parameters()).device
        self.rank, self.world = rank, world
        self.beta = cfg.resolved_beta()
        self.gpt = model.to(self.device)
        self.ref_model = None
        if cfg.full:
            merge_and_unload(self.gpt)            # input adapters become part of the weights
            for p in self.gpt.parameters():
                p.requires_grad_(True)
            if self.needs_ref:
                self.ref_model = copy.deepcopy(self.gpt).eval().requires_grad_(False)
        else:
            torch.manual_seed(tcfg.seed)          # the adapter's random A is part of the run's seed
            n = apply_lora(self.gpt, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, name=NEW)
            log(f"training a rank-{cfg.lora_rank} LoRA adapter ({n / 1e6:.2f}M parameters) on top of the loaded model")
        self.scorer = LogProbModel(self.gpt)
        if tcfg.compile:   # the loss step has data-dependent Python; compile the blocks instead
            for block in self.gpt.model.layers:
                block.compile()
            tcfg.compile = False
        pad = tokenizer.pad_id or 0
        self.batches = ItemBatches(items, self.kind, tcfg.batch, tcfg.seed, self.device, pad, cfg.pack,
                                   cfg.max_length if cfg.pack_rows else None, rank, world, cfg.pack_rows)
        if tcfg.steps == 0:
            tcfg.steps = max(1, round(cfg.epochs * self.batches.per_epoch / (tcfg.accum * world)))
        tcfg.warmup = min(tcfg.warmup, tcfg.steps)
        for p in self.gpt.parameters():   # trained weights stay float32 even on a bf16 base
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        tcfg.resume_key = {**tcfg.resume_key, "method": cfg.method, "loss": cfg.loss, "beta": self.beta,
                           "batch": tcfg.batch, "accum": tcfg.accum, "world": world, "full": cfg.full,
                           "data": cache_key(items)}
        self.engine = Engine(self.scorer, tcfg, self.loss_step, self.batches, out, self.save,
                             self.validate if self.val_items else None, self.device, rank, world, log)
        self.ref_table = self.val_ref_table = None
        if cfg.precompute_ref and self.needs_ref:
            self.ref_table = self._load_or_compute_ref(ref_key, self.items, self.batches)
            if self.val_items:   # validation needs the reference too, and the copy is about to go
                self.val_ref_table = self._load_or_compute_ref(ref_key, self.val_items,
                                                               self._eval_batches(self.val_items))
            if self.ref_model is not None:
                self.ref_model = None             # the copy is no longer needed: free its memory

    needs_ref = True

    def check(self, cfg) -> None:
        """Reject settings this method cannot use (before any work is done)."""

    # ---- reference ------------------------------------------------------------------------------
    def _ref_context(self):
        return nullcontext() if self.cfg.full else disable_lora(self.gpt, names=[NEW])

    @torch.no_grad()
    def reference(self, tbs, ids, live: bool = False, table=None):
        """Reference summed log-probs of the batch's two member groups: ((B,), (B,)), looked up
        in `table` (default: the training items' precomputed table) unless `live`."""
        table = self.ref_table if table is None else table
        if table is not None and not live:
            t = table[ids]                                               # (B, 2)
            return t[:, 0], t[:, 1]
        if self.cfg.full and self.ref_model is None:
            raise RuntimeError("the frozen reference copy was freed after precomputing its log-probs; "
                               "only the precomputed items have a reference")
        model = self.ref_model if self.ref_model is not None else self.scorer
        with self._ref_context():
            sums = torch.cat([sequence_logprobs(model, tb)[0] for tb in tbs])   # (2B,)
        B = len(ids)
        return sums[:B], sums[B:]

    def _load_or_compute_ref(self, ref_key, items, batches) -> torch.Tensor:
        """Reference log-probs (len(items), 2) of `items`, row = item id, cached by content key."""
        key = cache_key(items, self.kind, ref_key, self.engine.dtype, self.cfg.full, self.cfg.pack)
        path = run_dir_for(self.out) / f"ref-logps-{key}.safetensors"
        if path.exists():
            self.log(f"reusing cached reference log-probs {path}")
            return load_tensors(path, self.device)[0]["ref"]
        self.log(f"computing reference log-probs for {len(items)} items")
        table = torch.zeros(len(items), 2, device=self.device)
        with self.engine.autocast():
            for tbs, ids in batches.fixed():
                table[ids] = torch.stack(self.reference(tbs, ids, live=True), dim=1).float()   # (B, 2)
        if self.rank == 0:
            save_tensors(path, {"ref": table}, {"key": key, "items": len(items)})
        return table

    def _eval_batches(self, items) -> ItemBatches:
        return ItemBatches(items, self.kind, self.tcfg.batch, 0, self.device, self.tok.pad_id or 0, self.cfg.pack)

    # ---- the loss step ---------------------------------------------------------------------------
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

    # ---- validation, saving, running ------------------------------------------------------------
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
        with self.engine.autocast():
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
        if self.cfg.full:
            save_model(self.out, self.gpt, self.tok, {"stage": self.cfg.method})
        else:
            save_adapter(self.gpt, self.out, NEW, {"stage": self.cfg.method})

    def fit(self) -> dict:
        last = self.engine.fit()
        if self.rank == 0:
            self.log(f"saved {self.out}")
        return last


class DPOTrainer(PreferenceTrainer):
    """DPO and its variants (`cfg.loss`: sigmoid, ipo, hinge, robust, simpo)."""

    def check(self, cfg) -> None:
        if cfg.loss not in DPO_LOSSES:
            raise UserError(f"unknown --loss {cfg.loss!r}", None, f"choose one of {', '.join(DPO_LOSSES)}")

    @property
    def needs_ref(self) -> bool:
        return self.cfg.loss != "simpo"     # SimPO is reference-free

    def loss(self, model, pi, n, ref, tbs, ids):
        B = len(ids)
        return compute_dpo_loss(pi[:B], pi[B:], ref[0], ref[1], n[:B], n[B:], self.beta, self.cfg.loss,
                                self.cfg.label_smoothing, self.cfg.simpo_gamma)


class ORPOTrainer(PreferenceTrainer):
    """ORPO: SFT loss on the chosen reply plus an odds-ratio penalty; no reference model."""

    needs_ref = False

    def loss(self, model, pi, n, ref, tbs, ids):
        B = len(ids)
        loss, rc, rr = orpo_loss(pi[:B], pi[B:], n[:B], n[B:], lam=self.cfg.orpo_lambda)
        return loss, pair_metrics(rc, rr, pi[:B], pi[B:])


class KTOTrainer(PreferenceTrainer):
    """KTO over unpaired completions; the KL reference point comes from each item's mismatched
    prompt/completion partner (policy and reference, no gradient), averaged over ranks."""

    kind = "kto"

    def __init__(self, model, tokenizer, items, *args, **kwargs):
        self.labels = torch.tensor([it[2] for it in items], dtype=torch.bool)
        super().__init__(model, tokenizer, items, *args, **kwargs)
        self.labels = self.labels.to(self.device)

    def loss(self, model, pi, n, ref, tbs, ids):
        with torch.no_grad():
            kl_pi = sequence_logprobs(_unwrap(model), tbs[1])[0]        # (B,)
            d = (kl_pi - ref[1]).mean()
            if self.world > 1:
                dist.all_reduce(d)
                d = d / self.world
        labels = self.labels[ids]                                        # (B,) desirable?
        loss, rewards, z0 = kto_loss(pi, ref[0], labels, d.view(1), torch.zeros(1, device=d.device), self.beta,
                                     self.cfg.desirable_weight, self.cfg.undesirable_weight)
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


TRAINERS = {"dpo": DPOTrainer, "orpo": ORPOTrainer, "kto": KTOTrainer}


# ---- the command-line entry point -------------------------------------------------------------
@dataclass
class PreferenceArgs:
    model: str
    data: str
    out: str
    lora: tuple = ()                  # (path, weight) adapters stacked under the trained one
    template: str | None = None
    format: str | None = None
    skip_bad_rows: bool = False
    max_length: int = 1024
    max_prompt_length: int = 512
    val_split: float = 0.0
    epochs: float | None = None       # used when tcfg.steps is 0 (default: one epoch)
    device: str = "auto"
    grad_checkpointing: bool = False  # recompute block activations in backward (less memory)


def train_preference(args: PreferenceArgs, cfg: PreferenceConfig, tcfg, log=print) -> dict:
    """Load model + data, train with cfg.method, write args.out (.lora, or .tinygpt with --full)."""
    from .data.formats import load_preferences, load_unpaired
    from .preference import file_digest, load_stage, prepare_template, tokenize_pairs, tokenize_unpaired
    if cfg.method not in TRAINERS:
        raise UserError(f"unknown preference method {cfg.method!r}")
    device, rank, world, model, tok = load_stage(args)
    max_length = min(args.max_length, model.config.block_size)
    template, added = prepare_template(tok, args.template, allow_new_tokens=cfg.full)
    if added:
        model.resize_token_embeddings(max(tok.vocab_size, model.config.vocab_size))
    max_prompt = min(args.max_prompt_length, max_length - 1)
    if cfg.method == "kto":
        records, skipped = load_unpaired(args.data, args.format, args.skip_bad_rows)
        items, dropped = tokenize_unpaired(records, tok, template, max_length, max_prompt, tcfg.seed), 0
    else:
        records, skipped = load_preferences(args.data, args.format, args.skip_bad_rows)
        items, dropped = tokenize_pairs(records, tok, template, max_length, max_prompt)
    log(f"{len(items)} examples from {args.data} ({skipped} rows skipped, {dropped} identical after truncation)")
    train, val = split_items(items, args.val_split, tcfg.seed)
    cfg.max_length, cfg.epochs = max_length, args.epochs or 1.0
    ref_key = (file_digest(args.model) if Path(args.model).is_file() else args.model,
               [(file_digest(p), w) for p, w in args.lora], max_length)
    trainer = TRAINERS[cfg.method](model, tok, train, cfg, tcfg, args.out, val, device, rank, world, log, ref_key)
    return trainer.fit()
