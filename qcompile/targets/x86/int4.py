"""INT4 weights for the VNNI GEMM/conv kernels: two signed nibbles per byte.

The CPU has no 4-bit arithmetic: ``vpdpbusd`` multiplies u8 x s8. So 4-bit weights are
stored packed (half the bytes of the int8 layout, half the weight bandwidth) and
sign-extended to int8 inside the kernel, with integer bit operations only.
Activations stay one value per byte.

Packed layout: the int8 layout of ``x86_vnni.pack_weights`` is (NB, KB, 16, 4), one
64-element block per (16 output channels x 4 reduction elements), element e = 4*lane + k.
The int4 layout is (NB, KB, 8, 4) uint8, 32 bytes per block: byte b = 4*r + k holds
element b (lane r) in its low nibble and element b + 32 (lane r + 8) in its high
nibble, both two's complement (``nibble_pack``).

Unpack (``_unpack64``): one 256 -> 512-bit broadcast load puts the 32 bytes in both
halves of a zmm, and one ``vgf2p8affineqb`` (GFNI) sign-extends the low nibbles in the
lower half and the high nibbles in the upper half (a per-qword 8x8 bit matrix: sign
extension only copies bits, so it is linear over GF(2)). The result is the block's 64
int8 weights in element order, exact for -8..7 (only bit operations: no float, no
division). Spelled as a 16-bit shift + and/xor/sub instead, LLVM emitted 3 vector ops per
block and the GEMM ran ~25% behind int8 (a noisy run); the one-op form ~13%.

Where (``unpack_mode``): "tile" unpacks per register tile and K step inside the dot
intrinsic (``dot_intrin_int4``, the unpack shared by the tile's mr rows), reading only
the packed bytes: best when one M tile uses the weights once (batch-1 dense);
"prologue" unpacks the whole tensor once per call (``unpacked`` stage,
``unpack_intrin``) and runs the int8 GEMM: int8 speed when many M tiles reuse them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from qcompile.tvm_compat import te, tirx
from qcompile.tvm_compat import PrimExpr
from qcompile.tvm_compat import Schedule, TensorIntrin
from qcompile.tvm_compat import T

# The vpdpbusd block these layouts are made of (x86_vnni.ISA: 16 lanes x 4 bytes).
LANES, KG = 16, 4
HALF = LANES // 2  # lanes r and r + HALF share a byte


@dataclass(frozen=True)
class UnpackIsa:
    """The instruction that turns packed nibbles into int8 lanes."""

    name: str
    instruction: str
    llvm_intrinsic: str
    cpu_flag: str  # /proc/cpuinfo flag that proves support


# A per-byte 8x8 bit-matrix multiply, one matrix per 64-bit lane: sign-extends the low
# nibbles of one half and the high nibbles of the other in one instruction.
GFNI = UnpackIsa(name="gfni", instruction="vgf2p8affineqb",
                 llvm_intrinsic="llvm.x86.vgf2p8affineqb.512", cpu_flag="gfni")


# ----------------------------------------------------------------------------- packing
def nibble_pack(wp: np.ndarray) -> np.ndarray:
    """Packed int8 blocks (NB, KB, 16, 4) with values in [-8, 7] -> (NB, KB, 8, 4) uint8."""
    if wp.shape[-2:] != (LANES, KG):
        raise ValueError(f"expected (..., {LANES}, {KG}) blocks, got {wp.shape}")
    if wp.size and (wp.min() < -8 or wp.max() > 7):
        raise ValueError(f"int4 weights must lie in [-8, 7], got [{wp.min()}, {wp.max()}]")
    u = wp.astype(np.uint8) & 0x0F  # two's-complement nibbles
    return np.ascontiguousarray(u[..., :HALF, :] | (u[..., HALF:, :] << 4))


def nibble_unpack(wp4: np.ndarray) -> np.ndarray:
    """Inverse of ``nibble_pack``: (NB, KB, 8, 4) uint8 -> (NB, KB, 16, 4) int8."""
    lo, hi = wp4 & 0x0F, wp4 >> 4
    both = np.concatenate([lo, hi], axis=-2).astype(np.int8)
    return ((both ^ 8) - 8).astype(np.int8)


# ----------------------------------------------------------------------------- TIR
def nibble(byte: tirx.PrimExpr, high: tirx.PrimExpr) -> tirx.PrimExpr:
    """int32 value of the signed nibble ``high`` (0 low, 1 high) of uint8 ``byte``."""
    v = (byte.astype("int32") >> (high * 4)) & 15
    return (v ^ 8) - 8


def weight_int4(w: tirx.PrimExpr, j: tirx.PrimExpr, k: tirx.PrimExpr) -> tirx.PrimExpr:
    """int32 weight (output column j, reduction k) read from packed (NB, KB, 8, 4) ``w``."""
    return nibble(w[j // LANES, k // KG, j % HALF, k % KG], j % LANES // HALF)


def unpacked(w4: te.Tensor) -> te.Tensor:
    """The int8 (NB, KB, 16, 4) weights of packed (NB, KB, 8, 4) ``w4``, as a stage."""
    nb, kb = (int(d) for d in w4.shape[:2])
    return te.compute((nb, kb, LANES, KG), lambda j, k, i, kk: nibble(
        w4[j, k, i % HALF, kk], i // HALF).astype("int8"), name="w_unpack")


def unpack_intrin() -> tuple[tirx.PrimFunc, tirx.PrimFunc]:
    """desc/impl of W[16, 4] = unpack(B[8, 4]): one block, for the ``unpacked`` stage."""

    @T.prim_func(s_tir=True)
    def desc(B: T.Buffer((8, 4), "uint8", offset_factor=1),
             W: T.Buffer((16, 4), "int8", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(B[0:8, 0:4])
            T.writes(W[0:16, 0:4])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("unpack"):
                        vi, vk = T.axis.remap("SS", [i, k])
                        W[vi, vk] = T.cast(nibble(B[vi % 8, vk], vi // 8), "int8")

    @T.prim_func(s_tir=True)
    def impl(B: T.Buffer((8, 4), "uint8", offset_factor=1),
             W: T.Buffer((16, 4), "int8", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(B[0:8, 0:4])
            T.writes(W[0:16, 0:4])
            W.vstore([0, 0], _unpack64(B))  # the 64 bytes of the block at once

    return desc, impl


DotFn = Callable[[tirx.Buffer, tirx.Buffer, PrimExpr], PrimExpr]


def dot_intrin_int4(c_scope: str, dot: DotFn) -> tuple[tirx.PrimFunc, tirx.PrimFunc]:
    """desc/impl of C[16] += A[4] . unpack(B[8, 4]) (the 16x4 int4 block), C in ``c_scope``;
    ``dot(C, A, b)`` issues the instruction (x86_vnni's ``vpdpbusd``, the int8 one's too)."""

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4,), "uint8", offset_factor=1),
             B: T.Buffer((8, 4), "uint8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1, scope=c_scope)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:8, 0:4])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * nibble(B[vi % 8, vk], vi // 8)

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "uint8", offset_factor=1),
             B: T.Buffer((8, 4), "uint8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1, scope=c_scope)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:8, 0:4])
            T.writes(C[0:16])
            C[T.ramp(T.int32(0), 1, 16)] = dot(C, A, _unpack64(B))

    return desc, impl


# gf2p8affineqb matrices (one qword, row of output bit i in byte 7 - i): each output bit
# copies one input bit, so sign-extending a nibble is linear over GF(2).
SEXT_LOW = 0x0102040808080808   # bits 0..3 <- bits 0..3, bits 4..7 <- bit 3
SEXT_HIGH = 0x1020408080808080  # bits 0..3 <- bits 4..7, bits 4..7 <- bit 7


def _unpack64(B: tirx.Buffer) -> tirx.PrimExpr:
    """int8x64 weights of one block from its 32 packed bytes (see the module docstring)."""
    both = B.vload([0, 0], "uint8x32")
    both = tirx.Shuffle([both, both], list(range(64)))  # one 256 -> 512 broadcast load
    mats = tirx.Shuffle([tirx.Broadcast(tirx.const(SEXT_LOW, "int64"), 4),
                         tirx.Broadcast(tirx.const(SEXT_HIGH, "int64"), 4)], list(range(8)))
    return tirx.call_llvm_pure_intrin(
        "int8x64", GFNI.llvm_intrinsic, tirx.reinterpret("int8x64", both),
        tirx.reinterpret("int8x64", mats), tirx.const(0, "int8"))


INTRIN_UNPACK = "qcompile_unpack_s4s8_16x4"
TensorIntrin.register(INTRIN_UNPACK, *unpack_intrin(), override=True)


def schedule_unpack(sch: Schedule, name: str = "w_unpack") -> None:
    """The ``unpacked`` stage: blocks in parallel, each one load + one vgf2p8affineqb."""
    j, k, i, _ = sch.get_loops(sch.get_sblock(name))
    sch.parallel(sch.fuse(j, k))
    sch.tensorize(i, INTRIN_UNPACK)


# Where to unpack: per register tile and K step ("tile": one vgf2p8affineqb per mr
# vpdpbusd, redone by every M tile: ~13% slower than int8), or once per call into an
# int8 copy that the int8 GEMM then reads ("prologue": one extra write and read of the
# int8 weights, int8 speed once enough M tiles share them). Measured (1 thread, warm):
# break-even at 4 M tiles; at 1 M tile (batch-1 dense) "tile" beats int8 by 1.25x and
# the prologue loses 2.4x; at 7 (ResNet-50's 7x7 layers, batch 1) the prologue runs at
# 0.92-0.95x of int8 and "tile" at 0.85-0.88x (weights flushed per call: 0.92-1.04x).
PROLOGUE_MIN_TILES = 5


def unpack_mode(m_tiles: int) -> str:
    """"tile" or "prologue" for a GEMM with ``m_tiles`` register tiles along M."""
    return "prologue" if m_tiles >= PROLOGUE_MIN_TILES else "tile"
