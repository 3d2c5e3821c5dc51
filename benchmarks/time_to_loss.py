"""Time to loss: `tinygpt train` beside nanoGPT's own train.py, on the same tokens, scored by ONE
function on the same held-out windows; wall time to each loss level and the loss at equal time.

Workloads
  a  tinyshakespeare at character level with nanoGPT's config/train_shakespeare_char.py (6 x 384,
     context 256, batch 64, lr 1e-3 -> 1e-4 over 5000 steps, warmup 100, beta2 0.99, dropout 0.2).
     Held out: nanoGPT's validation split, the last 10% of the text. nanoGPT reads its character
     ids; tinygpt reads the same text as ONE document with --byte-tokenizer and --val-split 0.1,
     whose token-level split is the same last 10% (to one character: tinygpt drops the text's
     final newline), and keeps its best checkpoint (--keep-best), as nanoGPT does.
  b  GPT-2 size (12 x 768, context 1024, batch 32, lr 6e-4 -> 6e-5 cosine over 1000 steps, warmup
     100) on the Python source files of the installed site-packages (`prepare`): files sorted by
     path, deduplicated by content, taken in the order of their content hash up to --corpus-mb,
     1% held out by that hash; a 32k byte-level BPE trained on a --sample-mb sample of the
     training files. Both systems read the very same uint16 token shard.

Scoring: `tinygpt.eval.ppl.window_loss` over `tinygpt.data.corpus.window_batches` of the held-out
tokens (non-overlapping windows of the context length, at most --val-tokens predictions), bf16
autocast on CUDA. nanoGPT's model is scored as it trains, inside its own process
(`time_to_loss_nanogpt.py` hooks the checkpoints it makes every eval_interval with
always_save_checkpoint, without writing them); tinygpt's every --eval-every steps. Training time
excludes evaluation, scoring and checkpoint writing on both sides (the GPU is synchronised at each
pause), and includes compilation. nanoGPT's own loss estimate uses --eval-iters 20 instead of
200: it only picks which checkpoint nanoGPT would keep, and is not the score.

Pieces, each under 10 minutes on one H200 (results accumulate in --out; `report` combines them):
  python benchmarks/time_to_loss.py run --workload a --system nanogpt --nanogpt ../nanoGPT
  python benchmarks/time_to_loss.py run --workload a --system tinygpt
  python benchmarks/time_to_loss.py prepare --workload b
  python benchmarks/time_to_loss.py run --workload b --system nanogpt --nanogpt ../nanoGPT
  python benchmarks/time_to_loss.py run --workload b --system tinygpt --label muon --ours "--optimizer muon"
  python benchmarks/time_to_loss.py report
`--set key=value` changes a workload setting for both systems (tiny CPU runs: n_layer, n_head,
n_embd, ctx, batch, steps, eval_every, warmup); `--ours "FLAGS"` adds `tinygpt train` flags (a
variant, named by --label). nanoGPT's code is copied into a scratch folder and never committed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # the checkout's tinygpt
from tinygpt.data.corpus import tokenize_corpus, window_batches  # noqa: E402
from tinygpt.device import autocast  # noqa: E402
from tinygpt.eval.ppl import window_loss  # noqa: E402
from tinygpt.options import parse  # noqa: E402
from tinygpt.stages.pretrain import PretrainOptions, PretrainStage  # noqa: E402
from tinygpt.tokenizer import Tokenizer  # noqa: E402
from tinygpt.train.engine import prepare  # noqa: E402

WORKLOADS = {
    "a": dict(n_layer=6, n_head=6, n_embd=384, ctx=256, batch=64, lr=1e-3, min_lr=1e-4, steps=5000, warmup=100,
              beta2=0.99, dropout=0.2, weight_decay=0.1, eval_every=250, val_tokens=None,
              levels=[2.5, 2.0, 1.8, 1.7, 1.6, 1.55, 1.5, 1.48, 1.464, 1.45, 1.42]),
    "b": dict(n_layer=12, n_head=12, n_embd=768, ctx=1024, batch=32, lr=6e-4, min_lr=6e-5, steps=1000, warmup=100,
              beta2=0.95, dropout=0.0, weight_decay=0.1, eval_every=50, val_tokens=1 << 20,
              levels=[6.0, 5.0, 4.0, 3.5, 3.0, 2.75, 2.5, 2.25, 2.0, 1.75, 1.5]),
}
_ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = next((p for p in (_ROOT / "shared", _ROOT.parent / "shared")     # shared/ beside or in the checkout
                    if (p / "data" / "pretrain" / "tinyshakespeare.txt").exists()),
                   _ROOT.parent / "shared") / "data" / "pretrain" / "tinyshakespeare.txt"
NANOGPT_FILES = ("train.py", "model.py", "configurator.py", "config")


class Clock:
    """Training seconds: wall time between `resume` and `pause`, summed; the GPU is synchronised at
    each transition so the work queued before it is counted on the right side."""

    def __init__(self, device):
        self.sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
        self.total, self.since = 0.0, None

    def resume(self) -> None:
        if self.since is None:
            self.sync()
            self.since = time.perf_counter()

    def pause(self) -> float:
        if self.since is not None:
            self.sync()
            self.total += time.perf_counter() - self.since
            self.since = None
        return self.total


def score(logits_fn, tokens: np.ndarray, ctx: int, batch: int, device, max_tokens=None) -> float:
    """THE score of both systems: mean next-token loss (nats) over the fixed held-out windows."""
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.no_grad(), autocast(device, dtype):
        return window_loss(logits_fn, window_batches(tokens, ctx, batch, device, max_tokens))


class Curve:
    """Scored points of one run, appended to a JSON-lines file as they come (a killed run keeps them)."""

    def __init__(self, path: Path):
        self.path, self.points = path, []
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def add(self, step: int, train_s: float, loss: float) -> None:
        self.points.append({"step": step, "train_s": round(train_s, 3), "loss": loss})
        with open(self.path, "a") as f:
            f.write(json.dumps(self.points[-1]) + "\n")
        print(f"  step {step:6d}  train {train_s:8.1f} s  held-out loss {loss:.4f}", flush=True)


# ---- data ---------------------------------------------------------------------------------------
def _write_u16(path: Path, ids) -> np.ndarray:
    arr = np.asarray(ids, dtype=np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr.tofile(path)
    return arr


def shakespeare_data(text_path: Path, work: Path) -> dict:
    """nanoGPT's shakespeare_char preparation (prepare.py, without the download) and tinygpt's
    one-document corpus of the same text; held-out token ids for each system's scoring."""
    text = text_path.read_text(encoding="utf-8")
    if not text.isascii():
        raise SystemExit("the character-level comparison needs ASCII text (one byte per character)")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    cut = int(len(text) * 0.9)                                     # prepare.py: data[:int(n*0.9)]
    ddir = work / "nanogpt-data"
    _write_u16(ddir / "train.bin", [stoi[c] for c in text[:cut]])
    nano_val = _write_u16(ddir / "val.bin", [stoi[c] for c in text[cut:]])
    corpus = work / "shakespeare.txt"
    corpus.write_text(text + "<|endoftext|>", encoding="utf-8")   # one document, split by --val-split
    ours_val = np.asarray(Tokenizer.byte_level().encode(text[cut:]), dtype=np.int64)
    assert len(ours_val) == len(nano_val)                          # the same windows, position by position
    return {"nano_dir": ddir, "vocab": len(chars), "nano_val": nano_val, "ours_val": ours_val,
            "ours_args": ["--corpus", str(corpus), "--byte-tokenizer", "--val-split", "0.1", "--keep-best"]}


