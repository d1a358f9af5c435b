"""The one background thread that computes host-tier experts while the device tier computes its own."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

_worker: ThreadPoolExecutor | None = None


def background() -> ThreadPoolExecutor:
    """One worker thread for every layer: the layers run one after another anyway and share the cores."""
    global _worker
    if _worker is None:
        _worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offload-cpu-experts")
    return _worker
