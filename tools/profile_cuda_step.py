"""Host synchronisations and kernel launches per decoded token on a GPU, counted by torch's profiler, and decode
tokens/s against transformers' generate on the same folder.

    python tools/profile_cuda_step.py                      # the shipped demo model, on cuda
    python tools/profile_cuda_step.py MODEL --gpu-memory 20MiB

Rows: the model whole on the GPU (eager and with CUDA graphs, the default), and a hybrid plan (--gpu-memory:
experts split between GPU slots and the CPU workers). A benchmark, not a test; needs a CUDA device.
"""
from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import torch

import offload

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy ",
              "cudaMemcpy2D ")
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
GRAPH_CALLS = ("cudaGraphLaunch",)


def count_calls(model, prompt: list[int], new: int) -> tuple[Counter, float]:
    """Runtime API calls per decoded token (prefill excluded: one generate of 1 token subtracted)."""
    def calls(tokens: int) -> Counter:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            model.generate(prompt, max_new_tokens=tokens, ignore_eos=True, reuse_cache=False)
        counts = Counter()
        for event in prof.events():
            name = event.name + " "
            for kind, names in (("syncs", SYNC_CALLS), ("launches", LAUNCH_CALLS), ("graph launches", GRAPH_CALLS)):
                if any(name.startswith(n) for n in names):
                    counts[kind] += 1
        return counts

    calls(new)  # warm: allocator, graphs captured, kernels loaded
    one, many = calls(1), calls(new + 1)
    per_token = Counter({k: (many[k] - one[k]) / new for k in set(one) | set(many)})
    run = model.generate(prompt, max_new_tokens=new, ignore_eos=True, reuse_cache=False)
    return per_token, run.stats.decode_tokens_per_s


def transformers_decode(folder: str, prompt: list[int], new: int) -> float:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
    ids = torch.tensor([prompt], device="cuda")
    seconds = []  # generates of 1 and new + 1 tokens, twice: their differences are `new` decode steps
    for tokens in (1, new + 1, 1, new + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ref.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    return new / ((seconds[3] - seconds[2] + seconds[1] - seconds[0]) / 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=str(Path(offload.__file__).parent / "demo_model"))
    parser.add_argument("--gpu-memory", default="20MiB",
                        help="the hybrid rows' device budget (20MiB: the demo model in bf16 keeps about half its "
                             "experts on the CPU workers)")
    parser.add_argument("--prompt", type=int, default=100)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--rows", nargs="*", choices=["gpu", "hybrid"], help="default: both")
    args = parser.parse_args()
    prompt = [10 + i % 200 for i in range(args.prompt)]
    rows = {"gpu eager": dict(cuda_graphs=False), "gpu cuda graphs": dict(),
            f"hybrid {args.gpu_memory} eager": dict(gpu_memory=args.gpu_memory, cuda_graphs=False),
            f"hybrid {args.gpu_memory} cuda graphs": dict(gpu_memory=args.gpu_memory)}
    rows = {label: kwargs for label, kwargs in rows.items() if not args.rows or label.split()[0] in args.rows}
    print(f"{torch.cuda.get_device_name()}; per decoded token after a {args.prompt}-token prompt")
    for label, kwargs in rows.items():
        try:
            model = offload.load(args.model, device="cuda", max_context=1024, **kwargs)
            per_token, rate = count_calls(model, prompt, args.new)
        except Exception as error:  # a row that fails still lets the others report
            print(f"{label:<28} failed: {type(error).__name__}: {str(error)[:200]}")
            continue
        counts = " ".join(f"{k} {per_token[k]:.1f}" for k in ("syncs", "launches", "graph launches"))
        print(f"{label:<28} {counts}  decode {rate:.1f} tok/s")
        del model
        torch.cuda.empty_cache()
    print(f"{'transformers bf16 generate':<28} decode {transformers_decode(args.model, prompt, args.new):.1f} tok/s")


if __name__ == "__main__":
    main()
