"""Hand-written LLVM IR for the quantized panel microkernels (Numba intrinsics).

A *panel* is 16 consecutive output rows of one matrix stored in the tiled layout of docs/formats.md: for every 4
input columns one 64-byte tile holds the 16 rows' 4 bytes. One `vpdpbusd` multiplies a whole tile by 4 broadcast
activation bytes and adds the 16 row sums into 16 int32 lanes, so a panel never needs a horizontal reduction.
LLVM never produces `vpdpbusd` from Numba loops (and plain Numba nibble unpacking caps int4 at ~20% of the
memory bandwidth), hence this file.

ISA tiers (`isa_tier()`, decided when a kernel is compiled, i.e. at run time on the user's CPU; Numba's cache is
keyed by CPU and jit_cache adds the tier). Fastest first:

- ``avx512-vnni``: one 512-bit `vpdpbusd` per tile and activation row (the path the layout was made for);
- ``avx-vnni``: the same instruction on two 256-bit halves (Intel client CPUs' AVX-VNNI, VEX-encoded; EVEX on an
  AVX512-VL + VNNI CPU, which lets the tier run on an AVX-512 machine);
- ``avx2``: `vpmaddubsw` + `vpmaddwd` on 256-bit halves, as llama.cpp's Q8_0 / Q4_0 AVX2 dot products. vpmaddubsw
  saturates its int16 pair sums, so int8 feeds it |w| against sign(w) * x (`vpsignb`): |w| * x <= 127 * 127 and a
  pair sum stays below 32767 — exact. int4 nibbles (<= 15) against x give pair sums <= 3810, so a whole group of
  32 columns (8 vpmaddubsw per row) adds up in int16 (<= 30480) and is widened once per group;
- ``portable``: the same arithmetic as plain vector IR (widen, multiply, add) that LLVM lowers for any x86-64 or
  ARM target, so an older CPU gets a slower kernel, never an illegal instruction. int4 multiplies its nibbles in
  16-bit lanes (a group's sums fit, as on avx2), half the multiply-adds per weight of int8's 32-bit lanes.

OFFLOAD_CPU_ISA=<tier> picks a lower tier than the CPU allows (to compare tiers on one machine); asking for a
higher one is refused, since the kernel would stop with an illegal instruction.
"""
from __future__ import annotations

import os

import llvmlite.binding as llvm
import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from offload.errors import OffloadError

_I1, _I8, _I16, _I32, _I64, _F32 = (ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64),
                                    ir.FloatType())

PANEL = 16  # output rows per panel (16 int32 / float32 lanes: one zmm, or two ymm halves)
GROUP = 32  # input columns per quantization group
MAX_NR = 8  # tokens a microkernel call can handle (register blocking: 8 int + 8 float accumulators)
# Software prefetch distance for the weight stream: +5% GB/s on a Qwen3 decode (2048-4096 and 8192 measured alike).
PREFETCH_BYTES = 4096

TIERS = ("avx512-vnni", "avx-vnni", "avx2", "portable")  # fastest first
ISA_VARIABLE = "OFFLOAD_CPU_ISA"


def tier_for(features: frozenset[str]) -> str:
    """The fastest tier a CPU with these LLVM feature names runs (a pure function of the feature set)."""
    if {"avx512f", "avx512bw", "avx512vnni"} <= features:
        return "avx512-vnni"
    if {"avx2", "fma", "f16c"} <= features:
        return "avx-vnni" if "avxvnni" in features or {"avx512vl", "avx512vnni"} <= features else "avx2"
    return "portable"


def jit_features() -> frozenset[str]:
    """The CPU features Numba compiles for: NUMBA_CPU_FEATURES when set, else the host's (Numba uses the host's
    features even under NUMBA_CPU_NAME, so a restricted target must name its features)."""
    text = numba.config.CPU_FEATURES
    if text is None:
        return frozenset(name for name, on in llvm.get_host_cpu_features().items() if on)
    return frozenset(f[1:] for f in text.replace(" ", "").split(",") if f.startswith("+"))


