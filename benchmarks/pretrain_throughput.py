"""Pretraining throughput (tokens/s) and MFU of the training engine on the current device.

Runs the real engine (`tinygpt.train.engine.Engine` with the pretraining loss step) on batches drawn
from a memory-mapped uint16 token shard (the same loader `tinygpt train` uses: random windows,
pinned memory, non-blocking copies). FLOPs per token follow PaLM appendix B:
6N + 12 * n_layer * n_head * head_dim * T, N = parameters that cost FLOPs (position embeddings and
untied token-embedding lookups excluded). MFU is reported against the datasheet bf16 peak and
against a bf16 matmul ceiling measured in the same run.

    PYTHONPATH=. python3 benchmarks/pretrain_throughput.py --preset gpt2 --batch 32 --ctx 1024 --compile \
        --data ../shared/data/pretrain/tinystories_train.txt [--nanogpt PATH_TO_NANOGPT_CHECKOUT]

With --nanogpt, nanoGPT's bench.py is run in the same process tree on the same shard and its figure is
printed beside ours. With --fp8 the same run is repeated with `--fp8` (float8 block matmuls, same seed
and batches) and once more plain on a second seed, so the float8 run's loss gap can be read against
the gap between two seeds (`--steps 500` for that comparison).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tinygpt.config import ModelConfig, pad_vocab
from tinygpt.data.corpus import TokenBatches, tokenize_corpus
from tinygpt.model import GPT
from tinygpt.tokenizer import Tokenizer
from tinygpt.stages.pretrain import lm_loss_step
from tinygpt.train.engine import prepare
from tinygpt.train.stage import FunctionStage, TrainOptions

DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def matmul_ceiling(device, n=8192, reps=10) -> float:
    """bf16 matmul FLOP/s on random data (median of `reps` timed products after warm-up)."""
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * n ** 3 / statistics.median(times)


def make_shard(args, workdir: Path) -> np.ndarray:
    if args.data:
        tok = Tokenizer.train([Path(args.data).read_text(encoding="utf-8")], args.tokenizer_vocab)
        data = tokenize_corpus([args.data], tok, workdir / "cache", log=lambda *a: None)
        tokens = np.asarray(data["train"])
        print(f"data: {args.data} -> {len(tokens):,} tokens (BPE vocab {tok.vocab_size})")
        reps = max(1, (args.batch * (args.ctx + 1) * 4) // len(tokens) + 1)
        tokens = np.tile(tokens, reps) if reps > 1 else tokens
    else:
        tokens = np.random.default_rng(0).integers(0, 50257, size=20_000_000, dtype=np.uint16)
        print("data: random tokens")
    path = workdir / "train.bin"
    tokens.astype(np.uint16).tofile(path)
    return np.memmap(path, dtype=np.uint16, mode="r")


def model_config(args) -> ModelConfig:
    extra = {} if args.bias is None else {"bias": args.bias == "on"}
    return ModelConfig.from_name(args.preset, vocab_size=pad_vocab(50257), block_size=max(args.ctx, 1024), **extra)


def run_ours(args, tokens, device, workdir: Path, fp8: bool = False, seed: int = 0) -> dict:
    cfg = model_config(args)
    torch.manual_seed(seed)
    model = GPT(cfg).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    opts = TrainOptions(out=str(workdir / "bench.tinygpt"), steps=args.warmup_steps + args.steps, batch=args.batch,
                        lr=6e-4, warmup=10, dtype=args.dtype, compile=args.compile, quiet=True, device=str(device),
                        fp8=fp8, seed=seed)
    batches = TokenBatches(tokens, args.ctx, args.batch, seed=seed, device=device)
    eng = prepare(FunctionStage(model, lm_loss_step, batches, opts, log=lambda *a: None))
    eng.checkpoint = lambda final: None          # time training only, not the final save
    torch.cuda.synchronize() if device.type == "cuda" else None
    t0 = time.perf_counter()
    eng.fit()
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (workdir / "bench.run" / "metrics.jsonl").read_text().splitlines()]
    timed = [r["tokens_per_s"] for r in rows[args.warmup_steps:]]
    tps = statistics.median(timed)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    losses = [r["loss"] for r in rows]
    tail = losses[-max(1, len(losses) // 10):]                  # the last tenth of the run, averaged
    return {"tokens_per_s": tps, "tokens_per_s_p10": float(np.percentile(timed, 10)),
            "tokens_per_s_p90": float(np.percentile(timed, 90)), "flops_per_token": model.flops_per_token(args.ctx),
            "params": model.num_params(), "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
            "loss_tail_mean": statistics.fmean(tail), "losses": losses, "peak_mem_gib": peak, "wall_s": wall}


def run_fp8(args, tokens, device, workdir: Path, plain: dict) -> dict:
    """--fp8 beside the plain run (same seed, same batches), and the plain run on a second seed:
    the loss gap between two seeds is the noise the float8 run's gap is judged against."""
    f8 = run_ours(args, tokens, device, workdir, fp8=True)
    other = run_ours(args, tokens, device, workdir, seed=1)
    return {**{k: v for k, v in f8.items() if k != "losses"},
            "speedup_vs_plain": f8["tokens_per_s"] / plain["tokens_per_s"],
            "tail_gap_vs_plain": f8["loss_tail_mean"] - plain["loss_tail_mean"],
            "tail_gap_between_seeds": other["loss_tail_mean"] - plain["loss_tail_mean"],
            "max_step_gap_vs_plain": max(abs(a - b) for a, b in zip(f8["losses"], plain["losses"]))}


