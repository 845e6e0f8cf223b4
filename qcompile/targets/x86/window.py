"""AVX-512 depthwise conv and pools for qcompile's integer ops (NHWC, vectorized over C).

No VNNI here: each output channel reads only its own input channel, so the
kernels vectorize over C and tile output widths so the int32 accumulators stay
in registers (``MAX_STACK_BYTES``). The requant epilogue is the GEMM kernels'
(``x86_epilogue``, fused ops included); pools pad with the dtype's minimum (max) or zero (sum).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from qcompile.tvm_compat import te, tirx
from qcompile.tvm_compat import Schedule

from qcompile.targets.x86.epilogue import Post, epilogue
from qcompile.targets.x86.gemm import ACC_SCOPE, MAX_STACK_BYTES, epilogue_loops, schedule_stage
from qcompile.targets.x86.vnni import _pad_nhwc, _pair, conv_out_hw


def _channel_tile(c: int) -> int:
    """Channels per register tile: 32 (two zmm of int32) when C allows it."""
    return next((t for t in (32, 16) if c % t == 0), c if c < 16 else
                next(t for t in (8, 4, 2, 1) if c % t == 0))


def _width_tile(ow: int, ct: int, acc_bytes: int = 4) -> int:
    """Output columns per register tile: the largest divisor of OW (at most 8) whose
    owt x ct accumulators stay within MAX_STACK_BYTES."""
    cap = max(1, min(8, MAX_STACK_BYTES // (ct * acc_bytes)))
    return next(t for t in range(cap, 0, -1) if ow % t == 0)


def _schedule_window(sch: Schedule, ct: int, owt: int, pad_stages: Sequence[str] = (),
                     inline_pad: bool = True) -> None:
    """Block "acc" (loops b, oh, ow, c, *window) into a register tile of
    owt x ct, vectorized over channels; block "out" fused per tile.

    # Step 1. pad stages: inlined as a select per tap (pools: 2.5x faster than a
    #         copy) or kept as a parallel copy (depthwise: each tap widens first)
    # Step 2. tile ow and c; the window loops sit between the tile and the registers
    # Step 3. (b, oh) parallel; zero-init, taps and epilogue vectorized over c
    """
    for name in pad_stages:
        if inline_pad:
            sch.compute_inline(name)
        else:
            schedule_stage(sch, name)
    acc = sch.get_sblock("acc")
    b, oh, ow, c, *win = sch.get_loops(acc)
    owo, owi = sch.split(ow, [None, owt])
    co, ci = sch.split(c, [None, ct])
    sch.reorder(b, oh, owo, co, *win, owi, ci)
    sch.set_scope(acc, 0, ACC_SCOPE)
    sch.reverse_compute_at(sch.get_sblock("out"), co)
    sch.parallel(sch.fuse(b, oh))
    sch.vectorize(ci)  # before decompose: vectorize needs the block still a full reduction
    sch.unroll(owi)
    sch.decompose_reduction(acc, win[0])
    # The epilogue's channel loop, or with one channel a tile (C = 1: contiguous)
    # its width loop; a 1 x 1 tile has neither and stays scalar.
    width, chans = epilogue_loops(sch, sch.get_sblock("out"), co)
    if chans is not None or width is not None:
        sch.vectorize(chans if chans is not None else width)


def _window(x: te.Tensor, kh: int, kw: int, strides: Sequence[int], pads: Sequence[int],
            dilations: Sequence[int], fill: int, name: str = "x_pad"
            ) -> tuple[Callable[..., tirx.PrimExpr], int, int, list[str]]:
    """tap(b, oh, ow, r, s, c) reading the padded input, OH, OW, stages to inline."""
    n, h, w, c = (int(d) for d in x.shape)
    (sh, sw), (dh, dw) = _pair(strides), _pair(dilations)
    OH, OW = conv_out_hw(h, w, kh, kw, strides, pads, dilations)
    src, stages = x, []
    if any(pads):
        src = _pad_nhwc(x, pads, c, tirx.const(fill, x.dtype), lambda v: v, name)
        stages = [name]

    def tap(b: tirx.PrimExpr, oh: tirx.PrimExpr, ow: tirx.PrimExpr, r: tirx.PrimExpr,
            s: tirx.PrimExpr, ch: tirx.PrimExpr) -> tirx.PrimExpr:
        return src[b, oh * sh + r * dh, ow * sw + s * dw, ch]
    return tap, OH, OW, stages


def depthwise_conv2d_nhwc(N: int, H: int, W: int, C: int, kh: int, kw: int,
                          strides: Sequence[int] = (1, 1), pads: Sequence[int] = (0, 0, 0, 0),
                          dilations: Sequence[int] = (1, 1), *, out_dtype: str = "int8",
                          raw: bool = False, in_dtype: str = "uint8", lo: int | None = None,
                          hi: int | None = None, requant: str = "int64",
                          post: Sequence[Post] = ()) -> tirx.PrimFunc:
    """Depthwise (group == C, multiplier 1) NHWC conv with fused requantize.

    Parameters (in order): x (N, H, W, C) uint8/int8; w (kh, kw, C) int8 (OIHW
    (C, 1, kh, kw) transposed (2, 3, 0, 1)); bias (C,) int32 (no signed correction:
    no VNNI here); m, r, s (C,) per ``requant`` unless ``raw``; the fused ops' tensors
    (``post``); out (N, OH, OW, C).
    """
    ep = epilogue(out_dtype, raw, lo, hi, requant, post)
    x = te.placeholder((N, H, W, C), in_dtype, name="x")
    w = te.placeholder((kh, kw, C), "int8", name="w")
    bias = te.placeholder((C,), "int32", name="bias")
    tap, OH, OW, stages = _window(x, kh, kw, strides, pads, dilations, 0)
    q = ep.placeholders((C,), (N, OH, OW, C))
    r, s = te.reduce_axis((0, kh), "r"), te.reduce_axis((0, kw), "s")
    acc = te.compute((N, OH, OW, C), lambda b, i, j, c: te.sum(
        tap(b, i, j, r, s, c).astype("int32") * w[r, s, c].astype("int32"), axis=[r, s]),
        name="acc")
    out = te.compute((N, OH, OW, C), lambda b, i, j, c: ep.apply(
        acc[b, i, j, c], bias[c], q, (c,), (b, i, j, c), c), name="out")
    sch = Schedule(te.create_prim_func([x, w, bias, *q.all, out]))
    ct = _channel_tile(C)
    # A pad copy beats per-tap selects here: each tap widens to int32 before the multiply.
    _schedule_window(sch, ct, _width_tile(OW, ct), stages, inline_pad=False)
    return sch.mod["main"].with_attr("global_symbol", "main")


def max_pool2d_nhwc(N: int, H: int, W: int, C: int, kernel: Sequence[int],
                    strides: Sequence[int], pads: Sequence[int] = (0, 0, 0, 0),
                    dilations: Sequence[int] = (1, 1), *, dtype: str = "uint8") -> tirx.PrimFunc:
    """Window max, padding with the dtype's minimum. Parameters: x, out (same dtype)."""
    kh, kw = _pair(kernel)
    x = te.placeholder((N, H, W, C), dtype, name="x")
    tap, OH, OW, stages = _window(x, kh, kw, strides, pads, dilations, int(np.iinfo(dtype).min))
    r, s = te.reduce_axis((0, kh), "r"), te.reduce_axis((0, kw), "s")
    acc = te.compute((N, OH, OW, C), lambda b, i, j, c: te.max(tap(b, i, j, r, s, c), axis=[r, s]),
                     name="acc")
    out = te.compute((N, OH, OW, C), lambda *i: acc[i], name="out")
    sch = Schedule(te.create_prim_func([x, out]))
    ct = _channel_tile(C)
    _schedule_window(sch, ct, _width_tile(OW, ct, acc_bytes=1), stages)
    return sch.mod["main"].with_attr("global_symbol", "main")


