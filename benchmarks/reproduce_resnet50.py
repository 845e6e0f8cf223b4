"""ResNet-50 in the shape of HAWQ-V3's table: FP32, W8A8, mixed (latency budget 0.5), W4A4.

    python benchmarks/reproduce_resnet50.py            # batch 8, 20 rounds, hessian sensitivity
    python benchmarks/reproduce_resnet50.py --quick    # CI: 5 rounds, 4 calibration samples, kl

Beside each row: HAWQ-V3's published T4 figures (batch 8), our T4 roofline prediction
(qcompile.mixed.costs) and what this machine measured (FP32 with onnxruntime, the rest with
qcompile's compiled integer-only modules).  Every number says where it comes from.

Exits 1 when a module is not bit-exact against the NumPy oracle or not integer-only,
when a compile fails, or when the table has a missing cell.  Writes
benchmarks/results/resnet50-<machine>-<date>[-quick].{json,md}.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import bench_common as bc  # noqa: E402
import speedup as sp  # noqa: E402

# HAWQ-V3 (Yao et al., ICML 2021), ResNet-50 on an NVIDIA T4 with TVM, batch 8.
PUBLISHED_LABEL = "published, T4, batch 8"
PUBLISHED: dict[str, dict[str, float]] = {
    "fp32": {"size_mb": 97.8, "latency_ms": 26.2},
    "int8": {"size_mb": 24.5, "latency_ms": 8.5},
    "mixed": {"size_mb": 18.7, "latency_ms": 6.9},
    "int4": {"size_mb": 13.1, "latency_ms": 5.8},
}
PREDICTED_LABEL = "predicted, T4 roofline"
T4_BATCH = 8
ALPHA = 0.5
ROWS = (("fp32", "FP32"), ("int8", "W8A8"), ("mixed", f"W4/8A4/8 mixed (latency budget {ALPHA:g})"),
        ("int4", "W4A4"))
CFGS = {"int8": sp.QConfig(sp.Q_INT8, 8), "mixed": sp.QConfig(f"qcompile mixed α={ALPHA:g}", alpha=ALPHA),
        "int4": sp.QConfig(sp.Q_INT4, 4)}


def columns(measured_label: str, batch: int) -> tuple[tuple[str, str], ...]:
    m = f"measured, {measured_label}, batch {batch}"
    return (("row", "precision"),
            ("size", "size MB (ours, computed)"), ("bops", "BOPs G (ours, computed)"),
            ("exact", "bit-exact + integer-only (ours)"),
            ("pub_size", f"size MB ({PUBLISHED_LABEL})"),
            ("pub_ms", f"latency ms ({PUBLISHED_LABEL})"), ("pub_x", "speedup vs INT8 (published)"),
            ("pred_ms", f"latency ms ({PREDICTED_LABEL}, batch {T4_BATCH})"),
            ("pred_x", "speedup vs INT8 (predicted)"),
            ("meas_ms", f"latency ms, median (min–max) ({m})"), ("meas_x", "speedup vs INT8 (measured)"))


def t4_plan(files: sp.ModelFiles, a: argparse.Namespace) -> dict[str, Any]:
    """The plan qcompile would compile for the T4 at the published batch (T4 roofline latency)."""
    from qcompile import api
    from qcompile.config import AllocSpec, CalibSpec
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = api.allocate_model(files.onnx, target="cuda", batch=T4_BATCH, progress=False,
                                  calib=CalibSpec(num_samples=a.calib_samples),
                                  alloc=AllocSpec(latency=f"{ALPHA:g}", sensitivity=a.sensitivity,
                                                  sensitivity_samples=a.sensitivity_samples)
                                  ).to_json()
    from qcompile.config import precision
    bits = {la["name"]: la["precision"] for la in plan["layers"]}  # "w4a4" on the T4
    return {"bits": bits, "n4": sum(precision(b)[0] == 4 for b in bits.values()),
            "n_layers": len(bits),
            "budget_ms": plan["budgets"].get("latency_ms"), **sp.plan_costs(files, bits, T4_BATCH)}


def build_rows(files: sp.ModelFiles, arts: dict[str, dict], fid: dict[str, dict],
               timing: dict[str, dict], t4: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per precision; values are formatted strings (None where missing)."""
    fp32 = sp.plan_costs(files, 32, T4_BATCH)
    pred = {"fp32": fp32["t4_predicted_ms"], "mixed": t4["t4_predicted_ms"]}
    for key in ("int8", "int4"):
        if "bits" in arts.get(key, {}):
            pred[key] = sp.plan_costs(files, arts[key]["bits"], T4_BATCH)["t4_predicted_ms"]
    meas = {"fp32": timing.get(sp.ORT_FP32)}
    meas.update({k: timing.get(CFGS[k].key) for k in CFGS})
    med = {k: (t or {}).get("median_ms") for k, t in meas.items()}
    rows = []
    for key, label in ROWS:
        c = arts.get(key, sp.plan_costs(files, 32, 1) if key == "fp32" else {})
        f = fid.get(CFGS[key].key, {}) if key in CFGS else {}
        exact = bc.NA if key == "fp32" else (
            ("yes" if f.get("bit_exact") and f.get("integer_only") else "NO") if f else None)
        rows.append({
            "row": label + (" (measured: ORT FP32)" if key == "fp32" else ""),
            "size": bc.fmt_num(c.get("size_mb"), 1), "bops": bc.fmt_num(c.get("bops_g"), 0),
            "exact": exact, "pub_size": bc.fmt_num(PUBLISHED[key]["size_mb"], 1),
            "pub_ms": bc.fmt_num(PUBLISHED[key]["latency_ms"], 1),
            "pub_x": bc.fmt_speedup(PUBLISHED["int8"]["latency_ms"], PUBLISHED[key]["latency_ms"]),
            "pred_ms": bc.fmt_num(pred.get(key), 2),
            "pred_x": bc.fmt_speedup(pred.get("int8"), pred.get(key)),
            "meas_ms": bc.fmt_ms(meas.get(key)), "meas_x": bc.fmt_speedup(med.get("int8"), med.get(key))})
    return rows


