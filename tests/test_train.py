"""Pretraining: engine properties (accumulation, resume, checkpoints) and corpus loading."""
import json

import numpy as np
import pytest
import torch

from tinygpt.checkpoint import load_model, save_model
from tinygpt.config import ModelConfig
from tinygpt.errors import UserError
from tinygpt.io import load_tensors
from tinygpt.data.corpus import TokenBatches, read_documents, tokenize_corpus
from tinygpt.model import GPT
from tinygpt.tokenizer import Tokenizer
from tinygpt.stages.pretrain import PretrainOptions, PretrainStage, lm_loss_step
from tinygpt.train.engine import prepare, run_dir_for
from tinygpt.train.stage import FunctionStage, TrainOptions

TEXT = "\n\n".join(f"Story {i}. The cat number {i} sat on mat {i % 7} and looked at the moon." for i in range(60))


def _corpus(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text(TEXT)
    return p


def _pretrain(tmp_path, steps, **kw):
    opts = PretrainOptions(corpus=[str(_corpus(tmp_path))], out=str(tmp_path / "m.tinygpt"), preset="nano",
                           byte_tokenizer=True, ctx=32, device="cpu", steps=steps, batch=4, lr=3e-3, min_lr=3e-4,
                           warmup=2, dtype="float32", quiet=True, **kw)
    return PretrainStage(opts, log=lambda *a: None).train()


def _engine(model, loss_step, batches, tmp_path, **opts):
    """An engine over a FunctionStage, set up on the CPU."""
    stage = FunctionStage(model, loss_step, batches, TrainOptions(out=str(tmp_path / "m.x"), device="cpu",
                                                                  dtype="float32", quiet=True, **opts),
                          log=lambda *a: None)
    return prepare(stage)


def test_loss_goes_down_and_checkpoint_round_trip_is_bit_exact(tmp_path):
    first = _pretrain(tmp_path, 1)["loss"]
    last = _pretrain(tmp_path, 40)["loss"]
    assert last < first - 1.0
    model, tok, _ = load_model(tmp_path / "m.tinygpt")
    save_model(tmp_path / "again.tinygpt", model, tok)
    again, tok2, _ = load_model(tmp_path / "again.tinygpt")
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert tok2.to_json() == tok.to_json()
    metrics = [json.loads(x) for x in (tmp_path / "m.run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 40 and {"loss", "lr", "tokens_per_s", "grad_norm"} <= set(metrics[0])


def test_nano_overfits_a_tiny_corpus(tmp_path):
    tok = Tokenizer.byte_level()
    ids = np.array(tok.encode("abcdefgh" * 8), dtype=np.uint16)
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name("nano", vocab_size=320))
    eng = _engine(model, lm_loss_step, TokenBatches(ids, 16, 4), tmp_path, steps=60, batch=4, lr=1e-2, warmup=5)
    assert eng.fit()["loss"] < 0.1


def test_resume_equals_uninterrupted(tmp_path):
    straight = tmp_path / "a"
    straight.mkdir()
    _pretrain(straight, 20)
    resumed = tmp_path / "b"
    resumed.mkdir()

    import tinygpt.train.engine as engine_mod
    real = engine_mod.Engine.train_step

    def interrupt_at_10(self, micro_batches=None):
        if self.step == 10:
            raise KeyboardInterrupt
        return real(self, micro_batches)
    engine_mod.Engine.train_step = interrupt_at_10
    try:
        with pytest.raises(KeyboardInterrupt):
            _pretrain(resumed, 20)
    finally:
        engine_mod.Engine.train_step = real
    state = json.loads(load_tensors(resumed / "m.run" / "state.safetensors")[1]["state"])
    assert state["step"] == 10 and state["round"] == 10
    _pretrain(resumed, 20, resume=True)
    a, _, _ = load_model(straight / "m.tinygpt")
    b, _, _ = load_model(resumed / "m.tinygpt")
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    torch.manual_seed(0)
    data = torch.randint(0, 97, (8, 17))
    # uneven per-row token counts (ignored targets) make "scaled by tokens" differ from "by micro-steps"
    data[1, 9:] = -100
    data[6, 4:] = -100

    def grads(batch, accum):
        torch.manual_seed(1)
        model = GPT(ModelConfig.from_name("nano", vocab_size=97))
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.1)

        def batches(i):
            rows = data[i * batch:(i + 1) * batch]
            return rows[:, :-1].clamp(min=0), rows[:, 1:]

        def step(m, b):
            x, y = b
            loss = torch.nn.functional.cross_entropy(m(x).flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
            n = (y != -100).sum()
            return loss, n, {}
        eng = _engine(model, step, batches, tmp_path, steps=1, batch=batch, accum=accum)
        eng.accumulate()
        return [p.grad.clone() for p in eng.params]
    for g1, g4 in zip(grads(8, 1), grads(2, 4)):
        torch.testing.assert_close(g1, g4, atol=1e-6, rtol=0)


def test_corpus_kinds(tmp_path):
    (tmp_path / "a.txt").write_text("one doc\nstill one\n\nsecond doc\n\n\nthird")
    (tmp_path / "b.txt").write_text("x<|endoftext|>y\n\nstill y<|endoftext|>")
    (tmp_path / "c.jsonl").write_text('{"text": "j1"}\n\n{"text": "j2", "id": 3}\n')
    (tmp_path / "d.json").write_text('[{"text": "k1"}, {"text": "k2"}]')
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["p1", "p2", "p3"]}), tmp_path / "e.parquet")
    assert read_documents(tmp_path / "a.txt") == ["one doc\nstill one", "second doc", "third"]
    assert read_documents(tmp_path / "b.txt") == ["x", "y\n\nstill y"]
    assert read_documents(tmp_path / "c.jsonl") == ["j1", "j2"]
    assert read_documents(tmp_path / "d.json") == ["k1", "k2"]
    assert read_documents(tmp_path / "e.parquet") == ["p1", "p2", "p3"]
    tok = Tokenizer.byte_level()
    data = tokenize_corpus([str(tmp_path / "*.txt"), str(tmp_path / "c.jsonl")], tok, tmp_path / "cache",
                           val_split=0.3, log=lambda *a: None)
    # 7 documents are too few to hold out whole ones: the last 30% of each is held out instead
    assert data["meta"]["documents"] == 7 and data["meta"]["val_by"] == "tokens"
    train = data["train"].tolist()
    assert train.count(tok.eos_id) == 6 and train[-1] == tok.eos_id   # "x" (one token) is all held out
    # cached: a second call reads the same shard instead of re-tokenizing
    again = tokenize_corpus([str(tmp_path / "*.txt"), str(tmp_path / "c.jsonl")], tok, tmp_path / "cache",
                            val_split=0.3, log=lambda *a: pytest.fail("re-tokenized"))
    assert again["train"].tolist() == train


