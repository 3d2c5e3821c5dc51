"""Set-up policies every stage (and every command that samples or renders chat) shares, written once.

- Option groups: `ModelOptions` (the model path and stacked adapters), `LoRAOptions` (LoRA versus
  full fine-tuning), `SamplingOptions`.
- Adapters: `--lora PATH[:WEIGHT]` (repeatable, stacked in order); the older `--lora-weight W`
  pairs with the --lora of the same position (`lora_specs`).
- The chat template, one rule for every command (`resolve_template`): an explicit `--template`
  wins; else the template recorded in the adapters (and in the model file, for a model trained
  here), all of them agreeing or an error; else the tokenizer's own `chat_template`; else chatml.
  Every stage that trains on chat records the template it used (`template_record`).
- Stop ids: the tokenizer's end-of-text / end-of-turn ids plus the template's single-token stop
  strings (`stop_ids`).
- Run length: epochs become steps by rounding UP (`epochs_to_steps`), so an epoch is never cut
  short; the default warmup is capped at 10% of the steps.
- Held-out splits: one seeded split for every kind of item (`split_items`).
- LoRA versus full: a fresh adapter seeded from --seed (trained in float32 over a possibly bf16
  base), or every weight trainable with the input adapters merged first (`make_trainable`); the
  reference of a preference or RL stage is the same model with that adapter off, or a frozen copy
  (`reference_for`).
"""
from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open

from ..chat import ensure_special_tokens, get_template
from ..device import setup_device
from ..errors import UserError
from ..io import check_writable, file_sha256, fingerprint
from ..load import load_model_and_tokenizer
from ..lora import DEFAULT_TARGETS, EXPERTS, apply_lora, check_rank, merge_and_unload
from ..options import Options, at_least, between, each, option
from ..train.engine import run_dir_for
from ..train.optim import default_warmup

CHATML = "chatml"


# ---- option groups ----------------------------------------------------------------------------
@dataclass
class ModelOptions(Options):
    """The model a command reads and the adapters stacked on it."""

    group = "model"
    model: str = option(None, ".tinygpt file, Hugging Face folder or .gguf", positional=True, required=True)
    lora: list[str] = option([], "adapter file, as PATH or PATH:WEIGHT (repeatable; they stack in order)", repeat=True)
    lora_weight: list[float] = option([], "weight of the --lora at the same position (older spelling of "
                                          "PATH:WEIGHT)", repeat=True, check=each(between(-100, 100)))
    allow_nonfinite: bool = option(False, "load weights holding NaN or infinite values (to inspect a diverged "
                                   "model; refused otherwise)")

    def check(self) -> None:
        lora_specs(self)
        super().check()


@dataclass
class TemplateOptions(Options):
    """The chat template (the one rule of `resolve_template` when not given)."""

    group = "chat"
    template: str | None = option(None, "chatml, llama3, zephyr, alpaca, raw, hf or FILE.jinja",
                                  auto="the adapters' recorded template, else the tokenizer's, else chatml")


@dataclass
class RowCheckOptions(Options):
    """What reading rows does with malformed and quirky rows (every data and prompt file)."""

    group = "data"
    skip_bad_rows: bool = option(False, "skip malformed rows (not JSON, a missing or mistyped field) instead of "
                                 "stopping")
    strict: bool = option(False, "stop at any row that would be skipped or changed (an empty reply, identical "
                          "replies, no reply, leading assistant turns) instead of skipping it")


@dataclass
class RowOptions(RowCheckOptions):
    """How a data file's rows are read."""

    group = "data"
    format: str | None = option(None, "row format", auto="detected from the first row")


@dataclass
class LoRAOptions(Options):
    """A fresh LoRA adapter (the default) or full fine-tuning."""

    group = "LoRA"
    full: bool = option(False, "train every weight and write a .tinygpt (default: a LoRA adapter, .lora)")
    lora_rank: int = option(16, "rank of the new adapter (at most the smaller side of each wrapped layer)",
                            check=between(1, 1 << 16))
    lora_alpha: float = option(32.0, "alpha of the new adapter (scale alpha/rank)", check=between(0, 1e6, lo_open=True))
    lora_dropout: float = option(0.0, "dropout on the adapter's input", check=between(0, 1, hi_open=True))
    lora_targets: list[str] = option(list(DEFAULT_TARGETS), "linear layers the adapter wraps (comma-separated)",
                                     check=lambda v: None if v else "must name at least one layer")
    lora_experts: bool = option(False, "also adapt the routed experts of a mixture of experts (per-expert "
                                "low-rank factors); without it: attention, MLPs and shared experts")


