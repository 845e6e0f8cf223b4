"""The unary elementwise functions qcompile turns into tables: one entry each.

Each ``Activation`` holds the function twice, in the two forms the stages need:

* ``f(x, attrs) -> y`` in float64 NumPy.  Quantization evaluates it once per
  representable input (256 values at 8 bits, 16 at 4) and stores the requantized results
  as an integer table, so inside the network the function is a gather: no float, no
  division.  The ONNX attribute defaults are ONNX's own.
* ``relax(form, x, attrs)``: the float closed form as Relax ops with registered
  gradients (``ClosedForm``'s helpers), for sensitivity's float module; None where Relax
  has no such expression (Floor, Ceil, Round: no gradient, no stop-gradient op).

Adding an activation is one entry in ``ACTIVATIONS``: the importer, prepare, the
quantizer, the float module, the ONNX export and docs/ops.md all read it from here
(through ``qcompile.ops.lut``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
from tvm import relax

from qcompile.ops.float_relax import const

R = relax.op
Fn = Callable[[np.ndarray, Mapping[str, Any]], np.ndarray]
RelaxFn = Callable[["ClosedForm", relax.Expr, Mapping[str, Any]], relax.Expr]
LUT_DOC = "table lookup (256 entries at 8 bits, 16 at 4), built from the float function"

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


class ClosedForm:
    """Float closed forms of the lookup-table functions, one emitted op at a time."""

    def __init__(self, bb: relax.BlockBuilder, dtype: str) -> None:
        self.bb, self.dtype = bb, dtype

    def k(self, v: float) -> relax.Constant:
        return const(v, self.dtype)

    def e(self, expr: relax.Expr) -> relax.Expr:
        return self.bb.emit(expr)

    def add(self, a: relax.Expr, b: relax.Expr | float) -> relax.Expr:
        return self.e(R.add(a, b if isinstance(b, relax.Expr) else self.k(b)))

    def mul(self, a: relax.Expr, b: relax.Expr | float) -> relax.Expr:
        return self.e(R.multiply(a, b if isinstance(b, relax.Expr) else self.k(b)))

    def max0(self, x: relax.Expr) -> relax.Expr:
        return self.e(R.maximum(x, self.k(0.0)))

    def min0(self, x: relax.Expr) -> relax.Expr:
        return self.e(R.minimum(x, self.k(0.0)))

    def where(self, cond: relax.Expr, a: relax.Expr | float, b: relax.Expr | float
              ) -> relax.Expr:
        a = a if isinstance(a, relax.Expr) else self.k(a)
        b = b if isinstance(b, relax.Expr) else self.k(b)
        return self.e(R.where(cond, a, b))

    def cmp(self, op: Callable, x: relax.Expr, v: float) -> relax.Expr:
        return self.e(op(x, self.k(v)))

    def hard_sigmoid(self, x: relax.Expr, alpha: float, beta: float) -> relax.Expr:
        y = self.add(self.mul(x, alpha), beta)
        return self.e(R.minimum(self.max0(y), self.k(1.0)))

    def elu(self, x: relax.Expr, alpha: float) -> relax.Expr:
        neg = self.mul(self.add(self.e(R.exp(self.min0(x))), -1.0), alpha)
        return self.where(self.cmp(R.greater, x, 0.0), x, neg)

    def softplus(self, x: relax.Expr) -> relax.Expr:
        # max(x, 0) + log(1 + exp(-|x|)): no overflow for large |x|
        t = self.e(R.exp(self.e(R.negative(self.e(R.abs(x))))))
        return self.add(self.max0(x), self.e(R.log(self.add(t, 1.0))))

    def erf(self, x: relax.Expr) -> relax.Expr:
        """Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7); Relax's erf has no gradient."""
        ax = self.e(R.abs(x))
        t = self.e(R.divide(self.k(1.0), self.add(self.mul(ax, 0.3275911), 1.0)))
        poly = self.k(1.061405429)
        for a in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
            poly = self.add(self.mul(t, poly), a)
        poly = self.mul(t, poly)
        g = self.e(R.exp(self.e(R.negative(self.mul(ax, ax)))))
        y = self.add(self.e(R.negative(self.mul(poly, g))), 1.0)  # erf(|x|)
        return self.where(self.cmp(R.greater_equal, x, 0.0), y, self.e(R.negative(y)))


def _num(a: Mapping[str, Any], key: str, default: float) -> float:
    return float(a.get(key, default))


def _celu(f: ClosedForm, x: relax.Expr, a: Mapping[str, Any]) -> relax.Expr:
    al = _num(a, "alpha", 1.0)
    e = f.e(R.exp(f.mul(f.min0(x), 1.0 / al)))
    return f.add(f.max0(x), f.min0(f.mul(f.add(e, -1.0), al)))


def _gelu_form(f: ClosedForm, x: relax.Expr, a: Mapping[str, Any]) -> relax.Expr:
    if a.get("approximate", "none") == "tanh":
        inner = f.mul(f.add(f.mul(f.mul(f.mul(x, x), x), 0.044715), x), math.sqrt(2.0 / math.pi))
        return f.mul(f.mul(x, f.add(f.e(R.tanh(inner)), 1.0)), 0.5)
    return f.mul(f.mul(x, f.add(f.erf(f.mul(x, 1 / math.sqrt(2.0))), 1.0)), 0.5)