def python_files(max_mb: float) -> list[tuple[str, str]]:
    """(content sha256, text) of the installed site-packages' .py files: sorted by path, deduplicated
    by content, then taken in content-hash order until max_mb."""
    paths = sysconfig.get_paths()
    roots = sorted({paths["purelib"], paths["platlib"]})
    seen, files = set(), []
    for path in sorted(p for r in roots for p in Path(r).rglob("*.py") if p.is_file()):
        raw = path.read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        if digest in seen or not raw.strip():
            continue
        seen.add(digest)
        try:
            files.append((digest, raw.decode("utf-8")))
        except UnicodeDecodeError:
            continue
    files.sort()
    out, total = [], 0
    for digest, text in files:
        if total >= max_mb * 2**20:
            break
        out.append((digest, text))
        total += len(text.encode("utf-8"))
    return out


def prepare_python(args, work: Path) -> dict:
    """Build (or reuse) workload b's corpus, tokenizer and shards under `work`."""
    meta_path = work / "python-corpus.json"
    if meta_path.exists():
        return json.loads(meta_path.read_text())
    t0 = time.perf_counter()
    files = python_files(args.corpus_mb)
    held = [t for d, t in files if int(d[:8], 16) % 100 == 0]     # 1% of the files, by content hash
    train = [t for d, t in files if int(d[:8], 16) % 100 != 0]
    work.mkdir(parents=True, exist_ok=True)
    sample, size = [], 0
    for text in train:
        if size >= args.sample_mb * 2**20:
            break
        sample.append(text)
        size += len(text)
    Tokenizer.train(sample, args.vocab).save(work / "tokenizer.json")
    tok = Tokenizer.load(work / "tokenizer.json")      # as `tinygpt train --tokenizer` will read it (same cache key)
    corpus = work / "train.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for text in train:
            f.write(json.dumps({"text": text}) + "\n")
    data = tokenize_corpus([str(corpus)], tok, work / ".tinygpt-cache", 0.0, 0, print)   # tinygpt's own cache
    val = [t for ids in tok.encode_batch(held) for t in ids + [tok.eos_id]]
    _write_u16(work / "val.bin", val)
    meta = {"files": len(files), "train_files": len(train), "val_files": len(held),
            "bytes": sum(len(t.encode("utf-8")) for _, t in files), "train_tokens": int(len(data["train"])),
            "val_tokens": len(val), "vocab": tok.vocab_size, "train_bin": str(data["dir"] / "train.bin"),
            "seconds": round(time.perf_counter() - t0, 1)}
    meta_path.write_text(json.dumps(meta, indent=1))
    print(f"python corpus: {meta}")
    return meta


