"""latency: layer descriptions, measured tables, the cache, and the overhead fit.

Timings are noisy on the shared 2-core machine, so tests check that times exist and
are positive, never how they compare. Every test uses a cache under ``tmp_path``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from tests.helpers.onnx_builders import conv_node, init, make_model, rng, save
from tests.helpers.x86_kernel_helpers import DENSE_U8
import tvm_ffi
from tvm import tirx

from qcompile.mixed import latency as L
from qcompile.build.compile import build
from qcompile.config import QuantSpec
from qcompile.errors import UsageError
from qcompile.ir.graph import Graph, Node
from qcompile.lower.emit import lower
from qcompile.ir.qgraph import QGraph
from qcompile.targets.x86.lowering import x86_rules
from qcompile.hw.facts import cpu_flags
from qcompile.hw.backends import make_target
from qcompile.frontend.onnx_import import import_onnx, load_model
from qcompile.frontend.prepare import prepare
from qcompile.quant.quantize import calibration_tensors, quantize_graph
from tests.ops.test_ops import CASES as OPS_CASES

REPEAT = 5  # samples per layer: enough for a median, keeps the file fast
_REAL_COMPILE = L._compile


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path / "cache"))


def _graph(model: onnx.ModelProto, tmp_path: Path) -> Graph:
    return prepare(import_onnx(load_model(save(model, tmp_path)), batch=1))


def _chain_model() -> onnx.ModelProto:
    """x -> conv+relu -> maxpool -> conv -> conv+relu -> flatten -> gemm -> y."""
    r, inits = rng(1), []
    w = lambda o, i: r.normal(0, 0.3, (o, i, 3, 3))  # noqa: E731
    inits += [init("fc_w", r.normal(0, 0.3, (5, 8 * 4 * 4))), init("fc_b", r.normal(size=5))]
    nodes = [conv_node("c1", "x", "a", w(8, 3), r.normal(size=8), inits, pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["ar"], name="r1"),
             helper.make_node("MaxPool", ["ar"], ["p"], name="mp", kernel_shape=[2, 2],
                              strides=[2, 2]),
             conv_node("c2", "p", "b", w(8, 8), None, inits, pads=[1] * 4),
             conv_node("c3", "b", "c", w(8, 8), None, inits, pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["cr"], name="r3"),
             helper.make_node("Flatten", ["cr"], ["f"], name="flat", axis=1),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc", transB=1)]
    return make_model(nodes, inits, [1, 3, 8, 8])


def _dup_model(group: int = 1) -> onnx.ModelProto:
    """Three conv+relu layers; the last two have identical shapes and dtypes."""
    r, inits, nodes = rng(2), [], []
    for k, (x, y, cin) in enumerate([("x", "a", 4), ("ar", "b", 8), ("br", "c", 8)]):
        nodes.append(conv_node(f"c{k}", x, y, r.normal(0, .3, (8, cin // group, 3, 3)), None,
                               inits, pads=[1] * 4, group=group))
        nodes.append(helper.make_node("Relu", [y], [y + "r" if k < 2 else "y"], name=f"r{k}"))
    return make_model(nodes, inits, [1, 4, 6, 6])


def _counting_compile(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []

    def counted(mod, target):  # type: ignore[no-untyped-def]
        calls.append(1)
        return _REAL_COMPILE(mod, target)
    monkeypatch.setattr(L, "_compile", counted)
    return calls


def _fail_compile(mod, target):  # type: ignore[no-untyped-def]
    raise AssertionError("compiled although every layer was cached")


TARGET = make_target("llvm")


def _io(t: L.TimedKernel) -> tuple[tuple[int, ...], str, tuple[int, ...], str]:
    """(input shape, input dtype, output shape, output dtype) of a timed kernel."""
    sig = t.signature()
    return (*sig[0], *sig[-1])


# ----------------------------------------------------------------------------- what is timed
@pytest.mark.unit
def test_dtypes_and_shapes_traced(tmp_path: Path) -> None:
    timed = L.timed_kernels(_graph(_chain_model(), tmp_path), TARGET, batch=2)
    assert list(timed) == ["c1", "c2", "c3", "fc"]
    c1, c2, c3, fc = timed.values()
    assert _io(c1) == ((2, 8, 8, 3), "int8", (2, 8, 8, 8), "uint8")  # graph input is int8
    assert _io(c2)[1::2] == ("uint8", "int8")    # relu traced through maxpool
    assert _io(c3)[1::2] == ("int8", "uint8")    # no act before it
    assert c2.signature()[0][0] == (2, 4, 4, 8)  # NHWC at batch 2
    assert _io(fc) == ((2, 128), "uint8", (2, 5), "int32")  # logits keep the accumulator
    assert (c1.kernel, fc.kernel) == ("conv2d_nhwc_vnni", DENSE_U8)  # AMX where granted
    assert c1.args[0] is None and c1.args[-1] is None  # activation in, output out
    assert all(isinstance(a, np.ndarray) for a in c1.args[1:-1])  # the model's own arrays


@pytest.mark.unit
def test_cache_key_is_the_timed_function(tmp_path: Path) -> None:
    """Layers whose kernels are the same function share a key, whatever their names."""
    c0, c1, c2 = L.timed_kernels(_graph(_dup_model(), tmp_path), TARGET).values()
    assert c1.key == c2.key != c0.key and c1.layer != c2.layer
    key = L.cache_key("llvm -threads=2", c1, 1)
    assert key == f"llvm -threads=2|{c1.key}|n1" and c1.key.startswith(c1.kernel + ":")


@pytest.mark.tvm
def test_timed_kernel_is_the_compiled_kernel(tmp_path: Path) -> None:
    """The table times the very function ``compile`` builds for each layer (structurally
    equal PrimFunc), with the model's own parameters, at 8 and at 4 bits."""
    g = _graph(_chain_model(), tmp_path)
    stats = {t: Unit() for t in calibration_tensors(g)}
    for bits, pair in ((8, "w8a8"), (4, "w4a8")):
        qg = quantize_graph(g, stats, QuantSpec(bits=pair, first_last_bits=pair))
        low = lower(qg, x86_rules(1), batch=1)
        compiled = build(low.mod, TARGET).lowered
        timed = L.timed_kernels(g, TARGET, bits)
        kernels = {layer: f for f, layer in low.funcs.items() if layer in timed}
        assert set(kernels) == set(timed) == {"c1", "c2", "c3", "fc"}
        for layer, fname in kernels.items():
            want = compiled[fname].with_attr("global_symbol", "main")
            assert tvm_ffi.structural_equal(timed[layer].mod["main"], want), (bits, layer)
            got = [a for a in timed[layer].args if a is not None]
            assert got and all(any(np.array_equal(a, v) for _, v in low.params) for a in got)


