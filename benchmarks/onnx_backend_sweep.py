"""Try to compile every ONNX backend node test model and classify what a user would see.

    python benchmarks/onnx_backend_sweep.py [--root DIR] [--suites node] [--timeout 120]
        [--workers 2] [--freeze no|yes|both] [--limit N] [--match SUBSTR] [--quick]

The models come from the Debian package ``libonnx-testdata``
(``apt-get install -y libonnx-testdata``: ``/usr/share/libonnx-testdata/data/<suite>/
<test>/model.onnx``; ~930 single-op ``node`` tests).  Each one is compiled by the
``qcompile`` CLI's own ``main``, in-process in a worker, exactly as
``qcompile compile model.onnx -o OUT --target llvm --bits 8 --data synthetic
--calib-samples 2 -q`` would run it, and classified:

* ``compiled``  exit 0; then checked: bit-exact against the NumPy oracle (``api.evaluate``)
  and the output on the test's ``input_0`` against its ``output_0`` (shape, SQNR);
* ``refused``   a ``QCompileError``: its exit code and the one-line ``error: ...``;
* ``traceback`` anything else (exit 70, "internal error"): a bug.  The model is run a
  second time with ``QCOMPILE_DEBUG=1`` to capture the traceback;
* ``hang``      no answer within ``--timeout`` seconds: the worker is killed and restarted;
* ``crash``     the worker died (a signal such as SIGSEGV, or out of memory).

Most node tests pass weights as graph inputs (``Conv(x, W)``), which qcompile refuses
at load (one image input only).  ``--freeze both`` (the default) therefore sweeps twice:
*plain*, the models as shipped, and *frozen*, every multi-input model with its extra
inputs turned into initializers holding the test's own ``test_data_set_0`` values,
which exercises the op itself.

A pool of ``--workers`` worker processes each handle many models (TVM is imported once
per worker).  Results go to ``benchmarks/results/onnx-backend-sweep-<date>.{json,md}``.
Exits 1 when there is any traceback, hang or crash, or a compiled model fails its check.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import io
import multiprocessing as mp
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import Stopwatch, finish, machine_label, provenance, provenance_line, revision  # noqa: E402
from qcompile.errors import EXIT_CODES  # noqa: E402  (errors.py imports nothing heavy)

DEFAULT_ROOT = Path("/usr/share/libonnx-testdata/data")
RESULTS = Path(__file__).resolve().parent / "results"
CLASSES = ("compiled", "refused", "traceback", "hang", "crash")
#: Every QCompileError's exit code (qcompile/errors.py): a refusal in one line, not a bug.
REFUSAL_CODES: frozenset[int] = frozenset(EXIT_CODES.values())
BUGS = ("traceback", "hang", "crash")


# ----------------------------------------------------------------------------- the worker
def _cli_args(model: Path, out: Path, samples: int) -> list[str]:
    return ["compile", str(model), "-o", str(out), "--target", "llvm", "--bits", "8",
            "--data", "synthetic", "--calib-samples", str(samples), "-q"]


def _run_cli(main: Any, args: list[str]) -> tuple[int, str, str | None]:
    """(exit code, captured stderr, traceback if an exception escaped ``main``)."""
    err = io.StringIO()
    tb = None
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main.main(args, prog_name="qcompile", standalone_mode=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException as e:  # noqa: BLE001 - a bug: keep the whole story
            code = 70
            tb = traceback.format_exc()
            err.write(f"internal error: {type(e).__name__}: {e}\n")
    return code, err.getvalue(), tb


def _error_line(stderr: str) -> str:
    """The line a user would read: the last ``error:``/``internal error:`` line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith(("error:", "internal error:"))]
    return (errs or lines or [""])[-1][:500]


