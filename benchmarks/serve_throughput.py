"""Serving throughput: new tokens/s and time to first token (TTFT) of `tinygpt serve` at 1, 16, 64
and 256 concurrent streams, next to the static batched `generate` of the same batch (on a GPU), or
next to llama.cpp's server (llama-cpp-python) serving our f16 GGUF export of the same model (CPU).

The model is GPT-2 shaped with random weights (seeded), its tokenizer a 2048-token byte-level BPE
trained on random words: prompts are --prompt-len tokens of such words, sampling is greedy over the
tokenizer's ids, and every stream runs to --new-tokens (`ignore_eos`). Each column is measured the same way for every
concurrency: one warm-up round (it also captures the server's CUDA graphs for that batch), then
the median of --repeats rounds.
- static: `generate` on the batch of all the round's prompts at once: the ceiling.
- engine: the server's scheduler and slot engine in this process, all sequences submitted at
  once, no HTTP (what the HTTP layer costs is the gap to the next column).
- server: `tinygpt serve` in its own process; the streams are sent at once by client processes
  (--client-procs) over loopback HTTP as streamed /v1/completions. tokens/s = all new tokens /
  (last stream done - first request sent). TTFT: request sent -> first token event.
- llama.cpp (with --llama-python): `python -m llama_cpp.server` of that Python (a venv with
  `llama-cpp-python[server]`) on the GGUF export, the same prompts, concurrency and client. Its
  tokens are counted from its stream (it has no ignore_eos: a stream may end early; counted as
  produced). llama-cpp-python's server runs one request at a time (no continuous batching); it is
  started with --interrupt_requests False, so a new request waits instead of cutting the running one.

    PYTHONPATH=. python3 benchmarks/serve_throughput.py                          # GPU, gpt2 shape
    PYTHONPATH=. python3 benchmarks/serve_throughput.py --device cpu --dtype float32 --vocab 2048 \
        --streams 1,4,16 --new-tokens 32 --threads 1 --llama-python /path/to/venv/bin/python   # CPU vs llama.cpp

On the CPU give --vocab 2048 (the tokenizer's size): with a wider head llama.cpp samples over the
placeholder ids of the padded GGUF vocabulary too (empty text), tinygpt only over real tokens.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from benchmarks.generate_throughput import generation_args, timed
from tinygpt.checkpoint import save_model
from tinygpt.config import ModelConfig
from tinygpt.generate import generate
from tinygpt.interop.gguf import export_gguf
from tinygpt.load import load_model_and_tokenizer
from tinygpt.model import GPT
from tinygpt.serve.engine import SlotEngine
from tinygpt.serve.scheduler import Job, Params, Scheduler, Sequence
from tinygpt.serve.text import Detokenizer
from tinygpt.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _words(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(letters[i] for i in torch.randint(0, 26, (int(k),), generator=g).tolist())
            for k in torch.randint(2, 8, (n,), generator=g)]


def make_tokenizer() -> Tokenizer:
    """A byte-level BPE with merges (llama.cpp needs them) trained on random words."""
    vocab = _words(3000, 1)
    g = torch.Generator().manual_seed(2)
    text = " ".join(vocab[i] for i in torch.randint(0, len(vocab), (60000,), generator=g).tolist())
    return Tokenizer.train([text], vocab_size=2048)


def make_model(a, folder: Path) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("gpt2", vocab_size=a.vocab, n_layer=a.layers, n_embd=a.embd, n_head=a.heads,
                                block_size=max(1024, a.prompt_len + a.new_tokens + 8))
    model = GPT(cfg)
    with torch.no_grad():     # non-zero residual projections, so no block is the identity
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0, 0.02)
    path = folder / "gpt2-shape.tinygpt"
    save_model(path, model, make_tokenizer())
    return path


def prompts_for(n: int, length: int, seed: int, tok) -> list[str]:
    """n prompts of random words, `length` tokens each (or one more)."""
    words, out = _words(20 * n * length, 100 + seed), []
    for i in range(n):
        text, j = "", i * 20 * length
        while len(tok.encode(text)) < length:
            text = (text + " " + words[j]).strip()
            j += 1
        out.append(text)
    return out


# ---- in-process columns -------------------------------------------------------------------------------
def static_tok_s(model, tok, prompts, a) -> float:
    ids = [tok.encode(p) for p in prompts]
    t, _ = timed(lambda: generate(model, ids, a.new_tokens, temperature=0, vocab_limit=tok.vocab_size),
                 a.repeats, model.lm_head.weight.device)
    print(f"static, {len(prompts)} prompts: {len(prompts) * a.new_tokens / t:,.0f} tok/s", file=sys.stderr, flush=True)
    return len(prompts) * a.new_tokens / t


def engine_round(model, tok, prompts, a, engine) -> dict:
    first, done = {}, {}
    t0 = time.perf_counter()

    def on_updates(ups):
        now = time.perf_counter()
        for s, u in ups:
            first.setdefault(s.index, now)
            if u.finish:
                done[s.index] = now
    sch = Scheduler(engine, on_updates, max_waiting=len(prompts) + 1).start()
    job, detok = Job(len(prompts)), Detokenizer(tok)
    sch.submit([Sequence(job, i, tok.encode(p), Params(max_new=a.new_tokens, temperature=0), (), detok)
                for i, p in enumerate(prompts)])
    sch.close()
    ttft = sorted(first[i] - t0 for i in first)
    return {"tok_s": len(prompts) * a.new_tokens / (max(done.values()) - t0), "ttft_p50": ttft[len(ttft) // 2]}


# ---- HTTP columns -------------------------------------------------------------------------------------
async def _streams(url: str, bodies: list[dict], ready, out) -> None:
    count_events = "stream_options" not in bodies[0]
    limits = httpx.Limits(max_connections=len(bodies) + 8, max_keepalive_connections=len(bodies) + 8)
    async with httpx.AsyncClient(limits=limits, timeout=600) as client:
        async def one(body):
            t_send = time.perf_counter()
            first, chunks, usage = None, 0, None
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    first = first or time.perf_counter()
                    if count_events:          # one token an event (no usage in that stream)
                        chunks += sum(bool(c.get("text")) or c.get("finish_reason") is None
                                      for c in json.loads(line[6:])["choices"])
                    elif '"usage":{' in line and '"choices":[]' in line:
                        usage = json.loads(line[6:])["usage"]["completion_tokens"]
            return t_send, first, time.perf_counter(), chunks if count_events else usage
        # a warm client, as a load generator keeps one: its first-use costs paid (~20 ms in a fresh
        # process) by one request before the clock starts; then every process goes together
        (await client.get(url + "/v1/models")).raise_for_status()
        ready.wait()
        out.extend(await asyncio.gather(*(one(b) for b in bodies)))


def _client_main(url, bodies, ready, queue) -> None:
    out: list = []
    asyncio.run(_streams(url, bodies, ready, out))
    queue.put(out)


def http_round(url: str, bodies: list[dict], procs: int) -> dict:
    """The client processes start their streams together, once all of them are ready (a spawned
    process takes seconds to import torch: a fixed head start let some begin a second late, which
    measured the stagger, not the server)."""
    before = _prefills(url)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = max(1, min(procs, len(bodies)))
    ready = ctx.Barrier(procs)
    workers = [ctx.Process(target=_client_main, args=(url, bodies[i::procs], ready, queue)) for i in range(procs)]
    for w in workers:
        w.start()
    rows = [r for _ in workers for r in queue.get()]
    for w in workers:
        w.join()
    t0, t1 = min(r[0] for r in rows), max(r[2] for r in rows)
    ttft = sorted(r[1] - r[0] for r in rows)
    res = {"tok_s": sum(r[3] for r in rows) / (t1 - t0), "ttft_p50": ttft[len(ttft) // 2],
           "ttft_p90": ttft[int(0.9 * (len(ttft) - 1))], "tokens": sum(r[3] for r in rows)}
    after = _prefills(url)
    if before is not None and after is not None:
        res["prefills"] = after - before
    return res


def _prefills(url: str):
    """The server's prefill forwards so far (tinygpt's /health counts them; None elsewhere)."""
    try:
        return httpx.get(url + "/health", timeout=10).json().get("prefills")
    except (httpx.HTTPError, ValueError, AttributeError):
        return None


def start_server(cmd: list[str], port: int, log: Path, env=None) -> subprocess.Popen:
    """Start a server (its output into `log`: a pipe nobody reads would block it) and wait for it."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measured(fn, repeats: int, label: str) -> dict:
    """Medians over `repeats` rounds after a warm-up round (CUDA graphs of this batch); each
    column's figures go to stderr as they come, so a run cut short still shows what it measured."""
    t0 = time.perf_counter()
    fn()
    runs = [fn() for _ in range(repeats)]
    res = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"{label}: " + ", ".join(f"{k} {v:,.3f}" for k, v in res.items()) +
          f" ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    generation_args(ap)
    ap.add_argument("--streams", default="1,16,64,256")
    ap.add_argument("--client-procs", type=int, default=4)
    ap.add_argument("--no-static", action="store_true", help="skip the static `generate` column")
    ap.add_argument("--no-engine", action="store_true", help="skip the in-process engine column")
    ap.add_argument("--llama-python", help="a Python with llama-cpp-python[server]: adds the llama.cpp column")
    ap.add_argument("--stream-interval", type=float, help="the server's --stream-interval (default: its own)")
    ap.add_argument("--server-flags", default="", help="more `tinygpt serve` flags, e.g. --server-flags=--no-engine-process")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads of both servers")
    a = ap.parse_args()
    streams = [int(s) for s in a.streams.split(",")]
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    torch.set_num_threads(a.threads)
    folder = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    path = make_model(a, folder)
    model, tok = load_model_and_tokenizer(path, device=device, dtype=dtype)
    rows = {s: {"streams": s} for s in streams}
    for s in streams:
        prompts = prompts_for(s, a.prompt_len, s, tok)
        if not a.no_static:
            rows[s]["static_tok_s"] = static_tok_s(model, tok, prompts, a)
        if not a.no_engine:
            engine = SlotEngine(model, s, model.config.block_size, tok.vocab_size)
            run = functools.partial(engine_round, model, tok, prompts, a, engine)
            rows[s].update({f"engine_{k}": v for k, v in measured(run, a.repeats, f"engine, {s} streams").items()})
            del engine
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    port = free_port()
    pythonpath = os.pathsep.join(d for d in (str(ROOT), os.environ.get("PYTHONPATH", "")) if d)  # the tree first
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": str(a.threads)}
    cmd = [sys.executable, "-m", "tinygpt.cli", "serve", str(path), "--port", str(port), "--device", a.device,
           "--dtype", a.dtype, "--max-batch", str(max(streams)), "--max-queue", str(4 * max(streams)),
           "--log-level", "warning"]
    if a.stream_interval is not None:
        cmd += ["--stream-interval", str(a.stream_interval)]
    cmd += a.server_flags.split()
    server = start_server(cmd, port, folder / "serve.log", env)
    body = {"model": path.stem, "ignore_eos": True, "stream_options": {"include_usage": True}}
    http_columns(a, server, port, streams, rows, "server", tok, body)
    if a.llama_python:
        llama_columns(a, path, streams, rows)
    report(a, streams, rows)


