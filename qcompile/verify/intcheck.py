"""Proof obligation: the integer core contains no float arithmetic and no division.

Two walks, both by *allow-list* (anything not listed fails, naming the PrimFunc
and the node):

* **Relax** (``check_integer_only``): every call in the Relax function ``core``
  must be a ``relax.call_tir`` to a PrimFunc, a call of another Relax function
  (checked the same way), or an op / ``ExternFunc`` listed in
  :data:`ALLOWED_RELAX_OPS` / :data:`ALLOWED_EXTERN_FUNCS`.  ``call_dps_packed``,
  unknown ops and unknown extern functions fail.  Every tensor value must have an
  integer dtype.
* **TIR** (:class:`_TirWalker`): every statement and expression node of every
  PrimFunc reachable from ``core`` is visited.  Each node kind is allowed
  explicitly (:data:`ALLOWED_STMTS`, :data:`ALLOWED_EXPRS`); every value must be
  integer/bool-typed (``handle`` only for buffer pointers and the addressing
  builtins, ``void`` only for an ``Evaluate``'d call); calls are allowed by name
  (:data:`ALLOWED_CALLS`); ``reinterpret`` only between integer types.  Division
  and modulo are allowed in addresses and conditions but not on stored data, nor in
  a ``let`` value whose variable reaches stored data.

The TIR walk runs twice: on the scheduled TIR (``core`` stage, where data and
index arithmetic are cleanly separated) and, through :func:`lower_to_codegen`, on
the TIR that codegen receives after TVM's full TIR pipeline and host/device
finalization (``codegen`` stage).  ``quantize``/``dequantize`` are excluded only
because they are not reachable from ``core``.

A second, independent line of evidence, the scan of the generated assembly, is in
:mod:`qcompile.verify.asmcheck`.
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import tvm
from tvm import relax

from qcompile.errors import error_line
from qcompile.verify.asmcheck import scan_executable
from qcompile.tvm_compat import bind_target, split_host_device_mods, tir_pipeline, tirx
from qcompile.verify.intcheck_allow import (
    ALLOWED_CALLS, ALLOWED_EXPRS, ALLOWED_EXTERN_FUNCS, ALLOWED_RELAX_OPS, ALLOWED_STMTS,
    NAMED_CALL_WRAPPERS, _BINARY, _DIVISION, _FLOAT_MMA_DTYPES, _MMA_OPS, _PLUMBING,
    _POINTER_CALLS)


@dataclass
class IntCheckReport:
    relax_bindings: int = 0
    prim_funcs: list[str] = field(default_factory=list)
    stores: int = 0
    violations: list[str] = field(default_factory=list)
    nodes: int = 0                      # TIR nodes visited by the allow-list walk
    stages: list[str] = field(default_factory=list)   # "core", "codegen", "asm"
    codegen_funcs: list[str] = field(default_factory=list)  # PrimFuncs after the TIR pipeline
    asm: dict | None = None             # asmcheck.AsmReport.as_dict() when scanned
    shipped: dict | None = None         # shipcheck.prove_shipped: the exported module.so

    @property
    def ok(self) -> bool:
        return not self.violations and self.stores > 0 and bool(self.prim_funcs)

    def merge(self, other: "IntCheckReport", stage: str) -> None:
        self.violations += [f"[{stage}] {v}" for v in other.violations]
        self.nodes += other.nodes
        self.stages.append(stage)


def _is_int(dtype: str) -> bool:
    return dtype.startswith(("int", "uint", "bool"))


def _dtype(e: object) -> str:
    """TVM 0.27 moved PrimExpr dtypes to ``.ty``; older nodes still have ``.dtype``."""
    ty = getattr(e, "ty", None)
    return str(ty if ty is not None else getattr(e, "dtype", ""))


def _is_handle(dtype: str) -> bool:
    """An opaque handle or a pointer to integer data (a pointer to float is not)."""
    if "float" in dtype or "bfloat" in dtype:
        return False
    return dtype == "handle" or dtype.startswith(("handle", "T.handle")) or "*" in dtype


def _op_name(call: tvm.ir.Call) -> str:
    """``tirx.X`` for TIR builtins (some are registered as ``prim.X``/``tir.X``)."""
    op = getattr(call, "op", None)
    name = str(getattr(op, "name", getattr(op, "name_hint", op)))
    for prefix in ("prim.", "tir."):
        if name.startswith(prefix):
            return "tirx." + name[len(prefix):]
    return name


def _callee_name(arg: object) -> str:
    """Name in the first argument of call_llvm_intrin (an intrinsic id) / call_extern."""
    if type(arg).__name__ == "IntImm":
        try:
            from tvm.target.codegen import llvm_get_intrinsic_name  # noqa: PLC0415
            return str(llvm_get_intrinsic_name(int(arg.value)))
        except Exception:  # noqa: BLE001
            return f"llvm intrinsic #{arg.value}"
    return str(getattr(arg, "value", arg))


def _short(node: object, n: int = 120) -> str:
    s = " ".join(str(node).split())
    return s if len(s) <= n else s[: n - 3] + "..."


class _TirWalker:
    """Allow-list walk of one PrimFunc.  ``mode`` of an expression: ``data`` (a stored
    value: no division), ``index`` (address or loop bound) or ``cond`` (a condition)."""

    def __init__(self, name: str, rep: IntCheckReport):
        self.name, self.rep = name, rep
        self.lets: dict[object, object] = {}  # let-bound integer var -> its value
        self.as_data: set[object] = set()     # those whose value was walked as data

    def let(self, var: object, value: object) -> None:
        """A let binding: its value walked as an index now (no float anywhere); walked
        again as data the first time the variable is used in a data position, so that a
        division cannot hide behind a ``let`` (an index-only let may divide)."""
        handle = _is_handle(_dtype(var))
        self.expr(value, "index", handle_ok=handle)
        if not handle:
            self.lets[var] = value

    def let_as_data(self, var: object) -> None:
        value = self.lets.get(var)
        if value is None or var in self.as_data:
            return
        self.as_data.add(var)
        seen, nodes = set(self.rep.violations), self.rep.nodes
        at = len(self.rep.violations)
        self.expr(value, "data")
        new = [v for v in self.rep.violations[at:] if v not in seen]
        self.rep.violations[at:] = [f"{v} (through let {var})" for v in new]
        self.rep.nodes = nodes

    def bad(self, what: str, node: object) -> None:
        self.rep.violations.append(f"{self.name}: {what}: {_short(node)}")

    def _kind(self, node: object, allowed: Collection[str], what: str) -> str | None:
        """Count ``node``; its kind, or None (recorded as a violation unless ``node`` is
        None) when it may not appear in the integer core."""
        if node is None:
            return None
        self.rep.nodes += 1
        kind = type(node).__name__
        if kind not in allowed:
            self.bad(f"{what} kind {kind} not allowed", node)
            return None
        return kind

    # ---------------- statements ----------------
    def stmt(self, s: object) -> None:
        kind = self._kind(s, ALLOWED_STMTS, "statement")
        if kind is None:
            return
        if kind == "SeqStmt":
            for c in s.seq:
                self.stmt(c)
        elif kind == "For":
            for e in (s.min, s.extent, getattr(s, "step", None)):
                if e is not None:
                    self.expr(e, "index")
            self.stmt(s.body)
        elif kind == "While":
            self.cond(s.condition)
            self.stmt(s.body)
        elif kind == "IfThenElse":
            self.cond(s.condition)
            self.stmt(s.then_case)
            self.stmt(s.else_case)
        elif kind == "BufferStore":
            self.rep.stores += 1
            self.buffer(s.buffer, s)
            for i in s.indices:
                self.expr(i, "index")
            pred = getattr(s, "predicate", None)
            if pred is not None:
                self.cond(pred)
            self.expr(s.value, "data")
        elif kind == "Evaluate":
            v = s.value
            if isinstance(v, tvm.ir.Call):
                self.call(v, "data", evaluated=True)
            elif type(v).__name__ == "IntImm":
                pass
            else:
                self.bad("Evaluate of a non-call", s)
        elif kind in ("Bind", "LetStmt"):
            self.let(s.var, s.value)
            if hasattr(s, "body"):
                self.stmt(s.body)
        elif kind == "AttrStmt":
            v = s.value
            if isinstance(v, tvm.ir.Expr) and type(v).__name__ != "StringImm":
                self.expr(v, "index", handle_ok=True)
            self.stmt(s.body)
        elif kind == "AssertStmt":
            self.cond(s.condition)
        elif kind in ("AllocBuffer", "DeclBuffer"):
            self.buffer(s.buffer, s)
            self.stmt(getattr(s, "body", None))
        elif kind == "SBlock":
            for b in s.alloc_buffers:
                self.buffer(b, s)
            for iv in s.iter_vars:
                self.expr(iv.dom.min, "index")
                self.expr(iv.dom.extent, "index")
            for mb in s.match_buffers:
                self.buffer(mb.buffer, s)
            self.stmt(s.init)
            self.stmt(s.body)
        elif kind == "SBlockRealize":
            for v in s.iter_values:
                self.expr(v, "index")
            self.cond(s.predicate)
            self.stmt(s.block)
        elif kind == "Return":
            self.expr(getattr(s, "value", None), "index")
        # Break / Continue / ScopeIdDefStmt: nothing to check

    def buffer(self, buf: object, where: object) -> None:
        dt = str(buf.dtype)
        if not _is_int(dt):
            self.rep.violations.append(f"{self.name}: buffer {buf.name} of dtype {dt} "
                                       f"in {type(where).__name__}")

    def cond(self, e: object) -> None:
        self.expr(e, "cond")

    # ---------------- expressions ----------------
    def expr(self, e: object, mode: str, handle_ok: bool = False) -> None:
        kind = self._kind(e, ALLOWED_EXPRS, "expression")
        if kind is None:
            return
        if kind == "Var" and type(getattr(e, "ty", None)).__name__ == "BufferType":
            if not _is_int(str(e.ty.dtype)):  # a buffer passed by reference (buffer_data)
                self.bad(f"buffer {e} of dtype {e.ty.dtype}", e)
            return
        dt = _dtype(e)
        if kind == "StringImm":
            if mode != "string":
                self.bad("string value outside a call argument", e)
            return
        if kind == "Call":
            self.call(e, mode, handle_ok=handle_ok)
            return
        if not _is_int(dt):
            if not (handle_ok and _is_handle(dt) and kind == "Var"):
                self.bad(f"{kind} of dtype {dt}", e)
                return
        if kind in _DIVISION and mode == "data":
            self.bad(f"{kind} on data", e)
        if kind == "TensorLoad":
            self.buffer(e.source, e)
            for i in e.indices:
                self.expr(i, "index")
            pred = getattr(e, "predicate", None)
            if pred is not None:
                self.cond(pred)
        elif kind in _BINARY or kind in _DIVISION:
            self.expr(e.a, mode)
            self.expr(e.b, mode)
        elif kind in ("Not", "BitwiseNot"):
            self.expr(e.a, mode)
        elif kind == "Cast":
            self.expr(e.value, mode)
        elif kind == "Ramp":
            self.expr(e.base, mode)
            self.expr(e.stride, mode)
        elif kind == "Broadcast":
            self.expr(e.value, mode)
        elif kind == "Shuffle":
            for v in e.vectors:
                self.expr(v, mode)
            for i in e.indices:
                self.expr(i, "index")
        elif kind == "Select":
            self.cond(e.condition)
            self.expr(e.true_value, mode)
            self.expr(e.false_value, mode)
        elif kind == "Let":
            self.let(e.var, e.value)
            self.expr(e.body, mode)
        elif kind in ("Var", "SizeVar") and mode == "data":
            self.let_as_data(e)

    def call(self, e: tvm.ir.Call, mode: str, evaluated: bool = False,
             handle_ok: bool = False) -> None:
        op = _op_name(e)
        args = list(e.args)
        name = op
        if op in NAMED_CALL_WRAPPERS:
            name = _callee_name(args[0]) if args else "?"
            if op.startswith("tirx.call_llvm"):
                # call_llvm_(pure_)intrin(id_or_name, num_signature_args, args...)
                args = args[2:] if len(args) >= 2 and type(args[1]).__name__ == "IntImm" \
                    else args[1:]
            else:
                args = args[1:]
        if name not in ALLOWED_CALLS:
            self.bad(f"call of {name} not in the allow-list", e)
            return
        dt = _dtype(e)
        if not _is_int(dt):
            void_ok = evaluated and dt in ("void", "")
            ptr_ok = _is_handle(dt) and (handle_ok or evaluated or name in _POINTER_CALLS)
            if not (void_ok or ptr_ok):
                self.bad(f"call of {name} returning {dt}", e)
                return
        if name == "tirx.reinterpret":
            src = [_dtype(a) for a in args]
            if not ((_is_int(dt) and all(map(_is_int, src)))
                    or (_is_handle(dt) and all(map(_is_handle, src)))):
                self.bad("reinterpret other than integer<->integer or pointer<->pointer", e)
                return
        if name == "tirx.if_then_else":
            self.cond(args[0])
            for a in args[1:]:
                self.expr(a, mode)
            return
        if name in _MMA_OPS:
            for a in args:
                if type(a).__name__ == "StringImm" and a.value in _FLOAT_MMA_DTYPES:
                    self.bad(f"{name} with {a.value} operands", e)
        if name == "tirx.type_annotation":
            if not (_is_int(dt) or _is_handle(dt)):
                self.bad(f"type_annotation of {dt}", e)
            return
        sub = "index" if name in _POINTER_CALLS or name in _PLUMBING else mode
        for a in args:
            if type(a).__name__ == "StringImm":
                self.rep.nodes += 1
                continue
            self.expr(a, sub, handle_ok=True)


def check_prim_func(name: str, func: tirx.PrimFunc, rep: IntCheckReport | None = None
                    ) -> IntCheckReport:
    """Allow-list walk of one PrimFunc (its parameters, buffers and body)."""
    rep = rep if rep is not None else IntCheckReport()
    rep.prim_funcs.append(name)
    w = _TirWalker(name, rep)
    for p in func.params:
        dt = _dtype(p)
        if type(p.ty).__name__ == "BufferType":
            dt = str(p.ty.dtype)
        if not (_is_int(dt) or _is_handle(dt)):
            w.bad(f"parameter {p} of dtype {dt}", p)
    for buf in getattr(func, "buffer_map", {}).values():
        w.buffer(buf, func)
    w.stmt(func.body)
    return rep


# ----------------------------------------------------------------------------
# Relax
# ----------------------------------------------------------------------------

def _relax_callees(mod: tvm.IRModule, func: str, rep: IntCheckReport) -> list[str]:
    """Allow-list walk of Relax function ``func`` (and Relax functions it calls);
    returns the PrimFuncs it reaches, in order."""
    prims: list[str] = []
    seen: set[str] = set()
    todo = [func]
    while todo:
        fname = todo.pop()
        if fname in seen:
            continue
        seen.add(fname)

        def visit(e: relax.Expr, fname: str = fname) -> None:
            if isinstance(e, (relax.Var, relax.Call)):
                sinfo = e.ty
                if isinstance(sinfo, relax.TensorType) and sinfo.dtype:
                    if not _is_int(str(sinfo.dtype)):
                        rep.violations.append(f"relax {fname}: value of dtype {sinfo.dtype}")
            if isinstance(e, relax.ExternFunc) and e.global_symbol not in ALLOWED_EXTERN_FUNCS:
                rep.violations.append(f"relax {fname}: ExternFunc {e.global_symbol} "
                                      "not in the allow-list")
            if not isinstance(e, relax.Call):
                return
            rep.relax_bindings += 1
            op = e.op
            if isinstance(op, tvm.ir.Op):
                if op.name not in ALLOWED_RELAX_OPS:
                    rep.violations.append(f"relax {fname}: op {op.name} not in the allow-list")
                elif op.name == "relax.call_tir":
                    gv = e.args[0]
                    if not isinstance(gv, tvm.ir.GlobalVar) or gv.name_hint not in mod \
                            or not isinstance(mod[gv.name_hint], tirx.PrimFunc):
                        rep.violations.append(f"relax {fname}: call_tir of non-PrimFunc {gv}")
                    elif gv.name_hint not in prims:
                        prims.append(gv.name_hint)
                elif op.name in ("relax.call_pure_packed", "relax.call_packed"):
                    if not isinstance(e.args[0], relax.ExternFunc):
                        rep.violations.append(f"relax {fname}: {op.name} of {e.args[0]}")
            elif isinstance(op, tvm.ir.GlobalVar):
                callee = mod[op.name_hint] if op.name_hint in mod else None
                if isinstance(callee, relax.Function):
                    todo.append(op.name_hint)
                elif isinstance(callee, tirx.PrimFunc):
                    if op.name_hint not in prims:
                        prims.append(op.name_hint)
                else:
                    rep.violations.append(f"relax {fname}: calls unknown {op.name_hint}")
            elif isinstance(op, relax.ExternFunc):
                pass  # reported above when not allowed
            else:
                rep.violations.append(f"relax {fname}: call of {type(op).__name__} {op}")

        relax.analysis.post_order_visit(mod[fname], visit)
    return prims


def check_integer_only(mod: tvm.IRModule, func: str = "core") -> IntCheckReport:
    """Check the Relax function ``func`` of a legalized (scheduled) module and the
    PrimFuncs reachable from it (``core`` stage)."""
    rep = IntCheckReport()
    for name in _relax_callees(mod, func, rep):
        check_prim_func(name, mod[name], rep)
    rep.stages.append("core")
    return rep


# ----------------------------------------------------------------------------
# The TIR that codegen receives
# ----------------------------------------------------------------------------

def lower_to_codegen(mod: tvm.IRModule, target: tvm.target.Target,
                     names: list[str] | None = None) -> list[tvm.IRModule]:
    """Run the PrimFuncs ``names`` of ``mod`` through what ``tvm.tirx.build`` does
    before ``target.build.*``: BindTarget, the default TIR pipeline for the target,
    host/device split and the host/device finalization passes.  Returns the host
    module and the device modules."""
    names = names if names is not None else [
        gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    # relax's AttachGlobalSymbol gives every PrimFunc its name before tirx.build
    tir = tvm.IRModule({mod.get_global_var(n): mod[n].with_attr("global_symbol", n)
                        for n in names})
    tgt = target
    if target.host is None:  # a CPU target hosts itself; a device one gets an llvm host
        on_cpu = target.get_target_device_type() == tvm.cpu().dlpack_device_type()
        tgt = target.with_host(target if on_cpu else tvm.target.Target("llvm"))
    with tgt:
        tir = bind_target(tgt)(tir)
        pipeline, fin_host, fin_dev = tir_pipeline(target)
        tir = pipeline(tir)
        host_mod, dev = split_host_device_mods(tir)
        host_mod = fin_host()(host_mod)
        devs = [fin_dev()(m) for m in dev.values()]
    return [host_mod, *devs]


def check_codegen_tir(mod: tvm.IRModule, target: tvm.target.Target,
                      func: str = "core") -> IntCheckReport:
    """Allow-list walk of the post-pipeline TIR of the PrimFuncs reachable from
    ``func`` (``codegen`` stage)."""
    rep = IntCheckReport()
    names = _relax_callees(mod, func, IntCheckReport())
    for m in lower_to_codegen(mod, target, names):
        for gv, f in m.functions_items():
            if isinstance(f, tirx.PrimFunc):
                check_prim_func(gv.name_hint, f, rep)
    rep.codegen_funcs = list(rep.prim_funcs)
    rep.stages.append("codegen")
    return rep


def full_check(mod: tvm.IRModule, target: tvm.target.Target, func: str = "core"
               ) -> IntCheckReport:
    """Relax + scheduled TIR (``core``), then post-pipeline TIR (``codegen``)."""
    rep = check_integer_only(mod, func)
    try:
        post = check_codegen_tir(mod, target, func)
    except Exception as e:  # noqa: BLE001 - a failed replay fails the proof, on every target
        rep.violations.append(f"[codegen] TIR pipeline failed: {error_line(e)}")
        return rep
    rep.merge(post, "codegen")
    rep.codegen_funcs = post.codegen_funcs
    return rep


def record_asm(rep: IntCheckReport, ex: object) -> None:
    """Scan the compiled core's x86 assembly into ``rep`` (``asm`` stage); its float
    instructions become violations. The llvm backend's machine-code check (CUDA's is
    ``schedule_cuda.record_sass``)."""
    a = scan_executable(ex, rep.prim_funcs)
    rep.asm = a.as_dict()
    rep.stages.append("asm")
    if not a.scanned:
        rep.violations.append(f"[asm] not scanned: {a.note}")
    rep.violations += [f"[asm] {v}" for v in a.violations]