def freeze_extra_inputs(model: Path, dst: Path) -> bool:
    """Make every graph input but the first an initializer holding the test's own
    ``test_data_set_0/input_<i>.pb``: ``Conv(x, W)`` becomes a conv with weights, which
    is what a CNN has.  False (nothing written) when the model has one input already."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(model))
    inits = {t.name for t in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in inits]
    if len(inputs) < 2:
        return False
    data = model.parent / "test_data_set_0"
    for k, inp in enumerate(inputs[1:], start=1):
        pb = data / f"input_{k}.pb"
        # Sequences, optionals and maps cannot be initializers: leave the model out.
        if not pb.exists() or inp.type.WhichOneof("value") != "tensor_type":
            return False
        t = onnx.TensorProto()
        try:
            t.ParseFromString(pb.read_bytes())
            value = numpy_helper.to_array(t)
        except Exception:  # noqa: BLE001 - not a plain tensor (a sequence's bytes)
            return False
        m.graph.initializer.append(numpy_helper.from_array(value, inp.name))
        if m.ir_version >= 4:  # before IR 4 every initializer must also be a graph input
            m.graph.input.remove(inp)
    onnx.save(m, str(dst))
    return True


def check_compiled(model: Path, art: Path, test_dir: Path) -> dict[str, Any]:
    """A compiled model, checked: bit-exact against the NumPy oracle (``api.evaluate``,
    2 synthetic samples) and SQNR of its output on the test's own ``input_0`` against the
    test's expected ``output_0`` (calibration was synthetic, so a low SQNR may be range
    clipping rather than a wrong lowering; a shape mismatch is always a bug)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper
    from qcompile import api

    out: dict[str, Any] = {}
    try:
        ev = api.evaluate(model, art, num_samples=2, progress=False)
        out["bit_exact"] = bool(ev.bit_exact)
    except Exception as e:  # noqa: BLE001
        out["check_error"] = f"evaluate: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
    data = test_dir / "test_data_set_0"
    try:
        if (data / "input_0.pb").exists() and (data / "output_0.pb").exists():
            x, ref = (numpy_helper.to_array(onnx.load_tensor(str(data / f))).astype(np.float32)
                      for f in ("input_0.pb", "output_0.pb"))
            y = api.run_artifact(art, x)
            if y.shape != ref.shape:
                out["output_mismatch"] = f"output shape {y.shape}, expected {ref.shape}"
            else:
                noise = float(((y.astype(np.float64) - ref) ** 2).sum())
                signal = float((ref.astype(np.float64) ** 2).sum())
                out["sqnr_db"] = (float("inf") if noise == 0
                                  else round(10 * np.log10(max(signal, 1e-30) / noise), 1))
    except Exception as e:  # noqa: BLE001
        out.setdefault("check_error", f"run: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
    return out


def compile_one(main: Any, model: Path, samples: int, freeze: bool = False) -> dict[str, Any]:
    """Compile one model through the CLI; the classified outcome."""
    work = Path(tempfile.mkdtemp(prefix="qc-sweep-"))
    t = time.perf_counter()
    test_dir = model.parent
    try:
        if freeze:
            frozen = work / "model.onnx"
            if not freeze_extra_inputs(model, frozen):
                return {"class": "not-frozen", "exit_code": None, "line": "", "seconds": 0.0}
            model = frozen
        code, stderr, tb = _run_cli(main, _cli_args(model, work / "out", samples))
        rec: dict[str, Any] = {"exit_code": code, "line": _error_line(stderr) if code else ""}
        if code == 0:
            rec["class"] = "compiled"
            rec.update(check_compiled(model, work / "out", test_dir))
        elif code in REFUSAL_CODES:
            rec["class"] = "refused"
        else:
            rec["class"] = "traceback"
            if tb is None:  # the CLI swallowed it (exit 70): rerun with the traceback on
                shutil.rmtree(work / "out", ignore_errors=True)
                os.environ["QCOMPILE_DEBUG"] = "1"
                try:
                    _, _, tb = _run_cli(main, _cli_args(model, work / "out", samples))
                finally:
                    os.environ.pop("QCOMPILE_DEBUG", None)
            rec["traceback"] = tb or "(no traceback: exited with code %d)" % code
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rec["seconds"] = round(time.perf_counter() - t, 2)
    return rec


def _worker(conn: Connection, samples: int, job_fn: Any = None) -> None:
    """``job_fn(main, path, samples, freeze) -> rec`` (default ``compile_one``): other
    harnesses (benchmarks/fuzz.py) reuse the pool with their own per-model job."""
    # TVM and LLVM print from C++ straight to fds 1/2; keep them out of the parent's output.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.environ.pop("QCOMPILE_DEBUG", None)
    import warnings
    warnings.simplefilter("ignore")
    from qcompile.cli.main import main
    import qcompile.api  # noqa: F401 - TVM's import (seconds) is not any model's time
    conn.send(("ready", None))
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        path, freeze = job
        try:
            rec = (job_fn or compile_one)(main, Path(path), samples, freeze)
        except Exception as e:  # noqa: BLE001 - the harness itself (e.g. freezing) failed
            rec = {"class": "traceback", "exit_code": None, "seconds": 0.0,
                   "line": f"harness: {type(e).__name__}: {e}",
                   "traceback": traceback.format_exc()}
        conn.send((job, rec))


class Worker:
    """One worker process and its pipe; ``job`` is the model it is working on."""

    def __init__(self, ctx: Any, samples: int, job_fn: Any = None) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, samples, job_fn), daemon=True)
        self.proc.start()
        child.close()
        self.job: tuple[str, bool] | None = None
        self.since = 0.0
        self.ready = False

    def give(self, job: tuple[str, bool]) -> None:
        self.job, self.since = job, time.monotonic()
        self.conn.send(job)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(5)
        self.conn.close()


