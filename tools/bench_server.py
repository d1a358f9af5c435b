"""What the HTTP layer costs, and what prompt-cache reuse saves.

1. Time to first token and decode tokens/s of the same requests through `offload serve` (a subprocess, streamed
   over HTTP, timed at the client) and through the Python API (model.stream in this process, timed at the
   caller), interleaved round by round so that both see the same machine load. Every round sends a new prompt to
   both, so each side's prompt cache reuses the same (few) leading tokens.
2. A 20-turn conversation through the server: prompt tokens per turn, of them reused from the cache (usage's
   cached_tokens) and computed, against the prompt tokens a server without reuse would prefill.

    python tools/bench_server.py                       # the demo model
    python tools/bench_server.py MODEL --device cpu --experts int8 --rounds 8 --new-tokens 64
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

import offload
from offload.demo import demo_model

TOPICS = ["lists", "dictionaries", "generators", "decorators", "classes", "modules", "exceptions", "iterators",
          "strings", "files", "tuples", "sets", "functions", "closures", "context managers", "unit tests",
          "packages", "comprehensions", "slices", "lambdas"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", type=Path, default=None, help="checkpoint folder (default: the demo model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--experts", default=None, choices=["bf16", "int8", "int4"])
    p.add_argument("--max-context", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=6, help="interleaved server/API rounds (medians reported)")
    p.add_argument("--new-tokens", type=int, default=48, help="tokens per reply (eos ignored)")
    p.add_argument("--turns", type=int, default=20, help="turns of the conversation")
    p.add_argument("--turn-tokens", type=int, default=24, help="tokens per reply in the conversation")
    return p.parse_args()


def start_server(args: argparse.Namespace, folder: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "offload.cli", "serve", str(folder), "--port", str(port), "--device",
               args.device, "--max-context", str(args.max_context)]
    if args.experts:
        command += ["--experts", args.experts]
    env = {**os.environ, "PYTHONPATH": str(Path(offload.__file__).parent.parent)}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    base = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return process, base
        except httpx.TransportError:
            time.sleep(0.25)
    process.kill()
    raise SystemExit("the server did not start")


def through_server(client: httpx.Client, messages: list[dict], new_tokens: int) -> tuple[float, float, float]:
    """(seconds to the first content chunk, text pieces per second after it, the model's own decode tokens/s)
    of one streamed reply, timed at the client (one kept-alive connection, as a chat front-end keeps one)."""
    body = {"messages": messages, "max_tokens": new_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    t0 = time.perf_counter()
    first = last = None
    pieces, model_speed = 0, 0.0
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            model_speed = chunk.get("timings", {}).get("decode_tokens_per_s", model_speed)
            if (chunk.get("choices") or [{}])[0].get("delta", {}).get("content"):
                last = time.perf_counter()
                first = first or last
                pieces += 1
    return first - t0, (pieces - 1) / (last - first), model_speed


def through_api(model: offload.Model, messages: list[dict], new_tokens: int) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    first = last = None
    pieces = 0
    with model.chat_stream(messages, max_new_tokens=new_tokens, ignore_eos=True) as run:
        for _ in run:
            last = time.perf_counter()
            first = first or last
            pieces += 1
    return first - t0, (pieces - 1) / (last - first), run.result.stats.decode_tokens_per_s


def overhead(args: argparse.Namespace, client: httpx.Client, model: offload.Model) -> None:
    rows: dict[str, list[tuple[float, float, float]]] = {"server": [], "api": []}
    for i in range(args.rounds + 1):  # round 0 warms both up and is not counted
        messages = [{"role": "user", "content": f"Round {i}: explain Python {TOPICS[i % len(TOPICS)]}."}]
        for name, run in (("server", lambda m: through_server(client, m, args.new_tokens)),
                          ("api", lambda m: through_api(model, m, args.new_tokens))):
            measured = run(messages)
            if i:
                rows[name].append(measured)
    print(f"\n## server vs Python API: {args.rounds} interleaved rounds, {args.new_tokens} new tokens, medians")
    print("| path | time to first token (ms) | pieces/s at the client | model decode tokens/s |\n"
          "|---|---:|---:|---:|")
    med = {name: [statistics.median(r[k] for r in rows[name]) for k in range(3)] for name in rows}
    for name, (ttft, speed, model_speed) in med.items():
        print(f"| {name} | {ttft * 1000:.1f} | {speed:.1f} | {model_speed:.1f} |")
    print(f"server/API: time to first token x{med['server'][0] / med['api'][0]:.2f}, pieces/s "
          f"x{med['server'][1] / med['api'][1]:.2f}, model decode tokens/s x{med['server'][2] / med['api'][2]:.2f}")


def conversation(args: argparse.Namespace, client: httpx.Client) -> None:
    messages: list[dict] = []
    computed = total = 0
    print(f"\n## a {args.turns}-turn conversation through the server ({args.turn_tokens} tokens per reply)")
    print("| turn | prompt tokens | reused | computed | prefill s |\n|---:|---:|---:|---:|---:|")
    for turn in range(args.turns):
        messages.append({"role": "user", "content": f"Now tell me about {TOPICS[turn % len(TOPICS)]}."})
        body = {"messages": messages, "max_tokens": args.turn_tokens, "temperature": 0, "ignore_eos": True}
        reply = client.post("/v1/chat/completions", json=body).json()
        usage, timings = reply["usage"], reply["timings"]
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        computed += usage["prompt_tokens"] - cached
        total += usage["prompt_tokens"]
        print(f"| {turn + 1} | {usage['prompt_tokens']} | {cached} | {usage['prompt_tokens'] - cached} | "
              f"{timings['prefill_seconds']:.3f} |")
        messages.append({"role": "assistant", "content": reply["choices"][0]["message"]["content"]})
    print(f"prefill tokens: {computed} computed with reuse, {total} without ({1 - computed / total:.1%} saved, "
          f"x{total / computed:.1f} fewer)")


def cpu_name() -> str:
    """The CPU's model name and whether it has AVX-512 VNNI (the int8 kernels' fast path)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.machine())
    return f"{name} ({'AVX-512 VNNI' if 'avx512_vnni' in info else 'no AVX-512 VNNI'})"


def main() -> None:
    args = parse_args()
    folder = args.model or demo_model()
    print(f"# {folder.name} on {cpu_name()}, {os.cpu_count()} CPUs, device {args.device}, "
          f"experts {args.experts or 'torch'}")
    process, base = start_server(args, folder)
    try:
        model = offload.load(folder, device=args.device, max_context=args.max_context, experts=args.experts)
        with httpx.Client(base_url=base, timeout=600) as client:
            overhead(args, client, model)
            conversation(args, client)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(30)


if __name__ == "__main__":
    main()
