"""`tinygpt train`: pretraining by next-token prediction on a tokenized corpus.

The stage supplies its data (cached uint16/uint32 token shards, random windows per step), its
loss step and its validation; the engine does the rest. A tokenizer is trained on the corpus
unless one is given (`--tokenizer`, `--byte-tokenizer`); `--init` continues pretraining a
`.tinygpt`, Hugging Face folder or `.gguf` instead of building a fresh model.

Context: `--ctx` is the length of the training windows. A fresh model's context (block_size,
what its position tables cover) is `--block-size` when given, else `--ctx` when that fits the
preset, else the preset's; a `--ctx` beyond the model's context is an error naming
`--block-size` (enlarging a model is asked for explicitly, never done by a window length).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import save_model
from ..config import (
    ARCHS,
    LIMITS,
    MAX_BLOCK_SIZE,
    PRESETS,
    ModelConfig,
    arch_overrides,
    pad_vocab,
)
from ..data.corpus import TokenBatches, expand_paths, read_documents, tokenize_corpus
from ..errors import UserError
from ..load import load_model_and_tokenizer
from ..losses import token_cross_entropy
from ..model import GPT
from ..options import at_least, between, option
from ..tokenizer import Tokenizer
from ..train.stage import Stage, TrainOptions
from .common import check_out, resolve_plan


@dataclass
class PretrainOptions(TrainOptions):
    """What to pretrain on and which model to build."""

    command = "train"
    group = "pretraining"
    corpus: list[str] = option([], "text files, folders or globs (.txt .jsonl .json .parquet)", many=True,
                               required=True)
    preset: str = option("tiny", "model size", choices=tuple(PRESETS))
    depth: int | None = option(None, "one scaling dial: width 64*depth, heads of 128 (overrides --preset)",
                               check=between(1, LIMITS["n_layer"][1]))
    arch: str | None = option(None, "block family over that shape (default: the preset's); llama, qwen2 and "
                              "gpt2 export to transformers and GGUF", choices=tuple(ARCHS))
    tokenizer: str | None = option(None, "tokenizer.json or Hugging Face folder", auto="train one on the corpus")
    vocab_size: int = option(4096, "vocabulary of the tokenizer trained here",
                             check=between(261, LIMITS["vocab_size"][1]))
    byte_tokenizer: bool = option(False, "use 256 bytes + specials, no BPE")
    ctx: int | None = option(None, "positions per training window", auto="the model's context",
                             check=between(1, MAX_BLOCK_SIZE))
    block_size: int | None = option(None, "context of a fresh model (positions it can attend over)",
                                    auto="--ctx when it fits the preset, else the preset's",
                                    check=between(2, MAX_BLOCK_SIZE))
    val_split: float = option(0.0, "fraction of documents held out for validation", check=between(0, 1, hi_open=True))
    init: str | None = option(None, "continue pretraining from this .tinygpt, Hugging Face folder or .gguf")
    steps: int | None = option(1000, "optimizer steps", check=at_least(1))
    batch: int = option(16, "micro-batch size (rows)", check=at_least(1))
    lr: float | None = option(1e-3, "peak learning rate", check=between(0, 1, lo_open=True))
    warmup: int | None = option(None, "warmup steps", auto="50, at most 10% of the steps", check=at_least(0))
    val_every: int | None = option(None, "validation every N steps", auto="with --val-split: at the end",
                                   check=at_least(0))

    def check(self) -> None:
        if self.tokenizer and self.byte_tokenizer:
            raise UserError("--tokenizer and --byte-tokenizer both given", None, "give one of them")
        if self.init and (self.tokenizer or self.byte_tokenizer or self.depth or self.arch or self.block_size):
            raise UserError("--init continues an existing model: its tokenizer and shape are fixed", None,
                            "drop --tokenizer/--byte-tokenizer/--depth/--arch/--block-size")
        if self.ctx and self.block_size and self.ctx > self.block_size:
            raise UserError(f"--ctx {self.ctx} exceeds --block-size {self.block_size}", None,
                            "raise --block-size or lower --ctx")
        if self.ctx and not self.block_size and not self.init:
            block = PRESETS[self.preset]["block_size"] if self.depth is None else ModelConfig.block_size
            if self.ctx > block:
                raise UserError(f"--ctx {self.ctx} exceeds the model's context ({block}, "
                                f"{'--preset ' + self.preset if self.depth is None else '--depth'})", None,
                                f"give --block-size {self.ctx} to build a model with that context, or lower --ctx")
        super().check()


def lm_loss_step(model, batch):
    """Summed next-token cross-entropy over the batch; count = tokens. batch = (x, y), each (B, T)."""
    x, y = batch
    logits = model(x)                                                   # (B, T, V)
    loss = token_cross_entropy(logits, y, reduction="sum")
    n = y.numel()
    return loss, n, {"tokens": n}


def build_tokenizer(opts: PretrainOptions, log=print) -> Tokenizer:
    if opts.tokenizer:
        return Tokenizer.load(opts.tokenizer)
    if opts.byte_tokenizer:
        return Tokenizer.byte_level()
    docs = [d for p in expand_paths(opts.corpus) for d in read_documents(p)]
    if not docs:
        raise UserError("empty corpus: no documents found", ", ".join(map(str, opts.corpus)))
    log(f"training a {opts.vocab_size}-token byte-level BPE on {len(docs)} documents")
    return Tokenizer.train(docs, opts.vocab_size)


def build_model_config(opts: PretrainOptions, tok: Tokenizer) -> ModelConfig:
    over = {"vocab_size": pad_vocab(tok.vocab_size), **arch_overrides(opts.arch)}
    if opts.block_size or opts.ctx:
        over["block_size"] = opts.block_size or opts.ctx      # check() keeps --ctx within the preset's
    if opts.depth:
        return ModelConfig.from_depth(opts.depth, **over)
    return ModelConfig.from_name(opts.preset, **over)


class PretrainStage(Stage):
    """Pretrain (or continue pretraining) a GPT on a corpus and write `out` (.tinygpt).

    PretrainStage(PretrainOptions(corpus=["c.txt"], out="m.tinygpt")).train()"""

    Options = PretrainOptions
    name = "train"
    loss_step = staticmethod(lm_loss_step)

    def __init__(self, options: PretrainOptions, model=None, tokenizer=None, log=None):
        super().__init__(options, log)
        self.model, self.tok = model, tokenizer

    def setup(self, run) -> None:
        o, log = self.opts, run.log
        check_out(o.out)
        expand_paths(o.corpus)                       # missing files are refused before any work
        if self.model is None and o.init:
            self.model, self.tok = load_model_and_tokenizer(o.init)
        elif self.model is None:
            self.tok = build_tokenizer(o, log)
            cfg = build_model_config(o, self.tok)
            torch.manual_seed(o.seed)
            self.model = GPT(cfg)
        if self.tok.doc_prefix is None and self.tok.eos is not None:
            self.tok.doc_prefix = self.tok.eos     # the shards put EOS before every document but the first
        cfg = self.model.config
        self.ctx = o.ctx or cfg.block_size
        if self.ctx > cfg.block_size:
            raise UserError(f"--ctx {self.ctx} exceeds the model's context {cfg.block_size}", o.init,
                            "lower --ctx (the context of a model read with --init is fixed)")
        self.model.to(run.device)
        out = Path(o.out)
        data = tokenize_corpus(o.corpus, self.tok, out.parent / ".tinygpt-cache", o.val_split, o.seed, log)
        files = ", ".join(Path(f).name for f in data["meta"]["files"])
        self.train_batches = TokenBatches(data["train"], self.ctx, o.batch, o.seed, run.device, run.rank,
                                          f"the training split of {files}")
        self.val = None
        if data["val"] is not None and len(data["val"]) > self.ctx + 1:
            self.val = TokenBatches(data["val"], self.ctx, o.batch, o.seed, run.device, name="the validation split")
        self.plan = resolve_plan(o, o.steps, warmup_cap=50, validates=self.val is not None)
        log(f"model: {self.model.num_params() / 1e6:.2f}M parameters, {cfg.n_layer} layers x {cfg.n_embd}, "
            f"context {self.ctx}, vocab {self.tok.vocab_size} (padded {cfg.vocab_size}), device {run.device}")
        self._key = {"model": cfg.to_json(), "ctx": self.ctx, "batch": o.batch, "accum": o.accum,
                     "corpus": str(data["dir"].name), "seed": o.seed, "world": run.world}

    def resume_key(self) -> dict:
        return self._key

    def batch(self, i: int):
        return self.train_batches(i)

    def validate(self, model, n_batches: int = 8) -> dict:
        tot = cnt = 0.0
        for x, y in self.val.fixed(n_batches):
            tot += token_cross_entropy(model(x), y, reduction="sum").item()
            cnt += y.numel()
        return {"val_loss": tot / cnt}

    def save(self, final: bool) -> None:
        save_model(self.opts.out, self.model, self.tok, self.artifact_metadata())
        if final:
            self.log(f"saved {self.opts.out}")
