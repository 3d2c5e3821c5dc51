"""Distillation: the divergences by hand, the chunked head loss against the plain one, the top-k cache
against the live teacher, a distilled student closer to its teacher than a hard-label one, the
vocabulary check, on-policy batches, HF-folder and int8 teachers, and the command line."""
import json
import math

import pytest
import torch

from tinygpt import losses as L
from tinygpt.checkpoint import save_model
from tinygpt.cli import main
from tinygpt.config import ARCHS, ModelConfig, pad_vocab
from tinygpt.interop.hf import export_hf
from tinygpt.logprobs import chunked_head_loss
from tinygpt.model import GPT, packed_mask
from tinygpt.stages.distill import DistillOptions, DistillTrainer
from tinygpt.tokenizer import Tokenizer
from tinygpt.train.engine import prepare

pytestmark = pytest.mark.usefixtures("one_thread")


def _lp(*probs):
    return torch.tensor([probs]).log()


# ---- the divergences by hand ------------------------------------------------------------------------
def test_forward_reverse_kl_and_jsd_by_hand():
    s, t = _lp(0.5, 0.5), _lp(0.9, 0.1)
    fwd = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)          # KL(T || S)
    rev = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)          # KL(S || T)
    assert L.forward_kl(s, t).item() == pytest.approx(fwd, abs=1e-6)
    assert L.reverse_kl(s, t).item() == pytest.approx(rev, abs=1e-6)

    def kl(p, q):
        return sum(a * math.log(a / b) for a, b in zip(p, q))
    for beta in (0.5, 0.25):
        m = [beta * a + (1 - beta) * b for a, b in zip((0.9, 0.1), (0.5, 0.5))]      # M = beta T + (1 - beta) S
        want = beta * kl((0.9, 0.1), m) + (1 - beta) * kl((0.5, 0.5), m)
        assert L.generalized_jsd(s, t, beta).item() == pytest.approx(want, abs=1e-6)
    assert L.generalized_jsd(s, t, 0.5).item() == pytest.approx(0.5 * (0.116322 + 0.087177), abs=1e-5)


def test_jsd_at_the_two_ends_of_beta_is_the_two_kls():
    torch.manual_seed(0)
    s, t = torch.randn(5, 11).log_softmax(-1), torch.randn(5, 11).log_softmax(-1)
    torch.testing.assert_close(L.generalized_jsd(s, t, 0.0), L.forward_kl(s, t), rtol=0, atol=0)
    torch.testing.assert_close(L.generalized_jsd(s, t, 1.0), L.reverse_kl(s, t), rtol=0, atol=0)
    # the mixture formula itself vanishes at the ends, like beta * KL(T || S): why the ends are special-cased
    torch.testing.assert_close(L.generalized_jsd(s, t, 1e-4) / 1e-4, L.forward_kl(s, t), rtol=2e-3, atol=1e-4)
    torch.testing.assert_close(L.generalized_jsd(s, t, 1 - 1e-4) / 1e-4, L.reverse_kl(s, t), rtol=2e-3, atol=1e-4)
    with pytest.raises(ValueError):
        L.generalized_jsd(s, t, 1.5)


def test_temperature_and_hard_label_mix_by_hand():
    student = torch.tensor([[0.0, math.log(3.0)]])          # p_S = (1/4, 3/4) at tau 1
    teacher = torch.tensor([[math.log(9.0), 0.0]])          # p_T = (9/10, 1/10) at tau 1, (3/4, 1/4) at tau 2
    out = L.distill_token_loss(student, torch.tensor([1]), torch.tensor([1.0]), teacher, beta=0.0, temperature=2.0,
                               alpha=0.3)
    r3 = math.sqrt(3.0)
    q = (1 / (1 + r3), r3 / (1 + r3))                       # p_S at tau 2
    kl = 0.75 * math.log(0.75 / q[0]) + 0.25 * math.log(0.25 / q[1])
    ce = -math.log(0.75)                                    # hard label at tau 1
    torch.testing.assert_close(out[:, 0], torch.tensor([0.7 * kl + 0.3 * ce, kl, ce]))
    # a position whose target is not a label (hard 0) keeps only the divergence term
    out0 = L.distill_token_loss(student, torch.tensor([1]), torch.tensor([0.0]), teacher, beta=0.0, temperature=2.0,
                                alpha=0.3)
    assert out0[0, 0].item() == pytest.approx(0.7 * kl, abs=1e-6)


