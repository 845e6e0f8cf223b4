"""Mixed-precision plans on this CPU: predicted vs measured latency, size, BOPs, fidelity.

    python benchmarks/plans.py --models resnet18 resnet50 --repeat 20

Per model: uniform INT8, uniform INT4 (first/last at 8) and mixed plans at relative
latency and size budgets alpha = 0.25, 0.5, 0.75, each compiled by ``qcompile`` and
timed round-robin in one process; plus the plans the allocator picks for ``--target
cuda`` on the T4 model (predicted; there is no T4 here). Writes JSON + Markdown under
benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import tvm

sys.path.insert(0, str(Path(__file__).parent))
import bench_common as bc  # noqa: E402

from qcompile import api
from qcompile.frontend import zoo  # noqa: E402
from qcompile.config import AllocSpec, CalibSpec, QuantSpec, precision  # noqa: E402
from qcompile.runtime.run import Artifact  # noqa: E402

ALPHAS = (0.25, 0.5, 0.75)


def configs() -> dict[str, dict]:
    out: dict[str, dict] = {"INT8": {"quant": QuantSpec(bits=8)},
                            "INT4": {"quant": QuantSpec(bits=4)}}
    for kind in ("latency", "size"):
        for a in ALPHAS:
            out[f"mixed {kind} {a}"] = {"alloc": AllocSpec(**{kind: str(a)}, sensitivity="kl")}
    return out


def run_model(name: str, repeat: int, calib_n: int, work: Path) -> dict:
    model = zoo.save(zoo.build(name), work / f"{name}.onnx")
    calib = CalibSpec(num_samples=calib_n)
    rows: dict[str, dict] = {}
    arts: dict[str, Artifact] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label, kw in configs().items():
            out = work / f"{name}-{label.replace(' ', '_')}"
            api.compile_model(model, out, calib=calib, progress=False, **kw)
            cfg = json.loads((out / "qconfig.json").read_text())
            plan = cfg["plan"] or {}
            x = np.random.default_rng(1).normal(size=(16,) + tuple(zoo_input(name))).astype(np.float32)
            ev = api.evaluate(model, out, inputs=x, progress=False)
            rows[label] = {"size_mb": cfg["costs"]["size_mb"], "bops_g": cfg["costs"]["bops_g"],
                           "int4_layers": sum(precision(b)[0] == 4
                                              for b in cfg["costs"]["bits"].values()),
                           "budget": plan.get("budgets"),
                           "predicted_ms": plan.get("predicted_latency_ms"),
                           "bit_exact": ev.bit_exact, "top1_agreement": ev.top1_agreement,
                           "sqnr_db": ev.sqnr_db}
            arts[label] = Artifact.load(out)
        t4 = {}
        for kind in ("latency", "size"):
            for a in ALPHAS:
                p = api.allocate_model(model, target="cuda", calib=calib, progress=False,
                                       alloc=AllocSpec(**{kind: str(a)}, sensitivity="kl"))
                t4[f"mixed {kind} {a}"] = {k: p.to_json()[k] for k in ("predicted_latency_ms", "size_mb",
                                                             "bops_g", "budgets")}
    xin = np.random.default_rng(0).normal(size=(1,) + tuple(zoo_input(name))).astype(np.float32)
    xt = tvm.runtime.tensor(xin)
    fns = {k: (lambda a=a: a.vm["main"](xt, *a.params)) for k, a in arts.items()}
    times = bc.interleaved_rounds(fns, repeat)  # round-robin, order rotated
    for k, v in times.items():
        rows[k].update(median_ms=1e3 * float(np.median(v)), min_ms=1e3 * min(v),
                       max_ms=1e3 * max(v))
    return {"model": name, "rows": rows, "t4_plans": t4}


def zoo_input(name: str) -> tuple[int, int, int]:
    m = zoo.build(name)
    dims = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    return tuple(dims[1:])  # type: ignore[return-value]


def markdown(res: list[dict]) -> str:
    lines = ["| model | plan | INT4 layers | size MB | BOPs G | predicted ms | measured ms "
             "(min-max) | budget ms | measured/budget | top-1 agr. | SQNR dB | bit-exact |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res:
        for label, v in r["rows"].items():
            b = (v["budget"] or {}).get("latency_ms")
            pred = f"{v['predicted_ms']:.2f}" if v["predicted_ms"] is not None else "-"
            ratio = f"{v['median_ms'] / b:.2f}" if b else "-"
            lines.append(
                f"| {r['model']} | {label} | {v['int4_layers']} | {v['size_mb']:.2f} | "
                f"{v['bops_g']:.1f} | {pred} | {v['median_ms']:.2f} ({v['min_ms']:.2f}-"
                f"{v['max_ms']:.2f}) | {f'{b:.2f}' if b else '-'} | {ratio} | "
                f"{v['top1_agreement']:.2f} | {v['sqnr_db']:.1f} | {'yes' if v['bit_exact'] else 'NO'} |")
    lines += ["", "T4 plans (`--target cuda`, latency *predicted* by the T4 roofline model):", "",
              "| model | plan | predicted ms | size MB | BOPs G |", "| --- | --- | --- | --- | --- |"]
    for r in res:
        for label, v in r["t4_plans"].items():
            lines.append(f"| {r['model']} | {label} | {v['predicted_latency_ms']:.3f} | "
                         f"{v['size_mb']:.2f} | {v['bops_g']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        res = [run_model(m, args.repeat, args.calib_samples, Path(d)) for m in args.models]
    prov = bc.provenance()
    table = markdown(res) + "\n\n" + bc.provenance_line(prov)
    print(table)
    bc.write_results(args.out, bc.result_stem("plans"), {"provenance": prov, "results": res},
                     table + "\n")


if __name__ == "__main__":
    main()
