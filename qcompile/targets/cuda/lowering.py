"""CUDA lowering rules and build, per ``--arch`` (targets.CUDA_ARCHS; default the T4's
sm_75): tensor-core kernels plus dlight for the rest.

``cuda_rules(batch)`` maps ``qconv`` (group 1 -> ``conv2d_nhwc_tc``, depthwise ->
``depthwise_conv2d_nhwc``) and ``qdense`` (-> ``dense_tc``) onto the hand-scheduled kernels
of ``qcompile.targets.cuda.tensor_core``; every other op keeps TVM's generic legalization. The rule
takes the mma shape for the layer's width from the kernels' table (``cuda_tc.kernel_mma``)
and keeps the generic lowering where the arch has none; int4 on sm_90 compiles, emulated.

``build_cuda(mod, target)`` is ``build.build`` with the cuda backend's hooks
(``backends/cuda.py``), which differ from the CPU's in three ways:

1. legalization schedules the generic PrimFuncs with dlight's GPU rules (reductions and the
   thread-binding fallback) and leaves our kernels alone (they carry ``tirx.is_scheduled``);
   dlight's ``gpu.Matmul`` is left out: on int8 it picks WMMA and dies in
   ``InjectSoftwarePipeline`` (TVM_NOTES), and no GEMM reaches it here anyway;
2. the device code is compiled *at build time* with nvcc to a fatbin for the target's arch,
   so the exported library loads on a GPU of that arch with no nvcc/NVRTC.

How (2) works in TVM 0.27: ``target.build.cuda`` emits CUDA source and hands it to
``ffi.Module.create.cuda``. When the CUDA runtime library (``libtvm_runtime_cuda.so``) is
loaded, that factory calls the global ``tvm_callback_cuda_compile(source) -> bytes`` and
stores the result as format "cubin" (anything not starting with '/'; the driver's
``cuModuleLoadData`` takes a fatbin too). Without the runtime library the codegen keeps the
source (format "cuda") and the *loading* host must compile it. So we register our nvcc
callback for the duration of the build, and on a machine without a GPU driver we first load
``libtvm_runtime_cuda.so`` against a stub ``libcuda.so.1`` (see ``_cuda_factory``).

3. the second line of evidence is the SASS of that fatbin, not x86 assembly: the core's
   device kernels are scanned for float opcodes (``asmcheck.scan_cuda_binaries``; skipped,
   with a note in the manifest, when cuobjdump/nvdisasm are absent).
"""
from __future__ import annotations

import contextlib
import ctypes
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from qcompile.errors import BuildError
from qcompile.verify.asmcheck import scan_cuda_binaries
from qcompile.verify.intcheck import IntCheckReport
from qcompile.targets.cuda import tensor_core as ct
from qcompile.lower.emit import LowerCtx, Rule
from qcompile.ir.qgraph import QNode
from qcompile.hw.facts import DEFAULT_ARCH, cuda_arch
from qcompile.tvm_compat import SCHEDULED, PrimFunc

R = relax.op

KERNEL_DTYPES = ("uint8", "int8")  # activation dtypes the tensor-core kernels take


# ======== 1. Lowering rules: QNode -> call_tir of a scheduled kernel (or None).


def _vec(a: np.ndarray, dtype: str) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a).reshape(-1).astype(dtype))


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def _epilogue_opts(n: QNode, ctx: LowerCtx) -> dict:
    """The kernel keyword arguments shared by all three kernels (input sign, requant)."""
    raw = bool(n.attrs.get("raw", False))
    opts = dict(a_signed=ctx.dtype(n.inputs[0]) == "int8", raw=raw,
                out_dtype="int32" if raw else ctx.dtype(n.output))
    if not raw:
        opts.update(lo=int(n.attrs["lo"]), hi=int(n.attrs["hi"]))
    return opts


