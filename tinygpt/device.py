"""Device, precision and process-group set-up, shared by every command.

`setup_device("auto")` picks CUDA, then MPS, then the CPU; under torchrun (WORLD_SIZE > 1) it
initialises the process group (NCCL on GPUs, gloo on CPUs) and binds this rank to its GPU.
`resolve_dtype("auto", device)` is bfloat16 where the GPU supports it, else float32.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError
from .options import Options, option

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = ("auto", *DTYPES)


def check_device_name(v: str):
    """An option check: the device names setup_device accepts."""
    ok = v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit())
    return None if ok else "must be auto, cpu, cuda, cuda:N or mps"


@dataclass
class DeviceOptions(Options):
    """Where a command runs."""

    group = "device"
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps", check=check_device_name)


def setup_device(device: str = "auto"):
    """(torch.device, rank, world_size) for this process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise UserError(f"unknown --device '{device}'", None, "choose auto, cpu, cuda or mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is available", None, "use --device cpu")
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.startswith("cuda"):
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return torch.device(device), rank, world


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown --dtype '{name}'", None, f"choose one of {', '.join(DTYPE_NAMES)}")
    return DTYPES[name]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on x computes in: autocast's on x's device when it is on, else x's own."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed-precision context for `dtype` (nothing for float32)."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)
