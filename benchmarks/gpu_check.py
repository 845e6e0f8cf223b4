"""Prepare the GPU check: build, compute the oracle's answers, bundle, print one command.

    python benchmarks/gpu_check.py                    # sm_90 (H100/H200): what `make gpu-check` runs
    python benchmarks/gpu_check.py --arch sm_75       # a user's own T4
    python benchmarks/gpu_check.py --target llvm --input-size 64 --out /tmp/twin
                                                      # the CPU twin (same bundle, llvm artifacts)

Here (no GPU needed): the zoo ResNet-18 and ResNet-50 are compiled for ``--arch``
(INT8 at batch 1 and 8, a ResNet-18 mixed plan at half the INT4-to-INT8 size range,
and ResNet-18 W4A4 for correctness only); the NumPy oracle computes what each must
return on a seeded input; everything is packed with TVM's runtime alone
(``qcompile bundle``), with ``gpu_side.py`` and what it needs to rebuild the float
peers. On the GPU host, ``python3 BUNDLE/gpu_side.py --out DIR`` checks every artifact
bit-exact, times it, times PyTorch FP32/FP16 and onnxruntime's CUDA provider, and
writes ``gpu-<device>-<date>.{json,md}``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_common as bc  # noqa: E402
from gpu_common import INPUT_SEED, check_input, onnx_weights_sha  # noqa: E402

BUNDLE_LIMIT_MIB = 64  # what the device tool carries, the repository included
DEVICE_REPO_MIB = 4    # the repository's own tracked files travel beside the bundle


@dataclass(frozen=True)
class Config:
    name: str
    model: str
    batch: int
    options: tuple[str, ...]
    timed: bool = True  # W4A4 is checked for correctness only (Hopper emulates int4)


CONFIGS: tuple[Config, ...] = (
    Config("resnet18-int8-b1", "resnet18", 1, ("--bits", "8")),
    Config("resnet18-int8-b8", "resnet18", 8, ("--bits", "8")),
    Config("resnet50-int8-b1", "resnet50", 1, ("--bits", "8")),
    Config("resnet50-int8-b8", "resnet50", 8, ("--bits", "8")),
    Config("resnet18-mixed-b1", "resnet18", 1, ("--budget-size", "0.5")),
    Config("resnet18-w4a4-b1", "resnet18", 1, ("--bits", "w4a4"), timed=False),
)


def _qcompile(*args: str) -> None:
    cmd = [sys.executable, "-m", "qcompile.cli", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        tail = (r.stderr or r.stdout).strip().splitlines()
        raise SystemExit(f"error: {' '.join(cmd[3:])} failed (exit {r.returncode}): "
                         f"{tail[-1] if tail else ''}")


def build(cfgs: list[Config], work: Path, target: str, arch: str | None, size: int,
          calib_samples: int) -> dict[str, Path]:
    """Compile each configuration (cached by its options under ``work``)."""
    from qcompile.frontend import zoo

    arts: dict[str, Path] = {}
    for c in cfgs:
        onnx_path = work / f"{c.model}-{size}.onnx"
        if not onnx_path.is_file():
            zoo.save(zoo.build(c.model, input_size=size), onnx_path)
        opts = ["--target", target, *(["--arch", arch] if arch else []), "--batch", str(c.batch),
                "--calib-samples", str(calib_samples), *c.options]
        key = hashlib.sha256(json.dumps([c.name, size, opts]).encode()).hexdigest()[:10]
        out = work / f"{c.name}-{key}"
        if not (out / "manifest.json").is_file():
            t0 = time.perf_counter()
            # no GPU here: the oracle check happens on the GPU host, from the bundle
            _qcompile("compile", str(onnx_path), "-o", str(out), "--no-verify", "-q", *opts)
            print(f"  compiled {c.name} in {time.perf_counter() - t0:.0f} s", flush=True)
        arts[c.name] = out
    return arts


def expected(arts: dict[str, Path], cfgs: list[Config], x: np.ndarray) -> dict[str, np.ndarray]:
    """The oracle's quantized input, integer output and float output, per artifact."""
    from qcompile.verify import oracle
    from qcompile.runtime.run import artifact_qgraph

    out: dict[str, np.ndarray] = {}
    for c in cfgs:
        qg = artifact_qgraph(arts[c.name])
        xb = x[:c.batch]
        q = oracle.quantize_input(qg, xb)
        core = oracle.run_integer(qg, q)["output"]
        out[f"{c.name}/q"], out[f"{c.name}/core"] = q, core
        out[f"{c.name}/main"] = oracle.dequantize_output(qg, core)
    return out


