"""qcompile/report/fidelity.py and compile's guard: the model against its float self, not just the
compiler against its oracle; and NaN/Inf inputs refused at run time."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from tests.helpers.onnx_builders import conv_node, make_model, rng, save
from qcompile import api
from qcompile.cli import main as cli
from qcompile.report import fidelity as fid
from qcompile.config import CalibSpec, FidelitySpec, QuantSpec
from qcompile.errors import FidelityError, NonFiniteInputError, UsageError
from qcompile.runtime.run import Artifact

SIZE = 8


def invoke(*args: object) -> Result:
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def _one_line(r: Result) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert "Traceback" not in r.output and len(lines) == 1, r.output
    return lines[0]


def outlier_model(d: Path) -> Path:
    """x -> conv ``wide`` (channel 0 = 1000 x, channel 1 = x) -> conv ``reader`` (reads
    channel 1 only) -> y. The per-tensor scale of ``wide``'s output is set by the 1000x
    channel, so channel 1 quantizes to zero and ``reader`` outputs its bias: a planted
    collapse that bit-exactness cannot see."""
    r, inits = rng(3), []
    w2 = np.zeros((4, 2, 3, 3), np.float32)
    w2[:, 1] = r.normal(0, 0.5, (4, 3, 3))
    nodes = [conv_node("wide", "x", "h", np.array([[[[1000.0]]], [[[1.0]]]]), None, inits),
             conv_node("reader", "h", "y", w2, None, inits, pads=[1, 1, 1, 1])]
    return save(make_model(nodes, inits, [1, 1, SIZE, SIZE]), d, "outlier.onnx")


def _data(d: Path, n: int, shape: tuple[int, ...] = (1, SIZE, SIZE)) -> Path:
    d.mkdir()
    for i in range(n):
        np.save(d / f"{i:02d}.npy",
                np.random.default_rng(i).normal(size=(1, *shape)).astype(np.float32))
    return d


@pytest.mark.tvm
def test_guard_refuses_a_planted_collapse_naming_the_layer(tmp_path: Path) -> None:
    """Bit-exact, integer-only, and dead: exit 13, one line naming the reader, nothing
    written. --min-sqnr 0 keeps it, with the measurement in the manifest and the card."""
    model, out = outlier_model(tmp_path), tmp_path / "art"
    args = (model, "-o", out, "--calibrator", "minmax", "--rounding", "nearest", "-q")
    r = invoke(*args)
    assert r.exit_code == 13, r.output
    line = _one_line(r)
    assert "output SQNR" in line and "'reader'" in line and "--min-sqnr" in line
    assert not out.exists() and not list(tmp_path.glob(".art.tmp-*"))
    r = invoke(*args, "--min-sqnr", "0")
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["verified"]["bit_exact"] is True and m["integer_only"] is True
    f = m["fidelity"]
    assert f["sqnr_db"] < 1 and f["min_sqnr_db"] == 0 and f["samples"] == 8
    assert f["sharpest_drop"]["name"] == "reader" and f["sharpest_drop"]["drop_db"] > 20
    card = (out / "report.md").read_text()
    assert "## Fidelity against the float model" in card and "`reader`" in card


@pytest.mark.tvm
def test_guard_passes_a_healthy_model_and_records_it(tmp_path: Path) -> None:
    inits: list = []
    r = rng(0)
    nodes = [conv_node("c1", "x", "h", r.normal(0, 0.5, (4, 1, 3, 3)), r.normal(0, .1, 4),
                       inits, pads=[1, 1, 1, 1]),
             conv_node("c2", "h", "y", r.normal(0, 0.5, (4, 4, 1, 1)), None, inits)]
    model = save(make_model(nodes, inits, [1, 1, SIZE, SIZE]), tmp_path)
    res = api.compile_model(model, tmp_path / "art", progress=False,
                            quant=QuantSpec(rounding="nearest"))
    assert res.fidelity is not None and res.fidelity.ok and res.fidelity.sqnr_db > 25
    assert res.fidelity.source.startswith("synthetic") and res.fidelity.layer_samples == 2


@pytest.mark.unit
@pytest.mark.parametrize("n_files,calib_samples,want_calib,want_held,source", [
    (16, 32, 12, 4, "held back from calibration"),   # a quarter held back
    (16, 8, 8, 8, "not used for calibration"),       # the samples past --calib-samples
    (3, 32, 3, 3, "none held back"),                 # too few to spare any
])
def test_held_out_inputs_are_never_calibrated_on(tmp_path: Path, n_files: int,
                                                 calib_samples: int, want_calib: int,
                                                 want_held: int, source: str) -> None:
    data = _data(tmp_path / "d", n_files)
    calib = CalibSpec(source=str(data), num_samples=calib_samples)
    held = fid.hold_out(calib, FidelitySpec(), "x", (1, 1, SIZE, SIZE))
    assert held is not None and source in held.source
    assert min(held.calib.num_samples, n_files) == want_calib
    x = held.inputs()
    assert len(x) == want_held
    files = [np.load(data / f"{i:02d}.npy")[0] for i in range(n_files)]
    first = n_files - want_held if "none" not in source else 0
    if "not used" in source:
        first = calib_samples
    np.testing.assert_array_equal(x, np.stack(files[first:first + want_held]))
    assert fid.hold_out(calib, FidelitySpec(samples=0), "x", (1, 1, SIZE, SIZE)) is None


@pytest.mark.unit
def test_sharpest_drop_names_the_first_collapse_not_its_echoes() -> None:
    """Per-layer SQNR 40 -> 38 -> 8 -> 2 (a chain): the 30 dB fall is named, not the last
    layer's 6 dB, nor an exact layer's infinite SQNR."""
    from types import SimpleNamespace as NS

    nodes = [NS(name=f"n{i}", op="qconv", inputs=[f"t{i}"], output=f"t{i + 1}") for i in range(4)]
    qg = NS(input=NS(name="t0"), nodes=nodes)
    tally = fid.Tally()
    for i, db in enumerate((38.0, 8.0, 2.0, float("inf")), start=1):
        tally.sig[f"t{i}"] = 1.0
        tally.err[f"t{i}"] = 0.0 if db == float("inf") else 10 ** (-db / 10)
    d = fid.sharpest_drop(qg, tally, input_sqnr=40.0)  # type: ignore[arg-type]
    assert d is not None and (d.name, round(d.input_sqnr_db), round(d.sqnr_db)) == ("n1", 38, 8)


@pytest.mark.unit
def test_fidelity_spec_validation() -> None:
    with pytest.raises(UsageError, match="--min-sqnr"):
        FidelitySpec(min_sqnr_db=-1)
    with pytest.raises(UsageError, match="--min-sqnr"):
        FidelitySpec(min_sqnr_db=float("nan"))
    with pytest.raises(UsageError, match="--fidelity-samples"):
        FidelitySpec(samples=-2)
    f = fid.Fidelity(8, "x", 1.0, 0.5, 3.0)
    with pytest.raises(FidelityError, match="1.0 dB < --min-sqnr 3"):
        fid.check(f)
    fid.check(fid.Fidelity(8, "x", 1.0, 0.5, 0.0))  # 0: recorded, never refused


# ----------------------------------------------------------------------------- NaN / Inf
@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("nan")
    inits: list = []
    nodes = [conv_node("c", "x", "y", rng(1).normal(0, .5, (2, 1, 3, 3)), None, inits)]
    model = save(make_model(nodes, inits, [1, 1, SIZE, SIZE]), d)
    api.compile_model(model, d / "art", progress=False, quant=QuantSpec(rounding="nearest"))
    return d / "art"


@pytest.mark.tvm
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_are_refused(art: Path, tmp_path: Path, bad: float) -> None:
    x = np.zeros((2, 1, SIZE, SIZE), np.float32)
    x[1, 0, 3, 3] = bad
    with pytest.raises(NonFiniteInputError, match="finite floats only"):
        Artifact.load(art).run(x)
    with pytest.raises(NonFiniteInputError):
        Artifact.load(art).quantize(x)
    np.save(tmp_path / "x.npy", x)
    r = invoke("run", art, "-i", tmp_path / "x.npy", "-o", tmp_path / "y.npy")
    assert r.exit_code == 14 and "NaN" in _one_line(r)
    assert not (tmp_path / "y.npy").exists()
    Artifact.load(art).run(np.zeros_like(x))  # finite input still runs
