"""Float canonical graph + calibration thresholds -> integer-only ``QGraph``.

Scheme (HAWQ-V3 style, zero points always 0):
- weights per-output-channel symmetric, ``q = clip(round(w / s_w), -qmax, qmax)``;
- activations per-tensor, unsigned after a fused ReLU/ReLU6, signed otherwise;
- bias int32 with scale ``s_w * s_x``; one that does not fit int32 is refused, not clipped;
- every conv/dense's static worst case |acc| must fit int32, else the layer is refused
  (``AccumulatorOverflowError``, exit 10), so no accumulator can wrap on any input;
- every rescale is dyadic ``m / 2^s`` with ``m < 2^31``, so ``int32 * m`` fits int64.
"""
from __future__ import annotations

import math
from typing import Mapping, Protocol

import numpy as np

from qcompile.config import QuantSpec, precision
from qcompile.errors import AccumulatorOverflowError, UnsupportedOpError
from qcompile.ir.activations import TIMES_X, evaluate
from qcompile.ir.graph import LAYER_OPS, Graph, Node
from qcompile.ir.qgraph import INT32, QGraph, QNode, QTensor, QType

M_BITS = 31      # dyadic multipliers are below 2^31
MAX_SHIFT = 62   # keeps the rounding constant 2^(s-1) inside int64
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


class Observer(Protocol):
    def threshold(self, signed: bool, bits: int) -> float: ...


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


AFFINE_MAX_SHIFT = 40  # x*m + c stays far inside int64 (see _Quantizer.affine)
LRN_TABLE = 4096       # entries of the LRN power table
# Ops that write a new scale: calibration measures their outputs.
REQUANTIZING_OPS = ("conv", "dense", "add", "mul", "affine", "lut", "lrn", "avgpool", "gap",
                    "concat")


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


def rounding_term(s: np.ndarray) -> np.ndarray:
    return np.where(s > 0, np.left_shift(np.int64(1), np.maximum(s - 1, 0)), 0).astype(np.int64)


