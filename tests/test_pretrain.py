"""Pretraining that generalises: dropout, model shape options, validation on any corpus (the
token-level split), keep-best and early stop in the engine, and Muon."""
import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from tinygpt.checkpoint import load_model
from tinygpt.cli import main
from tinygpt.config import ModelConfig
from tinygpt.data.corpus import eval_windows, split_documents, tokenize_corpus, window_batches
from tinygpt.errors import UserError
from tinygpt.eval.ppl import window_loss
from tinygpt.generate import generate
from tinygpt.model import GPT
from tinygpt.stages.common import resolve_plan
from tinygpt.stages.pretrain import PretrainOptions, PretrainStage, lm_loss_step, memorising_hint
from tinygpt.tokenizer import Tokenizer
from tinygpt.train.engine import prepare
from tinygpt.train.optim import is_hidden_matrix, make_optimizer
from tinygpt.train.stage import FunctionStage, TrainOptions
from test_stages import ctrl_c_at

pytestmark = pytest.mark.usefixtures("one_thread")
BOOK = " ".join(f"Line {i}: the {['cat', 'dog', 'fox'][i % 3]} ran to the {['mill', 'sea'][i % 2]}."
               for i in range(300))


def _nano(dropout=0.0, **kw):
    torch.manual_seed(0)
    return GPT(ModelConfig.from_name("nano", vocab_size=97, dropout=dropout, **kw))


def _quiet():
    return lambda *a: None


# ---- dropout ------------------------------------------------------------------------------------
def test_dropout_acts_in_training_only_and_zero_is_no_dropout():
    x = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    plain, dropped = _nano(0.0), _nano(0.3)
    dropped.load_state_dict(plain.state_dict())
    with torch.no_grad():
        for p in plain.parameters():           # non-zero residual projections, so every dropout site acts
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        dropped.load_state_dict(plain.state_dict())
        dropped.eval()
        ref = plain.eval()(x)
        assert torch.equal(dropped(x), ref) and torch.equal(dropped(x), dropped(x))   # eval: deterministic, no dropout
        dropped.train()
        a, b = dropped(x), dropped(x)
        assert not torch.equal(a, b) and not torch.equal(a, ref)                     # training: two passes differ
        plain.train()
        rng = torch.get_rng_state()
        assert torch.equal(plain(x), ref)                                            # p=0 in training == eval
        assert torch.equal(torch.get_rng_state(), rng)                               # and draws no random numbers
    dropped.train()                                                                  # sampling switches it off itself
    out = generate(dropped, [[5, 6, 7]], 8, temperature=0.0).tokens[0]
    assert out == generate(plain, [[5, 6, 7]], 8, temperature=0.0).tokens[0] and dropped.training


