"""Speedup of qcompile's integer-only modules over the float model and onnxruntime.

    python benchmarks/speedup.py                       # zoo ResNet-18/50, Inception-v3 (+ EfficientNet-Lite0)
    python benchmarks/speedup.py --models resnet50 --batch 1 8 --repeat 30
    python benchmarks/speedup.py --quick               # ResNet-18 at 64 px, batch 1, 5 runs

Configurations per model and batch: ORT FP32, ORT INT8 (quant_pre_process, then static
QDQ, per-channel), TVM FP32 through qcompile's own float Relax builder (untuned: fewer
runs, batch 1 by default), and qcompile INT8, INT4 and mixed precision at relative
latency budgets.  Each is timed two ways, in one process:

* alone (the headline): one configuration at a time, in its own block (warm-up, then
  the median of --alone-runs runs: 30 at batch 1, 10 above); onnxruntime with its
  default SessionOptions (spin-waiting on, its own thread count), each session created
  just before its block and released after it, so no two sessions ever spin at once;
* interleaved (second column set; --no-interleaved skips it): --repeat round-robin
  rounds, order rotated per round, onnxruntime with spin-waiting off (not its default:
  spinning workers would steal the cores from the next configuration in the round).

Fidelity (top-1 agreement, SQNR) is measured
against ORT FP32 on the same synthetic inputs; ours are also checked bit-exact against
the NumPy oracle.  Without a GPU a "T4 predicted" column comes from qcompile.mixed.costs.

Writes benchmarks/results/speedup-<machine>-<date>.{json,md} (+ .png with matplotlib).
Exits 1 when a configuration failed or one of our modules is not bit-exact/integer-only.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
sys.path.insert(0, str(Path(__file__).parent))
import bench_common as bc  # noqa: E402
from peers import block_times, ort_int8, ort_runner, time_ort_alone  # noqa: E402
from speedup_config import (ORT_FP32, ORT_INT8, Q_INT4, Q_INT8, TVM_FP32,  # noqa: E402,F401
                            QConfig, Settings, alone_runs, qconfigs)
from speedup_report import MAIN_COLUMNS, MIXED_COLUMNS, model_rows, plot_series, problems  # noqa: E402,F401

REPO = Path(__file__).resolve().parents[1]
EFFNET = "efficientnet_lite0"
EFFNET_PATH = REPO / "models" / "efficientnet_lite0.onnx"
ZOO_MODELS = ("resnet18", "resnet50", "inceptionv3")


@dataclass
class ModelFiles:
    """The model as each runtime wants it, plus the canonical graph for the cost model."""

    name: str
    onnx: Path            # what qcompile compiles (zoo: batch 1)
    dynamic: Path         # the same weights with a symbolic batch, for onnxruntime
    graph: Any
    layers: list
    input_shape: tuple[int, ...]
    source: str
    ort_int8: Path | None = None


# --- models ------------------------------------------------------------------------------
def effnet_available() -> bool:
    if EFFNET_PATH.is_file():
        return True
    import importlib.util
    return all(importlib.util.find_spec(m) for m in ("efficientnet_lite_pytorch", "torch"))


def _effnet_path() -> Path:
    if not EFFNET_PATH.is_file():
        import subprocess
        subprocess.run([sys.executable, str(REPO / "tools/export_efficientnet.py"), "-o",
                        str(EFFNET_PATH)], check=True)
    return EFFNET_PATH


def dynamic_batch(src: Path, dst: Path) -> Path:
    """Copy of ``src`` whose input/output batch dimension is the symbol ``N``."""
    import onnx
    m = onnx.load(str(src))
    for v in (*m.graph.input, *m.graph.output):
        v.type.tensor_type.shape.dim[0].dim_param = "N"
    del m.graph.value_info[:]
    onnx.save(m, str(dst))
    return dst


def prepare_model(name: str, work: Path, input_size: int | None) -> ModelFiles:
    from qcompile.mixed import costs
    from qcompile.frontend import zoo
    from qcompile.frontend.onnx_import import import_onnx, load_model
    from qcompile.frontend.prepare import prepare
    if name == EFFNET:
        path, source = _effnet_path(), "pretrained EfficientNet-Lite0 (tools/export_efficientnet.py)"
    else:
        path = zoo.save(zoo.build(name, input_size=input_size), work / f"{name}.onnx")
        source = "zoo architecture, seeded synthetic weights"
    graph = prepare(import_onnx(load_model(path), batch=1, source=name))
    return ModelFiles(name, path, dynamic_batch(path, work / f"{name}-dyn.onnx"), graph,
                      costs.layers_of(graph), tuple(graph.input_shape), source)


# --- cost model ----------------------------------------------------------------------------
def plan_costs(files: ModelFiles, bits: dict[str, int] | int, batch: int) -> dict[str, float]:
    """Size, BOPs and the T4 roofline prediction for a plan (or uniform bits, 32 = FP32)."""
    from qcompile.mixed import costs
    plan = costs.uniform(files.layers, bits) if isinstance(bits, int) else bits
    if isinstance(bits, int) and bits in costs.FLOAT_BITS:
        t4 = costs.t4_float_ms(files.layers, batch, bits, costs.t4_other_ms(files.graph, batch, bits))
    else:
        t4 = costs.t4_model_ms(files.layers, plan, batch, costs.t4_other_ms(files.graph, batch))
    return {"size_mb": costs.size_mb(files.layers, plan), "bops_g": costs.bops_g(files.layers, plan),
            "t4_predicted_ms": t4}


# --- compile ----------------------------------------------------------------------------
def compile_q(files: ModelFiles, cfg: QConfig, batch: int, out: Path, *, target: str,
              calib_n: int, sensitivity: str, sens_samples: int) -> dict[str, Any]:
    """Compile one configuration; errors are recorded, not raised (the table shows them)."""
    from qcompile import api
    from qcompile.config import CalibSpec
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # synthetic calibration: said once in the notes
            res = api.compile_model(files.onnx, out, target=target, batch=batch, progress=False,
                                    calib=CalibSpec(num_samples=calib_n),
                                    **cfg.specs(sensitivity, sens_samples))
    except Exception as e:  # noqa: BLE001 -- one failed cell must not lose the others
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    q = json.loads((out / "qconfig.json").read_text())
    from qcompile.config import precision
    bits = dict(q["costs"]["bits"])  # layer -> "w8a8" / "w4a8" / "w4a4"
    return {"art": str(out), "compile_s": res.compile_seconds, "integer_only": res.integer_only,
            "costs": q["costs"], "plan": q.get("plan"), "bits": bits,
            "n4": sum(precision(b)[0] == 4 for b in bits.values()), "n_layers": len(bits),
            **plan_costs(files, bits, batch)}


def float_vm(files: ModelFiles, batch: int) -> Any:
    """TVM FP32 through qcompile's own float Relax builder (relax_float), llvm."""
    from qcompile.mixed.float_model import FloatVM, build_float_module
    return FloatVM(build_float_module(files.graph, batch, grad=False))


