"""Helpers the op rewrites and ``frontend.prepare``'s fusions share."""
from __future__ import annotations

from typing import Callable

import numpy as np

from qcompile.errors import UnsupportedOpError
from qcompile.ir.graph import Graph
from qcompile.ir.node import Node


def refuse(node: Node, why: str) -> UnsupportedOpError:
    return UnsupportedOpError(f"node {node.name!r} (op {node.op}) {why}; "
                              "change the model or file an issue")


def replace_ops(graph: Graph, rule: Callable[[Graph, Node], Node | None]) -> Graph:
    """Replace every node for which ``rule`` returns a node; keep the others."""
    return graph.with_nodes([rule(graph, n) or n for n in graph.nodes])


def axis(node: Node, axis: int, rank: int, *, allow_rank: bool = False) -> int:
    """``axis`` made non-negative; Flatten also accepts ``axis == rank``."""
    if not -rank <= axis < rank + int(allow_rank):
        raise refuse(node, f"has axis {axis} out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def channel_vector(c: np.ndarray, out_shape: tuple[int, ...]) -> np.ndarray | None:
    """``c`` as one value per channel (axis 1) of ``out_shape``, or None if it is not."""
    try:
        if np.broadcast_shapes(c.shape, out_shape) != tuple(out_shape):
            return None
    except ValueError:
        return None
    per_channel = np.moveaxis(np.broadcast_to(c, out_shape), 1, 0).reshape(out_shape[1], -1)
    if not np.all(per_channel == per_channel[:, :1]):
        return None
    return per_channel[:, 0].astype(np.float32)


def minimal(a: np.ndarray) -> np.ndarray:
    """``a`` with every axis along which it is constant reduced to size 1."""
    for ax in range(a.ndim):
        if a.shape[ax] > 1 and np.all(a == a.take([0], axis=ax)):
            a = a.take([0], axis=ax)
    return a


def keep_batch(n: Node, moved: bool) -> None:
    """The batch axis is symbolic in the compiled module: data movement must keep it."""
    if moved:
        raise refuse(n, "moves data along the batch axis (0); only the other axes may be "
                        "reshaped, transposed, sliced, padded, gathered or concatenated")
