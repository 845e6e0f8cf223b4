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

R = relax.op
NCHW_TO_NHWC = (0, 2, 3, 1)
NHWC_TO_NCHW = (0, 3, 1, 2)


@dataclass(frozen=True)
class Lowered:
    mod: tvm.IRModule
    params: list[tuple[str, np.ndarray]]   # core/main inputs after x, in order
    kernels: dict[str, str]                # node name -> rule that lowered it
    funcs: dict[str, str]                  # kernel PrimFunc name -> node name


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


def _compose(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...]:
    """x.transpose(a).transpose(b) == x.transpose(_compose(a, b))."""
    return tuple(a[i] for i in b)


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
        total = _compose(before, axes)
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


# --- generic rules: TVM's legalization in NHWC, always applicable -----------------------
def generic_conv(n: QNode, ctx: LowerCtx, xs: Sequence[relax.Expr]) -> relax.Var:
    a = n.attrs
    w = ctx.param(f"{n.name}.w", np.ascontiguousarray(n.params["w"].transpose(0, 2, 3, 1)))
    acc = ctx.emit(R.nn.conv2d(xs[0], w, strides=a["strides"], padding=a["pads"],
                               dilation=a["dilations"], groups=a["group"], data_layout="NHWC",
                               kernel_layout="OHWI", out_dtype="int32"))
    acc = ctx.emit(R.add(acc, ctx.qparam(n, "bias")))
    return acc if a["raw"] else ctx.requant(acc, n)


def generic_dense(n: QNode, ctx: LowerCtx, xs: Sequence[relax.Expr]) -> relax.Var:
    acc = ctx.emit(R.matmul(xs[0], ctx.qparam(n, "w"), out_dtype="int32"))
    acc = ctx.emit(R.add(acc, ctx.qparam(n, "bias")))
    return acc if n.attrs["raw"] else ctx.requant(acc, n)


def generic_qadd(n: QNode, ctx: LowerCtx, xs: Sequence[relax.Expr]) -> relax.Var:
    # quantize.py proved |sum x_i*m_i + r| < 2^31 when it chose int32 lanes
    acc = n.attrs.get("acc_dtype", "int64")
    v = None
    for i, x in enumerate(xs):
        term = ctx.emit(R.multiply(R.astype(x, acc), ctx.param(f"{n.name}.m{i}",
                                                              n.params[f"m{i}"].astype(acc))))
        v = term if v is None else ctx.emit(R.add(v, term))
    v = ctx.emit(R.add(v, ctx.param(f"{n.name}.r", n.params["r"].astype(acc))))
    return ctx.clip_cast(ctx.emit(R.right_shift(v, ctx.param(f"{n.name}.s",
                                                               n.params["s"].astype(acc)))), n)


def generic_qmul(n: QNode, ctx: LowerCtx, xs: Sequence[relax.Expr]) -> relax.Var:
    prod = ctx.emit(R.multiply(R.astype(xs[0], "int32"), R.astype(xs[1], "int32")))  # < 2^16
    return ctx.requant(prod, n)


def generic_qaffine(n: QNode, ctx: LowerCtx, xs: Sequence[relax.Expr]) -> relax.Var:
    v = ctx.emit(R.multiply(R.astype(xs[0], "int64"), ctx.qparam(n, "m")))
    v = ctx.emit(R.add(v, ctx.qparam(n, "c")))
    return ctx.clip_cast(ctx.emit(R.right_shift(v, ctx.qparam(n, "s"))), n)


def _channel_offsets(rank: int, channels: int, stride: int) -> relax.Expr:
    """c * stride laid out to broadcast along the stored channel axis."""
    shape = [1] * rank
    shape[stored_axis(1, rank)] = channels
    return relax.const((np.arange(channels, dtype=np.int32) * stride).reshape(shape))


def generic_lut(n: QNode, ctx: LowerCtx, xs: Sequence[relax.Expr]) -> relax.Var:
    table = n.params["table"]
    rows, width = table.shape
    idx = ctx.emit(R.add(R.astype(xs[0], "int32"), relax.const(np.int32(n.attrs["offset"]))))
    if rows > 1:  # one table per channel (PRelu)
        rank = len(ctx.qg.tensors[n.output].shape)
        idx = ctx.emit(R.add(idx, _channel_offsets(rank, rows, width)))
    flat = ctx.param(f"{n.name}.table", table.reshape(-1))
    return ctx.emit(R.take(flat, idx, axis=0))