def isa_tier() -> str:
    """The tier the kernels compile for: the JIT target's best, or OFFLOAD_CPU_ISA when that is not higher."""
    best = tier_for(jit_features())
    asked = os.environ.get(ISA_VARIABLE, "").strip()
    if not asked:
        return best
    if asked not in TIERS:
        raise OffloadError(f"{ISA_VARIABLE}={asked!r} is not a kernel tier: use one of {', '.join(TIERS)}")
    if TIERS.index(asked) < TIERS.index(best):
        raise OffloadError(f"{ISA_VARIABLE}={asked} needs instructions this CPU lacks (its best tier is {best}): "
                           f"unset it or pick {', '.join(TIERS[TIERS.index(best):])}")
    return asked


# Read when a kernel is compiled; tests set it to compile another tier's kernels.
TIER = isa_tier()


def _lanes() -> int:
    """int32 lanes per vector register the tier uses: 16 (zmm, or the portable path's LLVM-legalized vectors)
    or 8 (ymm)."""
    return 8 if TIER in ("avx-vnni", "avx2") else 16


def _vec(elem: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(elem, n)


def _call(builder: ir.IRBuilder, name: str, ret: ir.Type, args: list) -> ir.Value:
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _ptr(context, builder, aty, aval, off):
    """Address of element `off` of a 1-D array."""
    return builder.gep(context.make_array(aty)(context, builder, aval).data, [off])


def _load(builder: ir.IRBuilder, ptr, vty: ir.Type) -> ir.Value:
    return builder.load(builder.bitcast(ptr, vty.as_pointer()), align=1)


class _VolatileLoad(ir.LoadInstr):
    """`load volatile`: LLVM keeps volatile accesses in program order (llvmlite has no flag for it)."""

    def descr(self, buf) -> None:
        [ptr] = self.operands
        buf.append(f"load volatile {self.type}, {ptr.type} {ptr.get_reference()}, align 1\n")


def _load_in_order(builder: ir.IRBuilder, ptr, vty: ir.Type) -> ir.Value:
    """A load that stays in program order with the other in-order loads. For the weight stream: left free, LLVM's
    scheduler hoisted each group's last tile above the other seven, and that stream, going backwards once per
    group, measured 10-23% slower on Qwen3 decode matmuls (x86 still folds the volatile load into its vpxorq)."""
    instr = _VolatileLoad(builder.block, builder.bitcast(ptr, vty.as_pointer()))
    builder._insert(instr)  # IRBuilder.load cannot make a volatile load
    return instr


# The hint of the panel kernels' weight-stream prefetches, by the host's vendor (prefetch_locality). Intel: LLVM
# locality 2, prefetcht1 (into L2, not L1). On the Intel AMX VM, whose loads wait ~170 ns, it streamed the gate/up
# pair of 8 Qwen3 experts cold 1.05-1.10x faster than prefetcht0 and decoded DeepSeek-V2-Lite 1.14-1.16x, Mixtral
# 4.7B 1.07-1.09x, the 48-layer Qwen3 1.03-1.06x faster end to end (docs/benchmarks.md, "the weight streams
# prefetched into L2"); presumably a prefetcht0 holds one of L1's few fill buffers per line in flight, which caps
# the lines a core can have in flight. Data already in L3 is read ~12% slower this way (L1 misses then wait on L2),
# but a model's weights come from DRAM once a token. AMD: locality 3, prefetcht0. On a Zen 4 VM the kernels of both
# hints in one process, calls alternating (tools/bench_kernels_against.py): prefetcht0 0.98-1.06x as fast at one
# token where DRAM gave 30-34 GB/s, and 1.23-1.38x where it gave more (Mixtral and DeepSeek-V3 layers at 53-57 GB/s
# against 40-41 with prefetcht1), so L2-bound hints cap the stream there (docs/benchmarks.md, "Zen 4, a fourth
# day"). Earlier AMD cores fill L1 for every hint. The attention's cache streams (`prefetch`) keep prefetcht1
# everywhere (CACHE_STREAM_LOCALITY): on the Zen 4 VM, `attend` with prefetcht0 on them ran 0.80-0.96x as fast cold
# as with prefetcht1 (Qwen3's and Mixtral 4.7B's heads, 580 and 2048 positions, float32 and bf16 caches; in one
# process, calls alternating), and a second, near prefetcht0 two key quads ahead 0.87-1.03x (docs/benchmarks.md,
# "Zen 4, a fifth day"). There the attention's arithmetic alone takes nearly as long as its read (Qwen3, 580
# positions: 69-73 us warm against 83 us for a cold plain read of its rows).
AMD_CPU_NAMES = ("znver", "bdver", "btver")  # LLVM's names of AMD's cores (znver1-5, Bulldozer's, Bobcat's)


def prefetch_locality(host_cpu: str) -> int:
    """LLVM's locality for the weight streams' prefetches on the CPU LLVM names `host_cpu`: 3 (prefetcht0) on AMD's
    cores, 2 (prefetcht1) elsewhere."""
    return 3 if host_cpu.startswith(AMD_CPU_NAMES) else 2


PREFETCH_LOCALITY = prefetch_locality(llvm.get_host_cpu_name())  # the CPU running the code, not the JIT target
CACHE_STREAM_LOCALITY = 2  # the attention's cache streams: prefetcht1 on every host


def _prefetch(builder: ir.IRBuilder, ptr, distance: int, locality: int = PREFETCH_LOCALITY) -> None:
    """Prefetch `distance` bytes past `ptr` (LLVM locality: the weight streams' host hint by default); never
    faults."""
    p8 = builder.bitcast(ptr, _I8.as_pointer())
    _call(builder, "llvm.prefetch.p0", ir.VoidType(),
          [builder.gep(p8, [_I64(distance)]), _I32(0), _I32(locality), _I32(1)])


@intrinsic
def prefetch(typingctx, arr, byte):
    """A hint to bring the cache line at `byte` bytes into arr's data into L2 (CACHE_STREAM_LOCALITY;
    llvm.prefetch: no fault, no wait): the attention's cache streams."""
    if not isinstance(arr, types.Array) or not isinstance(byte, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        offset = context.cast(builder, args[1], sig.args[1], types.int64)
        _prefetch(builder, builder.gep(builder.bitcast(data, _I8.as_pointer()), [offset]), 0, CACHE_STREAM_LOCALITY)
        return context.get_dummy_value()

    return types.void(arr, byte), codegen


def _splat(builder: ir.IRBuilder, scalar, vty: ir.VectorType) -> ir.Value:
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), scalar, _I32(0))
    zeros = ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count)
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), zeros)


