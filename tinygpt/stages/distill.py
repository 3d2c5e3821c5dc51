"""`tinygpt distill`: a student learns a teacher's next-token distributions (knowledge distillation, GKD).

Design choices:
- The stage IS the SFT stage with another loss: `DistillTrainer` subclasses `SFTTrainer`, so the
  data path (conversations -> the chat template -> packed rows with response masks), LoRA versus
  full fine-tuning, the trained template-token rows, the plan and the saved artifact are SFT's.
  Only the batch (the scored positions, and the teacher's targets), the loss step and the
  validation differ. The student may be any model with the teacher's tokenizer: a smaller one
  (other depth or width) trained in full or through a LoRA adapter, or a LoRA on a base.
- Teacher and student must share a vocabulary (the same token -> id map); a mismatch is refused
  before any work, naming both. The chat template follows the one rule, with the TEACHER's
  files consulted too: the data should be rendered the way the teacher was trained.
- The loss (`losses.distill`): per response token, (1 - alpha) times the generalised JSD of GKD
  between the student's and the teacher's distributions at --temperature (--beta 0: forward
  KL(T || S), 1: reverse KL(S || T), TRL's convention) plus alpha times the hard-label
  cross-entropy of the data's token. It runs on the final hidden states of the scored positions
  only, a chunk of positions at a time (`logprobs.chunked_head_loss`): the student's and the
  teacher's (M, V) logits are never materialised, only a chunk of each. The teacher's hidden
  states come from one no-grad forward over the same packed rows.
- The teacher is live (frozen, adapters merged, in --teacher-dtype: bfloat16 on GPUs, or int8
  weights through `quantize.py`), or precomputed: `--teacher-topk K` computes once the teacher's K
  most likely tokens and their log-probs at every response position and caches them in the run
  folder (safetensors, keyed by a hash of the packed rows, the teacher's files, K, the temperature
  and the dtype, like the DPO reference cache), then frees the teacher. The loss then compares the
  two distributions coarsened to those K tokens plus "the rest", which is what the live teacher
  gives restricted to the same K (tested).
- Off-policy data is the file's responses, or a teacher's generations written by `tinygpt
  generate`. On-policy (GKD): with probability --lmbda a micro-batch is instead --batch prompts of
  the training conversations answered by the student itself (sampled at --temperature), scored
  by the teacher; the hard-label term does not apply to those tokens. Which micro-batches are
  on-policy, which prompts and the sampling seeds are pure functions of (seed, index), and the
  student generates with its current weights inside the round (the engine's iteration hook), so
  a resumed run repeats an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from ..data.packing import IGNORE, RowOrder
from ..device import DTYPES, autocast, resolve_dtype
from ..errors import UserError
from ..generate import generate
from ..io import fingerprint, load_tensors, save_tensors
from ..load import load_model_and_tokenizer
from ..logprobs import DEFAULT_CHUNK, chunked_head_loss, make_batch
from ..lora import merge_and_unload
from ..losses import distill_token_loss, topk_logprobs
from ..model import packed_mask
from ..options import above, at_least, between, option
from ..quantize import quantize_model
from ..rollout import encode_prompts
from ..train.engine import run_dir_for
from ..train.parallel import row_seeds
from .common import (
    adapter_specs,
    check_inputs,
    check_out,
    compile_blocks,
    lora_specs,
    resolve_template,
    stop_ids,
    weights_key,
)
from .sft import SFTOptions, SFTTrainer

TEACHER_DTYPES = ("auto", *DTYPES, "int8")


@dataclass
class DistillOptions(SFTOptions):
    """The teacher and the distillation loss."""

    command = "distill"
    group = "distillation"
    teacher: str | None = option(None, "teacher: .tinygpt, Hugging Face folder or .gguf (the student's tokenizer)",
                                 required=True)
    teacher_lora: list[str] = option([], "adapter on the teacher, PATH or PATH:WEIGHT (repeatable; merged)",
                                     repeat=True)
    teacher_dtype: str = option("auto", "teacher weights: a float dtype or int8 (auto: bfloat16 on GPUs that have "
                                "it)", choices=TEACHER_DTYPES)
    teacher_topk: int = option(0, "cache the teacher's K most likely tokens per position in the run folder and "
                               "free it (0: live teacher, full distribution)", check=at_least(0))
    beta: float = option(0.5, "generalised JSD: 0 = forward KL(teacher||student), 1 = reverse KL(student||teacher)",
                         check=between(0, 1))
    temperature: float = option(1.0, "softens both distributions in the divergence (and samples on-policy "
                                "answers)", check=above(0))
    alpha: float = option(0.0, "weight of the hard-label cross-entropy on the data's tokens", check=between(0, 1))
    lmbda: float = option(0.0, "fraction of micro-batches answered by the student itself (on-policy, as GKD)",
                          check=between(0, 1))
    max_new_tokens: int | None = option(None, "on-policy answer length", auto="64, at most half of --ctx",
                                        check=at_least(1))

    def fsdp_blocker(self) -> str | None:
        return "on-policy batches (--lmbda) run the student outside the sharded model" if self.lmbda > 0 else None


@dataclass
class DistillBatch:
    """R rows of T tokens and the M scored positions (flat indices into R*T) with their targets."""
    idx: torch.Tensor                   # (R, T) token ids
    pos: torch.Tensor | None            # (R, T) position ids (None: plain causal rows)
    doc: torch.Tensor | None            # (R, T) document ids of packed rows (None: plain causal rows)
    sel: torch.Tensor                   # (M,)
    target: torch.Tensor                # (M,) the data's (or the student's sampled) next tokens
    hard: torch.Tensor                  # (M,) 1: a label to imitate, 0: the student's own sample
    topk: tuple | None = None           # cached teacher (log-probs (M, K), ids (M, K))
    n_tokens: object = 0                # real tokens (throughput)
    on_policy: float = 0.0


class TopKTable:
    """The teacher's top-k log-probs of every scored position of a set of rows, CPU-resident:
    rows r's positions are logp[offsets[r]:offsets[r + 1]], in position order."""

    def __init__(self, logp: torch.Tensor, ids: torch.Tensor, offsets: np.ndarray):
        self.logp, self.ids, self.offsets = logp, ids, offsets

    def lookup(self, rows, device) -> tuple:
        idx = torch.from_numpy(np.concatenate([np.arange(self.offsets[r], self.offsets[r + 1]) for r in rows]))
        return (self.logp.index_select(0, idx).to(device, non_blocking=True),
                self.ids.index_select(0, idx).long().to(device, non_blocking=True))


