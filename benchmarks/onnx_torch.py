"""An ONNX CNN as a plain PyTorch module with the same weights (the GPU check's float peer).

The GPU hosts have torch and onnx but no converter, so this maps the CNN ops the zoo
uses onto ``torch.nn`` layers: Conv (BatchNormalization folded in, as inference
deployments do), Gemm, pools, Relu/Clip, Add, Concat, Flatten. Anything else is refused
by name. cuDNN then runs it like any torchvision model (channels_last, FP16 via .half()).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _same_pads(pads: list[int], node: onnx.NodeProto) -> tuple[int, int]:
    if not pads:
        return 0, 0
    if pads[:2] != pads[2:]:
        raise ValueError(f"onnx_torch: asymmetric pads {pads} at node {node.name!r}")
    return pads[0], pads[1]


def _conv(node: onnx.NodeProto, w: np.ndarray, b: np.ndarray | None) -> nn.Conv2d:
    a = _attrs(node)
    conv = nn.Conv2d(w.shape[1] * a.get("group", 1), w.shape[0], tuple(w.shape[2:]),
                     stride=tuple(a.get("strides", [1, 1])), padding=_same_pads(a.get("pads", []), node),
                     dilation=tuple(a.get("dilations", [1, 1])), groups=a.get("group", 1), bias=True)
    conv.weight.data = torch.from_numpy(np.ascontiguousarray(w, np.float32))
    conv.bias.data = torch.from_numpy(np.zeros(w.shape[0], np.float32) if b is None else b.astype(np.float32))
    return conv


def _fold_bn(w: np.ndarray, b: np.ndarray | None, bn: onnx.NodeProto,
             inits: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    gamma, beta, mean, var = (inits[i].astype(np.float64) for i in bn.input[1:5])
    k = gamma / np.sqrt(var + _attrs(bn).get("epsilon", 1e-5))
    b0 = np.zeros(w.shape[0]) if b is None else b.astype(np.float64)
    return (w * k.reshape(-1, 1, 1, 1)).astype(np.float32), ((b0 - mean) * k + beta).astype(np.float32)


class OnnxModule(nn.Module):
    """Runs the ONNX graph's nodes in order; each step is (fn, input names, output name)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        g = model.graph
        inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        uses: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                uses.setdefault(i, []).append(n)
        self.layers = nn.ModuleList()
        self.steps: list[tuple[Callable, list[str], str]] = []
        skip: set[str] = set()
        for n in g.node:
            if n.name in skip:
                continue
            fn, out = self._step(n, inits, uses, skip)
            self.steps.append((fn, [i for i in n.input if i and i not in inits], out))
        self.input = next(i.name for i in g.input if i.name not in inits)
        self.output = g.output[0].name

    def _module(self, m: nn.Module) -> nn.Module:
        self.layers.append(m)
        return m

    def _step(self, n: onnx.NodeProto, inits: dict[str, np.ndarray],
              uses: dict[str, list[onnx.NodeProto]], skip: set[str]) -> tuple[Callable, str]:
        a, op = _attrs(n), n.op_type
        if op == "Conv":
            w, b = inits[n.input[1]], inits[n.input[2]] if len(n.input) > 2 else None
            after = uses.get(n.output[0], [])
            if len(after) == 1 and after[0].op_type == "BatchNormalization":
                w, b = _fold_bn(w, b, after[0], inits)
                skip.add(after[0].name)
                return self._module(_conv(n, w, b)), after[0].output[0]
            return self._module(_conv(n, w, b)), n.output[0]
        if op == "Gemm":
            w, b = inits[n.input[1]], inits[n.input[2]]
            if (a.get("transB", 0) != 1 or a.get("transA", 0) or a.get("alpha", 1.0) != 1
                    or a.get("beta", 1.0) != 1):
                raise ValueError(f"onnx_torch: Gemm {n.name!r} needs transB=1, alpha=beta=1")
            lin = nn.Linear(w.shape[1], w.shape[0])
            lin.weight.data, lin.bias.data = torch.from_numpy(w.copy()), torch.from_numpy(b.copy())
            return self._module(lin), n.output[0]
        simple: dict[str, Callable] = {
            "Relu": F.relu, "Add": torch.add,
            "GlobalAveragePool": lambda x: F.adaptive_avg_pool2d(x, 1),
            "Flatten": lambda x: torch.flatten(x, a.get("axis", 1)),
            "Concat": lambda *xs: torch.cat(xs, a["axis"]),
        }
        if op in simple:
            return simple[op], n.output[0]
        if op in ("MaxPool", "AveragePool"):
            k, s = a["kernel_shape"], a.get("strides", [1, 1])
            p = _same_pads(a.get("pads", []), n)
            if op == "MaxPool":
                ceil = bool(a.get("ceil_mode", 0))
                return (lambda x: F.max_pool2d(x, k, s, p, ceil_mode=ceil)), n.output[0]
            incl = bool(a.get("count_include_pad", 0))
            return (lambda x: F.avg_pool2d(x, k, s, p, count_include_pad=incl)), n.output[0]
        if op == "Clip":
            lo, hi = (float(inits[i]) if i else None for i in (list(n.input[1:]) + ["", ""])[:2])
            return (lambda x: torch.clamp(x, lo, hi)), n.output[0]
        raise ValueError(f"onnx_torch: op {op} (node {n.name!r}) is not supported")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env = {self.input: x}
        for fn, ins, out in self.steps:
            env[out] = fn(*(env[i] for i in ins))
        return env[self.output]
