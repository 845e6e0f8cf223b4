"""Optional meta-schedule tuning of the PrimFuncs no hand-written kernel covers.

    legalize(mod) -> tune_module(mod, target, trials, db_dir) -> apply_database(...) -> compile

One task per *unique* PrimFunc (structural equality: same computation, shapes, dtypes and
constants), so ResNet's repeated residual adds are tuned once. Kernels (``op_pattern`` 8,
``tir[x].is_scheduled``) are never touched. Records persist in a meta-schedule
``JSONDatabase`` under ``db_dir`` (see ``default_db_dir``), next to a small ledger,
``qcompile_tasks.json``, of the trial budget spent per task.

Reuse rule: ``trials`` is a budget *per task*. A task that has already had ``trials`` or
more runs no new trials; one that has had fewer runs only the difference (seeded by its
records). "Had" is the ledger's count, or, for a task missing from the ledger (a database
from elsewhere), its number of valid records. The ledger counts budget, not records:
meta-schedule measures fewer candidates than asked when a small function's design space
runs dry, and such a task must not be re-tuned on every run.

Only targets whose backend can measure are tuned (``Backend.no_tune``; llvm): tuning
measures every candidate on the target itself.
"""
from __future__ import annotations

import hashlib
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import tvm
import tvm_ffi
from tqdm import tqdm
from tvm import relax

from qcompile.hw.backends import backend_of
from qcompile.build.tir import compile_tir
from qcompile.errors import UsageError
from qcompile.env import cache_dir
from qcompile.errors import error_line
from qcompile.files import JsonCache
from qcompile.tvm_compat import (
    SCHEDULED, PrimFunc, RemoveWeightLayoutRewriteBlock, Schedule, derived_object,
    light_tensor_intrin)
from qcompile.tvm_compat import meta_schedule as ms

LEDGER = "qcompile_tasks.json"
# Below this many tensor elements a function runs in about a microsecond untuned, while
# each trial costs a fraction of a second: not worth a task.
MIN_ELEMENTS = 4096
_KERNEL_OPAQUE = 8  # op_pattern kOpaque: how schedule.py marks hand-scheduled kernels


@dataclass(frozen=True)
class TaskReport:
    """One unique PrimFunc: what was tuned and how fast it became."""

    name: str                   # first PrimFunc with this structure
    funcs: tuple[str, ...]      # every PrimFunc sharing it
    signature: str              # "int32[64,256], int32[64,256] -> int32[64,256]"
    structural_hash: str        # hex; the ledger key
    trials_before: int          # budget already spent (ledger or database)
    trials_run: int             # budget spent by this call (0: reused)
    best_us: float | None       # best measured record in the database
    untuned_us: float | None    # the generic schedule, measured when the task was first tuned
    error: str | None = None    # why tuning failed (the function then stays as it was)

    @property
    def reused(self) -> bool:
        return self.trials_run == 0


@dataclass(frozen=True)
class TuneReport:
    tasks: tuple[TaskReport, ...]
    skipped: tuple[tuple[str, str], ...]  # (PrimFunc, why) left as they are
    db_dir: Path
    trials: int                           # the per-task budget asked for
    seconds: float

    @property
    def new(self) -> tuple[TaskReport, ...]:
        return tuple(t for t in self.tasks if not t.reused)

    @property
    def reused(self) -> tuple[TaskReport, ...]:
        return tuple(t for t in self.tasks if t.reused)

    def summary(self) -> str:
        lines = [f"tuning: {len(self.tasks)} unique tasks ({len(self.new)} tuned, "
                 f"{len(self.reused)} reused), {self.trials} trials/task, {self.seconds:.1f} s, "
                 f"database {self.db_dir}"]
        for t in self.tasks:
            lines.append(f"  {t.name[:60]:<60} x{len(t.funcs)} {_us(t.untuned_us):>8} -> "
                         f"{_us(t.best_us):>8} us  +{t.trials_run} trials  {t.signature}")
        return "\n".join(lines)


