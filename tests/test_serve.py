"""Serving internals on CPU: per-row sampling equals the scalar path, a mixed batch (stacks,
lengths, arrivals) equals each sequence alone and the reference loader + `generate`, seeded
sampling is batch-independent, text streaming, stop strings, cancellation, failures, shutdown."""
import copy
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from tinygpt.checkpoint import save_model
from tinygpt.config import ModelConfig, pad_vocab
from tinygpt.errors import UserError
from tinygpt.generate import (
    filter_logits,
    filter_logits_rows,
    generate,
    sample_next,
    sample_rows,
)
from tinygpt.load import load_model_and_tokenizer
from tinygpt.lora import apply_lora, lora_modules, save_adapter, train_token_rows
from tinygpt.model import GPT
from tinygpt.serve.adapters import ServedAdapters, adapter_files
from tinygpt.serve.command import ServeOptions, build_service
from tinygpt.serve.engine import SlotEngine
from tinygpt.serve.protocol import ApiError, LoraEntry
from tinygpt.serve.scheduler import Job, Params, Scheduler, Sequence, Update
from tinygpt.serve.service import Pacer
from tinygpt.serve.text import ByteStream, Detokenizer, StopMatcher, TextStream
from tinygpt.tokenizer import IM_END, Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

GPT2_LIKE = dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True, qk_norm=False, tie_embeddings=True)


def make_world(folder, block_size: int = 128, seed: int = 0, **over):
    """A nano base with non-trivial weights and two adapters on different layers; adapter b
    also trains the <|im_end|> rows (as SFT does). Returns the base path and adapter paths."""
    tok = Tokenizer.byte_level()
    torch.manual_seed(seed)
    m = GPT(ModelConfig.from_name("nano", vocab_size=pad_vocab(tok.vocab_size), block_size=block_size, **over))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.5 * torch.randn_like(p))
    save_model(folder / "base.tinygpt", m, tok)
    paths = []
    for k, (name, targets) in enumerate((("a", ("q_proj", "o_proj", "down_proj")), ("b", ("q_proj", "v_proj", "up_proj")))):
        mm = copy.deepcopy(m)
        torch.manual_seed(10 + k)
        apply_lora(mm, rank=4, alpha=8, targets=targets)
        if name == "b":
            mm._lora_meta["default"]["trained_tokens"] = [IM_END]
            train_token_rows(mm, [tok.token_to_id(IM_END)])
            with torch.no_grad():
                mm.model.embed_tokens.token_rows.normal_(0, 1.0)
        with torch.no_grad():
            for mod in lora_modules(mm).values():
                mod.lora_B["default"].normal_(0, 0.3)
        save_adapter(mm, folder / f"{name}.lora")
        paths.append(str(folder / f"{name}.lora"))
    return str(folder / "base.tinygpt"), paths


def run(scheduler_kw, engine_kw, base, paths, requests, max_batch=4, arrive=None, device="cpu", engines=None,
        capture_all=False, schedulers=None):
    """Serve `requests` [(prompt ids, Params, stack)] on a fresh engine; returns per request
    (text, n_tokens, finish). `arrive`: per request, the scheduler iteration to submit it at.
    capture_all: capture every decode graph before serving (as `tinygpt serve` does).
    engines / schedulers: lists that receive the engine and the scheduler."""
    model, tok = load_model_and_tokenizer(base, device=device)
    adapters = ServedAdapters(model, tok, [(f"x{i}", p) for i, p in enumerate(paths)], max_batch) if paths else None
    engine = SlotEngine(model, max_batch, model.config.block_size, tok.vocab_size, rows=adapters, **engine_kw)
    if engines is not None:
        engines.append(engine)
    if capture_all:
        engine.capture_all()
    got: dict = {}
    sch = Scheduler(engine, lambda ups: [got.setdefault(s.index, []).append(u) for s, u in ups], **scheduler_kw)
    if schedulers is not None:
        schedulers.append(sch)
    job, detok = Job(len(requests)), Detokenizer(tok)
    seqs = [Sequence(job, i, ids, p, stack, detok) for i, (ids, p, stack) in enumerate(requests)]
    torch.set_grad_enabled(False)
    try:   # driven by hand, iteration by iteration (no thread): arrivals at chosen steps
        step = 0
        while len([i for i in got if got[i][-1].finish]) < len(seqs):
            due = [s for s, a in zip(seqs, arrive or [0] * len(seqs)) if a == step]
            sch.waiting.extend(due)
            sch._iteration()
            step += 1
            assert step < 1000
    finally:
        torch.set_grad_enabled(True)
    return [("".join(u.text for u in got[i]), sum(u.n_tokens for u in got[i]), got[i][-1].finish)
            for i in range(len(seqs))], tok


