"""Batched generation: padding independence, log-probs, sampling filters, stops, stacked LoRA."""
import pytest
import torch

from tinygpt.config import ModelConfig
from tinygpt.generate import _last_logits, generate
from tinygpt.lora import apply_lora, merge_lora
from tinygpt.model import GPT


pytestmark = pytest.mark.usefixtures("one_thread")


V = 97


def _model(**over):
    torch.manual_seed(0)
    m = GPT(ModelConfig.from_name("nano", vocab_size=V, **over))
    with torch.no_grad():  # non-trivial weights everywhere (zero-init projections would hide bugs)
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m.eval()


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21], [30, 31, 32, 33], [40]]


def test_batched_mixed_lengths_equal_one_by_one_greedy():
    for over in ({}, dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True, qk_norm=False)):
        m = _model(**over)
        batch = generate(m, PROMPTS, max_new_tokens=12, temperature=0, pad_id=0)
        for i, p in enumerate(PROMPTS):
            alone = generate(m, [p], max_new_tokens=12, temperature=0)
            assert batch.tokens[i] == alone.tokens[0]
            torch.testing.assert_close(torch.tensor(batch.logprobs[i]), torch.tensor(alone.logprobs[0]),
                                       atol=1e-5, rtol=0)
        assert len(set(map(tuple, batch.tokens))) > 1   # rows really differ


def test_the_head_of_an_unaligned_vocabulary_computed_transposed_equals_the_plain_head():
    m = _model()
    h = torch.randn(3, 5, 64)
    for model, limit in ((m, None), (m, 90), (GPT(ModelConfig.from_name("nano", vocab_size=128)), 100),
                         (GPT(ModelConfig.from_name("nano", vocab_size=128)), 96)):
        want = model.lm_head(h[:, -1]).float()[:, :limit]
        got = _last_logits(model, h, limit)
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_logprobs_equal_a_fresh_forward_pass():
    m = _model()
    g = generate(m, PROMPTS, max_new_tokens=10, temperature=0.7, seed=3, vocab_limit=90)
    for p, toks, lps in zip(PROMPTS, g.tokens, g.logprobs):
        assert all(t < 90 for t in toks)
        ids = torch.tensor([p + toks])
        logits = m(ids)[0, len(p) - 1:-1, :90] / 0.7                    # (n, 90)
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(toks)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(lps), ref, atol=1e-5, rtol=0)


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    m = _model()
    a = generate(m, PROMPTS, max_new_tokens=8, temperature=1.0, seed=1)
    b = generate(m, PROMPTS, max_new_tokens=8, temperature=1.0, seed=1)
    c = generate(m, PROMPTS, max_new_tokens=8, temperature=1.0, seed=2)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    greedy = generate(m, PROMPTS, max_new_tokens=8, temperature=0)
    k1 = generate(m, PROMPTS, max_new_tokens=8, temperature=1.0, top_k=1, seed=5)
    p_small = generate(m, PROMPTS, max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=6)
    assert k1.tokens == greedy.tokens == p_small.tokens
    torch.testing.assert_close(torch.tensor(k1.logprobs), torch.tensor(greedy.logprobs), atol=1e-6, rtol=0)


def test_stop_token_ends_one_row_while_others_continue():
    m = _model()
    free = generate(m, PROMPTS, max_new_tokens=10, temperature=0)
    # a token row 0 emits at step 3 and row 1 never emits
    stop = next(t for t in free.tokens[0][3:] if t not in free.tokens[1])
    cut = free.tokens[0].index(stop)
    g = generate(m, PROMPTS, max_new_tokens=10, temperature=0, stop_ids=[stop])
    assert g.tokens[0] == free.tokens[0][:cut + 1] and g.finished[0]
    assert g.tokens[1] == free.tokens[1] and not g.finished[1]
    assert len(g.logprobs[0]) == cut + 1
    # a stop at the first token of every row ends generation at once
    firsts = [t[0] for t in free.tokens]
    early = generate(m, PROMPTS, max_new_tokens=10, temperature=0, stop_ids=firsts, check_every=1)
    assert early.tokens == [[t] for t in firsts] and all(early.finished)


def test_streaming_callback_sees_the_same_tokens():
    m = _model()
    seen = {}
    g = generate(m, PROMPTS, max_new_tokens=6, temperature=0.9, seed=4,
                 on_token=lambda row, t: seen.setdefault(row, []).append(t))
    h = generate(m, PROMPTS, max_new_tokens=6, temperature=0.9, seed=4)
    assert [seen[i] for i in range(len(PROMPTS))] == g.tokens == h.tokens


def test_stacked_lora_equals_merged_model():
    m = _model()
    apply_lora(m, rank=4, alpha=8, name="sft")
    apply_lora(m, rank=2, alpha=4, name="rl", weight=0.5)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    stacked = generate(m, PROMPTS, max_new_tokens=10, temperature=0)
    base = _model()
    assert generate(base, PROMPTS, max_new_tokens=10, temperature=0).tokens != stacked.tokens
    merge_lora(m)
    merged = generate(m, PROMPTS, max_new_tokens=10, temperature=0)
    assert merged.tokens == stacked.tokens
    torch.testing.assert_close(torch.tensor(merged.logprobs), torch.tensor(stacked.logprobs), atol=1e-4, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_equals_eager_and_follows_weight_changes():
    m = _model().cuda()
    eager = generate(m, PROMPTS, max_new_tokens=12, temperature=0, cuda_graph=False)
    graph = generate(m, PROMPTS, max_new_tokens=12, temperature=0)
    assert m._decode_graph.state is not None and graph.tokens == eager.tokens
    import copy
    assert copy.deepcopy(m)._decode_graph.state is None   # copies do not share the graph
    torch.testing.assert_close(torch.tensor(graph.logprobs), torch.tensor(eager.logprobs), atol=1e-4, rtol=0)
    with torch.no_grad():   # an in-place update is seen by the kept graph
        m.lm_head.weight.mul_(-1.0)
    flipped = generate(m, PROMPTS, max_new_tokens=12, temperature=0)
    assert flipped.tokens == generate(m, PROMPTS, max_new_tokens=12, temperature=0, cuda_graph=False).tokens
    assert flipped.tokens != graph.tokens
    apply_lora(m, rank=2, alpha=4, name="x")   # new adapters: a new graph
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    lora = generate(m, PROMPTS, max_new_tokens=12, temperature=0.8, seed=0)
    assert lora.tokens == generate(m, PROMPTS, max_new_tokens=12, temperature=0.8, seed=0, cuda_graph=False).tokens
