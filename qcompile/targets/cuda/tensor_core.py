"""Integer tensor-core kernels for NVIDIA sm_75+ (T4 to H100): int8 and packed int4 GEMM / conv.

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
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from qcompile.tvm_compat import s_tir, te, tirx
from qcompile.tvm_compat import PrimExpr
from qcompile.tvm_compat import TensorIntrin
from qcompile.tvm_compat import T

# ======== 1. Hardware table: MMA shapes per arch and dtype, and what implements them.


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


def kernel_mma(bits: int, sm: int) -> MmaShape | None:
    """The row our GEMM kernels issue for ``bits`` on ``sm_<sm>``, native preferred, else
    emulated (int4 on sm_90: correct, no faster than int8); None where the arch has neither.
    Only rows one of our intrinsics issues count (m16n8k32/k64 have none of ours yet)."""
    ours = [s for s in mma_shapes(sm, bits, native_only=False)
            if any(i.startswith(INTRIN_PREFIX) for i in s.tvm_intrins)]
    return next((s for s in ours if s.native_on(sm)), ours[0] if ours else None)


Idx = int | PrimExpr


# ======== 2. Warp intrinsics: int32 C[16, 16] += A[16, 16 bytes] . B[16, 16 bytes]^T, 2x2 mma.sync.
# The accumulator takes TVM's m16n8 register layout, whose 8x8 quadrants are exactly the m8n8 C
# fragment. Registered lazily, and tvm.s_tir.tensor_intrin.cuda is never imported: parsing its
# ~100 TVMScript intrinsics takes ~60 s on a 2-core CI box.


def _acc_layout(i: Idx, j: Idx) -> tuple[Idx, Idx]:
    """(lane, register) of C[i, j] in a 16x16 tile; = TVM's shared_16x16_to_ldmatrix_32x8."""
    return 4 * (i % 8) + (j % 8) // 2, 4 * (j // 8) + 2 * (i // 8) + j % 2


def _nibbles(b: PrimExpr, signed: bool) -> tuple[PrimExpr, PrimExpr]:
    """(low, high) 4-bit values of a byte, sign-extended by shifts when ``signed``."""
    v = b.astype("int32")
    return ((v << 28) >> 28, (v << 24) >> 28) if signed else (v & 15, (v >> 4) & 15)


def _byte_dot(a: PrimExpr, w: PrimExpr, bits: int, a_signed: bool) -> PrimExpr:
    """int32 partial product of one K byte: 1 value (int8) or 2 packed nibbles (int4, lo = even k)."""
    if bits == 8:
        return a.astype("int32") * w.astype("int32")
    (a0, a1), (w0, w1) = _nibbles(a, a_signed), _nibbles(w, True)
    return a0 * w0 + a1 * w1


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


def intrin_name(bits: int, a_signed: bool) -> str:
    """Our mma intrinsic for (activation, weight) = (u|s{bits}, s{bits})."""
    return f"{INTRIN_PREFIX}{'s' if a_signed else 'u'}{bits}s{bits}"


