"""Smoke test of the benchmark scripts' table logic (no compiles, no timings)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench_common as bc  # noqa: E402

pytestmark = pytest.mark.unit

COLS = (("row", "precision"), ("size", "size MB"), ("ms", "latency ms"))


def _table(**over: object) -> bc.Table:
    rows = [{"row": "W8A8", "size": "24.5", "ms": "8.5"}, {"row": "W4A4", "size": "13.1", "ms": "5.8"}]
    rows[1].update(over)
    return bc.Table(COLS, rows, "t", ("a note",))


def test_complete_table_passes_and_renders() -> None:
    t = _table()
    bc.check_complete(t)
    md = bc.render_markdown(t)
    lines = md.splitlines()
    assert lines[0] == "**t**"
    assert lines[2] == "| precision | size MB | latency ms |"
    assert lines[3] == "| --- | --- | --- |"
    assert lines[5] == "| W4A4 | 13.1 | 5.8 |"
    assert lines[-1] == "- a note"


@pytest.mark.parametrize("bad", [None, float("nan"), "", "nan", "  "])
def test_missing_cell_fails(bad: object) -> None:
    t = _table(ms=bad)
    assert bc.missing_cells(t) == [(1, "ms")]
    with pytest.raises(bc.IncompleteTableError, match="latency ms"):
        bc.check_complete(t)
    assert "| W4A4 | 13.1 | — |" in bc.render_markdown(t)


def test_absent_cell_and_empty_table_fail() -> None:
    t = bc.Table(COLS, [{"row": "FP32", "size": "97.8"}])
    assert bc.missing_cells(t) == [(0, "ms")]
    with pytest.raises(bc.IncompleteTableError):
        bc.check_complete(bc.Table(COLS, []))


def test_not_applicable_is_not_missing_and_pipes_are_escaped() -> None:
    t = _table(ms=bc.NA, row="a|b")
    bc.check_complete(t)
    assert "| a\\|b | 13.1 | n/a |" in bc.render_markdown(t)


def test_table_needs_unique_columns() -> None:
    with pytest.raises(ValueError):
        bc.Table((("a", "A"), ("a", "B")), [])


def test_formatting() -> None:
    assert bc.fmt_ms({"median_ms": 5.26, "min_ms": 5.2, "max_ms": 9.4}) == "5.26 (5.20–9.40)"
    assert bc.fmt_ms({"median_ms": 26.2, "min_ms": 25.0, "max_ms": 31.0}) == "26.2 (25.0–31.0)"
    assert bc.fmt_ms(None) is None
    assert bc.fmt_num(float("nan")) is None and bc.fmt_num(None) is None
    assert bc.fmt_num(math.inf) == "inf" and bc.fmt_num(1.26, 1) == "1.3"
    assert bc.speedup(8.5, 5.8) == pytest.approx(1.4655, abs=1e-4)
    assert bc.speedup(None, 1.0) is None and bc.speedup(1.0, 0.0) is None
    s = bc.summarize([0.001, 0.003, 0.002])
    assert (s["median_ms"], s["min_ms"], s["max_ms"], s["repeat"]) == (2.0, 1.0, 3.0, 3)


def test_agreement_sqnr() -> None:
    ref = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert bc.agreement_sqnr(ref, ref) == (1.0, math.inf)
    a, s = bc.agreement_sqnr(ref, ref + np.array([[0.0, 0.1], [0.0, -0.1]]))
    assert a == 1.0 and s == pytest.approx(20.0)
    assert bc.agreement_sqnr(ref, ref[::-1])[0] == 0.0


def test_pareto_mask() -> None:
    pts = [(1.0, 10.0), (2.0, 5.0), (2.0, 6.0), (3.0, 5.0), (0.5, 20.0)]
    assert bc.pareto_mask(pts) == [True, True, False, False, True]


def test_interleaved_rounds_strides_slow_configs() -> None:
    calls: list[str] = []

    def runner(fns: dict, repeat: int, warmup: int = 0) -> dict:
        assert repeat == 1 and warmup == 0
        for k, f in fns.items():
            f()
        return {k: [0.001] for k in fns}

    fns = {"fast": lambda: calls.append("fast"), "slow": lambda: calls.append("slow")}
    times = bc.interleaved_rounds(fns, 8, every={"slow": 4}, warmup=2, slow_warmup=1, runner=runner)
    assert len(times["fast"]) == 8 and len(times["slow"]) == 2
    assert calls[:3] == ["fast", "fast", "slow"]  # warm-up
    assert calls[3:7] == ["fast", "slow", "fast", "fast"]  # rounds 0, 1 (slow skipped)
    calls.clear()
    bc.interleaved_rounds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 2,
                          warmup=0, runner=runner)
    assert calls == ["a", "b", "b", "a"]  # the order rotates each round


def test_write_results_is_strict_json(tmp_path: Path) -> None:
    js, md = bc.write_results(tmp_path, "x", {"sqnr": math.inf, "v": float("nan"),
                                              "n": np.int64(3), "p": tmp_path}, "| a |\n")
    data = json.loads(js.read_text())
    assert data == {"sqnr": "inf", "v": "nan", "n": 3, "p": str(tmp_path)}
    assert md.read_text() == "| a |\n"
    assert bc.result_stem("speedup", True, node="vm").startswith("speedup-vm-")
    assert bc.result_stem("speedup", True, node="vm").endswith("-quick")


def test_reproduction_table_fails_on_missing_cell_and_non_exact_module() -> None:
    rr = pytest.importorskip("reproduce_resnet50")  # imports qcompile lazily: cheap
    cols = rr.columns("CPU, 2 threads", 8)
    keys = [k for k, _ in cols]
    full = [dict.fromkeys(keys, "1.0") for _ in rr.ROWS]
    arts = {k: {"art": "x"} for k in rr.CFGS}
    ok = {cfg.key: {"bit_exact": True, "integer_only": True} for cfg in rr.CFGS.values()}
    assert rr.validate(bc.Table(cols, full), arts, ok) == []
    full[2]["meas_ms"] = None
    probs = rr.validate(bc.Table(cols, full), arts, ok)
    assert len(probs) == 1 and "table incomplete" in probs[0]
    full[2]["meas_ms"] = "1.0"
    bad = dict(ok, **{rr.CFGS["int4"].key: {"bit_exact": False, "integer_only": True}})
    assert any("NOT bit-exact" in p for p in rr.validate(bc.Table(cols, full), arts, bad))
    arts["mixed"] = {"error": "BuildError: boom"}
    assert any("compile failed" in p for p in rr.validate(bc.Table(cols, full), arts, ok))
    # every number says where it comes from
    headers = " ".join(h for _, h in cols)
    assert "published, T4, batch 8" in headers and "predicted, T4 roofline" in headers
    assert "measured, CPU, 2 threads, batch 8" in headers


def _fake_result(sp: object, exact: bool = True) -> dict:
    t = lambda ms: {"median_ms": ms, "min_ms": ms, "max_ms": ms, "repeat": 4}  # noqa: E731
    cost = {"size_mb": 11.2, "bops_g": 9.5, "t4_predicted_ms": 0.23}
    plan = {"budgets": {"latency_ms": 2.0}, "predicted_latency_ms": 1.9,
            "latency_source": "measured on llvm"}
    configs = {sp.Q_INT8: {"art": "a", "n4": 0, "n_layers": 21, **cost},
               "qcompile mixed α=0.5": {"art": "b", "n4": 3, "n_layers": 21, "plan": plan, **cost},
               sp.Q_INT4: {"error": "BuildError: boom"}}
    fid = {k: {"bit_exact": exact, "integer_only": True, "top1_agreement": 1.0, "sqnr_db": 30.0}
           for k in (sp.Q_INT8, "qcompile mixed α=0.5")}
    fid[sp.ORT_INT8] = {"top1_agreement": 1.0, "sqnr_db": 33.0}
    timing = {sp.ORT_FP32: t(8.0), sp.ORT_INT8: t(2.0), sp.Q_INT8: t(2.0),
              "qcompile mixed α=0.5": t(2.1)}
    inter = {sp.ORT_FP32: t(9.0), sp.ORT_INT8: t(2.5), sp.Q_INT8: t(2.0),
             "qcompile mixed α=0.5": t(2.2)}
    return {"model": "resnet18", "batches": {"1": {
        "timing": timing, "timing_interleaved": inter, "fidelity": fid, "configs": configs,
        "costs": {k: cost for k in (sp.ORT_FP32, sp.ORT_INT8, sp.TVM_FP32)}}}}


def test_speedup_rows_and_problems() -> None:
    sp = pytest.importorskip("speedup")
    st = sp.Settings([1], [1], 4, 4, 4, 2, [0.5], "llvm", "kl", 4, None, sp.qconfigs([0.5]))
    rows, mixed = sp.model_rows(_fake_result(sp), st)
    by = {r["config"]: r for r in rows}
    assert by[sp.ORT_FP32]["vs_int8"] == "0.25x" and by[sp.ORT_INT8]["vs_fp32"] == "4.00x"
    assert by[sp.ORT_FP32]["agree"] == bc.REFERENCE and by[sp.Q_INT8]["exact"] == "yes"
    assert by[sp.Q_INT4]["latency"] is None and by[sp.Q_INT4]["error"].startswith("BuildError")
    assert by["qcompile mixed α=0.5 (3/21 layers 4-bit)"]["vs_int8"] == "0.95x"
    assert mixed == [{"model": "resnet18", "batch": "1", "alpha": "0.5", "n4": "3/21",
                      "budget": "2.00", "predicted": "1.90", "measured": "2.10", "ratio": "1.050",
                      "ok": "yes", "imeasured": "2.20", "source": "measured on llvm"}]
    # the headline (alone) and the interleaved set, each against ORT INT8 of its own mode
    assert by[sp.Q_INT8]["vs_ort8"] == "1.000" and by[sp.Q_INT8]["ivs_ort8"] == "0.800"
    assert by[sp.ORT_FP32]["vs_ort8"] == "4.000" and by[sp.ORT_INT8]["vs_ort8"] == "1.000"
    assert by[sp.Q_INT8]["alone_median_ms"] == 2.0 and by[sp.Q_INT8]["ratio_vs_ort_int8"] == 1.0
    assert by[sp.Q_INT8]["interleaved_median_ms"] == 2.0
    assert by[sp.Q_INT8]["ratio_vs_ort_int8_interleaved"] == pytest.approx(0.8)
    assert by[sp.Q_INT4]["ilatency"] is None  # failed: missing in both sets
    no_inter = _fake_result(sp)
    no_inter["batches"]["1"]["timing_interleaved"] = {}  # --no-interleaved: n/a, not missing
    by2 = {r["config"]: r for r in sp.model_rows(no_inter, st)[0]}
    assert by2[sp.Q_INT8]["ilatency"] == bc.NA and by2[sp.Q_INT8]["ivs_ort8"] == bc.NA
    table = bc.Table(sp.MAIN_COLUMNS, rows)
    assert {k for _, k in bc.missing_cells(table)} >= {"latency", "size"}  # the failed INT4 row
    assert sp.problems([_fake_result(sp)]) == ["resnet18 batch 1 qcompile INT4: BuildError: boom"]
    assert len(sp.problems([_fake_result(sp, exact=False)])) == 3
    pts = sp.plot_series([_fake_result(sp)])["resnet18 batch 1"]
    assert ("INT8", 11.2, 2.0) in pts and len(pts) == 4


def test_ort_timing_uses_onnxruntime_defaults() -> None:
    """The headline ORT timing must not turn spin-waiting off (issue 11): default options."""
    peers = pytest.importorskip("peers")
    from qcompile import api
    for make in (peers.ort_options, api.ort_session_options):
        so = make()
        with pytest.raises(RuntimeError):  # no allow_spinning entry at all: ORT's default (on)
            so.get_session_config_entry("session.intra_op.allow_spinning")
        assert so.intra_op_num_threads == 0  # onnxruntime picks its own thread count
        off = make(spinning=False)
        assert off.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert off.intra_op_num_threads >= 1
    import inspect
    assert inspect.signature(api.ort_bench).parameters["spinning"].default is True
    assert inspect.signature(peers.ort_session).parameters["spinning"].default is False


def test_time_ort_alone_on_a_tiny_model(tmp_path: Path) -> None:
    peers = pytest.importorskip("peers")
    import onnx
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "relu.onnx"))
    t = peers.time_ort_alone(tmp_path / "relu.onnx", np.zeros((2, 4), np.float32), 4, 1)
    assert len(t) == 4 and all(v > 0 for v in t)


def test_time_alone_runs_blocks_one_after_another(monkeypatch: pytest.MonkeyPatch) -> None:
    sp = pytest.importorskip("speedup")
    calls: list[tuple[str, int, int]] = []

    def timer(key: str):
        def f(x: np.ndarray, n: int, w: int) -> list[float]:
            calls.append((key, n, w))
            return [0.001 * (len(calls))] * n
        return f

    keys = [sp.ORT_FP32, sp.ORT_INT8, sp.TVM_FP32, sp.Q_INT8]
    monkeypatch.setattr(sp, "alone_blocks", lambda *a: [(k, timer(k)) for k in keys])
    files = sp.ModelFiles("m", Path("a"), Path("b"), None, [], (1, 3, 8, 8), "test")
    out = sp.time_alone(files, 1, {}, None, runs=6, warmup=3, fp32_every=4, passes=2)
    # one block per configuration, in order, the sequence repeated per pass
    assert [c[0] for c in calls] == keys * 2
    assert calls[0] == (sp.ORT_FP32, 6, 3) and calls[2] == (sp.TVM_FP32, 1, 1)
    assert out[sp.ORT_FP32]["repeat"] == 12 and out[sp.TVM_FP32]["repeat"] == 2
    assert out[sp.Q_INT8]["pass_medians_ms"] == [4.0, 8.0] and out[sp.Q_INT8]["passes"] == 2
    assert sp.alone_runs(1) == 30 and sp.alone_runs(8) == 10 and sp.alone_runs(1, quick=True) == 5
