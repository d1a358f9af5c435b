"""Hand-written LLVM IR for the quantized panel microkernels (Numba intrinsics).

A *panel* is 16 consecutive output rows of one matrix stored in the tiled layout of docs/formats.md: for every 4
input columns one 64-byte tile holds the 16 rows' 4 bytes. One `vpdpbusd` multiplies a whole tile by 4 broadcast
activation bytes and adds the 16 row sums into 16 int32 lanes, so a panel never needs a horizontal reduction.
LLVM never produces `vpdpbusd` from Numba loops (and plain Numba nibble unpacking caps int4 at ~20% of the
memory bandwidth), hence this file.

Portability: the instruction is emitted only when the JIT target has AVX512-VNNI (`vnni_available()`, decided
when the kernel is compiled, i.e. at run time on the user's CPU; Numba's cache is keyed by CPU too). Otherwise the
same arithmetic is emitted as portable vector IR (widen, multiply, add), which LLVM lowers for any x86-64 or
ARM target, so an older CPU gets a slower kernel, never an illegal instruction.
"""
from __future__ import annotations

import llvmlite.binding as llvm
import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_I8, _I16, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
_V64I8 = ir.VectorType(_I8, 64)
_V16I16 = ir.VectorType(_I16, 16)
_V16I32 = ir.VectorType(_I32, 16)
_V16F32 = ir.VectorType(_F32, 16)

PANEL = 16  # output rows per panel (one zmm of int32 / float32 lanes)
GROUP = 32  # input columns per quantization group
MAX_NR = 8  # tokens a microkernel call can handle (register blocking: 8 int + 8 float accumulators)
# Software prefetch distance for the weight stream: +5% GB/s on a Qwen3 decode (2048-4096 and 8192 measured alike).
PREFETCH_BYTES = 4096


def vnni_available() -> bool:
    """True when Numba compiles for a CPU with AVX512-VNNI (the host, unless NUMBA_CPU_NAME overrides it)."""
    if numba.config.CPU_NAME:  # an explicit target, e.g. 'generic' for a portable cache
        return "+avx512vnni" in (numba.config.CPU_FEATURES or "")
    return bool(llvm.get_host_cpu_features().get("avx512vnni", False))


# Read when a kernel is compiled; tests set it to False to compile the portable path on a VNNI machine.
EMIT_VNNI = vnni_available()


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


def _prefetch(builder: ir.IRBuilder, ptr, distance: int) -> None:
    """Prefetch (read, keep in all cache levels) `distance` bytes past `ptr`; never faults."""
    p8 = builder.bitcast(ptr, _I8.as_pointer())
    _call(builder, "llvm.prefetch.p0", ir.VoidType(), [builder.gep(p8, [_I64(distance)]), _I32(0), _I32(3), _I32(1)])


def _splat(builder: ir.IRBuilder, scalar, vty: ir.VectorType) -> ir.Value:
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), scalar, _I32(0))
    zeros = ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count)
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), zeros)


def _dpbusd(builder: ir.IRBuilder, acc, tile, xword) -> ir.Value:
    """acc[i] += sum_j u8(tile byte 4i+j) * s8(xword byte j): 16 lanes, `tile` <16 x i32>, `xword` a scalar i32
    holding 4 activation bytes (broadcast to every lane)."""
    if EMIT_VNNI:
        return _call(builder, "llvm.x86.avx512.vpdpbusd.512", _V16I32, [acc, tile, _splat(builder, xword, _V16I32)])
    # Portable: byte j of every lane times the scalar byte j; plain 32-bit multiplies vectorize on any target.
    for j in range(4):
        w_j = builder.and_(builder.lshr(tile, ir.Constant(_V16I32, [8 * j] * 16)), ir.Constant(_V16I32, [0xFF] * 16))
        x_j = builder.sext(builder.trunc(builder.lshr(xword, _I32(8 * j)), _I8), _I32)
        acc = builder.add(acc, builder.mul(w_j, _splat(builder, x_j, _V16I32)))
    return acc


