"""Where an INT8 artifact's time goes: kernel sum against the rest (issue 13).

    python benchmarks/time_split.py                     # the issue's models and batches
    python benchmarks/time_split.py --models resnet50 --batch 8

Each model is compiled INT8 (16 synthetic calibration samples), then timed two ways in
one process: ``main`` end to end (median of --rounds), and with a Relax VM instrument
that records every PackedFunc call (each PrimFunc, the VM's builtins). The instrument's
own per-call overhead is included in its figures; ``main``'s median also holds the VM's
dispatch and allocation builtins, which neither column counts.
"Kernels" are the functions that serve a conv/dense layer (the manifest's kernel_funcs);
"rest" is every other PrimFunc: quantize, layout, pools, unfused adds, concat requants.
Writes benchmarks/results/time-split-<machine>-<date>.{json,md}.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import bench_common as bc  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EFFNET = REPO / "models" / "efficientnet_lite0.onnx"
VM_BUILTINS = ("main", "core", "quantize", "dequantize")
RUNS = (("resnet18", 1), ("resnet18", 8), ("resnet50", 1), ("resnet50", 8),
        ("efficientnet_lite0", 1), ("efficientnet_lite0", 8), ("inceptionv3", 1))


def build(name: str, batch: int, work: Path) -> Path:
    from qcompile import api
    from qcompile.frontend import zoo
    from qcompile.config import CalibSpec
    model = EFFNET if name == "efficientnet_lite0" else zoo.save(zoo.build(name), work / f"{name}.onnx")
    out = work / f"{name}-b{batch}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # synthetic calibration: said in the notes
        api.compile_model(model, out, batch=batch, progress=False, calib=CalibSpec(num_samples=16))
    return out


def split(art_dir: Path, batch: int, rounds: int) -> dict:
    import tvm
    from qcompile.runtime.run import Artifact

    art = Artifact.load(art_dir)
    x = np.random.default_rng(0).normal(size=(batch,) + tuple(art.input_shape[1:]))
    args = [tvm.runtime.tensor(x.astype(np.float32), art.device), *art.params]
    kernels = set(art.manifest["kernel_funcs"])
    for _ in range(5):
        art.vm["main"](*args)
    total = []
    for _ in range(rounds):
        t = time.perf_counter()
        art.vm["main"](*args)
        total.append(time.perf_counter() - t)
    times: dict[str, list[float]] = defaultdict(list)
    start: dict[str, float] = {}

    def instrument(func: object, name: str, before: bool, ret: object, *a: object) -> int:
        if before:
            start[name] = time.perf_counter()
        else:
            times[name].append(time.perf_counter() - start[name])
        return 0

    art.vm.set_instrument(instrument)
    for _ in range(rounds):
        art.vm["main"](*args)
    per = {k: float(np.median(v)) * 1e3 * len(v) / rounds for k, v in times.items()
           if k not in VM_BUILTINS and not k.startswith("vm.builtin")}
    ksum = sum(v for k, v in per.items() if k in kernels)
    rest = {k: v for k, v in per.items() if k not in kernels}
    top = sorted(rest.items(), key=lambda kv: -kv[1])[:5]
    return {"total_ms": float(np.median(total)) * 1e3, "kernels_ms": ksum,
            "rest_ms": sum(rest.values()), "kernels": len(kernels & set(per)),
            "rest_top": [[k, round(v, 3)] for k, v in top]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--batch", nargs="+", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    a = ap.parse_args(argv)
    runs = [(m, b) for m, b in RUNS if (not a.models or m in a.models) and (not a.batch or b in a.batch)]
    clock, rows = bc.Stopwatch(), []
    with tempfile.TemporaryDirectory() as d:
        for name, batch in runs:
            if name == "efficientnet_lite0" and not EFFNET.is_file():
                print(f"skip {name}: {EFFNET} missing (make bench-effnet exports it)")
                continue
            r = split(build(name, batch, Path(d)), batch, a.rounds)
            rows.append({"model": name, "batch": batch, **r})
            print(f"{name} b{batch}: {r['total_ms']:.2f} ms; kernels {r['kernels_ms']:.2f}, "
                  f"rest {r['rest_ms']:.2f}", flush=True)
    prov = bc.provenance(None if argv is None else [__file__, *argv])
    lines = [f"**Where the time goes (qcompile INT8, {bc.machine_label(prov)})**", "",
             "| model | batch | main, median ms | kernel sum ms (instrumented) | rest ms | rest share "
             "| largest rest items (ms) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        share = r["rest_ms"] / max(r["kernels_ms"] + r["rest_ms"], 1e-9)
        top = ", ".join(f"{k} {v}" for k, v in r["rest_top"][:3])
        lines.append(f"| {r['model']} | {r['batch']} | {r['total_ms']:.2f} | {r['kernels_ms']:.2f} "
                     f"| {r['rest_ms']:.2f} | {share:.0%} | {top} |")
    lines += ["", f"- {a.rounds} rounds. `main`'s median also holds the VM's own dispatch and "
              "allocation builtins, which neither column counts.", f"- {bc.provenance_line(prov)}", ""]
    md = "\n".join(lines)
    return bc.finish(a.out, bc.result_stem("time-split"), {"provenance": prov, "rounds": a.rounds,
                                                           "rows": rows}, md, [], clock.seconds)


if __name__ == "__main__":
    sys.exit(main())
