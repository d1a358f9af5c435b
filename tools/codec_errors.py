"""Relative RMS error of each published quantized layout (offload/weights/encoders.py -> codecs.py) and of its
mapping onto offload's packed formats, on random matrices; prints the markdown table of docs/formats.md.

    python tools/codec_errors.py [--rows 2048] [--cols 768] [--seed 0]

"source" is encode -> decode against the float matrix; "in offload" is the matrix offload runs, against the
same float matrix; "mapping" is what the mapping alone adds (offload's matrix against the decoded one).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from csrc_py import formats
from offload.weights import codecs, encoders


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def offload_matrix(decoded: codecs.IntGroups | torch.Tensor, how: str) -> np.ndarray:
    """The matrix offload runs for `how`: exact / rounded pack_groups, or a requantizing format."""
    if how in ("int8 exact", "int4 exact", "int4 fp16-rounded"):
        pm = formats.pack_groups(decoded, how[:4], round_scales=how.endswith("rounded"))
        if pm is None:
            raise SystemExit(f"pack_groups refused {how}")
        return formats.unpack(pm, 0)
    w = torch.from_numpy(decoded.dequantize()) if isinstance(decoded, codecs.IntGroups) else decoded
    fmt = how.split()[0]
    return formats.unpack(formats.pack(w[None], fmt), 0)


def rows(w: torch.Tensor) -> list[tuple[str, codecs.IntGroups | torch.Tensor, str]]:
    """(scheme, decoded matrix, how offload holds it) for each scheme and mapping measured."""
    fp8 = codecs.fp8_block(*encoders.encode_fp8_block(w))
    fp8_ue8m0 = codecs.fp8_block(*encoders.encode_fp8_block(w, ue8m0=True))
    ct = encoders.encode_compressed_int4(w, 32)
    gq = encoders.encode_gptq(w, 128)
    gq_asym = encoders.encode_gptq(w, 128, sym=False)
    gq_act = encoders.encode_gptq(w, 128, act_order=True, sym=False)
    awq = encoders.encode_awq(w, 128)
    ct_groups = codecs.compressed_int4(ct["weight_packed"], ct["weight_scale"], ct["weight_shape"], 32)
    mx_groups = codecs.mxfp4(*encoders.encode_mxfp4(w))
    return [
        ("FP8 block 128x128, fp32 scales", fp8, "int8 requantized"),
        ("FP8 block 128x128, fp32 scales", fp8, "bf16"),
        ("FP8 block 128x128, ue8m0 scales", fp8_ue8m0, "int8 requantized"),
        ("FP8 block 128x128, ue8m0 scales", fp8_ue8m0, "bf16"),
        ("MXFP4", mx_groups, "int8 exact"),
        ("compressed-tensors int4 sym, g32", ct_groups, "int4 exact"),
        ("GPTQ 4-bit sym, g128", codecs.gptq(**gq, group_size=128), "int4 exact"),
        ("GPTQ 4-bit asym, g128", codecs.gptq(**gq_asym, group_size=128), "int4 fp16-rounded"),
        ("GPTQ 4-bit asym, g128, act-order", codecs.gptq(**gq_act, group_size=128), "int4 requantized"),
        ("AWQ 4-bit, g128", codecs.awq(**awq, group_size=128), "int4 fp16-rounded"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=768)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    r = np.random.default_rng(args.seed)
    shape = (args.rows, args.cols)
    mats = {"Gaussian": r.standard_normal(shape), "Student t(3)": r.standard_t(3, shape)}
    results = {}
    for dist, m in mats.items():
        w = torch.from_numpy((m * 0.02).astype(np.float32))
        wn = w.numpy()
        for scheme, decoded, how in rows(w):
            source = decoded.dequantize() if isinstance(decoded, codecs.IntGroups) else decoded.numpy()
            held = offload_matrix(decoded, how)
            results.setdefault((scheme, how), []).append((rel(source, wn), rel(held, wn), rel(held, source)))
        for fmt in ("int8", "int4"):
            held = formats.unpack(formats.pack(w[None], fmt), 0)
            results.setdefault((f"(offload's own {fmt} from the float matrix)", fmt), []).append(
                (0.0, rel(held, wn), rel(held, wn)))
    names = list(mats)
    print(f"{args.rows} x {args.cols}, seed {args.seed}; relative RMS error, " + " / ".join(names))
    print("| source layout | in offload as | source | in offload | mapping alone |")
    print("|---|---|---|---|---|")
    for (scheme, how), vals in results.items():
        cells = [" / ".join(f"{v[i]:.3g}" for v in vals) for i in range(3)]
        print(f"| {scheme} | {how} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
