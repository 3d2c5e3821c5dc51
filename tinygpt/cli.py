"""The `tinygpt` command line: one argparse entry point.

Each subcommand has an `add_<name>` function that declares its flags and sets `func` to a small
`run_<name>` that calls one importable function. `--config FILE.yaml` supplies the same options
(keys spelled like the flags, with - or _); flags given on the command line win.
A user mistake prints one line `tinygpt: error: <what>, <where>, <what to do>` and exits 2.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .config import ARCHS
from .data.formats import SkippedRowsWarning
from .errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2 (like every other user error)."""

    def error(self, message):
        raise UserError(message, f"'{self.prog}'", f"see '{self.prog} --help'")


def _train_flags(p, steps=1000, lr=3e-4, batch=8, schedule="cosine", warmup=0, wd=0.1):
    """Flags every training stage shares (they map onto engine.TrainConfig)."""
    g = p.add_argument_group("training")
    g.add_argument("--out", required=True, help="output file")
    g.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    g.add_argument("--batch", type=int, default=batch, help="micro-batch size (rows)")
    g.add_argument("--accum", type=int, default=1, help="gradient accumulation micro-steps per step")
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--min-lr", type=float, default=None, help="final lr (default lr/10)")
    g.add_argument("--lr-schedule", default=schedule, choices=["cosine", "linear", "constant", "wsd"])
    g.add_argument("--warmup", type=int, default=warmup, help="warmup steps")
    g.add_argument("--weight-decay", type=float, default=wd)
    g.add_argument("--beta1", type=float, default=0.9)
    g.add_argument("--beta2", type=float, default=0.95)
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    g.add_argument("--compile", action="store_true", help="torch.compile the training step")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps")
    g.add_argument("--val-every", type=int, default=0, help="validation loss every N steps")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resume", action="store_true", help="continue from the run folder's saved state")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--config", help="YAML file with the same options (flags win)")


def train_config(a):
    from .train.engine import TrainConfig
    for name in ("steps", "batch", "accum"):
        if getattr(a, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(a, name)}")
    if a.lr <= 0:
        raise UserError(f"--lr must be > 0, got {a.lr}")
    if a.save_every < 0 or a.val_every < 0:
        raise UserError("--save-every and --val-every must be >= 0 (0 = off)")
    if Path(a.out).is_dir():  # caught before training, not when the result is written
        raise UserError("--out is a folder; training writes one file", a.out, "give a file path, e.g. model.tinygpt")
    return TrainConfig(steps=a.steps, batch=a.batch, accum=a.accum, lr=a.lr,
                       min_lr=a.lr / 10 if a.min_lr is None else a.min_lr, lr_schedule=a.lr_schedule,
                       warmup=min(a.warmup, a.steps), weight_decay=a.weight_decay, beta1=a.beta1,
                       beta2=a.beta2, grad_clip=a.grad_clip, dtype=a.dtype, compile=a.compile,
                       save_every=a.save_every, val_every=a.val_every, seed=a.seed, quiet=a.quiet,
                       resume=a.resume)


def _log(a):
    return (lambda *m: None) if getattr(a, "quiet", False) else (lambda *m: print(*m, file=sys.stderr))


# ---- tokenizer --------------------------------------------------------------------------------------
def add_tokenizer(sub):
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tsub = p.add_subparsers(dest="action", required=True, parser_class=Parser)
    t = tsub.add_parser("train", help="train a BPE on a corpus")
    t.add_argument("--corpus", nargs="+", required=True, help="text files or globs")
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--out", required=True, help="output tokenizer.json")
    t.set_defaults(func=run_tokenizer_train)


def run_tokenizer_train(a):
    from .data.corpus import expand_paths, read_documents
    from .tokenizer import Tokenizer
    docs = [d for p in expand_paths(a.corpus) for d in read_documents(p)]
    if not docs:
        raise UserError("empty corpus: no documents found", ", ".join(a.corpus))
    tok = Tokenizer.train(docs, a.vocab_size)
    tok.save(a.out)
    print(f"wrote {a.out} ({tok.vocab_size} tokens)")


# ---- pretraining ------------------------------------------------------------------------------------
def _explain(p, **helps):
    """Set the --help text of flags whose default depends on other flags (keyed by dest)."""
    for act in p._actions:
        if act.dest in helps:
            act.help = helps[act.dest]


def add_train(sub):
    p = sub.add_parser("train", help="pretrain a GPT from scratch on a corpus")
    p.add_argument("--corpus", nargs="+", required=True, help="text files or globs (.txt .jsonl .json .parquet)")
    p.add_argument("--preset", default="tiny", help="nano, tiny, huge, mega, behemoth, titan, gpt2")
    p.add_argument("--depth", type=int, default=0, help="one scaling dial: width 64*depth (overrides --preset)")
    p.add_argument("--arch", choices=list(ARCHS), help="block family over that shape (default: the preset's); "
                   "llama, qwen2 and gpt2 export to transformers and GGUF")
    p.add_argument("--tokenizer", help="tokenizer.json or Hugging Face folder (default: train one)")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the tokenizer trained here")
    p.add_argument("--byte-tokenizer", action="store_true", help="use 256 bytes + specials, no BPE")
    p.add_argument("--ctx", type=int, default=0, help="context length (default: the preset's)")
    p.add_argument("--val-split", type=float, default=0.0, help="fraction of documents held out")
    p.add_argument("--init", help="continue pretraining from this .tinygpt or Hugging Face folder")
    _train_flags(p, steps=1000, lr=1e-3, batch=16, warmup=-1)
    _explain(p, warmup="warmup steps (default 50, at most 10%% of the steps)",
             val_every="validation loss every N steps (default with --val-split: at the end)")
    p.set_defaults(func=run_train)


