"""GGUF quantisations in llama.cpp: file size and held-out perplexity of each `tinygpt export
--format gguf --dtype` type, computed by llama.cpp itself, beside tinygpt's float32 perplexity of
the same windows.

One model is trained here on the synthetic corpus (or given with --model), the last --held-frac of
its documents held out; the held-out text is tokenized once by our tokenizer and the same windows of
ids go to both sides (llama.cpp evaluates the ids, so only the weights differ, not the tokenization).
llama.cpp runs in a Python of its own (`--llama-python`, a venv with `llama-cpp-python`), one
subprocess per file, with weight repacking off (see docs/interop.md: AMX repacking faults on some
VMs; the plain kernels are what every build has).

    python -m venv /tmp/llama && /tmp/llama/bin/pip install llama-cpp-python numpy
    PYTHONPATH=. python benchmarks/gguf_quality.py --llama-python /tmp/llama/bin/python
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # the checkout's tinygpt
from tinygpt.cli import main as tinygpt  # noqa: E402
from tinygpt.data.corpus import window_batches  # noqa: E402
from tinygpt.eval.ppl import window_loss  # noqa: E402
from tinygpt.interop.gguf import export_gguf  # noqa: E402
from tinygpt.load import load_model_and_tokenizer  # noqa: E402

DTYPES = ("f32", "f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")

# Runs in the llama.cpp Python: argv = gguf path, windows .npy, ctx; prints the mean NLL per token.
LLAMA_SCRIPT = r"""
import json, sys
import numpy as np
import llama_cpp
plain = llama_cpp.llama_cpp.llama_model_default_params
def no_repack():
    p = plain(); p.use_extra_bufts = False; return p
llama_cpp.llama_cpp.llama_model_default_params = no_repack
path, wins, ctx = sys.argv[1], np.load(sys.argv[2]), int(sys.argv[3])
llm = llama_cpp.Llama(model_path=path, n_ctx=ctx, n_batch=ctx, logits_all=True, verbose=False)
V = llm.n_vocab()
total = count = 0.0
for w in wins:
    llm.reset()
    llm.eval(w[:-1].tolist())
    z = np.asarray(llm.scores[:len(w) - 1], dtype=np.float64)[:, :V]
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    total -= logp[np.arange(len(w) - 1), w[1:]].sum()
    count += len(w) - 1
print(json.dumps({"nll": total / count}))
"""


def train_model(work: Path, steps: int, held_frac: float) -> tuple[Path, str]:
    """A tiny model on the synthetic corpus minus its last documents; returns (model, held-out text)."""
    assert tinygpt(["data", "synth", "--out", str(work / "data")]) == 0
    docs = (work / "data" / "corpus.txt").read_text().split("\n\n")
    cut = int(len(docs) * (1 - held_frac))
    (work / "train.txt").write_text("\n\n".join(docs[:cut]))
    assert tinygpt(["train", "--corpus", str(work / "train.txt"), "--preset", "tiny", "--vocab-size", "1024",
                    "--ctx", "128", "--steps", str(steps), "--batch", "16", "--lr", "3e-3", "--device", "cpu",
                    "--quiet", "--out", str(work / "m.tinygpt")]) == 0
    return work / "m.tinygpt", "\n\n".join(docs[cut:])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-python", required=True, help="a Python with llama-cpp-python installed")
    ap.add_argument("--model", help="a .tinygpt to quantise (default: train one on the synthetic corpus)")
    ap.add_argument("--text", help="held-out text for --model (default: the synthetic corpus' tail)")
    ap.add_argument("--steps", type=int, default=600, help="training steps of the model made here")
    ap.add_argument("--held-frac", type=float, default=0.05)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--windows", type=int, default=64, help="held-out windows scored")
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--out", default="runs/gguf_quality.json")
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="gguf-quality-"))
    if a.model:
        model_path, text = Path(a.model), Path(a.text).read_text()
    else:
        model_path, text = train_model(work, a.steps, a.held_frac)
    model, tok = load_model_and_tokenizer(model_path)
    model.eval()
    ids = np.asarray(tok.encode(text), dtype=np.int64)
    batches = list(window_batches(ids, a.ctx, 16, max_tokens=a.windows * a.ctx))
    wins = np.concatenate([torch.cat([x, y[:, -1:]], 1).numpy() for x, y in batches])      # (W, ctx + 1)
    np.save(work / "windows.npy", wins)
    with torch.no_grad():
        ours = window_loss(model, batches)
    rows = [{"dtype": "tinygpt float32", "bytes": model_path.stat().st_size, "ppl": float(np.exp(ours))}]
    for dtype in a.dtypes.split(","):
        path = work / f"m-{dtype}.gguf"
        export_gguf(model, tok, path, dtype)
        r = subprocess.run([a.llama_python, "-c", LLAMA_SCRIPT, str(path), str(work / "windows.npy"), str(a.ctx)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"llama.cpp failed on {dtype}: {r.stderr.strip().splitlines()[-1:]}")
        nll = json.loads(r.stdout.strip().splitlines()[-1])["nll"]
        rows.append({"dtype": dtype, "bytes": path.stat().st_size, "ppl": float(np.exp(nll))})
    f16 = next((r for r in rows if r["dtype"] == "f16"), rows[0])
    print(f"{model_path} ({model.num_params() / 1e6:.2f}M parameters), {len(wins)} held-out windows of {a.ctx}")
    print("| file | size | size vs f16 | perplexity | vs f16 |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dtype']} | {r['bytes'] / 2**20:.2f} MiB | {r['bytes'] / f16['bytes']:.2f}x | {r['ppl']:.4f} | "
              f"{100 * (r['ppl'] / f16['ppl'] - 1):+.2f}% |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"model": str(model_path), "windows": len(wins), "ctx": a.ctx, "rows": rows},
                                      indent=1))


if __name__ == "__main__":
    main()
