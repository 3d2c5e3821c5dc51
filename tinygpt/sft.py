"""Supervised fine-tuning: chat templates, response-only loss, packing, LoRA or full weights.

Design choices:
- Data path: file rows -> `formats.load_sft` (canonical conversations) -> a chat template renders
  segments -> each segment is tokenized on its own, so the loss mask comes from segment
  boundaries (never from searching the token stream). Only assistant replies and their
  end-of-turn marker are trained. Everything is tokenized, truncated and packed ONCE before
  training; a batch is a gather of int32 rows (`data/packing.py`).
- Packing is on by default: examples are bin-packed into rows of `ctx` positions, position ids
  restart per example and attention is block-diagonal (`model.packed_mask`: FlexAttention on
  CUDA, a dense mask on CPU), so an example's loss is the same packed or alone. `packing=False`
  right-pads each batch to its longest example instead.
- Defaults follow the usual LoRA recipe: rank 16, alpha 32, lr 2e-4 (2e-5 for full weights), no
  weight decay, warmup 100 steps but at most 10% of the run, cosine decay.
- Template tokens the tokenizer lacks are added, the embeddings grow (new rows start at the mean
  of the real tokens' rows). With LoRA the rows of ALL the template's special tokens (added or
  not) are trained through `lora.TokenRows` and saved in the adapter: a model pretrained here has
  `<|im_end|>` in its vocabulary but never saw it, so its output row has nothing that predicts it,
  and a low-rank update of the blocks cannot teach the model to end a reply (the `trainable token
  indices` idea of PEFT). With `full=True` every row is an ordinary weight.
- Adapters given as `lora=[(path, weight)]` are loaded frozen under the new one (stacking): the
  new adapter file holds only what this run trained, and sampling passes both. With `full=True`
  they are merged into the weights first.
- The loss step calls `model(...)` (forward), so DDP's hooks run; the engine does the rest
  (accumulation, schedule, AMP, compile, checkpoints, resume).
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .chat import encode_segments, ensure_special_tokens, get_template
from .checkpoint import save_model
from .data.formats import Conversation, format_instruction, load_sft  # noqa: F401 (re-export)
from .data.packing import RowOrder, pack_rows, pad_examples, prepare_examples
from .errors import UserError
from .losses import token_cross_entropy
from .lora import (DEFAULT_TARGETS, apply_lora, base_fingerprint, lora_modules, merge_and_unload,
                   save_adapter, train_token_rows)
from .model import packed_mask
from .train.engine import Engine, TrainConfig, setup_device
from .train.optim import default_warmup

__all__ = ["SFTOptions", "SFTTrainer", "run_sft", "sft_loss_step", "encode_conversations",
           "format_instruction", "sft_train_config"]


@dataclass
class SFTOptions:
    format: str | None = None          # SFT row format; None detects it from the first row
    template: str | None = None        # chatml, llama3, zephyr, alpaca, raw, hf, FILE.jinja; None: auto
    ctx: int = 0                       # positions per packed row (0: the model's context)
    max_length: int = 0                # longest example in tokens (0: ctx + 1, i.e. ctx positions)
    packing: bool = True
    val_split: float = 0.0             # fraction of conversations held out for validation loss
    skip_bad_rows: bool = False
    full: bool = False                 # train every weight and write a .tinygpt
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: tuple = DEFAULT_TARGETS
    grad_checkpointing: bool = False
    epochs: float = 0.0                # > 0: the number of steps is derived from it
    device: str = "auto"
    stacked_on: list = field(default_factory=list)   # adapters loaded under this one (metadata only)


def sft_train_config(full: bool = False, **overrides) -> TrainConfig:
    """The recipe's defaults: lr 2e-4 (LoRA) or 2e-5 (full), no weight decay, warmup -1 = 100
    steps capped at 10% of the run, cosine to lr/10. steps 0 = one epoch."""
    lr = overrides.pop("lr", 2e-5 if full else 2e-4)
    base = dict(steps=0, batch=8, lr=lr, min_lr=lr / 10, warmup=-1, weight_decay=0.0)
    return TrainConfig(**{**base, **overrides})


def sft_loss_step(model, batch):
    """Summed cross-entropy over trained tokens; count = trained tokens. batch = (x, y, pos, doc),
    each (B, T); pos None for padded batches (plain causal attention)."""
    x, y, pos, doc = batch
    mask = None if pos is None else packed_mask(doc)       # block-diagonal causal for packed rows
    logits = model(x, pos=pos, mask=mask)                  # (B, T, V)
    loss = token_cross_entropy(logits, y, reduction="sum")
    return loss, (y != -100).sum(), {"tokens": (doc >= 0).sum()}


def encode_conversations(tok, template, convs) -> list[tuple[list[int], list[int]]]:
    """(ids, mask) per conversation, as `chat.encode_conversation` gives, with every segment
    tokenized in one parallel `encode_batch` call."""
    rendered = [template.render(c) for c in convs]
    texts = [s.text for segs in rendered for s in segs]
    pieces = _Pieces(tok.encode_batch(texts) if texts else [])
    return [encode_segments(pieces, segs) for segs in rendered]


class _Pieces:
    """Stands in for the tokenizer in `encode_segments`: hands out pre-computed encodings in order."""

    def __init__(self, encoded):
        self._it = iter(encoded)

    def encode(self, _text):
        return next(self._it)


def _split(items: list, frac: float, seed: int) -> tuple[list, list]:
    if frac <= 0 or len(items) < 2:
        return items, []
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    n_val = min(len(items) - 1, max(1, round(frac * len(items))))
    val = set(idx[:n_val])
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


@torch.no_grad()
def add_template_tokens(model, tok, template) -> list[str]:
    """Add the template's missing special tokens to `tok`; grow the model's embeddings when the
    new ids pass its vocabulary, and start the new rows at the mean of the real tokens' rows.
    Returns the added tokens."""
    n_real = min(tok.vocab_size, model.config.vocab_size)
    new = ensure_special_tokens(tok, template)
    if not new:
        return []
    ids = torch.tensor([tok.token_to_id(t) for t in new])
    if int(ids.max()) >= model.config.vocab_size:
        model.resize_token_embeddings(int(ids.max()) + 1)
    tables = [model.model.embed_tokens.weight]
    if model.lm_head.weight is not tables[0]:
        tables.append(model.lm_head.weight)
    for w in tables:
        w[ids.to(w.device)] = w[:n_real].mean(0, keepdim=True).expand(len(new), -1)
    return new


class SFTTrainer:
    """Fine-tune `model` on conversations (a data file, or Conversation / message lists).

    trainer = SFTTrainer(model, tok, "dolly.jsonl", "out.lora", SFTOptions(template="chatml"))
    trainer.train()    # -> last metrics; writes out.lora (or out.tinygpt with full=True)"""

    def __init__(self, model, tokenizer, data, out, options: SFTOptions | None = None,
                 train: TrainConfig | None = None, log=print):
        self.opts = opts = options or SFTOptions()
        self.tcfg = train or sft_train_config(opts.full)
        self.model, self.tok, self.out, self.log = model, tokenizer, Path(out), log
        self.data_name = str(data) if isinstance(data, (str, Path)) else "<conversations>"
        self._check_out()
        self.device, self.rank, self.world = setup_device(opts.device)
        if self.rank != 0:                          # one log under torchrun
            self.log = log = (lambda *m: None)
        if not opts.full:
            base_fingerprint(model)                 # of the base as loaded, before tokens are added
        if opts.full and lora_modules(model):
            merge_and_unload(model)                 # stacked adapters become part of the weights
        self.template = get_template(opts.template, tokenizer)
        self.added = add_template_tokens(model, tokenizer, self.template)
        if self.added:
            log(f"added {len(self.added)} template token(s) to the vocabulary: {', '.join(self.added)}")
        self._build_data(data)
        model.to(self.device)
        model.grad_checkpointing = opts.grad_checkpointing
        self._setup_params()
        self._finish_train_config()

    def _check_out(self) -> None:
        lora_out = self.out.suffix == ".lora"
        if self.opts.full and lora_out:
            raise UserError("--full writes a whole model, not an adapter", str(self.out), "use --out X.tinygpt")
        if not self.opts.full and not lora_out:
            raise UserError("LoRA fine-tuning writes an adapter file", str(self.out),
                            "use --out X.lora (or --full for a .tinygpt; `tinygpt merge` folds an adapter in)")

    # ---- data ---------------------------------------------------------------------------------
    def _build_data(self, data) -> None:
        opts, cfg, log = self.opts, self.model.config, self.log
        ctx = opts.ctx or cfg.block_size
        if ctx > cfg.block_size:
            raise UserError(f"--ctx {ctx} exceeds the model's context {cfg.block_size}", None, "lower --ctx")
        max_len = opts.max_length or ctx + 1
        if max_len - 1 > cfg.block_size or (opts.packing and max_len > ctx + 1):
            raise UserError(f"--max-length {max_len} does not fit the row length {ctx} (+1)", None,
                            "lower --max-length or raise --ctx")
        if isinstance(data, (str, Path)):
            convs, skipped = load_sft(data, opts.format, opts.skip_bad_rows)   # warns of skipped rows
        else:
            convs, skipped = [c if isinstance(c, Conversation) else Conversation(list(c)) for c in data], 0
        if not convs:
            raise UserError("no conversations to train on", self.data_name, "check the data file")
        train_c, val_c = _split(convs, opts.val_split, self.tcfg.seed)
        pad = self.tok.pad_id if self.tok.pad_id is not None else 0
        multiple = 64 if self.device.type == "cuda" else 1       # fewer distinct shapes to compile
        self.stats = {"conversations": len(convs), "skipped_rows": skipped}
        self.train_rows = self.val_rows = None
        for split, items in (("train", train_c), ("val", val_c)):
            if not items:
                continue
            pairs, dropped = prepare_examples(encode_conversations(self.tok, self.template, items), max_len)
            self.stats[f"{split}_dropped"] = dropped
            if not pairs:
                raise UserError(f"no {split} example fits --max-length {max_len} (all {dropped} too long)",
                                self.data_name, "raise --max-length / --ctx")
            rows = pack_rows(pairs, ctx, pad) if opts.packing else pad_examples(pairs, pad, multiple)
            setattr(self, f"{split}_rows", rows.to(self.device))
            self.stats[f"{split}_examples"] = len(pairs)
        self.ctx, self.max_len = ctx, max_len
        self._log_data()

    def _log_data(self) -> None:
        s, rows = self.stats, self.train_rows
        msg = (f"SFT data: {s['conversations']} conversations ({s['skipped_rows']} bad rows skipped), "
               f"{s['train_examples']} train examples, {s['train_dropped']} dropped (final reply does not "
               f"fit --max-length {self.max_len})")
        if self.opts.packing:
            fill = rows.real_tokens() / max(1, rows.x.numel())
            msg += f"; packed into {len(rows)} rows of {self.ctx} ({fill:.0%} filled)"
        if self.val_rows is not None:
            msg += f"; {s['val_examples']} validation examples"
        self.log(msg + f"; template {self.template.name}")

    # ---- parameters -----------------------------------------------------------------------------
    def _setup_params(self) -> None:
        opts, model = self.opts, self.model
        total = model.num_params()
        if opts.full:
            for p in model.parameters():
                p.requires_grad_(True)
            self.log(f"full fine-tuning: {total / 1e6:.2f}M trainable parameters")
            return
        torch.manual_seed(self.tcfg.seed)          # the adapter's random A is part of the run's seed
        n = apply_lora(model, opts.lora_rank, opts.lora_alpha, opts.lora_dropout, opts.lora_targets)
        meta = model._lora_meta["default"]
        meta["trained_tokens"] = list(self.template.special_tokens)
        if meta["trained_tokens"]:
            train_token_rows(model, [self.tok.token_to_id(t) for t in meta["trained_tokens"]])
        rows = sum(p.numel() for p in model.parameters() if p.requires_grad) - n
        targets = sorted({name.rsplit(".", 1)[-1] for name in lora_modules(model)} & set(opts.lora_targets))
        self.log(f"LoRA rank {opts.lora_rank} alpha {opts.lora_alpha:g} on {', '.join(targets)}: "
                 f"{n:,} trainable parameters ({100 * n / total:.2f}% of {total / 1e6:.2f}M)"
                 + (f" + {rows:,} in the rows of {', '.join(meta['trained_tokens'])}" if rows else ""))
        self.trainable_share = n / total

    def _finish_train_config(self) -> None:
        t, opts = self.tcfg, self.opts
        per_step = t.batch * t.accum * self.world
        epochs = opts.epochs or (0 if t.steps > 0 else 1.0)
        if epochs:
            t.steps = max(1, math.ceil(epochs * len(self.train_rows) / per_step))
        if t.warmup < 0:
            t.warmup = default_warmup(t.steps, 100)
        if self.val_rows is not None and not t.val_every:
            t.val_every = t.steps                   # a held-out split is at least scored at the end
        t.resume_key = {"model": self.model.config.to_json(), "data": self.data_name, "ctx": self.ctx,
                        "max_length": self.max_len, "packing": opts.packing, "template": self.template.name,
                        "batch": t.batch, "accum": t.accum, "seed": t.seed, "world": self.world,
                        "full": opts.full, "lora": [opts.lora_rank, opts.lora_alpha, list(opts.lora_targets)],
                        "val_split": opts.val_split, "rows": len(self.train_rows)}
        self.log(f"{t.steps} steps of {per_step} rows ({t.steps * per_step / len(self.train_rows):.2f} epochs), "
                 f"lr {t.lr:g}, warmup {t.warmup}")

    # ---- training -------------------------------------------------------------------------------
    def batches(self, i: int):
        b = self.tcfg.batch
        rows = self._order.take((i * self.world + self.rank) * b, b)
        return self.train_rows.batch(rows)

    def validate(self, model) -> dict:
        """Mean loss per trained token over the validation rows (at most 64 batches)."""
        rows, b = self.val_rows, self.tcfg.batch
        loss = count = 0.0
        for start in range(0, min(len(rows), 64 * b), b):
            s, c, _ = sft_loss_step(model, rows.batch(list(range(start, min(start + b, len(rows))))))
            loss, count = loss + float(s), count + float(c)
        return {"val_loss": loss / max(count, 1.0)}

    def save(self, final: bool) -> None:
        if self.opts.full:
            save_model(self.out, self.model, self.tok, {"sft_template": self.template.name})
            return
        stacked = json.dumps([[str(p), w] for p, w in self.opts.stacked_on])
        save_adapter(self.model, self.out, "default", {"sft_template": self.template.name, "stacked_on": stacked})

    def train(self) -> dict:
        self._order = RowOrder(len(self.train_rows), self.tcfg.seed)
        val_fn = self.validate if self.val_rows is not None else None
        engine = Engine(self.model, self.tcfg, sft_loss_step, self.batches, self.out, self.save, val_fn,
                        self.device, self.rank, self.world, self.log)
        last = engine.fit()
        if self.rank == 0:
            hint = "" if self.opts.full else (" (sample with --lora " + " --lora ".join(
                [str(p) for p, _ in self.opts.stacked_on] + [str(self.out)]) + ")")
            self.log(f"saved {self.out}{hint}")
        return last


def run_sft(model_path, data, out, options: SFTOptions | None = None, train: TrainConfig | None = None,
            lora=(), log=print) -> dict:
    """Load `model_path` (+ adapters `lora` [(path, weight)]), fine-tune on `data`, write `out`.
    Returns the last logged metrics."""
    from . import load_model_and_tokenizer
    opts = options or SFTOptions()
    opts.stacked_on = [tuple(s) for s in lora]
    model, tok = load_model_and_tokenizer(model_path, lora=list(lora), device="cpu")
    return SFTTrainer(model, tok, data, out, opts, train, log).train()
