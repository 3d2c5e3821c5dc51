"""Mixture of experts against a dense model of the same active parameters, on workload b of the
time-to-loss benchmark (Python source of the installed site-packages, its tokenizer and shard,
held out by file hash, scored by the same function).

The two runs: a dense model (n_layer x n_embd, SwiGLU MLP of width I), and the same model whose
MLPs are --experts routed experts, --active per token, plus --shared shared experts, each of width
I / (active + shared), so both spend the same FLOPs per token (the router's E x C matmul aside). Both train
with the same settings, batches and schedule (`time_to_loss.run_tinygpt`, which scores the
held-out windows every --eval-every steps and times training only).

`--seeds 0,1,...` runs a pair per seed (the seed draws the weights and the training windows, and
the MoE's lead over the dense run moves with it): the tables below are the first seed's, and
every seed's finals and ratios follow them.

Reported (runs/moe/moe.json and moe.md): held-out loss at equal tokens (every scored step) and at
equal training time (the dense run's scoring times), tokens/s, MFU on active FLOPs (6N_active +
attention, against the 989 TFLOP/s bf16 datasheet peak of an H100/H200 SXM), peak memory, and the
targets: the MoE reaches the dense model's final loss in <= 0.8x its tokens, at >= 70% of its
tokens/s.

    python benchmarks/time_to_loss.py prepare --workload b      # once (cached under --work)
    python benchmarks/moe.py                                    # both runs, ~6 minutes on one H200
    python benchmarks/moe.py --device cpu --no-compile --steps 4 --eval-every 2 --n-layer 1 --n-embd 32 \\
        --n-head 2 --ctx 32 --batch 2 --corpus-mb 0.3 --sample-mb 0.1 --vocab 300      # a CPU check
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # the checkout's tinygpt
import time_to_loss as ttl  # noqa: E402
from tinygpt.model import GPT  # noqa: E402
from tinygpt.options import parse  # noqa: E402
from tinygpt.stages.pretrain import PretrainOptions, build_model_config  # noqa: E402

PEAK_FLOPS = 989e12          # H100/H200 SXM dense bf16 datasheet


def spec_of(args) -> dict:
    spec = dict(ttl.WORKLOADS["b"], n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, ctx=args.ctx,
                batch=args.batch, steps=args.steps, warmup=min(100, args.steps // 10), eval_every=args.eval_every,
                lr=args.lr, min_lr=args.lr / 10)
    return spec


def expert_width(n_embd: int, per_token: int) -> int:
    """Expert width: the usual SwiGLU width 8/3 * n_embd split over the experts a token takes,
    rounded up to 16 (the dense run's MLP is then exactly per_token experts wide)."""
    return (int(8 * n_embd / 3) // per_token + 15) // 16 * 16


def active_flops(argv: list[str], vocab: int, ctx: int) -> tuple[int, int, int]:
    """(training FLOPs per token on active parameters, active parameters, all parameters)."""
    opts = parse(PretrainOptions, argv, "tinygpt train")
    with torch.device("meta"):
        model = GPT(build_model_config(opts, vocab))
    n_layer, c = model.config.n_layer, model.config
    active = (model.flops_per_token(ctx) - 12 * n_layer * c.n_head * c.head_dim * ctx) // 6
    return model.flops_per_token(ctx), active, model.num_params(exclude_embeddings=True)


def one_run(label: str, flags: str, spec: dict, args, work: Path, data: dict) -> dict:
    args.label, args.ours = label, flags
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    curve = ttl.Curve(work / f"curve-moe-bench-{label}.jsonl")
    t0 = time.perf_counter()
    command = ttl.run_tinygpt(spec, args, work, data, curve)
    pts = curve.points
    tokens_per_step = spec["batch"] * spec["ctx"]
    train_s = pts[-1]["train_s"] if pts else float("nan")
    tps = pts[-1]["step"] * tokens_per_step / train_s if pts else float("nan")
    flops, active, total = active_flops(command[2:], data["vocab"], spec["ctx"])
    return {"label": label, "command": shlex.join(command), "points": pts, "tokens_per_step": tokens_per_step,
            "tokens_per_s": tps, "mfu_active": flops * tps / PEAK_FLOPS if cuda else None,
            "active_params": active, "params": total, "flops_per_token": flops,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "wall_s": round(time.perf_counter() - t0, 1)}


def compare(dense: dict, moe: dict) -> dict:
    """Loss at equal tokens, at equal time, tokens to the dense final loss, the tokens/s ratio."""
    final = dense["points"][-1]
    hit = ttl.time_to(moe["points"], final["loss"])
    tokens_ratio = hit and hit[1] / final["step"]
    speed = moe["tokens_per_s"] / dense["tokens_per_s"]
    by_step = {p["step"]: p["loss"] for p in moe["points"]}
    return {"dense_final": final,
            "equal_tokens": [{"step": p["step"], "tokens": p["step"] * dense["tokens_per_step"], "dense": p["loss"],
                              "moe": by_step.get(p["step"])} for p in dense["points"]],
            "equal_time": [{"train_s": p["train_s"], "dense": p["loss"], "moe": ttl.best_by(moe["points"], p["train_s"])}
                           for p in dense["points"]],
            "tokens_to_dense_final_ratio": tokens_ratio, "tokens_per_s_ratio": speed,
            "target": {"tokens_le_0.8x": tokens_ratio is not None and tokens_ratio <= 0.8,
                       "speed_ge_0.7x": speed >= 0.7}}


def seed_row(pair: dict) -> dict:
    """One seed's finals and ratios (the spread over seeds is what a single pair cannot show)."""
    c = pair["compare"]
    return {"seed": pair["seed"], "dense_final": pair["dense"]["points"][-1]["loss"],
            "moe_final": pair["moe"]["points"][-1]["loss"], "tokens_ratio": c["tokens_to_dense_final_ratio"],
            "tokens_per_s_ratio": c["tokens_per_s_ratio"]}


def table(result: dict) -> str:
    d, m, c = result["dense"], result["moe"], result["compare"]

    def f(x, spec="{:.4f}"):
        return "-" if x is None else spec.format(x)
    lines = ["| run | params (active) | tokens/s | MFU (active) | peak GB | final loss |", "|---|---|---|---|---|---|"]
    for r in (d, m):
        lines.append(f"| {r['label']} | {r['params'] / 1e6:.1f}M ({r['active_params'] / 1e6:.1f}M) | "
                     f"{r['tokens_per_s']:,.0f} | {f(r['mfu_active'], '{:.1%}')} | {f(r['peak_memory_gb'], '{:.1f}')} | "
                     f"{f(r['points'][-1]['loss'] if r['points'] else None)} |")
    lines += ["", "| tokens | dense | moe | | dense train s | dense | moe (best by then) |", "|---|---|---|---|---|---|---|"]
    for t, e in zip(c["equal_tokens"], c["equal_time"]):
        lines.append(f"| {t['tokens']:,} | {t['dense']:.4f} | {f(t['moe'])} | | {e['train_s']:.0f} | {e['dense']:.4f} | "
                     f"{f(e['moe'])} |")
    lines += ["", f"MoE tokens to the dense final loss: {f(c['tokens_to_dense_final_ratio'], '{:.2f}x')} (target <= 0.8x); "
              f"tokens/s ratio {c['tokens_per_s_ratio']:.2f} (target >= 0.7); {c['target']}"]
    if len(result["seeds"]) > 1:        # the tables above are the first seed's
        lines += ["", "| seed | dense final | MoE final | MoE - dense | tokens to the dense final | tokens/s ratio |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for r in result["seeds"]:
            lines.append(f"| {r['seed']} | {r['dense_final']:.4f} | {r['moe_final']:.4f} | "
                         f"{r['moe_final'] - r['dense_final']:+.4f} | {f(r['tokens_ratio'], '{:.2f}x')} | "
                         f"{r['tokens_per_s_ratio']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-layer", type=int, default=8)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--active", type=int, default=2)
    ap.add_argument("--shared", type=int, default=1)
    ap.add_argument("--router", choices=("sigmoid_bias", "softmax"), default="sigmoid_bias")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds: a dense and an MoE run for each "
                    "(tables for the first, finals and ratios for every one)")
    ap.add_argument("--moe-flags", default="", help="more `tinygpt train` flags for the MoE run only")
    ap.add_argument("--flags", default="", help="more `tinygpt train` flags for both runs")
    ap.add_argument("--out", default="runs/moe")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "tinygpt-bench" / "time_to_loss"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--max-minutes", type=float, default=4.0, help="stop a run after this much training time")
    ap.add_argument("--score-batch", type=int)
    ap.add_argument("--corpus-mb", type=float, default=150.0)
    ap.add_argument("--sample-mb", type=float, default=20.0)
    ap.add_argument("--vocab", type=int, default=32768)
    args = ap.parse_args(argv)
    args.workload = "b"
    if torch.device(args.device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    work = Path(args.work) / "b"
    data = ttl.workload_data(args, work)
    spec = spec_of(args)
    width = expert_width(args.n_embd, args.active + args.shared)
    moe_flags = (f"--n-experts {args.experts} --n-experts-active {args.active} --n-shared-experts {args.shared} "
                 f"--expert-intermediate-size {width} --router {args.router} {args.moe_flags}")
    seeds = [int(x) for x in args.seeds.split(",")]
    pairs = []
    for seed in seeds:                  # the seed draws the initial weights and the training windows
        tag = "" if len(seeds) == 1 else f"-s{seed}"
        dense = one_run(f"dense{tag}", f"--intermediate-size {(args.active + args.shared) * width} {args.flags} "
                        f"--seed {seed}", spec, args, work, data)
        moe = one_run(f"moe{tag}", f"{args.flags} --seed {seed} {moe_flags}", spec, args, work, data)
        pairs.append({"seed": seed, "dense": dense, "moe": moe, "compare": compare(dense, moe)})
    result = {"settings": {k: v for k, v in spec.items() if k != "levels"}, **pairs[0],
              "seeds": [seed_row(p) for p in pairs], "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else "cpu"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "moe.json").write_text(json.dumps(result, indent=1))
    (out / "moe.md").write_text(table(result) + "\n")
    print(table(result))
    return result


if __name__ == "__main__":
    main()
