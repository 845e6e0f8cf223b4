"""Depthwise conv on AVX-512 VNNI: one ``vpdpbusd`` per 16 channels and tap.

A depthwise tap multiplies each channel by its own weight, so there is no 4-element
reduction for ``vpdpbusd`` to do. Zero-extended to one byte per 32-bit lane, input and
weight still make it a fused multiply-add of 16 u8 x s8 products into int32 (the other
three byte products are 0 x 0): one instruction where the plain AVX-512 kernel
(``x86_window.depthwise_conv2d_nhwc``) needs vpmulld (2 uops) + vpaddd per 16 channels.
The input bytes are widened by the load (vpmovzxbd), the weights once per register tile.

Register tile: ``owt`` output columns x ``ct`` channels of int32 accumulators, the taps
in between, (batch, output row) parallel; the requant epilogue (``x86_epilogue``, fused
ops included) runs per tile on 16-lane vectors.

Padding: a padded copy of x first, or (``pad_mode``: 3x3 stride 2 on large inputs) clamped
reads with the taps outside the input masked to zero. Signed (int8) inputs are fed as
x + 128 through the copy stage, like the GEMM kernels: the caller folds -128 * sum(w)
into the bias (``x86_vnni.signed_input_bias``). Needs C % 16 == 0 (the rule falls back to
the AVX-512 kernel otherwise).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from qcompile.tvm_compat import te, tirx
from qcompile.tvm_compat import Schedule, TensorIntrin
from qcompile.tvm_compat import T

from qcompile.targets.x86.epilogue import Post, epilogue
from qcompile.targets.x86.gemm import (
    ACC_SCOPE, AVX512_VNNI, MAX_STACK_BYTES, epilogue_loops, schedule_stage)
from qcompile.targets.x86.vnni import _pad_nhwc, _pair, _to_u8, conv_out_hw

LANES = AVX512_VNNI.lanes


def _dw_intrin(c_scope: str) -> tuple[tirx.PrimFunc, tirx.PrimFunc]:
    """desc/impl of C[16] += A[16] * B[16] (u8 x s8 -> s32, lane by lane)."""

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((16,), "uint8", offset_factor=1),
             B: T.Buffer((16,), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1, scope=c_scope)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:16], B[0:16])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                with T.sblock("update"):
                    vi = T.axis.remap("S", [i])
                    C[vi] = C[vi] + T.cast(A[vi], "int32") * T.cast(B[vi], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((16,), "uint8", offset_factor=1),
             B: T.Buffer((16,), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1, scope=c_scope)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:16], B[0:16])
            T.writes(C[0:16])
            # byte 0 of each lane holds the value, bytes 1..3 zero: a signed weight keeps
            # its two's-complement byte (zero-extended, not sign-extended)
            a = tirx.reinterpret("uint8x64", tirx.Cast("int32x16", A.vload([0], "uint8x16")))
            b = tirx.reinterpret("int8x64", tirx.Cast(
                "int32x16", tirx.reinterpret("uint8x16", B.vload([0], "int8x16"))))
            C[T.ramp(T.int32(0), 1, 16)] = tirx.call_llvm_pure_intrin(
                "int32x16", AVX512_VNNI.llvm_intrinsic, C.vload([0], "int32x16"), a, b)

    return desc, impl


def _dw_masked_intrin(c_scope: str) -> tuple[tirx.PrimFunc, tirx.PrimFunc]:
    """desc/impl of C[16] += A[16] * B[16] * (P[0] & Q[0]): a tap whose row (P) or column
    (Q) falls outside the input adds nothing (its A, a clamped read, is zeroed)."""

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((16,), "uint8", offset_factor=1),
             B: T.Buffer((16,), "int8", offset_factor=1),
             P: T.Buffer((1,), "uint8", offset_factor=1),
             Q: T.Buffer((1,), "uint8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1, scope=c_scope)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:16], B[0:16], P[0:1], Q[0:1])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                with T.sblock("update"):
                    vi = T.axis.remap("S", [i])
                    C[vi] = C[vi] + T.cast(A[vi], "int32") * T.cast(B[vi], "int32") \
                        * T.cast(P[0] & Q[0], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((16,), "uint8", offset_factor=1),
             B: T.Buffer((16,), "int8", offset_factor=1),
             P: T.Buffer((1,), "uint8", offset_factor=1),
             Q: T.Buffer((1,), "uint8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1, scope=c_scope)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:16], B[0:16], P[0:1], Q[0:1])
            T.writes(C[0:16])
            inside = tirx.Broadcast((P[0] & Q[0]) != tirx.const(0, "uint8"), 16)
            a = tirx.Select(inside, tirx.Cast("int32x16", A.vload([0], "uint8x16")),
                            tirx.Broadcast(tirx.const(0, "int32"), 16))
            b = tirx.reinterpret("int8x64", tirx.Cast(
                "int32x16", tirx.reinterpret("uint8x16", B.vload([0], "int8x16"))))
            C[T.ramp(T.int32(0), 1, 16)] = tirx.call_llvm_pure_intrin(
                "int32x16", AVX512_VNNI.llvm_intrinsic, C.vload([0], "int32x16"),
                tirx.reinterpret("uint8x64", a), b)

    return desc, impl


INTRIN_DW = "qcompile_vnni_depthwise_u8s8s32_16"
TensorIntrin.register(INTRIN_DW, *_dw_intrin(ACC_SCOPE), override=True)
INTRIN_DW_MASKED = "qcompile_vnni_depthwise_masked_u8s8s32_16"
TensorIntrin.register(INTRIN_DW_MASKED, *_dw_masked_intrin(ACC_SCOPE), override=True)


# Register tile (1 thread, EfficientNet-Lite0's depthwise layers): 16 channels x up to 14
# columns beat 32 or 48 channels x fewer columns (28x28x240 5x5: 16x14 124 us, 16x7 133,
# 16x4 137; the AVX-512 kernel 161): one zmm of weights per tap serves more columns.
CHANNEL_TILE = LANES
MAX_WIDTH_TILE = 14


def width_tile(ow: int, ct: int = CHANNEL_TILE) -> int:
    """Output columns per tile: the largest divisor of OW (at most MAX_WIDTH_TILE) whose
    owt x ct int32 accumulators stay within MAX_STACK_BYTES."""
    cap = max(1, min(MAX_WIDTH_TILE, MAX_STACK_BYTES // (ct * 4)))
    return next(t for t in range(cap, 0, -1) if ow % t == 0)


# Padding: "copy" writes a padded copy of x first (one pass over the tensor); "mask"
# reads x at clamped positions and zeroes the taps outside, a few scalar ops per tap and
# column. Mask pays where the copy is big next to the work: 3x3 stride 2 on a large input
# (1 thread: 112x112x96 0.87x at batch 1, 0.72x at batch 8; 28x28x240 batch 8 0.82x, but
# 1.11x at batch 1); it loses on stride 1 (1.4-2x) and 5x5 (1.2-1.4x).
MASK_MIN_INPUT_BYTES = 1 << 20


def pad_mode(in_shape: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
             pads: Sequence[int], in_dtype: str) -> str:
    """"mask" or "copy" for a depthwise layer (NHWC ``in_shape``), as measured above."""
    big = int(np.prod(in_shape)) >= MASK_MIN_INPUT_BYTES
    return ("mask" if in_dtype == "uint8" and any(pads) and tuple(strides) == (2, 2)
            and tuple(kernel) == (3, 3) and big else "copy")


def depthwise_conv2d_nhwc_vnni(N: int, H: int, W: int, C: int, kh: int, kw: int,
                               strides: Sequence[int] = (1, 1),
                               pads: Sequence[int] = (0, 0, 0, 0),
                               dilations: Sequence[int] = (1, 1), *, out_dtype: str = "int8",
                               raw: bool = False, in_dtype: str = "uint8",
                               lo: int | None = None, hi: int | None = None,
                               requant: str = "int64", post: Sequence[Post] = (),
                               ct: int | None = None, owt: int | None = None,
                               pad: str | None = None) -> tirx.PrimFunc:
    """Depthwise (group == C, multiplier 1) NHWC conv with fused requantize, C % 16 == 0.

    Parameters as ``x86_window.depthwise_conv2d_nhwc``: x (N, H, W, C) uint8/int8;
    w (kh, kw, C) int8; bias (C,) int32 (``signed_input_bias`` for int8 x); m, r, s (C,)
    per ``requant`` unless ``raw``; the fused ops' tensors; out (N, OH, OW, C).
    ``pad``: "copy" or "mask" (uint8 x only), default ``pad_mode``'s choice.
    """
    if C % LANES:
        raise ValueError(f"the VNNI depthwise kernel needs C % {LANES} == 0, got {C}")
    pad = pad or pad_mode((N, H, W, C), (kh, kw), strides, pads, in_dtype)
    if pad == "mask" and in_dtype != "uint8":
        raise ValueError("pad='mask' reads x as it is: uint8 only")
    ep = epilogue(out_dtype, raw, lo, hi, requant, post)
    (sh, sw), (dh, dw) = _pair(strides), _pair(dilations)
    OH, OW = conv_out_hw(H, W, kh, kw, strides, pads, dilations)
    x = te.placeholder((N, H, W, C), in_dtype, name="x")
    w = te.placeholder((kh, kw, C), "int8", name="w")
    bias = te.placeholder((C,), "int32", name="bias")
    q = ep.placeholders((C,), (N, OH, OW, C))
    r, s = te.reduce_axis((0, kh), "r"), te.reduce_axis((0, kw), "s")
    if pad == "mask":
        pt, pl = pads[0], pads[1]
        one, zero = tirx.const(1, "uint8"), tirx.const(0, "uint8")

        def inside(v: tirx.PrimExpr, n: int) -> tirx.PrimExpr:
            return tirx.Select(tirx.all(v >= 0, v < n), one, zero)

        # 1 where the tap's input row / column exists: (OH, kh) and (OW, kw) bytes
        row_in = te.compute((OH, kh), lambda i, t: inside(i * sh - pt + t * dh, H), "row_in")
        col_in = te.compute((OW, kw), lambda j, t: inside(j * sw - pl + t * dw, W), "col_in")

        def clamp(v: tirx.PrimExpr, n: int) -> tirx.PrimExpr:
            return tirx.max(tirx.min(v, n - 1), 0)

        acc = te.compute((N, OH, OW, C), lambda b, i, j, c: te.sum(
            x[b, clamp(i * sh - pt + r * dh, H), clamp(j * sw - pl + s * dw, W), c]
            .astype("int32") * w[r, s, c].astype("int32")
            * (row_in[i, r] & col_in[j, s]).astype("int32"), axis=[r, s]), name="acc")
        intrin = INTRIN_DW_MASKED
    else:
        if any(pads) or in_dtype != "uint8":
            fill = tirx.const(128 if in_dtype == "int8" else 0, "uint8")
            xp = _pad_nhwc(x, pads, C, fill, lambda v: _to_u8(v, in_dtype), "x_pad")
        else:
            xp = x
        acc = te.compute((N, OH, OW, C), lambda b, i, j, c: te.sum(
            xp[b, i * sh + r * dh, j * sw + s * dw, c].astype("int32")
            * w[r, s, c].astype("int32"), axis=[r, s]), name="acc")
        intrin = INTRIN_DW
    out = te.compute((N, OH, OW, C), lambda b, i, j, c: ep.apply(
        acc[b, i, j, c], bias[c], q, (c,), (b, i, j, c), c), name="out")
    sch = Schedule(te.create_prim_func([x, w, bias, *q.all, out]))
    if pad == "copy" and xp is not x:
        schedule_stage(sch, "x_pad")
    ct = ct or CHANNEL_TILE
    _schedule(sch, ct, owt or width_tile(OW, ct), intrin)
    return sch.mod["main"].with_attr("global_symbol", "main")


def _schedule(sch: Schedule, ct: int, owt: int, intrin: str) -> None:
    """# Step 1. tile: (b, oh) parallel, ow by owt, c by ct = cj x 16
    # Step 2. taps (r, s) outside the owt x cj register tile; tensorize the 16 lanes
    # Step 3. zero-init and the epilogue per tile, 16-lane vectors"""
    acc = sch.get_sblock("acc")
    b, oh, ow, c, r, s = sch.get_loops(acc)
    owo, owi = sch.split(ow, [None, owt])
    co, cj, ci = sch.split(c, [None, ct // LANES, LANES])
    sch.reorder(b, oh, owo, co, r, s, owi, cj, ci)
    sch.set_scope(acc, 0, ACC_SCOPE)
    sch.reverse_compute_at(sch.get_sblock("out"), co)
    sch.parallel(sch.fuse(b, oh))
    init = sch.decompose_reduction(acc, r)
    sch.tensorize(ci, intrin)
    sch.unroll(owi)
    sch.unroll(cj)
    iw, ij, ic = sch.get_loops(init)[-3:]
    sch.vectorize(ic)
    sch.unroll(ij)
    sch.unroll(iw)
    width, chans = epilogue_loops(sch, sch.get_sblock("out"), co)
    oc, ov = sch.split(chans, [None, LANES])
    sch.vectorize(ov)
    sch.unroll(oc)
    if width is not None:
        sch.unroll(width)
