"""Bit-exactness, integer-only proof and fidelity for every zoo model.

    python benchmarks/zoo_exact.py [--samples 32] [--full-size]

Synthetic calibration and synthetic evaluation inputs (the zoo weights are
random, so only agreement with float is meaningful, not accuracy).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_common as bc  # noqa: E402

from qcompile import api
from qcompile.frontend import zoo  # noqa: E402

SMALL = {"resnet18": 64, "resnet50": 64, "inceptionv3": 75, "mobilenetv2": 64}
FULL = {"resnet18": 224, "resnet50": 224, "inceptionv3": 299, "mobilenetv2": 224}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--full-size", action="store_true")
    ap.add_argument("--models", nargs="+", default=sorted(SMALL))
    args = ap.parse_args()
    sizes = FULL if args.full_size else SMALL
    rows = []
    md = ["| model | input | compile (s) | integer-only | bit-exact | top-1 agreement | SQNR (dB) |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
    print("\n".join(md))
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in args.models:
            m = zoo.save(zoo.build(name, input_size=sizes[name]), Path(d) / f"{name}.onnx")
            t = time.perf_counter()
            res = api.compile_model(m, Path(d) / name, progress=False)
            secs = time.perf_counter() - t
            ev = api.evaluate(m, Path(d) / name, num_samples=args.samples, progress=False)
            row = {"model": name, "input": sizes[name], "compile_s": round(secs, 1),
                   "integer_only": res.integer_only, "bit_exact": ev.bit_exact,
                   "samples": ev.num_samples, "top1_agreement": ev.top1_agreement,
                   "sqnr_db": round(ev.sqnr_db, 2)}
            rows.append(row)
            md.append(f"| {name} | {sizes[name]} | {secs:.1f} | {res.integer_only} | {ev.bit_exact} "
                      f"({ev.num_samples} inputs) | {ev.top1_agreement:.3f} | {ev.sqnr_db:.1f} |")
            print(md[-1], flush=True)
    prov = bc.provenance()
    bc.write_results(Path(__file__).parent / "results", "zoo-exact", {"provenance": prov, "rows": rows},
                     "\n".join(md) + "\n\n" + bc.provenance_line(prov) + "\n")


if __name__ == "__main__":
    main()
