"""qcompile/targets/x86/lowering.py: the x86 kernel rules inside the lowering, bit-exact end to end.

A tiny model is quantized with 4-bit middle layers (first/last 8-bit), lowered with
``x86_rules`` and built; the compiled ``core`` must equal the NumPy oracle
(``reference.run_integer``) exactly, and the 4-bit layers must run on the
packed-nibble kernels with their weights stored at half the bytes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import tvm
from onnx import helper
from tvm import relax

from tests.helpers.onnx_builders import conv_node, init, make_model, rng, save
from qcompile.verify import oracle
from qcompile.targets.x86 import lowering as schedule
from qcompile.build.compile import build
from qcompile.quant.calibrate import MinMaxObserver
from qcompile.config import QuantSpec
from qcompile.lower.emit import Lowered, lower
from qcompile.frontend.onnx_import import import_onnx, load_model
from qcompile.frontend.prepare import prepare
from qcompile.ir.qgraph import QGraph
from qcompile.quant.quantize import calibration_tensors, quantize_graph
from qcompile.targets.x86.lowering import x86_rules
from qcompile.hw.facts import cpu_flags
from qcompile.hw.backends import make_target

pytestmark = pytest.mark.skipif(
    not {"avx512_vnni", "gfni"} <= cpu_flags(),
    reason="the int4 kernels need avx512_vnni and gfni in /proc/cpuinfo flags")
BATCH = 2


def int4_model(seed: int = 0, size: int = 9) -> onnx.ModelProto:
    """stem 3x3 -> 3x3 pad 1 (OC 20) -> 1x1 stride 2 (OC 13, signed out) -> 3x3 on int8
    input (C 13) -> gap -> flatten -> fc (24) + relu -> fc (5, raw logits)."""
    r, inits = rng(seed), []
    relu = [helper.make_node("Relu", [f"{t}0"], [t], name=f"{t}_relu") for t in "abd"]
    n = [conv_node("stem", "x", "a0", r.normal(0, .3, (8, 3, 3, 3)), r.normal(0, .1, 8), inits,
                   pads=[1, 1, 1, 1]), relu[0],
         conv_node("c3", "a", "b0", r.normal(0, .2, (20, 8, 3, 3)), r.normal(0, .1, 20), inits,
                   pads=[1, 1, 1, 1]), relu[1],
         conv_node("c1", "b", "c", r.normal(0, .3, (13, 20, 1, 1)), r.normal(0, .1, 13), inits,
                   strides=[2, 2]),
         conv_node("c5", "c", "d0", r.normal(0, .2, (16, 13, 3, 3)), None, inits,
                   pads=[1, 1, 1, 1]), relu[2],
         helper.make_node("GlobalAveragePool", ["d"], ["g"], name="gap"),
         helper.make_node("Flatten", ["g"], ["f"], name="flatten", axis=1),
         helper.make_node("Gemm", ["f", "fc1_w", "fc1_b"], ["h0"], name="fc1", transB=1),
         helper.make_node("Relu", ["h0"], ["h"], name="fc1_relu"),
         helper.make_node("Gemm", ["h", "fc_w", "fc_b"], ["y"], name="fc", transB=1)]
    inits += [init("fc1_w", r.normal(0, .3, (24, 16))), init("fc1_b", r.normal(0, .1, 24)),
              init("fc_w", r.normal(0, .3, (5, 24))), init("fc_b", r.normal(0, .1, 5))]
    return make_model(n, inits, [1, 3, size, size], [1, 5])


def _quantized(path: Path, bits: int = 4) -> QGraph:
    g = prepare(import_onnx(load_model(path)))
    obs = {}
    for k, t in enumerate(calibration_tensors(g)):
        o = MinMaxObserver()
        o.update(np.linspace(-1 - k % 3, 2 + k % 3, 64))
        obs[t] = o
    return quantize_graph(g, obs, QuantSpec(bits=bits, first_last_bits=8))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[QGraph, Lowered, relax.VirtualMachine]:
    qg = _quantized(save(int4_model(), tmp_path_factory.mktemp("int4")))
    low = lower(qg, x86_rules(BATCH), batch=BATCH)
    built = build(low.mod, make_target("llvm"))
    assert built.intcheck.ok, built.intcheck.violations[:3]
    return qg, low, relax.VirtualMachine(built.executable, tvm.cpu())


@pytest.mark.hardware
def test_4bit_layers_use_the_int4_kernels(compiled) -> None:
    qg, low, _ = compiled
    bits = {n.name: n.attrs["bits"] for n in qg.nodes if n.op in ("qconv", "qdense")}
    assert bits == {"stem": 8, "c3": 4, "c1": 4, "c5": 4, "fc1": 4, "fc": 8}
    kernel_of = {node: func.rsplit("_" + node, 1)[0] for func, node in low.funcs.items()}
    assert kernel_of == {"stem": "conv2d_nhwc_vnni", "c3": "conv2d_nhwc_vnni_int4",
                         "c1": "conv2d_nhwc_vnni_int4", "c5": "conv2d_nhwc_vnni_int4",
                         "fc1": "dense_vnni_int4", "fc": "dense_vnni",  # K = 24: no AMX
                         "gap": "global_sum_pool_nhwc"}
    # Both int4 unpack modes run: convs (>= 5 M tiles) unpack once per call, the
    # batch-2 dense per register tile.
    prologue = {f"{k}_{n}": "w_unpack" in low.mod[f"{k}_{n}"].script()
                for n, k in kernel_of.items() if k.endswith("_int4")}
    assert prologue == {"conv2d_nhwc_vnni_int4_c3": True, "conv2d_nhwc_vnni_int4_c1": True,
                        "conv2d_nhwc_vnni_int4_c5": True, "dense_vnni_int4_fc1": False}
    params = dict(low.params)
    w4 = params["c3.w_vnni16x4_int4"]
    assert w4.dtype == np.uint8 and w4.shape == (2, 9 * 8 // 4, 8, 4)  # half of (2, 18, 16, 4)
    assert params["stem.w_vnni16x4"].dtype == np.int8


@pytest.mark.hardware
def test_core_matches_the_oracle_bit_exactly(compiled) -> None:
    qg, low, vm = compiled
    params = [tvm.runtime.tensor(a) for _, a in low.params]
    x = np.random.default_rng(1).normal(size=(BATCH, 3, 9, 9)).astype(np.float32) * 2
    q = oracle.quantize_input(qg, x)
    got = vm["core"](tvm.runtime.tensor(q), *params).numpy()
    want = oracle.run_integer(qg, q)["output"]
    assert want.dtype == np.int32 and np.abs(want).max() > 0  # raw logits, not all zero
    np.testing.assert_array_equal(got, want)


@pytest.mark.unit
def test_without_gfni_4bit_layers_fall_back_to_int8_layout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The int4 rule needs GFNI; without it the int8 kernel takes the 4-bit weights."""
    monkeypatch.setattr(schedule, "cpu_flags", lambda: frozenset({"avx512_vnni", "avx512f"}))
    low = lower(_quantized(save(int4_model(), tmp_path)), schedule.x86_rules(1), batch=1)
    names = [k for k, _ in low.params]
    assert "c3.w_vnni16x4" in names and not any(k.endswith("_int4") for k in names)


