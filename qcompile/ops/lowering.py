"""How ``core`` stores tensors, for the generic lowerings and ``lower.emit``.

Inside ``core`` 4-D activations are NHWC (channels innermost: what VNNI and tensor cores
want); every other rank keeps its logical order.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from tvm import relax

R = relax.op
NCHW_TO_NHWC = (0, 2, 3, 1)
NHWC_TO_NCHW = (0, 3, 1, 2)


def to_nhwc(a: np.ndarray) -> np.ndarray:
    """A per-channel/per-position array broadcast for NCHW, re-laid for NHWC."""
    return np.ascontiguousarray(a.transpose(NCHW_TO_NHWC)) if a.ndim == 4 else a


def stored_order(rank: int) -> tuple[int, ...]:
    """Logical (ONNX) axes in the order ``core`` stores them: 4-D tensors are NHWC,
    every other rank keeps its logical order."""
    return NCHW_TO_NHWC if rank == 4 else tuple(range(rank))


def stored_axis(axis: int, rank: int) -> int:
    """Where logical ``axis`` sits in the stored tensor."""
    return stored_order(rank).index(axis)


def compose(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...]:
    """x.transpose(a).transpose(b) == x.transpose(compose(a, b))."""
    return tuple(a[i] for i in b)


def channel_offsets(rank: int, channels: int, stride: int) -> relax.Expr:
    """c * stride laid out to broadcast along the stored channel axis."""
    shape = [1] * rank
    shape[stored_axis(1, rank)] = channels
    return relax.const((np.arange(channels, dtype=np.int32) * stride).reshape(shape))
