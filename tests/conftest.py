from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import write_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """Write each tiny variant once per session: name -> (folder, transformers reference model)."""
    cache: dict[str, tuple[Path, torch.nn.Module]] = {}

    def get(name: str) -> tuple[Path, torch.nn.Module]:
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            cache[name] = (folder, write_checkpoint(name, folder))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def bf16_checkpoints(checkpoint_dir, tmp_path_factory):
    """bf16 copies of tiny models: bf16 host experts then hold the weights exactly, so plans must agree."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            _, ref = checkpoint_dir(name)
            folder = tmp_path_factory.mktemp(f"{name}_bf16")
            copy.deepcopy(ref).to(torch.bfloat16).save_pretrained(folder)
            cache[name] = folder
        return cache[name]

    return get


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