def run_train(a):
    from .train.pretrain import PretrainArgs, pretrain
    if not 0.0 <= a.val_split < 1.0:
        raise UserError(f"--val-split must be in [0, 1), got {a.val_split}")
    args = PretrainArgs(corpus=a.corpus, out=a.out, preset=a.preset, depth=a.depth, arch=a.arch, tokenizer=a.tokenizer,
                        vocab_size=a.vocab_size, byte_tokenizer=a.byte_tokenizer, ctx=a.ctx,
                        val_split=a.val_split, device=a.device, init=a.init)
    _report(pretrain(args, train_config(a), _log(a)), a.out)


# ---- sampling ---------------------------------------------------------------------------------------
def add_sample(sub):
    p = sub.add_parser("sample", help="generate text from a model")
    p.add_argument("model", help=".tinygpt file or Hugging Face folder")
    p.add_argument("--prompt", default="", help="prompt text (default: start of a document)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto")
    _lora_flags(p)
    p.set_defaults(func=run_sample)


def _lora_flags(p):
    p.add_argument("--lora", action="append", default=[], help="adapter file (repeatable, stacks)")
    p.add_argument("--lora-weight", action="append", type=float, default=[],
                   help="weight of the matching --lora (default 1.0)")


def lora_specs(a) -> list[tuple[str, float]]:
    """Pair each --lora with its --lora-weight (missing weights are 1.0)."""
    if len(a.lora_weight) > len(a.lora):
        raise UserError("more --lora-weight than --lora flags", None, "give one weight per adapter")
    return [(path, a.lora_weight[i] if i < len(a.lora_weight) else 1.0) for i, path in enumerate(a.lora)]


def check_sampling(a) -> None:
    """--temperature >= 0 (0 = greedy), --top-k >= 0 (0 = off), --top-p in (0, 1]."""
    if a.temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {a.temperature}", None, "use 0 for greedy decoding")
    if a.top_k < 0:
        raise UserError(f"--top-k must be >= 0, got {a.top_k}", None, "use 0 to turn it off")
    if not 0 < a.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {a.top_p}", None, "use 1 to turn it off")


def run_sample(a):
    from . import load_model_and_tokenizer
    from .generate import generate
    from .train.engine import setup_device
    if a.max_new_tokens < 1 or a.num_samples < 1:
        raise UserError("--max-new-tokens and --num-samples must be >= 1")
    check_sampling(a)
    device, _, _ = setup_device(a.device)
    model, tok = load_model_and_tokenizer(a.model, lora=lora_specs(a), device=device)
    prompt = tok.encode(a.prompt) if a.prompt else [tok.bos_id if tok.bos_id is not None else tok.eos_id]
    budget = model.config.block_size - len(prompt)
    max_new = min(a.max_new_tokens, budget)
    if max_new < 1:
        raise UserError(f"the prompt ({len(prompt)} tokens) fills the model's context of {model.config.block_size}",
                        "--prompt", "shorten it")
    for i in range(a.num_samples):
        emitted: list[int] = []
        shown = ""
        sys.stdout.write(a.prompt)

        def stream(row, t):  # decode the whole tail each time so multi-byte characters print whole
            nonlocal shown
            emitted.append(t)
            text = tok.decode([x for x in emitted if x not in stops])
            if not text.endswith("\ufffd"):
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text
        stops = set(tok.stop_ids())
        generate(model, [prompt], max_new, a.temperature, a.top_k, a.top_p, stop_ids=stops,
                 vocab_limit=tok.vocab_size, seed=None if a.seed is None else a.seed + i,
                 pad_id=tok.pad_id or 0, on_token=stream)
        sys.stdout.write("\n" + ("-" * 40 + "\n" if i < a.num_samples - 1 else ""))


