"""Per-layer, per-bit-width latency tables, measured on this machine's real kernels.

HAWQ-V3's bit allocation trades accuracy for latency, so it needs each layer's cost at
each bit width *on the target*, for the kernel the compiled model will run. So the graph
is quantized and lowered exactly as ``compile`` does it (the target's (weight,
activation) pair for the width, the target's lowering rules), and each conv/dense layer
is timed as that lowering runs it:

- a layer a kernel serves (with whatever the rule fused into its epilogue): that kernel
  PrimFunc itself, fed the model's own parameters and random activations;
- any other layer: its generic lowering (``lower.GENERIC``) alone, compiled by
  ``build.build`` as the model's generic functions are (default schedules included).

Structurally identical functions are compiled and timed once. Pipeline::

    timed_kernels(graph, target, bits)   layer -> TimedKernel (what runs, and its key)
    measure_layers(graph, target, ...)   -> LatencyTable (ms per layer per bit width)
    fit_overhead(table, plan, model_ms)  the non-layer rest of the model, a constant

Cache: one JSON file (``$QCOMPILE_CACHE_DIR/latency.json``, default
``~/.cache/qcompile/latency.json``)::

    {"format": 2, "entries": {KEY: {"ms": 0.53, "min_ms": 0.51, "samples": 20,
                                    "kernel": "conv2d_nhwc_vnni", "fingerprint": "...",
                                    "measured_at": "2025-...+00:00"}}}
    KEY = "<target>|<kernel>:<structural hash of the timed function>|n<batch>"
    target = "llvm -mcpu=znver4 -threads=2"   (kind, mcpu, TVM pool threads)

An entry whose ``fingerprint`` (TVM version + hash of the kernel and lowering sources)
differs from the current one is stale: it is re-measured and overwritten. New entries
are written once per call (``files.JsonCache``: re-read, merge, atomic replace).

Timings are medians; on a shared machine they move with other processes' load (see
``_time_interleaved``). Compare tables only when taken under similar conditions.
"""
from __future__ import annotations

import datetime
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import tvm
import tvm_ffi
from tqdm import tqdm
from tvm import relax

import qcompile.lower
import qcompile.targets
from qcompile.hw.backends import backend_of, make_target
from qcompile.targets import code_of
from qcompile.build.compile import build
from qcompile.build.tir import compile_tir
from qcompile.config import QuantSpec
from qcompile.errors import UsageError
from qcompile.env import cache_dir
from qcompile.files import JsonCache
from qcompile.ir.graph import LAYER_OPS, Graph
from qcompile.lower.emit import GENERIC as GENERIC_RULES
from qcompile.lower.emit import Lowered, LowerCtx, lower, stored_order
from qcompile.ir.qgraph import QGraph, QNode
from qcompile.quant.quantize import Observer, calibration_tensors, quantize_graph
from qcompile.tvm_compat import PrimFunc

CACHE_FORMAT = 2
GENERIC = "generic"          # kernel name of a layer no kernel serves (TVM's legalization)
UNAVAILABLE = "unavailable"  # the target runs no such bit width
TARGET_SAMPLE_MS = 1        # each timing sample runs >= this long (number auto-scaled)
MAX_LAYER_SECONDS = 2.0     # cap the repeats of very slow (generic) layers
# Sources whose edits change what is timed (beside the TVM version): kernels and lowering.
_SOURCES = ((Path(qcompile.targets.__file__).parent, "*/*.py"),
            (Path(qcompile.lower.__file__).parent, "*.py"))


# ----------------------------------------------------------------------------- what is timed
class _UnitRange:
    """Stand-in calibration: every tensor's range is [-1, 1] (or [0, 1])."""

    def threshold(self, signed: bool, bits: int) -> float:
        return 1.0


