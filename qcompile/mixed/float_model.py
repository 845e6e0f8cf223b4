"""Canonical float ``Graph`` -> float Relax module with its weights as parameters.

Sensitivity needs gradients of a loss w.r.t. every conv/dense weight, so the
weights are function *parameters* (biases stay constants), and the module has

- ``forward(x, *weights) -> logits``;
- ``loss(x, labels, sample_weight, *weights) -> sum_n sample_weight[n] * CE_n``,
  a weighted sum so chunks padded to the static batch add up to a plain mean;
- ``loss_adjoint`` (``relax.transform.Gradient`` of ``loss``) ``-> (loss, grads)``.

A trailing softmax is dropped: the loss takes logits.  Every op is emitted with
Relax ops that have a registered gradient in TVM 0.27 (``tvm/relax/op/_op_gradient.py``):
conv2d, matmul, max/avg_pool2d, relu, add/subtract/multiply/divide/power,
maximum/minimum (clip), where + comparisons (piecewise functions), exp/log/sqrt/
sigmoid/tanh/sin/cos/abs/negative, mean/sum, permute_dims, reshape, concat, take,
log_softmax, nll_loss.  Data movement without a gradient of its own is rewritten:
constant pad = concat with constant blocks, slice and gather = ``take`` per axis, the
LRN window sum = an average pool over channels.  Lookup-table functions are their
closed forms (Erf and exact Gelu through Abramowitz-Stegun 7.1.26, |error| < 1.5e-7).
Floor, Ceil and Round have no such expression and are refused with a pointer to the
forward-only ``kl`` method, as is any op missing here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import tvm
from tvm import relax

from qcompile.build.compile import compile_float
from qcompile.errors import UnsupportedOpError
from qcompile.errors import error_line
from qcompile.ir.graph import Graph, Node, layer_nodes
from qcompile.hw.backends import make_target
from qcompile.tvm_compat import PrimFunc, Schedule, dlight, normalize_prim_func

Emitter = Callable[[relax.BlockBuilder, Node, list[relax.Expr], "_Ctx"], relax.Expr]


@dataclass(frozen=True)
class FloatModule:
    """The Relax module plus what callers need to feed it."""

    mod: tvm.IRModule
    layers: tuple[str, ...]           # layer (node) names, in weight-parameter order
    weights: tuple[np.ndarray, ...]   # BN-folded float weights, same order
    batch: int
    num_classes: int
    dtype: str


@dataclass(frozen=True)
class _Ctx:
    graph: Graph
    batch: int
    dtype: str
    weight: dict[str, relax.Var]  # layer name -> its weight parameter


# --- one emitter per canonical op ----------------------------------------------------
def _const(v: np.ndarray | float, dtype: str) -> relax.Constant:
    return relax.const(np.asarray(v, dtype=dtype), dtype)


def _act(bb: relax.BlockBuilder, y: relax.Expr, act: tuple[float, float] | None,
         dtype: str) -> relax.Expr:
    # relax.clip has no registered gradient; relu / maximum / minimum do.
    if act is None:
        return y
    lo, hi = act
    if lo == 0 and math.isinf(hi):
        return bb.emit(relax.op.nn.relu(y))
    if math.isfinite(lo):
        y = bb.emit(relax.op.maximum(y, _const(lo, dtype)))
    if math.isfinite(hi):
        y = bb.emit(relax.op.minimum(y, _const(hi, dtype)))
    return y


def _conv(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: _Ctx) -> relax.Expr:
    a = n.attrs
    y = bb.emit(relax.op.nn.conv2d(xs[0], c.weight[n.name], strides=tuple(a["strides"]),
                                   padding=tuple(a["pads"]), dilation=tuple(a["dilations"]),
                                   groups=int(a["group"])))
    b = n.params["b"].reshape(1, -1, 1, 1)
    return _act(bb, bb.emit(relax.op.add(y, _const(b, c.dtype))), a["act"], c.dtype)


def _dense(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: _Ctx) -> relax.Expr:
    wt = bb.emit(relax.op.permute_dims(c.weight[n.name], [1, 0]))
    y = bb.emit(relax.op.add(bb.emit(relax.op.matmul(xs[0], wt)), _const(n.params["b"], c.dtype)))
    return _act(bb, y, n.attrs["act"], c.dtype)


def _add(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: _Ctx) -> relax.Expr:
    """sum_i sign_i * x_i with NumPy broadcasting (Sub is signs (1, -1))."""
    signs = tuple(n.attrs.get("signs", (1,) * len(xs)))
    y = xs[0] if signs[0] > 0 else bb.emit(relax.op.negative(xs[0]))
    for sg, x in zip(signs[1:], xs[1:]):
        y = bb.emit(relax.op.add(y, x) if sg > 0 else relax.op.subtract(y, x))
    return _act(bb, y, n.attrs["act"], c.dtype)


def _mul(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: _Ctx) -> relax.Expr:
    return _act(bb, bb.emit(relax.op.multiply(xs[0], xs[1])), n.attrs["act"], c.dtype)


def _affine(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: _Ctx) -> relax.Expr:
    # Both always: a constant may broadcast the output beyond x's shape.
    y = bb.emit(relax.op.multiply(xs[0], _const(n.params["scale"], c.dtype)))
    y = bb.emit(relax.op.add(y, _const(n.params["shift"], c.dtype)))
    return _act(bb, y, n.attrs["act"], c.dtype)


class _Fn:
    """Float closed forms of the lookup-table functions, one emitted op at a time."""

    def __init__(self, bb: relax.BlockBuilder, dtype: str) -> None:
        self.bb, self.dtype = bb, dtype

    def k(self, v: float) -> relax.Constant:
        return _const(v, self.dtype)

    def e(self, expr: relax.Expr) -> relax.Expr:
        return self.bb.emit(expr)

    def add(self, a: relax.Expr, b: relax.Expr | float) -> relax.Expr:
        return self.e(relax.op.add(a, b if isinstance(b, relax.Expr) else self.k(b)))

    def mul(self, a: relax.Expr, b: relax.Expr | float) -> relax.Expr:
        return self.e(relax.op.multiply(a, b if isinstance(b, relax.Expr) else self.k(b)))

    def max0(self, x: relax.Expr) -> relax.Expr:
        return self.e(relax.op.maximum(x, self.k(0.0)))

    def min0(self, x: relax.Expr) -> relax.Expr:
        return self.e(relax.op.minimum(x, self.k(0.0)))

    def where(self, cond: relax.Expr, a: relax.Expr | float, b: relax.Expr | float
              ) -> relax.Expr:
        a = a if isinstance(a, relax.Expr) else self.k(a)
        b = b if isinstance(b, relax.Expr) else self.k(b)
        return self.e(relax.op.where(cond, a, b))

    def cmp(self, op: Callable, x: relax.Expr, v: float) -> relax.Expr:
        return self.e(op(x, self.k(v)))

    def hard_sigmoid(self, x: relax.Expr, alpha: float, beta: float) -> relax.Expr:
        y = self.add(self.mul(x, alpha), beta)
        return self.e(relax.op.minimum(self.max0(y), self.k(1.0)))

    def elu(self, x: relax.Expr, alpha: float) -> relax.Expr:
        neg = self.mul(self.add(self.e(relax.op.exp(self.min0(x))), -1.0), alpha)
        return self.where(self.cmp(relax.op.greater, x, 0.0), x, neg)

    def softplus(self, x: relax.Expr) -> relax.Expr:
        # max(x, 0) + log(1 + exp(-|x|)): no overflow for large |x|
        t = self.e(relax.op.exp(self.e(relax.op.negative(self.e(relax.op.abs(x))))))
        return self.add(self.max0(x), self.e(relax.op.log(self.add(t, 1.0))))

    def erf(self, x: relax.Expr) -> relax.Expr:
        """Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7); Relax's erf has no gradient."""
        ax = self.e(relax.op.abs(x))
        t = self.e(relax.op.divide(self.k(1.0), self.add(self.mul(ax, 0.3275911), 1.0)))
        poly = self.k(1.061405429)
        for a in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
            poly = self.add(self.mul(t, poly), a)
        poly = self.mul(t, poly)
        g = self.e(relax.op.exp(self.e(relax.op.negative(self.mul(ax, ax)))))
        y = self.add(self.e(relax.op.negative(self.mul(poly, g))), 1.0)  # erf(|x|)
        return self.where(self.cmp(relax.op.greater_equal, x, 0.0), y,
                          self.e(relax.op.negative(y)))

    def __call__(self, fn: str, x: relax.Expr, a: Mapping[str, Any],
                 slope: relax.Expr | None) -> relax.Expr:
        f = lambda key, default: float(a.get(key, default))  # noqa: E731
        if fn == "PRelu":
            return self.where(self.cmp(relax.op.greater_equal, x, 0.0), x, self.mul(x, slope))
        if fn == "Sigmoid":
            return self.e(relax.op.sigmoid(x))
        if fn == "HardSigmoid":
            return self.hard_sigmoid(x, f("alpha", 0.2), f("beta", 0.5))
        if fn == "HardSwish":
            return self.mul(x, self.hard_sigmoid(x, 1 / 6, 0.5))
        if fn == "Tanh":
            return self.e(relax.op.tanh(x))
        if fn == "LeakyRelu":
            return self.where(self.cmp(relax.op.greater_equal, x, 0.0), x,
                              self.mul(x, f("alpha", 0.01)))
        if fn == "Elu":
            return self.elu(x, f("alpha", 1.0))
        if fn == "Celu":
            al = f("alpha", 1.0)
            e = self.e(relax.op.exp(self.mul(self.min0(x), 1.0 / al)))
            return self.add(self.max0(x), self.min0(self.mul(self.add(e, -1.0), al)))
        if fn == "Selu":
            return self.mul(self.elu(x, f("alpha", 1.6732632423543772)),
                            f("gamma", 1.0507009873554805))
        if fn == "ThresholdedRelu":
            return self.where(self.cmp(relax.op.greater, x, f("alpha", 1.0)), x, 0.0)
        if fn == "Gelu":
            if a.get("approximate", "none") == "tanh":
                inner = self.mul(self.add(self.mul(self.mul(self.mul(x, x), x), 0.044715), x),
                                 math.sqrt(2.0 / math.pi))
                return self.mul(self.mul(x, self.add(self.e(relax.op.tanh(inner)), 1.0)), 0.5)
            return self.mul(self.mul(x, self.add(self.erf(self.mul(x, 1 / math.sqrt(2.0))), 1.0)),
                            0.5)
        if fn == "Softplus":
            return self.softplus(x)
        if fn == "Softsign":
            return self.e(relax.op.divide(x, self.add(self.e(relax.op.abs(x)), 1.0)))
        if fn == "Mish":
            return self.mul(x, self.e(relax.op.tanh(self.softplus(x))))
        if fn == "Erf":
            return self.erf(x)
        if fn == "Reciprocal":
            return self.e(relax.op.divide(self.k(1.0), x))
        if fn == "Sign":
            return self.where(self.cmp(relax.op.greater, x, 0.0), 1.0,
                              self.where(self.cmp(relax.op.less, x, 0.0), -1.0, 0.0))
        if fn == "Shrink":
            lam, bias = f("lambd", 0.5), f("bias", 0.0)
            inner = self.where(self.cmp(relax.op.greater, x, lam), self.add(x, -bias), 0.0)
            return self.where(self.cmp(relax.op.less, x, -lam), self.add(x, bias), inner)
        direct = {"Exp": relax.op.exp, "Log": relax.op.log, "Sqrt": relax.op.sqrt,
                  "Abs": relax.op.abs, "Neg": relax.op.negative, "Sin": relax.op.sin,
                  "Cos": relax.op.cos}
        if fn in direct:
            return self.e(direct[fn](x))
        raise KeyError(fn)


