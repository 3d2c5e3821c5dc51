"""Float8 training matmuls (--fp8): the float8 product against hand-quantised references, which
layers convert, and training with it on the CPU (PyTorch's CPU kernel for torch._scaled_mm)."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tinygpt.checkpoint import load_model
from tinygpt.config import ModelConfig
from tinygpt.errors import UserError
from tinygpt.fp8 import E4M3, E5M2, Float8Linear, convert_to_float8, float8_linear, to_float8
from tinygpt.lora import apply_lora
from tinygpt.model import GPT
from tinygpt.stages.pretrain import PretrainOptions, PretrainStage

CPU = torch.device("cpu")


def _dequant(x, dtype):
    q, s = to_float8(x, dtype)
    return q.double() * s.double()


def test_to_float8_maps_the_largest_magnitude_to_the_formats_largest_value():
    x = torch.tensor([[0.5, -3.0], [1e-3, 2.0]])
    for dtype in (E4M3, E5M2):
        q, s = to_float8(x, dtype)
        top = torch.finfo(dtype).max
        assert q.dtype == dtype and q.float().abs().max().item() == top
        assert s.item() == pytest.approx(3.0 / top)
        assert torch.allclose(q.float() * s, x, rtol=0.13, atol=1e-3)   # e5m2 keeps 2 mantissa bits
    q, _ = to_float8(torch.zeros(4, 4), E4M3)                        # all zero: no division by zero
    assert torch.equal(q.float(), torch.zeros(4, 4))


def _float8_gpu():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not _float8_gpu(), reason="needs a float8 GPU"))]


@pytest.mark.parametrize("device", DEVICES)
def test_float8_linear_forward_and_backward_equal_the_quantised_products(device):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 32, device=device).requires_grad_()
    w = torch.randn(48, 32, device=device).requires_grad_()
    b = torch.randn(48, device=device).requires_grad_()
    y = float8_linear(x, w, b)
    ref = _dequant(x.detach().reshape(-1, 32), E4M3) @ _dequant(w.detach(), E4M3).t() + b.detach().double()
    assert y.shape == (2, 16, 48) and y.dtype == torch.float32
    tol = dict(rtol=1e-5, atol=1e-4) if device == "cpu" else dict(rtol=2e-3, atol=1e-2)   # GPU: fast accumulation
    assert torch.allclose(y.double().reshape(-1, 48), ref, **tol)
    dy = torch.randn(2, 16, 48, device=device)
    y.backward(dy)
    dy8 = _dequant(dy.reshape(-1, 48), E5M2)
    dx = dy8 @ _dequant(w.detach(), E4M3)                              # (M, N) @ (N, K)
    dw = dy8.t() @ _dequant(x.detach().reshape(-1, 32), E4M3)           # (N, M) @ (M, K)
    assert torch.allclose(x.grad.double().reshape(-1, 32), dx, **tol)
    assert torch.allclose(w.grad.double(), dw, **tol)
    assert torch.equal(b.grad, dy.sum((0, 1)))
    # and it is close to the plain product (float8 rounding only)
    assert (y - F.linear(x, w, b)).abs().max() < 0.1 * F.linear(x, w, b).abs().max()


def test_float8_linear_writes_the_autocast_dtype_and_skips_the_frozen_weights_gradient():
    x = torch.randn(32, 64, requires_grad=True)
    w = torch.randn(16, 64)                                             # frozen
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = float8_linear(x, w)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad is None


def test_shapes_float8_cannot_take_run_the_plain_linear():
    torch.manual_seed(0)
    w = torch.randn(48, 32)
    for x in (torch.randn(1, 32), torch.randn(16, 24)):                # one row (decode), width 24
        ww = w[:, : x.shape[1]]
        assert torch.equal(float8_linear(x, ww), F.linear(x, ww))


def test_conversion_covers_the_blocks_linears_only_and_keeps_the_weights():
    cfg = ModelConfig.from_name("nano", vocab_size=256, n_experts=4, n_shared_experts=1, moe_every=2)
    model = GPT(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n = convert_to_float8(model, CPU)
    f8 = sorted(k for k, m in model.named_modules() if isinstance(m, Float8Linear))
    # layer 0: q k v o + gate up down; layer 1 (MoE): q k v o + the shared expert's gate up down
    assert n == len(f8) == 14
    assert all(k.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
               for k in f8)
    assert type(model.lm_head) is nn.Linear
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_lora_wrapped_layers_stay_and_a_model_with_nothing_left_is_refused():
    model = GPT(ModelConfig.from_name("nano", vocab_size=256))
    apply_lora(model, rank=4, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    assert convert_to_float8(model, CPU) == 6                          # the MLPs of two layers
    everything = GPT(ModelConfig.from_name("nano", vocab_size=256))
    apply_lora(everything, rank=4)
    with pytest.raises(UserError, match="no plain linear"):
        convert_to_float8(everything, CPU)


def test_gpus_without_float8_tensor_cores_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "A100")
    model = GPT(ModelConfig.from_name("nano", vocab_size=256))
    with pytest.raises(UserError, match="compute capability 8.9"):
        convert_to_float8(model, torch.device("cuda"))
    assert not any(isinstance(m, Float8Linear) for m in model.modules())


def test_fused_qkv_of_float8_layers_is_one_float8_matmul_over_the_concatenated_weights():
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name("nano", vocab_size=256))
    convert_to_float8(model, CPU)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 8, 64)
    w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    q, k, v = attn._qkv(x)
    assert torch.equal(torch.cat([q, k, v], -1), float8_linear(x, w))


def _train(tmp_path, **kw):
    text = "\n\n".join(f"Story {i}. The cat number {i} sat on mat {i % 7} and looked at the moon." for i in range(60))
    (tmp_path / "c.txt").write_text(text)
    opts = PretrainOptions(corpus=[str(tmp_path / "c.txt")], out=str(tmp_path / "m.tinygpt"), preset="nano",
                           byte_tokenizer=True, ctx=32, device="cpu", steps=40, batch=4, lr=3e-3, min_lr=3e-4,
                           warmup=2, dtype="float32", quiet=True, seed=0, **kw)
    PretrainStage(opts, log=lambda *a: None).train()
    rows = [json.loads(r) for r in (tmp_path / "m.run" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows]


def test_training_in_float8_follows_the_plain_loss_curve_and_saves_a_plain_model(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    plain = _train(tmp_path / "a")
    f8 = _train(tmp_path / "b", fp8=True)
    assert f8 != plain                                                 # it did run in float8
    assert f8[-1] < 0.5 * f8[0]                                         # and learned
    late = slice(-10, None)
    assert abs(sum(f8[late]) - sum(plain[late])) / sum(plain[late]) < 0.05
    model, _, _ = load_model(tmp_path / "b" / "m.tinygpt")
    assert not any(isinstance(m, Float8Linear) for m in model.modules())


@pytest.mark.slow
def test_a_compiled_float8_step_equals_the_eager_one():
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name("nano", vocab_size=256))
    convert_to_float8(model, CPU)
    x, y = torch.randint(0, 256, (4, 32)), torch.randint(0, 256, (4, 32))
    eager = model(x, targets=y)
    eager.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(lambda a, b: model(a, targets=b))(x, y)
    compiled.backward()
    assert torch.allclose(compiled, eager, rtol=1e-5)
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-5)
