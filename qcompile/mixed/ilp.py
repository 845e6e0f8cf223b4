"""Mixed-precision bit allocation as an integer program (OR-Tools CP-SAT), HAWQ-V3 style.

One decision per *tie group* (layers that read the same quantized tensor, see
``costs.tie_groups``): a one-hot choice of bits.  Minimise the summed sensitivity
``omega[layer][bits]`` subject to any of three budgets:

=========  ====================================================  ==================
budget     value of a plan                                       absolute forms
latency    sum of ``latency[layer][bits]`` + ``overhead_ms``        6ms, 0.8s, 250us
size       weights at their bits + int32 bias, MB = 2^20 bytes    15MB, 900KB, 1.5GB
bops       sum macs * bits^2, G = 1e9                             100G, 100GBOPs, 5T
=========  ====================================================  ==================

A bare number ``alpha`` is relative: ``min + alpha * (max - min)`` where min/max are
the all-lowest-bits and all-highest-bits plans *with the pins applied*.

CP-SAT wants integers, so every coefficient is scaled so that the largest possible
total is about 1e12 units and then rounded.  Rounding moves a plan's total by at most
half a unit per group, so each budget gets that much slack: nothing feasible is lost,
and a returned plan can overshoot a budget by at most (groups / 1e12) of the total.
"""
from __future__ import annotations

import fnmatch
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Sequence

from ortools.sat.python import cp_model

from qcompile.mixed import costs
from qcompile.mixed.costs import Layer
from qcompile.config import precision
from qcompile.errors import InfeasibleBudgetError, QCompileError, UsageError
from qcompile.ir.graph import Graph

KINDS: tuple[str, ...] = ("latency", "size", "bops")
UNIT = {"latency": "ms", "size": "MB", "bops": "G"}
LABEL = {"latency": "latency", "size": "size", "bops": "BOPs"}
OPTION = {k: f"--budget-{k}" for k in KINDS}
JSON_KEY = {"latency": "latency_ms", "size": "size_mb", "bops": "bops_g"}
# Absolute units, lower-case, as multipliers to the kind's unit (ms, MB = 2^20 B, G).
UNITS: Mapping[str, Mapping[str, float]] = {
    "latency": {"ms": 1.0, "s": 1e3, "us": 1e-3, "µs": 1e-3},
    "size": {"b": 1 / 2**20, "kb": 1 / 2**10, "mb": 1.0, "gb": 2.0**10,
             "kib": 1 / 2**10, "mib": 1.0, "gib": 2.0**10},
    "bops": {"m": 1e-3, "g": 1.0, "t": 1e3, "mbops": 1e-3, "gbops": 1.0, "tbops": 1e3},
}
FORMS = {"latency": "6ms, 0.8s or 250us", "size": "15MB, 900KB or 1.5GB",
         "bops": "100G, 100GBOPs or 5T"}
SCALE_UNITS = 1e12      # integer units for the largest possible total of a quantity
DEFAULT_TIME_LIMIT_S = 30.0
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Zµ]*)\s*$")
_PIN = re.compile(r"^\s*(.+?)\s*=\s*([0-9]+|[wW][0-9]+[aA][0-9]+)\s*$")


