"""Files: atomic writes and safetensors reading/writing. The bottom layer (imports only errors).

Design choices:
- Every write goes to a temp file in the same folder, is fsync'ed, then renamed over the target:
  a crash leaves either the old file or the new one, never half of one. The temp file's name
  starts with `.<target name>.` and ends in `.tmp`, so a later start can find and remove the
  leftovers of a killed write (`clean_temp_files`).
- A write that fails for a reason the user can fix (permissions, a full disk, a path under a
  file) is a one-line UserError naming the path; the previous file is left as it was.
- safetensors only: loading a file can never execute code.
- Every safetensors file written here carries a content checksum in its metadata (`checksum`:
  "sha256:<hex>"): SHA-256 over each tensor's name, dtype, shape and the SHA-256 of its bytes (in
  name order), then every other metadata item, so flipped data bytes, a changed shape or an edited
  step counter are all caught. Loading recomputes it and refuses a mismatch; a file without the key
  (written before checksums existed, or by another tool) loads unchecked. The per-tensor hashes run
  in threads (hashlib releases the GIL), so the check costs one read of the bytes at SHA-256 speed
  (about 0.7 GB/s per core on a laptop CPU), and `verify_file` checks a file one tensor at a time
  without holding it all in memory.
- `nonfinite` finds NaN/inf tensors with one sum per tensor (about 3 GB/s); only a sum that is not
  finite is re-checked element-wise, so finite weights whose sum overflows are not refused.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from .errors import Notice, UserError


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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_temp_files(path.parent, path.name)          # folders of an earlier write that was killed
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise write_error(path, e) from None
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


def strict_json(row: dict) -> str:
    """One metrics line: non-finite floats become null (strict JSON parsers reject NaN)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    return json.dumps(clean, allow_nan=False)


class JsonlLog:
    """An appendable JSONL file of the run folder (metrics, samples); a failed write (a full disk)
    is a user error naming the file."""

    def __init__(self, path: Path, mode: str):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.f = open(path, mode, encoding="utf-8")
        except OSError as e:
            raise write_error(path, e) from None

    def write(self, row: dict) -> None:
        try:
            self.f.write(strict_json(row) + "\n")
        except OSError as e:
            raise write_error(self.path, e) from None

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            raise write_error(self.path, e) from None

    def close(self) -> None:
        try:
            self.f.close()
        except OSError:
            pass                 # the write that failed has raised already


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def clean_temp_files(folder, name: str | None = None) -> list[Path]:
    """Remove what killed atomic writes left in `folder` (`.NAME.*.tmp` files and folders, or
    only those of target `name`); returns the removed paths."""
    folder = Path(folder)
    gone = []
    if folder.is_dir():
        for p in folder.glob(f".{name}.*.tmp" if name else ".*.tmp"):
            try:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                gone.append(p)
            except OSError:
                pass
    return gone


def check_writable(path, what: str = "--out", folder: bool = False) -> None:
    """Refuse, before any work, an output path that cannot be written: a folder where a file is
    expected (or a file where a folder is, with `folder`), a parent that is a file, a folder
    without write permission or on a read-only file system."""
    path = Path(path)
    if not folder and path.is_dir():
        raise UserError(f"{what} is a folder; this writes one file", str(path), "give a file path")
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"{what} is a file; this writes a folder", str(path), "give a folder path")
    parent = path if folder and path.is_dir() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{what} is under a file, not a folder", str(path), "choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{what} cannot be written (no write permission in {parent}, or a read-only file system)",
                        str(path), "choose a folder you can write to")


CHECKSUM_KEY = "checksum"


