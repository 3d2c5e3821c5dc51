"""`tinygpt data synth` (the embedded synthetic world) and `tinygpt tokenizer train` (a byte-level BPE)."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import LIMITS
from ..data.corpus import expand_paths, read_documents
from ..data.synth import generate
from ..errors import UserError
from ..io import check_writable
from ..options import SEED, Options, between, option
from ..tokenizer import Tokenizer


@dataclass
class SynthOptions(Options):
    command = "data synth"
    out: str | None = option(None, "output folder", required=True)
    seed: int = option(0, "the world's seed", check=SEED)
    scale: float = option(1.0, "multiply the number of documents and rows", check=between(0, 1000, lo_open=True))


def synth(opts: SynthOptions) -> None:
    check_writable(opts.out, folder=True)
    for name, path in generate(opts.out, seed=opts.seed, scale=opts.scale).items():
        print(f"{name:10s} {path}")


@dataclass
class TokenizerOptions(Options):
    command = "tokenizer train"
    corpus: list[str] = option([], "text files, folders or globs", many=True, required=True)
    vocab_size: int = option(4096, "tokens in the vocabulary (256 bytes + specials + merges)",
                             check=between(261, LIMITS["vocab_size"][1]))
    out: str | None = option(None, "output tokenizer.json", required=True)


def train_tokenizer(opts: TokenizerOptions) -> None:
    check_writable(opts.out)
    docs = [d for p in expand_paths(opts.corpus) for d in read_documents(p)]
    if not docs:
        raise UserError("empty corpus: no documents found", ", ".join(opts.corpus))
    tok = Tokenizer.train(docs, opts.vocab_size)
    tok.save(opts.out)
    print(f"wrote {opts.out} ({tok.vocab_size} tokens)")