def student_head(gpt) -> torch.Tensor:
    """The output weight (V, C) with rows being trained written in (`lora.TokenRows`)."""
    head = gpt.lm_head
    return head.full_weight() if hasattr(head, "full_weight") else head.weight


def _chunk_loss(s_logits, targets, hard, t_h, t_logp, t_ids, *, teacher_head, vocab, **kw):
    """One chunk: the teacher's logits from its hidden states (live) or its cached top-k."""
    t_logits = None
    if t_h is not None:
        with torch.no_grad():
            t_logits = teacher_head(t_h)[:, :vocab]                                     # (c, V)
    topk = None if t_logp is None else (t_logp, t_ids)
    return distill_token_loss(s_logits, targets, hard, t_logits, topk, **kw)


class DistillModel(nn.Module):
    """The student as the engine (and DDP) trains it: forward(batch, mask, teacher) -> (3, M)
    per scored position (loss, divergence, hard-label CE). The teacher stays outside this module."""

    def __init__(self, student, vocab: int, beta: float, temperature: float, alpha: float, k: int,
                 chunk: int = DEFAULT_CHUNK):
        super().__init__()
        self.student, self.vocab, self.chunk = student, vocab, chunk
        self.kw = dict(beta=beta, temperature=temperature, alpha=alpha, k=k)

    def forward(self, batch: DistillBatch, mask, teacher: dict):
        h = self.student.hidden(batch.idx, pos=batch.pos, mask=mask)                       # (R, T, C)
        h = h.reshape(-1, h.shape[-1]).index_select(0, batch.sel)                           # (M, C)
        fn = partial(_chunk_loss, teacher_head=teacher.get("head"), vocab=self.vocab, **self.kw)
        return chunked_head_loss(h, student_head(self.student)[:self.vocab], fn, batch.target, batch.hard,
                                 teacher.get("h"), teacher.get("logp"), teacher.get("ids"), chunk=self.chunk)


