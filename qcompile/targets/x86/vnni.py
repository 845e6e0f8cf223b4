"""AVX-512 VNNI kernels for qcompile's integer ops, as scheduled TIR PrimFuncs: the
computes (dense, implicit-GEMM conv, grouped conv) and their weight packing.

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

Epilogue (``x86_epilogue``): requantize per output channel (``requant`` "int64" with
qgraph's m, r, s, or the faster exact "mulhi" with ``requant_arrays``' int32 ones), or
``raw`` int32 ``acc + bias``; then the fused ops in ``post`` (residual add, clip, LUT),
whose tensors follow m, r, s in the parameter list.

Signed inputs: VNNI multiplies u8 x s8, so an int8 activation x is fed as
x + 128 (a sign-bit flip, fused into the kernel's pad/copy stage) and the caller
folds ``-128 * sum_k w[n, k]`` into the bias once, with ``signed_input_bias``.

Design (measured with benchmarks/kernels_x86.py, 1 thread, medians)
    GEMM/conv: M = output pixels (N*OH*OW flattened: the batch folds into M),
    N = output channels; the register tile and its schedule are ``x86_gemm``'s.
    No M padding of inputs: tail rows of the last tile re-read row M-1 (clamped
    index) and are not written.
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

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from qcompile.tvm_compat import te, tirx
from qcompile.tvm_compat import Schedule

from qcompile.targets.x86.epilogue import Post, epilogue
from qcompile.targets.x86.gemm import (  # noqa: F401
    ACC_SCOPE, AVX512_VNNI, INTRIN, INTRIN_INT4, ISA, KG, LANES, MAX_STACK_BYTES, DotIsa, GemmTile,
    epilogue_loops, gemm_tile, schedule_gemm, schedule_stage)
from qcompile.targets.x86.int4 import (
    nibble_pack, schedule_unpack, unpack_mode, unpacked, weight_int4)


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



def _to_u8(x: tirx.PrimExpr, in_dtype: str) -> tirx.PrimExpr:
    """The uint8 VNNI operand for an activation: x itself, or x + 128 for int8."""
    if in_dtype == "uint8":
        return x
    if in_dtype == "int8":
        return (x.astype("int32") + 128).astype("uint8")
    raise ValueError(f"in_dtype must be uint8 or int8, got {in_dtype!r}")

def dense_vnni(M: int, N: int, K: int, *, out_dtype: str = "int8", raw: bool = False,
               in_dtype: str = "uint8", lo: int | None = None, hi: int | None = None,
               tile: GemmTile | None = None, w_bits: int = 8,
               int4_unpack: str | None = None, requant: str = "int64",
               post: Sequence[Post] = ()) -> tirx.PrimFunc:
    """out[m, n] = epilogue(sum_k A[m, k] * w[n, k] + bias[n]).

    Parameters (in order): A (M, K) ``in_dtype``; W = pack_weights(w) int8, or with
    ``w_bits=4`` pack_weights_int4(w) uint8 (two nibbles a byte, unpacked in-kernel per
    ``int4_unpack``: "tile" or "prologue", default by M tile count, ``x86_int4.unpack_mode``);
    bias (N,) int32 (use ``signed_input_bias`` for int8 A); m, r, s (N,) per ``requant``
    unless ``raw``; the fused ops' tensors (``post``, ``x86_epilogue``); out (M, N)
    (int32 when raw).
    K that is not a multiple of 4, or int8 A, adds a (M, Kp) uint8 copy stage.
    """
    ep = epilogue(out_dtype, raw, lo, hi, requant, post)
    np_, kp = _ceil(N, LANES), _ceil(K, KG)
    tile = tile or gemm_tile(M, np_, kp)
    mp = _ceil(M, tile.mr)
    a = te.placeholder((M, K), in_dtype, name="A")
    w = _weights(np_, kp, w_bits, int4_unpack or unpack_mode(mp // tile.mr))
    bias = te.placeholder((N,), "int32", name="bias")
    q = ep.placeholders((N,), (M, N))
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
    out = te.compute((M, N), lambda i, j: ep.apply(acc[i, j], bias[j], q, (j,), (i, j), j),
                     name="out")
    sch = Schedule(te.create_prim_func([a, w.tensor, bias, *q.all, out]))
    schedule_gemm(sch, tile, 1, w.intrin)
    if au is not a:
        schedule_stage(sch, "a_u8")
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
                     int4_unpack: str | None = None, requant: str = "int64",
                     post: Sequence[Post] = ()) -> tirx.PrimFunc:
    """NHWC conv2d (group 1) as an implicit GEMM with M = N*OH*OW, K = kh*kw*Cp.

    Parameters (in order): x (N, H, W, C) ``in_dtype``; W = pack_conv_weights(w_oihw),
    or with ``w_bits=4`` pack_conv_weights_int4(w_oihw) (nibbles, unpacked in-kernel as
    in ``dense_vnni``);
    bias (OC,) int32 (``signed_input_bias(w_oihw, b)`` for int8 x); m, r, s (OC,) per
    ``requant`` unless ``raw``; the fused ops' tensors (``post``: residual inputs are
    (N, OH, OW, OC)); out (N, OH, OW, OC). ``pads`` = (top, left, bottom, right).

    A pad stage (x + 128 for int8, zeros or 128 around, C padded to 4) is added only
    when needed: a 1x1 conv on uint8 with C % 4 == 0 reads x directly.
    ``im2col=True`` materializes the (M, K) patch matrix first (kept for measurement).
    """
    ep = epilogue(out_dtype, raw, lo, hi, requant, post)
    (sh, sw), (dh, dw) = _pair(strides), _pair(dilations)
    OH, OW = conv_out_hw(H, W, kh, kw, strides, pads, dilations)
    cp, ocp = _ceil(C, KG), _ceil(OC, LANES)
    M, kp = N * OH * OW, kh * kw * cp
    tile = tile or gemm_tile(M, ocp, kp)
    x = te.placeholder((N, H, W, C), in_dtype, name="x")
    w = _weights(ocp, kp, w_bits, int4_unpack or unpack_mode(-(-M // tile.mr)))
    bias = te.placeholder((OC,), "int32", name="bias")
    q = ep.placeholders((OC,), (N, OH, OW, OC))
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
    out = te.compute((M, OC), lambda i, o: ep.apply(
        acc[i, o], bias[o], q, (o,), (i // (OH * OW), i % (OH * OW) // OW, i % OW, o), o),
        name="out")
    sch = Schedule(te.create_prim_func([x, w.tensor, bias, *q.all, out]))
    # The epilogue iterates the flat (M, OC) GEMM space, so it fuses into the register
    # tile; only the output buffer's shape is NHWC (same bytes).
    sch.transform_layout("out", ("write", 0),
                         lambda i, o: [i // (OH * OW), i % (OH * OW) // OW, i % OW, o])
    schedule_gemm(sch, tile, n_red, w.intrin)
    if xp is not x:
        schedule_stage(sch, "x_pad")
    if w.stage is not None:
        schedule_unpack(sch)
    if im2col:
        schedule_stage(sch, "col")
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
                             hi: int | None = None, tile: GemmTile | None = None,
                             requant: str = "int64", post: Sequence[Post] = ()
                             ) -> tirx.PrimFunc:
    """Grouped NHWC conv2d (ResNeXt, RegNet): one implicit GEMM per group, the group
    an outer parallel loop, M = N*OH*OW, K = kh*kw*C/group, N = OC/group padded to 16.

    Parameters as ``conv2d_nhwc_vnni`` with W = pack_conv_weights_grouped(w_oihw, group).
    Needs C/group % 4 == 0 (a group's channels fill whole vpdpbusd quads); groups
    narrower than 16 output channels compute padded lanes that are never stored.
    """
    ep = epilogue(out_dtype, raw, lo, hi, requant, post)
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
    q = ep.placeholders((OC,), (N, OH, OW, OC))
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
        acc[g, i, o], bias[g * og + o], q, (g * og + o,),
        (i // (OH * OW), i % (OH * OW) // OW, i % OW, g * og + o), g * og + o), name="out")
    sch = Schedule(te.create_prim_func([x, w.tensor, bias, *q.all, out]))
    sch.transform_layout("out", ("write", 0), lambda g, i, o: [
        i // (OH * OW), i % (OH * OW) // OW, i % OW, g * og + o])
    schedule_gemm(sch, tile, 3, w.intrin, lead=1)
    if xp is not x:
        schedule_stage(sch, "x_pad")
    return sch.mod["main"].with_attr("global_symbol", "main")
