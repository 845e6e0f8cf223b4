"""Float canonical graph + calibration thresholds -> integer-only ``QGraph``.

Scheme (HAWQ-V3 style, zero points always 0):
- weights per-output-channel symmetric, ``q = clip(round(w / s_w), -qmax, qmax)``;
- activations per-tensor, unsigned after a fused ReLU/ReLU6, signed otherwise;
- bias int32 with scale ``s_w * s_x``; one that does not fit int32 is refused, not clipped;
- every conv/dense's static worst case |acc| must fit int32, else the layer is refused
  (``AccumulatorOverflowError``, exit 10), so no accumulator can wrap on any input;
- every rescale is dyadic ``m / 2^s`` with ``m < 2^31``, so ``int32 * m`` fits int64.

This module walks the graph and holds the weight policy and the bit plan; each op's own
quantizer lives with the op (``qcompile.ops``, ``OpDef.quantize``) and reads the walk's
state through ``ops.contexts.QuantContext``.
"""
from __future__ import annotations

import math
from typing import Mapping, Protocol

import numpy as np

from qcompile.config import QuantSpec, precision
from qcompile.errors import AccumulatorOverflowError, UnsupportedOpError
from qcompile.ir.graph import LAYER_OPS, Graph, Node
from qcompile.ir.qgraph import QGraph, QTensor, QType
from qcompile.ops import OPS, REQUANTIZING_OPS
from qcompile.ops.quantizing import INT32_MAX, INT32_MIN


class Observer(Protocol):
    def threshold(self, signed: bool, bits: int) -> float: ...