def llama_columns(a, path: Path, streams, rows) -> None:
    model, tok = load_model_and_tokenizer(path)
    gguf = path.with_suffix(".gguf")
    export_gguf(model, tok, gguf, "f16")
    port = free_port()
    server = start_server([a.llama_python, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                           "--port", str(port), "--n_ctx", str(model.config.block_size), "--n_threads", str(a.threads),
                           "--n_threads_batch", str(a.threads), "--interrupt_requests", "False"],
                          port, path.parent / "llama.log")
    http_columns(a, server, port, streams, rows, "llama", tok, {"model": "m"})


def http_columns(a, server, port: int, streams, rows, prefix: str, tok, body: dict) -> None:
    """The `prefix` columns: rounds of streamed completions against a started server, which is
    stopped at the end."""
    try:
        for s in streams:
            bodies = [{**body, "prompt": p, "max_tokens": a.new_tokens, "temperature": 0, "stream": True}
                      for p in prompts_for(s, a.prompt_len, s, tok)]
            run = functools.partial(http_round, f"http://127.0.0.1:{port}", bodies, a.client_procs)
            rows[s].update({f"{prefix}_{k}": v for k, v in measured(run, a.repeats, f"{prefix}, {s} streams").items()})
    finally:
        server.terminate()
        server.wait(60)


