"""The evaluation harness: a registry of tasks and `evaluate(...)`, which `tinygpt eval` calls.

Design choices:
- A task is a small function `(EvalContext, data path) -> metrics dict` registered under a name.
  Loading, few-shot assembly and scoring live in the task-family modules (`ppl`, `choice`, `gen`);
  the harness only loads the model once, picks each task's data, times it and writes results.
- `--data` is either one path (used by every task asked for) or `task=path` pairs, so one call can
  run several tasks on their own files. No task reads a default location: what was evaluated is
  always on the command line and in the results.
- `--limit N` keeps the first N items (deterministic). Few-shot demonstrations are drawn from the
  whole file (or `--fewshot-data`), never from the item being scored.
- The results JSON records, next to each task's metrics and item count, what was evaluated: the
  model path, the base weights' fingerprint (`lora.base_fingerprint`), each adapter's path, weight
  and SHA-256, and the settings (template, shots, limit), so a number can be traced to its inputs.
  A win rate also records the other model (the same way) and the judge's path and SHA-256.
- Generation budgets default to the task's usual length (gsm8k/ifeval 256, winrate 128, synth 16)
  capped at half the model's context, so a small model still has room for the prompt;
  `--max-new-tokens` overrides them.
- Conventions are lm-evaluation-harness's, so numbers compare: contexts start with the model's
  document prefix (lm-eval with `add_bos_token=True` on the exported model), acc_norm divides by
  the choice's characters, LAMBADA's `ppl` is exp(-mean item log-likelihood) (`token_ppl` beside
  it), HellaSwag rows are cleaned as lm-eval does, TruthfulQA MC1/MC2 are lm-eval's, and every
  accuracy carries `<metric>_stderr`. Items cut to fit the context are counted (`truncated`) and
  reported; `--log-samples` adds every item's outputs to the results JSON.
- Safety: `truthfulqa` (MC1/MC2) and `harmless` (the share of the model's replies a reward model
  prefers over the data's rejected reply, on HH-RLHF-style pairs).
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..data.formats import load_preferences
from ..device import setup_device
from ..errors import UserError
from ..io import atomic_write_text, file_sha256
from ..load import load_model_and_tokenizer
from ..lora import base_fingerprint
from ..reward_model import load_reward_model
from ..stages.common import resolve_template
from . import choice
from .gen import (
    eval_gsm8k,
    eval_harmless,
    eval_ifeval,
    eval_synth,
    eval_winrate,
    load_gsm8k,
    load_synth,
    load_winrate_prompts,
)
from .ifeval import load_ifeval
from .ppl import load_documents, perplexity


@dataclass
class EvalContext:
    model: object
    tok: object
    template: object = None
    shots: int = 0
    batch: int = 8
    limit: int | None = None
    max_new_tokens: int | None = None
    fewshot_data: str | None = None
    stride: int | None = None
    seed: int = 1234
    options: dict = field(default_factory=dict)   # winrate: against, against_lora, judge, tie_margin, device
    samples: bool = False                         # per-item outputs in the results (--log-samples)

    def cut(self, items):
        return items[: self.limit] if self.limit else items

    def new_tokens(self, default: int) -> int:
        """--max-new-tokens, else `default` capped at half the model's context (room for a prompt)."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return max(1, min(default, self.model.config.block_size // 2))


TASKS: dict = {}


def task(name: str, needs_data: bool = True):
    def register(fn):
        fn.needs_data = needs_data
        TASKS[name] = fn
        return fn
    return register


# ---- log-likelihood tasks ---------------------------------------------------------------------
@task("ppl")
def _ppl(ctx: EvalContext, path):
    return perplexity(ctx.model, ctx.tok, load_documents(path, ctx.limit), ctx.stride, ctx.batch)


def _choice_task(loader):
    def run(ctx: EvalContext, path):
        items = loader(path)
        own = not ctx.fewshot_data   # demonstrations from the whole file, never the scored item itself
        pool = items if own else loader(ctx.fewshot_data) if ctx.shots else None
        scored = ctx.cut(items)
        shot = choice.add_shots(scored, ctx.shots, pool, ctx.seed, same_file=own)
        res = choice.score_choices(ctx.model, ctx.tok, shot, ctx.batch, ctx.samples)
        return {"acc": res.acc, "acc_norm": res.acc_norm, "n": res.n, **res.extra}
    return run


def _register_choice_tasks():
    for name in ("arc", "piqa", "openbookqa", "commonsenseqa", "boolq"):
        task(name)(_choice_task(lambda p, n=name: choice.load_query_choices(p, n)))
    task("hellaswag")(_choice_task(choice.load_hellaswag))
    task("winogrande")(_choice_task(choice.load_winogrande))
    task("mmlu")(_choice_task(choice.load_mmlu))


