"""AVX-512 VNNI kernels for qcompile's integer ops, as scheduled TIR PrimFuncs.

Every generator returns a ``tvm.tirx.PrimFunc`` (destination-passing: the output
buffer is the last parameter) that is bit-exact against NumPy integer arithmetic.

Layouts
    activations NHWC, uint8 or int8 with zero point 0;
    GEMM/conv weights packed once, in NumPy, to (ceil(N/16), ceil(K/4), 16, 4) int8
    (``pack_weights`` / ``pack_conv_weights``), so one ``vpdpbusd`` reads 64
    contiguous bytes: 16 output channels x 4 reduction elements; 4-bit weights
    (``w_bits=4``) to (ceil(N/16), ceil(K/4), 8, 4) uint8 nibbles (``pack_weights_int4``
    / ``pack_conv_weights_int4``, layout and unpack in ``x86_int4``);
    depthwise weights (kh, kw, C) int8.

Requantization epilogue (``raw=False``), per output channel n::

    out = clip((int64(int32(acc + bias[n])) * m[n] + r[n]) >> s[n], lo, hi)

``lo``/``hi`` are baked into the PrimFunc (default: the output dtype's range): every
layer gets its own PrimFunc anyway, and constants let LLVM fold the clip.
``raw=True`` writes the int32 ``acc + bias`` instead and takes no m/r/s.

Signed inputs: VNNI multiplies u8 x s8, so an int8 activation x is fed as
x + 128 (a sign-bit flip, fused into the kernel's pad/copy stage) and the caller
folds ``-128 * sum_k w[n, k]`` into the bias once, with ``signed_input_bias``.

Design (measured with benchmarks/kernels_x86.py, 1 thread, medians)
    GEMM/conv: M = output pixels (N*OH*OW flattened), N = output channels. Register
    tile of mr x nb zmm int32 accumulators (7x2 when N allows), K innermost through
    our vpdpbusd intrinsic, the tile unrolled and kept under 1 KiB so TVM allocates
    it on the stack and LLVM keeps it in registers (see ACC_SCOPE), the requant
    epilogue fused per tile, (M tiles x N tiles) fused into one parallel loop.
    No M padding of inputs: tail rows of the last tile re-read row M-1 (clamped
    index) and are not written. N tiles go outermost when the weights outweigh the
    activations (late 7x7 layers), so each weight panel is streamed once.
    Conv is an implicit GEMM: it indexes the input (or, when padding / C % 4 /
    int8 input require it, one padded uint8 copy) directly; 1x1 stride-1 reads x
    itself. An explicit im2col stage was measured (``im2col=True``): equal on 1x1
    convs, 7% slower on 3x3 (56x56x64: 0.584 vs 0.544 ms), 3.1x slower on the 7x7
    stem (2.67 vs 0.85 ms), so implicit is the default.
    The runtime: TVM's thread pool uses hardware_concurrency/2 threads on x86 (1 on a
    2-vCPU VM); set TVM_NUM_THREADS before the first parallel call to use both cores.

Depthwise conv and pools live in ``x86_window``; picking a kernel for a layer
(``select_kernel(LayerDesc(...))``, rules tried in order) in ``x86_rules``.
Standalone: ``tvm.compile(tvm.IRModule({"main": f}), target)``; inside Relax:
``bb.add_func(f.without_attr("global_symbol"), name)`` then ``R.call_tir``.
"""
from __future__ import annotations

import math
from functools import partial
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from tvm import te, tirx
from tvm.s_tir import SBlockRealize, Schedule, TensorIntrin
from tvm.s_tir.schedule import LoopRV, SBlockRV
from tvm.script import tirx as T

from .x86_int4 import (dot_intrin_int4, nibble_pack, schedule_unpack, unpack_mode, unpacked,
                       weight_int4)


# ----------------------------------------------------------------------------- hardware
@dataclass(frozen=True)
class DotIsa:
    """A u8 x s8 -> s32 dot-product instruction: ``lanes`` accumulators of
    ``k_per_lane`` products each, in a register file of ``vector_regs`` registers."""

    name: str
    instruction: str
    llvm_intrinsic: str
    cpu_flag: str  # /proc/cpuinfo flag that proves support
    lanes: int
    k_per_lane: int
    vector_bits: int
    vector_regs: int

    def __post_init__(self) -> None:
        if self.lanes * 32 != self.vector_bits or self.k_per_lane * 8 != 32:
            raise ValueError(f"{self.name}: lanes x 32 bit must fill one "
                             f"{self.vector_bits}-bit register")

    @property
    def block_bytes(self) -> int:
        """Bytes of packed weight one instruction reads (lanes x k_per_lane int8)."""
        return self.lanes * self.k_per_lane