# Table functions whose derivative is 0 almost everywhere but that Relax cannot
# express with registered gradients (no floor/round gradient, no stop-gradient op).
NO_GRADIENT_FUNCTIONS: frozenset[str] = frozenset({"Floor", "Ceil", "Round"})


def _lut(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: _Ctx) -> relax.Expr:
    fn, x = n.attrs["fn"], xs[0]
    if fn in NO_GRADIENT_FUNCTIONS:
        raise _unsupported(n, f"is the table function {fn}, which has no Relax gradient")
    slope = None
    if fn == "PRelu":
        rank = len(c.graph.shapes[n.inputs[0]])
        s = np.asarray(n.params["slope"]).reshape((1, -1) + (1,) * (rank - 2))
        slope = _const(s, c.dtype)
    try:
        y = _Fn(bb, c.dtype)(fn, x, n.attrs.get("fn_attrs", {}), slope)
    except KeyError:
        raise _unsupported(n, f"is the table function {fn}, which has no Relax "
                              "expression in qcompile's float builder") from None
    if n.attrs.get("times_x", False):
        y = bb.emit(relax.op.multiply(x, y))
    return _act(bb, y, n.attrs["act"], c.dtype)


def _clip(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: _Ctx) -> relax.Expr:
    return _act(bb, xs[0], (n.attrs["lo"], n.attrs["hi"]), c.dtype)