def vocabulary_check(student_tok, teacher_tok, student_name, teacher_name) -> None:
    """Refuse a teacher whose token -> id map differs from the student's, naming both vocabularies."""
    a = student_tok.tk.get_vocab(with_added_tokens=True)
    b = teacher_tok.tk.get_vocab(with_added_tokens=True)
    if a == b:
        return

    def describe(v):
        digest = hashlib.sha256(json.dumps(sorted(v.items())).encode()).hexdigest()[:8]
        return f"{len(v):,} tokens, vocabulary {digest}"
    inv_a, inv_b = {i: t for t, i in a.items()}, {i: t for t, i in b.items()}
    first = next((i for i in sorted(set(inv_a) | set(inv_b)) if inv_a.get(i) != inv_b.get(i)), None)
    raise UserError(f"the teacher's tokenizer differs from the student's (student {student_name}: {describe(a)}; "
                    f"teacher {teacher_name}: {describe(b)}; first difference at id {first}: "
                    f"{inv_a.get(first, 'no token')!r} vs {inv_b.get(first, 'no token')!r})", None,
                    "distil into a student built on the teacher's tokenizer (e.g. 'tinygpt train --tokenizer' "
                    "with the teacher's tokenizer)")


def load_teacher(path, adapters, dtype_name: str, device):
    """(frozen teacher, its tokenizer): adapters merged, in `dtype_name` (a float dtype, or int8)."""
    int8 = dtype_name == "int8"
    dtype = torch.float32 if int8 else resolve_dtype(dtype_name, device)
    teacher, tok = load_model_and_tokenizer(path, lora=adapters, device=device, dtype=dtype)
    merge_and_unload(teacher)             # never trained: one plain matmul per layer
    if int8:
        quantize_model(teacher)
    return teacher.eval().requires_grad_(False), tok


