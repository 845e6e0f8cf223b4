"""Bit allocation as one pipeline stage: sensitivity + costs + latency -> a per-layer plan.

    sensitivity  Omega_l(b) per layer and width      (sensitivity.py: hessian or kl; a graph
                 the Hessian is refused for (an op without a Relax gradient, no 2-D
                 logits) falls back to kl with a one-line warning)
    latency      ms per layer and width on the target (latency.py: measured kernels on llvm;
                 costs.py: the --arch GPU's roofline model for cuda, labelled *predicted*;
                 where int4 is emulated (sm_90) it gives 4 bits the 8-bit time)
    overhead     the non-layer rest of the model (adds, pools, layout, runtime): on llvm the
                 measured all-INT8 module minus its per-layer sum, cached per model and target
    allocate     OR-Tools ILP under the budgets, ties and pins (allocate.py)

The plan feeds ``quantize_graph(..., bits=plan.precisions)``: each layer's (weight,
activation) pair from the target's precision table (``targets.PRECISIONS``).
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import tvm
from tvm import relax

from qcompile.mixed import costs, latency
from qcompile.hw.backends import backend_of
from qcompile.mixed.ilp import Plan, Problem, parse_budgets, solve
from qcompile.build.compile import build
from qcompile.config import AUTO, AllocSpec, QuantSpec
from qcompile.env import cache_dir
from qcompile.files import JsonCache
from qcompile.hw.gpus import GpuSpec, predicted_label
from qcompile.ir.graph import Graph
from qcompile.lower.emit import lower
from qcompile.targets import code_of
from qcompile.quant.quantize import Observer, quantize_graph
from qcompile.quant.readers import Reader, gather_inputs
from qcompile.mixed.sensitivity import Sensitivity, compute_sensitivity


@dataclass(frozen=True)
class CostModel:
    """Latency per layer and width plus a constant for the rest, and where it came from."""

    latency: dict[str, dict[int, float]] | None  # None: the T4 model inside Problem
    overhead_ms: float | None
    source: str
    check: dict[str, float]  # per-layer sum vs whole-model, for the all-INT8 plan (llvm)


@dataclass(frozen=True)
class CostInputs:
    """What a latency source may use: the prepared graph, its model bytes (cache keys),
    the calibration statistics and quantization (to build the real kernels), the target,
    the batch and whether to show progress."""

    graph: Graph
    model_bytes: bytes
    stats: Mapping[str, Observer]
    quant: QuantSpec
    target: tvm.target.Target
    batch: int = 1
    progress: bool = False


@dataclass(frozen=True)
class Allocation:
    plan: Plan
    sensitivity: Sensitivity
    cost: CostModel

    def to_json(self) -> dict[str, Any]:
        out = self.plan.to_json()
        out.update(latency_source=self.cost.source, overhead_ms=self.cost.overhead_ms,
                   latency_check=self.cost.check, sensitivity={
                       "method": self.sensitivity.method, "probes": self.sensitivity.probes,
                       "num_samples": self.sensitivity.num_samples})
        return out


def _time_core(graph: Graph, stats: Mapping[str, Observer], quant: QuantSpec,
               target: tvm.target.Target, batch: int, plan: Mapping[str, int]) -> float:
    """Median ms of the whole compiled module for ``plan`` (the real kernels)."""
    qg = quantize_graph(graph, stats, quant, bits=plan, refuse_overflow=False)  # timed only
    low = lower(qg, code_of(target).rules(batch, target), batch=batch)  # as compile does
    vm = relax.VirtualMachine(build(low.mod, target).executable, tvm.cpu())
    x = np.random.default_rng(0).normal(size=(batch,) + graph.input_shape[1:]).astype(np.float32)
    args = [tvm.runtime.tensor(x)] + [tvm.runtime.tensor(a) for _, a in low.params]
    vm["main"](*args)  # warm-up
    timer = vm.time_evaluator("main", tvm.cpu(), number=1, repeat=30)
    return float(np.median(timer(*args).results)) * 1e3


def measured_cost_model(inputs: CostInputs) -> CostModel:
    """Per-layer kernel latencies measured on this CPU, plus the fitted non-layer overhead."""
    graph, model_bytes, stats, quant, target, batch = (
        inputs.graph, inputs.model_bytes, inputs.stats, inputs.quant, inputs.target, inputs.batch)
    table = latency.measure_layers(graph, target, bits=(4, 8), batch=batch,
                                   progress=inputs.progress, stats=stats)
    int8 = costs.uniform(costs.layers_of(graph), 8)
    # The kernels' fingerprint is in the key: after a kernel change the per-layer table is
    # re-measured, and an overhead fitted against the old table would be wrong.
    key = (f"{hashlib.sha256(model_bytes).hexdigest()[:20]}|{latency.target_key(target)}|"
           f"b{batch}|{latency.fingerprint()}")
    cache = JsonCache(cache_dir("overhead.json"))  # a corrupt file reads as empty
    cached = cache.load()
    if key not in cached:
        load = os.getloadavg()[0]
        if load > (os.cpu_count() or 1):  # the fit is cached: a busy machine skews it for good
            warnings.warn(f"load average {load:.1f} on {os.cpu_count()} cores while timing the "
                          "model: latency predictions will be off; rerun on a quiet machine "
                          f"after deleting {cache.path}", stacklevel=2)
        whole = _time_core(graph, stats, quant, target, batch, int8)
        cached = cache.update({key: {"whole_ms": whole, "layers_ms": table.total(int8)}})
    whole, layers_ms = cached[key]["whole_ms"], cached[key]["layers_ms"]
    overhead = max(whole - layers_ms, 0.0)
    return CostModel(table.ms, overhead, f"measured on {latency.target_key(target)}",
                     {"int8_layers_sum_ms": layers_ms, "int8_whole_model_ms": whole,
                      "overhead_ms": overhead})


def predicted_cost_model(graph: Graph, gpu: GpuSpec, batch: int) -> CostModel:
    """The roofline table of ``gpu`` (4 and 8 bits as the CUDA pairs W4A4 / W8A8) plus its
    non-layer ops: what a cuda allocation budgets against."""
    layers = costs.layers_of(graph)
    return CostModel(costs.t4_latency_table(layers, batch, (4, 8), gpu),
                     costs.t4_other_ms(graph, batch, gpu=gpu), predicted_label(gpu), {})


def _predicted(inputs: CostInputs) -> CostModel:
    """The roofline of the GPU the target stands for (its --arch)."""
    gpu = backend_of(inputs.target).reference_gpu(inputs.target)
    return predicted_cost_model(inputs.graph, gpu, inputs.batch)


# A backend's latency_source (hw.backends) -> what the ILP budgets against.
COST_MODELS: dict[str, Callable[[CostInputs], CostModel]] = {
    "measured": measured_cost_model, "predicted": _predicted}


def allocate_bits(graph: Graph, model_bytes: bytes, reader: Reader,
                  stats: Mapping[str, Observer], target: tvm.target.Target, *, spec: AllocSpec,
                  quant: QuantSpec = QuantSpec(), batch: int = 1,
                  progress: bool = True) -> Allocation:
    """Measure what the ILP needs and solve it under ``spec``'s budgets."""
    # Step 1. Sensitivity Omega_l(b), cached by model, data and method; hessian falls back
    # to kl (with a warning) where the graph has no Relax gradient.
    x = gather_inputs(reader, spec.sensitivity_samples)
    sens = compute_sensitivity(graph, model_bytes, x, method=spec.sensitivity, bits=(4, 8),
                               progress=progress, fallback=True,
                               # an unresolved "auto" (a direct call) ranks as nearest, as before
                               rounding="nearest" if quant.rounding == AUTO else quant.rounding)
    # Step 2. Latency per layer and width from the target's source (hw.backends.BACKENDS):
    # measured kernels on the CPU, the arch's GPU roofline model for cuda.
    backend = backend_of(target)
    cost = COST_MODELS[backend.latency_source](
        CostInputs(graph, model_bytes, stats, quant, target, batch, progress))
    # Step 3. The ILP, over the (weight, activation) pairs the target runs.
    pairs = backend.precisions(backend.arch_of(target)).allocator
    problem = problem_for(graph, sens, cost, spec, batch, pairs)
    return Allocation(solve(problem, parse_budgets(spec.latency, spec.size, spec.bops)), sens,
                      cost)


def problem_for(graph: Graph, sens: Sensitivity, cost: CostModel, spec: AllocSpec,
                batch: int, pairs: Mapping[int, str] | None = None) -> Problem:
    """The ILP over weight widths; ``pairs`` (the target's ``Precisions.allocator``) says
    which (weight, activation) pair each width runs as. Omega is HAWQ-V3's weight-only
    measure, and the llvm latency table times the kernel of the weight width."""
    return Problem.from_graph(graph, sens.omega, latency=cost.latency, batch=batch,
                              overhead_ms=cost.overhead_ms, pins=tuple(spec.pins),
                              pin_first=spec.pin_first, pin_last=spec.pin_last, pairs=pairs)
