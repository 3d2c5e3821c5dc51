"""Data-parallel scaling: tokens/s per GPU on 1, 2, 4 and 8 GPUs, and the efficiency against one.

Each workload is the real command line (`tinygpt.cli.main`, the engine with DDP, or FSDP2 with
`--fsdp`), run under torchrun; one launch per world size measures every workload asked for and
appends one row per workload to the results JSON (rank 0 writes). Tokens/s is the engine's own
(`metrics.jsonl`: real tokens of the global batch per second of wall time), the median over the
steps after `--warmup` (which absorb compilation). The per-GPU batch stays fixed (weak scaling),
as it does when a run moves to more GPUs. `report` prints the table:
efficiency(N) = (tokens/s per GPU at N) / (tokens/s per GPU at 1).

Workloads (GPT-2 tokenizer width: the head is 50304 wide; a byte-level tokenizer feeds it):
  pretrain-124m   train, GPT-2 124M shape, context 1024
  pretrain-350m   train, GPT-2 medium shape (24 x 1024, 16 heads), context 1024
  sft             sft --full on a random GPT-2 124M base, Alpaca-GPT4 rows (packed, the default)
  dpo             dpo --full on the same base, UltraFeedback pairs

GPU (one command per world size, then the report):
  for n in 1 2 4 8; do torchrun --standalone --nproc_per_node $n benchmarks/scaling.py run \
      --results benchmarks/scaling.json; done
  python benchmarks/scaling.py report --results benchmarks/scaling.json
CPU check (gloo, 2 processes, a tiny model):
  torchrun --standalone --nproc_per_node 2 benchmarks/scaling.py run --tiny --results /tmp/s.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tinygpt.checkpoint import save_model  # noqa: E402
from tinygpt.cli import main  # noqa: E402
from tinygpt.config import ModelConfig  # noqa: E402
from tinygpt.device import setup_device  # noqa: E402
from tinygpt.model import GPT  # noqa: E402
from tinygpt.tokenizer import Tokenizer  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
WORKLOADS = ("pretrain-124m", "pretrain-350m", "sft", "dpo")
MEDIUM = ["--n-layer", "24", "--n-embd", "1024", "--n-head", "16"]


def _argv(name: str, a, tmp: Path, base: Path) -> list[str]:
    """The command line of a workload (without --out)."""
    shape = ["--preset", "nano", "--ctx", "64"] if a.tiny else ["--preset", "gpt2", "--ctx", "1024"]
    if name.startswith("pretrain"):
        return ["train", "--corpus", str(a.corpus), "--byte-tokenizer", *shape, "--batch", str(a.batch),
                *(MEDIUM if name == "pretrain-350m" and not a.tiny else [])]
    if name == "sft":
        return ["sft", str(base), "--data", str(a.sft_data), "--full", "--max-length", shape[-1],
                "--batch", str(a.batch)]
    return ["dpo", str(base), "--data", str(a.dpo_data), "--full", "--max-length", shape[-1],
            "--max-prompt-length", str(int(shape[-1]) // 2),
            "--batch", str(max(1, a.batch // 2))]


def _base(a, path: Path) -> None:
    """A random GPT-2-shaped base model for the post-training workloads (rank 0 writes it)."""
    if int(os.environ.get("RANK", "0")) == 0 and not path.exists():
        torch.manual_seed(0)
        cfg = ModelConfig.from_name("nano" if a.tiny else "gpt2", vocab_size=512 if a.tiny else 50304)
        save_model(path, GPT(cfg), Tokenizer.byte_level())


def run(a) -> None:
    _, rank, world = setup_device("cpu" if a.tiny else "auto")     # joins the group torchrun describes
    tmp = Path(a.workdir)                                          # one folder for every rank of the host
    tmp.mkdir(parents=True, exist_ok=True)
    base = tmp / "base.tinygpt"
    _base(a, base)
    if world > 1:
        dist.barrier()
    device = ["--device", "cpu", "--dtype", "float32"] if a.tiny else ["--compile"]
    rows = []
    for name in a.workloads.split(","):
        out = tmp / f"{name}-w{world}.tinygpt"
        argv = _argv(name, a, tmp, base) + ["--steps", str(a.warmup + a.steps), "--quiet", "--out", str(out),
                                           "--lr-schedule", "constant", *device, *(["--fsdp"] if a.fsdp else [])]
        code = main(argv)
        if code != 0:
            raise SystemExit(f"{name} failed with exit code {code}")
        if dist.is_initialized():
            dist.barrier()                       # rank 0 has written metrics.jsonl
        metrics = [json.loads(x) for x in (tmp / f"{name}-w{world}.run" / "metrics.jsonl").read_text().splitlines()]
        tps = statistics.median(m["tokens_per_s"] for m in metrics[a.warmup:])
        rows.append({"workload": name, "world": world, "fsdp": a.fsdp, "tokens_per_s": tps,
                     "tokens_per_s_per_gpu": tps / world, "batch_per_gpu": a.batch, "steps": a.steps,
                     "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"})
    if rank == 0:
        path = Path(a.results)
        old = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(old + rows, indent=1) + "\n")
        for r in rows:
            print(json.dumps(r))
    if dist.is_initialized():
        dist.destroy_process_group()


def report(a) -> None:
    rows = json.loads(Path(a.results).read_text())
    latest = {(r["workload"], r["fsdp"], r["world"]): r for r in rows}     # the last run of each wins
    print(f"{'workload':<15} {'wrap':<5} {'GPUs':>4} {'tokens/s':>12} {'per GPU':>10} {'efficiency':>10}")
    for (name, fsdp, world), r in sorted(latest.items()):
        one = latest.get((name, fsdp, 1))
        eff = f"{r['tokens_per_s_per_gpu'] / one['tokens_per_s_per_gpu']:.1%}" if one else "-"
        print(f"{name:<15} {'fsdp' if fsdp else 'ddp':<5} {world:>4} {r['tokens_per_s']:>12,.0f} "
              f"{r['tokens_per_s_per_gpu']:>10,.0f} {eff:>10}")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("action", choices=("run", "report"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "scaling.json"))
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--batch", type=int, default=16, help="rows per GPU per micro-batch")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 instead of DDP")
    p.add_argument("--tiny", action="store_true", help="a nano model on the CPU (gloo): checks the script")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "tinygpt-scaling"),
                   help="where data caches and outputs go (shared by the ranks)")
    p.add_argument("--corpus", default=str(DATA / "pretrain" / "tinystories_train.txt"))
    p.add_argument("--sft-data", default=str(DATA / "sft" / "alpaca_gpt4_demo.json"))
    p.add_argument("--dpo-data", default=str(DATA / "preference" / "ultrafeedback_1k.jsonl"))
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse()
    (run if args.action == "run" else report)(args)
