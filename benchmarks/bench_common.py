"""Helpers shared by the benchmarks: provenance (what every result file records of the
command, commit, versions, CPU and threads), timing summaries, tables (build, check
complete, render) and the Pareto plot.

Benchmark-only code.  Light imports only (NumPy), so the smoke test stays fast;
matplotlib is imported lazily and is optional (the ``plots`` extra).
"""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

NA = "n/a"        # a cell that does not apply (allowed); None/NaN/absent is missing
REFERENCE = "ref"  # the configuration other cells are measured against


# --- provenance -------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
UNRECORDED = "unrecorded"  # a fact nobody wrote down (reconstructed provenance only)
# What every result file's "provenance" block holds (tests/test_provenance.py checks them).
PROVENANCE_FIELDS = ("command", "date", "commit", "dirty", "versions", "cpu", "threads")
CORE_PACKAGES = {"qcompile": "qcompile", "tvm": "apache-tvm", "onnxruntime": "onnxruntime",
                 "onnx": "onnx", "numpy": "numpy"}  # key -> distribution
PEER_PACKAGES = ("openvino", "nncf", "torch", "torchvision", "timm")  # recorded when installed
# The /proc/cpuinfo flags that decide which x86 kernels run (qcompile/targets/x86/kernel_rules.py).
KERNEL_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "gfni", "amx_tile",
                "amx_int8")
# Written by the runs, never read by them: changes there do not make the tree dirty.
OUTPUT_DIRS = ("out/", "benchmarks/results/")
ORT_DEFAULT_THREADS = "0 (onnxruntime's default: its own choice)"


def _cpuinfo() -> tuple[str, str, set[str]]:
    """(model name, vendor, flags) of the first CPU in /proc/cpuinfo."""
    model = vendor = ""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key = key.strip().lower()
            if key == "model name" and not model:
                model = val.strip()
            elif key == "vendor_id" and not vendor:
                vendor = val.strip()
            elif key == "flags" and not flags:
                flags = set(val.split())
    except OSError:
        pass
    return model or platform.processor() or platform.machine() or "unknown CPU", vendor, flags


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """``commit`` (full sha of HEAD), ``dirty`` (tracked changes or untracked files outside
    OUTPUT_DIRS) and up to 20 ``dirty_paths``; "unrecorded" outside a qcompile checkout
    (a GPU bundle)."""
    head = _git("rev-parse", "HEAD") if (REPO / "qcompile").is_dir() else None
    status = _git("status", "--porcelain", "--untracked-files=all") if head else None
    if head is None or status is None:
        return {"commit": UNRECORDED, "dirty": UNRECORDED, "dirty_paths": []}
    paths = [ln[3:].split(" -> ")[-1].strip('"') for ln in status.splitlines() if ln.strip()]
    paths = [q for q in paths if not q.startswith(OUTPUT_DIRS)]
    return {"commit": head.strip(), "dirty": bool(paths), "dirty_paths": paths[:20]}


def revision(state: Mapping[str, Any] | None = None) -> str:
    """``<short sha>`` or ``<short sha>+dirty``: what a row or a Markdown line names."""
    st = git_state() if state is None else state
    commit = str(st.get("commit", UNRECORDED))
    short = commit[:7] if re.fullmatch(r"[0-9a-f]{40}", commit) else commit
    return short + ("+dirty" if st.get("dirty") is True else "")


def package_versions(extra: Sequence[str] = ()) -> dict[str, str]:
    """Python and the core packages ("not installed" where absent), every installed peer of
    PEER_PACKAGES, and ``extra``. A module already imported reports its own ``__version__``
    (what ran: a bundle's TVM runtime, not the venv's); others their installed version."""
    from importlib import metadata
    out = {"python": platform.python_version()}
    wanted = [*CORE_PACKAGES.items(), *((n, n) for n in (*PEER_PACKAGES, *extra))]
    for key, dist in wanted:
        mod = sys.modules.get(key.replace("-", "_"))
        v = getattr(mod, "__version__", None)
        if not isinstance(v, str):
            try:
                v = metadata.version(dist)
            except metadata.PackageNotFoundError:
                v = None if key in PEER_PACKAGES and key not in extra else "not installed"
        if v is not None:
            out[key] = v
    return out