def workload_data(args, work: Path) -> dict:
    if args.workload == "a":
        return shakespeare_data(Path(args.shakespeare), work)
    meta = prepare_python(args, work)
    ddir = work / "nanogpt-data"
    ddir.mkdir(parents=True, exist_ok=True)
    for name, src in (("train.bin", meta["train_bin"]), ("val.bin", str(work / "val.bin"))):
        if not (ddir / name).exists():
            os.symlink(src, ddir / name)
    val = np.fromfile(work / "val.bin", dtype=np.uint16)
    return {"nano_dir": ddir, "vocab": meta["vocab"], "nano_val": val, "ours_val": val.astype(np.int64),
            "ours_args": ["--corpus", str(work / "train.jsonl"), "--tokenizer", str(work / "tokenizer.json")]}


# ---- the two systems ----------------------------------------------------------------------------
def _float(x) -> str:
    return repr(float(x))            # nanoGPT's configurator checks types: 0 would not be a float


def nanogpt_argv(spec: dict, args, dataset: str) -> list[str]:
    """train.py's command line: the shakespeare_char config file for (a), the GPT-2 defaults for (b),
    the workload's settings, and the benchmark's bookkeeping (no files, cheap own estimate)."""
    cuda = torch.device(args.device).type == "cuda"
    argv = ["config/train_shakespeare_char.py"] if args.workload == "a" else []
    argv += [f"--dataset={dataset}", "--out_dir=out", "--always_save_checkpoint=True", "--eval_iters=20",
             "--gradient_accumulation_steps=1", f"--n_layer={spec['n_layer']}", f"--n_head={spec['n_head']}",
             f"--n_embd={spec['n_embd']}", f"--block_size={spec['ctx']}", f"--batch_size={spec['batch']}",
             f"--learning_rate={_float(spec['lr'])}", f"--min_lr={_float(spec['min_lr'])}",
             f"--max_iters={spec['steps']}", f"--lr_decay_iters={spec['steps']}", f"--warmup_iters={spec['warmup']}",
             f"--beta2={_float(spec['beta2'])}", f"--dropout={_float(spec['dropout'])}",
             f"--weight_decay={_float(spec['weight_decay'])}", f"--eval_interval={spec['eval_every']}",
             f"--device={args.device}", f"--compile={cuda and not args.no_compile}",
             f"--dtype={'bfloat16' if cuda else 'float32'}"]
    return argv


