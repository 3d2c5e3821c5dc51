"""Verifiable reward functions for GRPO/RLOO/PPO, and how `--reward-fn` names them.

Design choices:
- A reward function is any callable `(prompt, completion, answer) -> float`: `prompt` is the text of
  the prompt's last user turn, `completion` the decoded response WITH its stop marker when the
  model stopped (e.g. "12<|im_end|>"; a response cut by the token budget has none), `answer` the
  prompt row's reference answer or None. Keeping the marker lets a format reward see whether the
  model ended its turn; answer checkers ignore it.
- Built-ins: `gsm8k` (final number: `#### 42`, else the last number, compared numerically with the
  answer's, whose own `####` part is used when present), `synth` (exact answers of the synthetic
  world), `format` (non-empty, ends with a stop marker, short; one third per property).
- `FunctionReward` applies such a function to the trainers' episodes; `ModelReward` scores them with
  a reward model (`tinygpt.reward`), re-tokenizing when its tokenizer differs from the policy's;
  `reward_source` builds either from the `--reward-fn` / `--reward` options (RL, `tinygpt generate`).
- `module:function` imports any function with that signature, or the shorter `(prompt, completion)
  -> float` (told apart by `inspect.signature`); the module must be importable: installed, or on
  the current folder / PYTHONPATH. An exception raised inside such a function is the user's
  mistake, not ours: it stops the run with one line naming the function.
"""
from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

import torch

from .chat import encode_segments
from .data import synth
from .device import resolve_dtype
from .errors import UserError
from .reward_model import load_reward_model

STOP_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<|end|>")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def strip_stop(completion: str) -> tuple[str, bool]:
    """(completion without a trailing stop marker, whether it had one)."""
    for m in STOP_MARKERS:
        if completion.endswith(m):
            return completion[: -len(m)], True
    return completion, False


def _to_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").rstrip("."))
    except ValueError:
        return None


def final_number(text: str) -> float | None:
    """The number after the last `####`, else the last number in the text; None if there is none."""
    if "####" in text:
        found = _NUMBER.findall(text.rsplit("####", 1)[1])
        if found:
            return _to_number(found[0])
    found = _NUMBER.findall(text)
    return _to_number(found[-1]) if found else None


def gsm8k_reward(prompt, completion, answer) -> float:
    """1.0 when the completion's final number equals the answer's (GSM8K `#### N` convention)."""
    if answer is None:
        return 0.0
    got, want = final_number(strip_stop(completion)[0]), final_number(str(answer))
    return 1.0 if got is not None and want is not None and abs(got - want) < 1e-6 else 0.0


def synth_reward(prompt, completion, answer) -> float:
    """Exact match on the synthetic world's bare answers (see tinygpt.data.synth)."""
    return 0.0 if answer is None else synth.synth_reward(prompt, strip_stop(completion)[0], answer)


def format_reward(prompt, completion, answer=None, max_words: int = 100) -> float:
    """One third each for: a non-empty reply, ending with a stop marker, at most `max_words` words."""
    body, stopped = strip_stop(completion)
    words = len(body.split())
    return (float(words > 0) + float(stopped) + float(words <= max_words)) / 3.0


REWARD_FNS = {"gsm8k": gsm8k_reward, "synth": synth_reward, "format": format_reward}


def get_reward_fn(spec: str):
    """A built-in name or `module:function` -> the callable."""
    if spec in REWARD_FNS:
        return REWARD_FNS[spec]
    if ":" not in spec:
        raise UserError(f"unknown --reward-fn '{spec}'", None,
                        f"use one of {', '.join(REWARD_FNS)} or module:function")
    mod_name, _, fn_name = spec.partition(":")
    if str(Path.cwd()) not in sys.path:   # a reward module beside the user's data
        sys.path.append(str(Path.cwd()))
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise UserError(f"cannot import reward module '{mod_name}' ({e})", "--reward-fn",
                        "check the module name and PYTHONPATH") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise UserError(f"module '{mod_name}' has no function '{fn_name}'", "--reward-fn",
                        "give module:function with signature (prompt, completion[, answer]) -> float")
    return user_reward_fn(fn, spec)


