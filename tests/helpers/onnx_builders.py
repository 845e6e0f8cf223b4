"""Tiny seeded ONNX models built with ``onnx.helper``, shared by the importer tests."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

Dim = int | str  # a str is a symbolic dimension


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def init(name: str, array: np.ndarray) -> TensorProto:
    """An initializer; float64 data is stored as float32, ints as int64."""
    a = np.asarray(array)
    a = a.astype(np.float32) if a.dtype.kind == "f" else a.astype(np.int64)
    return numpy_helper.from_array(a, name)


def make_model(nodes: Sequence[onnx.NodeProto], inits: Sequence[TensorProto],
               in_shape: Sequence[Dim] | None, out_shape: Sequence[Dim] | None = None, *,
               opset: int = 17, in_name: str = "x", out_name: str = "y",
               in_dtype: int = TensorProto.FLOAT,
               extra_inputs: Sequence[onnx.ValueInfoProto] = (),
               extra_outputs: Sequence[onnx.ValueInfoProto] = ()) -> onnx.ModelProto:
    """A one-input, one-output model (more with ``extra_*``) at ``opset``."""
    graph = helper.make_graph(
        list(nodes), "tiny",
        [helper.make_tensor_value_info(in_name, in_dtype, in_shape), *extra_inputs],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape), *extra_outputs],
        initializer=list(inits))
    ir = 8 if opset <= 18 else 10  # keep the IR version onnxruntime accepts for the opset
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=ir, producer_name="qcompile-tests")
    # The checker wants a typed output shape; let (lenient) inference write it.
    return onnx.shape_inference.infer_shapes(model) if out_shape is None else model


def save(model: onnx.ModelProto, directory: Path, name: str = "model.onnx") -> Path:
    """Write the model bytes as they are (onnx.save would rewrite external data)."""
    path = Path(directory) / name
    path.write_bytes(model.SerializeToString())
    return path


def run_ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0]


def conv_node(name: str, x: str, y: str, w: np.ndarray, b: np.ndarray | None,
              inits: list[TensorProto], **attrs: object) -> onnx.NodeProto:
    """A Conv whose weight (and bias) initializers are appended to ``inits``."""
    inits.append(init(f"{name}_w", w))
    ins = [x, f"{name}_w"]
    if b is not None:
        inits.append(init(f"{name}_b", b))
        ins.append(f"{name}_b")
    return helper.make_node("Conv", ins, [y], name=name, **attrs)


def bn_node(name: str, x: str, y: str, channels: int, r: np.random.Generator,
            inits: list[TensorProto], epsilon: float = 1e-3) -> onnx.NodeProto:
    """An inference BatchNormalization with non-trivial statistics."""
    roles = {"scale": r.uniform(0.5, 1.5, channels), "bias": r.normal(0, 0.5, channels),
             "mean": r.normal(0, 0.5, channels), "var": r.uniform(0.5, 2.0, channels)}
    for role, v in roles.items():
        inits.append(init(f"{name}_{role}", v))
    return helper.make_node("BatchNormalization", [x, *(f"{name}_{r_}" for r_ in roles)], [y],
                            name=name, epsilon=epsilon)


def conv_bn_relu_model(seed: int = 0, *, cin: int = 3, cout: int = 8, size: int = 9,
                       kernel: int = 3, group: int = 1, bias: bool = True, bn: bool = True,
                       act: str | None = "relu", batch: Dim = 1,
                       **conv_attrs: object) -> onnx.ModelProto:
    """x -> Conv(**conv_attrs) [-> BatchNormalization] [-> Relu | Clip(0, 6)] -> y."""
    r = rng(seed)
    inits: list[TensorProto] = []
    w = r.normal(0, 0.3, (cout, cin // group, kernel, kernel))
    b = r.normal(0, 0.1, cout) if bias else None
    nodes = [conv_node("conv", "x", "c", w, b, inits, group=group, **conv_attrs)]
    last = "c"
    if bn:
        nodes.append(bn_node("bn", last, "n", cout, r, inits))
        last = "n"
    if act == "relu":
        nodes.append(helper.make_node("Relu", [last], ["r"], name="relu"))
        last = "r"
    elif act == "relu6":
        inits += [init("lo", np.array(0.0)), init("hi", np.array(6.0))]
        nodes.append(helper.make_node("Clip", [last, "lo", "hi"], ["r"], name="relu6"))
        last = "r"
    nodes.append(helper.make_node("Identity", [last], ["y"], name="out"))
    return make_model(nodes, inits, [batch, cin, size, size])


def dense_model(seed: int = 0, *, k: int = 12, n: int = 5, batch: int = 2, trans_b: int = 1,
                alpha: float = 1.0, beta: float = 1.0,
                bias_shape: Sequence[int] | None = None) -> onnx.ModelProto:
    """x (batch, k) -> Gemm(transB, alpha, beta, C of ``bias_shape``) -> y."""
    r = rng(seed)
    w = r.normal(0, 0.3, (n, k) if trans_b else (k, n))
    inits = [init("w", w)]
    ins = ["x", "w"]
    if bias_shape is not None:
        inits.append(init("c", r.normal(0, 0.3, tuple(bias_shape))))
        ins.append("c")
    node = helper.make_node("Gemm", ins, ["y"], name="gemm", transB=trans_b,
                            alpha=alpha, beta=beta)
    return make_model([node], inits, [batch, k])
