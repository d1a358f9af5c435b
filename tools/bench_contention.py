"""Decode tokens/s on a Qwen3-shaped checkpoint, quiet and with a competing busy process pinned to one core.

    python tools/bench_contention.py /tmp/qwen3-6l             # builds the checkpoint there first if missing
    GOMP_SPINCOUNT=300000 python tools/bench_contention.py /tmp/qwen3-6l --rounds 7   # libgomp's own default
    python tools/bench_contention.py /tmp/qwen3-6l --decode-threads auto,2,1        # thread settings compared
    python tools/bench_contention.py /tmp/qwen3-6l --decode-threads auto,auto-periodic --spell 1.5 --new-tokens 160

Each --decode-threads setting (offload.load's decode_threads: auto measures the count while decoding, a number
fixes it) decodes on the same loaded model, settings interleaved within every round and condition; an auto
setting keeps its measurements from run to run, as a chat does. `auto` is the model's own tuner (step times and
the other programs' CPU time, offload/host_load.py); `auto-periodic` the same without the CPU time, so that only
its periodic probe finds the end of a busy spell.

A workstation always runs something else. The competitor is a Python busy loop pinned with sched_setaffinity to
one core (core 0), started before and killed after each contended run. The two conditions alternate (each round
starts with the other one than the last), and the medians and their ratio are printed with the machine, the
kernels' ISA path and the threading settings in effect. With `--spell SECONDS` a third condition runs in each
round: the competitor starts before the generation and is killed SECONDS into it, the rest of the run decoding on a
quiet host (a busy spell's end: how soon the tuner uses every core again). A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import offload  # noqa: E402  (first: it sets the OpenMP environment before torch starts its runtime)
from csrc_py import simd, threads  # noqa: E402
from offload.decode_threads import DecodeThreads, parse  # noqa: E402
from offload.host_load import LoadMeter  # noqa: E402

# Pinned to one core; it spins until the benchmark (its parent) is gone, even if that is killed.
BUSY_LOOP = ("import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nparent = os.getppid()\n"
             "while os.getppid() == parent:\n    pass\n")


def make_checkpoint(folder: Path, layers: int) -> None:
    """A Qwen3-30B-A3B-shaped store with `layers` decoder layers, int4 experts and int8 dense (as the full-size
    run in docs/benchmarks.md)."""
    from make_checkpoint import shape_config, write_quantized

    cfg = shape_config("qwen3-30b-a3b", layers)
    write_quantized(folder, cfg, experts="int4", dense="int8", embed_std=1.0, out_std=0.002)


def decode_rate(model: offload.Model, prompt: list[int], new_tokens: int) -> float:
    return model.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True).stats.decode_tokens_per_s


def contended_rate(model: offload.Model, prompt: list[int], new_tokens: int, core: int) -> float:
    competitor = subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(core)])
    try:
        time.sleep(0.2)  # the loop is running and pinned before decoding starts
        return decode_rate(model, prompt, new_tokens)
    finally:
        competitor.kill()
        competitor.wait()


def spell_rate(model: offload.Model, prompt: list[int], new_tokens: int, core: int, seconds: float) -> float:
    """decode_rate with the competitor running for the first `seconds` of the generation (its short prefill
    included), then killed while decoding goes on."""
    competitor = subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(core)])
    spell_end = threading.Timer(seconds, competitor.kill)
    try:
        time.sleep(0.2)
        spell_end.start()
        return decode_rate(model, prompt, new_tokens)
    finally:
        spell_end.cancel()
        competitor.kill()
        competitor.wait()


def describe(model: offload.Model) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    env = {name: os.environ.get(name, "unset") for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    return (f"{cpu}, {os.cpu_count()} CPUs; kernels {simd.TIER}; threading layer {threads.threading_layer()}, "
            f"{model.load_info.cpu_threads} threads; " + ", ".join(f"{k}={v}" for k, v in env.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a Qwen3-shaped store (built here when missing)")
    parser.add_argument("--layers", type=int, default=6, help="decoder layers when building the checkpoint")
    parser.add_argument("--rounds", type=int, default=5, help="quiet/contended pairs, interleaved")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per run")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    parser.add_argument("--core", type=int, default=0, help="the core the competitor is pinned to")
    parser.add_argument("--decode-threads", default="auto",
                        help="comma list of decode_threads settings to compare (auto, auto-periodic, a count)")
    parser.add_argument("--spell", type=float, default=0.0,
                        help="also a run with the competitor for its first SECONDS only (0: no such run)")
    args = parser.parse_args()
    settings = args.decode_threads.split(",")

    if not (args.checkpoint / "config.json").exists():
        make_checkpoint(args.checkpoint, args.layers)
    model = offload.load(args.checkpoint, device="cpu", max_context=256, cpu_threads=args.threads)
    print(describe(model), flush=True)
    prompt = list(range(1000, 1016))
    decode_rate(model, prompt, 4)  # first-call allocations out of the measured runs
    tuners = {s: decode_threads(s, model.load_info.cpu_threads) for s in settings}
    conditions = ("quiet", "busy") + (("spell",) if args.spell > 0 else ())
    rates: dict[str, dict[str, list[float]]] = {c: {s: [] for s in settings} for c in conditions}
    spell_steps: dict[str, Counter] = {s: Counter() for s in settings}  # steps per thread count in spell runs
    for round_ in range(args.rounds):
        order = conditions[round_ % len(conditions):] + conditions[:round_ % len(conditions)]
        for condition in order:
            for setting in settings if round_ % 2 == 0 else settings[::-1]:
                model.decode_threads = tuners[setting]
                if condition == "quiet":
                    rate = decode_rate(model, prompt, args.new_tokens)
                elif condition == "busy":
                    rate = contended_rate(model, prompt, args.new_tokens, args.core)
                else:
                    before = Counter(tuners[setting].steps)
                    rate = spell_rate(model, prompt, args.new_tokens, args.core, args.spell)
                    spell_steps[setting].update(Counter(tuners[setting].steps) - before)
                rates[condition][setting].append(rate)
        for setting in settings:
            quiet, busy = rates["quiet"][setting][-1], rates["busy"][setting][-1]
            spell = f", busy spell {rates['spell'][setting][-1]:.2f} tok/s" if args.spell > 0 else ""
            print(f"round {round_ + 1}, decode_threads {setting}: quiet {quiet:.2f} tok/s, contended "
                  f"{busy:.2f} tok/s ({busy / quiet:.0%}){spell}", flush=True)
    for setting in settings:
        q, b = statistics.median(rates["quiet"][setting]), statistics.median(rates["busy"][setting])
        steps = ", ".join(f"{n}: {k}" for n, k in sorted(tuners[setting].steps.items(), reverse=True))
        spell = ""
        if args.spell > 0:
            in_spells = ", ".join(f"{n}: {k}" for n, k in sorted(spell_steps[setting].items(), reverse=True))
            spell = (f", busy spell of {args.spell:g} s {statistics.median(rates['spell'][setting]):.2f} tok/s "
                     f"(its steps per thread count {in_spells})")
        print(f"decode_threads {setting}, median of {args.rounds}: quiet {q:.2f} tok/s, contended {b:.2f} tok/s, "
              f"contended/quiet {b / q:.0%}{spell} (steps per thread count {steps})")


def decode_threads(setting: str, cpu_threads: int) -> DecodeThreads:
    """A setting's tuner: auto as offload.load makes it (with a load meter), auto-periodic without the meter,
    or a fixed count."""
    if setting == "auto-periodic":
        return DecodeThreads.auto(cpu_threads)
    n = parse(setting)
    return DecodeThreads.auto(cpu_threads, load=LoadMeter()) if n is None else DecodeThreads.fixed(min(n, cpu_threads))


if __name__ == "__main__":
    main()
