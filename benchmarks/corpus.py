"""Compile, check and time every model of the real-world corpus (GitHub issue 9).

    python benchmarks/corpus.py [--corpus ~/.cache/qcompile/corpus] [--models NAME ...]
        [--quick] [--timeout 900] [--samples 8] [--repeat 20]

The corpus is written by ``tools/export_corpus.py`` (raw torch exports, see there).
Each model runs in its own subprocess with a timeout, so a crash or a hang costs
one row, not the run:

1. ``api.compile_model(model, out, target="llvm", calib=CalibSpec(num_samples=8))``
   (INT8, synthetic calibration; ``input_shape=`` for the dynamic-H/W exports), with
   compile's fidelity guard at its default floor: a model it refuses is a ``refused``
   row with exit 13, and each row records the guard's held-out SQNR;
2. ``api.evaluate(model, out, num_samples=8)``: bit-exact against the NumPy oracle,
   integer-only, top-1 agreement and SQNR against onnxruntime FP32 (synthetic inputs,
   random weights: agreement says little about accuracy);
3. ``api.bench_artifact(out, repeat=20)`` median beside onnxruntime FP32 (``api.ort_bench``).

Status per model: ``ok`` (compiled, bit-exact, integer-only), ``inexact`` (compiled but
not bit-exact or not integer-only: a bug), ``refused`` (a ``QCompileError``: exit code
and its one line), ``crash`` (any other exception, or the process died: traceback),
``timeout``, ``skipped`` (the API lacks what the model needs, e.g. ``input_shape``).

Writes ``benchmarks/results/corpus-<date>[-quick|-subset].{json,md}`` after every model,
with the run's provenance (``bench_common.provenance``) and, per row, the commit that
measured it. A README figure must come from one clean commit, so the run refuses a tree
with uncommitted changes unless ``--allow-dirty`` (then every such row says ``+dirty``).
Exits 1 unless every model is ``ok``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qcompile.report.results import BenchResult

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (NA, ORT_DEFAULT_THREADS, Stopwatch, finish, fmt_num, git_state,  # noqa: E402
                          machine_label, provenance, provenance_line, revision, write_results)

from qcompile.env import cache_dir  # noqa: E402

DEFAULT_CORPUS = cache_dir("corpus")  # $QCOMPILE_CACHE_DIR/corpus
RESULTS = Path(__file__).resolve().parent / "results"
QUICK = ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "squeezenet1_1", "shufflenet_v2_x1_0",
         "efficientnet_lite0_real", "mobilenet_v2_nhwc", "mobilenet_v3_small_dynhw",
         "mobilenet_v2_opset11")
STATUSES = ("ok", "inexact", "refused", "crash", "timeout", "skipped")


# ----------------------------------------------------------------------------- one model
def _one_line(text: str) -> str:
    return " ".join(p.strip() for p in str(text).splitlines() if p.strip())[:400]


def _save(path: Path, rec: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, default=str))
    os.replace(tmp, path)


def _ort_bench(model: Path, shape: list[int], repeat: int) -> "BenchResult":
    """``api.ort_bench``, except for dynamic spatial dims (it would feed 1x1 images)."""
    from qcompile import api
    import onnx

    dims = onnx.load(str(model), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    if all(d.HasField("dim_value") for d in dims[1:]):
        return api.ort_bench(model, repeat=repeat)
    import numpy as np
    import onnxruntime as ort
    from qcompile.report.results import BenchResult
    from qcompile.runtime.run import summarize_ms

    sess = ort.InferenceSession(str(model), api.ort_session_options(),  # ORT's defaults
                                providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: np.random.default_rng(0).normal(size=shape).astype(np.float32)}
    for _ in range(5):
        sess.run(None, feed)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return BenchResult.from_summary(summarize_ms(times, shape[0]))


def run_one(entry: dict[str, Any], corpus: Path, out: Path, samples: int, repeat: int,
            result: Path) -> None:
    """Compile, evaluate and time one model; ``result`` is rewritten after every stage,
    so the parent knows how far a model that crashed or hung got."""
    import warnings
    warnings.simplefilter("ignore")
    rec: dict[str, Any] = {"stage": "import"}
    _save(result, rec)
    from qcompile import api
    from qcompile.config import CalibSpec, Preprocess
    from qcompile.errors import QCompileError

    model = corpus / entry["file"]
    shape = entry["compile_input_shape"]
    stage = "compile"
    try:
        kw: dict[str, Any] = {}
        if entry.get("needs_input_shape"):
            if "input_shape" not in inspect.signature(api.compile_model).parameters:
                rec.update(status="skipped", line="api.compile_model has no input_shape "
                           "keyword yet (TypeError); the model has dynamic H/W")
                _save(result, rec)
                return
            kw["input_shape"] = tuple(shape)
        size = shape[1] if entry["layout"] == "NHWC" else shape[2]
        calib = CalibSpec(num_samples=samples,
                          preprocess=Preprocess(size=size, layout=entry["layout"]))
        rec.update(stage=stage)
        _save(result, rec)
        t = time.perf_counter()
        res = api.compile_model(model, out, target="llvm", calib=calib, progress=False, **kw)
        rec.update(compile_s=round(time.perf_counter() - t, 1), layers=res.num_layers,
                   integer_only=res.integer_only)
        if res.fidelity is not None:  # compile's guard (it refuses under --min-sqnr: exit 13)
            rec.update(guard_sqnr_db=res.fidelity.sqnr_db,
                       guard_top1=res.fidelity.top1_agreement,
                       guard_drop=(res.fidelity.sharpest_drop.to_json()
                                   if res.fidelity.sharpest_drop else None))
        stage = "evaluate"
        rec.update(stage=stage)
        _save(result, rec)
        ev = api.evaluate(model, out, num_samples=samples, progress=False)
        rec.update(bit_exact=ev.bit_exact, integer_only=ev.integer_only and res.integer_only,
                   top1_agreement=ev.top1_agreement, sqnr_db=ev.sqnr_db,
                   eval_samples=ev.num_samples,
                   # where the noise comes from: the three layers with the lowest SQNR
                   worst_layers=[{"name": x.name, "op": x.op, "sqnr_db": round(x.sqnr_db, 1)}
                                 for x in sorted(ev.layers, key=lambda x: x.sqnr_db)[:3]])
        stage = "bench"
        rec.update(stage=stage)
        _save(result, rec)
        qb = api.bench_artifact(out, repeat=repeat)
        ob = _ort_bench(model, shape, repeat)
        rec.update(qc_ms=qb.median_ms, ort_ms=ob.median_ms,
                   speedup=ob.median_ms / qb.median_ms if qb.median_ms > 0 else None)
        ok = rec["bit_exact"] and rec["integer_only"]
        rec.update(stage="done", status="ok" if ok else "inexact",
                   line="" if ok else f"bit_exact={rec['bit_exact']} "
                                      f"integer_only={rec['integer_only']}")
    except QCompileError as e:
        rec.update(status="refused", exit_code=e.exit_code,
                   line=f"error: {_one_line(str(e))}", error_class=type(e).__name__)
    except Exception as e:  # noqa: BLE001 - a bug; keep the whole story
        rec.update(status="crash", exit_code=70, line=f"{type(e).__name__}: {_one_line(str(e))}",
                   traceback=traceback.format_exc())
    rec["failed_stage"] = stage if rec.get("status") != "ok" else None
    _save(result, rec)


# ----------------------------------------------------------------------------- the driver
def run_isolated(name: str, corpus: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``--one name`` in a subprocess; the record, whatever happened to it."""
    with tempfile.TemporaryDirectory(prefix=f"qc-corpus-{name}-") as d:
        result = Path(d) / "result.json"
        cmd = [sys.executable, __file__, "--one", name, "--corpus", str(corpus),
               "--samples", str(args.samples), "--repeat", str(args.repeat),
               "--artifact", str(args.keep / name if args.keep else Path(d) / "art"),
               "--result", str(result)]
        t = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            rc, err, timed_out = p.returncode, p.stderr, False
        except subprocess.TimeoutExpired as e:
            rc, timed_out = None, True
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        rec = json.loads(result.read_text()) if result.exists() else {"stage": "start"}
        rec["seconds"] = round(time.perf_counter() - t, 1)
        if timed_out:
            rec.update(status="timeout", line=f"no result after {args.timeout:.0f} s "
                       f"(in stage {rec.get('stage')})", failed_stage=rec.get("stage"))
        elif "status" not in rec:  # the process died under us (signal, OOM, sys.exit)
            tail = "\n".join(err.strip().splitlines()[-30:])
            rec.update(status="crash", exit_code=rc, failed_stage=rec.get("stage"),
                       line=f"process died with exit code {rc} in stage {rec.get('stage')}",
                       traceback=tail)
    return rec


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return NA
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return fmt_num(v, digits) or NA
    return str(v)


