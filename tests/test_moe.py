"""Mixture of experts: routing, the expert paths against a per-token reference, the router
losses, the balancing bias, the engine's handling of both (every stage), sampling, metrics."""
import json
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tinygpt.checkpoint import load_model, save_model
from tinygpt.cli import main
from tinygpt.config import ModelConfig, pad_vocab
from tinygpt.errors import UserError
from tinygpt.generate import generate
from tinygpt.io import load_tensors, save_tensors
from tinygpt.losses import load_balance_loss, router_z_loss
from tinygpt.model import GPT, MLP
from tinygpt.moe import MoE, expert_counts, load_metrics, pop_router_terms, update_router_bias
from tinygpt.report import metric_groups
from tinygpt.tokenizer import Tokenizer
from tinygpt.train.engine import prepare
from tinygpt.train.stage import FunctionStage, TrainOptions

pytestmark = pytest.mark.usefixtures("one_thread")
V = 97
MOE = dict(n_experts=4, n_experts_active=2, n_shared_experts=1)
BOOK = " ".join(f"Line {i}: the {['cat', 'dog', 'fox'][i % 3]} ran to the {['mill', 'sea'][i % 2]}." for i in range(300))


def _cfg(**kw):
    return ModelConfig.from_name("nano", vocab_size=V, **{**MOE, **kw})


def _moe(seed=0, **kw):
    """An MoE layer with non-trivial weights everywhere (zero-init projections would hide bugs)."""
    torch.manual_seed(seed)
    cfg = _cfg(**kw)
    layer = MoE(cfg, MLP(cfg, cfg.n_shared_experts * cfg.expert_intermediate_size) if cfg.n_shared_experts else None)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


def _naive(layer: MoE, x):
    """Per-token reference: each token through its k chosen experts, weighted, plus the shared MLP."""
    flat = x.reshape(-1, x.shape[-1])
    weights, idx, _, _ = layer.gate(flat)
    rows = []
    for t in range(flat.shape[0]):
        y = layer.shared_experts(flat[t]) if hasattr(layer, "shared_experts") else torch.zeros_like(flat[t])
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            g, u = (layer.experts.gate_up_proj[e] @ flat[t]).chunk(2)
            y = y + weights[t, j] * (layer.experts.down_proj[e] @ (F.silu(g) * u))
        rows.append(y)
    return torch.stack(rows).view_as(x)


# ---- routing and the expert paths -------------------------------------------------------------------
def test_one_expert_top1_without_shared_equals_the_dense_mlp():
    torch.manual_seed(0)
    dense = GPT(ModelConfig.from_name("nano", vocab_size=V))
    moe = GPT(ModelConfig.from_name("nano", vocab_size=V, n_experts=1, n_experts_active=1,
                                    expert_intermediate_size=dense.config.intermediate_size))
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0, 0.3)
    sd = dense.state_dict()
    for i in range(dense.config.n_layer):
        pre = f"model.layers.{i}.mlp."
        sd[pre + "experts.gate_up_proj"] = torch.cat([sd.pop(pre + "gate_proj.weight"), sd.pop(pre + "up_proj.weight")])[None]
        sd[pre + "experts.down_proj"] = sd.pop(pre + "down_proj.weight")[None]
        sd[pre + "gate.weight"] = torch.randn(1, dense.config.n_embd)
    moe.load_state_dict(sd)
    x = torch.randint(0, V, (2, 12))
    torch.testing.assert_close(moe(x), dense(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("router", ["softmax", "sigmoid_bias"])
@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_expert_paths_equal_the_per_token_reference(router, impl):
    """Forward and gradients; 'grouped' runs torch._grouped_mm (PyTorch's fallback on the CPU)."""
    layer = _moe(router=router)
    if router == "sigmoid_bias":
        layer.gate.e_score_correction_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
    layer.experts.impl = impl
    x = torch.randn(3, 7, layer.gate.weight.shape[1], requires_grad=True)
    y, ref = layer(x), _naive(layer, x)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), [x, *layer.parameters()])
    ref_grads = torch.autograd.grad((ref * g).sum(), [x, *layer.parameters()])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_grouped_gemm_equals_the_loop_in_bf16():
    layer = _moe(n_experts=8, n_experts_active=2).cuda()
    x = torch.randn(4, 64, layer.gate.weight.shape[1], device="cuda", requires_grad=True)
    outs = []
    for impl in ("auto", "loop"):
        layer.experts.impl = impl
        with torch.autocast("cuda", torch.bfloat16):
            y = layer(x)
        g = torch.autograd.grad(y.float().square().sum(), [x, layer.experts.gate_up_proj])
        outs.append((y.float(), *g))
    layer.experts.impl = "auto"                       # what the first pass ran: grouped on sm90+
    assert layer.experts.use_grouped(x.bfloat16()) == (torch.cuda.get_device_capability() >= (9, 0))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_every_token_goes_through_exactly_k_distinct_experts():
    for k in (1, 2, 3):
        layer = _moe(n_experts_active=k)
        x = torch.randn(64, layer.gate.weight.shape[1])
        _, idx, _, _ = layer.gate(x)
        assert idx.shape == (64, k) and all(len(set(r.tolist())) == k for r in idx)
        assert expert_counts(idx, 4).tolist() == torch.bincount(idx.reshape(-1), minlength=4).tolist()
        # each routed expert's output enters exactly once per (token, choice): unit weights, one-hot experts
        layer.gate.norm_topk_prob = False
        layer.gate.kind = "sigmoid_bias"
        layer.gate.register_buffer("e_score_correction_bias", torch.zeros(4))
        layer.gate.weight.data.zero_()                        # every sigmoid score 0.5
        assert torch.equal(layer.gate(x)[0], torch.full((64, k), 0.5))


