"""The fixed-point arithmetic every op's quantizer uses, and the shared passthrough.

Every rescale is dyadic, ``m / 2^s`` with ``m < 2^31``, so ``int32 * m`` fits int64;
``r = 2^(s-1)`` makes the shift round half up.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from qcompile.errors import UnsupportedOpError
from qcompile.ir.node import Node
from qcompile.ir.qgraph import QNode, QType
from qcompile.ops.contexts import QuantContext

M_BITS = 31      # dyadic multipliers are below 2^31
MAX_SHIFT = 62   # keeps the rounding constant 2^(s-1) inside int64
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


def dyadic(M: np.ndarray | float, max_shift: int = MAX_SHIFT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Elementwise m, r, s (int64) with ``m / 2^s ~= M`` and ``m < 2^31``."""
    M = np.asarray(M, dtype=np.float64)
    if np.any(M < 0) or not np.all(np.isfinite(M)):
        raise ValueError("dyadic multipliers must be finite and non-negative")
    safe = np.where(M > 0, M, 1.0)
    # M in [2^e, 2^(e+1)) -> s = 30 - e puts m in [2^30, 2^31].
    s = (M_BITS - 1) - np.floor(np.log2(safe)).astype(np.int64)
    s = np.clip(s, 0, max_shift)
    m = np.round(np.ldexp(safe, s)).astype(np.int64)
    over = m >= (1 << M_BITS)  # rounding up to exactly 2^31
    m = np.where(over & (s > 0), (m + 1) >> 1, m)
    s = np.where(over & (s > 0), s - 1, s)
    if np.any(m >= (1 << M_BITS)):
        raise ValueError(f"rescale factor {float(M.max()):.3g} is too large for a 31-bit multiplier")
    m = np.where(M > 0, m, 0)
    return m, rounding_term(s), s


def signed_dyadic(M: np.ndarray, max_shift: int = MAX_SHIFT) -> tuple[np.ndarray, np.int64]:
    """Signed multipliers m (|m| < 2^31) sharing one shift s with m / 2^s ~= M."""
    M = np.asarray(M, np.float64)
    if not np.all(np.isfinite(M)):
        raise ValueError("dyadic multipliers must be finite")
    top = float(np.abs(M).max()) if M.size else 0.0
    if top == 0.0:
        return np.zeros(M.shape, np.int64), np.int64(0)
    s = int(np.clip((M_BITS - 1) - math.floor(math.log2(top)), 0, max_shift))
    m = np.round(np.ldexp(M, s)).astype(np.int64)
    if np.any(np.abs(m) >= (1 << M_BITS)):
        m, s = np.round(np.ldexp(M, s - 1)).astype(np.int64), s - 1
    if s < 0 or np.any(np.abs(m) >= (1 << M_BITS)):
        raise ValueError(f"rescale factor {top:.3g} is too large for a 31-bit multiplier")
    return m, np.int64(s)


def rounding_term(s: np.ndarray | np.integer) -> np.ndarray:
    return np.where(s > 0, np.left_shift(np.int64(1), np.maximum(s - 1, 0)), 0).astype(np.int64)


def shared_shift(Ms: Sequence[np.ndarray | float], m_bits: int = M_BITS
                 ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Dyadic multipliers below 2^m_bits for several factors that must share one shift."""
    s = min(int(dyadic(M)[2].min()) for M in Ms) - (M_BITS - m_bits)
    s = max(s, 0)
    ms = [np.round(np.ldexp(np.asarray(M, np.float64), s)).astype(np.int64) for M in Ms]
    return ms, rounding_term(np.int64(s)), np.int64(s)


def act_bounds(act: tuple[float, float] | None, qt: QType, scale: float) -> tuple[int, int]:
    """Integer clip bounds of a fused (lo, hi) activation at ``scale``, inside ``qt``."""
    lo, hi = qt.qmin, qt.qmax
    if act is not None:
        if math.isfinite(act[0]):
            lo = max(lo, math.ceil(act[0] / scale - 1e-9))
        if math.isfinite(act[1]):
            hi = min(hi, math.floor(act[1] / scale + 1e-9))
    return lo, hi


def quantize_passthrough(q: QuantContext, n: Node) -> QNode:
    """maxpool, flatten, reshape, transpose, slice and gather keep the input's integer
    type and scale."""
    x = q.t[n.inputs[0]]
    attrs = dict(n.attrs)
    if n.op in ("flatten", "reshape"):
        attrs = {"shape": tuple(q.g.shapes[n.output])}
    if x.scale.ndim and n.op not in ("maxpool", "clip") and (
            n.op not in ("flatten", "reshape")
            or q.g.shapes[n.output][1] != x.scale.shape[0]):
        raise UnsupportedOpError(f"node {n.name!r} ({n.op}) moves the channels of a "
                                 "per-channel tensor; not supported")
    q.add_tensor(n.output, x.qtype, x.scale)
    return QNode(n.op, n.name, n.inputs, n.output, attrs, dict(n.params))
