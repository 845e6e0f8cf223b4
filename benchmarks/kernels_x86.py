"""GOPS of the AVX-512 VNNI kernels (qcompile/targets/x86/vnni.py) vs onnxruntime INT8.

    python benchmarks/kernels_x86.py                 # GEMM 256^3, RN50 fc + all convs
    python benchmarks/kernels_x86.py --quick         # 256^3, fc + 6 representative convs
    python benchmarks/kernels_x86.py --im2col        # adds the explicit-im2col variant
    python benchmarks/kernels_x86.py --threads 1     # both sides on one thread
    python benchmarks/kernels_x86.py --quick --int4  # adds int4-weight columns
    python benchmarks/kernels_x86.py --quick --int4 --cold  # weights flushed per call

GOPS = 2*M*N*K / median time.  Each row times, round-robin so that machine noise
hits all alike: our kernel (``time_evaluator``, 1 call per sample x ``--number``)
and the same op in onnxruntime 1.32 with the same threads: ``MatMulInteger``
(u8 x s8 -> s32) for the GEMM, ``com.microsoft.QLinearConv`` with channels_last=1
(uint8 NHWC in and out, per-channel int8 weights) for convs.  ORT's numbers include
its ~10 us Python ``run()`` overhead.  The "ceiling" row is our own register tile
on cached data on one thread, times the thread count.  Also reports the
count-weighted sum over ResNet-50 (224 px, batch 1) of all its convs.

``--int4`` also times each GEMM/conv with 4-bit weights (``w_bits=4``: two nibbles a
byte, unpacked in-kernel), interleaved with the int8 kernel, and reports int8 time /
int4 time (> 1: int4 faster) and where the int4 kernel unpacks ("tile" / "prologue",
see qcompile/targets/x86/int4.py). ``--cold`` flushes every argument but the activation (weights,
bias, requant params, output) from the caches before each call (TVM's
``cache_flush_cpu_non_first_arg``): the weights then come from DRAM, as in a batch-1
network whose weights outgrow the caches; ORT stays warm.

TVM's thread pool defaults to hardware_concurrency/2 threads on x86 (1 on this
2-core VM), so this script sets TVM_NUM_THREADS (``--threads``, default all cores)
before importing TVM.  TVM splits a parallel loop statically, so a busy core
halves a 2-thread time: the load average is printed before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

if "--threads" in sys.argv:  # must precede `import tvm`: the pool reads it once
    os.environ["TVM_NUM_THREADS"] = sys.argv[sys.argv.index("--threads") + 1]
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import tvm  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import bench_common as bc  # noqa: E402

from qcompile.targets.x86 import vnni as V  # noqa: E402
from qcompile.hw.backends import make_target  # noqa: E402
from qcompile.hw.facts import has_vnni  # noqa: E402

THREADS = int(os.environ["TVM_NUM_THREADS"])
# ResNet-50 v1.5 (torchvision) convs at 224 px: (H, C, OC, k, stride, count in the network).
RESNET50 = [
    ("stem 7x7/2", 224, 3, 64, 7, 2, 1),
    ("l1 1x1 64>64", 56, 64, 64, 1, 1, 1), ("l1 3x3 64", 56, 64, 64, 3, 1, 3),
    ("l1 1x1 64>256", 56, 64, 256, 1, 1, 4), ("l1 1x1 256>64", 56, 256, 64, 1, 1, 2),
    ("l2 1x1 256>128", 56, 256, 128, 1, 1, 1), ("l2 3x3/2 128", 56, 128, 128, 3, 2, 1),
    ("l2 1x1 128>512", 28, 128, 512, 1, 1, 4), ("l2 ds 1x1/2 256>512", 56, 256, 512, 1, 2, 1),
    ("l2 1x1 512>128", 28, 512, 128, 1, 1, 3), ("l2 3x3 128", 28, 128, 128, 3, 1, 3),
    ("l3 1x1 512>256", 28, 512, 256, 1, 1, 1), ("l3 3x3/2 256", 28, 256, 256, 3, 2, 1),
    ("l3 1x1 256>1024", 14, 256, 1024, 1, 1, 6), ("l3 ds 1x1/2 512>1024", 28, 512, 1024, 1, 2, 1),
    ("l3 1x1 1024>256", 14, 1024, 256, 1, 1, 5), ("l3 3x3 256", 14, 256, 256, 3, 1, 5),
    ("l4 1x1 1024>512", 14, 1024, 512, 1, 1, 1), ("l4 3x3/2 512", 14, 512, 512, 3, 2, 1),
    ("l4 1x1 512>2048", 7, 512, 2048, 1, 1, 3), ("l4 ds 1x1/2 1024>2048", 14, 1024, 2048, 1, 2, 1),
    ("l4 1x1 2048>512", 7, 2048, 512, 1, 1, 2), ("l4 3x3 512", 7, 512, 512, 3, 1, 2),
]
QUICK = {"stem 7x7/2", "l1 3x3 64", "l1 1x1 64>256", "l1 1x1 256>64", "l2 3x3/2 128",
         "l4 1x1 512>2048"}


def _tvm_timer(f: tvm.tirx.PrimFunc, args: list[np.ndarray], number: int,
               cold: bool = False) -> Callable[[], float]:
    lib = tvm.compile(tvm.IRModule({"main": f}), target=make_target("llvm", THREADS))
    ts = [tvm.runtime.tensor(a) for a in args]
    if cold:  # one call per repeat, each after flushing all args but the activation
        ev = lib.mod.time_evaluator("main", tvm.cpu(), number=1, repeat=number,
                                    f_preproc="cache_flush_cpu_non_first_arg")
    else:
        ev = lib.mod.time_evaluator("main", tvm.cpu(), number=number, repeat=1)
    return lambda: ev(*ts).mean


def _ort_timer(model: bytes, feed: dict[str, np.ndarray], number: int) -> Callable[[], float]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])

    def run() -> float:
        t = time.perf_counter()
        for _ in range(number):
            sess.run(None, feed)
        return (time.perf_counter() - t) / number
    return run


def _model(node: object, inputs: list, outputs: list, inits: list,
           domains: dict[str, int]) -> bytes:
    g = helper.make_graph([node], "op", inputs, outputs, inits)
    ops = [helper.make_opsetid(d, v) for d, v in domains.items()]
    return helper.make_model(g, opset_imports=ops).SerializeToString()


def _io(name: str, dtype: int, shape: list[int]) -> object:
    return helper.make_tensor_value_info(name, dtype, shape)


def ort_conv(h: int, c: int, oc: int, k: int, s: int, w: np.ndarray) -> bytes:
    """uint8 NHWC -> uint8 NHWC QLinearConv, per-channel int8 weights."""
    p = k // 2
    oh = (h + 2 * p - k) // s + 1
    consts = {"xs": np.array(0.05, np.float32), "xz": np.array(0, np.uint8), "w": w,
              "ws": np.full(oc, 0.01, np.float32), "wz": np.zeros(oc, np.int8),
              "ys": np.array(0.1, np.float32), "yz": np.array(0, np.uint8),
              "b": np.zeros(oc, np.int32)}
    node = helper.make_node("QLinearConv", ["x", *consts], ["y"], domain="com.microsoft",
                            channels_last=1, kernel_shape=[k, k], strides=[s, s], pads=[p] * 4)
    return _model(node, [_io("x", TensorProto.UINT8, [1, h, h, c])],
                  [_io("y", TensorProto.UINT8, [1, oh, oh, oc])],
                  [numpy_helper.from_array(v, n) for n, v in consts.items()],
                  {"": 17, "com.microsoft": 1})


def ort_matmul(m: int, n: int, k: int, w: np.ndarray) -> bytes:
    """u8 x s8 -> s32 MatMulInteger with w (N, K) as the constant (K, N) operand."""
    node = helper.make_node("MatMulInteger", ["a", "w"], ["y"])
    return _model(node, [_io("a", TensorProto.UINT8, [m, k])],
                  [_io("y", TensorProto.INT32, [m, n])],
                  [numpy_helper.from_array(np.ascontiguousarray(w.T), "w")], {"": 17})


def _medians(timers: dict[str, Callable[[], float]], repeat: int) -> dict[str, float]:
    """Median seconds per call. Our variants are interleaved round-robin; ORT runs in
    its own phase: its idle workers busy-spin after run(), and interleaved with TVM's
    pool they took the second core and made TVM's 2-thread times 10x slower."""
    groups = [{k: t for k, t in timers.items() if k != "ort"},
              {k: t for k, t in timers.items() if k == "ort"}]
    out: dict[str, float] = {}
    for group in groups:
        time.sleep(0.05)  # let the other pool's spinning workers go to sleep
        for t in group.values():
            t()  # warm-up (the first call also starts the thread pool)
        samples: dict[str, list[float]] = {k: [] for k in group}
        for _ in range(repeat):
            for k, t in group.items():
                samples[k].append(t())
        out.update({k: float(np.median(v)) for k, v in samples.items()})
    return out


