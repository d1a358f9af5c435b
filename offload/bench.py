"""Prefill and decode speed of a loaded model: medians over repeated runs of a random-token prompt.

The prompt is random token ids from a fixed seed, so runs are comparable across machines and commits; eos is
ignored so every run generates exactly the requested number of tokens.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable

import torch
from rich.console import Console
from rich.table import Table

from .api import Model
from .errors import OffloadError
from .generate import GenerationStats


@dataclass(frozen=True)
class BenchResult:
    prompt_tokens: int
    gen_tokens: int
    device: str
    threads: int  # torch's intra-op threads
    runs: tuple[GenerationStats, ...]  # the measured runs, warm-up excluded
    kernel_isa: str = ""  # the CPU kernels' ISA tier (csrc_py.simd.TIER)

    @property
    def prefill_tokens_per_s(self) -> float:
        return statistics.median(s.prefill_tokens_per_s for s in self.runs)

    @property
    def decode_tokens_per_s(self) -> float:
        return statistics.median(s.decode_tokens_per_s for s in self.runs)

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens, "gen_tokens": self.gen_tokens, "repeat": len(self.runs),
            "device": self.device, "threads": self.threads, "kernel_isa": self.kernel_isa,
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 3),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
            "runs": [s.as_dict() for s in self.runs],
        }


def random_prompt(vocab_size: int, length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (length,), generator=generator).tolist()


def check_bench_args(prompt_tokens: int, gen_tokens: int, repeat: int, warmup: int) -> None:
    if prompt_tokens < 1:
        raise OffloadError(f"--prompt-tokens must be at least 1, got {prompt_tokens}")
    if gen_tokens < 2:
        # The first token comes out of the prefill; decode speed needs at least one decode step.
        raise OffloadError(f"--gen-tokens must be at least 2 to measure decoding, got {gen_tokens}")
    if repeat < 1:
        raise OffloadError(f"--repeat must be at least 1, got {repeat}")
    if warmup < 0:
        raise OffloadError(f"--warmup must be 0 or more, got {warmup}")


def run_bench(model: Model, prompt_tokens: int, gen_tokens: int, repeat: int, warmup: int = 1,
              seed: int = 0, on_run: Callable[[int, int], None] | None = None) -> BenchResult:
    """Generate gen_tokens after a prompt_tokens prompt, warmup + repeat times; keep the last repeat runs' stats.
    on_run(runs done, runs in all, warm-up included) follows the progress."""
    check_bench_args(prompt_tokens, gen_tokens, repeat, warmup)
    prompt = random_prompt(model.config.vocab_size, prompt_tokens, seed)
    runs = []
    for i in range(warmup + repeat):
        stats = model.generate(prompt, max_new_tokens=gen_tokens, ignore_eos=True, reuse_cache=False).stats
        if i >= warmup:
            runs.append(stats)
        if on_run is not None:
            on_run(i + 1, warmup + repeat)
    from csrc_py.simd import TIER

    return BenchResult(prompt_tokens, gen_tokens, str(model.device), torch.get_num_threads(), tuple(runs), TIER)


def render(result: BenchResult, console: Console) -> None:
    kernels = f", CPU kernels {result.kernel_isa}" if result.kernel_isa else ""
    table = Table(title=f"{len(result.runs)} runs on {result.device}, {result.threads} threads{kernels}",
                  title_justify="left")
    table.add_column("phase")
    table.add_column("tokens", justify="right")
    table.add_column("median tok/s", justify="right")
    table.add_column("min", justify="right")
    table.add_column("max", justify="right")
    phases = [
        ("prefill", result.prompt_tokens, [s.prefill_tokens_per_s for s in result.runs], result.prefill_tokens_per_s),
        # The first generated token comes out of the prefill: decode covers the rest.
        ("decode", result.gen_tokens - 1, [s.decode_tokens_per_s for s in result.runs], result.decode_tokens_per_s),
    ]
    for name, tokens, speeds, median in phases:
        table.add_row(name, str(tokens), f"{median:.1f}", f"{min(speeds):.1f}", f"{max(speeds):.1f}")
    console.print(table)
