"""Artifacts: atomic writes, refusals, plain-TVM loading, self-description."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import relax

from tests.helpers.kitchen_sink import kitchen_sink_model
from tests.helpers.onnx_builders import save
from qcompile import api
from qcompile.verify import oracle
from qcompile.runtime.artifact import atomic_dir, check_output_dir
from qcompile.errors import ArtifactError, UsageError
from qcompile.runtime.run import Artifact
from qcompile.ir.serialize import qgraph_from_json, qgraph_to_json


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("art")
    model = save(kitchen_sink_model(), d)
    api.compile_model(model, d / "out", progress=False)
    return model, d / "out"


@pytest.mark.tvm
def test_layout_and_card(built) -> None:
    _, out = built
    assert {p.name for p in out.iterdir()} == {"module.so", "weights.npz", "qgraph.npz",
                                              "qconfig.json", "report.md", "manifest.json"}
    card = (out / "report.md").read_text()
    for needle in ("calibration", "per-output-channel symmetric", "BatchNorm", "first layer",
                   "last layer", "integer-only", "2^31", "int32", "headroom (bits)"):
        assert needle in card
    assert "OVERFLOW" not in card  # a layer that could overflow is refused, never compiled
    q = json.loads((out / "qconfig.json").read_text())
    conv = next(l for l in q["layers"] if l["op"] == "qconv")
    assert {"w_bits", "m", "s", "out_scale", "acc_bound"} <= set(conv)
    assert "preprocess" in q and q["calibration"]["method"] == "minmax"


@pytest.mark.tvm
def test_plain_tvm_runtime_loads_it(built) -> None:
    """What the README shows: no qcompile needed to run an artifact."""
    _, out = built
    manifest = json.loads((out / "manifest.json").read_text())
    lib = tvm.runtime.load_module(str(out / "module.so"))
    vm = relax.VirtualMachine(lib, tvm.cpu())
    weights = np.load(out / "weights.npz")
    params = [tvm.runtime.tensor(weights[k]) for k in manifest["params"]]
    assert manifest["batch"] == 1  # kernels are specialized to the compiled batch
    x = np.random.default_rng(0).normal(size=(1, 3, 11, 11)).astype(np.float32)
    y = vm["main"](tvm.runtime.tensor(x), *params).numpy()
    assert y.shape == (1, 5)
    np.testing.assert_allclose(y.sum(1), 1, rtol=1e-5)  # softmax at the exit
    np.testing.assert_array_equal(y, Artifact.load(out).run(x))


@pytest.mark.tvm
def test_serialize_round_trip(built) -> None:
    _, out = built
    art = Artifact.load(out)
    qg = art.qgraph()
    again = qgraph_from_json(json.loads(json.dumps(qgraph_to_json(qg))), dict(qg.param_items()))
    x = np.random.default_rng(1).normal(size=(4, 3, 11, 11)).astype(np.float32)
    np.testing.assert_array_equal(oracle.run(qg, x), oracle.run(again, x))


@pytest.mark.tvm
def test_failed_compile_leaves_previous_artifact(built, tmp_path: Path, monkeypatch) -> None:
    model, out = built
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}
    model_hash = hashlib.sha256(model.read_bytes()).hexdigest()

    def boom(*a, **k):
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr("qcompile.report.manifest.render_card", boom)
    with pytest.raises(RuntimeError):
        api.compile_model(model, out, progress=False)
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}
    assert after == before
    assert hashlib.sha256(model.read_bytes()).hexdigest() == model_hash
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.")]  # no temp debris


@pytest.mark.unit
def test_atomic_dir_replaces_only_on_success(tmp_path: Path) -> None:
    out = tmp_path / "a"
    with atomic_dir(out) as t:
        (t / "manifest.json").write_text("{}")
    with pytest.raises(KeyError):
        with atomic_dir(out) as t:
            (t / "x").write_text("half")
            raise KeyError
    assert [p.name for p in out.iterdir()] == ["manifest.json"]


@pytest.mark.unit
def test_output_dir_refusals(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    with pytest.raises(UsageError, match="input model"):
        check_output_dir(model, protect=(model,))
    with pytest.raises(UsageError, match="contains the input model"):
        check_output_dir(tmp_path, protect=(model,))
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(UsageError, match="not a qcompile artifact"):
        check_output_dir(other)


@pytest.mark.unit
def test_loading_a_non_artifact_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not a qcompile artifact"):
        Artifact.load(tmp_path)


@pytest.mark.tvm
def test_wrong_input_shape_is_a_clear_error(built) -> None:
    with pytest.raises(ArtifactError, match="does not match"):
        Artifact.load(built[1]).run(np.zeros((1, 3, 12, 12), np.float32))