def report(a, streams, rows) -> None:
    cols = [("static_tok_s", "static tok/s"), ("engine_tok_s", "engine tok/s"), ("server_tok_s", "server tok/s"),
            ("server_ttft_p50", "TTFT p50 s"), ("server_ttft_p90", "TTFT p90 s"),
            ("server_prefills", "prefills a round"), ("llama_tok_s", "llama.cpp tok/s"),
            ("llama_ttft_p50", "llama TTFT p50 s")]
    cols = [c for c in cols if any(c[0] in rows[s] for s in streams)]
    for s in streams:
        r = rows[s]
        if r.get("static_tok_s"):
            r["server_vs_static"] = r["server_tok_s"] / r["static_tok_s"]
        if r.get("llama_tok_s"):
            r["server_vs_llama"] = r["server_tok_s"] / r["llama_tok_s"]
    ratios = [k for k in ("server_vs_static", "server_vs_llama") if k in rows[streams[0]]]
    print(f"{'streams':>8} " + " ".join(f"{t:>16}" for _, t in cols) + " " + " ".join(f"{k:>16}" for k in ratios))
    for s in streams:
        r = rows[s]
        print(f"{s:>8} " + " ".join(f"{r.get(k, float('nan')):>16,.3f}" if "ttft" in k else
                                    f"{r.get(k, float('nan')):>16,.0f}" for k, _ in cols)
              + " " + " ".join(f"{r.get(k, float('nan')):>16.2f}" for k in ratios))
    device = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"cpu x{a.threads}"
    print(json.dumps({"bench": "serve_throughput", "device": device, "dtype": a.dtype, "layers": a.layers,
                      "embd": a.embd, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
                      "rows": [rows[s] for s in streams]}))


if __name__ == "__main__":
    main()