def _epilogue_params(n: QNode, ctx: LowerCtx) -> list[relax.Var]:
    """bias, then m, r, s unless raw: all per output channel, flat, as the kernels take them."""
    out = [ctx.param(f"{n.name}.bias_k", _vec(n.params["bias"], "int32"))]
    if not n.attrs.get("raw", False):
        out += [ctx.param(f"{n.name}.{k}_k", _vec(n.params[k], "int64")) for k in "mrs"]
    return out


def int4_operands(n: QNode, ctx: LowerCtx, k: int) -> bool:
    """Whether a layer runs on the int4 MMA: 4-bit weights *and* a 4-bit input (one width
    per instruction), and a reduction that packs into whole bytes."""
    return (int(n.attrs.get("bits", 8)) == 4 and ctx.qg.tensors[n.inputs[0]].qtype.bits == 4
            and k % 2 == 0)


def pack_nibbles(ctx: LowerCtx, x: relax.Expr, width: int) -> relax.Var:
    """int4-valued bytes (..., width) -> packed bytes (..., width/2), low nibble = even index.

    Integer-only Relax (and, shift, or): the int4 kernels read two values per byte, while
    layers write one per byte; dlight fuses this into one elementwise kernel.
    """
    shape = list(x.ty.shape)
    pairs = ctx.emit(R.reshape(x, shape[:-1] + [width // 2, 2]))
    lo, hi = (ctx.emit(R.squeeze(R.strided_slice(pairs, [len(shape)], [i], [i + 1]), [len(shape)]))
              for i in (0, 1))
    lo = ctx.emit(R.bitwise_and(R.astype(lo, "int32"), relax.const(15, "int32")))
    hi = ctx.emit(R.left_shift(R.bitwise_and(R.astype(hi, "int32"), relax.const(15, "int32")),
                               relax.const(4, "int32")))
    return ctx.emit(R.astype(R.bitwise_or(lo, hi), "uint8"))


def _gemm_kernel(schedule: bool, bits: int, opts: dict, conv: dict | None = None,
                 mnk: tuple[int, int, int] = (0, 0, 0)) -> PrimFunc:
    """The tensor-core conv (``conv`` kwargs) or dense (``mnk``) kernel; ``schedule=False``
    gives its unscheduled compute, which runs anywhere (the CPU check of this lowering)."""
    if schedule:
        func = (ct.conv2d_nhwc_tc(**conv, bits=bits, **opts) if conv
                else ct.dense_tc(*mnk, bits=bits, **opts))
    else:
        q = ct.QuantOpts(bits=bits, **opts)
        func = (ct.conv2d_nhwc_compute(conv["data_shape"], conv["out_channels"], conv["kernel"],
                                       conv["strides"], conv["pads"], conv["dilations"], q)
                if conv else ct.dense_compute(*mnk, q))
    return func.with_attr("qcompile.int4", bits == 4)


Selected = tuple[PrimFunc, list[relax.Var]]


def _conv_tc(n: QNode, ctx: LowerCtx, batch: int, schedule: bool) -> Selected | None:
    """A group-1 conv on the tensor-core implicit GEMM (int4 operands: the 8832 shape)."""
    if n.op != "qconv" or int(n.attrs["group"]) != 1:
        return None
    a, w = n.attrs, n.params["w"]  # w: OIHW
    _, c, h, wd = ctx.qg.tensors[n.inputs[0]].shape
    wk = np.ascontiguousarray(w.transpose(0, 2, 3, 1)).astype(np.int8)  # OIHW -> OHWI
    conv = dict(data_shape=(batch, h, wd, c), out_channels=int(w.shape[0]),
                kernel=(int(w.shape[2]), int(w.shape[3])), strides=tuple(a["strides"]),
                pads=tuple(a["pads"]), dilations=tuple(a["dilations"]))
    bits = 4 if int4_operands(n, ctx, c) else 8
    func = _gemm_kernel(schedule, bits, _epilogue_opts(n, ctx), conv)
    name = f"{n.name}.w_ohwi" + ("_int4" if bits == 4 else "")
    return func, [ctx.param(name, ct.pack_int4(wk) if bits == 4 else wk)] + _epilogue_params(n, ctx)


def _depthwise(n: QNode, ctx: LowerCtx, batch: int, schedule: bool) -> Selected | None:
    """A depthwise conv (no dilation) on the CUDA-core kernel; other groupings: generic."""
    if n.op != "qconv":
        return None
    a, w = n.attrs, n.params["w"]
    _, c, h, wd = ctx.qg.tensors[n.inputs[0]].shape
    if not (int(a["group"]) == c == w.shape[0] and w.shape[1] == 1
            and tuple(a["dilations"]) == (1, 1)):
        return None
    func = ct.depthwise_conv2d_nhwc((batch, h, wd, c), (int(w.shape[2]), int(w.shape[3])),
                                    strides=tuple(a["strides"]), pads=tuple(a["pads"]),
                                    schedule=schedule, **_epilogue_opts(n, ctx))
    wk = np.ascontiguousarray(w[:, 0].transpose(1, 2, 0)).astype(np.int8)  # C1HW -> HWC
    return func, [ctx.param(f"{n.name}.w_hwc", wk)] + _epilogue_params(n, ctx)


def _dense_tc(n: QNode, ctx: LowerCtx, batch: int, schedule: bool) -> Selected | None:
    if n.op != "qdense":
        return None
    w = n.params["w"]  # (K, N)
    k, nout = int(w.shape[0]), int(w.shape[1])
    wk = np.ascontiguousarray(w.T).astype(np.int8)  # dense_tc takes W as (N, K)
    bits = 4 if int4_operands(n, ctx, k) else 8
    func = _gemm_kernel(schedule, bits, _epilogue_opts(n, ctx), mnk=(batch, nout, k))
    name = f"{n.name}.w_nk" + ("_int4" if bits == 4 else "")
    return func, [ctx.param(name, ct.pack_int4(wk) if bits == 4 else wk)] + _epilogue_params(n, ctx)


# The CUDA rule chain, in order: each selector returns None when its kernel does not
# apply, and a node no selector takes keeps the generic lowering (lower.py).
KERNELS: tuple[tuple[str, Callable[[QNode, LowerCtx, int, bool], Selected | None]], ...] = (
    ("cuda_conv_tc", _conv_tc), ("cuda_depthwise", _depthwise), ("cuda_dense_tc", _dense_tc))


def cuda_rules(batch: int, schedule: bool = True, arch: str = DEFAULT_ARCH
               ) -> list[tuple[str, Rule]]:
    """Tensor-core conv/dense and the CUDA-core depthwise kernel for ``arch`` (static batch).

    ``schedule=False`` lowers to the same kernels' unscheduled computes (same parameters,
    packing and layouts), which build for ``llvm``: how the CUDA lowering is checked
    bit-exact on a machine without a GPU."""
    sm = cuda_arch(arch).sm

    def as_rule(select: Callable[[QNode, LowerCtx, int, bool], Selected | None]) -> Rule:
        def rule(n: QNode, ctx: LowerCtx, xs: Sequence[relax.Expr]) -> relax.Var | None:
            # Step 1. Only 8-bit storage in, and a kernel that takes the node.
            if ctx.dtype(n.inputs[0]) not in KERNEL_DTYPES:
                return None
            built = select(n, ctx, batch, schedule)
            if built is None:
                return None
            func, params = built
            # The mma shape of the kernel's width must exist on this arch (native or emulated).
            tc = func.attrs.get("qcompile.int4", None)
            if tc is not None and ct.kernel_mma(4 if tc else 8, sm) is None:
                return None
            x = xs[0]
            if tc:  # the int4 MMA reads packed activations
                x = pack_nibbles(ctx, x, int(x.ty.shape[-1]))
            return _emit(n, ctx, func, [x] + params, batch, schedule)
        return rule

    return [(name, as_rule(select)) for name, select in KERNELS]


def _emit(n: QNode, ctx: LowerCtx, func: PrimFunc, args: list[relax.Expr], batch: int,
          schedule: bool) -> relax.Var:
    """Add ``func`` as ``n``'s kernel and call it. Opaque (op_pattern 8) so FuseOps keeps
    the hand schedule whole, and marked scheduled so dlight does not schedule it again."""
    fname = f"{func.attrs['global_symbol']}_{_safe(n.name)}"
    func = func.with_attr("global_symbol", fname).with_attr("op_pattern", 8)
    if schedule:
        func = func.with_attr(SCHEDULED, True)
    gv = ctx.bb.add_func(func, fname)
    ctx.funcs[fname] = n.name
    # call_tir with the kernel's own output type (NHWC for conv).
    shape = (batch,) + tuple(ctx.qg.tensors[n.output].shape[1:])
    if len(shape) == 4:
        shape = (shape[0], shape[2], shape[3], shape[1])  # NCHW -> NHWC
    dtype = "int32" if n.attrs.get("raw", False) else ctx.dtype(n.output)
    return ctx.emit(relax.call_tir(gv, args, relax.TensorType(shape, dtype)))


def tensor_core_kernels(mod: tvm.IRModule, funcs: Mapping[str, str], arch: str
                        ) -> dict[str, dict]:
    """Per tensor-core kernel of a lowered module: its width, the mma shape it issues on
    ``arch`` and whether the arch runs that natively (the manifest's ``tensor_cores``;
    ``inspect --sass`` checks it against the SASS)."""
    sm, out = cuda_arch(arch).sm, {}
    for fname in funcs:
        int4 = mod[fname].attrs.get("qcompile.int4", None) if fname in mod else None
        if int4 is None:
            continue  # depthwise: CUDA cores, no tensor-core math
        bits = 4 if int4 else 8
        row = ct.kernel_mma(bits, sm)
        if row is None:  # the rule refuses such a kernel; nothing to report
            continue
        out[fname] = {"bits": bits, "mma": f"m{row.m}n{row.n}k{row.k}",
                      "native": row.native_on(sm)}
    return out


# ======== 2. Build-time nvcc: embed a fatbin for the target's arch instead of CUDA source.

# Just enough of the driver API for libtvm_runtime_cuda.so to load; each call fails with
# CUDA_ERROR_NO_DEVICE. Used only where no real libcuda.so.1 can be loaded (no GPU driver).
_STUB_SYMBOLS = ("cuDeviceGetName", "cuFuncSetAttribute", "cuGetErrorName", "cuGetErrorString",
                 "cuLaunchKernelEx", "cuModuleGetFunction", "cuModuleGetGlobal", "cuModuleLoadData",
                 "cuModuleUnload", "cuTensorMapEncodeTiled", "cuInit")
_stub_dir: Path | None = None


def _load_stub_driver() -> None:
    global _stub_dir
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise BuildError("no GPU driver and no C compiler to build the libcuda stub")
    _stub_dir = Path(tempfile.mkdtemp(prefix="qcompile_cuda_stub_"))
    src = _stub_dir / "cuda_stub.c"
    src.write_text("".join(f"int {s}(void) {{ return 100; }}\n" for s in _STUB_SYMBOLS))
    lib = _stub_dir / "libcuda.so.1"
    subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(lib), str(src)],
                   check=True, capture_output=True)
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)  # the loader matches DT_NEEDED by soname


