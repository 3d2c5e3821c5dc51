"""Packing of SFT examples: truncation, bin-packing, padding, row order, and loss equality."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tinygpt.config import ModelConfig
from tinygpt.data.packing import (IGNORE, RowOrder, best_fit_decreasing, pack_rows, pad_examples,
                                  prepare_examples, to_pair, truncate_example)
from tinygpt.losses import token_cross_entropy
from tinygpt.model import GPT, packed_mask


def _random_examples(n, seed=0, lo=3, hi=40, vocab=300):
    """(ids, mask) examples: a prompt (untrained) then a reply (trained)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p, r = int(rng.integers(1, hi // 2)), int(rng.integers(lo, hi // 2))
        ids = rng.integers(0, vocab, p + r).tolist()
        out.append((ids, [0] * p + [1] * r))
    return out


def test_truncate_left_keeps_the_final_reply_cutting_whole_turns_then_prompt_then_reply_end():
    ids = list(range(10))
    mask = [0, 0, 0, 0, 0, 0, 1, 1, 1, 0]           # reply at 6..8, then an untrained marker
    assert truncate_example(ids, mask, 10) == (ids, mask, None)
    assert truncate_example(ids, mask, 5) == (ids[5:], mask[5:], "prompt")    # one context token before the reply
    # reply + tail = 4 tokens, no room for context: the prompt keeps max_length // 2 tokens, the reply its start
    assert truncate_example(ids, mask, 4) == (ids[4:8], mask[4:8], "reply")
    assert truncate_example(ids, [0] * 10, 20) is None                       # nothing trained
    assert truncate_example(ids, mask, 5, "drop") is None and truncate_example(ids, mask, 10, "drop")[2] is None
    # multi-turn: the cut falls where an earlier reply ended, so whole exchanges go
    mask2 = [0, 1, 1, 0, 0, 0, 0, 1, 1, 0]
    assert truncate_example(ids, mask2, 7) == (ids[3:], mask2[3:], "turns")
    assert truncate_example(ids, mask2, 6) == (ids[4:], mask2[4:], "prompt")   # no exchange boundary left to cut at


def test_prepare_examples_counts_cuts_and_drops_and_shifts_targets():
    enc = [([5, 6, 7, 8], [0, 0, 1, 1]), (list(range(20)), [0] * 10 + [1] * 10), ([1, 2], [0, 0])]
    pairs, counts = prepare_examples(enc, max_length=8)
    assert counts == {"turns": 0, "prompt": 0, "reply": 1, "dropped": 1} and len(pairs) == 2
    inp, tgt = pairs[0]
    assert inp.tolist() == [5, 6, 7] and tgt.tolist() == [IGNORE, 7, 8]
    inp, tgt = pairs[1]                              # 4 prompt tokens, then the reply's first 4
    assert inp.tolist() == [6, 7, 8, 9, 10, 11, 12] and tgt.tolist() == [IGNORE] * 3 + [10, 11, 12, 13]
    pairs, counts = prepare_examples(enc, max_length=8, mode="drop")
    assert counts["dropped"] == 2 and len(pairs) == 1


def test_best_fit_decreasing_finds_the_tight_packing():
    bins = best_fit_decreasing([6, 4, 5, 5, 3, 7], 10)
    assert sorted(sorted([6, 4, 5, 5, 3, 7][i] for i in b) for b in bins) == [[3, 7], [4, 6], [5, 5]]
    with pytest.raises(ValueError):
        best_fit_decreasing([11], 10)


def test_pack_rows_places_every_example_once_within_ctx_with_reset_positions():
    pairs, _ = prepare_examples(_random_examples(60, seed=1), max_length=33)
    ctx = 32
    rows = pack_rows(pairs, ctx, pad_id=0)
    assert rows.x.shape[1] == ctx and rows.x.dtype == torch.int32
    seen = []
    for r in range(len(rows)):
        doc, pos = rows.doc[r].numpy(), rows.pos[r].numpy()
        used = doc >= 0
        assert used.sum() <= ctx
        assert (np.flatnonzero(used) == np.arange(used.sum())).all()   # examples first, padding after
        assert (rows.y[r][~torch.from_numpy(used)] == IGNORE).all()
        for d in np.unique(doc[used]):
            at = np.flatnonzero(doc == d)
            assert (pos[at] == np.arange(len(at))).all()                # positions restart per example
            seen.append((tuple(rows.x[r, at].tolist()), tuple(rows.y[r, at].tolist())))
    expect = sorted((tuple(i.tolist()), tuple(t.tolist())) for i, t in pairs)
    assert sorted(seen) == expect                                       # each example exactly once
    assert rows.real_tokens() == sum(len(i) for i, _ in pairs)
    used = (rows.doc >= 0).sum(1)           # any-fit packing: no two rows could have been one row
    assert ((used[:, None] + used[None, :]) > ctx).logical_or(torch.eye(len(rows), dtype=torch.bool)).all()


def test_padded_batches_are_right_padded_to_the_batch_max():
    pairs = [to_pair([1, 2, 3, 4], [0, 1, 1, 1]), to_pair([5, 6], [0, 1]), to_pair(list(range(9)), [0] * 4 + [1] * 5)]
    pe = pad_examples(pairs, pad_id=0, multiple=4)
    x, y, pos, doc = pe.batch([0, 1])
    assert pos is None and x.shape == (2, 4)                            # longest is 3, rounded up to 4
    assert x.tolist() == [[1, 2, 3, 0], [5, 0, 0, 0]]
    assert y.tolist() == [[2, 3, 4, IGNORE], [6, IGNORE, IGNORE, IGNORE]]
    assert doc.tolist() == [[0, 0, 0, -1], [0, -1, -1, -1]]


def test_row_order_visits_every_row_once_per_epoch_and_is_deterministic():
    order = RowOrder(7, seed=3)
    first = order.take(0, 7)
    assert sorted(first.tolist()) == list(range(7))
    second = order.take(7, 7)
    assert sorted(second.tolist()) == list(range(7)) and second.tolist() != first.tolist()
    again = RowOrder(7, seed=3)
    assert again.take(5, 6).tolist() == order.take(5, 6).tolist()
    spanning = order.take(5, 4).tolist()                         # two rows of epoch 0, two of epoch 1
    assert spanning[:2] == first[5:].tolist()
    assert spanning[2:] == order.take(7, 2).tolist()


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])   # cuda: the FlexAttention path
@pytest.mark.parametrize("preset_kw", [dict(), dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True,
                                                    qk_norm=False, tie_embeddings=True)])
def test_packed_and_alone_give_identical_per_token_losses(preset_kw, device):
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name("nano", vocab_size=320, **preset_kw)).eval().to(device)
    with torch.no_grad():                   # no zero-initialised blocks: every path matters
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    pairs, _ = prepare_examples(_random_examples(12, seed=2), max_length=41)
    rows = pack_rows(pairs, 64)
    assert len(rows) < len(pairs)           # examples really share rows
    x, y, pos, doc = (t.to(device) for t in rows.batch(list(range(len(rows)))))
    with torch.no_grad():
        packed = token_cross_entropy(model(x, pos=pos, mask=packed_mask(doc)), y, reduction="none")
    found = 0
    for r in range(len(rows)):
        for d in doc[r].unique().tolist():
            if d < 0:
                continue
            at = (doc[r] == d).nonzero()[:, 0]
            with torch.no_grad():
                alone = token_cross_entropy(model(x[r, at][None]), y[r, at][None], reduction="none")[0]
            torch.testing.assert_close(packed[r, at], alone, rtol=0, atol=1e-5 if device == "cpu" else 1e-4)
            assert (alone > 0).sum() == (y[r, at] != IGNORE).sum()
            found += 1
    assert found == len(pairs)