def _fp16x16(builder: ir.IRBuilder, ptr) -> ir.Value:
    """Load 16 fp16 scales as float32. With VNNI (which implies AVX512F, hence F16C) this is one vcvtph2ps;
    otherwise integer ops only (no libcall): subnormal halves go through an int->float conversion rather than a
    float32 subnormal, so a flush-denormals mode cannot zero them."""
    if EMIT_VNNI:
        return builder.fpext(builder.bitcast(_load(builder, ptr, _V16I16), ir.VectorType(ir.HalfType(), 16)), _V16F32)
    h = builder.zext(_load(builder, ptr, _V16I16), _V16I32)
    vec = lambda c: ir.Constant(_V16I32, [c] * 16)  # noqa: E731
    mag = builder.and_(h, vec(0x7FFF))
    normal = builder.add(builder.shl(mag, vec(13)), vec(112 << 23))  # rebias exponent 15 -> 127
    subnormal = builder.bitcast(builder.fmul(builder.sitofp(mag, _V16F32), ir.Constant(_V16F32, [2.0**-24] * 16)),
                                _V16I32)
    is_sub = builder.icmp_unsigned("<", mag, vec(0x0400))
    bits = builder.or_(builder.select(is_sub, subnormal, normal), builder.shl(builder.and_(h, vec(0x8000)), vec(16)))
    return builder.bitcast(bits, _V16F32)


def _fma(builder: ir.IRBuilder, a, b, c) -> ir.Value:
    return _call(builder, "llvm.fma.v16f32", _V16F32, [a, b, c])


def _as_i64(context, builder, val, ty) -> ir.Value:
    return context.cast(builder, val, ty, types.int64)


_Q8_ARGS = ("w", "w_off", "d", "s_off", "x", "x_stride", "xs", "xsum", "xs_stride", "ngroups", "out", "out_off",
            "out_stride", "r0", "nr")
_Q4_ARGS = _Q8_ARGS[:3] + ("m",) + _Q8_ARGS[3:]


def _panel_codegen(q4: bool):
    """IR for one panel times activation rows r0 .. r0+nr-1 (nr <= 8 at run time): int8 (q4=False) or
    asymmetric int4 (q4=True). The rows go through register-blocked blocks of 8 | 4 + 2 + 1."""

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
            _panel_rows(builder, q4, nr, i64("ngroups"), wp, dp, mp, xp, xsp, xcp,
                        [row("out", i64("out_off"), "out_stride", n) for n in range(nr)])

        wp, dp = ptr("w", i64("w_off")), ptr("d", i64("s_off"))
        mp = ptr("m", i64("s_off")) if q4 else None
        r0, nr = i64("r0"), i64("nr")
        with builder.if_else(builder.icmp_signed("==", nr, _I64(MAX_NR))) as (full, partial):
            with full:
                emit(r0, MAX_NR)
            with partial:
                first = r0
                for width in (4, 2, 1):
                    taken = builder.icmp_signed("!=", builder.and_(nr, _I64(width)), _I64(0))
                    with builder.if_then(taken):
                        emit(first, width)
                    first = builder.add(first, builder.select(taken, _I64(width), _I64(0)))
        return context.get_dummy_value()

    return codegen