# ----------------------------------------------------------------------------- fused chains
def residual_model(seed: int = 3, size: int = 8) -> onnx.ModelProto:
    """stem 3x3 + relu -> c1 3x3 -> Add(stem, c1) + relu -> c2 1x1 -> Sigmoid -> c3 1x1
    and, after it in node order, the downsample ds 1x1 of the block input -> Add(c3, ds)
    -> c4 1x1, read by two adds -> gap -> flatten -> fc (raw logits)."""
    r, inits = rng(seed), []

    def conv(name: str, x: str, y: str, cin: int, cout: int, k: int) -> onnx.NodeProto:
        return conv_node(name, x, y, r.normal(0, .4 / k, (cout, cin, k, k)), r.normal(0, .1, cout),
                         inits, pads=[k // 2] * 4)

    add = helper.make_node
    n = [conv("stem", "x", "a0", 3, 8, 3), add("Relu", ["a0"], ["a"], name="stem_relu"),
         conv("c1", "a", "b", 8, 8, 3),
         add("Add", ["a", "b"], ["s0"], name="add1"), add("Relu", ["s0"], ["s"], name="add1_relu"),
         conv("c2", "s", "t", 8, 8, 1), add("Sigmoid", ["t"], ["u"], name="sig"),
         conv("c3", "u", "v", 8, 16, 1), conv("ds", "s", "w", 8, 16, 1),
         add("Add", ["v", "w"], ["z"], name="add2"),
         conv("c4", "z", "z2", 16, 16, 1),
         add("Add", ["z2", "z"], ["z3"], name="add3"),
         add("Add", ["z3", "z2"], ["z4"], name="add4"),
         add("GlobalAveragePool", ["z4"], ["g"], name="gap"),
         add("Flatten", ["g"], ["f"], name="flatten", axis=1),
         add("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc", transB=1)]
    inits += [init("fc_w", r.normal(0, .3, (5, 16))), init("fc_b", r.normal(0, .1, 5))]
    return make_model(n, inits, [1, 3, size, size], [1, 5])


@pytest.mark.hardware
def test_residual_add_sigmoid_fuse_into_their_conv_bit_exactly(tmp_path: Path) -> None:
    qg = _quantized(save(residual_model(), tmp_path), bits=8)
    low = lower(qg, x86_rules(BATCH), batch=BATCH)
    kind = {n.name: low.kernels[n.name] for n in qg.nodes}
    # conv + its only consumer run as one kernel; the downsample (after c3 in node
    # order) is emitted before the deferred c3 + add2; c4 feeds two adds: not fused.
    fused = {k for k, v in kind.items() if v == "x86_fused"}
    assert fused == {"c1", "add1", "c2", "sig", "c3", "add2"}, kind
    assert kind["c4"] == "x86_vnni" and kind["add3"] == kind["add4"] == "generic"
    assert {f.rsplit("_", 1)[-1] for f in low.funcs} >= {"c1", "c2", "c3"}
    built = build(low.mod, make_target("llvm"))
    assert built.intcheck.ok, built.intcheck.violations[:3]
    vm = relax.VirtualMachine(built.executable, tvm.cpu())
    params = [tvm.runtime.tensor(a) for _, a in low.params]
    x = np.random.default_rng(1).normal(size=(BATCH, 3, 8, 8)).astype(np.float32) * 2
    q = oracle.quantize_input(qg, x)
    want = oracle.run_integer(qg, q)["output"]
    assert np.abs(want).max() > 0
    np.testing.assert_array_equal(vm["core"](tvm.runtime.tensor(q), *params).numpy(), want)


@pytest.mark.hardware
def test_a_declined_chain_is_lowered_node_by_node(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """No kernel takes the fused ops (here: the rules refuse every ``post``): the chain's
    nodes are lowered one by one, in order, and stay exact."""
    select = schedule.krules.select_kernel
    monkeypatch.setattr(schedule.krules, "select_kernel",
                        lambda d, flags=None: None if d.post else select(d, flags))
    qg = _quantized(save(residual_model(), tmp_path), bits=8)
    low = lower(qg, x86_rules(1), batch=1)
    assert "x86_fused" not in low.kernels.values()
    assert low.kernels["c1"] == "x86_vnni" and low.kernels["add1"] == "generic"
    built = build(low.mod, make_target("llvm"))
    vm = relax.VirtualMachine(built.executable, tvm.cpu())
    x = np.random.default_rng(2).normal(size=(1, 3, 8, 8)).astype(np.float32)
    q = oracle.quantize_input(qg, x)
    got = vm["core"](tvm.runtime.tensor(q), *[tvm.runtime.tensor(a) for _, a in low.params])
    np.testing.assert_array_equal(got.numpy(), oracle.run_integer(qg, q)["output"])
