"""CUDA rules and build (qcompile.targets.cuda.lowering) on a machine without a GPU.

ResNet-18 (zoo, 64x64, 10 classes) is lowered with the tensor-core rules, built for the T4
with nvcc at build time, and exported; the .so must carry an sm_75 fatbin whose conv and dense
kernels issue IMMA. Running it needs a GPU and is not tested here.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tvm

from qcompile.frontend import zoo
from qcompile.quant.calibrate import MinMaxObserver
from qcompile.config import QuantSpec
from qcompile.targets.cuda import tensor_core as ct
from qcompile.lower.emit import lower
from qcompile.frontend.onnx_import import import_onnx, load_model
from qcompile.frontend.prepare import prepare
from qcompile.quant.quantize import calibration_tensors, quantize_graph
from qcompile.build.compile import build_cuda
from qcompile.targets.cuda.lowering import cuda_rules
from qcompile.verify.cuda_tools import embedded_fatbins, sass_histogram
from qcompile.hw.backends import make_target
from tests.helpers.zoo_graphs import linspace_stats, zoo_graph

HAVE_NVCC = shutil.which("nvcc") is not None
HAVE_CUOBJDUMP = ct.tool_path("cuobjdump") is not None and ct.tool_path("nvdisasm") is not None
pytestmark = [pytest.mark.hardware, pytest.mark.skipif(
    not (HAVE_NVCC and HAVE_CUOBJDUMP),
    reason="needs nvcc (CUDA toolkit) and cuobjdump + nvdisasm "
           "(pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")]


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("r18")
    g = prepare(import_onnx(load_model(zoo.save(
        zoo.build("resnet18", input_size=64, num_classes=10), d / "resnet18.onnx"))))
    obs = {}
    for k, t in enumerate(calibration_tensors(g)):
        o = MinMaxObserver()
        o.update(np.linspace(-1 - k % 3, 2 + k % 3, 64))
        obs[t] = o
    qg = quantize_graph(g, obs)
    low = lower(qg, cuda_rules(1), batch=1)
    res = build_cuda(low.mod, make_target("cuda"))
    so = d / "resnet18_t4.so"
    res.built.executable.export_library(str(so))
    return qg, low, res, so


def test_conv_and_dense_use_the_tensor_core_rule(resnet18) -> None:
    qg, low, _, _ = resnet18
    heavy = [n.name for n in qg.nodes if n.op in ("qconv", "qdense")]
    assert len(heavy) == 21  # 20 convs (incl. 3 downsample) + fc
    want = {n.name: "cuda_dense_tc" if n.op == "qdense" else "cuda_conv_tc"
            for n in qg.nodes if n.op in ("qconv", "qdense")}
    assert {n: low.kernels[n] for n in heavy} == want


def test_core_stays_integer_only(resnet18) -> None:
    """No float and no division on data. The implicit-GEMM conv guards its im2col load with
    ``if_then_else(h = i // OW % OH ... in range, X[...], 0)``: intcheck treats that
    condition as control (index math), and the checked values as data."""
    rep = resnet18[2].built.intcheck
    assert rep.ok, rep.violations
    assert sum(f.startswith("conv2d_nhwc_tc_") for f in rep.prim_funcs) == 20
    # and the SASS nvcc made of every core kernel has no float opcode (asmcheck)
    assert rep.stages == ["core", "codegen", "sass"]
    assert rep.asm["kind"] == "sass" and rep.asm["ok"] and rep.asm["violations"] == []
    assert rep.asm["functions"] >= len(rep.prim_funcs) and rep.asm["instructions"] > 5000


def test_export_embeds_the_sm75_fatbin(resnet18) -> None:
    _, _, res, so = resnet18
    assert len(res.device.binaries) == 1
    fatbins = embedded_fatbins(so.read_bytes())
    assert fatbins == res.device.binaries  # the .so carries what nvcc produced, not source
    elf = subprocess.run([ct.tool_path("cuobjdump"), "-lelf", str(_write(so.parent, fatbins[0]))],
                         capture_output=True, text=True, check=True).stdout
    assert "sm_75" in elf, elf


def test_conv_and_dense_kernels_issue_imma(resnet18) -> None:
    hist = sass_histogram(resnet18[2].device.binaries[0])
    heavy = {k: v for k, v in hist.items() if k.startswith(("conv2d_nhwc_tc_", "dense_tc_"))}
    assert len(heavy) == 21, sorted(hist)
    for name, ops in heavy.items():
        imma = sum(c for op, c in ops.items() if op.startswith("IMMA.8816."))
        assert imma > 0, f"{name}: no IMMA.8816 ({ops})"
        assert not any(op.startswith("CALL") for op in ops), f"{name}: emulated ({ops})"
    # the stem conv sees the signed input; all later layers take post-ReLU u8
    assert "IMMA.8816.S8.S8" in hist["conv2d_nhwc_tc_conv1_kernel"]
    assert "IMMA.8816.U8.S8" in hist["conv2d_nhwc_tc_layer1_0_conv1_kernel"]


def test_exported_library_loads_without_nvcc_call(resnet18, monkeypatch) -> None:
    """Loading deserializes the binary; fmt 'cuda' would call tvm_callback_cuda_compile."""
    import tvm_ffi

    def refuse(_source: str) -> bytes:
        raise AssertionError("the loader tried to compile CUDA source")

    prev = tvm.get_global_func("tvm_callback_cuda_compile", allow_missing=True)
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", refuse, override=True)
    try:
        lib = tvm.runtime.load_module(str(resnet18[3]))
    finally:
        if prev is not None:
            tvm_ffi.register_global_func("tvm_callback_cuda_compile", prev, override=True)
    kinds, todo = [], [lib]
    while todo:
        m = todo.pop()
        kinds.append(m.kind)
        todo.extend(m.imports)
    assert "cuda" in kinds, kinds


def _write(d: Path, data: bytes) -> Path:
    p = d / "embedded.fatbin"
    p.write_bytes(data)
    return p


def test_int4_plan_kernels_issue_native_int4_imma(tmp_path: Path) -> None:
    """--bits 4 on the T4: every 4-bit layer (weights and input) is an IMMA.8832 kernel,
    with no sub-byte emulation CALL; the 8-bit stem stays IMMA.8816."""
    graph = zoo_graph("resnet18", tmp_path, input_size=64)
    qg = quantize_graph(graph, linspace_stats(graph), QuantSpec(bits=4))
    low = lower(qg, cuda_rules(1), batch=1)
    hist = sass_histogram(build_cuda(low.mod, make_target("cuda")).device.binaries[0])
    int4 = [f for f in low.funcs if low.mod[f].attrs.get("qcompile.int4", False)]
    assert len(int4) == 19  # 21 layers minus the 8-bit stem and classifier
    for f in int4:
        ops = hist[f + "_kernel"]
        assert any(op.startswith("IMMA.8832.") for op in ops), f"{f}: {ops}"
        assert not any(op.startswith("CALL") for op in ops), f"{f}: emulated ({ops})"
    assert "IMMA.8816.S8.S8" in hist["conv2d_nhwc_tc_conv1_kernel"]