def validate(table: bc.Table, arts: dict[str, dict], fid: dict[str, dict]) -> list[str]:
    """Everything that must make the reproduction fail (empty list: it passes)."""
    out = [f"{k}: compile failed: {c['error']}" for k, c in arts.items() if "error" in c]
    for k, cfg in CFGS.items():
        f = fid.get(cfg.key)
        if k in arts and "error" not in arts[k]:
            if not f:
                out.append(f"{k}: not evaluated")
            elif not f.get("bit_exact"):
                out.append(f"{k}: the compiled module is NOT bit-exact against the NumPy oracle")
            elif not f.get("integer_only"):
                out.append(f"{k}: the compiled module is NOT integer-only")
    try:
        bc.check_complete(table)
    except bc.IncompleteTableError as e:
        out.append(f"table incomplete: {e}")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=T4_BATCH, help="measured batch (default 8, as published)")
    ap.add_argument("--repeat", type=int, default=None, help="timing rounds (default 20; 5 with --quick)")
    ap.add_argument("--calib-samples", type=int, default=None, help="default 32; 4 with --quick")
    ap.add_argument("--eval-samples", type=int, default=None,
                    help="samples for the bit-exact check and fidelity (default 4; 2 with --quick)")
    ap.add_argument("--sensitivity", choices=("hessian", "kl"), default=None,
                    help="default hessian; kl with --quick (forward-only, faster)")
    ap.add_argument("--sensitivity-samples", type=int, default=None, help="default 8; 4 with --quick")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--quick", action="store_true", help="CI settings (see above)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    a = ap.parse_args(argv)
    q = a.quick
    a.repeat = a.repeat or (5 if q else 20)
    a.calib_samples = a.calib_samples or (4 if q else 32)
    a.eval_samples = a.eval_samples or (2 if q else 4)
    a.sensitivity = a.sensitivity or ("kl" if q else "hessian")
    a.sensitivity_samples = a.sensitivity_samples or (4 if q else 8)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    clock = bc.Stopwatch()
    from tqdm import tqdm
    steps = 1 + len(CFGS) + 1 + len(CFGS) + 1 + len(CFGS)  # timing: ORT FP32 + ours, one block each
    with tempfile.TemporaryDirectory() as d, tqdm(total=steps, desc="resnet50", unit="step") as bar:
        work = Path(d)

        def step(what: str) -> None:
            bar.set_postfix_str(what, refresh=True)

        step("prepare")
        files = sp.prepare_model("resnet50", work, a.input_size)
        bar.update(1)
        arts = {}
        for k, cfg in CFGS.items():
            step(f"compile {cfg.key}, batch {a.batch}")
            arts[k] = sp.compile_q(files, cfg, a.batch, work / f"r50-{k}", target="llvm",
                                   calib_n=a.calib_samples, sensitivity=a.sensitivity,
                                   sens_samples=a.sensitivity_samples)
            bar.update(1)
        step(f"T4 plan (α={ALPHA:g}, batch {T4_BATCH})")
        t4 = t4_plan(files, a)
        bar.update(1)
        by_key = {cfg.key: arts[k] for k, cfg in CFGS.items()}
        x = np.random.default_rng(1).normal(size=(a.eval_samples, *files.input_shape[1:])).astype(np.float32)
        fid = sp.fidelity(files, x, by_key, None, step, lambda: bar.update(1), peers=False)
        step(f"timing batch {a.batch}")
        # each configuration alone in its own block; onnxruntime with its defaults
        timing = sp.time_alone(files, a.batch, by_key, None, runs=a.repeat, warmup=3,
                               progress=lambda i: bar.update(1))
    rows = build_rows(files, arts, fid, timing, t4)
    prov = bc.provenance(None if argv is None else [__file__, *argv],
                         ort_threads=bc.ORT_DEFAULT_THREADS)
    label = bc.machine_label(prov)
    mixed = arts["mixed"]
    plan = mixed.get("plan") or {}
    budget = (plan.get("budgets") or {}).get("latency_ms")
    m_ms = (timing.get(CFGS["mixed"].key) or {}).get("median_ms")
    ratio = bc.speedup(m_ms, budget)
    notes = [
        f"Model: {files.source}, input {'x'.join(map(str, files.input_shape[1:]))}; the weights are "
        "random, so only size, BOPs and latency are comparable with the paper, not accuracy.",
        f"{PUBLISHED_LABEL}: HAWQ-V3 (Yao et al., ICML 2021), ResNet-50, TVM on an NVIDIA T4.",
        f"{PREDICTED_LABEL}: qcompile.mixed.costs model of a T4 (datasheet peaks, assumed efficiencies), "
        f"never measured; FP32 row = all layers FP32. The mixed row's prediction is the plan "
        f"qcompile allocates for the T4 (α={ALPHA:g} under the T4 model, batch {T4_BATCH}): "
        f"{t4['n4']}/{t4['n_layers']} layers at 4 bits, {t4['size_mb']:.1f} MB, {t4['bops_g']:.0f} G BOPs.",
        f"measured, {label}: batch {a.batch} latency, median (min–max) of {a.repeat} "
        "runs, each configuration timed alone in its own block after 3 warm-up runs; FP32 = "
        "onnxruntime FP32 with its default SessionOptions (spin-waiting on), "
        "W8A8/mixed/W4A4 = qcompile's compiled integer-only modules (llvm).",
        f"Mixed (measured row): allocated for this CPU from its measured per-layer latencies "
        f"({plan.get('latency_source', '?')}), {mixed.get('n4', '?')}/{mixed.get('n_layers', '?')} "
        f"layers at 4 bits; budget {bc.fmt_num(budget, 2)} ms, plan predicted "
        f"{bc.fmt_num(plan.get('predicted_latency_ms'), 2)} ms, measured {bc.fmt_num(m_ms, 2)} ms, "
        f"measured/budget {bc.fmt_num(ratio, 3)} (≤ 1.05 asked).",
        f"Size and BOPs: conv/dense weights + int32 bias (FP32: 32-bit), MB = 2^20 bytes; "
        f"sensitivity {a.sensitivity} on {a.sensitivity_samples} samples, "
        f"{a.calib_samples} synthetic calibration samples; bit-exact checked on "
        f"{a.eval_samples} inputs." + (" Quick run (--quick): fewer rounds and samples." if a.quick else ""),
    ]
    table = bc.Table(columns(label, a.batch), rows,
                     f"ResNet-50, HAWQ-V3 table shape (batch {a.batch} measured)", tuple(notes))
    bad = validate(table, arts, fid)
    markdown = bc.render_markdown(table) + "\n" + bc.provenance_line(prov) + "\n"
    wall = clock.seconds
    data = {"provenance": prov, "quick": a.quick,
            "settings": {k: v for k, v in vars(a).items() if k != "out"}, "wall_seconds": wall,
            "published": PUBLISHED, "t4_plan": t4, "configs": arts, "fidelity": fid,
            "timing": timing, "mixed_budget_check": {"budget_ms": budget, "measured_ms": m_ms,
                                                     "ratio": ratio},
            "table": bc.table_json(table), "problems": bad}
    return bc.finish(a.out, bc.result_stem("resnet50", a.quick), data, markdown, bad, wall)


if __name__ == "__main__":
    sys.exit(main())
