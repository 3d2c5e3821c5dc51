import copy

import pytest
import torch

from tinygpt.config import ModelConfig
from tinygpt.losses import token_cross_entropy
from tinygpt.model import GPT, KVCache, attend, packed_mask

VARIANTS = {
    "modern": dict(),
    "gpt2": dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True, qk_norm=False),
    "llama_gqa": dict(mlp="swiglu", qk_norm=False, n_kv_head=1, n_head=4, n_embd=64),
    "qwen2": dict(mlp="swiglu", qk_norm=False, qkv_bias=True, n_kv_head=1),
}


def _model(**over):
    torch.manual_seed(0)
    m = GPT(ModelConfig.from_name("nano", vocab_size=97, **over))
    with torch.no_grad():  # non-trivial weights everywhere (zero-init projections would hide bugs)
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m.eval()


def test_presets_have_the_documented_shapes():
    shapes = {"tiny": (4, 128), "huge": (12, 256), "mega": (24, 512), "behemoth": (32, 1024),
              "titan": (48, 1536), "gpt2": (12, 768)}
    for name, (layers, width) in shapes.items():
        c = ModelConfig.from_name(name)
        assert (c.n_layer, c.n_embd) == (layers, width)
    assert ModelConfig.from_name("huge").block_size == 256
    g = ModelConfig.from_name("gpt2", vocab_size=50257)
    assert g.n_head == 12 and g.block_size == 1024
    # GPT-2 small has 124,439,808 parameters with its 50257-token vocabulary
    with torch.device("meta"):
        assert GPT(g).num_params() == 124_439_808
    d = ModelConfig.from_depth(12)
    assert (d.n_layer, d.n_embd, d.n_head) == (12, 768, 6)


def test_kv_cache_decoding_equals_full_recompute():
    for name, over in VARIANTS.items():
        m = _model(**over)
        x = torch.randint(0, 97, (2, 24))
        full = m(x)
        L = 32
        cache = KVCache(m.config, 2, L)
        keys = torch.arange(L)
        slots = torch.arange(10)
        mask = (keys[None, :] <= slots[:, None])[None, None].expand(2, 1, 10, L)
        outs = [m(x[:, :10], mask=mask, cache=cache, slots=slots)]
        for t in range(10, 24):
            s = torch.tensor([t])
            outs.append(m(x[:, t:t + 1], mask=(keys <= t).view(1, 1, 1, L).expand(2, 1, 1, L), cache=cache, slots=s))
        torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5, msg=name)


def test_packed_rows_equal_separate_sequences():
    m = _model()
    a, b = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 5))
    row = torch.cat([a, b], 1)
    doc = torch.tensor([[0] * 7 + [1] * 5])
    pos = torch.tensor([list(range(7)) + list(range(5))])
    out = m(row, pos=pos, mask=packed_mask(doc))
    torch.testing.assert_close(out[:, :7], m(a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 7:], m(b), atol=1e-5, rtol=1e-5)


def test_tied_embeddings_share_storage_and_flops_formula():
    m = _model(**VARIANTS["gpt2"])
    assert m.lm_head.weight is m.model.embed_tokens.weight
    c = m.config
    n = m.num_params(exclude_embeddings=True)
    assert n == m.num_params() - c.block_size * c.n_embd          # only positions excluded when tied
    assert m.flops_per_token(64) == 6 * n + 12 * c.n_layer * c.n_head * c.head_dim * 64


def test_hf_llama_parameter_names():
    names = set(_model(**VARIANTS["qwen2"]).state_dict())
    for k in ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
              "model.layers.0.self_attn.q_proj.bias", "model.layers.1.mlp.gate_proj.weight",
              "model.layers.1.post_attention_layernorm.weight", "model.norm.weight", "lm_head.weight"]:
        assert k in names


def test_resize_embeddings_uses_mean_rows():
    m = _model()
    old = m.model.embed_tokens.weight.detach().clone()
    m.resize_token_embeddings(100)
    new = m.model.embed_tokens.weight
    assert new.shape[0] == 100 and m.lm_head.weight.shape[0] == 100
    torch.testing.assert_close(new[:97], old)
    torch.testing.assert_close(new[97], old.mean(0))


