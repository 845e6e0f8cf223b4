"""The ONNX op handlers: one function per op type turns a ``NodeProto`` into ``Node``s.

A handler reads its node through ``_Ctx`` (attributes, constants, static shapes) and
either returns the imported node(s), still carrying the ONNX ``op_type``, or refuses
with one line naming the node.  ``_HANDLERS`` is the registry; ``SUPPORTED_OPS``,
``LOWERED_AS`` and ``ops_table()`` (the README's table) are derived from it.
``onnx_import.import_onnx`` walks the graph and calls these.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NoReturn

import numpy as np
import onnx

from qcompile.ir.activations import UNARY_FUNCTIONS
from qcompile.errors import BadModelError, UnsupportedOpError
from qcompile.ir.graph import Node


@dataclass
class _Ctx:
    """What a handler needs to turn one ONNX node into a ``Node``."""

    name: str
    onode: onnx.NodeProto
    attrs: dict[str, Any]
    consts: Mapping[str, np.ndarray]
    shapes: Mapping[str, tuple[int, ...]]

    @property
    def op(self) -> str:
        return self.onode.op_type

    def unsupported(self, what: str, why: str) -> NoReturn:
        raise UnsupportedOpError(f"node {self.name!r} (op {self.op}): {what} is not "
                                 f"supported ({why}); change it in the model or file an issue")

    def _input(self, i: int) -> str:
        ins = self.onode.input
        return ins[i] if i < len(ins) else ""

    def has(self, i: int) -> bool:
        return self._input(i) != ""

    def is_const(self, i: int) -> bool:
        return self._input(i) in self.consts

    def act(self, i: int) -> str:
        """Input ``i`` as an activation tensor (constants are refused)."""
        t = self._input(i)
        if t in self.consts:
            self.unsupported(f"constant input {t!r}", "this input must be an activation")
        return t

    def const(self, i: int, role: str) -> np.ndarray:
        """Input ``i`` as a float32 constant (activations are refused)."""
        t = self._input(i)
        if t not in self.consts:
            self.unsupported(f"non-constant {role} input {t!r}", f"{role} must be an initializer")
        return np.array(self.consts[t], dtype=np.float32)  # a private copy

    def node(self, inputs: tuple[str, ...], attrs: Mapping[str, Any] | None = None,
             params: Mapping[str, np.ndarray] | None = None) -> Node:
        return Node(op=self.op, name=self.name, inputs=inputs, output=self.onode.output[0],
                    attrs=self.attrs if attrs is None else attrs, params=params or {})


# --------------------------------------------------------------------------- windows

def _window_pads(ctx: _Ctx, kernel: tuple[int, ...], ceil: bool) -> tuple[dict[str, Any], bool]:
    """Explicit (top, left, bottom, right) pads for Conv/MaxPool/AveragePool.

    auto_pad and ceil_mode become plain pads; the result must reproduce the inferred
    output size, which catches the ceil_mode corner where ONNX shape inference and
    onnxruntime disagree on the size of the last window.  Also says whether ceil_mode
    added padding past the explicit pads.
    """
    x_shape, y_shape = ctx.shapes[ctx.onode.input[0]], ctx.shapes[ctx.onode.output[0]]
    if len(x_shape) != 4 or len(kernel) != 2:
        ctx.unsupported(f"{len(x_shape) - 2}-D windows", "only 2-D (N, C, H, W) is supported")
    strides = tuple(ctx.attrs.get("strides", (1, 1)))
    dilations = tuple(ctx.attrs.get("dilations", (1, 1)))
    auto_pad = ctx.attrs.get("auto_pad", "NOTSET")
    pads = list(ctx.attrs.get("pads", (0, 0, 0, 0)))
    ceil_extra = False
    for ax in range(2):
        size, k, s, d = x_shape[2 + ax], kernel[ax], strides[ax], dilations[ax]
        span = (k - 1) * d + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            total = max(0, (math.ceil(size / s) - 1) * s + span - size)
            small, big = total // 2, total - total // 2
            pads[ax], pads[2 + ax] = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
        elif auto_pad == "VALID":
            pads[ax] = pads[2 + ax] = 0
        elif auto_pad != "NOTSET":
            ctx.unsupported(f"auto_pad={auto_pad}", "unknown value")
        padded = size + pads[ax] + pads[2 + ax]
        out = (padded - span) // s + 1
        if ceil and auto_pad == "NOTSET":
            out = -(-(padded - span) // s) + 1
            if (out - 1) * s >= size + pads[ax]:  # last window may not start in the end pad
                out -= 1
            extra = max(0, (out - 1) * s + span - padded)
            pads[2 + ax] += extra
            ceil_extra |= extra > 0
        if out != y_shape[2 + ax]:
            ctx.unsupported("ceil_mode=1" if ceil else "this window geometry",
                            f"output size {y_shape[2 + ax]} on axis {2 + ax} from shape "
                            f"inference, {out} from the window arithmetic")
    attrs = {"kernel_shape": tuple(kernel), "strides": strides, "dilations": dilations,
             "pads": tuple(pads)}
    return attrs, ceil_extra


# --------------------------------------------------------------------------- handlers

def _conv(ctx: _Ctx) -> Node:
    w = ctx.const(1, "weight")
    params = {"w": w} | ({"b": ctx.const(2, "bias")} if ctx.has(2) else {})
    if "b" in params and params["b"].shape != w.shape[:1]:  # onnxruntime does not check it
        raise BadModelError(f"node {ctx.name!r} (op Conv): bias has shape {params['b'].shape}, "
                            f"the weight has {w.shape[0]} output channels; the model is invalid")
    x_shape, group = ctx.shapes.get(ctx.onode.input[0], ()), int(ctx.attrs.get("group", 1))
    if (group < 1 or w.ndim < 3 or w.shape[0] % group
            or (len(x_shape) > 1 and w.shape[1] * group != x_shape[1])
            or tuple(ctx.attrs.get("kernel_shape", w.shape[2:])) != w.shape[2:]):
        raise BadModelError(f"node {ctx.name!r} (op Conv): weight {w.shape} with group={group}"
                            f" and kernel_shape={tuple(ctx.attrs.get('kernel_shape', ()))} does "
                            f"not fit input {x_shape}; the model is invalid")
    attrs, _ = _window_pads(ctx, tuple(ctx.attrs.get("kernel_shape", w.shape[2:])), ceil=False)
    return ctx.node((ctx.act(0),), attrs | {"group": int(ctx.attrs.get("group", 1))}, params)


def _pool(ctx: _Ctx) -> Node:
    if ctx.attrs.get("storage_order", 0) != 0:
        ctx.unsupported("storage_order=1", "only row-major (0) pooling indices are supported")
    ceil = bool(ctx.attrs.get("ceil_mode", 0))
    attrs, ceil_extra = _window_pads(ctx, tuple(ctx.attrs["kernel_shape"]), ceil)
    if ctx.op == "AveragePool":
        include = bool(ctx.attrs.get("count_include_pad", 0))
        # onnxruntime divides by the window clipped to the explicit pads, so a ceil-mode
        # extra would be counted wrongly once merged into the pads.
        if include and ceil_extra:
            ctx.unsupported("ceil_mode=1 with count_include_pad=1",
                            "the partial last window cannot be expressed with plain pads")
        if attrs["dilations"] != (1, 1):
            ctx.unsupported("dilations", "AveragePool dilation is not supported")
        attrs["count_include_pad"] = include
    return ctx.node((ctx.act(0),), attrs)


def _batchnorm(ctx: _Ctx) -> Node:
    if ctx.attrs.get("training_mode", 0):
        ctx.unsupported("training_mode=1", "export the model in inference mode")
    params = {role: ctx.const(i, role)
              for i, role in enumerate(("scale", "bias", "mean", "var"), start=1)}
    return ctx.node((ctx.act(0),), {"epsilon": float(ctx.attrs.get("epsilon", 1e-5))}, params)


def _clip(ctx: _Ctx) -> Node:
    # opset >= 11 passes bounds as optional inputs; older opsets as attributes.
    lo = float(ctx.attrs.get("min", -np.inf))
    hi = float(ctx.attrs.get("max", np.inf))
    if ctx.has(1):
        lo = float(ctx.const(1, "min").reshape(()))
    if ctx.has(2):
        hi = float(ctx.const(2, "max").reshape(()))
    return ctx.node((ctx.act(0),), {"min": lo, "max": hi})


def _gemm(ctx: _Ctx) -> Node:
    if ctx.attrs.get("transA", 0):
        ctx.unsupported("attribute transA=1", "transpose the input before Gemm")
    attrs = {"transA": 0, "transB": int(ctx.attrs.get("transB", 0)),
             "alpha": float(ctx.attrs.get("alpha", 1.0)), "beta": float(ctx.attrs.get("beta", 1.0))}
    if not (np.isfinite(attrs["alpha"]) and np.isfinite(attrs["beta"])):
        raise BadModelError(f"node {ctx.name!r} (op Gemm): alpha={attrs['alpha']} "
                            f"beta={attrs['beta']} must be finite; the model is invalid")
    params = {"w": ctx.const(1, "weight")} | ({"b": ctx.const(2, "bias")} if ctx.has(2) else {})
    return ctx.node((ctx.act(0),), attrs, params)


def _matmul(ctx: _Ctx) -> Node:
    w = ctx.const(1, "weight")
    if w.ndim != 2:
        ctx.unsupported(f"a {w.ndim}-D weight", "only a constant 2-D right operand is supported")
    return ctx.node((ctx.act(0),), {}, {"w": w})


def _reshape(ctx: _Ctx) -> Node:
    if not ctx.is_const(1):
        ctx.unsupported(f"non-constant shape input {ctx.onode.input[1]!r}",
                        "the target shape must be an initializer or Constant")
    target = tuple(int(v) for v in np.asarray(ctx.consts[ctx.onode.input[1]]).reshape(-1))
    attrs = {"shape": target, "allowzero": int(ctx.attrs.get("allowzero", 0))}
    return ctx.node((ctx.act(0),), attrs)


def _dropout(ctx: _Ctx) -> Node:
    if ctx.has(2) and (not ctx.is_const(2) or bool(ctx.consts[ctx.onode.input[2]])):
        ctx.unsupported("training_mode", "export the model in inference mode")
    return ctx.node((ctx.act(0),), {})


def _gap(ctx: _Ctx) -> Node:
    if len(ctx.shapes[ctx.onode.output[0]]) != 4:
        ctx.unsupported("a non-4-D input", "only (N, C, H, W) is supported")
    return ctx.node((ctx.act(0),), {})


def _unary(ctx: _Ctx) -> Node:
    return ctx.node((ctx.act(0),), ctx.attrs)


def _concat(ctx: _Ctx) -> Node:
    return ctx.node(tuple(ctx.act(i) for i in range(len(ctx.onode.input))), ctx.attrs)


def _shape_of(ctx: _Ctx, i: int) -> tuple[int, ...]:
    return ctx.shapes[ctx.onode.input[i]]


def _ints(ctx: _Ctx, i: int, role: str) -> tuple[int, ...]:
    """A constant integer input (shapes, axes, pads ...) as a tuple."""
    t = ctx.onode.input[i]
    if t not in ctx.consts:
        ctx.unsupported(f"non-constant {role} input {t!r}",
                        f"{role} must be an initializer or foldable to one")
    return tuple(int(v) for v in np.asarray(ctx.consts[t]).reshape(-1))


def _axes(ctx: _Ctx, rank: int, input_index: int = 1) -> tuple[int, ...] | None:
    """``axes`` from the attribute (old opsets) or the optional input (new ones)."""
    if "axes" in ctx.attrs:
        raw = tuple(ctx.attrs["axes"])
    elif ctx.has(input_index):
        raw = _ints(ctx, input_index, "axes")
    else:
        return None
    return tuple(sorted(a + rank if a < 0 else a for a in raw))


def _elementwise(ctx: _Ctx) -> Node:
    """Add/Sub/Mul/Div/Sum/Max/Min: activations in ``inputs``, at most one constant ``c``.

    ``const_at`` says where the constant stood, since Sub and Div are not symmetric."""
    n = len(ctx.onode.input)
    const_at = [i for i in range(n) if ctx.is_const(i)]
    if len(const_at) == n:
        ctx.unsupported("all-constant inputs", "nothing depends on the model input")
    if len(const_at) > 1:
        ctx.unsupported("more than one constant input", "fold the constants into one")
    params = {"c": ctx.const(const_at[0], "constant")} if const_at else {}
    acts = tuple(ctx.act(i) for i in range(n) if i not in const_at)
    return ctx.node(acts, {"const_at": const_at[0] if const_at else -1}, params)


def _prelu(ctx: _Ctx) -> Node:
    return ctx.node((ctx.act(0),), {}, {"slope": ctx.const(1, "slope")})


def _pad(ctx: _Ctx) -> Node:
    rank = len(_shape_of(ctx, 0))
    if "pads" in ctx.attrs:  # opset < 11
        pads, value = tuple(ctx.attrs["pads"]), float(ctx.attrs.get("value", 0.0))
    else:
        pads = _ints(ctx, 1, "pads")
        value = float(ctx.const(2, "constant_value").reshape(-1)[0]) if ctx.has(2) else 0.0
    axes = _axes(ctx, rank, input_index=3) if "pads" not in ctx.attrs else None
    if axes is not None:  # opset 18: pads only for ``axes``
        full = [0] * (2 * rank)
        k = len(axes)
        for j, a in enumerate(axes):
            full[a], full[rank + a] = pads[j], pads[k + j]
        pads = tuple(full)
    if len(pads) != 2 * rank:
        ctx.unsupported(f"pads of length {len(pads)}", f"need {2 * rank} for rank {rank}")
    mode = ctx.attrs.get("mode", "constant")
    if mode not in ("constant", "reflect", "edge"):
        ctx.unsupported(f"mode={mode}", "only constant, reflect and edge are supported")
    if any(p < 0 for p in pads):
        ctx.unsupported("negative pads (cropping)", "use Slice to crop")
    return ctx.node((ctx.act(0),), {"pads": pads, "mode": mode, "value": value})


def _transpose(ctx: _Ctx) -> Node:
    rank = len(_shape_of(ctx, 0))
    perm = tuple(int(p) for p in ctx.attrs.get("perm", tuple(range(rank))[::-1]))
    return ctx.node((ctx.act(0),), {"perm": perm})


def _to_shape(ctx: _Ctx) -> Node:
    """Squeeze/Unsqueeze/Reshape: a reshape to the statically inferred output shape."""
    if ctx.op == "Reshape" and not ctx.is_const(1):
        ctx.unsupported(f"non-constant shape input {ctx.onode.input[1]!r}",
                        "the target shape must be an initializer or foldable to one")
    node = ctx.node((ctx.act(0),), {"shape": tuple(ctx.shapes[ctx.onode.output[0]])})
    return node.with_(op="Reshape")


def _slice(ctx: _Ctx) -> Node:
    shape = _shape_of(ctx, 0)
    rank = len(shape)
    if "starts" in ctx.attrs:  # opset < 10
        starts, ends = tuple(ctx.attrs["starts"]), tuple(ctx.attrs["ends"])
        axes = tuple(ctx.attrs.get("axes", range(len(starts))))
        steps = (1,) * len(starts)
    else:
        starts, ends = _ints(ctx, 1, "starts"), _ints(ctx, 2, "ends")
        axes = _ints(ctx, 3, "axes") if ctx.has(3) else tuple(range(len(starts)))
        steps = _ints(ctx, 4, "steps") if ctx.has(4) else (1,) * len(starts)
    begin, end, step = [0] * rank, list(shape), [1] * rank
    for a, b, e, st in zip(axes, starts, ends, steps):
        a = a + rank if a < 0 else a
        if st <= 0:
            ctx.unsupported(f"step {st}", "only positive Slice steps are supported")
        size = shape[a]
        b = min(max(b + size if b < 0 else b, 0), size)
        e = min(max(e + size if e < 0 else e, 0), size)
        begin[a], end[a], step[a] = b, e, st
    return ctx.node((ctx.act(0),), {"begin": tuple(begin), "end": tuple(end),
                                    "step": tuple(step)}).with_(op="Slice")


def _split(ctx: _Ctx) -> list[Node]:
    """One Slice node per output: the graph stays single-output per node."""
    shape = _shape_of(ctx, 0)
    rank = len(shape)
    axis = int(ctx.attrs.get("axis", 0))
    axis = axis + rank if axis < 0 else axis
    outs = list(ctx.onode.output)
    if "split" in ctx.attrs:
        sizes = tuple(ctx.attrs["split"])
    elif ctx.has(1):
        sizes = _ints(ctx, 1, "split")
    else:  # equal parts; opset 18's num_outputs gives the last one the remainder
        k = len(outs)
        part = -(-shape[axis] // k)
        sizes = tuple(min(part, shape[axis] - i * part) for i in range(k))
    if len(sizes) != len(outs) or sum(sizes) != shape[axis]:
        ctx.unsupported(f"split sizes {sizes}", f"they must cover axis {axis} of {shape}")
    nodes, start = [], 0
    for i, (out, size) in enumerate(zip(outs, sizes)):
        begin, end = [0] * rank, list(shape)
        begin[axis], end[axis] = start, start + size
        start += size
        if not out:
            continue
        nodes.append(Node(op="Slice", name=f"{ctx.name}:{i}" if len(outs) > 1 else ctx.name,
                          inputs=(ctx.act(0),), output=out,
                          attrs={"begin": tuple(begin), "end": tuple(end),
                                 "step": (1,) * rank}))
    return nodes


def _nearest_index(out_size: int, in_size: int, scale: float, ctm: str, mode: str) -> np.ndarray:
    """ONNX Resize's input index for every output index of one axis, nearest mode."""
    o = np.arange(out_size, dtype=np.float64)
    if ctm == "half_pixel":
        x = (o + 0.5) / scale - 0.5
    elif ctm == "pytorch_half_pixel":
        x = (o + 0.5) / scale - 0.5 if out_size > 1 else np.zeros_like(o)
    elif ctm == "align_corners":
        x = o * (in_size - 1) / (out_size - 1) if out_size > 1 else np.zeros_like(o)
    elif ctm == "asymmetric":
        x = o / scale
    elif ctm == "tf_half_pixel_for_nn":
        x = (o + 0.5) / scale
    else:
        raise ValueError(ctm)
    if mode == "round_prefer_floor":
        i = np.where(x - np.floor(x) == 0.5, np.floor(x), np.round(x))
    elif mode == "round_prefer_ceil":
        i = np.where(x - np.floor(x) == 0.5, np.ceil(x), np.round(x))
    elif mode == "floor":
        i = np.floor(x)
    elif mode == "ceil":
        i = np.ceil(x)
    else:
        raise ValueError(mode)
    return np.clip(i, 0, in_size - 1).astype(np.int64)


