"""Hand-written LLVM IR for MLA's softmax over the cached latents at decode (Numba intrinsics), with a block of
HEADS_LANES query heads in the lanes of one float32 vector.

Every head of an MLA layer attends the same cached rows (a latent of `rank` values and a rope key), so a cache
value times the block's 16 heads' query values is one broadcast and one fused multiply-add, and each position's 16
scores come out as one vector: no horizontal sum anywhere. The weighted sum of the latents is the same turned
around: the block's 16 running sums of one latent coordinate are one vector, and a position adds its cache value
(broadcast) times its 16 softmax weights. The queries enter transposed once per call, [rank + rope, 16] (scale
folded in), and the running sums are kept transposed, [rank, 16].

The four-heads-by-four-positions loops in Numba these replace ran at about a third of this core's multiply-add rate
(16 horizontal sums per tile, and the weighted sum stored its accumulators every 4 positions); figures in
docs/benchmarks.md; these run at ~70-90% of it on the Intel host, bound by their broadcast loads (one per
multiply-add). A tile covers up to TILE positions with its accumulators (scores) or weights (sums) in registers: 8
sixteen-lane vectors on the 16-lane tiers, 4 where a vector is two 256-bit halves (16 ymm registers; a weigh tile
of 16 positions measured slower on the 16-lane tier).

Caches are float32 or bf16 bits (uint16, widened by a shift); sums in float32 with fused multiply-adds, each
position's products added in position order.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from csrc_py.attend_simd import _named, _raise_tops
from csrc_py.simd import _F32, _I32, _I64, _fma, _lanes, _load, _splat, _vec

HEADS_LANES = 16  # query heads per block: one float32 lane each
TILE = 8 if _lanes() == 16 else 4  # positions per tile
# A score's products are summed in runs of SCORE_RUN, each run's sum then added to the score: one chain of 576
# products (DeepSeek's rank 512 + rope 64) put 5x more float32 rounding into the output than the loops before
# (4.4e-6 against 8.5e-7 relative to float64, the tests' worst case); runs of 32 gave 1.5e-6, of 16 9.6e-7, of 8
# 6.8e-7, at the same speed within the host's noise.
SCORE_RUN = 8


def _cache_value(builder: ir.IRBuilder, ptr, bf16: bool) -> ir.Value:
    """One float32 from ptr: float32, or bf16 bits shifted into a float32's high half."""
    if not bf16:
        return builder.load(ptr)
    return builder.bitcast(builder.shl(builder.zext(builder.load(ptr), _I32), _I32(16)), _F32)


