"""sensitivity: Hutchinson traces against an analytic Hessian trace, KL, Omega, cache."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from tests.helpers.onnx_builders import init, make_model, rng, run_ort
from qcompile.mixed import sensitivity as S
from qcompile.errors import DataError, UsageError
from qcompile.ir.graph import Graph
from qcompile.quant.quantize import quantize_weights
from tests.mixed.test_relax_float import branchy_cnn, canonical, tiny_cnn

N = 4
Case = tuple[onnx.ModelProto, Graph, np.ndarray]  # model, canonical graph, inputs
# Hutchinson vs the analytic trace: 4096 probes, every layer within 5% and within 4 of
# its own standard errors (the relative standard error is ~1% there: 5% is ~5 sigma).
TRACE_PROBES, TRACE_RTOL = 4096, 0.05


@pytest.fixture(scope="module")
def tiny() -> Case:
    model = tiny_cnn()
    g = canonical(model)
    x = np.random.default_rng(7).normal(size=(N, *g.input_shape[1:])).astype(np.float32)
    return model, g, x


@pytest.fixture(scope="module")
def oracle(tiny: Case) -> S.GradOracle:
    return S.GradOracle(tiny[1], tiny[2], None, batch_size=N)


def basis_traces(o: S.GradOracle, central: bool) -> np.ndarray:
    """Tr(H_ll) as sum_i e_i . H e_i, one finite-difference HVP per basis vector (the
    estimator's own HVP: a consistency check, not an independent truth)."""
    out = []
    for li, w in enumerate(o.weights):
        total = 0.0
        for i in range(w.size):
            v = [np.zeros(a.shape) for a in o.weights]
            v[li].flat[i] = 1.0
            total += o.hvp_blocks(v, central)[li].flat[i]
        out.append(total)
    return np.array(out)


@pytest.mark.tvm
def test_forward_and_central_differences_agree(oracle: S.GradOracle) -> None:
    fwd, cen = basis_traces(oracle, False), basis_traces(oracle, True)
    assert np.all(np.abs(cen) > 0)
    np.testing.assert_allclose(fwd, cen, rtol=1e-5)


# ---------------------------------------------------------------- an independent truth
# x (N,3,2,2) -> flatten -> z1 = W1 x + b1 -> h = relu(z1) -> z = W2 h + b2, loss = mean
# softmax cross-entropy. With A_n = diag(p_n) - p_n p_n^T (the CE Hessian in the logits,
# whatever the labels) and D_n = diag(z1_n > 0), on the current linear piece
#   H_W2 = mean_n A_n (x) h_n h_n^T                => Tr = mean_n tr(A_n) |h_n|^2
#   H_W1 = mean_n (W2 D_n)^T A_n (W2 D_n) (x) x_n x_n^T
#                                                  => Tr = mean_n sum_i D_n,ii (W2^T A_n W2)_ii |x_n|^2
# computed below in NumPy from the weights alone: no Relax, no finite differences.

def mlp_model(seed: int = 3) -> tuple[onnx.ModelProto, tuple[np.ndarray, ...]]:
    r = rng(seed)
    w1, b1, w2, b2 = (r.normal(0, s, shape).astype(np.float32)
                      for s, shape in ((.5, (6, 12)), (.1, 6), (.5, (4, 6)), (.1, 4)))
    nodes = [helper.make_node("Flatten", ["x"], ["f"]),
             helper.make_node("Gemm", ["f", "w1", "b1"], ["z1"], transB=1),
             helper.make_node("Relu", ["z1"], ["h"]),
             helper.make_node("Gemm", ["h", "w2", "b2"], ["y"], transB=1)]
    inits = [init("w1", w1), init("b1", b1), init("w2", w2), init("b2", b2)]
    return make_model(nodes, inits, ["N", 3, 2, 2]), (w1, b1, w2, b2)


def analytic_traces(params: tuple[np.ndarray, ...], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, [Tr H_W1, Tr H_W2]) of the mean cross-entropy, in float64 NumPy."""
    w1, b1, w2, b2 = (a.astype(np.float64) for a in params)
    xf = x.reshape(len(x), -1).astype(np.float64)
    z1 = xf @ w1.T + b1
    h = np.maximum(z1, 0.0)
    z = h @ w2.T + b2
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    t1 = t2 = 0.0
    for pn, hn, xn, dn in zip(p, h, xf, z1 > 0):
        a = np.diag(pn) - np.outer(pn, pn)
        t2 += np.trace(a) * hn @ hn
        t1 += float((np.diag(w2.T @ a @ w2) * dn).sum()) * xn @ xn
    return z, np.array([t1, t2]) / len(x)


@pytest.fixture(scope="module")
def mlp() -> tuple[S.GradOracle, np.ndarray]:
    model, params = mlp_model()
    x = np.random.default_rng(7).normal(size=(6, 3, 2, 2)).astype(np.float32)
    o = S.GradOracle(canonical(model), x, None, batch_size=6)
    logits, traces = analytic_traces(params, x)
    # the NumPy model is the compiled one (same weights, same logits) ...
    assert [w.shape for w in o.weights] == [(6, 12), (4, 6)]
    np.testing.assert_allclose(o.logits(), logits, rtol=1e-9, atol=1e-9)
    # ... and no ReLU sits on a kink the finite-difference step could cross
    assert np.abs(x.reshape(6, -1) @ params[0].T.astype(np.float64) + params[1]).min() > 1e-4
    return o, traces


@pytest.mark.tvm
def test_hvp_matches_analytic_hessian(mlp: tuple[S.GradOracle, np.ndarray]) -> None:
    """The finite-difference HVP the estimator uses, summed over the basis, is the
    analytic trace (this would catch a wrong step, a wrong loss scale or a sign)."""
    o, exact = mlp
    assert np.all(exact > 0)
    np.testing.assert_allclose(basis_traces(o, central=True), exact, rtol=1e-5)
    np.testing.assert_allclose(basis_traces(o, central=False), exact, rtol=1e-5)


@pytest.mark.tvm
def test_hutchinson_matches_analytic_trace(mlp: tuple[S.GradOracle, np.ndarray]) -> None:
    o, exact = mlp
    tr, se, k = S.hutchinson(o, max_probes=TRACE_PROBES, tol=0.001, seed=0, progress=False)
    assert k == TRACE_PROBES  # tol 0.1% is out of reach: ran to the cap
    rel = np.abs(tr - exact) / exact
    assert np.all(rel < TRACE_RTOL), (tr, exact)
    assert np.all(np.abs(tr - exact) < 4 * se * np.abs(tr)), (tr, exact, se)


@pytest.mark.tvm
def test_hutchinson_stops_at_tolerance(oracle: S.GradOracle) -> None:
    tr, se, k = S.hutchinson(oracle, max_probes=4096, tol=0.5, seed=1, progress=False)
    assert S.MIN_PROBES <= k < 4096
    assert np.all(se < 0.5)


@pytest.mark.unit
def test_fake_quant_is_quantize_weights() -> None:
    w = np.random.default_rng(0).normal(size=(6, 3, 3, 3)).astype(np.float32)
    for b in range(2, 9):
        q, s = quantize_weights(w, b)
        np.testing.assert_allclose(S.fake_quant(w, b), q * s.reshape(-1, 1, 1, 1), rtol=1e-6)
    assert S.quant_error(w, 16) < 1e-6 * float((w * w).sum())


@pytest.mark.unit
def test_canonical_onnx_matches_original(tiny: Case) -> None:
    for model in (tiny[0], branchy_cnn()):
        g = canonical(model)
        x = np.random.default_rng(2).normal(size=(3, *g.input_shape[1:])).astype(np.float32)
        sess = ort.InferenceSession(S.canonical_onnx(g).SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        feeds = {f"{n.name}::w": n.params["w"] for n in S.layer_nodes(g)}
        logits = sess.run(None, {g.input: x, **feeds})[0]
        ref = run_ort(model, x)
        if g.nodes[-1].op == "softmax":
            ref = np.log(ref)
            logits = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.unit
def test_kl(tiny: Case, tmp_path: Path) -> None:
    model, g, x = tiny
    s = S.compute_sensitivity(g, model.SerializeToString(), x, method="kl", bits=(16, 4, 8),
                              cache_dir=tmp_path, progress=False)
    assert s.method == "kl" and s.trace == {} and s.probes == 0 and s.num_samples == N
    assert set(s.omega) == {n.name for n in S.layer_nodes(g)}
    for om in s.omega.values():
        assert sorted(om) == [4, 8, 16]
        assert om[16] < 1e-8           # "almost float": no perturbation
        assert om[4] > om[8] > om[16]


@pytest.mark.tvm
def test_hessian_omega(tiny: Case, tmp_path: Path) -> None:
    model, g, x = tiny
    s = S.compute_sensitivity(g, model.SerializeToString(), x, bits=(4, 8), max_probes=64,
                              tol=0.2, cache_dir=tmp_path, progress=False)
    assert s.method == "hessian" and S.MIN_PROBES <= s.probes <= 64
    assert set(s.trace) == set(s.stderr) == set(s.omega)
    for name, om in s.omega.items():
        if s.trace[name] > 0:
            assert om[4] > om[8] > 0
        else:
            assert om[4] == om[8] == 0.0


@pytest.mark.tvm
def test_labels_change_the_loss(oracle: S.GradOracle) -> None:
    assert np.array_equal(oracle.labels, oracle.logits().argmax(axis=1))
    given = copy.copy(oracle)  # same compiled module, other labels
    given.labels = (oracle.labels + 1) % 5
    a, b = oracle.grad(oracle.weights), given.grad(given.weights)
    assert any(not np.allclose(p, q) for p, q in zip(a, b))


@pytest.mark.tvm
def test_padded_chunks_equal_one_batch(tiny: Case,
                                       oracle: S.GradOracle) -> None:
    _, g, x = tiny
    chunked = S.GradOracle(g, x, None, batch_size=3)  # chunks of 3 + 1 (padded)
    assert np.array_equal(chunked.labels, oracle.labels)
    for p, q in zip(chunked.grad(chunked.weights), oracle.grad(oracle.weights)):
        np.testing.assert_allclose(p, q, rtol=1e-9, atol=1e-14)


@pytest.mark.tvm
def test_cache_hit_and_miss(tiny: Case, tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    model, g, x = tiny
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path))
    kw = dict(max_probes=8, tol=0.5, progress=False)
    first = S.compute_sensitivity(g, model.SerializeToString(), x, **kw)
    assert not first.cached and len(list((tmp_path / "sensitivity").glob("*.json"))) == 1
    again = S.compute_sensitivity(g, model.SerializeToString(), x, **kw)
    assert again.cached
    assert {**again.to_json(), "cached": False} == first.to_json()
    # Omega for other widths comes from the cached trace, still a hit.
    wider = S.compute_sensitivity(g, model.SerializeToString(), x, bits=(2, 4, 8), **kw)
    assert wider.cached and sorted(next(iter(wider.omega.values()))) == [2, 4, 8]
    other = S.compute_sensitivity(g, model.SerializeToString(), x[::-1].copy(), **kw)
    assert not other.cached
    kl = S.compute_sensitivity(g, model.SerializeToString(), x, method="kl", progress=False)
    assert not kl.cached
    assert S.compute_sensitivity(g, model.SerializeToString(), x, method="kl",
                                 progress=False).cached


@pytest.mark.unit
def test_bad_arguments(tiny: Case, tmp_path: Path) -> None:
    model, g, x = tiny
    mb = model.SerializeToString()
    with pytest.raises(UsageError, match="sensitivity"):
        S.compute_sensitivity(g, mb, x, method="fisher", cache_dir=tmp_path)
    with pytest.raises(DataError, match="sensitivity data"):
        S.compute_sensitivity(g, mb, x[:, :2], cache_dir=tmp_path)
    with pytest.raises(DataError, match="labels"):
        S.compute_sensitivity(g, mb, x, np.zeros(3, np.int64), cache_dir=tmp_path)


@pytest.mark.unit
def test_non_positive_trace_gives_zero_omega(tiny: Case) -> None:
    g = tiny[1]
    names = [n.name for n in S.layer_nodes(g)]
    om = S.hessian_omega(g, {names[0]: -3.0, names[1]: 0.0, names[2]: 2.0}, (4, 8))
    assert om[names[0]] == om[names[1]] == {4: 0.0, 8: 0.0}
    w = S.layer_nodes(g)[2].params["w"]
    assert om[names[2]][4] == pytest.approx(2.0 / w.size * S.quant_error(w, 4))


@pytest.mark.unit
def test_data_hash_ignores_dtype_but_not_values() -> None:
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 4)).astype(np.float32)
    assert S.data_hash(x, None) == S.data_hash(x.astype(np.float64), None)
    assert S.data_hash(x, None) != S.data_hash(x, np.array([0, 1]))
    assert S.data_hash(x, None) != S.data_hash(x[::-1], None)


@pytest.mark.unit
def test_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("QCOMPILE_CACHE_DIR", raising=False)
    assert S.cache_root() == Path.home() / ".cache" / "qcompile" / "sensitivity"
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path))
    assert S.cache_root() == tmp_path / "sensitivity"
    assert S.cache_root(tmp_path / "x") == tmp_path / "x"


@pytest.mark.unit
def test_kl_under_gptq_ranks_the_rounding_that_will_be_used(tmp_path: Path) -> None:
    """``rounding="gptq"`` measures each layer's KL with its GPTQ weights and corrected
    bias: no larger than nearest's at 4 bits on the layers GPTQ improves, cached apart."""
    from qcompile.mixed.sensitivity import compute_sensitivity
    from tests.quant.test_gptq import _images, _tiny_model
    from qcompile.frontend.onnx_import import import_onnx
    from qcompile.frontend.prepare import prepare
    graph = prepare(import_onnx(_tiny_model(), batch=1))
    x = _images(24, 0)
    kw = dict(method="kl", bits=(4, 8), cache_dir=tmp_path, progress=False)
    near = compute_sensitivity(graph, b"m", x, **kw)
    gq = compute_sensitivity(graph, b"m", x, rounding="gptq", **kw)
    assert not gq.cached and set(gq.omega) == set(near.omega)
    assert sum(o[4] for o in gq.omega.values()) < sum(o[4] for o in near.omega.values())
    assert compute_sensitivity(graph, b"m", x, rounding="gptq", **kw).cached
    assert len(list(tmp_path.glob("*.json"))) == 2
