"""Shared by the x86 kernel tests: compile and run one PrimFunc, NumPy references for
requantization, windows and weights (integer kernels have no tolerance)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import tvm
from numpy.lib.stride_tricks import sliding_window_view

from qcompile.targets.x86 import amx as x86_amx, kernel_rules as x86_rules
from qcompile.hw.facts import cpu_flags
from qcompile.hw.backends import make_target

Pads = tuple[int, int, int, int]
# Whether builds here pick AMX tile kernels (the CPU has them and the OS grants them).
AMX_HERE = set(x86_amx.CPU_FLAGS) <= x86_rules.usable_flags(cpu_flags())
DENSE_U8 = "dense_amx" if AMX_HERE else "dense_vnni"  # a uint8 dense with K % 64 == 0


def _compile(f: tvm.tirx.PrimFunc) -> tvm.runtime.Executable:
    return tvm.compile(tvm.IRModule({"main": f}), target=make_target("llvm"))


def _run(f: tvm.tirx.PrimFunc, args: Sequence[np.ndarray], out_shape: tuple[int, ...],
         out_dtype: str) -> np.ndarray:
    ts = [tvm.runtime.tensor(a) for a in args] + [tvm.runtime.tensor(np.zeros(out_shape, out_dtype))]
    _compile(f)(*ts)
    return ts[-1].numpy()


def _rand(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, shape).astype(dtype)


def _qparams(rng: np.random.Generator, acc: np.ndarray, out_dtype: str,
             axes: tuple[int, ...] = (-1,)) -> tuple[list[np.ndarray], np.ndarray]:
    """Requantization m, r = 2^(s-1), s (as in qgraph) per channel (``axes`` of ``acc``),
    derived from the accumulator's actual spread, and an offset for the bias.

    Random multipliers would saturate almost every output, leaving the rounding barely
    tested. Here m / 2^s maps each channel's spread onto 60-95% of the output range and
    the offset (added to the bias by the caller; callers without a bias skip it) centres
    it, so most outputs land strictly inside and every rounding term matters. m has
    8..30 significant bits (s up to 62); every 4th channel takes s = 0 (r = 0, m = 1),
    the unrounded path, which mostly saturates."""
    info = np.iinfo(out_dtype)
    lo, hi = int(info.min), int(info.max)
    axes = tuple(a % acc.ndim for a in axes)
    red = tuple(i for i in range(acc.ndim) if i not in axes)
    a = _wrap32(acc).astype(np.int64)
    amin, amax = a.min(axis=red), a.max(axis=red)
    span = np.maximum(amax - amin, 1).astype(np.float64)
    t = rng.uniform(0.6, 0.95, span.shape) * (hi - lo) / span
    bits = rng.integers(8, 31, span.shape)  # m in [2^(bits-1), 2^bits)
    s = np.clip(bits - 1 - np.floor(np.log2(t)).astype(np.int64), 1, 62)
    m = np.clip(np.round(np.ldexp(t, s)), 1, 2**31 - 1).astype(np.int64)
    offset = np.round((lo + hi) / 2 * np.ldexp(1.0, s) / m - (amin + amax) / 2).astype(np.int64)
    unrounded = (np.arange(span.size) % 4 == 3).reshape(span.shape)
    s, m = np.where(unrounded, 0, s), np.where(unrounded, 1, m)
    offset = np.where(unrounded, 0, offset)
    r = np.where(s > 0, np.left_shift(1, np.maximum(s - 1, 0)), 0).astype(np.int64)
    return [m, r, s], offset


def _requant_setup(rng: np.random.Generator, acc: np.ndarray, bias: np.ndarray, raw: bool,
                   out_dtype: str) -> tuple[np.ndarray, np.ndarray, list[np.ndarray] | None]:
    """(acc, bias, q) with the bias (and so acc) shifted by ``_qparams``'s offset."""
    if raw:
        return acc, bias, None
    q, off = _qparams(rng, acc, out_dtype)
    return acc + off, (bias.astype(np.int64) + off).astype(np.int32), q


def _requant(acc: np.ndarray, q: Sequence[np.ndarray], lo: int, hi: int, dtype: str) -> np.ndarray:
    m, r, s = q
    return np.clip((acc.astype(np.int64) * m + r) >> s, lo, hi).astype(dtype)


def _wrap32(v: np.ndarray) -> np.ndarray:
    return v.astype(np.int64).astype(np.int32)  # two's-complement wrap, as the kernels do


def _windows(x: np.ndarray, kh: int, kw: int, strides: Sequence[int], pads: Pads,
             dil: Sequence[int], fill: int) -> np.ndarray:
    """(N, OH, OW, C, kh, kw) view of padded NHWC x."""
    pt, pl, pb, pr = pads
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=fill)
    eh, ew = (kh - 1) * dil[0] + 1, (kw - 1) * dil[1] + 1
    win = sliding_window_view(xp, (eh, ew), axis=(1, 2))[:, ::strides[0], ::strides[1]]
    return win[..., ::dil[0], ::dil[1]]


def _weights(rng: np.random.Generator, shape: tuple[int, ...], w_bits: int) -> np.ndarray:
    """int8 weights at ``w_bits``: the full int8 range, or every int4 value -8..7."""
    return _rand(rng, shape, "int8") if w_bits == 8 else rng.integers(-8, 8, shape).astype(np.int8)


def _expected(acc: np.ndarray, q: Sequence[np.ndarray] | None, out_dtype: str) -> np.ndarray:
    """The kernel's output in NumPy; requantized outputs must mostly be unsaturated."""
    if q is None:
        return _wrap32(acc)
    info = np.iinfo(out_dtype)
    out = _requant(_wrap32(acc), q, int(info.min), int(info.max), out_dtype)
    inside = float(((out > info.min) & (out < info.max)).mean())
    assert inside >= 0.5, f"only {inside:.0%} of the outputs are unsaturated"
    return out
