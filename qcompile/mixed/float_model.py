"""Canonical float ``Graph`` -> float Relax module with its weights as parameters.

Sensitivity needs gradients of a loss w.r.t. every conv/dense weight, so the
weights are function *parameters* (biases stay constants), and the module has

- ``forward(x, *weights) -> logits``;
- ``loss(x, labels, sample_weight, *weights) -> sum_n sample_weight[n] * CE_n``,
  a weighted sum so chunks padded to the static batch add up to a plain mean;
- ``loss_adjoint`` (``relax.transform.Gradient`` of ``loss``) ``-> (loss, grads)``.

A trailing softmax is dropped: the loss takes logits.  Each op's emitter lives with the
op (``qcompile.ops``, ``OpDef.float_relax``; the closed forms of the table functions in
``qcompile.ops.activations``).  Every op is emitted with
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

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import tvm
from tvm import relax

from qcompile.build.compile import compile_float
from qcompile.errors import UnsupportedOpError
from qcompile.errors import error_line
from qcompile.ir.graph import Graph, Node, layer_nodes
from qcompile.hw.backends import make_target
from qcompile.ops import FLOAT_BUILDERS
from qcompile.ops.float_relax import unsupported
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


# One emitter per canonical op: each lives with its op (``qcompile.ops``,
# ``OpDef.float_relax``); softmax has none, since a trailing one is dropped.
EMITTERS: dict[str, Emitter] = dict(FLOAT_BUILDERS)


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
            raise unsupported(n, "has no Relax gradient in qcompile's float builder")
        env[n.output] = EMITTERS[n.op](bb, n, [env[t] for t in n.inputs], c)
    return env[logits]


def _check_logits(graph: Graph) -> None:
    nodes, logits = _body(graph)
    if len(graph.shapes[logits]) != 2:
        raise unsupported(graph.producer(logits) or nodes[-1],
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
