"""Mixed precision on graphs with the newer canonical ops (add with signs, mul, affine,
lut, gap sum/keepdims, lrn, pad, transpose, slice, gather, general reshape).

- ``canonical_onnx`` (the KL method's export) equals onnxruntime on the original model
  for every tiny model of ``test_ops``;
- the float Relax module (the Hessian's) equals onnxruntime too, and every table
  function equals ``activations.evaluate``; ops without a gradient are refused and
  ``compute_sensitivity`` falls back to kl with one warning;
- a squeeze-excitation + HardSwish + residual Sub model compiles under
  ``--budget-size 0.5`` with both sensitivity methods, bit-exact.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from onnx import helper, numpy_helper

from tests.helpers.onnx_builders import conv_node, init, make_model, rng, run_ort, save
from qcompile import api
from qcompile.mixed import sensitivity as S
from qcompile.ops.activations import NO_GRADIENT_FUNCTIONS, TIMES_X, UNARY_FUNCTIONS, evaluate
from qcompile.config import AllocSpec, CalibSpec
from qcompile.errors import DataError, UnsupportedOpError
from qcompile.ir.graph import Graph, Node
from qcompile.frontend.onnx_import import import_onnx
from qcompile.frontend.prepare import prepare
from qcompile.mixed.float_model import FloatVM, build_float_module
from tests.ops.test_ops import CASES

N = 3


def _canonical(model: onnx.ModelProto) -> Graph:
    return prepare(import_onnx(model, batch=1, source="tiny"))


def _ort_per_sample(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The test_ops models have a static batch of 1."""
    return np.concatenate([run_ort(model, x[i:i + 1]) for i in range(len(x))])


def _case(name: str) -> tuple[onnx.ModelProto, Graph, np.ndarray]:
    nodes, inits, shape, opset = CASES[name][0]()
    model = make_model(nodes, inits, shape, opset=opset)
    g = _canonical(model)
    x = np.random.default_rng(5).normal(size=(N, *g.input_shape[1:])).astype(np.float32)
    return model, g, x


