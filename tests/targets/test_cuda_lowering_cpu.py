"""The CUDA lowering (packing, int4 activation packing, kernel parameters) is bit-exact.

Without a GPU the scheduled tensor-core kernels cannot run, so the same rules lower to the
kernels' *unscheduled* computes (``cuda_rules(batch, schedule=False)``: same parameters,
layouts and nibble packing) and build for the CPU. The schedules themselves are checked by
their SASS here and bit-exact on a real GPU (``@pytest.mark.gpu`` in test_kernels_cuda.py).
"""
from __future__ import annotations


import numpy as np
import pytest
import tvm
from tvm import relax

from qcompile.verify import oracle
from qcompile.build.compile import build
from qcompile.config import QuantSpec
from qcompile.lower.emit import lower
from qcompile.quant.quantize import quantize_graph
from qcompile.targets.cuda.lowering import cuda_rules
from qcompile.hw.backends import make_target
from tests.helpers.zoo_graphs import linspace_stats, zoo_graph

pytestmark = pytest.mark.tvm

BATCH = 2


@pytest.fixture(scope="module")
def graph(tmp_path_factory: pytest.TempPathFactory):
    return zoo_graph("resnet18", tmp_path_factory.mktemp("r18"))


def _stats(g) -> dict:
    return linspace_stats(g)


def _mixed_plan(g) -> dict[str, int]:
    """Alternate 4/8 by residual stage, keeping each stage's readers of a tensor together."""
    return {n.name: 4 if n.name.startswith(("layer1", "layer3")) else 8
            for n in g.nodes if n.op in ("conv", "dense")}


@pytest.mark.parametrize("plan", ["int4", "mixed"])
def test_cuda_lowering_bit_exact_on_cpu(graph, plan: str) -> None:
    if plan == "int4":
        qg = quantize_graph(graph, _stats(graph), QuantSpec(bits=4))
    else:
        qg = quantize_graph(graph, _stats(graph), QuantSpec(), bits=_mixed_plan(graph))
    low = lower(qg, cuda_rules(BATCH, schedule=False), batch=BATCH)
    int4 = [f for f, layer in low.funcs.items()
            if low.mod[f].attrs.get("qcompile.int4", False)]
    assert int4, "no layer took the int4 tensor-core kernel"
    built = build(low.mod, make_target("llvm"))
    assert built.intcheck.ok, built.intcheck.violations[:3]
    vm = relax.VirtualMachine(built.executable, tvm.cpu())
    x = np.random.default_rng(0).normal(size=(BATCH, 3, 32, 32)).astype(np.float32)
    q = oracle.quantize_input(qg, x)
    args = [tvm.runtime.tensor(q)] + [tvm.runtime.tensor(a) for _, a in low.params]
    got = vm["core"](*args).numpy()
    np.testing.assert_array_equal(got, oracle.run_integer(qg, q)["output"])
