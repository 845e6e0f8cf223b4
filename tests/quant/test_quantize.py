"""Dyadic rescaling, weight quantization and avg-pool divisors."""
from __future__ import annotations

import numpy as np
import pytest

from qcompile.ops.pool import _window_counts
from qcompile.ops.quantizing import dyadic, shared_shift
from qcompile.quant.quantize import quantize_weights

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("M", [1e-6, 3.7e-4, 0.0123, 0.5, 0.999, 1.0, 7.25, 1234.5])
def test_dyadic_is_accurate_and_fits_31_bits(M: float) -> None:
    m, r, s = dyadic(np.array([M]))
    assert 0 < m[0] < 2**31 and 0 <= s[0] <= 62
    assert r[0] == (1 << (int(s[0]) - 1) if s[0] > 0 else 0)
    assert abs(m[0] / 2.0 ** s[0] - M) / M < 2**-29


def test_dyadic_zero_and_rounding_edge() -> None:
    m, _, s = dyadic(np.array([0.0, (2**31 - 0.4) / 2**31]))  # second rounds up to 2^31
    assert m[0] == 0
    assert m[1] < 2**31 and abs(m[1] / 2.0 ** s[1] - (2**31 - 0.4) / 2**31) < 1e-8


def test_dyadic_refuses_huge_factor() -> None:
    with pytest.raises(ValueError):
        dyadic(np.array([2.0**40]))


def test_shared_shift_keeps_both_multipliers_in_range() -> None:
    (ma, mb), r, s = shared_shift([np.float64(0.8), np.float64(0.003)])
    assert ma < 2**31 and mb < 2**31
    assert abs(ma / 2.0**s - 0.8) < 1e-8 and abs(mb / 2.0**s - 0.003) < 1e-8


@pytest.mark.parametrize("bits", [4, 8])
def test_weights_per_channel_symmetric(bits: int) -> None:
    w = np.random.default_rng(0).normal(size=(5, 3, 3, 3)).astype(np.float32)
    w[2] *= 10
    w[4] = 0
    q, s = quantize_weights(w, bits)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == np.int8 and np.abs(q).max() == qmax and q.min() >= -qmax
    assert (np.abs(q.reshape(5, -1)).max(1)[:4] == qmax).all()  # every non-zero channel uses the range
    np.testing.assert_array_equal(q[4], 0)
    err = np.abs(q * s[:, None, None, None] - w)
    assert (err <= s[:, None, None, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("include", [False, True])
def test_window_counts_match_brute_force(include: bool) -> None:
    h, w, k, st, pads = 7, 6, (3, 2), (2, 2), (1, 0, 1, 1)
    oh = (h + pads[0] + pads[2] - k[0]) // st[0] + 1
    ow = (w + pads[1] + pads[3] - k[1]) // st[1] + 1
    cnt = _window_counts((h, w), (oh, ow), {"kernel": k, "strides": st, "pads": pads,
                                             "count_include_pad": include})
    ones = np.pad(np.ones((h, w)), ((pads[0], pads[2]), (pads[1], pads[3])),
                  constant_values=1 if include else 0)
    for i in range(oh):
        for j in range(ow):
            assert cnt[i, j] == ones[i * 2:i * 2 + k[0], j * 2:j * 2 + k[1]].sum()


def test_shared_shift_narrow_multipliers_for_int32_adds() -> None:
    """Residual adds use 22-bit multipliers so 255*(ma+mb) + r stays below 2^31."""
    (ma, mb), r, s = shared_shift([np.float64(0.9), np.float64(0.04)], m_bits=22)
    assert 0 < ma < 2**22 and 0 < mb < 2**22
    assert 255 * (ma + mb) + r < 2**31
    assert abs(ma / 2.0**s - 0.9) / 0.9 < 2**-20
