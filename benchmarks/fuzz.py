"""Fuzz the front end: compile every file of a hostile ONNX corpus through the CLI.

    python benchmarks/fuzz.py [--corpus DIR] [--seed 0] [--timeout 60] [--workers 2]
        [--limit N] [--run-sweep] [--out benchmarks/results]

The corpus comes from ``tools/fuzz_corpus.py`` (regenerated into ``--corpus`` with
``--seed``).  Each file is compiled by the CLI's own ``main``, in-process in a worker of
``onnx_backend_sweep``'s pool (per-file timeout, hung or dead workers replaced), as
``qcompile compile FILE -o OUT -q --calib-samples 2``, and classified: compiled / refused
(exit 2-9) / traceback (exit 70 or any other) / hang / crash.  Each run is also checked:

* the input file and its case folder unchanged (SHA-256 of every file, symlinks by target),
  and the whole corpus folder's listing unchanged;
* nothing written to the current directory (each compile runs in a fresh empty one) or
  to the directory ``make`` was started from;
* a refused compile leaves no ``-o`` directory, or an empty one;
* every stderr message is a single line: one ``error: ...`` when refused, none when
  compiled, and nothing else but one-line ``warning: ...`` messages; nothing written to
  file descriptor 2 by native code (onnxruntime's or TVM's own logging);
* the controls (``expect: compile``) compile.

The ONNX backend node tests are reported from the newest
``benchmarks/results/onnx-backend-sweep-*.json`` (``make onnx-backend-sweep``), or swept
again with ``--run-sweep`` (~2 min; its own files go to a scratch folder).
Results: ``benchmarks/results/fuzz-<date>.{json,md}``; exits
1 on any traceback, hang, crash, violated check, or a backend-sweep bug.
"""
from __future__ import annotations

import argparse
import collections
import datetime as dt
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tools"))
import onnx_backend_sweep as obs  # noqa: E402
from bench_common import Stopwatch, finish, machine_label, provenance, provenance_line, revision  # noqa: E402

RESULTS = HERE / "results"
CLASSES = obs.CLASSES
BUGS = obs.BUGS
CHECKS = ("input_modified", "corpus_changed", "wrote_to_cwd", "wrote_to_launch_dir",
          "out_left_behind", "stderr_not_one_line", "native_stderr")


def cli_args(model: Path, out: Path, samples: int = 2) -> list[str]:
    return ["compile", str(model), "-o", str(out), "-q", "--calib-samples", str(samples)]