# ----------------------------------------------------------------------------- the pool
def sweep(models: list[Path], root: Path, workers: int, timeout: float, samples: int,
          freeze: bool = False, startup: float = 120.0, job_fn: Any = None,
          key: Any = None) -> dict[str, dict[str, Any]]:
    """Classify every model; a hung or dead worker is replaced and the sweep goes on.

    With ``freeze`` each model's extra inputs become initializers first (models with
    one input are left out: the plain sweep has them).  ``job_fn`` replaces
    ``compile_one`` in the workers (a module-level function); ``key(path)`` names a result."""
    ctx = mp.get_context("spawn")
    queue = collections.deque((str(m), freeze) for m in models)
    results: dict[str, dict[str, Any]] = {}
    pool = [Worker(ctx, samples, job_fn) for _ in range(min(workers, len(queue)) or 1)]
    t0 = time.monotonic()
    for w in pool:
        w.since = t0

    def name(job: tuple[str, bool]) -> str:
        if key is not None:
            return key(Path(job[0]))
        return ("frozen:" if job[1] else "") + str(Path(job[0]).parent.relative_to(root))

    def record(job: tuple[str, bool], rec: dict[str, Any]) -> None:
        if rec["class"] != "not-frozen":
            results[name(job)] = rec
            _progress(len(results), len(models), name(job), rec)

    def replace(w: Worker) -> None:
        w.kill()
        pool[pool.index(w)] = nw = Worker(ctx, samples, job_fn)
        nw.since = time.monotonic()

    while queue or any(w.job for w in pool):
        for w in pool:
            if w.ready and w.job is None and queue:
                w.give(queue.popleft())
        ready = wait([w.conn for w in pool] + [w.proc.sentinel for w in pool], timeout=1.0)
        for w in list(pool):
            if w.conn in ready:
                try:
                    job, rec = w.conn.recv()
                except (EOFError, OSError):
                    job, rec = None, None
                if job == "ready":
                    w.ready = True
                    continue
                if rec is not None:
                    record(tuple(job), rec)
                    w.job = None
                    continue
            if not w.proc.is_alive() or (w.conn in ready and rec is None):
                if w.job is None and not w.ready:
                    raise RuntimeError("a sweep worker died while starting (is qcompile "
                                       "importable from this Python?)")
                if w.job is not None:
                    w.proc.join(2)  # reap it, for the exit code (-11: SIGSEGV)
                    rec = {"class": "crash", "exit_code": w.proc.exitcode,
                           "line": f"worker died (exit code {w.proc.exitcode})",
                           "seconds": round(time.monotonic() - w.since, 2)}
                    record(w.job, rec)
                replace(w)
                continue
            limit = timeout if w.ready else startup
            if (w.job is not None or not w.ready) and time.monotonic() - w.since > limit:
                if w.job is not None:
                    rec = {"class": "hang", "exit_code": None,
                           "line": f"no result after {timeout:.0f} s (worker killed)",
                           "seconds": round(time.monotonic() - w.since, 2)}
                    record(w.job, rec)
                replace(w)
    for w in pool:
        with contextlib.suppress(OSError):
            w.conn.send(None)
        w.proc.join(5)
        if w.proc.is_alive():
            w.kill()
    return results


