"""Load and run a qcompile artifact with TVM's runtime alone.

``qcompile bundle`` copies this file verbatim into every bundle (as ``qloader.py``, beside
a trimmed TVM runtime), so it imports only the standard library, numpy and
``tvm.runtime``: never the compiler, qcompile or onnx. ``qcompile.runtime.run.Artifact``
subclasses :class:`Model`, so a bundle runs exactly the code that ``qcompile run`` runs.
"""
from __future__ import annotations

import ctypes
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# TVM's pool defaults to half the hardware threads on x86 (1 of 2 here); it reads this
# once, at its first parallel call, so it must be set before any kernel runs.
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
# tvm_ffi JIT-builds a torch DLPack addon when torch is importable; we pass numpy only.
os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")

import tvm  # noqa: E402
from tvm.runtime.vm import VirtualMachine  # noqa: E402

RUNTIME_FILES = ("manifest.json", "module.so", "weights.npz")
CUDART = "libcudart.so.13"  # what TVM 0.27's libtvm_runtime_cuda.so links against


class LoadError(RuntimeError):
    """An artifact that cannot be loaded or run here (one line, what to do)."""


class NoDeviceError(LoadError):
    """The artifact needs a GPU this machine lacks."""


class BadInputError(LoadError):
    """An input the model cannot take: NaN or Inf values (onnxruntime would propagate
    them; the integer core cannot represent them, so it refuses rather than guess)."""


def check_finite(x: np.ndarray, error: type[Exception] = BadInputError) -> None:
    """Refuse a float input holding NaN or Inf, in one line that counts them."""
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        nan, inf = int(np.isnan(x).sum()), int(np.isinf(x).sum())
        raise error(f"the input holds {nan} NaN and {inf} Inf value(s) of {x.size}; the "
                    "integer model takes finite floats only: clean or mask them first")


def _preload_cuda(cudart_dirs: tuple[Path, ...] = ()) -> None:
    """Make CUDA modules loadable under the runtime-only library.

    With the compiler library, ``import tvm`` registers the CUDA runtime (module loader,
    device API) itself; runtime-only it does not, so load ``libtvm_runtime_cuda.so`` by
    hand, after the CUDA runtime it links against (the system's first, else a bundled copy).
    """
    from tvm.base import _LOADED_LIBS, _RUNTIME_ONLY
    if not _RUNTIME_ONLY or "tvm_runtime_cuda" in _LOADED_LIBS:
        return
    try:
        ctypes.CDLL(CUDART, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        for d in cudart_dirs:
            if (d / CUDART).is_file():
                ctypes.CDLL(str(d / CUDART), mode=ctypes.RTLD_GLOBAL)
                break
    lib = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent / "libtvm_runtime_cuda.so"
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        raise NoDeviceError(f"the CUDA runtime could not be loaded ({str(e).splitlines()[0]}); "
                            f"install the NVIDIA driver and CUDA 13's {CUDART}") from None


_ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA, _SYS_ARCH_PRCTL = 0x1023, 18, 158


@functools.lru_cache(maxsize=None)
def request_amx() -> bool:
    """Ask Linux for the AMX tile state for this process, once (``arch_prctl``
    ARCH_REQ_XCOMP_PERM); False where the OS, the CPU or the hypervisor says no. A process
    that did not ask dies of SIGILL on its first tile instruction."""
    if os.uname().sysname != "Linux" or os.uname().machine != "x86_64":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0)
    except (OSError, AttributeError):
        return False


def summarize_ms(seconds: list[float], batch: int) -> dict:
    """trtexec-style summary of per-run wall times."""
    ms = np.asarray(seconds) * 1e3
    med = float(np.median(ms))
    return {"median_ms": med, "min_ms": float(ms.min()), "max_ms": float(ms.max()),
            "mean_ms": float(ms.mean()), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "batch": batch, "repeat": len(ms),
            "throughput_ips": batch * 1e3 / med}


