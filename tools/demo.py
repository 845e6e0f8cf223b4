"""`make demo`: zoo ResNet-18 -> int8 and mixed 4/8-bit artifacts -> fidelity -> latency.

Uses the Python API end to end and prints one summary. The same steps from a shell:

    qcompile zoo resnet18 -o out/demo/resnet18.onnx
    qcompile out/demo/resnet18.onnx -o out/demo/resnet18-int8
    qcompile eval out/demo/resnet18.onnx out/demo/resnet18-int8 --num-samples 32
    qcompile bench out/demo/resnet18-int8 --repeat 20
    qcompile out/demo/resnet18.onnx -o out/demo/resnet18-mixed --budget-size 0.5 --sensitivity kl

The weights are seeded random (no download), so accuracy means nothing here; the demo
shows bit-exactness, the integer-only check, agreement with FP32 and latency.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

from qcompile import api
from qcompile.frontend import zoo
from qcompile.config import AllocSpec, CalibSpec
from qcompile.errors import QCompileError


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str,
                      lineno: int, line: str | None = None) -> str:
    return f"warning: {message}\n"


def _mb(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB"


def _kernels(art: Path) -> str:
    """Which lowering served the layers: our scheduled kernels or TVM's generic one."""
    used = json.loads((art / "manifest.json").read_text()).get("kernels", {}).values()
    n = sum(k != "generic" for k in used)
    return f"scheduled kernels on {n} of {len(used)} ops, TVM generic lowering on the rest"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("out/demo"))
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--calib-samples", type=int, default=32)
    # ~1 s per sample at 224 px on 2 cores (TVM run + NumPy oracle + onnxruntime)
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args(argv)
    warnings.formatwarning = _one_line_warning
    t0 = time.perf_counter()

    # Step 1. A synthetic ResNet-18 (torchvision layout, seeded weights).
    model = zoo.save(zoo.build("resnet18", input_size=args.input_size), args.out / "resnet18.onnx")
    art = args.out / "resnet18-int8"
    print(f"[1/5] wrote {model} ({_mb(model)})", flush=True)

    # Step 2. Compile: calibrate (synthetic data), quantize, lower, build, export.
    res = api.compile_model(model, art, calib=CalibSpec(num_samples=args.calib_samples))
    print(f"[2/5] compiled {art} in {res.compile_seconds:.1f} s", flush=True)

    # Step 3. Fidelity: TVM vs the NumPy oracle (bit-exact) and vs onnxruntime FP32.
    ev = api.evaluate(model, art, num_samples=args.eval_samples)
    print(f"[3/5] evaluated on {ev.num_samples} inputs", flush=True)

    # Step 4. Latency, batch 1, both sides on all cores.
    tvm_ms = api.bench_artifact(art, repeat=args.repeat, warmup=args.warmup)
    ort_ms = api.ort_bench(model, repeat=args.repeat, warmup=args.warmup)
    print("[4/5] benchmarked", flush=True)

    # Step 5. Mixed precision: half-way between all-INT4 and all-INT8 in size, bits per
    # layer from the ILP over output-KL sensitivity (the Hessian takes minutes here).
    mixed = args.out / "resnet18-mixed"
    api.compile_model(model, mixed, calib=CalibSpec(num_samples=args.calib_samples),
                      alloc=AllocSpec(size="0.5", sensitivity="kl"))
    plan = json.loads((mixed / "qconfig.json").read_text())["plan"]
    ev_mixed = api.evaluate(model, mixed, num_samples=min(args.eval_samples, 8))
    mixed_ms = api.bench_artifact(mixed, repeat=args.repeat, warmup=args.warmup)
    print("[5/5] mixed precision\n", flush=True)

    so, npz = art / "module.so", art / "weights.npz"
    rows = [
        ("model", f"ResNet-18 architecture, seeded random weights, "
                  f"1x3x{args.input_size}x{args.input_size}"),
        ("artifact", f"{art} (module.so {_mb(so)}, weights.npz {_mb(npz)})"),
        ("compile", f"{res.compile_seconds:.1f} s, {res.num_layers} conv/dense layers"),
        ("integer-only", "yes (checked on the compiled IR)" if ev.integer_only else "NO"),
        ("bit-exact", f"{'yes' if ev.bit_exact else 'NO'} (TVM vs NumPy oracle, "
                      f"{ev.num_samples} inputs)"),
        ("top-1 agreement", f"{100 * ev.top1_agreement:.1f}% vs onnxruntime FP32 "
                            "(synthetic N(0,1) inputs)"),
        ("output SQNR", f"{ev.sqnr_db:.1f} dB vs onnxruntime FP32"),
        ("latency", f"batch 1, median of {args.repeat}, {os.cpu_count()} threads"),
        ("  qcompile int8", f"{tvm_ms.median_ms:8.2f} ms  ({_kernels(art)})"),
        ("  onnxruntime FP32", f"{ort_ms.median_ms:8.2f} ms"),
        ("mixed 4/8-bit", f"{sum(la['bits'] == 4 for la in plan['layers'])} of "
                          f"{len(plan['layers'])} layers at 4 bits, {plan['size_mb']:.2f} MB "
                          f"(budget {plan['budgets']['size_mb']:.2f} MB), "
                          f"bit-exact {'yes' if ev_mixed.bit_exact else 'NO'}, SQNR "
                          f"{ev_mixed.sqnr_db:.1f} dB, {mixed_ms.median_ms:.2f} ms; "
                          f"see {mixed / 'report.md'}"),
    ]
    print("== qcompile demo ==")
    for k, v in rows:
        print(f"{k:<18} {v}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    ok = all(e.bit_exact and e.integer_only for e in (ev, ev_mixed))
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except QCompileError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
