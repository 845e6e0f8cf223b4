"""Helpers the ONNX exports share (``frontend.onnx_export`` builds the model)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qcompile.ir.node import Node


def act_nodes(n: Node, x: str, act: tuple[float, float] | None, inits: list[TensorProto]
              ) -> list[onnx.NodeProto]:
    """A fused (lo, hi) activation as Identity, Relu or Clip writing ``n.output``."""
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


def init(inits: list[TensorProto], name: str, value: np.ndarray | float | Sequence[int],
         dtype: type = np.float32) -> str:
    """Add a constant initializer; returns its name."""
    inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
    return name