def generic_lrn(n: QNode, ctx: LowerCtx, xs: Sequence[relax.Expr]) -> relax.Var:
    size, c = n.attrs["size"], ctx.qg.tensors[n.output].shape[1]
    sq = ctx.emit(R.astype(xs[0], "int32"))
    sq = ctx.emit(R.multiply(sq, sq))
    sq = ctx.emit(R.nn.pad(sq, [0, 0, 0, 0, 0, 0, (size - 1) // 2, size // 2]))
    total = None
    for i in range(size):
        part = ctx.emit(R.strided_slice(sq, [3], [i], [i + c]))
        total = part if total is None else ctx.emit(R.add(total, part))
    idx = ctx.emit(R.right_shift(total, relax.const(np.int32(n.attrs["k"]))))
    mult = ctx.emit(R.take(ctx.qparam(n, "table", nhwc=False), idx, axis=0))
    v = ctx.emit(R.multiply(R.astype(xs[0], "int64"), mult))
    v = ctx.emit(R.add(v, ctx.qparam(n, "r")))
    return ctx.clip_cast(ctx.emit(R.right_shift(v, ctx.qparam(n, "s"))), n)


def generic_pad(n: QNode, ctx: LowerCtx, xs: Sequence[relax.Expr]) -> relax.Var:
    p = n.attrs["pads"]
    rank = len(p) // 2
    width = [w for a in stored_order(rank) for w in (p[a], p[rank + a])]
    return ctx.emit(R.nn.pad(xs[0], width, "constant", int(n.attrs["value"])))


def generic_transpose(n: QNode, ctx: LowerCtx, xs: Sequence[relax.Expr]) -> relax.Expr:
    perm = tuple(n.attrs["perm"])
    order = stored_order(len(perm))
    inverse = tuple(int(i) for i in np.argsort(order))
    return ctx.permute(xs[0], _compose(_compose(inverse, perm), order))


def generic_slice(n: QNode, ctx: LowerCtx, xs: Sequence[relax.Expr]) -> relax.Var:
    a = n.attrs
    order = stored_order(len(a["begin"]))
    axes = [j for j, ax in enumerate(order) if (a["begin"][ax], a["step"][ax]) != (0, 1)
            or a["end"][ax] != ctx.qg.tensors[n.inputs[0]].shape[ax]]
    if not axes:
        return xs[0]
    return ctx.emit(R.strided_slice(xs[0], axes, [a["begin"][order[j]] for j in axes],
                                    [a["end"][order[j]] for j in axes],
                                    [a["step"][order[j]] for j in axes], assume_inbound=True))


def generic_gather(n: QNode, ctx: LowerCtx, xs: Sequence[relax.Expr]) -> relax.Var:
    x = xs[0]
    rank = len(ctx.qg.tensors[n.output].shape)
    for axis in n.attrs["axes"]:
        idx = relax.const(n.params[f"idx{axis}"].astype(np.int32))
        x = ctx.emit(R.take(x, idx, axis=stored_axis(axis, rank)))
    return x


def generic_clip(n: QNode, ctx: LowerCtx, xs: Sequence[relax.Expr]) -> relax.Var:
    return ctx.emit(R.clip(xs[0], int(n.attrs["lo"]), int(n.attrs["hi"])))


def generic_maxpool(n: QNode, ctx: LowerCtx, xs: Sequence[relax.Expr]) -> relax.Var:
    a = n.attrs
    return ctx.emit(R.nn.max_pool2d(xs[0], a["kernel"], a["strides"], a["pads"],
                                    a.get("dilations", (1, 1)), layout="NHWC"))


def generic_avgpool(n: QNode, ctx: LowerCtx, xs: Sequence[relax.Expr]) -> relax.Var:
    # Window sum as a depthwise conv with a ones kernel: integer-only, and the
    # per-position divisor becomes the dyadic multiplier m[oh, ow].
    a = n.attrs
    c = ctx.qg.tensors[n.inputs[0]].shape[1]
    ones = relax.const(np.ones((c,) + tuple(a["kernel"]) + (1,), np.int8))
    acc = ctx.emit(R.nn.conv2d(xs[0], ones, strides=a["strides"], padding=a["pads"], groups=c,
                               data_layout="NHWC", kernel_layout="OHWI", out_dtype="int32"))
    return ctx.requant(acc, n)


def generic_gap(n: QNode, ctx: LowerCtx, xs: Sequence[relax.Expr]) -> relax.Var:
    keep = n.attrs.get("keepdims", True)
    acc = ctx.emit(R.sum(R.astype(xs[0], "int32"), axis=[1, 2], keepdims=keep))
    return ctx.requant(acc, n)


def generic_reshape(n: QNode, ctx: LowerCtx, xs: Sequence[relax.Expr]) -> relax.Expr:
    x = xs[0]
    batch = x.ty.shape[0]
    if len(x.ty.shape) == 4:  # back to NCHW so the element order is ONNX's
        x = ctx.permute(x, NHWC_TO_NCHW)
    out = list(n.attrs["shape"][1:])
    y = ctx.emit(R.reshape(x, [batch] + out))
    return ctx.permute(y, NCHW_TO_NHWC) if len(out) == 3 else y


def generic_concat(n: QNode, ctx: LowerCtx, xs: Sequence[relax.Expr]) -> relax.Var:
    parts = [x if n.attrs["identity"][k] else ctx.requant(x, n, str(k)) for k, x in enumerate(xs)]
    rank = len(ctx.qg.tensors[n.output].shape)
    axis = {1: 3, 2: 1, 3: 2}[n.attrs["axis"]] if rank == 4 and n.attrs["axis"] else n.attrs["axis"]
    return ctx.emit(R.concat(parts, axis=axis))


GENERIC: dict[str, Rule] = {
    "qconv": generic_conv, "qdense": generic_dense, "qadd": generic_qadd, "clip": generic_clip,
    "qmul": generic_qmul, "qaffine": generic_qaffine, "lut": generic_lut, "lrn": generic_lrn,
    "pad": generic_pad, "transpose": generic_transpose, "slice": generic_slice,
    "gather": generic_gather,
    "maxpool": generic_maxpool, "avgpool": generic_avgpool, "gap": generic_gap,
    "flatten": generic_reshape, "reshape": generic_reshape, "concat": generic_concat,
}


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
