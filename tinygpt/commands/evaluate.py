"""`tinygpt eval` (benchmark tasks through `eval.harness`) and `tinygpt score` (one reward)."""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass

from ..device import DeviceOptions, setup_device
from ..errors import UserError
from ..eval.harness import TASKS, evaluate
from ..io import check_writable
from ..options import SEED, at_least, option
from ..reward_model import load_reward_model
from ..stages.common import (
    ModelOptions,
    TemplateOptions,
    check_inputs,
    lora_specs,
    resolve_template,
)


@dataclass
class EvalOptions(ModelOptions, TemplateOptions, DeviceOptions):
    """Tasks, their data and how they are scored."""

    command = "eval"
    group = "evaluation"
    tasks: str | None = option(None, "comma-separated: " + ", ".join(sorted(TASKS)), required=True)
    data: list[str] = option([], "data file for every task, or TASK=FILE (repeatable)", repeat=True)
    limit: int | None = option(None, "first N items of each task", check=at_least(1))
    out: str | None = option(None, "results JSON")
    shots: int = option(0, "few-shot demonstrations", check=at_least(0))
    fewshot_data: str | None = option(None, "draw demonstrations from this file/folder (MMLU dev, GSM8K train); "
                                      "truthfulqa: the few-shot primer text")
    batch: int = option(8, "items per forward", check=at_least(1))
    max_new_tokens: int | None = option(None, "generation budget per answer",
                                        auto="the task's usual length, at most half the context", check=at_least(1))
    stride: int | None = option(None, "ppl sliding-window stride", auto="half a context", check=at_least(1))
    against: str | None = option(None, "winrate: the other model")
    against_lora: list[str] = option([], "winrate: the other model's adapters (repeatable)", repeat=True)
    judge: str | None = option(None, "winrate, harmless: reward model (.tinygpt) judging the answers")
    tie_margin: float = option(0.0, "winrate: reward gap counted as a tie", check=at_least(0))
    label: str | None = option(None, "name of this model in reports", auto="the file stem")
    seed: int = option(1234, "few-shot selection", check=SEED)
    log_samples: bool = option(False, "write every item's inputs, outputs and scores into the results JSON")
    quiet: bool = option(False, "no per-task lines on stderr")


def eval_command(opts: EvalOptions) -> None:
    check_inputs(opts, ("--fewshot-data", opts.fewshot_data), ("--against", opts.against), ("--judge", opts.judge))
    if opts.out:
        check_writable(opts.out)      # before the evaluation, not after it
    names = inspect.signature(evaluate).parameters
    kw = {k: getattr(opts, k) for k in names if hasattr(opts, k)}
    kw.update(model_path=opts.model, lora=lora_specs(opts), against_lora=[(p, 1.0) for p in opts.against_lora],
              log=(lambda *m: None) if opts.quiet else (lambda *m: print(*m, flush=True)))
    res = evaluate(**kw)
    print(json.dumps({t: {k: v for k, v in m.items() if isinstance(v, (int, float))} for t, m in res["tasks"].items()}))
    if opts.out:
        print(f"-> {opts.out}")


@dataclass
class ScoreOptions(TemplateOptions, DeviceOptions):
    command = "score"
    model: str | None = option(None, "reward model .tinygpt (from 'tinygpt reward')", positional=True, required=True)
    text: str | None = option(None, "the reply (or whole text) to score", required=True)
    prompt: str | None = option(None, "user prompt: score --text as the reply to it, rendered with the template")


def score_text(model_path, text: str, prompt: str | None = None, template=None, device: str = "auto") -> float:
    """The reward of `text` (raw), or of the reply `text` to the user prompt `prompt` rendered
    with the chat template (the one rule: --template, else the one the reward model recorded)."""
    dev, _, _ = setup_device(device)
    rm = load_reward_model(model_path, dev)
    template = resolve_template(template, rm.tokenizer, model_path)
    if prompt is None:
        ids = rm.tokenizer.encode(text)
        if not ids:
            raise UserError("--text is empty")
        return rm.score_texts([ids[-rm.config.block_size:]])[0].item()
    return rm.score_conversation(prompt, text, template)


def score_command(opts: ScoreOptions) -> None:
    check_inputs(opts)
    print(f"{score_text(opts.model, opts.text, opts.prompt, opts.template, opts.device):.6f}")