def _resize(ctx: _Ctx) -> Node:
    """Nearest Resize/Upsample -> a gather per resized axis, indices computed here."""
    mode = ctx.attrs.get("mode", "nearest")
    if mode != "nearest":
        ctx.unsupported(f"mode={mode}", "only nearest Resize is integer-only here; "
                        "re-export with mode='nearest'")
    in_shape, out_shape = _shape_of(ctx, 0), ctx.shapes[ctx.onode.output[0]]
    ctm = ctx.attrs.get("coordinate_transformation_mode", "half_pixel")
    nmode = ctx.attrs.get("nearest_mode", "round_prefer_floor")
    if ctx.op == "Upsample":
        ctm, nmode = "asymmetric", "floor"
    if ctm == "tf_crop_and_resize":
        ctx.unsupported("coordinate_transformation_mode=tf_crop_and_resize", "not supported")
    scales: tuple[float, ...] = ()
    scale_input = 2 if ctx.op == "Resize" else 1
    if ctx.has(scale_input) and ctx.is_const(scale_input):
        scales = tuple(float(v) for v in ctx.const(scale_input, "scales").reshape(-1))
    if len(scales) != len(in_shape):
        scales = tuple(o / i for o, i in zip(out_shape, in_shape))
    idx = {}
    for a, (i_size, o_size) in enumerate(zip(in_shape, out_shape)):
        if i_size == o_size and scales[a] == 1.0:
            continue
        if a < 2 and len(in_shape) == 4:
            ctx.unsupported(f"resizing axis {a}", "only H and W may be resized")
        try:
            idx[a] = _nearest_index(o_size, i_size, scales[a], ctm, nmode)
        except ValueError as err:
            ctx.unsupported(f"mode {err}", "unknown Resize mode")
    return Node(op="Gather", name=ctx.name, inputs=(ctx.act(0),), output=ctx.onode.output[0],
                attrs={"axes": tuple(sorted(idx))},
                params={f"idx{a}": v for a, v in idx.items()})