def lora_targets(opts) -> list[str]:
    """What a new adapter wraps: --lora-targets, plus the routed experts with --lora-experts."""
    return list(opts.lora_targets) + ([EXPERTS] if opts.lora_experts and EXPERTS not in opts.lora_targets else [])


@dataclass
class SamplingOptions(Options):
    """How new tokens are drawn."""

    group = "sampling"
    temperature: float = option(0.8, "0 = greedy", check=at_least(0))
    top_k: int = option(0, "keep the k most likely tokens (0 = off)", check=at_least(0))
    top_p: float = option(1.0, "nucleus sampling mass (1 = off)", check=between(0, 1, lo_open=True))


@dataclass
class HeadLossOptions(Options):
    """How the output head and its cross-entropy run (stages whose loss is next-token CE)."""

    group = "memory"
    loss_chunk: int = option(0, "positions per chunk of the output head and its loss, each chunk's gradients "
                             "formed as it goes, so the (tokens, vocabulary) logits never all exist (0: all at once)",
                             check=at_least(0))


@dataclass
class CheckpointingOptions(Options):
    """Activation memory of the stages that fine-tune a whole model's forward."""

    group = "memory"
    grad_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory)")


@dataclass
class PairDataOptions(RowOptions, TemplateOptions):
    """Preference data and how each pair is cut."""

    group = "data"
    data: str | None = option(None, "preference file (.jsonl .json .parquet, .gz): prompt/chosen/rejected, "
                              "UltraFeedback, HH-RLHF, ShareGPT pairs (KTO: label rows too)", required=True)
    max_length: int = option(1024, "prompt + reply tokens (replies cut at the end)", check=at_least(2))
    max_prompt_length: int = option(512, "prompt tokens kept (cut from the left)", check=at_least(1))
    epochs: float | None = option(None, "train for this many epochs (instead of --steps)", auto="1",
                                  check=between(0, 1e6, lo_open=True))
    val_split: float = option(0.0, "fraction of pairs held out for validation", check=between(0, 1, hi_open=True))
    packing: bool = option(True, "one sequence per row, right-padded", negate="--no-packing")

    def check(self) -> None:
        if self.max_prompt_length >= self.max_length:
            raise UserError(f"--max-prompt-length {self.max_prompt_length} must be below --max-length "
                            f"{self.max_length}")
        if getattr(self, "steps", None) and self.epochs:
            raise UserError("both --steps and --epochs given", None, "give one of them")
        super().check()


# ---- adapters ---------------------------------------------------------------------------------
def lora_specs(opts) -> list[tuple[str, float]]:
    """[(path, weight)] from --lora PATH[:WEIGHT] and the --lora-weight of the same position."""
    return adapter_specs(opts.lora, opts.lora_weight)


def adapter_specs(lora, lora_weight=(), flag: str = "--lora") -> list[tuple[str, float]]:
    """[(path, weight)] from PATH[:WEIGHT] items and the separate weights of the same position."""
    specs = []
    for i, spec in enumerate(lora):
        path, weight = spec, None
        head, sep, tail = spec.rpartition(":")
        if sep and head:
            try:
                path, weight = head, float(tail)
            except ValueError:
                pass                      # a ':' that is part of the path
        if weight is not None and not math.isfinite(weight):
            raise UserError(f"{flag} {spec}: the weight must be a finite number")
        if i < len(lora_weight):
            if weight is not None:
                raise UserError(f"{flag} {spec} has a weight and a --lora-weight too", None, "give one of them")
            weight = lora_weight[i]
        specs.append((path, 1.0 if weight is None else weight))
    if len(lora_weight) > len(lora):
        raise UserError(f"{len(lora_weight)} --lora-weight for {len(lora)} --lora", None,
                        "give one weight per adapter, or write --lora PATH:WEIGHT")
    return specs


def load_for_command(opts, device="auto"):
    """(device, model, tokenizer) of a command that reads a model: inputs checked first, the model
    loaded with its stacked adapters on this process's device."""
    check_inputs(opts)
    dev, _, _ = setup_device(device)
    return (dev, *load_opts_model(opts, device=dev))


def load_opts_model(opts, **kw):
    """(model, tokenizer) of ModelOptions: the model with its stacked adapters, finiteness as
    --allow-nonfinite says; a new adapter's rank (LoRAOptions) checked against it at once."""
    model, tok = load_model_and_tokenizer(opts.model, lora=lora_specs(opts), allow_nonfinite=opts.allow_nonfinite,
                                          **kw)
    if hasattr(opts, "lora_rank") and not opts.full:
        check_rank(model, opts.lora_rank, lora_targets(opts))
    return model, tok