@dataclass(frozen=True)
class TimedKernel:
    """One layer at one width, as the compiled model runs it.

    ``mod["main"]`` is the kernel PrimFunc (destination-passing: its last parameter is
    the output) or the generic layer's Relax function; ``args`` has one entry per
    parameter: the model's own array, or None for an activation (filled at random).
    Functions with the same ``key`` are structurally identical and share one timing.
    """

    layer: str
    kernel: str
    mod: tvm.IRModule
    args: tuple[np.ndarray | None, ...]
    key: str

    def signature(self) -> list[tuple[tuple[int, ...], str]]:
        """(shape, dtype) of each parameter of ``main``, in order."""
        f = self.mod["main"]
        if isinstance(f, PrimFunc):  # TVM 0.27: a PrimFunc's parameters are its buffers
            return [(tuple(int(d) for d in b.shape), str(b.dtype)) for b in f.params]
        return [(tuple(int(d) for d in p.ty.shape), str(p.ty.dtype)) for p in f.params]


def quantized_graph(graph: Graph, target: tvm.target.Target, bits: int,
                    stats: Mapping[str, Observer] | None = None) -> QGraph | None:
    """``graph`` quantized as a plan of all layers at ``bits`` compiles it: the target's
    (weight, activation) pair for that width (None: the target has none). ``stats``
    (calibration observers) decide the dtypes of table-function outputs; tensors without
    one get [-1, 1], which decides the sign of every common activation the same way as
    any range around 0. Timed only, never run for its values (no overflow refusal)."""
    backend = backend_of(target)
    pair = backend.precisions(backend.arch_of(target)).allocator.get(bits)
    if pair is None:
        return None
    st = {t: (stats or {}).get(t, _UnitRange()) for t in calibration_tensors(graph)}
    plan = {n.name: pair for n in graph.nodes if n.op in LAYER_OPS}
    return quantize_graph(graph, st, QuantSpec(), bits=plan, refuse_overflow=False)


def _key(kernel: str, mod: tvm.IRModule) -> str:
    return f"{kernel}:{tvm_ffi.structural_hash(mod) & (2**64 - 1):016x}"


def _kernel_calls(low: Lowered) -> dict[str, TimedKernel]:
    """Per layer served by a kernel: the kernel PrimFunc (as ``main``) and the arguments
    ``core`` calls it with (its own parameters' arrays; None for activations)."""
    core = low.mod["core"]
    params = list(zip(core.params[1:], (a for _, a in low.params)))
    call_tir = tvm.ir.Op.get("relax.call_tir")
    out: dict[str, TimedKernel] = {}

    def array(arg: relax.Expr) -> np.ndarray | None:
        return next((a for v, a in params if arg.same_as(v)), None)

    def visit(e: relax.Expr) -> None:
        if not (isinstance(e, relax.Call) and e.op.same_as(call_tir)):
            return
        fname = e.args[0].name_hint
        if fname not in low.funcs:
            return
        layer = low.funcs[fname]
        mod = tvm.IRModule({"main": low.mod[fname].with_attr("global_symbol", "main")})
        kernel = fname.removesuffix("_" + re.sub(r"[^0-9A-Za-z]", "_", layer))
        args = (*(array(a) for a in e.args[1].fields), None)  # + the output buffer
        out[layer] = TimedKernel(layer, kernel, mod, args, _key(kernel, mod))

    relax.analysis.post_order_visit(core.body, visit)
    return out


def _generic(n: QNode, qg: QGraph, batch: int) -> TimedKernel:
    """A layer no kernel serves: ``lower.GENERIC``'s lowering of it alone, its input
    stored as ``core`` stores it (NHWC for 4-D)."""
    bb, t = relax.BlockBuilder(), qg.tensors[n.inputs[0]]
    ctx = LowerCtx(bb, qg)
    shape = (batch, *t.shape[1:])
    x = relax.Var("x", relax.TensorType([shape[i] for i in stored_order(len(shape))],
                                        t.qtype.dtype))
    with bb.function("main"):
        with bb.dataflow():
            out = bb.emit_output(GENERIC_RULES[n.op](n, ctx, [x]))
        bb.emit_func_output(out, params=[x, *ctx.vars])
    mod = bb.get()
    return TimedKernel(n.name, GENERIC, mod, (None, *(a for _, a in ctx.params)),
                       _key(GENERIC, mod))