# ---- chat -------------------------------------------------------------------------------------------
def add_chat(sub):
    p = sub.add_parser("chat", help="talk with a model: one user message per line, /reset, /exit")
    p.add_argument("model", help=".tinygpt file (int8 ones too) or Hugging Face folder")
    _lora_flags(p)
    p.add_argument("--template", help="chat template (default: the SFT adapter's, else the tokenizer's / chatml)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="longest reply (default: 256, at most half the model's context)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run_chat)


def run_chat(a):
    from . import load_model_and_tokenizer
    from .chat import get_template
    from .chat_session import ChatSession, chat_loop
    from .eval.harness import adapter_template
    from .train.engine import setup_device
    specs = lora_specs(a)
    device, _, _ = setup_device(a.device)
    model, tok = load_model_and_tokenizer(a.model, lora=specs, device=device)
    template = get_template(a.template or adapter_template(specs), tok)
    max_new = a.max_new_tokens if a.max_new_tokens is not None else min(256, model.config.block_size // 2)
    session = ChatSession(model, tok, template, a.system, max_new, a.temperature, a.top_k, a.top_p, a.seed)
    chat_loop(session, sys.stdin, sys.stdout, sys.stderr, interactive=sys.stdin.isatty())


# ---- data -------------------------------------------------------------------------------------------
def add_data(sub):
    p = sub.add_parser("data", help="generate the embedded synthetic datasets")
    dsub = p.add_subparsers(dest="action", required=True, parser_class=Parser)
    s = dsub.add_parser("synth", help="write the synthetic world (corpus, SFT, preferences, eval)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--scale", type=float, default=1.0, help="multiply the number of documents/rows")
    s.set_defaults(func=run_data_synth)


def run_data_synth(a):
    from .data.synth import generate
    if a.scale <= 0:
        raise UserError(f"--scale must be > 0, got {a.scale}")
    paths = generate(a.out, seed=a.seed, scale=a.scale)
    for name, path in paths.items():
        print(f"{name:10s} {path}")


# ---- evaluation -------------------------------------------------------------------------------------
def add_eval(sub):
    p = sub.add_parser("eval", help="evaluate a model on benchmark tasks")
    p.add_argument("model", help=".tinygpt file or Hugging Face folder")
    _lora_flags(p)
    p.add_argument("--tasks", required=True, help="comma-separated: ppl, mmlu, arc, piqa, openbookqa, "
                   "commonsenseqa, boolq, hellaswag, winogrande, lambada, gsm8k, ifeval, winrate, synth")
    p.add_argument("--data", action="append", default=[], help="data file (or TASK=FILE, repeatable)")
    p.add_argument("--limit", type=int, default=None, help="first N items of each task")
    p.add_argument("--out", help="results JSON")
    p.add_argument("--template", help="chat template for generation tasks (default: the tokenizer's, else chatml)")
    p.add_argument("--shots", type=int, default=0, help="few-shot demonstrations")
    p.add_argument("--fewshot-data", help="draw demonstrations from this file/folder (MMLU dev, GSM8K train)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation budget per answer")
    p.add_argument("--stride", type=int, default=None, help="ppl sliding-window stride (default half a context)")
    p.add_argument("--against", help="winrate: the other model")
    p.add_argument("--against-lora", action="append", default=[], help="winrate: the other model's adapters")
    p.add_argument("--judge", help="winrate: reward model (.tinygpt) judging the answers")
    p.add_argument("--tie-margin", type=float, default=0.0, help="winrate: reward gap counted as a tie")
    p.add_argument("--label", help="name of this model in reports (default: the file stem)")
    p.add_argument("--seed", type=int, default=1234, help="few-shot selection")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run_eval)


def run_eval(a):
    import json
    from .eval.harness import evaluate
    if a.max_new_tokens is not None and a.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    if a.tie_margin < 0:
        raise UserError(f"--tie-margin must be >= 0, got {a.tie_margin}")
    res = evaluate(a.model, a.tasks, lora=lora_specs(a), data=a.data, limit=a.limit, template=a.template,
                   shots=a.shots, batch=a.batch, device=a.device, out=a.out, fewshot_data=a.fewshot_data,
                   stride=a.stride, max_new_tokens=a.max_new_tokens, against=a.against,
                   against_lora=[(p, 1.0) for p in a.against_lora], judge=a.judge, tie_margin=a.tie_margin,
                   label=a.label, seed=a.seed, log=_log(a))
    print(json.dumps({t: {k: v for k, v in m.items() if isinstance(v, (int, float))}
                      for t, m in res["tasks"].items()}))
    if a.out:
        print(f"-> {a.out}")


# ---- supervised fine-tuning -------------------------------------------------------------------------
def add_sft(sub):
    p = sub.add_parser("sft", help="supervised fine-tuning on chat data (LoRA by default)")
    p.add_argument("model", help=".tinygpt file or Hugging Face folder")
    p.add_argument("--data", required=True, help="SFT file (.jsonl .json .parquet): messages, sharegpt, alpaca, ...")
    p.add_argument("--format", help="row format (default: detected from the first row)")
    p.add_argument("--template", help="chatml, llama3, zephyr, alpaca, raw, hf or FILE.jinja "
                   "(default: the tokenizer's own chat template, else chatml)")
    p.add_argument("--epochs", type=float, default=0.0, help="train for this many epochs (instead of --steps)")
    p.add_argument("--ctx", type=int, default=0, help="positions per packed row (default: the model's context)")
    p.add_argument("--max-length", type=int, default=0,
                   help="longest example in tokens; prompts are cut from the left (default: ctx + 1)")
    p.add_argument("--no-packing", action="store_true", help="one example per row, right-padded")
    p.add_argument("--val-split", type=float, default=0.0, help="fraction of conversations held out")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip malformed rows instead of stopping")
    p.add_argument("--full", action="store_true", help="fine-tune every weight and write a .tinygpt")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="comma-separated linear layer names")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations (less memory)")
    _lora_flags(p)
    _train_flags(p, steps=0, lr=None, batch=8, warmup=-1, wd=0.0)
    _explain(p, steps="optimizer steps (default: one epoch)", lr="learning rate (default 2e-4, or 2e-5 with --full)",
             warmup="warmup steps (default 100, at most 10%% of the steps)")
    p.set_defaults(func=run_sft)


def _check_run_length(a) -> None:
    """--steps / --epochs (one of them, not negative) and --val-split in [0, 1)."""
    if a.steps and a.epochs:
        raise UserError("both --steps and --epochs given", None, "give one of them")
    if a.steps < 0 or a.epochs < 0:
        raise UserError("--steps and --epochs must be positive")
    if not 0.0 <= a.val_split < 1.0:
        raise UserError(f"--val-split must be in [0, 1), got {a.val_split}")


def run_sft(a):
    from .sft import SFTOptions, run_sft as sft
    _check_run_length(a)
    if a.ctx < 0 or a.max_length < 0 or a.lora_rank < 1 or a.lora_alpha <= 0 or not 0 <= a.lora_dropout < 1:
        raise UserError("--ctx/--max-length must be >= 0, --lora-rank >= 1, --lora-alpha > 0, "
                        "--lora-dropout in [0, 1)")
    targets = tuple(t.strip() for t in a.lora_targets.split(",") if t.strip())
    if not targets:
        raise UserError("--lora-targets is empty", None, "name linear layers, e.g. q_proj,v_proj")
    if a.lr is None:
        a.lr = 2e-5 if a.full else 2e-4
    steps = a.steps
    a.steps = steps or 1  # validated here; with --epochs (or neither) run_sft derives the steps
    tcfg = train_config(a)
    tcfg.steps, tcfg.warmup = steps, a.warmup
    opts = SFTOptions(format=a.format, template=a.template, ctx=a.ctx, max_length=a.max_length,
                      packing=not a.no_packing, val_split=a.val_split, skip_bad_rows=a.skip_bad_rows,
                      full=a.full, lora_rank=a.lora_rank, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
                      lora_targets=targets, grad_checkpointing=a.grad_checkpointing, epochs=a.epochs,
                      device=a.device)
    _report(sft(a.model, a.data, a.out, opts, tcfg, lora_specs(a), _log(a)), a.out)


# ---- merging adapters ---------------------------------------------------------------------------------
def add_merge(sub):
    p = sub.add_parser("merge", help="fold LoRA adapters into a model and write a .tinygpt")
    p.add_argument("model", help="base .tinygpt file or Hugging Face folder")
    _lora_flags(p)
    p.add_argument("--out", required=True, help="output .tinygpt")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run_merge)


