"""The `tinygpt` command line: one argparse entry point.

Each subcommand has an `add_<name>` function that declares its flags and sets `func` to a small
`run_<name>` that calls one importable function. `--config FILE.yaml` supplies the same options
(keys spelled like the flags, with - or _); flags given on the command line win.
A user mistake prints one line `tinygpt: error: <what>, <where>, <what to do>` and exits 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
def add_train(sub):
    p = sub.add_parser("train", help="pretrain a GPT from scratch on a corpus")
    p.add_argument("--corpus", nargs="+", required=True, help="text files or globs (.txt .jsonl .json .parquet)")
    p.add_argument("--preset", default="tiny", help="nano, tiny, huge, mega, behemoth, titan, gpt2")
    p.add_argument("--depth", type=int, default=0, help="one scaling dial: width 64*depth (overrides --preset)")
    p.add_argument("--tokenizer", help="tokenizer.json or Hugging Face folder (default: train one)")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the tokenizer trained here")
    p.add_argument("--byte-tokenizer", action="store_true", help="use 256 bytes + specials, no BPE")
    p.add_argument("--ctx", type=int, default=0, help="context length (default: the preset's)")
    p.add_argument("--val-split", type=float, default=0.0, help="fraction of documents held out")
    p.add_argument("--init", help="continue pretraining from this .tinygpt")
    _train_flags(p, steps=1000, lr=1e-3, batch=16, warmup=50)
    p.set_defaults(func=run_train)


def run_train(a):
    from .train.pretrain import PretrainArgs, pretrain
    if not 0.0 <= a.val_split < 1.0:
        raise UserError(f"--val-split must be in [0, 1), got {a.val_split}")
    args = PretrainArgs(corpus=a.corpus, out=a.out, preset=a.preset, depth=a.depth, tokenizer=a.tokenizer,
                        vocab_size=a.vocab_size, byte_tokenizer=a.byte_tokenizer, ctx=a.ctx,
                        val_split=a.val_split, device=a.device, init=a.init)
    last = pretrain(args, train_config(a), _log(a))
    if last:
        print(f"step {last['step']}: loss {last['loss']:.4f}" +
              (f", val loss {last['val_loss']:.4f}" if "val_loss" in last else "") + f" -> {a.out}")


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


def run_sample(a):
    from . import load_model_and_tokenizer
    from .generate import generate
    from .train.engine import setup_device
    if a.max_new_tokens < 1 or a.num_samples < 1:
        raise UserError("--max-new-tokens and --num-samples must be >= 1")
    if not 0 < a.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {a.top_p}")
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


COMMANDS = [add_tokenizer, add_train, add_sample, add_data, add_eval]


def build_parser() -> Parser:
    p = Parser(prog="tinygpt", description="The modern LLM recipe at small scale.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in COMMANDS:
        add(sub)
    return p


def _apply_config_file(parser: Parser, argv: list[str]) -> None:
    """`--config FILE.yaml`: its keys become defaults of the chosen subcommand (flags still win)."""
    if "--config" not in argv:
        return
    i = argv.index("--config")
    if i + 1 >= len(argv):
        raise UserError("--config needs a file", None, "pass --config FILE.yaml")
    path = Path(argv[i + 1])
    if not path.exists():
        raise UserError(f"config file not found: {path}", "--config")
    import yaml
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"invalid YAML ({str(e).splitlines()[0]})", str(path)) from None
    if not isinstance(data, dict):
        raise UserError("a --config file must be a mapping of option: value", str(path))
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    cmd = next((x for x in argv if x in sub.choices), None)
    if cmd is None:
        return
    sp = sub.choices[cmd]
    known = {a.dest for a in sp._actions}
    defaults = {}
    for k, v in data.items():
        dest = str(k).replace("-", "_")
        if dest not in known:
            raise UserError(f"unknown option '{k}'", str(path), f"see 'tinygpt {cmd} --help'")
        defaults[dest] = v
    for act in sp._actions:  # an option the file supplies is no longer required on the command line
        if act.dest in defaults:
            act.required = False
    sp.set_defaults(**defaults)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        _apply_config_file(parser, argv)
        args = parser.parse_args(argv)
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
