"""Tests for qcompile.mixed.ilp: budget parsing, pins, ILP optimum == brute force, infeasibility."""
from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from qcompile.mixed import ilp as A
from qcompile.mixed import costs
from qcompile.errors import InfeasibleBudgetError, UsageError
from tests.mixed.test_costs import tiny_residual

pytestmark = pytest.mark.unit

KINDS = A.KINDS


# --- budget parsing ------------------------------------------------------------------
@pytest.mark.parametrize("kind, text, value, relative", [
    ("latency", "6ms", 6.0, False), ("latency", "0.8s", 800.0, False),
    ("latency", "250us", 0.25, False), ("latency", " 250 µs ", 0.25, False),
    ("latency", "1.5e1MS", 15.0, False), ("size", "15MB", 15.0, False),
    ("size", "900KB", 900 / 1024, False), ("size", "1.5GB", 1536.0, False),
    ("size", "2MiB", 2.0, False), ("size", "1048576b", 1.0, False),
    ("bops", "100G", 100.0, False), ("bops", "100GBOPs", 100.0, False),
    ("bops", "5T", 5000.0, False), ("bops", "250M", 0.25, False),
    ("latency", "0.5", 0.5, True), ("size", "0", 0.0, True), ("bops", "1.25", 1.25, True),
    ("size", ".3", 0.3, True),
])
def test_parse_budget(kind: str, text: str, value: float, relative: bool) -> None:
    spec = A.parse_budget(kind, text)
    assert (spec.kind, spec.relative) == (kind, relative)
    assert spec.value == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize("kind, text", [
    ("latency", ""), ("latency", "fast"), ("latency", "-1"), ("latency", "6 parsecs"),
    ("latency", "5MB"), ("size", "6ms"), ("bops", "15MB"), ("size", "1e999"),
    ("size", "1.2.3MB"), ("bops", "nan"),
])
def test_parse_budget_errors_name_the_option(kind: str, text: str) -> None:
    with pytest.raises(UsageError) as err:
        A.parse_budget(kind, text)
    assert f"--budget-{kind}" in str(err.value) and err.value.exit_code == 2
    assert "\n" not in str(err.value)


def test_parse_budgets_and_unknown_kind() -> None:
    specs = A.parse_budgets(latency="6ms", bops="0.5")
    assert [(s.kind, s.relative) for s in specs] == [("latency", False), ("bops", True)]
    with pytest.raises(UsageError, match="unknown budget kind"):
        A.parse_budget("energy", "1")


# --- random instances vs brute force --------------------------------------------------
def random_problem(seed: int) -> A.Problem:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 13))
    n_sources = int(rng.integers(1, n + 1))
    layers = tuple(costs.Layer(
        name=f"l{i}", op="conv", params=int(rng.integers(1, 100_000)),
        macs=int(rng.integers(1, 10**7)), input=f"t{i}", source=f"s{int(rng.integers(n_sources))}",
        in_shape=(1, 4, 2, 2), out_shape=(1, 4, 2, 2), cin=4, cout=int(rng.integers(1, 64)))
        for i in range(n))
    groups = tuple(costs.groups_by_source(layers))
    # Omega may favour either precision (and may be negative); latency need not be
    # monotone in bits, as a measured table might not be.
    omega = {la.name: {4: float(rng.normal(1.0, 1.0)), 8: float(rng.normal(0.2, 0.3))}
             for la in layers}
    latency = {la.name: {4: float(rng.uniform(0.01, 1.0)), 8: float(rng.uniform(0.01, 1.5))}
               for la in layers}
    pins = []
    for g in groups:
        if rng.random() < 0.15:
            pins.append(f"{g[int(rng.integers(len(g)))]}={int(rng.choice([4, 8]))}")
    first_last = None if rng.random() < 0.5 else int(rng.choice([4, 8]))
    return A.Problem(layers, groups, omega, latency, float(rng.uniform(0, 2)), tuple(pins),
                     first_last, first_last)