def test_forward_kl_gradient_is_student_minus_teacher_over_tau():
    torch.manual_seed(1)
    z = torch.randn(3, 7, requires_grad=True)
    t = torch.randn(3, 7)
    tau = 1.5
    L.distill_token_loss(z, torch.zeros(3, dtype=torch.long), torch.zeros(3), t, beta=0.0, temperature=tau)[0].sum() \
        .backward()
    want = ((z / tau).softmax(-1) - (t / tau).softmax(-1)) / tau
    torch.testing.assert_close(z.grad, want.detach(), rtol=1e-5, atol=1e-6)


def test_topk_view_by_hand_and_at_k_equal_v_minus_1_it_is_the_full_loss():
    t = _lp(0.6, 0.25, 0.1, 0.05)
    s_logits = _lp(0.4, 0.3, 0.2, 0.1)
    lp, ids = L.topk_logprobs(t, 2)
    assert ids.tolist() == [[0, 1]]
    coarse_t, coarse_s = L.topk_with_rest(lp), L.coarsen(s_logits, ids)
    torch.testing.assert_close(coarse_t.exp(), torch.tensor([[0.6, 0.25, 0.15]]))
    torch.testing.assert_close(coarse_s.exp(), torch.tensor([[0.4, 0.3, 0.3]]))
    want = 0.6 * math.log(0.6 / 0.4) + 0.25 * math.log(0.25 / 0.3) + 0.15 * math.log(0.15 / 0.3)
    assert L.forward_kl(coarse_s, coarse_t).item() == pytest.approx(want, abs=1e-6)
    assert want < L.forward_kl(s_logits, t).item()                # coarsening never increases a divergence
    # k = V - 1: the rest is a single token, so the coarse distributions ARE the full ones
    torch.manual_seed(2)
    zs, zt = torch.randn(4, 9), torch.randn(4, 9)
    for beta in (0.0, 0.3, 1.0):
        full = L.distill_token_loss(zs, torch.zeros(4, dtype=torch.long), torch.zeros(4), zt, beta=beta)
        top = L.distill_token_loss(zs, torch.zeros(4, dtype=torch.long), torch.zeros(4), zt, k=8, beta=beta)
        torch.testing.assert_close(top, full, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        L.topk_logprobs(zt, 9)


def test_zero_probability_tokens_give_finite_values_and_gradients():
    z = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
    t = torch.tensor([[0.0, float("-inf"), 2.0]])            # the teacher rules a token out
    for beta in (0.0, 0.5, 1.0):
        out = L.distill_token_loss(z, torch.tensor([2]), torch.ones(1), t, beta=beta)
        out[0].sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(z.grad).all(), beta
        z.grad = None


# ---- the chunked head loss ------------------------------------------------------------------------
@pytest.mark.parametrize("trainable", [False, True])
def test_chunked_head_loss_equals_the_plain_loss_values_and_gradients(trainable):
    torch.manual_seed(3)
    M, C, V = 10, 6, 13
    h = torch.randn(M, C, requires_grad=True)
    w = torch.randn(V, C, requires_grad=trainable)
    t = torch.randn(M, V)
    tgt = torch.randint(0, V, (M,))

    def fn(logits, tgt, t):
        return L.distill_token_loss(logits, tgt, torch.ones(len(tgt)), t, beta=0.3, temperature=1.7, alpha=0.2)
    plain = fn(h @ w.t(), tgt, t)
    plain[0].sum().backward()
    want_h, want_w = h.grad.clone(), (w.grad.clone() if trainable else None)
    h.grad = None
    if trainable:
        w.grad = None
    got = chunked_head_loss(h, w, fn, tgt, t, chunk=3)
    (got[0] * 2.0).sum().backward()                         # an upstream gradient that is not 1
    torch.testing.assert_close(got, plain.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h.grad, 2 * want_h, rtol=1e-5, atol=1e-6)
    if trainable:
        torch.testing.assert_close(w.grad, 2 * want_w, rtol=1e-5, atol=1e-6)


# ---- the stage -------------------------------------------------------------------------------------
def _nano(tok, seed, sharp=0.0, **shape):
    torch.manual_seed(seed)
    m = GPT(ModelConfig.from_name("nano", vocab_size=pad_vocab(tok.vocab_size), block_size=128, **shape))
    if sharp:
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() == 2:
                    p.normal_(0, sharp)
    return m


def _files(tmp_path, n=40, teacher_shape=None):
    """A sharp nano teacher, a smaller student (1 layer, 32 wide), chat rows."""
    tok = Tokenizer.byte_level()
    save_model(tmp_path / "teacher.tinygpt", _nano(tok, 0, 0.2, **(teacher_shape or {})), tok)
    save_model(tmp_path / "student.tinygpt", _nano(tok, 1, n_layer=1, n_embd=32, n_head=1), tok)
    rows = [{"messages": [{"role": "user", "content": f"Add {i} and {i % 7}."},
                          {"role": "assistant", "content": f"{i + i % 7} it is"}]} for i in range(n)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tok


def _stage(tmp_path, out="s.lora", **kw):
    kw = {"teacher": str(tmp_path / "teacher.tinygpt"), "steps": 2, "batch": 4, "lr": 1e-3, **kw}
    o = DistillOptions(model=str(tmp_path / "student.tinygpt"), data=str(tmp_path / "sft.jsonl"),
                       out=str(tmp_path / out), device="cpu", dtype="float32", quiet=True, **kw)
    tr = DistillTrainer(o, log=lambda *a: None)
    prepare(tr)
    return tr


def _live_restricted(tr, batch, k):
    """The loss of a batch by hand: the live teacher's logits at the scored positions, their top-k view."""
    mask = packed_mask(batch.doc) if batch.doc is not None else None
    with torch.no_grad():
        t_logits = tr.teacher(batch.idx, pos=batch.pos, mask=mask).reshape(-1, tr.teacher.config.vocab_size)
        s_logits = tr.gpt(batch.idx, pos=batch.pos, mask=mask).reshape(-1, tr.gpt.config.vocab_size)
    V = tr.vocab
    t_logits, s_logits = t_logits[batch.sel, :V], s_logits[batch.sel, :V]
    o = tr.opts
    return t_logits, L.distill_token_loss(s_logits, batch.target, batch.hard, t_logits, k=k, beta=o.beta,
                                          temperature=o.temperature, alpha=o.alpha)


def test_topk_cached_teacher_equals_the_live_teacher_restricted_to_those_k(tmp_path):
    _files(tmp_path)
    cached = _stage(tmp_path, teacher_topk=8, beta=0.4, temperature=1.3, alpha=0.25)
    assert cached.teacher is None                                     # freed once everything is cached
    live = _stage(tmp_path, out="live.lora", beta=0.4, temperature=1.3, alpha=0.25)
    batch = cached.batch(0)
    assert batch.topk is not None and batch.topk[0].shape == (len(batch.sel), 8)
    t_logits, want = _live_restricted(live, live.batch(0), 8)
    lp, ids = L.topk_logprobs(t_logits, 8, 1.3)
    torch.testing.assert_close(batch.topk[0], lp, rtol=0, atol=1e-5)
    assert torch.equal(batch.topk[1], ids)
    with torch.no_grad():
        loss, count, _ = cached.loss_step(cached.model, batch)
    assert count == len(batch.sel)
    assert loss.item() == pytest.approx(want[0].sum().item(), rel=1e-5)
    # the cache is found again by content: a second stage over the same rows reads it
    again = _stage(tmp_path, teacher_topk=8, beta=0.4, temperature=1.3, alpha=0.25)
    assert torch.equal(again.tables["train"].logp, cached.tables["train"].logp)
    files = list((tmp_path / "s.run").glob("teacher-top8-*.safetensors"))
    assert len(files) == 1


def test_live_loss_step_equals_the_loss_by_hand(tmp_path):
    _files(tmp_path)
    tr = _stage(tmp_path, beta=0.7, temperature=0.8, alpha=0.5)
    batch = tr.batch(1)
    _, want = _live_restricted(tr, batch, 0)
    with torch.no_grad():
        loss, _, metrics = tr.loss_step(tr.model, batch)
    assert loss.item() == pytest.approx(want[0].sum().item(), rel=1e-5)
    assert metrics["divergence"].item() == pytest.approx(want[1].mean().item(), rel=1e-5)


def test_a_distilled_student_is_closer_to_its_teacher_than_a_hard_label_student(tmp_path):
    """Same student, data, steps and learning rate; only the loss differs (alpha 0: forward KL to the
    teacher; alpha 1: cross-entropy on the data's tokens, i.e. SFT). KL(teacher || student) on the
    held-out conversations' responses."""
    _files(tmp_path)
    kl = {}
    for alpha in (0.0, 1.0):
        tr = _stage(tmp_path, out=f"s{alpha}.tinygpt", full=True, steps=30, lr=3e-3, beta=0.0, alpha=alpha,
                    val_split=0.25, warmup=0)
        start = tr.validate(tr.model)["val_divergence"]
        kl[alpha] = tr.engine.fit()["val_divergence"]
    assert kl[0.0] < 0.6 * start and kl[0.0] < 0.5 * kl[1.0], (start, kl)


def test_a_teacher_with_another_tokenizer_is_refused_naming_both(tmp_path, capsys):
    _files(tmp_path)
    other = Tokenizer.train(["the quick brown fox jumps over the lazy dog " * 20] * 5, 300)
    save_model(tmp_path / "other.tinygpt", _nano(other, 0), other)
    capsys.readouterr()
    rc = main(["distill", str(tmp_path / "student.tinygpt"), "--teacher", str(tmp_path / "other.tinygpt"), "--data",
               str(tmp_path / "sft.jsonl"), "--out", str(tmp_path / "x.lora"), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "student.tinygpt" in err[0] and "other.tinygpt" in err[0]
    assert "261 tokens" in err[0] and f"{other.vocab_size} tokens" in err[0], err[0]
    assert not (tmp_path / "x.lora").exists()


def test_on_policy_batches_are_the_students_own_answers(tmp_path):
    _files(tmp_path)
    tr = _stage(tmp_path, lmbda=0.5, max_new_tokens=6, seed=3)
    picks = [tr._on_policy(i) for i in range(40)]
    assert 10 < sum(picks) < 30                                    # about half
    i = picks.index(True)
    b = tr.batch(i)
    assert b.on_policy == 1.0 and b.hard.sum() == 0 and b.topk is None
    again = tr.batch(i)                                            # a pure function of the index and the weights
    assert torch.equal(b.idx, again.idx) and torch.equal(b.target, again.target)
    # every scored token is a generated one: positions after a prompt, at most max_new_tokens per answer
    assert len(b.sel) <= 6 * tr.opts.batch
    m = tr.iteration(tr.engine, 0)
    assert {"loss", "divergence", "on_policy"} <= set(m)


def test_int8_and_hugging_face_teachers(tmp_path):
    tok = _files(tmp_path, teacher_shape=ARCHS["llama"])
    export_hf(__import__("tinygpt").load_model_and_tokenizer(tmp_path / "teacher.tinygpt")[0], tok, tmp_path / "hf")
    ref = _stage(tmp_path)
    hf = _stage(tmp_path, out="hf.lora", teacher=str(tmp_path / "hf"))
    b = ref.batch(0)
    with torch.no_grad():
        a, _, _ = ref.loss_step(ref.model, b)
        c, _, _ = hf.loss_step(hf.model, b)
        q = _stage(tmp_path, out="q.lora", teacher_dtype="int8")
        d, _, _ = q.loss_step(q.model, b)
    assert c.item() == pytest.approx(a.item(), rel=1e-5)
    assert sum(type(m).__name__ == "Int8Linear" for m in q.teacher.modules()) == 7 * 2   # every block linear
    assert d.item() == pytest.approx(a.item(), rel=0.05) and d.item() != a.item()


def test_cli_distill_writes_an_adapter_and_refuses_bad_values(tmp_path, capsys):
    _files(tmp_path)
    base = ["distill", str(tmp_path / "student.tinygpt"), "--teacher", str(tmp_path / "teacher.tinygpt"), "--data",
            str(tmp_path / "sft.jsonl"), "--device", "cpu", "--quiet", "--steps", "2", "--batch", "4"]
    assert main(base + ["--out", str(tmp_path / "a.lora"), "--teacher-topk", "4", "--lmbda", "0.5",
                        "--max-new-tokens", "4"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "a.run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and {"divergence", "hard_ce", "on_policy"} <= set(rows[0])
    from tinygpt import load_model_and_tokenizer
    load_model_and_tokenizer(tmp_path / "student.tinygpt", lora=[tmp_path / "a.lora"])
    for bad in (["--beta", "1.5"], ["--teacher-topk", "5000"], ["--teacher", str(tmp_path / "missing.tinygpt")],
                ["--temperature", "0"]):
        capsys.readouterr()
        assert main(base + ["--out", str(tmp_path / "b.lora")] + bad) == 2, bad
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "b.lora").exists()