def run_nanogpt(spec: dict, args, work: Path, data: dict, curve: Curve) -> list[str]:
    """nanoGPT's own train.py from a scratch copy, under the scoring harness; returns its command."""
    src = Path(args.nanogpt or "")
    if not (src / "train.py").is_file():
        raise SystemExit("--nanogpt PATH: a nanoGPT checkout (with train.py) is needed for --system nanogpt")
    scratch = work / "nanogpt"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    for name in NANOGPT_FILES:
        (shutil.copytree if (src / name).is_dir() else shutil.copy)(src / name, scratch / name)
    dataset = f"ttl_{args.workload}"
    (scratch / "data").mkdir()
    os.symlink(data["nano_dir"].resolve(), scratch / "data" / dataset)
    with open(data["nano_dir"] / "meta.pkl", "wb") as f:           # nanoGPT reads its vocabulary size here
        pickle.dump({"vocab_size": data["vocab"]}, f)
    val = scratch / "score_val.bin"
    data["nano_val"].astype(np.uint16).tofile(val)
    argv = nanogpt_argv(spec, args, dataset)
    harness = Path(__file__).with_name("time_to_loss_nanogpt.py")
    cmd = [sys.executable, str(harness), json.dumps({"val": str(val), "curve": str(curve.path), "ctx": spec["ctx"],
                                                     "batch": args.score_batch or spec["batch"], "device": args.device,
                                                     "max_tokens": spec["val_tokens"], "max_s": args.max_minutes * 60}),
           "train.py", *argv]
    print("nanoGPT:", shlex.join(["python", "train.py", *argv]), flush=True)
    with open(work / "nanogpt.log", "w") as log:
        rc = subprocess.run(cmd, cwd=scratch, stdout=log, stderr=subprocess.STDOUT).returncode
    curve.points = [json.loads(x) for x in curve.path.read_text().splitlines()]
    if rc != 0:
        print((work / "nanogpt.log").read_text()[-3000:])
        raise SystemExit(f"nanoGPT exited with {rc} (log: {work / 'nanogpt.log'})")
    return ["python", "train.py", *argv]


def tinygpt_argv(spec: dict, args, work: Path, data: dict) -> list[str]:
    cuda = torch.device(args.device).type == "cuda"
    argv = [*data["ours_args"], "--n-layer", str(spec["n_layer"]), "--n-head", str(spec["n_head"]),
            "--n-embd", str(spec["n_embd"]), "--ctx", str(spec["ctx"]), "--batch", str(spec["batch"]),
            "--lr", str(spec["lr"]), "--min-lr", str(spec["min_lr"]), "--steps", str(spec["steps"]),
            "--warmup", str(spec["warmup"]), "--beta2", str(spec["beta2"]), "--dropout", str(spec["dropout"]),
            "--weight-decay", str(spec["weight_decay"]), "--device", args.device,
            "--dtype", "bfloat16" if cuda else "float32", "--out", str(work / f"tinygpt-{args.label}.tinygpt")]
    if "--val-split" in argv:
        argv += ["--val-every", str(spec["eval_every"])]
    if cuda and not args.no_compile:
        argv.append("--compile")
    return argv + shlex.split(args.ours or "")


def run_tinygpt(spec: dict, args, work: Path, data: dict, curve: Curve) -> list[str]:
    """`tinygpt train` in this process, scored every eval_every steps; returns its command line."""
    argv = tinygpt_argv(spec, args, work, data)
    print("tinygpt:", shlex.join(["tinygpt", "train", *argv]), flush=True)
    stage = PretrainStage(parse(PretrainOptions, argv, "tinygpt train"))
    eng = prepare(stage)
    clock, model = Clock(args.device), stage.model
    real_step, real_validate, real_save = eng.train_step, stage.validate, stage.save

    def paused(fn):
        def run(*a):
            clock.pause()
            try:
                return fn(*a)
            finally:
                clock.resume()
        return run

    def train_step(*a):
        out = real_step(*a)
        if eng.step % spec["eval_every"] == 0 or eng.step == eng.rounds:
            seconds = clock.pause()
            model.eval()
            curve.add(eng.step, seconds, score(model, data["ours_val"], spec["ctx"], args.score_batch or spec["batch"],
                                               args.device, spec["val_tokens"]))
            model.train()
            if seconds > args.max_minutes * 60:
                eng.rounds = eng.round + 1       # this round is the last (the schedule is not shortened)
            clock.resume()
        return out
    eng.train_step, stage.validate, stage.save = train_step, paused(real_validate), paused(real_save)
    clock.resume()
    eng.fit()
    clock.pause()
    return ["tinygpt", "train", *argv]


