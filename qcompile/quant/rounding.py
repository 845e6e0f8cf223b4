"""How weights become integers: the rounding methods, one registry.

Every method has one signature (``RoundGraph``): it takes the canonical float graph, the
calibration inputs, each layer's weight width, and returns the graph to quantize (a
method may correct float biases) with each rounded layer's integers and scale, what
``quantize_graph(..., rounded=...)`` takes. ``None`` for the rounded weights means
round-to-nearest (``quantize_weights``) everywhere: ``nearest`` is the identity.

``sequential=False`` asks for each layer rounded on the float model's own input, as if it
alone were quantized: what the KL sensitivity measures one layer at a time.

The pipeline (``api``) and the sensitivity (``mixed.sensitivity``) look methods up here
by name; ``config.ROUNDINGS`` holds the same names for the layers below (config is the
ground floor and cannot read this table; a test keeps the two equal).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol

import numpy as np

from qcompile.errors import UsageError
from qcompile.ir.graph import Graph
from qcompile.quant.gptq import Rounded, gptq_graph


class RoundGraph(Protocol):
    """``(graph, inputs, layer -> weight bits) -> (graph to quantize, rounded or None)``.

    ``inputs`` is a float32 calibration batch; it may be None only for a method whose
    ``needs_data`` is False (the pipeline then reads no calibration data for it)."""

    def __call__(self, graph: Graph, inputs: np.ndarray | None, bits: Mapping[str, int], *,
                 progress: bool = False, sequential: bool = True
                 ) -> tuple[Graph, Rounded | None]: ...


@dataclass(frozen=True)
class Rounding:
    """A rounding method as the pipeline and the sensitivity use it."""

    name: str
    round_graph: RoundGraph
    needs_data: bool  # reads the calibration inputs (nearest does not)
    # The sensitivity cache key names the method; False only for nearest, whose entries
    # were written before the key had a rounding (so they stay valid).
    keyed: bool = True


def _nearest(graph: Graph, inputs: np.ndarray | None, bits: Mapping[str, int], *,
             progress: bool = False, sequential: bool = True) -> tuple[Graph, Rounded | None]:
    return graph, None


def _gptq(graph: Graph, inputs: np.ndarray | None, bits: Mapping[str, int], *,
          progress: bool = False, sequential: bool = True) -> tuple[Graph, Rounded | None]:
    if inputs is None:
        raise ValueError("gptq rounds on calibration inputs; got none")
    return gptq_graph(graph, inputs, bits, progress=progress, sequential=sequential)


ROUNDINGS: dict[str, Rounding] = {r.name: r for r in (
    Rounding("nearest", _nearest, needs_data=False, keyed=False),
    Rounding("gptq", _gptq, needs_data=True),  # GPTQ with bias correction (gptq.py)
)}


def rounding_of(name: str) -> Rounding:
    """The registered method ``name``; UsageError naming the valid ones otherwise."""
    r = ROUNDINGS.get(name)
    if r is None:
        raise UsageError(f"--rounding must be one of {tuple(ROUNDINGS)}, got {name!r}")
    return r