def _maxpool(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: _Ctx) -> relax.Expr:
    a = n.attrs
    return bb.emit(relax.op.nn.max_pool2d(xs[0], tuple(a["kernel"]), tuple(a["strides"]),
                                          tuple(a["pads"]), tuple(a["dilations"])))


def _avgpool(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: _Ctx) -> relax.Expr:
    a = n.attrs
    return bb.emit(relax.op.nn.avg_pool2d(xs[0], tuple(a["kernel"]), tuple(a["strides"]),
                                          tuple(a["pads"]),
                                          count_include_pad=bool(a["count_include_pad"])))


def _gap(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: _Ctx) -> relax.Expr:
    keep = bool(n.attrs.get("keepdims", True))
    reduce = relax.op.mean if n.attrs.get("mean", True) else relax.op.sum
    return bb.emit(reduce(xs[0], axis=[2, 3], keepdims=keep))


def _shape(c: _Ctx, tensor: str) -> tuple[int, ...]:
    """A tensor's shape at the module's static batch (graph shapes are at batch 1)."""
    return (c.batch, *c.graph.shapes[tensor][1:])


def _lrn(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: _Ctx) -> relax.Expr:
    """x * (bias + alpha/size * S)^-beta, S the sum of x^2 over the channel window
    [ch - (size-1)//2, ch + size//2]: an average pool over channels times size."""
    a, x = n.attrs, xs[0]
    size = int(a["size"])
    nb, ch, h, w = _shape(c, n.inputs[0])
    sq = bb.emit(relax.op.reshape(bb.emit(relax.op.multiply(x, x)), (nb, 1, ch, h * w)))
    win = bb.emit(relax.op.nn.avg_pool2d(sq, (size, 1), (1, 1),
                                         ((size - 1) // 2, 0, size // 2, 0),
                                         count_include_pad=True))
    s = bb.emit(relax.op.reshape(win, (nb, ch, h, w)))
    base = bb.emit(relax.op.add(bb.emit(relax.op.multiply(s, _const(float(a["alpha"]), c.dtype))),
                                _const(float(a["bias"]), c.dtype)))
    den = bb.emit(relax.op.power(base, _const(-float(a["beta"]), c.dtype)))
    return bb.emit(relax.op.multiply(x, den))


def _pad(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: _Ctx) -> relax.Expr:
    """Constant pad as a concat with constant blocks (nn.pad has no Relax gradient)."""
    pads, value = tuple(n.attrs["pads"]), float(n.attrs["value"])
    shape = list(_shape(c, n.inputs[0]))
    rank = len(shape)
    y = xs[0]
    for ax in range(rank):
        before, after = int(pads[ax]), int(pads[rank + ax])
        if not before and not after:
            continue
        parts = []
        for k in (before, after):
            blk = shape.copy()
            blk[ax] = k
            parts.append(_const(np.full(blk, value), c.dtype) if k else None)
        y = bb.emit(relax.op.concat([p for p in (parts[0], y, parts[1]) if p is not None],
                                    axis=ax))
        shape[ax] += before + after
    return y


def _transpose(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: _Ctx) -> relax.Expr:
    return bb.emit(relax.op.permute_dims(xs[0], [int(p) for p in n.attrs["perm"]]))


def _take(bb: relax.BlockBuilder, x: relax.Expr, idx: np.ndarray, axis: int) -> relax.Expr:
    # Indices are in range by construction; "clip" only avoids the "fast" mode warning.
    return bb.emit(relax.op.take(x, relax.const(np.asarray(idx, np.int64), "int64"), axis=axis,
                                 mode="clip"))


def _slice(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: _Ctx) -> relax.Expr:
    """x[begin:end:step] per axis as a take of the kept indices (no strided_slice gradient)."""
    a, y = n.attrs, xs[0]
    shape = c.graph.shapes[n.inputs[0]]
    for ax in range(1, len(shape)):  # axis 0 is the batch, never sliced
        idx = np.arange(shape[ax])[int(a["begin"][ax]):int(a["end"][ax]):int(a["step"][ax])]
        if len(idx) != shape[ax]:
            y = _take(bb, y, idx, ax)
    return y


def _gather(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: _Ctx) -> relax.Expr:
    y = xs[0]
    for ax in n.attrs["axes"]:
        y = _take(bb, y, n.params[f"idx{ax}"], int(ax))
    return y


def _reshape(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: _Ctx) -> relax.Expr:
    # Shapes were inferred at batch 1; dim 0 is the batch (as in lower.py).
    return bb.emit(relax.op.reshape(xs[0], _shape(c, n.output)))


def _concat(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: _Ctx) -> relax.Expr:
    return bb.emit(relax.op.concat(xs, axis=int(n.attrs["axis"])))


EMITTERS: dict[str, Emitter] = {
    "conv": _conv, "dense": _dense, "add": _add, "mul": _mul, "affine": _affine, "lut": _lut,
    "clip": _clip, "maxpool": _maxpool, "avgpool": _avgpool, "gap": _gap, "lrn": _lrn,
    "pad": _pad, "transpose": _transpose, "slice": _slice, "gather": _gather,
    "flatten": _reshape, "reshape": _reshape, "concat": _concat,
}


def _unsupported(n: Node, why: str) -> UnsupportedOpError:
    return UnsupportedOpError(
        f"node {n.name!r} (op {n.op}) {why}; use --sensitivity kl (forward-only) instead")


def _body(graph: Graph) -> tuple[list[Node], str]:
    """Nodes to emit and the logits tensor (a trailing softmax is dropped)."""
    nodes = list(graph.nodes)
    if nodes and nodes[-1].op == "softmax":
        return nodes[:-1], nodes[-1].inputs[0]
    return nodes, graph.output


def _emit_graph(bb: relax.BlockBuilder, x: relax.Var, c: _Ctx) -> relax.Expr:
    nodes, logits = _body(c.graph)
    env: dict[str, relax.Expr] = {c.graph.input: x}
    for n in nodes:
        if n.op not in EMITTERS:
            raise _unsupported(n, "has no Relax gradient in qcompile's float builder")
        env[n.output] = EMITTERS[n.op](bb, n, [env[t] for t in n.inputs], c)
    return env[logits]


def _check_logits(graph: Graph) -> None:
    nodes, logits = _body(graph)
    if len(graph.shapes[logits]) != 2:
        raise _unsupported(graph.producer(logits) or nodes[-1],
                           "does not produce 2-D (batch, classes) logits, which the loss needs")


def _weight_vars(layers: Sequence[Node], dtype: str) -> list[relax.Var]:
    return [relax.Var(f"w{i}", relax.TensorType(n.params["w"].shape, dtype))
            for i, n in enumerate(layers)]


def build_float_module(graph: Graph, batch: int, *, grad: bool = True,
                       dtype: str = "float32") -> FloatModule:
    """Relax ``forward`` and ``loss`` (and ``loss_adjoint`` with ``grad``) for ``graph``.

    Inputs: x (batch, *graph.input_shape[1:]) ``dtype``; labels (batch,) int64;
    sample_weight (batch,) ``dtype``.  Weights follow ``FloatModule.layers``.
    The loss needs 2-D logits; without ``grad`` a graph with any other output gets
    ``forward`` alone (``num_classes`` is then its axis-1 size).
    """
    layers = layer_nodes(graph)
    with_loss = len(graph.shapes[_body(graph)[1]]) == 2
    if grad:
        _check_logits(graph)
    x_ty = relax.TensorType((batch, *graph.input_shape[1:]), dtype)
    bb = relax.BlockBuilder()
    ws = _weight_vars(layers, dtype)
    x = relax.Var("x", x_ty)
    with bb.function("forward", [x, *ws]):
        with bb.dataflow():
            c = _Ctx(graph, batch, dtype, {n.name: w for n, w in zip(layers, ws)})
            out = bb.emit_output(_emit_graph(bb, x, c))
        bb.emit_func_output(out)
    if with_loss:
        ws = _weight_vars(layers, dtype)
        x = relax.Var("x", x_ty)
        labels = relax.Var("labels", relax.TensorType((batch,), "int64"))
        sw = relax.Var("sample_weight", relax.TensorType((batch,), dtype))
        with bb.function("loss", [x, labels, sw, *ws]):
            with bb.dataflow():
                c = _Ctx(graph, batch, dtype, {n.name: w for n, w in zip(layers, ws)})
                logp = bb.emit(relax.op.nn.log_softmax(_emit_graph(bb, x, c), axis=-1))
                nll = bb.emit(relax.op.nn.nll_loss(logp, labels, reduction="none"))
                loss = bb.emit_output(relax.op.sum(relax.op.multiply(nll, sw)))
            bb.emit_func_output(loss)
    mod = bb.get()
    if grad and ws:
        try:
            mod = relax.transform.Gradient("loss", require_grads=ws)(mod)
        except Exception as e:  # TVM's own error types; keep the first line
            raise UnsupportedOpError(
                f"relax.transform.Gradient failed: {error_line(e)}; "
                "use --sensitivity kl (forward-only) instead") from e
    logits_shape = graph.shapes[_body(graph)[1]]
    return FloatModule(mod, tuple(n.name for n in layers),
                       tuple(np.asarray(n.params["w"], dtype) for n in layers),
                       batch, int(logits_shape[1]), dtype)


class InnerSpatialLast(dlight.cpu.base.CPUScheduleRule):
    """Reductions (conv, its two gradients, matmul): loops S..S R..R -> S..S R..R S.

    TVM has no default CPU conv schedule; the legalized nest reduces innermost
    over strided reads.  Moving the last spatial loop (usually the row) inside
    the reduction gives LLVM a unit-stride loop to vectorize: 5-8x on ResNet convs,
    bit-identical (each output still sums in the same order).  Parallel loops
    measured slower here (2 cores), so none are added.
    """

    def apply(self, func: PrimFunc, target: tvm.target.Target, _: bool) -> Schedule | None:
        if not isinstance(func, PrimFunc) or not self.is_target_available(target):
            return None
        sch = Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos:
            return None
        changed = False
        for info in infos:
            kind = info.dom_kind()
            lead = len(kind) - len(kind.lstrip("S"))
            if lead < 1 or lead == len(kind) or "S" in kind[lead:]:
                continue  # injective, or interleaved S/R: leave as legalized
            loops = sch.get_loops(info.block_rv)
            sch.reorder(*loops[lead:], loops[lead - 1])
            sch.decompose_reduction(info.block_rv, loops[lead])
            changed = True
        return sch if changed else None


def compile_cpu(mod: tvm.IRModule, target: tvm.target.Target) -> relax.VMExecutable:
    """TVM's generic CPU pipeline with ``InnerSpatialLast`` after legalization."""
    return compile_float(mod, target, [InnerSpatialLast()])


class FloatVM:
    """A compiled ``FloatModule`` (llvm, this CPU): forward and loss+gradient calls."""

    def __init__(self, fm: FloatModule, target: tvm.target.Target | None = None) -> None:
        self.fm = fm
        self.ex = compile_cpu(fm.mod, target or make_target("llvm"))
        self.vm = relax.VirtualMachine(self.ex, tvm.cpu())

    def _tensors(self, arrays: Sequence[np.ndarray]) -> list[tvm.runtime.Tensor]:
        return [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]

    def _weights(self, weights: Sequence[np.ndarray] | None) -> list[np.ndarray]:
        ws = self.fm.weights if weights is None else weights
        return [np.asarray(w, self.fm.dtype) for w in ws]

    def forward(self, x: np.ndarray, weights: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """Logits for one batch of exactly ``fm.batch`` samples."""
        args = self._tensors([x.astype(self.fm.dtype), *self._weights(weights)])
        return self.vm["forward"](*args).numpy()

    def loss_and_grad(self, x: np.ndarray, labels: np.ndarray, sample_weight: np.ndarray,
                      weights: Sequence[np.ndarray] | None = None
                      ) -> tuple[float, list[np.ndarray]]:
        """``sum_n sample_weight[n] * CE_n`` and its gradient w.r.t. every weight."""
        args = self._tensors([x.astype(self.fm.dtype), labels.astype(np.int64),
                              sample_weight.astype(self.fm.dtype), *self._weights(weights)])
        loss, grads = self.vm["loss_adjoint"](*args)
        return float(loss.numpy()), [g.numpy() for g in grads]
