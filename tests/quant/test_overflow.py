"""Overflow made impossible, not reported (issue 11): a layer whose static worst-case
int32 accumulator does not fit int32 is refused with exit 10
and one line naming it; nothing is clipped or wrapped."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from onnx import helper

from tests.helpers.onnx_builders import init, make_model, rng, save
from qcompile.cli import main as cli
from qcompile.errors import EXIT_CODES, AccumulatorOverflowError
from qcompile.ir.graph import Node
from qcompile.ir.qgraph import INT32, QGraph, QNode, QTensor, QType
from qcompile.quant.quantize import INT32_MAX, accumulator_bound, int32_bias
from qcompile.report.card import render_card

EXIT_OVERFLOW = 10


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QCOMPILE_DEBUG", raising=False)


def _invoke(*args: object) -> Result:
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def _one_error_line(result: Result) -> str:
    """The single error line (the synthetic-calibration warning aside), no traceback."""
    lines = [ln for ln in result.stderr.splitlines()
             if ln.strip() and not ln.startswith("warning: calibrating on synthetic")]
    assert "Traceback" not in result.output, result.output
    assert len(lines) == 1, result.stderr
    return lines[0]


def _gemm_model(w: np.ndarray, b: np.ndarray):
    """x (1, K) -> Gemm(transB) named 'fc' -> y (1, N)."""
    node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)
    return make_model([node], [init("w", w), init("b", b)], [1, w.shape[1]], [1, w.shape[0]])


def _node(k: int, b: float = 0.0) -> Node:
    return Node("dense", "fc", ("x",), "y", {}, {"w": np.ones((1, k), np.float32),
                                                 "b": np.array([b], np.float32)})


@pytest.mark.unit
def test_exit_code_is_its_own() -> None:
    assert EXIT_CODES["AccumulatorOverflowError"] == EXIT_OVERFLOW
    assert sorted(EXIT_CODES.values()) == sorted(set(EXIT_CODES.values()))


# ----------------------------------------------------------------------------- the quantizer

@pytest.mark.unit
def test_bound_at_int32_max_passes_one_more_is_refused() -> None:
    # 127 * K * 128 + |bias| with K = 132104 is 2^31 - 1 - 1023
    k = 132104
    wq = np.full((1, k), 127, np.int8)
    assert accumulator_bound(_node(k), wq, np.array([1023], np.int32), 8, 8, True) == INT32_MAX
    with pytest.raises(AccumulatorOverflowError, match=r"layer 'fc' \(dense\).*2\^31-1") as e:
        accumulator_bound(_node(k), wq, np.array([-1024], np.int32), 8, 8, True)
    assert "--bits w4a8" in str(e.value) and "\n" not in str(e.value)
    # unsigned 8-bit inputs reach 255: the same layer after a ReLU is refused much earlier
    with pytest.raises(AccumulatorOverflowError):
        accumulator_bound(_node(k), wq // 2 + 1, np.zeros(1, np.int32), 8, 8, False)


@pytest.mark.unit
def test_advice_follows_the_layer_precision() -> None:
    w4, near = np.full((1, 4), 7, np.int8), np.array([INT32_MAX - 10], np.int32)
    with pytest.raises(AccumulatorOverflowError, match="4-bit activations") as e:
        accumulator_bound(_node(4), w4, near, 4, 8, True, first_or_last=True)
    assert "--pin 'fc=4' --budget-size 1" in str(e.value)
    with pytest.raises(AccumulatorOverflowError) as e:  # W4A4: only a split helps
        accumulator_bound(_node(4), w4, near, 4, 4, True)
    assert "4-bit" not in str(e.value) and "split its K inputs" in str(e.value)
    assert accumulator_bound(_node(4), w4, near + 10 - 7 * 4 * 8, 4, 4, True) == INT32_MAX


@pytest.mark.unit
def test_bias_that_does_not_fit_int32_is_refused_not_clipped() -> None:
    sw = np.array([1e-9])
    assert int32_bias(_node(4, 2.0), sw, 1.0)[0] == 2_000_000_000
    with pytest.raises(AccumulatorOverflowError, match=r"layer 'fc' .*bias does not fit int32"):
        int32_bias(_node(4, 3.0), sw, 1.0)  # 3e9 would have been clipped to 2^31-1
    with pytest.raises(AccumulatorOverflowError):
        int32_bias(_node(4, -3.0), sw, 1.0)


# ----------------------------------------------------------------------------- the CLI

@pytest.mark.unit
def test_cli_refuses_an_overflowing_layer(tmp_path: Path) -> None:
    """K = 140000 products of |w_q| = 127 and |x_q| <= 128: 2.28e9 > 2^31 - 1."""
    k = 140_000
    w = np.where(rng(1).random((1, k)) < 0.5, -1.0, 1.0)
    model = save(_gemm_model(w, np.zeros(1)), tmp_path)
    r = _invoke(model, "-o", tmp_path / "art", "--calib-samples", "2", "-q")
    assert r.exit_code == EXIT_OVERFLOW, r.output
    line = _one_error_line(r)
    assert line.startswith("error: layer 'fc'") and "int32 accumulator can overflow" in line
    assert "--pin 'fc=w4a8'" in line  # the only layer is first and last: --bits can't reach it
    assert not (tmp_path / "art").exists() or not any((tmp_path / "art").iterdir())


@pytest.mark.tvm
def test_a_bias_too_big_for_its_weight_scale_widens_that_scale(tmp_path: Path) -> None:
    """Channel 1's weights are ~1e-7 next to a bias of 1000 (its bias_q would be ~1e13,
    as in EfficientNet-Lite0's stem): that channel's weight scale grows until the bias
    fits in 2^30 units, nothing is clipped, and the module computes the bias."""
    w = rng(2).normal(0, 0.3, (3, 16))
    w[1] *= 1e-6
    b = np.array([0.1, 1000.0, -0.2])
    model = save(_gemm_model(w, b), tmp_path)
    r = _invoke(model, "-o", tmp_path / "art", "--calib-samples", "2", "-q")
    assert r.exit_code == 0, r.output
    from qcompile.runtime.run import Artifact
    qg = Artifact.load(tmp_path / "art").qgraph()
    fc = next(n for n in qg.nodes if n.name == "fc")
    bias = fc.params["bias"].reshape(-1)
    assert abs(int(bias[1])) <= 1 << 30 and abs(int(bias[1])) > 1 << 29  # widened, not clipped
    x = rng(3).uniform(-1, 1, (1, 16)).astype(np.float32)
    y = Artifact.load(tmp_path / "art").run(x)
    np.testing.assert_allclose(y[0, 1], 1000.0 + x[0] @ w[1], rtol=1e-3)


# ----------------------------------------------------------------------------- the card

def _card_graph(bound: int) -> QGraph:
    x = QTensor("x", QType(8, True), (1, 2), np.float64(0.1))
    y = QTensor("y", INT32, (1, 1), np.float64(0.01))
    node = QNode("qdense", "fc", ("x",), "y",
                 {"raw": True, "lo": -(1 << 31), "hi": INT32_MAX, "acc_bound": bound, "bits": 8,
                  "a_bits": 8},
                 {"w": np.ones((2, 1), np.int8), "bias": np.zeros((1, 1), np.int32)})
    return QGraph(x, (node,), y, {"x": x, "y": y})


@pytest.mark.unit
def test_card_shows_headroom_never_overflow() -> None:
    meta = {"target": "llvm", "integer_only": True,
            "calibration": {"method": "minmax", "num_samples": 1, "source": "synthetic"}}
    card = render_card(_card_graph(1 << 20), meta)
    assert "OVERFLOW" not in card and "| 20.0 | 11.0 |" in card and "exit 10" in card
    with pytest.raises(ValueError, match="exceeds int32"):
        render_card(_card_graph(1 << 31), meta)
