"""backends: the one table of targets, and options checked before any work."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qcompile import api
from qcompile.hw.backends import BACKENDS, backend, check_options
from qcompile.errors import UsageError
from qcompile.hw.backends import make_target, precisions

pytestmark = pytest.mark.unit


def test_table_reads_without_tvm() -> None:
    """The CLI validates options with the table before deciding to import TVM."""
    code = ("import sys, qcompile.hw.backends, qcompile.cli.main; "
            "assert 'tvm' not in sys.modules, 'tvm imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_names_select_entries() -> None:
    assert set(BACKENDS) == {"llvm", "cuda"}
    assert backend("t4") is backend("cuda") and backend("llvm").name == "llvm"
    with pytest.raises(UsageError, match="--target must be one of llvm, cuda, t4"):
        backend("rocm")


@pytest.mark.parametrize("name, arch", [("llvm", None), ("cuda", "sm_90"), ("t4", None)])
def test_entry_builds_its_target(name: str, arch: str | None) -> None:
    b = backend(name)
    tgt = make_target(name, arch=arch)
    assert tgt.kind.name == b.name and b.target(name, arch, None).kind.name == b.name
    assert precisions(tgt) is b.precisions(b.arch_of(tgt)) is precisions(name, arch)
    assert b.describe(tgt).startswith(b.name)


def test_options_checked_together() -> None:
    assert check_options("llvm", tune=8).name == "llvm"
    with pytest.raises(UsageError, match="llvm only"):
        check_options("cuda", "sm_80", tune=8)
    with pytest.raises(UsageError, match="--arch sm_80 needs --target cuda"):
        check_options("llvm", "sm_80")
    with pytest.raises(UsageError, match="--arch must be one of"):
        check_options("cuda", "sm_10")


def test_tune_with_cuda_refused_before_any_work(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: refused after calibration, allocation and lowering."""
    def no_work(*a: object, **k: object) -> None:
        raise AssertionError("calibration started")

    monkeypatch.setattr(api, "_front", no_work)
    with pytest.raises(UsageError, match="--tune"):
        api.compile_model(tmp_path / "m.onnx", tmp_path / "out", target="cuda", tune=4)
    assert not (tmp_path / "out").exists()