_register_choice_tasks()


@task("lambada")
def _lambada(ctx: EvalContext, path):
    items = choice.load_lambada(path)
    shot = choice.add_shots(ctx.cut(items), ctx.shots, items, ctx.seed, same_file=True)
    return choice.score_lambada(ctx.model, ctx.tok, shot, ctx.batch, ctx.samples)


@task("truthfulqa")
def _truthfulqa(ctx: EvalContext, path):
    """MC1 and MC2; --fewshot-data is the few-shot primer (a text file), as the benchmark's QA prompt."""
    primer = Path(ctx.fewshot_data).read_text(encoding="utf-8") if ctx.fewshot_data else ""
    items = ctx.cut(choice.load_truthfulqa(path, primer))
    return choice.score_truthfulqa(ctx.model, ctx.tok, items, ctx.batch, ctx.samples)


# ---- generation tasks -------------------------------------------------------------------------
@task("gsm8k")
def _gsm8k(ctx: EvalContext, path):
    rows = load_gsm8k(path)
    pool = load_gsm8k(ctx.fewshot_data) if ctx.fewshot_data else rows
    scored = ctx.cut(rows)
    # one fixed set of shots, drawn from the pool minus the scored rows when the pool is the data
    candidates = pool[len(scored):] if pool is rows and len(rows) > len(scored) else pool
    shots = random.Random(ctx.seed).sample(candidates, min(ctx.shots, len(candidates)))
    return eval_gsm8k(ctx.model, ctx.tok, scored, shots, ctx.template, ctx.batch, ctx.new_tokens(256), ctx.samples)


@task("synth")
def _synth(ctx: EvalContext, path):
    return eval_synth(ctx.model, ctx.tok, ctx.cut(load_synth(path)), ctx.template or _chat(ctx),
                      ctx.batch, ctx.new_tokens(16), ctx.samples)


@task("ifeval")
def _ifeval(ctx: EvalContext, path):
    return eval_ifeval(ctx.model, ctx.tok, ctx.cut(load_ifeval(path)), ctx.template or _chat(ctx),
                       ctx.batch, ctx.new_tokens(256), ctx.samples)


@task("harmless")
def _harmless(ctx: EvalContext, path):
    """Replies to the prompts of preference pairs (HH-RLHF harmless-base and the like), judged by
    --judge against each pair's rejected reply."""
    judge = ctx.options.get("judge")
    if not judge:
        raise UserError("task harmless needs --judge RM", "--tasks harmless",
                        "pass a reward model; it compares each reply with the data's rejected one")
    rm = _load_judge(judge, ctx.options["device"])
    rows = ctx.cut(load_preferences(path, skip_bad_rows=True)[0])
    if not rows:
        raise UserError("no preference pairs in the file", str(path), "pass chosen/rejected rows (e.g. HH-RLHF)")
    res = eval_harmless(ctx.model, ctx.tok, rows, ctx.template or _chat(ctx),
                        lambda ps, xs: reward_scores(rm, ps, xs, ctx.batch), ctx.batch, ctx.new_tokens(128),
                        ctx.samples)
    res["judge"] = {"path": str(judge), "sha256": file_sha256(judge)[:16]}
    return res