def cpu_info(kernel_flags: bool = True) -> dict[str, Any]:
    """Model, vendor, LLVM -mcpu, the KERNEL_FLAGS the CPU has, and those qcompile's kernels
    may use here (``x86_rules.usable_flags``: AMX only where the OS grants its tile state
    and QCOMPILE_NO_AMX is off). ``kernel_flags=False`` skips that import (it loads TVM),
    for the GPU bundle, which must not import the compiler."""
    model, vendor, flags = _cpuinfo()
    out: dict[str, Any] = {"model": model, "vendor": vendor or UNRECORDED,
                           "flags": {f: f in flags for f in KERNEL_FLAGS}}
    try:
        from qcompile.hw.facts import host_mcpu
        out["mcpu"] = host_mcpu() or "generic"
    except ImportError:
        out["mcpu"] = UNRECORDED
    usable: Any = "not checked (the compiler is not imported here)"
    if kernel_flags:
        try:
            from qcompile.targets.x86.kernel_rules import usable_flags
            usable = sorted(f for f in KERNEL_FLAGS if f in usable_flags(frozenset(flags)))
        except Exception as e:  # noqa: BLE001 - provenance must not fail a finished run
            usable = f"unknown ({type(e).__name__}: {e})"[:200]
    out["kernel_flags"] = usable
    out["amx"] = ("granted" if isinstance(usable, list) and "amx_int8" in usable else
                  "absent" if "amx_int8" not in flags else
                  "present, not granted" if isinstance(usable, list) else "present")
    return out


def thread_info(ort_threads: int | str | None = None) -> dict[str, Any]:
    """CPU count, this process's affinity, TVM_NUM_THREADS, onnxruntime's intra-op threads
    (as the caller configured them; "no onnxruntime session" when it made none)."""
    n = os.cpu_count() or 1
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else n
    return {"cpu_count": n, "affinity": affinity,
            "tvm_num_threads": os.environ.get("TVM_NUM_THREADS", "unset (TVM's default)"),
            "ort_intra_op_threads": "no onnxruntime session" if ort_threads is None else ort_threads}


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as run: ``python benchmarks/x.py --flag ...`` (script path repo-relative)."""
    args = [str(a) for a in (sys.argv if argv is None else argv)]
    if args and args[0].endswith(".py"):
        p = Path(args[0]).resolve()
        inside = (REPO / "qcompile").is_dir() and p.is_relative_to(REPO)  # not in a bundle
        args[0] = str(p.relative_to(REPO)) if inside else args[0]
        return "python " + shlex.join(args)
    return shlex.join(args)


def provenance(argv: Sequence[str] | None = None, *, peers: Sequence[str] = (),
               ort_threads: int | str | None = None, kernel_flags: bool = True,
               built: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Where a result came from, for its file's "provenance" key: the command (``argv``,
    default ``sys.argv``), the UTC date, the git commit and whether the tree was dirty, the
    versions (qcompile, TVM, onnxruntime, onnx, numpy, Python, installed peers and
    ``peers``), the CPU and the flags that select kernels, and the thread counts.

    Call it when the results are written: TVM_NUM_THREADS is then what the run used.
    ``built``: the provenance of the build step, for a run outside the checkout (the GPU
    bundle); its commit and dirty flag stand in for the missing ones.
    """
    state = git_state()
    out: dict[str, Any] = {
        "command": command_line(argv),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **state, "host": platform.node() or "host", "versions": package_versions(peers),
        "cpu": cpu_info(kernel_flags), "threads": thread_info(ort_threads),
        "load_avg": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else UNRECORDED}
    if built is not None:
        out["built"] = dict(built)
        if out["commit"] == UNRECORDED:
            for k, default in (("commit", UNRECORDED), ("dirty", UNRECORDED), ("dirty_paths", [])):
                out[k] = built.get(k, default)
    return out


