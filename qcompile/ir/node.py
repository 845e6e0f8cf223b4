"""``Node``: one operator, the record the float graph (``graph.py``) and the quantized
graph (``qgraph.py``) share.

NumPy and the standard library only: the NumPy oracle (``reference.py``) reads
``qgraph``, and through it this file, and must stay independent of what it checks.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Mapping, TypeVar

import numpy as np

N = TypeVar("N", bound="Node")


def frozen_mapping(d: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """A read-only copy: records handed between stages are never mutated."""
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True)
class Node:
    """One operator. ``inputs`` are activation tensors; weights live in ``params``.
    Which ops exist and what their attrs mean is the graph's business (``graph.py``,
    ``qgraph.py``)."""

    op: str
    name: str
    inputs: tuple[str, ...]
    output: str
    attrs: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "attrs", frozen_mapping(self.attrs))
        object.__setattr__(self, "params", frozen_mapping(self.params))

    def with_(self: N, **changes: Any) -> N:
        """A copy with some fields replaced (nodes are immutable)."""
        return replace(self, **changes)
