"""Issue 11: the allow-list integer-only proof closes the old checker's blind spots.

Each negative case below passed the old checker (a walk of stored values only, in
scheduled TIR, and of ``call_tir`` targets only in Relax; see git history of
qcompile/intcheck.py before the allow-list walker) and is rejected now.  The
positive cases run the real kernels through the walker on scheduled TIR, on the
post-pipeline TIR codegen receives, and through the x86 assembly scan.
"""
from __future__ import annotations

import pytest
import tvm
from tvm import relax
from tvm.script import tirx as T

from qcompile.asmcheck import classify_x86, scan_sass, scan_x86_asm
from qcompile.build import build, legalize
from qcompile.config import QuantSpec
from qcompile.intcheck import check_codegen_tir, check_integer_only, check_prim_func
from qcompile.lower import lower
from qcompile.quantize import quantize_graph
from qcompile.schedule import x86_rules
from qcompile.targets import make_target
from zoo_graphs import linspace_stats, zoo_graph

TARGET = make_target("llvm")


@T.prim_func
def float_if(A: T.Buffer((8,), "int32"), B: T.Buffer((8,), "int32")):
    for i in range(8):
        if T.Cast("float32", A[i]) * T.float32(0.5) > T.float32(1.0):
            B[i] = 1
        else:
            B[i] = 0


@T.prim_func
def evaluate_extern(A: T.Buffer((8,), "int32"), B: T.Buffer((8,), "int32")):
    for i in range(8):
        B[i] = A[i]
    T.evaluate(T.call_extern("int32", "float_kernel", T.Cast("float32", A[0])))


@T.prim_func
def select_not_float(A: T.Buffer((8,), "int32"), B: T.Buffer((8,), "int32")):
    for i in range(8):
        B[i] = T.Select(T.Not(T.Cast("float32", A[i]) < T.float32(0.5)), 1, 0)


@T.prim_func
def float_in_evaluated_call(A: T.Buffer((8,), "int32"), B: T.Buffer((8,), "int32")):
    for i in range(8):
        B[i] = A[i]
    T.evaluate(T.likely(T.Cast("float32", A[0]) > T.float32(0.0)))


@T.prim_func
def float_loop_bound(A: T.Buffer((8,), "int32"), B: T.Buffer((8,), "int32")):
    for i in range(T.Cast("int32", T.Cast("float32", A[0]) * T.float32(0.5))):
        B[i] = A[i]


@T.prim_func
def float_let(A: T.Buffer((8,), "int32"), B: T.Buffer((8,), "int32")):
    for i in range(8):
        x: T.let[T.float32] = T.Cast("float32", A[i]) * T.float32(0.25)
        B[T.Cast("int32", x)] = 1


@T.prim_func
def integer_ok(A: T.Buffer((8,), "int32"), B: T.Buffer((8,), "int32")):
    for i in range(8):
        if A[i] > 3:
            B[i] = T.Select(T.Not(A[i] < 5), A[i] >> 1, A[i] * 3)
        else:
            B[i] = T.shift_left(A[i], 2)


@pytest.mark.parametrize("func", [float_if, evaluate_extern, select_not_float,
                                  float_in_evaluated_call, float_loop_bound, float_let],
                         ids=lambda f: f.attrs["global_symbol"] if f.attrs else "f")
def test_tir_blind_spots_rejected(func) -> None:
    """Every one passed the old checker (its stores are integer); the allow-list walker
    rejects each one and names the PrimFunc."""
    rep = check_prim_func("hidden", func)
    assert rep.violations, "float slipped through"
    assert all(v.startswith("hidden:") for v in rep.violations)


def test_integer_control_flow_allowed() -> None:
    rep = check_prim_func("ok", integer_ok)
    assert rep.violations == [] and rep.stores == 2


def _core(extra: str) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8), "int32"))
    sinfo = relax.TensorType((4, 8), "int32")
    with bb.function("core", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.add(x, relax.const(1, "int32")))
            if extra == "call_dps_packed":
                y = bb.emit(relax.call_dps_packed("float_kernel", [y], sinfo))
            else:
                y = bb.emit(relax.Call(relax.ExternFunc("float_kernel"), [y], ty_args=[sinfo]))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return legalize(bb.get(), TARGET)


@pytest.mark.parametrize("extra", ["call_dps_packed", "extern_func"])
def test_relax_opaque_calls_rejected(extra: str) -> None:
    """The old checker collected only call_tir targets: with one integer call_tir
    beside it, an opaque call_dps_packed / ExternFunc call passed."""
    rep = check_integer_only(_core(extra), "core")
    assert rep.prim_funcs and not rep.ok
    assert any("float_kernel" in v or "call_dps_packed" in v for v in rep.violations)


