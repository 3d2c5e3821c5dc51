"""One tinygpt command line in a process of its own, optionally SIGKILLed (no clean-up, as a power
cut or the OOM killer would) at a chosen point of a file write. The fault suite
(tests/test_faults.py) and benchmarks/fault_sweep.py start it:

    python tests/fault_child.py [--kill WHEN:NAME:N] -- ARGV...

WHEN  before-rename  the temp file is written and fsynced, the rename over NAME not yet done
      after-rename   NAME is in place and nothing after that write has run
      mid-write      half of the temp file's bytes are written (a torn write)
NAME  the file written (state.safetensors, m.tinygpt, ...); N: the N-th write of it (1-based).
The process computes on one thread, as the suite's reference runs do, so runs are bit-comparable.
`mount_tmpfs` and `fill_disk` make the small and full disks of the suite and the sweep.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))    # this checkout's tinygpt

from tinygpt.cli import main as tinygpt_main  # noqa: E402


def mount_tmpfs(path: Path, size_kb: int) -> bool:
    """Mount a tmpfs of `size_kb` KiB at `path` (only as root, where mounting is allowed)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def fill_disk(folder: Path) -> None:
    """Fill the file system of `folder` to its last byte."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    for size in (1 << 16, 4096, 1):
        while True:
            try:
                if os.write(fd, b"\0" * size) == 0:
                    break
            except OSError:
                break
    os.close(fd)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install_kill(spec: str) -> None:
    """Patch os.replace (every atomic write ends with it) and Path.write_bytes (how the temp file
    of a safetensors write is filled) to kill this process at the point `spec` names."""
    when, name, n = spec.split(":")
    seen = {"n": 0}

    def hit() -> bool:
        seen["n"] += 1
        return seen["n"] == int(n)

    def ours(tmp) -> bool:
        return Path(tmp).name.startswith(f".{name}.")
    real_replace, real_write = os.replace, Path.write_bytes

    def replace(src, dst, *a, **k):
        if Path(dst).name != name or not ours(src):
            return real_replace(src, dst, *a, **k)
        if when == "before-rename" and hit():
            _die()
        real_replace(src, dst, *a, **k)
        if when == "after-rename" and hit():
            _die()

    def write_bytes(self, data):
        if when == "mid-write" and ours(self) and self.name.endswith(".tmp") and hit():
            with open(self, "wb") as f:
                f.write(bytes(data)[:len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            _die()
        return real_write(self, data)
    os.replace = replace
    Path.write_bytes = write_bytes


if __name__ == "__main__":
    torch.set_num_threads(1)
    args = sys.argv[1:]
    if args[:1] == ["--kill"]:
        install_kill(args[1])
        args = args[2:]
    if args[:1] != ["--"]:
        sys.exit("usage: fault_child.py [--kill WHEN:NAME:N] -- ARGV...")
    sys.exit(tinygpt_main(args[1:]))
