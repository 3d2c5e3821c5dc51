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
- `acc` picks the choice with the highest summed log-prob; `acc_norm` divides by the UTF-8 byte
  length of the scored continuation (leading space included), which removes the bias towards short
  choices without depending on the tokenizer.
- Requests are sorted by length and right-padded into batches: under causal attention padding on
  the right never changes the logits of the real positions, and position ids stay 0..T-1.
  Logits past the tokenizer's vocabulary (padding rows of the embedding) are cut off.
- Over-long requests keep their last `block_size + 1` tokens (the context is cut on the left).
- k-shot: demonstrations are other items of the same file (same subject for MMLU), chosen by a
  generator seeded with the item's index, written as their gold context + gold continuation.
"""
from __future__ import annotations

import csv
import math
import random
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
    greedy decoding reproduces the continuation exactly, number of continuation tokens scored).
    The context must hold at least one token (the first token has nothing to be predicted from)."""
    device = next(model.parameters()).device
    block = model.config.block_size
    was_training = model.training
    model.eval()
    rows = []
    for ctx, cont in requests:
        if not ctx or not cont:
            raise ValueError("loglikelihood needs a non-empty context and continuation")
        full = (list(ctx) + list(cont))[-(block + 1):]
        rows.append((full, min(len(cont), len(full) - 1)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list = [None] * len(rows)
    for start in range(0, len(order), batch):
        chunk = order[start:start + batch]
        T = max(len(rows[i][0]) for i in chunk) - 1
        x = torch.zeros(len(chunk), T, dtype=torch.long)                 # (B, T) inputs
        y = torch.full((len(chunk), T), -100, dtype=torch.long)          # (B, T) targets, -100 = unscored
        for b, i in enumerate(chunk):
            full, n = rows[i]
            x[b, :len(full) - 1] = torch.tensor(full[:-1])
            y[b, len(full) - 1 - n:len(full) - 1] = torch.tensor(full[-n:])
        x, y = x.to(device), y.to(device)
        logits = model(x).float()[..., :vocab_limit]                     # (B, T, V) real tokens only
        lp = token_logprobs(logits, y).sum(-1)                           # (B,)
        scored = y != -100
        greedy = ((logits.argmax(-1) == y) | ~scored).all(-1)            # (B,)
        for b, i in enumerate(chunk):
            out[i] = (float(lp[b]), bool(greedy[b]), rows[i][1])
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


def score_choices(model, tok, items: list[ChoiceItem], batch: int = 8) -> ChoiceResult:
    """acc and acc_norm over items (each choice scored by log p(continuation | context))."""
    if not items:
        raise UserError("no items to evaluate")
    start = [tok.eos_id if tok.eos_id is not None else 0]   # documents start after EOS in pretraining
    requests, owner = [], []
    for n, it in enumerate(items):
        for c, (ctx, cont) in enumerate(zip(it.contexts, it.continuations)):
            requests.append((start + tok.encode(ctx), tok.encode(cont)))
            owner.append((n, c))
    scores = loglikelihood(model, requests, batch, vocab_limit=tok.vocab_size)
    per_item: list[list[float]] = [[0.0] * len(it.continuations) for it in items]
    for (n, c), (lp, _, _) in zip(owner, scores):
        per_item[n][c] = lp
    acc = acc_norm = 0
    for it, lps in zip(items, per_item):
        norm = [lp / max(1, len(cont.encode("utf-8"))) for lp, cont in zip(lps, it.continuations)]
        acc += max(range(len(lps)), key=lps.__getitem__) == it.gold
        acc_norm += max(range(len(norm)), key=norm.__getitem__) == it.gold
    return ChoiceResult(acc / len(items), acc_norm / len(items), len(items))


def score_lambada(model, tok, items: list[ChoiceItem], batch: int = 8) -> dict:
    """Greedy last-word accuracy: greedy decoding of the continuation's tokens must equal them.
    Also the perplexity of the continuation tokens."""
    if not items:
        raise UserError("no items to evaluate")
    start = [tok.eos_id if tok.eos_id is not None else 0]
    requests = [(start + tok.encode(it.contexts[0]), tok.encode(it.continuations[0])) for it in items]
    scores = loglikelihood(model, requests, batch, vocab_limit=tok.vocab_size)
    n_tok = sum(s[2] for s in scores)
    nll = -sum(s[0] for s in scores)
    return {"acc": sum(s[1] for s in scores) / len(items), "ppl": math.exp(nll / max(1, n_tok)),
            "n": len(items)}


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


def _hellaswag_text(text: str) -> str:
    """WikiHow rows carry markup such as ' [title]' and '[step]'; drop it and double spaces."""
    text = text.strip().replace(" [title]", ". ")
    for tag in ("[header]", "[step]", "[substeps]"):
        text = text.replace(tag, "")
    return " ".join(text.split())


def load_hellaswag(path) -> list[ChoiceItem]:
    """`{ctx, endings, label}` or the original `{ctx_a, ctx_b, endings, label}` rows."""
    items = []
    for line, row in _rows(path):
        if isinstance(row, dict) and "ctx" not in row and "ctx_a" in row:
            b = str(row.get("ctx_b", ""))
            ctx = row["ctx_a"] + (" " + b[:1].upper() + b[1:] if b else "")
        else:
            ctx = _field(row, "ctx", path, line)
        endings = _strings(_field(row, "endings", path, line), "endings", path, line)
        gold = _gold(_field(row, "label", path, line), len(endings), path, line)
        label = row.get("activity_label")
        query = _hellaswag_text((f"{label}: " if label else "") + str(ctx))
        items.append(ChoiceItem([query] * len(endings), [_space(_hellaswag_text(e)) for e in endings], gold))
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