def run_merge(a):
    from .lora import merge_to_file
    if not a.lora:
        raise UserError("no adapter to merge", None, "give --lora FILE (repeatable, with --lora-weight W)")
    if Path(a.out).suffix != ".tinygpt":
        raise UserError("merge writes a whole model", a.out, "use --out X.tinygpt")
    merge_to_file(a.model, lora_specs(a), a.out, a.device, log=print)


# ---- preference optimisation: reward model, DPO family, ORPO, KTO ---------------------------------
def _pref_flags(p, method: str, lr: float, beta: float | None = None):
    """Flags the preference stages share (data, template, lengths, adapter, reference)."""
    p.add_argument("model", help=".tinygpt file or Hugging Face folder")
    p.add_argument("--data", required=True, help="preference file (.jsonl .json .parquet, .gz): prompt/chosen/"
                   "rejected, UltraFeedback, HH-RLHF, ShareGPT pairs" + (", or KTO label rows" if method == "kto" else ""))
    p.add_argument("--format", help="row format (default: detected from the first row)")
    p.add_argument("--template", help="chatml, llama3, zephyr, alpaca, raw, hf or FILE.jinja "
                   "(default: the tokenizer's own chat template, else chatml)")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip malformed rows instead of stopping")
    p.add_argument("--max-length", type=int, default=1024, help="prompt + reply tokens (replies cut at the end)")
    p.add_argument("--max-prompt-length", type=int, default=512, help="prompt tokens kept (cut from the left)")
    p.add_argument("--epochs", type=float, default=0.0, help="train for this many epochs (default 1; or --steps)")
    p.add_argument("--val-split", type=float, default=0.05 if method == "reward" else 0.0,
                   help="fraction of pairs held out for validation")
    p.add_argument("--no-packing", action="store_true", help="one sequence per row, right-padded")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations (less memory)")
    if method != "reward":
        p.add_argument("--beta", type=float, default=beta, help="strength of the KL-like regulariser")
        p.add_argument("--full", action="store_true", help="fine-tune every weight and write a .tinygpt")
        p.add_argument("--lora-rank", type=int, default=16)
        p.add_argument("--lora-alpha", type=float, default=32.0)
        p.add_argument("--lora-dropout", type=float, default=0.0)
        if method != "kto":
            p.add_argument("--pack-rows", type=int, default=0, help="fill this many rows of --max-length per "
                           "micro-batch with as many pairs as fit (static shapes; --batch then ignored)")
        if method != "orpo":
            p.add_argument("--precompute-ref", action="store_true",
                           help="compute reference log-probs once and cache them in the run folder")
    _lora_flags(p)
    _train_flags(p, steps=0, lr=lr, batch=8, warmup=0, wd=0.0)
    _explain(p, steps="optimizer steps (default: --epochs)")