def machine_label(p: Mapping[str, Any]) -> str:
    """``<CPU>, <n> threads, <best kernel ISA>`` for table notes and plot titles."""
    cpu, th = p["cpu"], p["threads"]
    n = th.get("tvm_num_threads")
    n = n if isinstance(n, int) or str(n).isdigit() else th.get("cpu_count")
    usable = cpu.get("kernel_flags")
    have = usable if isinstance(usable, list) else [f for f, v in cpu["flags"].items() if v is True]
    isa = next((f for f in ("amx_int8", "avx512_vnni", "avx_vnni", "avx2") if f in have), "")
    return f"{cpu['model']}, {n} threads" + (f", {isa}" if isa else "")


def provenance_line(p: Mapping[str, Any]) -> str:
    """One Markdown line: command, commit (+dirty), date, CPU, threads, versions."""
    v, th = p["versions"], p["threads"]
    dirty = "" if isinstance(p.get("dirty"), bool) else f" (dirty: {p.get('dirty')})"
    peers = "".join(f", {k} {x}" for k, x in v.items() if k not in (*CORE_PACKAGES, "python"))
    flags = p["cpu"]["flags"]
    on = ", ".join(f for f, x in flags.items() if x is True) or (
        "none" if all(isinstance(x, bool) for x in flags.values()) else UNRECORDED)
    return (f"Provenance{' (reconstructed)' if p.get('reconstructed') else ''}: "
            f"`{p['command']}` at {revision(p)}{dirty}, {p['date']}; {machine_label(p)} "
            f"(CPU flags: {on}; "
            f"AMX {p['cpu'].get('amx', UNRECORDED)}); threads: {th.get('cpu_count')} CPUs, "
            f"TVM_NUM_THREADS={th.get('tvm_num_threads')}, onnxruntime intra-op: "
            f"{th.get('ort_intra_op_threads')}; qcompile {v.get('qcompile')}, TVM {v.get('tvm')}, "
            f"onnxruntime {v.get('onnxruntime')}, onnx {v.get('onnx')}, numpy {v.get('numpy')}, "
            f"Python {v.get('python')}{peers}.")


def result_stem(prefix: str, quick: bool = False, node: str | None = None) -> str:
    """``<prefix>-<machine>-<date>[-quick]``: the file stem under benchmarks/results/."""
    host = (node or platform.node() or "host").replace(" ", "_")
    return f"{prefix}-{host}-{dt.date.today().isoformat()}" + ("-quick" if quick else "")