def _progress(done: int, total: int, name: str, rec: dict[str, Any]) -> None:
    line = f" {rec['line'][:110]}" if rec.get("line") else ""
    print(f"[{done}/{total}] {name}: {rec['class']} ({rec['seconds']:.1f} s){line}", flush=True)


# ----------------------------------------------------------------------------- report
MODES = ("plain", "frozen")


def mode_of(key: str) -> str:
    return "frozen" if key.startswith("frozen:") else "plain"


def first_line(rec: dict[str, Any]) -> str:
    line = (rec.get("line") or "").removeprefix("internal error: ")
    return line.removesuffix("; rerun with QCOMPILE_DEBUG=1 for the traceback")


def _tb_where(tb: str) -> str:
    """The innermost ``File ...`` frame inside qcompile (where the bug is), if any."""
    frames = [ln.strip() for ln in tb.splitlines() if ln.strip().startswith("File ")]
    ours = [f for f in frames if "/qcompile/" in f or "/kernels/" in f]
    where = (ours or frames or [""])[-1]
    return re.sub(r'File "[^"]*/((?:qcompile|kernels)/[^"]+)"', r"\1", where)


def _shape_of(msg: str) -> str:
    """Group messages that differ only in paths, node/tensor names and numbers."""
    msg = re.sub(r"\S*model\.onnx", "MODEL", msg)
    msg = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", msg)
    msg = re.sub(r"\((?!op )[^)]*\)", "(…)", msg)  # keep "(op Foo)"
    msg = re.sub(r"supported ops: .*", "supported ops: …", msg)
    msg = re.sub(r"\d+", "N", msg)
    return msg[:200]


def _check_problem(rec: dict[str, Any]) -> str:
    """Why a compiled model failed its check ("" when it passed or did not compile)."""
    if rec["class"] != "compiled":
        return ""
    if rec.get("bit_exact") is False:
        return "NOT bit-exact against the oracle"
    return rec.get("output_mismatch") or rec.get("check_error") or ""