def _reduce(ctx: _Ctx) -> Node:
    rank = len(_shape_of(ctx, 0))
    axes = _axes(ctx, rank) or tuple(range(rank))
    if ctx.attrs.get("noop_with_empty_axes", 0) and not _axes(ctx, rank):
        return ctx.node((ctx.act(0),), {}).with_(op="Identity")
    if rank != 4 or axes != (2, 3):
        ctx.unsupported(f"axes {axes}", "only reductions over H and W of (N, C, H, W) "
                                        "are supported")
    return ctx.node((ctx.act(0),), {"keepdims": bool(ctx.attrs.get("keepdims", 1))})


def _lrn(ctx: _Ctx) -> Node:
    if len(_shape_of(ctx, 0)) != 4:
        ctx.unsupported("a non-4-D input", "only (N, C, H, W) is supported")
    a = ctx.attrs
    return ctx.node((ctx.act(0),), {"size": int(a["size"]), "alpha": float(a.get("alpha", 1e-4)),
                                    "beta": float(a.get("beta", 0.75)),
                                    "bias": float(a.get("bias", 1.0))})


def _cast(ctx: _Ctx) -> Node:
    if int(ctx.attrs.get("to", 0)) != onnx.TensorProto.FLOAT:
        ctx.unsupported(f"a cast to {onnx.TensorProto.DataType.Name(ctx.attrs.get('to', 0))}",
                        "only casts to float32 inside the network are supported")
    return ctx.node((ctx.act(0),), {}).with_(op="Identity")