def _n_args(fn) -> int:
    """How many of (prompt, completion, answer) `fn` takes: 3 or 2; 0 when it fits neither."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):       # some builtins have no signature: assume the full one
        return 3
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return 3
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = sum(p.default is p.empty for p in positional)
    if any(p.kind == p.KEYWORD_ONLY and p.default is p.empty for p in params) or required > 3:
        return 0
    return 3 if len(positional) >= 3 else 2 if len(positional) == 2 else 0


def adapt_reward_fn(fn):
    """`fn` as a (prompt, completion, answer) callable: a two-argument function drops the answer."""
    n = _n_args(fn)
    if n == 0:
        raise UserError(f"reward function {getattr(fn, '__name__', fn)!r} has the wrong signature", "--reward-fn",
                        "define f(prompt, completion) or f(prompt, completion, answer) returning a float")
    return fn if n == 3 else (lambda prompt, completion, answer=None: fn(prompt, completion))


def user_reward_fn(fn, name: str):
    """A user's reward function, adapted to three arguments; what it raises, or a result that is not
    a number, becomes a one-line error naming it."""
    call = adapt_reward_fn(fn)

    def reward(prompt, completion, answer=None) -> float:
        try:
            return float(call(prompt, completion, answer))
        except Exception as e:  # noqa: BLE001  (user code: any failure is the user's to fix)
            raise UserError(f"reward function {name} failed on completion {completion[:40]!r}: "
                            f"{type(e).__name__}: {e}", "--reward-fn", "fix the function") from None
    reward.__name__ = name
    return reward


# ---- reward sources for the RL trainers -------------------------------------------------------------
class FunctionReward:
    """fn(prompt text of the last user turn, completion with its stop marker, answer) -> float."""

    def __init__(self, fn):
        self.fn = adapt_reward_fn(fn)

    def __call__(self, episodes) -> torch.Tensor:
        out = []
        for e in episodes:
            user = next((m.content for m in reversed(e.prompt.messages) if m.role == "user"), "")
            out.append(float(self.fn(user, e.text, e.prompt.answer)))
        return torch.tensor(out, dtype=torch.float32)


class ModelReward:
    """A reward model's score at the last response token. Same tokenizer as the policy: the policy's
    token ids are scored as they are; another tokenizer: the rendered text is re-tokenized (its
    vocabulary must know the chat template's special tokens)."""

    def __init__(self, rm, policy_tok, template, batch: int = 32):
        self.rm, self.batch, self.template = rm, batch, template
        self.same = rm.tokenizer is None or rm.tokenizer.to_json() == policy_tok.to_json()
        if not self.same:
            vocab = rm.tokenizer.tk.get_vocab(with_added_tokens=True)
            missing = [t for t in template.special_tokens if t not in vocab]
            if missing:
                raise UserError(f"the reward model's tokenizer differs from the policy's and lacks the chat "
                                f"template's tokens {', '.join(missing)}", "--reward",
                                "use a reward model trained with the same tokenizer and template")

    def encode(self, e) -> list[int]:
        if self.same:
            ids = e.prompt.ids + e.tokens
        else:  # as the reward model saw its data: prompt segments, then reply + end-of-turn marker
            segments = self.template.render(e.prompt.messages, add_generation_prompt=True)
            ids = encode_segments(self.rm.tokenizer, segments)[0] + self.rm.tokenizer.encode(e.text)
        return ids[-self.rm.config.block_size:]

    @torch.no_grad()
    def __call__(self, episodes) -> torch.Tensor:
        seqs = [self.encode(e) for e in episodes]
        return torch.cat([self.rm.score_texts(seqs[s:s + self.batch]).float().cpu()
                          for s in range(0, len(seqs), self.batch)])


def reward_source(reward_fn: str | None, reward_model: str | None, dtype: str, tokenizer, template, device):
    """What scores episodes: the `--reward-fn` function, else the `--reward` model (frozen, in
    `dtype`; texts rendered with the policy's chat template, as the reward model was trained)."""
    if reward_fn:
        return FunctionReward(get_reward_fn(reward_fn))
    rm = load_reward_model(reward_model, device)
    rm.to(resolve_dtype(dtype, device)).requires_grad_(False)
    return ModelReward(rm, tokenizer, template)
