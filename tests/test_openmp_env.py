"""The OpenMP wait settings offload puts into the environment before torch loads libgomp."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from offload.openmp_env import SPIN_COUNT, default_wait_settings, gpu_present

ROOT = Path(__file__).resolve().parent.parent


def test_a_machine_without_a_gpu_spins_briefly():
    assert default_wait_settings({}, gpu_present=False) == {"GOMP_SPINCOUNT": str(SPIN_COUNT)}


def test_a_machine_with_a_gpu_waits_passively():
    assert default_wait_settings({}, gpu_present=True) == {"OMP_WAIT_POLICY": "PASSIVE"}


@pytest.mark.parametrize("user", [{"OMP_WAIT_POLICY": "ACTIVE"}, {"OMP_WAIT_POLICY": "PASSIVE"},
                                  {"GOMP_SPINCOUNT": "300000"}])
@pytest.mark.parametrize("gpu", [False, True])
def test_a_users_setting_is_left_alone(user, gpu):
    assert default_wait_settings(user, gpu_present=gpu) == {}


def _settings_after_import(module: str, extra_env: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(extra_env, PYTHONPATH=str(ROOT))
    code = (f"import sys, os, json; import {module}; "
            "print(json.dumps({k: os.environ.get(k) for k in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["offload", "csrc_py"])
def test_importing_offload_or_its_kernels_sets_the_default(module):
    expected = {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None, **default_wait_settings({}, gpu_present())}
    assert _settings_after_import(module, {}) == expected


def test_importing_offload_keeps_the_users_policy():
    assert _settings_after_import("offload", {"OMP_WAIT_POLICY": "ACTIVE"}) == {"OMP_WAIT_POLICY": "ACTIVE",
                                                                                "GOMP_SPINCOUNT": None}