def random_budgets(problem: A.Problem, rng: np.random.Generator) -> list[A.BudgetSpec]:
    kinds = [k for k in KINDS if rng.random() < 0.6] or [str(rng.choice(KINDS))]
    specs = []
    for kind in kinds:
        if rng.random() < 0.5:
            specs.append(A.BudgetSpec(kind, float(rng.choice([0.0, 1.0, rng.uniform(0, 1.1)])), True))
        else:  # absolute, somewhere around the achievable range (sometimes below it)
            lo = problem.lower_bound(kind)
            hi = problem.value(kind, problem.extreme("max"))
            specs.append(A.BudgetSpec(kind, max(0.0, float(rng.uniform(lo * 0.9, hi * 1.05))), False))
    return specs


def brute_force(problem: A.Problem) -> tuple[np.ndarray, dict[str, np.ndarray], list[dict[str, int]]]:
    """Every assignment honouring ties and pins: (objective, values per kind, plans)."""
    plans = []
    for combo in itertools.product(*(problem.allowed(gi) for gi in range(len(problem.groups)))):
        plans.append({n: b for g, b in zip(problem.groups, combo) for n in g})
    obj = np.array([sum(problem.omega[n][b] for n, b in p.items()) for p in plans])
    values = {k: np.array([problem.value(k, p) for p in plans]) for k in KINDS}
    return obj, values, plans


def check_plan(problem: A.Problem, plan: A.Plan, absolute: dict[str, float], eps: dict[str, float]) -> None:
    for g in problem.groups:  # ties
        assert len({plan.bits[n] for n in g}) == 1, (g, plan.bits)
    for gi, (bits, _) in problem.pinned.items():  # pins
        assert all(plan.bits[n] == bits for n in problem.groups[gi])
    for kind, limit in absolute.items():  # budgets
        assert problem.value(kind, plan.bits) <= limit + eps[kind], (kind, limit)
    assert plan.objective == pytest.approx(sum(problem.omega[n][b] for n, b in plan.bits.items()))
    assert plan.size_mb == pytest.approx(problem.value("size", plan.bits))
    assert set(plan.bits) == {la.name for la in problem.layers}


@pytest.mark.parametrize("seed", range(120))
def test_ilp_equals_brute_force(seed: int) -> None:
    problem = random_problem(seed)
    rng = np.random.default_rng(10_000 + seed)
    obj, values, _ = brute_force(problem)
    for _ in range(3):
        specs = random_budgets(problem, rng)
        absolute = A.resolve_budgets(problem, specs)
        # Plans within eps of a budget are "maybe" feasible: rounding may go either way.
        eps = {k: 1e-9 * (1.0 + float(np.abs(values[k]).max())) for k in KINDS}
        sure = np.ones(len(obj), bool)
        maybe = np.ones(len(obj), bool)
        for kind, limit in absolute.items():
            sure &= values[kind] <= limit - eps[kind]
            maybe &= values[kind] <= limit + eps[kind]
        try:
            plan = A.solve(problem, specs)
        except InfeasibleBudgetError as err:
            assert not sure.any(), f"seed {seed}: solver says infeasible ({err}) but a plan fits"
            continue
        assert maybe.any(), f"seed {seed}: solver returned a plan but none fits"
        check_plan(problem, plan, absolute, eps)
        tol = 1e-7 * (1.0 + float(np.abs(obj).max()))
        assert plan.objective >= obj[maybe].min() - tol
        if sure.any():
            assert plan.objective <= obj[sure].min() + tol, f"seed {seed}: not optimal"


def test_relative_budget_endpoints_use_pinned_extremes() -> None:
    pinned = tiny_problem(pins=("C=8",))  # plus the default first/last pins (A, fc at 8)
    layers = pinned.layers
    low_plan = {"A": 8, "B": 8, "D": 4, "C": 8, "fc": 8}
    assert pinned.extreme("min") == low_plan and pinned.extreme("max") == costs.uniform(layers, 8)
    for kind in KINDS:
        lo, hi = pinned.value(kind, low_plan), pinned.value(kind, costs.uniform(layers, 8))
        assert lo < hi
        got = A.resolve_budgets(pinned, [A.BudgetSpec(kind, 0.25, True)])[kind]
        assert got == pytest.approx(lo + 0.25 * (hi - lo), rel=1e-12)
        # alpha = 0 is always feasible: the pinned all-INT4 plan meets it exactly.
        plan = A.solve(pinned, [A.BudgetSpec(kind, 0.0, True)])
        assert plan.bits == low_plan


