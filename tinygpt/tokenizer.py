"""Tokenizer: a thin wrapper over Hugging Face `tokenizers`.

Design choices:
- Byte-level BPE (GPT-2 style) so any UTF-8 text round-trips; training takes seconds for a few MB.
- Special tokens are reserved from the start: BOS, EOS (also the document separator), PAD and the
  ChatML pair `<|im_start|>` / `<|im_end|>`, so chat fine-tuning never has to grow the vocabulary
  of a model we trained ourselves.
- Imported tokenizers (a `tokenizer.json` or a Hugging Face folder) keep their own special tokens
  and `chat_template`; we only record which ids play the BOS/EOS/PAD roles.
- Special tokens written in text (e.g. a rendered chat template) are matched as single tokens by
  `tokenizers` itself, so templates are plain strings.
- `doc_prefix`: the token a model saw before every document when it was trained (ours: EOS, which
  separates documents in the pretraining shards; Llama-style models: BOS). Evaluation puts it
  before every context, and an exported tokenizer.json adds it through a TemplateProcessing
  post-processor, so lm-evaluation-harness run with `add_bos_token=True` scores the same text.
  `encode` never adds it: callers place it where it belongs. An imported tokenizer's prefix is
  read from its post-processor (or `add_bos_token` in tokenizer_config.json).
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from .errors import UserError
from .io import atomic_write_text

BOS, EOS, PAD = "<|bos|>", "<|endoftext|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [EOS, BOS, PAD, IM_START, IM_END]

# Names used by common published tokenizers, tried in order when a file does not say.
_BOS_GUESSES = [BOS, "<s>", "<|begin_of_text|>", "<|endoftext|>", "<|im_start|>"]
_EOS_GUESSES = [EOS, "</s>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>"]
_PAD_GUESSES = [PAD, "<pad>", "<|finetune_right_pad_id|>"]


def template_prefix(tk_json: dict) -> str | None:
    """The special token a tokenizer.json's TemplateProcessing post-processor puts first, if any."""
    post = tk_json.get("post_processor") or {}
    items = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for p in items:
        if p.get("type") == "TemplateProcessing" and p.get("single"):
            first = p["single"][0]
            return first.get("SpecialToken", {}).get("id")
    return None


