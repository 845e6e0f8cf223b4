"""Proof obligation: the integer core contains no float arithmetic and no division.

Walks the ``core`` Relax function after legalization and fusion (the IR that is
handed to code generation) and every TIR PrimFunc it calls.  In TIR only the
*data* computation is inspected (values written by BufferStore): index
arithmetic such as ``floordiv(i, 7)`` in a reshape addresses memory and never
touches tensor values, so it is allowed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import tvm
from tvm import relax, tirx

FORBIDDEN_RELAX_OPS: frozenset[str] = frozenset(
    {"relax.divide", "relax.floor_divide", "relax.floor_mod", "relax.mod", "relax.trunc_divide",
     "relax.trunc_mod", "relax.sqrt", "relax.rsqrt", "relax.exp", "relax.log", "relax.power",
     "relax.round", "relax.floor", "relax.ceil", "relax.nn.softmax", "relax.mean",
     "relax.nn.avg_pool2d", "relax.nn.adaptive_avg_pool2d"})
DIV_NODES = (tirx.Div, tirx.FloorDiv, tirx.Mod, tirx.FloorMod)


@dataclass
class IntCheckReport:
    relax_bindings: int = 0
    prim_funcs: list[str] = field(default_factory=list)
    stores: int = 0
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations and self.stores > 0 and bool(self.prim_funcs)


def _is_int(dtype: str) -> bool:
    return dtype.startswith(("int", "uint", "bool"))


def _dtype(e: object) -> str:
    """TVM 0.27 moved PrimExpr dtypes to ``.ty``; older nodes still have ``.dtype``."""
    ty = getattr(e, "ty", None)
    return str(ty if ty is not None else getattr(e, "dtype", ""))


def _check_value(expr: tvm.ir.Expr, where: str, rep: IntCheckReport, control: bool = False) -> None:
    """Recursively inspect a stored value, not descending into load indices.

    Conditions (of Select and if_then_else) are checked in ``control`` mode: they
    may do index arithmetic such as an im2col bounds test, so division is allowed
    there, but float is not.
    """
    if isinstance(expr, tvm.ir.TensorLoad):
        if not _is_int(_dtype(expr)):
            src = getattr(expr.source, "name", expr.source)
            rep.violations.append(f"{where}: loads {_dtype(expr)} from {src}")
        return
    if not _is_int(_dtype(expr)):
        rep.violations.append(f"{where}: {type(expr).__name__} of dtype {_dtype(expr)}")
        return
    if isinstance(expr, DIV_NODES) and not control:
        rep.violations.append(f"{where}: {type(expr).__name__} on data")
    conds: list = []
    children: list = []
    if isinstance(expr, tvm.ir.Call):
        op = getattr(getattr(expr, "op", None), "name", "")
        args = list(expr.args)
        conds, children = (args[:1], args[1:]) if op.endswith("if_then_else") else ([], args)
    elif isinstance(expr, tirx.Cast):
        children = [expr.value]
    elif isinstance(expr, tirx.Select):
        conds, children = [expr.condition], [expr.true_value, expr.false_value]
    elif isinstance(expr, tirx.Let):
        children = [expr.value, expr.body]
    elif hasattr(expr, "a") and hasattr(expr, "b"):
        children = [expr.a, expr.b]
    elif isinstance(expr, tirx.Broadcast):
        children = [expr.value]
    for c in conds:
        if isinstance(c, tvm.ir.Expr):
            _check_value(c, where, rep, control=True)
    for c in children:
        if isinstance(c, tvm.ir.Expr):
            _check_value(c, where, rep, control)


def _check_prim_func(name: str, func: tirx.PrimFunc, rep: IntCheckReport) -> None:
    rep.prim_funcs.append(name)

    for store in _stores(func.body):
        rep.stores += 1
        if not _is_int(str(store.buffer.dtype)):
            rep.violations.append(f"{name}: stores into {store.buffer.dtype} {store.buffer.name}")
        _check_value(store.value, name, rep)


_STMT_CHILDREN = ("body", "then_case", "else_case", "block", "init")


def _stores(stmt: object) -> list[tirx.BufferStore]:
    """Every BufferStore under ``stmt`` (TVM 0.27 has no Python TIR visitor)."""
    if stmt is None:
        return []
    if isinstance(stmt, tirx.BufferStore):
        return [stmt]
    out: list[tirx.BufferStore] = []
    if isinstance(stmt, tirx.SeqStmt):
        for s in stmt.seq:
            out += _stores(s)
        return out
    for attr in _STMT_CHILDREN:
        child = getattr(stmt, attr, None)
        if isinstance(child, tirx.Stmt):
            out += _stores(child)
    return out


def check_integer_only(mod: tvm.IRModule, func: str = "core") -> IntCheckReport:
    """Check the Relax function ``func`` of a legalized module and its PrimFuncs."""
    rep = IntCheckReport()
    core = mod[func]
    callees: set[str] = set()

    def visit(e: relax.Expr) -> None:
        if isinstance(e, relax.Var) or isinstance(e, relax.Call):
            sinfo = e.ty
            if isinstance(sinfo, relax.TensorType) and sinfo.dtype:
                if not _is_int(str(sinfo.dtype)):
                    rep.violations.append(f"relax {func}: value of dtype {sinfo.dtype}")
        if isinstance(e, relax.Call):
            rep.relax_bindings += 1
            if isinstance(e.op, tvm.ir.Op):
                if e.op.name in FORBIDDEN_RELAX_OPS:
                    rep.violations.append(f"relax {func}: forbidden op {e.op.name}")
                if e.op.name == "relax.call_tir":
                    callees.add(e.args[0].name_hint)
            elif isinstance(e.op, tvm.ir.GlobalVar):
                callees.add(e.op.name_hint)

    relax.analysis.post_order_visit(core, visit)
    for name in sorted(callees):
        f = mod[name]
        if isinstance(f, tirx.PrimFunc):
            _check_prim_func(name, f, rep)
        else:
            rep.violations.append(f"relax {func}: calls non-TIR function {name}")
    return rep
