"""GPTQ (Hessian-aware) weight rounding: better layer outputs than nearest, same integers."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from tests.helpers.onnx_builders import conv_node, init, make_model, rng, save
from qcompile import api
from qcompile.quant import gptq
from qcompile.config import CalibSpec, QuantSpec
from qcompile.errors import UsageError
from qcompile.ir.graph import Node
from qcompile.frontend.onnx_import import import_onnx
from qcompile.frontend.prepare import prepare
from qcompile.runtime.run import Artifact
from qcompile.quant.quantize import layer_bits, quantize_weights
from qcompile.frontend.onnx_export import canonical_onnx

SIZE = 12


def _conv(O: int, C: int, k: int, group: int = 1, stride: int = 1, dilation: int = 1,
          pad: int = 1, seed: int = 0) -> Node:
    w = rng(seed).normal(0, 1, (O, C // group, k, k)) * rng(seed + 1).uniform(0.2, 2, (O, 1, 1, 1))
    return Node("conv", "c", ("x",), "y", {"strides": (stride, stride), "pads": (pad,) * 4,
                                           "dilations": (dilation, dilation), "group": group,
                                           "act": None},
                {"w": w.astype(np.float32), "b": np.zeros(O, np.float32)})


def _correlated_images(n: int, C: int, seed: int, mix_seed: int = 99) -> np.ndarray:
    """Channels mixed (one fixed mixing per ``mix_seed``) and pixels smoothed: strongly
    correlated im2col columns."""
    z = rng(seed).normal(0, 1, (n, C, SIZE, SIZE))
    z = np.einsum("dc,nchw->ndhw", rng(mix_seed).normal(0, 1, (C, C)) + 2 * np.eye(C), z)
    z = z + np.roll(z, 1, axis=2) + np.roll(z, 1, axis=3)
    return z.astype(np.float32)


def _im2col_out_error(node: Node, x: np.ndarray, q: np.ndarray, s: np.ndarray) -> float:
    """||W X - Q X||^2 over every output position (conv through im2col, per group)."""
    w = node.params["w"].astype(np.float64)
    d = w - q.astype(np.float64) * s.reshape((-1,) + (1,) * (w.ndim - 1))
    if node.op == "dense":
        return float(((x.astype(np.float64) @ d.T) ** 2).sum())
    G, O = int(node.attrs["group"]), w.shape[0]
    cols = gptq._im2col(x, node).astype(np.float64)
    cols = cols.reshape(G, -1, cols.shape[1])
    dg = d.reshape(G, O // G, -1)
    return float(((dg @ cols) ** 2).sum())


def _nearest_vs_gptq(node: Node, x: np.ndarray, bits: int) -> tuple[float, float, tuple]:
    H = gptq.layer_hessian(node, x)
    q, s = gptq.round_layer(node.params["w"], H, bits)
    q0, s0 = quantize_weights(node.params["w"], bits)
    return _im2col_out_error(node, x, q0, s0), _im2col_out_error(node, x, q, s), (q, s)


@pytest.mark.unit
@pytest.mark.parametrize("seed", range(4))
def test_gptq_beats_nearest_on_conv_and_dense(seed: int) -> None:
    conv = _conv(16, 8, 3, seed=seed, stride=1 + seed % 2)
    x = _correlated_images(24, 8, seed, mix_seed=seed)
    held = _correlated_images(24, 8, seed + 100, mix_seed=seed)
    r = rng(seed)
    w = (r.normal(0, 1, (24, 40)) * r.uniform(0.2, 2, (24, 1))).astype(np.float32)
    dense = Node("dense", "d", ("x",), "y", {"act": None},
                 {"w": w, "b": np.zeros(24, np.float32)})
    mix = r.normal(0, 1, (40, 40)) + 2 * np.eye(40)
    xd, hd = ((r.normal(0, 1, (600, 40)) @ mix).astype(np.float32) for _ in range(2))
    for node, xc, xh in ((conv, x, held), (dense, xd, hd)):
        for bits in (4, 8):
            near, gq, (q, s) = _nearest_vs_gptq(node, xc, bits)
            qmax = (1 << (bits - 1)) - 1
            assert q.dtype == np.int8 and q.shape == node.params["w"].shape
            assert np.abs(q).max() <= qmax and s.dtype == np.float64 and s.shape == (len(q),)
            assert gq <= near * (1 + 1e-9), (node.op, bits, gq, near)
            if bits == 4:  # clearly better, on the calibration data and on fresh data
                assert gq < 0.8 * near, (node.op, gq, near)
                q0, s0 = quantize_weights(node.params["w"], bits)
                assert (_im2col_out_error(node, xh, q, s)
                        < _im2col_out_error(node, xh, q0, s0)), node.op


@pytest.mark.unit
@pytest.mark.parametrize("group", [2, 8])  # grouped, depthwise
def test_grouped_and_depthwise_layers_round_per_group(group: int) -> None:
    node = _conv(8, 8, 3, group=group, dilation=2, pad=2, seed=3)
    x = _correlated_images(16, 8, 7)
    H = gptq.layer_hessian(node, x)
    K = 8 // group * 9
    assert H.shape == (group, K, K)
    near, gq, (q, s) = _nearest_vs_gptq(node, x, 4)
    assert gq <= near * (1 + 1e-9) and np.abs(q).max() <= 7
    # one group at a time: the same integers (each group has its own H)
    g = 1
    sub = node.with_(attrs={**node.attrs, "group": 1},
                     params={"w": node.params["w"][g * 8 // group:(g + 1) * 8 // group],
                             "b": node.params["b"][:8 // group]})
    xs = x[:, g * 8 // group:(g + 1) * 8 // group]
    np.testing.assert_allclose(gptq.layer_hessian(sub, xs)[0], H[g], rtol=1e-5, atol=1e-6)
    qg, sg = gptq.round_layer(sub.params["w"], H[g:g + 1], 4)
    np.testing.assert_array_equal(qg, q[g * 8 // group:(g + 1) * 8 // group])
    np.testing.assert_array_equal(sg, s[g * 8 // group:(g + 1) * 8 // group])


@pytest.mark.unit
def test_hessian_matches_the_layer_output() -> None:
    """d^T H d / 2 * n is the layer's output error: the im2col follows ONNX Conv."""
    node = _conv(6, 4, 3, stride=2, dilation=2, pad=1, seed=5)
    x = _correlated_images(5, 4, 1)
    d = rng(0).normal(0, 1, node.params["w"].shape)
    sess = ort.InferenceSession(make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], strides=[2, 2], pads=[1] * 4,
                          dilations=[2, 2])], [init("w", d)], [None, 4, SIZE, SIZE]
    ).SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0].astype(np.float64)
    H = gptq.layer_hessian(node, x)[0]
    n = y.shape[0] * y.shape[2] * y.shape[3]
    dd = d.reshape(6, -1)
    np.testing.assert_allclose(np.einsum("ok,kl,ol->", dd, H, dd) * n / 2, (y ** 2).sum(),
                               rtol=1e-4)