def _token_str(v):
    """tokenizer_config.json stores a special token as a string or as {"content": ...}."""
    if isinstance(v, dict):
        return v.get("content")
    return v


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer` with the roles (bos/eos/pad) and an optional chat template."""

    def __init__(self, tk: HFTokenizer, bos: str | None = None, eos: str | None = None,
                 pad: str | None = None, chat_template: str | None = None, doc_prefix: str | None = "detect"):
        """doc_prefix: a token of the vocabulary, None, or "detect" (from the post-processor)."""
        self.tk = tk
        vocab = tk.get_vocab(with_added_tokens=True)

        def pick(given, guesses):
            if given is not None and given in vocab:
                return given
            return next((g for g in guesses if g in vocab), None)

        self.bos = pick(bos, _BOS_GUESSES)
        self.eos = pick(eos, _EOS_GUESSES)
        self.pad = pick(pad, _PAD_GUESSES) or self.eos
        self.chat_template = chat_template
        if doc_prefix == "detect":
            doc_prefix = template_prefix(json.loads(tk.to_str()))
        self.doc_prefix = doc_prefix if doc_prefix in vocab else None

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def train(cls, texts, vocab_size: int, min_frequency: int = 2) -> "Tokenizer":
        """Train a byte-level BPE on an iterable of strings (documents)."""
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise UserError(f"--vocab-size {vocab_size} is too small", None,
                            f"use at least {256 + len(SPECIAL_TOKENS)} (256 bytes + specials)")
        tk = HFTokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tk.train_from_iterator(texts, trainer=trainer)
        return cls(tk, doc_prefix=EOS)

    @classmethod
    def byte_level(cls) -> "Tokenizer":
        """256 byte tokens plus the special tokens, no merges: for tiny models and tests."""
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        vocab = {s: i for i, s in enumerate(SPECIAL_TOKENS)}
        for ch in alphabet:
            vocab[ch] = len(vocab)
        tk = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        tk.add_special_tokens(SPECIAL_TOKENS)
        return cls(tk, doc_prefix=EOS)

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """Load a `tokenizer.json` file or a Hugging Face tokenizer folder."""
        p = Path(path)
        if not p.exists():
            raise UserError(f"tokenizer not found: {p}", None, "pass a tokenizer.json or a Hugging Face folder")
        cfg: dict = {}
        if p.is_dir():
            cfg_path = p / "tokenizer_config.json"
            if cfg_path.exists():
                try:
                    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise UserError(f"invalid JSON ({e})", str(cfg_path)) from None
            jinja = p / "chat_template.jinja"
            if "chat_template" not in cfg and jinja.exists():
                cfg["chat_template"] = jinja.read_text(encoding="utf-8")
            p = p / "tokenizer.json"
            if not p.exists():
                raise UserError("Hugging Face folder has no tokenizer.json", str(path),
                                "only fast tokenizers (tokenizer.json) are supported")
        try:
            tk = HFTokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise UserError(f"cannot read tokenizer ({str(e).splitlines()[0][:120]})", str(p)) from None
        tmpl = cfg.get("chat_template")
        if isinstance(tmpl, list):  # some configs hold several named templates
            tmpl = next((t.get("template") for t in tmpl if t.get("name") == "default"), None)
        bos = _token_str(cfg.get("bos_token"))
        prefix = template_prefix(json.loads(tk.to_str())) or (bos if cfg.get("add_bos_token") else None)
        return cls(tk, bos, _token_str(cfg.get("eos_token")), _token_str(cfg.get("pad_token")), tmpl, prefix)

    # ---- serialisation (the .tinygpt file stores both strings) --------------------------------
    def to_json(self) -> str:
        return self.tk.to_str()

    def export_json(self) -> str:
        """tokenizer.json for other tools: with a post-processor that adds `doc_prefix` when asked
        for special tokens (`tokenizer(text)` in transformers), none otherwise."""
        tk = HFTokenizer.from_str(self.tk.to_str())
        if self.doc_prefix is not None:
            p, i = self.doc_prefix, self.token_to_id(self.doc_prefix)
            tk.post_processor = processors.TemplateProcessing(single=f"{p} $A", pair=f"{p} $A $B:1",
                                                              special_tokens=[(p, i)])
        else:
            tk.post_processor = None
        return tk.to_str()

    def config_json(self) -> str:
        return json.dumps({"bos": self.bos, "eos": self.eos, "pad": self.pad,
                           "chat_template": self.chat_template, "doc_prefix": self.doc_prefix})

    @classmethod
    def from_json(cls, tokenizer_json: str, config_json: str | None = None) -> "Tokenizer":
        cfg = json.loads(config_json) if config_json else {}
        # files written before the prefix was recorded always scored after EOS
        prefix = cfg.get("doc_prefix", cfg.get("eos", EOS)) if config_json else "detect"
        return cls(HFTokenizer.from_str(tokenizer_json), cfg.get("bos"), cfg.get("eos"),
                   cfg.get("pad"), cfg.get("chat_template"), prefix)

    def save(self, path) -> None:
        atomic_write_text(path, self.to_json())

    # ---- use ----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tk.id_to_token(i)

    def prefix_ids(self) -> list[int]:
        """[the id of doc_prefix], or [] when the model saw nothing before a document."""
        return [] if self.doc_prefix is None else [self.token_to_id(self.doc_prefix)]

    @property
    def bos_id(self):
        return None if self.bos is None else self.tk.token_to_id(self.bos)

    @property
    def eos_id(self):
        return None if self.eos is None else self.tk.token_to_id(self.eos)

    @property
    def pad_id(self):
        return None if self.pad is None else self.tk.token_to_id(self.pad)

    def stop_ids(self) -> list[int]:
        """Token ids that end a generation: EOS and the end-of-turn markers the vocabulary has."""
        names = [self.eos, IM_END, "<|eot_id|>", "<|end_of_text|>", "</s>"]
        ids = {self.tk.token_to_id(n) for n in names if n}
        return sorted(i for i in ids if i is not None)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Encode text; special tokens written in it (e.g. `<|im_end|>`) become single ids.
        No template post-processor is applied: BOS/EOS are added only when asked."""
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once; `tokenizers` spreads the work over all cores."""
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)

    def add_special_tokens(self, tokens: list[str]) -> list[str]:
        """Add missing special tokens; returns the ones that were new (their ids are appended)."""
        vocab = self.tk.get_vocab(with_added_tokens=True)
        new = [t for t in tokens if t not in vocab]
        if new:
            self.tk.add_special_tokens(new)
        return new