# ----------------------------------------------------------------------------- kl export
@pytest.mark.unit
@pytest.mark.parametrize("case", sorted(CASES))
def test_canonical_onnx_matches_original(case: str) -> None:
    model, g, x = _case(case)
    sess = ort.InferenceSession(S.canonical_onnx(g).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    feeds = {f"{n.name}::w": n.params["w"] for n in S.layer_nodes(g)}
    got = sess.run(None, {g.input: x, **feeds})[0]  # free batch: all samples at once
    np.testing.assert_allclose(got, _ort_per_sample(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.unit
def test_canonical_onnx_signs_and_negated_first_term() -> None:
    """add with signs (-1, 1, -1) and a clipped act; affine with a broadcast scale."""
    shape = (1, 2, 3, 3)
    r = rng(0)
    g = Graph("x", shape, "y", (
        Node("affine", "aff", ("x",), "a", {"act": None},
             {"scale": r.normal(size=(1, 2, 1, 3)).astype(np.float32),
              "shift": r.normal(size=(1, 1, 3, 1)).astype(np.float32)}),
        Node("add", "sum", ("x", "a", "x"), "y", {"signs": (-1, 1, -1), "act": (-0.5, 1.0)}),
    ), {"x": shape, "a": shape, "y": shape})
    x = r.normal(size=(4, 2, 3, 3)).astype(np.float32)
    sess = ort.InferenceSession(S.canonical_onnx(g).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    a = x * g.nodes[0].params["scale"] + g.nodes[0].params["shift"]
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], np.clip(-x + a - x, -0.5, 1.0),
                               rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- relax float
# The 25 s "luts" model is covered function by function below.
@pytest.mark.tvm
@pytest.mark.parametrize("case", sorted(set(CASES) - {"luts"}))
def test_relax_forward_matches_original(case: str) -> None:
    model, g, x = _case(case)
    vm = FloatVM(build_float_module(g, N, grad=False))
    np.testing.assert_allclose(vm.forward(x), _ort_per_sample(model, x), rtol=1e-5, atol=1e-5)


def _lut_graph(fns: list[tuple[str, dict, bool]], shape: tuple[int, ...]) -> Graph:
    nodes, outs = [], []
    for i, (fn, attrs, times_x) in enumerate(fns):
        params = {"slope": np.linspace(-0.5, 0.5, shape[1]).astype(np.float32)} \
            if fn == "PRelu" else {}
        nodes.append(Node("lut", f"f{i}_{fn}", ("x",), f"o{i}",
                          {"fn": fn, "fn_attrs": attrs, "times_x": times_x, "act": None}, params))
        outs.append(f"o{i}")
    cat = (shape[0], shape[1] * len(fns), *shape[2:])
    nodes.append(Node("concat", "cat", tuple(outs), "y", {"axis": 1}))
    return Graph("x", shape, "y", tuple(nodes), {"x": shape, "y": cat, **{o: shape for o in outs}})


@pytest.mark.tvm
def test_every_table_function_matches_its_definition() -> None:
    fns = [(f, {}, False) for f in sorted(UNARY_FUNCTIONS) if f not in NO_GRADIENT_FUNCTIONS]
    fns += [("PRelu", {}, False), ("Gelu", {"approximate": "tanh"}, False),
            ("Sigmoid", {}, True), ("HardSigmoid", {"alpha": 1 / 6}, True),
            ("LeakyRelu", {"alpha": 0.2}, False), ("Elu", {"alpha": 0.5}, False),
            ("Celu", {"alpha": 2.0}, False), ("Shrink", {"lambd": 0.3, "bias": 0.1}, False),
            ("ThresholdedRelu", {"alpha": 0.5}, False)]
    shape = (1, 2, 5, 5)
    g = _lut_graph(fns, shape)
    x = np.random.default_rng(0).normal(0, 2.5, size=(2, *shape[1:]))
    x[0, 0, 0, :3] = (0.0, 30.0, -30.0)  # the branch points and saturation
    vm = FloatVM(build_float_module(g, 2, grad=False, dtype="float64"))
    got = vm.forward(x).reshape(2, len(fns), *shape[1:])
    for i, (fn, attrs, times_x) in enumerate(fns):
        slope = g.nodes[i].params.get("slope")
        want = evaluate(fn, x, {**attrs, TIMES_X: times_x},
                        None if slope is None else slope.reshape(1, -1, 1, 1))
        # Erf and exact Gelu use Abramowitz-Stegun 7.1.26 (|error| < 1.5e-7)
        tol = 3e-7 if fn in ("Erf", "Gelu") and not attrs else 1e-12
        np.testing.assert_allclose(got[:, i], want, rtol=tol, atol=tol, equal_nan=True,
                                   err_msg=f"{fn} {attrs} times_x={times_x}")


def _head(model: onnx.ModelProto, classes: int = 5) -> onnx.ModelProto:
    """``model`` with a Gemm head (after gap + flatten on a 4-D output): 2-D logits."""
    nodes = []
    for n in model.graph.node:
        m = onnx.NodeProto()
        m.CopyFrom(n)
        m.output[:] = ["feat" if o == "y" else o for o in m.output]
        nodes.append(m)
    dims = next(v for v in model.graph.output if v.name == "y").type.tensor_type.shape.dim
    inits = list(model.graph.initializer) + [
        init("head_w", rng(9).normal(0, .5, (classes, dims[1].dim_value))),
        init("head_b", rng(9).normal(0, .1, classes))]
    feat = "feat"
    if len(dims) == 4:
        nodes += [helper.make_node("GlobalAveragePool", ["feat"], ["gp"]),
                  helper.make_node("Flatten", ["gp"], ["fl"])]
        feat = "fl"
    nodes.append(helper.make_node("Gemm", [feat, "head_w", "head_b"], ["y"], transB=1))
    in_shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return make_model(nodes, inits, in_shape, opset=model.opset_import[0].version)


@pytest.mark.tvm
@pytest.mark.parametrize("case", ["lrn", "pads", "silu_prelu", "squeeze_excite"] + [
    pytest.param(c, marks=pytest.mark.slow)
    for c in ("add_sub_sum", "affine", "shuffle_resize", "nhwc_transpose", "slices_and_shapes")])
def test_gradient_matches_finite_differences(case: str) -> None:
    """Relax's gradient through the new ops = central differences of its own loss."""
    model = _head(_case(case)[0])
    g = _canonical(model)
    x = np.random.default_rng(5).normal(size=(N, *g.input_shape[1:]))
    vm = FloatVM(build_float_module(g, N, dtype="float64"))
    labels, sw = np.array([0, 1, 4]), np.full(N, 1.0 / N)
    ws = [w.astype(np.float64) for w in vm.fm.weights]
    _, grads = vm.loss_and_grad(x, labels, sw, ws)
    r, h = np.random.default_rng(3), 1e-6
    for li, w in enumerate(ws):
        for i in r.choice(w.size, size=2, replace=False):
            plus, minus = [a.copy() for a in ws], [a.copy() for a in ws]
            plus[li].flat[i] += h
            minus[li].flat[i] -= h
            fd = (vm.loss_and_grad(x, labels, sw, plus)[0]
                  - vm.loss_and_grad(x, labels, sw, minus)[0]) / (2 * h)
            assert grads[li].flat[i] == pytest.approx(fd, rel=1e-4, abs=1e-8), (case, li, i)


# x -> conv c -> SiLU (lut, times_x) -> conv d -> PRelu (lut) -> gap -> Gemm head, mean
# softmax cross-entropy, written again below in float64 NumPy from the ONNX initializers.
# Its Hessian trace per layer is sum_i d2L/dw_i2 by second central differences of that
# loss itself: no Relax, no gradient, nothing the estimator computes.

def _conv_np(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """NCHW 3x3 conv, stride 1, pads 1 (test_ops' ``_conv``)."""
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = sliding_window_view(xp, w.shape[2:], axis=(2, 3))  # (n, c, h, w, 3, 3)
    return np.einsum("nchwij,ocij->nohw", win, w) + b.reshape(1, -1, 1, 1)


def _silu_prelu_head_np(p: dict[str, np.ndarray], x: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(logits, the PRelu's input) of ``_head(silu_prelu)``."""
    c = _conv_np(x, p["c_w"], p["c_b"])
    d = _conv_np(c / (1 + np.exp(-c)), p["d_w"], p["d_b"])
    f = np.where(d > 0, d, p["slope"][None] * d).mean(axis=(2, 3))
    return f @ p["head_w"].T + p["head_b"], d


def _mean_ce_np(z: np.ndarray, labels: np.ndarray) -> float:
    m = z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z - m).sum(axis=1)) + m[:, 0]
    return float(np.mean(lse - z[np.arange(len(z)), labels]))


def _second_difference_traces(p: dict[str, np.ndarray], x: np.ndarray, labels: np.ndarray,
                              names: tuple[str, ...], h: float) -> np.ndarray:
    """Tr(H_ll) = sum_i (L(w + h e_i) - 2 L(w) + L(w - h e_i)) / h^2 per weight ``names``,
    on the PRelu's linear piece: every step is checked to leave each PRelu input's sign."""
    def loss(q: dict[str, np.ndarray]) -> float:
        z, d = _silu_prelu_head_np(q, x)
        assert np.array_equal(d > 0, side), "a finite-difference step crossed the PRelu kink"
        return _mean_ce_np(z, labels)

    side = _silu_prelu_head_np(p, x)[1] > 0
    l0, out = loss(p), []
    for name in names:
        total = 0.0
        for i in range(p[name].size):
            plus, minus = dict(p), dict(p)
            plus[name], minus[name] = p[name].copy(), p[name].copy()
            plus[name].flat[i] += h
            minus[name].flat[i] -= h
            total += (loss(plus) - 2 * l0 + loss(minus)) / h ** 2
        out.append(total)
    return np.array(out)


@pytest.mark.tvm
def test_hessian_trace_with_a_lut_matches_exact() -> None:
    """Hutchinson on conv -> SiLU -> conv -> PRelu -> gap -> fc, and the finite-difference
    HVP it samples, agree with the trace of an independent float64 NumPy loss."""
    model = _head(_case("silu_prelu")[0], classes=3)
    g = _canonical(model)
    x = np.random.default_rng(7).normal(size=(4, *g.input_shape[1:])).astype(np.float32)
    assert any(n.op == "lut" and n.attrs["times_x"] for n in g.nodes)
    o = S.GradOracle(g, x, None, batch_size=4)
    p = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    names = ("c_w", "d_w", "head_w")
    # the NumPy model is the compiled one: same weights, same logits ...
    for w, name in zip(o.weights, names):
        np.testing.assert_array_equal(w, p[name])
    xd = x.astype(np.float64)
    logits = _silu_prelu_head_np(p, xd)[0]
    np.testing.assert_allclose(o.logits(), logits, rtol=1e-9, atol=1e-9)
    exact = _second_difference_traces(p, xd, logits.argmax(axis=1), names, h=1e-4)
    assert np.all(np.abs(exact) > 1e-3), exact
    # the estimator's own HVP summed over the basis (catches a wrong step, scale, sign)
    hvp = []
    for li, w in enumerate(o.weights):
        total = 0.0
        for i in range(w.size):
            v = [np.zeros(a.shape) for a in o.weights]
            v[li].flat[i] = 1.0
            total += o.hvp_blocks(v, central=True)[li].flat[i]
        hvp.append(total)
    np.testing.assert_allclose(hvp, exact, rtol=1e-4)
    tr, se, k = S.hutchinson(o, max_probes=2048, tol=0.02, seed=0, progress=False)
    rel = np.abs(tr - exact) / np.abs(exact)
    assert np.all(rel < 0.2), (tr, exact, se, k)
    assert np.all(np.abs(tr - exact) < 4 * se * np.abs(tr) + 1e-12), (tr, exact, se)


@pytest.mark.unit
def test_no_gradient_refused_then_kl_fallback(tmp_path: Path) -> None:
    model = _head(_case("squeeze_excite")[0])
    g = _canonical(model)
    i = next(k for k, n in enumerate(g.nodes) if n.op == "lut")
    n = g.nodes[i]
    bad = g.with_nodes(g.nodes[:i] + (n.with_(attrs={**n.attrs, "fn": "Round", "fn_attrs": {}}),)
                       + g.nodes[i + 1:])
    with pytest.raises(UnsupportedOpError, match=r"\(op lut\).*Round.*--sensitivity kl"):
        build_float_module(bad, 2)
    x = np.random.default_rng(0).normal(size=(2, *g.input_shape[1:])).astype(np.float32)
    mb = model.SerializeToString()
    with pytest.raises(UnsupportedOpError):
        S.compute_sensitivity(bad, mb, x, cache_dir=tmp_path, progress=False, fallback=False)
    with pytest.warns(UserWarning, match="hessian sensitivity refused.*Round.*using kl") as rec:
        s = S.compute_sensitivity(bad, mb, x, cache_dir=tmp_path, progress=False)
    assert len([w for w in rec if "hessian" in str(w.message)]) == 1
    assert "\n" not in str(rec[0].message)
    assert s.method == "kl" and set(s.omega) == {m.name for m in S.layer_nodes(bad)}


@pytest.mark.unit
def test_non_finite_sensitivity_is_a_clear_error(tmp_path: Path) -> None:
    """Log of a conv output that goes negative: NaN logits, no silent NaN Omega."""
    shape = (1, 2, 3, 3)
    conv_attrs = {"strides": (1, 1), "pads": (1, 1, 1, 1), "dilations": (1, 1), "group": 1,
                  "act": None}
    w = np.random.default_rng(0).normal(size=(2, 2, 3, 3)).astype(np.float32)
    g = Graph("x", shape, "y", (
        Node("conv", "c", ("x",), "c", conv_attrs, {"w": w, "b": np.zeros(2, np.float32)}),
        Node("lut", "log", ("c",), "y", {"fn": "Log", "fn_attrs": {}, "times_x": False,
                                         "act": None})),
        {"x": shape, "c": shape, "y": shape})
    x = np.random.default_rng(1).normal(size=(2, *shape[1:])).astype(np.float32)
    with pytest.raises(DataError, match="not finite.*'c'"):
        S.compute_sensitivity(g, b"log", x, method="kl", cache_dir=tmp_path, progress=False)


@pytest.mark.unit
def test_four_d_output_forward_only_and_hessian_refused() -> None:
    _, g, x = _case("lrn")
    fm = build_float_module(g, N, grad=False)
    assert "loss" not in [gv.name_hint for gv in fm.mod.functions]
    with pytest.raises(UnsupportedOpError, match="2-D .* logits"):
        build_float_module(g, N)


# ----------------------------------------------------------------------------- end to end
def se_hswish_sub_model(seed: int = 0) -> onnx.ModelProto:
    """conv + HardSwish -> conv + relu -> squeeze-excite (gap, 1x1 convs, HardSigmoid, Mul)
    -> residual Sub -> conv + x*HardSigmoid(x) -> gap -> fc(5)."""
    r = rng(seed)
    ins: list = []

    def conv(name: str, x: str, y: str, cin: int, cout: int, k: int = 3) -> onnx.NodeProto:
        return conv_node(name, x, y, r.normal(0, 0.5 / np.sqrt(cin * k), (cout, cin, k, k)),
                         r.normal(0, 0.1, cout), ins, pads=[k // 2] * 4)
    nodes = [
        conv("c1", "x", "c1o", 3, 8), helper.make_node("HardSwish", ["c1o"], ["h1"]),
        conv("c2", "h1", "c2o", 8, 8), helper.make_node("Relu", ["c2o"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["sq"]),
        conv("fc1", "sq", "f1", 8, 4, k=1), helper.make_node("Relu", ["f1"], ["f1r"]),
        conv("fc2", "f1r", "f2", 4, 8, k=1),
        helper.make_node("HardSigmoid", ["f2"], ["gate"], alpha=1 / 6),
        helper.make_node("Mul", ["r2", "gate"], ["se"], name="excite"),
        helper.make_node("Sub", ["se", "h1"], ["res"], name="residual_sub"),
        conv("c3", "res", "c3o", 8, 16),
        helper.make_node("HardSigmoid", ["c3o"], ["hs3"], alpha=1 / 6),
        helper.make_node("Mul", ["c3o", "hs3"], ["h3"], name="hswish3"),
        helper.make_node("GlobalAveragePool", ["h3"], ["g"]),
        helper.make_node("Flatten", ["g"], ["fl"]),
        helper.make_node("Gemm", ["fl", "fc_w", "fc_b"], ["y"], transB=1),
    ]
    ins += [init("fc_w", r.normal(0, 0.3, (5, 16))), init("fc_b", r.normal(0, 0.1, 5))]
    return make_model(nodes, ins, [1, 3, 8, 8])


@pytest.fixture(scope="module")
def se_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save(se_hswish_sub_model(), tmp_path_factory.mktemp("se"))


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "qc-cache"))


@pytest.mark.unit
def test_se_model_canonical_form(se_model: Path) -> None:
    g = _canonical(onnx.load(str(se_model)))
    ops = [n.op for n in g.nodes]
    assert ops.count("lut") == 3 and "mul" in ops
    assert any(n.op == "add" and tuple(n.attrs["signs"]) == (1, -1) for n in g.nodes)
    assert sum(n.op == "lut" and n.attrs["times_x"] for n in g.nodes) == 1


@pytest.mark.tvm
@pytest.mark.parametrize("method", ["hessian", "kl"])
def test_mixed_compile_bit_exact(se_model: Path, tmp_path: Path, method: str) -> None:
    art = tmp_path / "art"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback: hessian really ran
        warnings.filterwarnings("ignore", message=".*load average.*")
        warnings.filterwarnings("ignore", message=".*synthetic.*")
        api.compile_model(se_model, art, progress=False,
                          calib=CalibSpec(num_samples=8),
                          alloc=AllocSpec(size="0.5", sensitivity=method,
                                          sensitivity_samples=4))
    qconfig = json.loads((art / "qconfig.json").read_text())
    plan = qconfig["plan"]
    assert plan["sensitivity"]["method"] == method
    bits = {layer["name"]: layer["bits"] for layer in plan["layers"]}
    assert set(bits.values()) == {4, 8}, bits  # a real mix under a 0.5 size budget
    assert plan["size_mb"] <= plan["budgets"]["size_mb"] * (1 + 1e-9)
    ops = {n["op"] for n in qconfig["graph"]["nodes"]}
    assert {"lut", "qmul", "qadd"} <= ops
    with pytest.warns(UserWarning, match="synthetic"):
        ev = api.evaluate(se_model, art, num_samples=8, progress=False)
    assert ev.bit_exact, ev
