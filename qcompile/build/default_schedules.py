"""Default CPU schedules for the generic PrimFuncs no hand-written kernel covers.

After legalization and fusion, every op that is not a conv/dense/depthwise/pool kernel
(residual adds with dyadic requantization, clips, concat, transposes, table lookups,
pads, slices, reductions ...) is a TIR PrimFunc straight out of TVM's legalization:
one full-size intermediate buffer per fused op, scalar, single-threaded. dlight's CPU
rules cover GEMV and softmax-like reductions only.  This module gives those functions
a default schedule, as a small chain of dlight-style rules::

    rule(func, target) -> Schedule | None      # None: not mine, try the next rule

tried in order (``DEFAULT_RULES``); the first schedule wins, and a function no rule
takes (or whose rule raises) stays as it was.  The rules:

* ``injective``: inline every intermediate block (compute_inline, then
  reverse_compute_inline), then per remaining block fuse the trailing loops into a
  vector loop (lanes: a power of two dividing the extent, wider for narrow dtypes),
  fuse the rest into one loop and parallelize it unless the function is tiny.
* ``reduction``: one reduction block (plus injective prologue/epilogue): spatial loops
  parallel; when the output's innermost axis is also the input's (NHWC sum over H, W),
  that axis goes inside the reduction loops and is vectorized (accumulators stay in
  registers); epilogue blocks that cannot be inlined get the injective schedule.
* dlight's ``cpu.Reduction`` (softmax-like chains) as the last resort.

Scheduling only reorders, splits, fuses and inlines loops: dtypes and arithmetic are
unchanged, so an integer-only function stays integer-only and bit-exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import tvm
from tvm import relax
from tvm.sym import detect_linear_equation
from tvm.target import Target

from qcompile.tvm_compat import (
    SBlockInfo, Schedule, dlight, get_sblockrealize, normalize_prim_func, tirx,
    try_inline_contiguous_spatial)

Rule = Callable[[tirx.PrimFunc, Target], "Schedule | None"]

# Below this many elements of work a function stays on one thread: a parallel launch
# costs a few microseconds, about what 16K vectorized int8..int64 elements take.
MIN_PARALLEL_ELEMENTS = 16384
MAX_LANES = 64      # one zmm of int8; int64 math then spans 8 registers
MIN_LANES = 4
VECTOR_BITS = 1024  # lanes ~ 2 zmm of the widest dtype in the function, within the bounds

SCHEDULED = ("tirx.is_scheduled", "tir.is_scheduled")  # TVM 0.27 key, and the older one
_KERNEL_OPAQUE = 8  # op_pattern kOpaque: schedule.py's hand-scheduled kernels


@dataclass
class ScheduleReport:
    scheduled: dict[str, str] = field(default_factory=dict)  # PrimFunc -> rule
    skipped: dict[str, str] = field(default_factory=dict)    # PrimFunc -> why

    def summary(self) -> str:
        return (f"default schedules: {len(self.scheduled)} PrimFuncs scheduled, "
                f"{len(self.skipped)} left as they are")


# --- helpers -----------------------------------------------------------------------------
def _extent(sch: Schedule, loop) -> int | tirx.PrimExpr:
    e = sch.get(loop).extent
    return int(e) if isinstance(e, tirx.IntImm) else e


def _work(extents: Sequence[int | tirx.PrimExpr]) -> float:
    """Iterations of a loop nest; a symbolic extent (batch) counts as large."""
    return math.inf if any(not isinstance(e, int) for e in extents) else math.prod(extents)


def _max_bits(sch: Schedule, blocks: Sequence[SBlockInfo]) -> int:
    """The widest dtype any block reads or writes: before inlining, the intermediate
    buffers carry the dtypes the fused arithmetic runs in (int64 requant ...)."""
    bits = 8
    for b in blocks:
        blk = sch.get(b.block_rv)
        for region in list(blk.reads) + list(blk.writes):
            bits = max(bits, int(region.source.dtype.bits))
    return bits


def lanes_for(extent: int | tirx.PrimExpr, bits: int) -> int | None:
    """Vector lanes for an inner loop of ``extent``: the largest power of two that divides
    it, at most ~2 registers of ``bits``-wide values (16..64), at least MIN_LANES."""
    if not isinstance(extent, int):
        return None
    cap = max(16, min(MAX_LANES, VECTOR_BITS // max(bits, 1)))
    lanes = cap
    while lanes >= MIN_LANES:
        if extent % lanes == 0:
            return lanes
        lanes //= 2
    return None


def _parallel(sch: Schedule, loops: list, work: float, min_work: int) -> None:
    """Fuse ``loops`` into one and parallelize it when the work is worth the launch."""
    if not loops:
        return
    p = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    ext = _extent(sch, p)
    if work >= min_work and (not isinstance(ext, int) or ext > 1):
        sch.parallel(p)


def _linear(expr: tirx.PrimExpr, var: tirx.Var) -> int | None:
    """The coefficient of ``var`` in ``expr`` if ``expr`` is affine in it, else None."""
    coef = detect_linear_equation(expr, [var])
    if len(coef) != 2 or not isinstance(coef[0], tirx.IntImm):
        return None
    return int(coef[0])


def _loads(expr: object) -> bool:
    """Whether ``expr`` reads a buffer (a data-dependent index, as in ``take``)."""
    if isinstance(expr, tvm.ir.TensorLoad):
        return True
    if isinstance(expr, tvm.ir.Call):
        return any(_loads(a) for a in expr.args)
    return any(_loads(getattr(expr, a)) for a in ("a", "b", "value", "condition",
                                                  "true_value", "false_value")
               if isinstance(getattr(expr, a, None), tvm.ir.Expr))


def _contiguous(sch: Schedule, block, k: int) -> bool:
    """Whether the block's trailing ``k`` loops walk every buffer it touches contiguously
    (or not at all: broadcasts, scalars) or look it up by data (tables: a vector gather,
    3x faster than the scalar loop): a vector loop over them then loads and stores
    whole vectors. A transpose's input fails: TVM's vector loop would gather lane by
    lane there, and LLVM's own vectorizer does better on the plain loop."""
    blk = sch.get(block)
    loops = sch.get_loops(block)
    realize = get_sblockrealize(sch, block)
    loop_vars = [sch.get(lp).loop_var for lp in loops]
    # block iter i bound to loop i (legalized functions: T.axis.remap)
    if len(realize.iter_values) != len(loop_vars) or not all(
            _is_var(v, lv) for v, lv in zip(realize.iter_values, loop_vars)):
        return False
    ivars = [iv.var for iv in blk.iter_vars]
    trail = ivars[-k:]
    exts = [_extent(sch, lp) for lp in loops[-k:]]
    regions = [(r, True) for r in blk.reads] + [(w, False) for w in blk.writes]
    for region, is_read in regions:
        if is_read and any(_loads(r.min) for r in region.region):
            continue  # a lookup (take): the index buffer is checked as a read of its own
        mins = [r.min for r in region.region]
        coefs = [[_linear(m, v) for v in trail] for m in mins]
        if any(c is None for row in coefs for c in row):
            return False
        if all(c == 0 for row in coefs for c in row):
            continue  # does not move with the vector loop
        d = len(mins)
        if d < k:
            return False
        shape = region.source.shape
        for i, row in enumerate(coefs):
            j = i - (d - k)  # which trailing var this dim must follow
            want = [1 if jj == j else 0 for jj in range(k)]
            if row != want:
                return False
            if j >= 1 and not (isinstance(shape[i], tirx.IntImm) and int(shape[i]) == exts[j]):
                return False
    return True


