"""The Python face of the CLI: the whole pipeline, readable in one place."""
from __future__ import annotations

import dataclasses
import os
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import numpy as np
import tvm
from tqdm import tqdm

from qcompile.mixed import costs
from qcompile.verify import oracle
from qcompile.runtime.artifact import MANIFEST, atomic_dir, check_output_dir
from qcompile.hw.backends import backend_of, check_options
from qcompile.build.compile import build
from qcompile.quant.calibrate import FloatRunner, collect_stats
from qcompile.quant.readers import Reader, gather_inputs, load_inputs, make_reader
from qcompile.quant.equalize import bias_correction, equalize_calibrated
from qcompile.quant.rounding import Rounding, rounding_of
from qcompile.mixed.ilp import parse_budgets, pareto, pin_dry_run, write_pareto
from qcompile.mixed.plan import allocate_bits, problem_for
from qcompile.mixed.sensitivity import Sensitivity, compute_sensitivity
from qcompile.targets import code_of
from qcompile.report import fidelity as fid
from qcompile.report import manifest as records
from qcompile.report.manifest import Compiled
from qcompile.config import (
    VERIFY_INPUTS, AllocSpec, CalibSpec, FidelitySpec, Preprocess, QuantSpec, resolve_auto)
from qcompile.errors import BuildError, UsageError, VerificationError
from qcompile.env import THREADS_ENV, tvm_threads
from qcompile.errors import error_line
from qcompile.files import write_json
from qcompile.lower.emit import lower
from qcompile.frontend.onnx_import import import_onnx, load_model
from qcompile.ir.graph import Graph
from qcompile.frontend.prepare import prepare
from qcompile.ir.qgraph import QGraph
from qcompile.quant.quantize import Observer, calibration_tensors, layer_bits, quantize_graph
from qcompile.report.card import render_fidelity
from qcompile.runtime.run import Artifact, summarize_ms
from qcompile.build.ship import prove_shipped

from qcompile.report.results import (
    AllocateResult, BenchResult, CompileResult, EvalResult, LayerFidelity, ParetoResult, Verified)


class Front(NamedTuple):
    """The pipeline's first stage: the canonical graph, the calibration reader, the
    activation statistics, the guard's held-out inputs and the calibration actually used
    (without the held-out samples)."""

    graph: Graph
    reader: Reader
    stats: dict
    held: fid.HeldOut | None
    calib: CalibSpec


def _front(model: Path, calib: CalibSpec, progress: bool, calibrate: bool = True,
           fidelity: FidelitySpec | None = None) -> Front:
    """1. Import: load, check, shape-infer, canonicalize (BN folding, fusion).
    2. Set aside the fidelity guard's held-out inputs (``fidelity``), if any.
    3. Calibrate activation ranges on the float model in onnxruntime (unless not asked)."""
    calib, _ = resolve_auto(calib)
    proto = load_model(model, calib.preprocess.input_shape)
    graph = prepare(import_onnx(proto, batch=1, source=model.name))
    held = (fid.hold_out(calib, fidelity, graph.input, graph.input_shape)
            if fidelity is not None else None)
    if held is not None:
        calib = held.calib
    reader = make_reader(calib, graph.input, graph.input_shape)
    stats = (collect_stats(proto, calibration_tensors(graph), reader, calib.method, calib,
                           progress) if calibrate else {})
    return Front(graph, reader, stats, held, calib)


