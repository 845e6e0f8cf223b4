"""EfficientNet-Lite0 exported raw (plain ``torch.onnx.export``, ConstantOfShape/Pad
subgraphs and all) against the simplified file ``tools/export_efficientnet.py`` writes.

Both are compiled to INT8 on llvm with the same synthetic calibration; the script checks
that the raw export compiles, is bit-exact and integer-only, reports the quantized op
histograms side by side, and times both interleaved (median of ``--repeat`` rounds).

    python benchmarks/effnet_raw.py --raw ~/.cache/qcompile/corpus/efficientnet_lite0_real.onnx \
        --simplified models/efficientnet_lite0.onnx
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from typing import Any
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import finish, machine_label, provenance, provenance_line  # noqa: E402

from qcompile import api  # noqa: E402
from qcompile.config import CalibSpec  # noqa: E402
from qcompile.runtime.run import Artifact  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raw", type=Path, required=True)
    ap.add_argument("--simplified", type=Path, required=True)
    ap.add_argument("--repeat", type=int, default=200)
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    arts: dict[str, Any] = {}
    tmp = Path(tempfile.mkdtemp(prefix="effnet-raw-"))
    for name, model in (("simplified", args.simplified), ("raw", args.raw)):
        art = tmp / name
        c0 = time.perf_counter()
        res = api.compile_model(model, art, calib=CalibSpec(num_samples=16), progress=False)
        ev = api.evaluate(model, art, num_samples=16, progress=False)
        graph = json.loads((art / "qconfig.json").read_text())["graph"]
        rows[name] = {"model": str(model), "compile_s": round(time.perf_counter() - c0, 1),
                      "bit_exact": ev.bit_exact, "integer_only": res.integer_only,
                      "ops": dict(Counter(n["op"] for n in graph["nodes"])),
                      "sqnr_db": round(ev.sqnr_db, 2)}
        if not (ev.bit_exact and res.integer_only):
            problems.append(f"{name}: not bit-exact or not integer-only")
        arts[name] = Artifact.load(art)
    x = np.random.default_rng(0).normal(size=(1, 3, 224, 224)).astype(np.float32)
    times: dict[str, list[float]] = {k: [] for k in arts}
    for a in arts.values():  # warm-up
        for _ in range(10):
            a.run(x)
    for i in range(args.repeat):  # interleaved, order alternating per round
        for k in (list(arts) if i % 2 == 0 else list(arts)[::-1]):
            s = time.perf_counter()
            arts[k].run(x)
            times[k].append((time.perf_counter() - s) * 1e3)
    for k, t in times.items():
        rows[k]["median_ms"] = round(float(np.median(t)), 3)
        rows[k]["p90_ms"] = round(float(np.percentile(t, 90)), 3)
    ratio = rows["raw"]["median_ms"] / rows["simplified"]["median_ms"]
    same = rows["raw"]["ops"] == rows["simplified"]["ops"]
    prov = provenance()
    md = [f"# EfficientNet-Lite0: raw torch export vs simplified file ({time.strftime('%Y-%m-%d')})",
          "", f"`python benchmarks/effnet_raw.py --raw {args.raw.name} --simplified "
          f"{args.simplified.name} --repeat {args.repeat}` on {machine_label(prov)}; INT8, "
          "llvm, 16 synthetic calibration samples, `Artifact.run` at batch 1, interleaved.", "",
          "| file | compile s | bit-exact | integer-only | SQNR dB | median ms | p90 ms | quantized ops |",
          "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for k, r in rows.items():
        ops = ", ".join(f"{o} {c}" for o, c in sorted(r["ops"].items()))
        md.append(f"| {k} | {r['compile_s']} | {r['bit_exact']} | {r['integer_only']} | "
                  f"{r['sqnr_db']} | {r['median_ms']} | {r['p90_ms']} | {ops} |")
    md += ["", f"Raw / simplified median latency: {ratio:.3f}. Same quantized graph: {same}.", "",
           provenance_line(prov), ""]
    data = {"provenance": prov, "repeat": args.repeat, "rows": rows,
            "raw_over_simplified": ratio, "same_quantized_ops": same}
    return finish(RESULTS, f"effnet-raw-vs-simplified-{time.strftime('%Y-%m-%d')}", data,
                  "\n".join(md), problems, time.perf_counter() - t0)


if __name__ == "__main__":
    raise SystemExit(main())
