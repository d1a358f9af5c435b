"""Hand-written LLVM IR for the attention over the cache at decode (Numba intrinsics): the weighted sum of the
value rows in `decode_step.attend`, register-blocked, and its score tiles (two rows on the 256-bit tiers, four on
the 16-lane ones).

``weigh_tile``: acc[rows, cols] += weights[rows, :n] @ values[:n, cols] for one or two query rows and up to
WEIGH_CHUNKS vectors of columns, the accumulators in registers across the n positions. The loop Numba makes of the
same sum loads and stores the accumulators every 8 positions and ran at a third of the multiply-add rate; this
one measured 2.1-2.4x faster (float32 values) and 1.7-1.8x (bf16). The scores: with 256-bit vectors (``score_tile``)
two rows against four keys in Numba (`decode_step.dots_2x4`) sum each of its 8 dot products across a vector on its
own, in six instructions, as many as a third of the tile's multiply-adds at d 128; folded, a row's four sums take
five. A Qwen3 KV head's score pass (8 rows) measured 1.12-1.35x faster and `attend` 1.04-1.24x on a 2-core Zen 3
(docs/benchmarks.md); keeping each row's running maxima in the tile (as below) added 1.10-1.31x warm and 1.06-1.27x
cold (the avx2 tier run on the Intel host, OFFLOAD_CPU_ISA=avx2; 1.11-1.30x and 1.04-1.24x on aligned caches). With
16-lane vectors (``score_quad_tile``) four rows against four keys in Numba (`decode_step.dots_4x4`) took ~180 cycles
a tile on the Intel host, 128 multiply-adds and 16 horizontal sums of 8 instructions; the folded IR tile takes ~130,
and it keeps each row's running maxima in a vector, where the scalar max of every score its callers took cost as
much as the fold saved (an earlier IR tile without that measured no faster): `attend` 1.14-1.44x warm on one thread,
1.02-1.16x cold on two.

It reads float32 values or bf16 bits (uint16, widened by a shift as `decode_step.widen` does), accumulates in
float32 with fused multiply-adds, and compiles for the tier of `simd` (16 lanes: zmm, or the portable path's
vectors; 8 lanes: the 256-bit tiers). Each position's products are added in position order, one fused
multiply-add per vector; the Numba loop summed 8 positions before adding them, so the two agree to float32
rounding, not bit for bit.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from csrc_py.simd import _F32, _I16, _I32, _I64, _as_i64, _call, _fma, _lanes, _load, _ptr, _splat, _vec

LANES = _lanes()  # float32 lanes per vector: the columns of one weigh_tile chunk
# Accumulators per weigh_tile call: two rows x WEIGH_CHUNKS vectors of columns, half the register file (32 zmm /
# 16 ymm) with the loaded value vectors beside them.
WEIGH_CHUNKS = 8 if LANES == 16 else 4


def _widened(builder: ir.IRBuilder, ptr, bf16: bool, lanes: int = LANES) -> ir.Value:
    """`lanes` float32 from ptr: float32, or bf16 bits shifted into a float32's high half."""
    if not bf16:
        return _load(builder, ptr, _vec(_F32, lanes))
    bits = builder.zext(_load(builder, ptr, _vec(_I16, lanes)), _vec(_I32, lanes))
    return builder.bitcast(builder.shl(bits, ir.Constant(_vec(_I32, lanes), [16] * lanes)), _vec(_F32, lanes))


def _named(context, builder, names: tuple[str, ...], sig, args):
    """An intrinsic's arguments by name: i64(name), an integer argument as i64, and ptr(array, offset), the
    address of element `offset` (an argument's name) of an array argument's data."""
    val, ty = dict(zip(names, args)), dict(zip(names, sig.args))

    def i64(name):
        return _as_i64(context, builder, val[name], ty[name])

    def ptr(name, offset):
        return _ptr(context, builder, ty[name], val[name], i64(offset))

    return i64, ptr