def pack(bundle: Path) -> Path:
    """``bundle`` as ``<bundle>.tar.gz`` beside it, written atomically."""
    import tarfile
    archive = bundle.with_name(bundle.name + ".tar.gz")
    tmp = archive.with_name(archive.name + ".tmp")
    with tarfile.open(tmp, "w:gz", compresslevel=6) as tar:
        tar.add(bundle, arcname=bundle.name)
    tmp.replace(archive)
    return archive


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sm_90", help="CUDA arch of the GPU host (sm_75 for a T4).")
    ap.add_argument("--target", choices=("cuda", "llvm"), default="cuda",
                    help="llvm builds the CPU twin (the same check, runnable here).")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--models", nargs="*", help="Only these configurations (default: all).")
    ap.add_argument("--python", nargs="*", default=["3.12"],
                    help="Python versions the bundle must run under (the GPU host has 3.12).")
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "gpu-check" / "work")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "gpu-check" / "bundle")
    args = ap.parse_args(argv)
    cfgs = [c for c in CONFIGS if not args.models or c.name in args.models]
    if not cfgs:
        ap.error(f"--models: choose from {', '.join(c.name for c in CONFIGS)}")
    arch = args.arch if args.target == "cuda" else None
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"building {len(cfgs)} artifacts for {args.target} {arch or ''} in {args.work}", flush=True)
    arts = build(cfgs, args.work, args.target, arch, args.input_size, args.calib_samples)
    x = check_input(max(c.batch for c in cfgs), args.input_size)
    print("computing the oracle's outputs", flush=True)
    exp = expected(arts, cfgs, x)
    stage = args.work / "stage"
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "peers" / "qcompile").mkdir(parents=True)
    np.savez_compressed(stage / "expected.npz", **exp)
    models = {c.model for c in cfgs}
    plan = {"created": time.strftime("%Y-%m-%d %H:%M"), "target": args.target, "arch": arch,
            "input": {"seed": INPUT_SEED, "shape": list(x.shape),
                      "sha256": hashlib.sha256(x.tobytes()).hexdigest()},
            "peers": {m: {"zoo": m, "input_size": args.input_size,
                          "weights_sha256": onnx_weights_sha(args.work / f"{m}-{args.input_size}.onnx")}
                      for m in sorted(models)},
            "configs": [{"name": c.name, "model": c.model, "batch": c.batch,
                         "options": list(c.options), "timed": c.timed} for c in cfgs],
            # the build's commit and versions: the GPU side records them beside its own
            "provenance": bc.provenance(None if argv is None else [__file__, *argv])}
    (stage / "plan.json").write_text(json.dumps(plan, indent=1))
    # zoo.py's packages (empty), zoo.py and the one module it imports, no more
    (stage / "peers" / "qcompile" / "__init__.py").write_text("")
    extra = {"check/expected.npz": stage / "expected.npz", "check/plan.json": stage / "plan.json",
             "peers/qcompile/__init__.py": stage / "peers" / "qcompile" / "__init__.py",
             "peers/qcompile/frontend/__init__.py": stage / "peers" / "qcompile" / "__init__.py"}
    for f in ("frontend/zoo.py", "errors.py"):
        extra[f"peers/qcompile/{f}"] = ROOT / "qcompile" / f
    for f in ("gpu_side.py", "gpu_common.py", "onnx_torch.py", "bench_common.py"):
        extra[f] = ROOT / "benchmarks" / f

    from qcompile.runtime.bundle import make_bundle
    # The bundle names its models after their folders: stage them under the config names.
    named = stage / "arts"
    named.mkdir()
    for c in cfgs:
        (named / c.name).symlink_to(arts[c.name].resolve(), target_is_directory=True)
    rep = make_bundle([named / c.name for c in cfgs], args.out, pythons=args.python, extra=extra)
    mib = rep.total_bytes / 2 ** 20
    print(f"bundle {rep.out}: {mib:.1f} MiB (runtime {rep.runtime_bytes / 2**20:.1f}, weights "
          f"{rep.weights_bytes / 2**20:.1f}), Python {', '.join(rep.pythons)}")
    # What travels is one archive: the libraries and modules compress about 2x.
    archive = pack(rep.out)
    amib = archive.stat().st_size / 2 ** 20
    print(f"archive {archive}: {amib:.1f} MiB; built in {time.perf_counter() - t0:.0f} s")
    if amib + DEVICE_REPO_MIB > BUNDLE_LIMIT_MIB:
        print(f"error: the archive is {amib:.1f} MiB; with the repository it exceeds the "
              f"{BUNDLE_LIMIT_MIB} MiB a device call carries", file=sys.stderr)
        return 1
    rel = archive.resolve().relative_to(ROOT) if archive.resolve().is_relative_to(ROOT) else archive
    cmd = (f"mkdir -p /tmp/qc && tar xzf {rel} -C /tmp/qc && "
           f"python3 /tmp/qc/{rep.out.name}/gpu_side.py --out")
    print("\nOn the GPU host (one command, under 8 minutes):")
    print(f"  {cmd} OUT_DIR")
    print(f"With the device tool: run(command='{cmd} $OUT', carry=['{rel}'], timeout_s=540); "
          "copy OUT's gpu-*.{json,md} to benchmarks/results/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
