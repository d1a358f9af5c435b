"""offload: run large sparse Mixture-of-Experts language models on one workstation."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .openmp_env import set_default_wait_policy

set_default_wait_policy()  # before anything imports torch: libgomp reads its environment once, when loaded

__version__ = "0.1.0"

# The public names, imported on first use: `offload --version` and the CLI's argument checks never load torch.
# (csrc_py imports torch before Numba itself: their OpenMP runtimes must load in that order.)
_EXPORTS = {"load": "api", "plan": "api", "Model": "api", "ModelConfig": "config", "CheckpointError": "errors",
            "ContextLengthError": "errors", "OffloadError": "errors", "Generation": "generate",
            "GenerationStats": "generate", "SamplingParams": "sampling", "Plan": "placement",
            "PlanError": "placement", "convert": "weights.store"}

if TYPE_CHECKING:
    from .api import Model, load, plan
    from .config import ModelConfig
    from .errors import CheckpointError, ContextLengthError, OffloadError
    from .generate import Generation, GenerationStats
    from .placement import Plan, PlanError
    from .sampling import SamplingParams
    from .weights.store import convert


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'offload' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value

__all__ = ["load", "plan", "convert", "Plan", "PlanError", "Model", "ModelConfig", "Generation", "GenerationStats",
           "SamplingParams", "OffloadError", "CheckpointError", "ContextLengthError", "__version__"]