def quantize_weights(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel (axis 0) symmetric quantization -> (int8 q, float64 scale)."""
    qmax = (1 << (bits - 1)) - 1
    amax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1).astype(np.float64)
    scale = np.where(amax > 0, amax / qmax, 1.0)
    q = np.clip(np.round(w / scale.reshape((-1,) + (1,) * (w.ndim - 1))), -qmax, qmax)
    return q.astype(np.int8), scale


BIAS_HEADROOM = 1 << 30  # a bias may use half the int32 range; the rest is the products'


def fit_bias(w: np.ndarray, q: np.ndarray, sw: np.ndarray, b: np.ndarray, sx: float,
             bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Widen the weight scale of channels whose bias would not fit int32 at ``s_w * s_x``.

    Real models have them: a BN-folded channel whose weights are ~0 (EfficientNet-Lite0's
    stem has one at 2e-11 * 127) beside a bias of ~1 gives a bias of ~1e13 units.  Such a
    channel gets the smallest scale at which its bias takes at most ``BIAS_HEADROOM``
    units and its weights are re-rounded at it: at most one bit of that channel's weight
    resolution goes (the weights are at most qmax/2 there), nothing is clipped, and the
    integers stay the oracle's.  A bias that still does not fit (zero or non-finite
    input scale) is left to ``int32_bias``, which refuses it."""
    qmax = (1 << (bits - 1)) - 1
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        need = np.abs(np.asarray(b, np.float64).reshape(-1)) / (sx * BIAS_HEADROOM)
    grow = np.isfinite(need) & (need > sw)
    if not grow.any():
        return q, sw
    sw = np.where(grow, need, sw)
    rows = np.flatnonzero(grow)
    q = np.array(q)
    wr = np.asarray(w, np.float64)[rows]
    q[rows] = np.clip(np.round(wr / sw[rows].reshape((-1,) + (1,) * (wr.ndim - 1))), -qmax, qmax)
    return q, sw


def int32_bias(n: Node, sw: np.ndarray, sx: float, refuse: bool = True) -> np.ndarray:
    """The layer's bias as int32 integers at scale ``s_w * s_x``.

    A bias that does not fit int32 is refused (``AccumulatorOverflowError``), never
    clipped: clipping would silently change the layer's function. ``refuse=False``
    clips instead, for throw-away graphs that only answer dtype or timing questions."""
    b = np.asarray(n.params["b"], np.float64).reshape(-1)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        bf = np.round(b / (np.asarray(sw, np.float64) * sx))
    bad = ~(np.abs(bf) <= INT32_MAX)  # NaN and inf are bad too
    if not refuse:
        return np.clip(np.nan_to_num(bf), INT32_MIN, INT32_MAX).astype(np.int32)
    if np.any(bad):
        c = int(np.argmax(np.where(bad, np.nan_to_num(np.abs(bf), nan=np.inf), -1.0)))
        raise AccumulatorOverflowError(
            f"layer {n.name!r} ({n.op}): its bias does not fit int32 after quantization "
            f"(channel {c}: bias {b[c]:.3g} / (weight scale {float(sw[c]):.3g} * input scale "
            f"{sx:.3g}) = {float(bf[c]):.3g} > 2^31-1); that channel's weights are near zero "
            "next to its bias, or the input range is degenerate: fix the channel's weights "
            "or bias in the model, or calibrate a wider input range (--data DIR with real "
            "data, --calibrator minmax)")
    return bf.astype(np.int32)


def accumulator_bound(n: Node, wq: np.ndarray, bq: np.ndarray, w_bits: int, a_bits: int,
                      a_signed: bool, first_or_last: bool = False, refuse: bool = True) -> int:
    """Static worst case |acc| of a conv/dense: max over output channels of
    sum_k |w_q| * max|x_q| + |bias_q|. It also bounds every partial sum, so when it fits
    int32 no accumulator (with or without the bias) can overflow on any input.

    A bound past 2^31 - 1 is refused (``AccumulatorOverflowError``), naming the layer,
    unless ``refuse`` is False (throw-away graphs, see ``quantize_graph``)."""
    x = QType(a_bits, a_signed)
    xmax = max(-x.qmin, x.qmax)
    wsum = np.abs(wq.reshape(wq.shape[0], -1).astype(np.int64)).sum(axis=1)
    babs = np.abs(np.asarray(bq, np.int64).reshape(-1))
    per = wsum * xmax + babs
    bound = int(per.max(initial=0))
    if bound > INT32_MAX and refuse:
        c, k = int(per.argmax()), int(wq[0].size)
        # A first or last layer stays at first_last_bits unless pinned (pins need a budget).
        def pin(p: str) -> str:
            return f"--pin '{n.name}={p}' --budget-size 1"
        if w_bits > 4:
            fewer = ("give it 4-bit weights (" + (pin("w4a8") if first_or_last
                                                  else "--bits w4a8 or --bits 4") + "), or ")
        elif a_bits > 4:
            fewer = ("give it 4-bit activations ("
                     + (pin("4") if first_or_last else "--bits 4") + "), or ")
        else:
            fewer = ""
        raise AccumulatorOverflowError(
            f"layer {n.name!r} ({n.op}): its int32 accumulator can overflow (worst case "
            f"|acc| {bound:.3g} > 2^31-1: channel {c} sums K={k} products, sum|w_q| "
            f"{int(wsum[c])} * max|x_q| {xmax} + |bias_q| {int(babs[c])}); "
            + fewer + "split its K inputs over several layers in the model")
    return bound


class _Quantizer:
    """Walks the canonical graph once, turning each node into a QNode through its op's
    quantizer (``OPS[n.op].quantize``), which reads the calibrated scales, widths and
    QTensors kept here."""

    def __init__(self, graph: Graph, stats: Mapping[str, Observer], spec: QuantSpec,
                 bits: Mapping[str, int | str] | None,
                 rounded: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
                 refuse_overflow: bool = True) -> None:
        self.g, self.stats, self.spec = graph, stats, spec
        self.refuse_overflow = refuse_overflow
        prec = layer_precisions(graph, spec, bits)
        self.layer_bits = {k: w for k, (w, _) in prec.items()}
        self.rounded = dict(rounded or {})  # layer -> (q, scale), e.g. from gptq.py
        shapes = {n.name: n.params["w"].shape for n in graph.nodes if n.op in LAYER_OPS}
        for name, (rq, rs) in self.rounded.items():  # this layer's layout and width?
            qmax, top = (1 << (self.layer_bits[name] - 1)) - 1, int(np.abs(rq).max(initial=0))
            assert rq.shape == shapes[name] and rs.shape == rq.shape[:1] and (
                qmax // 2 < top <= qmax or top == 0), \
                f"rounded weights of {name!r} do not match its shape or {qmax.bit_length() + 1} bits"
        self.act_bits = activation_bits(graph, prec)
        self.edge_layers = set(list(prec)[:1] + list(prec)[-1:])  # kept at first_last_bits
        self.t: dict[str, QTensor] = {}
        self.raw = raw_output_producer(graph)

    def node_bits(self, n: Node) -> int:
        return self.layer_bits[n.name]

    def out_bits(self, tensor: str) -> int:
        """A requantizing op's output width: that of the layers that read it (8 if none)."""
        return self.act_bits.get(tensor, ACT_BITS_NO_LAYER)

    def calibrated(self, name: str, qt: QType, cap: float = math.inf) -> float:
        if name not in self.stats:
            raise KeyError(f"no calibration statistics for tensor {name!r}")
        T = float(self.stats[name].threshold(qt.signed, qt.bits))
        T = min(T, cap) if cap > 0 else T
        return (T if math.isfinite(T) and T > 0 else 1.0) / qt.qmax  # no floor: calibrate.py

    def add_tensor(self, name: str, qt: QType, scale: np.ndarray | float) -> QTensor:
        qtensor = QTensor(name, qt, tuple(self.g.shapes[name]), np.asarray(scale, np.float64))
        self.t[name] = qtensor
        return qtensor

    def layer_weights(self, n: Node) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
        """A conv/dense's integer weights, their per-output-channel scales, its int32 bias,
        its worst-case |acc| and its width: the weight policy (bit plan, ``rounded``
        weights, bias fitting, overflow refusals) the layers' quantizer
        (``qcompile.ops.layers``) builds on."""
        x = self.t[n.inputs[0]]
        bits = self.node_bits(n)
        wq, sw = self.rounded.get(n.name) or quantize_weights(n.params["w"], bits)
        sx = float(x.scale)
        wq, sw = fit_bias(n.params["w"], wq, sw, n.params["b"], sx, bits)
        bq = int32_bias(n, sw, sx, self.refuse_overflow)
        acc_bound = accumulator_bound(n, wq, bq, bits, x.qtype.bits, x.qtype.signed,
                                      first_or_last=n.name in self.edge_layers,
                                      refuse=self.refuse_overflow)
        return wq, sw, bq, acc_bound, bits


def raw_output_producer(g: Graph) -> str | None:
    """The conv/dense whose int32 accumulator can be the graph output (logits).

    Keeping the last layer's accumulator un-requantized costs nothing and keeps
    full precision for the float dequantization at the exit.
    """
    t = g.output
    while True:
        n = g.producer(t)
        if n is None or len(g.consumers(t)) > 1 and t != g.output:
            return None
        if n.op in ("softmax",):
            t = n.inputs[0]
        elif n.op in ("flatten", "reshape"):
            if g.shapes[n.output][1] != g.shapes[n.inputs[0]][1]:
                return None
            t = n.inputs[0]
        elif n.op in ("conv", "dense") and n.attrs.get("act") is None:
            return n.name if len(g.consumers(n.output)) <= 1 else None
        else:
            return None


def calibration_tensors(graph: Graph) -> list[str]:
    """Tensors whose ranges quantization needs, in graph order."""
    raw = raw_output_producer(graph)
    names = [graph.input]
    for n in graph.nodes:
        if n.op in REQUANTIZING_OPS and n.name != raw:
            names.append(n.output)
    return names


# Tensors that feed no conv/dense (residual sums, pool inputs) enter no multiply with a
# weight, so they cost no BOPs: they stay 8-bit whatever the layers around them use.
ACT_BITS_NO_LAYER = 8


def layer_precisions(graph: Graph, spec: QuantSpec,
                     plan: Mapping[str, int | str] | None = None) -> dict[str, tuple[int, int]]:
    """(weight bits, input-activation bits) of every conv/dense: ``plan`` first (8, 4,
    "w4a8" ... per layer name), else first/last at ``spec.first_last_bits`` and the rest at
    ``spec.bits``. A bare width applies to weights *and* input activation (HAWQ-V3), so
    BOPs are MACs * b_w * b_a."""
    layers = [n.name for n in graph.nodes if n.op in LAYER_OPS]
    plan = dict(plan or {})
    unknown = sorted(set(plan) - set(layers))
    if unknown:
        raise ValueError(f"bit plan names unknown layers: {unknown[:5]}")
    out = {}
    for i, name in enumerate(layers):
        edge = i == 0 or i == len(layers) - 1
        default = spec.first_last_bits if edge else spec.bits
        out[name] = precision(plan.get(name, default), f"layer {name!r}")
    return out


def layer_bits(graph: Graph, spec: QuantSpec, plan: Mapping[str, int | str] | None = None
               ) -> dict[str, int]:
    """Weight bits of every conv/dense (see ``layer_precisions``)."""
    return {k: w for k, (w, _) in layer_precisions(graph, spec, plan).items()}


def activation_bits(graph: Graph, lprec: Mapping[str, int | str | tuple[int, int]]
                    ) -> dict[str, int]:
    """Width of each requantized tensor that feeds a layer (directly or through
    PASSTHROUGH_OPS): the activation width of the layers reading it.

    Readers of one tensor should agree (the allocator ties them); if a hand-written
    plan makes them disagree, the wider one wins so no layer sees less than it asked for.
    """
    out: dict[str, int] = {}
    for n in graph.nodes:
        if n.op in LAYER_OPS:
            src = graph.source_of(n.inputs[0])
            out[src] = max(out.get(src, 0), precision(lprec[n.name])[1])
    return out


def quantize_graph(graph: Graph, stats: Mapping[str, Observer], spec: QuantSpec = QuantSpec(),
                   bits: Mapping[str, int | str] | None = None,
                   rounded: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
                   refuse_overflow: bool = True) -> QGraph:
    """Quantize a canonical float graph (see ``graph.py``) into a ``QGraph``.

    ``stats`` maps each name from ``calibration_tensors`` to an observer;
    ``bits`` optionally sets the width of conv/dense layers by node name (see
    ``layer_bits``); activation widths follow from it (``activation_bits``).
    ``rounded`` optionally gives layers' integer weights and per-output-channel scales
    (int8 q in the weight's layout, float64 scale, at the layer's width), used instead of
    round-to-nearest ``quantize_weights`` (``gptq.gptq_weights``).

    A layer whose int32 accumulator could overflow, or whose bias does not fit int32,
    raises ``AccumulatorOverflowError``. ``refuse_overflow=False`` clips such a bias and
    lets the bound pass instead: only for graphs that answer a dtype or timing question
    and are never run for their values (``latency.quantized_graph``, ``bitplan._time_core``).
    """
    q = _Quantizer(graph, stats, spec, bits, rounded, refuse_overflow)
    in_qt = QType(q.out_bits(graph.input), True)
    qin = q.add_tensor(graph.input, in_qt, q.calibrated(graph.input, in_qt))
    nodes, softmax_axis, out = [], None, graph.output
    for n in graph.nodes:
        if n.op == "softmax":
            if n.output != graph.output:
                raise UnsupportedOpError(f"node {n.name!r} (Softmax) must be the last node")
            softmax_axis, out = int(n.attrs.get("axis", -1)), n.inputs[0]
            continue
        op = OPS.get(n.op)
        if op is None or op.quantize is None:
            raise UnsupportedOpError(f"node {n.name!r} (op {n.op}) has no integer lowering")
        nodes.append(op.quantize(q, n))
    if not nodes:
        raise UnsupportedOpError(f"{graph.source or 'model'}: nothing to compute in integers "
                                 "(the model is an identity, a dropout or a lone softmax)")
    return QGraph(qin, tuple(nodes), q.t[out], dict(q.t), softmax_axis, graph.source)
