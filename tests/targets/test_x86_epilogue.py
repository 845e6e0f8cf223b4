"""qcompile/targets/x86/epilogue.py: the int32 ("mulhi", "mulhi_shl") requantizations equal the
int64 one bit for bit, and the ops fused into a kernel's epilogue (residual add, clip,
table lookup) equal the unfused integer ops, in conv, dense and depthwise kernels.

NumPy-only identity checks run on many random values; each kernel case compiles one small
PrimFunc (~0.5 s) and compares its whole output with ``np.array_equal``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pytest
import tvm
from numpy.lib.stride_tricks import sliding_window_view

from qcompile.targets.x86 import depthwise as Dw
from qcompile.targets.x86 import epilogue as E
from qcompile.targets.x86 import vnni as V
from qcompile.targets.x86 import window as Wd
from qcompile.hw.facts import has_vnni
from qcompile.hw.backends import make_target

needs_vnni = pytest.mark.skipif(
    not has_vnni(), reason="CPU lacks avx512_vnni (no 'avx512_vnni' in /proc/cpuinfo flags)")


# ----------------------------------------------------------------------------- helpers
def _int64_requant(v: np.ndarray, m: np.ndarray, r: np.ndarray, s: np.ndarray) -> np.ndarray:
    return (v.astype(np.int64) * m + r) >> s


def _mulhi_requant(v: np.ndarray, q: Sequence[np.ndarray]) -> np.ndarray:
    """The kernels' int32 arithmetic, emulated in int64: the 64-bit product's high half."""
    m, *rest = q
    if len(rest) == 3:  # mulhi_shl
        pre, rnd, sh = rest
        v = (v.astype(np.int64) << pre).astype(np.int32)  # must not wrap: checked below
    else:
        rnd, sh = rest
    high = (v.astype(np.int64) * m) >> 32
    assert (np.abs(high) < 2**31).all()
    return (high + rnd) >> sh


def _params(rng: np.random.Generator, n: int, small_s: int = 0) -> list[np.ndarray]:
    """qgraph-style m in [2^30, 2^31), r = 2^(s-1), s in 33..62 (``small_s`` channels get
    s in 1..32 and m ~ 1, as a near-zero-weight channel does)."""
    s = rng.integers(33, 63, n)
    m = rng.integers(1 << 30, 1 << 31, n)
    s[:small_s] = rng.integers(1, 33, small_s)
    return [m, np.left_shift(1, s - 1), s]


def _wrap32(v: np.ndarray) -> np.ndarray:
    return v.astype(np.int64).astype(np.int32)


def _run(f: tvm.tirx.PrimFunc, args: Sequence[np.ndarray], shape: tuple[int, ...],
         dtype: str) -> np.ndarray:
    lib = tvm.compile(tvm.IRModule({"main": f}), target=make_target("llvm"))
    ts = [tvm.runtime.tensor(a) for a in args] + [tvm.runtime.tensor(np.zeros(shape, dtype))]
    lib(*ts)
    return ts[-1].numpy()


def _windows(x: np.ndarray, k: int, st: int, pad: int) -> np.ndarray:
    xp = np.pad(x.astype(np.int64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    return sliding_window_view(xp, (k, k), axis=(1, 2))[:, ::st, ::st]


# ----------------------------------------------------------------------------- NumPy identity
@pytest.mark.unit
def test_mulhi_equals_int64_on_random_and_extreme_values() -> None:
    rng = np.random.default_rng(0)
    n = 4096
    m, r, s = _params(rng, n)
    acc = rng.integers(-2**31, 2**31, n)
    acc[:8] = [-2**31, 2**31 - 1, 0, -1, 1, -2**30, 2**30, 12345]
    assert E.requant_mode(m, r, s) == "mulhi"
    q = E.requant_arrays("mulhi", m, r, s)
    assert all(a.dtype == np.int32 for a in q)
    np.testing.assert_array_equal(_mulhi_requant(acc, q), _int64_requant(acc, m, r, s))


@pytest.mark.unit
def test_mulhi_shl_brings_small_shifts_up_when_the_bound_allows() -> None:
    rng = np.random.default_rng(1)
    n = 2048
    m, r, s = _params(rng, n, small_s=n // 2)
    pre = np.maximum(33 - s, 0)
    bound = (np.int64(2**31 - 1) >> pre).astype(np.int64)  # the largest |acc| that fits
    acc = (rng.uniform(-1, 1, n) * bound).astype(np.int64)
    acc[:2] = [bound[0], -bound[1]]
    assert E.requant_mode(m, r, s) == "int64"  # no bound: cannot shift
    assert E.requant_mode(m, r, s, bound) == "mulhi_shl"
    assert E.requant_mode(m, r, s, bound + 1) == "int64"  # one bit short somewhere
    q = E.requant_arrays("mulhi_shl", m, r, s, bound)
    np.testing.assert_array_equal(_mulhi_requant(acc, q), _int64_requant(acc, m, r, s))


@pytest.mark.unit
def test_requant_mode_refuses_what_mulhi_cannot_do() -> None:
    m, r, s = np.array([1 << 30]), np.array([1 << 39]), np.array([40])
    assert E.requant_mode(m, r, s) == "mulhi"
    assert E.requant_mode(m, r + 1, s) == "int64"          # not round-half-up
    assert E.requant_mode(np.array([1 << 31]), r, s) == "int64"  # m past int32
    assert E.requant_mode(np.array([1]), np.array([0]), np.array([0]), 10) == "int64"  # s = 0
    assert E.requant_mode(m, np.array([1 << 62]), np.array([63])) == "int64"  # s past 62
    with pytest.raises(ValueError, match="does not apply"):
        E.requant_arrays("mulhi", m, r + 1, s)


@pytest.mark.unit
def test_epilogue_rejects_bounds_outside_its_dtype_and_ops_on_raw() -> None:
    with pytest.raises(ValueError, match="outside"):
        E.Epilogue("int8", False, lo=0, hi=255)
    with pytest.raises(ValueError, match="no fused ops"):
        E.Epilogue("int32", True, post=(E.FusedClip(0, 5),))
    post = (E.FusedAdd(1, (1,), ("int8",), 0, 0, 0, 255, "int32", "uint8"), E.FusedClip(0, 9))
    assert E.Epilogue("int8", False, post=post).final_dtype == "uint8"


# ----------------------------------------------------------------------------- kernels
def _conv_case(rng: np.random.Generator, n: int, h: int, c: int, oc: int, k: int, st: int,
               pad: int, in_dtype: str = "uint8"
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x, w (OIHW), bias and the exact int32 acc + bias (NHWC) of a small conv."""
    lo, hi = (0, 256) if in_dtype == "uint8" else (-128, 128)
    x = rng.integers(lo, hi, (n, h, h, c)).astype(in_dtype)
    w = rng.integers(-128, 128, (oc, c, k, k)).astype(np.int8)
    bias = rng.integers(-2**16, 2**16, oc).astype(np.int32)
    acc = np.einsum("bhwcij,ocij->bhwo", _windows(x, k, st, pad), w.astype(np.int64)) + bias
    return x, w, bias, acc


