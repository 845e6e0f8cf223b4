"""What both sides of the GPU check compute the same way: the check input and the float
peers' weight fingerprint. Travels in the bundle; imports numpy (and onnx when asked)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

INPUT_SEED = 20261127


def check_input(batch: int, size: int) -> np.ndarray:
    """The seeded N(0, 1) input every artifact is checked on. RandomState, not Generator:
    NumPy keeps the legacy stream fixed across versions, and the host's NumPy may differ."""
    rs = np.random.RandomState(INPUT_SEED)
    return rs.standard_normal((batch, 3, size, size)).astype(np.float32)


def onnx_weights_sha(path: str | Path) -> str:
    """sha256 over a model's initializers (name, dtype, shape, bytes), in graph order."""
    import onnx
    from onnx import numpy_helper

    h = hashlib.sha256()
    for t in onnx.load(str(path)).graph.initializer:
        a = np.ascontiguousarray(numpy_helper.to_array(t))
        h.update(f"{t.name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()
