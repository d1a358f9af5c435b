"""Same-run comparison of the dense matmuls a Linear can run on, at DeepSeek-V3's dense shapes (a benchmark, not a
test).

    python tools/bench_device_quant.py                       # T=1 and T=32, 15 rounds
    python tools/bench_device_quant.py --tokens 1 --rounds 30 --threads 2

Engines: torch's F.linear with float32 and bf16 weights, the device tier's int8 / int4 matmuls
(offload/model/device_quant.py: torch._weight_int8pack_mm on the CPU, dequantized blocks on CUDA, where
_weight_int8pack_mm itself is also timed; _weight_int4pack_mm and its _for_cpu twin) with float32 and bf16
activations, and the CPU-only path's packed int8 / int4 kernels (csrc_py.dispatch.linear). Each round calls every
engine once per shape in turn, so they see the same machine noise; reported per shape and token count: the best
and median ms and the GB/s of weight bytes at the best call (decode reads each weight byte once), and the best
time as a ratio to float32 F.linear. Run where a GPU is lent with --device cuda for the CUDA kernels (the CPU
kernels are then left out).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offload.model.device_quant import DeviceQuantLinear, quantize  # noqa: E402

# DeepSeek-V3 (hidden 7168): MLA's fused q_a + kv_a, o_proj, a shared expert's gate + up and its down.
SHAPES = {"q_a+kv_a": (1536 + 576, 7168), "o_proj": (7168, 128 * 128), "shared gate+up": (2 * 2048, 7168),
          "shared down": (7168, 2048)}


def engines(O: int, K: int, device: str) -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], torch.dtype, int]]:
    """name -> (call, activation dtype, weight bytes)."""
    w = torch.randn(O, K, device=device) / K ** 0.5
    out: dict[str, tuple[Callable, torch.dtype, int]] = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = "fp32" if dtype == torch.float32 else "bf16"
        weight = w.to(dtype)
        out[f"F.linear {name}"] = (lambda x, weight=weight: F.linear(x, weight), dtype, weight.nbytes)
        for fmt in ("int8", "int4"):
            linear = DeviceQuantLinear(quantize(w, fmt, dtype))
            out[f"torch {fmt}, {name} x"] = (linear, dtype, linear.weight.nbytes)
        if device != "cpu":  # the int8 weight-only kernel the device tier no longer runs there, for the ratio
            q8 = quantize(w, "int8", dtype)
            out[f"int8pack_mm, {name} x"] = (lambda x, q8=q8: torch._weight_int8pack_mm(x, q8.q, q8.scale), dtype,
                                             q8.nbytes)
    if device == "cpu":
        from csrc_py.dispatch import linear
        from csrc_py.formats import pack

        for fmt in ("int8", "int4"):
            packed = pack(w[None], fmt)
            out[f"offload CPU {fmt}"] = (lambda x, packed=packed: linear(x, packed), torch.float32, packed.nbytes)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu":
        from csrc_py.threads import set_threads

        set_threads(args.threads)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, rounds {args.rounds}")
    for shape_name, (O, K) in SHAPES.items():
        calls = engines(O, K, args.device)
        for T in args.tokens:
            xs = {dtype: torch.randn(T, K, device=args.device).to(dtype) for dtype in (torch.float32, torch.bfloat16)}
            times: dict[str, list[float]] = {name: [] for name in calls}
            for name, (call, dtype, _) in calls.items():  # warm-up (JIT, packing caches)
                call(xs[dtype])
            for _ in range(args.rounds):
                for name, (call, dtype, _) in calls.items():
                    sync()
                    t0 = time.perf_counter()
                    call(xs[dtype])
                    sync()
                    times[name].append(time.perf_counter() - t0)
            base = min(times["F.linear fp32"])
            print(f"\n{shape_name} [{O} x {K}], T={T}")
            print(f"  {'engine':<22}{'best ms':>9}{'median ms':>11}{'GB/s':>8}{'vs fp32':>9}")
            for name, (_, _, nbytes) in calls.items():
                best = min(times[name])
                print(f"  {name:<22}{best * 1e3:>9.3f}{statistics.median(times[name]) * 1e3:>11.3f}"
                      f"{nbytes / best / 1e9:>8.1f}{base / best:>8.2f}x")


if __name__ == "__main__":
    main()
