"""DPO training throughput: pairs/s, real tokens/s and peak GPU memory, LoRA on a GPT-2-shaped model.

Reads UltraFeedback pairs (../shared/data/preference/ultrafeedback_1k.jsonl by default), trains a
byte-level BPE of GPT-2's vocabulary size on them (so token counts are GPT-2-like), renders
with chatml, truncates to --max-length, and times optimizer steps of `DPOTrainer` after warmup:
  live:       reference = the same model with the new adapter switched off (a second no-grad pass)
  precompute: reference log-probs computed once beforehand and cached (`--precompute-ref`)
Peak memory is torch.cuda.max_memory_allocated over the whole run of a mode (weights included).
Peer figure (TRL DPO, same shape/data/length on one H100): 31 pairs/s (41 with precomputed
reference), peak 2.9 GiB. The last line printed is a one-line JSON summary.

  PYTHONPATH=. python3 benchmarks/dpo_throughput.py                      # GPU defaults
  PYTHONPATH=. python3 benchmarks/dpo_throughput.py --device cpu --preset nano --max-length 256 \\
      --max-prompt-length 128 --pairs 64 --steps 2 --warmup 1 --pack-rows 2 --vocab 2048   # CPU check
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinygpt.chat import get_template  # noqa: E402
from tinygpt.config import ModelConfig, pad_vocab  # noqa: E402
from tinygpt.data.formats import load_preferences  # noqa: E402
from tinygpt.stages.preference import DPOOptions, DPOTrainer  # noqa: E402
from tinygpt.model import GPT  # noqa: E402
from tinygpt.data.pairs import tokenize_pairs  # noqa: E402
from tinygpt.tokenizer import Tokenizer  # noqa: E402
from tinygpt.train.engine import prepare  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "preference" / "ultrafeedback_1k.jsonl"


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--vocab", type=int, default=50257, help="BPE vocabulary trained on the data")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--max-prompt-length", type=int, default=512)
    p.add_argument("--pairs", type=int, default=0, help="use the first N pairs (0 = all)")
    p.add_argument("--batch", type=int, default=8, help="pairs per micro-batch (without --pack-rows)")
    p.add_argument("--pack-rows", type=int, default=8, help="rows of --max-length per micro-batch (0 = --batch pairs)")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--base-bf16", action="store_true", help="store the frozen base weights in bf16")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--modes", default="live,precompute")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of 3 steps after the timed ones")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args()


def run_mode(mode, base, tok, items, a, device) -> dict:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = copy.deepcopy(base)
    if a.base_bf16:
        model.to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        opts = DPOOptions(out=str(Path(tmp) / "bench.lora"), lora_rank=a.lora_rank, lora_alpha=2 * a.lora_rank,
                          precompute_ref=(mode == "precompute"), pack_rows=a.pack_rows, max_length=a.max_length,
                          max_prompt_length=a.max_prompt_length, grad_checkpointing=a.grad_checkpointing,
                          steps=a.warmup + a.steps, batch=a.batch, lr=5e-6, dtype=a.dtype, compile=a.compile,
                          quiet=True, device=str(device))
        t0 = time.perf_counter()
        tr = DPOTrainer(opts, model, tok, items=items, log=lambda *m: None)
        eng = prepare(tr)
        setup_s = time.perf_counter() - t0
        eng.model.train()
        pairs, tokens, times = 0, 0, []
        for step in range(a.warmup + a.steps):
            ids = [len(tr.batches.ids(step * opts.accum + k)) for k in range(opts.accum)]
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            m = eng.train_step()
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t
            loss = m["loss"]
            if step >= a.warmup:
                times.append(dt)
                pairs += sum(ids)
                tokens += int(m["tokens"] * opts.accum)
        total = sum(times)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        if a.profile:
            profile_steps(eng, mode, cuda)
    return {"mode": mode, "pairs_per_s": pairs / total, "tokens_per_s": tokens / total,
            "median_step_s": statistics.median(times), "pairs_per_step": pairs / len(times),
            "step_ms": [round(t * 1000, 1) for t in times],
            "peak_gib": round(peak, 3), "setup_s": round(setup_s, 1), "final_loss": loss}


def profile_steps(eng, mode, cuda, n=3):
    """Where a step's time goes: the top kernels/ops by device time, and device-busy vs wall time."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(n):
            eng.train_step()
        if cuda:
            torch.cuda.synchronize()
    wall = time.perf_counter() - t
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    busy = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6 if cuda else float("nan")
    print(f"--- profile {mode}: {n} steps, wall {wall:.3f}s, device busy {busy:.3f}s", file=sys.stderr)
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60), file=sys.stderr)
    if cuda:   # and where the host's time goes (a step the GPU waits for is bound by it)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60),
              file=sys.stderr)


def main():
    a = parse()
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    prefs, report = load_preferences(a.data, skip_bad_rows=True)
    if a.pairs:
        prefs = prefs[:a.pairs]
    texts = [m.content for p in prefs for m in p.prompt] + [x for p in prefs for x in (p.chosen, p.rejected)]
    t0 = time.perf_counter()
    tok = Tokenizer.train(texts, a.vocab)
    template = get_template("chatml", tok)
    items, dropped = tokenize_pairs(prefs, tok, template, a.max_length, a.max_prompt_length)
    prep_s = time.perf_counter() - t0
    n_tok = [len(p) * 2 + len(c) + len(r) for p, c, r in items]
    print(f"{len(items)} pairs ({report.n_skipped} skipped, {dropped} dropped), mean {statistics.mean(n_tok):.0f} tokens "
          f"per pair (prompt counted twice), tokenizer+tokenize {prep_s:.1f}s", file=sys.stderr)
    torch.manual_seed(0)
    cfg = ModelConfig.from_name(a.preset, vocab_size=pad_vocab(tok.vocab_size), block_size=max(a.max_length, 128))
    base = GPT(cfg).to(device)
    results = []
    for mode in a.modes.split(","):
        r = run_mode(mode, base, tok, items, a, device)
        print(json.dumps(r), file=sys.stderr)
        results.append(r)
    summary = {"bench": "dpo_throughput", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "preset": a.preset, "max_length": a.max_length, "pairs": len(items),
               "pack_rows": a.pack_rows, "batch": a.batch, "compile": a.compile, "base_bf16": a.base_bf16,
               "grad_checkpointing": a.grad_checkpointing, "dtype": a.dtype,
               **{f"{r['mode']}_{k}": (round(v, 2) if isinstance(v, float) else v) for r in results
                  for k, v in r.items() if k not in ("mode", "step_ms")},
               "peer_trl_pairs_per_s": {"live": 31, "precompute": 41}, "peer_trl_peak_gib": 2.9}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
