"""INT4 and mixed plans: widths follow the HAWQ-V3 convention and stay bit-exact.

A layer's width applies to its weights and its input activation; a tensor's width is
that of the layers reading it; tensors that feed no layer stay 8-bit.
"""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from qcompile.verify import oracle
from qcompile.build.compile import build
from qcompile.config import QuantSpec
from qcompile.mixed.costs import tie_groups
from qcompile.lower.emit import lower
from qcompile.quant.quantize import quantize_graph
from qcompile.targets.x86.lowering import x86_rules
from qcompile.hw.backends import make_target
from tests.helpers.zoo_graphs import linspace_stats, zoo_graph


@pytest.fixture(scope="module")
def graph(tmp_path_factory: pytest.TempPathFactory):
    return zoo_graph("resnet18", tmp_path_factory.mktemp("r18"))


def _stats(g) -> dict:
    return linspace_stats(g)


def _random_plan(g, seed: int) -> dict[str, int]:
    """Random widths per tie group (readers of one tensor share bits)."""
    rng = np.random.default_rng(seed)
    return {name: b for grp in tie_groups(g) for b in [int(rng.choice([4, 8]))] for name in grp}


@pytest.mark.unit
def test_uniform_int4_widths(graph) -> None:
    qg = quantize_graph(graph, _stats(graph), QuantSpec(bits=4))
    layers = [n for n in qg.nodes if n.op in ("qconv", "qdense")]
    assert layers[0].attrs["bits"] == 8 and layers[-1].attrs["bits"] == 8  # first/last pinned
    assert qg.input.qtype.bits == 8
    for n in layers[1:-1]:
        assert n.attrs["bits"] == 4 and n.attrs["a_bits"] == 4, n.name
        assert np.abs(n.params["w"]).max() <= 7
        assert qg.tensors[n.inputs[0]].qtype.bits == 4
    # the pooled features feed only the 8-bit classifier
    assert qg.tensors[layers[-1].inputs[0]].qtype.bits == 8
    # residual sums that feed the next block's convs are 4-bit; unsigned after ReLU
    adds = [n for n in qg.nodes if n.op == "qadd"]
    assert any(qg.tensors[a.output].qtype.bits == 4 for a in adds)


@pytest.mark.unit
def test_readers_of_a_tensor_share_its_width(graph) -> None:
    plan = _random_plan(graph, 1)
    qg = quantize_graph(graph, _stats(graph), QuantSpec(), bits=plan)
    for t in [graph.input] + [n.output for n in graph.nodes]:
        # layers that read t's quantized tensor, directly or through maxpool/flatten/...
        readers = [n for n in graph.nodes
                   if n.op in ("conv", "dense") and graph.source_of(n.inputs[0]) == graph.source_of(t)]
        if readers and t in qg.tensors:
            assert {plan[r.name] for r in readers} == {qg.tensors[t].qtype.bits}, t


@pytest.mark.unit
def test_unknown_layer_in_plan_is_refused(graph) -> None:
    with pytest.raises(ValueError, match="unknown layers"):
        quantize_graph(graph, _stats(graph), QuantSpec(), bits={"no_such_conv": 4})


@pytest.mark.tvm
@pytest.mark.parametrize("plan,kernels", [("int4", True), ("mixed0", True), ("mixed1", False)])
def test_plans_bit_exact_on_cpu(graph, plan: str, kernels: bool) -> None:
    if plan == "int4":
        qg = quantize_graph(graph, _stats(graph), QuantSpec(bits=4))
    else:
        qg = quantize_graph(graph, _stats(graph), QuantSpec(), bits=_random_plan(graph, int(plan[-1])))
    low = lower(qg, x86_rules(2) if kernels else [], batch=2 if kernels else None)
    built = build(low.mod, make_target("llvm"))
    assert built.intcheck.ok, built.intcheck.violations[:3]
    vm = relax.VirtualMachine(built.executable, tvm.cpu())
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32) * 2
    q = oracle.quantize_input(qg, x)
    got = vm["core"](tvm.runtime.tensor(q), *[tvm.runtime.tensor(a) for _, a in low.params]).numpy()
    np.testing.assert_array_equal(got, oracle.run_integer(qg, q)["output"])
