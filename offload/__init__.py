"""offload: run large sparse Mixture-of-Experts language models on one workstation."""
from __future__ import annotations

import torch  # noqa: F401  (first: torch's OpenMP runtime must load before any Numba-compiled module)

from .api import Model, load, plan
from .config import ModelConfig
from .errors import CheckpointError, ContextLengthError, OffloadError
from .generate import Generation, GenerationStats
from .sampling import SamplingParams

__version__ = "0.1.0"
from .placement import Plan, PlanError
from .weights.store import convert

__all__ = ["load", "plan", "convert", "Plan", "PlanError", "Model", "ModelConfig", "Generation", "GenerationStats", "SamplingParams", "OffloadError",
           "CheckpointError", "ContextLengthError", "__version__"]
