"""`tinygpt train`: pretraining by next-token prediction on a tokenized corpus.

The stage supplies its data (cached uint16/uint32 token shards, random windows per step), its
loss step and its validation; the engine does the rest. A tokenizer is trained on the corpus
unless one is given (`--tokenizer`, `--byte-tokenizer`); `--init` continues pretraining a
`.tinygpt`, Hugging Face folder or `.gguf` instead of building a fresh model.

The model built here: `--preset` (or `--depth`), then `--arch` (the block family), then any of
the shape options (`--n-layer`, `--n-embd`, `--mlp`, ...), each overriding what came before.
Its context (`block_size`) is `--block-size`, else `--ctx`, else the preset's: `--ctx 512` on a
preset builds a model for 512 positions, as a user asking for that context expects; with both
given, `--ctx` may not exceed `--block-size`. Shapes that no transformers / llama.cpp class loads
(`--arch modern`, `--mlp relu2`, ...) are named at the start, not when `tinygpt export` refuses.

Validation (`--val-split`) holds out documents, or the tail of every document when there are too
few (`data.corpus.split_documents`), and is scored on fixed non-overlapping windows bounded by
`--val-tokens` (`eval.ppl.window_loss`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import save_model
from ..config import (
    ARCHS,
    DEFAULT_ARCH,
    LIMITS,
    MAX_BLOCK_SIZE,
    MLPS,
    MOE_FIELDS,
    NORMS,
    POS_EMB,
    PRESETS,
    ROUTERS,
    ModelConfig,
    arch_overrides,
    pad_vocab,
)
from ..data.corpus import TokenBatches, describe_split, expand_paths, read_documents, tokenize_corpus, window_batches
from ..errors import UserError
from ..eval.ppl import window_loss
from ..interop.hf import family_of
from ..load import load_model_and_tokenizer
from ..model import GPT
from ..moe import active_params
from ..options import Options, at_least, between, option
from ..tokenizer import Tokenizer
from ..train.stage import AUTO_VAL_EVERY, Stage, TrainOptions
from .common import HeadLossOptions, check_out, resolve_plan

DEFAULT_VAL_TOKENS = 1 << 20


def _size(field: str):
    """The range of a shape option: what a config may hold (LIMITS), from 1."""
    return between(max(1, LIMITS[field][0]), LIMITS[field][1])


@dataclass
class ModelShapeOptions(Options):
    """The model a new run builds: a preset or --depth, a block family, then any single field."""

    group = "model shape"
    preset: str = option("tiny", "model size", choices=tuple(PRESETS))
    depth: int | None = option(None, "one scaling dial: width 64*depth, heads of 128 (overrides --preset)",
                               check=_size("n_layer"))
    arch: str | None = option(None, f"block family over that shape (default {DEFAULT_ARCH}: RoPE, RMSNorm, SwiGLU, "
                              "QK-norm, untied head); modern is nanochat's ReLU^2 block, which transformers and "
                              "llama.cpp cannot load", choices=tuple(ARCHS))
    n_layer: int | None = option(None, "transformer blocks", auto="the preset's", check=_size("n_layer"))
    n_head: int | None = option(None, "attention heads", auto="the preset's", check=_size("n_head"))
    n_kv_head: int | None = option(None, "key/value heads (fewer than --n-head: grouped-query attention)",
                                   auto="--n-head", check=_size("n_kv_head"))
    n_embd: int | None = option(None, "width of the residual stream", auto="the preset's", check=_size("n_embd"))
    head_dim: int | None = option(None, "dimensions per attention head", auto="n_embd / n_head", check=_size("head_dim"))
    intermediate_size: int | None = option(None, "hidden width of the MLP",
                                           auto="4 * n_embd, or 8/3 * n_embd rounded up to 64 for swiglu",
                                           check=_size("intermediate_size"))
    block_size: int | None = option(None, "longest context the model supports", auto="--ctx, else the preset's",
                                    check=_size("block_size"))
    pos_emb: str | None = option(None, "position encoding", auto="the block family's", choices=POS_EMB)
    norm: str | None = option(None, "normalisation layers", auto="the block family's", choices=NORMS)
    mlp: str | None = option(None, "MLP activation", auto="the block family's", choices=MLPS)
    tie_embeddings: bool | None = option(None, "the output head shares the token embedding",
                                         auto="the block family's", negate="--no-tie-embeddings")
    qk_norm: bool | None = option(None, "RMSNorm on queries and keys per head", auto="the block family's",
                                  negate="--no-qk-norm")
    n_experts: int | None = option(None, "routed experts per MoE layer (mixture of experts; 0 = dense MLPs)",
                                   auto="0", check=between(0, LIMITS["n_experts"][1]))
    n_experts_active: int | None = option(None, "routed experts each token goes through (top-k)",
                                          auto="min(2, --n-experts)", check=_size("n_experts_active"))
    n_shared_experts: int | None = option(None, "experts every token goes through besides its routed ones",
                                          auto="0", check=between(0, LIMITS["n_shared_experts"][1]))
    expert_intermediate_size: int | None = option(None, "hidden width of each expert",
                                                  auto="--intermediate-size / (active + shared), rounded up to 16",
                                                  check=_size("expert_intermediate_size"))
    moe_every: int | None = option(None, "every Nth layer is MoE (layer i when (i+1) % N == 0), the others dense",
                                   auto="1", check=_size("moe_every"))
    router: str | None = option(None, "softmax: top-k of a softmax, balanced by the load-balancing and z losses; "
                                "sigmoid_bias: DeepSeek-V3's auxiliary-loss-free balancing bias", auto="softmax",
                                choices=ROUTERS)
    norm_topk_prob: bool | None = option(None, "renormalise the chosen experts' weights to sum to 1", auto="on",
                                         negate="--no-norm-topk-prob")
    router_aux_coef: float | None = option(None, "coefficient of the load-balancing loss (softmax router)",
                                           auto="0.01", check=between(*LIMITS["router_aux_coef"]))
    router_z_coef: float | None = option(None, "coefficient of the router z-loss (softmax router)", auto="0.001",
                                         check=between(*LIMITS["router_z_coef"]))
    router_bias_rate: float | None = option(None, "balancing-bias step per optimizer step at the peak learning "
                                            "rate, decaying with it after warm-up (sigmoid_bias router)",
                                            auto="0.001", check=between(*LIMITS["router_bias_rate"]))
    dropout: float | None = option(None, "dropout in training (embeddings, attention, block outputs); 0.1-0.2 "
                                   "for a small corpus trained for many epochs", auto="0, or the --init model's",
                                   check=between(0, 1, hi_open=True))


SHAPE_FIELDS = ("n_layer", "n_head", "n_kv_head", "n_embd", "head_dim", "intermediate_size", "block_size",
                "pos_emb", "norm", "mlp", "tie_embeddings", "qk_norm", *MOE_FIELDS)


@dataclass
class PretrainOptions(ModelShapeOptions, HeadLossOptions, TrainOptions):
    """What to pretrain on."""

    command = "train"
    group = "pretraining"
    corpus: list[str] = option([], "text files, folders or globs (.txt .jsonl .json .parquet)", many=True,
                               required=True)
    tokenizer: str | None = option(None, "tokenizer.json or Hugging Face folder", auto="train one on the corpus")
    vocab_size: int = option(4096, "vocabulary of the tokenizer trained here",
                             check=between(261, LIMITS["vocab_size"][1]))
    byte_tokenizer: bool = option(False, "use 256 bytes + specials, no BPE")
    ctx: int | None = option(None, "context length of the training windows", auto="the model's context",
                             check=between(1, MAX_BLOCK_SIZE))
    val_split: float = option(0.0, "fraction held out for validation: whole documents, or the end of every "
                              "document when there are too few", check=between(0, 1, hi_open=True))
    val_tokens: int | None = option(None, "predictions scored per validation", auto=f"the whole split, at most "
                                    f"{DEFAULT_VAL_TOKENS:,}", check=at_least(1))
    init: str | None = option(None, "continue pretraining from this .tinygpt, Hugging Face folder or .gguf")
    steps: int | None = option(1000, "optimizer steps", check=at_least(1))
    batch: int = option(16, "micro-batch size (rows)", check=at_least(1))
    lr: float | None = option(1e-3, "peak learning rate", check=between(0, 1, lo_open=True))
    warmup: int | None = option(None, "warmup steps", auto="50, at most 10% of the steps", check=at_least(0))
    val_every: int | None = option(None, "validation every N steps", auto=AUTO_VAL_EVERY,
                                   check=at_least(0))

    def check(self) -> None:
        if self.tokenizer and self.byte_tokenizer:
            raise UserError("--tokenizer and --byte-tokenizer both given", None, "give one of them")
        if self.init:
            fixed = [f"--{n.replace('_', '-')}" for n in ("tokenizer", "byte_tokenizer", "depth", "arch", *SHAPE_FIELDS)
                     if getattr(self, n) not in (None, False)]
            if fixed:
                raise UserError("--init continues an existing model: its tokenizer and shape are fixed", None,
                                f"drop {', '.join(fixed)}")
        elif self.ctx and self.block_size and self.ctx > self.block_size:
            raise UserError(f"--ctx {self.ctx} exceeds --block-size {self.block_size}", None,
                            "raise --block-size or lower --ctx")
        else:
            build_model_config(self, 256)                # a shape that cannot be built is refused now
        super().check()


# Passes over the training tokens past which the held-out loss of a small corpus usually turns up
# (tinyshakespeare at 6 x 384: its best comes after ~15 passes with dropout 0.2, sooner without).
MEMORISING_EPOCHS = 8


def memorising_hint(tokens_read: int, train_tokens: int, validated: bool, dropout: float) -> str | None:
    """A line for a run that reads its training split many times over with nothing to notice or
    slow memorising (no validation, no dropout): a small corpus trained with the defaults."""
    epochs = tokens_read / max(1, train_tokens)
    if epochs < MEMORISING_EPOCHS or (validated and dropout > 0):
        return None
    missing = [f for f, absent in (("--val-split 0.1 --keep-best", not validated), ("--dropout 0.1-0.2", dropout == 0))
               if absent]
    return (f"note: this run reads its {train_tokens:,} training tokens {epochs:.0f} times over and will learn "
            f"them by heart; where text it has not seen matters, {' and '.join(missing)} keep the model "
            "at its best held-out loss instead of the last step (see the README)")


def lm_loss_step(model, batch):
    """Summed next-token cross-entropy over the batch; count = tokens. batch = (x, y), each (B, T)."""
    x, y = batch
    loss = model(x, targets=y)                          # the head and the loss in one (compiled) call
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


def build_model_config(opts: ModelShapeOptions, vocab_size: int) -> ModelConfig:
    """The config of the model built here: preset or --depth, then --arch, then each shape option
    given, then --dropout; the context is --block-size, else --ctx, else the preset's."""
    over = {"vocab_size": pad_vocab(vocab_size), **arch_overrides(opts.arch)}
    over.update({n: getattr(opts, n) for n in SHAPE_FIELDS if getattr(opts, n) is not None})
    if opts.block_size is None and getattr(opts, "ctx", None):
        over["block_size"] = opts.ctx
    over["dropout"] = opts.dropout or 0.0
    try:
        if opts.depth:
            return ModelConfig.from_depth(opts.depth, **over)
        return ModelConfig.from_name(opts.preset, **over)
    except UserError as e:
        given = ", ".join(f"--{n.replace('_', '-')} {getattr(opts, n)}" for n in SHAPE_FIELDS
                          if getattr(opts, n) is not None)
        base = f"--depth {opts.depth}" if opts.depth else f"--preset {opts.preset}"
        raise UserError(f"model shape: {e.what}", base + (f" with {given}" if given else ""),
                        e.fix or "change the shape options") from None


