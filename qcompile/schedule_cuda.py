"""CUDA (T4, sm_75) lowering rules and build: tensor-core kernels plus dlight for the rest.

``cuda_rules(batch)`` maps ``qconv`` (group 1 -> ``conv2d_nhwc_tc``, depthwise ->
``depthwise_conv2d_nhwc``) and ``qdense`` (-> ``dense_tc``) onto the hand-scheduled kernels
of ``qcompile.kernels.cuda_tc``; every other op keeps TVM's generic legalization.

``build_cuda(mod, target)`` is ``build.build`` for CUDA, with two differences:

1. legalization schedules the generic PrimFuncs with dlight's GPU rules (reductions and the
   thread-binding fallback) and leaves our kernels alone (they carry ``tir.is_scheduled``);
   dlight's ``gpu.Matmul`` is left out: on int8 it picks WMMA and dies in
   ``InjectSoftwarePipeline`` (TVM_NOTES), and no GEMM reaches it here anyway;
2. the device code is compiled *at build time* with nvcc to an sm_75 fatbin, so the exported
   library loads on a T4 host with no nvcc/NVRTC.

How (2) works in TVM 0.27: ``target.build.cuda`` emits CUDA source and hands it to
``ffi.Module.create.cuda``. When the CUDA runtime library (``libtvm_runtime_cuda.so``) is
loaded, that factory calls the global ``tvm_callback_cuda_compile(source) -> bytes`` and
stores the result as format "cubin" (anything not starting with '/'; the driver's
``cuModuleLoadData`` takes a fatbin too). Without the runtime library the codegen keeps the
source (format "cuda") and the *loading* host must compile it. So we register our nvcc
callback for the duration of the build, and on a machine without a GPU driver we first load
``libtvm_runtime_cuda.so`` against a stub ``libcuda.so.1`` (see ``_cuda_factory``).
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
from typing import Iterator, Sequence

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from .build import Built, _debug_dump, _stage
from .errors import BuildError
from .intcheck import check_integer_only
from .kernels import cuda_tc as ct
from .lower import LowerCtx, Rule
from .qgraph import QNode

ARCH = "sm_75"  # the T4; the only arch this module emits code for
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


def _conv(n: QNode, ctx: LowerCtx, batch: int) -> tuple[tvm.tirx.PrimFunc, list[relax.Var]] | None:
    a, w = n.attrs, n.params["w"]  # w: OIHW
    _, c, h, wd = ctx.qg.tensors[n.inputs[0]].shape
    data = (batch, h, wd, c)
    o, kernel = int(w.shape[0]), (int(w.shape[2]), int(w.shape[3]))
    common = dict(strides=tuple(a["strides"]), pads=tuple(a["pads"]), **_epilogue_opts(n, ctx))
    group = int(a["group"])
    if group == 1:
        func = ct.conv2d_nhwc_tc(data, o, kernel, dilations=tuple(a["dilations"]), **common)
        wk = np.ascontiguousarray(w.transpose(0, 2, 3, 1)).astype(np.int8)  # OIHW -> OHWI
        return func, [ctx.param(f"{n.name}.w_ohwi", wk)] + _epilogue_params(n, ctx)
    if group == c == o and w.shape[1] == 1 and tuple(a["dilations"]) == (1, 1):
        func = ct.depthwise_conv2d_nhwc(data, kernel, **common)
        wk = np.ascontiguousarray(w[:, 0].transpose(1, 2, 0)).astype(np.int8)  # C1HW -> HWC
        return func, [ctx.param(f"{n.name}.w_hwc", wk)] + _epilogue_params(n, ctx)
    return None  # grouped (not depthwise) or dilated depthwise: generic


def _dense(n: QNode, ctx: LowerCtx, batch: int) -> tuple[tvm.tirx.PrimFunc, list[relax.Var]]:
    w = n.params["w"]  # (K, N)
    k, nout = int(w.shape[0]), int(w.shape[1])
    func = ct.dense_tc(batch, nout, k, **_epilogue_opts(n, ctx))
    wk = np.ascontiguousarray(w.T).astype(np.int8)  # dense_tc takes W as (N, K)
    return func, [ctx.param(f"{n.name}.w_nk", wk)] + _epilogue_params(n, ctx)


def cuda_rules(batch: int) -> list[tuple[str, Rule]]:
    """Tensor-core conv/dense and the CUDA-core depthwise kernel for the T4 (static batch)."""

    def rule(n: QNode, ctx: LowerCtx, xs: Sequence[relax.Expr]) -> relax.Var | None:
        # Step 1. Only 8-bit storage in and a kernel that fits the node; else generic.
        if n.op not in ("qconv", "qdense") or ctx.dtype(n.inputs[0]) not in KERNEL_DTYPES:
            return None
        built = _conv(n, ctx, batch) if n.op == "qconv" else _dense(n, ctx, batch)
        if built is None:
            return None
        func, params = built
        # Step 2. Opaque (op_pattern 8) so FuseOps keeps the hand schedule whole, and
        # tir.is_scheduled so dlight does not schedule it again.
        fname = f"{func.attrs['global_symbol']}_{_safe(n.name)}"
        func = (func.with_attr("global_symbol", fname).with_attr("op_pattern", 8)
                .with_attr("tir.is_scheduled", True))
        gv = ctx.bb.add_func(func, fname)
        ctx.funcs[fname] = n.name
        # Step 3. call_tir with the kernel's own output type (NHWC for conv).
        shape = (batch,) + tuple(ctx.qg.tensors[n.output].shape[1:])
        if len(shape) == 4:
            shape = (shape[0], shape[2], shape[3], shape[1])  # NCHW -> NHWC
        dtype = "int32" if n.attrs.get("raw", False) else ctx.dtype(n.output)
        return ctx.emit(relax.call_tir(gv, [xs[0]] + params, relax.TensorType(shape, dtype)))

    return [("cuda_tc", rule)]


# ======== 2. Build-time nvcc: embed an sm_75 fatbin instead of CUDA source.

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


def _cuda_factory() -> tuple[tvm_ffi.Function, bool]:
    """TVM's CUDA module factory, and whether it was registered before we came.

    If we have to load ``libtvm_runtime_cuda.so`` ourselves, we take its factory *out* of the
    global registry again: with it registered, every later ``tvm.compile`` for CUDA in this
    process would JIT through ``tvm_callback_cuda_compile`` (default NVRTC) instead of keeping
    source, which breaks e.g. ``cuda_tc.cuda_source`` on a machine without NVRTC.
    """
    global _hidden_factory
    f = tvm.get_global_func(_FACTORY, allow_missing=True)
    if f is not None:
        return f, True
    if _hidden_factory is not None:
        return _hidden_factory, False
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        _load_stub_driver()
    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir],
            mode="RTLD_LOCAL")
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


def nvcc_fatbin(source: str, arch: str = ARCH) -> bytes:
    """CUDA source -> fatbin for ``arch`` (SASS only, no PTX: nothing to JIT on the host)."""
    from tvm.support import nvcc

    with tvm.target.Target({"kind": "cuda", "arch": arch}):
        return bytes(nvcc.compile_cuda(source, target_format="fatbin", arch=arch, compiler="nvcc",
                                       options=["-w"]))


@contextlib.contextmanager
def nvcc_at_build_time(arch: str = ARCH) -> Iterator[DeviceCode]:
    """Within the block, CUDA codegen embeds nvcc-compiled ``arch`` binaries; the global
    registry (factory and compile callback) is put back as it was afterwards."""
    if shutil.which("nvcc") is None:
        raise BuildError("nvcc not found on PATH: cannot compile sm_75 code at build time")
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


# ======== 3. The build: legalize + dlight, integer-only check, compile.


def legalize_cuda(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Relax ops -> fused TIR, generic PrimFuncs scheduled by dlight's GPU rules."""
    from tvm.s_tir import dlight as dl

    passes = _stage(target, "library_dispatch") + [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        dl.ApplyDefaultSchedule(dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()),
    ]
    with target:
        return tvm.transform.Sequential(passes)(mod)