def _us(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


@dataclass(frozen=True)
class _Task:
    name: str
    funcs: tuple[str, ...]
    mod: tvm.IRModule           # normalized: the function as "main", as the database keys it
    signature: str
    shash: str


def default_db_dir(target: tvm.target.Target) -> Path:
    """``$QCOMPILE_CACHE_DIR/tune/<key>``, else ``~/.cache/qcompile/tune/<key>``.

    ``key`` hashes the target (kind, mcpu, cores...) and the TVM version: records are
    timings on one machine and traces replayed by one TVM, valid for nothing else.
    """
    key = hashlib.sha256(f"{tvm.__version__}|{target}".encode()).hexdigest()[:16]
    return cache_dir("tune", key)


def _skip_reason(func: PrimFunc, min_elements: int) -> str | None:
    attrs = func.attrs or {}
    if int(attrs.get("op_pattern", -1)) == _KERNEL_OPAQUE:
        return "hand-scheduled kernel (op_pattern 8)"
    if bool(attrs.get(SCHEDULED, False)):
        return "already scheduled"
    tensors = _tensors(func)
    if tensors is None:
        return "symbolic shape"
    # Total elements of its tensors: a cheap proxy for the function's work.
    if sum(math.prod(int(d) for d in t.shape) for t in tensors) < min_elements:
        return f"trivial (< {min_elements} elements)"
    return None


def _tensors(func: PrimFunc) -> list[ms.arg_info.TensorInfo] | None:
    """Its tensor arguments; None if a shape is symbolic (meta-schedule measures static ones)."""
    try:
        args = ms.arg_info.ArgInfo.from_prim_func(func)
    except TypeError:  # "Cannot convert ... ir.Var to IntImm"
        return None
    return [a for a in args if isinstance(a, ms.arg_info.TensorInfo)]


def _signature(func: PrimFunc) -> str:
    """Its tensors, the output (call_tir's last argument) after the arrow."""
    fmt = [f"{t.dtype}[{','.join(str(int(d)) for d in t.shape)}]" for t in _tensors(func) or []]
    return ", ".join(fmt[:-1]) + " -> " + fmt[-1] if fmt else "()"


def _normalize(func: PrimFunc) -> tvm.IRModule:
    """The function as the database keys it: alone, as "main" (what meta-schedule's own
    extraction does), without the attributes that would split identical tasks."""
    if func.attrs and "op_pattern" in func.attrs:
        func = func.without_attr("op_pattern")
    func = func.with_attr("global_symbol", "main").with_attr("tirx.noalias", True)
    return tvm.IRModule({"main": func})


def _called_prim_funcs(mod: tvm.IRModule) -> list[str]:
    """PrimFuncs reached by ``call_tir`` from Relax functions, in first-call order."""
    seen: list[str] = []

    def visit(e: relax.Expr) -> None:
        if isinstance(e, relax.Call) and e.op.same_as(tvm.ir.Op.get("relax.call_tir")):
            name = e.args[0].name_hint
            if name not in seen:
                seen.append(name)

    for _, f in mod.functions_items():
        if isinstance(f, relax.Function):
            relax.analysis.post_order_visit(f.body, visit)
    return seen


def extract_tasks(mod: tvm.IRModule, min_elements: int = MIN_ELEMENTS
                  ) -> tuple[list[_Task], list[tuple[str, str]]]:
    """Deduplicated tuning tasks of a legalized module, and the PrimFuncs skipped (with why)."""
    groups: dict[tvm_ffi.StructuralKey, list[str]] = {}
    norm: dict[tvm_ffi.StructuralKey, tvm.IRModule] = {}
    skipped: list[tuple[str, str]] = []
    for name in _called_prim_funcs(mod):
        func = mod[name]
        why = _skip_reason(func, min_elements)
        if why:
            skipped.append((name, why))
            continue
        nmod = _normalize(func)
        key = tvm_ffi.StructuralKey(nmod)
        groups.setdefault(key, []).append(name)
        norm.setdefault(key, nmod)
    tasks = [_Task(names[0], tuple(names), norm[k], _signature(mod[names[0]]),
                   f"{tvm_ffi.structural_hash(norm[k]) & (2**64 - 1):016x}")
             for k, names in groups.items()]
    return tasks, skipped


@derived_object
class _InProcessBuilder(ms.builder.PyBuilder):
    """Compiles candidates in this process, into ``out_dir``.

    ``LocalBuilder`` starts new worker processes for every batch, and each imports
    ``tvm.s_tir.tensor_intrin`` (~30 s here) before compiling a function that takes
    milliseconds. Candidates are plain llvm TIR; a failure is caught and recorded.
    """

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir

    def build(self, build_inputs: list[ms.builder.BuilderInput]) -> list[ms.builder.BuilderResult]:
        from tvm.support.tar import tar

        results = []
        for inp in build_inputs:
            try:
                mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(inp.mod)
                # One folder each: meta-schedule deletes an artifact's folder once measured.
                path = os.path.join(tempfile.mkdtemp(dir=self.out_dir), "mod.tar")
                compile_tir(mod, inp.target).export_library(path, fcompile=tar)
                results.append(ms.builder.BuilderResult(path, None))
            except Exception as e:  # one bad candidate must not stop the search
                results.append(ms.builder.BuilderResult(None, f"{type(e).__name__}: {e}"))
        return results


def _runner() -> ms.runner.LocalRunner:
    # 100 ms per measurement keeps microsecond kernels' timings stable without costing much.
    cfg = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=100)
    return ms.runner.LocalRunner(timeout_sec=60, evaluator_config=cfg)