# ---- router losses and the balancing bias ------------------------------------------------------------
def test_router_losses_by_hand():
    E, N = 4, 8
    uniform = torch.full((N, E), 1 / E)
    balanced = torch.arange(N * 2).remainder(E).view(N, 2)
    assert load_balance_loss(uniform, balanced).item() == pytest.approx(1.0)
    one_hot = F.one_hot(torch.zeros(N, dtype=torch.long), E).float()
    assert load_balance_loss(one_hot, torch.zeros(N, 1, dtype=torch.long)).item() == pytest.approx(E)
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    lse = torch.tensor([2.0, torch.e + torch.e ** 2]).log()
    assert router_z_loss(logits).item() == pytest.approx(lse.square().mean().item())


def test_balancing_bias_moves_toward_uniform_load():
    layer = _moe(router="sigmoid_bias", router_bias_rate=0.02, n_shared_experts=0)
    layer.train()
    C = layer.gate.weight.shape[1]
    x = torch.randn(256, C) + 0.3
    with torch.no_grad():          # a skew: experts 0 and 1 score higher for almost every token
        layer.gate.weight.copy_(0.1 * torch.randn(4, C))
        layer.gate.weight[0] += 1.0 / C ** 0.5
        layer.gate.weight[1] += 0.5 / C ** 0.5
    ratios = []
    for _ in range(80):
        layer(x[None])
        _, load = pop_router_terms([layer])
        ratios.append(load_metrics(load)["moe_load/max_over_mean"])
        update_router_bias([layer], load)
    assert ratios[0] > 1.6 and max(ratios[-10:]) < 1.25, ratios
    b = layer.gate.e_score_correction_bias
    assert b[0] < 0 < b[2] and b[1] < b[3]                      # the favoured experts pushed down
    before = b.clone()                                          # a decayed step moves by scale * rate
    update_router_bias([layer], load, scale=0.25)
    step = 0.25 * 0.02 * torch.sign(load[0].float().mean() - load[0].float())
    torch.testing.assert_close(b - before, step)
    layer.gate.weight.requires_grad_(False)                     # a frozen router (LoRA) keeps its bias
    before = b.clone()
    update_router_bias([layer], load)
    assert torch.equal(b, before)


def test_eval_and_no_grad_forwards_stash_nothing():
    layer = _moe()
    x = torch.randn(2, 5, layer.gate.weight.shape[1])
    layer.eval()
    layer(x)
    layer.train()
    with torch.no_grad():
        layer(x)
    aux, load = pop_router_terms([layer])
    assert aux is None and load.sum() == 0
    layer(x)
    aux, load = pop_router_terms([layer])
    assert aux is not None and load.sum() == 2 * 5 * 2


