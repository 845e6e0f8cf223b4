"""Lowering rules that call the hand-scheduled kernels of ``qcompile.targets``.

Each rule turns one ``QNode`` into a ``call_tir`` of a scheduled PrimFunc, or
returns None so the next rule (finally TVM's generic legalization) takes it.
Weight packing and the signed-input bias correction happen here, once, in
NumPy at compile time; the packed arrays become module parameters.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from tvm import relax

from qcompile.targets.x86 import epilogue as kep
from qcompile.targets.x86 import kernel_rules as krules
from qcompile.targets.x86 import vnni
from qcompile.lower.emit import FuseRule, LowerCtx, Rule
from qcompile.ir.qgraph import QGraph, QNode
from qcompile.hw.facts import cpu_flags


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
                  hi=None if raw else int(n.attrs.get("hi", 0)),
                  requant=_requant_mode(n, ctx))
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


def _acc_bound(n: QNode, ctx: LowerCtx) -> np.ndarray | None:
    """Per output channel, the static worst case |acc + bias| of a conv/dense (as
    quantize.accumulator_bound), None for other ops."""
    if n.op not in ("qconv", "qdense"):
        return None
    qt = ctx.qg.tensors[n.inputs[0]].qtype
    w = np.abs(n.params["w"].astype(np.int64))
    wsum = w.reshape(w.shape[0], -1).sum(axis=1) if n.op == "qconv" else w.sum(axis=0)
    return wsum * max(-qt.qmin, qt.qmax) + np.abs(_vec(n.params["bias"]).astype(np.int64))


def _requant_mode(n: QNode, ctx: LowerCtx) -> str:
    """The fastest exact requantization for this node's m, r, s (``x86_epilogue``)."""
    if n.attrs.get("raw", False) or not all(k in n.params for k in "mrs"):
        return "int64"
    m, r, s = (_vec(n.params[k]) for k in "mrs")
    return kep.requant_mode(m, r, s, _acc_bound(n, ctx))


# weight_layout -> op -> NumPy packer of the (OC, C, kh, kw) / (N, K) int8 weights.
_PACKERS = {
    "vnni16x4": {"qconv": vnni.pack_conv_weights, "qdense": vnni.pack_weights},
    "vnni16x4_int4": {"qconv": vnni.pack_conv_weights_int4, "qdense": vnni.pack_weights_int4},
}


def _params(n: QNode, spec: krules.KernelSpec, ctx: LowerCtx, requant: str) -> list[relax.Var]:
    """The kernel's parameter list after its activation input, prepared in NumPy (m, r, s
    as ``requant`` wants them)."""
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
    mrs = kep.requant_arrays(requant, mrs[0], mrs[1], mrs[2], _acc_bound(n, ctx))
    names = ["m", "pre", "rnd", "sh"] if requant == "mulhi_shl" else list("mrs")
    return out + [ctx.param(f"{name}.{k}_k", v) for k, v in zip(names, mrs)]


# Ops a kernel's epilogue can absorb (x86_epilogue), and how many in a row.
FUSABLE = ("qadd", "clip", "lut")
MAX_FUSED = 3


def _post(n: QNode, prev: str, ctx: LowerCtx) -> kep.Post:
    """The epilogue op for chain node ``n``, which reads the chain's tensor ``prev``."""
    a, p = n.attrs, n.params
    if n.op == "clip":
        return kep.FusedClip(int(a["lo"]), int(a["hi"]))
    if n.op == "lut":
        rows, width = p["table"].shape
        return kep.FusedLut(int(a["offset"]), int(rows), int(width), ctx.dtype(n.output))
    k = n.inputs.index(prev)
    others = [j for j in range(len(n.inputs)) if j != k]
    return kep.FusedAdd(int(p[f"m{k}"]), tuple(int(p[f"m{j}"]) for j in others),
                        tuple(ctx.dtype(n.inputs[j]) for j in others), int(p["r"]), int(p["s"]),
                        int(a["lo"]), int(a["hi"]), str(a.get("acc_dtype", "int64")),
                        ctx.dtype(n.output))


def _extend(chain: Sequence[QNode], nxt: QNode, qg: QGraph) -> bool:
    """A conv/dense (requantized) may take up to MAX_FUSED adds/clips/LUTs whose other
    inputs have the output's own shape (no broadcasting)."""
    head = chain[0]
    if (head.op not in ("qconv", "qdense") or head.attrs.get("raw", False)
            or nxt.op not in FUSABLE or len(chain) > MAX_FUSED):
        return False
    shape = qg.tensors[nxt.output].shape
    return all(qg.tensors[i].shape == shape for i in nxt.inputs)


def x86_rules(batch: int) -> list[tuple[str, Rule | FuseRule]]:
    """VNNI conv/dense and vectorized depthwise/pool kernels for this CPU, and the same
    kernels with a residual add / clip / LUT chain fused into their epilogue (AMX tile
    kernels for the conv/dense layers that suit them, where the OS grants AMX)."""
    flags = krules.usable_flags(cpu_flags())

    def call(chain: Sequence[QNode], ctx: LowerCtx, xs: Sequence[relax.Expr]
             ) -> relax.Var | None:
        n, tail = chain[0], chain[-1]
        d = _desc(n, ctx, batch)
        if d is not None and len(chain) > 1:
            d = dataclasses.replace(d, post=tuple(
                _post(c, prev.output, ctx) for prev, c in zip(chain, chain[1:])))
        spec = krules.select_kernel(d, flags) if d is not None else None
        if spec is None:
            return None
        fname = f"{spec.name}_{_safe(n.name)}"
        # kOpaque (8): FuseOps must not merge a hand schedule into a generic fused kernel.
        func = spec.build().with_attr("global_symbol", fname).with_attr("op_pattern", 8)
        gv = ctx.bb.add_func(func, fname)
        ctx.funcs[fname] = n.name
        out_t = ctx.qg.tensors[tail.output]
        shape = (batch,) + tuple(out_t.shape[1:])
        flat = n.op == "gap" and not n.attrs.get("keepdims", True)
        if flat:  # the kernel writes (N, 1, 1, C); ReduceMean(keepdims=0) wants (N, C)
            shape = (batch, 1, 1, shape[1])
        else:
            shape = _nhwc(shape) if len(shape) == 4 else shape
        dtype = "int32" if n.attrs.get("raw", False) else out_t.qtype.dtype
        # After the head's own parameters: the fused adds' other inputs (xs past the
        # head's one activation, in chain order) and the LUTs' tables, in chain order.
        extra, others = [], iter(xs[1:])
        for c, post in zip(chain[1:], d.post):
            if isinstance(post, kep.FusedAdd):
                extra += [next(others) for _ in post.others]
            elif isinstance(post, kep.FusedLut):
                extra.append(ctx.param(f"{c.name}.table_k", c.params["table"].reshape(-1)))
        args = [xs[0]] + _params(n, spec, ctx, d.requant) + extra
        y = ctx.emit(relax.call_tir(gv, args, relax.TensorType(shape, dtype)))
        return ctx.emit(relax.op.reshape(y, (batch, shape[3]))) if flat else y

    def rule(n: QNode, ctx: LowerCtx, xs: Sequence[relax.Expr]) -> relax.Var | None:
        return call((n,), ctx, xs)

    return [("x86_fused", FuseRule(_extend, call)), ("x86_vnni", rule)]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)