# --- timing -----------------------------------------------------------------------------
def interleaved_rounds(fns: Mapping[str, Callable[[], object]], repeat: int, *,
                       every: Mapping[str, int] | None = None, warmup: int = 3,
                       slow_warmup: int = 1, progress: Callable[[int], None] | None = None,
                       runner: Callable[..., dict[str, list[float]]] | None = None
                       ) -> dict[str, list[float]]:
    """Round-robin timing (``peers.interleaved_times``) where slow configurations join
    only every ``every[k]``-th round, so one process times them all side by side.

    Each round is one ``runner(subset, 1, warmup=0)`` call: the same measurement as
    ``interleaved_times``, with the subset and its order (rotated) changing per round.
    Returns seconds.
    """
    every = dict(every or {})
    if runner is None:
        from peers import interleaved_times as runner  # type: ignore[no-redef]
    for k, f in fns.items():  # warm-up: caches, page faults, TVM's thread pool
        for _ in range(slow_warmup if every.get(k, 1) > 1 else warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(repeat):
        keys = [k for k in fns if i % every.get(k, 1) == 0]
        # Rotate the order each round: what runs just before a configuration (cache and
        # frequency state) otherwise biases it the same way in every round.
        keys = keys[i % len(keys):] + keys[:i % len(keys)]
        subset = {k: fns[k] for k in keys}
        for k, v in runner(subset, 1, warmup=0).items():
            times[k].extend(v)
        if progress:
            progress(i)
    return times


def summarize(seconds: Sequence[float]) -> dict[str, Any]:
    """Median and min-max in ms of one configuration's samples."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {"median_ms": float(np.median(ms)), "min_ms": float(ms.min()),
            "max_ms": float(ms.max()), "repeat": int(ms.size),
            "samples_ms": [round(float(v), 4) for v in ms]}


def fmt_ms(t: Mapping[str, Any] | None) -> str | None:
    """``median (min-max)`` with precision that suits the magnitude; None if no timing."""
    if not t:
        return None
    med = t["median_ms"]
    d = 0 if med >= 1000 else 1 if med >= 10 else 2
    return f"{med:.{d}f} ({t['min_ms']:.{d}f}–{t['max_ms']:.{d}f})"


def fmt_num(v: float | None, digits: int = 1, suffix: str = "") -> str | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.{digits}f}{suffix}"


def speedup(base_ms: float | None, ms: float | None) -> float | None:
    if base_ms is None or ms is None or ms <= 0:
        return None
    return base_ms / ms


def fmt_speedup(base_ms: float | None, ms: float | None) -> str | None:
    """``base_ms / ms`` as ``"1.23x"``; None where either time is missing."""
    return fmt_num(speedup(base_ms, ms), 2, "x")


# --- fidelity ---------------------------------------------------------------------------
def agreement_sqnr(ref: np.ndarray, out: np.ndarray) -> tuple[float, float]:
    """Top-1 agreement and SQNR (dB) of ``out`` against ``ref`` logits, (N, classes)."""
    ref = np.asarray(ref, np.float64).reshape(len(ref), -1)
    out = np.asarray(out, np.float64).reshape(len(out), -1)
    agree = float(np.mean(ref.argmax(1) == out.argmax(1)))
    noise = float(((ref - out) ** 2).sum())
    signal = float((ref ** 2).sum())
    sqnr = math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)
    return agree, sqnr


# --- tables -----------------------------------------------------------------------------
class IncompleteTableError(ValueError):
    """A table has missing (None, NaN or absent) cells."""


@dataclass(frozen=True)
class Table:
    """Rows of cells keyed by column; ``columns`` are (key, header) pairs.

    A cell is *missing* when absent, None, NaN or an empty string.  Cells that do not
    apply must say so (``NA``), so an incomplete table never passes as complete.
    """

    columns: tuple[tuple[str, str], ...]
    rows: tuple[Mapping[str, Any], ...]
    title: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        keys = [k for k, _ in self.columns]
        if not keys or len(set(keys)) != len(keys):
            raise ValueError("a table needs unique, non-empty column keys")
        object.__setattr__(self, "columns", tuple(tuple(c) for c in self.columns))
        object.__setattr__(self, "rows", tuple(self.rows))
        object.__setattr__(self, "notes", tuple(self.notes))


def is_missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    return isinstance(v, str) and (not v.strip() or v.strip().lower() == "nan")


def missing_cells(table: Table) -> list[tuple[int, str]]:
    """(row index, column key) of every missing cell; empty for a complete table."""
    out = [(i, k) for i, row in enumerate(table.rows) for k, _ in table.columns
           if is_missing(row.get(k))]
    if not table.rows:
        out.append((-1, "<no rows>"))
    return out


def check_complete(table: Table) -> None:
    """Raise ``IncompleteTableError`` naming the missing cells."""
    miss = missing_cells(table)
    if miss:
        head = dict(table.columns)
        shown = ", ".join(f"row {i} ({table.rows[i].get(table.columns[0][0], '?')}): "
                          f"{head.get(k, k)}" if i >= 0 else k for i, k in miss[:8])
        more = f" and {len(miss) - 8} more" if len(miss) > 8 else ""
        raise IncompleteTableError(f"{len(miss)} missing cell(s): {shown}{more}")


def _cell(v: Any) -> str:
    if is_missing(v):
        return "—"  # visible, and check_complete reports it
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.3g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def render_markdown(table: Table) -> str:
    """GitHub Markdown: optional title line, the table, then notes as a list."""
    lines = [f"**{table.title}**", ""] if table.title else []
    lines.append("| " + " | ".join(h for _, h in table.columns) + " |")
    lines.append("| " + " | ".join("---" for _ in table.columns) + " |")
    for row in table.rows:
        lines.append("| " + " | ".join(_cell(row.get(k)) for k, _ in table.columns) + " |")
    if table.notes:
        lines.append("")
        lines.extend(f"- {n}" for n in table.notes)
    return "\n".join(lines) + "\n"


def table_json(table: Table) -> dict[str, Any]:
    return {"title": table.title, "columns": [list(c) for c in table.columns],
            "rows": [dict(r) for r in table.rows], "notes": list(table.notes)}


# --- Pareto -----------------------------------------------------------------------------
def pareto_mask(points: Sequence[tuple[float, float]]) -> list[bool]:
    """True where no other point is <= in both coordinates and < in one (minimise both)."""
    out = []
    for i, (a, b) in enumerate(points):
        dominated = any((c <= a and d <= b) and (c < a or d < b)
                        for j, (c, d) in enumerate(points) if j != i)
        out.append(not dominated)
    return out


def plot_latency_vs_size(series: Mapping[str, Sequence[tuple[str, float, float]]],
                         path: Path, title: str) -> str | None:
    """One panel per series (label, size MB, latency ms); Pareto points ringed.

    Returns None when written, or why it was skipped (matplotlib missing).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[plots]'); PNG skipped"
    n = max(len(series), 1)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(series):]:
        ax.set_visible(False)
    for ax, (name, pts) in zip(axes.flat, series.items()):
        mask = pareto_mask([(s, t) for _, s, t in pts])
        for (label, s, t), front in zip(pts, mask):
            ax.scatter([s], [t], marker="o", s=60 if front else 25,
                       facecolors="none" if not front else "C3", edgecolors="C3" if front else "C0")
            ax.annotate(label, (s, t), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = sorted((s, t) for (_, s, t), m in zip(pts, mask) if m)
        if front:
            ax.plot(*zip(*front), "C3--", lw=1, label="Pareto front")
            ax.legend(fontsize=7)
        ax.set_xlabel("size (MB)")
        ax.set_ylabel("latency (ms, median; log scale)")
        ax.set_yscale("log")  # untuned TVM FP32 is ~10x the rest
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# --- output -----------------------------------------------------------------------------
def write_results(out_dir: Path, stem: str, data: Mapping[str, Any], markdown: str) -> tuple[Path, Path]:
    """``<stem>.json`` and ``<stem>.md`` under ``out_dir`` (created)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    js.write_text(json.dumps(_finite(data), indent=1, default=_json_default, allow_nan=False) + "\n")
    md.write_text(markdown)
    return js, md


def finish(out_dir: Path, stem: str, data: Mapping[str, Any], markdown: str,
           problems: Sequence[str], seconds: float) -> int:
    """Write the results, print the table and any problems; the script's exit status."""
    js, md = write_results(out_dir, stem, data, markdown)
    print(markdown)
    print(f"wrote {js} and {md}; took {seconds:.0f} s")
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return 1 if problems else 0


def _finite(o: Any) -> Any:
    """Strict JSON: inf/NaN floats become the strings "inf"/"-inf"/"nan"."""
    if isinstance(o, float) and not math.isfinite(o):
        return "nan" if math.isnan(o) else ("inf" if o > 0 else "-inf")
    if isinstance(o, Mapping):
        return {str(k): _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)


class Stopwatch:
    """Wall time since construction, for the "took N s" lines."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0
