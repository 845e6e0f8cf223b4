"""A float64 NumPy evaluator of the *canonical* graph (after ``prepare``).

Deliberately independent of qcompile's own code: windows come from
``sliding_window_view`` and convolutions from ``einsum``, so it checks the
attribute conventions of ``graph.py`` rather than re-using them.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from qcompile.ir.graph import Graph, Node

Array = np.ndarray


def _pad(x: Array, pads: tuple[int, ...], value: float) -> Array:
    top, left, bottom, right = pads
    return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=value)


def _windows(x: Array, kernel: tuple[int, ...], strides: tuple[int, ...],
             dilations: tuple[int, ...] = (1, 1)) -> Array:
    """(N, C, Ho, Wo, kh, kw) views of an already padded (N, C, H, W) input."""
    span = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilations))
    v = sliding_window_view(x, span, axis=(2, 3))
    return v[:, :, ::strides[0], ::strides[1], ::dilations[0], ::dilations[1]]


def _act(y: Array, act: tuple[float, float] | None) -> Array:
    return y if act is None else np.clip(y, act[0], act[1])


def _conv(n: Node, x: Array) -> Array:
    w, b, g = n.params["w"].astype(np.float64), n.params["b"].astype(np.float64), n.attrs["group"]
    win = _windows(_pad(x, n.attrs["pads"], 0.0), w.shape[2:], n.attrs["strides"],
                   n.attrs["dilations"])
    N, C, Ho, Wo, kh, kw = win.shape
    O = w.shape[0]
    y = np.einsum("ngchwij,gocij->ngohw", win.reshape(N, g, C // g, Ho, Wo, kh, kw),
                  w.reshape(g, O // g, C // g, kh, kw))
    return _act(y.reshape(N, O, Ho, Wo) + b[None, :, None, None], n.attrs["act"])


def _dense(n: Node, x: Array) -> Array:
    w, b = n.params["w"].astype(np.float64), n.params["b"].astype(np.float64)
    return _act(x @ w.T + b, n.attrs["act"])


def _maxpool(n: Node, x: Array) -> Array:
    win = _windows(_pad(x, n.attrs["pads"], -np.inf), n.attrs["kernel"], n.attrs["strides"],
                   n.attrs["dilations"])
    return win.max(axis=(-2, -1))


def _avgpool(n: Node, x: Array) -> Array:
    k, s, p = n.attrs["kernel"], n.attrs["strides"], n.attrs["pads"]
    total = _windows(_pad(x, p, 0.0), k, s).sum(axis=(-2, -1))
    if n.attrs["count_include_pad"]:
        return total / (k[0] * k[1])
    ones = np.ones((1, 1, *x.shape[2:]))
    return total / _windows(_pad(ones, p, 0.0), k, s).sum(axis=(-2, -1))


def _softmax(n: Node, x: Array) -> Array:
    e = np.exp(x - x.max(axis=n.attrs["axis"], keepdims=True))
    return e / e.sum(axis=n.attrs["axis"], keepdims=True)


def _flatten(n: Node, x: Array) -> Array:
    axis = n.attrs["axis"]
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _add(n: Node, a: Array, b: Array) -> Array:
    return _act(a + b, n.attrs["act"])


def _clip(n: Node, x: Array) -> Array:
    return np.clip(x, n.attrs["lo"], n.attrs["hi"])


def _gap(n: Node, x: Array) -> Array:
    return x.mean(axis=(2, 3), keepdims=True)


def _reshape(n: Node, x: Array) -> Array:
    return x.reshape(n.attrs["shape"])


def _concat(n: Node, *xs: Array) -> Array:
    return np.concatenate(xs, axis=n.attrs["axis"])


_OPS: dict[str, Callable[..., Array]] = {
    "conv": _conv, "dense": _dense, "add": _add, "clip": _clip, "maxpool": _maxpool,
    "avgpool": _avgpool, "gap": _gap, "flatten": _flatten, "reshape": _reshape,
    "concat": _concat, "softmax": _softmax,
}


def evaluate(graph: Graph, x: Array) -> dict[str, Array]:
    """Every tensor of the canonical ``graph`` for input ``x``, in float64."""
    env = {graph.input: np.asarray(x, np.float64)}
    for n in graph.nodes:
        env[n.output] = _OPS[n.op](n, *(env[t] for t in n.inputs))
        assert env[n.output].shape == tuple(graph.shapes[n.output]), n.name
    return env


def run(graph: Graph, x: Array) -> Array:
    """The graph output for input ``x``."""
    return evaluate(graph, x)[graph.output]
