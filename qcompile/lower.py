"""``QGraph`` -> Relax ``IRModule`` of integer-only ops.

The module has four public functions, so the float boundary is visible in the IR
and the integer core can be checked and called on its own:

    quantize(x: f32)               -> q    the only float step on the way in
    core(q, *params)               -> y    integers only
    dequantize(y)                  -> f32  the only float step on the way out
    main(x, *params)               -> f32  = dequantize(core(quantize(x), *params))

The batch dimension is symbolic, so one artifact serves any batch size.
Parameters (weights, biases, dyadic m/r/s) are function inputs in
``QGraph.param_items()`` order; they travel beside the module in ``weights.npz``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import tvm
from tvm import relax, tirx

from .qgraph import QGraph, QNode

R = relax.op
Emit = Callable[[relax.Expr], relax.Var]


def _ttype(shape: tuple, dtype: str) -> relax.TensorType:
    return relax.TensorType(shape, dtype)


class _Lowerer:
    def __init__(self, bb: relax.BlockBuilder, qg: QGraph, params: dict[str, relax.Var]) -> None:
        self.bb, self.qg, self.p = bb, qg, params

    def emit(self, e: relax.Expr) -> relax.Var:
        return self.bb.emit(e)

    def param(self, n: QNode, key: str) -> relax.Var:
        return self.p[f"{n.name}.{key}"]

    def requant(self, acc: relax.Expr, n: QNode, suffix: str = "") -> relax.Var:
        """clip((int64(acc) * m + r) >> s, lo, hi) cast to the output dtype."""
        v = self.emit(R.astype(acc, "int64"))
        v = self.emit(R.multiply(v, self.param(n, "m" + suffix)))
        v = self.emit(R.add(v, self.param(n, "r" + suffix)))
        v = self.emit(R.right_shift(v, self.param(n, "s" + suffix)))
        return self.clip_cast(v, n)

    def clip_cast(self, v: relax.Expr, n: QNode) -> relax.Var:
        dtype = self.qg.tensors[n.output].qtype.dtype
        v = self.emit(R.clip(v, int(n.attrs["lo"]), int(n.attrs["hi"])))
        return self.emit(R.astype(v, dtype))

    # --- one method per QGraph op ------------------------------------------------
    def qconv(self, n: QNode, x: relax.Expr) -> relax.Var:
        a = n.attrs
        acc = self.emit(R.nn.conv2d(x, self.param(n, "w"), strides=a["strides"], padding=a["pads"],
                                    dilation=a["dilations"], groups=a["group"], out_dtype="int32"))
        acc = self.emit(R.add(acc, self.param(n, "bias")))
        return acc if a["raw"] else self.requant(acc, n)

    def qdense(self, n: QNode, x: relax.Expr) -> relax.Var:
        acc = self.emit(R.matmul(x, self.param(n, "w"), out_dtype="int32"))
        acc = self.emit(R.add(acc, self.param(n, "bias")))
        return acc if n.attrs["raw"] else self.requant(acc, n)

    def qadd(self, n: QNode, a: relax.Expr, b: relax.Expr) -> relax.Var:
        va = self.emit(R.multiply(R.astype(a, "int64"), self.param(n, "ma")))
        vb = self.emit(R.multiply(R.astype(b, "int64"), self.param(n, "mb")))
        v = self.emit(R.add(R.add(va, vb), self.param(n, "r")))
        return self.clip_cast(self.emit(R.right_shift(v, self.param(n, "s"))), n)

    def clip(self, n: QNode, x: relax.Expr) -> relax.Var:
        return self.emit(R.clip(x, int(n.attrs["lo"]), int(n.attrs["hi"])))

    def maxpool(self, n: QNode, x: relax.Expr) -> relax.Var:
        a = n.attrs
        return self.emit(R.nn.max_pool2d(x, a["kernel"], a["strides"], a["pads"],
                                         a.get("dilations", (1, 1))))

    def avgpool(self, n: QNode, x: relax.Expr) -> relax.Var:
        # Window sum as a depthwise conv with a ones kernel: integer-only, and the
        # per-position divisor becomes the dyadic multiplier m[oh, ow].
        a = n.attrs
        c = self.qg.tensors[n.inputs[0]].shape[1]
        ones = relax.const(np.ones((c, 1) + tuple(a["kernel"]), np.int8))
        acc = self.emit(R.nn.conv2d(x, ones, strides=a["strides"], padding=a["pads"],
                                    groups=c, out_dtype="int32"))
        return self.requant(acc, n)

    def gap(self, n: QNode, x: relax.Expr) -> relax.Var:
        acc = self.emit(R.sum(R.astype(x, "int32"), axis=[2, 3], keepdims=True))
        return self.requant(acc, n)

    def reshape(self, n: QNode, x: relax.Expr) -> relax.Var:
        batch = x.ty.shape[0]
        return self.emit(R.reshape(x, [batch] + list(n.attrs["shape"][1:])))

    def concat(self, n: QNode, *xs: relax.Expr) -> relax.Var:
        parts = []
        for k, x in enumerate(xs):
            if n.attrs["identity"][k]:
                parts.append(x)
            else:
                parts.append(self.requant(x, n, str(k)))
        return self.emit(R.concat(parts, axis=n.attrs["axis"]))

    def dispatch(self, n: QNode) -> Callable[..., relax.Var]:
        table = {"qconv": self.qconv, "qdense": self.qdense, "qadd": self.qadd,
                 "clip": self.clip, "maxpool": self.maxpool, "avgpool": self.avgpool,
                 "gap": self.gap, "flatten": self.reshape, "reshape": self.reshape,
                 "concat": self.concat}
        return table[n.op]


def lower(qg: QGraph) -> tvm.IRModule:
    """Build the four-function Relax module for a quantized graph."""
    batch = tirx.Var("batch", "int64")
    in_shape = [batch] + list(qg.input.shape[1:])
    out_shape = [batch] + list(qg.output.shape[1:])
    items = qg.param_items()
    bb = relax.BlockBuilder()

    # quantize: floor(x * (1/s) + 0.5), clipped; float32 throughout, as the oracle.
    x = relax.Var("x", _ttype(in_shape, "float32"))
    with bb.function("quantize", [x]):
        with bb.dataflow():
            t = qg.input.qtype
            v = bb.emit(R.multiply(x, relax.const(qg.input_inv_scale, "float32")))
            v = bb.emit(R.floor(R.add(v, relax.const(0.5, "float32"))))
            v = bb.emit(R.astype(R.clip(v, t.qmin, t.qmax), t.dtype))
            out = bb.emit_output(v)
        bb.emit_func_output(out)

    q = relax.Var("q", _ttype(in_shape, qg.input.qtype.dtype))
    pvars = {k: relax.Var(_safe(k), _ttype(v.shape, str(v.dtype))) for k, v in items}
    with bb.function("core", [q] + list(pvars.values())):
        with bb.dataflow():
            low = _Lowerer(bb, qg, pvars)
            env: dict[str, relax.Expr] = {qg.input.name: q}
            for n in qg.nodes:
                env[n.output] = low.dispatch(n)(n, *(env[i] for i in n.inputs))
            out = bb.emit_output(env[qg.output.name])
        bb.emit_func_output(out)

    y = relax.Var("y", _ttype(out_shape, qg.output.qtype.dtype))
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

    mod = bb.get()
    xm = relax.Var("x", _ttype(in_shape, "float32"))
    pm = [relax.Var(_safe(k), _ttype(v.shape, str(v.dtype))) for k, v in items]
    with bb.function("main", [xm] + pm):
        qv = bb.emit(relax.Call(mod.get_global_var("quantize"), [xm]))
        yv = bb.emit(relax.Call(mod.get_global_var("core"), [qv] + pm))
        out = bb.emit(relax.Call(mod.get_global_var("dequantize"), [yv]))
        bb.emit_func_output(out)
    return bb.get()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)