def render(results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    counts = {m: collections.Counter(r["class"] for k, r in results.items() if mode_of(k) == m)
              for m in MODES}
    out = [f"# ONNX backend test sweep ({meta['date']})", "",
           f"Models from `{meta['root']}` (suites: {', '.join(meta['suites'])}), each compiled "
           f"in-process by the CLI's `main` as `qcompile {' '.join(meta['cli'])}`; per-model "
           f"timeout {meta['timeout_s']:.0f} s; {meta['workers']} workers; took "
           f"{meta['seconds']:.0f} s on {machine_label(meta['provenance'])}; compiler at "
           f"`{meta['compiler']}`.", "", provenance_line(meta["provenance"]), "",
           "*plain*: the test's model as shipped. *frozen*: the same model with every input "
           "but the first turned into an initializer holding the test's own "
           "`test_data_set_0` values (Conv(x, W) becomes a conv with weights); only models "
           "with several inputs.", "",
           "| class | plain | frozen |", "| --- | --- | --- |"]
    out += [f"| {c} | {counts['plain'].get(c, 0)} | {counts['frozen'].get(c, 0)} |"
            for c in CLASSES]
    out.append(f"| total | {sum(counts['plain'].values())} | {sum(counts['frozen'].values())} |")
    refused = {k: r for k, r in results.items() if r["class"] == "refused"}
    if refused:
        codes = collections.Counter(r["exit_code"] for r in refused.values())
        out += ["", "Refusals by exit code: " + ", ".join(
            f"{c}: {n}" for c, n in sorted(codes.items(), key=lambda kv: str(kv[0])))]
        msgs = collections.Counter(_shape_of(first_line(r)) for r in refused.values())
        out += ["", "Most common refusals, both modes (paths, names and numbers elided):", "",
                "| count | message |", "| --- | --- |"]
        out += [f"| {n} | `{m.replace('|', '/')}` |" for m, n in msgs.most_common(20)]
    for cls in BUGS:
        bad = sorted((k, r) for k, r in results.items() if r["class"] == cls)
        if not bad:
            continue
        out += ["", f"## {cls} ({len(bad)})", "", "| model | line | where |", "| --- | --- | --- |"]
        for k, r in bad:
            where = _tb_where(r.get("traceback", "")) if cls == "traceback" else ""
            out.append(f"| {k} | `{first_line(r).replace('|', '/')[:240]}` | "
                       f"{where.replace('|', '/')} |")
    flawed = sorted((k, r) for k, r in results.items() if _check_problem(r))
    if flawed:
        out += ["", f"## compiled, but the check failed ({len(flawed)})", "",
                "Not bit-exact against the oracle, wrong output shape, or `api.evaluate` / "
                "`api.run_artifact` raised on the compiled artifact.", "",
                "| model | problem |", "| --- | --- |"]
        for k, r in flawed:
            out.append(f"| {k} | `{_check_problem(r).replace('|', '/')[:240]}` |")
    sq = sorted((r["sqnr_db"], k) for k, r in results.items()
                if isinstance(r.get("sqnr_db"), float) and r["sqnr_db"] < 20)
    if sq:
        out += ["", f"Compiled models whose output on the test's `input_0` is below 20 dB SQNR "
                f"against its `output_0` ({len(sq)}; calibration was synthetic N(0,1), so "
                "this is mostly range clipping, e.g. Relu clips at the calibrated max; "
                "worth a look, not proof of a bug): "
                + ", ".join(f"{k} ({v:.1f})" for v, k in sq)]
    for m in MODES:
        ok = sorted(k for k, r in results.items() if r["class"] == "compiled" and mode_of(k) == m)
        if ok:
            out += ["", f"## compiled, {m} ({len(ok)})", "", ", ".join(ok)]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- main
def find_models(root: Path, suites: list[str], match: str | None) -> list[Path]:
    models = []
    for s in suites:
        models += sorted((root / s).glob("*/model.onnx"))
    if match:
        models = [m for m in models if match in m.parent.name]
    return models


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--suites", nargs="+", default=["node"],
                    help="node, pytorch-converted, pytorch-operator, simple (default: node)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per model")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--samples", type=int, default=2, help="synthetic calibration samples")
    ap.add_argument("--freeze", choices=("no", "yes", "both"), default="both",
                    help="also compile each multi-input model with its extra inputs frozen "
                         "to the test's data (default: both the plain and the frozen sweep)")
    ap.add_argument("--match", help="only tests whose name contains this")
    ap.add_argument("--limit", type=int, help="only the first N models")
    ap.add_argument("--quick", action="store_true", help="every 10th model (a smoke run)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    models = find_models(args.root, args.suites, args.match)
    if not models:
        print(f"error: no */model.onnx under {args.root}/{{{','.join(args.suites)}}}; "
              "install them with `apt-get install -y libonnx-testdata`", file=sys.stderr)
        return 2
    if args.quick:
        models = models[::10]
    if args.limit:
        models = models[:args.limit]
    watch = Stopwatch()
    results: dict[str, dict[str, Any]] = {}
    for freeze in {"no": [False], "yes": [True], "both": [False, True]}[args.freeze]:
        results.update(sweep(models, args.root, args.workers, args.timeout, args.samples,
                             freeze=freeze))
    date = dt.date.today().isoformat()
    prov = provenance()
    meta = {"date": date, "compiler": revision(prov), "root": str(args.root),
            "suites": args.suites,
            "cli": _cli_args(Path("MODEL"), Path("OUT"), args.samples),
            "timeout_s": args.timeout, "workers": args.workers, "seconds": watch.seconds,
            "provenance": prov, "quick": args.quick}
    counts = {m: collections.Counter(r["class"] for k, r in results.items() if mode_of(k) == m)
              for m in MODES}
    data = {**meta, "counts": {m: {c: counts[m].get(c, 0) for c in CLASSES} for m in MODES},
            "models": dict(sorted(results.items()))}
    stem = f"onnx-backend-sweep-{date}" + ("-quick" if args.quick else "")
    problems = [f"{k}: {r['class']}: {first_line(r)}" for k, r in sorted(results.items())
                if r["class"] in BUGS]
    problems += [f"{k}: compiled, check failed: {_check_problem(r)}"
                 for k, r in sorted(results.items()) if _check_problem(r)]
    return finish(args.out, stem, data, render(results, meta), problems, watch.seconds)


if __name__ == "__main__":
    sys.exit(main())
