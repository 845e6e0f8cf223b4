"""An artifact's records: ``qconfig.json``, ``manifest.json`` and the card, assembled from
what the pipeline's stages produced.

They live in ``report`` rather than beside the artifact's reader (``runtime``) because
they read the stages' own results: the build's integer-only proof and tuning, the
lowering's kernels and parameters, the target code's manifest entries, the allocation and
the cost model, all above ``runtime`` in the layers (``runtime`` only loads what is
written). Key order is the files' order: readers diff them as text.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import tvm

from qcompile import __version__
from qcompile.build.compile import Built
from qcompile.build.tune import TuneReport
from qcompile.config import CalibSpec, QuantSpec, precision_name
from qcompile.hw.backends import Backend
from qcompile.ir.graph import Graph
from qcompile.ir.qgraph import QGraph
from qcompile.ir.serialize import qgraph_to_json
from qcompile.lower.emit import Lowered
from qcompile.mixed import costs
from qcompile.mixed.plan import Allocation
from qcompile.report.card import layer_table, render_card, render_plan
from qcompile.targets import code_of

#: The artifact's entry points, in the order ``main`` chains the other three.
FUNCTIONS: tuple[str, ...] = ("main", "quantize", "core", "dequantize")


@dataclass(frozen=True)
class Compiled:
    """What compile produced, as the records read it."""

    source: str                      # the model file's name
    backend: Backend
    target: tvm.target.Target
    batch: int | None                # the kernels' static batch; None: generic lowering
    graph: Graph                     # the float graph the plan was quantized from
    qg: QGraph
    lowered: Lowered
    built: Built
    quant: QuantSpec
    calib: CalibSpec
    calib_samples: int               # samples the calibration reader holds
    allocation: Allocation | None

    def calibration(self) -> dict[str, Any]:
        return {"method": self.calib.method, "source": self.calib.source,
                "num_samples": min(self.calib.num_samples, self.calib_samples)}


def cost_summary(graph: Graph, qg: QGraph, gpu: costs.GpuSpec = costs.T4) -> dict:
    """Size and BOPs of the compiled plan, plus ``gpu``'s model latency (labelled; the
    artifact's arch for CUDA, the T4 as a reference otherwise). The ``t4_*`` keys stay for
    readers of older artifacts."""
    # (summarize reads "w4a8" names as well as widths, though its annotation says int)
    plan: dict[str, Any] = {n.name: precision_name((int(n.attrs["bits"]), int(n.attrs["a_bits"])))
                            for n in qg.nodes if n.op in ("qconv", "qdense")}
    c = costs.summarize(graph, plan, batch=1, gpu=gpu)
    t4 = c if gpu is costs.T4 else costs.summarize(graph, plan, batch=1)
    return {"bits": plan, "size_mb": c.size_mb, "bops_g": c.bops_g, "gpu": gpu.name,
            "latency_ms_batch1": c.latency_ms, "latency_label": c.label,
            "t4_latency_ms_batch1": t4.latency_ms, "t4_label": t4.label}


def tune_json(report: TuneReport | None) -> dict | None:
    """The manifest's ``tune``: what ``--tune`` ran (None without it)."""
    if report is None:
        return None
    return {"trials_per_task": report.trials, "seconds": round(report.seconds, 1),
            "database": str(report.db_dir), "skipped": len(report.skipped),
            "tasks": [dataclasses.asdict(t) for t in report.tasks]}


def qconfig(c: Compiled) -> dict[str, Any]:
    """``qconfig.json``: every quantization choice, the plan, the per-layer table and the
    quantized graph (what ``evaluate`` rebuilds the oracle from)."""
    quant = c.quant
    return {
        "bits": quant.bits, "first_last_bits": quant.first_last_bits,
        "rounding": quant.rounding, "equalize": quant.equalize,
        "bias_correction": quant.bias_correction,
        "preprocess": dataclasses.asdict(c.calib.preprocess),
        "calibration": c.calibration(),
        "costs": cost_summary(c.graph, c.qg, c.backend.reference_gpu(c.target)),
        "plan": c.allocation.to_json() if c.allocation else None, "layers": layer_table(c.qg),
        "graph": qgraph_to_json(c.qg)}


def card(c: Compiled) -> str:
    """``report.md`` before the fidelity guard adds its section."""
    meta = {"target": c.backend.describe(c.target), "integer_only": c.built.intcheck.ok,
            "calibration": c.calibration()}
    text = render_card(c.qg, meta)
    return text + render_plan(c.allocation.to_json()) if c.allocation else text


def manifest(c: Compiled, seconds: float) -> dict[str, Any]:
    """``manifest.json`` as written before verification (``verified`` None; compile fills
    it in, and adds ``fidelity`` when the guard ran). Read after ``prove_shipped``: the
    shipped module's proof is part of ``intcheck``."""
    qg, built, lowered = c.qg, c.built, c.lowered
    check = built.intcheck
    return {
        "format": 1, "qcompile": __version__, "tvm": tvm.__version__,
        "source": c.source,
        "target": {"kind": c.backend.name, "str": c.backend.describe(c.target),
                   **c.backend.describe_json(c.target)},
        "batch": c.batch,
        "input": {"name": qg.input.name, "shape": ["N", *qg.input.shape[1:]],
                  "dtype": "float32"},
        "output": {"name": qg.output.name, "shape": ["N", *qg.output.shape[1:]],
                   "dtype": "float32"},
        "functions": list(FUNCTIONS),
        "params": [k for k, _ in lowered.params], "integer_only": check.ok,
        "kernels": lowered.kernels, "kernel_funcs": lowered.funcs,
        **code_of(c.target).manifest(lowered, c.target),
        "intcheck": {"prim_funcs": len(check.prim_funcs), "stores": check.stores,
                     "stages": list(check.stages),  # Relax+TIR, codegen, asm
                     "asm": check.asm, "shipped": check.shipped},
        "tune": tune_json(built.tune),
        "compile_seconds": round(seconds, 2),
        "verified": None}
