"""load_model / import_onnx: refusals with one clear line, and what a Graph carries."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.helpers.onnx_builders import conv_bn_relu_model, dense_model, init, make_model, rng, save
from qcompile.errors import BadModelError, UnsupportedOpError, UsageError
from qcompile.frontend.onnx_import import SUPPORTED_OPS, import_onnx, load_model

pytestmark = pytest.mark.unit


def _one_line(err: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def _load_import(model: onnx.ModelProto, tmp_path: Path, batch: int = 1):
    return import_onnx(load_model(save(model, tmp_path)), batch=batch)


# --------------------------------------------------------------------------- bad files

def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BadModelError) as err:
        load_model(tmp_path / "nope.onnx")
    assert "nope.onnx" in _one_line(err) and "no such file" in str(err.value)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(BadModelError) as err:
        load_model(tmp_path)
    assert "directory" in _one_line(err)


@pytest.mark.parametrize("content", [
    b"",
    rng(3).bytes(4096),
    b"hello, this is a text file\nnot a model\n",
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x02\x00\x00\x00",
], ids=["empty", "random", "text", "png"])
def test_not_onnx(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(BadModelError) as err:
        load_model(path)
    assert "bad.onnx" in _one_line(err)


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_truncated(tmp_path: Path, keep: float) -> None:
    data = conv_bn_relu_model().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(BadModelError) as err:
        load_model(path)
    assert "cut.onnx" in _one_line(err)


def test_checker_failure_is_one_line(tmp_path: Path) -> None:
    node = helper.make_node("Relu", ["x"], ["y"], name="r", bogus=3)  # unknown attribute
    with pytest.raises(BadModelError) as err:
        load_model(save(make_model([node], [], [1, 3, 4, 4], [1, 3, 4, 4]), tmp_path))
    assert "checker" in _one_line(err)


# --------------------------------------------------------------------------- external data

def _external_model(model_dir: Path, location: str) -> Path:
    """A model in ``model_dir`` whose Conv weight is stored at ``location`` (as written)."""
    model = conv_bn_relu_model(bn=False, act=None)
    tensor = next(t for t in model.graph.initializer if t.name == "conv_w")
    data_file = model_dir / location  # an absolute location replaces model_dir
    data_file.parent.mkdir(parents=True, exist_ok=True)
    data_file.write_bytes(onnx.numpy_helper.to_array(tensor).tobytes())
    onnx.external_data_helper.set_external_data(tensor, location=location)
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    model_dir.mkdir(parents=True, exist_ok=True)
    return save(model, model_dir)


def test_external_data_inside_folder_loads(tmp_path: Path) -> None:
    path = _external_model(tmp_path, "weights/conv_w.bin")
    graph = import_onnx(load_model(path))
    assert graph.nodes[0].params["w"].shape == (8, 3, 3, 3)


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_external_data_escape_refused(tmp_path: Path, kind: str) -> None:
    # The data file exists either way: only its place gets it refused.
    location = "../x.bin" if kind == "dotdot" else str(tmp_path / "abs" / "x.bin")
    path = _external_model(tmp_path / "m", location)
    with pytest.raises(BadModelError) as err:
        load_model(path)
    assert "conv_w" in _one_line(err) and "outside" in str(err.value)


def test_external_data_symlink_escape_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    inside = tmp_path / "model"
    inside.mkdir()
    path = _external_model(inside, "link/w.bin")
    (inside / "link" / "w.bin").rename(outside / "w.bin")
    (inside / "link").rmdir()
    (inside / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(BadModelError) as err:
        load_model(path)
    assert "conv_w" in _one_line(err)


def test_file_unchanged_by_load_and_import(tmp_path: Path) -> None:
    # Opset 13 and a symbolic batch: conversion and batch fixing both touch the proto.
    src = conv_bn_relu_model()
    path = save(make_model(src.graph.node, src.graph.initializer, ["N", 3, 9, 9], opset=13),
                tmp_path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    import_onnx(load_model(path), batch=3)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


# --------------------------------------------------------------------------- model scope

def test_multiple_inputs_refused(tmp_path: Path) -> None:
    node = helper.make_node("Add", ["x", "z"], ["y"], name="add")
    extra = helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3, 4, 4])
    model = make_model([node], [], [1, 3, 4, 4], extra_inputs=[extra])
    with pytest.raises(UnsupportedOpError) as err:
        load_model(save(model, tmp_path))
    assert "2 inputs" in _one_line(err)


def test_initializer_listed_as_input_is_not_an_input(tmp_path: Path) -> None:
    model = dense_model()
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [5, 12]))
    graph = _load_import(model, tmp_path)
    assert graph.input == "x" and graph.nodes[0].params["w"].shape == (5, 12)


def test_multiple_outputs_refused(tmp_path: Path) -> None:
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Relu", ["y"], ["z"])]
    extra = helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])
    with pytest.raises(UnsupportedOpError):
        load_model(save(make_model(nodes, [], [1, 4], extra_outputs=[extra]), tmp_path))


def test_non_float_input_refused(tmp_path: Path) -> None:
    nodes = [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)]
    with pytest.raises(UnsupportedOpError) as err:
        load_model(save(make_model(nodes, [], [1, 4], in_dtype=TensorProto.INT64), tmp_path))
    assert "INT64" in _one_line(err)


def test_custom_domain_refused(tmp_path: Path) -> None:
    node = helper.make_node("FancyOp", ["x"], ["y"], name="fancy", domain="com.example")
    model = make_model([node], [], [1, 4], [1, 4])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(UnsupportedOpError) as err:
        load_model(save(model, tmp_path))
    assert "'fancy'" in _one_line(err) and "com.example" in str(err.value)


def test_control_flow_refused(tmp_path: Path) -> None:
    branch = helper.make_graph([helper.make_node("Relu", ["x"], ["r"])], "b", [],
                               [helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 4])])
    nodes = [helper.make_node("If", ["cond"], ["y"], name="iffy",
                              then_branch=branch, else_branch=branch)]
    model = make_model(nodes, [init("cond", np.array(True).astype(np.int64))], [1, 4], [1, 4])
    model.graph.initializer[0].data_type = TensorProto.BOOL
    with pytest.raises(UnsupportedOpError) as err:
        load_model(save(model, tmp_path))
    assert "'iffy' (op If)" in _one_line(err)


def test_unsupported_op_message(tmp_path: Path) -> None:
    nodes = [helper.make_node("Hardmax", ["x"], ["y"], name="foo")]
    with pytest.raises(UnsupportedOpError) as err:
        _load_import(make_model(nodes, [], [1, 4], [1, 4]), tmp_path)
    msg = _one_line(err)
    assert msg.startswith("node 'foo' (op Hardmax) is not supported; supported ops: ")
    assert ", ".join(sorted(SUPPORTED_OPS)) in msg and msg.endswith("file an issue.")


@pytest.mark.parametrize("case", ["transA", "storage_order", "conv_weight", "bn_training"])
def test_unsupported_attribute(tmp_path: Path, case: str) -> None:
    r = rng(0)
    if case == "transA":
        nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], name="g", transA=1)]
        model = make_model(nodes, [init("w", r.normal(size=(4, 3)))], [4, 2])
        expect = "transA"
    elif case == "storage_order":
        nodes = [helper.make_node("MaxPool", ["x"], ["y"], name="p", kernel_shape=[2, 2],
                                  storage_order=1)]
        model = make_model(nodes, [], [1, 2, 4, 4])
        expect = "storage_order"
    elif case == "conv_weight":
        nodes = [helper.make_node("Relu", ["x"], ["w"]),
                 helper.make_node("Conv", ["x", "w"], ["y"], name="c")]
        model = make_model(nodes, [], [1, 1, 3, 3])
        expect = "weight"
    else:
        nodes = [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"],
                                  ["y", "rm", "rv"], name="bn", training_mode=1)]
        inits = [init(n, np.ones(2)) for n in "sbmv"]
        model = make_model(nodes, inits, [1, 2, 3, 3])
        expect = "training_mode"
    with pytest.raises(UnsupportedOpError) as err:
        _load_import(model, tmp_path)
    assert f"'{nodes[-1].name}'" in _one_line(err) and expect in str(err.value)


def test_used_dropout_mask_refused(tmp_path: Path) -> None:
    nodes = [helper.make_node("Dropout", ["x"], ["d", "mask"], name="drop"),
             helper.make_node("Cast", ["mask"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["d", "mf"], ["y"])]
    with pytest.raises(UnsupportedOpError) as err:
        _load_import(make_model(nodes, [], [1, 4]), tmp_path)
    assert "'drop'" in _one_line(err) and "'mask'" in str(err.value)


# --------------------------------------------------------------------------- graph contents

def test_symbolic_batch_fixed_and_shapes(tmp_path: Path) -> None:
    model = conv_bn_relu_model(batch="N", strides=[2, 2], pads=[1, 0, 2, 1])
    assert import_onnx(model, batch=4).input_shape == (4, 3, 9, 9)
    full = import_onnx(model, batch=4)
    assert full.shapes["y"] == (4, 8, 5, 4) and full.shapes["c"] == (4, 8, 5, 4)
    assert set(full.shapes) == {"x", "c", "n", "r", "y"}  # activations only
    graph = _load_import(model, tmp_path)  # load_model fixes a symbolic batch at 1
    assert graph.input_shape == (1, 3, 9, 9) and graph.shapes["y"] == (1, 8, 5, 4)
    # onnxruntime's BASIC folding fused Conv + BN and removed the Identity
    assert [n.op for n in graph.nodes] == ["Conv", "Relu"]


def test_dynamic_spatial_dim_refused(tmp_path: Path) -> None:
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [], ["N", 3, "H", 8])
    with pytest.raises(UsageError) as err:
        _load_import(model, tmp_path)
    assert "'H'" in _one_line(err) and "--input-shape" in _one_line(err)


def test_input_shape_fixes_dynamic_dims(tmp_path: Path) -> None:
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [], ["N", 3, "H", "W"])
    graph = import_onnx(load_model(save(model, tmp_path), (1, 3, 5, 7)))
    assert graph.input_shape == (1, 3, 5, 7) and graph.shapes["y"] == (1, 3, 5, 7)
    with pytest.raises(UsageError, match="dimensions"):
        load_model(save(model, tmp_path), (1, 3, 5))


def test_param_roles(tmp_path: Path) -> None:
    r = rng(1)
    inits = [init("cw", r.normal(size=(4, 2, 3, 3))), init("lo", np.array(0.0)),
             init("hi", np.array(6.0)), init("shape", np.array([0, -1])),
             init("mw", r.normal(size=(64, 5))), init("c", r.normal(size=5))]
    nodes = [
        helper.make_node("Conv", ["x", "cw"], ["a"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["a", "lo", "hi"], ["b"], name="clip"),
        helper.make_node("Reshape", ["b", "shape"], ["f"], name="reshape"),
        helper.make_node("MatMul", ["f", "mw"], ["m"], name="matmul"),
        helper.make_node("Add", ["c", "m"], ["y"], name="add"),
    ]
    # import_onnx on the raw model: load_model's constant folding would fuse MatMul + Add
    graph = import_onnx(make_model(nodes, inits, [1, 2, 4, 4]))
    conv, clip, reshape, matmul, add = graph.nodes
    assert set(conv.params) == {"w"} and conv.params["w"].dtype == np.float32
    assert conv.attrs["pads"] == (1, 1, 1, 1) and conv.attrs["group"] == 1
    assert (clip.attrs["min"], clip.attrs["max"]) == (0.0, 6.0) and not clip.params
    assert reshape.attrs["shape"] == (1, 64) and graph.shapes["f"] == (1, 64)  # resolved
    assert matmul.params["w"].shape == (64, 5)
    assert add.inputs == ("m",) and add.params["c"].shape == (5,)


def test_constant_node_becomes_param(tmp_path: Path) -> None:
    w = rng(2).normal(size=(3, 4)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["w"], value=onnx.numpy_helper.from_array(w)),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    graph = _load_import(make_model(nodes, [], [2, 3]), tmp_path)
    assert len(graph.nodes) == 1 and np.array_equal(graph.nodes[0].params["w"], w)


def test_old_opset_converted(tmp_path: Path) -> None:
    # Opset 9: BatchNormalization has no training_mode and Clip takes attributes.
    r = rng(4)
    inits = [init("w", r.normal(size=(2, 1, 3, 3)))] + [init(n, np.ones(2)) for n in "sbmv"]
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="conv"),
             helper.make_node("BatchNormalization", ["a", "s", "b", "m", "v"], ["n"], name="bn"),
             helper.make_node("Clip", ["n"], ["y"], name="clip", min=0.0, max=6.0)]
    graph = _load_import(make_model(nodes, inits, [1, 1, 5, 5], opset=9), tmp_path)
    clip = graph.nodes[-1]
    assert (clip.attrs["min"], clip.attrs["max"]) == (0.0, 6.0)


@pytest.mark.parametrize("auto_pad, size, stride, expect", [
    ("SAME_UPPER", 7, 2, (1, 1, 1, 1)),
    ("SAME_UPPER", 8, 2, (0, 0, 1, 1)),
    ("SAME_LOWER", 8, 2, (1, 1, 0, 0)),
    ("VALID", 8, 2, (0, 0, 0, 0)),
])
def test_auto_pad_resolved(tmp_path: Path, auto_pad: str, size: int, stride: int,
                           expect: tuple[int, ...]) -> None:
    model = conv_bn_relu_model(size=size, auto_pad=auto_pad, strides=[stride, stride])
    assert _load_import(model, tmp_path).nodes[0].attrs["pads"] == expect


def test_maxpool_ceil_mode_folded_into_pads(tmp_path: Path) -> None:
    node = helper.make_node("MaxPool", ["x"], ["y"], name="p", kernel_shape=[3, 3],
                            strides=[2, 2], ceil_mode=1)
    graph = _load_import(make_model([node], [], [1, 2, 6, 6]), tmp_path)
    assert graph.nodes[0].attrs["pads"] == (0, 0, 1, 1) and graph.shapes["y"] == (1, 2, 3, 3)


def test_ceil_mode_where_onnx_and_onnxruntime_disagree_refused(tmp_path: Path) -> None:
    # ONNX shape inference says 4x4, onnxruntime computes 3x3: refuse, don't guess.
    node = helper.make_node("MaxPool", ["x"], ["y"], name="p", kernel_shape=[2, 2],
                            strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)
    with pytest.raises(UnsupportedOpError) as err:
        _load_import(make_model([node], [], [1, 1, 5, 5]), tmp_path)
    assert "'p'" in _one_line(err) and "ceil_mode" in str(err.value)


def test_avgpool_ceil_with_count_include_pad_refused(tmp_path: Path) -> None:
    node = helper.make_node("AveragePool", ["x"], ["y"], name="ap", kernel_shape=[3, 3],
                            strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1, count_include_pad=1)
    with pytest.raises(UnsupportedOpError) as err:
        _load_import(make_model([node], [], [1, 1, 6, 6]), tmp_path)
    assert "count_include_pad" in _one_line(err)


def test_import_does_not_modify_model(tmp_path: Path) -> None:
    model = load_model(save(conv_bn_relu_model(batch="N"), tmp_path))
    before = model.SerializeToString()
    import_onnx(model, batch=2)
    assert model.SerializeToString() == before


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_refused(tmp_path: Path, bad: float) -> None:
    w = rng(0).normal(size=(4, 3, 3, 3))
    w[1, 2, 0, 0] = bad
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    with pytest.raises(BadModelError) as err:
        load_model(save(make_model(nodes, [init("w", w)], [1, 3, 5, 5]), tmp_path))
    assert "'w'" in _one_line(err) and "NaN or Inf" in _one_line(err)


@pytest.mark.parametrize("shape,error", [([1, 3, 200000, 200000], UsageError),
                                         ([1, 3, 2**62, 8], UsageError),
                                         ([1, 0, 8, 8], BadModelError)])
def test_absurd_input_shapes_refused(tmp_path: Path, shape: list[int], error: type) -> None:
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [], shape, shape)
    with pytest.raises(error) as err:
        load_model(save(model, tmp_path))
    assert "\n" not in str(err.value) and "'x'" in str(err.value)
