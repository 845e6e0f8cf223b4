"""AMX-INT8 kernels (Sapphire Rapids and later): conv2d and dense on the tile unit, with
the VNNI kernels' weights, parameters and epilogue, so a rule can swap one for the other.

One ``tdpbusd`` multiplies a 16 x 64 u8 tile by a 64 x 16 s8 tile into 16 x 16 int32:
16384 multiply-adds where ``vpdpbusd`` does 64. The B tile is 16 rows of (16 channels x 4
k) bytes: exactly ``pack_conv_weights``' (N/16, K/4, 16, 4) blocks, read with a 64-byte
stride. The int32 sums are exact and wrap like ``vpdpbusd``'s, so a layer is bit-exact
whichever unit ran it.

A task is 16 output rows x up to 64 output channels (four C tiles, one A tile, three B
tiles in turn: all eight tile registers). Rows are 16 consecutive output pixels of one
output row (any kernel size, stride and dilation: the A tile's row stride is stride x
channels bytes); for a 1x1 stride-1 unpadded conv and dense, 16 rows of the flattened
(M, K) matrix; for maps narrower than MIN_ROW, 16 rows of an im2col matrix; for an image
stem (``merged_taps``), output pixels whose A rows are whole kernel rows. Fewer than 16
valid rows (the end of an output row, the end of M) load a tile config with fewer rows;
nothing past them is read or written.
After the reduction the C tiles are stored to a 4 KiB scratch per thread and the
epilogue (``x86_epilogue``: requantize, fused add/clip/LUT) runs over it in zmm vectors.

The OS hands out AMX state on request only (Linux ``arch_prctl(ARCH_REQ_XCOMP_PERM)``,
once per process): ``request_amx()`` asks, and a process that did not ask dies of SIGILL
on its first tile instruction. The loader asks before it runs an artifact that needs it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from qcompile.runtime.loader import request_amx  # noqa: F401  (the kernels' users ask through here)
from qcompile.tvm_compat import IB as I
from qcompile.tvm_compat import IRBuilder, tirx
from qcompile.targets.x86.epilogue import Epilogue, EpilogueArgs, Post, epilogue
from qcompile.targets.x86.vnni import KG, LANES, _ceil, _pair, conv_out_hw

TILE_ROWS = 16                  # rows of an A / C tile
TILE_BYTES = 64                 # bytes per tile row
C_TILES = 4                     # C tiles per task: 64 output channels
# The scratch is flat: TVM compacts a multi-dimensional buffer to the region it sees read,
# which would change the row stride the tile store was given.
ACC_ROW = C_TILES * LANES  # int32 accumulators per scratch row
A_TILE, B_TILES = 4, (5, 6, 7)  # tile registers: C in 0..3, then A, then B in turn
CPU_FLAGS = ("amx_tile", "amx_int8")
CONV_NAME, DENSE_NAME = "conv2d_nhwc_amx", "dense_amx"  # the rules' kernel names
KERNEL_PREFIXES = (CONV_NAME, DENSE_NAME)  # how a manifest's kernel_funcs name them
PARALLEL_CHUNKS = 64  # scratch allocations per call; TVM splits them statically over threads
MIN_ROW = 14  # output rows narrower than this run through an im2col matrix
WEIGHTS_IN_CACHE = 1 << 20  # weight bytes a core's L2 (2 MiB on these Xeons) keeps at hand
MERGED_MIN_BYTES = 28  # a kernel row of a few-channel conv as one tile row (merged_taps)


def _intrin(name: str, *args: tirx.PrimExpr) -> None:
    I.evaluate(tirx.call_llvm_intrin("void", f"llvm.x86.{name}", *args))


def _i8(v: int) -> tirx.PrimExpr:
    return tirx.const(v, "int8")


def _tile_config(cfg: tirx.Buffer, rows: int, k_bytes: int) -> None:
    """Palette 1: C tiles (rows x 64 B), the A tile (rows x k_bytes), B tiles
    (k_bytes/4 rows x 64 B). Bytes 16+2t: tile t's row bytes; byte 48+t: its rows.
    Constants only: the integer-only check allows no div/mod in stored data, and a
    task's row count comes from its index by one (so the caller picks with an ``If``)."""
    for i in range(64):
        I.buffer_store(cfg, tirx.const(0, "uint8"), [i])
    I.buffer_store(cfg, tirx.const(1, "uint8"), [0])
    for t in range(8):
        colsb = k_bytes if t == A_TILE else TILE_BYTES
        trows = rows if t <= A_TILE else k_bytes // KG
        I.buffer_store(cfg, tirx.const(colsb, "uint8"), [16 + 2 * t])
        I.buffer_store(cfg, tirx.const(trows, "uint8"), [48 + t])


