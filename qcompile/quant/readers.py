"""Calibration and evaluation data: readers in onnxruntime's reader protocol.

Readers say *what data* flows in (``get_next() -> dict | None``, so they also
plug into ``onnxruntime.quantization``); ``make_reader`` picks one from a
``CalibSpec`` and ``load_inputs`` stacks samples for evaluation.
"""
from __future__ import annotations

import abc

import warnings
import zipfile
from pathlib import Path
from typing import BinaryIO, Iterator, NamedTuple, Protocol, Sequence

import numpy as np
from PIL import Image

from qcompile.config import CalibSpec, Preprocess
from qcompile.errors import DataError, UsageError

ARRAY_EXTS: frozenset[str] = frozenset({".npy", ".npz"})
IMAGE_EXTS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})


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


class _Reader(abc.ABC):
    """Shared batching, rewind and length; subclasses only yield sample chunks."""

    def __init__(self, input_name: str, input_shape: Sequence[int], batch_size: int,
                 available: int, limit: int | None) -> None:
        self.input_name = input_name
        self.sample_shape = tuple(int(d) for d in input_shape[1:])
        self.batch_size = batch_size
        self._n = available if limit is None else min(available, limit)
        self._it: Iterator[np.ndarray] | None = None

    @abc.abstractmethod
    def _chunks(self) -> Iterator[np.ndarray]:
        """(k, *sample_shape) arrays, any k, in order."""

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
                            "synthetic data needs a fixed shape, pass --data DIR")
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
                      "inputs; pass --data DIR with .npy/.npz files or images", stacklevel=3)
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


def open_source(source: str, p: Preprocess, input_name: str, input_shape: Sequence[int],
                limit: int | None, batch_size: int = 64) -> Reader:
    """A reader over a folder's or file's samples in order (all of them when ``limit`` is
    None): what compile's fidelity guard counts and holds back."""
    return _open(source, p, input_name, input_shape, limit, batch_size, 0)


def load_inputs(source: str, p: Preprocess, input_shape: tuple[int, ...], limit: int) -> np.ndarray:
    """All samples of ``source`` stacked to (N, ...) float32, for evaluation.
    ``limit`` > 0 caps N; 0 means every sample in the folder (not allowed for synthetic)."""
    reader = _open(source, p, "input", input_shape, limit if limit > 0 else None, 64, 0)
    batches = []
    while (b := reader.get_next()) is not None:
        batches.append(b["input"])
    return np.concatenate(batches) if batches else np.zeros((0, *input_shape[1:]), np.float32)


# ----------------------------------------------------------------------------- consumers
# The calibration reader is shared by the stages (calibrate, equalize, GPTQ, bias
# correction, sensitivity, compile's check): every pass rewinds it first, and these two
# rewind it after as well, so whoever reads next starts from the first sample.


def gather_inputs(reader: Reader, limit: int) -> np.ndarray:
    """Up to ``limit`` samples from the reader's first on, as one float32 batch."""
    reader.rewind()
    parts, n = [], 0
    while n < limit and (batch := reader.get_next()) is not None:
        x = next(iter(batch.values()))
        parts.append(x[:limit - n])
        n += len(parts[-1])
    reader.rewind()
    if not parts:
        raise DataError("the calibration data yields no samples")
    return np.concatenate(parts).astype(np.float32)


def iter_inputs(reader: Reader) -> Iterator[np.ndarray]:
    """Every batch's input array, from the first sample on; the reader is rewound again
    when the pass ends (also when the caller stops early and closes the iterator)."""
    reader.rewind()
    try:
        while (batch := reader.get_next()) is not None:
            yield next(iter(batch.values()))
    finally:
        reader.rewind()
