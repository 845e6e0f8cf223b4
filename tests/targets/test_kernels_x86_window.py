"""qcompile/targets/x86/depthwise.py and x86_window.py: depthwise convs (VNNI and int16)
and pools, bit-exact against NumPy integers."""
from __future__ import annotations

from functools import partial
from typing import Callable

import numpy as np
import pytest
import tvm

from qcompile.targets.x86 import depthwise as Dw
from qcompile.targets.x86 import vnni as V
from qcompile.targets.x86 import window as Wd
from qcompile.hw.facts import has_vnni
from tests.helpers.x86_kernel_helpers import (Pads, _expected, _qparams, _rand, _requant_setup, _run,
                                              _windows)

pytestmark = pytest.mark.skipif(
    not has_vnni(), reason="CPU lacks avx512_vnni (no 'avx512_vnni' in /proc/cpuinfo flags)")


# ----------------------------------------------------------------------------- depthwise
DEPTHWISE_CASES = [
    (1, 11, 11, 32, 3, (1, 1), (1, 1, 1, 1), (1, 1), "uint8", "uint8", False),
    (2, 7, 11, 16, 3, (2, 2), (0, 1, 1, 0), (1, 1), "int8", "int8", False),
    (1, 12, 12, 48, 5, (2, 2), (2, 2, 1, 1), (1, 1), "uint8", "int32", True),
    (1, 9, 9, 16, 3, (1, 1), (2, 2, 2, 2), (2, 2), "int8", "uint8", False),
    (1, 6, 6, 32, 3, (1, 1), (0, 0, 0, 0), (1, 1), "int8", "int8", False),  # int8, no pad
    (2, 15, 15, 16, 3, (1, 1), (1, 1, 1, 1), (1, 1), "uint8", "int8", False),  # owt 5 (not 14)
]


@pytest.mark.hardware
@pytest.mark.parametrize("N,H,W,C,k,st,pads,dil,in_dtype,out_dtype,raw", DEPTHWISE_CASES + [
    (2, 7, 11, 5, 3, (2, 2), (0, 1, 1, 0), (1, 1), "int8", "int8", False),   # C % 16 != 0
    (1, 9, 9, 7, 3, (1, 1), (2, 2, 2, 2), (2, 2), "int8", "uint8", False),
])
def test_depthwise_exact(N: int, H: int, W: int, C: int, k: int, st: tuple[int, int], pads: Pads,
                         dil: tuple[int, int], in_dtype: str, out_dtype: str, raw: bool) -> None:
    _check_depthwise(Wd.depthwise_conv2d_nhwc, N, H, W, C, k, st, pads, dil, in_dtype,
                     out_dtype, raw)


DEPTHWISE_VNNI_CASES = [(*case, pad) for case in DEPTHWISE_CASES + [
    (2, 12, 10, 32, 3, (2, 2), (0, 0, 1, 1), (1, 1), "uint8", "int8", False),  # bottom/right
    (1, 9, 9, 16, 5, (1, 2), (2, 1, 2, 3), (1, 1), "uint8", "uint8", False),
] for pad in ("copy", "mask") if pad == "copy" or case[8] == "uint8"]  # mask: uint8 only


@pytest.mark.hardware
@pytest.mark.parametrize("N,H,W,C,k,st,pads,dil,in_dtype,out_dtype,raw,pad", DEPTHWISE_VNNI_CASES)
def test_depthwise_vnni_exact(N: int, H: int, W: int, C: int, k: int, st: tuple[int, int],
                              pads: Pads, dil: tuple[int, int], in_dtype: str, out_dtype: str,
                              raw: bool, pad: str) -> None:
    """Both ways of padding ("mask": clamped reads, the taps outside zeroed)."""
    _check_depthwise(partial(Dw.depthwise_conv2d_nhwc_vnni, pad=pad), N, H, W, C, k, st, pads,
                     dil, in_dtype, out_dtype, raw)


@pytest.mark.unit
def test_depthwise_pad_mode_masks_only_big_3x3_stride_2_inputs() -> None:
    big, small = (8, 28, 28, 240), (1, 28, 28, 240)
    assert Dw.pad_mode(big, (3, 3), (2, 2), (0, 0, 1, 1), "uint8") == "mask"
    assert Dw.pad_mode(small, (3, 3), (2, 2), (0, 0, 1, 1), "uint8") == "copy"
    assert Dw.pad_mode(big, (5, 5), (2, 2), (1, 1, 2, 2), "uint8") == "copy"
    assert Dw.pad_mode(big, (3, 3), (1, 1), (1, 1, 1, 1), "uint8") == "copy"
    assert Dw.pad_mode(big, (3, 3), (2, 2), (0, 0, 1, 1), "int8") == "copy"