def _global_max(ctx: _Ctx) -> Node:
    if len(_shape_of(ctx, 0)) != 4:
        ctx.unsupported("a non-4-D input", "only (N, C, H, W) is supported")
    return ctx.node((ctx.act(0),), {"keepdims": True}).with_(op="ReduceMax")


# Unary elementwise functions with a float definition in ``activations.py``: each becomes
# a table lookup on its quantized input.
_MULTI_OUTPUT = ("Split",)

_HANDLERS: dict[str, Callable[[_Ctx], "Node | list[Node]"]] = {
    "Conv": _conv, "MaxPool": _pool, "AveragePool": _pool, "BatchNormalization": _batchnorm,
    "Clip": _clip, "Gemm": _gemm, "MatMul": _matmul, "Reshape": _to_shape,
    "Squeeze": _to_shape, "Unsqueeze": _to_shape, "Dropout": _dropout, "Concat": _concat,
    "Relu": _unary, "GlobalAveragePool": _gap, "Flatten": _unary, "Softmax": _unary,
    "Identity": _unary, "Add": _elementwise, "Sub": _elementwise, "Mul": _elementwise,
    "Div": _elementwise, "Sum": _elementwise, "Max": _elementwise, "Min": _elementwise,
    "PRelu": _prelu, "Pad": _pad, "Transpose": _transpose, "Slice": _slice, "Split": _split,
    "Resize": _resize, "Upsample": _resize, "ReduceMean": _reduce, "ReduceSum": _reduce,
    "ReduceMax": _reduce, "GlobalMaxPool": _global_max, "LRN": _lrn, "Cast": _cast,
    **{op: _unary for op in UNARY_FUNCTIONS},
}
SUPPORTED_OPS: frozenset[str] = frozenset(_HANDLERS)