@pytest.mark.tvm
def test_generic_layer_is_the_compiled_generic_function(tmp_path: Path) -> None:
    """A layer no kernel serves is timed as its generic lowering, scheduled as the model's
    own generic functions are: every PrimFunc timed for it is one the model compiles."""
    g = _graph(_dup_model(group=4), tmp_path)
    stats = {t: Unit() for t in calibration_tensors(g)}
    low = lower(quantize_graph(g, stats, QuantSpec()), x86_rules(1), batch=1)
    model = [f for _, f in build(low.mod, TARGET).lowered.functions_items()
             if isinstance(f, tirx.PrimFunc)]
    timed = L.timed_kernels(g, TARGET, 8)
    assert {t.kernel for t in timed.values()} == {L.GENERIC}
    for layer in ("c1", "c2"):  # c0 reads the transposed model input (fused differently)
        built = build(timed[layer].mod, TARGET, checked=False).lowered
        funcs = [f for _, f in built.functions_items() if isinstance(f, tirx.PrimFunc)]
        assert funcs and all(any(tvm_ffi.structural_equal(f, m) for m in model)
                             for f in funcs), layer


# ----------------------------------------------------------------------------- measuring
@pytest.mark.tvm
def test_measure_dedupes_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = _graph(_dup_model(), tmp_path)
    cache = tmp_path / "lat.json"
    calls = _counting_compile(monkeypatch)
    table = L.measure_layers(g, "llvm", bits=(4, 8), cache=cache, repeat=REPEAT, progress=False)
    n = len(calls)  # 3 layers, 2 unique functions per bit width (fewer if widths coincide)
    assert 2 <= n <= 4
    c0, c1, c2 = table.ms
    assert table.ms[c1] == table.ms[c2]  # one measurement serves both
    assert all(ms > 0 for per in table.ms.values() for ms in per.values())
    assert table.measured and table.batch == 1 and table.threads >= 1
    assert table.target.startswith("llvm") and f"-threads={table.threads}" in table.target
    assert all(set(per) == {4, 8} for per in table.ms.values())

    data = json.loads(cache.read_text())
    assert data["format"] == L.CACHE_FORMAT and len(data["entries"]) == n
    entry = next(iter(data["entries"].values()))
    assert entry["ms"] > 0 and entry["fingerprint"] == L.fingerprint() and entry["kernel"]
    assert 0 < entry["min_ms"] <= entry["ms"] and entry["samples"] >= REPEAT

    # Second call: everything is cached, nothing compiles, the same table comes back.
    monkeypatch.setattr(L, "_compile", _fail_compile)
    again = L.measure_layers(g, "llvm", cache=cache, repeat=REPEAT, progress=False)
    assert again == table

    # force=True, or a changed kernel fingerprint, re-measures.
    calls = _counting_compile(monkeypatch)
    L.measure_layers(g, "llvm", bits=(8,), cache=cache, repeat=REPEAT, force=True, progress=False)
    assert len(calls) == 2
    monkeypatch.setattr(L, "fingerprint", lambda: "edited-kernels")
    L.measure_layers(g, "llvm", bits=(8,), cache=cache, repeat=REPEAT, progress=False)
    assert len(calls) == 4