def test_forward_with_targets_is_the_summed_cross_entropy_and_compiled_regions_match_eager():
    """model(x, targets=y) equals token_cross_entropy of its logits (ignored targets skipped), and
    after compile_regions (each block and the head with its loss compiled) the loss and every
    gradient equal the eager ones."""
    torch.manual_seed(0)
    m = GPT(ModelConfig.from_name("nano", vocab_size=64, block_size=32))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))                 # o_proj/down_proj start at zero
    x = torch.randint(0, 64, (2, 16))
    y = torch.randint(0, 64, (2, 16))
    y[0, :5] = -100
    assert torch.allclose(m(x, targets=y), token_cross_entropy(m(x), y, reduction="sum"))
    eager = copy.deepcopy(m)
    m.compile_regions()
    assert all(b._compiled_call_impl is not None for b in m.model.layers)
    for model in (eager, m):
        model(x, targets=y).backward()
    assert torch.allclose(m(x, targets=y), eager(x, targets=y), atol=1e-5)
    for (name, p), q in zip(m.named_parameters(), eager.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name


@pytest.mark.parametrize("tied,rows", [(True, False), (False, False), (False, True)])
def test_chunked_head_loss_equals_the_whole_head(tied, rows):
    """loss_chunk > 0 (chunks that do and do not divide the positions) gives the loss and every
    gradient of the whole-head loss: tied and untied heads, and a LoRA model whose head trains a
    few token rows (TokenRows) with the base frozen; and with no gradient asked, the same loss."""
    from tinygpt.lora import apply_lora, train_token_rows
    torch.manual_seed(0)
    m = GPT(ModelConfig.from_name("nano", vocab_size=64, block_size=32, tie_embeddings=tied)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    if rows:
        apply_lora(m, rank=2, alpha=4)
        train_token_rows(m, [3, 60])
    x = torch.randint(0, 64, (2, 16))
    y = torch.randint(0, 64, (2, 16))
    y[0, :5] = -100
    y[1, 3] = 60
    runs = []
    for chunk in (0, 7, 32, 100):
        model = copy.deepcopy(m)
        model.loss_chunk = chunk
        loss = model(x, targets=y)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert grads and all(g is not None for g in grads.values())
        runs.append((loss.detach(), grads))
    with torch.no_grad():                           # no gradient asked: the same loss, none formed
        m.loss_chunk = 7
        torch.testing.assert_close(m(x, targets=y), runs[0][0])
    for loss, grads in runs[1:]:   # the cross-entropy runs in float32 on both paths: its rounding
        torch.testing.assert_close(loss, runs[0][0])
        for n, g in grads.items():
            torch.testing.assert_close(g, runs[0][1][n], rtol=1e-5, atol=1e-6, msg=n)


def _masked_case(kv_heads):
    g = torch.Generator().manual_seed(kv_heads)
    q = torch.randn(3, 4, 5, 16, generator=g)
    k, v = torch.randn(3, kv_heads, 9, 16, generator=g), torch.randn(3, kv_heads, 9, 16, generator=g)
    mask = torch.rand(3, 1, 5, 9, generator=g) < 0.7
    mask[..., 0] = True                                     # every query sees at least one key
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                                           enable_gqa=kv_heads != 4)
    return q, k, v, mask, ref


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_masked_attention_without_cudnn_expands_grouped_heads_as_enable_gqa_does(kv_heads):
    from tinygpt.model import masked_attention_without_cudnn
    q, k, v, mask, ref = _masked_case(kv_heads)
    torch.testing.assert_close(masked_attention_without_cudnn(q.double(), k.double(), v.double(), mask), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernel choice")
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_cuda_masked_attention_of_several_queries_equals_the_float64_reference(kv_heads):
    """Masked attention over several query positions leaves cuDNN out on CUDA and expands grouped
    kv heads itself: it still equals the reference (float64 on the CPU, enable_gqa), for padded
    rows and for a prefill into a longer cache."""
    q, k, v, mask, ref = _masked_case(kv_heads)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        out = attend(*(t.to("cuda", dtype) for t in (q, k, v)), mask.cuda())
        torch.testing.assert_close(out.double().cpu(), ref, atol=tol, rtol=tol)


def _perturbed_nano(vocab: int, block: int) -> GPT:
    """A nano model (made on the CPU: the same on every machine) with every weight moved off its
    init, so no block is the identity and no path is zero."""
    torch.manual_seed(0)
    m = GPT(ModelConfig.from_name("nano", vocab_size=vocab, block_size=block))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _perturbed_nano_and_batch():
    """`_perturbed_nano` and a batch whose first targets are not scored."""
    m = _perturbed_nano(1000, 64)
    x, y = torch.randint(0, 1000, (4, 64)), torch.randint(0, 1000, (4, 64))
    y[:, :9] = -100
    return m, x, y


def _step(m, x, y, device, dtype=torch.float32, chunk=0, compiled=False):
    """(summed loss, {name: gradient as float64 on the CPU}) of one training step of a copy of m
    on `device` in `dtype`."""
    model = copy.deepcopy(m).to(device, dtype)
    model.loss_chunk = chunk
    step = (lambda a, b: model(a, targets=b))
    step = torch.compile(step) if compiled else step
    loss = step(x.to(device), y.to(device))
    loss.backward()
    torch._dynamo.reset()
    return loss.item(), {n: None if p.grad is None else p.grad.detach().cpu().double()
                         for n, p in model.named_parameters()}


def _assert_grads_close(got: dict, ref: dict, rtol: float, atol: float) -> None:
    """Every parameter's gradient close to the reference; the message names EVERY parameter that
    has none or differs (with its largest error and both norms), not just the first."""
    bad = []
    for n, g in ref.items():
        if got[n] is None:
            bad.append(f"{n}: no gradient")
        elif not torch.allclose(got[n], g, rtol=rtol, atol=atol):
            bad.append(f"{n}: max error {(got[n] - g).abs().max():.3g}, norm {got[n].norm():.4g} vs {g.norm():.4g}")
    assert not bad, "; ".join(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled CUDA path")
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_chunked_head_equals_the_whole_head(compiled):
    """On CUDA each chunk's softmax and gradient are a compiled function of their own; a step with
    loss_chunk gives the loss and gradients of the whole-head step, eager and inside a compiled step."""
    m, x, y = _perturbed_nano_and_batch()
    whole, chunked = (_step(m, x, y, "cuda", chunk=c, compiled=compiled) for c in (0, 48))
    assert chunked[0] == pytest.approx(whole[0], rel=1e-5)
    assert all(g is not None and g.abs().max() > 0 for g in chunked[1].values())
    _assert_grads_close(chunked[1], whole[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device,compiled", [
    ("cpu", False),
    pytest.param("cuda", False, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")),
    pytest.param("cuda", True, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA"))])
def test_training_step_equals_the_float64_reference(device, compiled):
    """A float32 training step (on CUDA eager, and compiled whole) gives the loss and gradients of
    the same step in float64 on the CPU (TF32 off: float32 accuracy is what is checked)."""
    m, x, y = _perturbed_nano_and_batch()
    ref = _step(m, x, y, "cpu", torch.float64)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        got = _step(m, x, y, device, compiled=compiled)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    _assert_grads_close(got[1], ref[1], rtol=1e-3, atol=1e-5)
    assert got[0] == pytest.approx(ref[0], rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_compiled_causal_attention_equals_eager(dtype):
    """The training path's attention (q/k/v as head-transposed views, causal) compiled equals eager,
    forward and gradients: on CUDA it runs the memory-efficient kernel in float32, flash or cuDNN
    in bfloat16, each with its own compiled lowering."""
    torch.manual_seed(0)
    x0 = torch.randn(4, 64, 3 * 64, device="cuda", dtype=dtype)                  # (B, T, q|k|v), 2 heads x 32
    w = torch.linspace(-1, 1, 32, device="cuda", dtype=dtype)

    def f(x):
        q, k, v = (t.view(4, 64, 2, 32).transpose(1, 2) for t in x.split([64, 64, 64], dim=-1))
        return attend(q, k, v, None)                                             # (B, H, T, hd)
    runs = []
    for fn in (f, torch.compile(f)):
        x = x0.clone().requires_grad_(True)
        out = fn(x)
        (out * w).sum().backward()
        runs.append((out.detach().float(), x.grad.float()))
    torch._dynamo.reset()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, **tol)


@pytest.mark.parametrize("device,compiled", [("cpu", False)] + [
    pytest.param("cuda", c, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")) for c in (False, True)])
def test_qk_norm_of_a_projection_view_equals_it_on_a_contiguous_copy(device, compiled):
    """q/k come out of the fused projection as views (a split of the last dimension, then heads):
    not contiguous. Their RMSNorm (forward, and gradients for the projection output and the
    weight), eager or compiled, equals the eager norm of a contiguous copy; CUDA has a fused
    kernel for it, and the compiled step its own lowering."""
    torch.manual_seed(0)
    norm = torch.nn.RMSNorm(32, eps=1e-5).to(device)
    with torch.no_grad():
        norm.weight.add_(0.3 * torch.randn_like(norm.weight))
    x0, runs = 2.0 * torch.randn(4, 8, 192, device=device), []       # (B, T, q|k|v) of 2 heads x 32

    def f(x, contiguous):
        q = x.split([64, 64, 64], dim=-1)[0].view(4, 8, 2, 32)                # (B, T, H, hd), a view
        return norm(q.contiguous() if contiguous else q)
    for contiguous, fn in ((False, torch.compile(f) if compiled else f), (True, f)):
        x = x0.clone().requires_grad_(True)
        out = fn(x, contiguous)
        (out * torch.linspace(-1, 1, 32, device=device)).sum().backward()
        assert norm.weight.grad is not None
        runs.append((out.detach(), x.grad, norm.weight.grad.clone()))
        norm.weight.grad = None
    torch._dynamo.reset()
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_training_blocks_equal_the_eager_ones():
    m = _perturbed_nano(64, 32)
    c = copy.deepcopy(m)
    c.compile_training_blocks()
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    for model in (m, c):
        model(x, targets=y).backward()
    for (n, p), q in zip(m.named_parameters(), c.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(c.eval()(x), m.eval()(x))
