"""Load an artifact and run or time it with TVM's Relax VM."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# TVM's pool defaults to half the hardware threads on x86 (1 of 2 here); it reads this
# once, at its first parallel call, so it must be set before any kernel runs.
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from .errors import ArtifactError, DeviceError
from .qgraph import QGraph
from .serialize import qgraph_from_json

REQUIRED = ("manifest.json", "module.so", "weights.npz", "qgraph.npz", "qconfig.json")


@dataclass
class Artifact:
    """A loaded artifact: the VM, its parameters (on device) and its description."""

    path: Path
    manifest: dict
    qconfig: dict
    vm: relax.VirtualMachine
    params: list[tvm.runtime.Tensor]
    arrays: dict[str, np.ndarray]
    device: tvm.runtime.Device

    @classmethod
    def load(cls, path: str | Path) -> "Artifact":
        path = Path(path)
        missing = [f for f in REQUIRED if not (path / f).is_file()]
        if missing:
            raise ArtifactError(f"{path} is not a qcompile artifact (missing {', '.join(missing)}); "
                                "create one with `qcompile compile MODEL -o DIR`")
        manifest = json.loads((path / "manifest.json").read_text())
        qconfig = json.loads((path / "qconfig.json").read_text())
        with np.load(path / "weights.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        kind = manifest.get("target", {}).get("kind", "llvm")
        dev = tvm.cpu() if kind == "llvm" else tvm.cuda()
        if kind != "llvm" and not dev.exist:
            raise DeviceError(f"{path} was built for {manifest['target']['str']} and needs an "
                              "NVIDIA GPU, which this machine lacks; run it on a T4 host or "
                              "recompile with --target llvm")
        try:
            lib = tvm.runtime.load_module(str(path / "module.so"))
        except Exception as e:
            raise ArtifactError(f"{path}/module.so failed to load: {str(e).splitlines()[0]}") from e
        vm = relax.VirtualMachine(lib, dev)
        params = [tvm.runtime.tensor(arrays[k], dev) for k in manifest["params"]]
        return cls(path, manifest, qconfig, vm, params, arrays, dev)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["input"]["shape"])

    def qgraph(self) -> QGraph:
        """The quantized graph the oracle runs, from qconfig.json + qgraph.npz."""
        with np.load(self.path / "qgraph.npz", allow_pickle=False) as z:
            return qgraph_from_json(self.qconfig["graph"], {k: z[k] for k in z.files})

    @property
    def batch(self) -> int | None:
        """The static batch the kernels were built for (None: any batch)."""
        return self.manifest.get("batch")

    def _chunked(self, fn: str, x: np.ndarray) -> np.ndarray:
        """Call ``fn`` on x, in zero-padded chunks of the compiled batch when it is static."""
        b = self.batch
        if b is None or x.shape[0] == b:
            return self.vm[fn](tvm.runtime.tensor(x, self.device), *self._args(fn)).numpy()
        outs = []
        for i in range(0, x.shape[0], b):
            part = x[i:i + b]
            pad = b - part.shape[0]
            if pad:
                part = np.concatenate([part, np.zeros((pad,) + part.shape[1:], part.dtype)])
            y = self.vm[fn](tvm.runtime.tensor(part, self.device), *self._args(fn)).numpy()
            outs.append(y[:b - pad])
        return np.concatenate(outs)

    def _args(self, fn: str) -> list[tvm.runtime.Tensor]:
        return self.params if fn in ("main", "core") else []

    def _check(self, x: np.ndarray) -> np.ndarray:
        want = self.input_shape[1:]
        if x.ndim != len(want) + 1 or tuple(x.shape[1:]) != want:
            raise ArtifactError(f"input shape {x.shape} does not match the model's "
                                f"(N, {', '.join(map(str, want))})")
        return np.ascontiguousarray(x)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Float input batch -> float output (quantize, integer core, dequantize)."""
        return self._chunked("main", self._check(x.astype(np.float32, copy=False)))

    def quantize(self, x: np.ndarray) -> np.ndarray:
        return self._chunked("quantize", self._check(x.astype(np.float32, copy=False)))

    def run_core(self, q: np.ndarray) -> np.ndarray:
        """Integer input -> the integer tensor just before the exit dequantization."""
        return self._chunked("core", self._check(q))

    def bench(self, batch: int = 1, repeat: int = 50, warmup: int = 5) -> dict:
        """Latency of ``main`` (quantize + core + dequantize) on random input, in ms."""
        if self.batch is not None and batch != self.batch:
            raise ArtifactError(f"{self.path} was compiled for batch {self.batch}; "
                                f"recompile with --batch {batch} to time batch {batch}")
        x = np.random.default_rng(0).normal(size=(batch,) + self.input_shape[1:]).astype(np.float32)
        args = [tvm.runtime.tensor(x, self.device), *self.params]
        for _ in range(warmup):
            self.vm["main"](*args)
        timer = self.vm.time_evaluator("main", self.device, number=1, repeat=repeat)
        return summarize_ms(list(timer(*args).results), batch)


def summarize_ms(seconds: list[float], batch: int) -> dict:
    """trtexec-style summary of per-run wall times."""
    ms = np.asarray(seconds) * 1e3
    med = float(np.median(ms))
    return {"median_ms": med, "min_ms": float(ms.min()), "max_ms": float(ms.max()),
            "mean_ms": float(ms.mean()), "batch": batch, "repeat": len(ms),
            "throughput_ips": batch * 1e3 / med}
