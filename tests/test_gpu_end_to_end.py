"""On a real GPU: zoo ResNet-18/50, INT8 / INT4 / mixed, compiled with the CUDA rules and run
end to end, bit-exact against the NumPy oracle (``@pytest.mark.gpu``; skipped with the
reason on machines without one). Built for the device's own arch: an sm_75 binary does not
load on newer GPUs, and on Hopper the int4 MMA is emulated (exact, but no T4 timing)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import tvm
from tvm import relax

from qcompile.verify import oracle
from qcompile.config import QuantSpec
from qcompile.lower.emit import lower
from qcompile.quant.quantize import quantize_graph
from qcompile.build.compile import build_cuda
from qcompile.targets.cuda.lowering import cuda_rules
from tests.helpers.zoo_graphs import linspace_stats, zoo_graph

pytestmark = [pytest.mark.hardware, pytest.mark.gpu]
BATCH = 8


def _device_arch() -> str:
    if not tvm.cuda().exist:
        pytest.skip("no CUDA GPU (tvm.cuda().exist is False)")
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is needed to build device code at build time")
    return "sm_" + tvm.cuda().compute_version.replace(".", "")


@pytest.mark.parametrize("model", ["resnet18", "resnet50"])
@pytest.mark.parametrize("bits", ["int8", "int4", "mixed"])
def test_zoo_bit_exact_on_gpu(model: str, bits: str, tmp_path) -> None:
    arch = _device_arch()
    g = zoo_graph(model, tmp_path, input_size=224, num_classes=1000)
    obs = linspace_stats(g)
    plan = None
    if bits == "mixed":
        plan = {n.name: 4 if n.name.startswith(("layer2", "layer4")) else 8
                for n in g.nodes if n.op in ("conv", "dense")}
    qg = quantize_graph(g, obs, QuantSpec(bits=4 if bits == "int4" else 8), bits=plan)
    low = lower(qg, cuda_rules(BATCH), batch=BATCH)
    target = tvm.target.Target.from_device(tvm.cuda())
    res = build_cuda(low.mod, tvm.target.Target(target, host="llvm"), arch=arch)
    dev = tvm.cuda()
    vm = relax.VirtualMachine(res.built.executable, dev)
    x = np.random.default_rng(0).normal(size=(BATCH, 3, 224, 224)).astype(np.float32)
    q = oracle.quantize_input(qg, x)
    args = [tvm.runtime.tensor(q, dev)] + [tvm.runtime.tensor(a, dev) for _, a in low.params]
    got = vm["core"](*args).numpy()
    np.testing.assert_array_equal(got, oracle.run_integer(qg, q)["output"])
