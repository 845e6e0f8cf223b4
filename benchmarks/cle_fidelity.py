"""EfficientNet-Lite0: cross-layer equalization and bias correction, W8A8 and W4A4.

    python benchmarks/cle_fidelity.py --crops /tmp/cle-crops          # write the PNG crops
    python benchmarks/cle_fidelity.py --crops /tmp/cle-crops --run     # measure (oracle)
    python benchmarks/cle_fidelity.py --crops /tmp/cle-crops --run --out benchmarks/results/cle-effnet-lite0

The crops are random 256 px squares (random short-side scale in [256, 320], random
horizontal flip) of the natural images ``effnet_fidelity.natural_images`` finds,
saved as PNG so ``qcompile compile --data DIR --size 224 --resize 256 --mean
0.498,0.498,0.498 --std 0.502,0.502,0.502`` centre-crops them exactly like the
model's own preprocessing.  Images alternate between calib/ and eval/, so no
evaluated crop comes from a calibration image.

``--run`` measures top-1 agreement with the float model and output SQNR for each
bit width x {plain, --bias-correction, --equalize, both, --equalize with data ranges
(``eqd``)}; ``--out STEM`` writes STEM.json and STEM.md with the run's provenance.  It follows
``api.compile_model`` step by step up to the QGraph and runs the NumPy oracle
instead of building TVM (the artifact is bit-exact with the oracle; the tests
check that on a small model through the full compile).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import bench_common as bc  # noqa: E402
from effnet_fidelity import natural_images  # noqa: E402

EQ_KW: dict = {}  # extra equalize_calibrated arguments (exploration)
PREPROCESS = dict(size=224, resize=256, mean=(0.498,) * 3, std=(0.502,) * 3)


def write_crops(out: Path, n_calib: int = 100, n_eval: int = 200, seed: int = 0) -> None:
    """Random 256 px crops (scale, offset, flip) of alternating images as PNG files."""
    rng = np.random.default_rng(seed)
    imgs = natural_images()
    for split, pool, n in (("calib", imgs[0::2], n_calib), ("eval", imgs[1::2], n_eval)):
        d = out / split
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            a = pool[i % len(pool)]
            img = Image.fromarray(a)
            w, h = img.size
            short = int(rng.integers(256, 321))
            s = short / min(w, h)
            img = img.resize((max(short, round(w * s)), max(short, round(h * s))),
                             Image.Resampling.BICUBIC)
            W, H = img.size
            x0, y0 = int(rng.integers(0, W - 255)), int(rng.integers(0, H - 255))
            img = img.crop((x0, y0, x0 + 256, y0 + 256))
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            img.save(d / f"{split}{i:04d}.png")


def measure(model: Path, crops: Path, bits: int, equalize: bool, correct: bool,
            method: str, y_float: np.ndarray, x_eval: np.ndarray, eq_kw: dict) -> dict:
    from qcompile import api
    from qcompile.verify import oracle
    from qcompile.quant.readers import gather_inputs
    from qcompile.config import CalibSpec, Preprocess, QuantSpec
    from qcompile.quant.equalize import bias_correction, equalize_calibrated
    from qcompile.quant.quantize import quantize_graph

    t0 = time.perf_counter()
    calib = CalibSpec(source=str(crops / "calib"), method=method, num_samples=100,
                      preprocess=Preprocess(**PREPROCESS))
    quant = QuantSpec(bits=bits, equalize=equalize, bias_correction=correct)
    # the same steps as api.compile_model up to the QGraph
    graph, reader, stats = api._front(model, calib, False, calibrate=not quant.equalize)[:3]
    if quant.equalize:
        graph, stats = equalize_calibrated(graph, reader, calib, False, **eq_kw)
    qg = quantize_graph(graph, stats, quant)
    if quant.bias_correction:
        qg = bias_correction(graph, qg, gather_inputs(reader, calib.num_samples))
    t1 = time.perf_counter()
    extra = {}
    if quant.equalize:  # how far the equalized *float* graph is from the model
        import onnxruntime as ort
        from qcompile.quant.equalize import canonical_model
        sess = ort.InferenceSession(canonical_model(graph).SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        yf = np.concatenate([sess.run(None, {graph.input: x_eval[i:i + 16]})[0]
                             for i in range(0, len(x_eval), 16)])
        extra = {"float_eq_top1_agreement": float((yf.argmax(1) == y_float.argmax(1)).mean()),
                 "float_eq_max_abs_diff": float(np.abs(yf - y_float).max())}
    y = np.concatenate([oracle.run(qg, x_eval[i:i + 8]) for i in range(0, len(x_eval), 8)])
    noise = float(((y_float - y) ** 2).sum())
    return {"bits": bits, "equalize": equalize, "bias_correction": correct, **eq_kw,
            "calibrator": method,
            "top1_agreement": float((y.argmax(1) == y_float.argmax(1)).mean()),
            "sqnr_db": float(10 * np.log10((y_float ** 2).sum() / noise)),
            "quantize_seconds": round(t1 - t0, 1), **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("models/efficientnet_lite0.onnx"))
    ap.add_argument("--crops", type=Path, required=True)
    ap.add_argument("--run", action="store_true")
    ap.add_argument("--bits", default="8,4")
    ap.add_argument("--calibrator", default="minmax")
    ap.add_argument("--configs", default="none,bc,eq,eq+bc,eqd")
    ap.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    ap.add_argument("--eq-kw", default="{}", help="JSON: extra equalize_calibrated args")
    args = ap.parse_args()
    EQ_KW.update(json.loads(args.eq_kw))
    if not (args.crops / "eval").is_dir():
        write_crops(args.crops)
        print(f"wrote crops to {args.crops}")
    if not args.run:
        return
    from qcompile.quant.calibrate import FloatRunner
    from qcompile.config import Preprocess
    from qcompile.frontend.onnx_import import load_model
    from qcompile.quant.readers import load_inputs

    x_eval = load_inputs(str(args.crops / "eval"), Preprocess(**PREPROCESS), (1, 3, 224, 224), 0)
    runner = FloatRunner(load_model(args.model, None))
    y_float = np.concatenate([runner.run(x_eval[i:i + 16])[runner.graph_outputs[0]]
                              for i in range(0, len(x_eval), 16)])
    results = []
    for bits in (int(b) for b in args.bits.split(",")):
        for cfg in args.configs.split(","):
            kw = {**EQ_KW, **({"data_ranges": True} if cfg == "eqd" else {})}
            r = measure(args.model, args.crops, bits, "eq" in cfg, "bc" in cfg,
                        args.calibrator, y_float, x_eval, kw)
            r["eval_crops"] = len(x_eval)
            print(json.dumps(r), flush=True)
            results.append(r)
    if args.out:
        prov = bc.provenance(ort_threads=ORT_THREADS)
        bc.write_results(args.out.parent, args.out.name, {"provenance": prov, "rows": results},
                         markdown(results, args, len(x_eval)) + "\n" + bc.provenance_line(prov) + "\n")


ORT_THREADS = "0 (onnxruntime's default), the equalized float graph only"


def markdown(rows: list[dict], args: argparse.Namespace, n_eval: int) -> str:
    out = ["# EfficientNet-Lite0: --equalize / --bias-correction (NumPy oracle = artifact)", "",
           f"100 calibration crops, {n_eval} evaluation crops from other images "
           f"(`benchmarks/cle_fidelity.py`), {args.calibrator} calibrator.", "",
           "| bits | equalize | bias corr. | top-1 agree | SQNR dB | equalized float top-1 vs float |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        eq = ("data ranges" if r.get("data_ranges") else "data-free") if r["equalize"] else "-"
        f = r.get("float_eq_top1_agreement")
        out.append(f"| W{r['bits']}A{r['bits']} | {eq} | {'yes' if r['bias_correction'] else '-'} "
                   f"| {r['top1_agreement']:.3f} | {r['sqnr_db']:.2f} | {'' if f is None else f'{f:.3f}'} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