AVX512_VNNI = DotIsa(name="avx512_vnni", instruction="vpdpbusd",
                     llvm_intrinsic="llvm.x86.avx512.vpdpbusd.512", cpu_flag="avx512_vnni",
                     lanes=16, k_per_lane=4, vector_bits=512, vector_regs=32)
ISA = AVX512_VNNI
LANES, KG = ISA.lanes, ISA.k_per_lane


# ----------------------------------------------------------------------------- intrinsic
def _dot_intrin(c_scope: str, llvm_name: str = AVX512_VNNI.llvm_intrinsic
                ) -> tuple[tirx.PrimFunc, tirx.PrimFunc]:
    """desc/impl of C[16] += A[4] . B[16, 4] with C in ``c_scope`` (tensorize
    matches buffer scopes, hence the parameter)."""

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4,), "uint8", offset_factor=1),
             B: T.Buffer((16, 4), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1, scope=c_scope)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "uint8", offset_factor=1),
             B: T.Buffer((16, 4), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1, scope=c_scope)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            C[T.ramp(T.int32(0), 1, 16)] = vpdpbusd(llvm_name, C, A, B.vload([0, 0], "int8x64"))

    return desc, impl


def vpdpbusd(llvm_name: str, C: tirx.Buffer, A: tirx.Buffer, b: tirx.PrimExpr) -> tirx.PrimExpr:
    """C[0:16] + A[0:4] . b (64 weight bytes) as one instruction; shared by the int8 and
    int4 dot intrinsics, which differ only in how they produce ``b``.

    LLVM 22's vpdpbusd.512 takes <64 x i8> operands (the built-in intrinsic passes
    i32x16): broadcast the 4 activation bytes as one i32, then view them as u8x64.
    """
    a = tirx.reinterpret("uint8x64",
                         tirx.Broadcast(tirx.reinterpret("int32", A.vload([0], "uint8x4")), 16))
    return tirx.call_llvm_pure_intrin("int32x16", llvm_name, C.vload([0], "int32x16"), a, b)


# Accumulators live in a "global"-scope buffer of < 1024 bytes: TVM puts exactly those
# on the stack (LowerTVMBuiltin); "local" scope or >= 1024 bytes becomes a
# TVMBackendAllocWorkspace call + memset + stores per tile (measured 12-16% slower on
# K = 64 layers). A stack alloca with constant indices is promoted to zmm registers.
ACC_SCOPE = "global"
MAX_STACK_BYTES = 1023
INTRIN = "qcompile_vnni_u8s8s32_16x4"
TensorIntrin.register(INTRIN, *_dot_intrin(ACC_SCOPE), override=True)
INTRIN_INT4 = "qcompile_vnni_u8s4s32_16x4"
TensorIntrin.register(
    INTRIN_INT4, *dot_intrin_int4(ACC_SCOPE, partial(vpdpbusd, AVX512_VNNI.llvm_intrinsic)),
    override=True)


