"""The rounding registry: one signature for every method, names in step with config and
the CLI, unknown names refused in one line, the sensitivity cache keys unchanged."""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from tests.helpers.onnx_builders import conv_node, make_model, rng
from qcompile import config
from qcompile.cli import main as cli_main
from qcompile.config import CalibSpec, QuantSpec
from qcompile.errors import UsageError
from qcompile.frontend.onnx_import import import_onnx
from qcompile.frontend.prepare import prepare
from qcompile.ir.graph import Graph, layer_nodes
from qcompile.mixed import sensitivity as S
from qcompile.quant.calibrate import collect_stats
from qcompile.quant.quantize import calibration_tensors, layer_bits, quantize_graph
from qcompile.quant.readers import gather_inputs, iter_inputs, make_reader
from qcompile.quant.rounding import ROUNDINGS, RoundGraph, Rounding, rounding_of
from qcompile.verify import oracle

pytestmark = pytest.mark.unit


def _model() -> tuple[object, Graph]:
    """conv -> relu -> depthwise conv -> relu -> 1x1 conv: three layers, 8x8 images."""
    r = rng(3)
    inits: list[TensorProto] = []
    nodes, t = [], "x"
    for name, cin, cout, k, group in (("a", 3, 6, 3, 1), ("dw", 6, 6, 3, 6), ("pw", 6, 4, 1, 1)):
        w = r.normal(0, 1, (cout, cin // group, k, k)) / np.sqrt(cin // group * k * k)
        nodes.append(conv_node(name, t, f"{name}_c", w, r.normal(0, 0.1, cout), inits,
                               group=group, pads=[k // 2] * 4))
        nodes.append(helper.make_node("Relu", [f"{name}_c"], [f"{name}_r"]))
        t = f"{name}_r"
    nodes.append(helper.make_node("Identity", [t], ["y"], name="out"))
    proto = make_model(nodes, inits, [1, 3, 8, 8])
    return proto, prepare(import_onnx(proto, batch=1))


def test_names_match_config_and_the_cli() -> None:
    """config (the ground floor) and the CLI keep the names; the registry the methods."""
    assert set(ROUNDINGS) == set(config.ROUNDINGS)
    assert all(isinstance(r, Rounding) and r.name == k for k, r in ROUNDINGS.items())
    opt = next(p for p in cli_main.compile_cmd.params if p.name == "rounding")
    assert set(opt.type.choices) == set(ROUNDINGS) | {config.AUTO}


@pytest.mark.parametrize("name", sorted(ROUNDINGS))
def test_every_method_has_the_shared_signature_and_runs(tmp_path: Path, name: str) -> None:
    want = inspect.signature(RoundGraph.__call__).parameters
    got = inspect.signature(ROUNDINGS[name].round_graph).parameters
    assert [(p.name, p.kind, p.default) for p in got.values()] == \
        [(p.name, p.kind, p.default) for p in list(want.values())[1:]]  # (less self)
    proto, graph = _model()
    (tmp_path / "calib").mkdir()
    np.save(tmp_path / "calib" / "x.npy", rng(0).normal(0, 1, (16, 3, 8, 8)).astype(np.float32))
    calib = CalibSpec(source=str(tmp_path / "calib"), method="minmax", num_samples=16)
    reader = make_reader(calib, graph.input, graph.input_shape)
    stats = collect_stats(proto, calibration_tensors(graph), reader, "minmax", calib)
    quant = QuantSpec(bits=4, rounding=name)
    bits = layer_bits(graph, quant)
    method = rounding_of(name)
    x = gather_inputs(reader, 16) if method.needs_data else None
    for sequential in (True, False):
        src, rounded = method.round_graph(graph, x, bits, sequential=sequential)
        assert [n.name for n in src.nodes] == [n.name for n in graph.nodes]
        if rounded is not None:  # layer -> (integers in the layer's layout, scale per channel)
            assert set(rounded) <= set(bits)
            for layer, (q, s) in rounded.items():
                w = next(n for n in graph.nodes if n.name == layer).params["w"]
                qmax = (1 << (bits[layer] - 1)) - 1
                assert q.shape == w.shape and s.shape == w.shape[:1]
                assert int(np.abs(q).max()) <= qmax
        qg = quantize_graph(src, stats, quant, rounded=rounded)
        y = oracle.run_integer(qg, oracle.quantize_input(qg, gather_inputs(reader, 2)))["output"]
        assert y.shape == (2, 4, 8, 8)


def test_nearest_reads_no_data_and_changes_nothing() -> None:
    _, graph = _model()
    near = rounding_of("nearest")
    assert not near.needs_data and not near.keyed
    assert near.round_graph(graph, None, {n.name: 4 for n in layer_nodes(graph)}) == (graph, None)
    assert rounding_of("gptq").needs_data


@pytest.mark.parametrize("call", [lambda: rounding_of("adaround"),
                                  lambda: QuantSpec(rounding="adaround")])
def test_unknown_method_is_one_line_naming_the_valid_ones(call: object) -> None:
    with pytest.raises(UsageError) as e:
        call()  # type: ignore[operator]
    msg = str(e.value)
    assert "\n" not in msg and "'adaround'" in msg
    assert all(repr(k) in msg for k in ROUNDINGS)


def test_sensitivity_cache_keys_are_the_ones_older_caches_hold(tmp_path: Path) -> None:
    """kl under nearest keys as before rounding was a setting, gptq with ``rounding``."""
    _, graph = _model()
    x = rng(1).normal(0, 1, (4, 3, 8, 8)).astype(np.float32)
    kw = dict(method="kl", bits=(4, 8), cache_dir=tmp_path, progress=False)
    for rounding, settings in (("nearest", {"method": "kl", "bits": [4, 8]}),
                               ("gptq", {"method": "kl", "bits": [4, 8], "rounding": "gptq"})):
        S.compute_sensitivity(graph, b"m", x, rounding=rounding, **kw)
        assert (tmp_path / f"{S._cache_key(b'm', x, None, settings)}.json").is_file()
    with pytest.raises(UsageError, match="--rounding must be one of"):
        S.compute_sensitivity(graph, b"m", x, rounding="adaround", **kw)


def test_readers_rewind_around_every_pass(tmp_path: Path) -> None:
    """gather_inputs and iter_inputs leave the reader at its first sample, also when a
    pass stops early."""
    (tmp_path / "c").mkdir()
    data = rng(2).normal(0, 1, (20, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "c" / "x.npy", data)
    reader = make_reader(CalibSpec(source=str(tmp_path / "c"), num_samples=20, batch_size=8),
                         "x", (1, 3, 8, 8))
    assert np.array_equal(gather_inputs(reader, 11), data[:11])
    assert np.array_equal(np.concatenate(list(iter_inputs(reader))), data)
    it = iter_inputs(reader)
    next(it)
    it.close()
    assert np.array_equal(gather_inputs(reader, 20), data)
