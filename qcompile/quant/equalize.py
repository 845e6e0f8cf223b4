"""Cross-layer equalization, bias absorption and empirical bias correction.

Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction", for depthwise-separable nets (MobileNetV2, EfficientNet-Lite).

``equalize`` (float graph -> float graph, same function)
    For every chain ``conv1 -> [act] -> conv2`` (also dense -> dense) where conv1's
    output has exactly one reader and ``act`` is None, ReLU (0, inf) or a clip
    (0, hi) such as ReLU6, channel i of conv1's output is divided by
    ``s_i = sqrt(r1_i / r2_i)`` (r1: range max|w| of conv1's output channel i, r2: of
    conv2's input channel i, for a depthwise conv2 its own channel) and conv2's
    input channel i is multiplied by it.  Pairs share layers (expand -> depthwise ->
    project is two pairs: the depthwise's output channels are rescaled by the second
    pair), so the pass repeats until no scale moves by more than ``tol``.

    ReLU commutes with a positive scale.  ReLU6 does not: ``min(z/s, 6) ==
    min(z, 6)/s`` holds for every z in [lo, hi] iff either s == 1 or the clip never
    fires on both sides, i.e. ``hi <= 6`` and ``hi / s <= 6``.  The clip bound is one
    number per tensor (the integer graph has per-tensor ``lo``/``hi``), so it cannot
    become ``6 / s_i`` per channel, and replacing ReLU6 by ReLU (AIMET) changes the
    float model.  The decision here: **a channel whose pre-activation can reach the
    clip (hi_i > 6) keeps s_i = 1; any other channel gets s_i clamped to
    s_i >= hi_i / 6**, which is exact for every input whose pre-activations stay in
    the known ranges.  The ranges come from calibration data when the caller passes
    them (``ranges=``, measured by ``preactivation_ranges``; ``margin`` widens them),
    else from interval arithmetic when conv1 reads a tensor with finite bounds (a
    ReLU6 output: then exactness holds for *every* input); a clipped channel with no
    known range is not touched.  The clamp only ever *raises* small channels toward
    the clip, which is what a per-tensor activation scale wants anyway.

    Bias absorption (the paper's section 4.2) then moves ``c_i`` of conv1's bias
    into conv2's bias through W2: ``c_i = max(0, lo_i)`` after ReLU (and after a clip
    when the channel never reaches it), the midpoint of a calibrated range with no
    activation.  With
    a data range that is exact for inputs in the range (an input below lo_i would
    see max(z, c_i) instead of max(z, 0)); it is skipped when conv2 pads (the padded
    zeros would not carry c) and when no range is known.

    Measured on EfficientNet-Lite0 (``benchmarks/results/cle-effnet-lite0.md``): the
    data-free bounds let only ~7% of the channels behind a ReLU6 move, and with
    per-output-channel weight scales (invariant to the per-channel rescaling of conv1,
    and of a depthwise conv2) the paper's weight-range criterion buys little; the
    calibrated-range variant changed the float top-1 on 4% of unseen crops and
    quantized worse, so it stays opt-in (``equalize_calibrated(data_ranges=True)``).

``bias_correction`` (QGraph -> QGraph, only bias integers change)
    Empirical: for each qconv/qdense in graph order, ``E[y_float - y_quant]`` per
    output channel over calibration inputs, where y is the pre-activation (the
    float graph's conv output before its activation; the dequantized int32
    accumulator), is added to the int32 bias as ``round(delta / (s_w * s_x))``.  One
    sequential sweep: the integer graph is executed node by node on all samples with
    the NumPy oracle's own ops, so every layer is corrected against inputs that
    already went through the corrected layers before it.  The raw last layer (int32
    logits) is corrected the same way; a channel whose corrected bias would leave
    int32 or push the accumulator bound past int32 keeps its old bias.  ``s_w * s_x``
    is read off the QGraph (the raw output scale, or the requant multiplier times the
    output scale), so it holds whatever rounding (nearest, GPTQ) chose the weights.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np

from qcompile.frontend.onnx_export import canonical_onnx
from qcompile.ir.graph import Graph, Node, layer_nodes
from qcompile.quant.calibrate import FloatRunner, collect_stats
from qcompile.quant.quantize import calibration_tensors
from qcompile.quant.readers import iter_inputs
from qcompile.verify import oracle
from qcompile.ir.qgraph import QGraph, QNode

if TYPE_CHECKING:
    import onnx

# (lo, hi) per output channel of a conv/dense *pre-activation*, keyed by node name.
Ranges = Mapping[str, tuple[np.ndarray, np.ndarray]]
_LAYERS = ("conv", "dense")
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


# --------------------------------------------------------------------------- pairs

def _ok_act(act: tuple[float, float] | None) -> bool:
    """None, ReLU (0, inf) or a clip (0, hi): positively homogeneous below the clip."""
    return act is None or (act[0] == 0.0 and act[1] > 0)


def equalization_pairs(graph: Graph) -> list[tuple[str, str]]:
    """(conv1, conv2) node names where conv1 -> [act] -> conv2 can be equalized."""
    uses = Counter(t for n in graph.nodes for t in n.inputs)
    uses[graph.output] += 1
    by_out = {n.output: n for n in graph.nodes}
    pairs = []
    for n2 in graph.nodes:
        if n2.op not in _LAYERS or not n2.inputs:
            continue
        n1 = by_out.get(n2.inputs[0])
        if n1 is None or n1.op != n2.op or uses[n1.output] != 1 or not _ok_act(n1.attrs["act"]):
            continue
        if n1.params["w"].shape[0] != _in_channels(n2):
            continue
        pairs.append((n1.name, n2.name))
    return pairs


def _in_channels(n: Node) -> int:
    w = n.params["w"]
    return w.shape[1] * int(n.attrs.get("group", 1)) if n.op == "conv" else w.shape[1]


def _out_range(w: np.ndarray) -> np.ndarray:
    return np.abs(w.reshape(w.shape[0], -1)).max(axis=1)


def _in_view(w: np.ndarray, group: int) -> np.ndarray:
    """w (O, I/g, ...) as (g, O/g, I/g, k) so input channel c = gi * I/g + j is [gi, :, j]."""
    o, ipg = w.shape[:2]
    return w.reshape(group, o // group, ipg, -1)


def _in_range(n: Node, w: np.ndarray) -> np.ndarray:
    if n.op == "dense":
        return np.abs(w).max(axis=0)
    v = np.abs(_in_view(w, int(n.attrs["group"])))
    return v.max(axis=(1, 3)).reshape(-1)  # (g, ipg) -> channel order


def _scale_in(n: Node, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """w with input channel c multiplied by s[c]."""
    if n.op == "dense":
        return w * s[None, :]
    g = int(n.attrs["group"])
    v = _in_view(w, g) * s.reshape(g, 1, -1, 1)
    return v.reshape(w.shape)


def _absorb_into(n: Node, w: np.ndarray, c: np.ndarray) -> np.ndarray:
    """The bias change of conv2 when its input channel c_i grows by c[i] everywhere."""
    if n.op == "dense":
        return w @ c
    g = int(n.attrs["group"])
    v = _in_view(w, g)  # (g, og, ipg, k)
    return np.einsum("gojk,gj->go", v, c.reshape(g, -1)).reshape(-1)


def _per_channel(w: np.ndarray, v: np.ndarray) -> np.ndarray:
    return v.reshape((-1,) + (1,) * (w.ndim - 1))


def _mul(w: np.ndarray, v: np.ndarray) -> np.ndarray:
    """w * v with 0 * inf = 0 (a zero weight ignores an unbounded input)."""
    with np.errstate(invalid="ignore"):
        return np.where(w == 0, 0.0, w * v)


def _layer_interval(n: Node, x: tuple[np.ndarray, np.ndarray], cin: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Bounds of each output channel of w.x + b when input channel c lies in x[c]."""
    lo, hi = (np.broadcast_to(v, (cin,)).astype(np.float64) for v in x)
    w = n.params["w"].astype(np.float64)
    if n.op == "conv":
        if any(n.attrs["pads"]):  # padded positions read zeros
            lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
        o, ipg = w.shape[:2]
        g = int(n.attrs["group"])
        idx = (np.arange(o) // (o // g))[:, None] * ipg + np.arange(ipg)[None, :]  # (O, ipg)
        lo_, hi_ = lo[idx][..., None], hi[idx][..., None]
        w = w.reshape(o, ipg, -1)
        axes: tuple[int, ...] = (1, 2)
    else:
        lo_, hi_, axes = lo[None, :], hi[None, :], (1,)
    a, b = _mul(w, lo_), _mul(w, hi_)
    bias = n.params["b"].astype(np.float64)
    return bias + np.minimum(a, b).sum(axes), bias + np.maximum(a, b).sum(axes)


def _clip(x: tuple[np.ndarray, np.ndarray] | None, act: Any) -> tuple[np.ndarray, np.ndarray] | None:
    if act is None:
        return x
    lo, hi = (-np.inf, np.inf) if x is None else x
    return np.clip(lo, act[0], act[1]), np.clip(hi, act[0], act[1])


def interval_ranges(graph: Graph, input_range: tuple[float, float] | None = None
                    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Data-free per-channel bounds of every conv/dense *pre-activation*, by interval
    arithmetic from ``input_range`` (unknown when None) through conv/dense/add/clip/
    pools; fused activations bound their outputs whatever their inputs.  Valid for
    every input in ``input_range``; layers whose bound is unknown are left out."""
    box: dict[str, tuple[np.ndarray, np.ndarray] | None] = {
        graph.input: None if input_range is None else
        (np.array([float(input_range[0])]), np.array([float(input_range[1])]))}
    out = {}
    for n in graph.nodes:
        ins = [box.get(t) for t in n.inputs]
        chans = [graph.shapes[t][1] if len(graph.shapes[t]) > 1 else 1 for t in n.inputs]
        act = n.attrs.get("act")
        y = None
        if n.op in _LAYERS:
            if ins[0] is not None:
                y = _layer_interval(n, ins[0], chans[0])
                if np.all(np.isfinite(y[0])) and np.all(np.isfinite(y[1])):
                    out[n.name] = y
        elif n.op == "add" and all(v is not None for v in ins):
            lo = hi = 0.0
            for sg, (a, b) in zip(n.attrs.get("signs", (1,) * len(ins)), ins):
                lo, hi = (lo + a, hi + b) if sg > 0 else (lo - b, hi - a)
            y = (lo, hi)
        elif n.op == "clip":
            y = _clip(ins[0], (n.attrs["lo"], n.attrs["hi"]))
        elif n.op in ("maxpool", "flatten", "reshape") or (n.op == "gap" and n.attrs.get("mean", True)):
            same = graph.shapes[n.output][1] == chans[0] if len(graph.shapes[n.output]) > 1 else False
            y = ins[0] if same or ins[0] is None or np.size(ins[0][0]) == 1 else None
        elif n.op == "avgpool" and ins[0] is not None:
            y = (np.minimum(ins[0][0], 0.0), np.maximum(ins[0][1], 0.0))
        box[n.output] = _clip(y, act) if (y is not None or act is not None) else None
    return out


# --------------------------------------------------------------------------- equalize

def equalize(graph: Graph, *, iterations: int = 10, ranges: Ranges | None = None,
             absorb: bool = True, margin: float = 0.0, tol: float = 1e-3,
             input_range: tuple[float, float] | None = None, linear: bool = True,
             clipped: bool = True) -> Graph:
    """Cross-layer equalization (+ bias absorption); the float function is unchanged
    (exactly for ReLU/linear pairs, on the known ranges for clipped channels).

    ``ranges``: pre-activation (lo, hi) per channel of layers, from calibration
    (``preactivation_ranges``); layers without one use ``interval_ranges``.
    ``margin`` widens every data range by that fraction of its width on both sides.
    ``input_range``: bounds of the graph input for the interval arithmetic.
    ``linear`` / ``clipped``: also equalize pairs with no activation / a ReLU6-like clip.
    """
    pairs = equalization_pairs(graph)
    acts = {n.name: n.attrs.get("act") for n in graph.nodes}
    pairs = [(a, b) for a, b in pairs
             if (linear or acts[a] is not None)
             and (clipped or acts[a] is None or not np.isfinite(acts[a][1]))]
    if not pairs:
        return graph
    nodes = {n.name: n for n in graph.nodes}
    w = {k: nodes[k].params["w"].astype(np.float64) for p in pairs for k in p}
    b = {k: nodes[k].params["b"].astype(np.float64) for p in pairs for k in p}
    known: dict[str, tuple[np.ndarray, np.ndarray]] = dict(interval_ranges(graph, input_range))
    for k, (lo, hi) in (ranges or {}).items():
        lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
        pad = margin * (hi - lo)
        known[k] = (lo - pad, hi + pad)
    rng = {k: (known[k][0].copy(), known[k][1].copy()) for k, _ in pairs if k in known}

    for _ in range(iterations):
        moved = 0.0
        for k1, k2 in pairs:
            n1, n2 = nodes[k1], nodes[k2]
            r1, r2 = _out_range(w[k1]), _in_range(n2, w[k2])
            with np.errstate(divide="ignore", invalid="ignore"):
                s = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / r2), 1.0)
            act = n1.attrs["act"]
            if act is not None and np.isfinite(act[1]):  # ReLU6-like: see the docstring
                if k1 not in rng:
                    continue
                hi = rng[k1][1]
                s = np.where(hi > act[1], 1.0, np.maximum(s, hi / act[1]))
                s = np.where(s > 0, s, 1.0)
            w[k1] = w[k1] / _per_channel(w[k1], s)
            b[k1] = b[k1] / s
            w[k2] = _scale_in(n2, w[k2], s)
            if k1 in rng:
                rng[k1] = (rng[k1][0] / s, rng[k1][1] / s)
            moved = max(moved, float(np.abs(np.log(s)).max()))
        if moved < tol:
            break

    if absorb:
        for k1, k2 in pairs:
            n1, n2 = nodes[k1], nodes[k2]
            act = n1.attrs["act"]
            if k1 not in rng or (n2.op == "conv" and any(n2.attrs["pads"])) or (
                    act is None and k1 not in (ranges or {})):
                continue  # (a loose interval's midpoint is no centre of the data)
            lo, hi = rng[k1]
            if act is None:
                c = (lo + hi) / 2
            else:
                c = np.maximum(lo, 0.0)
                if np.isfinite(act[1]):
                    c = np.where(hi <= act[1], c, 0.0)
            b[k1] = b[k1] - c
            b[k2] = b[k2] + _absorb_into(n2, w[k2], c)
            rng[k1] = (lo - c, hi - c)

    new = [n.with_(params={**n.params, "w": w[n.name].astype(np.float32),
                           "b": b[n.name].astype(np.float32)}) if n.name in w else n
           for n in graph.nodes]
    return graph.with_nodes(new)


# --------------------------------------------------------------------------- float runs

def canonical_model(graph: Graph) -> "onnx.ModelProto":
    """The canonical graph as a self-contained ONNX model (weights as initializers)."""
    from onnx import numpy_helper


    m = canonical_onnx(graph)
    names = {f"{n.name}::w": n for n in layer_nodes(graph)}
    keep = [i for i in m.graph.input if i.name not in names]
    del m.graph.input[:]
    m.graph.input.extend(keep)
    m.graph.initializer.extend(numpy_helper.from_array(np.asarray(n.params["w"], np.float32), k)
                               for k, n in names.items())
    return m


def _channel_axes(ndim: int) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if i != 1)


def preactivation_ranges(graph: Graph, batches: Any, layers: Sequence[str] | None = None
                         ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel (min, max) of each layer's pre-activation over ``batches`` (arrays,
    or a reader with ``get_next``), run in onnxruntime on the canonical graph."""

    names = list(layers) if layers is not None else [
        n.name for n in graph.nodes if n.op in _LAYERS]
    runner = FloatRunner(canonical_model(graph), [f"{k}::pre" for k in names])
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for x in _iter_batches(batches):
        vals = runner.run(x)
        for k in names:
            v = vals[f"{k}::pre"]
            lo, hi = v.min(axis=_channel_axes(v.ndim)), v.max(axis=_channel_axes(v.ndim))
            if k in out:
                lo, hi = np.minimum(out[k][0], lo), np.maximum(out[k][1], hi)
            out[k] = (lo.astype(np.float64), hi.astype(np.float64))
    return out


def _iter_batches(batches: Any, batch_size: int = 8) -> Iterator[np.ndarray]:
    if isinstance(batches, np.ndarray):
        for i in range(0, len(batches), batch_size):
            yield batches[i:i + batch_size]
        return
    if hasattr(batches, "get_next"):
        yield from iter_inputs(batches)
        return
    yield from batches


def equalize_calibrated(graph: Graph, reader: Any, calib: Any, progress: bool = False, *,
                        data_ranges: bool = False, **kwargs: Any) -> tuple[Graph, dict]:
    """``equalize`` (with pre-activation ranges measured on the calibration ``reader``
    when ``data_ranges``, else data-free), then the activation statistics
    ``quantize_graph`` needs, measured on the equalized graph."""

    ranges = preactivation_ranges(graph, reader) if data_ranges else None
    eq = equalize(graph, ranges=ranges, **kwargs)
    stats = collect_stats(canonical_model(eq), calibration_tensors(eq), reader, calib.method,
                          calib, progress)
    return eq, stats


# --------------------------------------------------------------------------- bias correction

def bias_correction(graph: Graph, qg: QGraph, x: np.ndarray, *, batch_size: int = 8) -> QGraph:
    """Empirical bias correction of every qconv/qdense of ``qg`` (quantized from the
    float ``graph``) on calibration inputs ``x``; see the module docstring."""

    layers = [n.name for n in qg.nodes if n.op in ("qconv", "qdense")]
    fmean = _float_means(graph, x, layers, batch_size)
    chunks = [slice(i, i + batch_size) for i in range(0, len(x), batch_size)]
    uses = Counter(t for n in qg.nodes for t in n.inputs)
    env = {qg.input.name: oracle.quantize_input(qg, x)}
    oracle.check_exact(qg)
    nodes: list[QNode] = []
    for n in qg.nodes:
        if n.op in ("qconv", "qdense"):
            n = _correct(n, qg, env[n.inputs[0]], fmean[n.name], chunks, oracle.OPS[n.op])
        nodes.append(n)
        dtype = qg.tensors[n.output].qtype.dtype
        env[n.output] = np.concatenate(
            [oracle.OPS[n.op](n, *(env[i][c] for i in n.inputs)).astype(dtype) for c in chunks])
        for i in n.inputs:
            uses[i] -= 1
            if uses[i] == 0 and i != qg.output.name:
                env.pop(i, None)
    return dataclasses.replace(qg, nodes=tuple(nodes))


def _float_means(graph: Graph, x: np.ndarray, layers: list[str], batch_size: int
                 ) -> dict[str, np.ndarray]:

    runner = FloatRunner(canonical_model(graph), [f"{k}::pre" for k in layers])
    sums: dict[str, np.ndarray] = {}
    count: dict[str, int] = {}
    for xb in _iter_batches(x, batch_size):
        vals = runner.run(xb)
        for k in layers:
            v = vals[f"{k}::pre"].astype(np.float64)
            sums[k] = sums.get(k, 0.0) + v.sum(axis=_channel_axes(v.ndim))
            count[k] = count.get(k, 0) + v.size // v.shape[1]
    return {k: sums[k] / count[k] for k in layers}


def _unit(n: QNode, qg: QGraph) -> np.ndarray:
    """s_w * s_x per output channel, read off the QGraph itself (whatever rounding made
    the weights): the raw layer's output scale, else m * 2^-s * s_y (to 2^-30)."""
    if n.attrs["raw"]:
        return np.broadcast_to(qg.tensors[n.output].scale, n.params["bias"].size).astype(np.float64)
    p = n.params
    m, s = p["m"].reshape(-1).astype(np.float64), p["s"].reshape(-1)
    unit = np.ldexp(m, -s.astype(np.int64)) * float(qg.tensors[n.output].scale)
    return np.broadcast_to(unit, n.params["bias"].size)


def _correct(n: QNode, qg: QGraph, xq: np.ndarray, fmean: np.ndarray,
             chunks: list[slice], op: Any) -> QNode:
    """``n`` with its bias shifted by the mean float-minus-quantized pre-activation."""
    raw = QNode(n.op, n.name, n.inputs, n.output, {**n.attrs, "raw": True}, n.params)
    total, count = 0.0, 0
    for c in chunks:
        acc = op(raw, xq[c]).astype(np.float64)
        total = total + acc.sum(axis=_channel_axes(acc.ndim))
        count += acc.size // acc.shape[1]
    xt = qg.tensors[n.inputs[0]]
    unit = _unit(n, qg)  # the accumulator's real value per integer step
    with np.errstate(divide="ignore", invalid="ignore"):
        delta = np.where(unit > 0, np.round((fmean - total / count * unit) / unit), 0.0)
    bias = n.params["bias"].reshape(-1).astype(np.int64)
    new = bias + delta.astype(np.int64)
    w = n.params["w"]
    w = w.T if n.op == "qdense" else w.reshape(w.shape[0], -1)  # (out, K)
    xmax = max(-xt.qtype.qmin, xt.qtype.qmax)
    wsum = np.abs(w.astype(np.int64)).sum(axis=1) * xmax
    old_bound = int(n.attrs["acc_bound"])
    ok = (new >= INT32_MIN) & (new <= INT32_MAX) & (wsum + np.abs(new) <= max(old_bound, INT32_MAX))
    new = np.where(ok, new, bias)
    bound = int((wsum + np.abs(new)).max())
    params = {**n.params, "bias": new.astype(np.int32).reshape(n.params["bias"].shape)}
    return QNode(n.op, n.name, n.inputs, n.output, {**n.attrs, "acc_bound": bound}, params)
