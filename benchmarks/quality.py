"""Quantization quality on real trained models (GitHub issue 10, part 5).

    make bench-quality
    python benchmarks/quality.py [--models effnet fashion] [--work DIR] [--out DIR]

Two trained networks, every quantization recipe qcompile offers, and onnxruntime as
the peer, in one run:

* **EfficientNet-Lite0** with its real ImageNet weights (``models/efficientnet_lite0.onnx``,
  ``tools/export_efficientnet.py``) on natural images from installed packages
  (``effnet_fidelity.natural_images``: scikit-image data, Debian opencv-doc).  Images
  alternate between a calibration pool and an evaluation pool, so no evaluated crop
  comes from a calibration image.  Each pool gives the standard crop of each image
  first (short side 256 bicubic, centre 224), then random crops (short side in
  [256, 320], random 224 window, random flip) until the count is reached.  Inputs
  are ``(RGB - 127) / 128``, NCHW.  No labels: the score is top-1 agreement with
  the float model (onnxruntime FP32) and output SQNR.
* **Fashion-MNIST ResNet** (``tests/data/fashion_resnet.onnx``, trained by
  ``tools/train_fashion_mnist.py``) on all 10,000 labelled test images of Debian's
  ``dataset-fashion-mnist``; calibration on 512 training images.  The score is
  accuracy (and its drop from the float model).

Rows: onnxruntime FP32 and onnxruntime static INT8 (``quant_pre_process`` then
``quantize_static``, QDQ, per-channel, MinMax, the same calibration arrays); qcompile
W8A8 with each calibrator x rounding; W4A8 (all layers but the first and last) with
nearest, GPTQ and equalization + bias correction; W4A4 nearest and GPTQ; mixed plans at
0.75x the INT8 weight size from the Hessian and the KL sensitivity (the ILP, on the
llvm target 4 bits run as W4A8); a random plan of the same budget (mean of 5 seeds)
and "keep the first k layers at 8" (k as large as the budget allows) as the controls
that say what the sensitivity ranking is worth.

Every qcompile row is compiled to an artifact (TVM, llvm) and its agreement/accuracy
is that artifact's output on every evaluation input.  Bit-exactness (the compiled
module equals the NumPy integer oracle) is checked by ``api.evaluate`` on the first
``--exact-samples`` inputs (the oracle is ~1 s per EfficientNet crop).  Rows other than
the calibrator sweep use the ``--calibrator`` (default minmax, as the onnxruntime peer);
the plan rows (mixed, random, keep-first) round with GPTQ, the compiler's default.
A feature the compiler does not have yet is shown as "n/a (feature missing)".
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import bench_common as bc  # noqa: E402
from effnet_fidelity import natural_images  # noqa: E402
from peers import ort_int8, ort_runner  # noqa: E402
from quality_report import SIZE_FRACTION, markdown, plot, targets  # noqa: E402

from qcompile import api
from qcompile.mixed import costs  # noqa: E402
from qcompile.config import AllocSpec, CalibSpec, Preprocess, QuantSpec  # noqa: E402
from qcompile.errors import UsageError  # noqa: E402
from qcompile.ir.graph import Graph  # noqa: E402
from qcompile.frontend.onnx_import import import_onnx, load_model  # noqa: E402
from qcompile.frontend.prepare import prepare  # noqa: E402
from qcompile.runtime.run import Artifact  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EFFNET = ROOT / "models" / "efficientnet_lite0.onnx"
FASHION = ROOT / "tests" / "data" / "fashion_resnet.onnx"
EFFNET_PRE = Preprocess(size=224, resize=256, mean=(0.498,) * 3, std=(0.502,) * 3)
MISSING = "n/a (feature missing)"
# explicit: the compiler's defaults are "auto" (GPTQ and mse with real data) since 2026-11-27
# Plan rows round with GPTQ (what `--rounding auto` picks with real calibration data), so
# the controls and the ILP plans differ only in which layers get 4 bits.
PLAN8 = {"bits": 8, "rounding": "gptq"}
ASSEMBLE_ONLY = False  # --assemble-only
ONLY: list[str] = []  # --only


# ----------------------------------------------------------------------------- data
def image_crops(pool: list[np.ndarray], n: int, rng: np.random.Generator) -> np.ndarray:
    """n crops (N, 3, 224, 224), (RGB - 127) / 128: first each image's standard crop,
    then random-scale, random-position, random-flip 224 crops, cycling over ``pool``."""
    out = []
    for i in range(n):
        img = Image.fromarray(pool[i % len(pool)])
        std = i < len(pool)
        short = 256 if std else int(rng.integers(256, 321))
        w, h = img.size
        s = short / min(w, h)
        img = img.resize((max(short, round(w * s)), max(short, round(h * s))),
                         Image.Resampling.BICUBIC)
        W, H = img.size
        x0, y0 = ((W - 224) // 2, (H - 224) // 2) if std else \
            (int(rng.integers(0, W - 223)), int(rng.integers(0, H - 223)))
        img = img.crop((x0, y0, x0 + 224, y0 + 224))
        if not std and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(((np.asarray(img, np.float32) - 127.0) / 128.0).transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)


@dataclasses.dataclass
class Bench:
    key: str
    title: str
    model: Path
    calib: np.ndarray
    x: np.ndarray
    labels: np.ndarray | None
    preprocess: Preprocess
    batch: int
    data: str


def effnet_bench(n_calib: int, n_eval: int) -> Bench:
    if not EFFNET.exists():
        raise SystemExit(f"{EFFNET} is missing: python tools/export_efficientnet.py -o {EFFNET}")
    imgs = natural_images()
    rng = np.random.default_rng(0)
    calib = image_crops(imgs[0::2], n_calib, rng)
    x = image_crops(imgs[1::2], n_eval, rng)
    return Bench("effnet", "EfficientNet-Lite0 (ImageNet weights)", EFFNET, calib, x, None,
                 EFFNET_PRE, 1,
                 f"{len(imgs)} natural images (scikit-image data, opencv-doc): {n_calib} "
                 f"calibration crops of {len(imgs[0::2])} images, {n_eval} evaluation crops "
                 f"of the other {len(imgs[1::2])}")


def fashion_bench(n_calib: int) -> Bench:
    from qcompile.quant.datasets import fashion_mnist_dir, load_fashion_mnist
    if fashion_mnist_dir() is None:
        raise SystemExit("Fashion-MNIST missing: apt-get install -y dataset-fashion-mnist")
    xtr, _ = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    calib = xtr[::len(xtr) // n_calib][:n_calib]
    return Bench("fashion", "Fashion-MNIST ResNet (trained here)", FASHION, calib, xte, yte,
                 Preprocess(size=28, grayscale=True, mean=(0.286,), std=(0.353,)), 500,
                 f"Fashion-MNIST (Debian dataset-fashion-mnist): {len(calib)} training images "
                 f"for calibration, all {len(xte)} labelled test images")


def graph_of(model: Path) -> Graph:
    return prepare(import_onnx(load_model(model, None), batch=1, source=model.name))


# ----------------------------------------------------------------------------- rows
@dataclasses.dataclass
class Row:
    label: str
    group: str
    quant: dict = dataclasses.field(default_factory=dict)
    method: str = "minmax"
    alloc: dict | None = None
    plan: dict | None = None
    slug: str = ""


def uniform_rows(method: str) -> list[Row]:
    rows: list[Row] = []
    for m in ("minmax", "percentile", "mse"):
        for r in ("nearest", "gptq"):
            rows.append(Row(f"W8A8 {m} {r}", "W8A8", {"bits": 8, "rounding": r}, m))
    for r in ("nearest", "gptq"):
        rows.append(Row(f"W4A8 {r}", "W4A8", {"bits": "w4a8", "rounding": r}, method))
    rows.append(Row("W4A8 gptq + bias corr.", "W4A8",
                    {"bits": "w4a8", "rounding": "gptq", "bias_correction": True}, method))
    rows.append(Row("W4A8 equalize + bias corr.", "W4A8",
                    {"bits": "w4a8", "equalize": True, "bias_correction": True,
                     "rounding": "nearest"}, method))
    for r in ("nearest", "gptq"):
        rows.append(Row(f"W4A4 {r}", "W4A4", {"bits": 4, "rounding": r}, method))
    for i, row in enumerate(rows):
        row.slug = f"{i:02d}-" + row.label.replace(" ", "_").replace("+", "").replace(".", "")
    return rows


def _size(layers: list[costs.Layer], plan: dict) -> float:
    return costs.size_mb(layers, plan)


def random_plan(layers: list[costs.Layer], budget: float, seed: int) -> dict:
    """First and last at 8; random other layers to W4A8 until the size fits."""
    plan = {la.name: "w8a8" for la in layers}
    middle = [la.name for la in layers[1:-1]]
    for i in np.random.default_rng(seed).permutation(len(middle)):
        if _size(layers, plan) <= budget:
            break
        plan[middle[i]] = "w4a8"
    return plan


def keep_first_plan(layers: list[costs.Layer], budget: float) -> tuple[dict, int]:
    """The first k layers (the first layer included) and the last at 8, the rest W4A8;
    the largest k whose size fits the budget."""
    best = None
    for k in range(1, len(layers)):
        plan = {la.name: ("w8a8" if i < k or i == len(layers) - 1 else "w4a8")
                for i, la in enumerate(layers)}
        if _size(layers, plan) <= budget:
            best = (plan, k)
    assert best is not None
    return best


# ----------------------------------------------------------------------------- measuring
def ort_outputs(model: Path, x: np.ndarray, cache: Path) -> np.ndarray:
    """onnxruntime's outputs on x (kept in ``cache`` for a rerun with the same --work)."""
    if cache.exists():
        return np.load(cache)
    run = ort_runner(model)
    y = np.concatenate([run(x[i:i + 64]) for i in range(0, len(x), 64)])
    np.save(cache, y)
    return y