# --- budgets -----------------------------------------------------------------------
@dataclass(frozen=True)
class BudgetSpec:
    """One parsed budget: absolute (in ms / MB / G) or relative (``alpha``)."""

    kind: str
    value: float
    relative: bool
    text: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UsageError(f"unknown budget kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if not math.isfinite(self.value) or self.value < 0:
            raise UsageError(f"{OPTION[self.kind]} must be finite and >= 0, got {self.value!r}")


def parse_budget(kind: str, text: str) -> BudgetSpec:
    """Parse ``--budget-<kind>``: ``6ms``/``15MB``/``100G`` style, or a bare alpha >= 0."""
    if kind not in KINDS:
        raise UsageError(f"unknown budget kind {kind!r}; use one of {', '.join(KINDS)}")
    m = _NUMBER.match(str(text))
    unit = m.group(2).lower() if m else ""
    if m is None or (unit and unit not in UNITS[kind]):
        raise UsageError(f"{OPTION[kind]} {text!r} is not a budget: give an absolute {LABEL[kind]} "
                         f"such as {FORMS[kind]}, or a bare number alpha >= 0 (e.g. 0.5) meaning "
                         f"min + alpha * (max - min) between the all-INT4 and all-INT8 plans")
    number = float(m.group(1))
    if not unit:
        return BudgetSpec(kind, number, True, str(text).strip())
    return BudgetSpec(kind, number * UNITS[kind][unit], False, str(text).strip())


def parse_budgets(latency: str | None = None, size: str | None = None,
                  bops: str | None = None) -> tuple[BudgetSpec, ...]:
    """The CLI's three optional budget strings, parsed (``None`` = not given)."""
    given = {"latency": latency, "size": size, "bops": bops}
    return tuple(parse_budget(k, t) for k, t in given.items() if t is not None)


# --- the problem -------------------------------------------------------------------
def _parse_pin(pin: str, bits: Sequence[int], pairs: Mapping[int, str] | None = None
               ) -> tuple[str, int]:
    """GLOB=BITS -> (glob, weight bits). BITS is a width the allocator chooses between, or
    the precision pair the target runs it as (``w4a8`` on llvm, ``w4a4`` on cuda)."""
    m = _PIN.match(pin)
    pairs = dict(pairs or {})
    by_name = {v: k for k, v in pairs.items()}
    value = m.group(2).lower() if m else ""
    b = int(value) if value.isdigit() else by_name.get(value, -1)
    if b == -1 and value and not pairs:  # no target known (dry run): any supported pair
        b = precision(value, "--pin")[0]
    if m is None or b not in bits:
        names = [str(x) for x in bits] + [pairs[x] for x in bits if x in pairs]
        raise UsageError(f"--pin {pin!r}: expected GLOB=BITS such as 'layer3.*=8' "
                         f"with BITS one of {', '.join(names)}")
    return m.group(1), b


def pin_dry_run(layers: Sequence[Layer], pins: Sequence[str],
                bits: Sequence[int] = (4, 8), pairs: Mapping[int, str] | None = None
                ) -> dict[str, list[str]]:
    """Each pin -> the layer names its glob matches (possibly none), in graph order."""
    names = [la.name for la in layers]
    return {pin: fnmatch.filter(names, _parse_pin(pin, bits, pairs)[0]) for pin in pins}


def _freeze_table(table: Mapping[str, Mapping[int, float]], what: str, layers: Sequence[Layer],
                  bits: Sequence[int], nonnegative: bool = False) -> Mapping[str, Mapping[int, float]]:
    out = {}
    for la in layers:
        row = {int(b): float(v) for b, v in table.get(la.name, {}).items()}
        missing = [b for b in bits if b not in row]
        if missing:
            raise UsageError(f"{what} has no entry for layer {la.name!r} at {missing} bits")
        if not all(math.isfinite(row[b]) for b in bits):
            raise UsageError(f"{what} for layer {la.name!r} is not finite: {row}")
        if nonnegative and min(row[b] for b in bits) < 0:
            raise UsageError(f"{what} for layer {la.name!r} is negative: {row}")
        out[la.name] = MappingProxyType(row)
    return MappingProxyType(out)


@dataclass(frozen=True)
class Problem:
    """Everything the solver needs, built once and solved under many budgets.

    ``omega`` and ``latency`` map layer name -> bits -> value (sensitivity, ms).
    ``pins`` are ``GLOB=BITS`` strings; ``pin_first``/``pin_last`` pin the first and
    last layer (``None`` to leave them free); an explicit pin wins over those.
    """

    layers: tuple[Layer, ...]
    groups: tuple[tuple[str, ...], ...]
    omega: Mapping[str, Mapping[int, float]]
    latency: Mapping[str, Mapping[int, float]]
    overhead_ms: float = 0.0
    pins: tuple[str, ...] = ()
    pin_first: int | None = 8
    pin_last: int | None = 8
    bits: tuple[int, ...] = (4, 8)
    # weight bits -> the (weight, activation) pair the target runs them as ("w4a8" ...);
    # None: a width applies to weights and input activation alike (HAWQ-V3)
    pairs: Mapping[int, str] | None = None
    # group index -> (bits, layer -> reason); derived in __post_init__
    pinned: Mapping[int, tuple[int, Mapping[str, str]]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "layers", tuple(self.layers))
        set_(self, "groups", tuple(tuple(g) for g in self.groups))
        set_(self, "pins", tuple(self.pins))
        set_(self, "bits", tuple(sorted(set(self.bits))))
        set_(self, "pairs", MappingProxyType({b: (self.pairs or {}).get(b, f"w{b}a{b}")
                                              for b in self.bits}))
        names = [la.name for la in self.layers]
        if not self.layers or len(set(names)) != len(names):
            raise UsageError("a problem needs at least one layer and unique layer names")
        if not self.bits or min(self.bits) <= 0:
            raise UsageError(f"bit choices must be positive, got {self.bits}")
        grouped = [n for g in self.groups for n in g]
        if sorted(grouped) != sorted(names) or any(not g for g in self.groups):
            raise UsageError("tie groups must put every layer in exactly one non-empty group")
        if not (math.isfinite(self.overhead_ms) and self.overhead_ms >= 0):
            raise UsageError(f"overhead_ms must be finite and >= 0, got {self.overhead_ms}")
        set_(self, "omega", _freeze_table(self.omega, "omega", self.layers, self.bits))
        set_(self, "latency", _freeze_table(self.latency, "latency table", self.layers, self.bits,
                                             nonnegative=True))
        set_(self, "pinned", MappingProxyType(self._resolve_pins()))

    @classmethod
    def from_graph(cls, graph: Graph, omega: Mapping[str, Mapping[int, float]], *,
                   latency: Mapping[str, Mapping[int, float]] | None = None, batch: int = 1,
                   overhead_ms: float | None = None, **kw: object) -> "Problem":
        """Layers and tie groups from ``graph``; latency defaults to the T4 model at ``batch``."""
        layers = costs.layers_of(graph)
        bits = tuple(kw.get("bits", (4, 8)))  # type: ignore[arg-type]
        if overhead_ms is None:  # the T4 model's other ops go with its table, not a measured one
            overhead_ms = costs.t4_other_ms(graph, batch) if latency is None else 0.0
        if latency is None:
            latency = costs.t4_latency_table(layers, batch, bits)
        return cls(tuple(layers), tuple(costs.groups_by_source(layers)), omega, latency,
                   overhead_ms, **kw)  # type: ignore[arg-type]

    def _resolve_pins(self) -> dict[int, tuple[int, dict[str, str]]]:
        # Step 1. Explicit pins: glob -> layers; a layer pinned twice must agree.
        names = [la.name for la in self.layers]
        direct: dict[str, tuple[int, str, str]] = {}  # layer -> (bits, glob, pin text)
        for pin in self.pins:
            glob, b = _parse_pin(pin, self.bits, self.pairs)
            hits = fnmatch.filter(names, glob)
            if not hits:
                raise UsageError(f"--pin {pin!r} matches no layer (layers are named like "
                                 f"{', '.join(repr(n) for n in names[:3])}, ...); "
                                 "check the glob with the pin dry run")
            for name in hits:
                if name in direct and direct[name][0] != b:
                    raise UsageError(f"--pin {direct[name][2]!r} and --pin {pin!r} pin layer "
                                     f"{name!r} to different bits; drop one of them")
                direct.setdefault(name, (b, glob, pin))
        # Step 2. A tie group takes its members' pin; members pinned differently conflict.
        index = {n: i for i, g in enumerate(self.groups) for n in g}
        out: dict[int, tuple[int, dict[str, str]]] = {}
        for name, (b, glob, pin) in direct.items():
            gi = index[name]
            if gi in out and out[gi][0] != b:
                other = next(iter(out[gi][1]))
                raise UsageError(
                    f"pins conflict in a tie group: {other!r} is pinned to {out[gi][0]} bits "
                    f"({direct[other][2]!r}) but {name!r}, which reads the same tensor, is pinned "
                    f"to {b} ({pin!r}); tied layers must share bits, so pin both the same way")
            out.setdefault(gi, (b, {}))[1][name] = f"pinned ({glob})"
        # Step 3. Default first/last pins apply only where no explicit pin decided.
        defaults = {}
        for which, layer, b in (("first", self.layers[0], self.pin_first),
                                ("last", self.layers[-1], self.pin_last)):
            if b is None or index[layer.name] in out:
                continue
            if b not in self.bits:
                raise UsageError(f"{which}-layer pin {b} is not one of the bit choices {self.bits}")
            gi = index[layer.name]
            if gi in defaults and defaults[gi][0] != b:
                raise UsageError(f"the first and last layers are tied but pinned to different "
                                 f"bits ({self.pin_first} and {self.pin_last})")
            defaults.setdefault(gi, (b, {}))[1][layer.name] = f"pinned ({which} layer)"
        return {**defaults, **out}

    def allowed(self, gi: int) -> tuple[int, ...]:
        """The bit choices left to group ``gi`` after pins."""
        return (self.pinned[gi][0],) if gi in self.pinned else self.bits

    def quantity(self, kind: str) -> tuple[dict[str, dict[int, float]], float]:
        """Per layer per bits value of a budget quantity (ms / MB / G), plus its constant."""
        if kind == "latency":
            return {n: dict(r) for n, r in self.latency.items()}, self.overhead_ms
        if kind == "size":
            return {la.name: {b: costs.layer_size_bits(la, b) / (8 * costs.MB)
                              for b in self.bits} for la in self.layers}, 0.0
        return {la.name: {b: costs.layer_bops(la, *precision(self.pairs[b])) / 1e9
                          for b in self.bits} for la in self.layers}, 0.0

    def value(self, kind: str, bits: Mapping[str, int]) -> float:
        """A plan's total for ``kind`` (ms including overhead, MB, or G)."""
        per, const = self.quantity(kind)
        return sum(per[n][b] for n, b in bits.items()) + const

    def extreme(self, which: str) -> dict[str, int]:
        """The all-lowest (``"min"``) or all-highest (``"max"``) plan with pins applied."""
        pick = min(self.bits) if which == "min" else max(self.bits)
        return {n: (self.allowed(gi)[0] if gi in self.pinned else pick)
                for gi, g in enumerate(self.groups) for n in g}

    def lower_bound(self, kind: str) -> float:
        """The smallest total of ``kind`` any plan with these pins and ties reaches."""
        per, const = self.quantity(kind)
        return const + sum(min(sum(per[n][b] for n in g) for b in self.allowed(gi))
                           for gi, g in enumerate(self.groups))


def resolve_budgets(problem: Problem, budgets: Sequence[BudgetSpec]) -> dict[str, float]:
    """Budget kind -> absolute value (ms / MB / G); relative ones use the pinned extremes."""
    kinds = [b.kind for b in budgets]
    if len(set(kinds)) != len(kinds):
        raise UsageError(f"each budget may be given once, got {kinds}")
    out = {}
    for spec in budgets:
        if spec.relative:
            lo = problem.value(spec.kind, problem.extreme("min"))
            hi = problem.value(spec.kind, problem.extreme("max"))
            out[spec.kind] = lo + spec.value * (hi - lo)
        else:
            out[spec.kind] = spec.value
    return out


# --- the plan ------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """A solved bit allocation; latency is predicted by whatever table the problem held."""

    bits: dict[str, int]               # weight bits per layer
    reasons: dict[str, str]
    objective: float
    predicted_latency_ms: float
    size_mb: float
    bops_g: float
    budgets: dict[str, float]          # "latency_ms" / "size_mb" / "bops_g" -> absolute
    omega: dict[str, float]            # chosen omega per layer
    latency_ms: dict[str, float]       # chosen table latency per layer
    solver_status: str = "OPTIMAL"
    solve_time_s: float = 0.0
    budget_texts: dict[str, str] = field(default_factory=dict)  # kind -> as the user wrote it
    precisions: dict[str, str] = field(default_factory=dict)  # layer -> "w4a8" ...

    def precision_of(self, layer: str) -> str:
        """The (weight, activation) pair a layer runs at, e.g. "w4a8"."""
        return self.precisions.get(layer) or f"w{self.bits[layer]}a{self.bits[layer]}"

    def to_json(self) -> dict[str, object]:
        """The plan as JSON-ready data: totals, absolute budgets and one row per layer."""
        return {
            "objective": self.objective,
            "predicted_latency_ms": self.predicted_latency_ms,
            "size_mb": self.size_mb,
            "bops_g": self.bops_g,
            "budgets": dict(self.budgets),
            "layers": [{"name": n, "bits": b, "precision": self.precision_of(n),
                        "reason": self.reasons[n], "omega": self.omega[n],
                        "latency_ms": self.latency_ms[n]} for n, b in self.bits.items()],
        }


def _fmt(v: float, unit: str, other: float | None = None) -> str:
    # Enough digits that a budget and the minimum it misses never print the same.
    for digits in (3, 4, 6, 9):
        s = f"{v:.{digits}g}"
        if other is None or s != f"{other:.{digits}g}":
            break
    return f"{s} {unit}"


def _minimums(problem: Problem, skip: str | None = None) -> str:
    return ", ".join(f"{LABEL[k]} >= {_fmt(problem.lower_bound(k), UNIT[k])}"
                     for k in KINDS if k != skip)


def _check_alone(problem: Problem, absolute: Mapping[str, float]) -> None:
    for kind, limit in absolute.items():
        low = problem.lower_bound(kind)
        if low > limit + 1e-12 * max(1.0, abs(limit)):
            raise InfeasibleBudgetError(
                f"{LABEL[kind]} budget {_fmt(limit, UNIT[kind], low)} is infeasible: the minimum "
                f"achievable is {_fmt(low, UNIT[kind], limit)} ({_minimums(problem, kind)} with "
                f"these pins); relax {OPTION[kind]} or remove pins")


def _scaled(values: Sequence[float], total: float) -> tuple[list[int], float]:
    scale = SCALE_UNITS / total if total > 0 else 1.0
    return [round(v * scale) for v in values], scale


def solve(problem: Problem, budgets: Sequence[BudgetSpec] = (), *,
          time_limit_s: float = DEFAULT_TIME_LIMIT_S) -> Plan:
    """Minimise total omega under the budgets; raise ``InfeasibleBudgetError`` if none fits."""
    t0 = time.perf_counter()
    absolute = resolve_budgets(problem, budgets)
    _check_alone(problem, absolute)
    # Step 1. One-hot choice per tie group.
    model = cp_model.CpModel()
    choice = [{b: model.new_bool_var(f"g{gi}_b{b}") for b in problem.allowed(gi)}
              for gi in range(len(problem.groups))]
    for x in choice:
        model.add_exactly_one(x.values())
    terms = [(gi, b) for gi, x in enumerate(choice) for b in x]

    def group_sum(per: Mapping[str, Mapping[int, float]], gi: int, b: int) -> float:
        return sum(per[n][b] for n in problem.groups[gi])

    # Step 2. Budgets, rounded with half a unit of slack per group (see module doc).
    for kind, limit in absolute.items():
        per, const = problem.quantity(kind)
        vals = [group_sum(per, gi, b) for gi, b in terms]
        total = sum(max(group_sum(per, gi, b) for b in x) for gi, x in enumerate(choice))
        room = limit - const
        if room >= total:
            continue  # every plan fits; skipping also avoids int64 overflow for huge budgets
        coef, scale = _scaled(vals, total)
        rhs = math.floor(room * scale + len(choice) / 2)
        model.add(sum(c * choice[gi][b] for c, (gi, b) in zip(coef, terms)) <= rhs)
    # Step 3. Objective: omega shifted per group to >= 0 (constant offsets change nothing).
    omega = [{b: group_sum(problem.omega, gi, b) for b in x} for gi, x in enumerate(choice)]
    shifted = [omega[gi][b] - min(omega[gi].values()) for gi, b in terms]
    spread = sum(max(o.values()) - min(o.values()) for o in omega)
    coef, _ = _scaled(shifted, spread)
    model.minimize(sum(c * choice[gi][b] for c, (gi, b) in zip(coef, terms)))
    # Step 4. Solve: one worker keeps runs reproducible, and these models are small.
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.max_time_in_seconds = time_limit_s
    status = solver.solve(model)
    if status == cp_model.INFEASIBLE:
        asked = " and ".join(f"{LABEL[k]} {_fmt(v, UNIT[k])}" for k, v in absolute.items())
        opts = "/".join(OPTION[k] for k in absolute)
        raise InfeasibleBudgetError(
            f"budgets {asked} are infeasible together, though each alone is achievable "
            f"(minimums with these pins: {_minimums(problem)}); relax {opts} or remove pins")
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise QCompileError(f"bit allocation found no plan within {time_limit_s:g} s "
                            f"(CP-SAT status {solver.status_name(status)}); raise the time limit")
    chosen = {gi: b for gi, b in terms if solver.boolean_value(choice[gi][b])}
    texts = {b.kind: b.text or f"{b.value:g}" for b in budgets}
    return _make_plan(problem, chosen, absolute, texts, solver.status_name(status),
                      time.perf_counter() - t0)


def _make_plan(problem: Problem, chosen: Mapping[int, int], absolute: Mapping[str, float],
               texts: Mapping[str, str], status: str, seconds: float) -> Plan:
    bits: dict[str, int] = {}
    reasons: dict[str, str] = {}
    for gi, g in enumerate(problem.groups):
        pinned = problem.pinned[gi][1] if gi in problem.pinned else {}
        leader = next(iter(pinned), g[0])
        for n in g:
            bits[n] = chosen[gi]
            reasons[n] = pinned.get(n) or ("chosen" if n == leader else f"tied to {leader}")
    order = [la.name for la in problem.layers]
    bits = {n: bits[n] for n in order}
    return Plan(
        bits=bits, reasons={n: reasons[n] for n in order},
        objective=sum(problem.omega[n][b] for n, b in bits.items()),
        predicted_latency_ms=problem.value("latency", bits),
        size_mb=problem.value("size", bits), bops_g=problem.value("bops", bits),
        budgets={JSON_KEY[k]: v for k, v in absolute.items()},
        omega={n: problem.omega[n][b] for n, b in bits.items()},
        latency_ms={n: problem.latency[n][b] for n, b in bits.items()},
        solver_status=status, solve_time_s=seconds, budget_texts=dict(texts),
        precisions={n: problem.pairs[b] for n, b in bits.items()})


# --- Pareto sweep -------------------------------------------------------------------
@dataclass(frozen=True)
class ParetoFiles:
    """What ``write_pareto`` wrote; ``plots_skipped`` says why there are no PNGs."""

    json: Path
    markdown: Path
    plots: tuple[Path, ...] = ()
    plots_skipped: str | None = None


def pareto(problem: Problem, kind: str, alphas: Sequence[float],
           budgets: Sequence[BudgetSpec] = ()) -> list[Plan]:
    """Solve once per relative ``kind`` budget in ``alphas`` (plus fixed ``budgets``).

    Points that the fixed budgets make infeasible are left out.
    """
    fixed = [b for b in budgets if b.kind != kind]
    plans = []
    for alpha in alphas:
        spec = BudgetSpec(kind, float(alpha), True, f"{float(alpha):g}")
        try:
            plans.append(solve(problem, [spec, *fixed]))
        except InfeasibleBudgetError:
            continue
    return plans


def _markdown(points: Sequence[Plan]) -> str:
    head = ("| # | budget | objective | latency ms (predicted) | size MB | BOPs G | 4-bit layers "
            "| 8-bit layers |\n|---|---|---|---|---|---|---|---|\n")
    rows = []
    for i, p in enumerate(points):
        asked = ", ".join(f"{k} {t}" for k, t in p.budget_texts.items())
        counts = [sum(1 for b in p.bits.values() if b == want) for want in (4, 8)]
        rows.append(f"| {i} | {asked} | {p.objective:.6g} | {p.predicted_latency_ms:.4f} | "
                    f"{p.size_mb:.3f} | {p.bops_g:.3f} | {counts[0]} | {counts[1]} |")
    return head + "\n".join(rows) + "\n"


def write_pareto(points: Sequence[Plan], out_dir: str | Path,
                 label: str = costs.PREDICTED) -> ParetoFiles:
    """Write ``pareto.json`` and ``pareto.md``, and PNG plots when matplotlib imports;
    ``label`` says where the latencies come from (the cost model's source)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {"latency_label": label,
            "points": [{"budget_texts": dict(p.budget_texts), **p.to_json()} for p in points]}
    json_path, md_path = out / "pareto.json", out / "pareto.md"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    md_path.write_text(_markdown(points))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # plots are an extra; the tables carry the same data
        return ParetoFiles(json_path, md_path, (), f"matplotlib not available ({err})")
    plots = []
    for attr, xlabel, name in (("predicted_latency_ms", "latency, ms (predicted)", "pareto_latency.png"),
                               ("size_mb", "size, MB", "pareto_size.png")):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([getattr(p, attr) for p in points], [p.objective for p in points], "o-")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("total sensitivity (omega)")
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        plots.append(out / name)
    return ParetoFiles(json_path, md_path, tuple(plots), None)
