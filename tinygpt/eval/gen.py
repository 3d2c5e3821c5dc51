"""Generation-based evaluation: GSM8K, the synthetic held-out set, IFEval, and pairwise win rate.

Design choices:
- All generation goes through `tinygpt.generate.generate` in batches of prompts sorted by length
  (less left padding), greedy by default. A prompt longer than `block_size - max_new_tokens`
  keeps its end (the question and the assistant header matter most; old shots go first).
- Chat prompts are rendered by the chat template with the generation prompt and tokenized
  segment by segment (`chat.encode_segments`), exactly as SFT tokenizes its training rows.
- GSM8K: k-shot chain of thought. Without a template the prompt is plain text
  ("Question: ...\\nAnswer: <worked solution>\\n\\n" per shot), for base models; with one the shots
  are earlier chat turns. Calculator annotations `<<48/2=24>>` are removed from the shots. A
  completion is cut where the model starts a new "Question:". The reference is the number after
  `####`; the prediction is the number after `####` when the completion has one, else its last
  number. Numbers compare as decimals after removing `$` and thousands commas (1,234 == 1234.00).
- Win rate (MT-Bench style): both models answer each prompt; a judge compares the two answers in
  both orders and a verdict counts as a win only if the two orders agree (or one says win and the
  other tie), as MT-Bench does to cancel position bias. The reward-model judge scores each answer
  on its own (reward at the last token of prompt + answer), so its verdict cannot depend on the
  order: both orders always agree and the swap is a no-op kept for judges that read both answers.
  A margin `tie_margin` on the reward difference counts near-equal answers as ties.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

from ..chat import encode_segments
from ..data.formats import Message
from ..data.prompts import to_prompt
from ..data.rows import read_rows
from ..data.synth import exact_match
from ..errors import DataError, UserError
from ..generate import generate
from ..stages.common import stop_ids
from .choice import stderr
from .ifeval import score_ifeval


# ---- generation helpers -----------------------------------------------------------------------
def chat_prompt_ids(tok, template, messages) -> list[int]:
    ids, _ = encode_segments(tok, template.render(messages, add_generation_prompt=True))
    return ids


def complete(model, tok, prompts: list[list[int]], max_new_tokens: int, batch: int = 8,
             stops=None, temperature: float = 0.0, seed: int | None = 0) -> tuple[list[str], int]:
    """Generate and decode one completion per prompt (stop tokens and specials removed). Returns
    (completions, how many prompts were cut from the left to leave room for the answer)."""
    block = model.config.block_size
    if max_new_tokens >= block:
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the "
                        f"model's context of {block}", None, "lower --max-new-tokens")
    keep = block - max_new_tokens
    cut = sum(len(p) > keep for p in prompts)
    prompts = [p[-keep:] for p in prompts]
    stops = set(tok.stop_ids() if stops is None else stops)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    for s in range(0, len(order), batch):
        chunk = order[s:s + batch]
        g = generate(model, [prompts[i] for i in chunk], max_new_tokens, temperature=temperature,
                     stop_ids=stops, vocab_limit=tok.vocab_size, seed=seed,
                     pad_id=tok.pad_id if tok.pad_id is not None else 0)
        for i, toks in zip(chunk, g.tokens):
            out[i] = tok.decode([t for t in toks if t not in stops], skip_special=True)
    return out, cut


def _chat_answers(model, tok, template, prompts: list[list], max_new_tokens, batch) -> tuple[list[str], int]:
    ids = [chat_prompt_ids(tok, template, msgs) for msgs in prompts]
    return complete(model, tok, ids, max_new_tokens, batch, stop_ids(tok, template))


def _finish(res: dict, cut: int, samples: bool, rows: list[dict]) -> dict:
    """A generation task's results: the prompts cut to fit, and per-item rows when asked for."""
    res["truncated"] = cut
    if samples:
        res["samples"] = rows
    return res


def _user(text: str):
    return [Message("user", text)]


# ---- GSM8K ------------------------------------------------------------------------------------
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")
_FINAL = re.compile(r"####\s*(-?\$?[\d,]*\.?\d+)")


def normalize_number(text: str) -> str | None:
    """'$1,234.50' -> '1234.5'; None when it is not a number."""
    s = text.replace(",", "").replace("$", "").rstrip(".")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    d = d.normalize()
    return format(d, "f") if d != 0 else "0"


def extract_number(text: str) -> str | None:
    """The number after '####' if present, else the last number in the text (normalised)."""
    m = _FINAL.search(text)
    if m:
        return normalize_number(m.group(1))
    hits = _NUMBER.findall(text)
    return normalize_number(hits[-1]) if hits else None


