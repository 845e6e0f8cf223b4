"""`qcompile inspect`: which kernel serves which layer, and what it compiled to."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.helpers.kitchen_sink import kitchen_sink_model
from tests.helpers.onnx_builders import save
from qcompile import api
from qcompile.cli.main import main
from qcompile.cli.inspect_artifact import inspect_artifact
from qcompile.targets.x86.amx import KERNEL_PREFIXES
from qcompile.hw.facts import has_vnni

pytestmark = [pytest.mark.hardware, pytest.mark.skipif(not has_vnni(), reason="CPU lacks AVX-512 VNNI")]


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("insp")
    api.compile_model(save(kitchen_sink_model(), d), d / "art", progress=False)
    return d / "art"


def test_vnni_kernels_map_to_layers_and_use_vpdpbusd(art: Path) -> None:
    res = inspect_artifact(art)
    by_layer = {k["layer"]: k for k in res["kernels"]}
    assert {"stem", "pw", "dw", "fc", "maxpool", "avgpool", "gap"} <= set(by_layer)
    for layer in ("stem", "pw", "fc"):  # the u8 x s8 GEMM layers: VNNI, or AMX tiles
        hot = by_layer[layer]["hot"]
        unit = "tdpbusd" if by_layer[layer]["kernel"].startswith(KERNEL_PREFIXES) else "vpdpbusd"
        assert hot.get(unit, 0) > 0, layer
    assert by_layer["dw"]["hot"].get("vpdpbusd", 0) == 0  # depthwise is plain vector code
    assert res["totals"]["vpdpbusd"] == sum(k["hot"].get("vpdpbusd", 0) for k in res["kernels"])


def test_generic_artifact_has_no_kernels(tmp_path: Path) -> None:
    api.compile_model(save(kitchen_sink_model(), tmp_path), tmp_path / "g", progress=False,
                      kernels=False)
    res = inspect_artifact(tmp_path / "g")
    assert res["kernels"] == [] and res["totals"]["vpdpbusd"] == 0


def test_cli_json(art: Path) -> None:
    r = CliRunner().invoke(main, ["inspect", str(art), "--sass", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert all({"kernel", "layer", "histogram", "hot"} <= set(k) for k in res["kernels"])
    r = CliRunner().invoke(main, ["inspect", str(art.parent)])
    assert r.exit_code == 7


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not installed")
def test_cuda_artifact_sass_per_layer(tmp_path: Path) -> None:
    """A --target cuda artifact built without a GPU: its embedded sm_75 SASS, per layer."""
    import tvm

    dev = tvm.cuda()
    t4 = dev.exist and dev.compute_version == "7.5"
    with pytest.warns(UserWarning, match="oracle check skipped" if not t4 else "synthetic"):
        built = api.compile_model(save(kitchen_sink_model(), tmp_path), tmp_path / "c",
                                  progress=False, target="cuda")
    if t4:  # compile runs its oracle check on the GPU
        assert built.verified.inputs == 2 and built.verified.bit_exact is True
    else:  # no sm_75 GPU: the check is skipped, and the manifest says why
        assert built.verified.inputs == 0 and built.verified.bit_exact is None
        assert "sm_75" in built.verified.skipped
    res = inspect_artifact(tmp_path / "c")
    by_layer = {k["layer"]: k for k in res["kernels"] if k["layer"]}
    for layer in ("stem", "pw", "fc"):  # tensor-core GEMMs
        hot = by_layer[layer]["hot"]
        assert any(op.startswith("IMMA.8816") for op in hot), (layer, hot)
        assert "CALL" not in hot  # no software-emulation helper
    assert res["totals"]["IMMA"] > 0
