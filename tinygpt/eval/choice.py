"""Log-likelihood scoring: multiple choice (MMLU, ARC, PIQA, OpenBookQA, CommonsenseQA, BoolQ,
HellaSwag, Winogrande) and LAMBADA, plus the batched `loglikelihood` core that `ppl` reuses.

Design choices:
- Every task becomes `ChoiceItem`s: one (context, continuation) pair per choice and the gold index.
  Ordinary multiple choice repeats the context with a different continuation per choice;
  Winogrande's partial scoring is the other way round (one continuation after each context
  option), so both are the same computation: log p(continuation | context), summed over the
  continuation's tokens.
- Context and continuation are tokenized separately and concatenated, so the continuation's tokens
  are the same whatever the context ends with (no token search, no offset mapping). The
  continuation carries its leading space (" Paris"), as a byte-level BPE would write it in text.
  Every context starts with the model's `doc_prefix` (what it saw before each training document:
  EOS for models pretrained here), as lm-evaluation-harness does with `add_bos_token=True`.
- Metrics follow lm-evaluation-harness: `acc` picks the choice with the highest summed log-prob;
  `acc_norm` divides it by the length in characters of the choice text without the space that
  joins it to the context; each accuracy comes with its standard error (sample standard deviation
  over items / sqrt(n)). `samples=True` returns each item's log-likelihoods and predictions.
- Requests are sorted by length and right-padded into batches: under causal attention padding on
  the right never changes the logits of the real positions, and position ids stay 0..T-1.
  Logits past the tokenizer's vocabulary (padding rows of the embedding) are cut off.
- Over-long requests keep their last `block_size + 1` tokens (the context is cut on the left); the
  count of items cut is reported (`truncated`), never silent.
- k-shot: demonstrations are other items of the same file (same subject for MMLU), chosen by a
  generator seeded with the item's index, written as their gold context + gold continuation.
"""
from __future__ import annotations

import csv
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.rows import read_rows
from ..errors import DataError, UserError
from ..losses import token_logprobs

LETTERS = "ABCD"
# Text put between a task's query and the answer (the answer itself starts with a space).
DELIMITERS = {"arc": "\nAnswer:", "piqa": "\nAnswer:", "boolq": "\nAnswer:", "openbookqa": "",
              "commonsenseqa": ""}