def _row_starts(context, builder, sig, args, names, cache_name: str, rows_name: str, base, first, count: int):
    """Pointers to the cache rows base + rows[first + k] for k < count (a 2-D cache, rows of unit stride)."""
    ty, val = dict(zip(names, sig.args)), dict(zip(names, args))
    cache = context.make_array(ty[cache_name])(context, builder, val[cache_name])
    stride = builder.sdiv(cgutils.unpack_tuple(builder, cache.strides, 2)[0], _I64(ty[cache_name].dtype.bitwidth // 8))
    rows = context.make_array(ty[rows_name])(context, builder, val[rows_name]).data
    starts = []
    for k in range(count):
        position = builder.add(base, builder.load(builder.gep(rows, [builder.add(first, _I64(k))])))
        starts.append(builder.gep(cache.data, [builder.mul(position, stride)]))
    return starts


def _in_tiles(builder: ir.IRBuilder, nk, emit) -> None:
    """emit(first, count) for nk (<= TILE) positions as blocks of TILE | TILE/2 | ... | 1, each a fixed register
    block."""
    first, width = _I64(0), TILE
    while width:
        taken = builder.icmp_signed("!=", builder.and_(nk, _I64(width)), _I64(0))
        with builder.if_then(taken):
            emit(first, width)
        first = builder.add(first, builder.select(taken, _I64(width), _I64(0)))
        width //= 2


_SCORE_ARGS = ("qt", "q_off", "cache", "rope_cache", "base", "rows", "r_off", "nk", "s", "s_off", "tops")


@intrinsic
def latent_score_tile(typingctx, qt, q_off, cache, rope_cache, base, rows, r_off, nk, s, s_off, tops):
    """s[s_off + 16k + a] = sum_{i<rank} cache[j, i] * qt[q_off + 16i + a] + sum_{i<rope} rope_cache[j, i] *
    qt[q_off + 16(rank + i) + a], j = base + rows[r_off + k], for k < nk (<= TILE) and the 16 heads a, each sum
    in runs of SCORE_RUN products; tops[:16] = max(itself, each of those scores), lane by lane. cache [P, rank] and
    rope_cache [P, rope]: float32 or bf16 bits, rows of unit stride (views of one cache, as the model's, are fine);
    qt, s, tops float32, contiguous (qt: the block's queries transposed, [rank + rope, 16]); rows int64."""
    sig = types.void(qt, q_off, cache, rope_cache, base, rows, r_off, nk, s, s_off, tops)
    bf16 = (cache.dtype == types.uint16, rope_cache.dtype == types.uint16)

    def codegen(context, builder, sig, args):
        i64, ptr = _named(context, builder, _SCORE_ARGS, sig, args)
        vf = _vec(_F32, HEADS_LANES)
        qp, sp = ptr("qt", "q_off"), ptr("s", "s_off")
        ranks = [cgutils.unpack_tuple(builder, context.make_array(sig.args[n])(context, builder, args[n]).shape, 2)[1]
                 for n in (2, 3)]
        tops = context.make_array(sig.args[10])(context, builder, args[10]).data

        def emit(first, count: int) -> None:
            acc = [cgutils.alloca_once_value(builder, ir.Constant(vf, None)) for _ in range(count)]
            run = [cgutils.alloca_once(builder, vf) for _ in range(count)]

            def add_run(starts, q_first, i0, i1, bf16_part) -> None:
                """acc[k] += the products of elements i0..i1-1, summed apart first."""
                for k in range(count):
                    builder.store(ir.Constant(vf, None), run[k])
                with cgutils.for_range_slice(builder, i0, i1, _I64(1)) as (i, _):
                    q = _load(builder, builder.gep(qp, [builder.mul(builder.add(q_first, i), _I64(HEADS_LANES))]), vf)
                    for k in range(count):
                        x = _splat(builder, _cache_value(builder, builder.gep(starts[k], [i]), bf16_part), vf)
                        builder.store(_fma(builder, x, q, builder.load(run[k])), run[k])
                for k in range(count):
                    builder.store(builder.fadd(builder.load(acc[k]), builder.load(run[k])), acc[k])

            q_first = _I64(0)
            for part, name in enumerate(("cache", "rope_cache")):
                starts = _row_starts(context, builder, sig, args, _SCORE_ARGS, name, "rows", i64("base"),
                                     builder.add(i64("r_off"), first), count)
                whole = builder.mul(builder.sdiv(ranks[part], _I64(SCORE_RUN)), _I64(SCORE_RUN))
                with cgutils.for_range_slice(builder, _I64(0), whole, _I64(SCORE_RUN)) as (i0, _):
                    add_run(starts, q_first, i0, builder.add(i0, _I64(SCORE_RUN)), bf16[part])
                add_run(starts, q_first, whole, ranks[part], bf16[part])
                q_first = ranks[0]
            for k in range(count):
                score = builder.load(acc[k])
                dest = builder.gep(sp, [builder.mul(builder.add(first, _I64(k)), _I64(HEADS_LANES))])
                builder.store(score, builder.bitcast(dest, vf.as_pointer()), align=1)
                _raise_tops(builder, tops, score)

        _in_tiles(builder, i64("nk"), emit)
        return context.get_dummy_value()

    return sig, codegen


_WEIGH_ARGS = ("p", "p_off", "cache", "base", "rows", "r_off", "nk", "o", "shrink", "rescale")


@intrinsic
def latent_weigh_tile(typingctx, p, p_off, cache, base, rows, r_off, nk, o, shrink, rescale):
    """o[16i + a] = o[16i + a] * (shrink[a] if rescale else 1) + sum_{k<nk} p[p_off + 16k + a] * cache[base +
    rows[r_off + k], i] for every latent coordinate i < rank and the 16 heads a, nk <= TILE: the nk weight vectors
    stay in registers over the pass, each o vector is loaded and stored once (the online softmax's rescaling of
    the running sums rides on the first tile of a chunk). cache [P, rank] float32 or bf16 bits, rows of unit stride;
    p, o, shrink float32, contiguous (o: the block's running sums transposed, [rank, 16]); rows int64."""
    sig = types.void(p, p_off, cache, base, rows, r_off, nk, o, shrink, rescale)
    bf16 = cache.dtype == types.uint16

    def codegen(context, builder, sig, args):
        i64, ptr = _named(context, builder, _WEIGH_ARGS, sig, args)
        vf = _vec(_F32, HEADS_LANES)
        pp = ptr("p", "p_off")
        op = context.make_array(sig.args[7])(context, builder, args[7]).data
        shrink_v = _load(builder, context.make_array(sig.args[8])(context, builder, args[8]).data, vf)
        rank = cgutils.unpack_tuple(builder, context.make_array(sig.args[2])(context, builder, args[2]).shape, 2)[1]

        def emit_pass(first, count: int, scaled: bool) -> None:
            starts = _row_starts(context, builder, sig, args, _WEIGH_ARGS, "cache", "rows", i64("base"),
                                 builder.add(i64("r_off"), first), count)
            weights = [_load(builder, builder.gep(pp, [builder.mul(builder.add(first, _I64(k)), _I64(HEADS_LANES))]),
                             vf) for k in range(count)]
            with cgutils.for_range(builder, rank) as loop:
                o_ptr = builder.bitcast(builder.gep(op, [builder.mul(loop.index, _I64(HEADS_LANES))]), vf.as_pointer())
                acc = builder.load(o_ptr, align=1)
                if scaled:
                    acc = builder.fmul(acc, shrink_v)
                for k in range(count):
                    x = _splat(builder, _cache_value(builder, builder.gep(starts[k], [loop.index]), bf16), vf)
                    acc = _fma(builder, x, weights[k], acc)
                builder.store(acc, o_ptr, align=1)

        def emit_rescaled(first, count: int) -> None:
            """The tile's first block of positions scales the sums, the others do not."""
            with builder.if_else(builder.icmp_signed("==", first, _I64(0))) as (at_first, after):
                with at_first:
                    emit_pass(first, count, True)
                with after:
                    emit_pass(first, count, False)

        with builder.if_else(builder.icmp_signed("!=", i64("rescale"), _I64(0))) as (scaled, plain):
            with scaled:
                _in_tiles(builder, i64("nk"), emit_rescaled)
            with plain:
                _in_tiles(builder, i64("nk"), lambda first, count: emit_pass(first, count, False))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def lanes_fma(typingctx, acc, x, f):
    """acc[16i + a] += f[a] * x[16i + a] for every i < acc.size / 16 and the 16 heads a: one partial softmax's
    running sums [rank, 16] added into another's, each head scaled by its factor (the spans' merge). Float32 arrays,
    C-contiguous, x at least as long as acc."""
    sig = types.void(acc, x, f)

    def codegen(context, builder, sig, args):
        vf = _vec(_F32, HEADS_LANES)
        acc_arr, x_arr, f_arr = (context.make_array(t)(context, builder, a) for t, a in zip(sig.args, args))
        fv = _load(builder, f_arr.data, vf)
        n = builder.sdiv(acc_arr.nitems, _I64(HEADS_LANES))
        with cgutils.for_range(builder, n) as loop:
            at = builder.mul(loop.index, _I64(HEADS_LANES))
            a_ptr = builder.bitcast(builder.gep(acc_arr.data, [at]), vf.as_pointer())
            x = _load(builder, builder.gep(x_arr.data, [at]), vf)
            builder.store(_fma(builder, fv, x, builder.load(a_ptr, align=1)), a_ptr, align=1)
        return context.get_dummy_value()

    return sig, codegen
