"""Interop and int8: parity with transformers, conversion times, int8 memory and decode speed.

Builds a random Hugging Face Llama of a published shape (default SmolLM2-135M: 30 x 576, 9 heads,
3 KV heads, tied 49152 vocabulary) in a temp folder (no download), then measures:
  parity      max |logits| difference, our import vs transformers, fp32 and bf16, same inputs
  convert     seconds for import (HF folder -> GPT), export hf, export gguf (f16, q8_0) + sizes
  decode      greedy tokens/s of our `generate` (batch --batch, --new-tokens), bf16 vs int8
              weight-only, plus weight bytes resident on the GPU; medians of --repeats runs
int8 dequantizes on the fly (int8 -> bf16 per matmul), so it saves memory, not time: expect it to
decode slower than bf16 on a GPU, whose bf16 matmuls are already memory-bound at batch 1.

GPU:  PYTHONPATH=. python3 benchmarks/interop_int8.py
CPU:  PYTHONPATH=. python3 benchmarks/interop_int8.py --layers 2 --hidden 64 --heads 4 --kv-heads 2 \
          --inter 128 --vocab 512 --new-tokens 8 --repeats 1 --device cpu
The last line printed is a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinygpt.generate import generate  # noqa: E402
from tinygpt.interop.gguf import export_gguf  # noqa: E402
from tinygpt.interop.hf import export_hf, load_hf  # noqa: E402
from tinygpt.quantize import quantize_model  # noqa: E402
from tinygpt.tokenizer import Tokenizer  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def build_hf(folder: Path, a) -> None:
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.inter,
                                   num_hidden_layers=a.layers, num_attention_heads=a.heads,
                                   num_key_value_heads=a.kv_heads, max_position_embeddings=2048,
                                   rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    Tokenizer.byte_level().save(folder / "tokenizer.json")


def parity(folder: Path, model, device, x) -> dict:
    import transformers
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        model.to(dtype)
        with torch.no_grad():
            out[f"max_abs_diff_{name}"] = (ref(x).logits.float() - model(x).float()).abs().max().item()
        del ref
    return out


def decode_speed(model, prompts, a, device) -> float:
    times = []
    for _ in range(a.repeats + 1):   # the first run warms up kernels and allocator
        _, dt = timed(lambda: generate(model, prompts, a.new_tokens, temperature=0.0), device)
        times.append(dt)
    return len(prompts) * a.new_tokens / statistics.median(times[1:] or times)


def resident_bytes(model) -> int:
    seen = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in seen.values())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--inter", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    device = torch.device(a.device)
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "shape": f"{a.layers}x{a.hidden}, heads {a.heads}/{a.kv_heads}, vocab {a.vocab}"}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        build_hf(d / "hf", a)
        (model, tok), res["import_s"] = timed(lambda: load_hf(d / "hf"), device)
        model.to(device).eval()
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, a.vocab, (2, 128), generator=g).to(device)
        res.update(parity(d / "hf", model, device, x))
        model.float()
        res["export_hf_s"] = timed(lambda: export_hf(model, tok, d / "out_hf"), device)[1]
        try:
            import gguf  # noqa: F401  (a tinygpt dependency; an image without it skips this part)
            gguf_types = ("f16", "q8_0")
        except ImportError:
            gguf_types, res["gguf"] = (), "gguf package not installed"
        for dt in gguf_types:
            info, res[f"export_gguf_{dt}_s"] = timed(lambda: export_gguf(model, tok, d / f"m_{dt}.gguf", dt), device)
            res[f"gguf_{dt}_mib"] = round(info["bytes"] / 2**20, 2)
    prompts = torch.randint(0, tok.vocab_size, (a.batch, a.prompt_len), generator=g).tolist()
    model.to(torch.bfloat16)
    res["bf16_weight_mib"] = round(resident_bytes(model) / 2**20, 1)
    res["bf16_decode_tok_s"] = round(decode_speed(model, prompts, a, device), 1)
    model.float()
    quantize_model(model)
    model.to(torch.bfloat16)
    res["int8_weight_mib"] = round(resident_bytes(model) / 2**20, 1)
    res["int8_decode_tok_s"] = round(decode_speed(model, prompts, a, device), 1)
    for k, v in res.items():
        print(f"{k:24s} {v}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
