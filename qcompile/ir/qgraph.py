"""The quantized graph: the contract between quantization, lowering and the oracle.

A ``QGraph`` is integer-only between ``quantize`` at the entry and ``dequantize`` at
the exit.  Its node semantics are defined here, in words, once; ``lower.py``
emits them as Relax and ``reference.py`` re-implements them with NumPy integers.
The two share only this data description, never code.

Integer ops (``QNode.op``):

=========  ===================================================================
qconv      acc = conv2d(x, w) in int32 + bias (int32); if ``raw`` the int32 acc
           is the output, else out = requant(acc) with per-output-channel m/r/s
qdense     acc = x @ w in int32 + bias, w stored (K, N); then as qconv
qadd       n inputs: out = clip((sum_i x_i*m<i> + r) >> s)  (m<i> signed scalars; inputs
           broadcast like NumPy; in int32 when attrs["acc_dtype"] says it cannot overflow,
           else int64)
qmul       out = clip((int64(a)*b*m + r) >> s)  (broadcasting; scalars m, r, s)
qaffine    out = clip((int64(x)*m + c) >> s)  (m, c int64 arrays broadcast against x,
           m signed; c includes the rounding term; s scalar)
lut        out = table[ch, x + offset]  (table (1 or C, 2^bits) of the output dtype; ch
           is the channel (axis 1) when the table has C rows, else 0)
lrn        S = sum over the channel window [c - (size-1)//2, c + size//2] of x^2 (int32,
           zero outside); out = clip((int64(x)*table[S >> k] + r) >> s)
clip       out = clip(x, lo, hi)  (same dtype and scale)
pad        constant pad with the integer attrs["value"]; attrs pads (begin..., end...)
transpose  x.transpose(attrs["perm"])
slice      x[begin:end:step] on every axis
gather     for each axis a in attrs["axes"]: x = x.take(params["idx<a>"], axis=a)
maxpool    window max, padding with the dtype's minimum
avgpool    acc = window sum in int32 with zero padding; out = clip((acc*m[oh,ow] + r) >> s)
gap        acc = sum over H, W in int32; out = clip((acc*m + r) >> s); keepdims per attrs
flatten    reshape to attrs["shape"]
reshape    reshape to attrs["shape"]
concat     each input i: requant with (m_i, r_i, s_i) unless attrs["identity"][i]; then concat
=========  ===================================================================

where requant(v) = clip((int64(v) * m + r) >> s, lo, hi) with an arithmetic
shift; r = 2^(s-1) (0 when s = 0) makes it round-half-up.  ``m``/``r``/``s`` are
int64 arrays stored in the shape they broadcast in: (1, C, 1, 1) per channel
after a conv, (1, C) after a dense, (1, 1, OH, OW) per position, () per tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from qcompile.ir.node import Node

QOPS: frozenset[str] = frozenset(
    {"qconv", "qdense", "qadd", "qmul", "qaffine", "lut", "lrn", "clip", "maxpool", "avgpool",
     "gap", "pad", "transpose", "slice", "gather", "flatten", "reshape", "concat"})


@dataclass(frozen=True)
class QType:
    """An integer tensor type: ``bits`` wide, signed or unsigned, zero point 0."""

    bits: int
    signed: bool

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def dtype(self) -> str:
        """Storage dtype: bit widths up to 8 live in one byte each."""
        if self.bits <= 8:
            return "int8" if self.signed else "uint8"
        if self.bits <= 32:
            return "int32"
        raise ValueError(f"unsupported bit width {self.bits}")


INT32 = QType(32, True)


@dataclass(frozen=True)
class QTensor:
    """An activation tensor: its integer type, shape and real-valued scale."""

    name: str
    qtype: QType
    shape: tuple[int, ...]
    scale: np.ndarray  # float64, shape () or (C,) along axis 1

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """Real value of an integer tensor (for reports and fidelity, never in-graph)."""
        s = self.scale.reshape((1, -1) + (1,) * (q.ndim - 2)) if self.scale.ndim else self.scale
        return q.astype(np.float64) * s


@dataclass(frozen=True)
class QNode(Node):
    """A ``Node`` whose op is one of ``QOPS``, with the integer semantics above."""

    def __post_init__(self) -> None:
        if self.op not in QOPS:
            raise ValueError(f"unknown quantized op {self.op!r}")
        super().__post_init__()


@dataclass(frozen=True)
class QGraph:
    """Integer-only graph plus its two float boundary steps.

    Entry: q = clip(floor(x * inv_scale + 0.5), qmin, qmax) computed in float32.
    Exit:  y = float32(q_out) * out_scale (broadcast on axis 1), then softmax
    over ``softmax_axis`` when it is not None.
    """

    input: QTensor
    nodes: tuple[QNode, ...]
    output: QTensor
    tensors: Mapping[str, QTensor]
    softmax_axis: int | None = None
    source: str = ""

    @property
    def input_inv_scale(self) -> np.float32:
        return np.float32(1.0 / float(self.input.scale))

    def param_items(self) -> list[tuple[str, np.ndarray]]:
        """All integer parameters in a stable order: ``node.param`` keys."""
        return [(f"{n.name}.{k}", v) for n in self.nodes for k, v in sorted(n.params.items())]