def timed_kernels(graph: Graph, target: tvm.target.Target, bits: int = 8, batch: int = 1,
                  stats: Mapping[str, Observer] | None = None) -> dict[str, TimedKernel]:
    """Each conv/dense layer of ``graph`` at ``bits`` as the compiled model runs it: the
    graph quantized (``quantized_graph``) and lowered with the target's rules at
    ``batch``, exactly as ``compile`` does. Empty where the target has no such width."""
    if batch <= 0:
        raise UsageError(f"batch must be positive, got {batch}")
    qg = quantized_graph(graph, target, bits, stats)
    if qg is None:
        return {}
    kernels = _kernel_calls(lower(qg, code_of(target).rules(batch, target), batch=batch))
    return {n.name: kernels.get(n.name) or _generic(n, qg, batch)
            for n in qg.nodes if n.op in ("qconv", "qdense")}


# ----------------------------------------------------------------------------- keys
def target_key(target: tvm.target.Target) -> str:
    """kind + mcpu + the TVM pool's thread count: what a timing depends on."""
    mcpu = target.attrs.get("mcpu", "")
    return f"{target.kind.name}" + (f" -mcpu={mcpu}" if mcpu else "") + f" -threads={_threads()}"


def _threads() -> int:
    return int(tvm.runtime.num_threads())


def cache_key(target: str, timed: TimedKernel, batch: int) -> str:
    """Target, the timed function (kernel name and structural hash) and batch: the bit
    width is not part of it, since the function already says all a width changes."""
    return f"{target}|{timed.key}|n{batch}"


def default_cache_path() -> Path:
    return cache_dir("latency.json")


def fingerprint() -> str:
    """TVM version + a hash of the kernel and lowering sources: a timing is valid for both."""
    h = hashlib.sha256(tvm.__version__.encode())
    for p in sorted(q for root, pattern in _SOURCES for q in root.glob(pattern)):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- measuring
def _compile(mod: tvm.IRModule, target: tvm.target.Target) -> Any:
    """The one place this module compiles (tests replace it to prove cache hits): a kernel
    PrimFunc with TVM's TIR pipeline, a generic layer as ``build`` compiles the model's
    generic functions (unchecked: not an artifact). Returns what ``time_evaluator`` runs."""
    if isinstance(mod["main"], PrimFunc):
        return compile_tir(mod, target).jit()
    return relax.VirtualMachine(build(mod, target, checked=False).executable, tvm.cpu())


def _fill(shape: Sequence[int], dtype: str, rng: np.random.Generator) -> np.ndarray:
    """A random activation: values do not change a kernel's speed."""
    if dtype == "int32":  # raw accumulators: any moderate range
        return rng.integers(-(1 << 15), 1 << 15, size=shape, dtype=np.int32)
    info = np.iinfo(dtype)
    return rng.integers(info.min, int(info.max) + 1, size=shape, dtype=dtype)


@dataclass
class _Runnable:
    """One compiled layer and its filled buffers, ready to time."""

    kernel: str
    mod: Any          # runtime Module or relax VM: both have time_evaluator("main", ...)
    args: list
    first_ms: float   # one warm-up call's time, to size the sampling of slow layers


def _prepare(t: TimedKernel, target: tvm.target.Target, seed: int = 0) -> _Runnable:
    """Compile one timed function and fill its arguments."""
    dev, rng = tvm.cpu(), np.random.default_rng(seed)
    mod = _compile(t.mod, target)
    args = [tvm.runtime.tensor(a if a is not None else _fill(shape, dtype, rng), dev)
            for a, (shape, dtype) in zip(t.args, t.signature())]
    first = mod.time_evaluator("main", dev, number=1, repeat=1)(*args).results[0] * 1e3
    return _Runnable(t.kernel, mod, args, first)


def _sample(r: _Runnable, n: int) -> list[float]:
    """``n`` samples in ms, each averaging as many calls as fill TARGET_SAMPLE_MS."""
    timer = r.mod.time_evaluator("main", tvm.cpu(), number=1, repeat=n,
                                 min_repeat_ms=TARGET_SAMPLE_MS)
    return [t * 1e3 for t in timer(*r.args).results]


