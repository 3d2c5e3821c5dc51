"""`tinygpt sft`: supervised fine-tuning with chat templates, response-only loss, packing, LoRA or full.

Design choices:
- Data path: file rows -> `formats.load_sft` (canonical conversations) -> a chat template renders
  segments -> each segment is tokenized on its own, so the loss mask comes from segment
  boundaries (never from searching the token stream). Only assistant replies and their
  end-of-turn marker are trained. Everything is tokenized, truncated and packed ONCE before
  training; a batch is a gather of int32 rows (`data/packing.py`).
- Real conversations are longer than small windows: `--truncate left` (the default) keeps each
  final reply and cuts the oldest turns (a reply longer than --max-length is cut at its end),
  `--truncate drop` leaves long examples out; the data line says how many went each way.
- Packing is on by default: examples are bin-packed into rows of `ctx` positions, position ids
  restart per example and attention is block-diagonal (`model.packed_mask`: FlexAttention on
  CUDA, a dense mask on CPU), so an example's loss is the same packed or alone. `--no-packing`
  right-pads each batch to its longest example instead.
- Defaults follow the usual LoRA recipe: rank 16, alpha 32, lr 2e-4 (2e-5 for full weights), no
  weight decay, warmup 100 steps but at most 10% of the run, cosine decay; one epoch.
- Template tokens the tokenizer lacks are added, the embeddings grow (new rows start at the mean
  of the real tokens' rows). With LoRA the rows of ALL the template's special tokens (added or
  not) are trained through `lora.TokenRows` and saved in the adapter: a model pretrained here has
  `<|im_end|>` in its vocabulary but never saw it, so its output row has nothing that predicts it,
  and a low-rank update of the blocks cannot teach the model to end a reply (the `trainable token
  indices` idea of PEFT). With `--full` every row is an ordinary weight.
- Adapters given with `--lora` are loaded frozen under the new one (stacking): the new adapter
  file holds only what this run trained, and sampling passes both. With `--full` they are merged
  into the weights first.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..chat import encode_segments, ensure_special_tokens
from ..checkpoint import save_model
from ..data.formats import Conversation, load_sft
from ..data.packing import (
    TRUNCATE_MODES,
    RowOrder,
    pack_rows,
    pad_examples,
    prepare_examples,
)
from ..errors import UserError
from ..lora import (
    base_fingerprint,
    lora_modules,
    merge_and_unload,
    save_adapter,
    target_of,
    train_token_rows,
)
from ..model import packed_mask
from ..options import at_least, between, option
from ..train.stage import AUTO_VAL_EVERY, Stage, TrainOptions
from .common import (
    CheckpointingOptions,
    HeadLossOptions,
    LoRAOptions,
    ModelOptions,
    RowOptions,
    TemplateOptions,
    check_inputs,
    check_out,
    default_lr,
    epochs_to_steps,
    load_opts_model,
    lora_specs,
    lora_targets,
    make_trainable,
    resolve_plan,
    resolve_template,
    split_items,
    template_record,
)


@dataclass
class ChatDataOptions(RowOptions, TemplateOptions):
    """The chat data and how it is cut and packed (SFT, distillation)."""

    group = "data"
    data: str | None = option(None, "SFT file (.jsonl .json .parquet): messages, sharegpt, alpaca, dolly, "
                              "prompt/completion, ...", required=True)
    epochs: float | None = option(None, "train for this many epochs (instead of --steps)", check=between(0, 1e6, lo_open=True))
    ctx: int | None = option(None, "positions per packed row", auto="the model's context", check=at_least(2))
    max_length: int | None = option(None, "longest example in tokens (see --truncate)", auto="ctx + 1",
                                    check=at_least(2))
    truncate: str = option("left", "longer examples: left keeps the final reply and cuts the oldest turns (a reply "
                           "longer than --max-length is cut at its end); drop leaves them out", choices=TRUNCATE_MODES)
    packing: bool = option(True, "one example per row, right-padded", negate="--no-packing")
    val_split: float = option(0.0, "fraction of conversations held out", check=between(0, 1, hi_open=True))

    def check(self) -> None:
        if getattr(self, "steps", None) and self.epochs:
            raise UserError("both --steps and --epochs given", None, "give one of them")
        super().check()


@dataclass
class SFTOptions(ModelOptions, ChatDataOptions, LoRAOptions, HeadLossOptions, CheckpointingOptions, TrainOptions):
    command = "sft"
    steps: int | None = option(None, "optimizer steps", auto="one epoch", check=at_least(1))
    lr: float | None = option(None, "peak learning rate", auto="2e-4 (2e-5 with --full) x 2048/width",
                              check=between(0, 1, lo_open=True))
    warmup: int | None = option(None, "warmup steps", auto="100, at most 10% of the steps", check=at_least(0))
    weight_decay: float = option(0.0, "AdamW weight decay (matrices only)", check=at_least(0))
    val_every: int | None = option(None, "validation every N steps", auto=AUTO_VAL_EVERY,
                                   check=at_least(0))


def sft_loss_step(model, batch):
    """Summed cross-entropy over trained tokens; count = trained tokens. batch = (x, y, pos, doc),
    each (B, T); pos None for padded batches (plain causal attention)."""
    x, y, pos, doc = batch
    mask = None if pos is None else packed_mask(doc)       # block-diagonal causal for packed rows
    loss = model(x, pos=pos, mask=mask, targets=y)         # summed over trained tokens (y != -100)
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


class SFTTrainer(Stage):
    """Fine-tune a model on conversations (a data file, or Conversation / message lists).

    SFTTrainer(SFTOptions(model="base.tinygpt", data="dolly.jsonl", out="out.lora")).train()
    `model`/`tokenizer` may be given already loaded (then `options.model` is only a label), and
    `data` as a list of conversations instead of `options.data`."""

    Options = SFTOptions
    name = "sft"
    loss_step = staticmethod(sft_loss_step)

    def __init__(self, options: SFTOptions, model=None, tokenizer=None, data=None, log=None):
        super().__init__(options, log)
        self.model, self.tok, self.data = model, tokenizer, data if data is not None else options.data

    def setup(self, run) -> None:
        o = self.opts
        check_out(o.out, o.full)
        self.device, self.rank, self.world = run.device, run.rank, run.world
        if self.model is None:
            check_inputs(o, ("--data", o.data))
            self.model, self.tok = load_opts_model(o)
        model, tok, log = self.model, self.tok, run.log
        self.data_name = str(self.data) if isinstance(self.data, (str, Path)) else "<conversations>"
        if not o.full:
            base_fingerprint(model)                 # of the base as loaded, before tokens are added
        if o.full and lora_modules(model):
            merge_and_unload(model)                 # stacked adapters become part of the weights
        self.template = self.chat_template()
        self.added = add_template_tokens(model, tok, self.template)
        if self.added:
            log(f"added {len(self.added)} template token(s) to the vocabulary: {', '.join(self.added)}")
        self._build_data()
        model.to(self.device)
        model.grad_checkpointing = o.grad_checkpointing
        model.loss_chunk = o.loss_chunk
        self._setup_params()
        self._plan()
        self.gpt = model                # the network saved; `self.model` is what the engine trains

    def chat_template(self):
        """The template by the one rule (`stages.common.resolve_template`)."""
        o = self.opts
        return resolve_template(o.template, self.tok, o.model, lora_specs(o))

    # ---- data ---------------------------------------------------------------------------------
    def _build_data(self) -> None:
        o, cfg = self.opts, self.model.config
        ctx = o.ctx or cfg.block_size
        if ctx > cfg.block_size:
            raise UserError(f"--ctx {ctx} exceeds the model's context {cfg.block_size}", None, "lower --ctx")
        max_len = o.max_length or ctx + 1
        if max_len - 1 > cfg.block_size or (o.packing and max_len > ctx + 1):
            raise UserError(f"--max-length {max_len} does not fit the row length {ctx} (+1)", None,
                            "lower --max-length or raise --ctx")
        if isinstance(self.data, (str, Path)):
            convs, report = load_sft(self.data, o.format, o.skip_bad_rows, o.strict)   # warns of skipped rows
            skipped = report.n_skipped
        else:
            convs, skipped = [c if isinstance(c, Conversation) else Conversation(list(c)) for c in self.data], 0
        if not convs:
            raise UserError("no conversations to train on", self.data_name, "check the data file")
        train_c, val_c = split_items(convs, o.val_split, o.seed)
        self.train_conversations = train_c
        pad = self.tok.pad_id if self.tok.pad_id is not None else 0
        multiple = 64 if self.device.type == "cuda" else 1       # fewer distinct shapes to compile
        self.stats = {"conversations": len(convs), "skipped_rows": skipped}
        self.train_rows = self.val_rows = None
        for split, items in (("train", train_c), ("val", val_c)):
            if not items:
                continue
            pairs, cut = prepare_examples(encode_conversations(self.tok, self.template, items), max_len, o.truncate)
            self.stats[f"{split}_cut"] = cut
            if not pairs:
                raise UserError(f"no {split} example fits --max-length {max_len} (all {cut['dropped']} dropped)",
                                self.data_name, "raise --max-length / --ctx, or --truncate left")
            rows = pack_rows(pairs, ctx, pad) if o.packing else pad_examples(pairs, pad, multiple)
            setattr(self, f"{split}_rows", rows.to(self.device))
            self.stats[f"{split}_examples"] = len(pairs)
        self.ctx, self.max_len = ctx, max_len
        self._log_data()

    def _log_data(self) -> None:
        s, rows = self.stats, self.train_rows
        c = s["train_cut"]
        msg = (f"SFT data: {s['conversations']} conversations ({s['skipped_rows']} rows skipped), "
               f"{s['train_examples']} train examples; longer than --max-length {self.max_len}: "
               f"{c['turns'] + c['prompt'] + c['reply']} cut (--truncate {self.opts.truncate}: {c['turns']} oldest "
               f"turns, {c['prompt']} inside the prompt, {c['reply']} inside the final reply), {c['dropped']} dropped")
        if self.opts.packing:
            fill = rows.real_tokens() / max(1, rows.x.numel())
            msg += f"; packed into {len(rows)} rows of {self.ctx} ({fill:.0%} filled)"
        if self.val_rows is not None:
            msg += f"; {s['val_examples']} validation examples"
        self.log(msg + f"; template {self.template.name}")

    # ---- parameters -----------------------------------------------------------------------------
    def _setup_params(self) -> None:
        o, model = self.opts, self.model
        total = model.num_params()
        n = make_trainable(model, o)
        if o.full:
            self.log(f"full fine-tuning: {total / 1e6:.2f}M trainable parameters")
            return
        meta = model._lora_meta["default"]
        meta["trained_tokens"] = list(self.template.special_tokens)
        if meta["trained_tokens"]:
            train_token_rows(model, [self.tok.token_to_id(t) for t in meta["trained_tokens"]])
        rows = sum(p.numel() for p in model.parameters() if p.requires_grad) - n
        self.trainable_share = n / total
        targets = sorted({target_of(name) for name in lora_modules(model)} & set(lora_targets(o)))
        self.log(f"LoRA rank {o.lora_rank} alpha {o.lora_alpha:g} on {', '.join(targets)}: "
                 f"{n:,} trainable parameters ({100 * n / total:.2f}% of {total / 1e6:.2f}M)"
                 + (f" + {rows:,} in the rows of {', '.join(meta['trained_tokens'])}" if rows else ""))

    def _plan(self) -> None:
        o = self.opts
        per_step = o.batch * o.accum * self.world
        steps = o.steps or epochs_to_steps(o.epochs or 1.0, len(self.train_rows), per_step)
        lr = default_lr(o, 2e-5 if o.full else 2e-4, self.model, self.log)
        self.plan = resolve_plan(o, steps, lr=lr, warmup_cap=100,
                                 validates=self.val_rows is not None)
        self._order = RowOrder(len(self.train_rows), o.seed)
        self._key = {"model": self.model.config.to_json(), "data": self.data_name, "ctx": self.ctx,
                     "max_length": self.max_len, "truncate": o.truncate, "packing": o.packing,
                     "template": self.template.name,
                     "batch": o.batch, "micro_batches_per_step": o.accum * self.world, "seed": o.seed,
                     "full": o.full, "lora": [o.lora_rank, o.lora_alpha, lora_targets(o)],
                     "val_split": o.val_split, "rows": len(self.train_rows)}
        p = self.plan
        self.log(f"{p.steps} steps of {per_step} rows ({p.steps * per_step / len(self.train_rows):.2f} epochs), "
                 f"lr {p.lr:g}, warmup {p.warmup}")

    # ---- the protocol ---------------------------------------------------------------------------
    def resume_key(self) -> dict:
        return self._key

    def batch_rows(self, i: int):
        """The training rows of micro-batch i (this rank's share)."""
        b = self.opts.batch
        return self._order.take((i * self.world + self.rank) * b, b)

    def batch(self, i: int):
        return self.train_rows.batch(self.batch_rows(i))

    def validate(self, model) -> dict:
        """Mean loss per trained token over the validation rows (at most 64 batches)."""
        rows, b = self.val_rows, self.opts.batch
        loss = count = 0.0
        for start in range(0, min(len(rows), 64 * b), b):
            s, c, _ = sft_loss_step(model, rows.batch(list(range(start, min(start + b, len(rows))))))
            loss, count = loss + float(s), count + float(c)
        return {"val_loss": loss / max(count, 1.0)}

    def save(self, final: bool) -> None:
        o, record = self.opts, {**template_record(self.template), **self.artifact_metadata()}
        if o.full:
            save_model(o.out, self.gpt, self.tok, record)
        else:
            stacked = json.dumps([[str(p), w] for p, w in lora_specs(o)])
            save_adapter(self.gpt, o.out, "default", {**record, "stacked_on": stacked})
        if final and self.rank == 0:
            hint = "" if o.full else (" (sample with --lora " + " --lora ".join(
                [str(p) for p, _ in lora_specs(o)] + [str(o.out)]) + ")")
            self.log(f"saved {o.out}{hint}")