def _check_depthwise(kernel: Callable[..., tvm.tirx.PrimFunc], N: int, H: int, W: int, C: int,
                     k: int, st: tuple[int, int], pads: Pads, dil: tuple[int, int],
                     in_dtype: str, out_dtype: str, raw: bool) -> None:
    rng = np.random.default_rng(C + H)
    x, w = _rand(rng, (N, H, W, C), in_dtype), _rand(rng, (k, k, C), "int8")
    bias = rng.integers(-2**20, 2**20, C).astype(np.int32)
    win = _windows(x.astype(np.int64), k, k, st, pads, dil, 0)
    acc, bias, q = _requant_setup(rng, np.einsum("bhwcij,ijc->bhwc", win, w.astype(np.int64))
                                  + bias, bias, raw, out_dtype)
    vnni = getattr(kernel, "func", kernel) is Dw.depthwise_conv2d_nhwc_vnni
    kbias = V.signed_input_bias(w.transpose(2, 0, 1), bias) if vnni and in_dtype == "int8" else bias
    f = kernel(N, H, W, C, k, k, st, pads, dil, out_dtype=out_dtype, raw=raw, in_dtype=in_dtype)
    got = _run(f, [x, w, kbias, *(q or [])], acc.shape, "int32" if raw else out_dtype)
    np.testing.assert_array_equal(got, _expected(acc, q, out_dtype))


# ----------------------------------------------------------------------------- pools
@pytest.mark.hardware
@pytest.mark.parametrize("shape,k,st,pads,dtype", [
    ((1, 11, 11, 64), (3, 3), (2, 2), (1, 1, 1, 1), "uint8"),
    ((2, 7, 7, 5), (3, 3), (2, 2), (0, 1, 1, 0), "int8"),
])
def test_max_pool_exact(shape: tuple[int, ...], k: tuple[int, int], st: tuple[int, int],
                        pads: Pads, dtype: str) -> None:
    x = _rand(np.random.default_rng(3), shape, dtype)
    ref = _windows(x, *k, st, pads, (1, 1), int(np.iinfo(dtype).min)).max(axis=(4, 5))
    got = _run(Wd.max_pool2d_nhwc(*shape, k, st, pads, dtype=dtype), [x], ref.shape, dtype)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.hardware
@pytest.mark.parametrize("shape,k,st,pads,in_dtype,out_dtype,raw", [
    ((1, 11, 11, 16), (3, 3), (2, 2), (1, 1, 1, 1), "uint8", "int32", True),
    ((1, 7, 9, 5), (2, 3), (1, 2), (0, 1, 1, 0), "int8", "int8", False),
])
def test_sum_pool_exact(shape: tuple[int, ...], k: tuple[int, int], st: tuple[int, int],
                        pads: Pads, in_dtype: str, out_dtype: str, raw: bool) -> None:
    rng = np.random.default_rng(4)
    x = _rand(rng, shape, in_dtype)
    acc = _windows(x.astype(np.int64), *k, st, pads, (1, 1), 0).sum(axis=(4, 5))
    # per output position; no bias to take the offset: int8 sums are centred already
    q = None if raw else _qparams(rng, acc, out_dtype, axes=(1, 2))[0]
    exp = _expected(acc, None if q is None else [v[None, :, :, None] for v in q], out_dtype)
    f = Wd.sum_pool2d_nhwc(*shape, k, st, pads, in_dtype=in_dtype, out_dtype=out_dtype, raw=raw)
    np.testing.assert_array_equal(_run(f, [x, *(q or [])], acc.shape, exp.dtype.name), exp)


@pytest.mark.hardware
@pytest.mark.parametrize("shape,in_dtype,out_dtype,raw", [
    ((1, 7, 7, 64), "uint8", "int32", True), ((2, 5, 3, 7), "int8", "uint8", False)])
def test_global_sum_pool_exact(shape: tuple[int, ...], in_dtype: str, out_dtype: str,
                               raw: bool) -> None:
    rng = np.random.default_rng(5)
    # int8 in, uint8 out, no bias to centre the sums: inputs leaning positive keep most
    # sums inside (0, 255) (negatives still occur and clip)
    x = (rng.integers(-64, 128, shape).astype(in_dtype) if (in_dtype, out_dtype) ==
         ("int8", "uint8") else _rand(rng, shape, in_dtype))
    acc = x.astype(np.int64).sum(axis=(1, 2), keepdims=True)
    q = None if raw else [v.reshape(1, 1) for v in _qparams(rng, acc, out_dtype, axes=())[0]]
    exp = _expected(acc, q, out_dtype)
    f = Wd.global_sum_pool_nhwc(*shape, in_dtype=in_dtype, out_dtype=out_dtype, raw=raw)
    np.testing.assert_array_equal(_run(f, [x, *(q or [])], acc.shape, exp.dtype.name), exp)
