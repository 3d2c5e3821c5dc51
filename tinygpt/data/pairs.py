"""Tokenized preference pairs and their batches: the data path of the reward, DPO/SimPO, ORPO and KTO stages.

Design choices:
- Rows come from `data.formats` (`load_preferences` / `load_unpaired`) as canonical records, so
  every published layout (prompt/chosen/rejected, UltraFeedback message lists, HH-RLHF
  transcripts, ShareGPT pairs, KTO labels) is read once, elsewhere.
- Tokenization goes through the chat template: the prompt messages plus the generation prompt
  are rendered and encoded as untrained text; the reply is the trained segment of the rendered
  full conversation (reply + end-of-turn marker). Both encode exactly as at sampling time.
- Truncation: the prompt keeps its END (the question nearest the reply matters most), the reply
  keeps its START; the prompt is cut to `max_prompt_length`, then the reply to what is left of
  `max_length`. An item is a tuple of token lists, cheap to hash for the reference cache.
- Batches are a pure function of their index (epoch = index // batches per epoch, shuffled by
  seed + epoch; rank r of w takes global batch i * w + r), so `--resume` replays exactly.
- Chosen and rejected (or completion and its mismatched KL partner) of all items of a batch go
  through ONE forward as 2B sequences of one `TokenBatch`: the first B are the first members.
"""
from __future__ import annotations

import hashlib
import random

import torch

from ..chat import encode_segments
from ..errors import UserError
from ..logprobs import first_fit, make_batch
from .formats import Message, load_preferences, load_unpaired

# ---- tokenization -----------------------------------------------------------------------------


def encode_prompt(tok, template, prompt) -> list[int]:
    """Prompt messages + the assistant header, all untrained."""
    ids, _ = encode_segments(tok, template.render(prompt, add_generation_prompt=True))
    return ids


def encode_reply(tok, template, prompt, reply: str) -> list[int]:
    """The reply plus its end-of-turn marker: the last trained segment of the full rendering."""
    segs = template.render(list(prompt) + [Message("assistant", reply)])
    trained = [s for s in segs if s.train]
    return tok.encode(trained[-1].text) if trained else []


def truncate(prompt: list[int], replies: list[list[int]], max_length: int, max_prompt_length: int):
    """Keep the prompt's end (cut to max_prompt_length only when prompt + longest reply exceeds
    max_length) and each reply's start, so every prompt + reply fits max_length."""
    if len(prompt) + max(map(len, replies)) > max_length:
        prompt = prompt[-max_prompt_length:]
    return prompt, [r[:max_length - len(prompt)] for r in replies]


def tokenize_pairs(prefs, tok, template, max_length: int, max_prompt_length: int) -> tuple[list[tuple], int]:
    """Preference records -> ([(prompt_ids, chosen_ids, rejected_ids)], pairs dropped because
    truncation made chosen and rejected identical)."""
    items, dropped = [], 0
    for p in prefs:
        replies = [encode_reply(tok, template, p.prompt, x) for x in (p.chosen, p.rejected)]
        prompt, (c, r) = truncate(encode_prompt(tok, template, p.prompt), replies, max_length, max_prompt_length)
        if not c or c == r:
            dropped += 1
            continue
        items.append((prompt, c, r))
    return items, dropped


def tokenize_unpaired(examples, tok, template, max_length: int, max_prompt_length: int,
                      seed: int = 0) -> list[tuple]:
    """KTO records -> [(prompt_ids, completion_ids, label, kl_prompt_ids, kl_completion_ids)].
    The KL partner is a mismatched prompt/completion pair fixed once (next example of a seeded
    shuffle), so its reference log-prob can be cached like any other."""
    base = []
    for e in examples:
        reply = encode_reply(tok, template, e.prompt, e.completion)
        prompt, (reply,) = truncate(encode_prompt(tok, template, e.prompt), [reply], max_length, max_prompt_length)
        base.append((prompt, reply, bool(e.label)))
    order = list(range(len(base)))
    random.Random(f"kto-kl/{seed}").shuffle(order)
    partner = {order[k]: order[(k + 1) % len(order)] for k in range(len(order))}
    items = []
    for i, (prompt, reply, label) in enumerate(base):
        kp, (kc,) = truncate(prompt, [base[partner[i]][1]], max_length, max_prompt_length)
        items.append((prompt, reply, label, kp, kc))
    return items


def item_sequences(items, kind: str) -> list[tuple[list[int], list[int]]]:
    """The 2B scored sequences of a batch of items: first members, then second members.
    pair: prompt+chosen ..., prompt+rejected ...; kto: prompt+completion ..., KL pairs ..."""
    def seq(prompt, reply):
        return prompt + reply, [0] * len(prompt) + [1] * len(reply)
    if kind == "pair":
        return [seq(p, c) for p, c, _ in items] + [seq(p, r) for p, _, r in items]
    return [seq(p, c) for p, c, *_ in items] + [seq(kp, kc) for *_, kp, kc in items]


