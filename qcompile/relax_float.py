"""Canonical float ``Graph`` -> float Relax module with its weights as parameters.

Sensitivity needs gradients of a loss w.r.t. every conv/dense weight, so the
weights are function *parameters* (biases stay constants), and the module has

- ``forward(x, *weights) -> logits``;
- ``loss(x, labels, sample_weight, *weights) -> sum_n sample_weight[n] * CE_n``,
  a weighted sum so chunks padded to the static batch add up to a plain mean;
- ``loss_adjoint`` (``relax.transform.Gradient`` of ``loss``) ``-> (loss, grads)``.

A trailing softmax is dropped: the loss takes logits.  Every canonical op has a
registered Relax gradient in TVM 0.27 (conv2d, matmul, max/avg_pool2d, relu,
maximum/minimum for clip, mean, reshape, concat, log_softmax, nll_loss); any
other op is refused with a pointer to the forward-only ``kl`` method.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import tvm
from tvm import relax, s_tir
from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import normalize_prim_func

from .errors import UnsupportedOpError
from .graph import LAYER_OPS, Graph, Node
from .targets import make_target

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


def layer_nodes(graph: Graph) -> list[Node]:
    """The quantizable layers: conv and dense nodes, in graph order."""
    return [n for n in graph.nodes if n.op in LAYER_OPS]


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
    return _act(bb, bb.emit(relax.op.add(xs[0], xs[1])), n.attrs["act"], c.dtype)


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
    return bb.emit(relax.op.mean(xs[0], axis=[2, 3], keepdims=True))


def _reshape(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: _Ctx) -> relax.Expr:
    # Shapes were inferred at batch 1; dim 0 is the batch (as in lower.py).
    return bb.emit(relax.op.reshape(xs[0], (c.batch, *c.graph.shapes[n.output][1:])))


def _concat(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: _Ctx) -> relax.Expr:
    return bb.emit(relax.op.concat(xs, axis=int(n.attrs["axis"])))


EMITTERS: dict[str, Emitter] = {
    "conv": _conv, "dense": _dense, "add": _add, "clip": _clip, "maxpool": _maxpool,
    "avgpool": _avgpool, "gap": _gap, "flatten": _reshape, "reshape": _reshape,
    "concat": _concat,
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
    if len(c.graph.shapes[logits]) != 2:
        raise _unsupported(c.graph.producer(logits) or nodes[-1],
                           "does not produce 2-D (batch, classes) logits, which the loss needs")
    return env[logits]


def _weight_vars(layers: Sequence[Node], dtype: str) -> list[relax.Var]:
    return [relax.Var(f"w{i}", relax.TensorType(n.params["w"].shape, dtype))
            for i, n in enumerate(layers)]


def build_float_module(graph: Graph, batch: int, *, grad: bool = True,
                       dtype: str = "float32") -> FloatModule:
    """Relax ``forward`` and ``loss`` (and ``loss_adjoint`` with ``grad``) for ``graph``.

    Inputs: x (batch, *graph.input_shape[1:]) ``dtype``; labels (batch,) int64;
    sample_weight (batch,) ``dtype``.  Weights follow ``FloatModule.layers``.
    """
    layers = layer_nodes(graph)
    x_ty = relax.TensorType((batch, *graph.input_shape[1:]), dtype)
    bb = relax.BlockBuilder()
    ws = _weight_vars(layers, dtype)
    x = relax.Var("x", x_ty)
    with bb.function("forward", [x, *ws]):
        with bb.dataflow():
            c = _Ctx(graph, batch, dtype, {n.name: w for n, w in zip(layers, ws)})
            out = bb.emit_output(_emit_graph(bb, x, c))
        bb.emit_func_output(out)
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
                f"relax.transform.Gradient failed: {str(e).splitlines()[0]}; "
                "use --sensitivity kl (forward-only) instead") from e
    logits_shape = graph.shapes[_body(graph)[1]]
    return FloatModule(mod, tuple(n.name for n in layers),
                       tuple(np.asarray(n.params["w"], dtype) for n in layers),
                       batch, int(logits_shape[-1]), dtype)


class InnerSpatialLast(dlight.cpu.base.CPUScheduleRule):
    """Reductions (conv, its two gradients, matmul): loops S..S R..R -> S..S R..R S.

    TVM has no default CPU conv schedule; the legalized nest reduces innermost
    over strided reads.  Moving the last spatial loop (usually the row) inside
    the reduction gives LLVM a unit-stride loop to vectorize: 5-8x on ResNet convs,
    bit-identical (each output still sums in the same order).  Parallel loops
    measured slower here (2 cores), so none are added.
    """

    def apply(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target,
              _: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tvm.tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
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
    passes = (cpu_pipeline.library_dispatch_passes(target) + cpu_pipeline.legalize_passes(target)
              + [dlight.ApplyDefaultSchedule(InnerSpatialLast())]
              + cpu_pipeline.dataflow_lower_passes(target) + cpu_pipeline.finalize_passes(target))
    with target:
        lowered = tvm.transform.Sequential(passes)(mod)
    return tvm.compile(lowered, target, relax_pipeline=None)


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