def _centred_params(rng: np.random.Generator, acc: np.ndarray, out_dtype: str,
                    small_s: int = 0) -> list[np.ndarray]:
    """m, r, s per channel with s >= 33 mapping the acc's spread onto the output range
    (so the rounding matters), ``small_s`` channels with s < 33 (the m ~ 1 case)."""
    info = np.iinfo(out_dtype)
    a = acc.reshape(-1, acc.shape[-1]).astype(np.int64)
    span = np.maximum(np.abs(a).max(axis=0), 1).astype(np.float64)
    M = rng.uniform(0.3, 0.9, span.shape) * max(-info.min, info.max) / span
    s = np.maximum(30 - np.floor(np.log2(M)).astype(np.int64), 33)
    m = np.round(np.ldexp(M, s)).astype(np.int64)
    m = np.minimum(m, 2**31 - 1)
    s[:small_s], m[:small_s] = 30, 1 << 30
    return [m, np.left_shift(1, s - 1), s]


def _expected(acc: np.ndarray, q: Sequence[np.ndarray], lo: int, hi: int) -> np.ndarray:
    return np.clip(_int64_requant(_wrap32(acc), *q), lo, hi)


def _post_ref(y: np.ndarray, post: Sequence[E.Post], extra: Sequence[np.ndarray]) -> np.ndarray:
    """The unfused integer ops, as qgraph and the oracle define them."""
    extra = iter(extra)
    for p in post:
        if isinstance(p, E.FusedAdd):
            v = y.astype(np.int64) * p.m_self + p.r
            for mj in p.m_others:
                v = v + next(extra).astype(np.int64) * mj
            if p.acc_dtype == "int32":
                assert (np.abs(v) < 2**31).all()
            y = np.clip(v >> p.s, p.lo, p.hi)
        elif isinstance(p, E.FusedClip):
            y = np.clip(y, p.lo, p.hi)
        else:
            table = next(extra).reshape(p.rows, p.width)
            ch = np.arange(y.shape[-1]) if p.rows > 1 else np.zeros(y.shape[-1], np.int64)
            y = table[ch, y.astype(np.int64) + p.offset]
    return y