def test_dropout_is_recorded_in_the_model_file(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(BOOK)
    out = tmp_path / "m.tinygpt"
    assert main(["train", "--corpus", str(corpus), "--preset", "nano", "--byte-tokenizer", "--ctx", "32",
                 "--steps", "2", "--batch", "2", "--dropout", "0.2", "--device", "cpu", "--quiet",
                 "--out", str(out)]) == 0
    model, _, _ = load_model(out)
    assert model.config.dropout == 0.2 and model.model.layers[0].self_attn.dropout == 0.2


# ---- model shape options --------------------------------------------------------------------------
def test_shape_options_override_the_preset_and_block_size_rules(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text(BOOK)
    out = tmp_path / "m.tinygpt"
    common = ["train", "--corpus", str(corpus), "--byte-tokenizer", "--steps", "1", "--batch", "2", "--device", "cpu",
              "--quiet", "--out", str(out)]
    assert main(common + ["--preset", "tiny", "--n-layer", "3", "--n-embd", "96", "--n-head", "3", "--n-kv-head", "1",
                          "--head-dim", "16", "--intermediate-size", "80", "--mlp", "gelu", "--norm", "layernorm",
                          "--pos-emb", "learned", "--no-qk-norm", "--tie-embeddings", "--block-size", "64",
                          "--ctx", "32"]) == 0
    c = load_model(out)[0].config
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim, c.intermediate_size, c.block_size) == \
        (3, 96, 3, 1, 16, 80, 64)
    assert (c.mlp, c.norm, c.pos_emb, c.qk_norm, c.tie_embeddings) == ("gelu", "layernorm", "learned", False, True)
    assert main(common + ["--preset", "nano", "--ctx", "200"]) == 0               # --ctx alone sets the context
    assert load_model(out)[0].config.block_size == 200
    assert main(common + ["--depth", "2", "--ctx", "32"]) == 0                    # the dial builds the default block
    c = load_model(out)[0].config
    assert (c.n_layer, c.n_embd, c.n_head, c.mlp, c.qk_norm, c.tie_embeddings) == (2, 128, 1, "swiglu", True, False)
    out.unlink()
    shutil.rmtree(tmp_path / ".tinygpt-cache")
    for argv, words in ((["--ctx", "128", "--block-size", "64"], ["--ctx 128 exceeds --block-size 64"]),
                        (["--n-embd", "100", "--n-head", "3"], ["model shape", "--n-embd 100", "--n-head 3"]),
                        (["--init", str(out), "--n-layer", "2"], ["--init", "--n-layer"])):
        capsys.readouterr()
        assert main(common + argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("tinygpt: error:") and err.count("\n") == 1 and all(w in err for w in words), err
    assert not out.exists() and not (tmp_path / ".tinygpt-cache").exists()        # refused before any work


def test_a_shape_without_an_export_is_named_at_the_start(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text(BOOK)
    lines = []
    opts = PretrainOptions(corpus=[str(corpus)], out=str(tmp_path / "m.tinygpt"), preset="nano", arch="modern",
                           byte_tokenizer=True, ctx=32, steps=1, batch=2, device="cpu", quiet=True)
    stage = PretrainStage(opts, log=lines.append)
    prepare(stage)
    assert "ReLU^2" in lines[0] and "tinygpt export" in lines[0] and "--arch" in lines[0]
    assert not any("ReLU" in x for x in _setup_log(tmp_path, corpus))              # the default block exports


def _setup_log(tmp_path, corpus):
    lines = []
    prepare(PretrainStage(PretrainOptions(corpus=[str(corpus)], out=str(tmp_path / "d.tinygpt"), preset="nano",
                                          byte_tokenizer=True, ctx=32, steps=1, batch=2, device="cpu", quiet=True),
                          log=lines.append))
    return lines


def test_a_run_that_reads_its_corpus_many_times_over_says_how_to_keep_the_best(tmp_path):
    """BOOK is 10,240 byte tokens: 200 steps of 2 x 32 read it 1.25 times (no note), 2000 steps 12.5
    times (a note naming what is missing: validation with keep-best, dropout, or both)."""
    corpus = tmp_path / "c.txt"
    corpus.write_text(BOOK)

    def notes(**opts):
        lines = []
        prepare(PretrainStage(PretrainOptions(corpus=[str(corpus)], out=str(tmp_path / "m.tinygpt"), preset="nano",
                                              byte_tokenizer=True, ctx=32, batch=2, device="cpu", quiet=True, **opts),
                              log=lines.append))
        return [x for x in lines if x.startswith("note: this run reads")]
    assert notes(steps=200) == []
    (line,) = notes(steps=2000)
    assert "10,240 training tokens 12 times over" in line and "--val-split 0.1 --keep-best and --dropout" in line
    (line,) = notes(steps=2000, val_split=0.1)
    assert "--dropout" in line and "--val-split" not in line
    assert notes(steps=2000, val_split=0.1, dropout=0.1) == []
    assert "--val-split" in memorising_hint(80, 10, False, 0.2) and memorising_hint(79, 10, False, 0.0) is None


# ---- validation on any corpus -----------------------------------------------------------------------
def test_token_level_split_of_a_one_document_corpus(tmp_path):
    (tmp_path / "book.txt").write_text(BOOK)
    tok = Tokenizer.byte_level()
    ids = tok.encode(BOOK)
    runs = [tokenize_corpus([str(tmp_path / "book.txt")], tok, tmp_path / f"cache{s}", 0.1, seed=s, log=_quiet())
            for s in (0, 0, 5)]
    data = runs[0]
    assert data["meta"]["val_by"] == "tokens" and data["meta"]["documents"] == 1
    train, val = data["train"].tolist(), data["val"].tolist()
    cut = int(len(ids) * 0.9)                          # nanoGPT's split: data[:int(n * 0.9)], data[int(n * 0.9):]
    assert train == ids[:cut] + [tok.eos_id] and val == ids[cut:] + [tok.eos_id]   # disjoint, together the text
    for other in runs[1:]:                              # the same shards every time
        assert other["train"].tolist() == train and other["val"].tolist() == val


def test_documents_are_held_out_whole_when_there_are_enough():
    ids = [[i] * (3 + i % 4) for i in range(60)]        # 60 documents, each one token value repeated
    train, val, how = split_documents(ids, 0.2, seed=1)
    assert how == "documents" and len(val) == 12 and len(train) == 48
    assert sorted(map(tuple, train + val)) == sorted(map(tuple, ids))               # whole documents, each once
    assert split_documents(ids, 0.2, seed=1)[1] == val != split_documents(ids, 0.2, seed=2)[1]
    assert split_documents(ids[:20], 0.2, seed=1)[2] == "tokens"                   # 4 < 10 documents: tokens


def test_validation_windows_tile_without_overlap_and_thin_evenly():
    starts, w = eval_windows(1001, 100)
    assert w == 100 and starts.tolist() == list(range(0, 1000, 100))                # predictions 1..1000 once each
    few, _ = eval_windows(1001, 100, max_tokens=300)
    assert few.tolist() == [0, 400, 900]
    assert eval_windows(40, 100)[1] == 39                                            # a short split: one window
    tokens = np.arange(1001) % 97
    xs = [x for x, _ in window_batches(tokens, 100, 4)]
    assert [len(x) for x in xs] == [4, 4, 2] and torch.equal(xs[0][1], torch.arange(100, 200) % 97)
    with pytest.raises(UserError, match="too few to score"):
        eval_windows(1, 100)


def test_val_loss_in_metrics_and_progress_equals_the_saved_models_loss(tmp_path):
    (tmp_path / "book.txt").write_text(BOOK)
    lines = []
    opts = PretrainOptions(corpus=[str(tmp_path / "book.txt")], out=str(tmp_path / "m.tinygpt"), preset="nano",
                           byte_tokenizer=True, ctx=32, steps=6, batch=4, lr=3e-3, val_split=0.1, val_every=3,
                           val_tokens=200, device="cpu", dtype="float32")
    PretrainStage(opts, log=lines.append).train()
    rows = [json.loads(x) for x in (tmp_path / "m.run" / "metrics.jsonl").read_text().splitlines()]
    assert [("val_loss" in r) for r in rows] == [False, False, True, False, False, True]
    assert any("validation: the last 10% of the tokens" in x for x in lines)
    assert any(x.startswith("step 6/6:") and f"val {rows[-1]['val_loss']:.4f}" in x for x in lines)
    model, tok, _ = load_model(tmp_path / "m.tinygpt")
    val = np.array(tok.encode(BOOK)[int(len(tok.encode(BOOK)) * 0.9):] + [tok.eos_id])
    assert math.isclose(window_loss(model.eval(), window_batches(val, 32, 4, max_tokens=200)), rows[-1]["val_loss"],
                        rel_tol=1e-5)


# ---- keep-best and early stop (the engine, for every stage) ------------------------------------------------
def _scripted(tmp_path, values, **opts):
    """A FunctionStage whose validation after round r returns values[r - 1]; records its saves."""
    model = _nano()
    data = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(0))
    saves = []
    holder = {}

    def validate(m):
        return {"val_loss": values[holder["stage"].engine.round - 1]}

    def save(final):
        saves.append((holder["stage"].engine.round, final, model.model.embed_tokens.weight.detach().clone()))
    stage = FunctionStage(model, lm_loss_step, lambda i: (data[:, :-1], data[:, 1:]),
                          TrainOptions(out=str(tmp_path / "m.x"), device="cpu", dtype="float32", quiet=True,
                                       val_every=1, lr=1e-2, **opts), save=save, validate=validate, log=_quiet())
    holder["stage"] = stage
    return stage, saves


def test_keep_best_saves_at_each_new_lowest_validation_only(tmp_path):
    stage, saves = _scripted(tmp_path, [3.0, 2.0, 2.5, 1.5, 1.7, 1.6], steps=6, keep_best=True, save_every=2)
    last = stage.train()
    assert [(r, f) for r, f, _ in saves] == [(1, False), (2, False), (4, False)]      # not at checkpoints or the end
    assert last["best_val_loss"] == 1.5 and stage.engine.best == {"val_loss": 1.5, "step": 4, "stale": 2}


def test_early_stop_after_k_validations_without_improvement(tmp_path):
    stage, saves = _scripted(tmp_path, [3.0, 2.0, 2.5, 2.4, 1.0, 0.5], steps=6, early_stop=2)
    last = stage.train()
    assert last["step"] == 4 and stage.engine.round == 4                             # stopped after 2.5 and 2.4
    assert [(r, f) for r, f, _ in saves] == [(4, True)]                               # without keep-best: the last
    rows = (tmp_path / "m.run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 4


def test_resume_with_keep_best_keeps_the_best_so_far(tmp_path, monkeypatch):
    values = [3.0, 1.0, 2.0, 1.5, 0.5, 0.7]
    stage, saves = _scripted(tmp_path, values, steps=6, keep_best=True, save_every=1, early_stop=3)
    undo = ctrl_c_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        stage.train()
    undo()
    assert [r for r, _, _ in saves] == [1, 2]
    stage2, saves2 = _scripted(tmp_path, values, steps=6, keep_best=True, save_every=1, early_stop=3, resume=True)
    stage2.train()
    assert [r for r, _, _ in saves2] == [5]            # 2.0 (round 3) and 1.5 (round 4) are not below the kept 1.0
    assert stage2.engine.best == {"val_loss": 0.5, "step": 5, "stale": 1}


def test_anneal_on_plateau_decays_to_min_lr_then_stops(tmp_path):
    """Two validations without a new low (rounds 3, 4) start the decay at step 4 from that step's
    scheduled learning rate to --min-lr over --anneal-steps 3 (the last at --min-lr), and the run ends
    at step 7 of 20."""
    values = [3.0, 2.0, 2.5, 2.4, 1.0, 0.5, 0.6, 0.4, 0.3, 0.2] + [0.1] * 10
    stage, saves = _scripted(tmp_path, values, steps=20, anneal_on_plateau=2, anneal_steps=3, min_lr=1e-3,
                             lr_schedule="constant")
    last = stage.train()
    rows = [json.loads(x) for x in (tmp_path / "m.run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows]
    assert last["step"] == 7 and stage.engine.anneal == {"step": 4, "lr": 1e-2}
    assert lrs == pytest.approx([1e-2] * 4 + [1e-2 + (1e-3 - 1e-2) * k / 3 for k in (1, 2, 3)])
    assert stage.engine.best == {"val_loss": 0.5, "step": 6, "stale": 1}


def test_anneal_on_plateau_goes_back_to_the_best_weights(tmp_path, monkeypatch):
    import tinygpt.train.plateau as plateau
    after, real = [], plateau.restore
    monkeypatch.setattr(plateau, "restore", lambda engine, snap: (
        real(engine, snap), after.append(engine.model.model.embed_tokens.weight.detach().clone())))
    stage, saves = _scripted(tmp_path, [3.0, 2.0, 2.5, 2.4] + [1.0] * 4, steps=8, keep_best=True,
                             anneal_on_plateau=2, anneal_steps=2)
    stage.train()
    assert [r for r, _, _ in saves] == [1, 2, 5] and stage.engine.round == 6
    torch.testing.assert_close(after[0], saves[1][2])          # at step 4, the weights of step 2 again
    assert not torch.equal(saves[2][2], saves[1][2])


@pytest.mark.parametrize("kill_at", [3, 6])
def test_anneal_on_plateau_resumes_as_an_uninterrupted_run(tmp_path, monkeypatch, kill_at):
    """Killed between the best (step 2) and the plateau (step 4), the state carries the point to go
    back to; killed inside the decay, where the decay began."""
    values = [3.0, 2.0, 2.5, 2.4, 1.0, 0.5, 0.6, 0.4] + [0.1] * 12
    opts = dict(steps=20, anneal_on_plateau=2, anneal_steps=4, save_every=1)
    whole, _ = _scripted(tmp_path / "a", values, **opts)
    whole.train()
    undo = ctrl_c_at(monkeypatch, kill_at)
    part, _ = _scripted(tmp_path / "b", values, **opts)
    with pytest.raises(KeyboardInterrupt):
        part.train()
    undo()
    again, _ = _scripted(tmp_path / "b", values, **opts, resume=True)
    again.train()
    rows = [(tmp_path / d / "m.run" / "metrics.jsonl").read_text().splitlines() for d in ("a", "b")]
    strip = [[{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in r] for r in rows]
    assert again.engine.anneal == whole.engine.anneal and again.engine.round == whole.engine.round == 8
    assert strip[0] == strip[1]
    torch.testing.assert_close(again.model.state_dict(), whole.model.state_dict())


def test_keep_best_needs_validation(tmp_path, capsys):
    (tmp_path / "c.txt").write_text(BOOK)
    capsys.readouterr()
    assert main(["train", "--corpus", str(tmp_path / "c.txt"), "--byte-tokenizer", "--keep-best", "--out",
                 str(tmp_path / "m.tinygpt"), "--device", "cpu"]) == 2
    assert "--keep-best needs validation data" in capsys.readouterr().err
    with pytest.raises(UserError, match="--early-stop needs validation"):      # a stage that does not validate
        FunctionStage(_nano(), lm_loss_step, lambda i: None, TrainOptions(out=str(tmp_path / "x"), early_stop=2,
                                                                          device="cpu"), log=_quiet()).train()


def test_pretrain_keep_best_file_is_the_lowest_validation_checkpoint(tmp_path):
    """Overfit a small book at a high rate: the kept file scores the lowest val_loss of the run."""
    (tmp_path / "book.txt").write_text(BOOK[:1500])
    opts = PretrainOptions(corpus=[str(tmp_path / "book.txt")], out=str(tmp_path / "m.tinygpt"), preset="nano",
                           byte_tokenizer=True, ctx=32, steps=100, batch=8, lr=2e-2, warmup=0, val_split=0.2,
                           val_every=10, keep_best=True, device="cpu", dtype="float32", quiet=True)
    PretrainStage(opts, log=_quiet()).train()
    rows = [json.loads(x) for x in (tmp_path / "m.run" / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    model, tok, _ = load_model(tmp_path / "m.tinygpt")
    assert vals[-1] > min(vals)                         # the run ends past its best: last != best
    ids = tok.encode(BOOK[:1500])
    val = np.array(ids[int(len(ids) * 0.8):] + [tok.eos_id])
    got = window_loss(model.eval(), window_batches(val, 32, 8))
    assert math.isclose(got, min(vals), rel_tol=1e-5), (got, vals)
    assert rows[-1]["best_val_loss"] == min(vals)


# ---- Muon -------------------------------------------------------------------------------------------------
def _engine(model, tmp_path, batches, **opts):
    stage = FunctionStage(model, lm_loss_step, batches, TrainOptions(out=str(tmp_path / "m.x"), device="cpu",
                                                                     dtype="float32", quiet=True, **opts), log=_quiet())
    return prepare(stage)


def test_muon_groups_on_nano_by_hand(tmp_path):
    model = _nano()
    eng = _engine(model, tmp_path, None, steps=10, optimizer="muon", lr=1e-3, muon_lr=0.02, warmup=0)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [(type(o).__name__, [names[id(p)] for g in o.param_groups for p in g["params"]], o.param_groups)
              for o in eng.opt.optimizers]
    layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"]
    assert groups[0][0] == "Muon" and sorted(groups[0][1]) == sorted(f"model.layers.{i}.{m}.weight" for i in range(2)
                                                                      for m in layer)
    norms = [f"model.layers.{i}.{n}.weight" for i in range(2) for n in
             ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm")]
    adamw = groups[1][2]
    assert groups[1][0] == "AdamW"
    assert sorted(names[id(p)] for p in adamw[0]["params"]) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert adamw[0]["weight_decay"] == 0.1 and adamw[1]["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in adamw[1]["params"]) == sorted(norms + ["model.norm.weight"])
    x = torch.randint(0, 97, (2, 9))
    eng.train_step([(x[:, :-1], x[:, 1:])])
    # step 0 of a 10-step cosine from the peak: Muon at 0.02, AdamW at 1e-3
    assert groups[0][2][0]["lr"] == pytest.approx(0.02) and adamw[0]["lr"] == pytest.approx(1e-3)
    assert is_hidden_matrix("model.layers.0.self_attn.q_proj.lora_A.default", torch.zeros(4, 64))
    assert not is_hidden_matrix("head.weight", torch.zeros(1, 64))


def test_muon_gradient_accumulation_matches_one_big_batch(tmp_path):
    """batch 8 x accum 1 and batch 2 x accum 4: Muon receives the same gradient (to fp32 rounding) and
    makes the same update, up to its bf16 Newton-Schulz iteration, which amplifies rounding in the
    small singular directions (about 1% here); other rows give a wholly different update."""
    data = torch.randint(0, 97, (16, 17), generator=torch.Generator().manual_seed(3))

    def step(batch, accum, first=0):
        model = _nano()
        rows = lambda i: (data[first + i * batch:first + (i + 1) * batch, :-1],  # noqa: E731
                          data[first + i * batch:first + (i + 1) * batch, 1:])
        eng = _engine(model, tmp_path, rows, steps=1, batch=batch, accum=accum, optimizer="muon", lr=1e-2)
        start, seen = [p.detach().clone() for p in eng.params], []
        real = eng.opt.step
        eng.opt.step = lambda: (seen.extend(p.grad.clone() for p in eng.params), real())[1]
        eng.train_step()
        return seen, [p.detach() - s for p, s in zip(eng.params, start)]
    (g1, d1), (g4, d4), (_, other) = step(8, 1), step(2, 4), step(8, 1, first=8)
    for a, b in zip(g1, g4):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    flat = lambda ds: torch.cat([d.flatten() for d in ds])   # noqa: E731
    rel = float((flat(d1) - flat(d4)).norm() / flat(d1).norm())
    far = float((flat(d1) - flat(other)).norm() / flat(d1).norm())
    assert rel < 0.01 and far > 0.3, (rel, far)


def test_compiled_muon_step_equals_the_eager_one_and_compiles_once(tmp_path):
    """--compile compiles Muon's step; the rate the schedule sets each step reaches it as a 0-d tensor:
    the same updates as the eager step at every rate (to the bf16 rounding of the update, which a
    tensor rate scales in bf16: each update is ~0.01-0.03 here, a stale rate would be off by as
    much), one compilation for all of them, and the groups' rates stay floats outside the step."""
    from torch._dynamo.testing import CompileCounterWithBackend
    assert _engine(_nano(), tmp_path, None, steps=2, optimizer="muon", compile=True).opt._compiled_muon is not None
    torch.manual_seed(0)
    shapes = [(16, 8), (8, 16), (16, 8)]
    eager, compiled = ([torch.nn.Parameter(torch.zeros(s)) for s in shapes] for _ in range(2))
    for a, b in zip(eager, compiled):
        b.data.copy_(a.data.normal_())
    start = [b.detach().clone() for b in compiled]
    opts = [make_optimizer([(f"model.layers.0.w{i}", p) for i, p in enumerate(ps)], 1e-3, 0.1, kind="muon")
            for ps in (eager, compiled)]
    counter = CompileCounterWithBackend("aot_eager")
    opts[1].compile(backend=counter)
    for lr in (0.02, 0.01, 0.005):
        for a, b in zip(eager, compiled):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        for o in opts:
            o.param_groups[0]["lr"] = lr
            o.step()
        assert type(opts[1].param_groups[0]["lr"]) is float
        for a, b in zip(eager, compiled):
            torch.testing.assert_close(b, a, atol=2e-4, rtol=0)
    assert counter.frame_count == 1
    assert all((b - b0).abs().max() > 1e-3 for b, b0 in zip(compiled, start))      # it did step


def test_keep_best_validates_twenty_times_unless_told():
    o = PretrainOptions(corpus=["c.txt"], out="m.tinygpt", val_split=0.1, keep_best=True)
    assert resolve_plan(o, 1000, validates=True).val_every == 50
    assert resolve_plan(replace(o, keep_best=False, early_stop=3), 1000, validates=True).val_every == 50
    assert resolve_plan(replace(o, keep_best=False), 1000, validates=True).val_every == 1000   # at the end
    assert resolve_plan(replace(o, val_every=7), 1000, validates=True).val_every == 7