def _revisions(rows: list[dict[str, Any]], meta: dict[str, Any]) -> list[tuple[str, int]]:
    """Which compiler revision measured how many rows (``--update`` mixes runs)."""
    import collections
    return collections.Counter(r.get("compiler", meta["compiler"]) for r in rows).most_common()


def render(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    out = [f"# Real-world ONNX corpus ({meta['date']})", "",
           f"{len(rows)} models from `{meta['corpus']}`: INT8, llvm, synthetic calibration "
           f"({meta['samples']} samples), evaluation on {meta['samples']} synthetic inputs, "
           f"latency median of {meta['repeat']} on {machine_label(meta['provenance'])}; "
           f"per-model timeout {meta['timeout_s']:.0f} s; compiler at "
           + ", ".join(f"`{c}` ({n} models)" for c, n in _revisions(rows, meta)) + ". "
           "Random (seeded) weights except "
           "`efficientnet_lite0_real`: agreement and SQNR measure quantization noise, "
           "not accuracy.", "",
           "Status: " + ", ".join(f"{s} {n}" for s, n in counts.items() if n)
           + f"; compile's fidelity guard (exit 13) refused "
             f"{sum(r.get('exit_code') == 13 for r in rows)}", "",
           provenance_line(meta["provenance"]), ""]
    dirty = sum(str(r.get("compiler", meta["compiler"])).endswith("+dirty") for r in rows)
    if dirty:
        out += [f"**{dirty} of {len(rows)} rows were measured on a tree with uncommitted "
                "changes** (`+dirty`): they describe no commit.", ""]
    loads = [v for r in rows for v in r.get("load1", [])]
    if loads:
        out += [f"Load average (1 min) around the models: {min(loads):.1f}–{max(loads):.1f} "
                f"on {meta['provenance']['threads']['cpu_count']} CPUs; above that, latencies are "
                "indicative only (`load1` per row in the JSON).", ""]
    out += [
           "| model | status | compile s | bit-exact | int-only | top-1 agr. | SQNR dB "
           "| guard SQNR dB | qcompile ms | ORT FP32 ms | speedup | error |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        line = (r.get("line") or "").replace("|", "/")
        if r["status"] == "refused":
            line = f"exit {r.get('exit_code')}: {line}"
        out.append(f"| {r['name']} | {r['status']} | {_fmt(r.get('compile_s'))} "
                   f"| {_fmt(r.get('bit_exact'))} | {_fmt(r.get('integer_only'))} "
                   f"| {_fmt(r.get('top1_agreement'), 2)} | {_fmt(r.get('sqnr_db'))} "
                   f"| {_fmt(r.get('guard_sqnr_db'))} | {_fmt(r.get('qc_ms'), 2)} "
                   f"| {_fmt(r.get('ort_ms'), 2)} "
                   f"| {_fmt(r.get('speedup'), 2)} | {('`' + line[:300] + '`') if line else ''} |")
    crashes = [r for r in rows if r.get("traceback")]
    if crashes:
        out += ["", "## Tracebacks", ""]
        for r in crashes:
            out += [f"### {r['name']} ({r['status']}, stage {r.get('failed_stage')})", "",
                    "```", r["traceback"].rstrip()[-4000:], "```", ""]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--models", nargs="+", help="only these (names from the manifest)")
    ap.add_argument("--quick", action="store_true",
                    help=f"{len(QUICK)} representative models and --repeat 5")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per model")
    ap.add_argument("--samples", type=int, default=8, help="calibration and evaluation samples")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--update", action="store_true",
                    help="merge these models' rows into today's full results file "
                         "(rerun failures or new models without redoing the rest)")
    ap.add_argument("--keep", type=Path, help="keep the artifacts under this folder")
    ap.add_argument("--allow-dirty", action="store_true",
                    help="run on a tree with uncommitted changes (rows are marked +dirty)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    # internal: one model in this process
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--artifact", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    corpus = args.corpus.expanduser()
    mpath = corpus / "manifest.json"
    if not mpath.exists():
        print(f"error: no {mpath}; run tools/export_corpus.py first (make corpus)",
              file=sys.stderr)
        return 2
    manifest = json.loads(mpath.read_text())
    entries = {r["name"]: r for r in manifest["models"]}
    if args.one:
        run_one(entries[args.one], corpus, args.artifact, args.samples, args.repeat, args.result)
        return 0
    names = list(entries)
    if args.quick:
        names = [n for n in QUICK if n in entries]
        args.repeat = min(args.repeat, 5)
    if args.models:
        unknown = [n for n in args.models if n not in entries]
        if unknown:
            print(f"error: not in the corpus: {unknown}", file=sys.stderr)
            return 2
        names = args.models
    state = git_state()
    if state["dirty"] is True:
        paths = ", ".join(state["dirty_paths"][:5]) + (", ..." if len(state["dirty_paths"]) > 5 else "")
        if not args.allow_dirty:
            print(f"error: uncommitted changes ({paths}); results must name one commit: commit "
                  "them, or pass --allow-dirty (BENCH_ARGS=--allow-dirty) to mark rows +dirty",
                  file=sys.stderr)
            return 2
        print(f"warning: uncommitted changes ({paths}): every row is marked +dirty", file=sys.stderr)
    watch = Stopwatch()
    date = dt.date.today().isoformat()
    # A subset never overwrites the full run's file, unless --update merges it in.
    subset = args.models and not args.update
    stem = f"corpus-{date}" + ("-quick" if args.quick else "-subset" if subset else "")
    meta = {"date": date, "compiler": revision(state), "corpus": str(corpus),
            "samples": args.samples, "repeat": args.repeat, "timeout_s": args.timeout,
            "export_versions": manifest.get("versions", {}), "quick": args.quick,
            "provenance": provenance(peers=("efficientnet-lite-pytorch",),
                                     ort_threads=ORT_DEFAULT_THREADS)}
    rows: list[dict[str, Any]] = []
    if args.update and (args.out / f"{stem}.json").exists():
        # Keep the other models' rows (each says which compiler revision it measured).
        old = json.loads((args.out / f"{stem}.json").read_text())
        rows = [r for r in old["models"] if r["name"] not in names and r["name"] in entries]
    for f in manifest.get("failed", []):  # export failures are rows too
        if f["name"] in (args.models or [f["name"]]):
            rows.append({"name": f["name"], "family": f["family"], "status": "skipped",
                         "line": f"export failed: {f['error']}"})
    for i, name in enumerate(names):
        e = entries[name]
        print(f"[{i + 1}/{len(names)}] {name} ...", flush=True)
        load = os.getloadavg()[0]
        rec = run_isolated(name, corpus, args)
        # Timings are only as good as the machine was quiet: keep the load beside them.
        rec["load1"] = [round(load, 2), round(os.getloadavg()[0], 2)]
        row = {"name": name, "family": e["family"], "file": e["file"],
               "input_shape": e["input_shape"], "opset": e["opset"], "ops": e["ops"], **rec}
        st = git_state()  # the tree may change under a long run: each row says what it measured
        row.update(compiler=revision(st), commit=st["commit"], dirty=st["dirty"])
        rows.append(row)
        order = {n: k for k, n in enumerate(entries)}
        rows.sort(key=lambda r: order.get(r["name"], len(order)))
        print(f"    {row['status']} ({row['seconds']} s) {row.get('line') or ''}", flush=True)
        meta["seconds"] = watch.seconds
        meta["provenance"].update(load_avg=[round(v, 2) for v in os.getloadavg()],
                                  row_revisions=dict(_revisions(rows, meta)))
        if st["dirty"] is True:  # the tree changed under the run
            meta["provenance"]["dirty"] = True
        write_results(args.out, stem, {**meta, "models": rows}, render(rows, meta))
    meta["seconds"] = watch.seconds
    problems = [f"{r['name']}: {r['status']}: {r.get('line')}" for r in rows if r["status"] != "ok"]
    return finish(args.out, stem, {**meta, "models": rows}, render(rows, meta), problems,
                  watch.seconds)


if __name__ == "__main__":
    sys.exit(main())