def run_float_vm(fvm: Any, x: np.ndarray) -> np.ndarray:
    b, outs = fvm.fm.batch, []
    for i in range(0, len(x), b):
        part = x[i:i + b]
        pad = b - len(part)
        if pad:
            part = np.concatenate([part, np.zeros((pad, *part.shape[1:]), part.dtype)])
        outs.append(fvm.forward(part)[:b - pad])
    return np.concatenate(outs)


# --- fidelity ------------------------------------------------------------------------------
def fidelity(files: ModelFiles, x: np.ndarray, arts: dict[str, dict], fvm: Any | None,
             step: Callable[[str], None], done: Callable[[], None] = lambda: None,
             peers: bool = True) -> dict[str, dict[str, Any]]:
    """Agreement/SQNR vs ORT FP32 on ``x``; ours via api.evaluate (also bit-exactness).

    ``peers=False`` skips ORT INT8 / TVM FP32 (only our modules are evaluated)."""
    from qcompile import api
    out: dict[str, dict[str, Any]] = {}
    if peers:
        fp32, int8 = ort_runner(files.dynamic), ort_runner(files.ort_int8)
        ref = np.concatenate([fp32(x[i:i + 8]) for i in range(0, len(x), 8)])
        a, s = bc.agreement_sqnr(ref, np.concatenate([int8(x[i:i + 8]) for i in range(0, len(x), 8)]))
        out[ORT_INT8] = {"top1_agreement": a, "sqnr_db": s}
    if peers and fvm is not None:
        a, s = bc.agreement_sqnr(ref, run_float_vm(fvm, x))
        out[TVM_FP32] = {"top1_agreement": a, "sqnr_db": s}
    for key, c in arts.items():
        step(f"evaluate {key}")
        if "error" not in c:
            ev = api.evaluate(files.onnx, c["art"], inputs=x, progress=False)
            out[key] = {k: getattr(ev, k) for k in ("bit_exact", "integer_only", "top1_agreement",
                                                    "sqnr_db")}
        done()
    return out