def _time_interleaved(runs: Mapping[str, _Runnable], repeat: int, rounds: int,
                      bar: tqdm | None = None) -> dict[str, list[float]]:
    """About ``repeat`` samples per layer, taken in ``rounds`` passes over all layers.

    Why interleave: on a shared machine load comes in bursts of seconds, and a 2-thread
    kernel runs ~1.8x slower while another process holds a core (measured here on the
    ResNet-18 convs). A layer timed in one go lands wholly in a quiet or a busy phase;
    spread over passes, every layer sees the same mix, so the table stays consistent
    across layers and bit widths, which is what the allocator compares.
    """
    per_round = -(-repeat // rounds)
    out: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for k, r in runs.items():
            # Slow (generic) layers: cap a layer's total time near MAX_LAYER_SECONDS.
            cap = int(MAX_LAYER_SECONDS * 1e3 / (rounds * max(r.first_ms, TARGET_SAMPLE_MS)))
            out[k] += _sample(r, max(1, min(per_round, cap)))
            if bar is not None:
                bar.update(1)
    return out


def _entry(r: _Runnable, samples: Sequence[float]) -> dict:
    return {"ms": float(np.median(samples)), "min_ms": float(min(samples)),
            "kernel": r.kernel, "samples": len(samples)}


# ----------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class LatencyTable:
    """Median latency (ms) of each conv/dense layer at each bit width, on one target.

    ``ms[layer][bits]``; a bit width missing for a layer is unavailable there
    (``kernels[layer][bits] == "unavailable"``). ``kernels`` names what was timed:
    a kernel, ``"<kernel>@w8"`` (a 4-bit layer on its 8-bit kernel) or ``"generic"``.
    ``measured`` is True for tables timed on the target (the T4 model is predicted).
    """

    ms: dict[str, dict[int, float]]
    target: str
    batch: int
    threads: int
    measured: bool = True
    kernels: dict[str, dict[int, str]] = field(default_factory=dict)

    def bits(self, layer: str) -> tuple[int, ...]:
        """The bit widths measured for ``layer``, ascending."""
        return tuple(sorted(self.ms[layer]))

    def total(self, plan: Mapping[str, int], default: int | None = None) -> float:
        """Sum of the layers' latencies under ``plan`` (layer -> bits); layers missing
        from the plan take ``default`` (None: a KeyError names the layer)."""
        out = 0.0
        for name, per_bits in self.ms.items():
            b = plan.get(name, default)
            if b is None:
                raise KeyError(f"layer {name!r} has no bit width in the plan")
            if b not in per_bits:
                raise KeyError(f"layer {name!r} has no {b}-bit latency "
                               f"({self.kernels.get(name, {}).get(b, 'not measured')})")
            out += per_bits[b]
        return out

    def to_json(self) -> dict:
        return {"target": self.target, "batch": self.batch, "threads": self.threads,
                "measured": self.measured,
                "ms": {k: {str(b): v for b, v in d.items()} for k, d in self.ms.items()},
                "kernels": {k: {str(b): v for b, v in d.items()} for k, d in self.kernels.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "LatencyTable":
        def ints(d: Mapping[str, Mapping[str, Any]]) -> dict:
            return {k: {int(b): v for b, v in per.items()} for k, per in d.items()}
        return cls(ints(data["ms"]), data["target"], int(data["batch"]), int(data["threads"]),
                   bool(data.get("measured", True)), ints(data.get("kernels", {})))


def measure_layers(graph: Graph, target: tvm.target.Target | str = "llvm", *,
                   bits: Sequence[int] = (4, 8), batch: int = 1, repeat: int = 20,
                   rounds: int = 5, cache: Path | bool | None = True, force: bool = False,
                   progress: bool = True, stats: Mapping[str, Observer] | None = None
                   ) -> LatencyTable:
    """Time every conv/dense layer of ``graph`` at each of ``bits`` on this machine, as
    the compiled model runs it (``timed_kernels``).

    Structurally identical functions are compiled and timed once each (across layers and
    widths). ``cache``: True = ``default_cache_path()``, a Path = that file, False/None =
    none; cached entries are reused unless ``force``. Each layer gets about ``repeat``
    samples of >= 1 ms, spread over ``rounds`` passes over all layers (see
    ``_time_interleaved``); the table holds their median. ``stats`` (calibration
    observers) pin down the dtypes of table-function outputs (``quantized_graph``).
    """
    tgt = make_target(target) if isinstance(target, str) else target
    if backend_of(tgt).latency_source != "measured":
        raise UsageError(f"measured latency tables need a CPU target on this machine, "
                         f"got {tgt.kind.name}; use the predicted GPU roofline model for CUDA")
    path = default_cache_path() if cache is True else (Path(cache) if cache else None)
    tkey, fp = target_key(tgt), fingerprint()
    timed = {b: timed_kernels(graph, tgt, b, batch, stats) for b in bits}
    layers = [n.name for n in graph.nodes if n.op in LAYER_OPS]
    keys = {(name, b): cache_key(tkey, t, batch) for b, per in timed.items()
            for name, t in per.items()}
    unique = {k: timed[b][name] for (name, b), k in keys.items()}
    cached = JsonCache(path, CACHE_FORMAT).load() if path is not None and not force else {}
    results: dict[str, dict] = {k: cached[k] for k in unique
                                if cached.get(k, {}).get("fingerprint") == fp}
    todo = [k for k in unique if k not in results]
    # Step 1. Build and compile every layer still to measure (keeping them all loaded).
    runs: dict[str, _Runnable] = {}
    for key in tqdm(todo, desc="latency: compile", unit="layer", disable=not progress or not todo):
        runs[key] = _prepare(unique[key], tgt)
    # Step 2. Time them in interleaved passes; Step 3. cache the new entries in one write.
    with tqdm(total=rounds * len(runs), desc="latency: time", unit="layer",
              disable=not progress or not runs) as bar:
        samples = _time_interleaved(runs, repeat, rounds, bar)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    new = {k: _entry(r, samples[k]) | {"fingerprint": fp, "measured_at": stamp}
           for k, r in runs.items()}
    results.update(new)
    if path is not None and new:
        JsonCache(path, CACHE_FORMAT).update(new)
    # A width the target does not run is marked unavailable (and not timed).
    ms: dict[str, dict[int, float]] = {name: {} for name in layers}
    names: dict[str, dict[int, str]] = {name: dict.fromkeys(bits, UNAVAILABLE) for name in layers}
    for (name, b), key in keys.items():
        names[name][b] = results[key]["kernel"]
        ms[name][b] = float(results[key]["ms"])
    return LatencyTable(ms, tkey, batch, _threads(), True, names)


# ----------------------------------------------------------------------------- whole model
def fit_overhead(table: LatencyTable, plan: Mapping[str, int], measured_model_ms: float,
                 default: int | None = None) -> float:
    """The non-layer part of a model's latency (adds, pools, transposes, quantize,
    runtime): measured whole-model ms minus the table's sum for the same plan.

    The allocator adds it as a constant. It also absorbs the kernels' in-model slowdown
    (colder caches: 5-20% on ResNet-18/50 here). It comes out negative only when the
    two measurements saw different machine load; measure them back to back.
    """
    return float(measured_model_ms) - table.total(plan, default)


def comparison_row(label: str, table: LatencyTable, plan: Mapping[str, int],
                   measured_model_ms: float, default: int | None = None) -> dict:
    """One report row: sum of per-layer latencies vs the measured whole model."""
    layers = table.total(plan, default)
    rest = float(measured_model_ms) - layers
    return {"model": label, "layers": len(table.ms), "sum_layers_ms": round(layers, 3),
            "model_ms": round(float(measured_model_ms), 3), "overhead_ms": round(rest, 3),
            "layers_share": round(layers / measured_model_ms, 3) if measured_model_ms else None}


def rows_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of ``comparison_row`` rows."""
    if not rows:
        return ""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def uniform_plan(table: LatencyTable, bits: int) -> dict[str, int]:
    """Every layer at ``bits`` (the 8-bit baseline, or all-4-bit)."""
    return {name: bits for name in table.ms}
