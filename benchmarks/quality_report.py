"""The report of ``quality.py``: targets, the Markdown and the plot (agreement against
weight size).  Benchmark-only; matplotlib is imported lazily (the ``plots`` extra)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import bench_common as bc

SIZE_FRACTION = 0.75  # the mixed-precision budget, x the W8A8 size (quality.py uses it)


def targets(res: dict) -> list[dict]:
    out = []

    def row(label: str) -> dict:
        return next((x for x in res["rows"] if x["label"] == label), {})

    def best(group: str, key: str) -> dict:
        ok = [x for x in res["rows"] if x.get("group") == group and x.get("status") == "ok"]
        return max(ok, key=lambda x: x[key]) if ok else {}

    def add(name: str, value: float | None, goal: str, met: bool | None, detail: str) -> None:
        out.append({"target": name, "goal": goal, "measured": value, "met": met,
                    "detail": detail})

    m = res["calibrator"]
    if res["model"] == "effnet":
        for grp, goal in (("W8A8", 0.92), ("W4A8", 0.80)):
            b = best(grp, "top1_agreement")
            v = b.get("top1_agreement")
            add(f"{grp} agreement", v, f">= {goal:.0%}", None if v is None else v >= goal,
                f"best {grp} row: {b.get('label')}")
        mixed = [row(f"mixed {s} @{SIZE_FRACTION}x") for s in ("hessian", "kl")]
        mixed = [x for x in mixed if x.get("status") == "ok"]
        b = max(mixed, key=lambda x: x["top1_agreement"]) if mixed else {}
        v = b.get("top1_agreement")
        fits = b and b["size_mb"] <= res["budget_mb"] + 1e-9
        add("mixed <= 0.75x INT8 agreement", v, ">= 85%",
            None if v is None else bool(v >= 0.85 and fits), f"best: {b.get('label')}")
        key, goal_txt = "top1_agreement", "agreement"
    else:
        for grp, lab, goal in (("W8A8", f"W8A8 {m} nearest", 0.1),
                               ("W4A8", "W4A8 nearest", 0.3), ("W4A4", "W4A4 nearest", 1.0)):
            b = best(grp, "accuracy")
            v = b.get("accuracy_drop_pt")
            add(f"{grp} accuracy drop", v, f"<= {goal} pt", None if v is None else v <= goal,
                f"best {grp} row: {b.get('label')}; {lab}: "
                f"{row(lab).get('accuracy_drop_pt', float('nan')):.2f} pt")
        key, goal_txt = "accuracy", "accuracy"
    rnd = row(next(x["label"] for x in res["rows"] if x.get("group") == "random"))
    for s in ("hessian", "kl"):
        x = row(f"mixed {s} @{SIZE_FRACTION}x")
        ok = x.get("status") == "ok" and rnd.get("status") == "ok"
        add(f"{s} plan beats random", x.get(key), f"{goal_txt} > random mean",
            bool(x[key] > rnd[key]) if ok else None,
            f"random mean {rnd.get(key, float('nan')):.4f} (min-max "
            f"{rnd.get(key + '_min_max')})")
    kf = next((x for x in res["rows"] if x.get("group") == "keep-first"), {})
    for s in ("hessian", "kl"):
        x = row(f"mixed {s} @{SIZE_FRACTION}x")
        ok = x.get("status") == "ok" and kf.get("status") == "ok"
        add(f"{s} plan beats keep-first-k (no target)", x.get(key), f"{goal_txt} > keep-first",
            bool(x[key] > kf[key]) if ok else None,
            f"{kf.get('label')}: {kf.get(key, float('nan')):.4f}")
    return out


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else (fmt.format(v) if isinstance(v, (int, float)) else str(v))


def markdown(results: list[dict], meta: dict) -> str:
    L = [f"# Quantization quality on trained models ({meta['date']})", "",
         f"Command: `{meta['command']}`"
         + ("" if meta["command"] == "make bench-quality" else
            " (`make bench-quality` computes every row in one process)") + "  ",
        f"Machine: {meta['machine_line']}  ",
         f"Date: {meta['started']} (UTC), {meta['seconds']:.0f} s in all  ",
         bc.provenance_line(meta["provenance"]),
         "", "Agreement = top-1 agreement with the float model (onnxruntime FP32) over all "
         "evaluation inputs, from the compiled artifact's own output; SQNR of the output logits "
         "against FP32.  Size = weights + int32 biases of the conv/dense layers "
         "(`costs.size_mb`, MB = 2^20 bytes); the onnxruntime INT8 row is given the INT8 "
         "storage size.  Bit-exact = compiled module equals the NumPy integer oracle "
         "(`api.evaluate`) on the first N evaluation inputs.  Compile s = wall clock of "
         "`api.compile_model` (a mixed row includes measuring the sensitivity and the per-layer "
         "latency table) on a machine shared with other jobs: not a timing benchmark.", "",
         "Rows: W8A8 = every conv/dense at 8 bits; W4A8 / W4A4 = all but the first conv and the "
         "last dense (kept at W8A8) at that precision (`--bits w4a8` / `--bits 4`); "
         "equalize + bias corr. = `--equalize --bias-correction` (round-to-nearest).  Mixed = "
         "`--budget-size <0.75 x the W8A8 row's size>MB --sensitivity hessian|kl` (ILP over "
         "4/8-bit weights; llvm runs a 4-bit layer as W4A8; first and last pinned at 8).  "
         "Random plan = first and last at 8, then randomly drawn layers set to W4A8 until the "
         "size is within the budget (mean of the seeds, min-max in brackets).  Keep first k = "
         "the first k layers (in graph order, the first conv included) and the last dense at "
         "W8A8, the rest W4A8, with the largest k that fits the budget.  These two controls "
         "say what the sensitivity ranking is worth.  The mixed, random and keep-first rows "
         "round with GPTQ (the default with real calibration data); the other rows say "
         "their rounding.", ""]
    for res in results:
        fl = res["rows"][0]
        L += [f"## {res['title']}", "", f"`{res['onnx']}`, {res['layers']} conv/dense layers. "
              f"Data: {res['data']}.  Calibrator for all rows outside the W8A8 sweep: "
              f"{res['calibrator']}.  Mixed-precision budget: {SIZE_FRACTION} x "
              f"{res['int8_size_mb']:.4f} MB = {res['budget_mb']:.4f} MB.", ""]
        if "mean_softmax_confidence" in fl:
            L += [f"Float model mean softmax confidence (top-1 probability) on the evaluation "
                  f"inputs: {fl['mean_softmax_confidence']:.3f}.", ""]
        if "accuracy" in fl:
            L += [f"Float accuracy: {100 * fl['accuracy']:.2f}%.", ""]
        lab = res["model"] == "fashion"
        hdr = ("| row | size MB | x INT8 | 4-bit layers | agreement | "
               + ("accuracy | drop pt | " if lab else "") + "SQNR dB | bit-exact | compile s |")
        L += [hdr, "|" + " --- |" * (hdr.count("|") - 1)]
        for x in res["rows"]:
            if x.get("status") != "ok":
                L.append(f"| {x['label']} | {x['status']} |" + " |" * (hdr.count("|") - 3))
                continue
            four = sum(v for p, v in (x.get("layers") or {}).items() if p.startswith("w4"))
            n_l = sum((x.get("layers") or {}).values())
            if x.get("group") == "random":
                mm = x.get("top1_agreement_min_max" if not lab else "accuracy_min_max")
                agr = f"{100 * x['top1_agreement']:.1f}%"
                four_s = "-"
            else:
                agr = f"{100 * x['top1_agreement']:.1f}%"
                four_s = f"{four}/{n_l}" if n_l else "-"
            cells = [x["label"], _f(x.get("size_mb"), "{:.3f}"), _f(x.get("size_vs_int8"), "{:.3f}"),
                     four_s, agr]
            if lab:
                acc = f"{100 * x['accuracy']:.2f}%"
                if x.get("group") == "random" and mm:
                    acc += f" ({100 * mm[0]:.2f}-{100 * mm[1]:.2f})"
                cells += [acc, _f(x.get("accuracy_drop_pt"), "{:+.2f}")]
            elif x.get("group") == "random" and mm:
                cells[-1] += f" ({100 * mm[0]:.1f}-{100 * mm[1]:.1f})"
            be = x.get("bit_exact")
            cells += [_f(x.get("sqnr_db"), "{:.2f}"),
                      "-" if be is None else ("yes" if be else "**NO**")
                      + (f" ({x['exact_samples']})" if "exact_samples" in x else ""),
                      _f(x.get("compile_seconds"), "{:.0f}")]
            L.append("| " + " | ".join(cells) + " |")
        L += ["", "Targets:", "", "| target | goal | measured | met | note |",
              "| --- | --- | --- | --- | --- |"]
        for t in res["targets"]:
            v = t["measured"]
            vs = "-" if v is None else (f"{v:.2f} pt" if "drop" in t["target"]
                                        else f"{100 * v:.1f}%")
            met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
            L.append(f"| {t['target']} | {t['goal']} | {vs} | {met} | {t['detail']} |")
        L.append("")
    reused = [x for res in results for x in res["rows"] + [s for r in res["rows"]
                                                            for s in r.get("seeds", [])]
              if x.get("reused")]
    if reused:
        when = sorted(x["computed_at"] for x in reused)
        L += [f"This invocation reused {len(reused)} rows (artifacts and scores) that earlier "
              f"invocations of this script with the same `--work` directory (split with `--rows`"
              f" / `--only` over concurrent processes) finished between {when[0]} and "
              f"{when[-1]} UTC.", ""]
    L += [f"Plot: `{meta['png']}`.", ""]
    return "\n".join(L)


HOLLOW = ("peer", "keep-first")
LEGEND = {"peer": "onnxruntime INT8", "FP32": "FP32", "random": "random plan (seeds: dots)",
          "keep-first": "keep first k at 8"}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 5), squeeze=False)
    style = {"FP32": ("k", "*"), "peer": ("tab:gray", "X"), "W8A8": ("tab:blue", "o"),
             "W4A8": ("tab:orange", "s"), "W4A4": ("tab:red", "v"),
             "mixed hessian": ("tab:green", "D"), "mixed kl": ("tab:purple", "D"),
             "random": ("tab:brown", "P"), "keep-first": ("tab:olive", "^")}
    for ax, res in zip(axes[0], results):
        lab = res["model"] == "fashion"
        key = "accuracy" if lab else "top1_agreement"
        seen = set()
        for x in res["rows"]:
            if x.get("status") != "ok" or x["group"] == "FP32" and not lab:
                continue
            c, m = style.get(x["group"], ("k", "."))
            name = x["group"] if x["group"] not in seen else None
            seen.add(x["group"])
            hollow = x["group"] in HOLLOW
            ax.scatter(x["size_mb"], 100 * x[key], marker=m, s=90 if hollow else 50,
                       label=LEGEND.get(name, name), alpha=0.9, zorder=3 if hollow else 2,
                       facecolors="none" if hollow else c, edgecolors=c,
                       linewidths=1.6 if hollow else 0)
            if x["group"] == "random":
                for s in x["seeds"]:
                    if s.get("status") == "ok":
                        ax.scatter(s["size_mb"], 100 * s[key], c=c, marker=".", s=20, alpha=0.6)
        ax.axvline(res["budget_mb"], ls=":", c="gray", lw=1)
        ax.text(res["budget_mb"], ax.get_ylim()[0], f" {SIZE_FRACTION}x INT8", color="gray",
                va="bottom", fontsize=8)
        if lab:
            ax.axhline(100 * res["rows"][0]["accuracy"], ls="--", c="k", lw=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 3, 5)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("weight size, MB (log)")
        ax.set_ylabel("test accuracy, %" if lab else "top-1 agreement with FP32, %")
        ax.set_title(res["title"], fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
