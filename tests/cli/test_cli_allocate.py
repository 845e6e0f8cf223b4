"""Mixed precision from the command line, end to end on the committed Fashion-MNIST ResNet:
budgets are honoured by the compiled plan, pins and ties hold, infeasible budgets exit 8,
and every plan compiles bit-exact. Latency and sensitivity caches live in tmp_path."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from qcompile import api
from qcompile.cli import main as cli
from qcompile.errors import InfeasibleBudgetError

MODEL = Path(__file__).parents[1] / "data" / "fashion_resnet.onnx"
COMMON = ["--sensitivity", "kl", "--calib-samples", "8", "--sensitivity-samples", "4"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "qc-cache"))
    monkeypatch.delenv("QCOMPILE_DEBUG", raising=False)


def _run(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(cli.main, list(args))
    return r.exit_code, r.output


@pytest.mark.tvm
def test_allocate_json_honours_size_budget_pins_and_ties() -> None:
    code, out = _run("allocate", str(MODEL), "--budget-size", "0.3", "--pin", "*layers.3*=8",
                     "--json", *COMMON)
    assert code == 0, out
    plan = json.loads(out[out.index("{"):])
    assert plan["size_mb"] <= plan["budgets"]["size_mb"] * (1 + 1e-9)
    bits = {layer["name"]: layer["bits"] for layer in plan["layers"]}
    reasons = {layer["name"]: layer["reason"] for layer in plan["layers"]}
    assert bits["/stem/stem.0/Conv"] == 8 and bits["/fc/Gemm"] == 8
    assert all(b == 8 for n, b in bits.items() if "layers.3" in n)
    assert any(r.startswith("pinned (*layers.3*") for r in reasons.values())
    # the shortcut conv and the block's first conv read one tensor: tied
    assert bits["/layers/layers.1/conv1/Conv"] == bits["/layers/layers.1/downsample/downsample.0/Conv"]
    assert 4 in bits.values()  # a 0.3 size budget cannot be met at 8 bits everywhere
    assert plan["latency_source"].startswith("measured")
    for key in ("predicted_latency_ms", "size_mb", "bops_g", "budgets", "layers"):
        assert key in plan


@pytest.mark.unit
def test_pin_dry_run_lists_matches() -> None:
    code, out = _run("allocate", str(MODEL), "--pin", "*conv1*=4", "--pin", "nothing*=8",
                     "--pin-dry-run")
    assert code == 0, out
    assert "*conv1*=4: 4 layer(s)" in out and "nothing*=8: 0 layer(s)" in out


@pytest.mark.tvm
def test_infeasible_budget_exits_8_with_the_minimum() -> None:
    code, out = _run("allocate", str(MODEL), "--budget-size", "1KB", *COMMON)
    assert code == InfeasibleBudgetError.exit_code, out
    line = [x for x in out.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "minimum achievable" in line[0] and "--budget-size" in line[0]


@pytest.mark.tvm
def test_bad_budget_is_a_usage_error() -> None:
    code, out = _run("allocate", str(MODEL), "--budget-latency", "fast", *COMMON)
    assert code == 2 and "--budget-latency" in out


@pytest.mark.tvm
def test_compiled_plan_meets_size_budget_and_is_bit_exact(tmp_path: Path) -> None:
    out = tmp_path / "mixed"
    code, text = _run(str(MODEL), "-o", str(out), "--budget-size", "0.5", "-q", *COMMON)
    assert code == 0, text
    cfg = json.loads((out / "qconfig.json").read_text())
    plan, costs = cfg["plan"], cfg["costs"]
    assert costs["bits"] == {layer["name"]: layer["precision"] for layer in plan["layers"]}
    # llvm runs the allocator's 4-bit choice as W4A8 (targets.PRECISIONS)
    assert {layer["precision"] for layer in plan["layers"]} <= {"w8a8", "w4a8"}
    assert costs["size_mb"] <= plan["budgets"]["size_mb"] * (1 + 1e-9)
    assert sorted(set(costs["bits"].values())) == ["w4a8", "w8a8"]
    assert "## Mixed-precision plan" in (out / "report.md").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verified"]["bit_exact"] is True  # compile's own check, W4A8 layers too
    assert manifest["intcheck"]["stages"] == ["core", "codegen", "asm"]
    ev = api.evaluate(MODEL, out, inputs=_inputs(), progress=False)
    assert ev.bit_exact


@pytest.mark.unit
def test_sensitivity_command_json() -> None:
    code, out = _run("sensitivity", str(MODEL), "--sensitivity", "kl",
                     "--sensitivity-samples", "4", "--json")
    assert code == 0, out
    res = json.loads(out[out.index("{"):])
    assert res["method"] == "kl" and len(res["omega"]) == 12
    assert all(v["4"] > v["8"] for v in res["omega"].values())
    # The old spellings still work, each with a one-line deprecation warning.
    code, old = _run("sensitivity", str(MODEL), "--method", "kl", "--samples", "4", "--json")
    assert code == 0 and json.loads(old[old.index("{"):])["omega"] == res["omega"]
    assert "warning: --method is deprecated; use --sensitivity" in old
    assert "warning: --samples is deprecated; use --sensitivity-samples" in old


def _inputs():
    import numpy as np
    return np.random.default_rng(0).normal(size=(8, 1, 28, 28)).astype(np.float32)