class Runner:
    def __init__(self, b: Bench, work: Path, method: str, exact_n: int, log) -> None:
        self.b, self.work, self.method, self.exact_n, self.log = b, work, method, exact_n, log
        self.assemble_only = False  # only rows already in --work
        self.only: list[str] = []  # only rows whose slug contains one of these
        (work / "calib").mkdir(parents=True, exist_ok=True)
        np.save(work / "calib" / "calib.npy", b.calib)
        self.y_float = ort_outputs(b.model, b.x, work / f"fp32-{len(b.x)}.npy")

    def calib(self, method: str) -> CalibSpec:
        return CalibSpec(source=str(self.work / "calib"), method=method,
                         num_samples=len(self.b.calib), preprocess=self.b.preprocess)

    def scores(self, y: np.ndarray) -> dict:
        agree, sqnr = bc.agreement_sqnr(self.y_float, y)
        out = {"top1_agreement": agree, "sqnr_db": sqnr}
        if self.b.labels is not None:
            out["accuracy"] = float((y.argmax(1) == self.b.labels).mean())
        return out

    def run(self, row: Row) -> dict:
        res: dict[str, Any] = {"label": row.label, "group": row.group, "calibrator": row.method,
                               **{k: v for k, v in row.quant.items() if k != "bits"},
                               "bits": row.quant.get("bits", 8)}
        t_row = time.perf_counter()
        try:
            quant = QuantSpec(**row.quant)
            alloc = AllocSpec(**row.alloc) if row.alloc else AllocSpec()
        except (TypeError, UsageError) as e:  # an option this compiler does not have yet
            self.log(f"  {row.label}: {MISSING}: {e}")
            return {**res, "status": MISSING, "error": str(e)}
        art = self.work / "art" / row.slug
        n = self.exact_n or len(self.b.x)
        # a rerun with the same --work dir reuses the row (same evaluation set and oracle subset)
        cached = art / f"result-{len(self.b.x)}-{n}.json"
        if cached.exists():
            self.log(f"  {row.label}: reused from {cached}")
            done_at = dt.datetime.fromtimestamp(cached.stat().st_mtime, dt.timezone.utc)
            return {**json.loads(cached.read_text()), "reused": True,
                    "computed_at": done_at.strftime("%Y-%m-%d %H:%M")}
        if self.assemble_only or (self.only and not any(o in row.slug for o in self.only)):
            return {**res, "status": "not run"}
        lock = art.parent / f"{row.slug}.lock"
        art.parent.mkdir(parents=True, exist_ok=True)
        try:  # another process (--rows) working on this row: leave it to that one
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            self.log(f"  {row.label}: another process has it ({lock})")
            return {**res, "status": "failed: computed by another process"}
        try:
            if not (art / "manifest.json").exists():
                if art.exists():
                    shutil.rmtree(art)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    api.compile_model(self.b.model, art, quant=quant, calib=self.calib(row.method),
                                      alloc=alloc, plan=row.plan, progress=False,
                                      batch=self.b.batch)
            t_compile = json.loads((art / "manifest.json").read_text())["compile_seconds"]
            cfg = json.loads((art / "qconfig.json").read_text())
            y = Artifact.load(art).run(self.b.x)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ev = api.evaluate(self.b.model, art, inputs=self.b.x[:n], progress=False,
                                  batch_size=self.b.batch)
        except Exception as e:  # noqa: BLE001 - a failed row is reported, not fatal
            self.log(f"  {row.label}: FAILED: {type(e).__name__}: {e}")
            traceback.print_exc()
            return {**res, "status": f"failed: {type(e).__name__}: {str(e)[:200]}"}
        finally:
            lock.unlink(missing_ok=True)
        prec = cfg["costs"]["bits"]
        counts = {p: sum(v == p for v in prec.values()) for p in sorted(set(prec.values()))}
        # the oracle subset's agreement must be the artifact's own on the same inputs
        sub = float((y[:n].argmax(1) == self.y_float[:n].argmax(1)).mean())
        res.update(status="ok", size_mb=cfg["costs"]["size_mb"], bops_g=cfg["costs"]["bops_g"],
                   layers=counts, bit_exact=bool(ev.bit_exact) and abs(sub - ev.top1_agreement) < 1e-9,
                   integer_only=bool(ev.integer_only), exact_samples=n,
                   compile_seconds=t_compile, row_seconds=time.perf_counter() - t_row,
                   **self.scores(y))
        if cfg.get("plan"):
            res["plan_budget"] = cfg["plan"].get("budgets")
            res["sensitivity"] = cfg["plan"].get("sensitivity")
        res["precisions"] = prec
        self.log(f"  {row.label}: size {res['size_mb']:.3f} MB, agreement "
                 f"{res['top1_agreement']:.4f}" + (f", accuracy {res['accuracy']:.4f}"
                                                   if "accuracy" in res else "")
                 + f", SQNR {res['sqnr_db']:.2f} dB, bit-exact {res['bit_exact']} "
                 f"({t_compile:.0f} s compile)")
        cached.write_text(json.dumps(res))
        return res


