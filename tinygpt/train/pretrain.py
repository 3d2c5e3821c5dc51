"""Pretraining: next-token prediction on a tokenized corpus.

The stage supplies only its data and its loss step; `Engine` does the rest.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import save_model
from ..config import ModelConfig, arch_overrides, pad_vocab
from ..data.corpus import TokenBatches, expand_paths, read_documents, tokenize_corpus
from ..errors import UserError
from ..losses import token_cross_entropy
from ..model import GPT
from ..tokenizer import Tokenizer
from .engine import Engine, TrainConfig, setup_device
from .optim import default_warmup


def lm_loss_step(model, batch):
    """Summed next-token cross-entropy over the batch; count = tokens."""
    x, y = batch
    logits = model(x)                                                   # (B, T, V)
    loss = token_cross_entropy(logits, y, reduction="sum")
    n = y.numel()
    return loss, n, {"tokens": n}


@dataclass
class PretrainArgs:
    corpus: list
    out: str
    preset: str = "tiny"
    depth: int = 0
    arch: str | None = None         # block family over the preset's shape (config.ARCHS)
    tokenizer: str | None = None
    vocab_size: int = 4096
    byte_tokenizer: bool = False
    ctx: int = 0
    val_split: float = 0.0
    device: str = "auto"
    init: str | None = None         # continue pretraining from this .tinygpt or Hugging Face folder


def build_tokenizer(args: PretrainArgs, log=print) -> Tokenizer:
    if args.tokenizer:
        return Tokenizer.load(args.tokenizer)
    if args.byte_tokenizer:
        return Tokenizer.byte_level()
    docs = [d for p in expand_paths(args.corpus) for d in read_documents(p)]
    if not docs:
        raise UserError("empty corpus: no documents found", ", ".join(map(str, args.corpus)))
    log(f"training a {args.vocab_size}-token byte-level BPE on {len(docs)} documents")
    return Tokenizer.train(docs, args.vocab_size)


def build_model_config(args: PretrainArgs, tok: Tokenizer) -> ModelConfig:
    vocab = pad_vocab(tok.vocab_size)
    over = {"vocab_size": vocab, **arch_overrides(args.arch)}
    if args.ctx:
        over["block_size"] = args.ctx
    if args.depth:
        return ModelConfig.from_depth(args.depth, **over)
    cfg = ModelConfig.from_name(args.preset, **over)
    return cfg


def pretrain(args: PretrainArgs, tcfg: TrainConfig, log=print) -> dict:
    """Train (or continue training) a GPT on a corpus and write `args.out` (.tinygpt)."""
    device, rank, world = setup_device(args.device)
    if args.init:   # a .tinygpt, a Hugging Face folder or a .gguf, as every other stage reads them
        from .. import load_model_and_tokenizer
        model, tok = load_model_and_tokenizer(args.init)
        cfg = model.config
    else:
        tok = build_tokenizer(args, log)
        cfg = build_model_config(args, tok)
        torch.manual_seed(tcfg.seed)
        model = GPT(cfg)
    ctx = args.ctx or cfg.block_size
    if ctx > cfg.block_size:
        raise UserError(f"--ctx {ctx} exceeds the model's context {cfg.block_size}", None, "lower --ctx")
    model.to(device)
    out = Path(args.out)
    data = tokenize_corpus(args.corpus, tok, out.parent / ".tinygpt-cache", args.val_split, tcfg.seed, log)
    files = ", ".join(Path(f).name for f in data["meta"]["files"])
    train = TokenBatches(data["train"], ctx, tcfg.batch, tcfg.seed, device, rank, f"the training split of {files}")
    val_fn = None
    if data["val"] is not None and len(data["val"]) > ctx + 1:
        val = TokenBatches(data["val"], ctx, tcfg.batch, tcfg.seed, device, name="the validation split")

        def val_fn(m, n_batches=8):
            tot = cnt = 0.0
            for x, y in val.fixed(n_batches):
                tot += token_cross_entropy(m(x), y, reduction="sum").item()
                cnt += y.numel()
            return {"val_loss": tot / cnt}
        if not tcfg.val_every:
            tcfg.val_every = tcfg.steps             # a held-out split is at least scored at the end
    if tcfg.warmup < 0:
        tcfg.warmup = default_warmup(tcfg.steps, 50)
    log(f"model: {model.num_params() / 1e6:.2f}M parameters, {cfg.n_layer} layers x {cfg.n_embd}, "
        f"context {ctx}, vocab {tok.vocab_size} (padded {cfg.vocab_size}), device {device}")
    tcfg.resume_key = {"model": cfg.to_json(), "ctx": ctx, "batch": tcfg.batch, "accum": tcfg.accum,
                       "corpus": str(data["dir"].name), "seed": tcfg.seed, "world": world}

    def save(final: bool):
        save_model(out, model, tok)

    engine = Engine(model, tcfg, lm_loss_step, train, out, save, val_fn, device, rank, world, log)
    last = engine.fit()
    if rank == 0:
        log(f"saved {out}")
    return last