@pytest.mark.tvm
def test_default_cache_and_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert L.default_cache_path() == tmp_path / "cache" / "latency.json"
    g = _graph(_dup_model(), tmp_path)
    L.measure_layers(g, bits=(8,), repeat=REPEAT, progress=False)  # cache=True: the default
    assert len(json.loads(L.default_cache_path().read_text())["entries"]) == 2
    calls = _counting_compile(monkeypatch)
    L.measure_layers(g, bits=(8,), cache=None, repeat=REPEAT, progress=False)
    assert len(calls) == 2  # no cache: measured again


@pytest.mark.tvm
def test_corrupt_cache_is_ignored_and_rewritten(tmp_path: Path) -> None:
    cache = tmp_path / "lat.json"
    cache.write_text('{"format": 1, "entries": {')
    g = _graph(_dup_model(), tmp_path)
    table = L.measure_layers(g, bits=(8,), cache=cache, repeat=REPEAT, progress=False)
    assert len(json.loads(cache.read_text())["entries"]) == 2 and table.ms


@pytest.mark.tvm
def test_generic_fallback_for_grouped_conv(tmp_path: Path) -> None:
    # group=4 with 4 or 8 input channels: 1 or 2 per group, too few for the grouped VNNI
    # kernel (a multiple of 4 per group), and not depthwise: no kernel applies.
    table = L.measure_layers(_graph(_dup_model(group=4), tmp_path), bits=(8,), cache=None,
                             repeat=REPEAT, progress=False)
    assert {per[8] for per in table.kernels.values()} == {L.GENERIC}
    assert all(per[8] > 0 for per in table.ms.values())


@pytest.mark.tvm
def test_four_bit_layers(tmp_path: Path) -> None:
    """4 bits is the target's 4-bit pair (llvm: W4A8), on the int4 kernels where the CPU
    has them (GFNI), else on the int8 ones, which then serve both widths."""
    cache = tmp_path / "lat.json"
    g = _graph(_dup_model(), tmp_path)
    table = L.measure_layers(g, bits=(4, 8), cache=cache, repeat=REPEAT, progress=False)
    assert all(set(per) == {4, 8} and min(per.values()) > 0 for per in table.ms.values())
    four = {per[4] for per in table.kernels.values()}
    assert four == ({"conv2d_nhwc_vnni_int4"} if "gfni" in cpu_flags() else {"conv2d_nhwc_vnni"})
    assert L.quantized_graph(g, TARGET, 4).nodes[1].attrs["bits"] == 4
    assert L.timed_kernels(g, TARGET, 2) == {}  # no 2-bit pair on this target


@pytest.mark.unit
def test_cuda_target_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="CPU target"):
        L.measure_layers(_graph(_dup_model(), tmp_path), "cuda", cache=None, progress=False)


# ----------------------------------------------------------------------------- the table
def _table() -> L.LatencyTable:
    return L.LatencyTable({"a": {4: 0.5, 8: 1.0}, "b": {4: 1.5, 8: 2.0}, "c": {8: 3.0}},
                          "llvm -mcpu=x -threads=2", 1, 2,
                          kernels={"a": {4: "k", 8: "k"}, "b": {4: "k", 8: "k"},
                                   "c": {4: L.UNAVAILABLE, 8: L.GENERIC}})


@pytest.mark.unit
def test_table_total_and_json() -> None:
    t = _table()
    assert t.total({"a": 4, "b": 8, "c": 8}) == pytest.approx(5.5)
    assert t.total(L.uniform_plan(t, 8)) == pytest.approx(6.0)
    assert t.total({"a": 4}, default=8) == pytest.approx(5.5)
    with pytest.raises(KeyError, match="'b'"):
        t.total({"a": 4, "c": 8})
    with pytest.raises(KeyError, match="unavailable"):
        t.total(L.uniform_plan(t, 4))
    assert t.bits("a") == (4, 8) and t.bits("c") == (8,)
    back = L.LatencyTable.from_json(json.loads(json.dumps(t.to_json())))
    assert back == t