def check_inputs(opts, *paths) -> None:
    """Files a command reads exist (checked before any work)."""
    model = getattr(opts, "model", None)
    if model is not None and not Path(model).exists():
        raise UserError(f"model not found: {model}", None, "pass a .tinygpt file, a Hugging Face folder or a .gguf")
    for path, _ in lora_specs(opts) if hasattr(opts, "lora") else []:
        if not Path(path).is_file():
            raise UserError(f"adapter not found: {path}", "--lora", "check the path")
    for flag, path in paths:
        if path is not None and not Path(path).exists():
            raise UserError(f"file not found: {path}", flag, "check the path")


def check_out(out, full: bool | None = None) -> None:
    """--out can be written; with `full` given, its suffix matches what the stage writes."""
    if out is None:
        raise UserError("--out is required", None, "give the output file")
    check_writable(out)
    run = run_dir_for(out)
    if run.exists() and not run.is_dir():
        raise UserError(f"the run folder beside --out is a file: {run}", str(out), "move that file or choose another --out")
    if full is None:
        return
    lora_out = Path(out).suffix == ".lora"
    if full and lora_out:
        raise UserError("--full writes a whole model, not an adapter", str(out), "use --out X.tinygpt")
    if not full and not lora_out:
        raise UserError("LoRA training writes an adapter file", str(out),
                        "use --out X.lora (or --full for a .tinygpt; `tinygpt merge` folds an adapter in)")


def weights_key(model_path, adapters, model=None) -> list:
    """What identifies a model's weights in a cache key: the bytes (sha256) of its file and of its
    adapters [(path, weight)], or for a folder or a model given in memory a fingerprint of its weights."""
    if model_path is not None and Path(model_path).is_file():
        return [file_sha256(model_path)[:16]] + [[file_sha256(p)[:16], w] for p, w in adapters]
    return [fingerprint(model.state_dict())]


# ---- the chat template --------------------------------------------------------------------------
TEMPLATE_KEYS = ("chat_template", "sft_template", "template")   # the first is written; all are read


def template_record(template) -> dict:
    """Metadata a stage writes beside its artifact: the template it rendered chat with."""
    spec = template.source if template.name == "jinja" else template.name
    return {"chat_template": spec}


def _recorded(meta: dict) -> str | None:
    return next((meta[k] for k in TEMPLATE_KEYS if meta.get(k)), None)


def recorded_templates(model_path=None, adapters=()) -> list[tuple[str, str]]:
    """(file, template) for each of the model file(s) and the adapters that recorded one."""
    out = []
    for path in model_path if isinstance(model_path, (list, tuple)) else [model_path]:
        if path is not None and Path(path).is_file() and Path(path).suffix == ".tinygpt":
            meta = _file_meta(path)
            if _recorded(meta):
                out.append((str(path), _recorded(meta)))
    for spec in adapters:
        path = spec if isinstance(spec, (str, Path)) else spec[0]
        t = _recorded(_file_meta(path))
        if t:
            out.append((str(path), t))
    return out


def _file_meta(path) -> dict:
    """A safetensors file's metadata, read without loading its tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:
        return {}


def resolve_template(explicit, tokenizer, model_path=None, adapters=(), fallback: bool = True):
    """The chat template by the one rule (see the module docstring). model_path may be a list
    (distillation consults the student's and the teacher's files). fallback=False: None instead
    of the tokenizer's template / chatml when nothing was given or recorded."""
    if explicit:
        return get_template(explicit, tokenizer)
    found = recorded_templates(model_path, adapters)
    names = {t for _, t in found}
    if len(names) > 1:
        listing = ", ".join(f"{Path(f).name}: {t if len(t) < 40 else 'a Jinja template'}" for f, t in found)
        raise UserError(f"the model files were trained with different chat templates ({listing})", None,
                        "pass --template to choose one")
    if names:
        return get_template(names.pop(), tokenizer)
    return get_template(None, tokenizer) if fallback else None   # the tokenizer's own, else chatml


def stop_ids(tokenizer, template=None) -> list[int]:
    """EOS / end-of-turn ids of the tokenizer plus the template's single-token stop strings."""
    ids = set(tokenizer.stop_ids())
    for s in getattr(template, "stop_strings", None) or []:
        i = tokenizer.token_to_id(s)
        if i is not None:
            ids.add(i)
    return sorted(ids)


def template_tokens(model, tokenizer, template, may_add: bool, where) -> list[str]:
    """The template's special tokens the tokenizer lacks: added (and the embeddings grown) when the
    stage may change the vocabulary (full fine-tuning: an adapter is tied to its base's), else
    refused. Returns the added tokens."""
    vocab = tokenizer.tk.get_vocab(with_added_tokens=True)
    missing = [t for t in template.special_tokens if t not in vocab]
    if missing and not may_add:
        raise UserError(f"the tokenizer lacks the chat template's tokens {', '.join(missing)}", where,
                        "run SFT with this template first, pick another --template, or use --full")
    added = ensure_special_tokens(tokenizer, template) if missing else []
    if added:
        model.resize_token_embeddings(max(tokenizer.vocab_size, model.config.vocab_size))
    return added


