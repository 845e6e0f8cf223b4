"""Float definitions of the unary elementwise functions qcompile turns into tables.

Each entry maps an ONNX op type to ``f(x, attrs) -> y`` in float64.  Quantization
evaluates ``f`` once per representable input (256 values at 8 bits, 16 at 4) and stores
the requantized results as an integer table, so inside the network the function is a
gather: no float, no division.  The ONNX attribute defaults are ONNX's own.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np

Fn = Callable[[np.ndarray, Mapping[str, Any]], np.ndarray]

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def _hard_sigmoid(x: np.ndarray, a: Mapping[str, Any]) -> np.ndarray:
    return np.clip(float(a.get("alpha", 0.2)) * x + float(a.get("beta", 0.5)), 0.0, 1.0)


def _gelu(x: np.ndarray, a: Mapping[str, Any]) -> np.ndarray:
    if a.get("approximate", "none") == "tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _elu(x: np.ndarray, alpha: float) -> np.ndarray:
    return np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0.0)))


UNARY_FUNCTIONS: dict[str, Fn] = {
    "Sigmoid": lambda x, a: _sigmoid(x),
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": lambda x, a: x * _hard_sigmoid(x, {"alpha": 1 / 6, "beta": 0.5}),
    "Tanh": lambda x, a: np.tanh(x),
    "LeakyRelu": lambda x, a: np.where(x >= 0, x, float(a.get("alpha", 0.01)) * x),
    "Elu": lambda x, a: _elu(x, float(a.get("alpha", 1.0))),
    "Celu": lambda x, a: np.maximum(x, 0) + np.minimum(
        0, float(a.get("alpha", 1.0)) * np.expm1(np.minimum(x, 0) / float(a.get("alpha", 1.0)))),
    "Selu": lambda x, a: float(a.get("gamma", 1.0507009873554805)) * _elu(
        x, float(a.get("alpha", 1.6732632423543772))),
    "ThresholdedRelu": lambda x, a: np.where(x > float(a.get("alpha", 1.0)), x, 0.0),
    "Gelu": _gelu,
    "Softplus": lambda x, a: _softplus(x),
    "Softsign": lambda x, a: x / (1.0 + np.abs(x)),
    "Mish": lambda x, a: x * np.tanh(_softplus(x)),
    "Erf": lambda x, a: _erf(x),
    "Exp": lambda x, a: np.exp(x),
    "Log": lambda x, a: np.log(x),
    "Sqrt": lambda x, a: np.sqrt(x),
    "Reciprocal": lambda x, a: 1.0 / x,
    "Abs": lambda x, a: np.abs(x),
    "Neg": lambda x, a: -x,
    "Sin": lambda x, a: np.sin(x),
    "Cos": lambda x, a: np.cos(x),
    "Sign": lambda x, a: np.sign(x),
    "Floor": lambda x, a: np.floor(x),
    "Ceil": lambda x, a: np.ceil(x),
    "Round": lambda x, a: np.round(x),  # half to even, as ONNX
    "Shrink": lambda x, a: np.where(
        x < -float(a.get("lambd", 0.5)), x + float(a.get("bias", 0.0)),
        np.where(x > float(a.get("lambd", 0.5)), x - float(a.get("bias", 0.0)), 0.0)),
}
# Patterns prepare.py fuses into one table: x * f(x) (SiLU = x * Sigmoid(x), ...).
TIMES_X = "times_x"


def evaluate(fn: str, x: np.ndarray, attrs: Mapping[str, Any],
             slope: np.ndarray | None = None) -> np.ndarray:
    """``fn`` on float64 ``x``; with ``attrs[TIMES_X]`` the result is multiplied by x.

    ``slope`` is PRelu's per-channel slope, broadcast against ``x`` by the caller.
    Non-finite results (Log(0), Sqrt(-1) ...) are returned as they are; the table
    builder saturates +-inf and maps NaN to 0."""
    with np.errstate(all="ignore"):
        if fn == "PRelu":
            y = np.where(x >= 0, x, slope * x)
        else:
            y = UNARY_FUNCTIONS[fn](x, attrs)
        if attrs.get(TIMES_X, False):
            y = x * y
    return np.asarray(y, np.float64)