# ----------------------------------------------------------------------------- packing
def _ceil(a: int, b: int) -> int:
    return -(-a // b) * b


def pack_weights(w: np.ndarray) -> np.ndarray:
    """(N, K) int8 -> (ceil(N/16), ceil(K/4), 16, 4) int8, zero-padded."""
    n, k = w.shape
    wp = np.zeros((_ceil(n, LANES), _ceil(k, KG)), np.int8)
    wp[:n, :k] = w
    return np.ascontiguousarray(
        wp.reshape(wp.shape[0] // LANES, LANES, wp.shape[1] // KG, KG).transpose(0, 2, 1, 3))


def conv_k_layout(w_oihw: np.ndarray) -> np.ndarray:
    """(OC, C, kh, kw) -> (OC, kh*kw*Cp): K ordered (kh, kw, c), C zero-padded to 4."""
    oc, c, kh, kw = w_oihw.shape
    w = np.zeros((oc, kh, kw, _ceil(c, KG)), np.int8)
    w[..., :c] = w_oihw.transpose(0, 2, 3, 1)
    return w.reshape(oc, -1)


def pack_conv_weights(w_oihw: np.ndarray) -> np.ndarray:
    """OIHW int8 -> packed (ceil(OC/16), kh*kw*ceil(C/4), 16, 4) for ``conv2d_nhwc_vnni``."""
    return pack_weights(conv_k_layout(w_oihw))


def pack_weights_int4(w: np.ndarray) -> np.ndarray:
    """(N, K) int8 in [-8, 7] -> (ceil(N/16), ceil(K/4), 8, 4) uint8, two nibbles a byte
    (layout in ``x86_int4``), for ``dense_vnni(..., w_bits=4)``."""
    return nibble_pack(pack_weights(w))


def pack_conv_weights_int4(w_oihw: np.ndarray) -> np.ndarray:
    """OIHW int8 in [-8, 7] -> (ceil(OC/16), kh*kw*ceil(C/4), 8, 4) uint8 nibbles,
    for ``conv2d_nhwc_vnni(..., w_bits=4)``."""
    return nibble_pack(pack_conv_weights(w_oihw))


@dataclass(frozen=True)
class _Weights:
    """The packed weight parameter of a GEMM, how the GEMM reads w[j, k], the intrinsic
    that consumes it and the unpack stage in between (int4 "prologue" only)."""

    tensor: te.Tensor
    value: Callable[[tirx.PrimExpr, tirx.PrimExpr], tirx.PrimExpr]
    intrin: str
    stage: te.Tensor | None = None


def _weights(np_: int, kp: int, w_bits: int, unpack: str) -> _Weights:
    blocks = (np_ // LANES, kp // KG)
    if w_bits == 8:
        w = te.placeholder((*blocks, LANES, KG), "int8", name="W")
        return _Weights(w, _block_reader(w), INTRIN)
    if w_bits != 4 or unpack not in ("tile", "prologue"):
        raise ValueError(f"w_bits must be 8 or 4, int4 unpack 'tile' or 'prologue'; got "
                         f"{w_bits}, {unpack!r}")
    w4 = te.placeholder((*blocks, LANES // 2, KG), "uint8", name="W")
    if unpack == "tile":
        return _Weights(w4, lambda j, k: weight_int4(w4, j, k), INTRIN_INT4)
    w8 = unpacked(w4)
    return _Weights(w4, _block_reader(w8), INTRIN, w8)


def _block_reader(w: te.Tensor) -> Callable[[tirx.PrimExpr, tirx.PrimExpr], tirx.PrimExpr]:
    """w[j, k] of (N/16, K/4, 16, 4) int8 blocks, as int32."""
    return lambda j, k: w[j // LANES, k // KG, j % LANES, k % KG].astype("int32")


def signed_input_bias(w: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Bias for feeding an int8 activation as x + 128: bias - 128 * sum_k w[n, k].

    ``w`` is (N, ...) with the reduction in the trailing axes (dense (N, K) or OIHW).
    """
    corr = w.reshape(w.shape[0], -1).astype(np.int64).sum(axis=1) * 128
    return (bias.astype(np.int64) - corr).astype(np.int32)


# ----------------------------------------------------------------------------- epilogue
@dataclass(frozen=True)
class Epilogue:
    """What happens to ``acc + bias``: raw int32, or requantize + clip to ``out_dtype``."""

    out_dtype: str
    raw: bool
    lo: int | None = None
    hi: int | None = None

    def __post_init__(self) -> None:
        if self.raw and self.out_dtype != "int32":
            raise ValueError("raw=True writes int32; pass out_dtype='int32'")
        if not self.raw and self.out_dtype not in ("int8", "uint8", "int32"):
            raise ValueError(f"out_dtype must be int8/uint8/int32, got {self.out_dtype!r}")

    @property
    def bounds(self) -> tuple[int, int]:
        info = np.iinfo(self.out_dtype)
        return (info.min if self.lo is None else self.lo, info.max if self.hi is None else self.hi)

    def params(self, shape: tuple[int, ...]) -> list[te.Tensor]:
        """The m, r, s placeholders (empty when raw)."""
        return [] if self.raw else [te.placeholder(shape, "int64", name=f"q_{x}") for x in "mrs"]

    def apply(self, acc: tirx.PrimExpr, bias: tirx.PrimExpr | None, q: Sequence[te.Tensor],
              *idx: tirx.PrimExpr) -> tirx.PrimExpr:
        """epilogue(acc + bias) with m, r, s = q[...][idx]."""
        if bias is not None:
            # The reference wraps acc + bias to int32. The simplifier rewrites
            # int64(a + b) as int64(a) + int64(b) (no overflow assumed), so add as uint32.
            acc = (acc.astype("uint32") + bias.astype("uint32")).astype("int32")
        if self.raw:
            return acc
        m, r, s = (t[idx] for t in q)
        # m < 2^31: a trip through int32 tells LLVM so, turning a 64x64 vpmullq into vpmuldq.
        v = (acc.astype("int64") * m.astype("int32").astype("int64") + r) >> s
        lo, hi = self.bounds
        v = te.max(te.min(v, tirx.const(hi, "int64")), tirx.const(lo, "int64"))
        return v.astype(self.out_dtype)


def _epilogue(out_dtype: str, raw: bool, lo: int | None, hi: int | None) -> Epilogue:
    return Epilogue("int32" if raw else out_dtype, raw, lo, hi)


def _to_u8(x: tirx.PrimExpr, in_dtype: str) -> tirx.PrimExpr:
    """The uint8 VNNI operand for an activation: x itself, or x + 128 for int8."""
    if in_dtype == "uint8":
        return x
    if in_dtype == "int8":
        return (x.astype("int32") + 128).astype("uint8")
    raise ValueError(f"in_dtype must be uint8 or int8, got {in_dtype!r}")


# ----------------------------------------------------------------------------- GEMM core
@dataclass(frozen=True)
class GemmTile:
    """Register tile: ``mr`` rows x ``nb`` 16-lane column blocks of int32 accumulators."""

    mr: int
    nb: int
    n_outer: bool = False  # loop N tiles outside M tiles (weights bigger than activations)


def gemm_tile(m: int, n_pad: int, k_pad: int, isa: DotIsa = ISA) -> GemmTile:
    """Pick the register tile: mr x nb accumulator registers within MAX_STACK_BYTES
    (7x2 or 5x3 or 12x1); mr minimises the padded rows of M (tail rows are recomputed).
    A 6x4 tile (1536 B) measured 5-16% slower than 7x2: it no longer fits on the stack."""
    blocks = n_pad // isa.lanes
    nb = next(b for b in (2, 3, 1) if blocks % b == 0)
    mr_max = min(MAX_STACK_BYTES // (nb * isa.vector_bits // 8), 12, max(m, 1))
    # Cost ~ tiles x (rows + fixed per-k-step overhead of the weight loads and loop).
    mr = min(range(mr_max, (mr_max - 1) // 2, -1), key=lambda r: -(-m // r) * (r + 1.5))
    return GemmTile(mr, nb, n_outer=n_pad * k_pad > m * k_pad)


def _schedule_gemm(sch: Schedule, tile: GemmTile, n_red: int, intrin: str = INTRIN,
                   lead: int = 0) -> None:
    """Tile, tensorize and parallelize block "acc" (loops *lead, i, j, *reduce, last
    reduce over packed k) and fuse block "out" into the register tile. ``lead`` outer
    spatial loops (the groups of a grouped conv) join the parallel loop.

    # Step 1. split i -> (io, ii), j -> (jo, jb, 16), last reduce -> (ko, 4)
    # Step 2. io/jo outermost and parallel, reduction next, register tile innermost
    # Step 3. acc lives in a small stack buffer (registers); out is computed per tile
    # Step 4. tensorize the 16x4 block with vpdpbusd, unroll the register tile
    """
    acc = sch.get_sblock("acc")
    loops = sch.get_loops(acc)
    groups, (i, j), red = loops[:lead], loops[lead:lead + 2], loops[lead + 2:]
    io, ii = sch.split(i, [None, tile.mr])
    jo, jb, ji = sch.split(j, [None, tile.nb, LANES])
    ko, ki = sch.split(red[-1], [None, KG])
    outer = [*groups, *([jo, io] if tile.n_outer else [io, jo])]
    sch.reorder(*outer, *red[:-1], ko, ii, jb, ji, ki)
    sch.set_scope(acc, 0, ACC_SCOPE)
    out = sch.get_sblock("out")
    sch.reverse_compute_at(out, outer[-1])
    tile_loop = sch.fuse(*outer)
    sch.parallel(tile_loop)
    init = sch.decompose_reduction(acc, red[0] if n_red > 1 else ko)
    sch.tensorize(ji, intrin)
    sch.unroll(ii)
    sch.unroll(jb)
    # Zero-init and the epilogue are 16-lane vector loops over the tile's columns.
    iinit = sch.get_loops(init)
    sch.vectorize(sch.fuse(*iinit[-2:]))
    sch.unroll(iinit[-3])
    rows, cols = _epilogue_loops(sch, out, tile_loop)
    # Constant tile indices everywhere let LLVM keep the whole tile in registers
    # (no memset + store/reload of the accumulators around a predicated epilogue).
    if cols is not None:
        oc, ov = sch.split(cols, [None, LANES])
        if _predicated(sch, out):
            # N not a multiple of 16: the block keeps `where col < N`. Vectorized, TVM
            # scalarizes it and LLVM 22 re-vectorizes it with masked stores, and its
            # single-lane masked truncating store of the last column (mask <1,0,0,0> on
            # v4i64 -> v4i8) is emitted as a full 8-byte `vmovq`: 7 bytes of sign fill
            # past the row, into the next row's first channels (past the buffer on the
            # last row). Inside a tile the next row overwrites them later; across
            # parallel tiles that is a race (wrong first channels of a tile's first
            # row whenever its thread stored it before the previous tile's last row).
            # Unrolled, each column is a plain guarded scalar store (constant guards
            # fold when the output has one N tile; LLVM's SLP may still vectorize
            # them, without masks). Faster too (1 thread, 1x1 conv 28x28x24 -> 40:
            # 11.3 -> 8.1 us; 56x56x16 -> 24: 25.5 -> 16.2 us).
            sch.unroll(ov)
        else:
            sch.vectorize(ov)
        sch.unroll(oc)
    # A one-row tile (batch-1 dense, a 1x1 map) has no row loop; the tile loop itself is
    # unrolled then, one thread for all N tiles (as before): a parallel loop measured up
    # to 300x slower there (dense 1x1000x512 int4: 4.7 us serial, 1.4 ms parallel on a
    # busy 2-vCPU VM: waking a thread costs more than the whole microsecond kernel).
    sch.unroll(rows if rows is not None else tile_loop)


def _predicated(sch: Schedule, block: SBlockRV) -> bool:
    """Whether ``block`` runs under a ``where`` (padded columns it must not write)."""
    realize = sch.get(sch.get_loops(block)[-1]).body
    assert isinstance(realize, SBlockRealize), type(realize)
    pred = realize.predicate
    return not (isinstance(pred, tirx.IntImm) and int(pred) == 1)


def _epilogue_loops(sch: Schedule, out: SBlockRV, tile_loop: LoopRV
                    ) -> tuple[LoopRV | None, LoopRV | None]:
    """The loops of block ``out`` inside ``tile_loop``, where reverse_compute_at put it:
    (the loop over its other tile axis, the loop over its last axis, the output column
    or channel), each None where there is none.

    reverse_compute_at makes no loop of extent 1: a GEMM tile of one row (M = 1 or
    mr = 1) has no row loop, one of one column (N = 1, or og = 1 per group) no column
    loop. So the loops are told apart by the block's bindings, never by position:
    ``loops[-2]`` may be the parallel tile loop itself, ``loops[-1]`` too.
    """
    loops = sch.get_loops(out)
    tile = sch.get(tile_loop)
    depth = next(i for i, lp in enumerate(loops) if sch.get(lp).same_as(tile))
    own = loops[depth + 1:]
    if not own:
        return None, None
    realize = sch.get(own[-1]).body
    assert isinstance(realize, SBlockRealize), type(realize)
    col_vars = tirx.analysis.undefined_vars(realize.iter_values[-1])
    is_col = [any(v.same_as(sch.get(lp).loop_var) for v in col_vars) for lp in own]
    cols = [lp for lp, c in zip(own, is_col) if c]
    rows = [lp for lp, c in zip(own, is_col) if not c]
    assert len(cols) <= 1 and len(rows) <= 1, (len(cols), len(rows))
    return (rows[0] if rows else None), (cols[0] if cols else None)


def _schedule_stage(sch: Schedule, name: str) -> None:
    """A copy/pad stage: outer loops parallel, innermost vectorized."""
    blk = sch.get_sblock(name)
    loops = sch.get_loops(blk)
    sch.parallel(sch.fuse(*loops[:2]) if len(loops) > 2 else loops[0])
    # One zmm of bytes per vector op: wider vectors (K = 2304 in an im2col row) choke LLVM.
    last = sch.get_loops(blk)[-1]
    extent = int(sch.get(last).extent)
    _, inner = sch.split(last, [None, math.gcd(extent, 64)])
    sch.vectorize(inner)


def dense_vnni(M: int, N: int, K: int, *, out_dtype: str = "int8", raw: bool = False,
               in_dtype: str = "uint8", lo: int | None = None, hi: int | None = None,
               tile: GemmTile | None = None, w_bits: int = 8,
               int4_unpack: str | None = None) -> tirx.PrimFunc:
    """out[m, n] = epilogue(sum_k A[m, k] * w[n, k] + bias[n]).

    Parameters (in order): A (M, K) ``in_dtype``; W = pack_weights(w) int8, or with
    ``w_bits=4`` pack_weights_int4(w) uint8 (two nibbles a byte, unpacked in-kernel per
    ``int4_unpack``: "tile" or "prologue", default by M tile count, ``x86_int4.unpack_mode``);
    bias (N,) int32 (use ``signed_input_bias`` for int8 A); m, r, s (N,) int64
    unless ``raw``; out (M, N) ``out_dtype`` (int32 when raw).
    K that is not a multiple of 4, or int8 A, adds a (M, Kp) uint8 copy stage.
    """
    ep = _epilogue(out_dtype, raw, lo, hi)
    np_, kp = _ceil(N, LANES), _ceil(K, KG)
    tile = tile or gemm_tile(M, np_, kp)
    mp = _ceil(M, tile.mr)
    a = te.placeholder((M, K), in_dtype, name="A")
    w = _weights(np_, kp, w_bits, int4_unpack or unpack_mode(mp // tile.mr))
    bias = te.placeholder((N,), "int32", name="bias")
    q = ep.params((N,))
    if kp != K or in_dtype != "uint8":
        au = te.compute((M, kp), lambda i, k: tirx.if_then_else(
            k < K, _to_u8(a[i, tirx.min(k, K - 1)], in_dtype), tirx.const(0, "uint8")), name="a_u8")
    else:
        au = a
    k = te.reduce_axis((0, kp), "k")
    # Rows past M re-read row M-1 (clamped): the tile always has mr rows and never
    # reads out of bounds; the epilogue writes only the first M rows.
    acc = te.compute((mp, np_), lambda i, j: te.sum(
        au[tirx.min(i, M - 1), k].astype("int32") * w.value(j, k), axis=k), name="acc")
    out = te.compute((M, N), lambda i, j: ep.apply(acc[i, j], bias[j], q, j), name="out")
    sch = Schedule(te.create_prim_func([a, w.tensor, bias, *q, out]))
    _schedule_gemm(sch, tile, 1, w.intrin)
    if au is not a:
        _schedule_stage(sch, "a_u8")
    if w.stage is not None:
        schedule_unpack(sch)
    return sch.mod["main"].with_attr("global_symbol", "main")


# ----------------------------------------------------------------------------- conv2d
def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_out_hw(H: int, W: int, kh: int, kw: int, strides: Sequence[int],
                pads: Sequence[int], dilations: Sequence[int]) -> tuple[int, int]:
    """Output (OH, OW); ``pads`` is (top, left, bottom, right) as in ONNX."""
    (sh, sw), (dh, dw) = _pair(strides), _pair(dilations)
    pt, pl, pb, pr = pads
    return ((H + pt + pb - (kh - 1) * dh - 1) // sh + 1,
            (W + pl + pr - (kw - 1) * dw - 1) // sw + 1)


def _pad_nhwc(x: te.Tensor, pads: Sequence[int], c_to: int, fill: tirx.PrimExpr,
              value: Callable[[tirx.PrimExpr], tirx.PrimExpr], name: str) -> te.Tensor:
    """Spatially padded (and channel-padded to ``c_to``) copy of NHWC ``x``."""
    n, h, w, c = (int(d) for d in x.shape)
    pt, pl, pb, pr = pads

    def f(b: tirx.Var, i: tirx.Var, j: tirx.Var, k: tirx.Var) -> tirx.PrimExpr:
        inside = tirx.all(i >= pt, i < pt + h, j >= pl, j < pl + w, k < c)
        # Clamped indices keep the (speculated) load in bounds.
        v = x[b, tirx.max(tirx.min(i - pt, h - 1), 0), tirx.max(tirx.min(j - pl, w - 1), 0),
              tirx.min(k, c - 1)]
        return tirx.if_then_else(inside, value(v), fill)

    return te.compute((n, h + pt + pb, w + pl + pr, c_to), f, name=name)


def conv2d_nhwc_vnni(N: int, H: int, W: int, C: int, OC: int, kh: int, kw: int,
                     strides: Sequence[int] = (1, 1), pads: Sequence[int] = (0, 0, 0, 0),
                     dilations: Sequence[int] = (1, 1), *, out_dtype: str = "int8",
                     raw: bool = False, in_dtype: str = "uint8", lo: int | None = None,
                     hi: int | None = None, im2col: bool = False,
                     tile: GemmTile | None = None, w_bits: int = 8,
                     int4_unpack: str | None = None) -> tirx.PrimFunc:
    """NHWC conv2d (group 1) as an implicit GEMM with M = N*OH*OW, K = kh*kw*Cp.

    Parameters (in order): x (N, H, W, C) ``in_dtype``; W = pack_conv_weights(w_oihw),
    or with ``w_bits=4`` pack_conv_weights_int4(w_oihw) (nibbles, unpacked in-kernel as
    in ``dense_vnni``);
    bias (OC,) int32 (``signed_input_bias(w_oihw, b)`` for int8 x); m, r, s (OC,) int64
    unless ``raw``; out (N, OH, OW, OC). ``pads`` = (top, left, bottom, right).

    A pad stage (x + 128 for int8, zeros or 128 around, C padded to 4) is added only
    when needed: a 1x1 conv on uint8 with C % 4 == 0 reads x directly.
    ``im2col=True`` materializes the (M, K) patch matrix first (kept for measurement).
    """
    ep = _epilogue(out_dtype, raw, lo, hi)
    (sh, sw), (dh, dw) = _pair(strides), _pair(dilations)
    OH, OW = conv_out_hw(H, W, kh, kw, strides, pads, dilations)
    cp, ocp = _ceil(C, KG), _ceil(OC, LANES)
    M, kp = N * OH * OW, kh * kw * cp
    tile = tile or gemm_tile(M, ocp, kp)
    x = te.placeholder((N, H, W, C), in_dtype, name="x")
    w = _weights(ocp, kp, w_bits, int4_unpack or unpack_mode(-(-M // tile.mr)))
    bias = te.placeholder((OC,), "int32", name="bias")
    q = ep.params((OC,))
    if any(pads) or cp != C or in_dtype != "uint8":
        # Zero in int8 is 128 after the +128 shift, so signed inputs pad with 128.
        fill = tirx.const(128 if in_dtype == "int8" else 0, "uint8")
        xp = _pad_nhwc(x, pads, cp, fill, lambda v: _to_u8(v, in_dtype), "x_pad")
    else:
        xp = x

    def pixel(i: tirx.PrimExpr) -> tuple[tirx.PrimExpr, tirx.PrimExpr, tirx.PrimExpr]:
        i = tirx.min(i, M - 1)  # tail rows of the last tile recompute row M-1
        return i // (OH * OW), i % (OH * OW) // OW, i % OW

    mp = _ceil(M, tile.mr)
    if im2col:
        def col_f(i: tirx.Var, kk: tirx.Var) -> tirx.PrimExpr:
            b, oh, ow = pixel(i)
            r, s, c = kk // (kw * cp), kk % (kw * cp) // cp, kk % cp
            return xp[b, oh * sh + r * dh, ow * sw + s * dw, c]
        col = te.compute((M, kp), col_f, name="col")
        k = te.reduce_axis((0, kp), "k")
        acc = te.compute((mp, ocp), lambda i, j: te.sum(
            col[tirx.min(i, M - 1), k].astype("int32") * w.value(j, k), axis=k), name="acc")
        n_red = 1
    else:
        r = te.reduce_axis((0, kh), "r")
        s = te.reduce_axis((0, kw), "s")
        c = te.reduce_axis((0, cp), "c")

        def acc_f(i: tirx.Var, j: tirx.Var) -> tirx.PrimExpr:
            b, oh, ow = pixel(i)
            a = xp[b, oh * sh + r * dh, ow * sw + s * dw, c].astype("int32")
            return te.sum(a * w.value(j, (r * kw + s) * cp + c), axis=[r, s, c])
        acc = te.compute((mp, ocp), acc_f, name="acc")
        n_red = 3
    out = te.compute((M, OC), lambda i, o: ep.apply(acc[i, o], bias[o], q, o), name="out")
    sch = Schedule(te.create_prim_func([x, w.tensor, bias, *q, out]))
    # The epilogue iterates the flat (M, OC) GEMM space, so it fuses into the register
    # tile; only the output buffer's shape is NHWC (same bytes).
    sch.transform_layout("out", ("write", 0),
                         lambda i, o: [i // (OH * OW), i % (OH * OW) // OW, i % OW, o])
    _schedule_gemm(sch, tile, n_red, w.intrin)
    if xp is not x:
        _schedule_stage(sch, "x_pad")
    if w.stage is not None:
        schedule_unpack(sch)
    if im2col:
        _schedule_stage(sch, "col")
    return sch.mod["main"].with_attr("global_symbol", "main")


def pack_conv_weights_grouped(w_oihw: np.ndarray, group: int) -> np.ndarray:
    """Grouped OIHW int8 (OC, C/group, kh, kw) -> the groups' ``pack_conv_weights``
    stacked on the block axis: (group * ceil(OC/group/16), kh*kw*C/group/4, 16, 4)."""
    og = w_oihw.shape[0] // group
    return np.concatenate([pack_conv_weights(w_oihw[g * og:(g + 1) * og]) for g in range(group)])


def conv2d_nhwc_vnni_grouped(N: int, H: int, W: int, C: int, OC: int, kh: int, kw: int,
                             group: int, strides: Sequence[int] = (1, 1),
                             pads: Sequence[int] = (0, 0, 0, 0),
                             dilations: Sequence[int] = (1, 1), *, out_dtype: str = "int8",
                             raw: bool = False, in_dtype: str = "uint8", lo: int | None = None,
                             hi: int | None = None, tile: GemmTile | None = None
                             ) -> tirx.PrimFunc:
    """Grouped NHWC conv2d (ResNeXt, RegNet): one implicit GEMM per group, the group
    an outer parallel loop, M = N*OH*OW, K = kh*kw*C/group, N = OC/group padded to 16.

    Parameters as ``conv2d_nhwc_vnni`` with W = pack_conv_weights_grouped(w_oihw, group).
    Needs C/group % 4 == 0 (a group's channels fill whole vpdpbusd quads); groups
    narrower than 16 output channels compute padded lanes that are never stored.
    """
    ep = _epilogue(out_dtype, raw, lo, hi)
    G, ipg, og = group, C // group, OC // group
    if C % G or OC % G or ipg % KG:
        raise ValueError(f"grouped conv needs C/group % {KG} == 0, got C={C}, group={G}")
    (sh, sw), (dh, dw) = _pair(strides), _pair(dilations)
    OH, OW = conv_out_hw(H, W, kh, kw, strides, pads, dilations)
    ogp, M, kp = _ceil(og, LANES), N * OH * OW, kh * kw * ipg
    tile = tile or gemm_tile(M, ogp, kp)
    x = te.placeholder((N, H, W, C), in_dtype, name="x")
    w = _weights(G * ogp, kp, 8, "tile")
    bias = te.placeholder((OC,), "int32", name="bias")
    q = ep.params((OC,))
    if any(pads) or in_dtype != "uint8":
        fill = tirx.const(128 if in_dtype == "int8" else 0, "uint8")
        xp = _pad_nhwc(x, pads, C, fill, lambda v: _to_u8(v, in_dtype), "x_pad")
    else:
        xp = x
    r = te.reduce_axis((0, kh), "r")
    s = te.reduce_axis((0, kw), "s")
    c = te.reduce_axis((0, ipg), "c")

    def acc_f(g: tirx.Var, i: tirx.Var, j: tirx.Var) -> tirx.PrimExpr:
        i = tirx.min(i, M - 1)  # tail rows of the last tile recompute row M-1
        b, oh, ow = i // (OH * OW), i % (OH * OW) // OW, i % OW
        a = xp[b, oh * sh + r * dh, ow * sw + s * dw, g * ipg + c].astype("int32")
        return te.sum(a * w.value(g * ogp + j, (r * kw + s) * ipg + c), axis=[r, s, c])

    acc = te.compute((G, _ceil(M, tile.mr), ogp), acc_f, name="acc")
    out = te.compute((G, M, og), lambda g, i, o: ep.apply(
        acc[g, i, o], bias[g * og + o], q, g * og + o), name="out")
    sch = Schedule(te.create_prim_func([x, w.tensor, bias, *q, out]))
    sch.transform_layout("out", ("write", 0), lambda g, i, o: [
        i // (OH * OW), i % (OH * OW) // OW, i % OW, g * og + o])
    _schedule_gemm(sch, tile, 3, w.intrin, lead=1)
    if xp is not x:
        _schedule_stage(sch, "x_pad")
    return sch.mod["main"].with_attr("global_symbol", "main")
