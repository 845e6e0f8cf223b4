"""speedup.py's report: the table columns, one row per configuration, the plot series and
the problems that fail the run. Data in (the measured results), rows out; no timing here."""
from __future__ import annotations

from typing import Any

import bench_common as bc
from speedup_config import ORT_FP32, ORT_INT8, Q_INT4, Q_INT8, TVM_FP32, Settings  # noqa: F401



# --- tables -------------------------------------------------------------------------------
MAIN_COLUMNS = (("model", "model"), ("batch", "batch"), ("config", "configuration"),
                ("latency", "alone: latency ms, median (min–max)"),
                ("vs_ort8", "alone: latency / ORT INT8 (< 1: faster)"),
                ("vs_int8", "alone: speedup vs qcompile INT8"),
                ("vs_fp32", "alone: speedup vs ORT FP32"),
                ("ilatency", "interleaved, ORT spinning off: latency ms, median (min–max)"),
                ("ivs_ort8", "interleaved: latency / ORT INT8"),
                ("size", "size MB"), ("bops", "BOPs G"), ("agree", "top-1 agreement vs FP32"),
                ("sqnr", "SQNR dB vs FP32"), ("exact", "bit-exact + integer-only"),
                ("t4", "T4 predicted ms (roofline)"))
MIXED_COLUMNS = (("model", "model"), ("batch", "batch"), ("alpha", "latency budget α"),
                 ("n4", "4-bit layers"), ("budget", "budget ms"), ("predicted", "plan predicted ms"),
                 ("measured", "measured ms (median, alone)"), ("ratio", "measured / budget"),
                 ("ok", "measured ≤ budget + 5%"),
                 ("imeasured", "measured ms (median, interleaved)"))


def _exact(f: dict[str, Any]) -> str | None:
    if "bit_exact" not in f:
        return None  # not evaluated: a missing cell
    return "yes" if f["bit_exact"] and f["integer_only"] else "NO"


def model_rows(r: dict[str, Any], st: Settings) -> tuple[list[dict], list[dict]]:
    rows, mixed = [], []
    for b, d in r["batches"].items():
        tim, fid, confs = d["timing"], d["fidelity"], d["configs"]
        itim = d.get("timing_interleaved") or {}
        med = {k: t["median_ms"] for k, t in tim.items()}
        imed = {k: t["median_ms"] for k, t in itim.items()}
        keys = [ORT_FP32, ORT_INT8] + ([TVM_FP32] if TVM_FP32 in tim else []) + [c.key for c in st.cfgs]
        for k in keys:
            c = confs.get(k, {})
            cost = c if k in confs else d["costs"][k]
            f = fid.get(k, {})
            label = k
            if k == TVM_FP32:
                n = tim[k]["repeat"]
                label = f"{k} (untuned, {n} rep{'s' if n != 1 else ''})"
            elif "n4" in c and k != Q_INT8:
                label = f"{k} ({c['n4']}/{c['n_layers']} layers 4-bit)"
            failed = "error" in c
            ratio8 = bc.speedup(med.get(k), med.get(ORT_INT8))  # ms / ORT INT8 ms
            iratio8 = bc.speedup(imed.get(k), imed.get(ORT_INT8))
            rows.append({
                "model": r["model"], "batch": b, "config": label,
                "latency": bc.fmt_ms(tim.get(k)) if not failed else None,
                "vs_ort8": bc.fmt_num(ratio8, 3),
                "vs_int8": bc.fmt_speedup(med.get(Q_INT8), med.get(k)),
                "vs_fp32": bc.fmt_speedup(med.get(ORT_FP32), med.get(k)),
                "ilatency": (bc.fmt_ms(itim.get(k)) if itim else bc.NA) if not failed else None,
                "ivs_ort8": bc.fmt_num(iratio8, 3) if itim else bc.NA,
                # numbers for the JSON (not columns): the headline and the second set
                "alone_median_ms": med.get(k), "ratio_vs_ort_int8": ratio8,
                "interleaved_median_ms": imed.get(k), "ratio_vs_ort_int8_interleaved": iratio8,
                "size": bc.fmt_num(cost.get("size_mb"), 1), "bops": bc.fmt_num(cost.get("bops_g"), 1),
                "agree": bc.REFERENCE if k == ORT_FP32 else bc.fmt_num(f.get("top1_agreement"), 2),
                "sqnr": bc.REFERENCE if k == ORT_FP32 else bc.fmt_num(f.get("sqnr_db"), 1),
                "exact": _exact(f) if k in confs else bc.NA,
                "t4": bc.fmt_num(cost.get("t4_predicted_ms"), 2),
                "error": c.get("error")})
            plan = c.get("plan")
            if k in confs and "α=" in k:
                budget = (plan or {}).get("budgets", {}).get("latency_ms")
                ratio = bc.speedup(med.get(k), budget)  # measured / budget
                mixed.append({
                    "model": r["model"], "batch": b, "alpha": k.split("=")[-1],
                    "n4": f"{c['n4']}/{c['n_layers']}" if "n4" in c else None,
                    "budget": bc.fmt_num(budget, 2),
                    "predicted": bc.fmt_num((plan or {}).get("predicted_latency_ms"), 2),
                    "measured": bc.fmt_num(med.get(k), 2), "ratio": bc.fmt_num(ratio, 3),
                    "ok": None if ratio is None else ("yes" if ratio <= 1.05 else "no"),
                    "imeasured": bc.fmt_num(imed.get(k), 2) if itim else bc.NA,
                    "source": (plan or {}).get("latency_source")})
    return rows, mixed


def plot_series(results: list[dict]) -> dict[str, list[tuple[str, float, float]]]:
    """(label, size MB, median ms) of every timed configuration, per model and batch."""
    series = {}
    for r in results:
        for b, d in r["batches"].items():
            pts = []
            for k, t in d["timing"].items():
                cost = d["configs"].get(k) or d["costs"].get(k) or {}
                if "size_mb" in cost:
                    pts.append((k.replace("qcompile ", ""), cost["size_mb"], t["median_ms"]))
            series[f"{r['model']} batch {b}"] = pts
    return series


def problems(results: list[dict]) -> list[str]:
    """Failed configurations and modules that are not bit-exact or not integer-only."""
    out = []
    for r in results:
        for b, d in r["batches"].items():
            for k, c in d["configs"].items():
                f = d["fidelity"].get(k, {})
                if "error" in c:
                    out.append(f"{r['model']} batch {b} {k}: {c['error']}")
                elif not (f.get("bit_exact") and f.get("integer_only")):
                    out.append(f"{r['model']} batch {b} {k}: bit_exact={f.get('bit_exact')} "
                               f"integer_only={f.get('integer_only')}")
    return out
