"""Per-layer, per-bit-width latency tables, measured on this machine's real kernels.

HAWQ-V3's bit allocation trades accuracy for latency, so it needs each layer's cost at
each bit width *on the target*. For every conv/dense layer this module builds the
kernel the compiler would use (``kernels.x86_rules.select_kernel``), compiles it alone,
feeds it random buffers and times it; identical layer shapes are timed once.

Pipeline::

    layer_descs(graph, batch)            name -> LayerDesc (NHWC, the quantizer's dtypes)
    measure_layers(graph, target, ...)   -> LatencyTable (ms per layer per bit width)
    fit_overhead(table, plan, model_ms)  the non-layer rest of the model, a constant

Cache: one JSON file (``$QCOMPILE_CACHE_DIR/latency.json``, default
``~/.cache/qcompile/latency.json``)::

    {"format": 1, "entries": {KEY: {"ms": 0.53, "min_ms": 0.51, "samples": 20,
                                    "kernel": "conv2d_nhwc_vnni", "fingerprint": "...",
                                    "measured_at": "2025-...+00:00"}}}
    KEY = "<target>|<layer signature>|w<bits>|n<batch>"
    target    = "llvm -mcpu=znver4 -threads=2"   (kind, mcpu, TVM pool threads)
    signature = "op=conv2d;in_shape=1x56x56x64;in_dtype=uint8;..."  (every LayerDesc
                field but w_bits, so a new field changes keys instead of colliding)

An entry whose ``fingerprint`` (TVM version + hash of the kernel sources) differs
from the current one is stale: it is re-measured and overwritten, so editing a kernel
never leaves old timings behind. New entries are written once per call (re-read,
merge, temp file + ``os.replace``): readers never see a torn file, and two processes
sharing it lose at most each other's entries from the same instant.

4-bit: the int4-weight kernels come with a ``w_bits`` field on ``LayerDesc``; while
it is missing, 4-bit entries are marked unavailable (not timed, not cached). A layer
whose rules have no 4-bit kernel is timed on its 8-bit one (``_kernel_for``).

Timings are medians; on a shared machine they move with other processes' load (see
``_time_interleaved``). Compare tables only when taken under similar conditions.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import tvm
from tqdm import tqdm
from tvm import relax

from .backends import backend_of
from .build import legalize
from .errors import UsageError
from .flags import JsonCache, cache_dir
from .graph import LAYER_OPS, Graph, Node
from .kernels import x86_rules as krules
from .config import QuantSpec
from .quantize import (Observer, calibration_tensors, quantize_graph,
                       raw_output_producer)  # the quantizer's own rules
from .targets import cpu_flags, make_target

LayerDesc = krules.LayerDesc
CACHE_FORMAT = 1
GENERIC = "generic"          # kernel name of TVM's legalized (unscheduled) fallback
UNAVAILABLE = "unavailable"  # no such bit width on this kernel library yet
TARGET_SAMPLE_MS = 1        # each timing sample runs >= this long (number auto-scaled)
MAX_LAYER_SECONDS = 2.0     # cap the repeats of very slow (generic) layers
Buffers = list[tuple[str, tuple[int, ...], str]]  # (name, shape, dtype) per parameter


# ----------------------------------------------------------------------------- descriptions
class _UnitRange:
    """Stand-in calibration: every tensor's range is [-1, 1] (or [0, 1])."""

    def threshold(self, signed: bool, bits: int) -> float:
        return 1.0


def tensor_dtypes(graph: Graph, stats: Mapping[str, Observer] | None = None
                  ) -> dict[str, str]:
    """Storage dtype of every activation, as ``quantize_graph`` itself decides it.

    The graph is quantized once (uniform 8-bit: the dtype does not depend on the
    width, 4-bit values live in int8/uint8 too), so the answer is the quantizer's own:
    unsigned after a ReLU-like act, a product of unsigned tensors, a table whose values
    are all >= 0, ...  Only a table function's sign depends on the calibrated ranges
    (it is the sign of f over the input's grid): ``stats`` gives them; tensors without
    one get [-1, 1], which decides the sign of every common activation (Sigmoid,
    HardSwish, SiLU, Gelu, Tanh ...) the same way as any range around 0.
    """
    unit = _UnitRange()
    st = {t: (stats.get(t, unit) if stats is not None else unit)
          for t in calibration_tensors(graph)}
    qg = quantize_graph(graph, st, QuantSpec(), refuse_overflow=False)  # dtypes only
    return {name: t.qtype.dtype for name, t in qg.tensors.items()}


