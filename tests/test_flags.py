"""env, files, errors: the debug flag, the cache directory, atomic writes, JSON caches and error lines."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from qcompile import env, errors, files
from qcompile.ir.graph import Graph, Node

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("value, on", [(None, False), ("", False), ("0", False), ("1", True),
                                       ("yes", True), ("2", True)])
def test_debug_flag(value: str | None, on: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if value is None:
        monkeypatch.delenv(env.DEBUG_ENV, raising=False)
    else:
        monkeypatch.setenv(env.DEBUG_ENV, value)
    assert env.debug() is on


@pytest.mark.parametrize("value, dumps", [("0", False), ("", False), ("1", True)])
def test_build_ir_dump_follows_the_flag(value: str, dumps: bool, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """build.py used to dump the IR for QCOMPILE_DEBUG=0 too."""
    import tvm

    from qcompile.build import compile as build

    monkeypatch.setenv(env.DEBUG_ENV, value)
    build._debug_dump("relax", tvm.IRModule())
    assert ("=== relax ===" in capsys.readouterr().out) is dumps


def test_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(env.CACHE_ENV, str(tmp_path))
    assert env.cache_dir() == tmp_path and env.cache_dir("a", "b.json") == tmp_path / "a/b.json"
    monkeypatch.delenv(env.CACHE_ENV)
    assert env.cache_dir("x") == Path.home() / ".cache" / "qcompile" / "x"


def test_tvm_threads_defaults_to_every_core() -> None:
    assert int(os.environ[env.THREADS_ENV]) == env.tvm_threads() >= 1


def test_error_line() -> None:
    assert errors.error_line(RuntimeError("\n  first\nsecond\n")) == "first"
    assert errors.error_line(RuntimeError("first\nlast\n\n"), last=True) == "last"
    assert errors.error_line(KeyError()) == "KeyError" and errors.error_line("") == ""
    assert errors.one_line("a\n  b \n\nc") == "a b c"


def test_atomic_open_keeps_the_old_file_on_error(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "f.bin"
    files.atomic_write_bytes(path, b"old")
    with pytest.raises(ValueError), files.atomic_open(path) as f:
        f.write(b"half")
        raise ValueError
    assert path.read_bytes() == b"old" and [p.name for p in path.parent.iterdir()] == ["f.bin"]
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("fmt", [None, 3])
def test_json_cache_survives_a_corrupt_file(tmp_path: Path, fmt: int | None) -> None:
    cache = files.JsonCache(tmp_path / "c.json", fmt)
    assert cache.load() == {}  # missing
    cache.path.write_text('{"format": 3, "entries": {"a": ')  # torn or corrupt
    assert cache.load() == {}
    assert cache.update({"b": 1}) == {"b": 1}  # rewritten whole
    assert cache.load() == {"b": 1}
    cache.update({"c": [2]})
    assert cache.load() == {"b": 1, "c": [2]}
    data = json.loads(cache.path.read_text())
    assert data == ({"b": 1, "c": [2]} if fmt is None else
                    {"format": 3, "entries": {"b": 1, "c": [2]}})
    assert files.JsonCache(cache.path, 4 if fmt else None).load() == ({} if fmt else data)


def test_unwritable_cache_warns(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.warns(UserWarning, match="cache not written"):
        files.JsonCache(tmp_path / "file" / "c.json").update({"a": 1})  # parent is a file


def _dense_graph() -> Graph:
    node = Node("dense", "fc", ("x",), "y", {"act": None},
                {"w": np.ones((4, 8), np.float32), "b": np.zeros(4, np.float32)})
    return Graph("x", (1, 8), "y", (node,), {"x": (1, 8), "y": (1, 4)})


def test_overhead_cache_survives_a_corrupt_file(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The bitplan overhead cache once crashed on a corrupt file (and was not atomic)."""
    from qcompile.mixed import plan as bitplan, latency
    from qcompile.mixed.plan import CostInputs
    from qcompile.config import QuantSpec
    from qcompile.hw.backends import make_target

    monkeypatch.setenv(env.CACHE_ENV, str(tmp_path))
    table = latency.LatencyTable({"fc": {4: 0.5, 8: 1.0}}, "llvm", 1, 2)
    monkeypatch.setattr(latency, "measure_layers", lambda *a, **k: table)
    monkeypatch.setattr(bitplan, "_time_core", lambda *a, **k: 3.0)
    monkeypatch.setattr(bitplan.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    path = tmp_path / "overhead.json"
    path.write_text("{not json")
    cost = bitplan.measured_cost_model(CostInputs(_dense_graph(), b"model", {}, QuantSpec(),
                                                  make_target("llvm")))
    assert cost.overhead_ms == pytest.approx(2.0)
    (entry,) = json.loads(path.read_text()).values()
    assert entry == {"whole_ms": 3.0, "layers_ms": 1.0}
