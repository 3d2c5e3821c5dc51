"""`tinygpt serve`: an OpenAI-compatible server for a model and its adapters, and a chat page.

Design choices:
- Everything a request may use is loaded at start-up: the model, the `--lora` stack and the
  adapters of `--adapters DIR`; a request can name them, never a path. Listening is on loopback
  unless --host says otherwise; --api-key (or $TINYGPT_API_KEY) guards /v1/*.
- uvicorn runs the ASGI app in this process; the model, its slot engine and the scheduler run in
  a process of their own (`worker.py`; `--no-engine-process` keeps them in this one). Graceful
  shutdown (SIGINT / SIGTERM) lets open responses finish before the scheduler is closed.
- One event loop parses, tokenizes and submits the requests one after another and writes every
  stream: under a burst of requests that serial work, not the model, delays the first tokens.
  `--http-workers N` runs N HTTP processes on the one listening socket (the kernel hands each
  connection to one of them), each with a pipe of its own to the engine process, as vLLM's
  API-server count does; this process starts the others and stops them first at shutdown.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass

import uvicorn

from ..device import DTYPE_NAMES, DeviceOptions
from ..errors import UserError
from ..options import SEED, at_least, between, option
from ..stages.common import ModelOptions, TemplateOptions, check_inputs, lora_specs
from .adapters import AdapterNames, adapter_files
from .app import create_app
from .scheduler import Scheduler, settle_interpreter
from .service import Service
from .worker import RemoteScheduler, load_engine

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeOptions(ModelOptions, TemplateOptions, DeviceOptions):
    """Where to listen and how many sequences to run at once."""

    command = "serve"
    group = "serve"
    adapters: str | None = option(None, "folder of .lora files, each served under its file name")
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 opens it to the network)")
    port: int = option(8000, "port to listen on", check=between(1, 65535))
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on /v1/*",
                                 auto="$TINYGPT_API_KEY, else no key")
    max_batch: int = option(64, "sequences decoded together (KV-cache slots)", check=at_least(1))
    max_queue: int = option(1024, "sequences waiting for a slot before requests get 429", check=at_least(1))
    prefill_tokens: int = option(2048, "prompt tokens prefilled per scheduler step (at least one prompt)",
                                 check=at_least(1))
    stream_interval: float = option(0.02, "seconds between a running stream's chunks (first tokens and ends go at "
                                    "once; 0: a chunk every step)", check=between(0, 1))
    max_body: int = option(1 << 20, "largest request body, in bytes", check=at_least(1024))
    dtype: str = option("auto", "weights and KV cache dtype", choices=DTYPE_NAMES)
    cuda_graph: bool = option(True, "replay decode steps as CUDA graphs on CUDA", negate="--no-cuda-graph")
    seed: int = option(0, "seed of the sampler of requests without a seed", check=SEED)
    log_level: str = option("info", "uvicorn's log level", choices=("critical", "error", "warning", "info", "debug"))
    engine_process: bool = option(True, "run the model and its scheduler in a process of their own, apart from "
                                  "the HTTP server (the two never wait for one interpreter lock)",
                                  negate="--no-engine-process")
    http_workers: int = option(1, "HTTP server processes in front of the engine process, each parsing, "
                               "tokenizing and streaming its share of the requests", check=at_least(1))


def build_service(opts: ServeOptions, engine_process: bool = False, conn=None) -> Service:
    """The model, its served adapters, the slot engine and the scheduler (not started): in this
    process, or with `engine_process` in a process of their own (`worker.py`; with --http-workers
    N, its scheduler's `spare` holds the pipes of the N-1 other HTTP processes), or over `conn`,
    a pipe of an engine process that another process started."""
    check_inputs(opts)
    files = adapter_files(lora_specs(opts), opts.adapters)
    if engine_process or conn is not None:
        scheduler = RemoteScheduler(opts, conn) if conn is not None else \
            RemoteScheduler.spawn(opts, files, opts.http_workers)
        tok, block, vocab = scheduler.tok, scheduler.block_size, scheduler.vocab_limit
        adapters = AdapterNames(files) if files else None
    else:
        tok, adapters, engine = load_engine(opts, files)
        scheduler = Scheduler(engine, None, opts.max_queue, opts.prefill_tokens)
        block, vocab = engine.model.config.block_size, engine.vocab_limit
    stack = [(name, w) for (name, _), (_, w) in zip(files, lora_specs(opts))]
    return Service(tok, block, vocab, scheduler, opts.model, stack, adapters, opts.template, opts.stream_interval)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (a user error when that is impossible), before any loading."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})", "--host/--port",
                        "pick another port or address") from None
    return sock


def serve_command(opts: ServeOptions) -> None:
    """Serve until SIGINT / SIGTERM."""
    key = opts.api_key if opts.api_key is not None else os.environ.get("TINYGPT_API_KEY") or None
    if key is not None and not key.strip():
        raise UserError("--api-key is empty", None, "give a key or leave the option out")
    if opts.http_workers > 1 and not opts.engine_process:
        raise UserError("--http-workers needs the engine process", "--http-workers",
                        "leave out --no-engine-process, or use one HTTP process")
    sock = listen(opts.host, opts.port)
    service = build_service(opts, opts.engine_process)
    ids = ", ".join(service.stacks)
    print(f"serving {ids} on http://{opts.host}:{opts.port} (chat page at /, API at /v1)", file=sys.stderr)
    if opts.host not in LOOPBACK and key is None:
        print("warning: listening beyond loopback without --api-key: anyone who can reach this port can use it",
              file=sys.stderr)
    config = uvicorn.Config(create_app(service, key, opts.max_body), log_level=opts.log_level)
    if opts.engine_process:
        _start_http_workers(opts, key, sock, service.scheduler)
    settle_interpreter()
    uvicorn.Server(config).run(sockets=[sock])


def _start_http_workers(opts: ServeOptions, key, sock, scheduler) -> None:
    """The other HTTP processes of --http-workers: each accepts connections on the same socket and
    talks to the engine over a pipe of its own; this process's scheduler stops them at shutdown."""
    ctx = mp.get_context("spawn")
    for conn in scheduler.spare:
        worker = ctx.Process(target=_http_worker_main, args=(opts, key, conn, sock), name="tinygpt-http", daemon=True)
        worker.start()
        conn.close()
        scheduler.workers.append(worker)


def _http_worker_main(opts: ServeOptions, key, conn, sock) -> None:
    """One more HTTP process. SIGTERM (sent by the first process at its shutdown) finishes its open
    responses, then closes its pipe (and so does the death of the first process); Ctrl-C reaches
    the whole process group and is left to the first process. uvicorn runs off the main thread,
    so it installs no signal handlers of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = mp.parent_process()    # its sentinel tells when the first process is gone
    service = build_service(opts, conn=conn)
    server = uvicorn.Server(uvicorn.Config(create_app(service, key, opts.max_body), log_level=opts.log_level))
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    settle_interpreter()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="tinygpt-http")
    thread.start()
    while thread.is_alive():        # the main thread stays free to take the signal
        thread.join(0.5)
        if not parent.is_alive():   # the first process was killed outright: stop as on SIGTERM
            server.should_exit = True


serve_command.manages_signals = True   # uvicorn: SIGTERM finishes in-flight requests, then exits