@dataclass(frozen=True)
class _Rows:
    """Where a task's 16 rows live: ``count`` tasks along M, of which those where
    ``is_tail(t)`` have ``tail`` valid rows (16 when no task is short); ``a_index(t, r, s,
    c)`` the A tile's first element for kernel tap (r, s), channel c; ``a_stride`` bytes
    between its rows; ``out_index(t, i, n)`` row i's output element."""

    count: int
    tail: int
    is_tail: Callable[[tirx.PrimExpr], tirx.PrimExpr]
    a_index: Callable[..., list]
    a_stride: int
    out_index: Callable[..., tuple]

    def valid(self, t: tirx.PrimExpr) -> tirx.PrimExpr:
        return tirx.if_then_else(self.is_tail(t), self.tail, TILE_ROWS)


def _gemm(build_rows: Callable[[tirx.Buffer], _Rows], a_shape: tuple[int, ...],
          in_dtype: str, out_shape: tuple[int, ...], n_out: int, kh: int, kw: int,
          cp: int, ep: Epilogue, stage: Callable[[tirx.Buffer], tirx.Buffer] | None = None
          ) -> tirx.PrimFunc:
    """The kernel body shared by conv and dense: its parameters (``x86_vnni``'s order),
    ``stage`` (a padded copy or im2col matrix of x, if any), then ``_tasks``. The
    reduction runs over kh x kw taps of ``cp`` bytes each."""
    blocks = _ceil(n_out, LANES) // LANES
    k_bytes = min(cp, TILE_BYTES)
    if cp % k_bytes:
        raise ValueError(f"AMX kernels need channels % 64 == 0 or < 64, got {cp}")
    with IRBuilder() as ib:
        with I.prim_func():
            I.func_name("main")
            I.func_attr({"global_symbol": "main", "tir.noalias": True})
            x = I.arg("x", I.Buffer(a_shape, in_dtype))
            w = I.arg("W", I.Buffer((blocks, kh * kw * cp // KG, LANES, KG), "int8"))
            bias = I.arg("bias", I.Buffer((n_out,), "int32"))
            q, extra = ([I.arg(nm, I.Buffer(shape, dt)) for nm, shape, dt in group]
                        for group in ep.params((n_out,), out_shape))
            out = I.arg("out", I.Buffer(out_shape, ep.final_dtype))
            src = x if stage is None else stage(x)
            _tasks(build_rows(src), src, w, bias, out, ep, EpilogueArgs(q, extra), blocks,
                   (kh, kw, cp, k_bytes), n_out)
    return ib.get()


def _tasks(rows: _Rows, src: tirx.Buffer, w: tirx.Buffer, bias: tirx.Buffer, out: tirx.Buffer,
           ep: Epilogue, args: EpilogueArgs, blocks: int, taps: tuple[int, int, int, int],
           n_out: int) -> None:
    """The parallel loop: chunks of tasks (one scratch allocation per chunk), each task
    a tile-unit reduction and its epilogue."""
    kh, kw, cp, k_bytes = taps
    n_blocks = -(-blocks // C_TILES)
    n_tasks = rows.count * n_blocks
    # Channel blocks outermost when the weights outweigh the activations and the cache: a
    # thread's consecutive tasks then share one weight panel, read once. Measured (b8):
    # 3x3 512 -> 512 at 7x7, 2.4 MB of weights: 0.96 -> 0.55 ms; 3x3 256 -> 256 at 14x14
    # b1, 0.6 MB: 0.050 -> 0.067 ms (there every thread reading all weights from L2 wins).
    n_outer = (blocks * LANES > rows.count * TILE_ROWS
               and blocks * LANES * kh * kw * cp > WEIGHTS_IN_CACHE)
    chunk = -(-n_tasks // min(n_tasks, PARALLEL_CHUNKS))
    with I.parallel(0, -(-n_tasks // chunk)) as p:
        cfg = I.decl_buffer((64,), "uint8", align=64)  # one of each per chunk
        acc = I.decl_buffer((TILE_ROWS * ACC_ROW,), "int32", align=64)
        with I.serial(p * chunk, tirx.min((p + 1) * chunk, n_tasks)) as task:
            if n_outer:
                mt, nt = task % rows.count, task // rows.count
            else:
                mt, nt = task // n_blocks, task % n_blocks
            valid = rows.valid(mt)
            with I.If(rows.is_tail(mt)):
                with I.Then():
                    _tile_config(cfg, rows.tail, k_bytes)
                with I.Else():
                    _tile_config(cfg, TILE_ROWS, k_bytes)
            _intrin("ldtilecfg", tirx.address_of(cfg[0]))
            live = [nt * C_TILES + j < blocks for j in range(C_TILES)]
            for j in range(C_TILES):
                with I.If(live[j]):
                    with I.Then():
                        _intrin("tilezero", _i8(j))
            with I.serial(0, kh) as r:
                with I.serial(0, kw) as s:
                    with I.serial(0, cp // k_bytes) as cc:
                        _intrin("tileloadd64", _i8(A_TILE),
                                tirx.address_of(src[rows.a_index(mt, r, s, cc * k_bytes)]),
                                tirx.const(rows.a_stride, "int64"))
                        kb = ((r * kw + s) * cp + cc * k_bytes) // KG
                        for j in range(C_TILES):
                            bt = B_TILES[j % len(B_TILES)]
                            with I.If(live[j]):
                                with I.Then():
                                    _intrin("tileloadd64", _i8(bt), tirx.address_of(
                                        w[nt * C_TILES + j, kb, 0, 0]),
                                        tirx.const(TILE_BYTES, "int64"))
                                    _intrin("tdpbusd", _i8(j), _i8(A_TILE), _i8(bt))
            for j in range(C_TILES):
                with I.If(live[j]):
                    with I.Then():
                        _intrin("tilestored64", _i8(j), tirx.address_of(acc[j * LANES]),
                                tirx.const(ACC_ROW * 4, "int64"))
            with I.serial(0, valid) as i:
                with I.serial(0, C_TILES) as j:
                    with I.If(nt * C_TILES + j < blocks):
                        with I.Then():
                            with I.vectorized(0, LANES) as v:
                                n = (nt * C_TILES + j) * LANES + v
                                _store(out, ep, acc[i * ACC_ROW + j * LANES + v], bias, args,
                                       rows.out_index(mt, i, n), n, n_out)
        _intrin("tilerelease")


def _store(out: tirx.Buffer, ep: Epilogue, a: tirx.PrimExpr, bias: tirx.Buffer,
           args: EpilogueArgs, idx: tuple, n: tirx.PrimExpr, n_out: int) -> None:
    nc = tirx.min(n, n_out - 1)
    val = ep.apply(a, bias[nc], args, (nc,), idx, nc)
    if n_out % LANES:
        with I.If(n < n_out):
            with I.Then():
                I.buffer_store(out, val, list(idx))
    else:
        I.buffer_store(out, val, list(idx))


def _flat(M: int, a_index: Callable[..., list], a_stride: int,
          out_index: Callable[..., tuple]) -> _Rows:
    """Rows of a flattened (M, K) matrix: 16 a task, the last one M % 16 when not 0."""
    count = -(-M // TILE_ROWS)
    return _Rows(count, M - (count - 1) * TILE_ROWS, lambda t: t == count - 1, a_index,
                 a_stride, out_index)


def _u8(v: tirx.PrimExpr, in_dtype: str) -> tirx.PrimExpr:
    return (v.astype("int32") + 128).astype("uint8") if in_dtype == "int8" else v


def _pixel(x: tirx.Buffer, b: tirx.PrimExpr, i: tirx.PrimExpr, j: tirx.PrimExpr,
           ch: tirx.PrimExpr, in_dtype: str) -> tirx.PrimExpr:
    """x[b, i, j, ch] as the tile unit's uint8, and the fill (0, or 128 for int8 input)
    outside the image and past its channels. Clamped indices keep the load in bounds."""
    n, h, w, c = (int(d) for d in x.shape)
    inside = tirx.all(i >= 0, i < h, j >= 0, j < w, ch < c)
    v = x[b, tirx.max(tirx.min(i, h - 1), 0), tirx.max(tirx.min(j, w - 1), 0), tirx.min(ch, c - 1)]
    fill = tirx.const(128 if in_dtype == "int8" else 0, "uint8")
    return tirx.if_then_else(inside, _u8(v, in_dtype), fill)


def _pad_stage(x: tirx.Buffer, pads: Sequence[int], cp: int, in_dtype: str) -> tirx.Buffer:
    """A padded uint8 copy of NHWC ``x``: ``pads`` around, channels zero-filled to ``cp``
    (int8 fed as x + 128, filled with 128), allocated for the rest of the function."""
    n, h, w, _ = (int(d) for d in x.shape)
    pt, pl, pb, pr = pads
    hp, wp = h + pt + pb, w + pl + pr
    xp = I.decl_buffer((n, hp, wp, cp), "uint8", align=64)
    vec = math.gcd(cp, TILE_BYTES)
    with I.parallel(0, n * hp) as row:
        b, i = row // hp, row % hp
        with I.serial(0, wp) as j:
            with I.serial(0, cp // vec) as kc:
                with I.vectorized(0, vec) as k:
                    I.buffer_store(xp, _pixel(x, b, i - pt, j - pl, kc * vec + k, in_dtype),
                                   [b, i, j, kc * vec + k])
    return xp


def _im2col_stage(x: tirx.Buffer, geo: tuple, cp: int, in_dtype: str) -> tirx.Buffer:
    """The (M, kh*kw*cp) uint8 patch matrix, K ordered (r, s, c) as the packed weights
    are: small maps then run as full 16-row tiles of a flat GEMM."""
    n = int(x.shape[0])
    (kh, kw), (sh, sw), (dh, dw), (pt, pl), (oh_n, ow_n) = geo
    col = I.decl_buffer((n * oh_n * ow_n, kh * kw * cp), "uint8", align=64)
    vec = math.gcd(cp, TILE_BYTES)
    with I.parallel(0, n * oh_n) as row:
        b, oh = row // oh_n, row % oh_n
        with I.serial(0, ow_n) as ow:
            with I.serial(0, kh) as r:
                with I.serial(0, kw) as s:
                    i, j = oh * sh + r * dh - pt, ow * sw + s * dw - pl
                    with I.serial(0, cp // vec) as kc:
                        with I.vectorized(0, vec) as k:
                            I.buffer_store(col, _pixel(x, b, i, j, kc * vec + k, in_dtype),
                                           [row * ow_n + ow, (r * kw + s) * cp + kc * vec + k])
    return col


def _flat_out(OH: int, OW: int) -> Callable[..., tuple]:
    """out_index of a flat task over NHWC output rows: row t*16 + i is pixel (b, oh, ow)."""
    def out_index(t: tirx.PrimExpr, i: tirx.PrimExpr, n: tirx.PrimExpr) -> tuple:
        row = t * TILE_ROWS + i
        return (row // (OH * OW), row % (OH * OW) // OW, row % OW, n)
    return out_index


def _window(N: int, OH: int, OW: int, st: tuple[int, int], dil: tuple[int, int],
            pixel_bytes: int) -> _Rows:
    """Tasks of 16 pixels of one output row: task t is (image, output row, 16-pixel
    segment); A row i reads input pixel (ow * sw + s * dw), ``pixel_bytes`` apart."""
    segs = -(-OW // TILE_ROWS)
    (sh, sw), (dh, dw) = st, dil

    def where(t: tirx.PrimExpr) -> tuple:
        return t // (OH * segs), t % (OH * segs) // segs, t % segs

    def a_index(t: tirx.PrimExpr, r: tirx.PrimExpr, s: tirx.PrimExpr, c: tirx.PrimExpr) -> list:
        b, oh, seg = where(t)
        return [b, oh * sh + r * dh, seg * TILE_ROWS * sw + s * dw, c]

    def out_index(t: tirx.PrimExpr, i: tirx.PrimExpr, n: tirx.PrimExpr) -> tuple:
        b, oh, seg = where(t)
        return (b, oh, seg * TILE_ROWS + i, n)
    return _Rows(N * OH * segs, OW - (segs - 1) * TILE_ROWS, lambda t: t % segs == segs - 1,
                 a_index, sw * pixel_bytes, out_index)


def conv2d_nhwc_amx(N: int, H: int, W: int, C: int, OC: int, kh: int, kw: int,
                    strides: Sequence[int] = (1, 1), pads: Sequence[int] = (0, 0, 0, 0),
                    dilations: Sequence[int] = (1, 1), *, out_dtype: str = "int8",
                    raw: bool = False, in_dtype: str = "uint8", lo: int | None = None,
                    hi: int | None = None, requant: str = "int64",
                    post: Sequence[Post] = ()) -> tirx.PrimFunc:
    """``conv2d_nhwc_vnni``'s contract (parameters, packed weights, bias, epilogue) on the
    tile unit. Needs C % 64 == 0 or C % 4 == 0 and C < 64, or an image stem
    (``merged_taps``).

    (Zero-padding C to 64 for C = 80, 112, 480, 672 was tried: no faster than VNNI on
    EfficientNet-Lite0's pointwise convs, up to 4x slower on the expanding ones.)"""
    st, dil = _pair(strides), _pair(dilations)
    OH, OW = conv_out_hw(H, W, kh, kw, strides, pads, dilations)
    ep = epilogue(out_dtype, raw, lo, hi, requant, post)
    x_shape, out_shape, M, K = (N, H, W, C), (N, OH, OW, OC), N * OH * OW, kh * kw * C
    if merged_taps(C, kw, dil[1]):
        # The reduction: kh A tiles whose rows are whole kernel rows, kw pixels x 4
        # channels; pack_conv_weights' K order (r, s, c) makes them consecutive there too.
        return _gemm(lambda xp: _window(N, OH, OW, st, dil, KG), x_shape, in_dtype, out_shape,
                     OC, kh, 1, kw * KG, ep, stage=lambda x: _pad_stage(x, pads, KG, in_dtype))
    if C % KG:
        raise ValueError(f"AMX conv needs C % {KG} == 0, got {C}")
    if kh == kw == 1 and st == (1, 1) and not any(pads) and in_dtype == "uint8":
        # x itself is the (M, C) matrix; A rows are C bytes apart.
        def flat_a(t: tirx.PrimExpr, r: tirx.PrimExpr, s: tirx.PrimExpr, c: tirx.PrimExpr) -> list:
            row = t * TILE_ROWS
            return [row // (H * W), row % (H * W) // W, row % W, c]
        return _gemm(lambda x: _flat(M, flat_a, C, _flat_out(OH, OW)), x_shape, in_dtype,
                     out_shape, OC, 1, 1, C, ep)
    if OW < MIN_ROW and (K % TILE_BYTES == 0 or K < TILE_BYTES):
        # 7x7 maps would fill 7 of 16 tile rows: gather the patches, run a flat GEMM.
        geo = ((kh, kw), st, dil, (pads[0], pads[1]), (OH, OW))
        return _gemm(lambda col: _flat(M, lambda t, r, s, c: [t * TILE_ROWS, c], K,
                                       _flat_out(OH, OW)),
                     x_shape, in_dtype, out_shape, OC, 1, 1, K, ep,
                     stage=lambda x: _im2col_stage(x, geo, C, in_dtype))
    need_pad = any(pads) or in_dtype != "uint8"
    return _gemm(lambda xp: _window(N, OH, OW, st, dil, C), x_shape, in_dtype, out_shape,
                 OC, kh, kw, C, ep,
                 stage=(lambda x: _pad_stage(x, pads, C, in_dtype)) if need_pad else None)


def merged_taps(C: int, kw: int, dw: int) -> bool:
    """An image stem (1 to 4 channels): one A tile row takes a whole kernel row, kw
    pixels x 4 channels, which are adjacent bytes of the padded input. Only where that
    row fills MERGED_MIN_BYTES of the tile's 64: ResNet's 7x7x3 stem at batch 8 ran in
    1.32 ms against VNNI's 2.14, EfficientNet's 3x3x3 (12 bytes) in 0.76 against 0.55."""
    return C <= KG and dw == 1 and MERGED_MIN_BYTES <= kw * KG <= TILE_BYTES


def dense_amx(M: int, N: int, K: int, *, out_dtype: str = "int8", raw: bool = False,
              in_dtype: str = "uint8", lo: int | None = None, hi: int | None = None,
              requant: str = "int64", post: Sequence[Post] = ()) -> tirx.PrimFunc:
    """``dense_vnni``'s contract on the tile unit; needs uint8 A and K % 64 == 0 or
    K % 4 == 0 and K < 64."""
    if in_dtype != "uint8" or K % KG or (K % TILE_BYTES and K > TILE_BYTES):
        raise ValueError(f"AMX dense needs uint8 input and K % 64 == 0 or < 64, got {K}")
    ep = epilogue(out_dtype, raw, lo, hi, requant, post)
    return _gemm(lambda x: _flat(M, lambda t, r, s, c: [t * TILE_ROWS, c], K,
                                 lambda t, i, n: (t * TILE_ROWS + i, n)),
                 (M, K), in_dtype, (M, N), N, 1, 1, K, ep)