def _tiny_model():
    """conv -> grouped conv -> depthwise (stride 2) -> pointwise -> GAP -> Gemm."""
    r = rng(0)
    inits: list[TensorProto] = []
    nodes, t = [], "x"
    for name, cin, cout, k, group, stride in (("stem", 3, 8, 3, 1, 1), ("grp", 8, 8, 3, 2, 1),
                                              ("dw", 8, 8, 3, 8, 2), ("pw", 8, 12, 1, 1, 1)):
        w = r.normal(0, 1, (cout, cin // group, k, k)) / np.sqrt(cin // group * k * k)
        w *= 10 ** r.uniform(-0.5, 0.5, (cout, 1, 1, 1))
        nodes.append(conv_node(name, t, f"{name}_c", w, r.normal(0, 0.1, cout), inits,
                               group=group, pads=[k // 2] * 4, strides=[stride] * 2))
        nodes.append(helper.make_node("Relu", [f"{name}_c"], [f"{name}_r"]))
        t = f"{name}_r"
    nodes += [helper.make_node("GlobalAveragePool", [t], ["gap"]),
              helper.make_node("Flatten", ["gap"], ["flat"]),
              helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], transB=1)]
    inits += [init("fc_w", r.normal(0, 0.3, (5, 12))), init("fc_b", r.normal(0, 0.1, 5))]
    return make_model(nodes, inits, [1, 3, SIZE, SIZE])


def _images(n: int, seed: int) -> np.ndarray:
    return _correlated_images(n, 3, seed) / 3


@pytest.mark.unit
def test_sequential_mode_feeds_the_quantized_earlier_layers() -> None:
    graph = prepare(import_onnx(_tiny_model(), batch=1))
    layers = [n for n in graph.nodes if n.op in ("conv", "dense")]
    x = _images(16, 0)
    bits = layer_bits(graph, QuantSpec(bits=4, first_last_bits=4))
    seen: dict[str, dict[str, np.ndarray]] = {"seq": {}, "float": {}}
    out = gptq.gptq_weights(graph, x, bits, observe=lambda k, v: seen["seq"].setdefault(k, v))
    gptq.gptq_weights(graph, x, bits, sequential=False,
                      observe=lambda k, v: seen["float"].setdefault(k, v))
    assert set(out) == {n.name for n in layers}
    second = layers[1]
    assert not np.allclose(seen["seq"][second.name], seen["float"][second.name])
    # ... and it is exactly what canonical_onnx computes with layer 1 dequantized
    model = canonical_onnx(graph)
    model.graph.output.append(helper.make_tensor_value_info(second.inputs[0], TensorProto.FLOAT,
                                                            None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {f"{n.name}::w": np.asarray(n.params["w"], np.float32) for n in layers}
    q, s = out[layers[0].name]
    feeds[f"{layers[0].name}::w"] = (q * s[:, None, None, None]).astype(np.float32)
    ref = sess.run([second.inputs[0]], {graph.input: x, **feeds})[0]
    np.testing.assert_allclose(seen["seq"][second.name], ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(seen["float"][layers[0].name], x)


@pytest.mark.tvm
def test_compile_with_gptq_is_bit_exact_and_integer_only(tmp_path: Path) -> None:
    model = save(_tiny_model(), tmp_path)
    (tmp_path / "calib").mkdir()
    np.save(tmp_path / "calib" / "x.npy", _images(32, 0))
    calib = CalibSpec(source=str(tmp_path / "calib"), num_samples=32)
    art = tmp_path / "art"
    # bias correction reads s_w * s_x off the GPTQ QGraph
    res = api.compile_model(model, art, progress=False, calib=calib,
                            quant=QuantSpec(bits=4, rounding="gptq", bias_correction=True))
    # compile's own oracle check ran, and every integer-only stage found code to check
    assert res.verified.inputs == 2 and res.verified.bit_exact is True
    check = json.loads((art / "manifest.json").read_text())["intcheck"]
    assert check["stages"] == ["core", "codegen", "asm"] and check["asm"]["instructions"] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ev = api.evaluate(model, art, inputs=_images(16, 5), progress=False)
    assert ev.bit_exact and ev.num_samples == 16
    # the artifact holds the GPTQ integers, not nearest's
    qg = Artifact.load(tmp_path / "art").qgraph()
    graph = prepare(import_onnx(_tiny_model(), batch=1))
    changed = [n.name for n in graph.nodes if n.op == "conv" and not np.array_equal(
        next(q for q in qg.nodes if q.name == n.name).params["w"],
        quantize_weights(n.params["w"], layer_bits(graph, QuantSpec(bits=4))[n.name])[0])]
    assert "grp" in changed and "pw" in changed


@pytest.mark.unit
def test_auto_defaults_follow_the_calibration_data() -> None:
    from qcompile.config import resolve_auto
    real = CalibSpec(source="some/dir")
    c, q = resolve_auto(real, QuantSpec())
    assert (c.method, q.rounding) == ("mse", "gptq")
    c, q = resolve_auto(CalibSpec(), QuantSpec())
    assert (c.method, q.rounding) == ("minmax", "nearest")
    c, q = resolve_auto(CalibSpec(source="d", method="percentile"), QuantSpec(rounding="nearest"))
    assert (c.method, q.rounding) == ("percentile", "nearest")  # explicit choices stay


@pytest.mark.unit
def test_rounding_is_validated() -> None:
    with pytest.raises(UsageError, match="--rounding"):
        QuantSpec(rounding="stochastic")
    assert QuantSpec(rounding="gptq", bits=4).rounding == "gptq"


@pytest.mark.unit
def test_cli_rounding_reaches_the_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from click.testing import CliRunner

    from qcompile.cli import main as cli
    from qcompile.report.results import CompileResult

    calls: list[dict] = []

    def compile_model(*args, **kw):
        calls.append(kw)
        return CompileResult(out_dir=Path(args[1]), compile_seconds=0.1, integer_only=True,
                             num_layers=5)

    monkeypatch.setattr(cli, "_api", lambda: SimpleNamespace(compile_model=compile_model))
    model = save(_tiny_model(), tmp_path)
    base = ["compile", str(model), "-o", str(tmp_path / "art"), "--bits", "4"]
    r = CliRunner().invoke(cli.main, base + ["--rounding", "gptq"])
    assert r.exit_code == 0, r.output
    assert calls[-1]["quant"].rounding == "gptq"
    r = CliRunner().invoke(cli.main, base)  # auto: gptq with real data, else nearest
    assert r.exit_code == 0 and calls[-1]["quant"].rounding == "auto"
    r = CliRunner().invoke(cli.main, base + ["--rounding", "floor"])
    assert r.exit_code != 0 and "--rounding" in r.output


def _out(node: Node, x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The layer's output columns (G*R, positions) through im2col: W X + b."""
    G, O = int(node.attrs["group"]), w.shape[0]
    cols = gptq._im2col(x, node).astype(np.float64).reshape(G, -1, gptq._im2col(x, node).shape[1])
    y = np.asarray(w, np.float64).reshape(G, O // G, -1) @ cols
    return y.reshape(O, -1) + np.asarray(b, np.float64)[:, None]


@pytest.mark.unit
@pytest.mark.parametrize("seed", range(3))
def test_corrected_gptq_moves_the_mean_error_into_the_bias(seed: int) -> None:
    """After ReLU inputs are far from zero-mean: the corrected bias makes the output's mean
    error vanish on the calibration data and the total error smaller than plain GPTQ's."""
    node = _conv(12, 8, 3, seed=seed)
    node = node.with_(params={**node.params, "b": rng(seed).normal(0, 1, 12).astype(np.float32)})
    x = np.maximum(_correlated_images(24, 8, seed, mix_seed=seed) + 1.0, 0)  # ReLU'd, mean > 0
    w, b = node.params["w"], node.params["b"]
    ref = _out(node, x, w, b)
    q, s, b2 = gptq.round_corrected(w, b, gptq.layer_moments(node, x), 4)
    wq = q * s[:, None, None, None]
    err = _out(node, x, wq, b2) - ref
    assert np.abs(err.mean(axis=1)).max() < 1e-6 * np.abs(ref).max()
    qp, sp = gptq.round_layer(w, gptq.layer_hessian(node, x), 4)
    plain = _out(node, x, qp * sp[:, None, None, None], b) - ref
    assert (err ** 2).sum() < (plain ** 2).sum()


@pytest.mark.unit
@pytest.mark.parametrize("seed", range(3))
def test_compensation_corrects_the_upstream_error(seed: int) -> None:
    """The quantized stream's input x differs from the float x_f (earlier layers' error):
    rounding the compensated weights brings Q x closer to W x_f than rounding W does."""
    node = _conv(12, 8, 3, seed=seed)
    xf = _correlated_images(24, 8, seed, mix_seed=seed)
    r = rng(seed + 7)
    mix = np.eye(8) + 0.15 * r.normal(0, 1, (8, 8))  # a systematic channel error upstream
    x = (np.einsum("dc,nchw->ndhw", mix, xf) + 0.05 * r.normal(0, 1, xf.shape)).astype(np.float32)
    w, b = node.params["w"], node.params["b"]
    ref = _out(node, xf, w, b)
    errs = []
    for m in (gptq.layer_moments(node, x), gptq.layer_moments(node, x, xf)):
        q, s, b2 = gptq.round_corrected(w, b, m, 8)
        errs.append(((_out(node, x, q * s[:, None, None, None], b2) - ref) ** 2).sum())
    assert errs[1] < 0.5 * errs[0], errs


@pytest.mark.unit
def test_gptq_graph_returns_the_corrected_biases() -> None:
    graph = prepare(import_onnx(_tiny_model(), batch=1))
    x = _images(16, 0)
    bits = layer_bits(graph, QuantSpec(bits=4, first_last_bits=4))
    g2, out = gptq.gptq_graph(graph, x, bits)
    g0, out0 = gptq.gptq_graph(graph, x, bits, correct=False)
    assert g0 is graph and set(out) == set(out0) == set(bits)
    changed = [n.name for n, m in zip(graph.nodes, g2.nodes)
               if n.op in ("conv", "dense") and not np.array_equal(n.params["b"], m.params["b"])]
    assert changed == list(bits)
    assert all(n.params["w"] is m.params["w"] for n, m in zip(graph.nodes, g2.nodes)
               if n.op in ("conv", "dense"))