# What each supported op becomes inside the integer core (README's table is made from this).
_LUT = "table lookup (256 entries at 8 bits, 16 at 4), built from the float function"
LOWERED_AS: dict[str, str] = {
    "Conv": "VNNI implicit GEMM / depthwise kernel, dyadic requant epilogue",
    "Gemm": "VNNI dense kernel", "MatMul": "VNNI dense kernel (constant 2-D right operand)",
    "BatchNormalization": "folded into the conv before it, else a per-channel dyadic affine",
    "Relu": "fused as output bounds, else an integer clip", "Clip": "same as Relu",
    "Add": "dyadic sum with broadcasting; with a constant: folded into the bias or a dyadic "
           "affine",
    "Sub": "same as Add, negative multiplier", "Sum": "n-ary dyadic sum",
    "Mul": "int16 product x dyadic multiplier (squeeze-excitation); x * f(x) fuses into one "
           "table; with a constant: dyadic affine",
    "Div": "by a constant only: dyadic affine", "Max": "with a scalar constant: clip",
    "Min": "with a scalar constant: clip", "PRelu": "per-channel table lookup",
    "MaxPool": "vectorized window max", "AveragePool": "window sum x dyadic factor",
    "GlobalAveragePool": "global sum x dyadic factor", "GlobalMaxPool": "window max",
    "ReduceMean": "over H, W: global sum x dyadic factor",
    "ReduceSum": "over H, W: global sum x dyadic factor", "ReduceMax": "over H, W: window max",
    "LRN": "integer sum of squares, dyadic table for the power",
    "Pad": "constant: integer pad (zero pads fold into the next conv); reflect/edge: gather",
    "Transpose": "integer permute (folds into neighbouring layout changes)",
    "Reshape": "reshape (the batch axis must stay)", "Flatten": "reshape",
    "Squeeze": "reshape", "Unsqueeze": "reshape", "Slice": "strided slice (positive steps)",
    "Split": "one strided slice per output", "Concat": "dyadic requant per input, concat",
    "Resize": "nearest: a gather of precomputed indices", "Upsample": "as Resize",
    "Softmax": "last node only, in float after dequantize", "Identity": "removed",
    "Dropout": "removed (inference mode)", "Cast": "to float32 only: removed",
    **{op: _LUT for op in UNARY_FUNCTIONS},
}
assert set(LOWERED_AS) == SUPPORTED_OPS, "document every supported op"


def ops_table() -> str:
    """The supported-ops table in Markdown, one row per ONNX op."""
    rows = ["| ONNX op | inside the integer core |", "| --- | --- |"]
    rows += [f"| `{op}` | {LOWERED_AS[op]} |" for op in sorted(SUPPORTED_OPS)]
    return "\n".join(rows) + "\n"
