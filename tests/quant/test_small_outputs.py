"""Layers with fewer outputs than one 16-lane VNNI block compile and are bit-exact.

A dense or 1x1 conv with 1..7 outputs (a regression head, a binary classifier) pads its
output channels to one 16-lane block; the epilogue writes only the real ones. With one
output the tile has no column loop at all (and with one row, batch 1, no row loop),
which once made the x86 schedule vectorize the tile loop instead (ScheduleError, exit 70);
the window kernels (depthwise, pools) did the same with one channel and one column.
Each case compiles through the whole pipeline, pinned to its precision, and checks the
artifact against the NumPy integer oracle: compile's own check and ``api.evaluate``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from onnx import helper

from tests.helpers.onnx_builders import conv_bn_relu_model, conv_node, dense_model, make_model, rng, save
from qcompile import api

pytestmark = pytest.mark.tvm

# 2 and 5 add no new kind of remainder to 1, 3 and 7: slow, to keep `make test` short
OUTPUTS = (1, pytest.param(2, marks=pytest.mark.slow), 3, pytest.param(5, marks=pytest.mark.slow), 7)
PRECISIONS = ("w8a8", "w4a8", "w4a4")
# name -> (model builder for n outputs, layer name, batch): one row, several rows
# (a batch of 3 dense rows, 9 pixels of a 3x3 map), and a 1x1 map (one row again).
LAYERS = {
    "dense_b1": (lambda n: dense_model(n, k=20, n=n, batch=1), "gemm", 1),
    "dense_b3": (lambda n: dense_model(n, k=36, n=n, batch=3), "gemm", 3),
    "conv1x1_3x3": (lambda n: conv_bn_relu_model(n, cin=8, cout=n, kernel=1, size=3,
                                                  bn=False, act=None), "conv", 1),
    "conv1x1_1x1": (lambda n: conv_bn_relu_model(n, cin=12, cout=n, kernel=1, size=1,
                                                  bn=False, act=None), "conv", 1),
}


@pytest.mark.parametrize("bits", PRECISIONS)
@pytest.mark.parametrize("n", OUTPUTS)
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_few_outputs_compile_bit_exact(layer: str, n: int, bits: str, tmp_path: Path) -> None:
    build, name, batch = LAYERS[layer]
    path = save(build(n), tmp_path)
    art = tmp_path / "art"
    with pytest.warns(UserWarning, match="synthetic"):
        res = api.compile_model(path, art, progress=False, batch=batch, plan={name: bits})
    assert res.verified.inputs == 2 and res.verified.bit_exact is True
    manifest = json.loads((art / "manifest.json").read_text())
    # the layer ran on the VNNI kernel of its weight width, not the generic lowering
    assert manifest["kernels"] == {name: "x86_vnni"}
    (func,) = (f for f, layer_name in manifest["kernel_funcs"].items() if layer_name == name)
    assert ("_int4_" in func) == bits.startswith("w4"), func
    assert manifest["output"]["shape"][-1] == n or manifest["output"]["shape"][1] == n
    with pytest.warns(UserWarning, match="synthetic"):
        ev = api.evaluate(path, art, num_samples=8, progress=False)
    assert ev.num_samples == 8
    assert ev.bit_exact, "compiled integer output differs from the NumPy oracle"


def test_one_channel_window_kernels_bit_exact(tmp_path: Path) -> None:
    """One channel all the way: depthwise 3x3 (C = 1), max pools down to a 1x1 map, a
    depthwise 1x1 on it and a global pool; the 1x1-by-1-channel tiles have no loop."""
    r, inits = rng(4), []
    nodes = [
        conv_node("c1", "x", "a", r.normal(0, 0.5, (1, 1, 3, 3)), r.normal(0, 0.1, 1), inits,
                  pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["b"], name="r1"),
        helper.make_node("MaxPool", ["b"], ["c"], name="p1", kernel_shape=[3, 3], strides=[3, 3]),
        helper.make_node("MaxPool", ["c"], ["e"], name="p2", kernel_shape=[2, 2], strides=[2, 2]),
        conv_node("c2", "e", "f", r.normal(0, 0.5, (1, 1, 1, 1)), r.normal(0, 0.1, 1), inits),
        helper.make_node("Relu", ["f"], ["g"], name="r2"),
        helper.make_node("GlobalAveragePool", ["g"], ["h"], name="gap"),
        helper.make_node("Flatten", ["h"], ["y"], name="flat"),
    ]
    path = save(make_model(nodes, inits, [1, 1, 6, 6], [1, 1]), tmp_path)
    art = tmp_path / "art"
    with pytest.warns(UserWarning, match="synthetic"):
        res = api.compile_model(path, art, progress=False)
    assert res.verified.inputs == 2 and res.verified.bit_exact is True
    funcs = json.loads((art / "manifest.json").read_text())["kernel_funcs"]
    assert {f.rsplit("_", 1)[0] for f in funcs} == {
        "depthwise_conv2d_nhwc", "max_pool2d_nhwc", "global_sum_pool_nhwc"}, funcs
    with pytest.warns(UserWarning, match="synthetic"):
        ev = api.evaluate(path, art, num_samples=8, progress=False)
    assert ev.bit_exact, "compiled integer output differs from the NumPy oracle"