_WEIGH_ARGS = ("weights", "w_off", "w_stride", "values", "v_off", "v_stride", "n", "acc", "acc_off", "acc_stride",
               "rows", "chunks")


@intrinsic
def weigh_tile(typingctx, weights, w_off, w_stride, values, v_off, v_stride, n, acc, acc_off, acc_stride, rows,
               chunks):
    """acc[acc_off + r*acc_stride + c] += sum_{j<n} weights[w_off + r*w_stride + j] * values[v_off + j*v_stride + c]
    for r < rows (1 or 2) and c < chunks * LANES (chunks <= WEIGH_CHUNKS). weights, acc: float32 arrays; values
    float32 or bf16 bits (uint16); offsets in elements of each array's data. The accumulators are loaded once,
    kept in registers over the n positions and stored once."""
    sig = types.void(weights, w_off, w_stride, values, v_off, v_stride, n, acc, acc_off, acc_stride, rows, chunks)
    bf16 = values.dtype == types.uint16

    def codegen(context, builder, sig, args):
        i64, ptr = _named(context, builder, _WEIGH_ARGS, sig, args)
        vf32 = _vec(_F32, LANES)
        wp, vp, ap = ptr("weights", "w_off"), ptr("values", "v_off"), ptr("acc", "acc_off")
        w_stride, v_stride, a_stride, n = i64("w_stride"), i64("v_stride"), i64("acc_stride"), i64("n")

        def emit(nr: int, first_chunk, width: int) -> None:
            """Rows 0..nr-1, column chunks first_chunk..first_chunk+width-1 (Python ints nr, width)."""
            col0 = builder.mul(first_chunk, _I64(LANES))
            w_rows = [builder.gep(wp, [builder.mul(w_stride, _I64(r))]) for r in range(nr)]
            a_ptrs = [[builder.bitcast(builder.gep(ap, [builder.add(builder.mul(a_stride, _I64(r)),
                                                                    builder.add(col0, _I64(k * LANES)))]),
                                       vf32.as_pointer()) for k in range(width)] for r in range(nr)]
            acc = [[cgutils.alloca_once_value(builder, builder.load(a_ptrs[r][k], align=1)) for k in range(width)]
                   for r in range(nr)]
            with cgutils.for_range(builder, n) as loop:
                row = builder.gep(vp, [builder.add(builder.mul(loop.index, v_stride), col0)])
                v = [_widened(builder, builder.gep(row, [_I64(k * LANES)]), bf16) for k in range(width)]
                for r in range(nr):
                    p = _splat(builder, builder.load(builder.gep(w_rows[r], [loop.index])), vf32)
                    for k in range(width):
                        builder.store(_fma(builder, p, v[k], builder.load(acc[r][k])), acc[r][k])
            for r in range(nr):
                for k in range(width):
                    builder.store(builder.load(acc[r][k]), a_ptrs[r][k], align=1)

        chunks = i64("chunks")
        for nr in (2, 1):
            with builder.if_then(builder.icmp_signed("==", i64("rows"), _I64(nr))):
                first = _I64(0)
                width = WEIGH_CHUNKS
                while width:  # the chunks as WEIGH_CHUNKS | halves | ... | 1, each a fixed register block
                    taken = builder.icmp_signed("!=", builder.and_(chunks, _I64(width)), _I64(0))
                    with builder.if_then(taken):
                        emit(nr, first, width)
                    first = builder.add(first, builder.select(taken, _I64(width), _I64(0)))
                    width //= 2
        return context.get_dummy_value()

    return sig, codegen


_SCORE_ARGS = ("qs", "q_off", "q_stride", "keys", "k_off", "k_stride", "d", "scores", "s_off", "s_stride")
_QUAD_ARGS = _SCORE_ARGS + ("tops", "t_off")
SCORE_LANES = 8  # score_tile's vectors are 256 bits whatever the tier (its horizontal adds are AVX's)