def _panel_rows(builder: ir.IRBuilder, q4: bool, nr: int, ngroups, wp, dp, mp, xp, xsp, xcp, outp) -> None:
    """The group loop for `nr` activation rows: vpdpbusd per tile, float scaling per group of 32."""
    facc = [cgutils.alloca_once_value(builder, ir.Constant(_V16F32, None)) for _ in range(nr)]
    group_bytes = PANEL * GROUP // (2 if q4 else 1)
    low4 = ir.Constant(_V64I8, [0x0F] * 64)
    flip = ir.Constant(_V64I8, [-128] * 64)
    # Two accumulators per row (even / odd steps) halve the vpdpbusd dependency chain, which bounds a one-token
    # GEMV; with many rows the register file is the limit, so they share one.
    chains = 2 if nr <= 4 else 1
    scales_ahead = PREFETCH_BYTES // group_bytes * PANEL * 2  # bytes of fp16 scales for PREFETCH_BYTES of tiles
    with cgutils.for_range(builder, ngroups) as loop:
        g = loop.index
        for p in (dp, mp) if q4 else (dp,):  # the scale streams, as far ahead as the weights: +0-6% measured
            _prefetch(builder, builder.gep(p, [builder.mul(g, _I64(PANEL))]), scales_ahead)
        dv = _fp16x16(builder, builder.gep(dp, [builder.mul(g, _I64(PANEL))]))
        wg = builder.gep(wp, [builder.mul(g, _I64(group_bytes))])
        xg = builder.mul(g, _I64(GROUP))
        xsums = [builder.load(builder.gep(xcp[n], [g])) for n in range(nr)]
        if q4:
            acc = [ir.Constant(_V16I32, None) for _ in range(nr * chains)]
        else:
            # int8 weights enter vpdpbusd as unsigned (w ^ 0x80 = w + 128); start from -128 * sum(x) to undo it.
            acc = [_splat(builder, builder.mul(xsums[n], _I32(-128)), _V16I32) for n in range(nr)]
            acc += [ir.Constant(_V16I32, None) for _ in range(nr * (chains - 1))]

        def step(tile, col, chain):
            for n in range(nr):
                xb = builder.load(builder.bitcast(builder.gep(xp[n], [builder.add(xg, _I64(col))]),
                                                  _I32.as_pointer()), align=1)
                a = n + nr * chain
                acc[a] = _dpbusd(builder, acc[a], tile, xb)

        for t in range(GROUP // 8 if q4 else GROUP // 4):
            tile_ptr = builder.gep(wg, [_I64(64 * t)])
            _prefetch(builder, tile_ptr, PREFETCH_BYTES)
            raw = _load_in_order(builder, tile_ptr, _V64I8)
            if q4:  # low nibbles are columns 8t..8t+3, high nibbles 8t+4..8t+7
                step(builder.bitcast(builder.and_(raw, low4), _V16I32), 8 * t, 0)
                high = builder.and_(builder.lshr(raw, ir.Constant(_V64I8, [4] * 64)), low4)
                step(builder.bitcast(high, _V16I32), 8 * t + 4, chains - 1)
            else:
                step(builder.bitcast(builder.xor(raw, flip), _V16I32), 4 * t, t % chains)
        for n in range(nr, nr * chains):
            acc[n - nr] = builder.add(acc[n - nr], acc[n])
        mv = _fp16x16(builder, builder.gep(mp, [builder.mul(g, _I64(PANEL))])) if q4 else None
        for n in range(nr):
            xsn = builder.load(builder.gep(xsp[n], [g]))
            f = _fma(builder, builder.sitofp(acc[n], _V16F32), builder.fmul(dv, _splat(builder, xsn, _V16F32)),
                     builder.load(facc[n]))
            if q4:  # the offset term: m * xs * sum(x)
                xm = builder.fmul(xsn, builder.sitofp(xsums[n], _F32))
                f = _fma(builder, mv, _splat(builder, xm, _V16F32), f)
            builder.store(f, facc[n])
    for n in range(nr):
        builder.store(builder.load(facc[n]), builder.bitcast(outp[n], _V16F32.as_pointer()), align=1)


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
    """As panel_q8 for the asymmetric int4 layout: W[i, k] = d * q + m, q a nibble, m the group offset."""
    sig = types.void(w, w_off, d, m, s_off, x, x_stride, xs, xsum, xs_stride, ngroups, out, out_off, out_stride, r0,
                     nr)
    return sig, _panel_codegen(True)


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