_FACTORY = "ffi.Module.create.cuda"
_COMPILE_CB = "tvm_callback_cuda_compile"
_hidden_factory: tvm_ffi.Function | None = None  # the factory we loaded, kept out of the registry
_cuda_runtime: ctypes.CDLL | None = None  # our handle keeps libtvm_runtime_cuda.so loaded


def _cuda_factory() -> tuple[tvm_ffi.Function, bool]:
    """TVM's CUDA module factory, and whether it was registered before we came.

    If we have to load ``libtvm_runtime_cuda.so`` ourselves, we take its factory *out* of the
    global registry again: with it registered, every later ``tvm.compile`` for CUDA in this
    process would JIT through ``tvm_callback_cuda_compile`` (default NVRTC) instead of keeping
    source, which breaks e.g. ``cuda_tc.cuda_source`` on a machine without NVRTC.
    """
    global _hidden_factory, _cuda_runtime
    f = tvm.get_global_func(_FACTORY, allow_missing=True)
    if f is not None:
        return f, True
    if _hidden_factory is not None:
        return _hidden_factory, False
    from tvm.libinfo import package_lib_paths
    from tvm_ffi.libinfo import load_lib_ctypes

    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        _load_stub_driver()
    try:  # found where tvm.base finds libtvm_runtime.so (public API, no tvm.base internals)
        _cuda_runtime = load_lib_ctypes(package="tvm", target_name="tvm_runtime_cuda",
                                        mode="RTLD_LOCAL", extra_lib_paths=package_lib_paths())
    except (OSError, RuntimeError) as e:
        raise BuildError(f"cannot load TVM's CUDA runtime library to embed a cubin: {e}") from e
    f = tvm.get_global_func(_FACTORY, allow_missing=True)
    if f is None:
        raise BuildError(f"TVM's CUDA runtime loaded but registered no {_FACTORY}")
    tvm_ffi.registry.remove_global_func(_FACTORY)
    _hidden_factory = f
    return f, False