@intrinsic
def score_tile(typingctx, qs, q_off, q_stride, keys, k_off, k_stride, d, scores, s_off, s_stride, tops, t_off):
    """scores[s_off + r*s_stride + c] = sum_{i<d} qs[q_off + r*q_stride + i] * keys[k_off + c*k_stride + i] for two
    query rows r and four keys c, d a multiple of SCORE_LANES: eight accumulators over d, then each row's four sums
    folded together by three horizontal adds and one add of the two halves (where a sum at a time takes six
    instructions) and stored as one vector; tops[t_off + 4r + c] = max(itself, that score), each row's running
    maxima (as score_quad_tile's). qs, scores, tops float32; keys float32 or bf16 bits. Needs AVX."""
    sig = types.void(qs, q_off, q_stride, keys, k_off, k_stride, d, scores, s_off, s_stride, tops, t_off)
    bf16 = keys.dtype == types.uint16

    def codegen(context, builder, sig, args):
        i64, ptr = _named(context, builder, _QUAD_ARGS, sig, args)
        vf32 = _vec(_F32, SCORE_LANES)
        qp, kp, sp = ptr("qs", "q_off"), ptr("keys", "k_off"), ptr("scores", "s_off")
        q_rows = [builder.gep(qp, [builder.mul(i64("q_stride"), _I64(r))]) for r in range(2)]
        k_rows = [builder.gep(kp, [builder.mul(i64("k_stride"), _I64(c))]) for c in range(4)]
        acc = [[cgutils.alloca_once_value(builder, ir.Constant(vf32, None)) for _ in range(4)] for _ in range(2)]
        with cgutils.for_range_slice(builder, _I64(0), i64("d"), _I64(SCORE_LANES)) as (i, _):
            k = [_widened(builder, builder.gep(row, [i]), bf16, SCORE_LANES) for row in k_rows]
            for r in range(2):
                q = _load(builder, builder.gep(q_rows[r], [i]), vf32)
                for c in range(4):
                    builder.store(_fma(builder, q, k[c], builder.load(acc[r][c])), acc[r][c])
        v4 = _vec(_F32, 4)
        for r in range(2):
            a = [builder.load(acc[r][c]) for c in range(4)]
            folded = _hadd(builder, _hadd(builder, a[0], a[1]), _hadd(builder, a[2], a[3]))
            low = builder.shuffle_vector(folded, folded, ir.Constant(_vec(_I32, 4), [0, 1, 2, 3]))
            high = builder.shuffle_vector(folded, folded, ir.Constant(_vec(_I32, 4), [4, 5, 6, 7]))
            dest = builder.gep(sp, [builder.mul(i64("s_stride"), _I64(r))])
            row = builder.fadd(low, high)
            builder.store(row, builder.bitcast(dest, v4.as_pointer()), align=1)
            _raise_tops(builder, builder.gep(ptr("tops", "t_off"), [_I64(4 * r)]), row)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def score_quad_tile(typingctx, qs, q_off, q_stride, keys, k_off, k_stride, d, scores, s_off, s_stride, tops, t_off):
    """scores[s_off + r*s_stride + c] = sum_{i<d} qs[q_off + r*q_stride + i] * keys[k_off + c*k_stride + i] for four
    query rows r and four keys c, d a multiple of LANES (16): 16 accumulators over d, their sums folded into one
    vector (_fold_sums) and stored as four rows of four; tops[t_off + 4r + c] = max(itself, that score), each row's
    running maxima in four lanes (one vector max a tile; the scalar max of every score, as dots_4x4's callers take
    it, cost about as much as the fold saved). qs, scores, tops float32; keys float32 or bf16 bits. 16-lane tiers."""
    if LANES != 16:
        raise TypeError("score_quad_tile needs 16-lane vectors (the avx512-vnni and portable tiers)")
    sig = types.void(qs, q_off, q_stride, keys, k_off, k_stride, d, scores, s_off, s_stride, tops, t_off)
    bf16 = keys.dtype == types.uint16

    def codegen(context, builder, sig, args):
        i64, ptr = _named(context, builder, _QUAD_ARGS, sig, args)
        vf32 = _vec(_F32, LANES)
        qp, kp, sp, tp = ptr("qs", "q_off"), ptr("keys", "k_off"), ptr("scores", "s_off"), ptr("tops", "t_off")
        q_rows = [builder.gep(qp, [builder.mul(i64("q_stride"), _I64(r))]) for r in range(4)]
        k_rows = [builder.gep(kp, [builder.mul(i64("k_stride"), _I64(c))]) for c in range(4)]
        acc = [[cgutils.alloca_once_value(builder, ir.Constant(vf32, None)) for _ in range(4)] for _ in range(4)]
        with cgutils.for_range_slice(builder, _I64(0), i64("d"), _I64(LANES)) as (i, _):
            k = [_widened(builder, builder.gep(row, [i]), bf16) for row in k_rows]
            for r in range(4):
                q = _load(builder, builder.gep(q_rows[r], [i]), vf32)
                for c in range(4):
                    builder.store(_fma(builder, q, k[c], builder.load(acc[r][c])), acc[r][c])
        sums = _fold_sums(builder, [builder.load(acc[r][c]) for r in range(4) for c in range(4)])
        v4 = _vec(_F32, 4)
        for r in range(4):
            row = builder.shuffle_vector(sums, sums, ir.Constant(_vec(_I32, 4), [4 * r + c for c in range(4)]))
            dest = builder.gep(sp, [builder.mul(i64("s_stride"), _I64(r))])
            builder.store(row, builder.bitcast(dest, v4.as_pointer()), align=1)
        _raise_tops(builder, tp, sums)
        return context.get_dummy_value()

    return sig, codegen