def _const(vty: ir.VectorType, value: int) -> ir.Constant:
    return ir.Constant(vty, [value] * vty.count)


def _dpbusd(builder: ir.IRBuilder, acc, tile, xword) -> ir.Value:
    """acc[i] += sum_j u8(tile byte 4i+j) * s8(xword byte j) for every lane i: `tile` and `acc` <lanes x i32>,
    `xword` a scalar i32 holding 4 activation bytes (broadcast to every lane). The vnni tiers and portable."""
    lanes = acc.type.count
    if TIER in ("avx512-vnni", "avx-vnni"):
        name = "llvm.x86.avx512.vpdpbusd.512" if lanes == 16 else "llvm.x86.avx512.vpdpbusd.256"
        return _call(builder, name, acc.type, [acc, tile, _splat(builder, xword, acc.type)])
    # Portable: byte j of every lane times the scalar byte j; plain 32-bit multiplies vectorize on any target.
    for j in range(4):
        w_j = builder.and_(builder.lshr(tile, _const(acc.type, 8 * j)), _const(acc.type, 0xFF))
        x_j = builder.sext(builder.trunc(builder.lshr(xword, _I32(8 * j)), _I8), _I32)
        acc = builder.add(acc, builder.mul(w_j, _splat(builder, x_j, acc.type)))
    return acc


def _maddubs(builder: ir.IRBuilder, unsigned, signed) -> ir.Value:
    """AVX2 vpmaddubsw: <32 x i8> u8 x s8 -> <16 x i16> sums of adjacent pairs (saturating)."""
    return _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), [unsigned, signed])


def _widen_pairs(builder: ir.IRBuilder, v16) -> ir.Value:
    """AVX2 vpmaddwd against ones: <16 x i16> -> <8 x i32> sums of adjacent pairs (exact)."""
    return _call(builder, "llvm.x86.avx2.pmadd.wd", _vec(_I32, 8), [v16, _const(_vec(_I16, 16), 1)])