def _residual(rng: np.random.Generator, shape: tuple[int, ...], acc_dtype: str = "int32",
              dtype: str = "int8") -> tuple[E.FusedAdd, np.ndarray]:
    """A qadd y*m0 + x*m1 with a shared 22-bit shift (as quantize.add) and its x."""
    s = 22
    m0, m1 = (int(v) for v in rng.integers(1 << 19, 1 << 21, 2))
    x = rng.integers(-128, 128, shape).astype(dtype)
    return E.FusedAdd(m0, (m1,), (dtype,), 1 << (s - 1), s, -128, 127, acc_dtype, "int8"), x


def _lut(rng: np.random.Generator, rows: int) -> tuple[E.FusedLut, np.ndarray]:
    """A 256-entry uint8 table per row, indexed by v + 128 (an int8 input)."""
    return E.FusedLut(128, rows, 256, "uint8"), rng.integers(0, 256, (rows, 256)).astype(np.uint8)


@pytest.mark.hardware
@needs_vnni
@pytest.mark.parametrize("requant,small_s", [("mulhi", 0), ("mulhi_shl", 3)])
@pytest.mark.parametrize("n,h,c,oc,k,st,pad,in_dtype", [
    (1, 9, 16, 40, 1, 1, 0, "uint8"),   # ragged N (predicated epilogue)
    (2, 8, 12, 32, 3, 2, 1, "int8"),    # padded, signed input, batch folded into M
])
def test_conv_int32_requant_exact(n: int, h: int, c: int, oc: int, k: int, st: int, pad: int,
                                  in_dtype: str, requant: str, small_s: int) -> None:
    rng = np.random.default_rng(h * c + oc)
    x, w, bias, acc = _conv_case(rng, n, h, c, oc, k, st, pad, in_dtype)
    m, r, s = _centred_params(rng, acc, "int8", small_s)
    bound = np.abs(acc).reshape(-1, oc).max(axis=0) + 1  # stands in for the static bound
    assert E.requant_mode(m, r, s, bound) == requant
    kbias = V.signed_input_bias(w, bias) if in_dtype == "int8" else bias
    f = V.conv2d_nhwc_vnni(n, h, h, c, oc, k, k, (st, st), (pad,) * 4, out_dtype="int8",
                           in_dtype=in_dtype, lo=-100, hi=120, requant=requant)
    got = _run(f, [x, V.pack_conv_weights(w), kbias, *E.requant_arrays(requant, m, r, s, bound)],
               acc.shape, "int8")
    want = _expected(acc, (m, r, s), -100, 120)
    assert ((want > -100) & (want < 120)).mean() > 0.5  # the rounding is exercised
    np.testing.assert_array_equal(got, want)