def _tensor_sha256(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256()
    if t.numel():
        h.update(memoryview(t.view(-1).view(torch.uint8).numpy()))   # no copy of the bytes
    return h.digest()


def _entry(t: torch.Tensor) -> tuple[str, list]:
    return str(t.dtype).removeprefix("torch."), list(t.shape)


def content_checksum(entries: dict, digests: dict, metadata: dict) -> str:
    """The checksum of a file (see the module docstring) from each tensor's (dtype, shape), its
    SHA-256 digest and the metadata."""
    h = hashlib.sha256()
    for k in sorted(entries):
        dtype, shape = entries[k]
        h.update(f"{k}\0{dtype}\0{list(shape)}\0".encode())
        h.update(digests[k])
    h.update(json.dumps({k: v for k, v in sorted(metadata.items()) if k != CHECKSUM_KEY}).encode())
    return "sha256:" + h.hexdigest()


def tensors_checksum(tensors: dict, metadata: dict) -> str:
    """`content_checksum` of tensors in memory, the per-tensor hashes in threads."""
    names = sorted(tensors)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = dict(zip(names, pool.map(lambda k: _tensor_sha256(tensors[k]), names)))
    return content_checksum({k: _entry(tensors[k]) for k in names}, digests, metadata)


def save_tensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Save a dict of tensors as safetensors with a content checksum, atomically. Tensors are made
    contiguous on CPU."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items() if k != CHECKSUM_KEY}
    meta[CHECKSUM_KEY] = tensors_checksum(flat, meta)
    atomic_write_bytes(path, st_save(flat, metadata=meta))


def update_metadata(path, **changes) -> None:
    """Rewrite a safetensors file (atomically) with some metadata keys changed, tensors as they are."""
    tensors, meta = load_tensors(path)
    save_tensors(path, tensors, {**meta, **changes})


def _open_error(path, e: Exception) -> UserError:
    return UserError(f"not a valid safetensors file ({str(e).splitlines()[0][:100]})", str(path),
                     "restore it from a copy or write it again")


def damaged(path) -> UserError:
    return UserError("the file is damaged: its content does not match its checksum", str(path),
                     "restore it from a copy or write it again")


def read_header(path) -> tuple[dict, dict]:
    """(metadata, {name: (dtype name, shape)}) of a safetensors file, reading only its header."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a malformed header
        raise _open_error(path, e) from None
    return meta, shapes


def load_tensors(path, device="cpu", verify: bool = True) -> tuple[dict, dict]:
    """Load (tensors, metadata) from a safetensors file, with a user error for bad files; the
    content checksum is checked when the file has one (verify=False: not checked)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise _open_error(path, e) from None
    if verify and CHECKSUM_KEY in meta and tensors_checksum(tensors, meta) != meta[CHECKSUM_KEY]:
        raise damaged(path)
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, meta


def nonfinite(tensors: dict) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    bad = []
    for k, t in tensors.items():
        if t.is_floating_point() and t.numel() and not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
            bad.append(k)
    return bad


def verify_file(path) -> dict:
    """Check a safetensors file one tensor at a time (memory: its largest tensor): the checksum
    (when it has one) and finiteness. Returns {metadata, shapes: {name: (torch dtype, shape)}, checksum:
    True, or None for a file without one, nonfinite: [names], bytes}; raises a UserError for an
    unreadable or damaged file."""
    meta, _ = read_header(path)
    entries, digests, dtypes, bad, total = {}, {}, {}, [], 0
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for k in sorted(f.keys()):
                t = f.get_tensor(k)
                entries[k], digests[k], dtypes[k] = _entry(t), _tensor_sha256(t), t.dtype
                total += t.numel() * t.element_size()
                bad += nonfinite({k: t})
    except Exception as e:
        raise _open_error(path, e) from None
    ok = None
    if CHECKSUM_KEY in meta:
        if content_checksum(entries, digests, meta) != meta[CHECKSUM_KEY]:
            raise damaged(path)
        ok = True
    return {"metadata": meta, "shapes": {k: (dtypes[k], tuple(shape)) for k, (_, shape) in entries.items()},
            "checksum": ok, "nonfinite": bad, "bytes": total}


def warn_if_unfinished(meta: dict, path) -> None:
    """A Notice when a file was saved before its training run finished (the engine records
    training_status in every artifact; files without it are taken as finished)."""
    status = meta.get("training_status")
    if status in (None, "complete"):
        return
    at = f"step {meta.get('training_step', '?')} of {meta.get('training_steps', '?')}"
    why = "training was interrupted" if status == "interrupted" else "a periodic checkpoint of an unfinished run"
    warnings.warn(f"{path} was saved at {at} ({why}); --resume of that run finishes it", Notice, stacklevel=3)


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