def _raise_tops(builder: ir.IRBuilder, ptr, scores) -> None:
    """The float32 vector at ptr raised lane by lane to `scores` (a vector max)."""
    top_ptr = builder.bitcast(ptr, scores.type.as_pointer())
    old = builder.load(top_ptr, align=1)
    builder.store(builder.select(builder.fcmp_ordered(">", scores, old), scores, old), top_ptr, align=1)


def _fold_sums(builder: ir.IRBuilder, vectors: list) -> ir.Value:
    """The horizontal sums of 16 vectors of 16 float32, as one vector (lane i: the sum of vectors[i]). Four
    halvings: each adds the two halves of every group of lanes, two vectors into one (two shuffles and an add), so
    16 -> 8 -> 4 -> 2 -> 1 vectors in 30 shuffles and 15 adds, and a last shuffle puts the sums in order."""
    width = 16
    current = [(v, [i] * 16) for i, v in enumerate(vectors)]  # (vector, which sum each lane's partial belongs to)
    while len(current) > 1:
        half = width // 2
        folded = []
        for (x, x_sums), (y, y_sums) in zip(current[::2], current[1::2]):
            low = [src + g + j for src in (0, 16) for g in range(0, 16, width) for j in range(half)]
            high = [lane + half for lane in low]
            a = builder.shuffle_vector(x, y, ir.Constant(_vec(_I32, 16), low))
            b = builder.shuffle_vector(x, y, ir.Constant(_vec(_I32, 16), high))
            folded.append((builder.fadd(a, b), [(x_sums + y_sums)[lane] for lane in low]))
        current, width = folded, half
    vector, sums = current[0]
    order = [sums.index(i) for i in range(16)]
    return vector if order == list(range(16)) else builder.shuffle_vector(vector, vector,
                                                                          ir.Constant(_vec(_I32, 16), order))


def _hadd(builder: ir.IRBuilder, a, b) -> ir.Value:
    """AVX vhaddps on <8 x float>: per 128-bit half, [a0+a1, a2+a3, b0+b1, b2+b3]."""
    return _call(builder, "llvm.x86.avx.hadd.ps.256", a.type, [a, b])