@dataclass
class DeviceCode:
    """What the nvcc callback produced during one build (for reports and tests)."""

    binaries: list[bytes]
    seconds: float = 0.0


def nvcc_fatbin(source: str, arch: str) -> bytes:
    """CUDA source -> fatbin for ``arch`` (SASS only, no PTX: nothing to JIT on the host)."""
    from tvm.support import nvcc

    with tvm.target.Target({"kind": "cuda", "arch": arch}):
        return bytes(nvcc.compile_cuda(source, target_format="fatbin", arch=arch, compiler="nvcc",
                                       options=["-w"]))


@contextlib.contextmanager
def nvcc_at_build_time(arch: str) -> Iterator[DeviceCode]:
    """Within the block, CUDA codegen embeds nvcc-compiled ``arch`` binaries; the global
    registry (factory and compile callback) is put back as it was afterwards."""
    if shutil.which("nvcc") is None:
        raise BuildError(f"nvcc not found on PATH: cannot compile {arch} code at build time")
    factory, was_registered = _cuda_factory()
    out = DeviceCode([])
    prev = tvm.get_global_func(_COMPILE_CB, allow_missing=True)

    def compile_cb(source: str) -> bytes:
        t0 = time.perf_counter()
        b = nvcc_fatbin(source, arch)
        out.seconds += time.perf_counter() - t0
        out.binaries.append(b)
        return b

    tvm_ffi.register_global_func(_COMPILE_CB, compile_cb, override=True)
    if not was_registered:
        tvm_ffi.register_global_func(_FACTORY, factory, override=True)
    try:
        yield out
    finally:
        if not was_registered:
            tvm_ffi.registry.remove_global_func(_FACTORY)
        if prev is not None:
            tvm_ffi.register_global_func(_COMPILE_CB, prev, override=True)
        else:
            tvm_ffi.registry.remove_global_func(_COMPILE_CB)


def record_sass(rep: IntCheckReport, binaries: list[bytes]) -> None:
    """Second line of evidence on CUDA: scan the SASS of the core's device kernels
    (``asmcheck.scan_cuda_binaries``) into ``rep`` (``sass`` stage). A float opcode is a
    violation, so the build fails; so is a scan that could not run. Without cuobjdump or
    nvdisasm the build is refused (BuildError) naming the ``cuda`` extra that has them."""
    a = scan_cuda_binaries(binaries, rep.prim_funcs)
    rep.asm = a.as_dict()
    if a.missing_tools:
        raise BuildError(f"{a.note}: the CUDA core cannot be proven integer-only at the SASS "
                         "level; pip install 'qcompile[cuda]' (nvidia-cuda-cuobjdump, "
                         "nvidia-cuda-nvdisasm)")
    rep.stages.append("sass")
    if not a.scanned:
        rep.violations.append(f"[sass] not scanned: {a.note}")
    rep.violations += [f"[sass] {v}" for v in a.violations]