def tree_state(root: Path) -> dict[str, str]:
    """Every entry under ``root``: a file's SHA-256, a symlink's target, or "dir"."""
    state: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            if p.is_symlink():
                state[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                state[rel] = "dir"
            else:
                try:
                    state[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
                except OSError as e:
                    state[rel] = f"unreadable:{e.errno}"
    return state


def listing(d: Path) -> list[str]:
    try:
        return sorted(os.listdir(d))
    except OSError:
        return []


def fuzz_one(main: Any, model: Path, samples: int, freeze: bool = False) -> dict[str, Any]:
    """Compile one corpus file through the CLI and check what it touched (a pool job)."""
    case, corpus = model.parent, model.parent.parent
    launch = Path(os.environ.get("QC_FUZZ_LAUNCH_DIR") or os.getcwd())
    work = Path(tempfile.mkdtemp(prefix="qc-fuzz-"))
    cwd, out = work / "cwd", work / "out"
    cwd.mkdir()
    before_case, before_corpus, before_launch = tree_state(case), listing(corpus), listing(launch)
    old = os.getcwd()
    t = time.perf_counter()
    # Native code (onnxruntime, TVM, LLVM) writes to fd 2 directly: catch that too.
    saved_fd2, native = os.dup(2), os.open(work / "fd2.log", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.chdir(cwd)
        sys.stderr.flush()
        os.dup2(native, 2)
        try:
            code, stderr, tb = obs._run_cli(main, cli_args(model, out, samples))
        finally:
            sys.stderr.flush()
            os.dup2(saved_fd2, 2)
            os.close(saved_fd2)
            os.close(native)
        seconds = time.perf_counter() - t
        native_err = (work / "fd2.log").read_text(errors="replace")
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        rec: dict[str, Any] = {"exit_code": code, "line": obs._error_line(stderr) if code else "",
                               "stderr_lines": len(lines)}
        if code == 0:
            rec["class"] = "compiled"
        elif code in obs.REFUSAL_CODES:
            rec["class"] = "refused"
        else:
            rec["class"] = "traceback"
        problems = []
        if tree_state(case) != before_case:
            problems.append("input_modified")
        if listing(corpus) != before_corpus:
            problems.append("corpus_changed")
        if listing(cwd):
            problems.append("wrote_to_cwd")
        if listing(launch) != before_launch:
            problems.append("wrote_to_launch_dir")
        if code != 0 and out.exists() and (not out.is_dir() or listing(out)):
            problems.append("out_left_behind")
        # Every message is one line: "error: ..." (exactly one when refused, none when
        # compiled) and any number of one-line "warning: ..."; nothing else (tracebacks,
        # continuation lines, C++ logs on Python's stderr).
        errors = [ln for ln in lines if ln.startswith(("error:", "internal error:"))]
        if (len(errors) != (0 if code == 0 else 1)
                or any(not ln.startswith(("error:", "internal error:", "warning:"))
                       for ln in lines)):
            problems.append("stderr_not_one_line")
            rec["stderr"] = stderr[-2000:]
        if native_err.strip():
            problems.append("native_stderr")
            rec["native_stderr"] = native_err[-2000:]
        rec["problems"] = problems
        if rec["class"] == "traceback" and tb is None:  # exit 70: rerun for the traceback
            shutil.rmtree(out, ignore_errors=True)
            os.environ["QCOMPILE_DEBUG"] = "1"
            try:
                _, _, tb = obs._run_cli(main, cli_args(model, out, samples))
            finally:
                os.environ.pop("QCOMPILE_DEBUG", None)
        if tb:
            rec["traceback"] = tb
    finally:
        os.chdir(old)
        shutil.rmtree(work, ignore_errors=True)
    rec["seconds"] = round(seconds, 2)
    return rec


def run_corpus(corpus: Path, cases: list[str], workers: int = 2, timeout: float = 60.0,
               samples: int = 2) -> dict[str, dict[str, Any]]:
    """Classify and check ``cases`` (folder names under ``corpus``) in the sweep's pool."""
    os.environ.setdefault("QC_FUZZ_LAUNCH_DIR", os.getcwd())  # inherited by the workers
    models = [corpus / c / "model.onnx" for c in cases]
    return obs.sweep(models, corpus, workers, timeout, samples, job_fn=fuzz_one,
                     key=lambda p: p.parent.name)


def violations(results: dict[str, dict[str, Any]], manifest: dict[str, dict[str, str]]
               ) -> list[str]:
    """Every failed check, one line each (empty: the run is clean)."""
    bad = []
    for k, r in sorted(results.items()):
        if r["class"] in BUGS:
            bad.append(f"{k}: {r['class']}: {obs.first_line(r)}")
        for p in r.get("problems", []):
            bad.append(f"{k}: {p}" + (f": {r.get('stderr', '')[:300]!r}"
                                       if p == "stderr_not_one_line" else ""))
        if manifest.get(k, {}).get("expect") == "compile" and r["class"] != "compiled":
            bad.append(f"{k}: a control did not compile: {obs.first_line(r)}")
        if manifest.get(k, {}).get("expect") == "refuse" and r["class"] == "compiled":
            bad.append(f"{k}: a broken model compiled")
    return bad


def latest_sweep(results_dir: Path) -> dict[str, Any] | None:
    files = sorted(results_dir.glob("onnx-backend-sweep-*.json"))
    files = [f for f in files if "quick" not in f.name] or files
    if not files:
        return None
    data = json.loads(files[-1].read_text())
    return {"file": files[-1].name, "date": data.get("date"), "compiler": data.get("compiler"),
            "counts": data.get("counts")}


def render(results: dict[str, dict[str, Any]], manifest: dict[str, dict[str, str]],
           meta: dict[str, Any], bad: list[str]) -> str:
    counts = collections.Counter(r["class"] for r in results.values())
    out = [f"# Front-end fuzz ({meta['date']})", "",
           f"{len(results)} files from `tools/fuzz_corpus.py --seed {meta['seed']}`, each "
           f"compiled in-process by the CLI's `main` as `qcompile {' '.join(meta['cli'])}` "
           f"(per-file timeout {meta['timeout_s']:.0f} s, {meta['workers']} workers); took "
           f"{meta['seconds']:.0f} s on {machine_label(meta['provenance'])}; compiler at "
           f"`{meta['compiler']}`.", "", provenance_line(meta["provenance"]), "",
           "| class | files |", "| --- | --- |"]
    out += [f"| {c} | {counts.get(c, 0)} |" for c in CLASSES]
    out.append(f"| total | {len(results)} |")
    codes = collections.Counter(r["exit_code"] for r in results.values()
                                if r["class"] == "refused")
    out += ["", "Refusals by exit code: " + ", ".join(
        f"{c}: {n}" for c, n in sorted(codes.items())), ""]
    cats = sorted({m["category"] for m in manifest.values()})
    out += ["| category | " + " | ".join(CLASSES) + " |",
            "| --- |" + " --- |" * len(CLASSES)]
    for cat in cats:
        c = collections.Counter(r["class"] for k, r in results.items()
                                if manifest.get(k, {}).get("category") == cat)
        if c:
            out.append(f"| {cat} | " + " | ".join(str(c.get(x, 0)) for x in CLASSES) + " |")
    checks = collections.Counter(p for r in results.values() for p in r.get("problems", []))
    out += ["", "Checks (files failing each; all must be 0):", "",
            "| check | files |", "| --- | --- |"]
    out += [f"| {c} | {checks.get(c, 0)} |" for c in CHECKS]
    sw = meta.get("backend_sweep")
    if sw:
        out += ["", f"ONNX backend node tests (`{sw['file']}`, compiler `{sw['compiler']}`):", "",
                "| class | plain | frozen |", "| --- | --- | --- |"]
        out += [f"| {c} | {sw['counts']['plain'].get(c, 0)} | "
                f"{sw['counts']['frozen'].get(c, 0)} |" for c in CLASSES]
    else:
        out += ["", "ONNX backend node tests: no results (run `make onnx-backend-sweep`)."]
    out += ["", f"## problems ({len(bad)})", ""]
    out += [f"- {b}" for b in bad] or ["none"]
    out += ["", "## every file", "", "| file | class | exit | line |", "| --- | --- | --- | --- |"]
    for k, r in sorted(results.items()):
        line = obs.first_line(r).replace("|", "/").replace("`", "'")[:200]
        out.append(f"| {k} | {r['class']} | {r['exit_code']} | `{line}` |")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path,
                    default=Path(tempfile.gettempdir()) / "qcompile-fuzz-corpus")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per file")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--limit", type=int, help="only the first N files")
    ap.add_argument("--run-sweep", action="store_true",
                    help="sweep the ONNX backend node tests again instead of reusing the "
                         "newest results")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    import fuzz_corpus
    watch = Stopwatch()
    manifest = fuzz_corpus.generate(args.corpus, args.seed)
    cases = list(manifest)[:args.limit] if args.limit else list(manifest)
    results = run_corpus(args.corpus, cases, args.workers, args.timeout)
    bad = violations(results, manifest)
    sweep_dir = args.out
    if args.run_sweep:  # into a scratch folder: the sweep's own results stay as they are
        sweep_dir = Path(tempfile.mkdtemp(prefix="qc-fuzz-sweep-"))
        rc = os.spawnv(os.P_WAIT, sys.executable,
                       [sys.executable, str(HERE / "onnx_backend_sweep.py"), "--out",
                        str(sweep_dir)])
        if rc:
            bad.append(f"onnx_backend_sweep.py exited {rc}")
    sweep = latest_sweep(sweep_dir)
    if sweep and args.run_sweep:
        sweep["file"] = f"swept again by --run-sweep: {sweep['file']}"
    if sweep:
        for mode, c in (sweep["counts"] or {}).items():
            bugs = sum(c.get(b, 0) for b in BUGS)
            if bugs:
                bad.append(f"backend sweep ({sweep['file']}, {mode}): {bugs} traceback/hang/crash")
    date = dt.date.today().isoformat()
    prov = provenance()
    meta = {"date": date, "compiler": revision(prov), "seed": args.seed,
            "cli": cli_args(Path("FILE"), Path("OUT")), "timeout_s": args.timeout,
            "workers": args.workers, "seconds": watch.seconds, "provenance": prov,
            "backend_sweep": sweep}
    counts = collections.Counter(r["class"] for r in results.values())
    data = {**meta, "counts": {c: counts.get(c, 0) for c in CLASSES},
            "checks": {c: sum(c in r.get("problems", []) for r in results.values())
                       for c in CHECKS},
            "problems": bad,
            "files": {k: {**manifest.get(k, {}), **r} for k, r in sorted(results.items())}}
    stem = f"fuzz-{date}" + (f"-limit{args.limit}" if args.limit else "")
    return finish(args.out, stem, data, render(results, manifest, meta, bad), bad,
                  watch.seconds)


if __name__ == "__main__":
    sys.exit(main())