def _pref_common(a, kind: str):
    """Validate the shared flags; return (args dataclass kwargs, TrainConfig)."""
    _check_run_length(a)
    if a.max_length < 2 or not 0 < a.max_prompt_length < a.max_length:
        raise UserError(f"need 0 < --max-prompt-length < --max-length, got {a.max_prompt_length} and {a.max_length}")
    if kind != "reward" and (a.lora_rank < 1 or a.lora_alpha <= 0 or not 0 <= a.lora_dropout < 1):
        raise UserError("--lora-rank must be >= 1, --lora-alpha > 0, --lora-dropout in [0, 1)")
    steps = a.steps
    a.steps = steps or 1      # validated here; with --epochs (or neither) the stage derives the steps
    tcfg = train_config(a)
    tcfg.steps, tcfg.warmup = steps, a.warmup
    kw = dict(model=a.model, data=a.data, out=a.out, lora=tuple(lora_specs(a)), template=a.template, format=a.format,
              skip_bad_rows=a.skip_bad_rows, max_length=a.max_length, max_prompt_length=a.max_prompt_length,
              val_split=a.val_split, epochs=a.epochs or None, device=a.device,
              grad_checkpointing=a.grad_checkpointing)
    return kw, tcfg


def _report(last, out):
    """The one summary line a training stage prints: its last step's loss and what it validated."""
    if last:
        shown = (("val_loss", "val loss", ".4f"), ("rewards/margin", "margin", ".4f"), ("val_accuracy", "val accuracy", ".3f"))
        extra = "".join(f", {label} {last[k]:{fmt}}" for k, label, fmt in shown if k in last)
        print(f"step {last['step']}: loss {last['loss']:.4f}{extra} -> {out}")


def add_reward(sub):
    p = sub.add_parser("reward", help="train a reward model (scalar head, Bradley-Terry) on preference pairs")
    _pref_flags(p, "reward", lr=1e-5)
    p.set_defaults(func=run_reward)


def run_reward(a):
    from .reward import RewardArgs, train_reward
    kw, tcfg = _pref_common(a, "reward")
    _report(train_reward(RewardArgs(**kw), tcfg, _log(a)), a.out)


def add_score(sub):
    p = sub.add_parser("score", help="print the reward a reward model gives a text")
    p.add_argument("model", help="reward model .tinygpt (from 'tinygpt reward')")
    p.add_argument("--text", required=True, help="the reply (or whole text) to score")
    p.add_argument("--prompt", help="user prompt: score --text as the reply to it, rendered with the template")
    p.add_argument("--template", help="chat template used with --prompt (default: the tokenizer's, else chatml)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run_score)


def run_score(a):
    from .reward import score_text
    print(f"{score_text(a.model, a.text, a.prompt, a.template, a.device):.6f}")


def _run_preference(a, method: str, **extra):
    from .dpo import PreferenceArgs, PreferenceConfig, train_preference
    kw, tcfg = _pref_common(a, method)
    cfg = PreferenceConfig(method=method, beta=a.beta, full=a.full, lora_rank=a.lora_rank, lora_alpha=a.lora_alpha,
                           lora_dropout=a.lora_dropout, precompute_ref=getattr(a, "precompute_ref", False),
                           pack=not a.no_packing, pack_rows=getattr(a, "pack_rows", 0), **extra)
    if cfg.pack_rows < 0:
        raise UserError(f"--pack-rows must be >= 0, got {cfg.pack_rows}")
    _report(train_preference(PreferenceArgs(**kw), cfg, tcfg, _log(a)), a.out)


def add_dpo(sub):
    p = sub.add_parser("dpo", help="direct preference optimisation (DPO, IPO, hinge, robust, SimPO); LoRA by default")
    _pref_flags(p, "dpo", lr=None, beta=None)   # 5e-6 for LoRA, 1e-6 with --full (run_dpo)
    p.add_argument("--loss", default="sigmoid", help="sigmoid, ipo, hinge, robust or simpo")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="assumed label noise (sigmoid, robust, simpo)")
    p.add_argument("--simpo-gamma", type=float, default=0.5, help="SimPO target reward margin")
    _explain(p, beta="default 0.1 (2.0 for simpo)", lr="learning rate (default 5e-6, or 1e-6 with --full)")
    p.set_defaults(func=run_dpo)


def run_dpo(a):
    from .dpo import DPO_LOSSES
    if a.loss not in DPO_LOSSES:
        raise UserError(f"unknown --loss {a.loss!r}", None, f"choose one of {', '.join(DPO_LOSSES)}")
    if not 0 <= a.label_smoothing <= 0.5 or (a.loss == "robust" and a.label_smoothing == 0.5):
        raise UserError(f"--label-smoothing must be in [0, 0.5] ([0, 0.5) for robust), got {a.label_smoothing}")
    if a.lr is None:
        a.lr = 1e-6 if a.full else 5e-6
    _run_preference(a, "dpo", loss=a.loss, label_smoothing=a.label_smoothing, simpo_gamma=a.simpo_gamma)


def add_orpo(sub):
    p = sub.add_parser("orpo", help="ORPO: SFT + odds-ratio preference in one stage, no reference model")
    _pref_flags(p, "orpo", lr=8e-6)
    p.add_argument("--lambda", dest="orpo_lambda", type=float, default=0.1, help="weight of the odds-ratio term")
    p.set_defaults(func=run_orpo)


def run_orpo(a):
    if a.orpo_lambda < 0:
        raise UserError(f"--lambda must be >= 0, got {a.orpo_lambda}")
    _run_preference(a, "orpo", orpo_lambda=a.orpo_lambda)


def add_kto(sub):
    p = sub.add_parser("kto", help="KTO on unpaired desirable/undesirable completions")
    _pref_flags(p, "kto", lr=5e-6, beta=0.1)
    p.add_argument("--desirable-weight", type=float, default=1.0)
    p.add_argument("--undesirable-weight", type=float, default=1.0)
    p.set_defaults(func=run_kto)