def act_dtype(graph: Graph, tensor: str, stats: Mapping[str, Observer] | None = None) -> str:
    """Storage dtype of one activation (``tensor_dtypes``): int8, uint8 or int32 (raw)."""
    return tensor_dtypes(graph, stats)[tensor]


def _nhwc(shape: Sequence[int], batch: int) -> tuple[int, ...]:
    if len(shape) == 4:
        _, c, h, w = shape
        return (batch, h, w, c)
    return (batch, *shape[1:])


def _desc(graph: Graph, n: Node, batch: int, raw_name: str | None,
          dtypes: Mapping[str, str]) -> LayerDesc:
    in_shape = _nhwc(graph.shapes[n.inputs[0]], batch)
    # The last layer may keep its int32 accumulator (raw), exactly as quantize.py decides.
    raw = n.name == raw_name
    common: dict[str, Any] = dict(in_shape=in_shape, in_dtype=dtypes[n.inputs[0]],
                                  out_dtype=dtypes[n.output], raw=raw,
                                  channels=int(n.params["w"].shape[0]))
    if n.op == "dense":
        return LayerDesc("dense", **common)
    w, a = n.params["w"], n.attrs
    return LayerDesc("conv2d", kernel=(int(w.shape[2]), int(w.shape[3])),
                     strides=tuple(int(v) for v in a["strides"]),
                     pads=tuple(int(v) for v in a["pads"]),
                     dilations=tuple(int(v) for v in a["dilations"]),
                     group=int(a["group"]), **common)


def layer_descs(graph: Graph, batch: int = 1,
                stats: Mapping[str, Observer] | None = None) -> dict[str, LayerDesc]:
    """Each conv/dense node of a prepared graph -> its kernel description at ``batch``.

    Dtypes come from ``tensor_dtypes`` (the quantizer's own, ``stats`` as there).
    ``lo``/``hi`` stay None (the dtype's range): the clip bounds come from calibration,
    which a latency table does not need, and they do not change the kernel's speed.
    """
    if batch <= 0:
        raise UsageError(f"batch must be positive, got {batch}")
    raw_name = raw_output_producer(graph)
    dtypes = tensor_dtypes(graph, stats)
    return {n.name: _desc(graph, n, batch, raw_name, dtypes)
            for n in graph.nodes if n.op in LAYER_OPS}


def supports_w_bits() -> bool:
    """Whether the kernel library takes a weight bit width (the int4 kernels landed)."""
    return "w_bits" in {f.name for f in dataclasses.fields(LayerDesc)}


def _at_bits(d: LayerDesc, bits: int) -> LayerDesc | None:
    if supports_w_bits():
        return dataclasses.replace(d, w_bits=bits)
    return d if bits == 8 else None


# ----------------------------------------------------------------------------- keys
def target_key(target: tvm.target.Target) -> str:
    """kind + mcpu + the TVM pool's thread count: what a timing depends on."""
    mcpu = target.attrs.get("mcpu", "")
    return f"{target.kind.name}" + (f" -mcpu={mcpu}" if mcpu else "") + f" -threads={_threads()}"


def _threads() -> int:
    return int(tvm.runtime.num_threads())