def _shrink_form(f: ClosedForm, x: relax.Expr, a: Mapping[str, Any]) -> relax.Expr:
    lam, bias = _num(a, "lambd", 0.5), _num(a, "bias", 0.0)
    inner = f.where(f.cmp(R.greater, x, lam), f.add(x, -bias), 0.0)
    return f.where(f.cmp(R.less, x, -lam), f.add(x, bias), inner)


def _direct(op: Callable[[relax.Expr], relax.Expr]) -> RelaxFn:
    """A function Relax has as one op with a gradient."""
    return lambda f, x, a: f.e(op(x))


@dataclass(frozen=True)
class Activation:
    f: Fn                   # float64 NumPy definition: the table is built from it
    relax: RelaxFn | None   # float Relax closed form with gradients; None: there is none
    doc: str = LUT_DOC      # docs/ops.md's line for the ONNX op


ACTIVATIONS: dict[str, Activation] = {
    "Sigmoid": Activation(lambda x, a: _sigmoid(x), _direct(R.sigmoid)),
    "HardSigmoid": Activation(_hard_sigmoid, lambda f, x, a: f.hard_sigmoid(
        x, _num(a, "alpha", 0.2), _num(a, "beta", 0.5))),
    "HardSwish": Activation(lambda x, a: x * _hard_sigmoid(x, {"alpha": 1 / 6, "beta": 0.5}),
                            lambda f, x, a: f.mul(x, f.hard_sigmoid(x, 1 / 6, 0.5))),
    "Tanh": Activation(lambda x, a: np.tanh(x), _direct(R.tanh)),
    "LeakyRelu": Activation(
        lambda x, a: np.where(x >= 0, x, float(a.get("alpha", 0.01)) * x),
        lambda f, x, a: f.where(f.cmp(R.greater_equal, x, 0.0), x,
                                f.mul(x, _num(a, "alpha", 0.01)))),
    "Elu": Activation(lambda x, a: _elu(x, float(a.get("alpha", 1.0))),
                      lambda f, x, a: f.elu(x, _num(a, "alpha", 1.0))),
    "Celu": Activation(lambda x, a: np.maximum(x, 0) + np.minimum(
        0, float(a.get("alpha", 1.0)) * np.expm1(np.minimum(x, 0) / float(a.get("alpha", 1.0)))),
        _celu),
    "Selu": Activation(
        lambda x, a: float(a.get("gamma", 1.0507009873554805)) * _elu(
            x, float(a.get("alpha", 1.6732632423543772))),
        lambda f, x, a: f.mul(f.elu(x, _num(a, "alpha", 1.6732632423543772)),
                              _num(a, "gamma", 1.0507009873554805))),
    "ThresholdedRelu": Activation(
        lambda x, a: np.where(x > float(a.get("alpha", 1.0)), x, 0.0),
        lambda f, x, a: f.where(f.cmp(R.greater, x, _num(a, "alpha", 1.0)), x, 0.0)),
    "Gelu": Activation(_gelu, _gelu_form),
    "Softplus": Activation(lambda x, a: _softplus(x), lambda f, x, a: f.softplus(x)),
    "Softsign": Activation(lambda x, a: x / (1.0 + np.abs(x)),
                           lambda f, x, a: f.e(R.divide(x, f.add(f.e(R.abs(x)), 1.0)))),
    "Mish": Activation(lambda x, a: x * np.tanh(_softplus(x)),
                       lambda f, x, a: f.mul(x, f.e(R.tanh(f.softplus(x))))),
    "Erf": Activation(lambda x, a: _erf(x), lambda f, x, a: f.erf(x)),
    "Exp": Activation(lambda x, a: np.exp(x), _direct(R.exp)),
    "Log": Activation(lambda x, a: np.log(x), _direct(R.log)),
    "Sqrt": Activation(lambda x, a: np.sqrt(x), _direct(R.sqrt)),
    "Reciprocal": Activation(lambda x, a: 1.0 / x,
                             lambda f, x, a: f.e(R.divide(f.k(1.0), x))),
    "Abs": Activation(lambda x, a: np.abs(x), _direct(R.abs)),
    "Neg": Activation(lambda x, a: -x, _direct(R.negative)),
    "Sin": Activation(lambda x, a: np.sin(x), _direct(R.sin)),
    "Cos": Activation(lambda x, a: np.cos(x), _direct(R.cos)),
    "Sign": Activation(lambda x, a: np.sign(x), lambda f, x, a: f.where(
        f.cmp(R.greater, x, 0.0), 1.0, f.where(f.cmp(R.less, x, 0.0), -1.0, 0.0))),
    "Floor": Activation(lambda x, a: np.floor(x), None),
    "Ceil": Activation(lambda x, a: np.ceil(x), None),
    "Round": Activation(lambda x, a: np.round(x), None),  # half to even, as ONNX
    "Shrink": Activation(lambda x, a: np.where(
        x < -float(a.get("lambd", 0.5)), x + float(a.get("bias", 0.0)),
        np.where(x > float(a.get("lambd", 0.5)), x - float(a.get("bias", 0.0)), 0.0)),
        _shrink_form),
}
UNARY_FUNCTIONS: dict[str, Fn] = {k: v.f for k, v in ACTIVATIONS.items()}
# Table functions whose derivative is 0 almost everywhere but that Relax cannot
# express with registered gradients (no floor/round gradient, no stop-gradient op).
NO_GRADIENT_FUNCTIONS: frozenset[str] = frozenset(
    k for k, v in ACTIVATIONS.items() if v.relax is None)
# Patterns prepare fuses into one table: x * f(x) (SiLU = x * Sigmoid(x), ...).
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