def run_kto(a):
    if a.desirable_weight <= 0 or a.undesirable_weight <= 0:
        raise UserError("--desirable-weight and --undesirable-weight must be > 0")
    _run_preference(a, "kto", desirable_weight=a.desirable_weight, undesirable_weight=a.undesirable_weight)


# ---- interop ----------------------------------------------------------------------------------------
def add_import(sub):
    p = sub.add_parser("import", help="convert a local Hugging Face folder or a .gguf into a .tinygpt")
    p.add_argument("src", help="Hugging Face model folder (GPT-2, Llama, Qwen2, Qwen3) or .gguf file")
    p.add_argument("--out", required=True, help="output .tinygpt")
    p.set_defaults(func=run_import)


def run_import(a):
    from .interop import import_model
    info = import_model(a.src, a.out)
    print(f"{a.src} -> {a.out} ({info['params'] / 1e6:.2f}M parameters, vocab {info['vocab']})")


def add_export(sub):
    p = sub.add_parser("export", help="export to a transformers folder, a PEFT adapter or GGUF")
    p.add_argument("model", help=".tinygpt file, Hugging Face folder or .gguf")
    p.add_argument("--format", required=True, choices=["hf", "peft", "gguf"])
    p.add_argument("--out", required=True, help="output folder (hf, peft) or .gguf file")
    p.add_argument("--dtype", default=None, help="hf: f32 (default), f16, bf16; gguf: f16 (default), f32, q8_0")
    p.add_argument("--base-out", help="peft: also write the base model (earlier adapters merged) as an hf folder")
    _lora_flags(p)
    p.set_defaults(func=run_export)


def run_export(a):
    from .interop import export_model
    if a.base_out and a.format != "peft":
        raise UserError("--base-out only applies to --format peft")
    info = export_model(a.model, a.out, a.format, lora_specs(a), a.dtype, a.base_out)
    print(f"wrote {a.out} ({a.format}, {info['family']})" + (f"; {info['modelfile']}" if "modelfile" in info else ""))


def add_quantize(sub):
    p = sub.add_parser("quantize", help="weight-only int8 quantization (per-output-channel scales)")
    p.add_argument("model", help=".tinygpt file or Hugging Face folder")
    p.add_argument("--int8", action="store_true", required=True, help="int8 weights (the only scheme)")
    p.add_argument("--out", required=True, help="output .tinygpt")
    p.add_argument("--data", help="text file to measure perplexity before and after")
    p.add_argument("--limit", type=int, default=100, help="documents of --data to score")
    p.add_argument("--device", default="auto")
    _lora_flags(p)
    p.set_defaults(func=run_quantize)


def run_quantize(a):
    from .quantize import quantize_file
    from .train.engine import setup_device
    if a.limit < 1:
        raise UserError(f"--limit must be >= 1, got {a.limit}")
    device, _, _ = setup_device(a.device)
    r = quantize_file(a.model, a.out, a.data, lora_specs(a), a.limit, device)
    print(f"size {r['size_before'] / 2**20:.2f} MiB -> {r['size_after'] / 2**20:.2f} MiB "
          f"({r['size_before'] / r['size_after']:.2f}x smaller, {r['layers']} linear layers int8)")
    if "ppl_before" in r:
        print(f"perplexity {r['ppl_before']:.3f} -> {r['ppl_after']:.3f} "
              f"({100 * (r['ppl_after'] / r['ppl_before'] - 1):+.2f}%) on {a.data}")


# ---- pipeline and report ----------------------------------------------------------------------------
def add_pipeline(sub):
    p = sub.add_parser("pipeline", help="run the whole recipe from a YAML file (resumable)")
    p.add_argument("config", nargs="?", help="pipeline YAML (stages and their options)")
    p.add_argument("--preset", help="a built-in pipeline: demo, demo-rl")
    p.add_argument("--out", help="run folder (default runs/<name>)")
    p.add_argument("--force", action="store_true", help="re-run every stage, even those up to date")
    p.add_argument("--device", help="device for every stage (default: the config's, else auto)")
    p.set_defaults(func=run_pipeline)


def run_pipeline(a):
    from .pipeline import pipeline_command, preset_path
    from .report import compare_line
    if bool(a.config) == bool(a.preset):
        raise UserError("give a pipeline CONFIG.yaml or --preset NAME (one of them)", "tinygpt pipeline",
                        "e.g. 'tinygpt pipeline --preset demo'")
    res = pipeline_command(preset_path(a.preset) if a.preset else a.config, a.out, a.force, a.device,
                           log=lambda *m: print(*m, flush=True))
    rep = res["report"]
    print("\n" + rep["table"])
    line = compare_line(rep["evals"], rep["compare"])
    if line:
        print(line)
    print(f"report: {rep['html'].resolve()}")


def add_report(sub):
    p = sub.add_parser("report", help="(re)build report.md and report.html of a run folder")
    p.add_argument("run", help="run folder (from 'tinygpt pipeline')")
    p.set_defaults(func=run_report)


def run_report(a):
    from .report import build_report
    rep = build_report(a.run)
    print(rep["table"])
    print(f"report: {rep['html'].resolve()}")