def compile_model(model: str | Path, out_dir: str | Path, *, target: str = "llvm",
                  arch: str | None = None, quant: QuantSpec = QuantSpec(),
                  calib: CalibSpec = CalibSpec(), progress: bool = True, batch: int = 1,
                  kernels: bool = True,
                  alloc: AllocSpec = AllocSpec(), tune: int = 0,
                  input_shape: tuple[int, ...] | None = None,
                  plan: Mapping[str, int | str] | None = None,
                  verify: int = VERIFY_INPUTS,
                  fidelity: FidelitySpec = FidelitySpec()) -> CompileResult:
    """ONNX file -> integer-only artifact directory (written atomically).

    ``arch`` picks the CUDA architecture for ``target="cuda"`` (``targets.CUDA_ARCHS``,
    default sm_75); with ``target="llvm"`` it must be None (UsageError).
    With a budget in ``alloc`` each conv/dense gets 4 or 8 bits from the ILP (see
    ``bitplan``); otherwise ``quant.bits`` applies to all but the first and last layers.
    ``tune`` > 0 runs that many meta-schedule trials per unique generic PrimFunc (llvm).
    ``plan`` fixes layers' precisions by name (8, 4, "w4a8" ...) without an allocation;
    unnamed layers follow ``quant``.

    With ``kernels`` (the default) layers run on qcompile's scheduled kernels,
    which are specialized to a static ``batch``; without, TVM's generic
    (unscheduled, slow) lowering is used and any batch size works.

    ``verify`` inputs (0: none) are run through the written artifact and the NumPy
    oracle before the artifact is moved into place (see :func:`verify_artifact`); a
    difference raises ``VerificationError`` and nothing is written. The manifest's
    ``verified`` records the result, or why it was skipped.

    ``fidelity``: the guard. Its held-out inputs (``fidelity.hold_out``: never used for
    calibration) run through the artifact and onnxruntime FP32; output SQNR, top-1
    agreement and the layer of the sharpest SQNR drop go into the manifest and the card,
    and an output SQNR under ``fidelity.min_sqnr_db`` raises ``FidelityError`` (nothing
    is written).
    """
    t0 = time.perf_counter()
    calib, quant = resolve_auto(calib, quant)
    if input_shape is not None:  # shorthand for calib.preprocess.input_shape
        calib = dataclasses.replace(calib, preprocess=dataclasses.replace(
            calib.preprocess, input_shape=tuple(input_shape)))
    model, out_dir = Path(model), Path(out_dir)
    # First: a bad --target/--arch/--tune/--rounding combination costs nothing.
    backend = check_options(target, arch, tune=tune)
    tgt = backend.target(target, arch, None)
    rounding = rounding_of(quant.rounding)
    if alloc.active and plan is not None:
        raise UsageError("give either budgets or an explicit plan, not both")
    check_output_dir(out_dir, protect=(model,))
    # 1. Import (load, check, shape-infer, canonicalize), hold out the guard's inputs,
    # calibrate in onnxruntime (after equalization when asked: it rescales channels).
    graph, reader, stats, held, calib = _front(model, calib, progress,
                                               calibrate=not quant.equalize, fidelity=fidelity)
    if quant.equalize:
        graph, stats = equalize_calibrated(graph, reader, calib, progress)
    # 2. Allocate: sensitivity + per-layer latency + ILP under the budgets.
    allocation = None
    if alloc.active:  # (an equalized graph has other weights: keep its cached sensitivity apart)
        allocation = allocate_bits(graph, model.read_bytes() + b"|equalized" * quant.equalize,
                                   reader, stats, tgt, spec=alloc, quant=quant, batch=batch,
                                   progress=progress)
        plan = allocation.plan.precisions
    # 3. Quantize: round the weights at the plan's widths, then the integer-only graph.
    qg = _quantize(graph, reader, stats, calib, quant, rounding, plan, progress)
    # 4. Lower to Relax, on the target's kernels.
    rules = code_of(tgt).rules(batch, tgt) if kernels else []
    lowered = lower(qg, rules, batch=batch if rules else None)
    # 5. Legalize, prove integer-only, compile (CUDA: the arch's fatbin embedded at build time).
    built = build(lowered.mod, tgt, tune=tune, progress=progress)
    if not built.intcheck.ok:
        raise BuildError(f"integer-only check failed: {built.intcheck.violations[:3]}")
    done = Compiled(model.name, backend, tgt, batch if rules else None, graph, qg, lowered,
                    built, quant, calib, len(reader), allocation)
    verified, fidelity_rec = None, None
    with atomic_dir(out_dir) as tmp:
        # 6. Write the artifact (moved into place only if 7 and 8 pass).
        manifest, card, seconds = _write(tmp, done, t0)
        if verify > 0:  # 7. Run the artifact as written beside the oracle.
            x, source = _verify_inputs(qg, reader, calib, verify)
            verified = verify_artifact(tmp, qg, x, tgt, source=source)
            manifest["verified"] = verified.to_json()
        if held is not None:  # 8. The model, not just the compiler: the fidelity guard.
            fidelity_rec = _measure_fidelity(model, calib, qg, held, fidelity, tmp, tgt,
                                             layers=not quant.equalize)
            manifest["fidelity"] = fidelity_rec.to_json()
            (tmp / "report.md").write_text(card + render_fidelity(fidelity_rec))
        write_json(tmp / MANIFEST, manifest)  # with what 7 and 8 recorded
        if fidelity_rec is not None:
            fid.check(fidelity_rec)  # raises FidelityError: atomic_dir discards it all
    n_layers = sum(n.op in ("qconv", "qdense") for n in qg.nodes)
    return CompileResult(out_dir, seconds, built.intcheck.ok, n_layers, verified, fidelity_rec)


