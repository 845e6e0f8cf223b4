"""``QGraph`` -> Relax ``IRModule`` of integer-only ops, in NHWC.

The module has four public functions, so the float boundary is visible in the IR
and the integer core can be checked and called on its own:

    quantize(x: f32 NCHW)          -> q    the only float step on the way in
    core(q NCHW, *params)          -> y    integers only
    dequantize(y)                  -> f32  the only float step on the way out
    main(x, *params)               -> f32  = dequantize(core(quantize(x), *params))

Inside ``core`` activations are NHWC (channels innermost: what VNNI and tensor
cores want), so ``core`` starts and ends with an integer transpose and keeps the
oracle's NCHW interface.  Each op is lowered by the first rule that accepts it:
the fast kernels of ``qcompile.targets`` when a target provides them, and
TVM's generic legalization otherwise.  Rules own their parameters (e.g. packed
weights), which become ``core`` inputs in registration order; ``Lowered.params``
lists them.  The batch dimension is symbolic unless ``batch`` is given.

A ``FuseRule`` lowers a chain of nodes as one call (a conv with the residual add,
clip or table lookup that is its only consumer): ``plan_chains`` finds the chains
before anything is emitted, the chain's earlier nodes are deferred, and at its last
node the fuse rule emits all of it, or declines and each node is lowered alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import tvm
from tvm import relax

from qcompile.tvm_compat import tirx

from qcompile.errors import UnsupportedOpError
from qcompile.ir.qgraph import QGraph, QNode
from qcompile.ops import LOWERINGS
from qcompile.ops.lowering import NHWC_TO_NCHW, R, compose, stored_order, to_nhwc


@dataclass(frozen=True)
class Lowered:
    mod: tvm.IRModule
    params: list[tuple[str, np.ndarray]]   # core/main inputs after x, in order
    kernels: dict[str, str]                # node name -> rule that lowered it
    funcs: dict[str, str]                  # kernel PrimFunc name -> node name


class LowerCtx:
    """What a rule may use: emit Relax, own parameters, add PrimFuncs, read types."""

    def __init__(self, bb: relax.BlockBuilder, qg: QGraph) -> None:
        self.bb, self.qg = bb, qg
        self.params: list[tuple[str, np.ndarray]] = []
        self.vars: list[relax.Var] = []
        self.funcs: dict[str, str] = {}  # kernel PrimFunc name -> the layer it serves
        self._perms: dict[relax.Expr, tuple[relax.Expr, tuple[int, ...]]] = {}

    def emit(self, e: relax.Expr) -> relax.Var:
        return self.bb.emit(e)

    def permute(self, x: relax.Expr, axes: Sequence[int]) -> relax.Expr:
        """permute_dims that folds into a permute_dims it directly follows (an NHWC model
        input followed by its Transpose costs nothing)."""
        src, before = self._perms.get(x, (x, tuple(range(len(axes)))))
        total = compose(before, axes)
        if total == tuple(range(len(total))):
            return src
        v = self.emit(R.permute_dims(src, list(total)))
        self._perms[v] = (src, total)
        return v

    def param(self, name: str, array: np.ndarray) -> relax.Var:
        """Register a core input holding ``array`` (weights, multipliers ...)."""
        v = relax.Var(_safe(name), relax.TensorType(array.shape, str(array.dtype)))
        self.params.append((name, np.array(array, order="C")))  # ascontiguousarray makes 0-d 1-d
        self.vars.append(v)
        return v

    def qparam(self, n: QNode, key: str, nhwc: bool = True) -> relax.Var:
        a = n.params[key]
        return self.param(f"{n.name}.{key}", to_nhwc(a) if nhwc else a)

    def dtype(self, tensor: str) -> str:
        return self.qg.tensors[tensor].qtype.dtype

    def requant(self, acc: relax.Expr, n: QNode, suffix: str = "") -> relax.Var:
        """clip((int64(acc) * m + r) >> s, lo, hi) cast to the output dtype."""
        v = self.emit(R.astype(acc, "int64"))
        v = self.emit(R.multiply(v, self.qparam(n, "m" + suffix)))
        v = self.emit(R.add(v, self.qparam(n, "r" + suffix)))
        v = self.emit(R.right_shift(v, self.qparam(n, "s" + suffix)))
        return self.clip_cast(v, n)

    def clip_cast(self, v: relax.Expr, n: QNode) -> relax.Var:
        v = self.emit(R.clip(v, int(n.attrs["lo"]), int(n.attrs["hi"])))
        return self.emit(R.astype(v, self.dtype(n.output)))


Rule = Callable[[QNode, LowerCtx, Sequence[relax.Expr]], "relax.Var | None"]


@dataclass(frozen=True)
class FuseRule:
    """Lowers a chain ``(head, n1, n2 ...)`` as one op, each node the only consumer of the
    one before. ``extend(chain, nxt, qg)``: may ``nxt`` join the chain (it reads the
    chain's last output)? ``emit(chain, ctx, xs)``, with ``xs`` the head's inputs and then
    each later node's other inputs, in order: the chain's output, or None to decline."""

    extend: Callable[[Sequence[QNode], QNode, QGraph], bool]
    emit: Callable[[Sequence[QNode], LowerCtx, Sequence[relax.Expr]], "relax.Var | None"]


def plan_chains(qg: QGraph, fuse: FuseRule) -> dict[str, tuple[QNode, ...]]:
    """Chains to lower as one op, keyed by their last node's name. A chain grows while
    the last output has exactly one consumer, is not the graph output, is read by that
    consumer once, and ``fuse.extend`` accepts the consumer; every node is in at most
    one chain (the earliest head wins)."""
    consumers: dict[str, list[QNode]] = {}
    for n in qg.nodes:
        for i in set(n.inputs):
            consumers.setdefault(i, []).append(n)
    taken: set[str] = set()
    chains = {}
    for n in qg.nodes:
        if n.name in taken:
            continue
        chain = [n]
        while True:
            out = chain[-1].output
            nxt = consumers.get(out, [])
            if (out == qg.output.name or len(nxt) != 1 or nxt[0].inputs.count(out) != 1
                    or nxt[0].name in taken or not fuse.extend(chain, nxt[0], qg)):
                break
            chain.append(nxt[0])
        if len(chain) > 1:
            chains[chain[-1].name] = tuple(chain)
            taken.update(c.name for c in chain)
    return chains


def chain_inputs(chain: Sequence[QNode]) -> list[str]:
    """The tensors a chain reads from outside: the head's inputs, then each later node's
    inputs other than the chain's own tensor, in order (``FuseRule.emit``'s ``xs``)."""
    names = list(chain[0].inputs)
    for prev, n in zip(chain, chain[1:]):
        names += [i for i in n.inputs if i != prev.output]
    return names


# The generic rules (TVM's legalization in NHWC, always applicable): each integer op's
# lowering lives with its canonical op (``qcompile.ops``, ``OpDef.lower``).
GENERIC: dict[str, Rule] = dict(LOWERINGS)


def lower(qg: QGraph, rules: Sequence[tuple[str, Rule | FuseRule]] = (),
          batch: int | None = None) -> Lowered:
    """Build the four-function Relax module for a quantized graph.

    ``rules`` are ``(name, rule)`` pairs tried in order before the generic rule of
    each op; a rule returns None when it does not apply. ``FuseRule`` entries lower
    chains of nodes (``plan_chains``) and are tried first, in order.
    """
    n_dim = batch if batch is not None else tirx.Var("batch", "int64")
    in_shape = [n_dim] + list(qg.input.shape[1:])
    out_shape = [n_dim] + list(qg.output.shape[1:])
    bb = relax.BlockBuilder()
    _quantize_fn(bb, qg, in_shape)

    q = relax.Var("q", relax.TensorType(in_shape, qg.input.qtype.dtype))
    ctx = LowerCtx(bb, qg)
    used: dict[str, str] = {}
    node_rules = [(k, r) for k, r in rules if not isinstance(r, FuseRule)]
    chains: dict[str, tuple[tuple[str, FuseRule], tuple[QNode, ...]]] = {}
    for name, fuse in ((k, r) for k, r in rules if isinstance(r, FuseRule)):
        taken = {c.name for _, ch in chains.values() for c in ch}
        for tail, ch in plan_chains(qg, fuse).items():
            if not taken & {c.name for c in ch}:
                chains[tail] = ((name, fuse), ch)
    deferred = {c.name for _, ch in chains.values() for c in ch[:-1]}

    def one(n: QNode, env: dict[str, relax.Expr]) -> None:
        xs = [env[i] for i in n.inputs]
        for name, rule in node_rules:
            out = rule(n, ctx, xs)
            if out is not None:
                used[n.name] = name
                break
        else:
            out = GENERIC[n.op](n, ctx, xs)
            used[n.name] = "generic"
        env[n.output] = out

    with bb.function("core"):
        with bb.dataflow():
            env: dict[str, relax.Expr] = {qg.input.name: ctx.permute(
                q, stored_order(len(qg.input.shape)))}
            for n in qg.nodes:
                if n.name in deferred:
                    continue  # emitted with its chain, at the chain's last node
                if n.name not in chains:
                    one(n, env)
                    continue
                (name, fuse), chain = chains[n.name]
                out = fuse.emit(chain, ctx, [env[i] for i in chain_inputs(chain)])
                if out is None:  # declined: each node alone, in order
                    for c in chain:
                        one(c, env)
                else:
                    used.update(dict.fromkeys((c.name for c in chain), name))
                    env[n.output] = out
            y = env[qg.output.name]
            if len(qg.output.shape) == 4:
                y = ctx.permute(y, NHWC_TO_NCHW)
            if y is q:
                raise UnsupportedOpError(f"{qg.source or 'model'}: nothing to compute in "
                                         "integers (every op folded into a no-op)")
            out = bb.emit_output(y)
        bb.emit_func_output(out, params=[q] + ctx.vars)

    _dequantize_fn(bb, qg, out_shape)
    mod = bb.get()
    xm = relax.Var("x", relax.TensorType(in_shape, "float32"))
    pm = [relax.Var(_safe(k), v.ty) for (k, _), v in zip(ctx.params, ctx.vars)]
    with bb.function("main", [xm] + pm):
        qv = bb.emit(relax.Call(mod.get_global_var("quantize"), [xm]))
        yv = bb.emit(relax.Call(mod.get_global_var("core"), [qv] + pm))
        out = bb.emit(relax.Call(mod.get_global_var("dequantize"), [yv]))
        bb.emit_func_output(out)
    return Lowered(bb.get(), ctx.params, used, ctx.funcs)


def _quantize_fn(bb: relax.BlockBuilder, qg: QGraph, in_shape: list) -> None:
    """floor(x * (1/s) + 0.5), clipped; float32 throughout, exactly as the oracle."""
    x = relax.Var("x", relax.TensorType(in_shape, "float32"))
    t = qg.input.qtype
    with bb.function("quantize", [x]):
        with bb.dataflow():
            v = bb.emit(R.multiply(x, relax.const(qg.input_inv_scale, "float32")))
            v = bb.emit(R.floor(R.add(v, relax.const(0.5, "float32"))))
            v = bb.emit(R.astype(R.clip(v, t.qmin, t.qmax), t.dtype))
            out = bb.emit_output(v)
        bb.emit_func_output(out)


def _dequantize_fn(bb: relax.BlockBuilder, qg: QGraph, out_shape: list) -> None:
    y = relax.Var("y", relax.TensorType(out_shape, qg.output.qtype.dtype))
    with bb.function("dequantize", [y]):
        with bb.dataflow():
            s = qg.output.scale.astype(np.float32)
            if s.ndim:
                s = s.reshape((1, -1) + (1,) * (len(out_shape) - 2))
            v = bb.emit(R.multiply(R.astype(y, "float32"), relax.const(s)))
            if qg.softmax_axis is not None:
                v = bb.emit(R.nn.softmax(v, axis=qg.softmax_axis))
            out = bb.emit_output(v)
        bb.emit_func_output(out)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)
