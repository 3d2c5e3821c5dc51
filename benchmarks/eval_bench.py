"""Evaluation throughput: log-likelihood scoring (multiple choice / perplexity) and batched generation.

Measures, on one model shape with random weights (throughput does not depend on the values):
  - `tinygpt.eval.choice.loglikelihood` over (context, continuation) requests, batched and sorted
    by length, against the same function at batch 1 (how lm-eval-style harnesses run by default)
    and, when `transformers` is installed, a shape-matched Hugging Face LlamaForCausalLM scoring the
    same padded batches (the usual `model(input_ids, attention_mask).logits` loop);
  - `tinygpt.eval.gen.complete` (greedy, KV cache, left padding) in new tokens per second.
Prints one JSON line at the end. Medians over --repeats runs.

    PYTHONPATH=. python3 benchmarks/eval_bench.py                      # GPU: gpt2 shape, bf16
    PYTHONPATH=. python3 benchmarks/eval_bench.py --preset nano --requests 64 --gen-prompts 8 \\
        --max-new-tokens 8 --repeats 1 --device cpu                    # a quick CPU check
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def timed(fn, repeats: int, device) -> float:
    """Median wall seconds of fn() over `repeats` runs, after one warm-up run."""
    fn()
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def make_requests(n, ctx_len, cont_len, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for _ in range(n):
        c = int(torch.randint(ctx_len // 2, ctx_len + 1, (1,), generator=g))
        k = int(torch.randint(max(1, cont_len // 2), cont_len + 1, (1,), generator=g))
        reqs.append((torch.randint(0, vocab, (c,), generator=g).tolist(),
                     torch.randint(0, vocab, (k,), generator=g).tolist()))
    return reqs


def hf_peer(cfg, dtype, device):
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    hc = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
                     num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                     intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.block_size)
    try:
        hc._attn_implementation = "sdpa"
    except Exception:
        pass
    return LlamaForCausalLM(hc).to(device=device, dtype=dtype).eval()


@torch.no_grad()
def hf_loglikelihood(model, requests, batch, device):
    """The common harness loop: right-padded batches, attention mask, full logits, gather."""
    out = []
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    for s in range(0, len(order), batch):
        rows = [requests[i][0] + requests[i][1] for i in order[s:s + batch]]
        T = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        att = torch.zeros(len(rows), T, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.tensor(r)
            att[b, :len(r)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=att.to(device)).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids.to(device)[:, 1:, None])[..., 0]
        for b, i in enumerate(order[s:s + batch]):
            c, k = len(requests[i][0]), len(requests[i][1])
            out.append(float(lp[b, c - 1:c - 1 + k].sum()))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--requests", type=int, default=2048, help="(context, continuation) pairs")
    ap.add_argument("--ctx-len", type=int, default=256, help="longest context (tokens)")
    ap.add_argument("--cont-len", type=int, default=24, help="longest continuation (tokens)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batch1-requests", type=int, default=256, help="requests timed at batch 1")
    ap.add_argument("--gen-prompts", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--gen-batch", type=int, default=128)
    ap.add_argument("--repeats", "--steps", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers peer")
    a = ap.parse_args()

    from tinygpt.config import ModelConfig
    from tinygpt.eval.choice import loglikelihood
    from tinygpt.eval.gen import complete
    from tinygpt.model import GPT
    from tinygpt.tokenizer import Tokenizer

    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          "cpu" if a.device == "auto" else a.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        a.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = ModelConfig.from_name(a.preset)
    torch.manual_seed(0)
    model = GPT(cfg).to(device=device, dtype=dtype).eval()
    tok = Tokenizer.byte_level()
    V = cfg.vocab_size
    reqs = make_requests(a.requests, min(a.ctx_len, cfg.block_size - a.cont_len), a.cont_len, V)
    n_tok = sum(len(c) + len(k) - 1 for c, k in reqs)
    res = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "preset": a.preset,
           "dtype": str(dtype).replace("torch.", ""), "requests": len(reqs), "batch": a.batch}

    t = timed(lambda: loglikelihood(model, reqs, a.batch), a.repeats, device)
    res["ll_requests_per_s"] = round(len(reqs) / t, 1)
    res["ll_tokens_per_s"] = round(n_tok / t)
    few = reqs[: a.batch1_requests]
    t1 = timed(lambda: loglikelihood(model, few, 1), a.repeats, device)
    res["ll_batch1_requests_per_s"] = round(len(few) / t1, 1)
    res["speedup_vs_batch1"] = round(res["ll_requests_per_s"] / res["ll_batch1_requests_per_s"], 2)

    peer = None if a.no_hf else hf_peer(cfg, dtype, device)
    if peer is not None:
        th = timed(lambda: hf_loglikelihood(peer, reqs, a.batch, device), a.repeats, device)
        res["hf_requests_per_s"] = round(len(reqs) / th, 1)
        res["speedup_vs_hf"] = round(res["ll_requests_per_s"] / res["hf_requests_per_s"], 2)
        del peer

    g = torch.Generator().manual_seed(1)
    plen = min(a.prompt_len, cfg.block_size - a.max_new_tokens - 1)
    prompts = [torch.randint(5, tok.vocab_size, (plen,), generator=g).tolist() for _ in range(a.gen_prompts)]
    tg = timed(lambda: complete(model, tok, prompts, a.max_new_tokens, a.gen_batch, stop_ids=[]), a.repeats, device)
    res["gen_new_tokens_per_s"] = round(a.gen_prompts * a.max_new_tokens / tg)
    res["gen_prompts_per_s"] = round(a.gen_prompts / tg, 1)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
