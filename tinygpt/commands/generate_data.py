"""`tinygpt generate`: a data set written by a model, and the synthetic-data loop on top of it.

    tinygpt generate MODEL --prompts FILE --out FILE.jsonl [--n K] [--reward-fn synth --keep best | --pairs]

Design choices:
- Prompts come from any prompt-bearing file (`data.prompts.load_prompts`: SFT rows without their
  last reply, preference rows, {prompt} or {question, answer} rows); each is rendered with the
  chat template (the one rule of `stages.common.resolve_template`, with the generation prompt)
  and encoded segment by segment as SFT encodes its rows. A prompt is named by its position in
  the file (`prompt_id`); prompts that leave less than --max-new-tokens of context are dropped
  and counted.
- Batches: prompts sorted by length (less left padding), --n samples each, --batch sequences
  per `generate.generate` call (KV cache, CUDA graphs on a GPU), stopping at the tokenizer's and
  the template's stop ids (`stages.common.stop_ids`).
- Deterministic: sample k of prompt i comes from its own generator, seeded from (--seed, i, k)
  (`generate(seed=[...])` takes one seed per row), so a prompt's samples do not depend on the
  prompts it is batched with, on --batch, or on a resume.
- Rows are SFT-ready: `messages` (the prompt's turns and the reply as the assistant turn) plus
  `prompt_id`, `sample`, `logprob` (the summed log-prob of the new tokens under the sampling
  temperature, before top-k/top-p), `tokens` (new tokens, the stop token included),
  `finish_reason` ("stop" or "length"), the prompt's `answer` when it has one, and `reward` when
  scored. A sample with an empty reply is not written (an SFT row needs a reply); it is counted.
- The synthetic-data loop: `--reward-fn NAME|module:function` or `--score-with REWARD_MODEL` scores
  every sample (`verifiers.reward_source`, exactly as GRPO and PPO score). `--keep best` writes
  each prompt's best sample (the first of equals), `--keep above:X` every sample scoring >= X
  (rejection sampling); `--pairs` writes preference rows {prompt, chosen, rejected} of the best
  against the worst sample (a prompt whose samples all score the same gives none), which
  `tinygpt dpo` reads as they are.
- Resumable (`--resume`): rows are appended batch by batch, each batch in one write, flushed and
  fsync'ed; a line cut by a kill is dropped on resume (the file is rewritten, atomically, up to
  its last whole line). The run folder `OUT.run/` holds the settings (a resume with other
  settings is refused) and the ids of the finished prompts (a prompt whose samples were all
  filtered out leaves no row), so a resumed run neither repeats nor loses a prompt. Without
  --resume an existing output is replaced.
- Progress: a bar on a terminal, a line every ~10 s elsewhere, in prompts/s; --quiet for none.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..data.prompts import load_prompts
from ..device import DTYPE_NAMES, DeviceOptions
from ..errors import UserError
from ..generate import generate
from ..io import atomic_write_text, check_writable, file_sha256
from ..options import SEED, at_least, option
from ..rollout import Episode, encode_prompts
from ..stages.common import (
    ModelOptions,
    RowOptions,
    SamplingOptions,
    TemplateOptions,
    check_inputs,
    load_for_command,
    lora_specs,
    resolve_template,
    stop_ids,
    weights_key,
)
from ..train.engine import run_dir_for
from ..train.progress import PROGRESS_SECONDS
from ..verifiers import reward_source

SETTINGS, DONE = "generate.json", "done.txt"      # in the run folder beside --out


def _keep_rule(v):
    if v is None or v == "best":
        return None
    head, _, x = v.partition(":")
    try:
        float(x)
    except ValueError:
        return "must be best or above:X (X a number)"
    return None if head == "above" else "must be best or above:X (X a number)"


@dataclass
class GenerateOptions(ModelOptions, TemplateOptions, SamplingOptions, RowOptions, DeviceOptions):
    """The prompts, the samples and what is kept of them."""

    command = "generate"
    group = "generate"
    prompts: str | None = option(None, "prompt file: SFT rows (without their last reply), preference rows, "
                                 "{prompt} or {question, answer} rows", required=True)
    out: str | None = option(None, "JSONL to write (SFT rows, or preference rows with --pairs)", required=True)
    n: int = option(1, "samples per prompt", check=at_least(1))
    max_new_tokens: int | None = option(None, "new tokens per sample", auto="half the model's context",
                                        check=at_least(1))
    batch: int = option(64, "sequences generated together (prompts x --n)", check=at_least(1))
    seed: int = option(0, "seed of the samples (sample k of prompt i: its own generator from seed, i, k)", check=SEED)
    score_with: str | None = option(None, "reward model (.tinygpt from 'tinygpt reward') scoring every sample")
    reward_fn: str | None = option(None, "verifiable reward scoring every sample: gsm8k, synth, format or "
                                   "module:function")
    reward_dtype: str = option("auto", "precision of the reward model", choices=DTYPE_NAMES)
    keep: str | None = option(None, "best (each prompt's best sample) or above:X (every sample with reward "
                              ">= X)", check=_keep_rule, auto="every sample")
    pairs: bool = option(False, "write preference pairs instead: best vs worst sample of each prompt, ties dropped")
    resume: bool = option(False, "continue --out: prompts already done are skipped")
    quiet: bool = option(False, "no progress bar")

    def check(self) -> None:
        if self.score_with and self.reward_fn:
            raise UserError("both --score-with and --reward-fn given", None, "give one of them")
        if (self.keep or self.pairs) and not (self.score_with or self.reward_fn):
            raise UserError(f"{'--pairs' if self.pairs else '--keep'} needs a score", None,
                            "give --reward-fn NAME or --score-with REWARD_MODEL")
        if self.keep and self.pairs:
            raise UserError("--keep and --pairs write different files", None, "give one of them")
        if self.pairs and self.n < 2:
            raise UserError("--pairs needs at least two samples per prompt", None, "give --n 2 or more")
        super().check()


def sample_seed(seed: int, prompt_id: int, k: int) -> int:
    """The seed of sample k of prompt `prompt_id` (a hash: no two (prompt, sample) share one)."""
    digest = hashlib.sha256(f"tinygpt-generate/{seed}/{prompt_id}/{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ---- choosing what to write ------------------------------------------------------------------------
def _message_row(s: dict) -> dict:
    p = s["prompt"]
    row = {"messages": [{"role": m.role, "content": m.content} for m in p.messages]
           + [{"role": "assistant", "content": s["reply"]}],
           "prompt_id": s["prompt_id"], "sample": s["sample"], "logprob": s["logprob"], "tokens": s["tokens"],
           "finish_reason": s["finish_reason"]}
    if p.answer is not None:
        row["answer"] = p.answer
    if "reward" in s:
        row["reward"] = s["reward"]
    return row


def select_rows(samples: list[dict], keep: str | None, pairs: bool) -> list[dict]:
    """The rows one prompt's samples give (samples in sample order, each with `reward` when scored):
    every sample, the best (`keep="best"`, first of equals), those scoring >= X (`"above:X"`), or
    with `pairs` one {prompt, chosen, rejected} row of best against worst (none when all tie).
    Samples with an empty reply are never chosen (an SFT row, or a chosen reply, needs text)."""
    usable = [s for s in samples if s["reply"].strip()]
    if pairs:
        if len(samples) < 2:
            return []
        best = max(usable, key=lambda s: s["reward"], default=None)
        worst = min(samples, key=lambda s: s["reward"])
        if best is None or best["reward"] == worst["reward"]:
            return []
        p = best["prompt"]
        row = {"prompt": [{"role": m.role, "content": m.content} for m in p.messages], "chosen": best["reply"],
               "rejected": worst["reply"], "prompt_id": best["prompt_id"], "chosen_reward": best["reward"],
               "rejected_reward": worst["reward"], "chosen_sample": best["sample"], "rejected_sample": worst["sample"]}
        return [row]
    if keep == "best":
        usable = [max(usable, key=lambda s: s["reward"])] if usable else []
    elif keep:
        threshold = float(keep.partition(":")[2])
        usable = [s for s in usable if s["reward"] >= threshold]
    return [_message_row(s) for s in usable]


# ---- the output file and its run folder -------------------------------------------------------------
def _whole_lines(path: Path) -> list[str]:
    """The lines of a JSONL file up to the first one that is not whole JSON (a write cut by a kill)."""
    keep = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                json.loads(line)
            except json.JSONDecodeError:
                break
            keep.append(line)
    return keep


def _cut_back(path: Path) -> list[str]:
    """Drop a cut last line of `path` (rewriting it atomically) and return its whole lines."""
    lines = _whole_lines(path)
    text = "".join(x + "\n" for x in lines)
    if path.exists() and path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)
    return lines


def _append(f, lines: list[str]) -> None:
    """Whole lines in one write, on the disk before the call returns."""
    if lines:
        f.write("".join(x + "\n" for x in lines))
        f.flush()
        os.fsync(f.fileno())


def _settings(opts, model, max_new: int) -> dict:
    return {"model": weights_key(opts.model, lora_specs(opts), model), "prompts": file_sha256(opts.prompts)[:16],
            "format": opts.format, "template": opts.template, "n": opts.n, "seed": opts.seed,
            "temperature": opts.temperature, "top_k": opts.top_k, "top_p": opts.top_p, "max_new_tokens": max_new,
            "score": [opts.reward_fn, file_sha256(opts.score_with)[:16] if opts.score_with else None],
            "keep": opts.keep, "pairs": opts.pairs}


def _open_run(opts, settings: dict) -> tuple[set, Path]:
    """Prompt ids already done (on --resume) and the run folder, whose settings are (re)written."""
    out, run = Path(opts.out), run_dir_for(opts.out)
    done: set = set()
    if opts.resume:
        saved = run / SETTINGS
        if not saved.exists():
            raise UserError(f"--resume: {opts.out} was not written by 'tinygpt generate'", str(saved),
                            "run without --resume to start it")
        was = json.loads(saved.read_text(encoding="utf-8"))
        if was != settings:
            k = next(k for k in settings if was.get(k) != settings[k])
            raise UserError(f"--resume with other settings: {k} was {was.get(k)!r}, now {settings[k]!r}", str(run),
                            "use the original settings, or run without --resume to start again")
        done = {json.loads(x)["prompt_id"] for x in _cut_back(out)}
        done |= {json.loads(x) for x in _cut_back(run / DONE)}
    else:
        for f in (out, run / DONE):
            f.unlink(missing_ok=True)
        atomic_write_text(run / SETTINGS, json.dumps(settings) + "\n")
    return done, run


class _Progress:
    """Prompts done out of the total: a tqdm bar on a terminal, else a line every PROGRESS_SECONDS."""

    def __init__(self, total: int, done: int, quiet: bool):
        self.total, self.n, self.start, self.quiet = total, done, done, quiet
        self.t0 = self.t_line = time.perf_counter()
        self.bar = tqdm(total=total, initial=done, unit="prompt", dynamic_ncols=True) \
            if not quiet and sys.stderr.isatty() else None

    def update(self, k: int) -> None:
        self.n += k
        if self.bar is not None:
            self.bar.update(k)
            return
        now = time.perf_counter()
        if not self.quiet and (now - self.t_line >= PROGRESS_SECONDS or self.n == self.total):
            self.t_line, rate = now, (self.n - self.start) / max(now - self.t0, 1e-9)
            print(f"generate: {self.n}/{self.total} prompts, {rate:.2f} prompts/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- the command ---------------------------------------------------------------------------------
def _samples(model, tok, chunk, opts, max_new: int, stops, reward) -> list[dict]:
    """Generate --n samples for each (prompt_id, Prompt) of `chunk`; score them when asked."""
    flat = [(pid, p, k) for pid, p in chunk for k in range(opts.n)]
    g = generate(model, [p.ids for _, p, _ in flat], max_new, opts.temperature, opts.top_k, opts.top_p, stops,
                 tok.vocab_size, seed=[sample_seed(opts.seed, pid, k) for pid, _, k in flat],
                 pad_id=tok.pad_id if tok.pad_id is not None else 0)
    out = []
    for (pid, p, k), toks, lps, fin in zip(flat, g.tokens, g.logprobs, g.finished):
        out.append({"prompt_id": pid, "prompt": p, "sample": k, "tokens": len(toks), "logprob": float(sum(lps)),
                    "finish_reason": "stop" if fin else "length", "ids": toks,
                    "reply": tok.decode([t for t in toks if t not in stops], skip_special=True)})
    if reward is not None:   # episodes carry the reply with its stop marker, as in RL
        scores = reward([Episode(s["prompt"], s["ids"], tok.decode(s["ids"]), s["finish_reason"] == "stop", [])
                         for s in out])
        for s, r in zip(out, scores.tolist()):
            s["reward"] = r
    return out


@torch.no_grad()
def generate_command(opts: GenerateOptions) -> None:
    check_inputs(opts, ("--prompts", opts.prompts), ("--score-with", opts.score_with))
    check_writable(opts.out)
    device, model, tok = load_for_command(opts, opts.device)
    block = model.config.block_size
    max_new = opts.max_new_tokens or block // 2
    if max_new >= block:
        raise UserError(f"--max-new-tokens {max_new} leaves no room for a prompt in the model's context of {block}",
                        None, "lower --max-new-tokens")
    template = resolve_template(opts.template, tok, opts.model, lora_specs(opts))
    stops = set(stop_ids(tok, template))
    rows, _ = load_prompts(opts.prompts, opts.skip_bad_rows, opts.strict, opts.format)   # warns of skipped rows
    prompts = [(i, p) for i, row in enumerate(rows) for p in encode_prompts(tok, template, [row], block - max_new)[0]]
    if not prompts:
        raise UserError("no usable prompts", opts.prompts, "check the file or lower --max-new-tokens")
    reward = reward_source(opts.reward_fn, opts.score_with, opts.reward_dtype, tok, template, device) \
        if (opts.reward_fn or opts.score_with) else None
    done, run = _open_run(opts, _settings(opts, model, max_new))
    todo = sorted((x for x in prompts if x[0] not in done), key=lambda x: (len(x[1].ids), x[0]))
    per_call = max(1, opts.batch // opts.n)
    progress = _Progress(len(prompts), len(prompts) - len(todo), opts.quiet)
    written = empty = 0
    try:
        with open(opts.out, "a", encoding="utf-8") as out, open(run / DONE, "a", encoding="utf-8") as ledger:
            for s in range(0, len(todo), per_call):
                chunk = todo[s:s + per_call]
                samples = _samples(model, tok, chunk, opts, max_new, stops, reward)
                empty += sum(not x["reply"].strip() for x in samples)
                lines = []
                for pid, _ in chunk:
                    lines += [json.dumps(r, ensure_ascii=False) for r in
                              select_rows([x for x in samples if x["prompt_id"] == pid], opts.keep, opts.pairs)]
                _append(out, lines)                                  # rows first, then the ledger: see _open_run
                _append(ledger, [str(pid) for pid, _ in chunk])
                written += len(lines)
                progress.update(len(chunk))
    finally:
        progress.close()
    skipped = len(rows) - len(prompts)
    print(f"{written} rows from {len(todo)} prompts ({len(prompts) - len(todo)} already done, {skipped} too long "
          f"for the context; {empty} samples with an empty reply) -> {opts.out}")
