"""Run tinygpt commands under N processes on the CPU, as torchrun would, for the distributed tests.

`run_ranks(world, commands, tmp)` spawns `world` processes; each sets the variables torchrun sets
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), joins a gloo group through a FileStore in `tmp`
(no TCP port to pick, so no race for a free one), then runs every argv of `commands` in turn
through `tinygpt.cli.main`, as `torchrun -m tinygpt.cli ...` does, and returns their exit codes.
`stop_at` interrupts each command at a round, as Ctrl-C does, to test --resume across world sizes.
One spawn runs many commands, so the start-up of the processes (importing torch) is paid once.
`torchrun(world, argv)` runs the real launcher (`torch.distributed.run --standalone`, whose
rendezvous binds its own port) in a subprocess, for the test of the command line users type.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tinygpt.cli import main
from tinygpt.train.engine import Engine

ROOT = Path(__file__).resolve().parents[1]


def _rank_main(rank: int, world: int, tmp: str, commands: list, env: dict, stop_at: int | None) -> None:
    os.environ.update(env, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    if stop_at is not None:              # Ctrl-C on every rank when training reaches round `stop_at`
        real = Engine._round

        def _round(self):
            if self.round == stop_at:
                raise KeyboardInterrupt
            return real(self)
        Engine._round = _round
    store = dist.FileStore(os.path.join(tmp, "dist-store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        codes = [main(list(argv)) for argv in commands]
        dist.barrier()      # no rank tears the group down while another may still be in a collective
    finally:
        dist.destroy_process_group()
    Path(tmp, f"codes{rank}.json").write_text(json.dumps(codes))


def run_ranks(world: int, commands: list[list[str]], tmp, env: dict | None = None,
              stop_at: int | None = None) -> list[int]:
    """Exit codes of `commands` run in order on `world` gloo ranks (the same on every rank);
    `stop_at`: each is interrupted (Ctrl-C) when it reaches that round."""
    tmp = str(tmp)
    store = Path(tmp, "dist-store")
    if store.exists():
        store.unlink()                   # a FileStore file is for one group only
    mp.spawn(_rank_main, args=(world, tmp, commands, env or {}, stop_at), nprocs=world, join=True)
    codes = [json.loads(Path(tmp, f"codes{r}.json").read_text()) for r in range(world)]
    assert all(c == codes[0] for c in codes), codes
    return codes[0]


def torchrun(world: int, argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node world -m tinygpt.cli argv` from the checkout."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           "-m", "tinygpt.cli", *argv]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