def run_nanogpt(args, tokens_path: Path, nanogpt: Path) -> dict:
    """nanoGPT's bench.py on the same shard (its data/openwebtext/train.bin points at ours)."""
    data_dir = nanogpt / "data" / "openwebtext"
    data_dir.mkdir(parents=True, exist_ok=True)
    target = data_dir / "train.bin"
    if target.exists() or target.is_symlink():
        target.unlink()
    target.symlink_to(tokens_path.resolve())
    cmd = [sys.executable, "bench.py", f"--batch_size={args.batch}", f"--block_size={args.ctx}",
           "--real_data=True", f"--compile={args.compile}", f"--bias={model_config(args).bias}"]
    out = subprocess.run(cmd, cwd=nanogpt, capture_output=True, text=True)
    times = [float(m) for m in re.findall(r"time per iteration: ([0-9.]+)ms", out.stdout)]
    if out.returncode != 0 or not times:
        print(out.stdout[-2000:], out.stderr[-2000:])
        return {"error": "nanoGPT bench failed"}
    ms = times[-1]   # the second (timed) stage
    return {"tokens_per_s": args.batch * args.ctx / (ms / 1e3), "ms_per_iter": ms, "cmd": " ".join(cmd)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30, help="timed steps")
    ap.add_argument("--warmup-steps", type=int, default=10, help="untimed steps (compilation, allocator)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--data", help="text corpus to tokenize (default: random tokens)")
    ap.add_argument("--tokenizer-vocab", type=int, default=16384)
    ap.add_argument("--nanogpt", help="path to a nanoGPT checkout to run beside ours (same bias setting)")
    ap.add_argument("--bias", choices=["on", "off"], help="override the preset's biases (gpt2: on, as GPT-2)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--fp8", action="store_true", help="also run --fp8 (same seed) and a second plain seed; "
                    "use --steps 500 for the loss comparison")
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    workdir = Path(tempfile.mkdtemp(prefix="tinygpt-bench-"))
    tokens = make_shard(args, workdir)
    ceiling = matmul_ceiling(device)
    ours = run_ours(args, tokens, device, workdir)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in DATASHEET_BF16.items() if k in name), float("nan"))
    achieved = ours["tokens_per_s"] * ours["flops_per_token"]
    result = {"device": name, "preset": args.preset, "bias": model_config(args).bias, "batch": args.batch, "ctx": args.ctx, "compile": args.compile,
              "dtype": args.dtype, "torch": torch.__version__, **ours,
              "tflops": achieved / 1e12, "matmul_ceiling_tflops": ceiling / 1e12,
              "mfu_datasheet": achieved / peak, "mfu_measured_ceiling": achieved / ceiling}
    if args.fp8:
        result["fp8"] = run_fp8(args, tokens, device, workdir, ours)
    result.pop("losses")
    if args.nanogpt:
        result["nanogpt"] = run_nanogpt(args, workdir / "train.bin", Path(args.nanogpt))
    print(f"\n{'':24s}{'tokens/s':>12s}{'MFU(datasheet)':>16s}{'MFU(ceiling)':>14s}")
    print(f"{'tinygpt':24s}{ours['tokens_per_s']:12,.0f}{result['mfu_datasheet']:16.1%}{result['mfu_measured_ceiling']:14.1%}")
    if args.nanogpt and "tokens_per_s" in result["nanogpt"]:
        n = result["nanogpt"]["tokens_per_s"]
        print(f"{'nanoGPT bench.py':24s}{n:12,.0f}{n * ours['flops_per_token'] / peak:16.1%}"
              f"{n * ours['flops_per_token'] / ceiling:14.1%}   ratio {ours['tokens_per_s'] / n:.2f}x")
        if args.fp8:
            f = result["fp8"]["tokens_per_s"]
            print(f"{'tinygpt --fp8':24s}{f:12,.0f}{'':30s}   ratio {f / n:.2f}x")
    if args.fp8:
        f = result["fp8"]
        print(f"--fp8: {f['speedup_vs_plain']:.3f}x the plain run; loss over the last tenth {f['loss_tail_mean']:.4f} "
              f"vs {ours['loss_tail_mean']:.4f} (gap {f['tail_gap_vs_plain']:+.4f}; two plain seeds differ by "
              f"{f['tail_gap_between_seeds']:+.4f}); peak {f['peak_mem_gib']:.1f} GiB")
    print(f"matmul ceiling {ceiling / 1e12:.0f} TFLOP/s, peak memory {ours['peak_mem_gib']:.1f} GiB")
    print("JSON " + json.dumps(result))


if __name__ == "__main__":
    main()