def sum_pool2d_nhwc(N: int, H: int, W: int, C: int, kernel: Sequence[int],
                    strides: Sequence[int], pads: Sequence[int] = (0, 0, 0, 0), *,
                    in_dtype: str = "uint8", out_dtype: str = "int32", raw: bool = True,
                    lo: int | None = None, hi: int | None = None,
                    requant: str = "int64") -> tirx.PrimFunc:
    """Window sum in int32 with zero padding (average pool before its division).

    Parameters: x (N, H, W, C); m, r, s (OH, OW) per output position (``requant``)
    unless ``raw`` (qgraph's avgpool folds 1/count into m); out (N, OH, OW, C).
    """
    kh, kw = _pair(kernel)
    ep = epilogue(out_dtype, raw, lo, hi, requant)
    x = te.placeholder((N, H, W, C), in_dtype, name="x")
    tap, OH, OW, stages = _window(x, kh, kw, strides, pads, (1, 1), 0)
    q = ep.placeholders((OH, OW), (N, OH, OW, C))
    r, s = te.reduce_axis((0, kh), "r"), te.reduce_axis((0, kw), "s")
    acc = te.compute((N, OH, OW, C), lambda b, i, j, c: te.sum(
        tap(b, i, j, r, s, c).astype("int32"), axis=[r, s]), name="acc")
    out = te.compute((N, OH, OW, C), lambda b, i, j, c: ep.apply(
        acc[b, i, j, c], None, q, (i, j)), name="out")
    sch = Schedule(te.create_prim_func([x, *q.all, out]))
    ct = _channel_tile(C)
    _schedule_window(sch, ct, _width_tile(OW, ct), stages)
    return sch.mod["main"].with_attr("global_symbol", "main")


def global_sum_pool_nhwc(N: int, H: int, W: int, C: int, *, in_dtype: str = "uint8",
                         out_dtype: str = "int32", raw: bool = True, lo: int | None = None,
                         hi: int | None = None, requant: str = "int64") -> tirx.PrimFunc:
    """Sum over H, W in int32 -> (N, 1, 1, C): an H x W window sum, so m, r, s are
    (1, 1) int64 (qgraph's per-tensor gap params, reshaped) unless ``raw``."""
    return sum_pool2d_nhwc(N, H, W, C, (H, W), (1, 1), in_dtype=in_dtype, out_dtype=out_dtype,
                           raw=raw, lo=lo, hi=hi, requant=requant)