def _context(task: _Task, target: tvm.target.Target, trials: int) -> ms.TuneContext:
    space = ms.space_generator.PostOrderApply(
        sch_rules="llvm", postprocs="llvm", mutator_probs="llvm")  # no intrinsics: see NOTES
    # A random cost model ranks nothing, so a large evolutionary population only costs time.
    search = ms.search_strategy.EvolutionarySearch(
        population_size=max(64, 4 * trials), init_min_unmeasured=min(50, max(16, trials)))
    threads = int(target.attrs.get("num-cores", 0)) or os.cpu_count() or 1
    with light_tensor_intrin():
        return ms.TuneContext(mod=task.mod, target=target, space_generator=space,
                              search_strategy=search, task_name=task.name,
                              num_threads=threads, rand_state=0).clone()


def _commit_untuned(db: ms.database.Database, task: _Task, target: tvm.target.Target,
                    builder: _InProcessBuilder, runner: ms.runner.LocalRunner) -> float | None:
    """Measure the generic schedule and record it (a no-op trace) as a candidate.

    Meta-schedule's parallel loops can lose to the plain loop on small functions; with the
    untuned schedule in the database, "best record" never means "slower than before".
    """
    (built,) = builder.build([ms.builder.BuilderInput(task.mod, target)])
    if built.error_msg:
        return None
    args = ms.arg_info.ArgInfo.from_prim_func(task.mod["main"])
    (fut,) = runner.run([ms.runner.RunnerInput(built.artifact_path, "cpu", args)])
    res = fut.result()
    if res.error_msg:
        return None
    secs = [float(s) for s in res.run_secs]
    sch = Schedule(task.mod)
    sch.get_sblock("root")  # a no-op step: the database never returns an empty trace as best
    db.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, db.commit_workload(task.mod), secs, target, args))
    return 1e6 * sum(secs) / len(secs)


def _database(db_dir: Path) -> ms.database.JSONDatabase:
    db_dir.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(db_dir), module_equality="structural")


def _best_us(db: ms.database.Database, task: _Task, target: tvm.target.Target) -> float | None:
    rec = db.query_tuning_record(task.mod, target, "main")
    if rec is None or not rec.run_secs:
        return None
    return 1e6 * sum(map(float, rec.run_secs)) / len(rec.run_secs)


def _valid_records(db: ms.database.Database, task: _Task) -> int:
    if not db.has_workload(task.mod):
        return 0
    return len(db.get_top_k(db.commit_workload(task.mod), 1 << 20))