# --- pins and reasons on a real graph -------------------------------------------------
def tiny_problem(**kw: object) -> A.Problem:
    g = tiny_residual()
    layers = costs.layers_of(g)
    omega = {la.name: {4: 1.0 + i, 8: 0.1} for i, la in enumerate(layers)}
    return A.Problem.from_graph(g, omega, **kw)  # type: ignore[arg-type]


def test_default_first_last_pins_and_reasons() -> None:
    problem = tiny_problem()
    plan = A.solve(problem, [A.parse_budget("size", "0")])  # as small as the pins allow
    assert plan.bits == {"A": 8, "B": 4, "D": 4, "C": 4, "fc": 8}
    assert plan.reasons == {"A": "pinned (first layer)", "B": "chosen", "D": "chosen",
                            "C": "tied to B", "fc": "pinned (last layer)"}
    free = A.solve(tiny_problem(pin_first=None, pin_last=None), [A.parse_budget("size", "0")])
    assert set(free.bits.values()) == {4} and free.reasons["A"] == "chosen"


def test_glob_pins_override_defaults_and_propagate_to_ties() -> None:
    problem = tiny_problem(pins=("C=8", "[AD]=4"))
    plan = A.solve(problem, [A.parse_budget("size", "0")])
    assert plan.bits == {"A": 4, "B": 8, "D": 4, "C": 8, "fc": 8}
    assert plan.reasons == {"A": "pinned ([AD])", "B": "tied to C", "D": "pinned ([AD])",
                            "C": "pinned (C)", "fc": "pinned (last layer)"}


def test_pin_errors() -> None:
    with pytest.raises(UsageError, match=r"--pin 'layer9\.\*=4' matches no layer"):
        tiny_problem(pins=("layer9.*=4",))
    with pytest.raises(UsageError) as err:  # B and C are tied
        tiny_problem(pins=("B=4", "C=8"))
    assert "'B'" in str(err.value) and "'C'" in str(err.value) and "tie group" in str(err.value)
    with pytest.raises(UsageError, match="different bits"):
        tiny_problem(pins=("A=4", "[A-C]=8"))
    for bad in ("A", "A=5", "=8", "A=eight"):
        with pytest.raises(UsageError, match="GLOB=BITS"):
            tiny_problem(pins=(bad,))


def test_pin_dry_run() -> None:
    layers = costs.layers_of(tiny_residual())
    assert A.pin_dry_run(layers, ["[BC]=4", "f*=8", "nothing*=4"]) == {
        "[BC]=4": ["B", "C"], "f*=8": ["fc"], "nothing*=4": []}
    with pytest.raises(UsageError, match="GLOB=BITS"):
        A.pin_dry_run(layers, ["B:4"])


def test_problem_validation() -> None:
    g = tiny_residual()
    with pytest.raises(UsageError, match="omega has no entry for layer 'A'"):
        A.Problem.from_graph(g, {})
    layers = costs.layers_of(g)
    omega = {la.name: {"4": 1.0, "8": 0.0} for la in layers}  # JSON-style keys are fine
    problem = A.Problem.from_graph(g, omega)  # type: ignore[arg-type]
    assert problem.omega["A"][4] == 1.0 and problem.overhead_ms > 0
    with pytest.raises(UsageError, match="latency table for layer 'A' is negative"):
        A.Problem.from_graph(g, omega, latency={la.name: {4: -1.0, 8: 1.0} for la in layers})
    with pytest.raises(UsageError, match="exactly one"):
        A.Problem(problem.layers, problem.groups[1:], omega, problem.latency)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="given once"):
        A.solve(problem, [A.parse_budget("size", "1"), A.parse_budget("size", "2")])


# --- infeasibility ---------------------------------------------------------------------
def test_infeasible_single_budget_reports_minimums() -> None:
    problem = tiny_problem()
    low = {k: problem.lower_bound(k) for k in KINDS}
    with pytest.raises(InfeasibleBudgetError) as err:
        A.solve(problem, [A.BudgetSpec("latency", low["latency"] * 0.5, False)])
    msg = str(err.value)
    assert err.value.exit_code == 8 and "\n" not in msg
    assert msg.startswith("latency budget") and "--budget-latency" in msg
    assert f"minimum achievable is {low['latency']:.3g} ms" in msg
    assert f"size >= {low['size']:.3g} MB" in msg and f"BOPs >= {low['bops']:.3g} G" in msg
    # The minimum respects pins: pinning more raises it.
    pinned = tiny_problem(pins=("B=8",))
    assert pinned.lower_bound("size") > low["size"]