def schedule_spatial(sch: Schedule, block, bits: int,
                     min_work: int = MIN_PARALLEL_ELEMENTS) -> None:
    """One injective block: trailing loops fused and vectorized, the rest fused parallel.

    Without a contiguous vector loop (transposes) the inner loops stay as they are, for
    LLVM's own vectorizer, and only the outer ones are fused and parallelized."""
    loops = sch.get_loops(block)
    if not loops:
        return
    ext = [_extent(sch, lp) for lp in loops]
    cap = max(16, min(MAX_LANES, VECTOR_BITS // bits))
    # Fuse trailing static loops until the vector part holds a full vector.
    k, inner = 1, ext[-1]
    while isinstance(inner, int) and inner < cap and k < len(loops) and isinstance(ext[-k - 1], int):
        k += 1
        inner *= ext[-k]
    lanes = lanes_for(inner, bits) if _contiguous(sch, block, k) else None
    if lanes is not None:
        v = sch.fuse(*loops[-k:]) if k > 1 else loops[-1]
        vo, vi = sch.split(v, [None, lanes])
        sch.vectorize(vi)
        outer = list(loops[:-k]) + [vo]
    else:
        outer = list(loops[:-k]) or list(loops[:1])
    _parallel(sch, outer, _work(ext), min_work)


def _is_var(e: tirx.PrimExpr, v: tirx.Var) -> bool:
    return isinstance(e, tirx.Var) and e.same_as(v)


def schedule_reduction(sch: Schedule, info: SBlockInfo, bits: int,
                       min_work: int = MIN_PARALLEL_ELEMENTS) -> None:
    """One reduction block with its loops in block-iter order (S... R... as legalized)."""
    block = info.block_rv
    kinds = info.dom_kind()
    if "O" in kinds:
        raise ValueError("opaque iterators")
    loops = [it.loop_rv for it in info.iters]
    ext = [_extent(sch, lp) for lp in loops]
    s_loops = [lp for lp, k in zip(loops, kinds) if k == "S"]
    r_loops = [lp for lp, k in zip(loops, kinds) if k == "R"]
    if not r_loops:
        raise ValueError("no reduction loop")
    blk = sch.get(block)
    s_vars = [iv.var for iv, k in zip(blk.iter_vars, kinds) if k == "S"]
    r_vars = [iv.var for iv, k in zip(blk.iter_vars, kinds) if k == "R"]
    # Vectorize the innermost output axis inside the reduction loops when the inputs are
    # contiguous along it (NHWC sum over H, W): the accumulators then stay in registers.
    lanes = None
    if s_loops and isinstance(ext[kinds.rindex("S")], int):
        lasts = [r.region[-1].min for r in blk.reads if len(r.region)]
        if (any(_is_var(m, s_vars[-1]) for m in lasts)
                and not any(_is_var(m, rv) for m in lasts for rv in r_vars)):
            lanes = lanes_for(ext[kinds.rindex("S")], bits)
    if lanes is not None:
        co, ci = sch.split(s_loops[-1], [None, lanes])
        sch.reorder(*s_loops[:-1], co, *r_loops, ci)
        _parallel(sch, s_loops[:-1] + [co], _work(ext), min_work)
        sch.vectorize(ci)  # before decompose: vectorize needs the block a full reduction
        init = sch.decompose_reduction(block, r_loops[0])
        sch.vectorize(sch.get_loops(init)[-1])
    else:
        sch.reorder(*s_loops, *r_loops)
        _parallel(sch, s_loops, _work(ext), min_work)


# --- rules -------------------------------------------------------------------------------
def _prepare(func: tirx.PrimFunc) -> tuple[Schedule, list[SBlockInfo], int] | None:
    sch = Schedule(func)
    blocks = normalize_prim_func(sch)
    if not blocks:
        return None
    bits = _max_bits(sch, blocks)
    return sch, blocks, bits


def injective(func: tirx.PrimFunc, target: Target) -> Schedule | None:
    """Only injective blocks: inline the intermediates, then each survivor (usually one)
    vectorized over its trailing loops and parallel over the rest."""
    prep = _prepare(func)
    if prep is None:
        return None
    sch, blocks, bits = prep
    if not all(b.is_injective() for b in blocks):
        return None
    rest = try_inline_contiguous_spatial(sch, blocks)
    for b in rest:
        schedule_spatial(sch, b.block_rv, bits)
    return sch


def reduction(func: tirx.PrimFunc, target: Target) -> Schedule | None:
    """One reduction block (sum/max over axes) with injective blocks around it."""
    prep = _prepare(func)
    if prep is None:
        return None
    sch, blocks, bits = prep
    if sum(not b.is_injective() for b in blocks) != 1:
        return None
    rest = try_inline_contiguous_spatial(sch, blocks)
    for b in rest:
        if b.is_injective():
            schedule_spatial(sch, b.block_rv, bits)
        else:
            # Re-derive the loops: inlining changed nothing of the reduction's nest, but
            # take them from the schedule as it is now.
            info = next(i for i in normalize_prim_func(sch) if i.name == b.name)
            schedule_reduction(sch, info, bits)
    return sch


def dlight_reduction(func: tirx.PrimFunc, target: Target) -> Schedule | None:
    """dlight's CPU rule for softmax-like chains (max, exp, sum, normalize)."""
    out = dlight.cpu.Reduction().apply(func, target, False)
    return out[0] if isinstance(out, list) else out


DEFAULT_RULES: tuple[tuple[str, Rule], ...] = (
    ("injective", injective), ("reduction", reduction), ("dlight.cpu.Reduction", dlight_reduction))


# --- module level ------------------------------------------------------------------------
_STMT_CHILDREN = ("body", "block", "init", "then_case", "else_case")


def _annotated_loops(stmt: object) -> bool:
    """Whether a loop under ``stmt`` is parallel, vectorized, unrolled or thread-bound
    (TVM 0.27 has no Python TIR visitor: walk the statement fields by hand)."""
    if stmt is None:
        return False
    if isinstance(stmt, tirx.For) and int(stmt.kind) != int(tirx.ForKind.SERIAL):
        return True
    if isinstance(stmt, tirx.SeqStmt):
        return any(_annotated_loops(x) for x in stmt.seq)
    return any(_annotated_loops(c) for c in (getattr(stmt, a, None) for a in _STMT_CHILDREN)
               if isinstance(c, tirx.Stmt))


def skip_reason(func: tirx.PrimFunc) -> str | None:
    """Why ``func`` keeps its own schedule, or None if it gets a default one.

    Hand-scheduled kernels are recognized by their loops (every x86 kernel has parallel
    and vector loops), not by ``op_pattern`` 8: TVM's own legalization marks generic ops
    such as ``take`` opaque too.
    """
    attrs = func.attrs or {}
    if any(bool(attrs.get(k, False)) for k in SCHEDULED):
        return "already scheduled"
    if _annotated_loops(func.body):
        return ("hand-scheduled kernel" if int(attrs.get("op_pattern", -1)) == _KERNEL_OPAQUE
                else "has parallel/vector loops already")
    try:
        # RewriteDataflowReshape turns these into a free R.reshape, if left as they are.
        if relax.analysis.has_reshape_pattern(func):
            return "reshape (becomes a view)"
    except Exception:  # pragma: no cover - analysis refuses odd functions
        pass
    return None


def schedule_func(func: tirx.PrimFunc, target: Target,
                  rules: Sequence[tuple[str, Rule]] = DEFAULT_RULES
                  ) -> tuple[tirx.PrimFunc | None, str]:
    """The first rule's schedule of ``func`` (marked ``tirx.is_scheduled``) and the rule's
    name, or (None, why). A rule that raises counts as not applicable."""
    errors = []
    for name, rule in rules:
        try:
            sch = rule(func, target)
        except Exception as e:  # a default schedule is an optimization: never fail
            errors.append(f"{name}: {type(e).__name__}: {str(e).strip().splitlines()[-1:]}")
            continue
        if sch is None:
            continue
        new = sch.mod["main"]
        if func.attrs is not None:
            new = new.with_attrs(func.attrs)
        return new.with_attr("tirx.is_scheduled", True), name
    return None, "; ".join(errors) or "no rule applies"


def apply_default_schedules(mod: tvm.IRModule, target: Target,
                            rules: Sequence[tuple[str, Rule]] = DEFAULT_RULES
                            ) -> tuple[tvm.IRModule, ScheduleReport]:
    """Schedule every PrimFunc of a legalized module that has no schedule yet.

    Kernels (loops already parallel/vectorized), functions already marked ``tirx.is_scheduled`` (e.g. by
    ``--tune``) and pure reshapes (free views later) are left alone, and so is any
    function no rule takes. Returns the new module and what happened to each function.
    """
    rep = ScheduleReport()
    if target.kind.name != "llvm":
        return mod, rep
    out = mod.clone()
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        name = gv.name_hint
        why = skip_reason(func)
        if why is None:
            new, how = schedule_func(func, target, rules)
            if new is not None:
                out.update_func(gv, new)
                rep.scheduled[name] = how
                continue
            why = how
        rep.skipped[name] = why
    return out, rep


def strip_schedules(mod: tvm.IRModule, original: tvm.IRModule,
                    report: ScheduleReport) -> tvm.IRModule:
    """``mod`` with the default-scheduled functions put back as they were in ``original``."""
    out = mod.clone()
    for name in report.scheduled:
        out.update_func(out.get_global_var(name), original[name])
    return out