# ---- results ------------------------------------------------------------------------------------
def time_to(points: list[dict], level: float):
    """Training seconds (and step) of the first point at or below `level`, or None."""
    hit = next((p for p in points if p["loss"] <= level), None)
    return None if hit is None else (hit["train_s"], hit["step"])


def best_by(points: list[dict], seconds: float):
    """Lowest loss among the points reached within `seconds` of training, or None."""
    seen = [p["loss"] for p in points if p["train_s"] <= seconds]
    return min(seen) if seen else None


def summarise(workload: str, runs: list[dict]) -> dict:
    """Per workload: each run's best, time to each level, loss at nanoGPT's checkpoint times, and the
    targets (a: best <= 1.42 within 0.6x nanoGPT's time to its best; b: nanoGPT's loss after its
    last step within 0.35x its training time)."""
    nano = next((r for r in runs if r["system"] == "nanogpt"), None)
    levels = list(WORKLOADS[workload]["levels"])
    out = {"levels": levels, "runs": {}}
    for r in runs:
        pts = r["points"]
        best = min(pts, key=lambda p: p["loss"]) if pts else None
        out["runs"][r["label"]] = {"system": r["system"], "command": r["command"], "best": best,
                                   "time_to": {str(lv): time_to(pts, lv) for lv in levels}}
    if nano and nano["points"]:
        n_best = min(nano["points"], key=lambda p: p["loss"])
        n_last = nano["points"][-1]
        times = [p["train_s"] for p in nano["points"]]
        out["nanogpt"] = {"best": n_best, "last": n_last, "times": times}
        for r in runs:
            entry = out["runs"][r["label"]]
            entry["at_nanogpt_times"] = [best_by(r["points"], t) for t in times]
            reach_best, reach_last = time_to(r["points"], n_best["loss"]), time_to(r["points"], n_last["loss"])
            entry["time_to_nanogpt_best_ratio"] = reach_best and reach_best[0] / n_best["train_s"]
            entry["time_to_nanogpt_last_ratio"] = reach_last and reach_last[0] / n_last["train_s"]
            if workload == "a" and entry["best"]:
                hit = time_to(r["points"], 1.42)
                entry["target"] = {"best_le_1.42": entry["best"]["loss"] <= 1.42,
                                   "time_to_1.42_ratio": hit and hit[0] / n_best["train_s"]}
            elif workload == "b":
                entry["target"] = {"ratio_le_0.35": entry["time_to_nanogpt_last_ratio"] is not None
                                   and entry["time_to_nanogpt_last_ratio"] <= 0.35}
    return out


def table(workload: str, summary: dict) -> str:
    levels = summary["levels"]
    head = "| run | best (step, s) | " + " | ".join(f"<= {lv:g}" for lv in levels) + " |"
    lines = [f"### workload {workload}: training seconds to each held-out loss", "", head,
             "|" + "---|" * (len(levels) + 2)]
    for label, e in summary["runs"].items():
        b = e["best"]
        cells = [f"{v[0]:.0f}" if v else "-" for v in (e["time_to"][str(lv)] for lv in levels)]
        best = f"{b['loss']:.4f} ({b['step']}, {b['train_s']:.0f})" if b else "-"
        lines.append(f"| {label} | {best} | " + " | ".join(cells) + " |")
    if "nanogpt" in summary:
        times = summary["nanogpt"]["times"]
        pick = sorted({round(i * (len(times) - 1) / 9) for i in range(10)}) if len(times) > 10 else range(len(times))
        lines += ["", f"### workload {workload}: lowest held-out loss within nanoGPT's training times", "",
                  "| run | " + " | ".join(f"{times[i]:.0f} s" for i in pick) + " | time to nanoGPT's best "
                  "| time to nanoGPT's last | target |", "|" + "---|" * (len(pick) + 4)]
        for label, e in summary["runs"].items():
            cells = ["-" if e["at_nanogpt_times"][i] is None else f"{e['at_nanogpt_times'][i]:.4f}" for i in pick]
            ratios = [e.get(k) for k in ("time_to_nanogpt_best_ratio", "time_to_nanogpt_last_ratio")]
            lines.append(f"| {label} | " + " | ".join(cells) + " | "
                         + " | ".join("-" if r is None else f"{r:.2f}x" for r in ratios) + f" | {e.get('target')} |")
    return "\n".join(lines)