@dataclass
class Model:
    """A loaded artifact: the VM, its parameters (on device) and its manifest."""

    path: Path
    manifest: dict
    vm: VirtualMachine
    params: list
    arrays: dict[str, np.ndarray]
    device: Any
    # Subclasses raise their own error types (qcompile's carry exit codes).
    error: type[Exception] = field(default=LoadError, repr=False)
    input_error: type[Exception] = field(default=BadInputError, repr=False)

    @classmethod
    def open(cls, path: str | Path, *, weights: str | Path | None = None,
             cudart_dirs: tuple[Path, ...] = (), error: type[Exception] = LoadError,
             device_error: type[Exception] = NoDeviceError,
             input_error: type[Exception] = BadInputError, **extra: Any) -> "Model":
        """``path`` holds manifest.json and module.so; ``weights`` defaults to its weights.npz."""
        path = Path(path)
        wfile = Path(weights) if weights is not None else path / "weights.npz"
        missing = [f.name for f in (path / "manifest.json", path / "module.so", wfile)
                   if not f.is_file()]
        if missing:
            raise error(f"{path} is not a qcompile artifact (missing {', '.join(missing)}); "
                        "create one with `qcompile compile MODEL -o DIR`")
        manifest = json.loads((path / "manifest.json").read_text())
        kind = manifest.get("target", {}).get("kind", "llvm")
        if kind == "llvm":
            dev = tvm.cpu()
        else:
            _preload_cuda(cudart_dirs)
            dev = tvm.cuda()
            if not dev.exist:
                raise device_error(
                    f"{path} was built for {manifest['target']['str']} and needs an NVIDIA "
                    "GPU, which this machine lacks; run it on a GPU host or recompile with "
                    "--target llvm")
        if "amx" in manifest.get("cpu_features", ()) and not request_amx():
            raise error(f"{path} runs AMX tile kernels, which this CPU or OS does not offer; "
                        "recompile it here, or with QCOMPILE_NO_AMX=1 for CPUs without AMX")
        with np.load(wfile, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        try:
            lib = tvm.runtime.load_module(str(path / "module.so"))
        except Exception as e:  # TVM's own error types; keep the first line
            raise error(f"{path}/module.so failed to load: {str(e).splitlines()[0]}") from e
        vm = VirtualMachine(lib, dev)
        params = [tvm.runtime.tensor(arrays[k], dev) for k in manifest["params"]]
        return cls(path, manifest, vm, params, arrays, dev, error, input_error, **extra)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["input"]["shape"])

    @property
    def batch(self) -> int | None:
        """The static batch the kernels were built for (None: any batch)."""
        return self.manifest.get("batch")

    def _args(self, fn: str) -> list:
        return self.params if fn in ("main", "core") else []

    def _call(self, fn: str, x: np.ndarray) -> np.ndarray:
        return self.vm[fn](tvm.runtime.tensor(x, self.device), *self._args(fn)).numpy()

    def _chunked(self, fn: str, x: np.ndarray) -> np.ndarray:
        """Call ``fn`` on x, in zero-padded chunks of the compiled batch when it is static."""
        b = self.batch
        if b is None or x.shape[0] == b:
            return self._call(fn, x)
        outs = []
        for i in range(0, x.shape[0], b):
            part = x[i:i + b]
            pad = b - part.shape[0]
            if pad:
                part = np.concatenate([part, np.zeros((pad,) + part.shape[1:], part.dtype)])
            outs.append(self._call(fn, part)[:b - pad])
        return np.concatenate(outs)

    def _check(self, x: np.ndarray) -> np.ndarray:
        want = self.input_shape[1:]
        if x.ndim != len(want) + 1 or tuple(x.shape[1:]) != want:
            raise self.error(f"input shape {x.shape} does not match the model's "
                             f"(N, {', '.join(map(str, want))})")
        return np.ascontiguousarray(x)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Float input batch -> float output (quantize, integer core, dequantize).
        NaN or Inf in ``x`` raises ``input_error`` (the compiled ``main`` called directly
        would map them to some integer silently, see docs)."""
        check_finite(x, self.input_error)
        return self._chunked("main", self._check(x.astype(np.float32, copy=False)))

    def quantize(self, x: np.ndarray) -> np.ndarray:
        check_finite(x, self.input_error)
        return self._chunked("quantize", self._check(x.astype(np.float32, copy=False)))

    def run_core(self, q: np.ndarray) -> np.ndarray:
        """Integer input -> the integer tensor just before the exit dequantization."""
        return self._chunked("core", self._check(q))

    def bench(self, batch: int = 1, repeat: int = 50, warmup: int = 5) -> dict:
        """Latency of ``main`` (quantize + core + dequantize) on random input, in ms."""
        if self.batch is not None and batch != self.batch:
            raise self.error(f"{self.path} was compiled for batch {self.batch}; "
                             f"recompile with --batch {batch} to time batch {batch}")
        x = np.random.default_rng(0).normal(size=(batch,) + self.input_shape[1:])
        args = [tvm.runtime.tensor(x.astype(np.float32), self.device), *self.params]
        for _ in range(warmup):
            self.vm["main"](*args)
        timer = self.vm.time_evaluator("main", self.device, number=1, repeat=repeat)
        return summarize_ms(list(timer(*args).results), batch)
