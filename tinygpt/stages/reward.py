"""`tinygpt reward`: a reward model (a GPT backbone with a scalar head) trained on preference pairs.

The backbone (base + any `--lora` adapters merged in) is fully fine-tuned with the head, as in
the classic recipe (lr 1e-5, one epoch). Chosen and rejected of all pairs of a batch go through
ONE packed forward; the loss is -log sigmoid(r_chosen - r_rejected) (`losses.bradley_terry_loss`);
pairwise accuracy on a held-out split (`--val-split`, default 0.05) is the number to watch. The
file records the chat template, which every reader of the model then renders with.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.pairs import ItemBatches, load_items
from ..errors import UserError
from ..lora import merge_and_unload
from ..losses import bradley_terry_loss
from ..options import at_least, between, option
from ..reward_model import RewardModel
from ..train.stage import AUTO_VAL_EVERY, Stage, TrainOptions
from .common import (
    CheckpointingOptions,
    ModelOptions,
    PairDataOptions,
    check_inputs,
    check_out,
    compile_blocks,
    default_lr,
    epochs_to_steps,
    load_opts_model,
    lora_specs,
    resolve_plan,
    resolve_template,
    split_items,
    template_record,
    template_tokens,
)


@dataclass
class RewardOptions(ModelOptions, PairDataOptions, CheckpointingOptions, TrainOptions):
    """Reward model training (Bradley-Terry)."""

    command = "reward"
    group = "reward model"
    val_split: float = option(0.05, "fraction of pairs held out for validation", check=between(0, 1, hi_open=True))
    steps: int | None = option(None, "optimizer steps", auto="--epochs", check=at_least(1))
    lr: float | None = option(None, "peak learning rate", auto="1e-5 x 2048/width", check=between(0, 1, lo_open=True))
    weight_decay: float = option(0.0, "AdamW weight decay (matrices only)", check=at_least(0))
    val_every: int | None = option(None, "validation every N steps", auto=AUTO_VAL_EVERY,
                                   check=at_least(0))


def reward_loss_step(model, batch):
    """Bradley-Terry loss summed over the batch's pairs; count = pairs."""
    (tb,), ids = batch
    B = len(ids)
    r = model(tb.idx, pos=tb.pos, attn_mask=tb.attn_mask(), ends=tb.ends)    # (2B,)
    rc, rr = r[:B], r[B:]
    loss = bradley_terry_loss(rc, rr)                                      # (B,)
    rc, rr = rc.detach(), rr.detach()
    return loss.sum(), B, {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(),
                           "rewards/margin": (rc - rr).mean(), "rewards/accuracy": (rc > rr).float().mean(),
                           "tokens": tb.n_tokens}


class RewardModelTrainer(Stage):
    """Train a reward model on preference pairs and write it (`.tinygpt` with a reward head).

    RewardModelTrainer(RewardOptions(model="base.tinygpt", data="prefs.jsonl", out="rm.tinygpt")).train()
    `model` may be given loaded (a GPT backbone, or a RewardModel to continue), with `tokenizer`,
    and `items`/`val_items` as tokenized pairs (`data.pairs.tokenize_pairs`)."""

    Options = RewardOptions
    name = "reward"
    compile_step = False               # the step has data-dependent Python; the blocks are compiled
    loss_step = staticmethod(reward_loss_step)

    def __init__(self, options: RewardOptions, model=None, tokenizer=None, items=None, val_items=(), log=None):
        super().__init__(options, log)
        self.items, self.val_items = items, list(val_items)
        self.rm = model if isinstance(model, RewardModel) else None
        self.gpt, self.tok = (model.backbone if self.rm else model), tokenizer or getattr(model, "tokenizer", None)

    def setup(self, run) -> None:
        o = self.opts
        check_out(o.out)
        self.device, self.world = run.device, run.world
        if self.gpt is None:
            check_inputs(o, ("--data", o.data))
            self.gpt, self.tok = load_opts_model(o)
        merge_and_unload(self.gpt)
        self.gpt.set_dropout(0.0)        # chosen and rejected are compared: no noise between them (as TRL)
        self.template = resolve_template(o.template, self.tok, o.model, lora_specs(o))
        template_tokens(self.gpt, self.tok, self.template, may_add=True, where=f"--template {self.template.name}")
        max_length = min(o.max_length, self.gpt.config.block_size)
        if self.items is None:
            items, n = load_items(o.data, "pair", self.tok, self.template, o.format, o.skip_bad_rows, max_length,
                                  min(o.max_prompt_length, max_length - 1), strict=o.strict)
            run.log(f"{len(items)} pairs from {o.data} ({n['skipped']} rows skipped, {n['dropped']} identical after "
                    "truncation)")
            self.items, self.val_items = split_items(items, o.val_split, o.seed)
        if not self.items:
            raise UserError("no usable pairs after tokenization", o.data, "check the data file and --max-length")
        train = self.items
        if self.rm is None:
            torch.manual_seed(o.seed)
            self.rm = RewardModel(self.gpt, self.tok, self.template.name)
        self.rm.template = self.template
        self.gpt.grad_checkpointing = o.grad_checkpointing
        self.model = self.rm.to(run.device).requires_grad_(True)
        if not self.gpt.config.tie_embeddings:     # the score head replaces the LM head: no gradient reaches it
            self.gpt.lm_head.requires_grad_(False)   # (and DDP would wait for one)
        self.pad = self.tok.pad_id or 0
        self.batches = ItemBatches(train, "pair", o.batch, o.seed, run.device, self.pad, o.packing, None,
                                   run.rank, run.world)
        if o.compile:
            compile_blocks(self.gpt)
        steps = o.steps or epochs_to_steps(o.epochs or 1.0, self.batches.per_epoch, o.accum * run.world)
        self.plan = resolve_plan(o, steps, lr=default_lr(o, 1e-5, self.gpt, run.log), validates=bool(self.val_items))
        self._key = {"stage": "reward", "batch": o.batch, "micro_batches_per_step": o.accum * run.world,
                     "pairs": len(train),
                     "model": self.gpt.config.to_json(), "seed": o.seed}

    def resume_key(self) -> dict:
        return self._key

    def batch(self, i: int):
        return self.batches(i)

    @torch.no_grad()
    def evaluate(self, items=None) -> dict:
        """Held-out pairwise accuracy and mean Bradley-Terry loss."""
        items = self.val_items if items is None else items
        evals = ItemBatches(items, "pair", self.opts.batch, 0, self.device, self.pad, self.opts.packing)
        loss = correct = 0.0
        for batch in evals.fixed():
            l, B, m = reward_loss_step(self.rm, batch)
            loss += l.item()
            correct += m["rewards/accuracy"].item() * B
        return {"val_loss": loss / len(items), "val_accuracy": correct / len(items)}

    def validate(self, model) -> dict:
        return self.evaluate()

    def save(self, final: bool) -> None:
        self.rm.save(self.opts.out, {**template_record(self.template), **self.artifact_metadata()})
        if final:
            self.log(f"saved {self.opts.out}")