def _q(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    s = np.full(n, 20, np.int64)
    return [rng.integers(1, 2**20, n).astype(np.int64), 1 << (s - 1), s]


def _w4(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(-8, 8, shape).astype(np.int8)


def _unpack_of(f: tvm.tirx.PrimFunc) -> str:
    """Where an int4 kernel unpacks (x86_int4.unpack_mode): its default, read off the IR."""
    return "prologue" if "w_unpack" in f.script() else "tile"


# GEMMs: (name, shape, M, N, K, count in RN50, with a requant row). The fc is ResNet-50's
# classifier at batch 1 (raw logits): one row of activations, weight-bound.
GEMMS = [("GEMM", "256^3", 256, 256, 256, "-", True),
         ("fc (batch 1)", "1x2048>1000", 1, 1000, 2048, "1", False)]


def bench_gemm(spec: tuple, rng: np.random.Generator, repeat: int, number: int, ort_on: bool,
               int4: bool, cold: bool) -> dict:
    name, shape, m, n, k, count, requant = spec
    a = rng.integers(0, 256, (m, k)).astype(np.uint8)
    w = rng.integers(-128, 128, (n, k)).astype(np.int8)
    packed = {8: V.pack_weights(w), 4: V.pack_weights_int4(_w4(rng, (n, k)))}
    q = _q(rng, n)
    timers = {}
    for bits in (8, 4) if int4 else (8,):
        head, tag = [a, packed[bits], np.zeros(n, np.int32)], "" if bits == 8 else "_int4"
        timers["raw" + tag] = _tvm_timer(V.dense_vnni(m, n, k, raw=True, w_bits=bits),
                                         [*head, np.zeros((m, n), np.int32)], number, cold)
        if requant:
            timers["requant" + tag] = _tvm_timer(
                V.dense_vnni(m, n, k, out_dtype="uint8", w_bits=bits),
                [*head, *q, np.zeros((m, n), np.uint8)], number, cold)
    if ort_on:
        timers["ort"] = _ort_timer(ort_matmul(m, n, k, w), {"a": a}, number)
    return {"name": name, "shape": shape, "count": count, "ops": 2 * m * n * k,
            "int4_unpack": _unpack_of(V.dense_vnni(m, n, k, raw=True, w_bits=4)),
            "t": _medians(timers, repeat)}


def bench_ceiling(repeat: int, w_bits: int = 8) -> float:
    """GOPS of one default register tile (7 x 32 for N = 32) over K = 1024 on one thread:
    operands stay in L1/L2, so this is the loop's compute ceiling, not a memory one."""
    rng = np.random.default_rng(0)
    tile = V.gemm_tile(7, 32, 1024)
    m, n, k = tile.mr, 16 * tile.nb, 1024
    w = _w4(rng, (n, k))
    args = [rng.integers(0, 256, (m, k)).astype(np.uint8),
            V.pack_weights(w) if w_bits == 8 else V.pack_weights_int4(w),
            np.zeros(n, np.int32), np.zeros((m, n), np.int32)]
    f = V.dense_vnni(m, n, k, raw=True, tile=tile, w_bits=w_bits)
    t = _medians({"c": _tvm_timer(f, args, 2000)}, repeat)["c"]
    return 2 * m * n * k / t / 1e9


def bench_conv(row: tuple, rng: np.random.Generator, repeat: int, number: int, ort_on: bool,
               im2col: bool, int4: bool, cold: bool) -> dict:
    name, h, c, oc, k, s, count = row
    p = k // 2
    oh = (h + 2 * p - k) // s + 1
    x = rng.integers(0, 256, (1, h, h, c)).astype(np.uint8)
    w = rng.integers(-127, 128, (oc, c, k, k)).astype(np.int8)
    args = [x, V.pack_conv_weights(w), np.zeros(oc, np.int32), *_q(rng, oc),
            np.zeros((1, oh, oh, oc), np.uint8)]
    timers = {}
    for variant in ("implicit", "im2col") if im2col else ("implicit",):
        f = V.conv2d_nhwc_vnni(1, h, h, c, oc, k, k, (s, s), (p,) * 4, out_dtype="uint8",
                               im2col=variant == "im2col")
        timers[variant] = _tvm_timer(f, args, number, cold)
    if int4:
        f = V.conv2d_nhwc_vnni(1, h, h, c, oc, k, k, (s, s), (p,) * 4, out_dtype="uint8",
                               w_bits=4)
        args4 = [x, V.pack_conv_weights_int4(_w4(rng, w.shape)), *args[2:]]
        timers["int4"] = _tvm_timer(f, args4, number, cold)
    if ort_on:
        timers["ort"] = _ort_timer(ort_conv(h, c, oc, k, s, w), {"x": x}, number)
    return {"name": name, "shape": f"{h}x{h}x{c}>{oc} k{k}s{s}", "count": count,
            "ops": 2 * oh * oh * oc * c * k * k,
            "int4_unpack": _unpack_of(V.conv2d_nhwc_vnni(1, h, h, c, oc, k, k, (s, s), (p,) * 4,
                                                         w_bits=4)),
            "t": _medians(timers, repeat)}


def table(gemms: list[dict], convs: list[dict], ceiling: dict[int, float],
          cols: list[str]) -> str:
    """Markdown: ms and GOPS per variant in ``cols``, ORT time / our time, and int8 time /
    int4 time with the int4 kernel's unpack mode."""
    head = ["op", "shape", "x in RN50"] + [f"{c} {u}" for c in cols for u in ("ms", "GOPS")]
    head += ["ORT / ours"] if "ort" in cols else []
    head += ["int8 / int4"] if "int4" in cols else []
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]

    def row(name: str, shape: str, count: str, ops: int, t: dict[str, float],
            mode: str = "") -> None:
        cells = [name, shape, count]
        for c in cols:
            cells += [f"{t[c] * 1e3:.3f}", f"{ops / t[c] / 1e9:.0f}"] if c in t else ["-", "-"]
        if "ort" in cols:
            cells.append(f"{t['ort'] / t['implicit']:.2f}" if "ort" in t else "-")
        if "int4" in cols:
            cells.append(f"{t['implicit'] / t['int4']:.2f}" + (f" ({mode})" if mode else ""))
        lines.append("| " + " | ".join(cells) + " |")

    for g in gemms:
        t = g["t"]
        for kind, label in (("raw", "raw int32"), ("requant", "requant u8")):
            if kind in t:
                ts = {"implicit": t[kind]}
                ts |= {"int4": t[kind + "_int4"]} if kind + "_int4" in t else {}
                ts |= {"ort": t["ort"]} if kind == "raw" and "ort" in t else {}
                row(f"{g['name']} {label}", g["shape"], g["count"], g["ops"], ts, g["int4_unpack"])
    for r in convs:
        row(r["name"], r["shape"], str(r["count"]), r["ops"], r["t"], r["int4_unpack"])
    total = {c: sum(r["count"] * r["t"][c] for r in convs) for c in cols}
    row("**sum of convs**", "count-weighted", str(sum(r["count"] for r in convs)),
        sum(r["count"] * r["ops"] for r in convs), total)
    for bits, c in ceiling.items():
        what = "int8 weights" if bits == 8 else "int4 weights unpacked per tile"
        lines.append(f"\nVNNI ceiling, {what} (one register tile, cached data): "
                     f"{c:.0f} GOPS/thread, {c * THREADS:.0f} GOPS at {THREADS} threads.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=25, help="samples per op (median)")
    ap.add_argument("--number", type=int, default=5, help="calls per sample")
    ap.add_argument("--quick", action="store_true", help="only 6 representative convs")
    ap.add_argument("--im2col", action="store_true", help="also time the explicit im2col variant")
    ap.add_argument("--int4", action="store_true", help="also time int4 (packed) weights")
    ap.add_argument("--cold", action="store_true",
                    help="flush weights/params/output from the caches before each call")
    ap.add_argument("--no-ort", action="store_true")
    ap.add_argument("--threads", type=int, default=THREADS, help="TVM and ORT threads")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    if not has_vnni():
        sys.exit("this CPU lacks avx512_vnni: nothing to benchmark")
    rng = np.random.default_rng(0)
    ort_on = not args.no_ort
    ceiling = {b: bench_ceiling(args.repeat, b) for b in ((8, 4) if args.int4 else (8,))}
    gemms = [bench_gemm(g, rng, args.repeat, args.number * 10, ort_on, args.int4, args.cold)
             for g in GEMMS]
    convs = []
    for r in RESNET50:
        if args.quick and r[0] not in QUICK:
            continue
        convs.append(bench_conv(r, rng, args.repeat, args.number, ort_on, args.im2col,
                                args.int4, args.cold))
        print(json.dumps(convs[-1]), file=sys.stderr, flush=True)
    cols = (["implicit"] + (["im2col"] if args.im2col else []) + (["int4"] if args.int4 else [])
            + (["ort"] if ort_on else []))
    prov = bc.provenance(ort_threads=THREADS if ort_on else None)
    md = (table(gemms, convs, ceiling, cols) + "\n\n"
          f"{'Cold (weights flushed per call)' if args.cold else 'Warm caches'}, 1-min load average "
          f"{load0:.2f} before, {os.getloadavg()[0]:.2f} after.\n\n{bc.provenance_line(prov)}")
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d")
    tag = ("-int4" if args.int4 else "") + ("-cold" if args.cold else "")
    (args.out / f"kernels-x86-{stamp}-t{THREADS}{tag}.md").write_text(md + "\n")
    result = {"provenance": prov, "threads": THREADS, "load_avg": [load0, os.getloadavg()[0]],
              "cold": args.cold,
              "ceiling_gops_per_thread": ceiling[8], "gemms": gemms, "convs": convs}
    if args.int4:
        result["ceiling_int4_gops_per_thread"] = ceiling[4]
    (args.out / f"kernels-x86-{stamp}-t{THREADS}{tag}.json").write_text(
        json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
