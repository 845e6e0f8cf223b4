"""Every zoo model compiles integer-only and is bit-exact against the oracle.

Small input sizes keep the suite fast; the layer structure is the full network.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from qcompile import api
from qcompile.frontend import zoo

pytestmark = pytest.mark.tvm

SIZES = {"resnet18": 64, "resnet50": 64, "inceptionv3": 75, "mobilenetv2": 64}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_zoo_model_bit_exact_integer_only(name: str, tmp_path: Path) -> None:
    model = zoo.save(zoo.build(name, input_size=SIZES[name], num_classes=100), tmp_path / "m.onnx")
    res = api.compile_model(model, tmp_path / "art", progress=False)
    assert res.num_layers > 20 and res.verified.bit_exact is True
    check = json.loads((tmp_path / "art" / "manifest.json").read_text())["intcheck"]
    assert check["stages"] == ["core", "codegen", "asm"] and check["asm"]["instructions"] > 1000
    with pytest.warns(UserWarning, match="synthetic"):
        ev = api.evaluate(model, tmp_path / "art", num_samples=32, progress=False)
    assert ev.bit_exact and ev.num_samples == 32
    # synthetic-calibrated 8-bit should still track float closely on these nets
    assert ev.sqnr_db > 15, ev.sqnr_db
