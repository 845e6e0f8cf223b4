"""Issue 11: the allow-list integer-only proof closes the old checker's blind spots.

Each negative case below passed the old checker (a walk of stored values only, in
scheduled TIR, and of ``call_tir`` targets only in Relax; see git history of
qcompile/verify/intcheck.py before the allow-list walker) and is rejected now.  The
positive cases run the real kernels through the walker on scheduled TIR, on the
post-pipeline TIR codegen receives, and through the x86 assembly scan.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import tvm
from tvm import relax
from tvm.script import tirx as T

from qcompile.verify.asmcheck import classify_line, classify_x86, scan_sass, scan_x86_asm
from qcompile.build.compile import build, legalize
from qcompile.config import QuantSpec
from qcompile.errors import BuildError
from qcompile.verify.intcheck import check_codegen_tir, check_integer_only, check_prim_func
from qcompile.lower.emit import lower
from qcompile.quant.quantize import quantize_graph
from qcompile.targets.x86.lowering import x86_rules
from qcompile.verify.shipcheck import scan_x86_so
from qcompile.hw.backends import make_target
from tests.helpers.zoo_graphs import linspace_stats, zoo_graph

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


@pytest.mark.unit
@pytest.mark.parametrize("func", [float_if, evaluate_extern, select_not_float,
                                  float_in_evaluated_call, float_loop_bound, float_let],
                         ids=lambda f: f.attrs["global_symbol"] if f.attrs else "f")
def test_tir_blind_spots_rejected(func) -> None:
    """Every one passed the old checker (its stores are integer); the allow-list walker
    rejects each one and names the PrimFunc."""
    rep = check_prim_func("hidden", func)
    assert rep.violations, "float slipped through"
    assert all(v.startswith("hidden:") for v in rep.violations)


@pytest.mark.unit
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


@pytest.mark.unit
@pytest.mark.parametrize("extra", ["call_dps_packed", "extern_func"])
def test_relax_opaque_calls_rejected(extra: str) -> None:
    """The old checker collected only call_tir targets: with one integer call_tir
    beside it, an opaque call_dps_packed / ExternFunc call passed."""
    rep = check_integer_only(_core(extra), "core")
    assert rep.prim_funcs and not rep.ok
    assert any("float_kernel" in v or "call_dps_packed" in v for v in rep.violations)


@pytest.mark.unit
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


@pytest.mark.tvm
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


@pytest.mark.unit
def test_evaluated_mma_operand_types_checked() -> None:
    """The old checker never looked inside Evaluate: an fp16 mma.sync passed."""
    assert check_prim_func("mma", _mma("int8")).violations == []
    rep = check_prim_func("mma", _mma("fp16"))
    assert any("fp16" in v for v in rep.violations)


# ---------------------------------------------------------------------------------------
# Issue 19: the holes closed. Each planted case below passed the checker before the fix.

@T.prim_func
def div_behind_let(A: T.Buffer((8,), "int32"), B: T.Buffer((8,), "int32")):
    for i in range(8):
        x: T.let[T.int32] = A[i] // 3
        B[i] = x


@T.prim_func
def mod_behind_let_chain(A: T.Buffer((8,), "int32"), B: T.Buffer((8,), "int32")):
    for i in range(8):
        x: T.let[T.int32] = T.truncmod(A[i], 3)
        y: T.let[T.int32] = x + 1
        B[i] = y * 2


@T.prim_func
def div_behind_let_expr(A: T.Buffer((8,), "int32"), B: T.Buffer((8,), "int32")):
    x = T.int32()
    for i in range(8):
        B[i] = T.Let(x + 1, where={x: A[i] // 3})


@T.prim_func
def division_in_index_let(A: T.Buffer((8,), "int32"), B: T.Buffer((8,), "int32")):
    for i in range(8):
        j: T.let[T.int32] = i // 2
        B[j] = A[T.truncmod(i, 4)]


@pytest.mark.unit
@pytest.mark.parametrize("func", [div_behind_let, mod_behind_let_chain, div_behind_let_expr],
                         ids=["bind", "bind_chain", "let_expr"])
def test_division_on_data_behind_a_let_rejected(func) -> None:
    """A let value was walked as an index: an integer division on data passed behind it."""
    rep = check_prim_func("hidden", func)
    assert any(" on data: " in v and "(through let x)" in v for v in rep.violations), \
        rep.violations


@pytest.mark.unit
def test_division_in_an_index_let_allowed() -> None:
    """Lets whose variables only address memory may divide (TVM's pipeline binds its
    index arithmetic so)."""
    rep = check_prim_func("ok", division_in_index_let)
    assert rep.violations == [] and rep.stores == 1


PREFIXED_FLOAT = ["{evex} vaddps %ymm1,%ymm2,%ymm3", "{vex} vcvtdq2ps %ymm1,%ymm2",
                  "{vex3} vmulps %ymm1,%ymm2,%ymm3", "notrack {disp32} vfmadd231ps 0x40(%rax),%zmm1,%zmm2",
                  "data16 rep fld1", "{evex}\tvaddps\t%ymm1, %ymm2, %ymm3"]
UNCLASSIFIABLE = ["(bad)", "{vex} (bad)", "{weird} vpaddd %zmm1,%zmm2,%zmm3",
                  "vpaddd %zmm1,%zmm2,%zmm3 junk", "mov (%rax,%rbx,3),%eax", "mov %eax,%ebx,",
                  "vpaddd %zmm1,%zmm2,%zmm3{%k9}", "mov %foo,%eax", ""]
# objdump's and LLVM's spellings of what the real kernels compile to (VNNI with its
# {vex}/{evex} pseudo-prefixes, masked AVX-512, AMX tiles, padding, calls and jumps)
ACCEPTED = ["{vex} vpdpbusd %ymm1,%ymm2,%ymm3", "{evex} vpdpbusd %ymm1,%ymm2,%ymm3",
            "vpdpbusd 0x40(%rsi){1to16},%zmm0,%zmm1", "vmovdqu8 0x40(%rdi),%zmm2{%k1}{z}",
            "vmovdqu8\t64(%rdi), %zmm2 {%k1} {z}", "tileloadd (%rsi,%rdx,1),%tmm0",
            "tileloaddt1 0x0(%r13,%rcx,1),%tmm5", "tdpbusd %tmm2,%tmm1,%tmm0", "ldtilecfg (%rsp)",
            "tilestored %tmm0,(%rsi,%rdx,1)", "tilezero %tmm1", "tilerelease",
            "data16 cs nopw 0x0(%rax,%rax,1)", "notrack jmp *%rax", "call *0x0(%r13)",
            "call   23670 <__tvm_set_raised_12>", "lea 0x8d(%rip),%rdi  # 237d0 <k_compute_+0x100>",
            "rep stos %rax,%es:(%rdi)", "lock xadd %eax,(%rdx)", "rex.W", "endbr64", "ret",
            "movq\t__TVMBackendParallelLaunch@GOTPCREL(%rip), %rax", "jmp\t.LBB0_3",
            "mov %fs:0x28,%rax", "vpternlogd $0xff,%zmm0,%zmm0,%zmm0", "kmovw %k1,%eax",
            "movabs $0x123456789,%rax", "vmovaps .LCPI0_0+32(%rip), %zmm1", "cltd", "idiv %ecx"]


@pytest.mark.unit
def test_every_token_of_a_line_is_classified() -> None:
    """The old scan classified a line's first token only: a prefixed float instruction
    and any line of unknown shape passed."""
    for line in PREFIXED_FLOAT:
        assert (classify_line(line)[1] or "").startswith(("float", "x87")), line
    for line in UNCLASSIFIABLE:
        assert (classify_line(line)[1] or "").startswith("unclassified"), line
    for line in ACCEPTED:
        assert classify_line(line)[1] is None, line
    asm = ("\t.type\t__tvm_ffi_k,@function\n__tvm_ffi_k:\n\tvpdpbusd\t%zmm1, %zmm2, %zmm3\n"
           "\t{evex}\tvaddps\t%ymm1, %ymm2, %ymm3\n\t(bad)\n")
    assert [v.split(":")[1].strip() for v in scan_x86_asm(asm, ["k"]).violations] == [
        "float arithmetic", "unclassified token '(bad)'"]


# A library as the linker writes one: the core PrimFunc k's FFI wrapper calls its
# (local) compute function, which passes an unnamed parallel lambda to the thread pool;
# the lambda is laid out after a boundary function (q, float by design, not scanned), so
# only following the lea finds it.
TINY_SO = """
    .text
    .globl __tvm_ffi_k
    .type __tvm_ffi_k,@function
