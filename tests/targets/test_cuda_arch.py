"""--target cuda --arch: the arch reaches the embedded fatbin, the manifest and `inspect`.

A tiny model (tests/kitchen_sink.py: stem conv, pointwise conv, depthwise, dense) is built
without a GPU at --bits 4 (W4A4 between the 8-bit first and last layers) for sm_75 and sm_90.
The pointwise conv is then the one int4 layer: native IMMA.8832 on the T4, emulated (a CALL
into ptxas' sub-byte mma helper) on the H100.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.helpers.kitchen_sink import kitchen_sink_model
from tests.helpers.onnx_builders import save
from qcompile import api
from qcompile.cli.main import main
from qcompile.config import QuantSpec
from qcompile.cli.inspect_artifact import inspect_artifact, tensor_core_math
from qcompile.targets.cuda import tensor_core as ct
from qcompile.verify.cuda_tools import elf_info
from qcompile.verify.cuda_tools import embedded_fatbins

HAVE_TOOLS = all((shutil.which("nvcc"), ct.tool_path("cuobjdump"), ct.tool_path("nvdisasm")))
needs_tools = pytest.mark.skipif(
    not HAVE_TOOLS, reason="needs nvcc (CUDA toolkit) and cuobjdump + nvdisasm "
                           "(pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")


@pytest.fixture(scope="module", params=["sm_75", "sm_90"])
def art(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HAVE_TOOLS:
        pytest.skip("needs nvcc, cuobjdump and nvdisasm")
    d = tmp_path_factory.mktemp("arch") / request.param
    d.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # synthetic calibration
        api.compile_model(save(kitchen_sink_model(), d), d / "art", target="cuda",
                          arch=request.param, quant=QuantSpec(bits=4), progress=False, verify=0)
    return d / "art"


def _arch(art: Path) -> str:
    return art.parent.name


@pytest.mark.hardware
@needs_tools
def test_fatbin_holds_code_for_the_arch_only(art: Path) -> None:
    arch = _arch(art)
    fatbins = embedded_fatbins((art / "module.so").read_bytes())
    assert len(fatbins) == 1
    assert elf_info(fatbins[0]).archs == {arch}
    (art.parent / "fatbin").write_bytes(fatbins[0])
    listing = subprocess.run([ct.tool_path("cuobjdump"), "-lelf", str(art.parent / "fatbin")],
                             capture_output=True, text=True, check=True).stdout
    assert f".{arch}.cubin" in listing, listing  # "ELF file 1: fatbin.1.sm_90.cubin"
    assert not any(f".{a}." in listing for a in ("sm_75", "sm_90") if a != arch), listing


@pytest.mark.hardware
@needs_tools
def test_manifest_and_costs_name_the_arch(art: Path) -> None:
    arch = _arch(art)
    gpu = {"sm_75": "NVIDIA T4", "sm_90": "NVIDIA H100 SXM"}[arch]
    m = json.loads((art / "manifest.json").read_text())
    assert m["target"]["arch"] == arch and m["target"]["gpu"] == gpu
    assert m["target"]["str"] == f"cuda -arch={arch} ({gpu}; {arch} fatbin embedded)"
    assert m["target"]["int4_tensor_cores"] == (arch == "sm_75")
    tc = {f: v for f, v in m["tensor_cores"].items()}
    assert tc["conv2d_nhwc_tc_pw"] == {"bits": 4, "mma": "m8n8k32", "native": arch == "sm_75"}
    assert tc["conv2d_nhwc_tc_stem"] == {"bits": 8, "mma": "m8n8k16", "native": True}
    c = json.loads((art / "qconfig.json").read_text())["costs"]
    assert c["gpu"] == gpu and gpu.removeprefix("NVIDIA ") in c["latency_label"]
    assert c["t4_label"] == "predicted (T4 roofline model)"


@pytest.mark.hardware
@needs_tools
def test_inspect_reports_native_or_emulated_tensor_cores(art: Path) -> None:
    arch = _arch(art)
    res = inspect_artifact(art)
    assert res["arch"] == arch and res["sass_archs"] == [arch]
    by_layer = {k["layer"]: k for k in res["kernels"] if k["layer"]}
    assert by_layer["stem"]["tensor_cores"] == by_layer["fc"]["tensor_cores"] == "native"
    assert by_layer["dw"]["tensor_cores"] == "-"  # depthwise runs on CUDA cores
    pw = by_layer["pw"]
    if arch == "sm_75":
        assert pw["tensor_cores"] == "native" and "IMMA.8832.U4.S4" in pw["hot"], pw["hot"]
    else:  # H100: int4 mma becomes CALLs into ptxas' helper, which runs int8 IMMA
        assert pw["tensor_cores"] == "emulated" and pw["hot"].get("CALL", 0) > 0, pw["hot"]
        assert not any(op.startswith("IMMA.8832") for op in pw["hot"])
    r = CliRunner().invoke(main, ["inspect", str(art), "--sass"])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if "conv2d_nhwc_tc_pw" in x)
    assert ("emulated" if arch == "sm_90" else "native") in line
    assert f"cuda -arch={arch}" in r.output.splitlines()[0]


@pytest.mark.unit
def test_tensor_core_math_rules() -> None:
    helper = ("$__internal_0_$__cuda_sm_9x_mma_sub_byte_internal_m8n8k32_u4_s4",)
    assert tensor_core_math({"CALL.REL.NOINC": 4, "IMMA.8816.U8.S8": 2}, helper, 4) == "emulated"
    assert tensor_core_math({"IMMA.8816.U8.S8": 8}, (), 4) == "emulated"  # 4-bit, no 4-bit IMMA
    assert tensor_core_math({"IMMA.8832.U4.S4": 8}, (), 4) == "native"
    assert tensor_core_math({"IMMA.8816.U8.S8": 8}, (), 8) == "native"
    assert tensor_core_math({"CALL.REL.NOINC": 1, "IMMA.8816.S8.S8": 8}, ("other",), 8) == "native"
    assert tensor_core_math({"LDG.E": 3}, (), None) == "-"
