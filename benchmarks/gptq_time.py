"""How long GPTQ takes on ResNet-50 (issue 10's target: under 2 minutes on 2 cores).

    python benchmarks/gptq_time.py            # make bench-gptq

Times ``gptq.gptq_graph`` (sequential, bias correction and upstream-error compensation,
what ``--rounding gptq`` runs) over every conv/dense of the zoo ResNet-50 (224 px,
1000 classes) at 4 and at 8 bits, on ``--samples`` calibration inputs (32: compile's
default ``--calib-samples``).  Timing depends only on shapes, so the inputs are seeded
noise.  Writes ``benchmarks/results/gptq-time-<host>-<date>.{json,md}``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import bench_common as bc  # noqa: E402

from qcompile.quant import gptq  # noqa: E402
from qcompile.ir.graph import LAYER_OPS  # noqa: E402
from qcompile.frontend.onnx_import import import_onnx, load_model  # noqa: E402
from qcompile.frontend.prepare import prepare  # noqa: E402
from qcompile.frontend import zoo  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = zoo.save(zoo.build(args.model, input_size=224), Path(d) / f"{args.model}.onnx")
        graph = prepare(import_onnx(load_model(path, None), batch=1, source=path.name))
    layers = [n.name for n in graph.nodes if n.op in LAYER_OPS]
    x = np.random.default_rng(0).normal(0, 1, (args.samples, *graph.input_shape[1:]))
    rows = []
    for bits in args.bits:
        t0 = time.perf_counter()
        gptq.gptq_graph(graph, x.astype(np.float32), {n: bits for n in layers})
        rows.append({"bits": bits, "seconds": time.perf_counter() - t0})
        print(f"{args.model}: GPTQ over {len(layers)} layers at {bits} bits, "
              f"{args.samples} samples: {rows[-1]['seconds']:.1f} s", flush=True)
    prov = bc.provenance()
    md = "\n".join([
        f"# GPTQ time: {args.model} ({len(layers)} conv/dense layers, 224 px)", "",
        f"Machine: {bc.machine_label(prov)}, load average at the end {os.getloadavg()[0]:.1f}  ",
        f"{args.samples} calibration inputs; sequential GPTQ with bias correction and "
        "upstream-error compensation (`gptq.gptq_graph`, what `--rounding gptq` runs).", "",
        "| bits | seconds | target |", "| --- | --- | --- |",
        *[f"| {r['bits']} | {r['seconds']:.1f} | < 120 |" for r in rows], "",
        bc.provenance_line(prov), ""])
    stem = bc.result_stem("gptq-time")
    bc.write_results(args.out, stem, {"model": args.model, "samples": args.samples,
                                      "layers": len(layers), "rows": rows, "provenance": prov,
                                      "loadavg": os.getloadavg()}, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