def report(out: Path) -> dict:
    """Combine every finished run under `out` into time_to_loss.json and time_to_loss.md."""
    result, texts = {}, []
    for workload in WORKLOADS:
        runs = [json.loads(p.read_text()) for p in sorted(out.glob(f"{workload}-*.json"))]
        if runs:
            result[workload] = summarise(workload, runs)
            texts.append(table(workload, result[workload]))
    (out / "time_to_loss.json").write_text(json.dumps(result, indent=1))
    (out / "time_to_loss.md").write_text("\n\n".join(texts) + "\n")
    print("\n\n".join(texts))
    return result


def run(args) -> Path:
    spec = dict(WORKLOADS[args.workload])
    for kv in args.set:
        key, _, value = kv.partition("=")
        if key not in spec or key == "levels":
            raise SystemExit(f"--set {kv}: the settings are {', '.join(k for k in spec if k != 'levels')}")
        spec[key] = type(spec[key])(float(value)) if spec[key] is not None else int(value)
    work = Path(args.work) / args.workload
    work.mkdir(parents=True, exist_ok=True)
    data = workload_data(args, work)
    args.label = args.label or args.system
    curve = Curve(work / f"curve-{args.label}.jsonl")
    t0 = time.perf_counter()
    runner = run_nanogpt if args.system == "nanogpt" else run_tinygpt
    command = runner(spec, args, work, data, curve)
    result = {"workload": args.workload, "system": args.system, "label": args.label, "command": shlex.join(command),
              "settings": {k: v for k, v in spec.items() if k != "levels"}, "points": curve.points,
              "wall_s": round(time.perf_counter() - t0, 1), "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else "cpu"}
    path = Path(args.out) / f"{args.workload}-{args.label}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path} ({len(curve.points)} points, {result['wall_s']} s)")
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("action", choices=("prepare", "run", "report"))
    ap.add_argument("--workload", choices=tuple(WORKLOADS), default="a")
    ap.add_argument("--system", choices=("nanogpt", "tinygpt"), default="tinygpt")
    ap.add_argument("--label", help="name of this run in the report (default: the system)")
    ap.add_argument("--ours", help="extra `tinygpt train` flags, e.g. \"--optimizer muon\"")
    ap.add_argument("--nanogpt", help="a nanoGPT checkout (train.py, model.py, configurator.py, config/)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change a workload setting")
    ap.add_argument("--out", default="runs/time_to_loss", help="result JSON files and the report")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "tinygpt-bench" / "time_to_loss"),
                    help="scratch space: corpora, shards, nanoGPT's copy, checkpoints")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-compile", action="store_true", help="neither system compiles (CPU tests)")
    ap.add_argument("--max-minutes", type=float, default=8.0, help="stop a run after this much training time")
    ap.add_argument("--score-batch", type=int, help="rows per scoring batch (default: the training batch)")
    ap.add_argument("--shakespeare", default=str(SHAKESPEARE), help="tinyshakespeare input.txt (workload a)")
    ap.add_argument("--corpus-mb", type=float, default=150.0, help="workload b: MB of Python source")
    ap.add_argument("--sample-mb", type=float, default=20.0, help="workload b: MB the tokenizer is trained on")
    ap.add_argument("--vocab", type=int, default=32768, help="workload b: BPE vocabulary")
    args = ap.parse_args(argv)
    if torch.device(args.device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.action == "prepare":
        prepare_python(args, Path(args.work) / "b")
    elif args.action == "run":
        run(args)
    else:
        report(Path(args.out))


if __name__ == "__main__":
    main()