# --- timing -------------------------------------------------------------------------------
def time_batch(files: ModelFiles, batch: int, arts: dict[str, dict], fvm: Any | None,
               repeat: int, fp32_every: int, progress: Callable[[int], None]) -> dict[str, dict]:
    """Every configuration at ``batch``, round-robin in this process."""
    import tvm
    from qcompile.runtime.run import Artifact
    x = np.random.default_rng(0).normal(size=(batch, *files.input_shape[1:])).astype(np.float32)
    fp32 = ort_runner(files.dynamic)
    fns: dict[str, Callable[[], object]] = {ORT_FP32: lambda: fp32(x)}
    if files.ort_int8 is not None:  # the reproduction times ORT FP32 only
        int8 = ort_runner(files.ort_int8)
        fns[ORT_INT8] = lambda: int8(x)
    every = {}
    if fvm is not None:
        fargs = fvm._tensors([x, *fvm.fm.weights])
        fns[TVM_FP32] = lambda: fvm.vm["forward"](*fargs)
        every[TVM_FP32] = fp32_every
    for key, c in arts.items():
        if "error" in c:
            continue
        art = Artifact.load(c["art"])
        xt = tvm.runtime.tensor(x, art.device)

        def run(art: Any = art, xt: Any = xt) -> None:
            art.vm["main"](xt, *art.params)
            art.device.sync()  # a no-op on the CPU; GPU calls are asynchronous
        fns[key] = run
    times = bc.interleaved_rounds(fns, repeat, every=every, progress=progress)
    return {k: bc.summarize(v) for k, v in times.items()}


def _time_artifact_alone(path: str, x: np.ndarray, runs: int, warmup: int) -> list[float]:
    """One of our modules, loaded for its block only (released before returning)."""
    def timed() -> list[float]:
        import tvm
        from qcompile.runtime.run import Artifact
        art = Artifact.load(path)
        xt = tvm.runtime.tensor(x, art.device)

        def run() -> None:
            art.vm["main"](xt, *art.params)
            art.device.sync()  # a no-op on the CPU; GPU calls are asynchronous
        return block_times(run, runs, warmup)
    out = timed()
    gc.collect()
    return out


def alone_blocks(files: ModelFiles, batch: int, arts: dict[str, dict], fvm: Any | None
                 ) -> list[tuple[str, Callable[[np.ndarray, int, int], list[float]]]]:
    """(key, time(x, runs, warmup) -> seconds) per configuration, in block order.

    Each callable creates what it times, times it, and releases it before returning."""
    blocks: list[tuple[str, Callable[[np.ndarray, int, int], list[float]]]] = [
        (ORT_FP32, lambda x, n, w: time_ort_alone(files.dynamic, x, n, w))]
    if files.ort_int8 is not None:
        blocks.append((ORT_INT8, lambda x, n, w, m=files.ort_int8: time_ort_alone(m, x, n, w)))
    if fvm is not None:
        def tvm_fp32(x: np.ndarray, n: int, w: int) -> list[float]:
            fargs = fvm._tensors([x, *fvm.fm.weights])
            return block_times(lambda: fvm.vm["forward"](*fargs), n, w)
        blocks.append((TVM_FP32, tvm_fp32))
    for key, c in arts.items():
        if "error" not in c:
            blocks.append((key, lambda x, n, w, p=c["art"]: _time_artifact_alone(p, x, n, w)))
    return blocks


