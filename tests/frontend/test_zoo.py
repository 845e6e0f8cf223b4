"""Tests for qcompile.frontend.zoo: valid ONNX, runs in onnxruntime, seeded, realistic BN stats.

Models are built at small input sizes (the weights are full-size regardless), and each
(name, seed) is built once per module to keep the file fast.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from qcompile.frontend import zoo
from qcompile.errors import UsageError

pytestmark = pytest.mark.unit

# Small sizes that still keep every feature map >= 1 px.
SIZES = {"resnet18": 32, "resnet50": 32, "inceptionv3": 75, "mobilenetv2": 32}
ALLOWED_OPS = {"Conv", "BatchNormalization", "Relu", "Clip", "Add", "MaxPool", "AveragePool",
               "GlobalAveragePool", "Flatten", "Reshape", "Gemm", "MatMul", "Concat", "Softmax"}
_CACHE: dict[tuple[str, int], onnx.ModelProto] = {}


def model(name: str, seed: int = 0) -> onnx.ModelProto:
    if (name, seed) not in _CACHE:
        _CACHE[(name, seed)] = zoo.build(name, input_size=SIZES[name], seed=seed)
    return _CACHE[(name, seed)]


def inits(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def run(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


@pytest.fixture(scope="module", params=sorted(SIZES))
def name(request: pytest.FixtureRequest) -> str:
    return request.param


def test_checker_full(name: str) -> None:
    m = model(name)
    onnx.checker.check_model(m, full_check=True)
    assert m.ir_version == 8
    assert [(o.domain, o.version) for o in m.opset_import] == [("", 17)]
    (inp,), (out,) = m.graph.input, m.graph.output
    dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert (inp.name, dims) == ("input", [1, 3, SIZES[name], SIZES[name]])
    assert out.name == "logits"


def test_runs_in_onnxruntime(name: str) -> None:
    m = model(name)
    rng = np.random.default_rng(123)
    s = SIZES[name]
    x = rng.standard_normal((2, 1, 3, s, s)).astype(np.float32)
    y0, y1 = run(m, x[0]), run(m, x[1])
    assert y0.shape == (1, 1000) and y0.dtype == np.float32
    assert np.isfinite(y0).all()
    # Activations neither exploded nor vanished through the stack, and inputs matter.
    assert 0.1 < float(y0.std()) < 100.0, float(y0.std())
    assert not np.allclose(y0, y1, atol=1e-3)


def test_deterministic_per_seed(name: str) -> None:
    again = zoo.build(name, input_size=SIZES[name], seed=0)
    assert again.SerializeToString() == model(name).SerializeToString()
    a, b = inits(model(name)), inits(model(name, seed=1))
    assert a.keys() == b.keys()
    assert not np.allclose(a["fc.weight"], b["fc.weight"])
    _CACHE.pop((name, 1))  # free ~100 MB; no other test needs seed 1


def test_batchnorm_stats_are_not_identity(name: str) -> None:
    m, w = model(name), inits(model(name))
    bns = [n for n in m.graph.node if n.op_type == "BatchNormalization"]
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    assert len(bns) == len(convs) > 10  # every conv has its BN
    gamma, beta, mean, var = (np.concatenate([w[n.input[i]] for n in bns]) for i in range(1, 5))
    assert gamma.std() > 0.1 and gamma.min() > 0.0
    assert np.abs(beta).mean() > 0.03 and np.abs(mean).mean() > 0.03
    assert var.min() >= 0.5 and var.std() > 0.2
    for n in bns:
        assert onnx.helper.get_node_attr_value(n, "epsilon") == pytest.approx(1e-5)


def test_op_types_and_names(name: str) -> None:
    m = model(name)
    ops = Counter(n.op_type for n in m.graph.node)
    assert set(ops) <= ALLOWED_OPS, set(ops) - ALLOWED_OPS
    assert [n.op_type for n in m.graph.node[-3:]] == ["GlobalAveragePool", "Flatten", "Gemm"]
    names = [n.name for n in m.graph.node]
    outputs = [o for n in m.graph.node for o in n.output]
    assert all(names) and len(set(names)) == len(names)
    assert len(set(outputs)) == len(outputs)
    assert len({t.name for t in m.graph.initializer}) == len(m.graph.initializer)


def test_resnet_layout() -> None:
    m18, m50 = model("resnet18"), model("resnet50")
    names18 = {n.name for n in m18.graph.node}
    assert {"conv1", "bn1", "relu", "maxpool", "layer1.0.conv1", "layer1.0.bn1", "layer1.0.relu1",
            "layer2.0.downsample.0", "layer4.1.add", "fc"} <= names18
    assert sum(n.op_type == "Add" for n in m18.graph.node) == 8
    strides = {n.name: list(onnx.helper.get_node_attr_value(n, "strides"))
               for n in m50.graph.node if n.op_type == "Conv"}
    # v1.5 bottleneck: the stride sits on the 3x3 conv.
    assert strides["layer2.0.conv1"] == [1, 1] and strides["layer2.0.conv2"] == [2, 2]
    assert sum(n.op_type == "Add" for n in m50.graph.node) == 16


def test_mobilenetv2_depthwise_relu6_residuals() -> None:
    m, w = model("mobilenetv2"), inits(model("mobilenetv2"))
    dw = [n for n in m.graph.node if n.op_type == "Conv"
          and onnx.helper.get_node_attr_value(n, "group") == w[n.input[1]].shape[0] > 1]
    assert len(dw) == 17 and all(w[n.input[1]].shape[1] == 1 for n in dw)
    clips = [n for n in m.graph.node if n.op_type == "Clip"]
    assert clips and all(len(n.input) == 3 for n in clips)
    assert w[clips[0].input[1]].shape == ()  # opset-13 Clip: scalar min/max inputs
    assert float(w[clips[0].input[1]]) == 0.0 and float(w[clips[0].input[2]]) == 6.0
    assert sum(n.op_type == "Add" for n in m.graph.node) == 10  # stride 1 and cin == cout only


def test_inceptionv3_blocks() -> None:
    m, w = model("inceptionv3"), inits(model("inceptionv3"))
    kernels = {tuple(w[n.input[1]].shape[2:]) for n in m.graph.node if n.op_type == "Conv"}
    assert {(1, 7), (7, 1), (1, 3), (3, 1), (5, 5), (3, 3), (1, 1)} <= kernels
    pools = [n for n in m.graph.node if n.op_type == "AveragePool"]
    assert len(pools) == 9  # Mixed_5b..5d, 6b..6e, 7b, 7c
    attrs = {a.name: list(a.ints) if a.ints else a.i for a in pools[0].attribute}
    assert attrs == {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1], "count_include_pad": 1}
    assert sum(n.op_type == "Concat" for n in m.graph.node) == 15  # 11 blocks + 2 inner per InceptionE
    assert sum(n.op_type == "MaxPool" for n in m.graph.node) == 4


def test_build_options_softmax_batch_classes() -> None:
    m = zoo.build("mobilenetv2", input_size=40, num_classes=10, batch=2, softmax=True, seed=3)
    onnx.checker.check_model(m, full_check=True)
    assert m.graph.output[0].name == "probs"
    y = run(m, np.random.default_rng(0).standard_normal((2, 3, 40, 40)).astype(np.float32))
    assert y.shape == (2, 10)
    np.testing.assert_allclose(y.sum(1), 1.0, rtol=1e-5)


def test_default_input_sizes() -> None:
    for name, size in (("inceptionv3", 299), ("mobilenetv2", 224)):
        dims = zoo.build(name).graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_value for d in dims] == [1, 3, size, size]


def test_usage_errors() -> None:
    with pytest.raises(UsageError, match="inceptionv3, mobilenetv2, resnet18, resnet50"):
        zoo.build("vgg16")
    with pytest.raises(UsageError, match="at least 75"):
        zoo.build("inceptionv3", input_size=64)
    with pytest.raises(UsageError):
        zoo.build("resnet18", batch=0)


def test_save_is_atomic_and_roundtrips(tmp_path: Path) -> None:
    m = model("mobilenetv2")
    out = zoo.save(m, tmp_path / "sub" / "m.onnx")
    assert os.listdir(out.parent) == ["m.onnx"]  # no temp file left behind
    assert onnx.load(out).SerializeToString() == m.SerializeToString()
    zoo.save(m, out)  # overwriting an existing file works too
    assert os.listdir(out.parent) == ["m.onnx"]