def test_engine_adds_the_router_loss_times_the_count_and_logs_the_stage_loss(tmp_path):
    torch.manual_seed(0)
    model = GPT(_cfg(router_aux_coef=0.5, router_z_coef=0.1))
    x = torch.randint(0, V, (3, 10))

    def step(m, batch):
        logits = m(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, V).float(), batch[:, 1:].reshape(-1), reduction="sum")
        return loss, batch[:, 1:].numel(), {}
    ref = GPT(model.config)
    ref.load_state_dict(model.state_dict())
    ref.train()
    loss, n, _ = step(ref, x)
    aux, _ = pop_router_terms([m for m in ref.modules() if isinstance(m, MoE)])
    ((loss + aux * n) / n).backward()
    eng = prepare(FunctionStage(model, step, lambda i: x, TrainOptions(out=str(tmp_path / "m.x"), device="cpu",
                                                                       dtype="float32", quiet=True, steps=1),
                                log=lambda *a: None))
    model.train()
    mean, sums, _ = eng.accumulate()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)
    assert mean.item() == pytest.approx(loss.item() / n) and sums["router_loss"].item() == pytest.approx(aux.item())


# ---- the command line: pretrain, resume, metrics, SFT ----------------------------------------------
def _train(tmp_path, *extra, steps=6, out="m.tinygpt"):
    corpus = tmp_path / "c.txt"
    corpus.write_text(BOOK)
    return main(["train", "--corpus", str(corpus), "--byte-tokenizer", "--preset", "nano", "--ctx", "32", "--batch",
                 "2", "--steps", str(steps), "--device", "cpu", "--dtype", "float32", "--quiet", "--lr", "3e-3",
                 "--out", str(tmp_path / out), "--n-experts", "4", "--n-shared-experts", "1", *extra])


def test_the_balancing_step_decays_with_the_learning_rate_after_warmup(tmp_path, monkeypatch):
    import tinygpt.train.engine as engine
    from tinygpt.train.optim import lr_at
    scales = []
    real = engine.update_router_bias
    monkeypatch.setattr(engine, "update_router_bias", lambda layers, load, scale: (scales.append(scale),
                                                                                   real(layers, load, scale)))
    assert _train(tmp_path, "--router", "sigmoid_bias", "--warmup", "2", "--lr-schedule", "cosine",
                  "--min-lr", "0") == 0
    want = [1.0, 1.0] + [lr_at(s, 6, 3e-3, 0.0, 2, "cosine") / 3e-3 for s in range(2, 6)]
    assert scales == pytest.approx(want) and want[-1] < 0.2