def reference(base, paths, ids, max_new, stack, tok, **kw):
    model, _ = load_model_and_tokenizer(base, lora=[(paths[j], w) for j, w in stack])
    g = generate(model, [ids], max_new, vocab_limit=tok.vocab_size, **kw)
    return tok.decode(g.tokens[0]), len(g.tokens[0])


# ---- per-row sampling -----------------------------------------------------------------------------
def test_filter_rows_equals_filter_logits_row_by_row():
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    logits[2, :10] = 5.0     # ties at the top-k boundary: all kept (which of tied tokens top-p keeps is arbitrary)
    ks = torch.tensor([0, 1, 5, 50, 7, 0])
    ps = torch.tensor([1.0, 1.0, 1.0, 0.9, 1e-6, 0.3])
    out = filter_logits_rows(logits, ks, ps)
    for b in range(6):
        assert torch.equal(out[b:b + 1], filter_logits(logits[b:b + 1], int(ks[b]), float(ps[b])))
    assert torch.isinf(out).any() and not torch.isinf(out[0]).any()


@pytest.mark.parametrize("t,k,p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 3, 0.5)])
def test_sample_rows_equals_sample_next(t, k, p):
    torch.manual_seed(1)
    logits = torch.randn(5, 40) * 2
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    ref_tok, ref_lp = sample_next(logits, t, k, p, g1)
    race = torch.empty_like(logits).exponential_(1.0, generator=g2) if t > 0 else None
    tok, lp, _ = sample_rows(logits, torch.full((5,), t), torch.full((5,), k), torch.full((5,), p), race)
    assert torch.equal(tok, ref_tok)
    torch.testing.assert_close(lp, ref_lp)


# ---- the engine and the scheduler ------------------------------------------------------------------
MOE = dict(n_experts=4, n_experts_active=2, n_shared_experts=1)    # adapters on up/down_proj: the shared experts


@pytest.mark.parametrize("over,bucketed", [({}, False), (GPT2_LIKE, True), (MOE, True)])
def test_mixed_batch_equals_each_alone_and_the_reference(tmp_path, over, bucketed):
    """Requests with different stacks (none, one, a weighted pair with a negative weight, the
    token-row adapter), lengths and budgets, arriving at different steps, in 4 slots (so rows
    leave, move down and new ones join mid-batch) give what each gives alone, and what the
    reference loader + `generate` gives for the same stack."""
    base, paths = make_world(tmp_path, **over)
    tok = Tokenizer.byte_level()
    texts = ["hello there", "a", "the quick brown fox", f"{IM_END}x y{IM_END}", "zz", "q" * 30, "go", "1 2 3"]
    stacks = [[], [(0, 1.0)], [(1, 0.5)], [(0, 1.0), (1, -0.7)]]
    reqs = [(tok.encode(t), Params(max_new=3 + 2 * (i % 4), temperature=0), stacks[i % 4]) for i, t in enumerate(texts)]
    arrive = [0, 0, 1, 3, 3, 4, 9, 10]
    kw = dict(bucketed=bucketed, length_bucket=16)
    mixed, _ = run({}, kw, base, paths, reqs, arrive=arrive)
    for i, (ids, p, stack) in enumerate(reqs):
        alone, _ = run({}, kw, base, paths, [(ids, p, stack)], max_batch=1)
        ref_text, ref_n = reference(base, paths, ids, p.max_new, stack, tok, temperature=0)
        assert mixed[i] == alone[0] == (ref_text, ref_n, "length"), i
    assert len({m[0] for m in mixed}) == len(mixed)        # the stacks really change the outputs


def test_seeded_sampling_does_not_depend_on_the_batch(tmp_path):
    base, paths = make_world(tmp_path)
    tok = Tokenizer.byte_level()
    params = [Params(max_new=8, temperature=1.0, seed=5), Params(max_new=8, temperature=0.8, top_k=5, seed=6),
              Params(max_new=8, temperature=1.2, top_p=0.7, seed=7)]
    reqs = [(tok.encode(f"prompt {i}"), p, [(0, 1.0)] if i == 1 else []) for i, p in enumerate(params)]
    noise = [(tok.encode("other"), Params(max_new=8, temperature=1.0), [])] * 3
    together, _ = run({}, {}, base, paths, noise[:1] + reqs + noise[1:], max_batch=6)
    for i, r in enumerate(reqs):
        alone, _ = run({}, {}, base, paths, [r], max_batch=1)
        assert together[i + 1] == alone[0]
    again, _ = run({}, {}, base, paths, reqs, max_batch=3)
    assert again == together[1:4]


def test_stop_ids_and_stop_strings(tmp_path):
    base, paths = make_world(tmp_path)
    tok = Tokenizer.byte_level()
    ids = tok.encode("count: ")
    free, _ = run({}, {}, base, [], [(ids, Params(max_new=12, temperature=0), [])])
    text = free[0][0]
    g = generate(load_model_and_tokenizer(base)[0], [ids], 12, temperature=0, vocab_limit=tok.vocab_size)
    stop_tok = g.tokens[0][4]
    cut = g.tokens[0].index(stop_tok)
    stop_s = text[5:7]
    reqs = [(ids, Params(max_new=12, temperature=0, stop_ids=frozenset([stop_tok])), []),
            (ids, Params(max_new=12, temperature=0, stop=[stop_s, "never"]), [])]
    out, _ = run({}, {}, base, [], reqs)
    assert out[0] == (tok.decode(g.tokens[0][:cut]), cut + 1, "stop")      # the stop token: counted, not shown
    assert out[1][0] == text[:text.index(stop_s)] and out[1][2] == "stop"


@pytest.mark.parametrize("step,cap", [(64, 1024), (16, 200), (64, 64), (8, 4096)])
def test_length_buckets_cover_every_length_with_bounded_waste(step, cap):
    """Every attended length has a bucket that holds it, within the cache, among `buckets()`,
    and beyond 4 steps the bucket is under 1.5x the length (a few buckets per doubling)."""
    from tinygpt.serve.engine import _length_bucket
    sizes = {_length_bucket(n, step, cap) for n in range(1, cap + 1)}
    for n in range(1, cap + 1):
        b = _length_bucket(n, step, cap)
        assert n <= b <= cap and b in sizes and (n <= 4 * step or b < 1.5 * n)
    assert len(sizes) <= 4 + 2 * max(1, cap // step).bit_length()
    engine = SimpleNamespace(S=6, L=cap, length_bucket=step, rows=None)
    assert SlotEngine.buckets(engine) == [(nb, L, False) for nb in (1, 2, 4, 6) for L in sorted(sizes)]


def test_text_streams_equal_decode():
    trained = Tokenizer.train(["naïve café — 日本語 ok, the cat sat on the mat. " * 20], vocab_size=300)
    for tok in (Tokenizer.byte_level(), trained):
        text = "naïve café — 日本語 ok"
        ids = tok.encode(text)
        detok = Detokenizer(tok)
        assert detok.byte_level and isinstance(detok.stream(), ByteStream)
        g = torch.Generator().manual_seed(0)
        randoms = [torch.randint(0, tok.vocab_size, (40,), generator=g).tolist() for _ in range(20)]
        for seq in [ids] + randoms:           # random ids: specials and broken UTF-8 included
            for skip in (False, True):
                for ts in (detok.stream(skip), TextStream(tok, skip)):
                    pieces = [ts.push(i) for i in seq]
                    assert "".join(pieces) + ts.flush() == tok.decode(seq, skip_special=skip)
                    if seq is ids:
                        assert all("\ufffd" not in p for p in pieces)   # characters come out whole


def test_stop_matcher():
    m = StopMatcher(["END", "xyz"])
    out = [m.feed(s) for s in ["abc E", "N", "Dq"]]
    assert out == [("abc ", False), ("", False), ("", True)]      # "E", "EN" held back, then cut
    m = StopMatcher(["END"])
    assert m.feed("aE") == ("a", False) and m.feed("x") == ("Ex", False) and m.flush() == ""


def test_sequences_arriving_together_share_one_prefill(tmp_path):
    base, _ = make_world(tmp_path)
    tok = Tokenizer.byte_level()
    reqs = [(tok.encode(f"p{i}"), Params(max_new=8, temperature=0), ()) for i in range(4)]
    schedulers = []
    run({}, {}, base, [], reqs, arrive=[0, 0, 2, 5], schedulers=schedulers)
    assert schedulers[0].stats()["prefills"] == 3


def test_cancel_failure_and_close(tmp_path):
    base, _ = make_world(tmp_path, block_size=256)
    model, tok = load_model_and_tokenizer(base)
    engine = SlotEngine(model, 2, 256, tok.vocab_size)
    got, lock = {}, threading.Lock()

    def on_updates(ups):
        with lock:
            for s, u in ups:
                got.setdefault(id(s.job), []).append(u)
    sch = Scheduler(engine, on_updates).start()
    long_job, short_job = Job(1), Job(1)
    sch.submit([Sequence(long_job, 0, tok.encode("x"), Params(max_new=250, temperature=0), (), tok)])
    time.sleep(0.05)
    long_job.cancel()                                   # the client went away
    sch.submit([Sequence(short_job, 0, tok.encode("y"), Params(max_new=5, temperature=0), (), tok)])
    deadline = time.time() + 10
    while not (got.get(id(short_job)) and got[id(short_job)][-1].finish) and time.time() < deadline:
        time.sleep(0.01)
    assert got[id(short_job)][-1].finish == "length"
    assert sum(u.n_tokens for u in got.get(id(long_job), [])) < 250 and sch.stats()["cancelled"] == 1
    real = engine.decode                                # a failing step ends its sequences with "error" ...
    engine.decode = lambda n: (_ for _ in ()).throw(RuntimeError("boom"))
    bad = Job(1)
    sch.submit([Sequence(bad, 0, tok.encode("z"), Params(max_new=5, temperature=0), (), tok)])
    while not got.get(id(bad)) and time.time() < deadline:
        time.sleep(0.01)
    assert got[id(bad)][-1].finish == "error"
    engine.decode = real                                # ... and the scheduler goes on serving
    last = [Job(1) for _ in range(3)]
    sch.submit([Sequence(j, 0, tok.encode("w"), Params(max_new=40, temperature=0), (), tok) for j in last])
    sch.close()                                         # returns once in-flight sequences finished
    assert all(got[id(j)][-1].finish == "length" and sum(u.n_tokens for u in got[id(j)]) == 40 for j in last)
    assert not sch.thread.is_alive()


def test_pacer_holds_running_tokens_and_lets_first_tokens_and_ends_through():
    """Hand-offs at most every interval; a first token or an end goes at once with what that
    sequence held; every update is handed on exactly once, in its sequence's order, one joined
    update per sequence and hand-off."""
    class Seq:
        def __init__(self, name):
            self.name, self.received = name, 0

    now, out = [0.0], []
    pacer = Pacer(1.0, lambda batch: out.append([(s.name, u.text) for s, u in batch]), clock=lambda: now[0])
    a, b = Seq("a"), Seq("b")

    def step(t, *updates):
        now[0] = t
        for seq, _, _ in updates:
            seq.received += 1
        pacer.feed([(seq, Update(text, finish=finish)) for seq, text, finish in updates])

    step(0.0, (a, "a1", None))                   # the first hand-off ever: at once
    step(0.1, (a, "a2", None))                   # held
    step(0.2, (a, "a3", None), (b, "b1", None))  # b's first token goes; a's stay held
    step(0.3, (a, "a4", None), (b, "b2", None))
    step(0.4, (a, "a5", "length"))               # a ends: all of a, in order; b2 still held
    step(1.5, (b, "b3", None))                   # the interval is over: everything held
    assert out == [[("a", "a1")], [("b", "b1")], [("a", "a2a3a4a5")], [("b", "b2b3")]]
    unpaced, out0 = Pacer(0.0, lambda batch: out0.append([(s.name, u.text, u.n_tokens) for s, u in batch])), []
    c, d = Seq("c"), Seq("d")
    for t in range(2):
        unpaced.feed([(c, Update("x", n_tokens=1)), (d, Update("y", n_tokens=1)), (c, Update("z", n_tokens=1))])
    assert out0 == [[("c", "xz", 2), ("d", "y", 1)]] * 2


def test_update_join_keeps_order_and_sums_counts():
    parts = [Update("a", [(1, -0.5, None)], None, 1), Update("", [], None, 1), Update("bc", [(2, -1.0, None)], "stop", 1)]
    assert Update.join(parts) == Update("abc", [(1, -0.5, None), (2, -1.0, None)], "stop", 3)
    assert Update.join(parts[:1]) is parts[0]


def test_adapter_files_names_and_refusals(tmp_path):
    base, paths = make_world(tmp_path)
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "c.lora").write_bytes((tmp_path / "a.lora").read_bytes())
    files = adapter_files([(paths[0], 1.0)], tmp_path / "more")
    assert [n for n, _ in files] == ["a", "c"]
    (tmp_path / "more" / "a.lora").write_bytes((tmp_path / "b.lora").read_bytes())
    with pytest.raises(UserError, match="two served adapters are named 'a'"):
        adapter_files([(paths[0], 1.0)], tmp_path / "more")
    with pytest.raises(UserError, match="adapter folder not found"):
        adapter_files([], tmp_path / "nope")
    (tmp_path / "other").mkdir()
    other, _ = make_world(tmp_path / "other", seed=1)
    model, tok = load_model_and_tokenizer(other)
    with pytest.raises(UserError, match="another base model"):
        ServedAdapters(model, tok, files, 2)


def test_service_ids_stacks_and_the_template_rule(tmp_path):
    """--lora makes the model id's stack (with its weights); every adapter is an id too; a request's
    `lora` entries stack on top; templates follow the one rule per stack, conflicts are a 400."""
    base, paths = make_world(tmp_path)
    model, tok = load_model_and_tokenizer(base)
    apply_lora(model, rank=2, targets=("q_proj",))
    save_adapter(model, tmp_path / "z.lora", extra={"chat_template": "zephyr"})
    save_adapter(model, tmp_path / "l3.lora", extra={"chat_template": "llama3"})
    service = build_service(ServeOptions(model=base, lora=[f"{paths[0]}:0.5"], adapters=str(tmp_path), device="cpu"))
    assert list(service.stacks) == ["base", "a", "b", "l3", "z"]
    a, b, z = (service.adapters.index[n] for n in ("a", "b", "z"))
    assert service.stacks["base"] == [(a, 0.5)] and service.stacks["a"] == [(a, 1.0)]
    entry = LoraEntry(name="b", weight=2.0)
    assert service.stack("a", [entry, LoraEntry(name="a", weight=-1.0)]) == [(b, 2.0)]     # a: 1 - 1 = off
    assert service.template_for(service.stack("base", None)).name == "chatml"            # nothing recorded
    assert service.template_for(service.stack("z", None)).name == "zephyr"                # the adapter's record
    with pytest.raises(ApiError, match="different chat templates") as e:
        service.template_for(service.stack("z", [LoraEntry(name="l3")]))
    assert e.value.status == 400
    with pytest.raises(ApiError) as e:
        service.stack("base", [LoraEntry(name=paths[1])])                                 # a path is no name
    assert e.value.status == 404


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_equals_eager_and_the_reference(tmp_path):
    """On a GPU: the captured, bucketed decode steps (several row and length buckets, adapters on
    and off) give the same greedy tokens as eager steps and as the reference path."""
    base, paths = make_world(tmp_path, block_size=256)
    tok = Tokenizer.byte_level()
    stacks = [[], [(0, 1.0)], [(1, 0.5)], [(0, 1.0), (1, -0.7)]]
    reqs = [(tok.encode(f"prompt number {i} " * (1 + i % 3)), Params(max_new=20 + 7 * (i % 5), temperature=0),
             stacks[i % 4]) for i in range(12)]
    arrive = [0, 0, 0, 1, 2, 2, 5, 9, 9, 14, 30, 31]
    engines: list = []
    graphs, _ = run({}, dict(cuda_graph=True, length_bucket=32), base, paths, reqs, 8, arrive, "cuda", engines)
    eager, _ = run({}, dict(cuda_graph=False), base, paths, reqs, 8, arrive, "cuda")
    assert graphs == eager and len(engines[0].graphs) > 2
    ahead, _ = run({}, dict(cuda_graph=True, length_bucket=32), base, paths, reqs, 8, arrive, "cuda", engines,
                   capture_all=True)
    assert ahead == eager and len(engines[1].graphs) == len(engines[1].buckets())    # nothing captured later
    for i, (ids, p, st) in enumerate(reqs):
        ref = load_model_and_tokenizer(base, lora=[(paths[j], w) for j, w in st], device="cuda")[0]
        g = generate(ref, [ids], p.max_new, temperature=0, vocab_limit=tok.vocab_size, cuda_graph=False)
        assert graphs[i][0] == tok.decode(g.tokens[0])