def shared_shift(Ms: list[np.ndarray], m_bits: int = M_BITS
                 ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Dyadic multipliers below 2^m_bits for several factors that must share one shift."""
    s = min(int(dyadic(M)[2].min()) for M in Ms) - (M_BITS - m_bits)
    s = max(s, 0)
    ms = [np.round(np.ldexp(np.asarray(M, np.float64), s)).astype(np.int64) for M in Ms]
    return ms, rounding_term(np.int64(s)), np.int64(s)


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


def _window_sum_check(n: Node, count: int, qt: QType, what: str) -> None:
    """Pool window sums run in int32: refuse a window whose worst case does not fit."""
    xmax = max(-qt.qmin, qt.qmax)
    if count * xmax > INT32_MAX:
        raise AccumulatorOverflowError(
            f"node {n.name!r} ({n.op}): its int32 {what} can overflow ({count} values * "
            f"max|x_q| {xmax} = {count * xmax:.3g} > 2^31-1); use a smaller input "
            "(--input-shape, --size)")


def _act_bounds(act: tuple[float, float] | None, qt: QType, scale: float) -> tuple[int, int]:
    lo, hi = qt.qmin, qt.qmax
    if act is not None:
        if math.isfinite(act[0]):
            lo = max(lo, math.ceil(act[0] / scale - 1e-9))
        if math.isfinite(act[1]):
            hi = min(hi, math.floor(act[1] / scale + 1e-9))
    return lo, hi


def _bcast(v: np.ndarray, ndim: int) -> np.ndarray:
    """(C,) -> (1, C, 1, ...) so it broadcasts along axis 1 of an ndim tensor."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


class _Quantizer:
    """Walks the canonical graph once, turning each node into a QNode."""

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

    # --- one method per canonical op ------------------------------------------------
    def conv_or_dense(self, n: Node) -> QNode:
        x = self.t[n.inputs[0]]
        bits = self.node_bits(n)
        wq, sw = self.rounded.get(n.name) or quantize_weights(n.params["w"], bits)
        sx = float(x.scale)
        wq, sw = fit_bias(n.params["w"], wq, sw, n.params["b"], sx, bits)
        bq = int32_bias(n, sw, sx, self.refuse_overflow)
        acc_bound = accumulator_bound(n, wq, bq, bits, x.qtype.bits, x.qtype.signed,
                                      first_or_last=n.name in self.edge_layers,
                                      refuse=self.refuse_overflow)
        ndim = 4 if n.op == "conv" else 2
        attrs: dict = {"acc_bound": acc_bound, "bits": bits, "a_bits": x.qtype.bits}
        if n.op == "conv":
            attrs.update(strides=tuple(n.attrs["strides"]), pads=tuple(n.attrs["pads"]),
                         dilations=tuple(n.attrs["dilations"]), group=int(n.attrs["group"]))
            params = {"w": wq, "bias": _bcast(bq, 4)}
        else:
            params = {"w": np.ascontiguousarray(wq.T), "bias": _bcast(bq, 2)}
        act = n.attrs.get("act")
        if n.name == self.raw:
            self.add_tensor(n.output, INT32, sw * sx)
            attrs.update(raw=True, lo=INT32_MIN, hi=INT32_MAX)
        else:
            signed = act is None or act[0] < 0
            qt = QType(self.out_bits(n.output), signed)
            sy = self.calibrated(n.output, qt, act[1] if act else math.inf)
            m, r, s = dyadic(sw * sx / sy)
            lo, hi = _act_bounds(act, qt, sy)
            params.update(m=_bcast(m, ndim), r=_bcast(r, ndim), s=_bcast(s, ndim))
            attrs.update(raw=False, lo=lo, hi=hi)
            self.add_tensor(n.output, qt, sy)
        op = "qconv" if n.op == "conv" else "qdense"
        return QNode(op, n.name, n.inputs, n.output, attrs, params)

    def requantized_output(self, n: Node, signed: bool = True) -> tuple[float, int, int]:
        """Type, scale and clip bounds of a requantizing op's output (registered): signed
        unless ``signed`` is False or a fused ReLU-like act keeps it >= 0."""
        act = n.attrs.get("act")
        qt = QType(self.out_bits(n.output), signed and (act is None or act[0] < 0))
        sy = self.calibrated(n.output, qt, act[1] if act else math.inf)
        self.add_tensor(n.output, qt, sy)
        return (sy, *_act_bounds(act, qt, sy))

    def add(self, n: Node) -> QNode:
        """y = sum_i sign_i * x_i (broadcasting): one shared-shift dyadic sum."""
        xs = [self.t[i] for i in n.inputs]
        sy, lo, hi = self.requantized_output(n)
        signs = tuple(n.attrs.get("signs", (1,) * len(xs)))
        # 22-bit multipliers keep sum(x_i*m_i) + r inside int32 for 8-bit inputs, so the
        # add can run in 32-bit lanes (2x the width of int64, and no vpmullq); the
        # relative error 2^-22 is far below the 8-bit output's resolution.
        ms, r, s = shared_shift([float(x.scale) / sy for x in xs], m_bits=22)
        ms = [np.int64(sg) * np.int64(m) for sg, m in zip(signs, ms)]
        bound = sum(max(-x.qtype.qmin, x.qtype.qmax) * abs(int(m)) for x, m in zip(xs, ms)) + int(r)
        return QNode("qadd", n.name, n.inputs, n.output,
                     {"lo": lo, "hi": hi, "acc_dtype": "int32" if bound < (1 << 31) else "int64"},
                     {**{f"m{i}": m for i, m in enumerate(ms)}, "r": r, "s": s})

    def mul(self, n: Node) -> QNode:
        """y = a * b (broadcasting): the int16 product times one dyadic factor."""
        a, b = (self.t[i] for i in n.inputs)
        sy, lo, hi = self.requantized_output(n, a.qtype.signed or b.qtype.signed)
        m, r, s = dyadic(float(a.scale) * float(b.scale) / sy)
        return QNode("qmul", n.name, n.inputs, n.output, {"lo": lo, "hi": hi},
                     {"m": m, "r": r, "s": s})

    def affine(self, n: Node) -> QNode:
        """y = x * scale + shift with array constants: (x*m + c) >> s, m signed."""
        x = self.t[n.inputs[0]]
        sy, lo, hi = self.requantized_output(n)
        M = float(x.scale) * n.params["scale"].astype(np.float64) / sy
        m, s = signed_dyadic(M, max_shift=AFFINE_MAX_SHIFT)
        # c carries the shift and the rounding term; past +-2^47 the result saturates
        # either way (|x*m| < 2^39), so clamping keeps int64 safe and changes nothing.
        c = np.round(np.ldexp(n.params["shift"].astype(np.float64) / sy, int(s)))
        c = np.clip(c, -(1 << 47), 1 << 47).astype(np.int64) + rounding_term(s)
        return QNode("qaffine", n.name, n.inputs, n.output, {"lo": lo, "hi": hi},
                     {"m": m, "c": c, "s": s})

    def lut(self, n: Node) -> QNode:
        """Any unary function of a quantized tensor: a table over its 2^bits values."""
        x = self.t[n.inputs[0]]
        act = n.attrs.get("act")
        grid = np.arange(x.qtype.qmin, x.qtype.qmax + 1, dtype=np.float64) * float(x.scale)
        slope = n.params.get("slope")
        xs = grid[None, :] if slope is None else np.broadcast_to(grid, (len(slope), len(grid)))
        f = evaluate(n.attrs["fn"], xs, {**n.attrs["fn_attrs"], TIMES_X: n.attrs["times_x"]},
                     None if slope is None else slope.astype(np.float64)[:, None])
        if act is not None:
            f = np.clip(f, act[0], act[1])
        f = np.where(np.isnan(f), 0.0, f)
        signed = bool(np.min(f) < 0)
        qt = QType(self.out_bits(n.output), signed)
        sy = self.calibrated(n.output, qt, act[1] if act else math.inf)
        lo, hi = _act_bounds(act, qt, sy)
        with np.errstate(over="ignore", invalid="ignore"):
            table = np.clip(np.floor(f / sy + 0.5), lo, hi).astype(qt.dtype)
        self.add_tensor(n.output, qt, sy)
        return QNode("lut", n.name, n.inputs, n.output,
                     {"offset": -x.qtype.qmin, "fn": n.attrs["fn"]}, {"table": table})

    def lrn(self, n: Node) -> QNode:
        """ONNX LRN: y = x * (bias + alpha/size * S)^-beta, S the windowed sum of squares.

        S is an exact integer sum of q^2; the power is a table indexed by S >> shift
        (at most LRN_TABLE entries) of dyadic multipliers with one shared shift."""
        x = self.t[n.inputs[0]]
        a = n.attrs
        qt = QType(self.out_bits(n.output), x.qtype.signed)
        sy = self.calibrated(n.output, qt)
        qmax = max(-x.qtype.qmin, x.qtype.qmax)
        s_max = a["size"] * qmax * qmax
        k = max(0, math.ceil(math.log2((s_max + 1) / LRN_TABLE)))
        sq = ((np.arange((s_max >> k) + 1, dtype=np.float64) * (1 << k)) + (1 << k) / 2
              if k else np.arange(s_max + 1, dtype=np.float64))
        f = (a["bias"] + a["alpha"] / a["size"] * sq * float(x.scale) ** 2) ** -a["beta"]
        (m,), r, s = shared_shift([f * float(x.scale) / sy])
        self.add_tensor(n.output, qt, sy)
        return QNode("lrn", n.name, n.inputs, n.output,
                     {"size": a["size"], "k": k, "lo": qt.qmin, "hi": qt.qmax},
                     {"table": m.astype(np.int64), "r": r, "s": s})

    def pad(self, n: Node) -> QNode:
        x = self.t[n.inputs[0]]
        value = float(n.attrs["value"])
        q = np.clip(np.floor(value / float(x.scale) + 0.5) if math.isfinite(value)
                    else (x.qtype.qmin if value < 0 else x.qtype.qmax),
                    x.qtype.qmin, x.qtype.qmax)
        self.add_tensor(n.output, x.qtype, x.scale)
        return QNode("pad", n.name, n.inputs, n.output,
                     {"pads": tuple(n.attrs["pads"]), "value": int(q)})

    def clip(self, n: Node) -> QNode:
        x = self.t[n.inputs[0]]
        lo, hi = _act_bounds((n.attrs["lo"], n.attrs["hi"]), x.qtype, float(x.scale))
        self.add_tensor(n.output, x.qtype, x.scale)
        return QNode("clip", n.name, n.inputs, n.output, {"lo": lo, "hi": hi})

    def passthrough(self, n: Node) -> QNode:
        """maxpool, flatten and reshape keep the input's integer type and scale."""
        x = self.t[n.inputs[0]]
        attrs = dict(n.attrs)
        if n.op in ("flatten", "reshape"):
            attrs = {"shape": tuple(self.g.shapes[n.output])}
        if x.scale.ndim and n.op not in ("maxpool", "clip") and (
                n.op not in ("flatten", "reshape")
                or self.g.shapes[n.output][1] != x.scale.shape[0]):
            raise UnsupportedOpError(f"node {n.name!r} ({n.op}) moves the channels of a "
                                     "per-channel tensor; not supported")
        self.add_tensor(n.output, x.qtype, x.scale)
        return QNode(n.op, n.name, n.inputs, n.output, attrs, dict(n.params))

    def pool(self, n: Node) -> QNode:
        x = self.t[n.inputs[0]]
        qt = QType(self.out_bits(n.output), x.qtype.signed)
        sy = self.calibrated(n.output, qt)
        if n.op == "gap":
            h, w = self.g.shapes[n.inputs[0]][2:]
            if self.refuse_overflow:
                _window_sum_check(n, int(h) * int(w), x.qtype, "global sum")
            count = h * w if n.attrs.get("mean", True) else 1
            m, r, s = dyadic(float(x.scale) / (sy * count))
            attrs: dict = {"keepdims": bool(n.attrs.get("keepdims", True))}
        else:
            oh, ow = self.g.shapes[n.output][2:]
            kh, kw = n.attrs["kernel"]
            if self.refuse_overflow:
                _window_sum_check(n, int(kh) * int(kw), x.qtype, "window sum")
            cnt = _window_counts(self.g.shapes[n.inputs[0]][2:], (oh, ow), n.attrs)
            (m,), r, s = shared_shift([float(x.scale) / (sy * cnt)])
            m = m.reshape(1, 1, oh, ow)
            attrs = {k: tuple(n.attrs[k]) for k in ("kernel", "strides", "pads")}
        self.add_tensor(n.output, qt, sy)
        attrs.update(lo=qt.qmin, hi=qt.qmax)
        return QNode(n.op, n.name, n.inputs, n.output, attrs, {"m": m, "r": r, "s": s})

    def concat(self, n: Node) -> QNode:
        ins = [self.t[i] for i in n.inputs]
        qt = QType(self.out_bits(n.output), any(i.qtype.signed for i in ins))
        sy = self.calibrated(n.output, qt)
        params, identity = {}, []
        for k, x in enumerate(ins):
            same = x.qtype == qt and math.isclose(float(x.scale), sy, rel_tol=0, abs_tol=0)
            identity.append(same)
            if not same:
                m, r, s = dyadic(float(x.scale) / sy)
                params.update({f"m{k}": m, f"r{k}": r, f"s{k}": s})
        self.add_tensor(n.output, qt, sy)
        return QNode("concat", n.name, n.inputs, n.output,
                     {"axis": int(n.attrs["axis"]), "identity": tuple(identity),
                      "lo": qt.qmin, "hi": qt.qmax}, params)


def _window_counts(in_hw: tuple[int, int], out_hw: tuple[int, int], attrs: Mapping) -> np.ndarray:
    """Divisor of each avg-pool output position (ONNX count_include_pad semantics)."""
    (kh, kw), (sh, sw), (pt, pl, pb, pr) = attrs["kernel"], attrs["strides"], attrs["pads"]
    cnt = np.zeros(out_hw, np.float64)
    for i in range(out_hw[0]):
        h0 = i * sh - pt
        for j in range(out_hw[1]):
            w0 = j * sw - pl
            if attrs.get("count_include_pad", False):
                # padded positions count, positions past the explicit pad (ceil_mode) do not
                hh = min(h0 + kh, in_hw[0] + pb) - max(h0, -pt)
                ww = min(w0 + kw, in_hw[1] + pr) - max(w0, -pl)
            else:
                hh = min(h0 + kh, in_hw[0]) - max(h0, 0)
                ww = min(w0 + kw, in_hw[1]) - max(w0, 0)
            cnt[i, j] = hh * ww
    return cnt


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
    handlers = {"conv": q.conv_or_dense, "dense": q.conv_or_dense, "add": q.add,
                "mul": q.mul, "affine": q.affine, "lut": q.lut, "lrn": q.lrn, "pad": q.pad,
                "clip": q.clip, "avgpool": q.pool, "gap": q.pool, "concat": q.concat,
                **{op: q.passthrough for op in ("maxpool", "flatten", "reshape", "transpose",
                                                "slice", "gather")}}
    nodes, softmax_axis, out = [], None, graph.output
    for n in graph.nodes:
        if n.op == "softmax":
            if n.output != graph.output:
                raise UnsupportedOpError(f"node {n.name!r} (Softmax) must be the last node")
            softmax_axis, out = int(n.attrs.get("axis", -1)), n.inputs[0]
            continue
        if n.op not in handlers:
            raise UnsupportedOpError(f"node {n.name!r} (op {n.op}) has no integer lowering")
        nodes.append(handlers[n.op](n))
    if not nodes:
        raise UnsupportedOpError(f"{graph.source or 'model'}: nothing to compute in integers "
                                 "(the model is an identity, a dropout or a lone softmax)")
    return QGraph(qin, tuple(nodes), q.t[out], dict(q.t), softmax_axis, graph.source)