def export_note(cfg: ModelConfig) -> str | None:
    """What `tinygpt export` would say about this shape, or None when it exports."""
    try:
        family_of(cfg)
    except UserError as e:
        return f"note: {e.what}; `tinygpt export` will refuse the model trained here ({e.fix})"
    return None


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
            note = export_note(build_model_config(o, 256))
            if note:
                log(note)
            self.tok = build_tokenizer(o, log)
            torch.manual_seed(o.seed)
            self.model = GPT(build_model_config(o, self.tok.vocab_size))
        if self.tok.doc_prefix is None and self.tok.eos is not None:
            self.tok.doc_prefix = self.tok.eos     # the shards put EOS before every document but the first
        cfg = self.model.config
        self.model.loss_chunk = o.loss_chunk
        if o.dropout is not None and o.dropout != cfg.dropout:    # --init with a new rate: recorded too
            cfg.dropout = o.dropout
            self.model.set_dropout(o.dropout)
        self.ctx = o.ctx or cfg.block_size
        if self.ctx > cfg.block_size:
            raise UserError(f"--ctx {self.ctx} exceeds the context of the --init model ({cfg.block_size})", o.init,
                            "lower --ctx")
        self.model.to(run.device)
        self._data(run)
        experts = (f" ({cfg.n_experts} experts, {cfg.n_experts_active} active + {cfg.n_shared_experts} shared, "
                   f"{cfg.router} router; {active_params(self.model) / 1e6:.2f}M active)") if cfg.is_moe else ""
        log(f"model: {self.model.num_params() / 1e6:.2f}M parameters, {cfg.n_layer} layers x {cfg.n_embd}, "
            f"{cfg.mlp} MLP{experts}, context {self.ctx}, vocab {self.tok.vocab_size} (padded {cfg.vocab_size}), "
            f"dropout {cfg.dropout:g}, device {run.device}")

    def _data(self, run) -> None:
        o, cfg = self.opts, self.model.config
        if run.world > 1 and run.rank != 0:
            dist.barrier()                  # rank 0 tokenizes and caches the corpus; the others then read it
        data = tokenize_corpus(o.corpus, self.tok, Path(o.out).parent / ".tinygpt-cache", o.val_split, o.seed, run.log)
        if run.world > 1 and run.rank == 0:
            dist.barrier()
        files = ", ".join(Path(f).name for f in data["meta"]["files"])
        self.train_batches = TokenBatches(data["train"], self.ctx, o.batch, o.seed, run.device, run.rank,
                                          f"the training split of {files}", run.world)
        self.val, self.device = data["val"], run.device
        if o.val_split:
            run.log(describe_split(data["meta"]))
        self.plan = resolve_plan(o, o.steps, warmup_cap=50, validates=self.val is not None)
        hint = memorising_hint(o.steps * o.batch * o.accum * run.world * self.ctx, len(data["train"]),
                               bool(o.val_split), cfg.dropout)
        if hint:
            run.log(hint)
        self._key = {"model": cfg.to_json(), "ctx": self.ctx, "global_batch": o.batch * o.accum * run.world,
                     "corpus": str(data["dir"].name), "seed": o.seed}

    def resume_key(self) -> dict:
        return self._key

    def batch(self, i: int):
        return self.train_batches(i)

    def validate(self, model) -> dict:
        """Mean loss per token over the fixed held-out windows (at most --val-tokens predictions)."""
        limit = self.opts.val_tokens or DEFAULT_VAL_TOKENS
        return {"val_loss": window_loss(model, window_batches(self.val, self.ctx, self.opts.batch, self.device, limit))}

    def save(self, final: bool) -> None:
        save_model(self.opts.out, self.model, self.tok, self.artifact_metadata())
        if final:
            self.log(f"saved {self.opts.out}")