@task("winrate")
def _winrate(ctx: EvalContext, path):
    o = ctx.options
    if not o.get("against") or not o.get("judge"):
        raise UserError("task winrate needs --against MODEL2 and --judge RM", "--tasks winrate",
                        "pass both (the reward model judges the two models' answers)")
    other, other_tok = load_model_and_tokenizer(o["against"], lora=o.get("against_lora", ()), device=o["device"])
    rm = _load_judge(o["judge"], o["device"])
    prompts = ctx.cut(load_winrate_prompts(path))
    budget = min(ctx.new_tokens(128), ctx.max_new_tokens or max(1, other.config.block_size // 2))
    res = eval_winrate(ctx.model, ctx.tok, other, other_tok, lambda ps, xs: reward_scores(rm, ps, xs, ctx.batch),
                       prompts, ctx.template or _chat(ctx),
                       resolve_template(None, other_tok, o["against"], o.get("against_lora", ())), ctx.batch,
                       budget, o.get("tie_margin", 0.0))
    res["against"] = describe_model(o["against"], other, o.get("against_lora", ()))
    res["judge"] = {"path": str(o["judge"]), "sha256": file_sha256(o["judge"])[:16]}
    return res


def _load_judge(path, device):
    return load_reward_model(path, device)


def reward_scores(rm, prompts: list[str], answers: list[str], batch: int = 8) -> list[float]:
    """Rewards of (prompt, answer) conversations, rendered with the reward model's own tokenizer and
    chat template (what it was trained on) and scored at the reply's last token."""
    block = rm.config.block_size
    seqs = [rm.encode_conversation(p, a)[-block:] for p, a in zip(prompts, answers)]
    out: list[float] = []
    for s in range(0, len(seqs), batch):
        out += [float(r) for r in rm.score_texts(seqs[s:s + batch])]
    return out


def _chat(ctx: EvalContext):
    """The template chat tasks render with when none was given or recorded: the tokenizer's own, else chatml."""
    ctx.template = resolve_template(None, ctx.tok)
    return ctx.template


# ---- the entry point --------------------------------------------------------------------------
def describe_model(path, model, lora) -> dict:
    specs = [(x, 1.0) if isinstance(x, (str, Path)) else tuple(x) for x in lora]
    return {"path": str(path), "base_fingerprint": base_fingerprint(model),
            "adapters": [{"path": str(p), "weight": w, "sha256": file_sha256(p)[:16]} for p, w in specs]}


def resolve_data(tasks: list[str], data) -> dict:
    """`data`: None, one path (for every task) or a {task: path} dict / list of 'task=path'."""
    if isinstance(data, (list, tuple)):
        plain = [d for d in data if "=" not in str(d) or str(d).split("=", 1)[0] not in TASKS]
        pairs = dict(str(d).split("=", 1) for d in data if d not in plain)
        if len(plain) > 1:
            raise UserError("several --data files without task names", "--data", "write --data TASK=FILE")
        data = {**{t: plain[0] for t in tasks}, **pairs} if plain else pairs
    elif data is not None and not isinstance(data, dict):
        data = {t: data for t in tasks}
    data = dict(data or {})
    for t in tasks:
        if TASKS[t].needs_data and not data.get(t):
            raise UserError(f"task {t} needs data", "--data", f"pass --data FILE or --data {t}=FILE")
        if data.get(t) and not Path(data[t]).exists():
            raise UserError(f"data file not found: {data[t]}", f"--data ({t})", "check the path")
    return data


def parse_tasks(spec) -> list[str]:
    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if not names or unknown:
        raise UserError(f"unknown task {unknown[0]!r}" if unknown else "no task given", "--tasks",
                        f"choose from {', '.join(sorted(TASKS))}")
    return names


def evaluate(model_path, tasks, lora=(), data=None, limit: int | None = None, template=None,
             shots: int = 0, batch: int = 8, device: str = "auto", out=None, fewshot_data=None,
             stride: int | None = None, max_new_tokens: int | None = None, against=None,
             against_lora=(), judge=None, tie_margin: float = 0.0, label: str | None = None,
             seed: int = 1234, log_samples: bool = False, log=print, allow_nonfinite: bool = False) -> dict:
    """Evaluate a model (+ adapters) on tasks; returns (and writes to `out`) the results dict.
    Chat tasks render with the one template rule (`stages.common.resolve_template`); GSM8K uses a
    template only when one is given or recorded in the model files (else plain text, for a base)."""
    names = parse_tasks(tasks)
    data = resolve_data(names, data)
    for name, value in (("--limit", limit), ("--batch", batch)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    if shots < 0:
        raise UserError(f"--shots must be >= 0, got {shots}")
    dev, _, _ = setup_device(device)
    model, tok = load_model_and_tokenizer(model_path, lora=lora, device=dev, allow_nonfinite=allow_nonfinite)
    chosen = resolve_template(template, tok, model_path, lora, fallback=False)
    template = chosen.name if chosen is not None else None
    ctx = EvalContext(model, tok, chosen, shots, batch, limit,
                      max_new_tokens, fewshot_data, stride, seed,
                      {"against": against, "against_lora": against_lora, "judge": judge,
                       "tie_margin": tie_margin, "device": dev}, log_samples)
    results = {"model": describe_model(model_path, model, lora), "label": label or Path(model_path).stem,
               "device": str(dev), "settings": {"template": template, "shots": shots, "limit": limit,
                                                "batch": batch, "seed": seed}, "tasks": {}}
    for name in names:
        t0 = time.perf_counter()
        res = TASKS[name](ctx, data.get(name))
        res["seconds"] = round(time.perf_counter() - t0, 3)
        res["data"] = str(data.get(name))
        results["tasks"][name] = res
        log(f"{name}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                    for k, v in res.items() if k not in ("data", "against", "judge", "samples")))
        if res.get("truncated"):
            log(f"{name}: {res['truncated']} of {res.get('n', '?')} items did not fit the model's context of "
                f"{model.config.block_size} tokens and were cut from the left (fewer --shots would fit)")
    if out:
        atomic_write_text(out, json.dumps(results, indent=1) + "\n")
    return results
