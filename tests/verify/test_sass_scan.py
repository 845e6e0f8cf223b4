"""The CUDA build's second line of evidence: the SASS of the core's device kernels.

``asmcheck.scan_sass`` on hand-written ``cuobjdump -sass`` text (no toolchain needed), the
build's wiring (``schedule_cuda.record_sass``) with a planted float instruction, and a
real ``--target cuda`` compile whose manifest records the scan (needs nvcc + cuobjdump).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qcompile.verify import asmcheck
from qcompile.verify.asmcheck import classify_sass, scan_cuda_binaries, scan_sass
from qcompile.errors import BuildError
from qcompile.verify.intcheck import IntCheckReport
from qcompile.verify import cuda_tools

HAVE_TOOLS = (shutil.which("nvcc") is not None and cuda_tools.tool_path("cuobjdump") is not None
              and cuda_tools.tool_path("nvdisasm") is not None)
needs_toolchain = pytest.mark.skipif(
    not HAVE_TOOLS, reason="needs nvcc and cuobjdump + nvdisasm "
                           "(pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")


def _kernel(name: str, *ops: str) -> str:
    """cuobjdump -sass text of one kernel: each op on its own line, encoding after it."""
    lines = [f"\t\tFunction : {name}", "\t.headerflags\t@\"EF_CUDA_SM75 EF_CUDA_PTX_SM(EF_CUDA_SM75)\""]
    for i, op in enumerate(ops):
        lines.append(f"        /*{16 * i:04x}*/                   {op} ;"
                     f"                    /* 0x000fe20000000f00 */")
        lines.append("                                                      /* 0x000fc40000000f00 */")
    return "\n".join(lines) + "\n"


INTEGER_OPS = ("IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28]", "S2R R0, SR_TID.X",
               "IMMA.8816.U8.S8 R4, R8.ROW, R12.COL, R4", "@!P0 IADD3 R2, R2, 0x1, RZ",
               "LOP3.LUT R3, R3, 0xff, RZ, 0xc0, !PT", "SHF.R.S32.HI R5, RZ, 0x1f, R5",
               "ISETP.GE.AND P0, PT, R2, 0x7f, PT", "IMNMX R6, R6, 0x7f, PT", "SEL R7, R7, RZ, P0",
               "PRMT R8, R8, 0x7610, R8", "STG.E.U8.SYS [R2], R8", "EXIT", "BRA 0x1d0")


@pytest.mark.unit
@pytest.mark.parametrize("op", ["FFMA R1, R2, R3, R4", "@P0 FFMA.FTZ R1, R2, R3, R4",
                                "FFMA32I R1, R2, 0.5, R1", "FMUL R1, R2, 0.5", "FADD.FTZ R1, R2, R3",
                                "MUFU.RCP R1, R2", "I2F.U32.RP R1, R2", "F2I.FTZ.U32.TRUNC.NTZ R1, R2",
                                "FSETP.GT.AND P0, PT, R1, RZ, PT", "FMNMX R1, R2, R3, !PT",
                                "HFMA2.MMA R1, -RZ, RZ, 0, 0", "HADD2 R1, R2, R3", "DFMA R2, R4, R6, R2",
                                "DMUL R2, R4, R6", "HMMA.1688.F32 R4, R8, R12, R4",
                                "F2FP.PACK_AB R1, R2, R3"])
def test_float_instruction_in_a_core_kernel_is_flagged(op: str) -> None:
    sass = _kernel("dense_tc_fc_kernel", *INTEGER_OPS[:5], op, *INTEGER_OPS[5:])
    rep = scan_sass(sass, ["dense_tc_fc"])
    assert rep.scanned and not rep.ok
    assert rep.instructions == len(INTEGER_OPS) + 1  # encoding-only lines are not instructions
    (v,) = rep.violations
    assert v.startswith("dense_tc_fc_kernel: float instruction:") and op in v


@pytest.mark.unit
def test_integer_kernels_pass_and_boundary_kernels_are_not_scanned() -> None:
    """The boundary kernels are float by design (quantize's floor, softmax's exp): the scan
    restricted to the core skips them, and finds every core PrimFunc's kernels."""
    sass = (_kernel("conv2d_nhwc_tc_stem_kernel", *INTEGER_OPS)
            + _kernel("fused_add_clip_kernel_1", *INTEGER_OPS)
            + _kernel("fused_multiply5_add4_tir_floor_kernel", "FFMA.FTZ R1, R2, R3, R4",
                      "FRND.FTZ.FLOOR R1, R1", "F2I.FTZ.TRUNC.NTZ R1, R1")
            + _kernel("softmax_kernel", "MUFU.EX2 R1, R2", "FADD.FTZ R3, R3, R1"))
    core = ["conv2d_nhwc_tc_stem", "fused_add_clip"]
    rep = scan_sass(sass, core)
    assert rep.ok, rep.violations
    assert rep.functions == ["conv2d_nhwc_tc_stem_kernel", "fused_add_clip_kernel_1"]
    assert rep.instructions == 2 * len(INTEGER_OPS)
    assert len(scan_sass(sass).violations) == 5  # unrestricted: the boundary's floats count
    # a core PrimFunc with no kernel of its own is not silently skipped
    missing = scan_sass(sass, [*core, "fused_add"])
    assert not missing.ok and "fused_add" in missing.violations[-1]
    # a name that only starts like a core PrimFunc is not its kernel
    assert scan_sass(_kernel("fused_add_clip2_kernel", "FFMA R1, R2, R3, R4"),
                     ["fused_add_clip"]).violations == [
        "no device kernel found for core PrimFuncs ['fused_add_clip']"]