def test_batches_are_deterministic_in_the_index():
    ids = np.arange(500, dtype=np.uint16)
    b1, b2 = TokenBatches(ids, 16, 4, seed=3), TokenBatches(ids, 16, 4, seed=3)
    x, y = b1(7)
    assert torch.equal(x, b2(7)[0]) and torch.equal(y, x + 1)
    assert not torch.equal(b1(8)[0], x)


def test_trains_on_tinystories(shared_data, tmp_path):
    path = shared_data / "pretrain" / "tinystories_train.txt"
    if not path.exists():
        pytest.skip("tinystories_train.txt not present")
    def run(steps, warmup):
        return PretrainStage(PretrainOptions(corpus=[str(path)], out=str(tmp_path / "ts.tinygpt"), preset="nano",
                                             vocab_size=512, ctx=64, device="cpu", steps=steps, batch=8, lr=3e-3,
                                             warmup=warmup, dtype="float32", quiet=True), log=lambda *a: None).train()
    first, last = run(1, 0), run(15, 2)
    assert last["loss"] < first["loss"]


def test_run_dir_sits_beside_the_output():
    assert str(run_dir_for("out/base.tinygpt")) == "out/base.run"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])                 # cuda: fused AdamW skips on device
def test_non_finite_step_is_skipped_and_repeated_ones_stop_training(device, tmp_path):
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name("nano", vocab_size=97)).to(device)
    data = torch.randint(0, 97, (4, 17), device=device)
    poisoned = {1}                                          # step 1's loss is NaN

    def step(m, i):
        loss = torch.nn.functional.cross_entropy(m(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten(), reduction="sum")
        return loss * (float("nan") if i in poisoned else 1.0), data[:, 1:].numel(), {}

    stage = FunctionStage(model, step, lambda i: i, TrainOptions(out=str(tmp_path / "m.x"), steps=10, device=device,
                                                                 dtype="float32", quiet=True, max_bad_steps=3),
                          log=lambda *a: None)
    eng = prepare(stage)

    def snapshot():
        moments = [t.clone() for s in eng.opt.state.values() for t in s.values()]
        return [p.detach().clone() for p in eng.params], moments
    eng.train_step()
    before = snapshot()
    assert not eng.train_step()["finite"] and eng.bad_steps == 1
    for a, b in zip(before[0] + before[1], snapshot()[0] + snapshot()[1]):
        assert torch.equal(a, b)                              # weights, moments and step counts untouched
    assert eng.train_step()["finite"] and not torch.equal(before[0][0], eng.params[0]) and eng.bad_steps == 0
    poisoned.update(range(3, 10))
    with pytest.raises(UserError, match="diverged: 3 non-finite"):
        eng.fit()


@pytest.mark.parametrize("clip", [0.0, 0.5, 1e6])
def test_one_pass_normalize_and_clip_equals_scale_then_clip_grad_norm(clip, tmp_path):
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name("nano", vocab_size=97))
    eng = _engine(model, None, None, tmp_path, steps=1, grad_clip=clip)
    for p in eng.params:
        p.grad = torch.randn_like(p)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in eng.params]
    for r, p in zip(ref, eng.params):
        r.grad = p.grad * 0.25
    want_norm = torch.nn.utils.clip_grad_norm_(ref, clip if clip > 0 else float("inf"))
    norm = eng._normalize_and_clip(torch.tensor(0.25))
    torch.testing.assert_close(norm, want_norm)
    for p, r in zip(eng.params, ref):
        torch.testing.assert_close(p.grad, r.grad)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_mode_the_umask_allows(tmp_path, umask):
    import os
    from tinygpt.io import atomic_write_text
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        _pretrain(tmp_path, 1)
    finally:
        os.umask(old)
    for path in (tmp_path / "a.txt", tmp_path / "m.tinygpt", tmp_path / "m.run" / "metrics.jsonl"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_default_warmup_is_short_for_short_runs():
    from tinygpt.train.optim import default_warmup
    assert [default_warmup(s, 50) for s in (1, 9, 10, 20, 499, 500, 10_000)] == [0, 0, 1, 2, 49, 50, 50]
    assert default_warmup(3000, 100) == 100 and default_warmup(30, 100) == 3