def _sign_bytes(builder: ir.IRBuilder, x, w) -> ir.Value:
    """AVX2 vpsignb: x negated where w < 0, zeroed where w == 0 (<32 x i8>)."""
    return _call(builder, "llvm.x86.avx2.psign.b", _vec(_I8, 32), [x, w])


def _abs_bytes(builder: ir.IRBuilder, w) -> ir.Value:
    return _call(builder, "llvm.abs.v32i8", _vec(_I8, 32), [w, ir.Constant(_I1, 0)])


# Portable int4: a tile as int16 lanes (lane 2i: bytes 0-1 of panel row i, lane 2i+1: bytes 2-3), its four nibbles
# per lane taken by shift and mask once per tile, then per activation row 4 multiply-adds of 32 int16 lanes per 128
# weights (the 32-bit form int8 uses needs 8 multiply-adds of 16 int32 lanes, with 32-bit multiplies). Nibble k of
# byte b (b = 0..3 of the row's 4 bytes) is column 8t + 4k + b: (shift, even lane's column, odd lane's column).
_NIBBLES = ((0, 0, 2), (4, 4, 6), (8, 1, 3), (12, 5, 7))


def _nibbles(builder: ir.IRBuilder, tile) -> list[ir.Value]:
    """An int4 tile (<64 x i8>) as its 4 nibble vectors <32 x i16>, in _NIBBLES order."""
    v16 = _vec(_I16, tile.type.count // 2)
    w = builder.bitcast(tile, v16)
    return [builder.and_(builder.lshr(w, _const(v16, shift)), _const(v16, 0x0F)) for shift, _, _ in _NIBBLES]


def _nibble_products(builder: ir.IRBuilder, acc, nibbles: list, x8_ptr) -> ir.Value:
    """acc + the products of a tile's nibbles with their 8 activation bytes at x8_ptr, in int16 lanes: nibble
    (<= 15) x int8 (|x| <= 128) <= 1920, 16 of them per lane and group <= 30720, so a group cannot overflow."""
    x = builder.sext(_load(builder, x8_ptr, _vec(_I8, 8)), _vec(_I16, 8))
    undef = ir.Constant(x.type, ir.Undefined)
    for nibble, (_, even, odd) in zip(nibbles, _NIBBLES):
        lanes = nibble.type.count
        xv = builder.shuffle_vector(x, undef, ir.Constant(_vec(_I32, lanes), [even, odd] * (lanes // 2)))
        acc = builder.add(acc, builder.mul(nibble, xv))
    return acc


def _add_pairs(builder: ir.IRBuilder, v16) -> ir.Value:
    """Portable <2n x i16> -> <n x i32> sums of adjacent pairs (the plain-IR form of vpmaddwd against ones)."""
    n = v16.type.count // 2
    wide = builder.sext(v16, _vec(_I32, 2 * n))
    undef = ir.Constant(wide.type, ir.Undefined)
    even = builder.shuffle_vector(wide, undef, ir.Constant(_vec(_I32, n), list(range(0, 2 * n, 2))))
    odd = builder.shuffle_vector(wide, undef, ir.Constant(_vec(_I32, n), list(range(1, 2 * n, 2))))
    return builder.add(even, odd)


def _fp16_to_f32(builder: ir.IRBuilder, ptr, lanes: int) -> ir.Value:
    """Load `lanes` fp16 scales as float32. Every tier but portable has F16C (AVX-512F implies it; the 256-bit
    tiers require it): one vcvtph2ps. Portable uses integer ops only (no libcall): subnormal halves go through an
    int->float conversion rather than a float32 subnormal, so a flush-denormals mode cannot zero them."""
    vi16, vi32, vf32 = _vec(_I16, lanes), _vec(_I32, lanes), _vec(_F32, lanes)
    if TIER != "portable":
        return builder.fpext(builder.bitcast(_load(builder, ptr, vi16), _vec(ir.HalfType(), lanes)), vf32)
    h = builder.zext(_load(builder, ptr, vi16), vi32)
    mag = builder.and_(h, _const(vi32, 0x7FFF))
    normal = builder.add(builder.shl(mag, _const(vi32, 13)), _const(vi32, 112 << 23))  # rebias exponent 15 -> 127
    subnormal = builder.bitcast(builder.fmul(builder.sitofp(mag, vf32), ir.Constant(vf32, [2.0**-24] * lanes)),
                                vi32)
    is_sub = builder.icmp_unsigned("<", mag, _const(vi32, 0x0400))
    bits = builder.or_(builder.select(is_sub, subnormal, normal),
                       builder.shl(builder.and_(h, _const(vi32, 0x8000)), _const(vi32, 16)))
    return builder.bitcast(bits, vf32)


def _fma(builder: ir.IRBuilder, a, b, c) -> ir.Value:
    """a * b + c: one fused instruction where the target has FMA, a multiply and an add elsewhere (no libcall)."""
    return _call(builder, f"llvm.fmuladd.v{a.type.count}f32", a.type, [a, b, c])


def _as_i64(context, builder, val, ty) -> ir.Value:
    return context.cast(builder, val, ty, types.int64)


_Q8_ARGS = ("w", "w_off", "d", "s_off", "x", "x_stride", "xs", "xsum", "xs_stride", "ngroups", "out", "out_off",
            "out_stride", "r0", "nr")
_Q4_ARGS = _Q8_ARGS[:3] + ("m",) + _Q8_ARGS[3:]


def _panel_codegen(q4: bool, symmetric: bool = False):
    """IR for one panel times activation rows r0 .. r0+nr-1 (nr <= 8 at run time): int8 (q4=False), asymmetric
    int4 (q4=True) or symmetric int4 (q4 and symmetric: no offsets read). The rows go through register-blocked
    blocks of 8 | 4 + 2 + 1."""

    def codegen(context, builder, sig, args):
        names = _Q4_ARGS if q4 else _Q8_ARGS
        val, ty = dict(zip(names, args)), dict(zip(names, sig.args))

        def i64(name):
            return _as_i64(context, builder, val[name], ty[name])

        def ptr(name, off):
            return _ptr(context, builder, ty[name], val[name], off)

        def emit(first_row, nr: int) -> None:
            """Rows first_row .. first_row+nr-1, nr a Python int: nr int32 and nr float32 accumulators."""

            def row(name, off, stride, n):
                index = builder.add(first_row, _I64(n))
                return ptr(name, builder.add(off, builder.mul(i64(stride), index)))

            zero = _I64(0)
            xp = [row("x", zero, "x_stride", n) for n in range(nr)]
            xsp = [row("xs", zero, "xs_stride", n) for n in range(nr)]
            xcp = [row("xsum", zero, "xs_stride", n) for n in range(nr)]
            _panel_rows(builder, q4, symmetric, nr, i64("ngroups"), wp, dp, mp, xp, xsp, xcp,
                        [row("out", i64("out_off"), "out_stride", n) for n in range(nr)])

        wp, dp = ptr("w", i64("w_off")), ptr("d", i64("s_off"))
        mp = ptr("m", i64("s_off")) if q4 and not symmetric else None
        r0, nr = i64("r0"), i64("nr")
        with builder.if_else(builder.icmp_signed("==", nr, _I64(MAX_NR))) as (full, partial):
            with full:  # 256-bit tiers: two blocks of 4 (8 rows x 2 halves would spill the 16 ymm registers)
                block = MAX_NR if _lanes() == 16 else MAX_NR // 2
                for first in range(0, MAX_NR, block):
                    emit(builder.add(r0, _I64(first)), block)
            with partial:
                first = r0
                for width in (4, 2, 1):
                    taken = builder.icmp_signed("!=", builder.and_(nr, _I64(width)), _I64(0))
                    with builder.if_then(taken):
                        emit(first, width)
                    first = builder.add(first, builder.select(taken, _I64(width), _I64(0)))
        return context.get_dummy_value()

    return codegen


def _panel_rows(builder: ir.IRBuilder, q4: bool, symmetric: bool, nr: int, ngroups, wp, dp, mp, xp, xsp, xcp,
                outp) -> None:
    """The group loop for `nr` activation rows: per tile, row and register part one dot-product step (see the
    tiers in the module docstring), float scaling per group of 32. Asymmetric int4 adds m * xs * sum(x) in float;
    symmetric int4 subtracts 8 * sum(x) from the integer sum (exact), so d * xs * (sum(q x) - 8 sum(x))."""
    lanes = _lanes()
    parts = PANEL // lanes  # a panel's 16 rows: one 512-bit part or two 256-bit halves
    vi8, vi32, vf32 = _vec(_I8, 4 * lanes), _vec(_I32, lanes), _vec(_F32, lanes)
    avx2 = TIER == "avx2"
    nibble16 = q4 and TIER == "portable"  # int4 nibbles x int8 activations in int16 lanes (_nibble_products)
    facc = [[cgutils.alloca_once_value(builder, ir.Constant(vf32, None)) for _ in range(parts)] for _ in range(nr)]
    group_bytes = PANEL * GROUP // (2 if q4 else 1)
    low4, flip = _const(vi8, 0x0F), _const(vi8, -128)
    # Two accumulators per row and part (even / odd steps) halve the dependency chain, which bounds a one-token
    # GEMV; with many rows the register file is the limit, so they share one.
    chains = 2 if nr * parts <= 4 else 1
    # avx2 and portable int4 add a group's products in int16 (<= 30480, above), widened once per group
    zero = ir.Constant(_vec(_I16, 2 * lanes) if q4 and (avx2 or nibble16) else vi32, None)
    scales_ahead = PREFETCH_BYTES // group_bytes * PANEL * 2  # bytes of fp16 scales for PREFETCH_BYTES of tiles
    with cgutils.for_range(builder, ngroups) as loop:
        g = loop.index
        # the scale streams, as far ahead as the weights: +0-6% measured
        for p in (dp, mp) if mp is not None else (dp,):
            _prefetch(builder, builder.gep(p, [builder.mul(g, _I64(PANEL))]), scales_ahead)

        def scales(p):
            return [_fp16_to_f32(builder, builder.gep(p, [builder.add(builder.mul(g, _I64(PANEL)), _I64(k * lanes))]),
                                 lanes) for k in range(parts)]

        dv = scales(dp)
        wg = builder.gep(wp, [builder.mul(g, _I64(group_bytes))])
        xg = builder.mul(g, _I64(GROUP))
        xsums = [builder.load(builder.gep(xcp[n], [g])) for n in range(nr)]
        acc = [[[zero] * chains for _ in range(parts)] for _ in range(nr)]  # [row][part][chain]
        if not q4 and not avx2:
            # int8 weights enter vpdpbusd as unsigned (w ^ 0x80 = w + 128); start from -128 * sum(x) to undo it.
            for n in range(nr):
                bias = _splat(builder, builder.mul(xsums[n], _I32(-128)), vi32)
                for k in range(parts):
                    acc[n][k][0] = bias

        def step(tile, col, chain):
            """tile: the parts of one 64-byte tile (unsigned bytes; signed int8 weights on avx2)."""
            magnitude = [_abs_bytes(builder, w) for w in tile] if avx2 and not q4 else None
            for n in range(nr):
                xword = builder.load(builder.bitcast(builder.gep(xp[n], [builder.add(xg, _I64(col))]),
                                                     _I32.as_pointer()), align=1)
                xb = builder.bitcast(_splat(builder, xword, vi32), vi8) if avx2 else None
                for k in range(parts):
                    a = acc[n][k][chain]
                    if not avx2:
                        a = _dpbusd(builder, a, builder.bitcast(tile[k], vi32), xword)
                    elif q4:
                        a = builder.add(a, _maddubs(builder, tile[k], xb))
                    else:  # |w| * (sign(w) * x) = w * x, pair sums <= 2 * 127 * 127: no saturation
                        a = builder.add(a, _widen_pairs(builder, _maddubs(builder, magnitude[k],
                                                                          _sign_bytes(builder, xb, tile[k]))))
                    acc[n][k][chain] = a

        for t in range(GROUP // 8 if q4 else GROUP // 4):
            tile_ptr = builder.gep(wg, [_I64(64 * t)])
            _prefetch(builder, tile_ptr, PREFETCH_BYTES)
            raw = [_load_in_order(builder, builder.gep(tile_ptr, [_I64(4 * lanes * k)]), vi8) for k in range(parts)]
            if nibble16:
                nibbles = [_nibbles(builder, r) for r in raw]
                for n in range(nr):
                    x8 = builder.gep(xp[n], [builder.add(xg, _I64(8 * t))])
                    for k in range(parts):
                        chain = acc[n][k]
                        chain[t % chains] = _nibble_products(builder, chain[t % chains], nibbles[k], x8)
            elif q4:  # low nibbles are columns 8t..8t+3, high nibbles 8t+4..8t+7
                step([builder.and_(r, low4) for r in raw], 8 * t, 0)
                step([builder.and_(builder.lshr(r, _const(vi8, 4)), low4) for r in raw], 8 * t + 4, chains - 1)
            else:
                step(raw if avx2 else [builder.xor(r, flip) for r in raw], 4 * t, t % chains)
        mv = scales(mp) if mp is not None else None
        for n in range(nr):
            xsn = builder.load(builder.gep(xsp[n], [g]))
            # the offset term m * xs * sum(x) (int4), or the integer -8 * sum(x) (int4s)
            xm = builder.fmul(xsn, builder.sitofp(xsums[n], _F32)) if mv is not None else None
            centre = _splat(builder, builder.mul(xsums[n], _I32(-8)), vi32) if symmetric else None
            for k in range(parts):
                total = acc[n][k][0]
                for c in range(1, chains):
                    total = builder.add(total, acc[n][k][c])
                if avx2 and q4:
                    total = _widen_pairs(builder, total)
                elif nibble16:
                    total = _add_pairs(builder, total)
                if symmetric:
                    total = builder.add(total, centre)
                f = _fma(builder, builder.sitofp(total, vf32), builder.fmul(dv[k], _splat(builder, xsn, vf32)),
                         builder.load(facc[n][k]))
                if mv is not None:
                    f = _fma(builder, mv[k], _splat(builder, xm, vf32), f)
                builder.store(f, facc[n][k])
    for n in range(nr):
        for k in range(parts):
            dest = builder.bitcast(builder.gep(outp[n], [_I64(k * lanes)]), vf32.as_pointer())
            builder.store(builder.load(facc[n][k]), dest, align=1)


@intrinsic
def panel_q8(typingctx, w, w_off, d, s_off, x, x_stride, xs, xsum, xs_stride, ngroups, out, out_off, out_stride, r0,
             nr):
    """out[out_off + r*out_stride + i] = sum_k W[i, k] * X[r, k] for panel rows i < 16, r0 <= r < r0 + nr <= r0 + 8.

    w: int8 tiles of one panel from w_off; d: its fp16 scale bits [ngroups, 16] from s_off; x: int8 activation
    rows (row r at r*x_stride); xs / xsum: their float32 group scales / int32 group sums (row r at r*xs_stride).
    All arrays 1-D.
    """
    sig = types.void(w, w_off, d, s_off, x, x_stride, xs, xsum, xs_stride, ngroups, out, out_off, out_stride, r0, nr)
    return sig, _panel_codegen(False)


@intrinsic
def panel_q4(typingctx, w, w_off, d, m, s_off, x, x_stride, xs, xsum, xs_stride, ngroups, out, out_off, out_stride,
             r0, nr):
    """As panel_q8 for the int4 layouts: W[i, k] = d * q + m, q a nibble, m the group offset (int4); m None:
    W[i, k] = d * (q - 8) (int4s), compiled without the offset stream."""
    sig = types.void(w, w_off, d, m, s_off, x, x_stride, xs, xsum, xs_stride, ngroups, out, out_off, out_stride, r0,
                     nr)
    return sig, _panel_codegen(True, isinstance(m, types.NoneType))


@intrinsic
def bits_to_f32(typingctx, bits):
    """Reinterpret the low 32 bits of an integer as float32 (Numba widens uint32 arithmetic to 64 bits)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        low = builder.trunc(args[0], _I32) if bits.bitwidth > 32 else builder.zext(args[0], _I32) \
            if bits.bitwidth < 32 else args[0]
        return builder.bitcast(low, _F32)

    return types.float32(bits), codegen


@intrinsic
def f32_to_bits(typingctx, value):
    """Reinterpret a float32 as uint32."""
    if value != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], _I32)

    return types.uint32(value), codegen
