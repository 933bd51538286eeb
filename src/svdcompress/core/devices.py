"""Which device a user's ``device`` setting names: checked once, with one clear error.

"auto" is CUDA when this machine has it, else the CPU. Under torchrun "auto" and "cuda"
take the GPU of the process's LOCAL_RANK. A device torch does not know, one this build or
machine lacks, or the meta device (which holds no data) is a ConfigError, not a traceback
from the first tensor moved there.
"""

from __future__ import annotations

import os
import platform

import torch

from . import dist
from .errors import ConfigError


def resolve_device(name) -> torch.device:
    """The torch.device for ``name`` ("auto", "cpu", "cuda", "cuda:N" or a torch.device)."""
    if isinstance(name, torch.device):
        name = str(name)
    if not isinstance(name, str):
        raise ConfigError(f"device must be auto, cpu or cuda[:N], got {name!r}")
    name = dist.local_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {name!r}: use auto, cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported: use auto, cpu or cuda[:N]")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} was asked for, but CUDA is not available here "
                              f"(torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} "
                              "CUDA device(s)")
    return device


def machine(threads: int | None = None) -> dict:
    """The machine a figure is measured on (recorded beside results): cores, threads, CPU,
    torch and the GPU if any."""
    return {"cores": os.cpu_count(), "threads": threads or torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