def time_alone(files: ModelFiles, batch: int, arts: dict[str, dict], fvm: Any | None,
               runs: int, warmup: int, fp32_every: int = 1, passes: int = 1,
               progress: Callable[[int], None] | None = None) -> dict[str, dict]:
    """Every configuration at ``batch`` timed alone, one block after another.

    A block: ``warmup`` untimed runs, then ``runs`` timed back-to-back runs (untuned TVM
    FP32: ``runs // fp32_every``, at least 1, and one warm-up).  Nothing else runs
    meanwhile: onnxruntime sessions (default SessionOptions, spin-waiting on) and our
    artifacts are created at the start of their block and released at its end.  With
    ``passes`` > 1 the whole sequence repeats and the samples are pooled; each pass's
    median is kept as ``pass_medians_ms``."""
    x = np.random.default_rng(0).normal(size=(batch, *files.input_shape[1:])).astype(np.float32)
    blocks = alone_blocks(files, batch, arts, fvm)
    samples: dict[str, list[float]] = {k: [] for k, _ in blocks}
    pass_medians: dict[str, list[float]] = {k: [] for k, _ in blocks}
    step = 0
    for _ in range(max(1, passes)):
        for key, timer in blocks:
            gc.collect()
            slow = key == TVM_FP32 and fp32_every > 1
            t = timer(x, max(1, runs // fp32_every) if slow else runs, min(warmup, 1) if slow else warmup)
            samples[key] += t
            pass_medians[key].append(round(float(np.median(t)) * 1e3, 4))
            if progress:
                progress(step)
            step += 1
    out = {}
    for k, v in samples.items():
        out[k] = {**bc.summarize(v), "warmup": min(warmup, 1) if k == TVM_FP32 and fp32_every > 1
                  else warmup, "passes": max(1, passes), "pass_medians_ms": pass_medians[k]}
    return out


# --- one model ------------------------------------------------------------------------
def bench_model(name: str, st: Settings, work: Path, bar: Any) -> dict[str, Any]:
    def step(what: str) -> None:
        bar.set_postfix_str(f"{name}: {what}", refresh=True)

    step("prepare")
    files = prepare_model(name, work, st.input_size)
    rng = np.random.default_rng(0)
    calib = rng.normal(size=(st.calib_n, *files.input_shape[1:])).astype(np.float32)
    files.ort_int8 = ort_int8(files.dynamic, work / f"{name}-ort-int8.onnx", calib)
    bar.update(1)
    fvms = {}
    for b in st.fp32_batches:
        step(f"TVM FP32 build, batch {b}")
        fvms[b] = float_vm(files, b)
        bar.update(1)
    x_eval = np.random.default_rng(1).normal(size=(st.eval_n, *files.input_shape[1:])).astype(np.float32)
    out: dict[str, Any] = {"model": name, "source": files.source, "input": list(files.input_shape),
                           "float": plan_costs(files, 32, 1), "batches": {}}
    for b in st.batches:
        arts = {}
        for cfg in st.cfgs:
            step(f"compile {cfg.key}, batch {b}")
            arts[cfg.key] = compile_q(files, cfg, b, work / f"{name}-b{b}-{cfg.key.split()[-1]}",
                                      target=st.target, calib_n=st.calib_n,
                                      sensitivity=st.sensitivity, sens_samples=st.sens_samples)
            bar.update(1)
        fvm = fvms.get(b)
        fid = fidelity(files, x_eval, arts, fvm or next(iter(fvms.values()), None),
                       step, lambda: bar.update(1))
        gc.collect()  # the fidelity sessions are gone before anything is timed
        step(f"timing batch {b}, each configuration alone")
        timing = time_alone(files, b, arts, fvm, st.runs_alone(b), st.alone_warmup, st.fp32_every,
                            st.alone_passes, lambda i: bar.update(1))
        inter = {}
        if st.interleaved:
            step(f"timing batch {b}, interleaved")
            inter = time_batch(files, b, arts, fvm, st.repeat, st.fp32_every,
                               lambda i: bar.update(1))
        costs = {ORT_FP32: plan_costs(files, 32, b), ORT_INT8: plan_costs(files, 8, b),
                 TVM_FP32: plan_costs(files, 32, b)}
        out["batches"][str(b)] = {
            "timing": timing, "timing_interleaved": inter, "fidelity": fid, "costs": costs,
            "configs": {k: {kk: vv for kk, vv in c.items() if kk != "costs"} for k, c in arts.items()}}
    out["eval_samples"] = st.eval_n
    return out


# --- main ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None,
                    help=f"zoo names and/or {EFFNET} (default: {' '.join(ZOO_MODELS)} [+ {EFFNET}])")
    ap.add_argument("--batch", nargs="+", type=int, default=None, help="default: 1 8")
    ap.add_argument("--alone-runs", type=int, default=None,
                    help="timed runs per configuration in its own block, the headline figures "
                         "(default: 30 at batch 1, 10 at larger batches; --quick: 5 / 3)")
    ap.add_argument("--alone-warmup", type=int, default=None,
                    help="untimed runs before each block (default 5; --quick: 2)")
    ap.add_argument("--alone-passes", type=int, default=1,
                    help="repeat the whole sequence of blocks N times, samples pooled (default 1)")
    ap.add_argument("--repeat", type=int, default=None,
                    help="interleaved timing rounds (default 20; --quick: 5)")
    ap.add_argument("--no-interleaved", action="store_true",
                    help="skip the interleaved (ORT spinning off) second column set")
    ap.add_argument("--calib-samples", type=int, default=None, help="default 16")
    ap.add_argument("--eval-samples", type=int, default=None, help="default 8")
    ap.add_argument("--alphas", nargs="+", type=float, default=None, help="default 0.25 0.5 0.75")
    ap.add_argument("--int8-only", action="store_true", help="only qcompile INT8 beside the peers")
    ap.add_argument("--tvm-fp32-batch", nargs="*", type=int, default=[1],
                    help="batches (of --batch) at which to build and time TVM FP32 (slow; default 1; "
                         "none: skip it)")
    ap.add_argument("--tvm-fp32-every", type=int, default=4,
                    help="TVM FP32 joins every Nth timing round (default 4)")
    ap.add_argument("--sensitivity", choices=("hessian", "kl"), default=None,
                    help="default hessian (kl with --quick)")
    ap.add_argument("--sensitivity-samples", type=int, default=8)
    ap.add_argument("--input-size", type=int, default=None, help="zoo models' input size")
    ap.add_argument("--target", choices=("llvm", "cuda"), default="llvm")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: resnet18 at 64 px, batch 1, 5 runs alone + 5 interleaved rounds, "
                         "α=0.5, 4 calibration samples")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    a = ap.parse_args(argv)
    q = a.quick
    default_models = list(ZOO_MODELS) + ([EFFNET] if effnet_available() else [])
    a.models = a.models or (["resnet18"] if q else default_models)
    a.batch = a.batch or ([1] if q else [1, 8])
    a.repeat = a.repeat or (5 if q else 20)
    a.alone_warmup = a.alone_warmup if a.alone_warmup is not None else (2 if q else 5)
    a.calib_samples = a.calib_samples or (4 if q else 16)
    a.eval_samples = a.eval_samples or (2 if q else 8)
    a.alphas = a.alphas or ([0.5] if q else [0.25, 0.5, 0.75])
    a.sensitivity = a.sensitivity or ("kl" if q else "hessian")
    if q and a.input_size is None:
        a.input_size = 64
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    clock = bc.Stopwatch()
    import tvm
    from tqdm import tqdm
    from qcompile.frontend import zoo
    unknown = [m for m in args.models if m != EFFNET and m not in zoo.ZOO]
    if unknown:
        print(f"error: unknown model(s) {unknown}; choose from {sorted(zoo.ZOO)} or {EFFNET}",
              file=sys.stderr)
        return 2
    if args.target == "cuda" and not tvm.cuda().exist:
        print("error: --target cuda needs a CUDA GPU, and none is present", file=sys.stderr)
        return 9
    cfgs, args.alphas = ([QConfig(Q_INT8, 8)], []) if args.int8_only else (qconfigs(args.alphas), args.alphas)
    st = Settings(args.batch, [b for b in args.tvm_fp32_batch if b in args.batch],
                  args.repeat, max(1, args.tvm_fp32_every), args.calib_samples, args.eval_samples,
                  args.alphas, args.target, args.sensitivity, args.sensitivity_samples,
                  args.input_size, cfgs,
                  alone_runs={b: args.alone_runs for b in args.batch} if args.alone_runs else {},
                  alone_warmup=max(0, args.alone_warmup), alone_passes=max(1, args.alone_passes),
                  interleaved=not args.no_interleaved, quick=args.quick)
    results = []
    with tempfile.TemporaryDirectory() as d, \
            tqdm(total=st.steps() * len(args.models), desc="speedup", unit="step") as bar:
        for name in args.models:
            results.append(bench_model(name, st, Path(d), bar))
    rows, mixed = [], []
    for r in results:
        a, b = model_rows(r, st)
        rows += a
        mixed += b
    prov = bc.provenance(None if argv is None else [__file__, *argv], ort_threads=(
        bc.ORT_DEFAULT_THREADS + (f", interleaved {os.cpu_count()} (no spinning)" if st.interleaved else "")))
    where = ("" if args.target == "llvm" else
             f" (qcompile modules on {tvm.cuda().device_name}; ORT and TVM FP32 on the CPU)")
    runs = ", ".join(f"batch {b}: {st.runs_alone(b)}" for b in st.batches)
    passes = f", the whole sequence run {st.alone_passes} times and pooled" if st.alone_passes > 1 else ""
    slow = (f"; untuned TVM FP32: {max(1, st.runs_alone(st.batches[0]) // st.fp32_every)} "
            f"run(s) per {st.fp32_every}" if st.fp32_every > 1 and st.fp32_batches else "")
    inter = (f"Interleaved (second column set): {st.repeat} round-robin rounds after 3 warm-up "
             f"runs each, order rotated per round, TVM FP32 in every {st.fp32_every}th round; "
             f"onnxruntime with spin-waiting OFF (session.intra_op.allow_spinning=0, "
             f"intra_op_num_threads={os.cpu_count()}), which is not its default, so that idle "
             f"workers do not steal the cores from the next configuration in the round."
             if st.interleaved else "Interleaved timing skipped (--no-interleaved): n/a.")
    notes = (
        f"Measured on {bc.machine_label(prov)}{where}; batch latency in ms, median (min–max).",
        f"Alone (the headline): each configuration timed by itself, in its own block, one "
        f"block after another (ORT FP32, ORT INT8, TVM FP32, then ours): {st.alone_warmup} "
        f"warm-up runs, then the median of back-to-back timed runs ({runs}{slow}){passes}. "
        f"onnxruntime runs with its default SessionOptions (spin-waiting on, "
        f"intra_op_num_threads=0: its own thread count), each session created just before "
        f"its block and released after it, so no two sessions spin at once; qcompile "
        f"modules are loaded for their block only (TVM_NUM_THREADS="
        f"{os.environ.get('TVM_NUM_THREADS')}).",
        "latency / ORT INT8: this configuration's median over ORT INT8's median, same timing mode.",
        inter,
        "T4 predicted: qcompile.mixed.costs roofline model of an NVIDIA T4 (not measured).",
        f"Fidelity vs ORT FP32 on {st.eval_n} synthetic N(0,1) inputs; calibration: "
        f"{st.calib_n} synthetic samples for qcompile and ORT INT8 alike.",
        f"Mixed: relative latency budget α between all-INT4 and all-INT8 plans, sensitivity "
        f"{st.sensitivity}; ORT INT8 (peers.ort_int8): onnxruntime.quantization."
        f"shape_inference.quant_pre_process, then quantize_static (QDQ, per-channel "
        f"QInt8 weights, QUInt8 activations, MinMax).",
        "Size/BOPs: conv/dense weights + int32 bias (FP32 rows: 32-bit), MB = 2^20 bytes.")
    main_t = bc.Table(MAIN_COLUMNS, rows, "Speedup", notes)
    mixed_t = bc.Table(MIXED_COLUMNS, mixed, "Mixed precision: latency budget vs measured",
                       tuple(sorted({f"plan latency source: {m['source']}" for m in mixed
                                     if m.get("source")})))
    markdown = bc.render_markdown(main_t) + "\n" + bc.render_markdown(mixed_t)
    stem = bc.result_stem("speedup" + ("-int8" if args.int8_only else ""), args.quick)
    series = plot_series(results)
    png = args.out / f"{stem}.png"
    skipped = bc.plot_latency_vs_size(series, png, f"latency vs size, {bc.machine_label(prov)}")
    plot_note = f"plot: {png.name}" if skipped is None else f"plot skipped: {skipped}"
    markdown += f"\n{plot_note}\n\n{bc.provenance_line(prov)}\n"
    bad = problems(results)
    wall = clock.seconds
    data = {"provenance": prov, "quick": args.quick, "wall_seconds": wall,
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "timing_method": {"headline": "alone", "alone": notes[1],
                              "interleaved": notes[3] if st.interleaved else None},
            "results": results, "tables": {
                "main": bc.table_json(main_t), "mixed": bc.table_json(mixed_t)},
            "plot": None if skipped else str(png), "plot_skipped": skipped, "problems": bad}
    return bc.finish(args.out, stem, data, markdown, bad, wall)


if __name__ == "__main__":
    sys.exit(main())