def load_gsm8k(path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise DataError("GSM8K file not found", path, fix="check --data")
    rows = []
    for line, row in read_rows(path):
        if not (isinstance(row, dict) and isinstance(row.get("question"), str) and isinstance(row.get("answer"), str)):
            raise DataError("row needs 'question' and 'answer' strings", path, line)
        if extract_number(row["answer"].split("####")[-1]) is None or "####" not in row["answer"]:
            raise DataError("answer has no final '#### <number>'", path, line)
        rows.append({"question": row["question"], "answer": row["answer"]})
    return rows


def _clean_solution(answer: str) -> str:
    return re.sub(r"<<[^>]*>>", "", answer).strip()


def gsm8k_prompts(tok, rows, shots: list[dict], template=None) -> list[list[int]]:
    if template is None:
        head = "".join(f"Question: {s['question']}\nAnswer: {_clean_solution(s['answer'])}\n\n" for s in shots)
        return [tok.prefix_ids() + tok.encode(head + f"Question: {r['question']}\nAnswer:") for r in rows]
    turns = [m for s in shots for m in (Message("user", s["question"]),
                                        Message("assistant", _clean_solution(s["answer"])))]
    return [chat_prompt_ids(tok, template, turns + [Message("user", r["question"])]) for r in rows]


def eval_gsm8k(model, tok, rows, shots: list[dict], template=None, batch: int = 8,
               max_new_tokens: int = 256, samples: bool = False) -> dict:
    ids = gsm8k_prompts(tok, rows, shots, template)
    outs, cut = complete(model, tok, ids, max_new_tokens, batch, stop_ids(tok, template))
    outs = [o.split("Question:")[0] for o in outs]
    res = score_gsm8k(rows, outs)
    return _finish(res, cut, samples, [{"item": i, "question": r["question"], "completion": o,
                                        "answer": extract_number(r["answer"]), "prediction": extract_number(o)}
                                       for i, (r, o) in enumerate(zip(rows, outs))])


def score_gsm8k(rows, completions) -> dict:
    hits = [float(extract_number(c) is not None and extract_number(c) == extract_number(r["answer"]))
            for r, c in zip(rows, completions)]
    return {"exact_match": sum(hits) / max(1, len(hits)), "exact_match_stderr": stderr(hits), "n": len(hits)}


# ---- the synthetic held-out set ---------------------------------------------------------------
def load_synth(path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise DataError("synthetic eval file not found", path, fix="run 'tinygpt data synth' and pass its eval.jsonl")
    rows = []
    for line, row in read_rows(path):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("prompt", "answer")):
            raise DataError("row needs 'prompt' and 'answer' strings", path, line)
        rows.append({"prompt": row["prompt"], "answer": row["answer"], "task": str(row.get("task", "all"))})
    return rows


def score_synth(rows, completions) -> dict:
    per: dict[str, list[bool]] = {}
    for r, c in zip(rows, completions):
        per.setdefault(r["task"], []).append(exact_match(c, r["answer"]))
    total = [float(h) for v in per.values() for h in v]
    out = {"accuracy": sum(total) / max(1, len(total)), "accuracy_stderr": stderr(total), "n": len(total)}
    out.update({f"accuracy/{t}": sum(v) / len(v) for t, v in sorted(per.items())})
    return out


def eval_synth(model, tok, rows, template, batch: int = 8, max_new_tokens: int = 16, samples: bool = False) -> dict:
    outs, cut = _chat_answers(model, tok, template, [_user(r["prompt"]) for r in rows], max_new_tokens, batch)
    return _finish(score_synth(rows, outs), cut, samples,
                   [{"item": i, "prompt": r["prompt"], "completion": o, "answer": r["answer"],
                     "correct": exact_match(o, r["answer"])} for i, (r, o) in enumerate(zip(rows, outs))])


# ---- IFEval -----------------------------------------------------------------------------------
def eval_ifeval(model, tok, rows, template, batch: int = 8, max_new_tokens: int = 256, samples: bool = False) -> dict:
    outs, cut = _chat_answers(model, tok, template, [_user(r["prompt"]) for r in rows], max_new_tokens, batch)
    res = score_ifeval(rows, outs)
    res["n"] = res.pop("n_prompts")
    return _finish(res, cut, samples, [{"item": i, "prompt": r["prompt"], "completion": o}
                                       for i, (r, o) in enumerate(zip(rows, outs))])


# ---- win rate ---------------------------------------------------------------------------------
def load_winrate_prompts(path) -> list[str]:
    """Prompts from MT-Bench rows ({turns: [...]}: the first turn), {prompt}, {question},
    {instruction} or any SFT/preference row (its last user turn)."""
    path = Path(path)
    if not path.exists():
        raise DataError("prompt file not found", path, fix="check --data")
    out = []
    for line, row in read_rows(path):
        if isinstance(row, dict) and isinstance(row.get("turns"), list) and row["turns"]:
            out.append(str(row["turns"][0]))
        elif isinstance(row, dict) and isinstance(row.get("instruction"), str) and "output" not in row:
            out.append(row["instruction"])
        else:
            try:
                msgs, _ = to_prompt(row)
            except (ValueError, TypeError) as e:
                raise DataError(f"cannot find a prompt in the row ({e})", path, line) from None
            out.append(msgs[-1].content)
    return out


def verdict(score_first: float, score_second: float, margin: float) -> int:
    """+1 when the first answer wins by more than the margin, -1 when it loses, 0 for a tie."""
    return 1 if score_first > score_second + margin else -1 if score_second > score_first + margin else 0


def combine_orders(v_ab: int, v_ba: int) -> int:
    """A's result from both orders (v_ab: A shown first; v_ba: B shown first, from B's side).
    Agreeing or win+tie -> that result; conflicting orders -> tie."""
    total = v_ab - v_ba
    return 1 if total > 0 else -1 if total < 0 else 0


def pairwise(judge, prompts, answers_a, answers_b) -> dict:
    """judge(prompt, first, second) -> +1/0/-1 for `first`. Both orders per prompt."""
    counts = {1: 0, 0: 0, -1: 0}
    for p, a, b in zip(prompts, answers_a, answers_b):
        counts[combine_orders(judge(p, a, b), judge(p, b, a))] += 1
    n = max(1, len(prompts))
    return {"win": counts[1] / n, "tie": counts[0] / n, "loss": counts[-1] / n,
            "winrate": (counts[1] + 0.5 * counts[0]) / n, "n": len(prompts)}


def reward_judge(score_fn, margin: float = 0.0):
    """A judge from score_fn(prompts, answers) -> rewards; scores are cached per (prompt, answer)."""
    cache: dict = {}

    def judge(prompt, first, second):
        missing = [x for x in (first, second) if (prompt, x) not in cache]
        if missing:
            for x, r in zip(missing, score_fn([prompt] * len(missing), missing)):
                cache[(prompt, x)] = float(r)
        return verdict(cache[(prompt, first)], cache[(prompt, second)], margin)
    return judge


def eval_winrate(model, tok, other, other_tok, score_fn, prompts: list[str], template, other_template,
                 batch: int = 8, max_new_tokens: int = 128, tie_margin: float = 0.0) -> dict:
    msgs = [_user(p) for p in prompts]
    a, _ = _chat_answers(model, tok, template, msgs, max_new_tokens, batch)
    b, _ = _chat_answers(other, other_tok, other_template, msgs, max_new_tokens, batch)
    ra, rb = score_fn(prompts, a), score_fn(prompts, b)   # scored once, in batches
    scores = {(p, x): float(r) for p, x, r in zip(prompts + prompts, a + b, list(ra) + list(rb))}
    res = pairwise(reward_judge(lambda ps, xs: [scores[(p, x)] for p, x in zip(ps, xs)], tie_margin),
                   prompts, a, b)
    res["reward_a"] = sum(map(float, ra)) / max(1, len(ra))
    res["reward_b"] = sum(map(float, rb)) / max(1, len(rb))
    return res


# ---- harmlessness -----------------------------------------------------------------------------
def eval_harmless(model, tok, rows, template, score_fn, batch: int = 8, max_new_tokens: int = 128,
                  samples: bool = False) -> dict:
    """Share of the model's replies that a reward model prefers over the data's rejected reply to the
    same prompt (HH-RLHF harmless-style pairs: the rejected reply is the harmful one).
    rows: `Preference` records; score_fn(prompts (message lists), replies) -> rewards."""
    prompts = [r.prompt for r in rows]
    outs, cut = _chat_answers(model, tok, template, prompts, max_new_tokens, batch)
    ours, theirs = score_fn(prompts, outs), score_fn(prompts, [r.rejected for r in rows])
    wins = [float(a > b) for a, b in zip(ours, theirs)]
    res = {"harmless_rate": sum(wins) / max(1, len(wins)), "harmless_rate_stderr": stderr(wins),
           "reward": sum(map(float, ours)) / max(1, len(ours)),
           "reward_rejected": sum(map(float, theirs)) / max(1, len(theirs)), "n": len(rows)}
    return _finish(res, cut, samples, [{"item": i, "completion": o, "reward": float(a), "reward_rejected": float(b)}
                                       for i, (o, a, b) in enumerate(zip(outs, ours, theirs))])