def _quantize(graph: Graph, reader: Reader, stats: Mapping[str, Observer], calib: CalibSpec,
              quant: QuantSpec, rounding: Rounding, plan: Mapping[str, int | str] | None,
              progress: bool) -> QGraph:
    """The integer-only graph: weights rounded by ``rounding`` at the widths the plan gives
    them (a method may correct the float biases), then quantized, then (when asked) its
    int32 biases corrected on the calibration samples."""
    data = (gather_inputs(reader, calib.num_samples)  # (the same samples for both)
            if rounding.needs_data or quant.bias_correction else None)
    src, rounded = rounding.round_graph(graph, data, layer_bits(graph, quant, plan),
                                        progress=progress)
    qg = quantize_graph(src, stats, quant, bits=plan, rounded=rounded)
    if quant.bias_correction:
        assert data is not None
        qg = bias_correction(graph, qg, data)
    return qg


def _write(tmp: Path, done: Compiled, t0: float) -> tuple[dict[str, Any], str, float]:
    """The artifact's files into ``tmp``; returns the manifest as written (``verified``
    None) and the card, for verification and the guard to add to, and the seconds since
    ``t0`` that the manifest records."""
    try:
        done.built.executable.export_library(str(tmp / "module.so"))
    except Exception as e:
        raise BuildError(f"export_library failed: {error_line(e)}") from e
    prove_shipped(tmp / "module.so", done.built)  # the proof again, on the file that ships
    # weights.npz: the module's inputs (possibly packed for a kernel);
    # qgraph.npz: the quantized graph's own integers, the oracle's truth.
    np.savez(tmp / "weights.npz", **dict(done.lowered.params))
    np.savez_compressed(tmp / "qgraph.npz", **dict(done.qg.param_items()))
    write_json(tmp / "qconfig.json", records.qconfig(done))
    card = records.card(done)
    (tmp / "report.md").write_text(card)
    seconds = time.perf_counter() - t0
    manifest = records.manifest(done, seconds)
    write_json(tmp / MANIFEST, manifest)
    return manifest, card, seconds


def _measure_fidelity(model: Path, calib: CalibSpec, qg: QGraph, held: fid.HeldOut,
                      spec: FidelitySpec, art_dir: Path, target: tvm.target.Target,
                      layers: bool) -> fid.Fidelity:
    """The guard's measurement: the written artifact's integer core where it runs here
    (bit-exact with the oracle, and fast), the oracle elsewhere."""
    proto = load_model(model, calib.preprocess.input_shape)
    run_core = (Artifact.load(art_dir).run_core
                if backend_of(target).cannot_run_here(target) is None else None)
    return fid.measure(proto, qg, held.inputs(), held.source, min_sqnr_db=spec.min_sqnr_db,
                       run_core=run_core, layers=layers)


def _verify_inputs(qg: QGraph, reader: Reader, calib: CalibSpec, n: int
                   ) -> tuple[np.ndarray, str]:
    """``n`` inputs for compile's check and where they come from: the first calibration
    samples when real data was given, else seeded uniform values over the input's whole
    calibrated range (``--data synthetic``)."""
    if calib.source != "synthetic":
        return gather_inputs(reader, n), "calibration"
    t = qg.input.qtype
    q = np.random.default_rng(0).uniform(t.qmin, t.qmax, size=(n, *qg.input.shape[1:]))
    return qg.input.dequantize(q).astype(np.float32), "uniform"


def _oracle_diff(art: Artifact, qg: QGraph, x: np.ndarray, keep: bool = False
                 ) -> tuple[str | None, dict[str, np.ndarray]]:
    """Run the artifact's ``quantize`` and ``core`` on ``x`` beside the NumPy oracle.

    Returns (None, the oracle's tensors) when both match bit for bit, else a short
    description of the first difference in its place."""
    q = oracle.quantize_input(qg, x)
    ref = oracle.run_integer(qg, q, keep=keep)
    for step, got, want in (("quantize", lambda: art.quantize(x), q),
                            ("core", lambda: art.run_core(q), ref["output"])):
        y = got()
        if y.shape != want.shape:
            return f"{step} returned shape {list(y.shape)}, the oracle {list(want.shape)}", ref
        if not np.array_equal(y, want):
            diff = y.astype(np.int64) - want.astype(np.int64)
            return (f"{step} differs in {int((diff != 0).sum())} of {diff.size} values "
                    f"(max |diff| {int(np.abs(diff).max())})"), ref
    return None, ref


