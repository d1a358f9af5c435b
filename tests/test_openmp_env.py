"""The OpenMP wait settings offload puts into the environment before torch loads libgomp."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from offload.openmp_env import SPIN_COUNT, default_wait_settings, gpu_present, on_a_passing_thread

ROOT = Path(__file__).resolve().parent.parent
IDS = list(range(5, 29))


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


def test_a_passing_thread_returns_the_result_and_has_ended():
    seen = []

    def work(cancelled: threading.Event) -> int:
        seen.append(threading.current_thread())
        return 42

    assert on_a_passing_thread(work) == 42
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()


def test_a_passing_threads_exception_reaches_the_caller():
    def work(cancelled: threading.Event) -> None:
        raise KeyboardInterrupt  # e.g. a progress callback's

    with pytest.raises(KeyboardInterrupt):
        on_a_passing_thread(work)


def test_ctrl_c_in_the_caller_cancels_the_work_and_waits_for_it_to_stop(monkeypatch):
    started, stopped = threading.Event(), threading.Event()

    def work(cancelled: threading.Event) -> None:
        started.set()
        cancelled.wait(30)  # as the load checks between tensor reads
        stopped.set()

    join, joins = threading.Thread.join, []

    def interrupted_once(self, timeout=None):
        joins.append(1)
        if len(joins) == 1:
            started.wait(30)
            raise KeyboardInterrupt  # Ctrl-C while the caller waits
        return join(self, timeout)

    monkeypatch.setattr(threading.Thread, "join", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        on_a_passing_thread(work)
    assert stopped.is_set()  # the thread had stopped when the caller went on


@pytest.fixture
def load_without_a_gpu():
    """offload.load and the demo model where no GPU is present; the session's thread counts restored after."""
    import offload
    from csrc_py import threads
    from offload.demo import demo_model

    if gpu_present():
        pytest.skip("with a GPU the load stays on the calling thread")
    before = threads.configured()
    yield lambda **options: offload.load(demo_model(), device="cpu", max_context=64, experts="int8", **options)
    threads.set_threads(before)


def test_a_load_runs_its_kernels_on_a_thread_that_has_ended(monkeypatch, load_without_a_gpu):
    """The load's parallel regions (here the kernels' warm-up) run on a passing thread: each OpenMP team lives as
    long as the thread that started it, so the thread that then generates, the caller's or a server's worker,
    starts the only one. The caller's thread counts are the load's, and the model generates there."""
    import numba
    import torch

    import offload
    from offload.demo import demo_model
    from offload.experts import cpu

    ran_on, warmup = [], cpu.warmup

    def recording(*args, **kwargs):
        ran_on.append(threading.current_thread())
        return warmup(*args, **kwargs)

    monkeypatch.setattr(cpu, "warmup", recording)
    model = load_without_a_gpu(cpu_threads=1)
    assert ran_on and all(t is not threading.current_thread() and not t.is_alive() for t in ran_on)
    assert numba.get_num_threads() == torch.get_num_threads() == model.load_info.cpu_threads == 1
    on_the_caller = offload.load.__wrapped__(demo_model(), device="cpu", max_context=64, experts="int8")
    assert torch.equal(model.logits(IDS), on_the_caller.logits(IDS))


def test_ctrl_c_while_loading_stops_the_load_before_its_weights(monkeypatch, load_without_a_gpu):
    """Ctrl-C while the caller waits for the load: the load thread stops at its next tensor read, and the caller
    raises KeyboardInterrupt once it has (a process exiting with it still inside torch could abort)."""
    reads, joins, join = [], [], threading.Thread.join

    def interrupted_once(self, timeout=None):
        joins.append(self)
        if len(joins) == 1:
            raise KeyboardInterrupt  # at once: before the first tensor is read
        return join(self, timeout)

    monkeypatch.setattr(threading.Thread, "join", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        load_without_a_gpu(on_progress=lambda done, total, name: reads.append(done))
    assert not reads and not joins[0].is_alive()


def test_a_servers_generating_thread_takes_the_loads_thread_counts(load_without_a_gpu):
    import numba
    import torch

    from offload.server.engine import ModelWorker

    worker = ModelWorker(load_without_a_gpu(cpu_threads=1), max_waiting=0)
    try:
        assert worker._executor.submit(lambda: (numba.get_num_threads(), torch.get_num_threads())).result() == (1, 1)
    finally:
        worker.close()
