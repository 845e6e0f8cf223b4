"""The GPU side of `make gpu-check`; runs from the bundle with Python 3, numpy (and, for the
peers, torch, onnx and onnxruntime when present). Never imports qcompile or a TVM wheel.

    python3 BUNDLE/gpu_side.py --out DIR                 # on the GPU host
    python3 BUNDLE/gpu_side.py --out DIR --device cpu    # the dry run, on a CPU twin bundle

1. Every artifact runs through the bundle's runtime-only loader on the check input:
   ``quantize`` and ``core`` must equal the NumPy oracle's answers bit for bit.
2. Each timed artifact: median (and p90) of --repeat runs after --warmup (TVM's
   time_evaluator, which synchronizes the device per run).
3. In a separate process (so cuDNN and TVM never share one), the float peers, rebuilt
   from the zoo with the same weights (their fingerprint is checked): PyTorch FP32 and
   FP16 (cuDNN, channels_last, benchmark mode; FP16 also as a CUDA graph), and
   onnxruntime's CUDA provider when it is installed.
Writes ``gpu-<device>-<date>.{json,md}`` in --out; exits 1 if any artifact is not bit-exact.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_common import ORT_DEFAULT_THREADS, provenance, provenance_line  # noqa: E402
from gpu_common import check_input, onnx_weights_sha  # noqa: E402


def _stats(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
            "min_ms": float(ms.min()), "runs": len(ms)}


# ----------------------------------------------------------------------------- ours
def check_artifacts(plan: dict, device: str, repeat: int, warmup: int) -> list[dict]:
    import run  # the bundle's loader: runtime-only TVM from BUNDLE/runtime
    import tvm

    size = plan["input"]["shape"][-1]
    x = check_input(plan["input"]["shape"][0], size)
    exp = np.load(HERE / "check" / "expected.npz")
    rows = []
    for c in plan["configs"]:
        name, xb = c["name"], x[:c["batch"]]
        row: dict = {"name": name, "model": c["model"], "batch": c["batch"], "timed": c["timed"]}
        try:
            m = run.load(name)
            kind = m.manifest["target"]["kind"]
            if (kind == "cuda") != (device == "cuda"):
                raise RuntimeError(f"{name} is a {kind} artifact; this run is --device {device}")
            q = m.quantize(xb)
            core = m.run_core(exp[f"{name}/q"])
            main = m.run(xb)
            row["quantize_exact"] = bool(np.array_equal(q, exp[f"{name}/q"]))
            row["core_exact"] = bool(np.array_equal(core, exp[f"{name}/core"]))
            row["bit_exact"] = row["quantize_exact"] and row["core_exact"]
            row["main_max_abs_diff"] = float(np.abs(main - exp[f"{name}/main"]).max())
            if c["timed"]:
                r = m.bench(c["batch"], repeat=repeat, warmup=warmup)
                row.update(median_ms=r["median_ms"], p90_ms=r["p90_ms"], min_ms=r["min_ms"])
            del m
        except Exception as e:  # noqa: BLE001 -- one failure must not lose the other rows
            row.update(bit_exact=False, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        gc.collect()
        row["tvm"] = {"runtime_only": bool(tvm.base._RUNTIME_ONLY),
                      "from_bundle": Path(tvm.__file__).resolve().is_relative_to(HERE)}
        rows.append(row)
        print(f"  {name}: {'bit-exact' if row['bit_exact'] else 'NOT bit-exact'}"
              + (f", {row['median_ms']:.3f} ms" if "median_ms" in row else "")
              + (f" ({row['error']})" if "error" in row else ""), flush=True)
    return rows


# ----------------------------------------------------------------------------- peers
def _time(fn, sync, repeat: int, warmup: int) -> dict:
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return _stats(out)


def _torch_rows(model, size: int, batches: list[int], device: str, repeat: int, warmup: int) -> dict:
    import torch
    from onnx_torch import OnnxModule

    torch.backends.cudnn.benchmark = True
    dev = torch.device(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    net = OnnxModule(model).eval().to(dev).to(memory_format=torch.channels_last)
    res: dict = {}
    for b in batches:
        x = torch.from_numpy(check_input(b, size)).to(dev).to(memory_format=torch.channels_last)
        for label, dtype in (("torch_fp32", torch.float32), ("torch_fp16", torch.float16)):
            if dtype == torch.float16 and device != "cuda":
                continue  # CPU FP16 convs are no one's deployment; the dry run skips them
            n, xi = net.to(dtype), x.to(dtype)
            with torch.inference_mode():
                res[f"{label}/b{b}"] = _time(lambda: n(xi), sync, repeat, warmup)
                if device == "cuda" and dtype == torch.float16:
                    res[f"torch_fp16_graph/b{b}"] = _cuda_graph(n, xi, repeat, warmup)
        net = net.to(torch.float32)
    return res


def _cuda_graph(net, x, repeat: int, warmup: int) -> dict | str:
    import torch
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                net(x)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            net(x)
        return _time(g.replay, torch.cuda.synchronize, repeat, warmup)
    except Exception as e:  # noqa: BLE001
        return f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _ort_rows(model_for_batch, batches: list[int], size: int, device: str, repeat: int,
              warmup: int) -> dict:
    import onnxruntime as ort
    provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        return {"ort": f"absent: onnxruntime {ort.__version__} has no {provider}"}
    res: dict = {}
    for b in batches:
        s = ort.InferenceSession(model_for_batch(b).SerializeToString(), providers=[provider])
        feed = {s.get_inputs()[0].name: check_input(b, size)}
        res[f"ort_fp32/b{b}"] = _time(lambda: s.run(None, feed), lambda: None, repeat, warmup)
        del s
    return res


def peers(plan: dict, device: str, repeat: int, warmup: int) -> dict:
    """Float peers for each model of the plan (run in a child process: see run_peers)."""
    sys.path.insert(0, str(HERE / "peers"))
    out: dict = {}
    for model, p in plan["peers"].items():
        from qcompile.frontend import zoo  # the bundled copy of qcompile/zoo.py (numpy + onnx)
        size = p["input_size"]
        batches = sorted({c["batch"] for c in plan["configs"] if c["model"] == model and c["timed"]})
        build = lambda b: zoo.build(p["zoo"], input_size=size, batch=b)  # noqa: E731
        tmp = HERE / "check" / f".{model}.onnx"
        zoo.save(build(1), tmp)
        r: dict = {"weights_match": onnx_weights_sha(tmp) == p["weights_sha256"]}
        tmp.unlink()
        for label, fn in (("torch", lambda: _torch_rows(build(1), size, batches, device, repeat, warmup)),
                          ("ort", lambda: _ort_rows(build, batches, size, device, repeat, warmup))):
            try:
                r.update(fn())
            except ImportError as e:
                r[label] = f"absent: {e}"
            except Exception as e:  # noqa: BLE001
                r[label] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        out[model] = r
        print(f"  peers for {model}: " + ", ".join(
            f"{k} {v['median_ms']:.3f} ms" if isinstance(v, dict) else f"{k}: {v}"
            for k, v in r.items() if k != "weights_match"), flush=True)
    return out


def run_peers(device: str, repeat: int, warmup: int) -> dict:
    tmp = HERE / "check" / ".peers.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, __file__, "--peers-only", str(tmp), "--device", device,
                        "--repeat", str(repeat), "--warmup", str(warmup)], env=env)
    if r.returncode or not tmp.is_file():
        return {"error": f"the peer process exited {r.returncode}"}
    res = json.loads(tmp.read_text())
    tmp.unlink()
    return res


# ----------------------------------------------------------------------------- report
def device_name(device: str) -> str:
    if device == "cuda":
        try:
            r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
            if r.returncode == 0 and r.stdout.strip():
                return r.stdout.strip().splitlines()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
        return "unknown NVIDIA GPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def _ms(v) -> str:
    return f"{v['median_ms']:.3f}" if isinstance(v, dict) and "median_ms" in v else "n/a"


def _ratio(a, b) -> float | None:
    ok = isinstance(a, dict) and isinstance(b, dict) and "median_ms" in a and "median_ms" in b
    return b["median_ms"] / a["median_ms"] if ok else None


def markdown(res: dict) -> str:
    peer_name = "CUDA" if res["device_kind"] == "cuda" else "CPU"
    lines = [f"**GPU check: {res['device']}** ({res['date']}, bundle for {res['plan']['target']} "
             f"{res['plan']['arch'] or ''}, Python {res['python']})", "",
             "| artifact | batch | bit-exact (quantize, core) | main max abs diff vs oracle | qcompile ms median (p90) "
             f"| PyTorch FP32 ms | PyTorch FP16 ms | PyTorch FP16 CUDA graph ms | onnxruntime {peer_name} FP32 ms "
             "| speedup vs PyTorch FP16 | vs FP16 graph |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["artifacts"]:
        p = res["peers"].get(r["model"], {}) if r["timed"] else {}
        b = f"b{r['batch']}"
        ours = {"median_ms": r["median_ms"]} if "median_ms" in r else None
        s16, g16 = _ratio(ours, p.get(f"torch_fp16/{b}")), _ratio(ours, p.get(f"torch_fp16_graph/{b}"))
        exact = "yes" if r["bit_exact"] else f"**no** {r.get('error', '')}"
        t = f"{r['median_ms']:.3f} ({r['p90_ms']:.3f})" if "median_ms" in r else "correctness only"
        lines.append(f"| {r['name']} | {r['batch']} | {exact} | {r.get('main_max_abs_diff', 'n/a')} | {t} "
                     f"| {_ms(p.get(f'torch_fp32/{b}'))} | {_ms(p.get(f'torch_fp16/{b}'))} "
                     f"| {_ms(p.get(f'torch_fp16_graph/{b}'))} | {_ms(p.get(f'ort_fp32/{b}'))} "
                     f"| {f'{s16:.2f}x' if s16 else 'n/a'} | {f'{g16:.2f}x' if g16 else 'n/a'} |")
    lines += ["", *(f"- {t['what']}: {t['value']} ({'met' if t['met'] else 'NOT met'})" for t in res["targets"])]
    for m, p in res["peers"].items():
        notes = [f"{k}: {v}" for k, v in p.items() if isinstance(v, str)]
        lines.append(f"- {m} peers: same weights as the artifacts: {'yes' if p.get('weights_match') else 'NO'}"
                     + (f"; {'; '.join(notes)}" if notes else ""))
    lines += [f"- Timing: {res['repeat']} runs after {res['warmup']} warm-up; qcompile through TVM's "
              "runtime-only time_evaluator (device sync per run), the peers with a device sync per run.",
              "- PyTorch: the zoo ONNX rebuilt as torch.nn (BatchNorm folded into the convs), eval mode, "
              "inference_mode, channels_last, cudnn.benchmark.", f"- {provenance_line(res['provenance'])}", ""]
    return "\n".join(lines)


def targets(res: dict) -> list[dict]:
    out = []
    for r in res["artifacts"]:
        if r["name"] not in ("resnet50-int8-b8", "resnet50-int8-b1") or "median_ms" not in r:
            continue
        p16 = res["peers"].get("resnet50", {}).get(f"torch_fp16/b{r['batch']}")
        s = _ratio({"median_ms": r["median_ms"]}, p16)
        need = 1.5 if r["batch"] == 8 else 1.0
        out.append({"what": f"ResNet-50 INT8 batch {r['batch']} speedup over PyTorch FP16 (need >= {need}x)",
                    "value": f"{s:.2f}x" if s else "n/a", "met": bool(s and s >= need)})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="Folder for gpu-<device>-<date>.{json,md}.")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--peers-only", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    plan = json.loads((HERE / "check" / "plan.json").read_text())
    if args.peers_only:
        args.peers_only.write_text(json.dumps(peers(plan, args.device, args.repeat, args.warmup)))
        return 0
    if args.out is None:
        ap.error("--out DIR is required")
    t0 = time.perf_counter()
    dev = device_name(args.device)
    print(f"checking {len(plan['configs'])} artifacts on {dev}", flush=True)
    res = {"device": dev, "device_kind": args.device, "date": time.strftime("%Y-%m-%d"),
           "python": platform.python_version(), "numpy": np.__version__, "plan": plan,
           "repeat": args.repeat, "warmup": args.warmup,
           "bundle": json.loads((HERE / "bundle.json").read_text())}
    res["artifacts"] = check_artifacts(plan, args.device, args.repeat, args.warmup)
    res["peers"] = {} if args.no_peers else run_peers(args.device, args.repeat, args.warmup)
    res["targets"] = targets(res)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    # No checkout here: the commit is the build's (plan.json); never import the compiler.
    res["provenance"] = provenance(None if argv is None else [__file__, *argv], kernel_flags=False,
                                   ort_threads=None if args.no_peers else ORT_DEFAULT_THREADS,
                                   built=plan.get("provenance"))
    slug = re.sub(r"[^a-z0-9]+", "-", dev.split(",")[0].lower()).strip("-")[:40]
    stem = f"gpu-{slug}-{res['date']}" if args.device == "cuda" else f"gpu-dryrun-{res['date']}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    md = markdown(res)
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    print(f"wrote {args.out / stem}.{{json,md}} in {res['seconds']} s")
    bad = [r["name"] for r in res["artifacts"] if not r["bit_exact"]]
    if bad:
        print(f"error: not bit-exact: {', '.join(bad)}", file=sys.stderr)
    stray = [r["name"] for r in res["artifacts"] if not all(r["tvm"].values())]
    if stray:  # the point is to run without a TVM install: a system TVM proves nothing
        print(f"error: ran on a TVM outside the bundle or with its compiler: {', '.join(stray)}",
              file=sys.stderr)
    return 1 if bad or stray else 0


if __name__ == "__main__":
    sys.exit(main())