@pytest.mark.unit
def test_overhead_and_report_rows() -> None:
    t = _table()
    plan = L.uniform_plan(t, 8)
    assert L.fit_overhead(t, plan, 10.0) == pytest.approx(4.0)
    assert L.fit_overhead(t, plan, 5.0) == pytest.approx(-1.0)  # may overshoot; kept signed
    row = L.comparison_row("tiny", t, plan, 10.0)
    assert row == {"model": "tiny", "layers": 3, "sum_layers_ms": 6.0, "model_ms": 10.0,
                   "overhead_ms": 4.0, "layers_share": 0.6}
    md = L.rows_markdown([row])
    assert md.splitlines()[0].startswith("| model | layers |") and "| tiny | 3 |" in md


# ----------------------------------------------------------------------------- new ops
class Unit:
    def threshold(self, signed: bool, bits: int) -> float:
        return 1.0


def _dtype(g: Graph, tensor: str) -> str:
    return L.quantized_graph(g, TARGET, 8).tensors[tensor].qtype.dtype


def timed_output(qg: QGraph, layer: str) -> str:
    """The tensor a layer's kernel writes: its own output, or the last one of the chain
    a rule fused into its epilogue (a kernel's output dtype is that tensor's)."""
    node = next(n for n in qg.nodes if n.name == layer)
    out = node.output
    while True:
        users = [n for n in qg.nodes if out in n.inputs]
        if len(users) != 1 or users[0].op not in ("qadd", "clip", "lut"):
            return out
        out = users[0].output


def _ops_graph(case: str) -> Graph:
    """The canonical graph of one of test_ops' tiny models."""
    nodes, inits, shape, opset = OPS_CASES[case][0]()
    return prepare(import_onnx(make_model(nodes, inits, shape, opset=opset), batch=1))


@pytest.mark.unit
def test_latency_dtypes_are_the_quantizers() -> None:
    """Every layer's in/out dtype is that of the quantized tensors (lut, mul, add ...)."""
    for case in ("squeeze_excite", "silu_prelu", "add_sub_sum", "affine", "reductions"):
        g = _ops_graph(case)
        qg = quantize_graph(g, {t: Unit() for t in calibration_tensors(g)})
        timed = L.timed_kernels(g, TARGET)
        for n in g.nodes:
            if n.op in ("conv", "dense") and timed[n.name].kernel != L.GENERIC:
                _, dtype, _, out = _io(timed[n.name])
                assert dtype == qg.tensors[n.inputs[0]].qtype.dtype, (case, n.name)
                assert out == qg.tensors[timed_output(qg, n.name)].qtype.dtype, (case, n.name)
    # SiLU's output is signed (x * sigmoid(x) < 0 for x < 0): the next conv reads int8
    g = _ops_graph("silu_prelu")
    assert _dtype(g, "silu") == "int8" and _io(L.timed_kernels(g, TARGET)["d"])[1] == "int8"
    # HardSigmoid >= 0 times relu >= 0: the excite product is unsigned
    g = _ops_graph("squeeze_excite")
    assert _dtype(g, "hs") == "uint8" and _dtype(g, "y") == "uint8"


@pytest.mark.unit
def test_lut_dtype_follows_calibrated_range() -> None:
    """Cos is >= 0 on [-1, 1] but not on [-4, 4]: the stats decide the table's sign."""
    shape = (1, 2, 4, 4)
    g = Graph("x", shape, "z", (
        Node("lut", "cos", ("x",), "y", {"fn": "Cos", "fn_attrs": {}, "times_x": False,
                                          "act": None}),
        Node("conv", "c", ("y",), "z", {"strides": (1, 1), "pads": (0, 0, 0, 0),
                                        "dilations": (1, 1), "group": 1, "act": None},
             {"w": np.ones((2, 2, 1, 1), np.float32), "b": np.zeros(2, np.float32)})),
        {"x": shape, "y": shape, "z": shape})

    class T:
        def __init__(self, t: float) -> None:
            self.t = t

        def threshold(self, signed: bool, bits: int) -> float:
            return self.t
    def dtype(stats: dict | None) -> str:
        return L.quantized_graph(g, TARGET, 8, stats).tensors["y"].qtype.dtype
    assert dtype(None) == "uint8" and dtype({"x": T(4.0), "y": T(1.0)}) == "int8"