def test_pretrain_moe_metrics_and_report_panels(tmp_path):
    assert _train(tmp_path, "--router-aux-coef", "0.02") == 0
    model, _, _ = load_model(tmp_path / "m.tinygpt")
    c = model.config
    assert (c.n_experts, c.n_experts_active, c.n_shared_experts, c.router_aux_coef) == (4, 2, 1, 0.02)
    rows = [json.loads(x) for x in (tmp_path / "m.run" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert sum(last[f"moe_share/e{e}"] for e in range(4)) == pytest.approx(1.0)
    assert last["moe_load/max_over_mean"] >= 1.0 and last["router_loss"] > 0
    groups = metric_groups(rows)
    assert "moe_share" in groups and "moe_load" in groups and "router_loss" in groups["loss"]


def test_sigmoid_bias_resume_equals_uninterrupted_and_the_bias_is_saved(tmp_path, monkeypatch):
    import tinygpt.train.engine as engine_mod
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    args = ("--router", "sigmoid_bias", "--router-bias-rate", "0.01")
    assert _train(a, *args, steps=8) == 0
    real = engine_mod.Engine.train_step

    def interrupt_at_4(self, micro_batches=None):
        if self.step == 4:
            raise KeyboardInterrupt
        return real(self, micro_batches)
    monkeypatch.setattr(engine_mod.Engine, "train_step", interrupt_at_4)
    assert _train(b, *args, steps=8) != 0                      # interrupted: the CLI saves and exits
    monkeypatch.setattr(engine_mod.Engine, "train_step", real)
    assert _train(b, *args, "--resume", steps=8) == 0
    sa, sb = load_model(a / "m.tinygpt")[0].state_dict(), load_model(b / "m.tinygpt")[0].state_dict()
    bias = "model.layers.0.mlp.gate.e_score_correction_bias"
    assert sa[bias].abs().sum() > 0
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_bad_expert_shapes_are_refused_in_one_line(tmp_path, capsys):
    for extra, words in ((["--n-experts-active", "5"], ["n_experts_active 5 exceeds n_experts 4"]),
                         (["--mlp", "gelu"], ["experts are SwiGLU"])):
        capsys.readouterr()
        assert _train(tmp_path, *extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("tinygpt: error:") and err.count("\n") == 1 and all(w in err for w in words), err
    with pytest.raises(UserError, match="dense model"):
        ModelConfig.from_name("nano", n_shared_experts=1)


def test_a_config_without_expert_fields_is_dense():
    d = json.loads(ModelConfig.from_name("nano").to_json())
    for k in [k for k in d if "expert" in k or k.startswith(("router", "moe_")) or k == "norm_topk_prob"]:
        del d[k]
    c = ModelConfig.from_dict(d)
    assert c.n_experts == 0 and not any(isinstance(b.mlp, MoE) for b in GPT(c).model.layers)


def test_moe_every_and_active_flops():
    c = _cfg(moe_every=2, n_layer=4, n_shared_experts=0)
    m = GPT(c)
    assert [isinstance(b.mlp, MoE) for b in m.model.layers] == [False, True, False, True]
    per_expert = 3 * c.n_embd * c.expert_intermediate_size
    dense_flops = 6 * m.num_params(exclude_embeddings=True) + 12 * c.n_layer * c.n_head * c.head_dim * 16
    assert m.flops_per_token(16) == dense_flops - 6 * 2 * (c.n_experts - c.n_experts_active) * per_expert


# ---- sampling -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("router", ["softmax", "sigmoid_bias"])
def test_cached_generation_equals_recomputation(router):
    torch.manual_seed(0)
    m = GPT(_cfg(router=router))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    m.eval()
    prompts = [[5, 6, 7, 8, 9], [20, 21], [30, 31, 32]]
    g = generate(m, prompts, max_new_tokens=8, temperature=0, pad_id=0)
    for p, toks in zip(prompts, g.tokens):
        ids = list(p)
        with torch.no_grad():
            for _ in range(8):
                ids.append(int(m(torch.tensor([ids]))[0, -1, :V].argmax()))
        assert toks == ids[len(p):]


# ---- fine-tuning stages -------------------------------------------------------------------------------
def _moe_base(tmp_path, **kw):
    tok = Tokenizer.byte_level()
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name("nano", vocab_size=pad_vocab(tok.vocab_size), **{**MOE, **kw}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.05)
    save_model(tmp_path / "base.tinygpt", model, tok)
    rows = [{"messages": [{"role": "user", "content": f"Add {a} and {b}."},
                          {"role": "assistant", "content": f"{a + b}"}]} for a in range(6) for b in range(4)]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return tmp_path / "base.tinygpt", tmp_path / "chat.jsonl"


def test_sft_lora_wraps_attention_and_shared_experts_and_full_trains_the_router(tmp_path):
    base, data = _moe_base(tmp_path, router="sigmoid_bias", router_bias_rate=0.01)
    common = ["sft", str(base), "--data", str(data), "--steps", "3", "--batch", "4", "--ctx", "64", "--lr", "1e-2",
              "--device", "cpu", "--dtype", "float32", "--quiet"]
    assert main(common + ["--out", str(tmp_path / "s.lora")]) == 0
    names = set(load_tensors(tmp_path / "s.lora")[0])
    assert any(".shared_experts.down_proj." in n for n in names) and any(".self_attn.q_proj." in n for n in names)
    assert not any(".experts.gate_up" in n or ".gate." in n for n in names)
    rows = [json.loads(x) for x in (tmp_path / "s.run" / "metrics.jsonl").read_text().splitlines()]
    assert "moe_load/max_over_mean" in rows[-1]
    assert main(common + ["--full", "--out", str(tmp_path / "f.tinygpt")]) == 0
    before, after = load_model(base)[0].state_dict(), load_model(tmp_path / "f.tinygpt")[0].state_dict()
    for k in ("model.layers.0.mlp.gate.weight", "model.layers.0.mlp.gate.e_score_correction_bias",
              "model.layers.1.mlp.experts.gate_up_proj"):
        assert not torch.equal(before[k], after[k]), k


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_expert_lora_equals_per_expert_weights_and_its_gradients_the_reference(impl):
    """Expert e's adapted weight is W_e + scale * B_e A_e: the layer with an expert adapter equals
    the per-token reference on those weights (forward and the adapter's gradients, both paths);
    disable_lora gives the base; merging gives the same outputs with the adapter folded in."""
    from tinygpt.lora import apply_lora, disable_lora, lora_modules, merge_lora
    dt = torch.float64 if impl == "loop" else torch.float32     # the grouped GEMM has no float64
    layer = _moe(seed=3).to(dt)
    layer.experts.impl = impl
    x = torch.randn(2, 5, layer.gate.weight.shape[1], dtype=dt)
    base_out = layer(x).detach()
    apply_lora(layer, rank=2, alpha=6.0, targets=["experts"])
    mods = {n: m for n, m in lora_modules(layer).items()}
    assert sorted(mods) == ["experts.down_proj_lora", "experts.gate_up_proj_lora"]
    for m in mods.values():
        with torch.no_grad():
            m.lora_B["default"].normal_(0, 0.5)
    out = layer(x)
    out.square().sum().backward()
    got = {n: (m.lora_A["default"].grad.clone(), m.lora_B["default"].grad.clone()) for n, m in mods.items()}

    ref = _moe(seed=3).to(dt)                      # the same base, weights built by hand from the same factors
    factors = {n: (m.lora_A["default"].detach().clone().requires_grad_(), m.lora_B["default"].detach().clone()
                   .requires_grad_()) for n, m in mods.items()}
    for part in ("gate_up_proj", "down_proj"):
        a, b = factors[f"experts.{part}_lora"]
        w = getattr(ref.experts, part).detach() + torch.stack([b[e] @ a[e] for e in range(a.shape[0])]) * 3.0
        delattr(ref.experts, part)
        setattr(ref.experts, part, w)               # a plain tensor: the per-token reference reads it
    want = _naive(ref, x)
    want.square().sum().backward()
    def close(a, b):                            # float32: to its rounding at the tensor's scale
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.detach().abs().max()))
    close(out, want)
    for n, (ga, gb) in got.items():
        close(ga, factors[n][0].grad)
        close(gb, factors[n][1].grad)
    assert layer.experts.gate_up_proj.grad is None             # the base stays frozen
    with torch.no_grad(), disable_lora(layer):
        torch.testing.assert_close(layer(x), base_out)
    merge_lora(layer)
    with torch.no_grad():
        close(layer(x), out.detach())


def test_lora_experts_sft_writes_loadable_expert_factors_and_merges(tmp_path, capsys):
    """`sft --lora-experts` trains per-expert factors (E, r, in) / (E, out, r) beside the linear
    layers'; the adapter loads onto the base with the logits of the trained model, `merge` folds
    it in with the same logits, and the server and PEFT export refuse it in one line. A dense
    model refuses the flag."""
    from tinygpt.load import load_model_and_tokenizer
    base, data = _moe_base(tmp_path, router="sigmoid_bias")            # exports (dots1)
    common = ["sft", str(base), "--data", str(data), "--steps", "3", "--batch", "4", "--ctx", "64", "--lr", "1e-2",
              "--device", "cpu", "--dtype", "float32", "--quiet", "--lora-rank", "4"]
    assert main(common + ["--lora-experts", "--out", str(tmp_path / "e.lora")]) == 0
    tensors = load_tensors(tmp_path / "e.lora")[0]
    a, b = tensors["model.layers.0.mlp.experts.gate_up_proj_lora.lora_A"], \
        tensors["model.layers.0.mlp.experts.gate_up_proj_lora.lora_B"]
    cfg = load_model(base)[0].config
    assert a.shape == (cfg.n_experts, 4, cfg.n_embd) and b.shape == (cfg.n_experts, 2 * cfg.expert_intermediate_size, 4)
    assert b.abs().sum() > 0 and any(".self_attn.q_proj.lora_A" in n for n in tensors)
    ids = torch.tensor([list(b"Add 2 and 3.")])
    with torch.no_grad():
        plain = load_model(base)[0](ids)
        adapted = load_model_and_tokenizer(base, lora=[(str(tmp_path / "e.lora"), 1.0)])[0](ids)
        assert not torch.allclose(plain, adapted)
        assert main(["merge", str(base), "--lora", str(tmp_path / "e.lora"), "--out", str(tmp_path / "m.tinygpt")]) == 0
        merged = load_model(tmp_path / "m.tinygpt")[0]
        assert not any("_lora" in k for k in merged.state_dict())
        torch.testing.assert_close(merged(ids), adapted, rtol=1e-4, atol=1e-4)
    for bad, fix in (("one expert short", lambda t: t[1:]), ("a rank off", lambda t: t[:, :3])):
        tensors, meta = load_tensors(tmp_path / "e.lora")
        key = "model.layers.1.mlp.experts.down_proj_lora.lora_A"
        tensors[key] = fix(tensors[key]).contiguous()
        save_tensors(tmp_path / "bad.lora", tensors, meta)
        capsys.readouterr()
        assert main(["sample", str(base), "--lora", str(tmp_path / "bad.lora"), "--prompt", "Add", "--max-new-tokens",
                     "2", "--device", "cpu"]) == 2, bad
        err = capsys.readouterr().err
        assert "bad.lora" in err and err.count("\n") == 1 and "Traceback" not in err, (bad, err)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    capsys.readouterr()
    assert main(["serve", str(base), "--lora", str(tmp_path / "e.lora"), "--device", "cpu", "--port", port]) == 2
    assert "routed experts, which the server cannot apply per row" in capsys.readouterr().err
    assert main(["export", str(base), "--lora", str(tmp_path / "e.lora"), "--format", "peft",
                 "--out", str(tmp_path / "peft"), "--base-out", str(tmp_path / "hf")]) == 2
    assert "a PEFT LoRA folder cannot hold" in capsys.readouterr().err
    assert not (tmp_path / "peft").exists() and not (tmp_path / "hf").exists()
    dense = tmp_path / "dense"
    dense.mkdir()
    d_base, d_data = _moe_base(dense, n_experts=0, n_experts_active=0, n_shared_experts=0)
    assert main(["sft", str(d_base), "--data", str(d_data), "--steps", "1", "--device", "cpu", "--quiet",
                 "--lora-experts", "--out", str(dense / "x.lora")]) == 2
    assert "has no routed experts" in capsys.readouterr().err


STAGES = {
    "dpo": ["--data", "prefs.jsonl", "--steps", "2", "--batch", "4", "--full"],
    "reward": ["--data", "prefs.jsonl", "--steps", "2", "--batch", "4"],
    "grpo": ["--prompts", "qa.jsonl", "--reward-fn", "format", "--iterations", "1", "--batch", "2", "--group-size",
             "2", "--max-new-tokens", "4", "--full"],
    "ppo": ["--prompts", "qa.jsonl", "--reward-fn", "format", "--iterations", "1", "--batch", "2",
            "--max-new-tokens", "4", "--minibatch", "2", "--full"],
    "distill": ["--teacher", "base.tinygpt", "--data", "chat.jsonl", "--steps", "2", "--batch", "2", "--full"],
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_trains_the_router_with_its_balancing_loss(tmp_path, stage, monkeypatch):
    _moe_base(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}?", "chosen": f"right {i}",
                                                               "rejected": f"wrong {i}"}) + "\n" for i in range(8)))
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)})
                                               + "\n" for i in range(4)))
    assert main([stage, "base.tinygpt", *STAGES[stage], "--device", "cpu", "--quiet", "--out", "o.tinygpt"]) == 0
    row = json.loads((tmp_path / "o.run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["router_loss"] > 0 and row["moe_load/max_over_mean"] >= 1.0


def test_the_moe_benchmark_runs_end_to_end_on_the_cpu(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import moe as bench
    res = bench.main(["--device", "cpu", "--no-compile", "--steps", "4", "--eval-every", "2", "--n-layer", "1",
                      "--n-embd", "32", "--n-head", "2", "--ctx", "32", "--batch", "2", "--corpus-mb", "0.2",
                      "--sample-mb", "0.05", "--vocab", "300", "--work", str(tmp_path / "w"), "--out", str(tmp_path)])
    d, m = res["dense"], res["moe"]
    assert m["flops_per_token"] - d["flops_per_token"] == 6 * 1 * 8 * 32 and m["params"] > d["params"]   # + the router
    assert [p["step"] for p in m["points"]] == [2, 4] and (tmp_path / "moe.md").exists()
    assert len(res["compare"]["equal_tokens"]) == 2
    assert [r["seed"] for r in res["seeds"]] == [0] and res["seeds"][0]["moe_final"] == m["points"][-1]["loss"]


def test_the_moe_benchmark_reports_every_seed(tmp_path):
    """--seeds runs a pair per seed; each seed's runs start from other weights and windows."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import moe as bench
    res = bench.main(["--device", "cpu", "--no-compile", "--steps", "2", "--eval-every", "2", "--n-layer", "1",
                      "--n-embd", "32", "--n-head", "2", "--ctx", "32", "--batch", "2", "--corpus-mb", "0.2",
                      "--sample-mb", "0.05", "--vocab", "300", "--work", str(tmp_path / "w"), "--out", str(tmp_path),
                      "--seeds", "0,1"])
    rows = res["seeds"]
    assert [r["seed"] for r in rows] == [0, 1] and res["dense"]["label"] == "dense-s0"
    assert rows[0]["dense_final"] != rows[1]["dense_final"] and rows[0]["moe_final"] != rows[1]["moe_final"]
    assert "| 1 |" in (tmp_path / "moe.md").read_text()
