"""What an ONNX op handler reads its node through: ``_Ctx``.

The handlers themselves live with their canonical op (``qcompile.ops``; the registry's
``ONNX_OPS`` maps each ONNX op type to one).  A handler reads its node through ``_Ctx``
(attributes, constants, static shapes) and either returns the imported node(s), still
carrying the ONNX ``op_type``, or refuses with one line naming the node.
``onnx_import.import_onnx`` walks the graph, builds a ``_Ctx`` per node and dispatches
through ``imported``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, NoReturn

import numpy as np
import onnx

from qcompile.errors import UnsupportedOpError
from qcompile.ir.graph import Node
from qcompile.ops import OnnxOp


@dataclass
class _Ctx:
    """What a handler needs to turn one ONNX node into a ``Node``."""

    name: str
    onode: onnx.NodeProto
    attrs: dict[str, Any]
    consts: Mapping[str, np.ndarray]
    shapes: Mapping[str, tuple[int, ...]]

    @property
    def op(self) -> str:
        return self.onode.op_type

    def unsupported(self, what: str, why: str) -> NoReturn:
        raise UnsupportedOpError(f"node {self.name!r} (op {self.op}): {what} is not "
                                 f"supported ({why}); change it in the model or file an issue")

    def _input(self, i: int) -> str:
        ins = self.onode.input
        return ins[i] if i < len(ins) else ""

    def has(self, i: int) -> bool:
        return self._input(i) != ""

    def is_const(self, i: int) -> bool:
        return self._input(i) in self.consts

    def act(self, i: int) -> str:
        """Input ``i`` as an activation tensor (constants are refused)."""
        t = self._input(i)
        if t in self.consts:
            self.unsupported(f"constant input {t!r}", "this input must be an activation")
        return t

    def const(self, i: int, role: str) -> np.ndarray:
        """Input ``i`` as a float32 constant (activations are refused)."""
        t = self._input(i)
        if t not in self.consts:
            self.unsupported(f"non-constant {role} input {t!r}", f"{role} must be an initializer")
        return np.array(self.consts[t], dtype=np.float32)  # a private copy

    def node(self, inputs: tuple[str, ...], attrs: Mapping[str, Any] | None = None,
             params: Mapping[str, np.ndarray] | None = None) -> Node:
        return Node(op=self.op, name=self.name, inputs=inputs, output=self.onode.output[0],
                    attrs=self.attrs if attrs is None else attrs, params=params or {})


def imported(op: OnnxOp, ctx: _Ctx) -> list[Node]:
    """The node(s) ``op``'s handler makes of ``ctx``'s ONNX node."""
    made = op.handler(ctx)
    return made if isinstance(made, list) else [made]
