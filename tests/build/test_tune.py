"""Tests for qcompile.build.tune: per-unique-PrimFunc tuning with a persisted database.

One tiny tuning run (a few trials on an int32 add/shift/clip) is shared by the module;
everything else reuses its database or tunes nothing.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import relax, tirx
from tvm.s_tir import meta_schedule as ms

from qcompile.build import tune
from qcompile.build.compile import legalize
from qcompile.errors import UsageError
from qcompile.verify.intcheck import check_integer_only
from qcompile.hw.backends import make_target

SHAPE = (64, 256)
TRIALS = 4
TARGET = make_target("llvm")


def _chain() -> tirx.PrimFunc:
    """clip((x + y) >> 3) on int32, legalized and fused into one PrimFunc."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(SHAPE, "int32"))
    y = relax.Var("y", relax.TensorType(SHAPE, "int32"))
    with bb.function("main", [x, y]):
        with bb.dataflow():
            a = bb.emit(relax.op.add(x, y))
            b = bb.emit(relax.op.right_shift(a, relax.const(3, "int32")))
            c = bb.emit_output(relax.op.clip(b, -128, 127))
        bb.emit_func_output(c)
    mod = legalize(bb.get(), TARGET)
    (func,) = [f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    return func


def tiny_module() -> tvm.IRModule:
    """``main``, ``twin`` and ``kern`` each call one copy of the same PrimFunc.

    ``main``'s and ``twin``'s copies differ only in their names (one task); ``kern``'s is
    marked as a hand-scheduled kernel (op_pattern 8, as schedule.py does), to be skipped.
    """
    func = _chain()
    bb = relax.BlockBuilder()
    for name, prim in (("main", "ew_a"), ("twin", "ew_b"), ("kern", "kernel")):
        f = func.with_attr("global_symbol", prim)
        gv = bb.add_func(f.with_attr("op_pattern", 8) if name == "kern" else f, prim)
        x = relax.Var("x", relax.TensorType(SHAPE, "int32"))
        y = relax.Var("y", relax.TensorType(SHAPE, "int32"))
        with bb.function(name, [x, y]):
            with bb.dataflow():
                out = bb.emit_output(relax.call_tir(gv, [x, y], relax.TensorType(SHAPE, "int32")))
            bb.emit_func_output(out)
    return bb.get()


def _inputs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    # Large enough that the shift and both clip bounds are exercised.
    return (rng.integers(-2**12, 2**12, SHAPE, dtype=np.int32),
            rng.integers(-2**12, 2**12, SHAPE, dtype=np.int32))


def _run(mod: tvm.IRModule, fn: str = "main") -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, TARGET), tvm.cpu())
    x, y = _inputs()
    return vm[fn](tvm.runtime.tensor(x), tvm.runtime.tensor(y)).numpy()


def _reference() -> np.ndarray:
    x, y = _inputs()
    return np.clip((x + y) >> 3, -128, 127)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> tuple[tvm.IRModule, tune.TuneReport]:
    mod = tiny_module()
    db_dir = tmp_path_factory.mktemp("tune") / "db"
    return mod, tune.tune_module(mod, TARGET, TRIALS, db_dir, progress=False)


@pytest.mark.unit
def test_default_db_dir_keyed_by_target_and_env(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path))
    d = tune.default_db_dir(TARGET)
    assert d.parent == tmp_path / "tune" and d == tune.default_db_dir(TARGET)
    other = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 1})
    assert tune.default_db_dir(other) != d
    monkeypatch.delenv("QCOMPILE_CACHE_DIR")
    assert tune.default_db_dir(TARGET).parent == Path.home() / ".cache" / "qcompile" / "tune"


@pytest.mark.unit
def test_extract_dedups_and_skips_kernels() -> None:
    mod = tiny_module()
    tasks, skipped = tune.extract_tasks(mod)
    assert len(tasks) == 1 and tasks[0].funcs == ("ew_a", "ew_b")  # one shape, two names
    assert tasks[0].signature == "int32[64,256], int32[64,256] -> int32[64,256]"
    assert skipped == [("kernel", "hand-scheduled kernel (op_pattern 8)")]
    # Too small to be worth a task.
    assert tune.extract_tasks(mod, min_elements=10**6)[0] == []


