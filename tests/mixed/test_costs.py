"""Tests for qcompile.mixed.costs: layer extraction, tie groups, size/BOPs by hand, T4 model sanity."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qcompile.mixed import costs
from qcompile.frontend import zoo
from qcompile.ir.graph import Graph, Node
from qcompile.frontend.onnx_import import import_onnx, load_model
from qcompile.frontend.prepare import prepare

pytestmark = pytest.mark.unit


def _conv(name: str, x: str, y: str, cout: int, cin: int, k: int, *, stride: int = 1,
          group: int = 1) -> Node:
    w = np.zeros((cout, cin // group, k, k), np.float32)
    return Node("conv", name, (x,), y, {"strides": (stride, stride), "pads": (0, 0, 0, 0),
                                         "dilations": (1, 1), "group": group, "act": None},
                {"w": w, "b": np.zeros(cout, np.float32)})


def _dense(name: str, x: str, y: str, n: int, k: int) -> Node:
    return Node("dense", name, (x,), y, {"act": None},
                {"w": np.zeros((n, k), np.float32), "b": np.zeros(n, np.float32)})


def tiny_residual() -> Graph:
    """x -> A -> maxpool -> {B -> D(depthwise), C (shortcut)} -> add -> clip -> flatten -> fc."""
    nodes = [
        _conv("A", "x", "a", 8, 3, 3, stride=1),                       # 1x8x6x6
        Node("maxpool", "pool", ("a",), "p", {"kernel": (2, 2), "strides": (2, 2),
                                               "pads": (0, 0, 0, 0), "dilations": (1, 1)}),
        _conv("B", "p", "b", 16, 8, 1),                                # 1x16x3x3
        _conv("D", "b", "d", 16, 16, 3, group=16),                     # 1x16x1x1
        _conv("C", "p", "c", 16, 8, 3, stride=2),                      # 1x16x1x1
        Node("add", "add", ("d", "c"), "s", {"act": None}),
        Node("clip", "relu", ("s",), "r", {"lo": 0.0, "hi": float("inf")}),
        Node("flatten", "flat", ("r",), "f", {"axis": 1}),
        _dense("fc", "f", "y", 10, 16),
    ]
    shapes = {"x": (1, 3, 8, 8), "a": (1, 8, 6, 6), "p": (1, 8, 3, 3), "b": (1, 16, 3, 3),
              "d": (1, 16, 1, 1), "c": (1, 16, 1, 1), "s": (1, 16, 1, 1), "r": (1, 16, 1, 1),
              "f": (1, 16), "y": (1, 10)}
    g = Graph("x", (1, 3, 8, 8), "y", tuple(nodes), shapes, "tiny")
    g.validate()
    return g


def test_layers_by_hand() -> None:
    layers = {la.name: la for la in costs.layers_of(tiny_residual())}
    assert list(layers) == ["A", "B", "D", "C", "fc"]
    a, d, fc = layers["A"], layers["D"], layers["fc"]
    assert (a.params, a.macs, a.cin, a.cout, a.kernel) == (8 * 3 * 9, 36 * 8 * 27, 3, 8, (3, 3))
    assert (d.params, d.macs, d.group, d.gemm) == (16 * 9, 16 * 9, 16, (1, 1, 9))
    assert (fc.params, fc.macs, fc.gemm, fc.source) == (160, 160, (1, 10, 16), "s")
    assert a.gemm == (36, 8, 27) and layers["C"].source == "a"


def test_size_and_bops_by_hand() -> None:
    layers = costs.layers_of(tiny_residual())
    params = {"A": 216, "B": 128, "D": 144, "C": 1152, "fc": 160}
    couts = {"A": 8, "B": 16, "D": 16, "C": 16, "fc": 10}
    macs = {"A": 7776, "B": 16 * 8 * 9, "D": 144, "C": 1152, "fc": 160}
    plan = {"A": 8, "B": 4, "D": 4, "C": 4, "fc": 8}
    want_bytes = sum(params[n] * plan[n] / 8 + 4 * couts[n] for n in params)
    assert costs.size_mb(layers, plan) == pytest.approx(want_bytes / 2**20, rel=1e-12)
    want_bops = sum(macs[n] * plan[n] ** 2 for n in macs) / 1e9
    assert costs.bops_g(layers, plan) == pytest.approx(want_bops, rel=1e-12)
    # Exactly: all-INT8 bytes = params + 4 * channels.
    assert costs.size_mb(layers, costs.uniform(layers, 8)) * 2**20 == 1800 + 4 * 66


def test_tie_groups_trace_through_pass_through_ops() -> None:
    # B and the shortcut C both read maxpool(a): tied; the dense reads flatten(clip(add)).
    assert costs.tie_groups(tiny_residual()) == [("A",), ("B", "C"), ("D",), ("fc",)]


def _zoo_graph(tmp: Path, name: str, size: int) -> Graph:
    path = zoo.save(zoo.build(name, input_size=size), tmp / f"{name}.onnx")
    return prepare(import_onnx(load_model(path), batch=1, source=name))


@pytest.fixture(scope="module")
def resnets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Graph]:
    tmp = tmp_path_factory.mktemp("zoo")
    return {name: _zoo_graph(tmp, name, 224) for name in ("resnet18", "resnet50")}


def test_resnet_tie_groups(resnets: dict[str, Graph]) -> None:
    groups = costs.tie_groups(resnets["resnet18"])
    # graph order: onnxruntime's folding may put the shortcut first
    assert {"layer2.0.conv1", "layer2.0.downsample.0"} in [set(g) for g in groups]
    assert ("layer1.0.conv1",) in groups and groups[0] == ("conv1",) and groups[-1] == ("fc",)
    assert len(groups) == 21 - 3  # three downsample shortcuts follow their block's conv1
    g50 = costs.tie_groups(resnets["resnet50"])
    # layer1.0's shortcut reads maxpool(relu): traced back to conv1's output, like its conv1.
    assert {"layer1.0.conv1", "layer1.0.downsample.0"} in [set(g) for g in g50]
    assert len(g50) == 54 - 4
    assert sorted(n for g in g50 for n in g) == sorted(la.name for la in costs.layers_of(resnets["resnet50"]))


def test_resnet50_size_and_bops_match_hawq_v3(resnets: dict[str, Graph]) -> None:
    layers = costs.layers_of(resnets["resnet50"])
    assert sum(la.params for la in layers) == 25_502_912  # torchvision minus BN params
    int8, int4 = costs.uniform(layers, 8), costs.uniform(layers, 4)
    assert 24.4 <= costs.size_mb(layers, int8) <= 24.5  # HAWQ-V3: 24.5 MB
    assert 12.2 <= costs.size_mb(layers, int4) <= 12.3
    first_last = {**int4, layers[0].name: 8, layers[-1].name: 8}
    assert 13.2 <= costs.size_mb(layers, first_last) <= 13.3  # HAWQ-V3 INT4: 13.1 MB
    assert costs.bops_g(layers, int8) == pytest.approx(4.089e9 * 64 / 1e9, rel=1e-3)
    assert costs.bops_g(layers, int4) == pytest.approx(costs.bops_g(layers, int8) / 4)


def test_t4_layer_roofline_by_hand() -> None:
    # A batch-1 4096x4096 dense is memory-bound: time = bytes / (320 GB/s * eff) + launch.
    la = costs.Layer("fc", "dense", 4096 * 4096, 4096 * 4096, "x", "x", (1, 4096), (1, 4096),
                     4096, 4096)
    t4 = costs.T4
    for bits in (4, 8, 16, 32):
        bias = 4096 * (bits if bits in (16, 32) else 32) / 8
        bytes_ = 4096 * 4096 * bits / 8 + bias + 2 * 4096 * bits / 8
        want = (bytes_ / (t4.dram_bytes_s * t4.memory_eff) + t4.launch_s) * 1e3
        assert costs.t4_layer_ms(la, bits) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="no 2-bit rate"):
        costs.t4_layer_ms(la, 2)


def test_t4_model_sane_and_monotone(resnets: dict[str, Graph]) -> None:
    for name, g in resnets.items():
        layers = costs.layers_of(g)
        for la in layers:  # fewer bits never slower; bigger batches never faster
            times = [costs.t4_layer_ms(la, b) for b in (4, 8, 16, 32)]
            assert times == sorted(times), (name, la.name, times)
            assert costs.t4_layer_ms(la, 8, batch=8) >= costs.t4_layer_ms(la, 8, batch=1)
        for batch in (1, 8):
            other = costs.t4_other_ms(g, batch)
            int4 = costs.t4_model_ms(layers, costs.uniform(layers, 4), batch, other)
            int8 = costs.t4_model_ms(layers, costs.uniform(layers, 8), batch, other)
            fp16 = costs.t4_float_ms(layers, batch, 16, costs.t4_other_ms(g, batch, 16))
            fp32 = costs.t4_float_ms(layers, batch, 32, costs.t4_other_ms(g, batch, 32))
            assert 0.05 < int4 < int8 < fp16 < fp32 < 50, (name, batch, int4, int8, fp16, fp32)
    # Compute-bound at batch 8: ResNet-50 FP32 is 8.2 GFLOP * 8 / 8.1 TFLOPS = 8.1 ms at peak.
    layers = costs.layers_of(resnets["resnet50"])
    assert costs.t4_float_ms(layers, 8, 32) > 8.1
    with pytest.raises(ValueError, match="16 or 32"):
        costs.t4_float_ms(layers, 1, 8)


def test_summary_label(resnets: dict[str, Graph]) -> None:
    g = resnets["resnet18"]
    layers = costs.layers_of(g)
    s = costs.summarize(g, costs.uniform(layers, 8))
    assert s.label == costs.PREDICTED == "predicted (T4 roofline model)"
    assert s.size_mb == pytest.approx(costs.size_mb(layers, costs.uniform(layers, 8)))
    assert 11.1 < s.size_mb < 11.2 and s.latency_ms > costs.t4_model_ms(layers, costs.uniform(layers, 8))