# ---- online RL: PPO and GRPO ------------------------------------------------------------------------
def _rl_flags(p, kind: str):
    """Flags PPO and GRPO share; the training flags map onto the engine (--steps = iterations)."""
    p.add_argument("model", help="base .tinygpt file or Hugging Face folder")
    p.add_argument("--prompts", required=True, help="prompt file (SFT, preference, {prompt} or {question, answer} rows)")
    p.add_argument("--reward", help="reward model .tinygpt (from 'tinygpt reward')")
    p.add_argument("--reward-fn", help="verifiable reward: gsm8k, synth, format or module:function")
    p.add_argument("--reward-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--template", help="chat template (default: the SFT adapter's, else the tokenizer's / chatml)")
    p.add_argument("--full", action="store_true", help="train every weight (default: a fresh LoRA adapter)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--iterations", dest="steps", type=int, default=argparse.SUPPRESS,
                   help="rollout + update rounds (same as --steps)")
    p.add_argument("--group-size", type=int, default=4 if kind == "grpo" else 1, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--minibatch", type=int, default=8 if kind == "ppo" else 0,
                   help="sequences per optimizer step (0: the whole rollout)")
    p.add_argument("--ppo-epochs", type=int, default=4 if kind == "ppo" else 1, help="passes over each rollout")
    p.add_argument("--clip", type=float, default=0.2, help="policy ratio clip")
    p.add_argument("--kl-coef", type=float, default=0.05, help="KL-to-reference coefficient (0: no reference)")
    p.add_argument("--kl-target", type=float, default=0.0, help="adaptive KL controller target (0: fixed)")
    p.add_argument("--max-kl", type=float, default=0.0, help="stop an iteration's epochs above this approx KL")
    p.add_argument("--samples", type=int, default=4, help="completions per iteration written to samples.jsonl")
    p.add_argument("--skip-bad-rows", action="store_true")
    _lora_flags(p)
    _train_flags(p, steps=100, lr=1e-5, batch=8, schedule="constant", wd=0.0)
    p.set_defaults(lr=None)   # 1e-5 for LoRA, 1e-6 with --full


def _rl_run(a, kind: str, **extra):
    from .rlhf import RLArgs, RLConfig, run_rl
    if a.lr is None:
        a.lr = 1e-6 if a.full else 1e-5
    tcfg = train_config(a)
    for name in ("max_new_tokens", "ppo_epochs", "lora_rank"):
        if getattr(a, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.minibatch < 0 or a.group_size < 1 or a.kl_coef < 0 or a.clip <= 0:
        raise UserError("--minibatch >= 0, --group-size >= 1, --kl-coef >= 0 and --clip > 0 are required")
    if not 0 < a.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {a.top_p}")
    n = a.batch * a.group_size
    cfg = RLConfig(iterations=a.steps, batch=a.batch, group_size=a.group_size, max_new_tokens=a.max_new_tokens,
                   temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, minibatch=a.minibatch or n,
                   epochs=a.ppo_epochs, clip=a.clip, kl_coef=a.kl_coef, kl_target=a.kl_target, max_kl=a.max_kl,
                   n_samples=a.samples, save_every=a.save_every, **extra)
    args = RLArgs(model=a.model, prompts=a.prompts, out=a.out, lora=tuple(lora_specs(a)), reward=a.reward,
                  reward_fn=a.reward_fn, reward_dtype=a.reward_dtype, value_model=getattr(a, "value_model", None),
                  template=a.template, full=a.full, lora_rank=a.lora_rank, lora_alpha=a.lora_alpha,
                  device=a.device, skip_bad_rows=a.skip_bad_rows)
    last = run_rl(kind, args, cfg, tcfg, _log(a))
    print(f"iteration {last['iteration']}: reward {last['reward_mean']:.4f}, kl {last['kl']:.4f} -> {a.out}")


def add_ppo(sub):
    p = sub.add_parser("ppo", help="RLHF with PPO: policy LoRA, value head, reward model, KL to the SFT policy")
    _rl_flags(p, "ppo")
    p.add_argument("--value-model", help="separate value backbone (.tinygpt, same tokenizer); default: a head on the policy")
    p.add_argument("--kl-kind", default="k1", choices=["k1", "k3"], help="per-token KL estimator in the reward")
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--lam", type=float, default=0.95, help="GAE lambda")
    p.add_argument("--vf-coef", type=float, default=0.1)
    p.add_argument("--vf-clip", type=float, default=0.2)
    p.add_argument("--ent-coef", type=float, default=0.0, help="entropy bonus")
    p.add_argument("--no-whiten", action="store_true", help="do not whiten advantages")
    p.set_defaults(func=run_ppo)


def run_ppo(a):
    _rl_run(a, "ppo", kl_kind=a.kl_kind, gamma=a.gamma, lam=a.lam, vf_coef=a.vf_coef, vf_clip=a.vf_clip,
            ent_coef=a.ent_coef, whiten=not a.no_whiten)


def add_grpo(sub):
    p = sub.add_parser("grpo", help="GRPO / RLOO with verifiable rewards: G completions per prompt, no value network")
    _rl_flags(p, "grpo")
    p.add_argument("--rloo", action="store_true", help="leave-one-out baseline (RLOO) instead of the group mean")
    p.add_argument("--no-std", action="store_true", help="do not divide advantages by the group's std")
    p.set_defaults(func=run_grpo)


def run_grpo(a):
    if a.group_size < 2:
        raise UserError(f"--group-size must be >= 2 for grpo, got {a.group_size}")
    _rl_run(a, "grpo", rloo=a.rloo, normalize_std=not a.no_std)


COMMANDS = [add_tokenizer, add_train, add_sample, add_chat, add_data, add_eval, add_sft, add_merge, add_reward,
            add_score, add_dpo, add_orpo, add_kto,
            add_import, add_export, add_quantize, add_pipeline, add_report, add_ppo, add_grpo]


def build_parser() -> Parser:
    p = Parser(prog="tinygpt", description="The modern LLM recipe at small scale.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in COMMANDS:
        add(sub)
    return p


def _subcommands(p):
    return next((a for a in p._actions if isinstance(a, argparse._SubParsersAction)), None)


def _with_config_file(parser: Parser, argv: list[str]) -> list[str]:
    """`--config FILE.yaml`: the file's `option: value` pairs become `--option=value` tokens placed
    right after the subcommand, before the user's own flags, so argparse checks their types and
    choices as it does a flag's. A list gives one token per item for a repeatable flag (--lora) or
    the values of a many-valued one (--corpus); `true` gives a bare switch. An option that is also
    on the command line is taken from the command line only: flags win."""
    if not any(t == "--config" or t.startswith("--config=") for t in argv):
        return argv
    sp, at = parser, 0
    while (sub := _subcommands(sp)) is not None:  # descend to the (sub)command the options belong to
        if at >= len(argv) or argv[at] not in sub.choices:
            return argv                           # argparse reports the missing command
        sp, at = sub.choices[argv[at]], at + 1
    if "--config" not in sp._option_string_actions:
        return argv                               # argparse reports --config as unrecognized
    rest, path, i = [], None, at
    while i < len(argv):
        if argv[i] == "--config":
            if i + 1 >= len(argv):
                raise UserError("--config needs a file", None, "pass --config FILE.yaml")
            path, i = argv[i + 1], i + 2
        elif argv[i].startswith("--config="):
            path, i = argv[i].split("=", 1)[1], i + 1
        else:
            rest, i = rest + [argv[i]], i + 1
    given = {sp._option_string_actions[t.split("=", 1)[0]].dest for t in rest
             if t.split("=", 1)[0] in sp._option_string_actions}
    tokens = []
    for key, value in _read_config(Path(path)).items():
        tokens += _config_tokens(sp, str(key), value, given, path)
    return argv[:at] + tokens + [f"--config={path}"] + rest


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"config file not found: {path}", "--config", "check the path")
    import yaml
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"invalid YAML ({str(e).splitlines()[0]})", str(path), "fix the file") from None
    if not isinstance(data, dict):
        raise UserError("a --config file must be a mapping of option: value", str(path))
    return data