class DistillTrainer(SFTTrainer):
    """Distil `--teacher` into the student (module docstring).

    DistillTrainer(DistillOptions(model="small.tinygpt", teacher="big.tinygpt", data="sft.jsonl", out="s.lora")).train()
    `teacher` may be given loaded (then `options.teacher` is only a label), with its tokenizer
    (default: the student's)."""

    Options = DistillOptions
    name = "distill"
    compile_step = False               # data-dependent shapes (scored positions): the blocks are compiled

    def __init__(self, options: DistillOptions, model=None, tokenizer=None, data=None, teacher=None,
                 teacher_tokenizer=None, log=None):
        super().__init__(options, model, tokenizer, data, log)
        self.teacher, self.teacher_tok = teacher, teacher_tokenizer

    # ---- set-up -------------------------------------------------------------------------------------
    def setup(self, run) -> None:
        o = self.opts
        self.teacher_specs = adapter_specs(o.teacher_lora, flag="--teacher-lora")
        self.dtype = run.dtype
        check_out(o.out, o.full)
        if self.model is None:
            check_inputs(o, ("--data", o.data))
        if self.teacher is None:
            check_inputs(None, ("--teacher", o.teacher), *[("--teacher-lora", p) for p, _ in self.teacher_specs])
        if self.model is None:
            self.model, self.tok = load_model_and_tokenizer(o.model, lora=lora_specs(o))
        if self.teacher is None:
            self.teacher, self.teacher_tok = load_teacher(o.teacher, self.teacher_specs, o.teacher_dtype, run.device)
        vocabulary_check(self.tok, self.teacher_tok or self.tok, o.model, o.teacher)
        vocab = self.tok.tk.get_vocab(with_added_tokens=True)
        missing = [t for t in self.chat_template().special_tokens if t not in vocab]
        if missing:
            raise UserError(f"the tokenizer lacks the chat template's tokens {', '.join(missing)}", None,
                            "distillation cannot add tokens the teacher never saw: pick another --template")
        super().setup(run)
        self._check_sizes()
        self.vocab = min(self.tok.vocab_size, self.gpt.config.vocab_size, self.teacher.config.vocab_size)
        self.model = DistillModel(self.gpt, self.vocab, o.beta, o.temperature, o.alpha, o.teacher_topk)
        self._selections()
        self._key.update(teacher=weights_key(o.teacher, self.teacher_specs, self.teacher), beta=o.beta, alpha=o.alpha,
                         temperature=o.temperature, lmbda=o.lmbda, teacher_topk=o.teacher_topk)
        if o.compile:                           # a student that samples on-policy keeps eager blocks for it
            compile_blocks(self.gpt, training_only=o.lmbda > 0)
            compile_blocks(self.teacher)
        self.tables = {}
        if o.teacher_topk:
            self.tables = {split: self._topk_table(rows) for split, rows in
                           (("train", self.train_rows), ("val", self.val_rows)) if rows is not None}
        if o.lmbda > 0:
            self._setup_on_policy(run)
        elif o.teacher_topk:
            self.teacher = None                 # everything it is asked is in the cache: free its memory

    def chat_template(self):
        """The one rule over the student's and the teacher's files (the teacher's training format)."""
        o = self.opts
        return resolve_template(o.template, self.tok, [o.model, o.teacher], lora_specs(o) + self.teacher_specs)

    def _check_sizes(self) -> None:
        o, t = self.opts, self.teacher.config
        if t.block_size < self.ctx:
            raise UserError(f"the teacher's context ({t.block_size}) is shorter than the rows ({self.ctx})", None,
                            f"pass --ctx {t.block_size} or less")
        if o.teacher_topk >= min(self.tok.vocab_size, t.vocab_size):
            raise UserError(f"--teacher-topk {o.teacher_topk} is not below the vocabulary ({self.tok.vocab_size})",
                            None, "lower --teacher-topk, or give 0 for the full distribution")

    def _selections(self) -> None:
        """Per row, the positions whose target is trained (host arrays: batches need no device sync)."""
        self.sel = {}
        for split, rows in (("train", self.train_rows), ("val", self.val_rows)):
            if rows is not None:
                y = rows.y.cpu().numpy()
                self.sel[split] = [np.flatnonzero(y[r] != IGNORE) for r in range(len(y))]

    # ---- batches ------------------------------------------------------------------------------------
    def data_batch(self, split: str, rows) -> DistillBatch:
        """The packed (or padded) data rows `rows` of `split` as a DistillBatch (cached teacher included)."""
        rows = list(rows)
        x, y, pos, doc = (self.train_rows if split == "train" else self.val_rows).batch(rows)
        T = x.shape[1]
        sel = torch.from_numpy(np.concatenate([b * T + self.sel[split][r] for b, r in enumerate(rows)]))
        sel = sel.to(self.device, non_blocking=True)
        table = self.tables.get(split)
        return DistillBatch(x, pos, doc if pos is not None else None, sel, y.view(-1).index_select(0, sel),
                            torch.ones(len(sel), device=self.device),
                            table.lookup(rows, self.device) if table is not None else None, (doc >= 0).sum())

    def _on_policy(self, i: int) -> bool:
        return self.opts.lmbda > 0 and random.Random(f"gkd/{self.opts.seed}/{i}").random() < self.opts.lmbda

    def batch(self, i: int) -> DistillBatch:
        if self._on_policy(i):
            return self.policy_batch(i)
        return self.data_batch("train", self.batch_rows(i))

    def _setup_on_policy(self, run) -> None:
        o = self.opts
        self.max_new = o.max_new_tokens or min(64, self.ctx // 2)
        rows = [(c.messages[:-1], None) for c in self.train_conversations]
        self.prompts, dropped = encode_prompts(self.tok, self.template, rows, self.ctx - self.max_new)
        if not self.prompts:
            raise UserError(f"no training prompt leaves room for --max-new-tokens {self.max_new} in --ctx {self.ctx}",
                            self.data_name, "lower --max-new-tokens")
        self.prompt_order = RowOrder(len(self.prompts), o.seed)
        self.stops = stop_ids(self.tok, self.template)
        self.iteration = self._iteration          # the student generates inside the round (fresh weights)
        run.log(f"on-policy: {o.lmbda:.0%} of micro-batches answered by the student ({len(self.prompts)} prompts, "
                f"{dropped} too long, up to {self.max_new} new tokens)")

    @torch.no_grad()
    def policy_batch(self, i: int) -> DistillBatch:
        """--batch training prompts answered by the student at --temperature (GKD's on-policy data)."""
        o = self.opts
        first = (i * self.world + self.rank) * o.batch          # global rows: the same for any split over ranks
        prompts = [self.prompts[j] for j in self.prompt_order.take(first, o.batch)]
        pad = self.tok.pad_id if self.tok.pad_id is not None else 0
        g = generate(self.gpt, [p.ids for p in prompts], self.max_new, o.temperature, 0, 1.0, self.stops, self.vocab,
                     seed=row_seeds(o.seed, i, first, o.batch), pad_id=pad)
        seqs = [(p.ids + t, [0] * len(p.ids) + [1] * len(t)) for p, t in zip(prompts, g.tokens)]
        b = make_batch(seqs, pad, self.device, row_len=self.ctx)
        return DistillBatch(b.idx, b.pos, b.doc, b.sel, b.target, torch.zeros(len(b.target), device=self.device),
                            n_tokens=b.n_tokens, on_policy=1.0)

    def _iteration(self, engine, it: int) -> dict:
        accum = self.opts.accum
        m = engine.train_step([self.batch(it * accum + k) for k in range(accum)])
        m.pop("finite")
        return m

    # ---- the teacher and the loss -------------------------------------------------------------------
    @torch.no_grad()
    def teacher_targets(self, batch: DistillBatch, mask) -> dict:
        """What the loss needs of the teacher: its cached top-k, or its hidden states (M, C_t) and head."""
        if batch.topk is not None:
            return {"logp": batch.topk[0], "ids": batch.topk[1]}
        h = self.teacher.hidden(batch.idx, pos=batch.pos, mask=mask)                       # (R, T, C_t)
        return {"h": h.reshape(-1, h.shape[-1]).index_select(0, batch.sel), "head": self.teacher.lm_head}

    def loss_step(self, model, batch: DistillBatch):
        mask = packed_mask(batch.doc) if batch.doc is not None else None
        out = model(batch, mask, self.teacher_targets(batch, mask))                         # (3, M)
        M = out.shape[1]
        return out[0].sum(), M, {"divergence": out[1].sum() / max(M, 1), "hard_ce": out[2].sum() / max(M, 1),
                                 "tokens": batch.n_tokens, "on_policy": batch.on_policy}

    def validate(self, model) -> dict:
        """Mean loss, divergence and hard-label CE per response token over the validation rows
        (at most 64 batches)."""
        b, total, n = self.opts.batch, torch.zeros(3), 0
        for start in range(0, min(len(self.val_rows), 64 * b), b):
            batch = self.data_batch("val", range(start, min(start + b, len(self.val_rows))))
            mask = packed_mask(batch.doc) if batch.doc is not None else None
            out = model(batch, mask, self.teacher_targets(batch, mask))
            total, n = total + out.sum(1).float().cpu(), n + out.shape[1]
        loss, div, ce = (total / max(n, 1)).tolist()
        return {"val_loss": loss, "val_divergence": div, "val_ce": ce}

    # ---- the top-k cache ----------------------------------------------------------------------------
    @torch.no_grad()
    def _compute_topk(self, split: str, rows) -> TopKTable:
        o, k, parts = self.opts, self.opts.teacher_topk, []
        with autocast(self.device, self.dtype):
            for start in range(0, len(rows), o.batch):
                batch = self.data_batch(split, range(start, min(start + o.batch, len(rows))))
                t = self.teacher_targets(batch, packed_mask(batch.doc) if batch.doc is not None else None)
                for c in range(0, len(t["h"]), DEFAULT_CHUNK):
                    logits = self.teacher.lm_head(t["h"][c:c + DEFAULT_CHUNK])[:, :self.vocab]
                    lp, ids = topk_logprobs(logits, k, o.temperature)
                    parts.append((lp.cpu(), ids.to(torch.int32).cpu()))
        offsets = np.concatenate([[0], np.cumsum([len(s) for s in self.sel[split]])])
        return TopKTable(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), offsets)

    def _topk_table(self, rows) -> TopKTable:
        """The cached table of `rows` (train or val), computed once per content key (rank 0 writes it)."""
        o = self.opts
        split = "train" if rows is self.train_rows else "val"
        tensors = {k: v for k, v in vars(rows).items() if torch.is_tensor(v)}
        key = hashlib.sha256(repr([fingerprint(tensors), weights_key(o.teacher, self.teacher_specs, self.teacher),
                                   o.teacher_topk, o.temperature, str(self.dtype), o.teacher_dtype, self.vocab])
                             .encode()).hexdigest()[:16]
        path = run_dir_for(o.out) / f"teacher-top{o.teacher_topk}-{key}.safetensors"
        table = None
        if self.rank == 0 and not path.exists():
            self.log(f"caching the teacher's top-{o.teacher_topk} log-probs of {sum(map(len, self.sel[split])):,} "
                     f"{split} positions -> {path}")
            table = self._compute_topk(split, rows)
            save_tensors(path, {"logp": table.logp, "ids": table.ids, "offsets": torch.from_numpy(table.offsets)},
                         {"key": key})
        if self.world > 1:
            dist.barrier()                      # the other ranks read what rank 0 wrote
        if table is None:
            t, _ = load_tensors(path)
            self.log(f"reusing the cached teacher top-{o.teacher_topk} log-probs of the {split} rows ({path})")
            table = TopKTable(t["logp"], t["ids"], t["offsets"].numpy())
        return table