@pytest.mark.unit
def test_classify_sass_allow_list_is_empty() -> None:
    assert asmcheck.SASS_ALLOWED == frozenset()
    for op in ("IMMA.8832.U4.S4", "IMAD.WIDE.U32", "IADD3.X", "I2I.S8.S32.SAT", "LDSM.16.M88.4",
               "ISETP.NE.U32.AND", "SHFL.IDX", "BAR.SYNC", "LEA.HI.X", "POPC", "FLO.U32"):
        assert classify_sass(op) is None, op
    assert classify_sass("FSEL") and classify_sass("I2FP.F32.S32") and classify_sass("DSETP.GT.AND")


@pytest.mark.unit
def test_record_sass_fails_the_build_on_a_float_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wiring: build_cuda's record_sass turns a float opcode into an intcheck violation
    (compile raises BuildError on it) and records the scan like the x86 asm scan."""
    from qcompile.targets.cuda.lowering import record_sass

    sass = _kernel("k_kernel", *INTEGER_OPS[:3], "FFMA R1, R2, R3, R4")
    monkeypatch.setattr(cuda_tools, "sass_text", lambda _b: sass)
    monkeypatch.setattr(cuda_tools, "tool_path", lambda name: f"/fake/{name}")
    rep = IntCheckReport(prim_funcs=["k"], stores=1, stages=["core", "codegen"])
    assert rep.ok
    record_sass(rep, [b"fatbin"])
    assert not rep.ok and rep.stages == ["core", "codegen", "sass"]
    assert rep.violations == ["[sass] k_kernel: float instruction: "
                              "/*0030*/ FFMA R1, R2, R3, R4"]
    assert rep.asm["kind"] == "sass" and rep.asm["instructions"] == 4 and not rep.asm["ok"]


@pytest.mark.unit
def test_cuda_build_refused_without_cuobjdump(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without cuobjdump (a plain `pip install .`) the SASS scan was skipped without a word
    and the artifact still said integer_only: true. Now the build is refused in one line
    naming the extra that brings the tools; a scan that could not run fails the proof."""
    from qcompile.targets.cuda.lowering import record_sass

    monkeypatch.setattr(cuda_tools, "tool_path", lambda name: None)
    rep = scan_cuda_binaries([b"fatbin"], ["k"])
    assert not rep.scanned and rep.missing_tools == ("cuobjdump", "nvdisasm")
    ir = IntCheckReport(prim_funcs=["k"], stores=1, stages=["core", "codegen"])
    with pytest.raises(BuildError, match=r"^cuobjdump and nvdisasm not found: .*"
                                         r"pip install 'qcompile\[cuda\]'"):
        record_sass(ir, [b"fatbin"])
    monkeypatch.setattr(cuda_tools, "tool_path", lambda name: f"/fake/{name}")
    record_sass(ir, [])
    assert not ir.ok and ir.violations == ["[sass] not scanned: the build holds no device code: "
                                           "SASS not scanned"]


@pytest.mark.unit
def test_failed_tir_replay_fails_the_proof_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed replay of TVM's TIR pipeline on CUDA landed in a field nothing read."""
    from qcompile.verify import intcheck
    from qcompile.hw.backends import make_target

    def fail(*_args: object) -> None:
        raise RuntimeError("InjectSoftwarePipeline: Check failed")

    monkeypatch.setattr(intcheck, "check_codegen_tir", fail)
    monkeypatch.setattr(intcheck, "check_integer_only",
                        lambda *_a: IntCheckReport(prim_funcs=["k"], stores=1, stages=["core"]))
    rep = intcheck.full_check(None, make_target("cuda"))
    assert not rep.ok
    assert rep.violations == ["[codegen] TIR pipeline failed: InjectSoftwarePipeline: Check failed"]


@pytest.fixture(scope="module")
def cuda_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers.kitchen_sink import kitchen_sink_model
    from tests.helpers.onnx_builders import save

    return save(kitchen_sink_model(), tmp_path_factory.mktemp("cuda"))


