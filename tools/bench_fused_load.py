"""Peak memory of loading and converting a checkpoint whose experts are whole-layer tensors (a benchmark, not a test).

    python tools/bench_fused_load.py /tmp/fused/gpt-oss-20b-1l                      # gpt-oss-20b shapes, 1 layer
    python tools/bench_fused_load.py /tmp/fused/gpt-oss-20b-1l --compare /tmp/old    # and another source tree

Writes (once) a gpt-oss-shaped checkpoint in the published MXFP4 layout: every tensor the loader reads, with
gpt-oss-20b's hidden size, experts and intermediate size, `--layers` layers and a `--vocab` of its own (the
embedding and LM head are not what this measures); experts as random e2m1 `_blocks` with e8m0 `_scales` around
2^-6, everything else random bf16 (norms one). Then, in a fresh process each and alternating between the source
trees round by round: `offload.load(..., experts="int8")` and `offload convert ... --experts int8`, each reporting
its peak resident memory (ru_maxrss) and wall time. The expert bytes of one layer are printed for scale: a layer
decoded to float32 at once is 4 bytes per weight.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offload.arch import architecture  # noqa: E402
from offload.model.transformer import Transformer  # noqa: E402
from offload.weights.source import InventedSource  # noqa: E402

GPT_OSS_20B = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": 2880,
               "intermediate_size": 2880, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
               "num_local_experts": 32, "num_experts_per_tok": 4, "sliding_window": 128, "swiglu_limit": 7.0,
               "rope_theta": 150000, "max_position_embeddings": 131072, "rms_norm_eps": 1e-05,
               "tie_word_embeddings": False, "quantization_config": {"quant_method": "mxfp4"}}
WHOLE_LAYER = ("experts.gate_up_proj", "experts.down_proj")

CHILD = """
import json, resource, sys, time
import offload
from offload.weights.store import convert
start = time.perf_counter()
if sys.argv[1] == "load":
    offload.load(sys.argv[2], device="cpu", experts="int8", max_context=64)
else:
    convert(sys.argv[2], sys.argv[3], "int8")
peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss": peak_rss}))
"""


def write_checkpoint(folder: Path, layers: int, vocab: int) -> int:
    """The MXFP4 checkpoint; returns the stored bytes of one layer's experts."""
    kinds = ["sliding_attention", "full_attention"] * layers
    config = {**GPT_OSS_20B, "num_hidden_layers": layers, "vocab_size": vocab, "layer_types": kinds[:layers]}
    arch = architecture("gpt_oss")
    src = InventedSource(lambda name, shape: torch.empty(shape, device="meta"), device=torch.device("meta"))
    Transformer(arch.config_from_hf(config), arch.names, src, lambda layer, weights: None, max_context=1)
    generator = torch.Generator().manual_seed(0)
    tensors, expert_bytes = {}, 0
    for name, meta in src.tensors.items():
        if name.endswith(WHOLE_LAYER):
            E, K, O = meta.shape  # stored out-major: [E, O, K/32, 16] blocks, [E, O, K/32] scales
            tensors[f"{name}_blocks"] = torch.randint(0, 256, (E, O, K // 32, 16), dtype=torch.uint8,
                                                      generator=generator)
            tensors[f"{name}_scales"] = torch.randint(119, 123, (E, O, K // 32), dtype=torch.uint8,
                                                      generator=generator)
            if name.startswith("model.layers.0."):
                expert_bytes += E * O * K * 17 // 32
        elif name.endswith("norm.weight"):
            tensors[name] = torch.ones(meta.shape, dtype=torch.bfloat16)
        else:
            tensors[name] = (torch.randn(meta.shape, generator=generator) * 0.02).to(torch.bfloat16)
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return expert_bytes


def run(tree: Path, action: str, folder: Path) -> str:
    """One action in a fresh process on source tree `tree`: its peak RSS and time, or the error it ended with."""
    out = Path(tempfile.mkdtemp(prefix="bench_fused_"))
    try:
        env = {**os.environ, "PYTHONPATH": str(tree)}
        done = subprocess.run([sys.executable, "-c", CHILD, action, str(folder), str(out / "store")], env=env,
                              cwd=tree, capture_output=True, text=True)  # cwd: `-c` puts it first on sys.path
        if done.returncode != 0:
            return "failed: " + (done.stderr.strip().splitlines() or ["?"])[-1]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        return f"peak RSS {result['peak_rss'] / 2**30:6.2f} GiB  {result['seconds']:6.1f} s"
    finally:
        shutil.rmtree(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the checkpoint (written when missing)")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compare", type=Path, default=None, help="another source tree (its root) to run too")
    args = parser.parse_args(argv)
    if not args.folder.exists():
        expert_bytes = write_checkpoint(args.folder, args.layers, args.vocab)
        print(f"wrote {args.folder}: one layer's experts {expert_bytes / 2**30:.2f} GiB as MXFP4, "
              f"{expert_bytes * 128 / 17 / 2**30:.2f} GiB in float32")
    trees = {"this tree": Path(__file__).resolve().parents[1]}
    if args.compare is not None:
        trees["compared"] = args.compare.resolve()
    for r in range(args.rounds):
        for action in ("load", "convert"):
            for label, tree in trees.items():
                print(f"round {r + 1}  {action:8s} {label:10s} {run(tree, action, args.folder)}", flush=True)


if __name__ == "__main__":
    main()