def _fill_store_intrins() -> dict[str, tuple[tirx.PrimFunc, tirx.PrimFunc]]:
    @T.prim_func(s_tir=True)
    def fill_desc(c: T.handle) -> None:
        C = T.match_buffer(c, (32, 8), "int32", scope="warp")
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:32, 0:8])
            for i, j in T.grid(16, 16):
                with T.sblock("init"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    t, r = T.meta_var(_acc_layout(vi, vj))
                    C[t, r] = T.int32(0)

    @T.prim_func(s_tir=True)
    def fill_impl(c: T.handle) -> None:
        C = T.match_buffer(c, (32, 8), "int32", scope="warp", offset_factor=1)
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:32, 0:8])
            for tx in T.thread_binding(0, 32, "threadIdx.x"):
                T.evaluate(T.cuda.mma_fill_legacy(8, C.data, C.elem_offset, dtype="int32"))

    @T.prim_func(s_tir=True)
    def store_desc(c: T.handle, d: T.handle) -> None:
        C = T.match_buffer(c, (32, 8), "int32", scope="warp")
        D = T.match_buffer(d, (16, 16), "int32", scope="shared")
        with T.sblock("root"):
            T.reads(C[0:32, 0:8])
            T.writes(D[0:16, 0:16])
            for i, j in T.grid(16, 16):
                with T.sblock("store"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    t, r = T.meta_var(_acc_layout(vi, vj))
                    D[vi, vj] = C[t, r]

    @T.prim_func(s_tir=True)
    def store_impl(c: T.handle, d: T.handle) -> None:
        s0 = T.int32()
        C = T.match_buffer(c, (32, 8), "int32", scope="warp", offset_factor=1)
        D = T.match_buffer(d, (16, 16), "int32", scope="shared", offset_factor=1, strides=[s0, 1])
        with T.sblock("root"):
            T.reads(C[0:32, 0:8])
            T.writes(D[0:16, 0:16])
            for tx in T.thread_binding(0, 32, "threadIdx.x"):
                # A plain loop: LowerWarpMemory reads each register via an own-lane SHFL.
                # TVM's mma_store would avoid that, but its codegen needs a global function
                # that only `import tvm.s_tir.tensor_intrin.cuda` registers (~60 s here).
                for r in T.serial(8):
                    D[r % 4 // 2 * 8 + tx // 4, r // 4 * 8 + tx % 4 * 2 + r % 2] = C[tx, r]

    return {FILL_INTRIN: (fill_desc, fill_impl), STORE_INTRIN: (store_desc, store_impl)}


FILL_INTRIN = "qcompile_mma_fill_16x16_i32"
STORE_INTRIN = "qcompile_mma_store_16x16_i32_shared"


def ensure_intrins(bits: int, a_signed: bool) -> tuple[str, str, str]:
    """Register (once) and return the fill, mma and store intrinsics a kernel needs."""
    mma = intrin_name(bits, a_signed)
    if TensorIntrin.get(FILL_INTRIN, allow_missing=True) is None:
        for name, pair in _fill_store_intrins().items():
            TensorIntrin.register(name, *pair, override=True)
    if TensorIntrin.get(mma, allow_missing=True) is None:
        TensorIntrin.register(mma, *_mma_intrin(bits, a_signed), override=True)
    return FILL_INTRIN, mma, STORE_INTRIN


# ======== 3. Compute definitions (unscheduled: each runs on CPU as the reference of its kernel).

BLOCK_K = 32  # bytes of K per shared-memory stage: 2 mma k-steps
ExprFn = Callable[..., PrimExpr]  # index expressions -> value expression


@dataclass(frozen=True)
class QuantOpts:
    """Operand widths and the epilogue: ``clip(((int64(acc) + int64(bias)) * m + r) >> s, lo, hi)``."""

    bits: int = 8
    a_signed: bool = False  # activations s8/s4 (else u8/u4, e.g. after ReLU)
    out_dtype: str = "int8"
    raw: bool = False  # return int32 acc + bias, no requant
    lo: int | None = None  # clip bounds; default: out_dtype's range
    hi: int | None = None

    def __post_init__(self) -> None:
        if self.bits not in (8, 4):
            raise ValueError(f"bits must be 8 or 4, got {self.bits}")
        if not self.raw and self.out_dtype not in ("int8", "uint8", "int32"):
            raise ValueError(f"out_dtype must be int8, uint8 or int32, got {self.out_dtype}")

    def k_bytes(self, k: int) -> int:
        if self.bits == 4 and k % 2:
            raise ValueError(f"int4 packs 2 values per byte along K; {k} is odd")
        return k * self.bits // 8


def _ceil(x: int, m: int) -> int:
    return -(-x // m) * m


def _epilogue(q: QuantOpts, shape: tuple[int, ...], acc: ExprFn, chan: int, n: int
              ) -> tuple[list[te.Tensor], te.Tensor]:
    """``out[idx] = requant(acc(*idx) + bias[c])`` with c = idx[chan]; returns (params, out)."""
    bias = te.placeholder((n,), "int32", "bias")
    if q.raw:
        return [bias], te.compute(shape, lambda *i: acc(*i) + bias[i[chan]], name="out")
    m, r, s = (te.placeholder((n,), "int64", x) for x in ("m", "r", "s"))
    info = np.iinfo(q.out_dtype)
    lo = tirx.const(info.min if q.lo is None else q.lo, "int64")
    hi = tirx.const(info.max if q.hi is None else q.hi, "int64")

    def f(*i: PrimExpr) -> PrimExpr:
        c = i[chan]
        # Each operand widened before the add: int64(acc + bias) is what the simplifier
        # may rewrite as int64(acc) + int64(bias) (it assumes no int32 overflow), so the
        # result would depend on a rewrite. The quantizer proved |acc| and |acc + bias|
        # fit int32 (refusing layers where they might not), so this equals the oracle.
        v = ((acc(*i).astype("int64") + bias[c].astype("int64")) * m[c] + r[c]) >> s[c]
        return tirx.max(tirx.min(v, hi), lo).astype(q.out_dtype)

    return [bias, m, r, s], te.compute(shape, f, name="out")


def _gemm(q: QuantOpts, a_val: ExprFn, w_val: ExprFn, M: int, N: int, KB: int,
          tile: tuple[int, int]) -> tuple[list[te.Tensor], te.Tensor]:
    """gemm[Mp, Np] over padded sizes, then out[M, N]. ``a_val(i, kb)`` / ``w_val(j, kb)``
    give one K byte and must be 0 for kb >= KB; padded rows read a clamped in-range row,
    since their results are never stored."""
    Mp, Np, Kp = _ceil(M, tile[0]), _ceil(N, tile[1]), _ceil(KB, BLOCK_K)
    A = te.compute((Mp, Kp), lambda i, k: a_val(tirx.min(i, M - 1), k), name="A_pad")
    W = te.compute((Np, Kp), lambda j, k: w_val(tirx.min(j, N - 1), k), name="W_pad")
    k = te.reduce_axis((0, Kp), "k")
    C = te.compute((Mp, Np), lambda i, j: te.sum(
        _byte_dot(A[i, k], W[j, k], q.bits, q.a_signed), axis=k), name="gemm")
    return _epilogue(q, (M, N), lambda i, j: C[i, j], 1, N)


def _guard(ok: PrimExpr, load: PrimExpr) -> PrimExpr:
    return tirx.if_then_else(ok, load, tirx.const(0, load.dtype))


def dense_compute(M: int, N: int, K: int, q: QuantOpts, tile: tuple[int, int] = (16, 16)
                  ) -> tirx.PrimFunc:
    """Unscheduled ``dense_tc``: X[M, K] . W[N, K]^T (+ bias, requant)."""
    KB = q.k_bytes(K)
    a_dt, w_dt = _storage(q.bits, q.a_signed)
    X, Wt = te.placeholder((M, KB), a_dt, "X"), te.placeholder((N, KB), w_dt, "W")
    def byte(t: te.Tensor, row: PrimExpr, kb: PrimExpr) -> PrimExpr:
        return _guard(kb < KB, t[row, tirx.min(kb, KB - 1)])  # in-bounds even where masked

    params, out = _gemm(q, lambda i, kb: byte(X, i, kb), lambda j, kb: byte(Wt, j, kb),
                        M, N, KB, tile)
    return te.create_prim_func([X, Wt, *params, out]).with_attr("global_symbol", "dense_tc")


def conv_out_hw(data_shape: tuple[int, int, int, int], kernel: tuple[int, int],
                strides: tuple[int, int], pads: tuple[int, int, int, int],
                dilations: tuple[int, int] = (1, 1)) -> tuple[int, int]:
    """(OH, OW) of a conv; pads are (top, left, bottom, right)."""
    return tuple((data_shape[1 + a] + pads[a] + pads[a + 2] - dilations[a] * (kernel[a] - 1) - 1)
                 // strides[a] + 1 for a in (0, 1))


def conv2d_nhwc_compute(data_shape: tuple[int, int, int, int], out_channels: int,
                        kernel: tuple[int, int], strides: tuple[int, int],
                        pads: tuple[int, int, int, int], dilations: tuple[int, int],
                        q: QuantOpts, tile: tuple[int, int] = (16, 16)) -> tirx.PrimFunc:
    """Unscheduled ``conv2d_nhwc_tc``: implicit GEMM, rows (n, oh, ow), K bytes (kh, kw, c)."""
    nb, H, Wd, C = data_shape
    KH, KW = kernel
    CB = q.k_bytes(C)
    OH, OW = conv_out_hw(data_shape, kernel, strides, pads, dilations)
    M, KB = nb * OH * OW, KH * KW * CB
    a_dt, w_dt = _storage(q.bits, q.a_signed)
    X = te.placeholder((nb, H, Wd, CB), a_dt, "X")
    Wt = te.placeholder((out_channels, KH, KW, CB), w_dt, "W")

    def split_k(kb: PrimExpr) -> tuple[PrimExpr, ...]:
        kq = tirx.min(kb, KB - 1)
        return kq // (KW * CB), kq // CB % KW, kq % CB

    def a_val(i: PrimExpr, kb: PrimExpr) -> PrimExpr:
        kh, kw, c = split_k(kb)
        h = i // OW % OH * strides[0] + kh * dilations[0] - pads[0]
        w = i % OW * strides[1] + kw * dilations[1] - pads[1]
        ok = tirx.all(kb < KB, h >= 0, h < H, w >= 0, w < Wd)
        return _guard(ok, X[i // (OH * OW), h, w, c])

    params, out = _gemm(q, a_val, lambda j, kb: _guard(kb < KB, Wt[(j,) + tuple(split_k(kb))]),
                        M, out_channels, KB, tile)
    func = te.create_prim_func([X, Wt, *params, out]).with_attr("global_symbol", "conv2d_nhwc_tc")
    sch = s_tir.Schedule(func)  # expose the output as NHWC: a pure reshape of the (M, O) view
    sch.transform_layout("out", ("write", 0), lambda i, o: (i // (OH * OW), i // OW % OH, i % OW, o))
    return sch.mod["main"]


# ======== 4. Schedule: one rule for every GEMM-shaped kernel above.


@dataclass(frozen=True)
class TileConfig:
    """Warps per block (warps_m x warps_n) and 16x16 fragments per warp (frags_m x frags_n)."""

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


def _schedule_gemm(func: tirx.PrimFunc, cfg: TileConfig, q: QuantOpts, a_vec: int, w_vec: int,
                   out_vec: int) -> tirx.PrimFunc:
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
    bx = sch.fuse(i0, j0)
    sch.bind(bx, "blockIdx.x")
    ty = sch.fuse(i1, j1)
    sch.bind(ty, "threadIdx.y")
    # Step 3. Cooperative global->shared copies; padding / im2col producers inline into them.
    for idx, rows, vec in ((0, bm, a_vec), (1, bn, w_vec)):
        cache = sch.cache_read(outer, idx, "shared")
        sch.compute_inline(sch.get_producers(cache)[0])
        sch.compute_at(cache, k0)
        _bind_threads(sch, sch.get_loops(cache)[-2:], nthreads,
                      _vec_width(rows * BLOCK_K, nthreads, vec))
        # Row stride 48 bytes: the 8 rows one mma reads fall in 8 disjoint bank groups.
        sch.storage_align(cache, 0, axis=-2, factor=32, offset=16)
    # Step 4. Accumulate in warp registers; stage the tile through shared for the epilogue.
    acc = sch.cache_write(outer, 0, "warp")
    sch.reverse_compute_at(acc, ty)
    sch.reverse_compute_at(out, bx)  # before tensorize hides the producer
    sch.set_scope(acc, 0, "shared")
    r, c = sch.get_loops(acc)[-2:]
    r0, r1 = sch.split(r, [None, 16])
    c0, c1 = sch.split(c, [None, 16])
    sch.reorder(r0, c0, r1, c1)
    sch.transform_layout(acc, ("read", 0),
                         lambda i, j: (i // 16, j // 16, *_acc_layout(i % 16, j % 16)))
    init = sch.decompose_reduction(outer, k0)
    # Step 5. Tensorize init / mma / store.
    fill, mma, store = ensure_intrins(q.bits, q.a_signed)
    sch.tensorize(sch.get_loops(sch.get_child_blocks(init)[0])[-2], fill)
    sch.tensorize(sch.get_loops(sch.get_child_blocks(outer)[0])[-3], mma)
    sch.tensorize(r1, store)
    # Row stride 72 words: each register's 8-row x 4-lane store pattern conflicts 2-way, not 8.
    # (Set on the tensorized block: tensorize drops annotations of the block it replaces.)
    sch.storage_align(sch.get_sblock("gemm_warp_o"), 0, axis=-2, factor=32, offset=8)
    # Step 6. Epilogue (bias, requant, clip, cast) reads the shared tile, writes vectors.
    _bind_threads(sch, sch.get_loops(out)[1:], nthreads,  # M=1 drops the row loop
                  _vec_width(bm * bn, nthreads, out_vec))
    return sch.mod["main"]


def _bind_threads(sch: s_tir.Schedule, loops: list, nthreads: int, vec: int) -> None:
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    _, ty, tx, v = sch.split(fused, [None, nthreads // 32, 32, vec])
    sch.bind(tx, "threadIdx.x")
    sch.bind(ty, "threadIdx.y")
    sch.vectorize(v)


def _out_vec(M: int, N: int, cfg: TileConfig) -> int:
    return 4 if M % cfg.tile[0] == 0 and N % cfg.tile[1] == 0 else 1  # partial tiles: guarded


def dense_tc(M: int, N: int, K: int, *, bits: int = 8, out_dtype: str = "int8", raw: bool = False,
             a_signed: bool = False, lo: int | None = None, hi: int | None = None) -> tirx.PrimFunc:
    """Tensor-core int GEMM with fused requant:
    ``out = clip(((int64(X.W^T) + int64(b))*m + r) >> s, lo, hi)``.

    Params, in order: X (M, K) u8 (s8 if ``a_signed``) [int4: (M, K/2) packed bytes, low
    nibble = even k], W (N, K) s8 [int4: (N, K/2) packed s4], bias (N,) int32, then m, r, s
    (N,) int64 unless ``raw``; last the output (M, N) out_dtype (int32 acc + bias if ``raw``).
    """
    q = QuantOpts(bits, a_signed, out_dtype, raw, lo, hi)
    cfg = TileConfig.for_shape(M, N)
    vec = 16 if q.k_bytes(K) % BLOCK_K == 0 else 1  # ragged K keeps a per-byte guard
    return _schedule_gemm(dense_compute(M, N, K, q, cfg.tile), cfg, q, vec, vec,
                          _out_vec(M, N, cfg))


def conv2d_nhwc_tc(data_shape: tuple[int, int, int, int], out_channels: int,
                   kernel: tuple[int, int], *, strides: tuple[int, int] = (1, 1),
                   pads: tuple[int, int, int, int] = (0, 0, 0, 0),
                   dilations: tuple[int, int] = (1, 1), bits: int = 8, out_dtype: str = "int8",
                   raw: bool = False, a_signed: bool = False, lo: int | None = None,
                   hi: int | None = None) -> tirx.PrimFunc:
    """Tensor-core NHWC conv as an implicit GEMM (im2col fused into the shared-memory loads).

    Params, in order: X (N, H, W, C) [int4: (N, H, W, C/2) packed], W (O, KH, KW, C) OHWI
    [int4: packed along C], bias (O,) int32, then m, r, s (O,) int64 unless ``raw``; last the
    output (N, OH, OW, O). pads = (top, left, bottom, right).
    """
    q = QuantOpts(bits, a_signed, out_dtype, raw, lo, hi)
    oh, ow = conv_out_hw(data_shape, kernel, strides, pads, dilations)
    M = data_shape[0] * oh * ow
    cfg = TileConfig.for_shape(M, out_channels)
    cb = q.k_bytes(data_shape[3])
    ragged = kernel[0] * kernel[1] * cb % BLOCK_K != 0
    # A vector must stay inside one pixel's C bytes. Guarded loads vectorize as
    # select(ok, load, 0), and TVM's CUDA codegen mis-prints a 16 x u8 zero (make_uint4 with
    # 16 args), while 4 x u8 prints as one packed int: cap guarded vectors at 4 bytes.
    a_vec = 1 if ragged else min(math.gcd(cb, 16), 4 if any(pads) else 16)
    func = conv2d_nhwc_compute(data_shape, out_channels, kernel, strides, pads, dilations, q,
                               cfg.tile)
    return _schedule_gemm(func, cfg, q, a_vec, 1 if ragged else 16, _out_vec(M, out_channels, cfg))


def depthwise_conv2d_nhwc(data_shape: tuple[int, int, int, int], kernel: tuple[int, int], *,
                          strides: tuple[int, int] = (1, 1),
                          pads: tuple[int, int, int, int] = (0, 0, 0, 0), out_dtype: str = "int8",
                          raw: bool = False, a_signed: bool = False, lo: int | None = None,
                          hi: int | None = None, schedule: bool = True) -> tirx.PrimFunc:
    """int8 depthwise NHWC conv on CUDA cores (a per-channel K of 9 fits no tensor-core shape).

    Params: X (N, H, W, C) u8/s8, W (KH, KW, C) s8, bias (C,), then m, r, s (C,) int64 unless
    ``raw``; last the output (N, OH, OW, C). ``schedule=False`` gives the CPU reference.
    """
    q = QuantOpts(8, a_signed, out_dtype, raw, lo, hi)
    nb, H, Wd, C = data_shape
    OH, OW = conv_out_hw(data_shape, kernel, strides, pads)
    X = te.placeholder(data_shape, _storage(8, a_signed)[0], "X")
    Wt = te.placeholder((*kernel, C), "int8", "W")
    rh, rw = te.reduce_axis((0, kernel[0]), "rh"), te.reduce_axis((0, kernel[1]), "rw")

    def acc(n: PrimExpr, y: PrimExpr, x: PrimExpr, c: PrimExpr) -> te.Tensor:
        h, w = y * strides[0] + rh - pads[0], x * strides[1] + rw - pads[1]
        v = _guard(tirx.all(h >= 0, h < H, w >= 0, w < Wd), X[n, h, w, c])
        return te.sum(v.astype("int32") * Wt[rh, rw, c].astype("int32"), axis=[rh, rw])

    gemm = te.compute((nb, OH, OW, C), acc, name="gemm")
    params, out = _epilogue(q, (nb, OH, OW, C), lambda *i: gemm[i], 3, C)
    func = te.create_prim_func([X, Wt, *params, out]).with_attr("global_symbol", "depthwise_nhwc")
    if not schedule:
        return func
    sch = s_tir.Schedule(func)
    bx, tx = sch.split(sch.fuse(*sch.get_loops("out")), [None, 128])  # C innermost: coalesced
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    sch.compute_at(sch.get_sblock("gemm"), tx)  # one thread per output, its sum in a register
    sch.set_scope(sch.get_sblock("gemm"), 0, "local")
    return sch.mod["main"]


# ======== 5. Build for sm_75 without a GPU and read the SASS back: see cuda_tools.
# Re-exported here because callers reach them as cuda_tc.<name>.
from qcompile.verify.cuda_tools import (  # noqa: E402,F401
    T4, compile_cubin, compile_sm75, cuda_source, sass_histogram, tool_path)


def pack_int4(values: np.ndarray) -> np.ndarray:
    """Pack int4/uint4 values 2 per byte along the last axis (low nibble = even index)."""
    v = np.asarray(values).astype(np.int64)
    if v.shape[-1] % 2 or v.min() < -8 or v.max() > 15:
        raise ValueError("need an even last axis and values in [-8, 15]")
    v = v & 15
    return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)
