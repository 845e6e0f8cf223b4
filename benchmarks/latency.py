"""Compile time and batch-1 latency: qcompile INT8 vs onnxruntime FP32 and INT8.

    python benchmarks/latency.py --models resnet18 resnet50 --repeat 20

All configurations of one model are timed in one process, round-robin, after
warm-up; medians and min-max are reported.  Writes JSON + Markdown under
benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import tvm

sys.path.insert(0, str(Path(__file__).parent))
import bench_common as bc  # noqa: E402
from peers import interleaved_times, ort_int8, ort_runner  # noqa: E402

from qcompile import api
from qcompile.frontend import zoo  # noqa: E402
from qcompile.config import CalibSpec  # noqa: E402
from qcompile.runtime.run import Artifact  # noqa: E402


def bench_model(name: str, size: int | None, repeat: int, calib_n: int, work: Path) -> dict:
    model = zoo.save(zoo.build(name, input_size=size), work / f"{name}.onnx")
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        api.compile_model(model, work / f"{name}-int8", calib=CalibSpec(num_samples=calib_n),
                          progress=False)
        compile_s = time.perf_counter() - t
    art = Artifact.load(work / f"{name}-int8")
    in_shape = (1,) + art.input_shape[1:]
    calib = rng.normal(size=(calib_n,) + in_shape[1:]).astype(np.float32)
    int8 = ort_int8(model, work / f"{name}-ort-int8.onnx", calib)
    x = rng.normal(size=in_shape).astype(np.float32)
    xt = tvm.runtime.tensor(x)
    fp32_run, int8_run = ort_runner(model), ort_runner(int8)
    fns = {"qcompile INT8": lambda: art.vm["main"](xt, *art.params),
           "ORT FP32": lambda: fp32_run(x), "ORT INT8": lambda: int8_run(x)}
    times = interleaved_times(fns, repeat)
    rows = {k: {"median_ms": 1e3 * float(np.median(v)), "min_ms": 1e3 * min(v),
                "max_ms": 1e3 * max(v)} for k, v in times.items()}
    return {"model": name, "input": list(in_shape), "compile_s": compile_s, "latency": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as d:
        for name in args.models:
            r = bench_model(name, args.size, args.repeat, args.calib_samples, Path(d))
            results.append(r)
            print(json.dumps(r), flush=True)
    lines = ["| model | qcompile compile (s) | qcompile INT8 (ms) | ORT FP32 (ms) | ORT INT8 (ms) |",
             "| --- | --- | --- | --- | --- |"]
    for r in results:
        lat = r["latency"]
        cell = {k: f"{v['median_ms']:.1f} ({v['min_ms']:.1f}-{v['max_ms']:.1f})" for k, v in lat.items()}
        lines.append(f"| {r['model']} | {r['compile_s']:.1f} | {cell['qcompile INT8']} | "
                     f"{cell['ORT FP32']} | {cell['ORT INT8']} |")
    prov = bc.provenance(ort_threads=f"{os.cpu_count()} (peers.ort_runner, spinning off)")
    table = "\n".join(lines) + "\n\n" + bc.provenance_line(prov)
    print(table)
    bc.write_results(args.out, bc.result_stem("latency"), {"provenance": prov, "results": results},
                     table + "\n")


if __name__ == "__main__":
    main()
