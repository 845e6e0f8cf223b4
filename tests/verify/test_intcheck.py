"""The integer-only proof: no float op and no division between quantize and dequantize."""
from __future__ import annotations

import numpy as np
import pytest
from tvm import relax

from tests.helpers.kitchen_sink import kitchen_sink_model
from tests.helpers.onnx_builders import save
from qcompile.build.compile import build, legalize
from qcompile.quant.calibrate import MinMaxObserver
from qcompile.verify.intcheck import check_integer_only
from qcompile.lower.emit import lower
from qcompile.frontend.onnx_import import import_onnx, load_model
from qcompile.frontend.prepare import prepare
from qcompile.quant.quantize import calibration_tensors, quantize_graph
from qcompile.targets.x86.lowering import x86_rules
from qcompile.hw.backends import make_target

TARGET = make_target("llvm")


@pytest.fixture(scope="module", params=["kernels", "generic"])
def lowered(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    path = save(kitchen_sink_model(), tmp_path_factory.mktemp("m"))
    g = prepare(import_onnx(load_model(path)))
    obs = {}
    for k, t in enumerate(calibration_tensors(g)):
        o = MinMaxObserver()
        o.update(np.linspace(-1 - k, 2 + k, 64))
        obs[t] = o
    qg = quantize_graph(g, obs)
    rules = x86_rules(1) if request.param == "kernels" else []
    low = lower(qg, rules, batch=1 if rules else None)
    assert ("x86_vnni" in low.kernels.values()) == bool(rules)
    return legalize(low.mod, TARGET)


@pytest.mark.unit
def test_core_is_integer_only(lowered) -> None:
    rep = check_integer_only(lowered, "core")
    assert rep.violations == []
    assert rep.ok
    # every op became a checked PrimFunc: conv/requant, add, pools, concat, gap, dense
    assert len(rep.prim_funcs) >= 8 and rep.stores >= len(rep.prim_funcs)


@pytest.mark.unit
@pytest.mark.parametrize("func", ["quantize", "dequantize"])
def test_checker_flags_the_float_boundary(lowered, func: str) -> None:
    """The same walk over the boundary functions must find their float math."""
    rep = check_integer_only(lowered, func)
    assert not rep.ok
    assert any("float32" in v for v in rep.violations)


def _core_with(op: str) -> relax.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8), "int32"))
    with bb.function("core", [x]):
        with bb.dataflow():
            if op == "divide":
                y = bb.emit(relax.op.floor_divide(x, relax.const(3, "int32")))
            elif op == "mod":
                y = bb.emit(relax.op.floor_mod(x, relax.const(3, "int32")))
            else:
                f = bb.emit(relax.op.astype(x, "float32"))
                y = bb.emit(relax.op.astype(relax.op.multiply(f, relax.const(0.5, "float32")), "int32"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.unit
@pytest.mark.parametrize("op", ["divide", "mod", "float_multiply"])
def test_checker_flags_division_and_float_in_core(op: str) -> None:
    rep = check_integer_only(legalize(_core_with(op), TARGET), "core")
    assert not rep.ok, f"{op} slipped through"


@pytest.mark.tvm
def test_build_reports_integer_only(lowered) -> None:
    """build() runs the same check on what it hands to codegen."""
    mod = _core_with("divide")
    assert not build(mod, TARGET).intcheck.ok


@pytest.mark.tvm
def test_core_codegen_tir_and_asm_are_integer_only(lowered) -> None:
    """The allow-list walk of the TIR codegen receives (after TVM's TIR pipeline) and
    the x86 assembly scan of the core's kernels: no false positive on the real kernels
    (VNNI conv/dense, depthwise, pools, generic ops) while quantize's code is flagged."""
    from qcompile.verify.asmcheck import scan_executable
    from qcompile.verify.intcheck import check_codegen_tir

    post = check_codegen_tir(lowered, TARGET, "core")
    assert post.violations == [] and post.ok and post.nodes > 1000
    assert not check_codegen_tir(lowered, TARGET, "quantize").ok
    core = check_integer_only(lowered, "core")
    built = build(lowered, TARGET)
    assert built.intcheck.stages == ["core", "codegen", "asm"] and built.intcheck.ok
    asm = scan_executable(built.executable, core.prim_funcs)
    assert asm.ok and asm.violations == []
    quant = check_integer_only(lowered, "quantize").prim_funcs
    assert scan_executable(built.executable, quant).violations