def verify_artifact(art_dir: str | Path, qg: QGraph, inputs: np.ndarray,
                    target: tvm.target.Target, source: str = "arrays") -> Verified:
    """Run ``inputs`` through the artifact in ``art_dir`` and the NumPy oracle.

    Returns the manifest's ``verified`` record, with ``bit_exact`` None and a ``skipped``
    reason when the artifact cannot run here (``--target cuda`` without a GPU of its
    arch; one warning line).
    Raises ``VerificationError`` on the first input that differs."""
    t0 = time.perf_counter()
    why = backend_of(target).cannot_run_here(target)
    if why is not None:
        warnings.warn(f"oracle check skipped: {why}; run `qcompile eval` where it can run",
                      stacklevel=2)
        return Verified(0, None, source, skipped=why)
    art = Artifact.load(art_dir)
    for i in range(len(inputs)):
        diff, _ = _oracle_diff(art, qg, inputs[i:i + 1])
        if diff is not None:
            raise VerificationError(
                f"the built artifact is not bit-exact against the NumPy oracle on "
                f"verification input {i} ({source}): {diff}; nothing was written "
                f"(--no-verify writes the artifact for debugging)")
    return Verified(len(inputs), True, source, round(time.perf_counter() - t0, 2))


def run_artifact(art_dir: str | Path, x: np.ndarray) -> np.ndarray:
    """Run a compiled artifact on a float32 batch."""
    return Artifact.load(art_dir).run(x)


def evaluate(model: str | Path, art_dir: str | Path, *, data: str | None = None,
             num_samples: int = 64, preprocess: Preprocess | None = None, progress: bool = True,
             inputs: np.ndarray | None = None, labels: np.ndarray | None = None,
             batch_size: int = 16) -> EvalResult:
    """Fidelity of an artifact against onnxruntime FP32, plus the bit-exact check.

    Bit-exact: the compiled ``quantize`` and ``core`` must equal the NumPy oracle
    rebuilt from the artifact's own qconfig + weights, on every sample.
    """
    art = Artifact.load(art_dir)
    qg = art.qgraph()
    shape = (1,) + art.input_shape[1:]
    if inputs is None:
        p = preprocess or Preprocess(**{k: tuple(v) if isinstance(v, list) else v
                                        for k, v in art.qconfig["preprocess"].items()})
        if data is None:
            warnings.warn("no --data given: evaluating on synthetic N(0,1) inputs", stacklevel=2)
            inputs = np.random.default_rng(1).normal(size=(num_samples,) + shape[1:]).astype(np.float32)
        else:
            inputs = load_inputs(data, p, shape, num_samples)
    layer_names = [n.output for n in qg.nodes]
    fixed = art.qconfig["preprocess"].get("input_shape")
    runner = FloatRunner(load_model(model, fixed), layer_names)
    tally = fid.Tally()
    bit_exact, correct, fcorrect = True, 0, 0
    bar = tqdm(total=len(inputs), desc="evaluate", unit="sample", disable=None if progress else True)
    for i in range(0, len(inputs), batch_size):
        x = inputs[i:i + batch_size].astype(np.float32)
        bar.update(len(x))
        diff, ref = _oracle_diff(art, qg, x, keep=True)
        bit_exact &= diff is None
        fl = runner.run(x)
        tally.add_layers(qg, fl, ref, (n for n in layer_names if n != qg.output.name))
        y_float, y_q = fl[qg.output.name], qg.output.dequantize(ref["output"])
        tally.add_output(y_float, y_q, qg.output.name)
        if labels is not None:
            lab = labels[i:i + batch_size]
            correct += int((y_q.argmax(1) == lab).sum())
            fcorrect += int((y_float.argmax(1) == lab).sum())
    bar.close()
    n = len(inputs)
    return EvalResult(
        bit_exact, bool(art.manifest.get("integer_only")), tally.agree / n,
        tally.sqnr(qg.output.name), n,
        data or ("arrays" if labels is not None else "synthetic"),
        tuple(LayerFidelity(node.name, node.output, node.op, tally.sqnr(node.output))
              for node in qg.nodes if node.output in tally.sig),
        accuracy=correct / n if labels is not None else None,
        float_accuracy=fcorrect / n if labels is not None else None)


def bench_artifact(art_dir: str | Path, *, batch: int | None = None, repeat: int = 50,
                   warmup: int = 5, threads: int | None = None) -> BenchResult:
    """Latency distribution of an artifact's ``main`` (default: its compiled batch) on
    ``threads`` TVM threads (default ``TVM_NUM_THREADS``, else every core). TVM sizes its
    pool at its first parallel call: ``threads`` applies if nothing ran before in this
    process (as in ``qcompile bench``)."""
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads must be positive, got {threads}")
        os.environ[THREADS_ENV] = str(threads)
    art = Artifact.load(art_dir)
    return BenchResult.from_summary(art.bench(batch or art.batch or 1, repeat, warmup),
                                    tvm_threads())


