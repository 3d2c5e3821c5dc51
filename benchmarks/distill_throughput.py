"""Distillation throughput: real tokens/s and peak GPU memory, a GPT-2-shaped student (124M) learning
from a GPT-2-medium-shaped teacher (350M), beside TRL's GKDTrainer with lmbda=0 (off-policy) in the
same run (`--trl`; TRL is optional: without it only tinygpt runs).

Both sides get the same conversations (Alpaca-GPT4 by default; the synthetic world's SFT file when
that is absent), the same byte-level BPE trained on them, the same model shapes (GPT-2 blocks;
vocabulary padded to 50304), full fine-tuning of the student, a frozen bf16 teacher, and the
generalised JSD with beta 0.5 on the response tokens (GKDConfig's defaults):
  tinygpt  `DistillTrainer` (the `tinygpt distill` path): conversations packed into rows of --ctx
           with block-diagonal attention, the loss on the scored positions' hidden states a chunk at
           a time (no (N, V) logits), bf16 autocast, torch.compile of the blocks (unless --no-compile).
  trl      `trl.experimental.gkd.GKDTrainer` (TRL 1.16) on transformers' GPT2LMHeadModel, its
           DataCollatorForChatML (one conversation per row, padded), bf16, --trl-batch rows.
Tokens/s counts real tokens (prompt and response, no padding) over the timed steps after
--warmup-steps. Each side runs in its own process, so peaks (torch.cuda.max_memory_allocated over
the whole run, weights included) and compile caches do not mix. The last line is a JSON summary.

GPU:  PYTHONPATH=. python3 benchmarks/distill_throughput.py --trl
CPU:  PYTHONPATH=. python3 benchmarks/distill_throughput.py --device cpu --student 2,64,2 --teacher 2,96,2 \\
          --ctx 128 --batch 2 --trl-batch 2 --steps 2 --warmup-steps 1 --no-compile --vocab-size 512 \\
          --model-vocab 512 --limit 64 [--trl]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinygpt.chat import get_template  # noqa: E402
from tinygpt.config import ARCHS, ModelConfig  # noqa: E402
from tinygpt.data import synth  # noqa: E402
from tinygpt.data.formats import load_sft  # noqa: E402
from tinygpt.model import GPT  # noqa: E402
from tinygpt.stages.distill import DistillOptions, DistillTrainer  # noqa: E402
from tinygpt.tokenizer import PAD, Tokenizer  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sft" / "alpaca_gpt4_demo.json"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(DATA), help="SFT file (default: Alpaca-GPT4, else the synthetic world)")
    p.add_argument("--limit", type=int, default=0, help="first N conversations (0 = all)")
    p.add_argument("--student", default="12,768,12", help="layers,width,heads (GPT-2 124M)")
    p.add_argument("--teacher", default="24,1024,16", help="layers,width,heads (GPT-2 medium, 350M)")
    p.add_argument("--model-vocab", type=int, default=50304)
    p.add_argument("--vocab-size", type=int, default=32768, help="BPE trained on the data")
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16, help="tinygpt: packed rows of --ctx per step")
    p.add_argument("--trl-batch", type=int, default=8, help="TRL: conversations per step")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup-steps", type=int, default=5, help="untimed steps first (compilation)")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--teacher-topk", type=int, default=0, help="tinygpt: cache the teacher's top-k (0: live)")
    p.add_argument("--grad-checkpointing", action="store_true", help="both sides")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--trl", action="store_true", help="also run TRL's GKDTrainer (lmbda=0) in the same run")
    p.add_argument("--only", choices=["tinygpt", "trl"], help=argparse.SUPPRESS)   # one side, in this process
    return p.parse_args()


def _shape(spec: str) -> dict:
    n_layer, n_embd, n_head = (int(x) for x in spec.split(","))
    return dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head)


def _config(spec: str, a) -> ModelConfig:
    return ModelConfig(**ARCHS["gpt2"], **_shape(spec), vocab_size=a.model_vocab, block_size=max(a.ctx, 128))


def _device(a) -> torch.device:
    return torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                        "cpu" if a.device == "auto" else a.device)


def _data(a, tmp: Path):
    """(conversations, tokenizer trained on their chatml rendering)."""
    path = Path(a.data)
    if not path.exists():
        path = synth.generate(tmp / "synth", seed=0, scale=0.1)["sft"]
    convs, _ = load_sft(path)
    convs = convs[:a.limit] if a.limit else convs
    tmpl = get_template("chatml")
    tok = Tokenizer.train(["".join(s.text for s in tmpl.render(c)) for c in convs], a.vocab_size)
    return convs, tok, path


def _peak() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def run_tinygpt(a, convs, tok, tmp: Path) -> dict:
    dev = _device(a)
    torch.manual_seed(0)
    student = GPT(_config(a.student, a))
    teacher = GPT(_config(a.teacher, a)).to(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    teacher.eval().requires_grad_(False)
    opts = DistillOptions(model="student", teacher="teacher", out=str(tmp / "student.tinygpt"), full=True,
                          template="chatml", ctx=a.ctx, batch=a.batch, steps=a.warmup_steps + a.steps, lr=a.lr,
                          warmup=0, beta=a.beta, temperature=1.0, teacher_topk=a.teacher_topk,
                          grad_checkpointing=a.grad_checkpointing, compile=not a.no_compile, device=str(dev),
                          dtype="bfloat16" if dev.type == "cuda" else "float32", quiet=True)
    logs: list = []
    t0 = time.perf_counter()
    DistillTrainer(opts, student, tok, convs, teacher=teacher, teacher_tokenizer=tok, log=logs.append).train()
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (tmp / "student.run" / "metrics.jsonl").read_text().splitlines()]
    timed = rows[a.warmup_steps:]
    toks = [r["tokens"] for r in timed]
    secs = [t / max(r["tokens_per_s"], 1e-9) for t, r in zip(toks, timed)]
    return {"side": "tinygpt", "tokens_per_s": sum(toks) / max(sum(secs), 1e-9), "peak_gib": _peak(),
            "tokens_per_step": sum(toks) / len(toks), "final_loss": rows[-1]["loss"], "wall_s": wall,
            "log": [m for m in logs if m.startswith(("SFT data", "full", "caching"))]}


def _hf_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=tok.tk, pad_token=PAD, eos_token="<|im_end|>",
                                   chat_template=CHATML, model_max_length=10**6)


def run_trl(a, convs, tok, tmp: Path) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    dev = _device(a)

    def hf(spec):
        s = _shape(spec)
        return GPT2LMHeadModel(GPT2Config(n_layer=s["n_layer"], n_embd=s["n_embd"], n_head=s["n_head"],
                                          n_positions=max(a.ctx, 128), vocab_size=a.model_vocab))
    torch.manual_seed(0)
    student, teacher = hf(a.student), hf(a.teacher)
    if dev.type == "cuda":
        teacher = teacher.to(torch.bfloat16)
    rows = [{"messages": [{"role": m.role, "content": m.content} for m in c.messages]} for c in convs]
    marks: list = []          # (perf_counter at step end, real tokens of the step)
    seen: list = []

    class Counting(GKDTrainer):
        def compute_loss(self, model, inputs, *args, **kw):
            seen.append(int(inputs["attention_mask"].sum()))
            return super().compute_loss(model, inputs, *args, **kw)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            marks.append((time.perf_counter(), seen[-1] if seen else 0))

    cfg = GKDConfig(output_dir=str(tmp / "trl"), lmbda=0.0, beta=a.beta, max_length=a.ctx,
                    per_device_train_batch_size=a.trl_batch, max_steps=a.warmup_steps + a.steps, learning_rate=a.lr,
                    lr_scheduler_type="constant", logging_steps=10**6, save_strategy="no", report_to="none",
                    bf16=dev.type == "cuda", use_cpu=dev.type == "cpu", gradient_checkpointing=a.grad_checkpointing,
                    dataloader_num_workers=0, seed=0)
    trainer = Counting(model=student, teacher_model=teacher, args=cfg, train_dataset=Dataset.from_list(rows),
                       processing_class=_hf_tokenizer(tok), callbacks=[Clock()])
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    timed = marks[a.warmup_steps - 1:] if a.warmup_steps else [(t0, 0)] + marks
    secs = timed[-1][0] - timed[0][0]
    toks = sum(t for _, t in timed[1:])
    import trl
    return {"side": "trl", "version": trl.__version__, "tokens_per_s": toks / max(secs, 1e-9), "peak_gib": _peak(),
            "tokens_per_step": toks / max(len(timed) - 1, 1), "wall_s": wall}


def main():
    a = parse()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if a.only:                                        # one side, in this process
            convs, tok, _ = _data(a, tmp)
            print(json.dumps((run_tinygpt if a.only == "tinygpt" else run_trl)(a, convs, tok, tmp)), flush=True)
            return
        dev = torch.cuda.get_device_name() if _device(a).type == "cuda" else "cpu"
        print(f"device: {dev}, torch {torch.__version__}; student {a.student}, teacher {a.teacher} (layers,width,"
              f"heads), ctx {a.ctx}", flush=True)
        results = {}
        for side in ["tinygpt"] + (["trl"] if a.trl else []):
            argv = [sys.executable, __file__, *sys.argv[1:], "--only", side]
            out = subprocess.run(argv, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{side} failed:\n{out.stderr[-4000:]}")
            results[side] = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps(results[side]), flush=True)
    print("\n| side | real tokens/s | tokens/step | peak GiB |\n|---|---:|---:|---:|")
    for side, r in results.items():
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        print(f"| {side} | {r['tokens_per_s']:,.0f} | {r['tokens_per_step']:,.0f} | {peak} |")
    summary = {"bench": "distill_throughput", "device": dev, "torch": torch.__version__, "student": a.student,
               "teacher": a.teacher, "ctx": a.ctx, "batch": a.batch, "trl_batch": a.trl_batch, "beta": a.beta,
               "compile": not a.no_compile, "teacher_topk": a.teacher_topk,
               "tokens_per_s": {k: round(v["tokens_per_s"]) for k, v in results.items()},
               "peak_gib": {k: v["peak_gib"] and round(v["peak_gib"], 2) for k, v in results.items()}}
    if "trl" in results:
        summary["ratio"] = round(results["tinygpt"]["tokens_per_s"] / max(results["trl"]["tokens_per_s"], 1e-9), 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