def test_infeasible_combination() -> None:
    # a is faster at 8 bits (a measured table may say so) but smaller at 4: the size
    # budget wants a at 4, the latency budget wants it at 8; each alone is achievable.
    layers = tuple(costs.Layer(n, "dense", 1000 * (10 if n == "a" else 1), 10, "x", f"s{n}",
                               (1, 8), (1, 8), 8, 8) for n in ("a", "b"))
    problem = A.Problem(layers, (("a",), ("b",)), {n: {4: 1.0, 8: 0.0} for n in "ab"},
                        {"a": {4: 2.0, 8: 1.0}, "b": {4: 1.0, 8: 1.0}}, 0.0, (), None, None)
    size_at_4 = problem.value("size", {"a": 4, "b": 8})
    budgets = [A.BudgetSpec("latency", 2.5, False), A.BudgetSpec("size", size_at_4, False)]
    assert A.solve(problem, budgets[:1]).bits["a"] == 8
    assert A.solve(problem, budgets[1:]).bits["a"] == 4
    with pytest.raises(InfeasibleBudgetError) as err:
        A.solve(problem, budgets)
    msg = str(err.value)
    assert "infeasible together" in msg and "--budget-latency/--budget-size" in msg
    assert "latency >= 2 ms" in msg and "\n" not in msg


# --- plan output and Pareto sweep ----------------------------------------------------------
def test_plan_json_shape() -> None:
    problem = tiny_problem()
    plan = A.solve(problem, A.parse_budgets(latency="0.5", size="100MB"))
    data = json.loads(json.dumps(plan.to_json()))
    assert set(data) == {"objective", "predicted_latency_ms", "size_mb", "bops_g", "budgets", "layers"}
    assert set(data["budgets"]) == {"latency_ms", "size_mb"} and data["budgets"]["size_mb"] == 100.0
    assert [la["name"] for la in data["layers"]] == ["A", "B", "D", "C", "fc"]
    assert set(data["layers"][0]) == {"name", "bits", "precision", "reason", "omega", "latency_ms"}
    assert data["layers"][0]["precision"] == f"w{data['layers'][0]['bits']}a{data['layers'][0]['bits']}"
    assert data["predicted_latency_ms"] == pytest.approx(
        sum(la["latency_ms"] for la in data["layers"]) + problem.overhead_ms)
    assert plan.solver_status == "OPTIMAL" and plan.budget_texts == {"latency": "0.5", "size": "100MB"}


def test_pareto_sweep_and_files(tmp_path: Path) -> None:
    omega = {n: {4: 1.0 + i, 8: 0.0} for i, n in enumerate(["A", "B", "D", "C", "fc"])}
    problem = A.Problem.from_graph(tiny_residual(), omega, pin_first=None, pin_last=None)
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    points = A.pareto(problem, "latency", alphas)
    assert len(points) == len(alphas)
    objs = [p.objective for p in points]
    assert objs == sorted(objs, reverse=True) and objs[-1] == 0.0  # alpha 1: all INT8
    for p in points:
        assert p.predicted_latency_ms <= p.budgets["latency_ms"] * (1 + 1e-9)
    # A fixed size budget that only the all-INT4 plan meets leaves one point... or none.
    fixed = [A.BudgetSpec("size", 0.0, True)]
    assert len(A.pareto(problem, "size", alphas, fixed)) == len(alphas)  # same kind: replaced
    assert [p.objective for p in A.pareto(problem, "latency", alphas, fixed)] == [objs[0]] * 5
    files = A.write_pareto(points, tmp_path / "pareto")
    data = json.loads(files.json.read_text())
    assert data["latency_label"] == costs.PREDICTED and len(data["points"]) == 5
    assert data["points"][2]["budget_texts"] == {"latency": "0.5"}
    md = files.markdown.read_text().splitlines()
    assert len(md) == 2 + 5 and "latency ms (predicted)" in md[0]
    if importlib.util.find_spec("matplotlib") is None:  # plots are an extra: skipped, and said so
        assert files.plots == () and "matplotlib" in (files.plots_skipped or "")
    else:
        assert files.plots_skipped is None and all(p.exists() for p in files.plots)