def _fmt(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return "x".join(map(str, v))
    return str(v)


def layer_signature(d: LayerDesc) -> str:
    """Every LayerDesc field but w_bits (the key carries bits separately)."""
    return ";".join(f"{f.name}={_fmt(getattr(d, f.name))}" for f in dataclasses.fields(d)
                    if f.name != "w_bits")


def cache_key(target: str, d: LayerDesc, bits: int, batch: int) -> str:
    return f"{target}|{layer_signature(d)}|w{bits}|n{batch}"


def default_cache_path() -> Path:
    return cache_dir("latency.json")


def fingerprint() -> str:
    """TVM version + a hash of the kernel sources: a timing is only valid for both."""
    h = hashlib.sha256(tvm.__version__.encode())
    for p in sorted(Path(krules.__file__).parent.glob("x86_*.py")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- measuring
def _compile(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.runtime.Executable:
    """The one place this module compiles (tests replace it to prove cache hits)."""
    return tvm.compile(mod, target)


def _fill(name: str, shape: Sequence[int], dtype: str, rng: np.random.Generator) -> np.ndarray:
    """Random contents that cannot fault: values do not change a kernel's speed, but
    shifts must stay in 0..63 and multipliers below 2^31, as dyadic() produces them."""
    suffix = name.replace(".", "_").split("_")[-1]
    if dtype == "int64":
        lo, hi = {"m": (1 << 29, (1 << 31) - 1), "s": (8, 31)}.get(suffix, (0, 1 << 7))
        return rng.integers(lo, hi, size=shape, dtype=np.int64)
    if dtype == "int32":
        return rng.integers(-(1 << 15), 1 << 15, size=shape, dtype=np.int32)
    info = np.iinfo(dtype)
    return rng.integers(info.min, int(info.max) + 1, size=shape, dtype=dtype)


def _buffers(func: tvm.tirx.PrimFunc) -> Buffers:
    """(name, shape, dtype) of each parameter buffer, in call order (output last)."""
    bmap = getattr(func, "buffer_map", None)  # older TIR: Var params + buffer_map
    bufs = [bmap[p] if bmap is not None else p for p in func.params]
    return [(b.name, tuple(int(s) for s in b.shape), str(b.dtype)) for b in bufs]


def _generic_module(d: LayerDesc) -> tuple[tvm.IRModule, Buffers]:
    """One layer as the generic lowering (lower.py) writes it: NHWC/OHWI conv2d or matmul
    int8 -> int32, + bias, then the int64 requantize epilogue unless raw; and its
    parameters as (name, shape, dtype)."""
    bb = relax.BlockBuilder()
    ndim, c = len(d.in_shape), d.in_shape[-1]
    x = relax.Var("x", relax.TensorType(d.in_shape, d.in_dtype))
    if d.op == "conv2d":
        w = relax.Var("w", relax.TensorType((d.channels, *d.kernel, c // d.group), "int8"))
    else:
        w = relax.Var("w", relax.TensorType((c, d.channels), "int8"))
    vec = (1,) * (ndim - 1) + (d.channels,)
    bias = relax.Var("bias", relax.TensorType(vec, "int32"))
    q = [relax.Var(f"q_{k}", relax.TensorType(vec, "int64")) for k in "mrs"]
    params = [x, w, bias] + ([] if d.raw else q)
    shapes = [d.in_shape, (d.channels, *d.kernel, c // d.group) if d.op == "conv2d"
              else (c, d.channels), vec] + ([] if d.raw else [vec] * 3)
    dtypes = [d.in_dtype, "int8", "int32"] + ([] if d.raw else ["int64"] * 3)
    with bb.function("main", params):
        with bb.dataflow():
            if d.op == "conv2d":
                acc = bb.emit(relax.op.nn.conv2d(
                    x, w, strides=d.strides, padding=d.pads, dilation=d.dilations,
                    groups=d.group, data_layout="NHWC", kernel_layout="OHWI", out_dtype="int32"))
            else:
                acc = bb.emit(relax.op.matmul(x, w, out_dtype="int32"))
            v = bb.emit(relax.op.add(acc, bias))
            if not d.raw:
                v = bb.emit(relax.op.astype(v, "int64"))
                v = bb.emit(relax.op.right_shift(
                    relax.op.add(relax.op.multiply(v, q[0]), q[1]), q[2]))
                info = np.iinfo(d.out_dtype)
                v = bb.emit(relax.op.astype(relax.op.clip(v, int(info.min), int(info.max)),
                                            d.out_dtype))
            out = bb.emit_output(v)
        bb.emit_func_output(out)
    names = ["x", "w", "bias", "q_m", "q_r", "q_s"]
    return bb.get(), list(zip(names, (tuple(v) for v in shapes), dtypes))


def _kernel_for(d: LayerDesc, bits: int, flags: frozenset[str]
                ) -> tuple[str, krules.KernelSpec | None] | None:
    """(kernel name, spec) for ``d`` at ``bits``; spec None means TVM's generic lowering.

    None: the bit width is unavailable (LayerDesc has no w_bits yet). A 4-bit layer
    with no 4-bit kernel (e.g. depthwise) is timed on its 8-bit kernel, since 4-bit
    weights fit in int8 and that is the cheapest correct lowering; the kernel name
    says so ("...@w8").
    """
    db = _at_bits(d, bits)
    if db is None:
        return None
    spec = krules.select_kernel(db, flags)
    if spec is not None:
        return spec.name, spec
    if bits != 8:
        spec8 = krules.select_kernel(_at_bits(d, 8), flags)
        if spec8 is not None:
            return f"{spec8.name}@w8", spec8
    return GENERIC, None


@dataclass
class _Runnable:
    """One compiled layer and its filled buffers, ready to time."""

    kernel: str
    mod: Any          # runtime Module or relax VM: both have time_evaluator("main", ...)
    args: list
    first_ms: float   # one warm-up call's time, to size the sampling of slow layers


def _prepare(d: LayerDesc, bits: int, target: tvm.target.Target, seed: int = 0
             ) -> _Runnable | None:
    """Build, compile and fill one layer; None when ``bits`` is unavailable."""
    picked = _kernel_for(d, bits, cpu_flags())
    if picked is None:
        return None
    name, spec = picked
    dev, rng = tvm.cpu(), np.random.default_rng(seed)
    if spec is not None:
        func = spec.build()
        ex = _compile(tvm.IRModule({"main": func}), target)
        mod = ex.jit() if hasattr(ex, "jit") else ex
        bufs = _buffers(func)
    else:
        ir, bufs = _generic_module(d)
        mod = relax.VirtualMachine(_compile(legalize(ir, target), target), dev)
    args = [tvm.runtime.tensor(_fill(n, s, t, rng), dev) for n, s, t in bufs]
    if spec is not None:  # destination-passing: the output buffer is the last parameter
        args[-1] = tvm.runtime.tensor(np.zeros(bufs[-1][1], bufs[-1][2]), dev)
    first = mod.time_evaluator("main", dev, number=1, repeat=1)(*args).results[0] * 1e3
    return _Runnable(name, mod, args, first)


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
    """Time every conv/dense layer of ``graph`` at each of ``bits`` on this machine.

    Unique (layer description, bits) pairs are compiled and timed once each, with the
    kernel ``select_kernel`` picks (TVM's generic legalized op where none applies).
    ``cache``: True = ``default_cache_path()``, a Path = that file, False/None = none;
    cached entries are reused unless ``force``. Each layer gets about ``repeat``
    samples of >= 1 ms, spread over ``rounds`` passes over all layers (see
    ``_time_interleaved``); the table holds their median.  ``stats`` (calibration
    observers) pin down the dtypes of table-function outputs (``tensor_dtypes``).
    """
    tgt = make_target(target) if isinstance(target, str) else target
    if backend_of(tgt).latency_source != "measured":
        raise UsageError(f"measured latency tables need a CPU target on this machine, "
                         f"got {tgt.kind.name}; use the predicted GPU roofline model for CUDA")
    path = default_cache_path() if cache is True else (Path(cache) if cache else None)
    tkey, fp = target_key(tgt), fingerprint()
    descs = layer_descs(graph, batch, stats)
    keys = {(name, b): cache_key(tkey, d, b, batch) for name, d in descs.items() for b in bits}
    unique = {k: (descs[name], b) for (name, b), k in keys.items()}
    cached = JsonCache(path, CACHE_FORMAT).load() if path is not None and not force else {}
    results: dict[str, dict] = {k: cached[k] for k in unique
                                if cached.get(k, {}).get("fingerprint") == fp}
    todo = [k for k in unique if k not in results]
    # Step 1. Build and compile every layer still to measure (keeping them all loaded).
    runs: dict[str, _Runnable] = {}
    for key in tqdm(todo, desc="latency: compile", unit="layer", disable=not progress or not todo):
        d, b = unique[key]
        r = _prepare(d, b, tgt)
        if r is None:
            results[key] = {"ms": None, "kernel": UNAVAILABLE}  # nothing worth caching
        else:
            runs[key] = r
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
    ms: dict[str, dict[int, float]] = {name: {} for name in descs}
    kernels: dict[str, dict[int, str]] = {name: {} for name in descs}
    for (name, b), key in keys.items():
        e = results[key]
        kernels[name][b] = e["kernel"]
        if e["ms"] is not None:
            ms[name][b] = float(e["ms"])
    return LatencyTable(ms, tkey, batch, _threads(), True, kernels)


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
