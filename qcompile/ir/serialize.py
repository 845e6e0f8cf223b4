"""QGraph <-> (``qconfig.json`` dict, ``weights.npz`` arrays).

The artifact is self-describing: the oracle can be rebuilt from it alone, so
``qcompile eval`` checks bit-exactness of exactly what was shipped.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from qcompile.ir.qgraph import QGraph, QNode, QTensor, QType

FORMAT = 1


def _jsonable(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    return v


def _tensor_to_json(t: QTensor) -> dict:
    return {"bits": t.qtype.bits, "signed": t.qtype.signed, "dtype": t.qtype.dtype,
            "shape": list(t.shape), "scale": _jsonable(t.scale)}


def _tensor_from_json(name: str, d: dict) -> QTensor:
    return QTensor(name, QType(d["bits"], d["signed"]), tuple(d["shape"]),
                   np.asarray(d["scale"], np.float64))


def qgraph_to_json(qg: QGraph) -> dict:
    """Everything but the integer arrays; those go to ``weights.npz`` via param_items."""
    return {
        "format": FORMAT,
        "source": qg.source,
        "input": {"name": qg.input.name, **_tensor_to_json(qg.input)},
        "output": {"name": qg.output.name, **_tensor_to_json(qg.output)},
        "softmax_axis": qg.softmax_axis,
        "tensors": {k: _tensor_to_json(t) for k, t in qg.tensors.items()},
        "nodes": [{"op": n.op, "name": n.name, "inputs": list(n.inputs), "output": n.output,
                   "attrs": {k: _jsonable(v) for k, v in n.attrs.items()},
                   "params": sorted(n.params)} for n in qg.nodes],
    }


def _attrs_from_json(attrs: dict) -> dict:
    # JSON has no tuples; the lowering and the oracle index them like tuples.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in attrs.items()}


def qgraph_from_json(d: dict, arrays: dict[str, np.ndarray]) -> QGraph:
    """Inverse of ``qgraph_to_json`` given the ``weights.npz`` arrays."""
    if d.get("format") != FORMAT:
        raise ValueError(f"qconfig format {d.get('format')} is not {FORMAT}")
    tensors = {k: _tensor_from_json(k, t) for k, t in d["tensors"].items()}
    nodes = tuple(
        QNode(n["op"], n["name"], tuple(n["inputs"]), n["output"], _attrs_from_json(n["attrs"]),
              {p: arrays[f"{n['name']}.{p}"] for p in n["params"]})
        for n in d["nodes"])
    return QGraph(tensors[d["input"]["name"]], nodes, tensors[d["output"]["name"]], tensors,
                  d["softmax_axis"], d.get("source", ""))
