"""The bit-exact oracle: executes a ``QGraph`` with NumPy integers.

It imports NumPy only (and ``qgraph`` for type names): no TVM, no lowering code,
no kernels.  Node semantics are re-implemented from the table in ``qgraph.py``.

Convolutions and matmuls run through float64 BLAS for speed.  That is still exact
integer arithmetic: every operand is an integer of at most 8 bits and
``check_exact`` asserts that each layer's worst-case |accumulator| is below 2^53,
where every partial sum is representable in a double and no rounding can occur.

Every value the compiled code keeps in int32 lanes (conv/dense accumulators with and
without the bias, int32 residual adds, pool window sums, LRN sums of squares) is
computed here in int64 and checked: one outside int32 raises ``Int32OverflowError``
instead of wrapping, since the quantizer proved that cannot happen and an artifact
that wrapped would be wrong, not bit-exact.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from qcompile.ir.qgraph import QGraph, QNode

EXACT_F64 = 1 << 53
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


class Int32OverflowError(OverflowError):
    """A value the compiled code holds in int32 left the int32 range."""


def _int32(v: np.ndarray, n: QNode, what: str) -> np.ndarray:
    """``v`` (int64) unchanged if every element fits int32, else ``Int32OverflowError``."""
    v = np.asarray(v, np.int64)
    if v.size:
        lo, hi = int(v.min()), int(v.max())
        if lo < INT32_MIN or hi > INT32_MAX:
            bad = hi if hi > INT32_MAX else lo
            raise Int32OverflowError(
                f"{n.op} {n.name!r}: int32 {what} overflows ({bad} is outside "
                f"[-2^31, 2^31-1]); the compiled code would wrap")
    return v


def _exact_int(v: np.ndarray) -> np.ndarray:
    """Cast an integer-valued float64 result back to int64 (exactness is pre-checked)."""
    return np.rint(v).astype(np.int64)


def _windows(x: np.ndarray, kernel: tuple[int, int], strides: tuple[int, int],
             pads: tuple[int, int, int, int], dilations: tuple[int, int], fill: int) -> np.ndarray:
    """(N, C, OH, OW, kh, kw) view of padded x."""
    pt, pl, pb, pr = pads
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=fill)
    dh, dw = dilations
    eh, ew = (kernel[0] - 1) * dh + 1, (kernel[1] - 1) * dw + 1
    win = sliding_window_view(xp, (eh, ew), axis=(2, 3))[:, :, ::strides[0], ::strides[1]]
    return win[..., ::dh, ::dw]


def _requant(acc: np.ndarray, n: QNode, m: str = "m", r: str = "r", s: str = "s") -> np.ndarray:
    p = n.params
    v = (acc.astype(np.int64) * p[m] + p[r]) >> p[s]
    return np.clip(v, n.attrs["lo"], n.attrs["hi"])


def _conv(n: QNode, x: np.ndarray) -> np.ndarray:
    w = n.params["w"].astype(np.float64)
    o, ipg, kh, kw = w.shape
    g = n.attrs["group"]
    win = _windows(x, (kh, kw), n.attrs["strides"], n.attrs["pads"], n.attrs["dilations"], 0)
    nb, c, oh, ow = win.shape[:4]
    if ipg == 1 and o == g:  # depthwise: kh*kw broadcast multiply-adds beat a batched GEMM
        acc = np.zeros((nb, o, oh, ow), np.float64)
        for i in range(kh):
            for j in range(kw):
                acc += win[..., i, j] * w[:, 0, i, j].reshape(1, o, 1, 1)
    else:  # im2col, then one 2-D BLAS GEMM per group: (nb*OH*OW, K) @ (K, O/g)
        og, k = o // g, ipg * kh * kw
        cols = win.reshape(nb, g, ipg, oh, ow, kh, kw).transpose(1, 0, 3, 4, 2, 5, 6)
        cols = cols.astype(np.float64).reshape(g, nb * oh * ow, k)
        wm = w.reshape(g, og, k)
        acc = np.empty((nb * oh * ow, o), np.float64)
        for gi in range(g):
            acc[:, gi * og:(gi + 1) * og] = cols[gi] @ wm[gi].T
        acc = acc.reshape(nb, oh, ow, o).transpose(0, 3, 1, 2)
    return _with_bias(n, _exact_int(acc))


def _with_bias(n: QNode, acc: np.ndarray) -> np.ndarray:
    """acc + bias, both checked to fit int32 (the kernels add the bias to an int32 acc)."""
    acc = _int32(acc, n, "accumulator")
    return _int32(acc + n.params["bias"].astype(np.int64), n, "accumulator + bias")


def qconv(n: QNode, x: np.ndarray) -> np.ndarray:
    acc = _conv(n, x)
    return acc if n.attrs["raw"] else _requant(acc, n)


def qdense(n: QNode, x: np.ndarray) -> np.ndarray:
    acc = _exact_int(x.astype(np.float64) @ n.params["w"].astype(np.float64))
    acc = _with_bias(n, acc)
    return acc if n.attrs["raw"] else _requant(acc, n)


def qadd(n: QNode, *xs: np.ndarray) -> np.ndarray:
    p = n.params
    v = sum(x.astype(np.int64) * p[f"m{i}"] for i, x in enumerate(xs)) + p["r"]
    if n.attrs.get("acc_dtype") == "int32":  # summed in int32 lanes
        v = _int32(v, n, "sum")
    return np.clip(v >> p["s"], n.attrs["lo"], n.attrs["hi"])


def qmul(n: QNode, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    p = n.params
    v = (a.astype(np.int64) * b.astype(np.int64) * p["m"] + p["r"]) >> p["s"]
    return np.clip(v, n.attrs["lo"], n.attrs["hi"])


def qaffine(n: QNode, x: np.ndarray) -> np.ndarray:
    p = n.params
    return np.clip((x.astype(np.int64) * p["m"] + p["c"]) >> p["s"], n.attrs["lo"], n.attrs["hi"])


def lut(n: QNode, x: np.ndarray) -> np.ndarray:
    table = n.params["table"]
    i = x.astype(np.int64) + n.attrs["offset"]
    if table.shape[0] == 1:
        return table[0][i]
    ch = np.arange(x.shape[1]).reshape((1, -1) + (1,) * (x.ndim - 2))
    return table[ch, i]


def lrn(n: QNode, x: np.ndarray) -> np.ndarray:
    size, c = n.attrs["size"], x.shape[1]
    sq = np.pad(x.astype(np.int64) ** 2, ((0, 0), ((size - 1) // 2, size // 2), (0, 0), (0, 0)))
    total = _int32(sum(sq[:, i:i + c] for i in range(size)), n, "sum of squares")
    p = n.params
    v = (x.astype(np.int64) * p["table"][total >> n.attrs["k"]] + p["r"]) >> p["s"]
    return np.clip(v, n.attrs["lo"], n.attrs["hi"])


def pad(n: QNode, x: np.ndarray) -> np.ndarray:
    p, r = n.attrs["pads"], x.ndim
    return np.pad(x, [(p[i], p[r + i]) for i in range(r)], constant_values=n.attrs["value"])


def transpose(n: QNode, x: np.ndarray) -> np.ndarray:
    return x.transpose(n.attrs["perm"])


def slice_(n: QNode, x: np.ndarray) -> np.ndarray:
    a = n.attrs
    # axis 0 is the batch, never sliced (the importer refuses that)
    return x[(slice(None),) + tuple(slice(b, e, s) for b, e, s in
                                    zip(a["begin"][1:], a["end"][1:], a["step"][1:]))]


def gather(n: QNode, x: np.ndarray) -> np.ndarray:
    for axis in n.attrs["axes"]:
        x = x.take(n.params[f"idx{axis}"], axis=axis)
    return x


def clip(n: QNode, x: np.ndarray) -> np.ndarray:
    return np.clip(x, n.attrs["lo"], n.attrs["hi"])


def maxpool(n: QNode, x: np.ndarray) -> np.ndarray:
    fill = np.iinfo(x.dtype).min
    a = n.attrs
    win = _windows(x, a["kernel"], a["strides"], a["pads"], a.get("dilations", (1, 1)), fill)
    return win.max(axis=(4, 5))


def avgpool(n: QNode, x: np.ndarray) -> np.ndarray:
    a = n.attrs
    acc = _windows(x.astype(np.int64), a["kernel"], a["strides"], a["pads"], (1, 1), 0).sum(axis=(4, 5))
    return _requant(_int32(acc, n, "window sum"), n)


def gap(n: QNode, x: np.ndarray) -> np.ndarray:
    keep = n.attrs.get("keepdims", True)
    return _requant(_int32(x.astype(np.int64).sum(axis=(2, 3), keepdims=keep), n, "sum"), n)


def reshape(n: QNode, x: np.ndarray) -> np.ndarray:
    return x.reshape((x.shape[0],) + tuple(n.attrs["shape"][1:]))


def concat(n: QNode, *xs: np.ndarray) -> np.ndarray:
    parts = []
    for k, x in enumerate(xs):
        if n.attrs["identity"][k]:
            parts.append(x.astype(np.int64))
        else:
            parts.append(_requant(x, n, f"m{k}", f"r{k}", f"s{k}"))
    return np.concatenate(parts, axis=n.attrs["axis"])


# Each canonical op's OpDef (qcompile.ops) points to its function here; this module may not
# import the registry (its independence is what makes it an oracle), so it keeps its own
# table and tests/ops/test_opdefs.py checks the two agree.
OPS: dict[str, Callable[..., np.ndarray]] = {
    "qconv": qconv, "qdense": qdense, "qadd": qadd, "qmul": qmul, "qaffine": qaffine,
    "lut": lut, "lrn": lrn, "clip": clip, "maxpool": maxpool, "avgpool": avgpool, "gap": gap,
    "pad": pad, "transpose": transpose, "slice": slice_, "gather": gather,
    "flatten": reshape, "reshape": reshape, "concat": concat,
}


def check_exact(qg: QGraph) -> None:
    """Refuse graphs whose accumulators could be inexact in float64 BLAS."""
    for n in qg.nodes:
        if n.op in ("qconv", "qdense") and n.attrs["acc_bound"] >= EXACT_F64:
            raise ValueError(f"{n.name}: |acc| bound {n.attrs['acc_bound']} exceeds 2^53")


def quantize_input(qg: QGraph, x: np.ndarray) -> np.ndarray:
    """The float entry step, in float32 exactly as specified in ``QGraph``."""
    t = qg.input.qtype
    v = np.floor(x.astype(np.float32) * qg.input_inv_scale + np.float32(0.5))
    return np.clip(v, t.qmin, t.qmax).astype(t.dtype)


def run_integer(qg: QGraph, q: np.ndarray, keep: bool = False) -> dict[str, np.ndarray]:
    """Run the integer core on an already-quantized input.

    Returns ``{"output": int tensor}``, plus every intermediate when ``keep``.
    """
    check_exact(qg)
    env: dict[str, np.ndarray] = {qg.input.name: q}
    for n in qg.nodes:
        out = OPS[n.op](n, *(env[i] for i in n.inputs))
        env[n.output] = out.astype(qg.tensors[n.output].qtype.dtype)
    result = dict(env) if keep else {}
    result["output"] = env[qg.output.name]
    return result


def dequantize_output(qg: QGraph, y: np.ndarray) -> np.ndarray:
    """The float exit step: scale (per channel on axis 1) and optional softmax."""
    s = qg.output.scale.astype(np.float32)
    if s.ndim:
        s = s.reshape((1, -1) + (1,) * (y.ndim - 2))
    out = y.astype(np.float32) * s
    if qg.softmax_axis is not None:
        e = np.exp(out - out.max(axis=qg.softmax_axis, keepdims=True))
        out = e / e.sum(axis=qg.softmax_axis, keepdims=True)
    return out


def run(qg: QGraph, x: np.ndarray) -> np.ndarray:
    """Float in, float out, integer in between."""
    return dequantize_output(qg, run_integer(qg, quantize_input(qg, x))["output"])
