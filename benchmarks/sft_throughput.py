"""SFT throughput: real (non-pad) tokens per second and peak GPU memory for a GPT-2-shaped model.

Runs the same `SFTTrainer` the CLI uses (packing + FlexAttention block mask, torch.compile, bf16)
on Alpaca-GPT4 rows rendered with ChatML, for several configurations:
  lora_packed, lora_unpacked, full_packed      -> tokens/s (the headline numbers)
  lora_packed_gc, full_packed_gc               -> peak memory with --grad-checkpointing
Tokens/s counts real tokens only (packing tails and padding excluded), over the timed steps after
`--warmup-steps` (which absorb compilation). The tokenizer is a byte-level BPE trained on the
data (`--vocab-size`, default 32768); the model's vocabulary is GPT-2's padded 50304 either way,
so the output layer costs what GPT-2's does.

GPU:  PYTHONPATH=. python3 benchmarks/sft_throughput.py --data ../shared/data/sft/alpaca_gpt4_demo.json
CPU:  PYTHONPATH=. python3 benchmarks/sft_throughput.py --preset nano --ctx 128 --batch 4 --steps 2 \
          --warmup-steps 1 --no-compile --device cpu --vocab-size 1024 --configs lora_packed,lora_unpacked
The last line printed is a JSON summary.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinygpt.chat import get_template  # noqa: E402
from tinygpt.config import ModelConfig  # noqa: E402
from tinygpt.data.formats import load_sft  # noqa: E402
from tinygpt.model import GPT  # noqa: E402
from tinygpt.stages.sft import SFTOptions, SFTTrainer  # noqa: E402
from tinygpt.tokenizer import Tokenizer  # noqa: E402

CONFIGS = {  # name -> (full, packing, grad_checkpointing)
    "lora_packed": (False, True, False),
    "lora_unpacked": (False, False, False),
    "full_packed": (True, True, False),
    "lora_packed_gc": (False, True, True),
    "full_packed_gc": (True, True, True),
}
H100_BF16_PEAK = 989e12


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = Path(__file__).resolve().parents[1]
    p.add_argument("--data", default=str(here.parent / "shared" / "data" / "sft" / "alpaca_gpt4_demo.json"))
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--model-vocab", type=int, default=50304)
    p.add_argument("--vocab-size", type=int, default=32768, help="BPE trained on the data")
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup-steps", type=int, default=8, help="untimed steps first (compilation)")
    p.add_argument("--mem-steps", type=int, default=4, help="steps for the *_gc memory-only configs")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--loss-chunk", type=int, default=0, help="SFT --loss-chunk (0: the whole head at once)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    return p.parse_args()


def run_config(name, a, tok_json, convs, out_dir):
    full, packing, ckpt = CONFIGS[name]
    tok = Tokenizer.from_json(*tok_json)
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name(a.preset, vocab_size=a.model_vocab, block_size=max(a.ctx, 128)))
    timed = a.mem_steps if name.endswith("_gc") else a.steps
    out = out_dir / (f"{name}.tinygpt" if full else f"{name}.lora")
    opts = SFTOptions(out=str(out), template="chatml", ctx=a.ctx, packing=packing, full=full, lora_rank=a.lora_rank,
                      lora_alpha=2.0 * a.lora_rank, grad_checkpointing=ckpt, device=a.device,
                      steps=a.warmup_steps + timed, batch=a.batch, compile=not a.no_compile, dtype=a.dtype,
                      quiet=True, warmup=0, loss_chunk=a.loss_chunk)
    logs = []
    if torch.cuda.is_available():      # free the previous configuration before measuring this one
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        res_start = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    trainer = SFTTrainer(opts, model, tok, convs, log=logs.append)
    trainer.train()
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out.parent / (out.stem + ".run") / "metrics.jsonl").read_text().splitlines()]
    timed_rows = rows[a.warmup_steps:]
    toks = [r["tokens"] for r in timed_rows]                    # real tokens of each timed step
    secs = [t / max(r["tokens_per_s"], 1e-9) for t, r in zip(toks, timed_rows)]
    res = {"config": name, "tokens_per_s": sum(toks) / max(sum(secs), 1e-9),
           "median_step_tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed_rows),
           "real_tokens_per_step": statistics.mean(toks), "final_loss": rows[-1]["loss"],
           "trainable_share": getattr(trainer, "trainable_share", 1.0), "wall_s": wall,
           "steps": len(rows)}
    if torch.cuda.is_available():
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        res["allocated_at_start_gib"] = res_start / 2**30     # should be ~0: nothing left from before
        flops = model.flops_per_token(a.ctx)
        res["mfu_6N"] = res["tokens_per_s"] * flops / H100_BF16_PEAK
    res["log"] = [m for m in logs if m.startswith(("SFT data", "LoRA", "full"))]
    del trainer, model
    gc.collect()
    return res


def main():
    a = parse()
    names = [c.strip() for c in a.configs.split(",") if c.strip()]
    unknown = set(names) - set(CONFIGS)
    if unknown:
        sys.exit(f"unknown configs {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    convs, _ = load_sft(a.data)
    tmpl = get_template("chatml")
    t0 = time.perf_counter()
    texts = ["".join(s.text for s in tmpl.render(c)) for c in convs]
    tok = Tokenizer.train(texts, a.vocab_size)
    tok_s = time.perf_counter() - t0
    print(f"data: {len(convs)} conversations from {a.data}; BPE tokenizer trained on them: "
          f"{tok.vocab_size} tokens ({tok_s:.1f}s); model vocab {a.model_vocab}", flush=True)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device: {dev}, torch {torch.__version__}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            r = run_config(name, a, (tok.to_json(), tok.config_json()), convs, Path(tmp))
            results.append(r)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
    print("\n| config | tokens/s (real) | peak GiB | trainable |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['config']} | {r['tokens_per_s']:,.0f} | {r.get('peak_mem_gib', float('nan')):.2f} | "
              f"{100 * r['trainable_share']:.2f}% |")
    by = {r["config"]: r for r in results}
    summary = {"bench": "sft_throughput", "device": dev, "torch": torch.__version__, "preset": a.preset,
               "ctx": a.ctx, "batch": a.batch, "compile": not a.no_compile, "loss_chunk": a.loss_chunk,
               "template": "chatml",
               "tokenizer": f"BPE {tok.vocab_size} trained on the data", "model_vocab": a.model_vocab,
               "timed_steps": a.steps,
               "tokens_per_s": {k: round(v["tokens_per_s"]) for k, v in by.items()},
               "peak_mem_gib": {k: round(v["peak_mem_gib"], 2) for k, v in by.items() if "peak_mem_gib" in v},
               "target_packed_tokens_per_s": 155000}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
