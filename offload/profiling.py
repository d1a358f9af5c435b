"""Profiles: what a workload did (routing heat per layer and expert, hit rates, prefetch precision/recall,
bytes moved, time per component), read back to tune a plan."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import OffloadError


def read_heat(path: Path) -> list[list[float]]:
    """The routing heat [MoE layer][expert] of a profile.json."""
    try:
        heat = json.loads(Path(path).read_text())["heat"]
    except OSError as error:
        raise OffloadError(f"cannot read profile {path}: {error.strerror}") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise OffloadError(f"{path} is not a profile (no 'heat'); write one with `offload profile`") from None
    if not isinstance(heat, list) or not all(isinstance(row, list) for row in heat):
        raise OffloadError(f"{path}: 'heat' must be a list of per-layer lists; write it with `offload profile`")
    return heat