@pytest.mark.unit
def test_symbolic_shapes_are_skipped() -> None:
    """Without kernels the batch is symbolic; meta-schedule measures static shapes only."""
    n = tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType((n, 64), "int32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.add(x, x))
        bb.emit_func_output(y)
    tasks, skipped = tune.extract_tasks(legalize(bb.get(), TARGET))
    assert tasks == [] and [why for _, why in skipped] == ["symbolic shape"]


@pytest.mark.tvm
def test_tune_writes_database(tuned: tuple[tvm.IRModule, tune.TuneReport]) -> None:
    _, rep = tuned
    (task,) = rep.tasks
    assert task.trials_before == 0 and task.trials_run == TRIALS and not task.reused
    assert task.best_us is not None and task.untuned_us is not None
    assert task.best_us <= task.untuned_us  # the untuned schedule is itself a record
    records = (rep.db_dir / "database_tuning_record.json").read_text().splitlines()
    assert len(records) >= 2  # the untuned baseline and at least one tuned candidate
    assert (rep.db_dir / "database_workload.json").stat().st_size > 0
    ledger = json.loads((rep.db_dir / tune.LEDGER).read_text())
    assert ledger[task.structural_hash]["trials"] == TRIALS
    assert task.name in rep.summary()


@pytest.mark.tvm
def test_applied_module_is_bit_exact_and_leaves_kernels(
        tuned: tuple[tvm.IRModule, tune.TuneReport]) -> None:
    mod, rep = tuned
    applied = tune.apply_database(mod, TARGET, rep.db_dir)
    (task,) = rep.tasks
    for name in task.funcs:
        assert applied[name].attrs["tirx.is_scheduled"]
    (kernel,) = [n for n, _ in rep.skipped]
    assert applied[kernel].same_as(mod[kernel])
    assert check_integer_only(applied, "main").ok
    want = _reference()
    for fn in ("main", "twin", "kern"):
        np.testing.assert_array_equal(_run(applied, fn), want)


def _check_every_record(db_dir: Path, inputs: tuple[np.ndarray, ...], want: np.ndarray) -> int:
    """Not only the best: each schedule in the database computes the same bits."""
    records = ms.database.JSONDatabase(work_dir=str(db_dir)).get_all_tuning_records()
    for rec in records:
        lib = tvm.compile(rec.as_measure_candidate().sch.mod, TARGET)
        out = tvm.runtime.tensor(np.zeros(want.shape, want.dtype))
        lib["main"](*(tvm.runtime.tensor(a) for a in inputs), out)
        np.testing.assert_array_equal(out.numpy(), want)
    return len(records)


@pytest.mark.tvm
def test_every_tuned_schedule_is_bit_exact(tuned: tuple[tvm.IRModule, tune.TuneReport]) -> None:
    assert _check_every_record(tuned[1].db_dir, _inputs(), _reference()) >= 2


@pytest.mark.tvm
def test_second_run_reuses_database(tuned: tuple[tvm.IRModule, tune.TuneReport]) -> None:
    mod, rep = tuned
    n_records = len((rep.db_dir / "database_tuning_record.json").read_text().splitlines())
    # reuse is proven by the counts below (no new trials), not by a wall-clock limit
    again = tune.tune_module(mod, TARGET, TRIALS, rep.db_dir, progress=False)
    (task,) = again.tasks
    assert task.reused and task.trials_before >= TRIALS and task.trials_run == 0
    assert len(again.reused) == 1 and not again.new
    assert task.best_us == pytest.approx(rep.tasks[0].best_us)
    # A smaller budget is covered too; nothing new was measured.
    assert tune.tune_module(mod, TARGET, 1, rep.db_dir, progress=False).tasks[0].reused
    assert len((rep.db_dir / "database_tuning_record.json").read_text().splitlines()) == n_records


@pytest.mark.tvm
def test_corrupt_ledger_is_ignored(tuned: tuple[tvm.IRModule, tune.TuneReport],
                                   tmp_path: Path) -> None:
    """A torn ledger reads as empty: the database's own valid records count instead (at
    most a top-up), and the ledger is rewritten whole."""
    mod, rep = tuned
    db = tmp_path / "db"
    shutil.copytree(rep.db_dir, db)
    (db / tune.LEDGER).write_text("{torn")
    (task,) = tune.tune_module(mod, TARGET, TRIALS, db, progress=False).tasks
    assert task.trials_before + task.trials_run >= TRIALS and task.error is None
    if task.trials_run:
        assert json.loads((db / tune.LEDGER).read_text())[task.structural_hash]["trials"] == TRIALS


@pytest.mark.unit
def test_apply_without_database_is_identity(tmp_path: Path) -> None:
    mod = tiny_module()
    assert tune.apply_database(mod, TARGET, tmp_path / "none").same_as(mod)


@pytest.mark.unit
def test_rejects_cuda_and_bad_trials(tmp_path: Path) -> None:
    mod = tiny_module()
    cuda = tvm.target.Target("nvidia/nvidia-t4", host=TARGET)
    with pytest.raises(UsageError, match="llvm only"):
        tune.tune_module(mod, cuda, 4, tmp_path)
    with pytest.raises(UsageError, match="positive"):
        tune.tune_module(mod, TARGET, 0, tmp_path)


@pytest.mark.tvm
@pytest.mark.slow
def test_grouped_int8_conv_tuned_bit_exact(tmp_path: Path) -> None:
    """A layer no kernel covers (grouped int8 conv, int32 accumulate): real tiling choices."""
    x = relax.Var("x", relax.TensorType((1, 16, 16, 32), "int8"))
    w = relax.Var("w", relax.TensorType((32, 3, 3, 8), "int8"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.conv2d(x, w, padding=1, groups=4, data_layout="NHWC",
                                                  kernel_layout="OHWI", out_dtype="int32"))
        bb.emit_func_output(y)
    mod = legalize(bb.get(), TARGET)
    rep = tune.tune_module(mod, TARGET, 16, tmp_path, progress=False)
    assert len(rep.tasks) == 1 and rep.tasks[0].trials_run == 16
    rng = np.random.default_rng(1)
    xs = rng.integers(-128, 128, (1, 16, 16, 32), dtype=np.int8)
    ws = rng.integers(-128, 128, (32, 3, 3, 8), dtype=np.int8)
    vm = relax.VirtualMachine(tvm.compile(tune.apply_database(mod, TARGET, tmp_path), TARGET),
                              tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(xs), tvm.runtime.tensor(ws)).numpy()
    xp = np.pad(xs.astype(np.int32), ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = np.zeros((1, 16, 16, 32), np.int32)
    for g in range(4):
        for dy in range(3):
            for dx in range(3):
                c = slice(g * 8, (g + 1) * 8)
                want[..., c] += xp[:, dy:dy + 16, dx:dx + 16, c] @ ws[c, dy, dx].T.astype(np.int32)
    np.testing.assert_array_equal(got, want)
    assert _check_every_record(tmp_path, (xs, ws), want) > 2
