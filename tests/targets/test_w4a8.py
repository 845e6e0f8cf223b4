"""W4A8 as a per-layer precision: 4-bit weights, 8-bit input activations.

Bit-exact on the x86 kernels (packed nibbles, unpacked in-kernel), on TVM's generic
lowering and on the CUDA lowering's unscheduled computes; a plan may mix W8A8, W4A8 and
W4A4 layers."""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from qcompile.verify import oracle
from qcompile.build.compile import build
from qcompile.config import QuantSpec, precision, precision_name
from qcompile.errors import UsageError
from qcompile.lower.emit import lower
from qcompile.quant.quantize import layer_precisions, quantize_graph
from qcompile.targets.x86.lowering import x86_rules
from qcompile.targets.cuda.lowering import cuda_rules
from qcompile.hw.backends import make_target
from tests.helpers.zoo_graphs import linspace_stats, zoo_graph

BATCH = 2


@pytest.fixture(scope="module")
def graph(tmp_path_factory: pytest.TempPathFactory):
    return zoo_graph("resnet18", tmp_path_factory.mktemp("r18"))


@pytest.mark.unit
def test_precision_spellings() -> None:
    assert precision(8) == precision("8") == precision("w8a8") == (8, 8)
    assert precision(4) == (4, 4) and precision("W4A8") == (4, 8)
    assert precision_name(4) == "w4a4"
    for bad in ("w8a4", "w2a8", "8bit", 16):
        with pytest.raises(UsageError):
            precision(bad)


@pytest.mark.unit
def test_w4a8_quantizes_weights_only(graph) -> None:
    qg = quantize_graph(graph, linspace_stats(graph), QuantSpec(bits="w4a8"))
    layers = [n for n in qg.nodes if n.op in ("qconv", "qdense")]
    inner = layers[1:-1]
    assert all(n.attrs["bits"] == 4 and n.attrs["a_bits"] == 8 for n in inner)
    assert all(np.abs(n.params["w"]).max() <= 7 for n in inner)
    assert all(qg.tensors[t].qtype.bits == 8 for t in qg.tensors if qg.tensors[t].qtype.bits < 32)


def _mixed(g) -> dict[str, str]:
    """W4A4, W4A8 and W8A8 stages; readers of one tensor share an activation width."""
    names = [n.name for n in g.nodes if n.op in ("conv", "dense")]
    pick = {"layer1": "w4a4", "layer2": "w4a8", "layer3": "w4a8", "layer4": "w8a8"}
    return {n: next((p for k, p in pick.items() if n.startswith(k)), "w8a8") for n in names}


def _run(qg, rules, target: str = "llvm") -> None:
    low = lower(qg, rules, batch=BATCH if rules else None)
    built = build(low.mod, make_target(target))
    assert built.intcheck.ok, built.intcheck.violations[:3]
    vm = relax.VirtualMachine(built.executable, tvm.cpu())
    x = np.random.default_rng(0).normal(size=(BATCH, 3, 32, 32)).astype(np.float32)
    q = oracle.quantize_input(qg, x)
    args = [tvm.runtime.tensor(q)] + [tvm.runtime.tensor(a) for _, a in low.params]
    np.testing.assert_array_equal(vm["core"](*args).numpy(), oracle.run_integer(qg, q)["output"])
    return low


@pytest.mark.tvm
@pytest.mark.parametrize("plan,lowering", [("w4a8", "x86"), ("w4a8", "generic"),
                                           ("mixed", "x86"), ("mixed", "cuda_computes")])
def test_w4a8_bit_exact(graph, lowering: str, plan: str) -> None:
    stats = linspace_stats(graph)
    if plan == "w4a8":
        qg = quantize_graph(graph, stats, QuantSpec(bits="w4a8"))
    else:
        qg = quantize_graph(graph, stats, QuantSpec(), bits=_mixed(graph))
        prec = layer_precisions(graph, QuantSpec(), _mixed(graph))
        assert {precision_name(p) for p in prec.values()} == {"w4a4", "w4a8", "w8a8"}
    rules = {"x86": x86_rules(BATCH), "generic": [],
             "cuda_computes": cuda_rules(BATCH, schedule=False)}[lowering]
    low = _run(qg, rules)
    if lowering == "x86":
        int4 = [k for k in low.kernels.values() if k == "x86_vnni"]
        assert int4 and any("w_vnni16x4_int4" in name for name, _ in low.params)