def ort_session_options(threads: int | None = None, *, spinning: bool = True) -> Any:
    """onnxruntime SessionOptions as its users get them: the defaults (spin-waiting on,
    intra_op_num_threads 0 = onnxruntime's own choice) unless ``threads`` is given or
    ``spinning=False`` (no busy-wait; then all cores unless ``threads``): not ORT's
    default, only for timing several runtimes side by side."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads or not spinning:
        so.intra_op_num_threads = threads or os.cpu_count() or 1
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def ort_bench(model: str | Path, *, batch: int = 1, repeat: int = 50, warmup: int = 5,
              threads: int | None = None, spinning: bool = True) -> BenchResult:
    """Same measurement for the float model in onnxruntime (the usual peer), with
    onnxruntime's default SessionOptions (spin-waiting on); ``spinning=False`` turns the
    busy-wait off, ``threads`` sets intra_op_num_threads."""
    import onnxruntime as ort

    so = ort_session_options(threads, spinning=spinning)
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [batch] + [d if isinstance(d, int) else 1 for d in inp.shape[1:]]
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    for _ in range(warmup):
        sess.run(None, {inp.name: x})
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        sess.run(None, {inp.name: x})
        times.append(time.perf_counter() - t)
    return BenchResult.from_summary(summarize_ms(times, batch))


# ----------------------------------------------------------------------------- bit allocation
def pin_matches(model: str | Path, pins: tuple[str, ...],
                input_shape: tuple[int, ...] | None = None) -> dict[str, list[str]]:
    """What each ``--pin`` glob matches (the dry run), without measuring anything."""
    proto = load_model(Path(model), input_shape)
    graph = prepare(import_onnx(proto, batch=1, source=Path(model).name))
    return pin_dry_run(costs.layers_of(graph), pins)


def sensitivity_model(model: str | Path, *, method: str = "hessian", calib: CalibSpec = CalibSpec(),
                      num_samples: int = 8, progress: bool = True) -> "Sensitivity":
    """Per-layer Omega for 4 and 8 bits (``qcompile sensitivity``)."""
    model = Path(model)
    graph, reader, *_ = _front(model, calib, progress, calibrate=False)
    x = gather_inputs(reader, num_samples)
    return compute_sensitivity(graph, model.read_bytes(), x, method=method, bits=(4, 8),
                               progress=progress)


PARETO_ALPHAS: tuple[float, ...] = tuple(i / 10 for i in range(11))  # all-INT4 .. all-INT8


def allocate_model(model: str | Path, *, target: str = "llvm", arch: str | None = None,
                   alloc: AllocSpec = AllocSpec(),
                   calib: CalibSpec = CalibSpec(), quant: QuantSpec = QuantSpec(), batch: int = 1,
                   progress: bool = True, pareto_dir: str | Path | None = None,
                   pareto_alphas: tuple[float, ...] = PARETO_ALPHAS) -> AllocateResult:
    """The plan ``compile`` would use, without compiling it (``qcompile allocate``).

    ``pareto_dir``: also sweep the budget (the latency budget unless only size or BOPs is
    given) from all-INT4 to all-INT8 and write the frontier there. ``arch``: as in
    :func:`compile_model` (on CUDA the latency model is that arch's GPU).
    """
    model = Path(model)
    backend = check_options(target, arch)
    tgt = backend.target(target, arch, None)
    _, quant = resolve_auto(calib, quant)  # the rounding compile would use ranks the layers
    graph, reader, stats, *_ = _front(model, calib, progress)
    a = allocate_bits(graph, model.read_bytes(), reader, stats, tgt, spec=alloc, quant=quant,
                      batch=batch, progress=progress)
    swept = None
    if pareto_dir is not None:
        kind = next((k for k, v in (("latency", alloc.latency), ("size", alloc.size),
                                    ("bops", alloc.bops)) if v is not None), "latency")
        others = [b for b in parse_budgets(alloc.latency, alloc.size, alloc.bops) if b.kind != kind]
        problem = problem_for(graph, a.sensitivity, a.cost, alloc, batch,
                              backend.precisions(backend.arch_of(tgt)).allocator)
        points = pareto(problem, kind, pareto_alphas, others)
        files = write_pareto(points, pareto_dir, a.cost.source)
        swept = ParetoResult(kind, len(points), files.json, files.markdown, tuple(files.plots),
                             files.plots_skipped)
    return AllocateResult(str(model), backend.describe(tgt), batch, a, swept)
