"""Pinning a worker to one device before CUDA initialises, and sizing its capacity.

`pin` must run before torch is imported: it narrows CUDA_VISIBLE_DEVICES to the
worker's GPU, so inside the process that GPU is always cuda:0.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from dataclasses import dataclass

RESERVE_FRACTION = 0.1  # of a GPU's memory, kept for activations and the CUDA context


@dataclass(frozen=True)
class WorkerIdentity:
    """Who is doing the work: the worker's name, its device as configured and as torch sees it."""

    name: str
    device: str  # as given to `modelq worker --device` (cuda:3)
    local_device: str  # as torch sees it after pinning (cuda:0) or cpu


def default_name(device: str) -> str:
    """A worker's name when none is given: HOST-DEVICE (e.g. gpu-host-7-cuda3)."""
    return f"{socket.gethostname()}-{device.replace(':', '')}"


def pin(device: str) -> str:
    """Restrict this process to `device` ('cpu', 'cuda', 'cuda:N'); the device torch will see."""
    if "torch" in sys.modules and device != "cpu":
        import torch

        if torch.cuda.is_initialized():
            raise RuntimeError("pin() must run before CUDA is initialised")
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return "cpu"
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if not match:
        raise ValueError(f"device {device!r} must be 'cpu' or 'cuda:N'")
    index = match.group(1) or "0"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:  # respect an outer restriction: index into it
        ids = [v for v in visible.split(",") if v.strip()]
        if int(index) >= len(ids):
            raise ValueError(f"{device} is not among CUDA_VISIBLE_DEVICES={visible}")
        index = ids[int(index)]
    os.environ["CUDA_VISIBLE_DEVICES"] = index
    return "cuda:0"


def capacity(local_device: str, configured: int | None) -> int:
    """Bytes this worker may fill: the configured value, else the device's memory less a reserve."""
    if configured is not None:
        return configured
    if local_device.startswith("cuda"):
        import torch

        _free, total = torch.cuda.mem_get_info(0)
        return int(total * (1 - RESERVE_FRACTION))
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(pages * (1 - RESERVE_FRACTION) // 2)