def _config_tokens(sp, key: str, value, given: set, path) -> list[str]:
    """Command-line tokens for one `key: value` of a --config file; [] when the command line gives
    the option, or the value is empty or false."""
    act = sp._option_string_actions.get("--" + key.replace("_", "-"))
    act = act or next((a for a in sp._actions if a.dest == key.replace("-", "_")), None)
    if act is None or isinstance(act, argparse._HelpAction) or act.dest == "config":
        raise UserError(f"unknown option '{key}'", str(path), f"see '{sp.prog} --help'")

    def bad(what):
        return UserError(f"option '{key}' {what}", str(path), f"see '{sp.prog} --help'")
    if value is None or value == []:
        return []
    if not act.option_strings:   # a positional (the model): a default that the command line replaces
        if isinstance(value, (list, dict, bool)):
            raise bad(f"takes one path, got {value!r}")
        act.nargs, act.default, act.required = "?", str(value), False
        return []
    opt = max(act.option_strings, key=len)
    if act.nargs == 0:           # a switch
        if not isinstance(value, bool):
            raise bad(f"is a switch: give true or false, got {value!r}")
        tokens = [opt] if value else []
    else:
        variadic = act.nargs in ("+", "*")
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not (variadic or isinstance(act, argparse._AppendAction)):
            raise bad(f"takes one value, got a list {value!r}")
        if any(isinstance(v, (list, dict, bool)) for v in values):
            raise bad(f"takes a number or text, got {value!r}")
        strings = [str(v) for v in values]
        try:                     # argparse's own type and choices checks, so the error names the file
            for group in ([strings] if variadic else [[s] for s in strings]):
                sp._get_values(act, list(group))
        except argparse.ArgumentError as e:
            raise UserError(str(e), str(path), f"fix '{key}'") from None
        tokens = [opt, *strings] if variadic else [f"{opt}={s}" for s in strings]
    return [] if act.dest in given else tokens   # checked all the same: the file must be right


def _show_warning(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(f"tinygpt: warning: {message}\n" if issubclass(category, SkippedRowsWarning)
                     else warnings.formatwarning(message, category, filename, lineno, line))


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The options of a command line, `--config FILE.yaml` included (raises UserError)."""
    parser = build_parser()
    return parser.parse_args(_with_config_file(parser, list(argv)))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        with warnings.catch_warnings():    # skipped data rows are reported even with --quiet
            warnings.simplefilter("always", SkippedRowsWarning)
            warnings.showwarning = _show_warning
            args.func(args)
        return 0
    except UserError as e:
        print(f"tinygpt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tinygpt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
