"""Lowering rules that call the hand-scheduled kernels of ``qcompile.kernels``.

Each rule turns one ``QNode`` into a ``call_tir`` of a scheduled PrimFunc, or
returns None so the next rule (finally TVM's generic legalization) takes it.
Weight packing and the signed-input bias correction happen here, once, in
NumPy at compile time; the packed arrays become module parameters.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from tvm import relax

from .kernels import x86_rules as krules
from .kernels import x86_vnni as vnni
from .lower import LowerCtx, Rule
from .qgraph import QNode
from .targets import cpu_flags


def _vec(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).reshape(-1)


def _nhwc(shape: Sequence[int]) -> tuple[int, int, int, int]:
    n, c, h, w = shape
    return (n, h, w, c)


def _desc(n: QNode, ctx: LowerCtx, batch: int) -> krules.LayerDesc | None:
    """The kernel library's view of a node (NHWC shapes, static batch)."""
    t_in, t_out = ctx.qg.tensors[n.inputs[0]], ctx.qg.tensors[n.output]
    in_shape = (batch,) + tuple(t_in.shape[1:])
    raw = bool(n.attrs.get("raw", False))
    common = dict(in_dtype=t_in.qtype.dtype, out_dtype="int32" if raw else t_out.qtype.dtype,
                  raw=raw, lo=None if raw else int(n.attrs.get("lo", 0)),
                  hi=None if raw else int(n.attrs.get("hi", 0)))
    layer = dict(common, w_bits=int(n.attrs.get("bits", 8)))  # conv/dense weight width
    if n.op == "qconv":
        w = n.params["w"]
        a = n.attrs
        return krules.LayerDesc("conv2d", _nhwc(in_shape), channels=int(w.shape[0]),
                              kernel=(int(w.shape[2]), int(w.shape[3])), strides=tuple(a["strides"]),
                              pads=tuple(a["pads"]), dilations=tuple(a["dilations"]),
                              group=int(a["group"]), **layer)
    if n.op == "qdense":
        return krules.LayerDesc("dense", in_shape, channels=int(n.params["w"].shape[1]), **layer)
    if n.op == "maxpool":
        a = n.attrs
        return krules.LayerDesc("maxpool", _nhwc(in_shape), in_dtype=t_in.qtype.dtype,
                              out_dtype=t_in.qtype.dtype, kernel=tuple(a["kernel"]),
                              strides=tuple(a["strides"]), pads=tuple(a["pads"]),
                              dilations=tuple(a.get("dilations", (1, 1))))
    if n.op in ("avgpool", "gap"):
        a = n.attrs
        extra = {} if n.op == "gap" else dict(kernel=tuple(a["kernel"]), strides=tuple(a["strides"]),
                                                pads=tuple(a["pads"]))
        return krules.LayerDesc(n.op, _nhwc(in_shape), **common, **extra)
    return None


# weight_layout -> op -> NumPy packer of the (OC, C, kh, kw) / (N, K) int8 weights.
_PACKERS = {
    "vnni16x4": {"qconv": vnni.pack_conv_weights, "qdense": vnni.pack_weights},
    "vnni16x4_int4": {"qconv": vnni.pack_conv_weights_int4, "qdense": vnni.pack_weights_int4},
}


def _params(n: QNode, spec: krules.KernelSpec, ctx: LowerCtx) -> list[relax.Var]:
    """The kernel's parameter list after its activation input, prepared in NumPy."""
    p, name = n.params, n.name
    if n.op in ("qconv", "qdense"):
        w = p["w"] if n.op == "qconv" else p["w"].T  # dense stores (K, N)
        bias = _vec(p["bias"]).astype(np.int32)
        if spec.signed_bias:
            bias = vnni.signed_input_bias(w, bias)
        if spec.weight_layout in _PACKERS:
            wk = _PACKERS[spec.weight_layout][n.op](w)
        elif spec.weight_layout == "vnni16x4_grouped":
            wk = vnni.pack_conv_weights_grouped(w, int(n.attrs["group"]))
        elif spec.weight_layout == "hwc":
            wk = np.ascontiguousarray(w[:, 0].transpose(1, 2, 0))
        else:
            raise ValueError(f"{name}: unexpected weight layout {spec.weight_layout}")
        out = [ctx.param(f"{name}.w_{spec.weight_layout}", wk), ctx.param(f"{name}.bias_k", bias)]
    else:
        out = []
    if n.attrs.get("raw", False) or n.op == "maxpool":
        return out
    if n.op == "avgpool":
        oh, ow = p["m"].shape[-2:]
        mrs = [np.broadcast_to(p[k].reshape(-1, ow) if k == "m" else p[k], (oh, ow)).astype(np.int64)
               for k in "mrs"]
    elif n.op == "gap":  # a global sum pool: one output position, (1, 1) params
        mrs = [_vec(p[k]).astype(np.int64).reshape(1, 1) for k in "mrs"]
    else:
        mrs = [_vec(p[k]).astype(np.int64) for k in "mrs"]
    return out + [ctx.param(f"{name}.{k}_k", v) for k, v in zip("mrs", mrs)]


def x86_rules(batch: int) -> list[tuple[str, Rule]]:
    """VNNI conv/dense and vectorized depthwise/pool kernels for this CPU."""
    flags = cpu_flags()

    def rule(n: QNode, ctx: LowerCtx, xs: Sequence[relax.Expr]) -> relax.Var | None:
        d = _desc(n, ctx, batch)
        spec = krules.select_kernel(d, flags) if d is not None else None
        if spec is None:
            return None
        fname = f"{spec.name}_{_safe(n.name)}"
        # kOpaque (8): FuseOps must not merge a hand schedule into a generic fused kernel.
        func = spec.build().with_attr("global_symbol", fname).with_attr("op_pattern", 8)
        gv = ctx.bb.add_func(func, fname)
        ctx.funcs[fname] = n.name
        out_t = ctx.qg.tensors[n.output]
        shape = (batch,) + tuple(out_t.shape[1:])
        flat = n.op == "gap" and not n.attrs.get("keepdims", True)
        if flat:  # the kernel writes (N, 1, 1, C); ReduceMean(keepdims=0) wants (N, C)
            shape = (batch, 1, 1, shape[1])
        else:
            shape = _nhwc(shape) if len(shape) == 4 else shape
        dtype = "int32" if n.attrs.get("raw", False) else out_t.qtype.dtype
        args = [xs[0]] + _params(n, spec, ctx)
        y = ctx.emit(relax.call_tir(gv, args, relax.TensorType(shape, dtype)))
        return ctx.emit(relax.op.reshape(y, (batch, shape[3]))) if flat else y

    return [("x86_vnni", rule)]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)