# ---- the scoring core -------------------------------------------------------------------------
@torch.no_grad()
def loglikelihood(model, requests: list[tuple[list[int], list[int]]], batch: int = 8,
                  vocab_limit: int | None = None) -> list[tuple[float, bool, int]]:
    """For each (context ids, continuation ids): (summed log p(continuation | context), whether
    greedy decoding reproduces the continuation exactly, number of continuation tokens scored,
    whether the request was cut to fit the context). The context must hold at least one token
    (the first token has nothing to be predicted from)."""
    device = next(model.parameters()).device
    block = model.config.block_size
    was_training = model.training
    model.eval()
    rows = []
    for ctx, cont in requests:
        if not ctx or not cont:
            raise ValueError("loglikelihood needs a non-empty context and continuation")
        whole = list(ctx) + list(cont)
        full = whole[-(block + 1):]
        rows.append((full, min(len(cont), len(full) - 1), len(whole) > len(full)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list = [None] * len(rows)
    for start in range(0, len(order), batch):
        chunk = order[start:start + batch]
        T = max(len(rows[i][0]) for i in chunk) - 1
        x = torch.zeros(len(chunk), T, dtype=torch.long)                 # (B, T) inputs
        y = torch.full((len(chunk), T), -100, dtype=torch.long)          # (B, T) targets, -100 = unscored
        for b, i in enumerate(chunk):
            full, n, _ = rows[i]
            x[b, :len(full) - 1] = torch.tensor(full[:-1])
            y[b, len(full) - 1 - n:len(full) - 1] = torch.tensor(full[-n:])
        x, y = x.to(device), y.to(device)
        logits = model(x).float()[..., :vocab_limit]                     # (B, T, V) real tokens only
        lp = token_logprobs(logits, y).sum(-1)                           # (B,)
        scored = y != -100
        greedy = ((logits.argmax(-1) == y) | ~scored).all(-1)            # (B,)
        for b, i in enumerate(chunk):
            out[i] = (float(lp[b]), bool(greedy[b]), rows[i][1], rows[i][2])
    model.train(was_training)
    return out


# ---- items ------------------------------------------------------------------------------------
@dataclass
class ChoiceItem:
    contexts: list[str]          # one per choice
    continuations: list[str]     # one per choice, leading space included
    gold: int
    group: str = ""              # few-shot demonstrations come from the same group (MMLU subject)
    preamble: str = ""           # written once before the demonstrations (MMLU's header)

    @property
    def demo(self) -> str:
        return self.contexts[self.gold] + self.continuations[self.gold]

    def norm_lengths(self) -> list[int]:
        """What acc_norm divides by: characters of each choice without its joining space."""
        return [max(1, len(c[1:] if c.startswith(" ") else c)) for c in self.continuations]


@dataclass
class ChoiceResult:
    acc: float
    acc_norm: float
    n: int
    extra: dict = field(default_factory=dict)


def _join(query: str, delimiter: str) -> str:
    """The context for a query: query + delimiter, without doubling a newline."""
    if delimiter.startswith("\n") and query.endswith("\n"):
        delimiter = delimiter[1:]
    return query.rstrip(" ") + delimiter


def _space(text: str) -> str:
    return text if text[:1].isspace() else " " + text


def add_shots(items: list[ChoiceItem], k: int, pool: list[ChoiceItem] | None = None,
              seed: int = 1234, same_file: bool = False) -> list[ChoiceItem]:
    """Prefix each item's contexts with k demonstrations from `pool` (default: the other items),
    same group only; the item itself is never its own demonstration. `same_file`: `items` is a
    prefix of `pool` (the first --limit items of the file), so pool[i] is items[i] and is skipped."""
    if k <= 0:
        return [ChoiceItem(it.contexts if not it.preamble else [it.preamble + c for c in it.contexts],
                           it.continuations, it.gold, it.group) for it in items]
    own = pool is None or same_file
    pool = items if pool is None else pool
    by_group: dict[str, list[int]] = {}
    for j, it in enumerate(pool):
        by_group.setdefault(it.group, []).append(j)
    out = []
    for i, it in enumerate(items):
        candidates = [j for j in by_group.get(it.group, []) if not (own and j == i)]
        picks = random.Random(seed + i).sample(candidates, min(k, len(candidates)))
        prefix = it.preamble + "".join(pool[j].demo + "\n\n" for j in picks)
        out.append(ChoiceItem([prefix + c for c in it.contexts], it.continuations, it.gold, it.group))
    return out


def stderr(values) -> float:
    """Standard error of a mean, as lm-evaluation-harness reports it: sample std / sqrt(n)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def context_ids(tok, text: str) -> list[int]:
    """A context as the model reads it: its document prefix, then the text."""
    return tok.prefix_ids() + tok.encode(text)


def item_loglikelihoods(model, tok, items: list[ChoiceItem], batch: int = 8):
    """(per-item lists of log p(choice | context), per-item 'some request was cut to fit')."""
    if not items:
        raise UserError("no items to evaluate")
    requests, owner = [], []
    for n, it in enumerate(items):
        for c, (ctx, cont) in enumerate(zip(it.contexts, it.continuations)):
            requests.append((context_ids(tok, ctx) or [tok.eos_id or 0], tok.encode(cont)))
            owner.append((n, c))
    scores = loglikelihood(model, requests, batch, vocab_limit=tok.vocab_size)
    per_item: list[list[float]] = [[0.0] * len(it.continuations) for it in items]
    cut = [False] * len(items)
    for (n, c), (lp, _, _, truncated) in zip(owner, scores):
        per_item[n][c] = lp
        cut[n] |= truncated
    return per_item, cut


def _argmax(xs) -> int:
    return max(range(len(xs)), key=xs.__getitem__)


def score_choices(model, tok, items: list[ChoiceItem], batch: int = 8, samples: bool = False) -> ChoiceResult:
    """acc and acc_norm over items (each choice scored by log p(continuation | context))."""
    per_item, cut = item_loglikelihoods(model, tok, items, batch)
    hits, hits_norm, rows = [], [], []
    for i, (it, lps) in enumerate(zip(items, per_item)):
        norm = [lp / n for lp, n in zip(lps, it.norm_lengths())]
        pred, pred_norm = _argmax(lps), _argmax(norm)
        hits.append(float(pred == it.gold))
        hits_norm.append(float(pred_norm == it.gold))
        if samples:
            rows.append({"item": i, "gold": it.gold, "pred": pred, "pred_norm": pred_norm, "loglikelihoods": lps,
                         "truncated": cut[i]})
    n = len(items)
    extra = {"acc_stderr": stderr(hits), "acc_norm_stderr": stderr(hits_norm), "truncated": sum(cut)}
    if samples:
        extra["samples"] = rows
    return ChoiceResult(sum(hits) / n, sum(hits_norm) / n, n, extra)


def score_lambada(model, tok, items: list[ChoiceItem], batch: int = 8, samples: bool = False) -> dict:
    """Greedy last-word accuracy (greedy decoding of the continuation's tokens must equal them),
    the perplexity as lm-evaluation-harness defines it (exp of minus the mean per-item
    log-likelihood) and the per-token perplexity of the continuation tokens."""
    if not items:
        raise UserError("no items to evaluate")
    requests = [(context_ids(tok, it.contexts[0]), tok.encode(it.continuations[0])) for it in items]
    scores = loglikelihood(model, requests, batch, vocab_limit=tok.vocab_size)
    n_tok = sum(s[2] for s in scores)
    nll = -sum(s[0] for s in scores)
    hits = [float(s[1]) for s in scores]
    out = {"acc": sum(hits) / len(items), "acc_stderr": stderr(hits), "ppl": math.exp(nll / len(items)),
           "token_ppl": math.exp(nll / max(1, n_tok)), "n": len(items), "truncated": sum(s[3] for s in scores)}
    if samples:
        out["samples"] = [{"item": i, "loglikelihood": s[0], "greedy": s[1]} for i, s in enumerate(scores)]
    return out


# ---- loaders ----------------------------------------------------------------------------------
def _rows(path):
    path = Path(path)
    if not path.exists():
        raise DataError("data file not found", path, fix="check --data")
    return read_rows(path)


def _field(row, name, path, line):
    if not isinstance(row, dict) or name not in row:
        raise DataError(f"row has no '{name}' field", path, line)
    return row[name]


def _gold(value, n: int, path, line) -> int:
    integral = isinstance(value, int) and not isinstance(value, bool)
    if not (integral or isinstance(value, str) and value.strip().isdigit()):
        raise DataError(f"gold/label must be an integer, got {value!r}", path, line)
    g = int(value)
    if not 0 <= g < n:
        raise DataError(f"gold/label {g} is out of range for {n} choices", path, line)
    return g


def _strings(value, what, path, line) -> list[str]:
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(v, str) for v in value):
        raise DataError(f"'{what}' must be a list of at least two strings", path, line)
    return value


def load_query_choices(path, task: str = "arc") -> list[ChoiceItem]:
    """`{query, choices, gold}` rows (ARC, PIQA, OpenBookQA, CommonsenseQA, BoolQ)."""
    delim = DELIMITERS.get(task, "")
    items = []
    for line, row in _rows(path):
        query = _field(row, "query", path, line)
        choices = _strings(_field(row, "choices", path, line), "choices", path, line)
        gold = _gold(_field(row, "gold", path, line), len(choices), path, line)
        if not isinstance(query, str) or not query.strip():
            raise DataError("'query' must be a non-empty string", path, line)
        ctx = query.rstrip(" ") if query.rstrip().endswith("Answer:") else _join(query, delim)
        items.append(ChoiceItem([ctx] * len(choices), [_space(c) for c in choices], gold))
    return items


def hellaswag_text(text: str) -> str:
    """lm-evaluation-harness's HellaSwag cleaning: WikiHow rows carry ' [title]' (a sentence end)
    and other bracketed tags, which are dropped; then double spaces are closed once."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def load_hellaswag(path) -> list[ChoiceItem]:
    """`{ctx, endings, label}` or the original `{ctx_a, ctx_b, endings, label}` rows, prepared as
    lm-evaluation-harness does: query = clean(activity_label + ': ' + ctx_a + ' ' +
    ctx_b.capitalize()), each ending cleaned the same way."""
    items = []
    for line, row in _rows(path):
        if isinstance(row, dict) and "ctx_a" in row:
            ctx = row["ctx_a"] + " " + str(row.get("ctx_b", "")).capitalize()
        else:
            ctx = _field(row, "ctx", path, line)
        endings = _strings(_field(row, "endings", path, line), "endings", path, line)
        gold = _gold(_field(row, "label", path, line), len(endings), path, line)
        label = row.get("activity_label")
        query = hellaswag_text((f"{label}: " if label else "") + str(ctx))
        items.append(ChoiceItem([query] * len(endings), [_space(hellaswag_text(e)) for e in endings], gold))
    return items


def load_winogrande(path) -> list[ChoiceItem]:
    """`{context_options, continuation, gold}`: the continuation is scored after each option."""
    items = []
    for line, row in _rows(path):
        options = _strings(_field(row, "context_options", path, line), "context_options", path, line)
        cont = _field(row, "continuation", path, line)
        if not isinstance(cont, str) or not cont.strip():
            raise DataError("'continuation' must be a non-empty string", path, line)
        gold = _gold(_field(row, "gold", path, line), len(options), path, line)
        items.append(ChoiceItem(list(options), [_space(cont)] * len(options), gold))
    return items


def load_lambada(path) -> list[ChoiceItem]:
    """`{context, continuation}` rows: one 'choice', the true last word."""
    items = []
    for line, row in _rows(path):
        ctx, cont = _field(row, "context", path, line), _field(row, "continuation", path, line)
        if not isinstance(ctx, str) or not isinstance(cont, str) or not cont.strip() or not ctx.strip():
            raise DataError("'context' and 'continuation' must be non-empty strings", path, line)
        items.append(ChoiceItem([ctx.rstrip(" ")], [_space(cont.strip())], 0))
    return items


def _mmlu_subject(path: Path) -> str:
    stem = path.stem
    for suffix in ("_dev", "_val", "_test"):
        stem = stem[: -len(suffix)] if stem.endswith(suffix) else stem
    return stem.replace("_", " ")


def _mmlu_answer(value: str, path, line) -> int:
    v = value.strip()
    if v.upper() in LETTERS and len(v) == 1:
        return LETTERS.index(v.upper())
    if v.isdigit() and int(v) < 4:
        return int(v)
    raise DataError(f"MMLU answer must be A-D or 0-3, got {value!r}", path, line)


def _mmlu_file(path: Path) -> list[ChoiceItem]:
    subject = _mmlu_subject(path)
    preamble = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read MMLU CSV ({e})", path) from None
    start = 1 if rows and [c.strip().lower() for c in rows[0][:2]] == ["question", "choice0"] else 0
    items = []
    for line, row in enumerate(rows[start:], start + 1):
        if not row:
            continue
        if len(row) != 6:
            raise DataError(f"expected 6 columns (question, 4 choices, answer), got {len(row)}", path, line)
        q, choices, gold = row[0], row[1:5], _mmlu_answer(row[5], path, line)
        ctx = q.strip() + "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(choices)) + "\nAnswer:"
        items.append(ChoiceItem([ctx] * 4, [" " + x for x in LETTERS], gold, subject, preamble))
    return items


def load_mmlu(path) -> list[ChoiceItem]:
    """One MMLU CSV or a folder of them (`<subject>_dev.csv` ...), with the header
    `question,choice0..choice3,answer` or headerless `question,A,B,C,D,letter`."""
    path = Path(path)
    if not path.exists():
        raise DataError("MMLU data not found", path, fix="pass a CSV file or a folder of CSV files")
    files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
    if not files:
        raise DataError("no .csv files in the MMLU folder", path)
    return [it for f in files for it in _mmlu_file(f)]


# ---- TruthfulQA (multiple choice) -----------------------------------------------------------
@dataclass
class TruthfulItem:
    context: str
    mc1: list[str]               # continuations (leading space), the true one at mc1_gold
    mc1_gold: int
    mc2: list[str]
    mc2_labels: list[int]        # 1 = true


def load_truthfulqa(path, primer: str = "") -> list[TruthfulItem]:
    """Rows of the published `multiple_choice` configuration: {question, mc1_targets: {choices,
    labels}, mc2_targets: {choices, labels}}. The context is `primer` (a few-shot block, e.g. the
    benchmark's QA primer given with --fewshot-data), a blank line, then 'Q: question\\nA:', as
    lm-evaluation-harness writes it."""
    items = []
    for line, row in _rows(path):
        q = _field(row, "question", path, line)
        if not isinstance(q, str) or not q.strip():
            raise DataError("'question' must be a non-empty string", path, line)
        targets = []
        for key in ("mc1_targets", "mc2_targets"):
            t = _field(row, key, path, line)
            if not isinstance(t, dict):
                raise DataError(f"'{key}' must be an object with choices and labels", path, line)
            choices = _strings(t.get("choices"), f"{key}.choices", path, line)
            labels = t.get("labels")
            if not isinstance(labels, list) or len(labels) != len(choices) or set(labels) - {0, 1} or \
                    1 not in labels or 0 not in labels:
                raise DataError(f"'{key}.labels' must be 0/1 per choice, with both values present", path, line)
            targets.append(([_space(c) for c in choices], [int(x) for x in labels]))
        (mc1, l1), (mc2, l2) = targets
        head = primer.rstrip("\n") + "\n\n" if primer.strip() else ""
        items.append(TruthfulItem(f"{head}Q: {q.strip()}\nA:", mc1, l1.index(1), mc2, l2))
    return items


def score_truthfulqa(model, tok, items: list[TruthfulItem], batch: int = 8, samples: bool = False) -> dict:
    """MC1: the true answer has the highest log-likelihood among mc1 choices. MC2: the probability
    mass of the true answers among all mc2 choices, normalised over them (lm-evaluation-harness:
    the true answers are those before the first false label)."""
    choice_items = [ChoiceItem([it.context] * len(it.mc1), it.mc1, it.mc1_gold) for it in items] + \
                   [ChoiceItem([it.context] * len(it.mc2), it.mc2, 0) for it in items]
    lls, cut = item_loglikelihoods(model, tok, choice_items, batch)
    n = len(items)
    mc1 = [float(_argmax(lls[i]) == it.mc1_gold) for i, it in enumerate(items)]
    mc2 = []
    for i, it in enumerate(items):
        ll = torch.tensor(lls[n + i], dtype=torch.float64)
        split = it.mc2_labels.index(0)
        mc2.append(float(torch.exp(torch.logsumexp(ll[:split], 0) - torch.logsumexp(ll, 0))))
    out = {"mc1": sum(mc1) / n, "mc1_stderr": stderr(mc1), "mc2": sum(mc2) / n, "mc2_stderr": stderr(mc2),
           "n": n, "truncated": sum(cut[i] or cut[n + i] for i in range(n))}
    if samples:
        out["samples"] = [{"item": i, "mc1_loglikelihoods": lls[i], "mc2_loglikelihoods": lls[n + i],
                           "mc1": mc1[i], "mc2": mc2[i]} for i in range(n)]
    return out
