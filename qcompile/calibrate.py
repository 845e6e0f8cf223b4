"""Calibration: data readers -> float model in onnxruntime -> observers -> ranges.

Three parts, kept apart as in torch.ao: readers say *what data* flows in
(onnxruntime's ``get_next() -> dict | None`` protocol, so they also plug into
``onnxruntime.quantization``), observers say *how to measure* a tensor, and
``collect_stats`` runs the float model and feeds one observer per tensor.  What to
quantize, and at which bit-width, is decided by later stages calling
``Observer.threshold(signed, bits)``.
"""
from __future__ import annotations

import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, NamedTuple, Protocol, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image
from tqdm import tqdm

from .config import CalibSpec, Preprocess
from .errors import BadModelError, DataError, UsageError

ARRAY_EXTS: frozenset[str] = frozenset({".npy", ".npz"})
IMAGE_EXTS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})

# ----------------------------------------------------------------------------- readers


class Reader(Protocol):
    """onnxruntime's CalibrationDataReader protocol, plus a sample count."""

    def get_next(self) -> dict[str, np.ndarray] | None: ...
    def rewind(self) -> None: ...
    def __len__(self) -> int: ...


def _shape_ok(got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """Per-sample shape check; a dim <= 0 in ``want`` is symbolic and matches anything."""
    return len(got) == len(want) and all(w <= 0 or g == w for g, w in zip(got, want))


def _rebatch(chunks: Iterator[np.ndarray], batch_size: int, limit: int) -> Iterator[np.ndarray]:
    """Regroup (k, ...) chunks into float32 batches of ``batch_size``, ``limit`` rows in all."""
    pending: list[np.ndarray] = []
    have, left = 0, limit
    for chunk in chunks:
        while len(chunk) and left:
            take = min(len(chunk), batch_size - have, left)
            pending.append(np.asarray(chunk[:take], dtype=np.float32))
            chunk, have, left = chunk[take:], have + take, left - take
            if have == batch_size or not left:
                yield np.concatenate(pending) if len(pending) > 1 else pending[0]
                pending, have = [], 0
        if not left:
            return
    if pending:
        yield np.concatenate(pending) if len(pending) > 1 else pending[0]


class _Reader:
    """Shared batching, rewind and length; subclasses only yield sample chunks."""

    def __init__(self, input_name: str, input_shape: Sequence[int], batch_size: int,
                 available: int, limit: int | None) -> None:
        self.input_name = input_name
        self.sample_shape = tuple(int(d) for d in input_shape[1:])
        self.batch_size = batch_size
        self._n = available if limit is None else min(available, limit)
        self._it: Iterator[np.ndarray] | None = None

    def _chunks(self) -> Iterator[np.ndarray]:  # (k, *sample_shape) arrays, any k
        raise NotImplementedError

    def __len__(self) -> int:
        return self._n

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next batch keyed by input name, or None when the data is exhausted."""
        if self._it is None:
            self._it = _rebatch(self._chunks(), self.batch_size, self._n)
        batch = next(self._it, None)
        return None if batch is None else {self.input_name: np.ascontiguousarray(batch)}

    def rewind(self) -> None:
        """Start again from the first sample."""
        self._it = None


def _npy_header(f: BinaryIO, where: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a .npy header without reading the data (sizes the reader cheaply)."""
    try:
        version = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read(f)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{where}: not a readable .npy array ({e})") from None
    return tuple(shape), dtype


class _ArrayEntry(NamedTuple):
    path: Path
    key: str | None  # npz member, None for a .npy file
    batched: bool  # (N, ...) rather than one sample
    count: int


class NpyDirReader(_Reader):
    """Samples from .npy files (one sample or an (N, ...) batch each) and .npz files
    (every array, in sorted key order), files in sorted name order, cast to float32."""

    def __init__(self, files: Sequence[Path], input_name: str, input_shape: Sequence[int],
                 batch_size: int = 8, limit: int | None = None) -> None:
        entries: list[_ArrayEntry] = []
        want = tuple(int(d) for d in input_shape[1:])
        for path in files:
            for key, shape, dtype in self._headers(path):
                where = f"{path}[{key}]" if key is not None else str(path)
                if dtype.kind not in "biuf":
                    raise DataError(f"{where}: dtype {dtype} is not numeric")
                batched = len(shape) == len(want) + 1
                got = shape[1:] if batched else shape
                if not _shape_ok(got, want):
                    raise DataError(f"{where}: expected a sample of shape {want} or a batch "
                                    f"(N, {', '.join(map(str, want))}), got {shape}")
                entries.append(_ArrayEntry(path, key, batched, shape[0] if batched else 1))
        self._entries = entries
        super().__init__(input_name, input_shape, batch_size, sum(e.count for e in entries), limit)

    @staticmethod
    def _headers(path: Path) -> list[tuple[str | None, tuple[int, ...], np.dtype]]:
        if path.suffix.lower() == ".npy":
            with open(path, "rb") as f:
                return [(None, *_npy_header(f, str(path)))]
        try:
            with zipfile.ZipFile(path) as z:  # np.savez stores each array as KEY.npy
                keys = sorted(n[:-4] for n in z.namelist() if n.endswith(".npy"))
                return [(k, *_npy_header(z.open(k + ".npy"), f"{path}[{k}]")) for k in keys]
        except zipfile.BadZipFile:
            raise DataError(f"{path}: not a readable .npz archive") from None

    def _chunks(self) -> Iterator[np.ndarray]:
        for e in self._entries:
            # mmap keeps a big batch file from being read whole; pickles are refused
            if e.key is None:
                arr = np.load(e.path, mmap_mode="r", allow_pickle=False)
            else:
                with np.load(e.path, allow_pickle=False) as z:
                    arr = z[e.key]
            yield arr if e.batched else arr[None]


def _channel_vector(v: tuple[float, ...], c: int, what: str) -> np.ndarray:
    if len(v) == c:
        return np.asarray(v, np.float32)
    if len(v) == 1:
        return np.full(c, v[0], np.float32)
    raise UsageError(f"--{what} has {len(v)} values but the image has {c} channel(s); "
                     f"pass {c} value(s) or 1")


def preprocess_image(img: Image.Image, p: Preprocess) -> np.ndarray:
    """Decode-side preprocessing, torchvision-style: convert, resize short side, centre crop,
    scale, normalise; returns float32 CHW (NCHW models) or HWC (NHWC models)."""
    # Step 1. Colour mode: RGB drops alpha / expands palettes; L for grayscale models.
    img = img.convert("L" if p.grayscale else "RGB")
    # Step 2. Resize the short side (torchvision truncates the long side the same way).
    short = p.resize or p.size
    if short < p.size:
        raise UsageError(f"--resize {p.resize} is smaller than --size {p.size}; the crop won't fit")
    w, h = img.size
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    # Step 3. Centre crop, offsets rounded as torchvision's center_crop does.
    top, left = int(round((nh - p.size) / 2.0)), int(round((nw - p.size) / 2.0))
    img = img.crop((left, top, left + p.size, top + p.size))
    # Step 4. To float, scale, normalise per channel (HWC until the end).
    x = np.asarray(img, dtype=np.float32)
    x = x[:, :, None] if x.ndim == 2 else x
    if p.scale01:
        x = x / np.float32(255.0)
    c = x.shape[2]
    x = (x - _channel_vector(p.mean, c, "mean")) / _channel_vector(p.std, c, "std")
    return np.ascontiguousarray(x.transpose(2, 0, 1) if p.layout == "NCHW" else x, np.float32)


class ImageDirReader(_Reader):
    """Image files (sorted by name) decoded with Pillow and run through ``preprocess_image``."""

    def __init__(self, files: Sequence[Path], p: Preprocess, input_name: str,
                 input_shape: Sequence[int], batch_size: int = 8, limit: int | None = None) -> None:
        c = 1 if p.grayscale else 3
        made = (c, p.size, p.size) if p.layout == "NCHW" else (p.size, p.size, c)
        want = tuple(int(d) for d in input_shape[1:])
        if not _shape_ok(made, want):
            where = files[0].parent if files else "images"
            raise DataError(f"{where}: images preprocess to {made} ({p.layout}) but input "
                            f"{input_name!r} expects {want}; check --size/--layout/--grayscale")
        self._files, self._p = list(files), p
        super().__init__(input_name, input_shape, batch_size, len(self._files), limit)

    def _chunks(self) -> Iterator[np.ndarray]:
        for path in self._files[: len(self)]:  # decode lazily, only what is used
            try:
                with Image.open(path) as img:
                    yield preprocess_image(img, self._p)[None]
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise DataError(f"{path}: cannot decode image ({e})") from None


class SyntheticReader(_Reader):
    """Seeded N(0, 1) samples of the input shape: for smoke tests only, not for real ranges."""

    def __init__(self, input_name: str, input_shape: Sequence[int], num_samples: int,
                 batch_size: int = 8, seed: int = 0) -> None:
        if any(int(d) <= 0 for d in input_shape[1:]):
            raise DataError(f"input {input_name!r} has symbolic dims {tuple(input_shape)}; "
                            "synthetic data needs a fixed shape, pass --calib DIR")
        self._seed = seed
        super().__init__(input_name, input_shape, batch_size, num_samples, None)

    def _chunks(self) -> Iterator[np.ndarray]:
        rng = np.random.default_rng(self._seed)  # fresh per pass, so rewind replays
        for i in range(0, len(self), self.batch_size):
            n = min(self.batch_size, len(self) - i)
            yield rng.standard_normal((n, *self.sample_shape), dtype=np.float32)


def _open(source: str, p: Preprocess, input_name: str, input_shape: Sequence[int],
          limit: int | None, batch_size: int, seed: int) -> Reader:
    if source == "synthetic":
        warnings.warn("calibrating on synthetic N(0,1) data: the ranges are unrelated to real "
                      "inputs; pass --calib DIR with .npy/.npz files or images", stacklevel=3)
        if limit is None:
            raise UsageError("synthetic data needs a sample count")
        return SyntheticReader(input_name, input_shape, limit, batch_size, seed)
    path = Path(source)
    if not path.exists():
        raise DataError(f"calibration data {source!r} does not exist")
    # one .npz/.npy file is also accepted: a common way to ship calibration sets
    files = [path] if path.is_file() else sorted(
        f for f in path.iterdir() if f.is_file() and not f.name.startswith("."))
    arrays = [f for f in files if f.suffix.lower() in ARRAY_EXTS]
    images = [f for f in files if f.suffix.lower() in IMAGE_EXTS]
    if arrays and images:
        raise DataError(f"{source}: holds both .npy/.npz arrays and images; keep only one kind")
    reader: Reader
    if arrays:
        reader = NpyDirReader(arrays, input_name, input_shape, batch_size, limit)
    elif images:
        reader = ImageDirReader(images, p, input_name, input_shape, batch_size, limit)
    else:
        raise DataError(f"{source}: no .npy/.npz arrays or images "
                        f"({', '.join(sorted(IMAGE_EXTS))}) found")
    if not len(reader):
        raise DataError(f"{source}: the arrays hold no samples")
    return reader


def make_reader(spec: CalibSpec, input_name: str, input_shape: tuple[int, ...]) -> Reader:
    """The reader for ``spec.source``: "synthetic" (warns), a folder or file of .npy/.npz
    arrays, or a folder of images; at most ``spec.num_samples`` samples in batches of
    ``spec.batch_size``. Missing or empty sources raise ``DataError``."""
    return _open(spec.source, spec.preprocess, input_name, input_shape,
                 spec.num_samples, spec.batch_size, spec.seed)


def load_inputs(source: str, p: Preprocess, input_shape: tuple[int, ...], limit: int) -> np.ndarray:
    """All samples of ``source`` stacked to (N, ...) float32, for evaluation.
    ``limit`` > 0 caps N; 0 means every sample in the folder (not allowed for synthetic)."""
    reader = _open(source, p, "input", input_shape, limit if limit > 0 else None, 64, 0)
    batches = []
    while (b := reader.get_next()) is not None:
        batches.append(b["input"])
    return np.concatenate(batches) if batches else np.zeros((0, *input_shape[1:]), np.float32)


# ----------------------------------------------------------------------------- observers

# Degenerate tensors (all zero, or all negative when unsigned) get T = 1.0, not a tiny
# floor: their values quantize exactly at any scale, and 1.0 keeps the requant
# multipliers of the layers that write them in a representable range.
_DEGENERATE_T = 1.0
_TINY = 1e-12


def _finish(t: float) -> float:
    return float(t) if np.isfinite(t) and t > _TINY else _DEGENERATE_T


class Observer:
    """Measures one tensor, batch by batch. Every observer keeps the exact min and max."""

    def __init__(self) -> None:
        self.min = np.inf
        self.max = -np.inf
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        """Fold one batch of values in."""
        if x.size:  # np.minimum, unlike min(), lets a NaN through for collect_stats to see
            self.min = float(np.minimum(self.min, np.min(x)))
            self.max = float(np.maximum(self.max, np.max(x)))
            self.count += x.size

    def threshold(self, signed: bool, bits: int) -> float:
        """Clipping threshold T > 0 (finite); the quantizer uses scale = T / qmax with
        qmax = 2^(bits-1)-1 signed or 2^bits-1 unsigned."""
        raise NotImplementedError


class MinMaxObserver(Observer):
    """Threshold = max|x| (signed) or max(x) (unsigned)."""

    @classmethod
    def from_spec(cls, spec: CalibSpec) -> "MinMaxObserver":
        return cls()

    def threshold(self, signed: bool, bits: int) -> float:
        if not self.count:
            return _DEGENERATE_T
        return _finish(max(-self.min, self.max) if signed else self.max)


class _SampledObserver(Observer):
    """Exact min/max plus a uniform random subsample of at most ``max_samples`` values.

    Why a reservoir and not a histogram: percentile and MSE then work on real values
    (exact whenever a tensor has fewer than ``max_samples`` values, which is what the
    tests check), there is no bin range to re-grow as the max moves, and memory is
    bounded at 4 bytes x ``max_samples`` per tensor (4 MiB at the 2^20 default).
    It is Vitter's algorithm R, vectorised per batch, seeded for reproducibility.
    """

    def __init__(self, max_samples: int = 1 << 20, seed: int = 0) -> None:
        super().__init__()
        self.max_samples = max_samples
        self._rng = np.random.default_rng(seed)
        self._buf = np.empty(0, np.float32)
        self._cache: dict[tuple[bool, int], float] = {}

    def update(self, x: np.ndarray) -> None:
        seen = self.count
        super().update(x)
        self._cache.clear()
        flat = np.asarray(x, np.float32).reshape(-1)
        room = self.max_samples - len(self._buf)
        if room > 0:  # fill phase: keep everything
            self._buf = np.concatenate([self._buf, flat[:room]])
            seen, flat = seen + min(room, len(flat)), flat[room:]
        if len(flat):
            # item i (1-based stream index) replaces a random slot with prob cap / i;
            # float32 is ~6x faster than float64 here and its rounding of i is harmless
            u = self._rng.random(len(flat), dtype=np.float32)
            u *= np.arange(seen + 1, seen + 1 + len(flat), dtype=np.float32)
            take = np.flatnonzero(u < self.max_samples)
            self._buf[self._rng.integers(0, self.max_samples, len(take))] = flat[take]

    def threshold(self, signed: bool, bits: int) -> float:
        if not self.count:
            return _DEGENERATE_T
        key = (signed, bits)
        if key not in self._cache:
            self._cache[key] = _finish(self._threshold(signed, bits))
        return self._cache[key]

    def _threshold(self, signed: bool, bits: int) -> float:
        raise NotImplementedError


class PercentileObserver(_SampledObserver):
    """Threshold = the ``percentile`` of |x| (signed) or of x (unsigned)."""

    def __init__(self, percentile: float = 99.99, max_samples: int = 1 << 20,
                 seed: int = 0) -> None:
        super().__init__(max_samples, seed)
        self.percentile = percentile

    @classmethod
    def from_spec(cls, spec: CalibSpec) -> "PercentileObserver":
        return cls(spec.percentile, seed=spec.seed)

    def _threshold(self, signed: bool, bits: int) -> float:
        v = np.abs(self._buf) if signed else self._buf
        return float(np.percentile(v, self.percentile))


class MSEObserver(_SampledObserver):
    """Threshold minimising the MSE of round-to-nearest, clip-to-range quantization.

    Searches T = max * k / ``grid`` for k = 1..grid, so T never exceeds the minmax
    threshold. The integer range is the one ``quantize.py``'s QType uses: [-qmax-1, qmax]
    signed (so 4-bit codes reach -8), [0, qmax] unsigned (negatives simply clip to 0).
    """

    def __init__(self, grid: int = 100, max_samples: int = 1 << 20, seed: int = 0) -> None:
        super().__init__(max_samples, seed)
        self.grid = grid

    @classmethod
    def from_spec(cls, spec: CalibSpec) -> "MSEObserver":
        return cls(seed=spec.seed)

    def _threshold(self, signed: bool, bits: int) -> float:
        top = max(-self.min, self.max) if signed else self.max
        if not np.isfinite(top) or top <= _TINY:
            return top
        a = self._buf
        qmax = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
        qmin = np.float32(-qmax - 1 if signed else 0)
        cands = top * np.arange(1, self.grid + 1, dtype=np.float64) / self.grid
        buf = np.empty_like(a)
        errs = np.empty(len(cands))
        for i, t in enumerate(cands):
            s = np.float32(t / qmax)
            # in-place ops: no temporaries per candidate over a 2^20-value sample
            np.multiply(a, np.float32(1.0) / s, out=buf)
            np.rint(buf, out=buf)
            np.clip(buf, qmin, np.float32(qmax), out=buf)
            buf *= s
            buf -= a
            errs[i] = float(np.dot(buf, buf))
        return float(cands[int(np.argmin(errs))])


OBSERVERS: dict[str, Callable[[CalibSpec], Observer]] = {
    "minmax": MinMaxObserver.from_spec,
    "percentile": PercentileObserver.from_spec,
    "mse": MSEObserver.from_spec,
}


@dataclass(frozen=True)
class TensorStats:
    """What calibration measured for one tensor; ``observer`` answers threshold queries."""

    name: str
    min: float
    max: float
    observer: Observer

    def threshold(self, signed: bool, bits: int) -> float:
        return self.observer.threshold(signed, bits)


def to_stats(observers: dict[str, Observer]) -> dict[str, TensorStats]:
    """Freeze ``collect_stats`` output into typed records."""
    return {k: TensorStats(k, o.min, o.max, o) for k, o in observers.items()}


# ----------------------------------------------------------------------------- float runs


def _line(e: Exception) -> str:
    """First line of an error message: our errors promise a single line."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class FloatRunner:
    """One onnxruntime session over a copy of ``model`` that also outputs ``tensors``.

    Graph optimizations are off so every named intermediate exists unchanged (fusion would
    rename or drop them). The caller's model is never touched.
    """

    def __init__(self, model: onnx.ModelProto, tensors: Sequence[str] = ()) -> None:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        g = m.graph
        inits = {i.name for i in g.initializer}
        inputs = [i for i in g.input if i.name not in inits]
        if len(inputs) != 1:
            raise BadModelError(f"expected one graph input, got {[i.name for i in inputs]}")
        self.input_name = inputs[0].name
        dims = inputs[0].type.tensor_type.shape.dim
        # a batch dim fixed to 1 forces sample-by-sample runs
        self.fixed_batch = dims[0].dim_value if len(dims) and dims[0].HasField("dim_value") else 0
        self.graph_outputs = tuple(o.name for o in g.output)
        produced = {o for n in g.node for o in n.output}
        missing = [t for t in tensors if t not in produced and t != self.input_name]
        if missing:
            raise BadModelError(f"tensor(s) {missing} are not produced by any node of the model")
        self.tensors = tuple(dict.fromkeys(tensors))
        # extra outputs carry only the element type: a stale declared shape could clash
        elem = {v.name: v.type.tensor_type.elem_type for v in g.value_info}
        try:
            inferred = onnx.shape_inference.infer_shapes(m).graph.value_info
            elem.update({v.name: v.type.tensor_type.elem_type for v in inferred})
        except Exception:  # inference is a nicety here; FLOAT is the fallback
            pass
        for t in self.tensors:
            if t not in self.graph_outputs and t != self.input_name:
                g.output.append(onnx.helper.make_tensor_value_info(
                    t, elem.get(t) or onnx.TensorProto.FLOAT, None))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.log_severity_level = 3
        try:
            self._sess = ort.InferenceSession(m.SerializeToString(), opts,
                                              providers=["CPUExecutionProvider"])
        except Exception as e:
            raise BadModelError(f"onnxruntime cannot load the model: {_line(e)}") from None
        self._fetch = [o.name for o in self._sess.get_outputs()]

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Float values of the requested tensors and the graph outputs for batch ``x``."""
        x = np.ascontiguousarray(x, np.float32)
        if self.fixed_batch and len(x) != self.fixed_batch:
            if self.fixed_batch != 1:
                raise DataError(f"the model's batch dim is {self.fixed_batch}, got {len(x)}")
            parts = [self.run(x[i:i + 1]) for i in range(len(x))]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        try:
            vals = self._sess.run(self._fetch, {self.input_name: x})
        except Exception as e:
            raise DataError(f"onnxruntime failed on input of shape {x.shape}: "
                            f"{_line(e)}") from None
        out = dict(zip(self._fetch, vals))
        if self.input_name in self.tensors:
            out[self.input_name] = x
        return out


_LAST_RUNNER: list[tuple[tuple[int, int, tuple[str, ...]], onnx.ModelProto, FloatRunner]] = []


def run_float(model: onnx.ModelProto, x: np.ndarray, tensors: list[str]) -> dict[str, np.ndarray]:
    """Float values of ``tensors`` (plus the graph outputs) for input ``x``.

    Caches the last session, keyed by the model object, its size and the tensor list;
    for many calls on one model a ``FloatRunner`` held by the caller is the cheaper path.
    """
    key = (id(model), model.ByteSize(), tuple(tensors))
    if not _LAST_RUNNER or _LAST_RUNNER[0][0] != key:
        # the strong reference to ``model`` keeps its id from being reused while cached
        _LAST_RUNNER[:] = [(key, model, FloatRunner(model, tensors))]
    return _LAST_RUNNER[0][2].run(x)


def collect_stats(model: onnx.ModelProto, tensors: list[str], reader: Reader, method: str,
                  spec: CalibSpec, progress: bool = False) -> dict[str, Observer]:
    """Run every reader batch through the float model and return one ``method`` observer
    (see ``OBSERVERS``) per name in ``tensors``; the caller's model is not modified."""
    make = OBSERVERS.get(method)
    if make is None:
        raise UsageError(f"--calibrator must be one of {tuple(OBSERVERS)}, got {method!r}")
    runner = FloatRunner(model, tensors)
    observers = {t: make(spec) for t in runner.tensors}
    if hasattr(reader, "rewind"):  # ORT's own readers may lack it
        reader.rewind()
    total = len(reader) if hasattr(reader, "__len__") else None
    with tqdm(total=total, desc="calibrate", unit="sample", disable=not progress) as bar:
        while (batch := reader.get_next()) is not None:
            if runner.input_name not in batch:
                raise DataError(f"reader yields {sorted(batch)}, the model input is "
                                f"{runner.input_name!r}")
            vals = runner.run(batch[runner.input_name])
            for t, obs in observers.items():
                obs.update(vals[t])
                if obs.count and not (np.isfinite(obs.min) and np.isfinite(obs.max)):
                    raise DataError(f"tensor {t!r} has NaN/inf values on calibration data")
            bar.update(len(batch[runner.input_name]))
    return observers