@pytest.mark.hardware
@needs_vnni
@pytest.mark.parametrize("case", ["add_relu", "add64_clip_lut", "lut_per_channel"])
def test_conv_fused_ops_exact(case: str) -> None:
    """A 3x3 conv whose epilogue also runs a residual add (+ ReLU), a clip and a table."""
    rng = np.random.default_rng(len(case))
    n, h, c, oc = 2, 7, 8, 24
    x, w, bias, acc = _conv_case(rng, n, h, c, oc, 3, 1, 1)
    q = _centred_params(rng, acc, "int8")
    y = _expected(acc, q, -128, 127)
    add, skip = _residual(rng, acc.shape, "int64" if "add64" in case else "int32")
    if case == "add_relu":
        post, extra = (add, E.FusedClip(0, 127)), [skip]
    elif case == "add64_clip_lut":
        lut, table = _lut(rng, 1)
        post, extra = (add, E.FusedClip(-50, 90), lut), [skip, table.reshape(-1)]
    else:
        lut, table = _lut(rng, oc)
        post, extra = (lut,), [table.reshape(-1)]
    f = V.conv2d_nhwc_vnni(n, h, h, c, oc, 3, 3, (1, 1), (1, 1, 1, 1), out_dtype="int8",
                           requant="mulhi", post=post)
    ep = E.Epilogue("int8", False, post=post)
    got = _run(f, [x, V.pack_conv_weights(w), bias, *E.requant_arrays("mulhi", *q), *extra],
               acc.shape, ep.final_dtype)
    np.testing.assert_array_equal(got, _post_ref(y, post, extra))


@pytest.mark.hardware
@needs_vnni
def test_dense_fused_add_exact() -> None:
    rng = np.random.default_rng(7)
    m_, n_, k_ = 5, 20, 36
    a = rng.integers(0, 256, (m_, k_)).astype(np.uint8)
    w = rng.integers(-128, 128, (n_, k_)).astype(np.int8)
    bias = rng.integers(-2**16, 2**16, n_).astype(np.int32)
    acc = a.astype(np.int64) @ w.astype(np.int64).T + bias
    q = _centred_params(rng, acc, "int8")
    add, skip = _residual(rng, acc.shape)
    f = V.dense_vnni(m_, n_, k_, requant="mulhi", post=(add,))
    got = _run(f, [a, V.pack_weights(w), bias, *E.requant_arrays("mulhi", *q), skip],
               acc.shape, "int8")
    np.testing.assert_array_equal(got, _post_ref(_expected(acc, q, -128, 127), (add,), [skip]))


@pytest.mark.hardware
@needs_vnni
@pytest.mark.parametrize("kernel", [Wd.depthwise_conv2d_nhwc, Dw.depthwise_conv2d_nhwc_vnni])
@pytest.mark.parametrize("fused", [False, True])
def test_depthwise_int32_requant_and_fused_ops_exact(fused: bool, kernel: Callable) -> None:
    rng = np.random.default_rng(11 + fused)
    n, h, c = 2, 9, 48
    x = rng.integers(0, 256, (n, h, h, c)).astype(np.uint8)
    w = rng.integers(-128, 128, (3, 3, c)).astype(np.int8)
    bias = rng.integers(-2**16, 2**16, c).astype(np.int32)
    acc = np.einsum("bhwcij,ijc->bhwc", _windows(x, 3, 2, 1), w.astype(np.int64)) + bias
    q = _centred_params(rng, acc, "int8", small_s=2)
    bound = np.abs(acc).reshape(-1, c).max(axis=0) + 1
    add, skip = _residual(rng, acc.shape)
    lut, table = _lut(rng, c)
    post, extra = ((add, lut), [skip, table.reshape(-1)]) if fused else ((), [])
    f = kernel(n, h, h, c, 3, 3, (2, 2), (1, 1, 1, 1), out_dtype="int8", requant="mulhi_shl",
               post=post)
    got = _run(f, [x, w, bias, *E.requant_arrays("mulhi_shl", *q, bound), *extra], acc.shape,
               E.Epilogue("int8", False, post=post).final_dtype)
    np.testing.assert_array_equal(got, _post_ref(_expected(acc, q, -128, 127), post, extra))


@pytest.mark.hardware
@needs_vnni
def test_pools_int32_requant_exact() -> None:
    rng = np.random.default_rng(13)
    x = rng.integers(-128, 128, (2, 7, 7, 24)).astype(np.int8)
    acc = x.astype(np.int64).sum(axis=(1, 2), keepdims=True)
    m, r, s = (v.reshape(1, 1) for v in _centred_params(rng, acc.reshape(-1, 1), "int8"))
    f = Wd.global_sum_pool_nhwc(2, 7, 7, 24, in_dtype="int8", out_dtype="int8", raw=False,
                                requant="mulhi")
    got = _run(f, [x, *E.requant_arrays("mulhi", m, r, s)], acc.shape, "int8")
    np.testing.assert_array_equal(got, np.clip(_int64_requant(acc, m, r, s), -128, 127))
