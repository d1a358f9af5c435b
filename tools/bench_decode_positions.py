"""Decode on a device tier at device Positions (one position tensor, attention over the context bucket) against the
same model stepping at host positions (attention over the exact slice), interleaved in one run.

    python tools/bench_decode_positions.py                           # the shipped demo model, simulated tier
    python tools/bench_decode_positions.py --device cuda MODEL       # a GPU: the device-position steps replay
                                                                     # their CUDA graphs (--no-graphs: eager)

Prints decode tokens/s per round and the median ratio device/host positions. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import offload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=str(Path(offload.__file__).parent / "demo_model"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gpu-memory", default="40MiB", help="the device budget (simulated on the CPU)")
    parser.add_argument("--prompt", type=int, default=300, help="prompt tokens (decode runs in the next bucket)")
    parser.add_argument("--new", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-graphs", action="store_true")
    args = parser.parse_args()
    graphs = not args.no_graphs and args.device != "cpu"
    model = offload.load(args.model, device=args.device, gpu_memory=args.gpu_memory, max_context=1024,
                         cuda_graphs=graphs)
    transformer = model.transformer
    device_positions = transformer.step_positions
    prompt = [10 + i % 200 for i in range(args.prompt)]
    speeds: dict[str, list[float]] = {"device positions": [], "host positions": []}
    for _ in range(args.rounds):
        for mode in speeds:
            transformer.step_positions = device_positions if mode == "device positions" else None
            run = model.generate(prompt, max_new_tokens=args.new, ignore_eos=True, reuse_cache=False)
            speeds[mode].append(run.stats.decode_tokens_per_s)
    for mode, values in speeds.items():
        print(f"{mode:<17} tok/s {' '.join(f'{v:.1f}' for v in values)}")
    ratios = [a / b for a, b in zip(*speeds.values())]
    print(f"median ratio device/host positions {statistics.median(ratios):.2f} (rounds {min(ratios):.2f}-"
          f"{max(ratios):.2f}); prefetch {'on' if model.prefetch and model.prefetch.on else 'off'}")


if __name__ == "__main__":
    main()