def run_bench(b: Bench, work: Path, method: str, exact_n: int, seeds: int, log,
              rows_kind: str = "all", reverse: bool = False) -> dict:
    t0 = time.perf_counter()
    log(f"== {b.title}: {b.data}")
    r = Runner(b, work, method, exact_n, log)
    r.assemble_only, r.only = ASSEMBLE_ONLY, ONLY
    graph = graph_of(b.model)
    layers = costs.layers_of(graph)
    names = [la.name for la in layers]
    fp32_mb = costs.size_mb(layers, {n: 32 for n in names})
    int8_model_mb = costs.size_mb(layers, {n: 8 for n in names})
    rows: list[dict] = []
    # peers: onnxruntime FP32 and its documented static INT8 recipe
    f = {"label": "onnxruntime FP32", "group": "FP32", "status": "ok", "size_mb": fp32_mb,
         **r.scores(r.y_float)}
    p = np.exp(r.y_float - r.y_float.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    f["mean_softmax_confidence"] = float(p.max(1).mean())
    rows.append(f)
    try:
        q8 = work / "ort-int8.onnx"
        if not q8.exists():
            ort_int8(b.model, q8, b.calib)
        y8 = ort_outputs(q8, b.x, work / f"ort-int8-{len(b.x)}.npy")
        rows.append({"label": "onnxruntime INT8 (QDQ, per-channel, MinMax)", "group": "peer",
                     "status": "ok", "size_mb": int8_model_mb, **r.scores(y8)})
    except Exception as e:  # noqa: BLE001
        rows.append({"label": "onnxruntime INT8 (QDQ, per-channel, MinMax)", "group": "peer",
                     "status": f"failed: {type(e).__name__}: {e}"})
    log(f"  peers: {rows}")
    for row in uniform_rows(method):
        if rows_kind != "plans" or row.label == f"W8A8 {method} nearest":
            rows.append(r.run(row))
    int8 = next(x for x in rows if x["label"] == f"W8A8 {method} nearest")
    int8_mb = int8.get("size_mb", int8_model_mb)
    budget = SIZE_FRACTION * int8_mb
    log(f"  budget {SIZE_FRACTION} x {int8_mb:.4f} MB = {budget:.4f} MB")
    if rows_kind == "uniform":
        return {"rows": rows}
    plan, k = keep_first_plan(layers, budget)
    todo = [Row(f"mixed {sens} @{SIZE_FRACTION}x", f"mixed {sens}", PLAN8, method,
                alloc={"size": f"{budget:.6f}MB", "sensitivity": sens}, slug=f"20-mixed-{sens}")
            for sens in ("hessian", "kl")]
    todo += [Row(f"random plan seed {s}", "random", PLAN8, method,
                 plan=random_plan(layers, budget, s), slug=f"21-random-{s}") for s in range(seeds)]
    todo.append(Row(f"keep first k={k} at 8", "keep-first", PLAN8, method, plan=plan,
                    slug="22-keep-first"))
    done = {row.slug: r.run(row) for row in (todo[::-1] if reverse else todo)}
    rows += [done[row.slug] for row in todo[:2]]
    for x, sens in zip(rows[-2:], ("hessian", "kl")):  # hessian falls back to kl if refused
        used = (x.get("sensitivity") or {}).get("method")
        if used and used != sens:
            x["label"] += f" (sensitivity fell back to {used})"
    rand = [done[row.slug] for row in todo[2:-1]]
    ok = [x for x in rand if x.get("status") == "ok"]
    mean = {"label": f"random plan (mean of {len(ok)} seeds)", "group": "random",
            "status": "ok" if ok else "failed", "seeds": rand}
    if ok:
        for key in ("size_mb", "top1_agreement", "sqnr_db", "accuracy", "compile_seconds"):
            if key in ok[0]:
                vals = [x[key] for x in ok]
                mean[key] = float(np.mean(vals))
                mean[key + "_min_max"] = [float(min(vals)), float(max(vals))]
        mean["bit_exact"] = all(x["bit_exact"] for x in ok)
        mean["integer_only"] = all(x["integer_only"] for x in ok)
    rows.append(mean)
    kf = done["22-keep-first"]
    kf["k"] = k
    rows.append(kf)
    fl = rows[0]
    for x in rows:
        if x.get("status") == "ok":
            x["size_vs_int8"] = x["size_mb"] / int8_mb
            if "accuracy" in x:
                x["accuracy_drop_pt"] = 100 * (fl["accuracy"] - x["accuracy"])
    return {"model": b.key, "title": b.title, "onnx": str(b.model.relative_to(ROOT)),
            "data": b.data, "calib_samples": len(b.calib), "eval_samples": len(b.x),
            "layers": len(layers), "int8_size_mb": int8_mb, "budget_mb": budget,
            "calibrator": method, "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["effnet", "fashion"],
                    choices=["effnet", "fashion"])
    ap.add_argument("--calib-crops", type=int, default=100)
    ap.add_argument("--eval-crops", type=int, default=250)
    ap.add_argument("--fashion-calib", type=int, default=512)
    ap.add_argument("--exact-samples", type=int, default=16,
                    help="inputs checked bit-exact against the NumPy oracle (0: all)")
    ap.add_argument("--fashion-exact-samples", type=int, default=500)
    ap.add_argument("--calibrator", default="minmax")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--work", type=Path, default=None,
                    help="keep artifacts here (and reuse them on a rerun); default: a temp dir")
    ap.add_argument("--rows", choices=["all", "uniform", "plans"], default="all",
                    help="uniform/plans: compute only those rows into --work (to split the "
                         "work over processes), write no results; a later run reuses them")
    ap.add_argument("--reverse", action="store_true",
                    help="plan rows in reverse order (a second --rows plans process)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--stem", default=f"quality-{dt.date.today().isoformat()}")
    ap.add_argument("--only", nargs="+", default=[],
                    help="compute only rows whose artifact name contains one of these")
    ap.add_argument("--assemble-only", action="store_true",
                    help="compute nothing: report the rows already in --work")
    args = ap.parse_args()
    global ASSEMBLE_ONLY
    ASSEMBLE_ONLY = args.assemble_only
    ONLY[:] = args.only
    t0 = time.perf_counter()
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="qcompile-quality-")
        args.work = Path(tmp.name)
    results = []
    try:
        for m in args.models:
            b = (effnet_bench(args.calib_crops, args.eval_crops) if m == "effnet"
                 else fashion_bench(args.fashion_calib))
            exact = args.exact_samples if m == "effnet" else args.fashion_exact_samples
            res = run_bench(b, args.work / m, args.calibrator, exact, args.seeds, log, args.rows,
                            args.reverse)
            if args.rows != "all":  # a partial run only fills the --work dir
                continue
            res["targets"] = targets(res)
            results.append(res)
    finally:
        if tmp is not None:
            tmp.cleanup()
    if args.rows != "all":
        return 0
    prov = bc.provenance(ort_threads=f"{os.cpu_count()} (peers.ort_runner, spinning off)")
    meta = {"date": dt.date.today().isoformat(), "started": started, "provenance": prov,
            "command": "make bench-quality" if len(sys.argv) == 1 else prov["command"],
            "machine_line": f"{bc.machine_label(prov)} (shared with other jobs), host {prov['host']}",
            "seconds": time.perf_counter() - t0, "png": f"{args.stem}.png"}
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args.out / f"{args.stem}.png")
    md = markdown(results, meta)
    bc.write_results(args.out, args.stem, {**meta, "results": results}, md)
    print(md)
    bad = [f"{res['model']}: {x['label']}" for res in results for x in res["rows"]
           if x.get("bit_exact") is False]
    if bad:
        print("NOT bit-exact:", bad, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
