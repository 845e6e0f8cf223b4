"""Zoo graphs with synthetic calibration statistics, shared by the lowering tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from qcompile.frontend import zoo
from qcompile.quant.calibrate import MinMaxObserver
from qcompile.ir.graph import Graph
from qcompile.frontend.onnx_import import import_onnx, load_model
from qcompile.frontend.prepare import prepare
from qcompile.quant.quantize import calibration_tensors


def zoo_graph(name: str, directory: Path, input_size: int = 32, num_classes: int = 10) -> Graph:
    """A zoo architecture, imported and prepared (BN folded, activations fused)."""
    path = zoo.save(zoo.build(name, input_size=input_size, num_classes=num_classes),
                    Path(directory) / f"{name}.onnx")
    return prepare(import_onnx(load_model(path)))


def linspace_stats(g: Graph) -> dict[str, MinMaxObserver]:
    """Deterministic, varied ranges per tensor: enough to quantize without running data."""
    obs = {}
    for k, t in enumerate(calibration_tensors(g)):
        o = MinMaxObserver()
        o.update(np.linspace(-1 - k % 3, 2 + k % 3, 64))
        obs[t] = o
    return obs