def tune_module(mod: tvm.IRModule, target: tvm.target.Target, trials: int,
                db_dir: Path | None = None, *, progress: bool = True,
                min_elements: int = MIN_ELEMENTS) -> TuneReport:
    """Tune each unique non-kernel PrimFunc of a *legalized* module with ``trials`` trials.

    Records go to the JSON database in ``db_dir`` (default ``default_db_dir(target)``);
    tasks that already had ``trials`` there are reused without new trials. The untuned
    schedule is measured and recorded too, so the best record is never a slowdown. The
    module is not changed: call ``apply_database`` to use the records. A task whose tuning
    fails is reported (``TaskReport.error``) and left untuned; the others go on.
    """
    t0 = time.perf_counter()
    refused = backend_of(target).no_tune
    if refused:
        raise UsageError(refused)
    if trials < 1:
        raise UsageError(f"--tune needs a positive number of trials, got {trials}")
    db_dir = Path(db_dir) if db_dir is not None else default_db_dir(target)
    tasks, skipped = extract_tasks(mod, min_elements)
    db = _database(db_dir)
    ledger_file = JsonCache(db_dir / LEDGER)  # a corrupt ledger reads as empty
    ledger = ledger_file.load()
    before = {t.shash: ledger[t.shash]["trials"] if t.shash in ledger else _valid_records(db, t)
              for t in tasks}
    todo = [t for t in tasks if before[t.shash] < trials]
    run: dict[str, int] = {}
    if todo:
        with tempfile.TemporaryDirectory(prefix="qcompile-tune-") as scratch:
            builder, runner = _InProcessBuilder(scratch), _runner()
            bar = tqdm(todo, desc="tune", unit="task", disable=None if progress else True)
            for task in bar:  # one task at a time: exact per-task budgets, a ledger per task
                bar.set_postfix_str(task.name[:40])
                need = trials - before[task.shash]
                entry = ledger.setdefault(task.shash, {"name": task.name, "trials": 0})
                try:
                    if entry.get("untuned_us") is None:
                        entry["untuned_us"] = _commit_untuned(db, task, target, builder, runner)
                    ms.tune_tasks(tasks=[_context(task, target, need)], task_weights=[1.0],
                                  work_dir=str(db_dir), max_trials_global=need,
                                  num_trials_per_iter=min(need, 32), builder=builder,
                                  runner=runner, database=db, cost_model="random",
                                  task_scheduler="round-robin")
                    entry.pop("error", None)
                except Exception as e:  # tuning is an optimization: never fail the compile
                    entry["error"] = f"{type(e).__name__}: {error_line(e, last=True)}"
                    warnings.warn(f"tuning {task.name} failed, left untuned: {entry['error']}",
                                  stacklevel=2)
                run[task.shash] = need
                # The budget counts as spent even on failure: a rerun would fail again.
                entry.update(name=task.name, signature=task.signature, trials=trials)
                # Written after each task: an interrupted run keeps what it paid for.
                ledger_file.update({task.shash: entry})
            bar.close()
            runner.pool.shutdown()  # its measuring worker process; GC would be later
    reports = tuple(
        TaskReport(t.name, t.funcs, t.signature, t.shash, before[t.shash], run.get(t.shash, 0),
                   _best_us(db, t, target), ledger.get(t.shash, {}).get("untuned_us"),
                   ledger.get(t.shash, {}).get("error"))
        for t in tasks)
    return TuneReport(reports, tuple(skipped), db_dir, trials, time.perf_counter() - t0)


def apply_database(mod: tvm.IRModule, target: tvm.target.Target,
                   db_dir: Path | None = None) -> tvm.IRModule:
    """Replace each non-kernel PrimFunc that has a record in ``db_dir`` by its best schedule.

    Kernels and functions without records are returned unchanged; a missing database
    changes nothing. Scheduling reorders loops and never changes dtypes, so an
    integer-only module stays integer-only (and bit-exact).
    """
    db_dir = Path(db_dir) if db_dir is not None else default_db_dir(target)
    if not (db_dir / "database_workload.json").exists():
        return mod
    db = _database(db_dir)
    out = mod.clone()
    for gv, func in mod.functions_items():
        if not isinstance(func, PrimFunc) or _skip_reason(func, 0):
            continue
        sch = db.query_schedule(_normalize(func), target, "main")
        if sch is None:
            continue
        # The original attributes (generic functions are private: no global_symbol), plus a
        # mark so that later schedulers (dlight) leave the tuned function alone.
        new = sch.mod["main"].without_attr("global_symbol").with_attrs(func.attrs)
        new = new.with_attr(SCHEDULED, True)
        out.update_func(gv, new)
    return out


def tune_and_apply(mod: tvm.IRModule, target: tvm.target.Target, trials: int,
                   db_dir: Path | None = None, *, progress: bool = True
                   ) -> tuple[tvm.IRModule, TuneReport]:
    """``tune_module`` then ``apply_database``: ``--tune TRIALS`` on a legalized module."""
    report = tune_module(mod, target, trials, db_dir, progress=progress)
    return apply_database(mod, target, report.db_dir), report
