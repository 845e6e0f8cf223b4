"""The canonical graph as ONNX (``Graph`` -> ``onnx.ModelProto``): what onnxruntime runs
when a stage needs the float model with its weights as inputs (GPTQ's layer inputs,
sensitivity's KL measure, equalization's statistics).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qcompile.errors import UsageError
from qcompile.ir.graph import Graph, Node, layer_nodes


def _act_nodes(n: Node, x: str, act: tuple[float, float] | None, inits: list[TensorProto]
               ) -> list[onnx.NodeProto]:
    if act is None:
        return [helper.make_node("Identity", [x], [n.output])]
    if act == (0.0, float("inf")):
        return [helper.make_node("Relu", [x], [n.output])]
    bounds = []
    for tag, v in zip(("lo", "hi"), act):
        name = f"{n.name}::{tag}"
        if np.isfinite(v):
            inits.append(numpy_helper.from_array(np.array(v, np.float32), name))
        bounds.append(name if np.isfinite(v) else "")
    return [helper.make_node("Clip", [x, *bounds], [n.output])]


def _init(inits: list[TensorProto], name: str, value: np.ndarray | float | Sequence[int],
          dtype: type = np.float32) -> str:
    """Add a constant initializer; returns its name."""
    inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
    return name


def _onnx_add(n: Node, pre: str) -> list[onnx.NodeProto]:
    """sum_i sign_i * x_i as a chain of Add/Sub (a leading minus is a Neg)."""
    signs = tuple(n.attrs.get("signs", (1,) * len(n.inputs)))
    nodes, acc = [], n.inputs[0]
    if signs[0] < 0:
        nodes.append(helper.make_node("Neg", [acc], [f"{n.name}::neg"]))
        acc = f"{n.name}::neg"
    if len(n.inputs) == 1:
        return nodes + [helper.make_node("Identity", [acc], [pre])]
    for i, (sg, x) in enumerate(zip(signs[1:], n.inputs[1:]), 1):
        out = pre if i == len(n.inputs) - 1 else f"{n.name}::sum{i}"
        nodes.append(helper.make_node("Add" if sg > 0 else "Sub", [acc, x], [out]))
        acc = out
    return nodes


def _onnx_lut(g: Graph, n: Node, pre: str, inits: list[TensorProto]) -> list[onnx.NodeProto]:
    """The table function as the ONNX op itself (``Mul(x, f(x))`` when ``times_x``)."""
    a, x = n.attrs, n.inputs[0]
    times_x = bool(a.get("times_x", False))
    f_out = f"{n.name}::f" if times_x else pre
    if a["fn"] == "PRelu":  # one slope per channel: (C, 1, ...) against (N, C, ...)
        rank = len(g.shapes[x])
        slope = np.asarray(n.params["slope"], np.float32).reshape((-1,) + (1,) * (rank - 2))
        nodes = [helper.make_node("PRelu", [x, _init(inits, f"{n.name}::slope", slope)],
                                  [f_out])]
    else:
        attrs = {k: float(v) if isinstance(v, (float, np.floating)) else v
                 for k, v in dict(a.get("fn_attrs", {})).items()}
        nodes = [helper.make_node(a["fn"], [x], [f_out], **attrs)]
    if times_x:
        nodes.append(helper.make_node("Mul", [x, f_out], [pre]))
    return nodes


def onnx_node(g: Graph, n: Node, inits: list[TensorProto]) -> list[onnx.NodeProto]:
    a, pre, ins, out = n.attrs, f"{n.name}::pre", list(n.inputs), [n.output]
    if n.op in ("conv", "dense"):
        inits.append(numpy_helper.from_array(np.asarray(n.params["b"], np.float32), f"{n.name}::b"))
        ins = [n.inputs[0], f"{n.name}::w", f"{n.name}::b"]
        core = (helper.make_node("Conv", ins, [pre], strides=a["strides"], pads=a["pads"],
                                 dilations=a["dilations"], group=a["group"])
                if n.op == "conv" else helper.make_node("Gemm", ins, [pre], transB=1))
        return [core, *_act_nodes(n, pre, a["act"], inits)]
    if n.op == "add":
        return [*_onnx_add(n, pre), *_act_nodes(n, pre, a["act"], inits)]
    if n.op == "mul":
        return [helper.make_node("Mul", ins, [pre]), *_act_nodes(n, pre, a["act"], inits)]
    if n.op == "affine":
        scale = _init(inits, f"{n.name}::scale", n.params["scale"])
        shift = _init(inits, f"{n.name}::shift", n.params["shift"])
        return [helper.make_node("Mul", [ins[0], scale], [f"{n.name}::scaled"]),
                helper.make_node("Add", [f"{n.name}::scaled", shift], [pre]),
                *_act_nodes(n, pre, a["act"], inits)]
    if n.op == "lut":
        return [*_onnx_lut(g, n, pre, inits), *_act_nodes(n, pre, a.get("act"), inits)]
    if n.op == "clip":
        return _act_nodes(n, n.inputs[0], (a["lo"], a["hi"]), inits)
    if n.op == "maxpool":
        return [helper.make_node("MaxPool", ins, out, kernel_shape=a["kernel"],
                                 strides=a["strides"], pads=a["pads"], dilations=a["dilations"])]
    if n.op == "avgpool":
        return [helper.make_node("AveragePool", ins, out, kernel_shape=a["kernel"],
                                 strides=a["strides"], pads=a["pads"],
                                 count_include_pad=int(a["count_include_pad"]))]
    if n.op == "gap":
        axes = _init(inits, f"{n.name}::axes", [2, 3], np.int64)
        return [helper.make_node("ReduceMean" if a.get("mean", True) else "ReduceSum",
                                 [ins[0], axes], out, keepdims=int(a.get("keepdims", True)))]
    if n.op == "lrn":
        return [helper.make_node("LRN", ins, out, size=int(a["size"]), alpha=float(a["alpha"]),
                                 beta=float(a["beta"]), bias=float(a["bias"]))]
    if n.op == "pad":
        pads = _init(inits, f"{n.name}::pads", a["pads"], np.int64)
        value = _init(inits, f"{n.name}::value", float(a["value"]))
        return [helper.make_node("Pad", [ins[0], pads, value], out, mode="constant")]
    if n.op == "transpose":
        return [helper.make_node("Transpose", ins, out, perm=[int(p) for p in a["perm"]])]
    if n.op == "slice":  # every axis but the batch (never sliced)
        r = len(a["begin"])
        names = [_init(inits, f"{n.name}::{k}", np.asarray(a[k][1:], np.int64), np.int64)
                 for k in ("begin", "end")]
        axes = _init(inits, f"{n.name}::axes", np.arange(1, r), np.int64)
        steps = _init(inits, f"{n.name}::steps", np.asarray(a["step"][1:]), np.int64)
        return [helper.make_node("Slice", [ins[0], *names, axes, steps], out)]
    if n.op == "gather":
        nodes, x, axes = [], ins[0], list(a["axes"])
        for i, ax in enumerate(axes):
            idx = _init(inits, f"{n.name}::idx{ax}", n.params[f"idx{ax}"], np.int64)
            y = n.output if i == len(axes) - 1 else f"{n.name}::g{i}"
            nodes.append(helper.make_node("Gather", [x, idx], [y], axis=int(ax)))
            x = y
        return nodes or [helper.make_node("Identity", ins, out)]
    if n.op == "flatten":
        return [helper.make_node("Flatten", ins, out, axis=a["axis"])]
    if n.op == "reshape":
        shape = _init(inits, f"{n.name}::shape", [-1, *a["shape"][1:]], np.int64)  # batch
        return [helper.make_node("Reshape", [ins[0], shape], out)]
    if n.op == "concat":
        return [helper.make_node("Concat", ins, out, axis=a["axis"])]
    raise UsageError(f"node {n.name!r}: op {n.op!r} is not a canonical op")


# Opset of the export: 20 has every table function as an ONNX op (Gelu: 20, Mish: 18).
CANONICAL_OPSET = 20


def canonical_onnx(graph: Graph) -> onnx.ModelProto:
    """The canonical graph as ONNX: input, then every layer weight as a graph input.

    Outputs logits (a trailing softmax is dropped); the batch dimension is free.
    """
    nodes, inits = [], []
    for n in graph.nodes:
        if n.op == "softmax":
            continue
        nodes += onnx_node(graph, n, inits)
    logits = graph.nodes[-1].inputs[0] if graph.nodes[-1].op == "softmax" else graph.output
    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(graph.input, f32, ["N", *graph.input_shape[1:]])]
    inputs += [helper.make_tensor_value_info(f"{n.name}::w", f32, list(n.params["w"].shape))
               for n in layer_nodes(graph)]
    out = helper.make_tensor_value_info(logits, f32, None)
    g = helper.make_graph(nodes, "canonical", inputs, [out], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", CANONICAL_OPSET)],
                             ir_version=10)
