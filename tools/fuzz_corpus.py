"""Generate a seeded corpus of malformed, hostile and weird ONNX files for the front end.

    python tools/fuzz_corpus.py --out DIR [--seed N]

Every case is its own folder ``DIR/<case>/model.onnx`` (external-data cases keep their
data files, and symlinks, next to it); ``DIR/manifest.json`` maps each case to its
``category`` and ``expect`` ("compile" for the valid controls, "refuse" for the broken
ones, "any" for valid-but-weird models that may compile or be refused).  Most cases are
small valid models from ``tests/helpers/onnx_builders.py`` with one mutation; the rest are byte
level (truncated, random, bad varints, bit flips).  The same seed gives the same files.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout: tests.helpers
from tests.helpers import onnx_builders as ob  # noqa: E402

Case = tuple[str, str, str, Callable[[Path], None]]  # name, category, expect, writer


def _conv(seed: int = 0, **kw: object) -> onnx.ModelProto:
    return ob.conv_bn_relu_model(seed, cin=3, cout=4, size=8, **kw)


def _dense(seed: int = 0, **kw: object) -> onnx.ModelProto:
    return ob.dense_model(seed, k=6, n=3, batch=1, bias_shape=(3,), **kw)


def _bytes(m: onnx.ModelProto) -> bytes:
    return m.SerializeToString()


def _writer(m: onnx.ModelProto | bytes) -> Callable[[Path], None]:
    data = m if isinstance(m, bytes) else _bytes(m)
    return lambda d: (d / "model.onnx").write_bytes(data)


def _mut(fn: Callable[[onnx.ModelProto], None], base: Callable[[], onnx.ModelProto] = _conv
         ) -> Callable[[Path], None]:
    def w(d: Path) -> None:
        m = base()
        fn(m)
        (d / "model.onnx").write_bytes(_bytes(m))
    return w


def _init(m: onnx.ModelProto, name: str) -> TensorProto:
    return next(t for t in m.graph.initializer if t.name == name)


def _set_init(m: onnx.ModelProto, name: str, arr: np.ndarray) -> None:
    t = _init(m, name)
    t.CopyFrom(numpy_helper.from_array(arr, name))


def _node(m: onnx.ModelProto, op: str) -> onnx.NodeProto:
    return next(n for n in m.graph.node if n.op_type == op)


def _set_attr(m: onnx.ModelProto, op: str, attr: onnx.AttributeProto) -> None:
    n = _node(m, op)
    keep = [a for a in n.attribute if a.name != attr.name]
    del n.attribute[:]
    n.attribute.extend(keep + [attr])


def _in_dims(m: onnx.ModelProto, dims: list[int | str], which: str = "input") -> None:
    vi = (m.graph.input if which == "input" else m.graph.output)[0]
    shape = vi.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        if isinstance(d, str):
            shape.dim.add().dim_param = d
        else:
            shape.dim.add().dim_value = d


def _external(location: str, setup: Callable[[Path], None] | None = None,
              extra: dict[str, str] | None = None) -> Callable[[Path], None]:
    """The conv weight stored as external data at ``location`` (not written)."""
    def w(d: Path) -> None:
        if setup:
            setup(d)
        m = _conv()
        t = _init(m, "conv_w")
        t.ClearField("raw_data")
        t.ClearField("float_data")
        t.data_location = TensorProto.EXTERNAL
        for k, v in {"location": location, **(extra or {})}.items():
            e = t.external_data.add()
            e.key, e.value = k, v
        (d / "model.onnx").write_bytes(_bytes(m))
    return w


def _symlink_out(d: Path) -> None:
    """``w.bin`` -> a file outside the case folder (holding valid weight bytes)."""
    outside = d.parent / "_outside_weights.bin"
    if not outside.exists():
        outside.write_bytes(np.zeros((4, 3, 3, 3), np.float32).tobytes())
    (d / "w.bin").symlink_to(outside)


def _symlink_dir_out(d: Path) -> None:
    (d / "sub").symlink_to(d.parent)


def _ok_external(d: Path) -> None:
    (d / "w.bin").write_bytes(ob.rng(0).normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32).tobytes())


def cases(seed: int) -> list[Case]:
    r = np.random.default_rng(seed)
    valid = _bytes(_conv())
    out: list[Case] = []

    def add(name: str, cat: str, expect: str, w: Callable[[Path], None]) -> None:
        out.append((name, cat, expect, w))

    # -- controls: must compile
    add("control-conv", "control", "compile", _writer(_conv()))
    add("control-dense", "control", "compile", _writer(_dense()))
    add("control-external-data", "control", "compile", _external("w.bin", _ok_external))

    # -- byte level
    add("bytes-empty", "bytes", "refuse", _writer(b""))
    for k, n in enumerate(sorted(set(r.integers(1, len(valid) - 1, 22).tolist()))):
        add(f"truncated-{n}", "truncated", "refuse", _writer(valid[:n]))
    for k in range(14):
        n = int(r.choice([1, 2, 7, 64, 512, 4096, 65536]))
        add(f"random-{k}-{n}b", "random-bytes", "refuse",
            _writer(r.integers(0, 256, n, dtype=np.uint8).tobytes()))
    add("random-text", "random-bytes", "refuse", _writer(b"ir_version: 8\ngraph { }\n"))
    add("random-zeros", "random-bytes", "refuse", _writer(bytes(1000)))
    for k in range(14):
        b = bytearray(valid)
        pos = int(r.integers(0, len(b) - 12))
        b[pos:pos + 11] = b"\xff" * 10 + b"\x7f" if k % 2 else b"\xff" * 11  # 10-/11-byte varint
        add(f"varint-{k}-at{pos}", "bad-varint", "refuse", _writer(bytes(b)))
    add("varint-huge-length", "bad-varint", "refuse",
        _writer(b"\x3a\xff\xff\xff\xff\x0f" + valid[:40]))  # field 7 (graph), 4 GiB long
    for k in range(16):
        b = bytearray(valid)
        for _ in range(int(r.integers(1, 6))):
            b[int(r.integers(0, len(b)))] ^= 1 << int(r.integers(0, 8))
        add(f"bitflip-{k}", "bitflip", "any", _writer(bytes(b)))

    # -- graph structure
    def self_loop(m: onnx.ModelProto) -> None:
        n = _node(m, "Relu")
        n.input[0] = n.output[0]
    add("cycle-self", "cycle", "refuse", _mut(self_loop))

    def two_cycle(m: onnx.ModelProto) -> None:
        _node(m, "BatchNormalization").input[0] = "r"  # bn reads relu, relu reads bn
    add("cycle-two", "cycle", "refuse", _mut(two_cycle))

    def conv_reads_output(m: onnx.ModelProto) -> None:
        _node(m, "Conv").input[0] = "y"
    add("cycle-conv-reads-y", "cycle", "refuse", _mut(conv_reads_output))

    def ssa_dup(m: onnx.ModelProto) -> None:
        m.graph.node.insert(1, helper.make_node("Relu", ["x"], ["c"], name="dup"))
    add("ssa-two-writers", "ssa", "refuse", _mut(ssa_dup))

    def ssa_writes_input(m: onnx.ModelProto) -> None:
        _node(m, "Relu").output[0] = "x"
        _node(m, "Identity").input[0] = "x"
    add("ssa-writes-input", "ssa", "refuse", _mut(ssa_writes_input))

    def ssa_writes_init(m: onnx.ModelProto) -> None:
        _node(m, "Relu").output[0] = "conv_w"
        _node(m, "Identity").input[0] = "conv_w"
    add("ssa-writes-initializer", "ssa", "refuse", _mut(ssa_writes_init))

    def dup_init(m: onnx.ModelProto) -> None:
        t = copy.deepcopy(_init(m, "conv_b"))
        m.graph.initializer.append(t)
    add("ssa-duplicate-initializer", "ssa", "any", _mut(dup_init))

    def dangling(m: onnx.ModelProto) -> None:
        _node(m, "Relu").input[0] = "nowhere"
    add("dangling-input", "ssa", "refuse", _mut(dangling))

    def out_unproduced(m: onnx.ModelProto) -> None:
        m.graph.output[0].name = "ghost"
    add("output-unproduced", "ssa", "refuse", _mut(out_unproduced))

    def unsorted(m: onnx.ModelProto) -> None:
        nodes = list(m.graph.node)[::-1]
        del m.graph.node[:]
        m.graph.node.extend(nodes)
    add("nodes-reverse-order", "ssa", "refuse", _mut(unsorted))

    # -- external data
    add("external-absolute", "external-data", "refuse", _external("/etc/passwd"))
    add("external-absolute-tmp", "external-data", "refuse", _external("/tmp/qc-fuzz-w.bin"))
    add("external-dotdot", "external-data", "refuse", _external("../x"))
    add("external-dotdot-deep", "external-data", "refuse", _external("a/../../../../etc/passwd"))
    add("external-symlink-outside", "external-data", "refuse",
        _external("w.bin", _symlink_out))
    add("external-symlinked-dir", "external-data", "refuse",
        _external("sub/_outside_weights.bin", _symlink_dir_out))
    add("external-missing", "external-data", "refuse", _external("nope.bin"))
    add("external-empty-location", "external-data", "refuse", _external(""))
    add("external-is-dir", "external-data", "refuse",
        _external("d", lambda d: (d / "d").mkdir()))
    add("external-offset-past-end", "external-data", "refuse",
        _external("w.bin", _ok_external, {"offset": "1000000"}))
    add("external-negative-offset", "external-data", "refuse",
        _external("w.bin", _ok_external, {"offset": "-8"}))
    add("external-huge-length", "external-data", "refuse",
        _external("w.bin", _ok_external, {"length": str(2 ** 62)}))
    add("external-bad-offset", "external-data", "refuse",
        _external("w.bin", _ok_external, {"offset": "abc"}))
    add("external-short-file", "external-data", "refuse",
        _external("w.bin", lambda d: (d / "w.bin").write_bytes(b"\0" * 12)))
    add("external-nul-in-name", "external-data", "refuse", _external("w\0.bin"))
    add("external-dev-zero", "external-data", "refuse", _external("/dev/zero"))

    # -- weights
    for what, val in (("nan", np.nan), ("inf", np.inf), ("-inf", -np.inf)):
        def bad_w(m: onnx.ModelProto, val: float = val) -> None:
            w = numpy_helper.to_array(_init(m, "conv_w")).copy()
            w.flat[3] = val
            _set_init(m, "conv_w", w)
        add(f"weight-{what}", "nan-inf", "refuse", _mut(bad_w))

        def bad_b(m: onnx.ModelProto, val: float = val) -> None:
            _set_init(m, "conv_b", np.full(4, val, np.float32))
        add(f"bias-{what}", "nan-inf", "refuse", _mut(bad_b))

        def bad_bn(m: onnx.ModelProto, val: float = val) -> None:
            _set_init(m, "bn_var", np.full(4, val, np.float32))
        add(f"bn-var-{what}", "nan-inf", "refuse", _mut(bad_bn))

        def bad_gemm(m: onnx.ModelProto, val: float = val) -> None:
            w = numpy_helper.to_array(_init(m, "w")).copy()
            w[0, 0] = val
            _set_init(m, "w", w)
        add(f"gemm-weight-{what}", "nan-inf", "refuse", _mut(bad_gemm, _dense))
    add("weight-zero", "weird", "any",
        _mut(lambda m: _set_init(m, "conv_w", np.zeros((4, 3, 3, 3), np.float32))))
    add("weight-huge", "weird", "any",
        _mut(lambda m: _set_init(m, "conv_w", np.full((4, 3, 3, 3), 3e38, np.float32))))
    add("weight-denormal", "weird", "any",
        _mut(lambda m: _set_init(m, "conv_w", np.full((4, 3, 3, 3), 1e-44, np.float32))))
    add("bn-var-negative", "weird", "any",
        _mut(lambda m: _set_init(m, "bn_var", np.full(4, -1.0, np.float32))))
    add("bn-epsilon-nan", "nan-inf", "any",
        _mut(lambda m: _set_attr(m, "BatchNormalization",
                                 helper.make_attribute("epsilon", float("nan")))))

    # -- dims: input, output and initializer
    big = [2 ** 31, 2 ** 40, 2 ** 62, 2 ** 63 - 1]
    for axis in range(4):
        for v in (0, -1, -7, *big):
            def dims(m: onnx.ModelProto, axis: int = axis, v: int = v) -> None:
                d: list[int | str] = [1, 3, 8, 8]
                d[axis] = v
                _in_dims(m, d)
            add(f"input-dim{axis}-{v}", "dims", "refuse" if (axis or v) else "any", _mut(dims))
    add("input-rank0", "dims", "refuse", _mut(lambda m: _in_dims(m, [])))
    add("input-rank1", "dims", "refuse", _mut(lambda m: _in_dims(m, [3])))
    add("input-rank6", "dims", "refuse", _mut(lambda m: _in_dims(m, [1, 3, 8, 8, 1, 1])))
    add("input-symbolic-spatial", "dims", "refuse", _mut(lambda m: _in_dims(m, [1, 3, "h", "w"])))
    add("input-symbolic-batch", "weird", "any", _mut(lambda m: _in_dims(m, ["N", 3, 8, 8])))
    add("input-no-shape", "dims", "refuse",
        _mut(lambda m: m.graph.input[0].type.tensor_type.ClearField("shape")))
    add("output-dim-huge", "dims", "any", _mut(lambda m: _in_dims(m, [1, 4, 2 ** 62, 6], "output")))
    add("output-dim-negative", "dims", "any", _mut(lambda m: _in_dims(m, [1, 4, -6, 6], "output")))
    for tag, dims in (("huge", [2 ** 40, 3, 3, 3]), ("negative", [-4, 3, 3, 3]),
                      ("zero", [0, 3, 3, 3]), ("overflow", [2 ** 62, 2 ** 62, 3, 3]),
                      ("int64max", [2 ** 63 - 1, 1, 1, 1]), ("rank0", []),
                      ("wrong-count", [4, 3, 3, 4])):
        def init_dims(m: onnx.ModelProto, dims: list[int] = dims) -> None:
            t = _init(m, "conv_w")
            del t.dims[:]
            t.dims.extend(dims)
        add(f"init-dims-{tag}", "dims", "refuse", _mut(init_dims))

    def empty_raw(m: onnx.ModelProto) -> None:
        t = _init(m, "conv_w")
        t.ClearField("raw_data")
    add("init-no-data", "dims", "refuse", _mut(empty_raw))

    def both_data(m: onnx.ModelProto) -> None:
        t = _init(m, "conv_b")
        t.float_data.extend([1.0] * 4)
    add("init-raw-and-float-data", "dims", "any", _mut(both_data))

    # -- dtypes
    for tag, dt in (("int32", TensorProto.INT32), ("double", TensorProto.DOUBLE),
                    ("float16", TensorProto.FLOAT16), ("bool", TensorProto.BOOL),
                    ("string", TensorProto.STRING), ("undefined", TensorProto.UNDEFINED),
                    ("bogus-99", 99)):
        def in_dt(m: onnx.ModelProto, dt: int = dt) -> None:
            m.graph.input[0].type.tensor_type.elem_type = dt
        add(f"input-dtype-{tag}", "dtype", "refuse", _mut(in_dt))

        def out_dt(m: onnx.ModelProto, dt: int = dt) -> None:
            m.graph.output[0].type.tensor_type.elem_type = dt
        # An untyped (UNDEFINED) output is read as float32: exporters leave them so.
        add(f"output-dtype-{tag}", "dtype", "any" if tag == "undefined" else "refuse",
            _mut(out_dt))

        def w_dt(m: onnx.ModelProto, dt: int = dt) -> None:
            _init(m, "conv_w").data_type = dt  # raw bytes reinterpreted
        add(f"weight-dtype-{tag}", "dtype", "refuse", _mut(w_dt))
    for tag, arr in (("int64", np.ones((4, 3, 3, 3), np.int64)),
                     ("float64", np.ones((4, 3, 3, 3), np.float64)),
                     ("float16", np.ones((4, 3, 3, 3), np.float16)),
                     ("uint8", np.ones((4, 3, 3, 3), np.uint8))):
        add(f"weight-typed-{tag}", "dtype", "refuse",
            _mut(lambda m, arr=arr: _set_init(m, "conv_w", arr)))
    add("input-sequence-type", "dtype", "refuse", _mut(lambda m: m.graph.input[0].CopyFrom(
        helper.make_tensor_sequence_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]))))
    add("input-no-type", "dtype", "refuse", _mut(lambda m: m.graph.input[0].ClearField("type")))

    # -- missing initializers
    for name in ("conv_w", "conv_b", "bn_mean", "bn_var"):
        def drop(m: onnx.ModelProto, name: str = name) -> None:
            m.graph.initializer.remove(_init(m, name))
        add(f"missing-init-{name}", "missing-init", "refuse", _mut(drop))
    add("missing-init-gemm-w", "missing-init", "refuse",
        _mut(lambda m: m.graph.initializer.remove(_init(m, "w")), _dense))

    def init_as_input(m: onnx.ModelProto) -> None:
        m.graph.input.append(helper.make_tensor_value_info("conv_w", TensorProto.FLOAT,
                                                           [4, 3, 3, 3]))
    add("initializer-also-input", "weird", "any", _mut(init_as_input))

    # -- domains and op types
    def dom(m: onnx.ModelProto) -> None:
        _node(m, "Relu").domain = "com.evil"
        m.opset_import.append(helper.make_opsetid("com.evil", 1))
    add("domain-unknown", "domain", "refuse", _mut(dom))
    add("domain-unimported", "domain", "refuse",
        _mut(lambda m: setattr(_node(m, "Relu"), "domain", "com.nowhere")))
    add("domain-ms", "domain", "refuse", _mut(lambda m: (
        setattr(_node(m, "Relu"), "domain", "com.microsoft"),
        m.opset_import.append(helper.make_opsetid("com.microsoft", 1)))))
    add("op-unknown", "domain", "refuse",
        _mut(lambda m: setattr(_node(m, "Relu"), "op_type", "FrobnicateV2")))
    add("op-empty", "domain", "refuse", _mut(lambda m: setattr(_node(m, "Relu"), "op_type", "")))
    add("op-lowercase", "domain", "refuse",
        _mut(lambda m: setattr(_node(m, "Relu"), "op_type", "relu")))

    # -- opsets and IR versions
    for v in (0, 1, 6, 7, 99, 10 ** 6, -1, 2 ** 62):
        def ops(m: onnx.ModelProto, v: int = v) -> None:
            m.opset_import[0].version = v
        add(f"opset-{v}", "opset", "any" if v == 7 else "refuse", _mut(ops))
    add("opset-missing", "opset", "refuse", _mut(lambda m: m.ClearField("opset_import")))
    add("opset-duplicate", "opset", "refuse",
        _mut(lambda m: m.opset_import.append(helper.make_opsetid("", 13))))
    for v in (0, 1, 3, 99, -5):
        add(f"ir-version-{v}", "opset", "any" if v == 3 else "refuse",
            _mut(lambda m, v=v: setattr(m, "ir_version", v)))

    # -- attributes
    attrs = [
        ("strides-float", helper.make_attribute("strides", [1.0, 1.0])),
        ("strides-string", helper.make_attribute("strides", "11")),
        ("strides-zero", helper.make_attribute("strides", [0, 0])),
        ("strides-negative", helper.make_attribute("strides", [-1, -1])),
        ("strides-huge", helper.make_attribute("strides", [2 ** 62, 2 ** 62])),
        ("strides-len3", helper.make_attribute("strides", [1, 1, 1])),
        ("pads-len3", helper.make_attribute("pads", [1, 1, 1])),
        ("pads-negative", helper.make_attribute("pads", [-5, -5, -5, -5])),
        ("pads-huge", helper.make_attribute("pads", [2 ** 40] * 4)),
        ("dilations-zero", helper.make_attribute("dilations", [0, 0])),
        ("dilations-huge", helper.make_attribute("dilations", [100, 100])),
        ("group-zero", helper.make_attribute("group", 0)),
        ("group-negative", helper.make_attribute("group", -3)),
        ("group-2", helper.make_attribute("group", 2)),
        ("group-float", helper.make_attribute("group", 1.5)),
        ("group-tensor", helper.make_attribute("group", numpy_helper.from_array(
            np.array(1, np.int64)))),
        ("kernel-shape-wrong", helper.make_attribute("kernel_shape", [5, 5])),
        ("kernel-shape-string", helper.make_attribute("kernel_shape", "3x3")),
        ("auto-pad-garbage", helper.make_attribute("auto_pad", "SOMETIMES")),
        ("auto-pad-same", helper.make_attribute("auto_pad", "SAME_UPPER")),
        ("unknown-attr", helper.make_attribute("frobnicate", 1)),
    ]
    for tag, a in attrs:
        # A stride past the input is legal (one output pixel); SAME_UPPER is fine too.
        add(f"conv-attr-{tag}", "attribute",
            "any" if tag in ("auto-pad-same", "strides-huge") else "refuse",
            _mut(lambda m, a=a: _set_attr(m, "Conv", a)))
    add("gemm-transB-string", "attribute", "refuse",
        _mut(lambda m: _set_attr(m, "Gemm", helper.make_attribute("transB", "yes")), _dense))
    add("gemm-alpha-nan", "attribute", "refuse",
        _mut(lambda m: _set_attr(m, "Gemm", helper.make_attribute("alpha", float("nan"))), _dense))
    add("gemm-alpha-ints", "attribute", "refuse",
        _mut(lambda m: _set_attr(m, "Gemm", helper.make_attribute("alpha", [1, 2])), _dense))

    def attr_no_type(m: onnx.ModelProto) -> None:
        a = _node(m, "Conv").attribute.add()
        a.name = "strides"
    add("conv-attr-untyped", "attribute", "refuse", _mut(attr_no_type))

    def attr_dup(m: onnx.ModelProto) -> None:
        _node(m, "Conv").attribute.extend([helper.make_attribute("group", 1)] * 2)
    add("conv-attr-duplicate", "attribute", "refuse", _mut(attr_dup))

    # -- shape mismatches
    add("conv-cin-mismatch", "shape", "refuse",
        _mut(lambda m: _set_init(m, "conv_w", np.ones((4, 5, 3, 3), np.float32))))
    add("conv-weight-rank3", "shape", "refuse",
        _mut(lambda m: _set_init(m, "conv_w", np.ones((4, 3, 3), np.float32))))
    add("conv-bias-length", "shape", "refuse",
        _mut(lambda m: _set_init(m, "conv_b", np.ones(7, np.float32))))
    add("conv-kernel-larger-than-input", "shape", "refuse",
        _mut(lambda m: _set_init(m, "conv_w", np.ones((4, 3, 11, 11), np.float32))))
    add("bn-channel-mismatch", "shape", "refuse",
        _mut(lambda m: _set_init(m, "bn_mean", np.ones(9, np.float32))))
    add("gemm-k-mismatch", "shape", "refuse",
        _mut(lambda m: _set_init(m, "w", np.ones((3, 7), np.float32)), _dense))
    add("gemm-bias-mismatch", "shape", "refuse",
        _mut(lambda m: _set_init(m, "c", np.ones(5, np.float32)), _dense))
    add("gemm-weight-rank1", "shape", "refuse",
        _mut(lambda m: _set_init(m, "w", np.ones(18, np.float32)), _dense))
    add("input-channels-mismatch", "shape", "refuse", _mut(lambda m: _in_dims(m, [1, 5, 8, 8])))
    add("output-shape-lies", "shape", "any", _mut(lambda m: _in_dims(m, [1, 9, 2, 2], "output")))

    # -- empty and degenerate graphs
    add("graph-no-nodes", "empty", "refuse", _mut(lambda m: m.graph.ClearField("node")))
    add("graph-no-inputs", "empty", "refuse", _mut(lambda m: m.graph.ClearField("input")))
    add("graph-no-outputs", "empty", "refuse", _mut(lambda m: m.graph.ClearField("output")))
    add("graph-cleared", "empty", "refuse", _mut(lambda m: m.graph.Clear()))
    add("graph-absent", "empty", "refuse", _mut(lambda m: m.ClearField("graph")))
    add("model-empty-proto", "empty", "refuse", _writer(onnx.ModelProto(ir_version=8)))

    def passthrough(m: onnx.ModelProto) -> None:
        m.graph.ClearField("node")
        m.graph.ClearField("initializer")
        m.graph.node.append(helper.make_node("Identity", ["x"], ["y"]))
        _in_dims(m, [1, 3, 8, 8], "output")
    add("graph-identity-only", "empty", "any", _mut(passthrough))

    def two_outputs(m: onnx.ModelProto) -> None:
        m.graph.output.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, None))
    add("graph-two-outputs", "empty", "refuse", _mut(two_outputs))

    def if_node(m: onnx.ModelProto) -> None:
        sub = helper.make_graph([], "empty", [], [])
        m.graph.node.append(helper.make_node("If", ["r"], ["z"], then_branch=sub,
                                             else_branch=sub))
    add("subgraph-empty-if", "empty", "refuse", _mut(if_node))

    # -- valid but weird
    def names(m: onnx.ModelProto, new: str) -> None:
        ren = {"x": new}
        for n in m.graph.node:
            n.input[:] = [ren.get(i, i) for i in n.input]
        m.graph.input[0].name = new
    for tag, nm in (("unicode", "входъ✓"), ("spaces", "in put/../x"),
                    ("long", "x" * 5000), ("newline", "x\ny"), ("empty", "")):
        add(f"weird-input-name-{tag}", "weird", "any", _mut(lambda m, nm=nm: names(m, nm)))
    add("weird-node-names-empty", "weird", "any",
        _mut(lambda m: [setattr(n, "name", "") for n in m.graph.node]))
    add("weird-node-names-duplicate", "weird", "any",
        _mut(lambda m: [setattr(n, "name", "n") for n in m.graph.node]))
    add("weird-node-name-newline", "weird", "any",
        _mut(lambda m: setattr(_node(m, "Conv"), "name", "conv\nerror: fake\n")))
    add("weird-doc-string-1mb", "weird", "any",
        _mut(lambda m: setattr(m, "doc_string", "a" * 2 ** 20)))
    add("weird-metadata", "weird", "any", _mut(lambda m: m.metadata_props.extend(
        [onnx.StringStringEntryProto(key="k" * 100, value="\0\n")])))
    add("weird-unused-initializer", "weird", "any", _mut(lambda m: m.graph.initializer.append(
        numpy_helper.from_array(np.ones(3, np.float32), "unused"))))
    add("weird-unused-node", "weird", "any", _mut(lambda m: m.graph.node.insert(
        0, helper.make_node("Relu", ["x"], ["dead"], name="dead"))))
    add("weird-value-info-lies", "weird", "any", _mut(lambda m: m.graph.value_info.append(
        helper.make_tensor_value_info("c", TensorProto.INT8, [7, 7]))))

    def identity_chain(m: onnx.ModelProto) -> None:
        _node(m, "Identity").output[0] = "i0"
        for k in range(60):
            m.graph.node.append(helper.make_node("Identity", [f"i{k}"], [f"i{k + 1}"]))
        m.graph.node.append(helper.make_node("Identity", ["i60"], ["y"]))
    add("weird-identity-chain", "weird", "any", _mut(identity_chain))
    add("weird-spatial-1x1", "weird", "any",
        _writer(ob.conv_bn_relu_model(1, cin=3, cout=4, size=1, kernel=1)))
    add("weird-batch-3", "weird", "any", _writer(_conv(batch=3)))
    add("weird-nhwc-like", "weird", "any",
        _writer(ob.conv_bn_relu_model(2, cin=8, cout=3, size=3, kernel=1)))
    add("weird-huge-input-spatial", "dims", "refuse",
        _mut(lambda m: _in_dims(m, [1, 3, 1 << 20, 1 << 20])))

    # -- seeded random structural mutations
    ops_pool = ["Relu", "Conv", "Add", "Gemm", "MaxPool", "Softmax", "Reshape", "Concat",
                "Loop", "Scan", "Sigmoid", "Mul", "Transpose"]
    for k in range(24):
        def rnd(m: onnx.ModelProto, k: int = k) -> None:
            rr = np.random.default_rng(seed * 1000 + k)
            n = m.graph.node[int(rr.integers(0, len(m.graph.node)))]
            what = k % 6
            if what == 0:
                n.op_type = str(rr.choice(ops_pool))
            elif what == 1 and len(n.input) > 1:
                del n.input[int(rr.integers(0, len(n.input)))]
            elif what == 2:
                n.input.append(str(rr.choice(["x", "conv_w", "y", "", "bn_var"])))
            elif what == 3 and len(n.input) > 1:
                n.input[0], n.input[1] = n.input[1], n.input[0]
            elif what == 4:
                n.output.append("extra")
            else:
                t = m.graph.initializer[int(rr.integers(0, len(m.graph.initializer)))]
                raw = bytearray(t.raw_data)
                if raw:
                    del raw[int(rr.integers(0, len(raw))):]
                t.raw_data = bytes(raw)
        add(f"random-mutation-{k}", "random-mutation", "any", _mut(rnd))
    return out


def generate(out_dir: Path, seed: int = 0) -> dict[str, dict[str, str]]:
    """Write every case under ``out_dir`` (emptied first); the manifest."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        if any(out_dir.iterdir()) and not (out_dir / "manifest.json").is_file():
            raise SystemExit(f"error: {out_dir} is not empty and not a fuzz corpus; "
                             "pass a new folder")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    manifest: dict[str, dict[str, str]] = {}
    for k, (name, cat, expect, write) in enumerate(cases(seed)):
        case = f"{k:03d}-{name}"
        d = out_dir / case
        d.mkdir()
        write(d)
        manifest[case] = {"category": cat, "expect": expect}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder to (re)create")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    manifest = generate(args.out, args.seed)
    print(f"wrote {len(manifest)} cases under {args.out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