def _compile_cuda(model: Path, out: Path) -> None:
    from qcompile import api
    from qcompile.config import FidelitySpec

    api.compile_model(model, out, progress=False, target="cuda", verify=0,
                      fidelity=FidelitySpec(samples=0))


@pytest.fixture(scope="module")
def cuda_art(cuda_model: Path) -> Path:
    _compile_cuda(cuda_model, cuda_model.parent / "ok")
    return cuda_model.parent / "ok"


@pytest.mark.hardware
@needs_toolchain
def test_cuda_compile_scans_sass_and_fails_on_planted_float(cuda_art: Path, cuda_model: Path,
                                                           tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A real --target cuda build (sm_75 with nvcc, no GPU needed): the manifest records
    the SASS scan of every core kernel, clean, at build time and again on the exported
    module.so (its host code and embedded fatbin); with an FFMA planted into one core
    kernel's disassembly the same build fails with the kernel named, and writes nothing."""
    from qcompile import api

    model = cuda_model
    m = json.loads((cuda_art / "manifest.json").read_text())
    scan = m["intcheck"]["asm"]
    assert m["intcheck"]["stages"] == ["core", "codegen", "sass"]
    assert scan["kind"] == "sass" and scan["ok"] and scan["violations"] == []
    assert scan["functions"] >= m["intcheck"]["prim_funcs"] and scan["instructions"] > 500
    shipped = m["intcheck"]["shipped"]
    assert shipped["ok"] and [s["kind"] for s in shipped["scans"]] == ["x86 module.so",
                                                                       "sass module.so"]
    assert all(s["ok"] and s["instructions"] > 500 for s in shipped["scans"])

    real = cuda_tools.sass_text

    def planted(binary: bytes) -> str:
        text = real(binary)
        head, sep, rest = text.partition("Function : dense_tc_fc_kernel")
        assert sep, "no dense_tc_fc kernel in the build"
        line = rest.index("/*0000*/")
        return (head + sep + rest[:line]
                + "/*0000*/ FFMA R1, R2, R3, R4 ; /* 0x0 */\n        " + rest[line:])

    monkeypatch.setattr(cuda_tools, "sass_text", planted)
    with pytest.raises(BuildError, match="dense_tc_fc_kernel: float instruction"):
        api.compile_model(model, tmp_path / "bad", progress=False, target="cuda", verify=0)
    assert not (tmp_path / "bad").exists()


FLOAT_KERNEL = """extern "C" __global__ void dense_tc_fc_kernel(float* a) {
    a[threadIdx.x] = a[threadIdx.x] * 0.5f + 1.0f;
}"""


@pytest.mark.hardware
@needs_toolchain
def test_compile_refuses_float_kernel_only_in_the_shipped_library(
        cuda_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The build's binaries are clean; the exported module.so gets a second fatbin holding
    a float kernel under a core kernel's name, and compile refuses it, writing nothing."""
    import tvm

    from qcompile.targets.cuda.lowering import nvcc_fatbin
    from qcompile.verify.shipcheck import scan_cuda_so

    fatbin = nvcc_fatbin(FLOAT_KERNEL, "sm_75")
    (tmp_path / "fake.so").write_bytes(b"\x7fELF" + bytes(60) + fatbin)
    rep = scan_cuda_so(tmp_path / "fake.so", ["dense_tc_fc"])
    assert rep.scanned and rep.violations
    assert all(v.startswith("dense_tc_fc_kernel: float instruction") for v in rep.violations)

    export = tvm.runtime.Executable.export_library

    def export_and_append(self, path, *args, **kwargs):
        out = export(self, path, *args, **kwargs)
        with open(path, "ab") as f:
            f.write(fatbin)
        return out

    monkeypatch.setattr(tvm.runtime.Executable, "export_library", export_and_append)
    with pytest.raises(BuildError, match=r"exported module.so.*\[shipped sass module.so\] "
                                         r"dense_tc_fc_kernel: float instruction"):
        _compile_cuda(cuda_model, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


@pytest.mark.hardware
@needs_toolchain
def test_inspect_without_cuobjdump_says_so_in_one_line(cuda_art: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`qcompile inspect --sass` without cuobjdump exited 70 ("internal error:
    FileNotFoundError"); now one line naming the package, exit 9 (DeviceError)."""
    from click.testing import CliRunner

    from qcompile.cli.main import main

    monkeypatch.setattr(cuda_tools, "tool_path", lambda name: None)
    r = CliRunner().invoke(main, ["inspect", str(cuda_art), "--sass"])
    assert r.exit_code == 9, r.output
    (line,) = r.output.strip().splitlines()
    assert "cuobjdump and nvdisasm not found" in line and "qcompile[cuda]" in line