# ---- batches ----------------------------------------------------------------------------------
class ItemBatches:
    """Callable index -> (TokenBatches, item ids (B,)), deterministic in the index.

    Each epoch is a seeded shuffle cut into batches of `batch` items (the last partial batch is
    dropped unless it is the only one). With `pack_rows` R (pairs only), a batch is instead as many
    consecutive items as fit, first-fit, into R rows of `row_len` tokens: the shapes never change
    (what compiled kernels want) and rows are nearly full; the engine's per-item counts keep the
    loss exact although the number of items per batch varies."""

    def __init__(self, items, kind: str, batch: int, seed: int, device, pad_id: int, pack: bool,
                 row_len: int | None = None, rank: int = 0, world: int = 1, pack_rows: int = 0):
        if not items:
            raise UserError("no usable examples after tokenization", None, "check the data file and --max-length")
        self.items, self.kind, self.batch, self.seed = items, kind, min(batch, len(items)), seed
        self.device, self.pad_id, self.pack, self.row_len = device, pad_id, pack, row_len
        self.rank, self.world, self.pack_rows = rank, world, pack_rows if pack and kind == "pair" else 0
        if self.pack_rows and not row_len:
            raise ValueError("pack_rows needs row_len")
        self._plans: list[list[list[int]]] = []     # per epoch: item ids per batch (token budget)
        self.per_epoch = len(self._plan(0)) if self.pack_rows else max(1, len(items) // self.batch)

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.items)))
        random.Random(f"{self.seed}/{epoch}").shuffle(order)
        return order

    def _plan(self, epoch: int) -> list[list[int]]:
        """Token-budget batches of one epoch (computed once, cached)."""
        while len(self._plans) <= epoch:
            self._plans.append(self._budget_batches(self._order(len(self._plans))))
        return self._plans[epoch]

    def _budget_batches(self, order) -> list[list[int]]:
        """Cut `order` into runs of items whose sequences fit, first-fit, into pack_rows rows."""
        plan, cur, room, rows = [], [], [], []
        for j in order:
            lengths = [len(ids) for ids, _ in item_sequences([self.items[j]], self.kind)]
            if not first_fit(lengths, [0] * len(lengths), self.row_len, room, rows, self.pack_rows):
                plan.append(cur)
                cur, room, rows = [], [], []
                first_fit(lengths, [0] * len(lengths), self.row_len, room, rows, self.pack_rows)
            cur.append(j)
        return plan + [cur] if cur else plan

    def ids(self, i: int) -> list[int]:
        g = i * self.world + self.rank
        if self.pack_rows:
            epoch = 0
            while g >= len(self._plan(epoch)):
                g -= len(self._plan(epoch))
                epoch += 1
            return self._plan(epoch)[g]
        epoch, k = divmod(g, self.per_epoch)
        return self._order(epoch)[k * self.batch:(k + 1) * self.batch]

    def collate(self, ids, budget: bool = True) -> tuple:
        """(TokenBatches, ids): pairs give ONE batch of 2B sequences (chosen..., rejected...);
        KTO gives two of B (completions with gradient, KL partners without)."""
        seqs = item_sequences([self.items[j] for j in ids], self.kind)
        multiple = 128 if self.pack and torch.device(self.device).type == "cuda" else 1  # flex blocks
        if self.pack_rows and budget:   # the plan's first-fit, in its order: fits in pack_rows rows
            room, rows, order = [], [], self._interleaved(len(ids))
            first_fit([len(seqs[i][0]) for i in order], order, self.row_len, room, rows)
            tb = make_batch(seqs, self.pad_id, self.device, True, self.row_len, multiple, rows, self.pack_rows)
            return [tb], torch.tensor(ids, dtype=torch.long, device=self.device)
        groups = [seqs] if self.kind == "pair" else [seqs[:len(ids)], seqs[len(ids):]]
        # on CUDA, row counts are padded to a power of two: compiled attention sees few shapes
        tbs = [make_batch(g, self.pad_id, self.device, self.pack, self.row_len, multiple, pow2_rows=multiple > 1)
               for g in groups]
        return tbs, torch.tensor(ids, dtype=torch.long, device=self.device)

    @staticmethod
    def _interleaved(B: int) -> list[int]:
        """Sequence indices in the order the plan placed them: chosen k, rejected k, ..."""
        return [i for k in range(B) for i in (k, B + k)]

    def __call__(self, i: int):
        return self.collate(self.ids(i))

    def fixed(self):
        """Every item once, in order (evaluation, reference precomputation)."""
        if self.pack_rows:
            for ids in self._budget_batches(range(len(self.items))):
                yield self.collate(ids)
            return
        for s in range(0, len(self.items), self.batch):
            yield self.collate(list(range(s, min(s + self.batch, len(self.items)))), budget=False)


# ---- reference log-prob cache -----------------------------------------------------------------
def cache_key(items, *parts) -> str:
    """Hash of the tokenized data and whatever else the reference depends on (model, settings)."""
    h = hashlib.sha256()
    for it in items:
        h.update(repr(it).encode())
    for p in parts:
        h.update(repr(p).encode())
    return h.hexdigest()[:16]


def load_items(path, kind: str, tok, template, fmt, skip_bad_rows: bool, max_length: int, max_prompt_length: int,
               seed: int = 0, strict: bool = False) -> tuple[list, dict]:
    """Tokenized items of a preference file: pairs (kind "pair") or KTO completions ("kto").
    Returns (items, {"skipped": rows skipped, "dropped": pairs identical after truncation,
    "report": the RowReport})."""
    if kind == "kto":
        records, report = load_unpaired(path, fmt, skip_bad_rows, strict)
        return tokenize_unpaired(records, tok, template, max_length, max_prompt_length, seed), \
            {"skipped": report.n_skipped, "dropped": 0, "report": report}
    records, report = load_preferences(path, fmt, skip_bad_rows, strict)
    items, dropped = tokenize_pairs(records, tok, template, max_length, max_prompt_length)
    return items, {"skipped": report.n_skipped, "dropped": dropped, "report": report}