# ---- run length and splits ------------------------------------------------------------------------
def epochs_to_steps(epochs: float, n_items: int, per_step: int) -> int:
    """Optimizer steps for `epochs` passes over `n_items` at `per_step` items a step (rounded up)."""
    return max(1, math.ceil(epochs * n_items / per_step))


def split_items(items: list, frac: float, seed: int) -> tuple[list, list]:
    """A seeded held-out split: round(frac * n) items, at least one when frac > 0 (and at least
    one left to train on)."""
    if frac <= 0:
        return list(items), []
    order = list(range(len(items)))
    random.Random(f"split/{seed}").shuffle(order)
    n_val = max(1, round(len(items) * frac))
    if n_val >= len(items):
        raise UserError(f"--val-split {frac} leaves no training data ({len(items)} items)", None,
                        "lower --val-split or add data")
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]


# ---- LoRA versus full, and the reference ------------------------------------------------------------
def make_trainable(model, opts, name: str = "default", log=print) -> int:
    """A fresh adapter `name` (seeded from --seed; trained in float32 over any base dtype), or with
    --full every weight trainable (input adapters merged first). Returns the trainable count."""
    if opts.full:
        merge_and_unload(model)
        for p in model.parameters():
            p.data = p.data.float()
            p.requires_grad_(True)
        return sum(p.numel() for p in model.parameters())
    torch.manual_seed(opts.seed)          # the adapter's random A is part of the run's seed
    n = apply_lora(model, opts.lora_rank, opts.lora_alpha, opts.lora_dropout, lora_targets(opts), name=name)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return n


def reference_for(model, full: bool, name: str = "default"):
    """The frozen reference: a copy of the weights (full fine-tuning) or the name of the adapter
    whose switching off gives it (LoRA: no second copy in memory)."""
    if full:
        return copy.deepcopy(model).eval().requires_grad_(False)
    return name


def compile_blocks(gpt, training_only: bool = False) -> None:
    """torch.compile each block (for loss steps with data-dependent Python around the model);
    `training_only`: for training forwards only, the rest (sampling) keeps the eager blocks."""
    if training_only:
        gpt.compile_training_blocks()
        return
    for block in gpt.model.layers:
        block.compile()



# Post-training learning rates are quoted for 1B-class models (width 2048: Llama 3.2 1B, Qwen2.5
# 1.5B); a narrower model gets them scaled by 2048 / width (the hidden-matrix rate goes as 1/width,
# muP's rule), at most 32x: SFT LoRA 2e-4 becomes 5.3e-4 at GPT-2's 768 and 3.2e-3 for the `tiny`
# base trained here (128), where 2e-4 barely moves the adapter in a few hundred steps.
LR_REFERENCE_WIDTH = 2048
LR_MAX_SCALE = 32.0


def default_lr(opts, base: float, model, log=print) -> float:
    """--lr if given, else `base` (the rate for width >= 2048) scaled for this model's width, logged."""
    if opts.lr is not None:
        return opts.lr
    width = model.config.n_embd
    lr = base * min(LR_MAX_SCALE, max(1.0, LR_REFERENCE_WIDTH / width))
    log(f"lr {lr:.3g} (the default for a model {width} wide: {base:g} x {LR_REFERENCE_WIDTH}/{width}, "
        f"at most {LR_MAX_SCALE:g}x; --lr to choose)")
    return lr


def resolve_plan(opts, steps: int, lr: float | None = None, warmup_cap: int = 0, validates: bool = False, **more):
    """The options with every automatic value resolved: steps (epochs are turned into steps by the
    caller), lr, min_lr (lr/10), warmup (at most `warmup_cap` steps and 10% of the run unless
    given) and val_every (when there is held-out data: at the end, or 20 times over the run when
    the best checkpoint is kept or an early stop is watched; 0 when there is none)."""
    lr = lr if lr is not None else opts.lr
    warmup = opts.warmup if opts.warmup is not None else default_warmup(steps, warmup_cap)
    watch = getattr(opts, "keep_best", False) or getattr(opts, "early_stop", 0)
    val_every = (opts.val_every or (max(1, steps // 20) if watch else steps)) if validates else 0
    if hasattr(opts, "epochs"):
        more["epochs"] = None          # now given as steps
    return replace(opts, steps=steps, lr=lr, min_lr=lr / 10 if opts.min_lr is None else opts.min_lr,
                   warmup=min(warmup, steps), val_every=val_every, **more)
