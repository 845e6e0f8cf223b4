"""Integer tensor-core kernels for the NVIDIA T4 (sm_75): int8 and packed int4 GEMM / conv.

Pipeline, top to bottom: a ``te`` compute (GEMM in *bytes* of K, im2col and padding as
inlinable producers, requant epilogue) -> ``tvm.s_tir.Schedule`` (block/warp tiling, shared
staging, warp-scope accumulators) -> tensorize with our warp intrinsics, which issue PTX
``mma.sync.m8n8k16`` (u8/s8) or ``mma.sync.m8n8k32`` (u4/s4) -> ``tvm.compile`` -> nvcc cubin.

Why our own mma intrinsics and not TVM's WMMA ones: WMMA needs equal operand types
(u8*u8 or s8*s8), but post-ReLU activations are u8/u4 and weights s8/s4; ``mma.sync``
takes mixed signs natively (``IMMA.8816.U8.S8`` / ``IMMA.8832.U4.S4``). Packed int4 also
stays plain ``uint8`` bytes end to end (TVM's ``int4`` dtype is unreliable, see TVM_NOTES).

Hopper (sm_90, H100/H200): the int8 kernels run natively there (``IMMA.8816``). The int4
kernels compile, but Hopper has no int4 tensor cores: ptxas turns every m8n8k32 into a
``CALL`` to ``__cuda_sm_9x_mma_sub_byte_internal_*`` (software emulation on int8 IMMA), so
int4 is correct but slow there. m16n8k32 (s8) / m16n8k64 (s4) are sm_80+ only.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm
from tvm import s_tir, te, tirx
from tvm.s_tir import TensorIntrin
from tvm.s_tir.tensor_intrin.cuda import get_mma_store_intrin
from tvm.s_tir.tensor_intrin.cuda import shared_16x16_to_ldmatrix_32x8_layout as _acc_layout
from tvm.script import tirx as T

# ---------------------------------------------------------------------------------------------
# 1. Hardware table: which MMA shapes exist per arch and dtype, and what implements them.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MmaShape:
    """One warp-level integer MMA instruction (A: m x k, B: k x n, C: m x n int32)."""

    api: str  # "wmma" (CUDA C++ fragments) or "mma.sync" (PTX, explicit register layout)
    m: int
    n: int
    k: int
    a_types: tuple[str, ...]  # PTX element types
    b_types: tuple[str, ...]
    mixed_sign: bool  # u8 x s8 allowed in one instruction
    min_sm: int
    native_below_sm: int | None  # None: native on every arch >= min_sm
    sass: str  # opcode ptxas emits where native
    tvm_intrins: tuple[str, ...]  # registered TensorIntrin names that issue it

    def __post_init__(self) -> None:
        bits = {t[1:] for t in self.a_types + self.b_types}
        if len(bits) != 1 or bits.pop() not in ("8", "4"):
            raise ValueError(f"{self}: operand types must share one width, 8 or 4 bits")
        if self.api not in ("wmma", "mma.sync") or self.k * int(self.a_types[0][1:]) % 128:
            raise ValueError(f"{self}: k must span 128-bit rows")

    @property
    def bits(self) -> int:
        return int(self.a_types[0][1:])

    def native_on(self, sm: int) -> bool:
        return sm >= self.min_sm and (self.native_below_sm is None or sm < self.native_below_sm)


_WMMA_S8 = ("wmma_load_16x16x16_s8_a_shared", "wmma_load_16x16x16_s8_b_trans_shared",
            "wmma_sync_16x16x16_s8s8s32_trans", "wmma_fill_16x16x16_s32",
            "wmma_store_16x16x16_s32_shared")
_WMMA_S4 = ("wmma_load_8x8x32_s4_a_shared", "wmma_load_8x8x32_s4_b_trans_shared",
            "wmma_sync_8x8x32_s4s4s32_trans", "wmma_fill_8x8x32_s32", "wmma_store_8x8x32_s32_shared")
# Ours (registered below); TVM has no m8n8k16 / m8n8k32 mma.sync intrinsic.
INTRIN_PREFIX = "qcompile_mma_16x16x16B_"

TENSOR_CORES: tuple[MmaShape, ...] = (
    MmaShape("wmma", 16, 16, 16, ("s8", "u8"), ("s8", "u8"), False, 72, None, "IMMA.8816", _WMMA_S8),
    MmaShape("wmma", 8, 8, 32, ("s4", "u4"), ("s4", "u4"), False, 75, 90, "IMMA.8832", _WMMA_S4),
    MmaShape("mma.sync", 8, 8, 16, ("u8", "s8"), ("u8", "s8"), True, 75, None, "IMMA.8816",
             tuple(INTRIN_PREFIX + s for s in ("u8s8", "s8s8"))),
    MmaShape("mma.sync", 8, 8, 32, ("u4", "s4"), ("u4", "s4"), True, 75, 90, "IMMA.8832",
             tuple(INTRIN_PREFIX + s for s in ("u4s4", "s4s4"))),
    MmaShape("mma.sync", 16, 8, 32, ("u8", "s8"), ("u8", "s8"), True, 80, None, "IMMA.16832",
             ("mma_i8i8i32", "mma_i8i8i32_trans_b", "mma_ldmatrix_i8_a", "mma_ldmatrix_i8_b_trans")),
    MmaShape("mma.sync", 16, 8, 64, ("u4", "s4"), ("u4", "s4"), True, 80, 90, "IMMA.16864", ()),
)


def mma_shapes(sm: int, bits: int, native_only: bool = True) -> tuple[MmaShape, ...]:
    """The table rows usable on ``sm_<sm>`` for ``bits``-wide operands."""
    return tuple(s for s in TENSOR_CORES if s.bits == bits and sm >= s.min_sm
                 and (s.native_on(sm) or not native_only))


# ---------------------------------------------------------------------------------------------
# 2. Warp intrinsics: a 16x16 int32 tile += A[16, 16 bytes] * B[16, 16 bytes]^T, as 2x2 mma.sync.
#    The accumulator uses TVM's m16n8 layout, whose 8x8 quadrants are exactly the m8n8 C layout,
#    so TVM's mma_fill / mma_store (16x16) work on it without warp shuffles.
# ---------------------------------------------------------------------------------------------

def _lo(b: tirx.PrimExpr, signed: bool) -> tirx.PrimExpr:
    v = b.astype("int32")
    return (v << 28) >> 28 if signed else v & 15


def _hi(b: tirx.PrimExpr, signed: bool) -> tirx.PrimExpr:
    v = b.astype("int32")
    return (v << 24) >> 28 if signed else (v >> 4) & 15


def _byte_dot(a: tirx.PrimExpr, w: tirx.PrimExpr, bits: int, a_signed: bool) -> tirx.PrimExpr:
    """int32 partial product of one K byte: 1 value (int8) or 2 packed nibbles (int4, lo = even k)."""
    if bits == 8:
        return a.astype("int32") * w.astype("int32")
    return _lo(a, a_signed) * _lo(w, True) + _hi(a, a_signed) * _hi(w, True)


def _storage(bits: int, a_signed: bool) -> tuple[str, str]:
    """Buffer dtypes of (activations, weights); packed int4 is always plain bytes."""
    return ("int8" if a_signed else "uint8", "int8") if bits == 8 else ("uint8", "uint8")


def _mma_intrin(bits: int, a_signed: bool) -> tuple[tirx.PrimFunc, tirx.PrimFunc]:
    a_dt, w_dt = _storage(bits, a_signed)
    shape = "m8n8k16" if bits == 8 else "m8n8k32"
    a_ptx = {8: "int8" if a_signed else "uint8", 4: "int4" if a_signed else "uint4"}[bits]
    b_ptx = "int8" if bits == 8 else "int4"

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (16, 16), a_dt, offset_factor=16, scope="shared")
        B = T.match_buffer(b, (16, 16), w_dt, offset_factor=16, scope="shared")
        C = T.match_buffer(c, (32, 8), "int32", offset_factor=8, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:32, 0:8], A[0:16, 0:16], B[0:16, 0:16])
            T.writes(C[0:32, 0:8])
            for i, j, k in T.grid(16, 16, 16):
                with T.sblock(""):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    t, r = T.meta_var(_acc_layout(vi, vj))
                    C[t, r] = C[t, r] + _byte_dot(A[vi, vk], B[vj, vk], bits, a_signed)

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        sa = T.int32()
        sb = T.int32()
        A = T.match_buffer(a, (16, 16), a_dt, offset_factor=16, scope="shared", strides=[sa, 1])
        B = T.match_buffer(b, (16, 16), w_dt, offset_factor=16, scope="shared", strides=[sb, 1])
        C = T.match_buffer(c, (32, 8), "int32", offset_factor=8, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:32, 0:8], A[0:16, 0:16], B[0:16, 0:16])
            T.writes(C[0:32, 0:8])
            for tx in T.thread_binding(0, 32, "threadIdx.x"):
                # PTX fragments: lane holds A[lane/4, 4*(lane%4) : +4] (bytes), the same slice of
                # B (stored N x K), and C[lane/4, 2*(lane%4) : +2]. access_ptr keeps byte
                # addressing even when StorageRewrite retypes the shared array to uint4.
                for qi, qj in T.grid(2, 2):
                    T.evaluate(T.ptx_legacy.mma(
                        shape, "row", "col", a_ptx, b_ptx, "int32",
                        A.access_ptr("r", offset=(qi * 8 + tx // 4) * sa + tx % 4 * 4), 0,
                        B.access_ptr("r", offset=(qj * 8 + tx // 4) * sb + tx % 4 * 4), 0,
                        C.data, C.elem_offset + tx * 8 + qj * 4 + qi * 2, False, dtype="int32"))

    return desc, impl


def _register_intrins() -> None:
    for bits, a_signed in ((8, False), (8, True), (4, False), (4, True)):
        name = INTRIN_PREFIX + ("s" if a_signed else "u") + f"{bits}s{bits}"
        TensorIntrin.register(name, *_mma_intrin(bits, a_signed), override=True)
    TensorIntrin.register(STORE_INTRIN, *get_mma_store_intrin("int32", 8, "shared", True),
                          override=True)


STORE_INTRIN = "qcompile_mma_store_16x16_i32_shared"
FILL_INTRIN = "mma_fill_16x16_i32"  # TVM's
_register_intrins()

# ---------------------------------------------------------------------------------------------
# 3. Compute definitions (unscheduled: runnable on CPU as the reference of each kernel).
# ---------------------------------------------------------------------------------------------

BLOCK_K = 32  # bytes of K per shared-memory stage: 2 mma k-steps


def _ceil(x: int, m: int) -> int:
    return -(-x // m) * m


def _gemm_and_epilogue(a_val, w_val, M: int, N: int, KB: int, bits: int, a_signed: bool,
                       out_dtype: str, raw: bool, lo: int | None, hi: int | None, tm: int, tn: int
                       ) -> tuple[list[te.Tensor], te.Tensor]:
    """C[Mp, Np] = A(i, kb) . W(j, kb) over padded sizes, then out[M, N] = requant(C + bias).

    ``a_val(i, kb)`` / ``w_val(j, kb)`` give one K byte (zero outside K); padded rows read a
    clamped in-range row, since their results are never stored.
    """
    Mp, Np, Kp = _ceil(M, tm), _ceil(N, tn), _ceil(KB, BLOCK_K)
    a_dt, w_dt = _storage(bits, a_signed)
    A = te.compute((Mp, Kp), lambda i, k: a_val(tirx.min(i, M - 1), k), name="A_pad")
    W = te.compute((Np, Kp), lambda j, k: w_val(tirx.min(j, N - 1), k), name="W_pad")
    k = te.reduce_axis((0, Kp), "k")
    C = te.compute((Mp, Np), lambda i, j: te.sum(_byte_dot(A[i, k], W[j, k], bits, a_signed),
                                                 axis=k), name="gemm")
    bias = te.placeholder((N,), "int32", "bias")
    if raw:
        out = te.compute((M, N), lambda i, j: C[i, j] + bias[j], name="out")
        return [bias], out
    m, r, s = (te.placeholder((N,), "int64", n) for n in ("m", "r", "s"))
    info = np.iinfo(out_dtype)
    lo_, hi_ = info.min if lo is None else lo, info.max if hi is None else hi

    def epi(i: tirx.PrimExpr, j: tirx.PrimExpr) -> tirx.PrimExpr:
        v = ((C[i, j] + bias[j]).astype("int64") * m[j] + r[j]) >> s[j]
        return tirx.max(tirx.min(v, tirx.const(hi_, "int64")), tirx.const(lo_, "int64")).astype(out_dtype)

    return [bias, m, r, s], te.compute((M, N), epi, name="out")


def _in_k(kb: tirx.PrimExpr, KB: int, Kp: int) -> tirx.PrimExpr:
    return kb < KB if Kp != KB else tirx.const(True)


def _check(bits: int, K: int, raw: bool, out_dtype: str) -> None:
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    if bits == 4 and K % 2:
        raise ValueError(f"int4 packs 2 values per byte along K; K={K} is odd")
    if not raw and out_dtype not in ("int8", "uint8", "int32"):
        raise ValueError(f"out_dtype must be int8, uint8 or int32, got {out_dtype}")


def dense_compute(M: int, N: int, K: int, *, bits: int = 8, out_dtype: str = "int8",
                  raw: bool = False, a_signed: bool = False, lo: int | None = None,
                  hi: int | None = None, tile: tuple[int, int] = (16, 16)) -> tirx.PrimFunc:
    """Unscheduled ``dense_tc``: X[M, K] . W[N, K]^T (+ bias, requant); int4 is packed along K."""
    _check(bits, K, raw, out_dtype)
    KB = K * bits // 8
    a_dt, w_dt = _storage(bits, a_signed)
    X = te.placeholder((M, KB), a_dt, "X")
    Wt = te.placeholder((N, KB), w_dt, "W")
    Kp = _ceil(KB, BLOCK_K)
    a_val = lambda i, k: tirx.if_then_else(_in_k(k, KB, Kp), X[i, tirx.min(k, KB - 1)], tirx.const(0, a_dt))
    w_val = lambda j, k: tirx.if_then_else(_in_k(k, KB, Kp), Wt[j, tirx.min(k, KB - 1)], tirx.const(0, w_dt))
    params, out = _gemm_and_epilogue(a_val, w_val, M, N, KB, bits, a_signed, out_dtype, raw, lo, hi,
                                     *tile)
    return te.create_prim_func([X, Wt, *params, out]).with_attr("global_symbol", "dense_tc")


def _conv_out_hw(data_shape: tuple[int, int, int, int], kernel: tuple[int, int],
                 strides: tuple[int, int], pads: tuple[int, int, int, int],
                 dilations: tuple[int, int]) -> tuple[int, int]:
    return tuple((data_shape[1 + a] + pads[a] + pads[a + 2] - dilations[a] * (kernel[a] - 1) - 1)
                 // strides[a] + 1 for a in (0, 1))


def conv2d_nhwc_compute(data_shape: tuple[int, int, int, int], out_channels: int,
                        kernel: tuple[int, int], *, strides: tuple[int, int] = (1, 1),
                        pads: tuple[int, int, int, int] = (0, 0, 0, 0),
                        dilations: tuple[int, int] = (1, 1), bits: int = 8,
                        out_dtype: str = "int8", raw: bool = False, a_signed: bool = False,
                        lo: int | None = None, hi: int | None = None,
                        tile: tuple[int, int] = (16, 16)) -> tirx.PrimFunc:
    """Unscheduled ``conv2d_nhwc_tc`` as an implicit GEMM: rows (n, oh, ow), K bytes (kh, kw, c).

    x: NHWC, w: OHWI; for int4 both are packed 2 per byte along C. pads = (top, left, bottom,
    right). The output is NHWC; its (M, O) GEMM view is contiguous.
    """
    nb, H, Wd, C = data_shape
    KH, KW = kernel
    _check(bits, C, raw, out_dtype)
    CB = C * bits // 8
    OH, OW = _conv_out_hw(data_shape, kernel, strides, pads, dilations)
    M, KB = nb * OH * OW, KH * KW * CB
    Kp = _ceil(KB, BLOCK_K)
    a_dt, w_dt = _storage(bits, a_signed)
    X = te.placeholder((nb, H, Wd, CB), a_dt, "X")
    Wt = te.placeholder((out_channels, KH, KW, CB), w_dt, "W")

    def a_val(i: tirx.PrimExpr, kb: tirx.PrimExpr) -> tirx.PrimExpr:
        kq = tirx.min(kb, KB - 1)
        kh, kw, c = kq // (KW * CB), kq // CB % KW, kq % CB
        h = i // OW % OH * strides[0] + kh * dilations[0] - pads[0]
        w = i % OW * strides[1] + kw * dilations[1] - pads[1]
        ok = tirx.all(_in_k(kb, KB, Kp), h >= 0, h < H, w >= 0, w < Wd)
        return tirx.if_then_else(ok, X[i // (OH * OW), h, w, c], tirx.const(0, a_dt))

    def w_val(j: tirx.PrimExpr, kb: tirx.PrimExpr) -> tirx.PrimExpr:
        kq = tirx.min(kb, KB - 1)
        v = Wt[j, kq // (KW * CB), kq // CB % KW, kq % CB]
        return tirx.if_then_else(_in_k(kb, KB, Kp), v, tirx.const(0, w_dt))

    params, out = _gemm_and_epilogue(a_val, w_val, M, out_channels, KB, bits, a_signed, out_dtype,
                                     raw, lo, hi, *tile)
    func = te.create_prim_func([X, Wt, *params, out]).with_attr("global_symbol", "conv2d_nhwc_tc")
    sch = s_tir.Schedule(func)  # expose the output as NHWC: a pure reshape of the (M, O) view
    sch.transform_layout("out", ("write", 0),
                         lambda i, o: (i // (OH * OW), i // OW % OH, i % OW, o))
    return sch.mod["main"]


# ---------------------------------------------------------------------------------------------
# 4. Schedule: one rule for every GEMM-shaped kernel above.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileConfig:
    """Warps per block (warps_m x warps_n), 16x16 fragments per warp, shared K stage in bytes."""

    warps_m: int = 2
    warps_n: int = 2
    frags_m: int = 2
    frags_n: int = 2

    @property
    def tile(self) -> tuple[int, int]:
        return 16 * self.warps_m * self.frags_m, 16 * self.warps_n * self.frags_n

    @staticmethod
    def for_shape(M: int, N: int) -> "TileConfig":
        """Up to 64x64 per block; small M or N (batch-1 dense, deep 7x7 convs) shrink the tile."""
        def split(x: int) -> tuple[int, int]:
            f = _ceil(x, 16) // 16
            return (1, 1) if f <= 1 else (2, 1) if f <= 2 else (2, 2)
        (wm, fm), (wn, fn) = split(M), split(N)
        return TileConfig(wm, wn, fm, fn)


def _vec_width(total: int, threads: int, limit: int) -> int:
    """Largest power-of-two vector <= limit that splits ``total`` evenly over ``threads``."""
    v = limit
    while v > 1 and total % (threads * v):
        v //= 2
    return v


def _schedule_gemm(func: tirx.PrimFunc, cfg: TileConfig, bits: int, a_signed: bool,
                   a_vec: int, w_vec: int, out_vec: int) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    gemm, out = sch.get_sblock("gemm"), sch.get_sblock("out")
    nthreads = 32 * cfg.warps_m * cfg.warps_n
    bm, bn = cfg.tile
    # Step 1. 16x16x16B micro tiles, blockized so the inner block matches the intrinsic.
    i, j, k = sch.get_loops(gemm)
    i, ii = sch.split(i, [None, 16])
    j, ji = sch.split(j, [None, 16])
    k, ki = sch.split(k, [None, 16])
    sch.reorder(i, j, k, ii, ji, ki)
    outer = sch.blockize(ii)
    # Step 2. Block tile -> blockIdx.x, warp tile -> threadIdx.y, K in BLOCK_K stages.
    i0, i1, i2 = sch.split(i, [None, cfg.warps_m, cfg.frags_m])
    j0, j1, j2 = sch.split(j, [None, cfg.warps_n, cfg.frags_n])
    k0, k1 = sch.split(k, [None, BLOCK_K // 16])
    sch.reorder(i0, j0, i1, j1, k0, k1, i2, j2)
    sch.bind(sch.fuse(i0, j0), "blockIdx.x")
    ty = sch.fuse(i1, j1)
    sch.bind(ty, "threadIdx.y")
    # Step 3. Cooperative global->shared copies; padding / im2col producers inline into them.
    for idx, rows, vec in ((0, bm, a_vec), (1, bn, w_vec)):
        cache = sch.cache_read(outer, idx, "shared")
        sch.compute_inline(sch.get_producers(cache)[0])
        sch.compute_at(cache, k0)
        fused = sch.fuse(*sch.get_loops(cache)[-2:])
        v = _vec_width(rows * BLOCK_K, nthreads, vec)
        _, f1, f2, f3 = sch.split(fused, [None, nthreads // 32, 32, v])
        sch.bind(f2, "threadIdx.x")
        sch.bind(f1, "threadIdx.y")
        sch.vectorize(f3)
        # Row stride 48 bytes: the 8 rows one mma reads hit 8 disjoint bank groups.
        sch.storage_align(cache, 0, axis=-2, factor=32, offset=16)
    # Step 4. Accumulate in warp registers, stage through shared for the fused epilogue.
    acc = sch.cache_write(outer, 0, "warp")
    sch.reverse_compute_at(acc, ty)
    sch.reverse_compute_at(out, sch.get_loops(outer)[0])  # before tensorize hides the producer
    sch.set_scope(acc, 0, "shared")
    sch.storage_align(acc, 0, axis=-2, factor=16, offset=4)
    r, c = sch.get_loops(acc)[-2:]
    r0, r1 = sch.split(r, [None, 16])
    c0, c1 = sch.split(c, [None, 16])
    sch.reorder(r0, c0, r1, c1)
    sch.transform_layout(acc, ("read", 0), lambda i, j: (i // 16, j // 16, *_acc_layout(i % 16, j % 16)))
    init = sch.decompose_reduction(outer, k0)
    # Step 5. Tensorize init / mma / store.
    name = INTRIN_PREFIX + ("s" if a_signed else "u") + f"{bits}s{bits}"
    sch.tensorize(sch.get_loops(sch.get_child_blocks(init)[0])[-2], FILL_INTRIN)
    sch.tensorize(sch.get_loops(sch.get_child_blocks(outer)[0])[-3], name)
    sch.tensorize(r1, STORE_INTRIN)
    # Step 6. Epilogue (bias, requant, clip, cast) reads the shared tile, writes vectors.
    fused = sch.fuse(*sch.get_loops(out)[-2:])
    _, f1, f2, f3 = sch.split(fused, [None, nthreads // 32, 32, out_vec])
    sch.bind(f2, "threadIdx.x")
    sch.bind(f1, "threadIdx.y")
    sch.vectorize(f3)
    return sch.mod["main"]


def _pow2_divisor(x: int, limit: int = 16) -> int:
    return math.gcd(x, limit) if x else limit


def dense_tc(M: int, N: int, K: int, *, bits: int = 8, out_dtype: str = "int8", raw: bool = False,
             a_signed: bool = False, lo: int | None = None, hi: int | None = None) -> tirx.PrimFunc:
    """Tensor-core int GEMM with fused requant: ``out = clip((int64(X.W^T + b)*m + r) >> s, lo, hi)``.

    Params: X (M, K) u8/s8 [int4: (M, K/2) packed bytes, low nibble = even k], W (N, K) s8
    [int4: (N, K/2) packed s4], bias (N,) int32, then m, r, s (N,) int64 unless ``raw``
    (raw returns int32 acc + bias). lo/hi default to out_dtype's range.
    """
    cfg = TileConfig.for_shape(M, N)
    func = dense_compute(M, N, K, bits=bits, out_dtype=out_dtype, raw=raw, a_signed=a_signed,
                         lo=lo, hi=hi, tile=cfg.tile)
    KB = K * bits // 8
    vec = 16 if KB % BLOCK_K == 0 else 1  # ragged K keeps a per-byte predicate
    return _schedule_gemm(func, cfg, bits, a_signed, vec, vec, _out_vec(M, N, cfg))


def _out_vec(M: int, N: int, cfg: TileConfig) -> int:
    bm, bn = cfg.tile
    return 4 if M % bm == 0 and N % bn == 0 else 1  # partial tiles carry a per-element guard


def conv2d_nhwc_tc(data_shape: tuple[int, int, int, int], out_channels: int,
                   kernel: tuple[int, int], *, strides: tuple[int, int] = (1, 1),
                   pads: tuple[int, int, int, int] = (0, 0, 0, 0),
                   dilations: tuple[int, int] = (1, 1), bits: int = 8, out_dtype: str = "int8",
                   raw: bool = False, a_signed: bool = False, lo: int | None = None,
                   hi: int | None = None) -> tirx.PrimFunc:
    """Tensor-core NHWC conv (implicit GEMM, im2col fused into the shared-memory loads).

    Params: X (N, H, W, C) [int4: (N, H, W, C/2) packed], W (O, KH, KW, C) OHWI [int4 packed
    along C], bias (O,), then m, r, s (O,) int64 unless ``raw``. Output (N, OH, OW, O).
    """
    kw = dict(strides=strides, pads=pads, dilations=dilations, bits=bits, out_dtype=out_dtype,
              raw=raw, a_signed=a_signed, lo=lo, hi=hi)
    oh, ow = _conv_out_hw(data_shape, kernel, strides, pads, dilations)
    M = data_shape[0] * oh * ow
    cfg = TileConfig.for_shape(M, out_channels)
    func = conv2d_nhwc_compute(data_shape, out_channels, kernel, tile=cfg.tile, **kw)
    cb = data_shape[3] * bits // 8
    kb = kernel[0] * kernel[1] * cb
    # A 16-byte vector stays inside one (kh, kw) pixel only when C bytes split into vectors.
    ragged = kb % BLOCK_K != 0
    a_vec = 1 if ragged else _pow2_divisor(cb)
    w_vec = 1 if ragged else 16
    return _schedule_gemm(func, cfg, bits, a_signed, a_vec, w_vec, _out_vec(M, out_channels, cfg))


def depthwise_conv2d_nhwc(data_shape: tuple[int, int, int, int], kernel: tuple[int, int], *,
                          strides: tuple[int, int] = (1, 1),
                          pads: tuple[int, int, int, int] = (0, 0, 0, 0),
                          out_dtype: str = "int8", raw: bool = False, a_signed: bool = False,
                          lo: int | None = None, hi: int | None = None,
                          schedule: bool = True) -> tirx.PrimFunc:
    """int8 depthwise NHWC conv on CUDA cores (no tensor-core shape fits a per-channel K).

    Params: X (N, H, W, C) u8/s8, W (KH, KW, C) s8, bias (C,), then m, r, s (C,) int64.
    """
    nb, H, Wd, C = data_shape
    KH, KW = kernel
    OH, OW = _conv_out_hw(data_shape, kernel, strides, pads, (1, 1))
    a_dt = "int8" if a_signed else "uint8"
    X = te.placeholder((nb, H, Wd, C), a_dt, "X")
    Wt = te.placeholder((KH, KW, C), "int8", "W")
    rh, rw = te.reduce_axis((0, KH), "rh"), te.reduce_axis((0, KW), "rw")

    def acc(n, y, x, c):
        h, w = y * strides[0] + rh - pads[0], x * strides[1] + rw - pads[1]
        ok = tirx.all(h >= 0, h < H, w >= 0, w < Wd)
        v = tirx.if_then_else(ok, X[n, h, w, c], tirx.const(0, a_dt)).astype("int32")
        return te.sum(v * Wt[rh, rw, c].astype("int32"), axis=[rh, rw])

    gemm = te.compute((nb, OH, OW, C), acc, name="gemm")
    bias = te.placeholder((C,), "int32", "bias")
    params = [bias]
    if raw:
        out = te.compute(gemm.shape, lambda n, y, x, c: gemm[n, y, x, c] + bias[c], name="out")
    else:
        m, r, s = (te.placeholder((C,), "int64", n) for n in ("m", "r", "s"))
        params += [m, r, s]
        info = np.iinfo(out_dtype)
        lo_, hi_ = info.min if lo is None else lo, info.max if hi is None else hi
        out = te.compute(gemm.shape, lambda n, y, x, c: tirx.max(tirx.min(
            ((gemm[n, y, x, c] + bias[c]).astype("int64") * m[c] + r[c]) >> s[c],
            tirx.const(hi_, "int64")), tirx.const(lo_, "int64")).astype(out_dtype), name="out")
    func = te.create_prim_func([X, Wt, *params, out]).with_attr("global_symbol", "depthwise_nhwc")
    if not schedule:
        return func
    sch = s_tir.Schedule(func)
    loop = sch.fuse(*sch.get_loops("out"))
    bx, tx = sch.split(loop, [None, 128])  # C innermost: neighbouring threads read adjacent bytes
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    sch.compute_at(sch.get_sblock("gemm"), tx)  # one thread per output, KHxKW sum in a register
    sch.set_scope(sch.get_sblock("gemm"), 0, "local")
    return sch.mod["main"]


# ---------------------------------------------------------------------------------------------
# 5. Build for sm_75 without a GPU, and read the SASS back.
# ---------------------------------------------------------------------------------------------

T4 = "nvidia/nvidia-t4"


def _cu13_bin() -> Path:
    """Where ``pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`` puts its tools."""
    return Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" \
        / "site-packages" / "nvidia" / "cu13" / "bin"


def tool_path(name: str) -> str | None:
    """``nvcc`` / ``cuobjdump`` / ``nvdisasm`` from PATH or the pip wheels; None if absent."""
    found = shutil.which(name)
    if found:
        return found
    cand = _cu13_bin() / name
    return str(cand) if cand.exists() else None


def cuda_source(func_or_mod: tirx.PrimFunc | tvm.IRModule) -> str:
    """CUDA C emitted by ``tvm.compile`` for the T4 (no GPU or nvcc needed)."""
    mod = func_or_mod
    if isinstance(mod, tirx.PrimFunc):
        mod = tvm.IRModule({str(mod.attrs["global_symbol"]) if mod.attrs and "global_symbol"
                            in mod.attrs else "main": mod})
    ex = tvm.compile(mod, target=tvm.target.Target(T4))
    todo, seen = [ex.mod], []
    while todo:  # the device module is an import of the host module
        m = todo.pop()
        if m.kind == "cuda":
            return m.inspect_source("cuda")
        seen.append(m.kind)
        todo.extend(m.imports)
    raise RuntimeError(f"no CUDA module in the build (found {seen})")


def compile_cubin(func_or_mod: tirx.PrimFunc | tvm.IRModule | str, arch: str = "sm_75") -> bytes:
    """Build with TVM, then compile the CUDA source to a cubin for ``arch`` with nvcc."""
    from tvm.support import nvcc

    if tool_path("nvcc") is None:
        raise FileNotFoundError("nvcc not found on PATH")
    src = func_or_mod if isinstance(func_or_mod, str) else cuda_source(func_or_mod)
    # nvcc.compile_cuda asks Target.current() for the arch when no GPU is attached.
    with tvm.target.Target({"kind": "cuda", "arch": arch}):
        return bytes(nvcc.compile_cuda(src, target_format="cubin", arch=arch, compiler="nvcc",
                                       options=["-w"]))


def compile_sm75(func_or_mod: tirx.PrimFunc | tvm.IRModule) -> bytes:
    """sm_75 (T4) cubin of a kernel; see :func:`compile_cubin`."""
    return compile_cubin(func_or_mod, "sm_75")


_FUNC_RE = re.compile(r"^\s*Function\s*:\s*(\S+)")
_INSN_RE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")


def sass_histogram(cubin: bytes) -> dict[str, dict[str, int]]:
    """Per kernel name: SASS opcode (with modifiers, e.g. ``IMMA.8816.U8.S8``) -> count."""
    tool = tool_path("cuobjdump")
    if tool is None:
        raise FileNotFoundError("cuobjdump not found (pip install nvidia-cuda-cuobjdump "
                                "nvidia-cuda-nvdisasm)")
    env = dict(os.environ)  # cuobjdump -sass shells out to nvdisasm
    env["PATH"] = f"{Path(tool).parent}{os.pathsep}{_cu13_bin()}{os.pathsep}{env.get('PATH', '')}"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, env=env,
                              check=True).stdout
    hist: dict[str, Counter[str]] = {}
    current = None
    for line in text.splitlines():
        if fm := _FUNC_RE.match(line):
            current = hist.setdefault(fm.group(1), Counter())
        elif current is not None and (im := _INSN_RE.search(line)):
            current[im.group(1)] += 1
    return {k: dict(v) for k, v in hist.items()}


def pack_int4(values: np.ndarray) -> np.ndarray:
    """Pack int4/uint4 values 2 per byte along the last axis (low nibble = even index)."""
    v = np.asarray(values).astype(np.int64)
    if v.shape[-1] % 2 or v.min() < -8 or v.max() > 15:
        raise ValueError("need an even last axis and values in [-8, 15]")
    v = v & 15
    return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)
