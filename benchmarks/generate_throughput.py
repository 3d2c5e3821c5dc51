"""New tokens/s of tinygpt's batched generation vs Hugging Face `transformers` `generate`, on the
SAME GPT-2-shaped weights (random, built as a GPT2LMHeadModel and mapped into our GPT).

Greedy, ignore-EOS (every row produces exactly --new-tokens), bf16 on GPU. Medians of --repeats runs
after one warm-up run each (ours: the warm-up also captures the CUDA graph, which later calls reuse).

    PYTHONPATH=. python3 benchmarks/generate_throughput.py                      # GPU, gpt2 shape
    PYTHONPATH=. python3 benchmarks/generate_throughput.py --device cpu --layers 2 --embd 64 --heads 2 \
        --vocab 512 --new-tokens 8 --batches 1,4 --dtype float32                # CPU smoke run
    PYTHONPATH=. python3 benchmarks/generate_throughput.py --profile --no-hf    # + a decode step's kernels
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tinygpt.config import ModelConfig
from tinygpt.generate import generate
from tinygpt.model import GPT


def hf_to_ours(hf, cfg: ModelConfig) -> GPT:
    """Copy GPT2LMHeadModel weights into our GPT. HF GPT-2 uses Conv1D (weight (in, out), so ours
    is its transpose) and a fused c_attn holding q, k and v side by side."""
    sd = hf.state_dict()
    C = cfg.n_embd
    ours = {"model.embed_tokens.weight": sd["transformer.wte.weight"],
            "model.embed_positions.weight": sd["transformer.wpe.weight"],
            "model.norm.weight": sd["transformer.ln_f.weight"], "model.norm.bias": sd["transformer.ln_f.bias"]}
    for i in range(cfg.n_layer):
        h, o = f"transformer.h.{i}.", f"model.layers.{i}."
        w, b = sd[h + "attn.c_attn.weight"], sd[h + "attn.c_attn.bias"]             # (C, 3C), (3C,)
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            ours[o + f"self_attn.{name}.weight"] = w[:, j * C:(j + 1) * C].t()
            ours[o + f"self_attn.{name}.bias"] = b[j * C:(j + 1) * C]
        pairs = {"attn.c_proj": "self_attn.o_proj", "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}
        for src, dst in pairs.items():
            ours[o + dst + ".weight"] = sd[h + src + ".weight"].t()
            ours[o + dst + ".bias"] = sd[h + src + ".bias"]
        for src, dst in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm")):
            ours[o + dst + ".weight"], ours[o + dst + ".bias"] = sd[h + src + ".weight"], sd[h + src + ".bias"]
    model = GPT(cfg)
    missing, unexpected = model.load_state_dict({k: v.contiguous() for k, v in ours.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model


def timed(fn, repeats: int, device) -> tuple[float, object]:
    out = fn()                                      # warm-up (and graph capture for ours)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def profile_step(model, B: int, total: int, device, dtype, steps: int = 10) -> dict:
    """Where one decode step's time goes: `steps` eager steps (no CUDA graph, so each kernel is
    seen) of a B-row batch over `total` cached positions under torch.profiler. Prints the ops
    by device time; returns kernels and kernel time per step (device time: CUDA, else CPU)."""
    from torch.profiler import ProfilerActivity, profile

    from tinygpt.generate import _DecodeState
    state = _DecodeState(model, B, total, None, device, dtype)
    cuda = device.type == "cuda"
    with torch.no_grad():
        for _ in range(3):                    # warm-up: lazy kernel selection, allocator pools
            state.step()
        if cuda:
            torch.cuda.synchronize()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            for _ in range(steps):
                state.step()
            if cuda:
                torch.cuda.synchronize()
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    events = [e for e in prof.events() if e.device_type == kind and (cuda or not e.cpu_children)]
    per_step = {"profile_kernels_per_step": len(events) / steps,
                "profile_kernel_us_per_step": sum(e.device_time if cuda else e.self_cpu_time_total
                                                  for e in events) / steps}
    print(f"batch {B}: {per_step['profile_kernels_per_step']:.0f} kernels a step, "
          f"{per_step['profile_kernel_us_per_step']:.0f} us of kernel time a step")
    print(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "self_cpu_time_total", row_limit=12,
                                    max_name_column_width=60))
    return per_step


def generation_args(ap: argparse.ArgumentParser) -> None:
    """The model shape (GPT-2 124M by default), prompt and reply lengths, repeats, dtype, device."""
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--embd", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def main():
    ap = argparse.ArgumentParser()
    generation_args(ap)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--no-hf", action="store_true", help="time only tinygpt")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one eager decode step per batch: kernels, their time, the top ops")
    a = ap.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    torch.manual_seed(0)
    ctx = a.prompt_len + a.new_tokens
    hf_cfg = GPT2Config(vocab_size=a.vocab, n_positions=max(1024, ctx), n_embd=a.embd, n_layer=a.layers,
                        n_head=a.heads, activation_function="gelu_new")
    hf = GPT2LMHeadModel(hf_cfg).eval()
    cfg = ModelConfig.from_name("gpt2", vocab_size=a.vocab, n_layer=a.layers, n_embd=a.embd, n_head=a.heads,
                                block_size=max(1024, ctx))
    ours = hf_to_ours(hf, cfg).eval()
    x = torch.randint(0, a.vocab, (2, 12))
    with torch.no_grad():   # the name map is right: same logits in float32
        diff = (ours(x) - hf(x).logits).abs().max().item()
    assert diff < 1e-3, f"weight map is wrong: logits differ by {diff}"
    hf.to(device, dtype)
    ours.to(device, dtype)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    rows = []
    for B in [int(b) for b in a.batches.split(",")]:
        prompts = torch.randint(0, a.vocab, (B, a.prompt_len), generator=torch.Generator().manual_seed(B))
        t_ours, g = timed(lambda: generate(ours, prompts.tolist(), a.new_tokens, temperature=0), a.repeats, device)
        assert all(len(t) == a.new_tokens for t in g.tokens)
        row = {"batch": B, "ours_tok_s": B * a.new_tokens / t_ours, "ours_s": t_ours}
        if not a.no_hf:
            ids = prompts.to(device)

            def hf_gen():
                with torch.no_grad():
                    return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new_tokens,
                                       min_new_tokens=a.new_tokens, do_sample=False)
            t_hf, out = timed(hf_gen, a.repeats, device)
            ref = out[:, a.prompt_len:].tolist()
            same = [next((i for i, (u, v) in enumerate(zip(r, t)) if u != v), len(t)) for r, t in zip(ref, g.tokens)]
            row.update(hf_tok_s=B * a.new_tokens / t_hf, hf_s=t_hf, speedup=t_hf / t_ours,
                       agree_prefix_median=statistics.median(same))
        if a.profile:
            row.update(profile_step(ours, B, a.prompt_len + a.new_tokens, device, dtype))
        rows.append(row)
    print(f"{'batch':>6} {'tinygpt tok/s':>14} {'HF tok/s':>12} {'speedup':>8} {'greedy agreement (tokens)':>26}")
    for r in rows:
        print(f"{r['batch']:>6} {r['ours_tok_s']:>14,.0f} {r.get('hf_tok_s', float('nan')):>12,.0f} "
              f"{r.get('speedup', float('nan')):>8.2f} {r.get('agree_prefix_median', float('nan')):>26}")
    print(json.dumps({"bench": "generate_throughput", "device": torch.cuda.get_device_name() if device.type == "cuda"
                      else "cpu", "dtype": a.dtype, "layers": a.layers, "embd": a.embd, "new_tokens": a.new_tokens,
                      "prompt_len": a.prompt_len, "max_logit_diff_fp32": diff, "rows": rows}))


if __name__ == "__main__":
    main()