def test_asm_classifier() -> None:
    for bad in ("vfmadd231ps", "vmulps", "vaddpd", "vsubss", "vcvtdq2ps", "vcvttps2dq",
                "cvtsi2ss", "vdivps", "vsqrtss", "vrcp14ps", "vrsqrt14ps", "fld", "fstp",
                "mulsd", "vminps", "vcmpltps", "vucomiss", "vroundps", "vaddsh", "vmulph",
                "vfmadd231sh", "vcvtsh2ss"):
        assert classify_x86(bad), bad
    for ok in ("vpdpbusd", "vpdpwssd", "vpmaddubsw", "vmovups", "vmovdqu8", "vxorps",
               "vbroadcastss", "vpermps", "vinserti128", "vextractf128", "vgf2p8affineqb",
               "imull", "movss", "kmovw", "cmpl", "shrxl", "vpsrad",
               "vmovsh"):  # AVX512-FP16's 16-bit scalar move: LLVM loads int16 with it
        assert classify_x86(ok) is None, ok
    asm = ("\t.type\t__tvm_ffi_k,@function\n__tvm_ffi_k:\n\tvpdpbusd\t%zmm1, %zmm2, %zmm3\n"
           "\t.type\tk_compute_,@function\nk_compute_:\n\tleaq\t.L__tvm_parallel_lambda(%rip), %rdi\n"
           "\t.type\t.L__tvm_parallel_lambda,@function\n.L__tvm_parallel_lambda:\n"
           "\tvfmadd231ps\t%zmm1, %zmm2, %zmm3\n")
    rep = scan_x86_asm(asm, ["k"])
    assert rep.scanned and len(rep.violations) == 1 and "lambda" in rep.violations[0]
    sass = ("Function : k\n /*0010*/ IMMA.8816.S8.S8 R4, R8, R12, R4 ; /* 0x */\n"
            " /*0020*/ FFMA R1, R2, R3, R4 ; /* 0x */\n")
    assert len(scan_sass(sass).violations) == 1


@pytest.fixture(scope="module")
def r18(tmp_path_factory: pytest.TempPathFactory):
    g = zoo_graph("resnet18", tmp_path_factory.mktemp("r18"), input_size=32)
    names = [n.name for n in g.nodes if n.op in ("conv", "dense")]
    pick = {"layer1": "w4a4", "layer2": "w4a8"}  # int4 (GFNI unpack) beside int8 VNNI
    bits = {n: next((p for k, p in pick.items() if n.startswith(k)), "w8a8") for n in names}
    return quantize_graph(g, linspace_stats(g), QuantSpec(), bits=bits)


def test_resnet18_passes_every_stage(r18) -> None:
    """Whole ResNet-18 (32 px, W4A4/W4A8/W8A8 layers) on the x86 kernels: Relax, scheduled TIR, post-pipeline
    TIR and the assembly of every core kernel are integer-only; the boundary
    functions are not (so the scan does look)."""
    low = lower(r18, x86_rules(1), batch=1)
    built = build(low.mod, TARGET)
    rep = built.intcheck
    assert rep.violations == [] and rep.ok
    assert rep.stages == ["core", "codegen", "asm"]
    assert rep.asm["ok"] and rep.asm["instructions"] > 1000
    assert len(rep.codegen_funcs) >= len(rep.prim_funcs)
    asm = next(m for m in [built.executable.mod, *built.executable.mod.imports]
               if m.kind == "llvm").inspect_source("asm")
    assert "vpdpbusd" in asm and "vgf2p8affineqb" in asm  # VNNI and the GFNI int4 unpack
    for func in ("quantize", "dequantize"):
        assert not check_codegen_tir(built.lowered, TARGET, func).ok or \
            not check_integer_only(built.lowered, func).ok


def _mma(a_dtype: str):
    @T.prim_func
    def f(A: T.Buffer((16, 16), "int8"), B: T.Buffer((16, 16), "int8"),
          C: T.Buffer((32, 8), "int32")):
        T.evaluate(T.cuda.mma_fill_legacy(8, C.data, C.elem_offset, dtype="int32"))
        T.evaluate(T.ptx_legacy.mma("m16n8k32", "row", "col", a_dtype, a_dtype, "int32",
                                    A.access_ptr("r"), 0, B.access_ptr("r"), 0,
                                    C.data, C.elem_offset, False, dtype="int32"))
        C[0, 0] = C[0, 0] + 1
    return f


def test_evaluated_mma_operand_types_checked() -> None:
    """The old checker never looked inside Evaluate: an fp16 mma.sync passed."""
    assert check_prim_func("mma", _mma("int8")).violations == []
    rep = check_prim_func("mma", _mma("fp16"))
    assert any("fp16" in v for v in rep.violations)