__tvm_ffi_k:
    call k_compute_
    ret
    .type k_compute_,@function
k_compute_:
    {{vex}} vpdpbusd %ymm1, %ymm2, %ymm3
    lea .Llambda(%rip), %rdi
    ret
    .globl __tvm_ffi_q
    .type __tvm_ffi_q,@function
__tvm_ffi_q:
    vmulps %zmm1, %zmm2, %zmm3
    ret
.Llambda:
    {plant}
    ret
"""
needs_cc = pytest.mark.skipif(shutil.which("cc") is None or shutil.which("objdump") is None,
                              reason="needs a C compiler and binutils' objdump")


def _tiny_so(tmp_path: Path, plant: str) -> Path:
    (tmp_path / "k.s").write_text(TINY_SO.format(plant=plant))
    subprocess.run(["cc", "-shared", "-nostdlib", "-o", str(tmp_path / "k.so"),
                    str(tmp_path / "k.s")], check=True)
    return tmp_path / "k.so"


@pytest.mark.unit
@needs_cc
@pytest.mark.parametrize("plant,why", [
    ("{evex} vaddps %ymm1, %ymm2, %ymm3", "float arithmetic"),
    ("{vex} vcvtdq2ps %ymm1, %ymm2", "float conversion"),
    (".byte 0x06", "unclassified token '(bad)'"),  # undecodable in 64-bit mode
    ("call expf@PLT", "call of external expf"),
])
def test_shipped_library_scan_rejects_planted_code(tmp_path: Path, plant: str, why: str) -> None:
    rep = scan_x86_so(_tiny_so(tmp_path, plant), ["k"])
    assert len(rep.violations) == 1 and why in rep.violations[0], rep.violations
    assert rep.violations[0].startswith("__tvm_ffi_q+0x")  # the lambda, by its lea's label


@pytest.mark.unit
@needs_cc
def test_shipped_library_scan_follows_core_code_only(tmp_path: Path) -> None:
    so = _tiny_so(tmp_path, "vpaddd %zmm1, %zmm2, %zmm3")
    rep = scan_x86_so(so, ["k"])
    assert rep.ok and rep.violations == [] and rep.instructions == 7
    assert rep.functions[:2] == ["__tvm_ffi_k", "k_compute_"] and len(rep.functions) == 3
    assert "vmulps" in scan_x86_so(so, ["q"]).violations[0]  # the boundary code is read
    assert scan_x86_so(so, ["k", "gone"]).violations == [
        "no code found in k.so for core PrimFuncs ['gone']"]


VADDPS_ZMM = bytes.fromhex("62f16c4858d9")  # vaddps %zmm1,%zmm2,%zmm3


def plant_float(so: Path, symbol: str) -> None:
    """Overwrite the first instructions of ``symbol`` in ``so`` (at least 6 bytes) with
    ``vaddps`` and one-byte nops: float code under a core symbol, in the file only."""
    dis = subprocess.run(["objdump", "-d", "--insn-width=16", f"--disassemble={symbol}",
                          str(so)], check=True, capture_output=True, text=True).stdout
    insns = [line.split("\t") for line in dis.splitlines() if re.match(r"^ +[0-9a-f]+:\t", line)]
    start, size = int(insns[0][0].strip(" :"), 16), 0
    for ins in insns:
        size += len(ins[1].split())
        if size >= len(VADDPS_ZMM):
            break
    head = subprocess.run(["objdump", "-h", str(so)], check=True, capture_output=True,
                          text=True).stdout
    text = next(line.split() for line in head.splitlines() if " .text " in line)
    offset = start - int(text[3], 16) + int(text[5], 16)  # VMA -> file offset
    blob = bytearray(so.read_bytes())
    blob[offset:offset + size] = VADDPS_ZMM + b"\x90" * (size - len(VADDPS_ZMM))
    so.write_bytes(bytes(blob))


@pytest.mark.tvm
@needs_cc
def test_compile_refuses_float_code_only_in_the_shipped_library(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-memory module is clean, so the build's own scans pass; the exported
    module.so gets a float instruction planted at a core conv's entry, and compile
    refuses it naming the function, writing nothing."""
    from tests.helpers.kitchen_sink import kitchen_sink_model
    from tests.helpers.onnx_builders import save
    from qcompile import api
    from qcompile.config import FidelitySpec

    export = tvm.runtime.Executable.export_library
    planted: list[str] = []

    def export_and_plant(self, path, *args, **kwargs):
        out = export(self, path, *args, **kwargs)
        syms = subprocess.run(["nm", str(path)], check=True, capture_output=True,
                              text=True).stdout.split()
        planted.append(next(s for s in syms if s.startswith("__tvm_ffi_") and "conv" in s))
        plant_float(Path(path), planted[0])
        return out

    monkeypatch.setattr(tvm.runtime.Executable, "export_library", export_and_plant)
    model = save(kitchen_sink_model(), tmp_path)
    with pytest.raises(BuildError, match="exported module.so.*float arithmetic: vaddps"):
        api.compile_model(model, tmp_path / "art", progress=False, verify=0,
                          fidelity=FidelitySpec(samples=0))
    assert planted and not (tmp_path / "art").exists()
