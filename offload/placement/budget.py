"""Memory budgets: free device memory (or a user budget, simulated on a machine without a GPU) and host RAM."""
from __future__ import annotations

import re
from dataclasses import dataclass

import psutil
import torch

from ..errors import OffloadError

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
DEVICE_RESERVE = 1 << 30  # left free on a GPU for the CUDA context, allocator slack and activations


def parse_bytes(value: int | str) -> int:
    """12 → 12; "12GiB" → 12·2^30; "1.5 GB" → 1.5·10^9."""
    if isinstance(value, int):
        if value < 0:
            raise OffloadError(f"a memory size cannot be negative, got {value}")
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in UNITS:
        raise OffloadError(f"cannot read memory size {value!r}; write it like 12GiB, 800MB or 1073741824")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


@dataclass(frozen=True)
class Budgets:
    device_bytes: int  # what the device tier may hold (weights, caches, expert slots)
    host_bytes: int  # what the host tier may hold (experts computed or staged on the CPU)
    device_is_simulated: bool  # True when the device tier is torch on the CPU with a budget given by the user


def detect_budgets(device: torch.device, gpu_memory: int | str | None, host_memory: int | str | None = None
                   ) -> Budgets:
    """The device budget is `gpu_memory` when given, else free CUDA memory minus a reserve. Without a GPU the
    device tier is the CPU: with gpu_memory it is a simulated budget; without it the device tier holds all.
    The host budget is the RAM available now, or `host_memory` when planning for another machine."""
    host = parse_bytes(host_memory) if host_memory is not None else psutil.virtual_memory().available
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = parse_bytes(gpu_memory) if gpu_memory is not None else max(free - DEVICE_RESERVE, 0)
        if budget > free:
            raise OffloadError(f"gpu_memory {budget / 2**30:.1f} GiB exceeds the {free / 2**30:.1f} GiB free on "
                               f"{device}; lower gpu_memory")
        return Budgets(budget, host, device_is_simulated=False)
    if gpu_memory is None:
        return Budgets(host, host, device_is_simulated=True)
    return Budgets(parse_bytes(gpu_memory), host, device_is_simulated=True)
