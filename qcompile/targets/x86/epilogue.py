"""What the x86 kernels do with ``acc + bias`` before they store it: the requantization,
and the integer ops fused behind it (a residual add, a clip, a table lookup).

Requantization (``raw=False``), per output channel n (or position, for pools)::

    out = clip((int64(int32(acc + bias[n])) * m[n] + r[n]) >> s[n], lo, hi)

Three exact ways to compute it (``requant``):

* ``"int64"``: as written, in 64-bit lanes (m, r, s int64 parameters, qgraph's own).
* ``"mulhi"``: when every channel has r = 2^(s-1) and 33 <= s <= 62, only the high half
  of the product matters. With P = acc*m = H*2^32 + L (H = floor(P / 2^32), 0 <= L < 2^32)::

      (P + 2^(s-1)) >> s  ==  (H + 2^(s-33)) >> (s-32)

  since 2^(s-1) adds to H only and L/2^32 < 1 cannot carry past a floor division by
  2^(s-32). |H| < 2^30, so the right side is plain int32 math: LLVM emits a 32x32 -> high
  32 multiply (two vpmuldq and a shuffle per 16 lanes), vpaddd, vpsravd, 32-bit
  min/max and a narrowing move, instead of widening to int64 (2 threads, 1x1 conv
  112x112x16 -> 96: 0.62x the time; 56x56x64 -> 256: 0.73x; 3x3 56x56x64: 0.94x).
  Parameters: m int32, rnd = 2^(s-33) int32, sh = s-32 int32 (``requant_arrays``).
* ``"mulhi_shl"``: "mulhi" after acc + bias <<= pre[n], with s raised by pre[n], for
  channels with s < 33 (a ~zero-weight channel's multiplier ~1) whose static worst case
  |acc + bias| leaves pre bits of room: (a*2^k * m + 2^(s+k-1)) >> (s+k) is the same
  number. Parameters m, pre, rnd, sh (int32).

``lo``/``hi`` are baked into the PrimFunc (default: the output dtype's range): every
layer gets its own PrimFunc anyway, and constants let LLVM fold the clip.
``raw=True`` writes the int32 ``acc + bias`` instead and takes no m/r/s.

Fused ops (``post``), applied in order to the requantized value y (an exact int32 in
[lo, hi], which the unfused graph would store in ``out_dtype`` and read back):

* ``FusedAdd``: qgraph's qadd with y as one of its inputs: clip((y*m_self + sum_j
  x_j*m_j + r) >> s, lo, hi) in ``acc_dtype`` lanes, the x_j extra kernel parameters of
  the output's shape (the residual branch);
* ``FusedClip``: clip(v, lo, hi);
* ``FusedLut``: table[ch * width + v + offset] (``rows`` = 1 or C tables; ch the channel).

So a conv followed by its residual add and ReLU (and a LUT activation) writes its output
once, with no separate pass over the tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence, Union

import numpy as np
from qcompile.tvm_compat import te, tirx

REQUANT_MODES = ("int64", "mulhi", "mulhi_shl")
MULHI_MIN_SHIFT, MULHI_MAX_SHIFT = 33, 62


# ----------------------------------------------------------------------------- NumPy side
def _pre_shift(s: np.ndarray) -> np.ndarray:
    return np.maximum(MULHI_MIN_SHIFT - s, 0)


def requant_mode(m: np.ndarray, r: np.ndarray, s: np.ndarray,
                 bound: np.ndarray | None = None) -> str:
    """The fastest exact mode for these parameters: "mulhi" when every s is in 33..62 and
    r = 2^(s-1); "mulhi_shl" when the channels with a smaller s can be brought there by
    shifting acc + bias left (their static worst case ``bound`` of |acc + bias| leaves
    room); else "int64"."""
    m, r, s = (np.asarray(a, np.int64) for a in np.broadcast_arrays(m, r, s))
    if not (((m >= -(1 << 31)) & (m < (1 << 31))).all() and (s >= 1).all()
            and (s <= MULHI_MAX_SHIFT).all() and (r == np.left_shift(1, s - 1)).all()):
        return "int64"
    pre = _pre_shift(s)
    if not pre.any():
        return "mulhi"
    if bound is None:
        return "int64"
    bound = np.broadcast_to(np.asarray(bound, np.int64), s.shape)
    return "mulhi_shl" if (np.left_shift(bound, pre) < (1 << 31)).all() else "int64"


def requant_arrays(mode: str, m: np.ndarray, r: np.ndarray, s: np.ndarray,
                   bound: np.ndarray | None = None) -> list[np.ndarray]:
    """qgraph's (m, r, s) as the kernel's requant parameters in ``mode``: m, r, s (int64);
    m, rnd, sh (int32, "mulhi"); or m, pre, rnd, sh ("mulhi_shl", pre the left shift)."""
    m, r, s = (np.asarray(a, np.int64) for a in (m, r, s))
    if mode == "int64":
        return [m, r, s]
    best = requant_mode(m, r, s, bound)  # "mulhi" params also run as "mulhi_shl"
    if not (mode == best or (mode, best) == ("mulhi_shl", "mulhi")):
        raise ValueError(f"requant mode {mode!r} does not apply to these parameters")
    s, m = np.broadcast_arrays(s, m)
    pre = _pre_shift(s)
    s = s + pre
    out = [m.astype(np.int32), np.left_shift(1, s - MULHI_MIN_SHIFT).astype(np.int32),
           (s - 32).astype(np.int32)]
    return out if mode == "mulhi" else [out[0], pre.astype(np.int32), *out[1:]]


# ----------------------------------------------------------------------------- fused ops
@dataclass(frozen=True)
class FusedAdd:
    """qadd with the kernel's value as one input; ``others`` are the other inputs' dtypes."""

    m_self: int
    m_others: tuple[int, ...]
    others: tuple[str, ...]
    r: int
    s: int
    lo: int
    hi: int
    acc_dtype: str   # "int32" when quantize.py proved the sum fits, else "int64"
    out_dtype: str


@dataclass(frozen=True)
class FusedClip:
    lo: int
    hi: int


@dataclass(frozen=True)
class FusedLut:
    offset: int
    rows: int       # 1, or one table per channel
    width: int
    out_dtype: str


Post = Union[FusedAdd, FusedClip, FusedLut]
ParamSpec = tuple[str, tuple[int, ...], str]  # a kernel parameter: name, shape, dtype


def _clip(v: tirx.PrimExpr, lo: int, hi: int) -> tirx.PrimExpr:
    dtype = str(v.ty)
    return te.max(te.min(v, tirx.const(hi, dtype)), tirx.const(lo, dtype))


# ----------------------------------------------------------------------------- epilogue
@dataclass(frozen=True)
class EpilogueArgs:
    """The epilogue's placeholders, in kernel parameter order: q, then the fused ops'."""

    q: list[te.Tensor]
    extra: list[te.Tensor]

    @property
    def all(self) -> list[te.Tensor]:
        return [*self.q, *self.extra]


@dataclass(frozen=True)
class Epilogue:
    """``acc + bias`` -> raw int32, or requantize + clip to ``out_dtype``, then ``post``."""

    out_dtype: str
    raw: bool
    lo: int | None = None
    hi: int | None = None
    requant: str = "int64"
    post: tuple[Post, ...] = ()

    def __post_init__(self) -> None:
        if self.raw and self.out_dtype != "int32":
            raise ValueError("raw=True writes int32; pass out_dtype='int32'")
        if not self.raw and self.out_dtype not in ("int8", "uint8", "int32"):
            raise ValueError(f"out_dtype must be int8/uint8/int32, got {self.out_dtype!r}")
        if self.requant not in REQUANT_MODES:
            raise ValueError(f"requant must be one of {REQUANT_MODES}, got {self.requant!r}")
        if self.raw and self.post:
            raise ValueError("a raw (int32 accumulator) output takes no fused ops")
        lo, hi = self.bounds
        info = np.iinfo(self.out_dtype)
        if not info.min <= lo <= hi <= info.max:
            raise ValueError(f"clip bounds [{lo}, {hi}] outside {self.out_dtype}")

    @property
    def bounds(self) -> tuple[int, int]:
        info = np.iinfo(self.out_dtype)
        return (info.min if self.lo is None else self.lo, info.max if self.hi is None else self.hi)

    @property
    def final_dtype(self) -> str:
        """The dtype the kernel stores: the last fused op's (a clip keeps its input's)."""
        dtype = self.out_dtype
        for p in self.post:
            dtype = dtype if isinstance(p, FusedClip) else p.out_dtype
        return dtype

    def params(self, q_shape: tuple[int, ...], out_shape: tuple[int, ...]
               ) -> tuple[list[ParamSpec], list[ParamSpec]]:
        """(name, shape, dtype) of m, r, s of ``q_shape`` (none when raw), then of each
        fused add's other inputs (of the output's shape) and each LUT's flat table."""
        names = ["m", "pre", "rnd", "sh"] if self.requant == "mulhi_shl" else list("mrs")
        q_dtype = "int64" if self.requant == "int64" else "int32"
        q = [] if self.raw else [(f"q_{x}", q_shape, q_dtype) for x in names]
        extra: list[ParamSpec] = []
        for k, p in enumerate(self.post):
            if isinstance(p, FusedAdd):
                extra += [(f"add{k}_x{j}", out_shape, dt) for j, dt in enumerate(p.others)]
            elif isinstance(p, FusedLut):
                extra.append((f"lut{k}", (p.rows * p.width,), p.out_dtype))
        return q, extra

    def placeholders(self, q_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> EpilogueArgs:
        """``params`` as TE placeholders."""
        q, extra = self.params(q_shape, out_shape)
        return EpilogueArgs(*([te.placeholder(shape, dt, name=nm) for nm, shape, dt in group]
                              for group in (q, extra)))

    def apply(self, acc: tirx.PrimExpr, bias: tirx.PrimExpr | None, args: EpilogueArgs,
              q_idx: Sequence[tirx.PrimExpr], out_idx: Sequence[tirx.PrimExpr] = (),
              channel: tirx.PrimExpr | None = None) -> tirx.PrimExpr:
        """epilogue(acc + bias), m/r/s read at ``q_idx``, fused inputs at ``out_idx`` (the
        output element's index), per-channel tables at ``channel``."""
        if bias is not None:
            # The reference wraps acc + bias to int32. The simplifier rewrites
            # int64(a + b) as int64(a) + int64(b) (no overflow assumed), so add as uint32.
            acc = (acc.astype("uint32") + bias.astype("uint32")).astype("int32")
        if self.raw:
            return acc
        q = [t[tuple(q_idx)] for t in args.q]
        lo, hi = self.bounds
        if self.requant == "mulhi_shl":
            acc, q = acc << q[1], [q[0], *q[2:]]
        m, r, s = q
        if self.requant != "int64":
            high = ((acc.astype("int64") * m.astype("int64")) >> 32).astype("int32")
            v = _clip((high + r) >> s, lo, hi)
        else:
            # m < 2^31: a trip through int32 tells LLVM so, turning a 64x64 vpmullq into vpmuldq.
            v = (acc.astype("int64") * m.astype("int32").astype("int64") + r) >> s
            v = _clip(v, lo, hi)
        return self._post(v, iter(args.extra), tuple(out_idx), channel)

    def _post(self, v: tirx.PrimExpr, extra: Iterator[te.Tensor], out_idx: tuple,
              channel: tirx.PrimExpr | None) -> tirx.PrimExpr:
        dtype = self.out_dtype
        for p in self.post:
            if isinstance(p, FusedAdd):
                t = p.acc_dtype
                total = v.astype(t) * tirx.const(p.m_self, t)
                for mj in p.m_others:
                    total = total + next(extra)[out_idx].astype(t) * tirx.const(mj, t)
                total = (total + tirx.const(p.r, t)) >> tirx.const(p.s, t)
                v, dtype = _clip(total, p.lo, p.hi), p.out_dtype
            elif isinstance(p, FusedClip):
                v = _clip(v, p.lo, p.hi)
            else:
                table = next(extra)
                idx = v.astype("int32") + tirx.const(p.offset, "int32")
                if p.rows > 1:
                    idx = idx + channel.astype("int32") * tirx.const(p.width, "int32")
                v, dtype = table[idx], p.out_dtype
        return v.astype(dtype)


def epilogue(out_dtype: str, raw: bool, lo: int | None, hi: int | None,
             requant: str = "int64", post: Sequence[Post] = ()) -> Epilogue:
    return Epilogue("int32" if raw else out_dtype, raw, lo, hi, requant, tuple(post))

