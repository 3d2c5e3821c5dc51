"""Time one PPO (or, with --algo grpo, GRPO) iteration of a GPT-2-shaped policy, split into generation
/ scoring (reward model + reference + values + behaviour log-probs) / training, and report the peak
GPU memory. GRPO samples --batch rollouts too: --batch / --group prompts, --group completions each,
no value head.

Roles as `tinygpt ppo` sets them up: frozen bf16 base + trainable float32 LoRA adapter (policy),
the same model with the adapter off (reference), a value head on the policy's hidden states, and a
separate GPT-2-shaped reward model in bf16. Random weights and prompts; the first iteration
(CUDA-graph capture, kernel compilation) is reported apart from the median of the others.

    PYTHONPATH=. python3 benchmarks/ppo_step.py                                     # GPU, gpt2 shape
    PYTHONPATH=. python3 benchmarks/ppo_step.py --device cpu --layers 2 --embd 64 --heads 2 --vocab 512 \
        --batch 4 --prompt-len 8 --new-tokens 8 --minibatch 2 --iters 2             # CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile

import torch

from tinygpt.config import ModelConfig
from tinygpt.lora import apply_lora
from tinygpt.model import GPT
from tinygpt.reward_model import RewardModel
from tinygpt.rollout import Prompt
from tinygpt.stages.rl import GRPOOptions, GRPOTrainer, PPOOptions, PPOTrainer
from tinygpt.train.engine import prepare
from tinygpt.verifiers import ModelReward


class VocabOnly:
    """The tokenizer surface the trainer uses, for a model with random weights and token ids."""

    def __init__(self, vocab: int):
        self.vocab_size, self.pad_id = vocab, 0

    def stop_ids(self):
        return []          # ignore EOS: every response is --new-tokens long

    def decode(self, ids):
        return ""

    def to_json(self):
        return "vocab-only"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--embd", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--batch", type=int, default=64, help="prompts (= rollouts) per iteration")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--minibatch", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--algo", choices=("ppo", "grpo"), default="ppo")
    ap.add_argument("--compile", action="store_true", help="--compile: the policy's blocks compiled for training")
    ap.add_argument("--group", type=int, default=4, help="GRPO: completions per prompt")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("gpt2", vocab_size=a.vocab, n_layer=a.layers, n_embd=a.embd, n_head=a.heads,
                                block_size=max(1024, a.prompt_len + a.new_tokens))
    tok = VocabOnly(a.vocab)
    policy = GPT(cfg).to(device, dtype)
    apply_lora(policy, a.lora_rank, 2 * a.lora_rank, name="ppo")
    for p in policy.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    rm = RewardModel(GPT(cfg), tok).to(device, dtype).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    prompts = [Prompt([], None, "", torch.randint(1, a.vocab, (a.prompt_len,), generator=g).tolist())
               for _ in range(a.batch)]
    common = dict(out=tempfile.mkdtemp() + "/rl.lora", steps=a.iters, max_new_tokens=a.new_tokens,
                  minibatch=a.minibatch, ppo_epochs=a.epochs, samples=0, lr=1e-5, lr_schedule="constant",
                  dtype=a.dtype, quiet=True, device=str(device), compile=a.compile)
    if a.algo == "grpo":      # the same number of rollouts: batch / group prompts, group completions each
        opts, cls = GRPOOptions(batch=max(1, a.batch // a.group), group_size=a.group, **common), GRPOTrainer
    else:
        opts, cls = PPOOptions(batch=a.batch, **common), PPOTrainer
    trainer = cls(opts, policy, tok, prompts=prompts, reward=ModelReward(rm, tok, None, batch=a.minibatch),
                  reference="ppo", stop_ids=[], log=lambda *m: None)
    prepare(trainer)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rows = [trainer.iteration(trainer.engine, it) for it in range(a.iters)]
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    keys = ("time_generate", "time_score", "time_train")
    steady = rows[1:] or rows
    med = {k: statistics.median(r[k] for r in steady) for k in keys}
    total = sum(med.values())
    n_tok = opts.batch * opts.group_size * a.new_tokens
    print(f"{'phase':>10} {'first (s)':>10} {'median (s)':>11} {'share':>6}")
    for k in keys:
        print(f"{k[5:]:>10} {rows[0][k]:>10.3f} {med[k]:>11.3f} {med[k] / total:>6.1%}")
    print(f"iteration {total:.3f} s, {n_tok / total:,.0f} response tokens/s, "
          f"{rows[-1]['updates']} optimizer steps, peak memory {peak:.2f} GiB")
    print(json.dumps({"bench": "ppo_step", "algo": a.algo, "compile": a.compile, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      "layers": a.layers, "embd": a.embd, "batch": a.batch, "prompt_len": a.prompt_len,
                      "new_tokens": a.new_tokens, "minibatch": a.minibatch, "epochs": a.epochs,
                      "first": {k: rows[0][k] for k in keys}, "median": med, "iteration_s": total,
                      "response_tokens_per_s": n_tok / total, "peak_mem_gib": peak}))


if __name__ == "__main__":
    main()
