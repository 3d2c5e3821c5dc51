"""Files: atomic writes and safetensors reading/writing. The bottom layer (imports only errors).

Design choices:
- Every write goes to a temp file in the same folder, is fsync'ed, then renamed over the target:
  a crash leaves either the old file or the new one, never half of one. The temp file's name
  starts with `.<target name>.` and ends in `.tmp`, so a later start can find and remove the
  leftovers of a killed write (`clean_temp_files`).
- A write that fails for a reason the user can fix (permissions, a full disk, a path under a
  file) is a one-line UserError naming the path; the previous file is left as it was.
- safetensors only: loading a file can never execute code.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from .errors import UserError


def _umask() -> int:
    """The process umask. Linux reports it in /proc; elsewhere it is read by setting it and
    putting it back (os.umask can only set)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_error(path, e: OSError) -> UserError:
    """The one-line error for a failed write."""
    why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
           errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EROFS: "read-only file system",
           errno.ENOTDIR: "a parent of it is a file", errno.EISDIR: "it is a folder"}.get(e.errno, e.strerror or str(e))
    return UserError(f"cannot write {path} ({why})", None, "free space, fix the permissions or choose another path")


@contextmanager
def atomic_path(path):
    """Yield a temp path in the target's folder; on success fsync it and rename it over `path`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; give the mode a plain open() would
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        try:  # make the rename itself durable
            dfd = os.open(path.parent, os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)
        except OSError:
            pass
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path):
    """Yield a temp folder next to `path`; on success it replaces `path` (an old folder is removed
    only after the new one is complete)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out exists and is not a folder: {path}", None, "choose a folder name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def clean_temp_files(folder, name: str | None = None) -> list[Path]:
    """Remove what killed atomic writes left in `folder` (`.NAME.*.tmp`, or only those of target
    `name`); returns the removed paths."""
    folder = Path(folder)
    gone = []
    if folder.is_dir():
        for p in folder.glob(f".{name}.*.tmp" if name else ".*.tmp"):
            try:
                p.unlink()
                gone.append(p)
            except OSError:
                pass
    return gone


def check_writable(path, what: str = "--out") -> None:
    """Refuse, before any work, an output path that cannot be written: a folder where a file is
    expected, a parent that is a file, a folder without write permission."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} is a folder; this writes one file", str(path), "give a file path")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{what} is under a file, not a folder", str(path), "choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{what} cannot be written (no write permission in {parent})", str(path),
                        "choose a folder you can write to")


def save_tensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Save a dict of tensors as safetensors, atomically. Tensors are made contiguous on CPU."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, st_save(flat, metadata={k: str(v) for k, v in (metadata or {}).items()}))


def load_tensors(path, device="cpu") -> tuple[dict, dict]:
    """Load (tensors, metadata) from a safetensors file, with a user error for bad files."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise UserError(f"not a valid safetensors file ({str(e).splitlines()[0][:100]})", str(path)) from None
    return tensors, meta


def fingerprint(state_dict: dict) -> str:
    """A short, stable hash of a set of weights (names, shapes, dtypes and values)."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