@dataclass(frozen=True)
class CudaBuilt:
    built: Built
    device: DeviceCode  # the embedded fatbin(s)
    seconds: float  # whole build


def build_cuda(mod: tvm.IRModule, target: tvm.target.Target) -> CudaBuilt:
    """Legalize for CUDA, prove the core integer-only, compile with sm_75 code embedded."""
    t0 = time.perf_counter()
    _debug_dump("relax", mod)
    try:
        lowered = legalize_cuda(mod, target)
    except Exception as e:
        raise BuildError(f"CUDA legalization failed: {str(e).splitlines()[0]}") from e
    _debug_dump("legalized", lowered)
    rep = check_integer_only(lowered, "core")
    rest = tvm.transform.Sequential(_stage(target, "dataflow_lower") + _stage(target, "finalize"))
    with nvcc_at_build_time(ARCH) as device:
        try:
            ex = tvm.compile(lowered, target, relax_pipeline=rest)
        except Exception as e:
            raise BuildError(f"TVM CUDA compilation failed: {str(e).splitlines()[0]}") from e
    if not device.binaries:
        raise BuildError("the CUDA build compiled no device code (was the source embedded?)")
    return CudaBuilt(Built(ex, lowered, rep, target), device, time.perf_counter() - t0)


# ======== 4. Reading the embedded code back (no GPU needed).

FATBIN_MAGIC = 0xBA55ED50


def embedded_fatbins(blob: bytes) -> list[bytes]:
    """The fatbins inside an exported library (header: magic u32, version u16, header size
    u16, payload size u64)."""
    out, i = [], 0
    magic = FATBIN_MAGIC.to_bytes(4, "little")
    while (i := blob.find(magic, i)) >= 0:
        hsize = int.from_bytes(blob[i + 6:i + 8], "little")
        size = int.from_bytes(blob[i + 8:i + 16], "little")
        if hsize == 16 and 0 < size <= len(blob) - i - hsize:
            out.append(blob[i:i + hsize + size])
            i += hsize + size
        else:
            i += 4
    return out


def sass_histogram(binary: bytes) -> dict[str, dict[str, int]]:
    """Per kernel: SASS opcode -> count, for a cubin or fatbin (``cuobjdump -sass``)."""
    return ct.sass_histogram(binary)
