"""The VNNI GEMM engine of the x86 kernels: the dot instruction, its tensor intrinsic, the
register tile and the schedule that turns a GEMM-shaped TE compute into fast TIR.

The computes (what is multiplied with what: dense, implicit-GEMM conv, grouped conv) live
in ``x86_vnni``; this module only schedules. A compute hands over a block "acc" with
loops (*lead, i, j, *reduce) (the last reduce loop over packed k) and a block "out" that
maps acc to the output element-wise (the epilogue, ``x86_epilogue``); ``schedule_gemm``
tiles, tensorizes and parallelizes acc and fuses out into the register tile.

Register tile (measured with benchmarks/kernels_x86.py, 1 thread, medians): mr x nb zmm
int32 accumulators (7x2 when N allows), K innermost through our vpdpbusd intrinsic, the
tile unrolled and kept under 1 KiB so TVM allocates it on the stack and LLVM keeps it in
registers (see ACC_SCOPE), (M tiles x N tiles) fused into one parallel loop. N tiles go
outermost when the weights outweigh the activations (late 7x7 layers), so each weight
panel is streamed once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import tvm

from qcompile.tvm_compat import tirx
from qcompile.tvm_compat import SBlockRealize, Schedule, TensorIntrin
from qcompile.tvm_compat import s_tir
from qcompile.tvm_compat import LoopRV, SBlockRV
from qcompile.tvm_compat import T

from qcompile.targets.x86.int4 import dot_intrin_int4

SBlock = s_tir.SBlock


# ----------------------------------------------------------------------------- hardware
@dataclass(frozen=True)
class DotIsa:
    """A u8 x s8 -> s32 dot-product instruction: ``lanes`` accumulators of
    ``k_per_lane`` products each, in a register file of ``vector_regs`` registers."""

    name: str
    instruction: str
    llvm_intrinsic: str
    cpu_flag: str  # /proc/cpuinfo flag that proves support
    lanes: int
    k_per_lane: int
    vector_bits: int
    vector_regs: int

    def __post_init__(self) -> None:
        if self.lanes * 32 != self.vector_bits or self.k_per_lane * 8 != 32:
            raise ValueError(f"{self.name}: lanes x 32 bit must fill one "
                             f"{self.vector_bits}-bit register")

    @property
    def block_bytes(self) -> int:
        """Bytes of packed weight one instruction reads (lanes x k_per_lane int8)."""
        return self.lanes * self.k_per_lane


AVX512_VNNI = DotIsa(name="avx512_vnni", instruction="vpdpbusd",
                     llvm_intrinsic="llvm.x86.avx512.vpdpbusd.512", cpu_flag="avx512_vnni",
                     lanes=16, k_per_lane=4, vector_bits=512, vector_regs=32)
ISA = AVX512_VNNI
LANES, KG = ISA.lanes, ISA.k_per_lane


# ----------------------------------------------------------------------------- intrinsic
def _dot_intrin(c_scope: str, llvm_name: str = AVX512_VNNI.llvm_intrinsic
                ) -> tuple[tirx.PrimFunc, tirx.PrimFunc]:
    """desc/impl of C[16] += A[4] . B[16, 4] with C in ``c_scope`` (tensorize
    matches buffer scopes, hence the parameter)."""

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4,), "uint8", offset_factor=1),
             B: T.Buffer((16, 4), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1, scope=c_scope)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "uint8", offset_factor=1),
             B: T.Buffer((16, 4), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1, scope=c_scope)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            C[T.ramp(T.int32(0), 1, 16)] = vpdpbusd(llvm_name, C, A, B.vload([0, 0], "int8x64"))

    return desc, impl


def vpdpbusd(llvm_name: str, C: tirx.Buffer, A: tirx.Buffer, b: tirx.PrimExpr) -> tirx.PrimExpr:
    """C[0:16] + A[0:4] . b (64 weight bytes) as one instruction; shared by the int8 and
    int4 dot intrinsics, which differ only in how they produce ``b``.

    LLVM 22's vpdpbusd.512 takes <64 x i8> operands (the built-in intrinsic passes
    i32x16): broadcast the 4 activation bytes as one i32, then view them as u8x64.
    """
    a = tirx.reinterpret("uint8x64",
                         tirx.Broadcast(tirx.reinterpret("int32", A.vload([0], "uint8x4")), 16))
    return tirx.call_llvm_pure_intrin("int32x16", llvm_name, C.vload([0], "int32x16"), a, b)


# Accumulators live in a "global"-scope buffer of < 1024 bytes: TVM puts exactly those
# on the stack (LowerTVMBuiltin); "local" scope or >= 1024 bytes becomes a
# TVMBackendAllocWorkspace call + memset + stores per tile (measured 12-16% slower on
# K = 64 layers). A stack alloca with constant indices is promoted to zmm registers.
ACC_SCOPE = "global"
MAX_STACK_BYTES = 1023
INTRIN = "qcompile_vnni_u8s8s32_16x4"
TensorIntrin.register(INTRIN, *_dot_intrin(ACC_SCOPE), override=True)
INTRIN_INT4 = "qcompile_vnni_u8s4s32_16x4"
TensorIntrin.register(
    INTRIN_INT4, *dot_intrin_int4(ACC_SCOPE, partial(vpdpbusd, AVX512_VNNI.llvm_intrinsic)),
    override=True)




# ----------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class GemmTile:
    """Register tile: ``mr`` rows x ``nb`` 16-lane column blocks of int32 accumulators."""

    mr: int
    nb: int
    n_outer: bool = False  # loop N tiles outside M tiles (weights bigger than activations)


def _max_rows(nb: int, k_pad: int) -> int:
    """Rows of an nb-block tile. A small K leaves the tile epilogue-bound, and fewer rows
    keep the requant's temporaries in registers (1 thread, 1x1 convs of EfficientNet-
    Lite0: 8x1 beat 12x1 1.4x at K = 16..32; 4x3 beat 5x3 1.3-1.5x at K = 24..40)."""
    small = k_pad < 128
    return {1: 8 if small else 12, 2: 7, 3: 4 if small else 5}[nb]


def gemm_tile(m: int, n_pad: int, k_pad: int, isa: DotIsa = ISA) -> GemmTile:
    """Pick the register tile: mr x nb accumulator registers within MAX_STACK_BYTES
    (7x2, 5x3 or 12x1; fewer rows at small K, ``_max_rows``); mr minimises the padded
    rows of M (tail rows are recomputed).
    A 6x4 tile (1536 B) measured 5-16% slower than 7x2: it no longer fits on the stack."""
    blocks = n_pad // isa.lanes
    nb = next(b for b in (2, 3, 1) if blocks % b == 0)
    mr_max = min(MAX_STACK_BYTES // (nb * isa.vector_bits // 8), _max_rows(nb, k_pad),
                 max(m, 1))
    # Cost ~ tiles x (rows + fixed per-k-step overhead of the weight loads and loop).
    mr = min(range(mr_max, (mr_max - 1) // 2, -1), key=lambda r: -(-m // r) * (r + 1.5))
    return GemmTile(mr, nb, n_outer=n_pad * k_pad > m * k_pad)


def schedule_gemm(sch: Schedule, tile: GemmTile, n_red: int, intrin: str = INTRIN,
                   lead: int = 0) -> None:
    """Tile, tensorize and parallelize block "acc" (loops *lead, i, j, *reduce, last
    reduce over packed k) and fuse block "out" into the register tile. ``lead`` outer
    spatial loops (the groups of a grouped conv) join the parallel loop.

    # Step 1. split i -> (io, ii), j -> (jo, jb, 16), last reduce -> (ko, 4)
    # Step 2. io/jo outermost and parallel, reduction next, register tile innermost
    # Step 3. acc lives in a small stack buffer (registers); out is computed per tile
    # Step 4. tensorize the 16x4 block with vpdpbusd, unroll the register tile
    """
    acc = sch.get_sblock("acc")
    loops = sch.get_loops(acc)
    groups, (i, j), red = loops[:lead], loops[lead:lead + 2], loops[lead + 2:]
    io, ii = sch.split(i, [None, tile.mr])
    jo, jb, ji = sch.split(j, [None, tile.nb, LANES])
    ko, ki = sch.split(red[-1], [None, KG])
    outer = [*groups, *([jo, io] if tile.n_outer else [io, jo])]
    sch.reorder(*outer, *red[:-1], ko, ii, jb, ji, ki)
    sch.set_scope(acc, 0, ACC_SCOPE)
    out = sch.get_sblock("out")
    sch.reverse_compute_at(out, outer[-1])
    tile_loop = sch.fuse(*outer)
    sch.parallel(tile_loop)
    init = sch.decompose_reduction(acc, red[0] if n_red > 1 else ko)
    sch.tensorize(ji, intrin)
    sch.unroll(ii)
    sch.unroll(jb)
    # Zero-init and the epilogue are 16-lane vector loops over the tile's columns.
    # One zmm per vector op: fused to nb*16 lanes, an nb = 3 tile became a <48 x i32>
    # vector that LLVM legalized through the stack (vpinsrd/vpextrd per lane), which
    # made every 5x3 / 4x3 tile 5-10x slower than 12x1 (28x28x240 -> 240: 1.48 vs 0.17 ms).
    iinit = sch.get_loops(init)
    sch.vectorize(iinit[-1])
    sch.unroll(iinit[-2])
    sch.unroll(iinit[-3])
    rows, cols = epilogue_loops(sch, out, tile_loop)
    # Constant tile indices everywhere let LLVM keep the whole tile in registers
    # (no memset + store/reload of the accumulators around a predicated epilogue).
    split = cols is not None and _split_ragged_last_tile(sch, rows, cols)  # rows unrolled
    if not split:
        # Before the column loop is split: loop_partition (ragged columns) replaces it.
        _store_tail_rows_clamped(sch, out)
        rows, cols = epilogue_loops(sch, out, tile_loop)
    if cols is None or split:
        pass
    elif int(sch.get(cols).extent) % LANES:
        _vectorize_columns(sch, cols)  # one N tile, N % 16 != 0: no predicate
    else:
        oc, ov = sch.split(cols, [None, LANES])
        if _predicated(sch, out, ov):
            # A column predicate _split_ragged_last_tile does not take. Vectorized, TVM
            # scalarizes it and LLVM 22 re-vectorizes it with masked stores, and its
            # single-lane masked truncating store of the last column (mask <1,0,0,0> on
            # v4i64 -> v4i8) is emitted as a full 8-byte `vmovq`: 7 bytes of sign fill
            # past the row, into the next row's first channels (past the buffer on the
            # last row). Inside a tile the next row overwrites them later; across
            # parallel tiles that is a race (wrong first channels of a tile's first
            # row whenever its thread stored it before the previous tile's last row).
            # Unrolled, each column is a plain guarded scalar store.
            sch.unroll(ov)
        else:
            sch.vectorize(ov)
        sch.unroll(oc)
    # A one-row tile (batch-1 dense, a 1x1 map) has no row loop; the tile loop itself is
    # unrolled then, one thread for all N tiles (as before): a parallel loop measured up
    # to 300x slower there (dense 1x1000x512 int4: 4.7 us serial, 1.4 ms parallel on a
    # busy 2-vCPU VM: waking a thread costs more than the whole microsecond kernel).
    if rows is None:
        sch.unroll(tile_loop)
    elif not split:
        sch.unroll(rows)


def _vectorize_columns(sch: Schedule, cols: LoopRV) -> None:
    """Vectorize an unpredicated epilogue column loop: whole 16-lane vectors, then one
    vector of the columns left (N = 40 with one N tile: 16 + 16 + 8), no masks.

    With one N tile and N % 16 != 0 the loop's extent is N itself. Split by 16 instead,
    the last block kept ``where col < N``, so it had to be unrolled to scalars (see
    schedule_gemm), and LLVM's SLP vectorizer re-vectorized the tile's mr x N scalar
    stores as one contiguous run across its rows: vectors that straddle rows, misaligned
    with the per-channel parameters. Under znver4's cost model it split that run unevenly
    (scalar columns in between), assembled the parameter vectors lane by lane (13-14
    vpinsrd/vpextrd) and kept them on the stack: 1x1 conv 28x28x40 -> 40 ran 1.18x
    slower than cascadelake's code on a Zen 4. Per-row vectors read the parameters as
    whole vectors; the short one is a narrower load and store (an odd width is stored as
    8 + 4 + 2 + 1 bytes), so nothing lands past the row. Zen 4, 1 thread, medians, 1x1
    convs at 28x28: K = 40 -> 40, znver4 code 6.48 -> 5.69 us (cascadelake code 5.88 ->
    5.82); K = 240 -> 40 23.3 -> 22.0 us; 40 -> 24 3.82 -> 3.59 us; 40 -> 15 equal. One
    vector for the rest beat 8/4/2/1-lane loops 1.2-1.3x at N = 15, equal at N = 40."""
    extent = int(sch.get(cols).extent)
    full, rest = extent - extent % LANES, extent % LANES
    if full and rest:
        cols, tail = sch.loop_partition(cols, [full, None])
        _renew_iter_vars(sch, sch.get_child_blocks(tail)[0])
    else:
        tail = cols
    if full > LANES:
        oc, ov = sch.split(cols, [None, LANES])
        sch.vectorize(ov)
        sch.unroll(oc)
    elif full:
        sch.vectorize(cols)
    if rest > 1:
        sch.vectorize(tail)


def _split_ragged_last_tile(sch: Schedule, rows: LoopRV | None, cols: LoopRV) -> bool:
    """Several N tiles of E = nb*16 columns, the last one ragged (N % E != 0): the
    epilogue's column loop keeps ``where start + col < N`` (start, the tile's first
    column, a multiple of E). Partition the columns at R = N % E, each part with its own
    row loop: columns [0, R) exist in every tile (no predicate); [R, E) in every tile but
    the last, so that part runs under one ``if start + E - 1 < N`` around all its rows
    (a block over the rows with that predicate). Both parts are vectorized
    (_vectorize_columns), their rows unrolled and tail rows clamped. Returns False
    (nothing done) for any other epilogue.

    Unrolled to guarded scalars, as before, every tile paid the ragged tile's price, and
    a branch per row split the tile's straight-line code: LLVM then hoisted the GEMM's
    activation broadcasts and spilled 55 of them. Zen 4, 1 thread, interleaved medians,
    1x1 convs (znver4 code; cascadelake's alike): 28x28x40 -> 72 30.9 -> 12.1 us (-> 80:
    9.6 us), -> 200 83.0 -> 33.0 us, 27x27x40 -> 72 34.6 -> 16.4 us, 14x14x80 -> 200
    25.5 -> 14.8 us."""
    loop = sch.get(cols)
    realize, c, extent = loop.body, loop.loop_var, int(loop.extent)
    if not isinstance(realize, SBlockRealize) or extent % LANES:
        return False
    terms = _conjuncts(realize.predicate)
    on_col = [t for t in terms if any(u.same_as(c) for u in tirx.analysis.undefined_vars(t))]
    if len(on_col) != 1:
        return False
    pred = on_col[0]
    # start + col < N, start = x * (a multiple of E): anything else keeps the old path.
    if not (isinstance(pred, tirx.LT) and isinstance(pred.b, tirx.IntImm)
            and isinstance(pred.a, tirx.Add) and pred.a.b.same_as(c)):
        return False
    start, rest = pred.a.a, int(pred.b) % extent
    if not (rest and isinstance(start, tirx.Mul) and isinstance(start.b, tirx.IntImm)
            and int(start.b) % extent == 0):
        return False
    full_tile = start + (extent - 1) < pred.b
    if rows is not None:
        sch.reorder(cols, rows)
    for k, part in enumerate(sch.loop_partition(cols, [rest, None])):
        block = sch.get_child_blocks(part)[0]
        if k:
            _renew_iter_vars(sch, block)
        if rows is not None:
            sch.reorder(*sch.get_loops(block)[-1:-3:-1])
        inner = sch.get(sch.get_loops(block)[-1])
        others = [t for t in _conjuncts(inner.body.predicate) if not any(
            u.same_as(inner.loop_var) for u in tirx.analysis.undefined_vars(t))]
        _set_predicate(sch, sch.get_loops(block)[-1],
                       tirx.all(*others) if others else tirx.const(True, "bool"))
        if k:
            _guard(sch, block, full_tile)
        _store_tail_rows_clamped(sch, block)
        loops = sch.get_loops(block)
        if rows is not None:
            sch.unroll(loops[-2])
        _vectorize_columns(sch, loops[-1])
    return True


def _renew_iter_vars(sch: Schedule, block: SBlockRV) -> None:
    """Give ``block`` iter vars of its own. loop_partition copies a block whose binding of
    the partitioned loop is not the bare loop var (start + col here) with the original's
    iter vars: two definitions of one var, which TVM's well-formedness check (any
    Schedule of the result) rejects."""
    sref = sch.get_sref(block)
    blk = sref.stmt
    vmap = {iv.var: tirx.Var(iv.var.name, iv.var.ty) for iv in blk.iter_vars}
    params = list(vmap)

    def expr(e: tirx.PrimExpr) -> tirx.PrimExpr:
        return tirx.PrimFunc(params, tirx.Evaluate(e)).specialize(vmap).body.value

    def regions(rs: list) -> list:
        return [type(r)(r.source, [tvm.ir.Range.from_min_extent(expr(x.min), expr(x.extent))
                                   for x in r.region], r.ty) for r in rs]

    new = SBlock([tirx.IterVar(iv.dom, vmap[iv.var], iv.iter_type, iv.thread_tag)
                  for iv in blk.iter_vars], regions(blk.reads), regions(blk.writes),
                 blk.name_hint, tirx.PrimFunc(params, blk.body).specialize(vmap).body,
                 blk.init, blk.alloc_buffers, blk.match_buffers, blk.annotations)
    sch.state.replace(sref, new, {blk: new})


def _guard(sch: Schedule, block: SBlockRV, pred: tirx.PrimExpr) -> None:
    """Predicate the block loop_partition wrapped ``block``'s partition in (the whole
    nest: one branch around it)."""
    def block_above(sref: tirx.Stmt) -> tirx.Stmt:
        sref = sref.parent
        while not isinstance(sref.stmt, SBlock):
            sref = sref.parent
        return sref

    wrapper = block_above(sch.get_sref(block))
    common = block_above(wrapper)
    parent = common.stmt
    seq = parent.body.seq if isinstance(parent.body, tirx.SeqStmt) else [parent.body]
    assert all(isinstance(r, SBlockRealize) for r in seq), parent.body
    seq = [SBlockRealize(list(r.iter_values), pred, r.block) if r.block.same_as(wrapper.stmt)
           else r for r in seq]
    new = SBlock(parent.iter_vars, parent.reads, parent.writes, parent.name_hint,
                 tirx.SeqStmt(seq), parent.init, parent.alloc_buffers, parent.match_buffers,
                 parent.annotations)
    sch.state.replace(common, new, {parent: new, **{r.block: r.block for r in seq}})


def _set_predicate(sch: Schedule, loop: LoopRV, pred: tirx.PrimExpr) -> None:
    """Replace the predicate of the block directly under ``loop``."""
    f = sch.get(loop)
    realize = f.body
    new = SBlockRealize(list(realize.iter_values), pred, realize.block)
    sch.state.replace(sch.get_sref(loop), tirx.For(f.loop_var, f.min, f.extent, f.kind, new,
                                                   f.thread_binding, f.annotations),
                      {realize.block: realize.block})


def _store_tail_rows_clamped(sch: Schedule, out: SBlockRV) -> None:
    """Drop the epilogue's row predicate: the last M tile's rows past M store their
    value again into row M-1 instead of being skipped.

    Those rows recompute row M-1 (the GEMM's clamped row index), so the store writes the
    same bytes, from the same thread. Skipped under a per-row ``where``, each row's
    epilogue became its own basic block and LLVM, no longer seeing the sign extensions
    next to the multiply, widened the int32 requant to int64 halves: any M with a tail
    tile (113x113, 17x17, 8x8 maps) ran the whole kernel up to 1.8x slower (1x1 conv
    113x113x16 -> 96: 264 vs 150 us at 112x112)."""
    loop = sch.get_loops(out)[-1]
    realize = sch.get(loop).body
    if not isinstance(realize, SBlockRealize):
        return  # a one-element epilogue: its loop is the tile loop itself
    # A row predicate: it does not read the innermost (column) loop, and the row iter's
    # extent is its bound, the iter's binding reading every loop the predicate reads.
    # (A column predicate, ragged N, stays: with N == M it once passed for a row one,
    # and the dropped guard let the last column block write into the next row.) With
    # several N tiles, the last one ragged, it is one term of `rows and columns`.
    col = sch.get(loop).loop_var
    values, keep = list(realize.iter_values), []
    for term in _conjuncts(realize.predicate):
        row = _row_bound(realize, term, col)
        if row is None:
            keep.append(term)
        else:
            values[row] = tirx.min(values[row], term.b - 1)
    if len(keep) == len(_conjuncts(realize.predicate)):
        return
    pred = tirx.all(*keep) if keep else True
    new = SBlockRealize(values, pred, realize.block)
    f = sch.get(loop)
    sch.state.replace(sch.get_sref(loop), tirx.For(f.loop_var, f.min, f.extent, f.kind, new,
                                                   f.thread_binding, f.annotations),
                      {realize.block: realize.block})


def _conjuncts(pred: tirx.PrimExpr) -> list[tirx.PrimExpr]:
    if isinstance(pred, tirx.And):
        return _conjuncts(pred.a) + _conjuncts(pred.b)
    return [] if isinstance(pred, tirx.IntImm) and int(pred) else [pred]


def _row_bound(realize: SBlockRealize, term: tirx.PrimExpr, col: tirx.Var) -> int | None:
    """The block iter ``term`` (``rows < M``) bounds, if it is a row predicate."""
    if not (isinstance(term, tirx.LT) and isinstance(term.b, tirx.IntImm)):
        return None
    pvars = tirx.analysis.undefined_vars(term)
    if any(u.same_as(col) for u in pvars):
        return None
    rows = [k for k, (iv, v) in enumerate(zip(realize.block.iter_vars, realize.iter_values))
            if int(iv.dom.extent) == int(term.b) and all(
                any(u.same_as(p) for u in tirx.analysis.undefined_vars(v)) for p in pvars)]
    return rows[0] if len(rows) == 1 else None


def _predicated(sch: Schedule, block: SBlockRV, loop: LoopRV) -> bool:
    """Whether ``block`` runs under a ``where`` that depends on ``loop`` (padded columns
    it must not write). A predicate on rows only (the last M tile's recomputed rows)
    is one branch per row around a whole vector: it does not count."""
    realize = sch.get(sch.get_loops(block)[-1]).body
    assert isinstance(realize, SBlockRealize), type(realize)
    var = sch.get(loop).loop_var
    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(realize.predicate))


def epilogue_loops(sch: Schedule, out: SBlockRV, tile_loop: LoopRV
                    ) -> tuple[LoopRV | None, LoopRV | None]:
    """The loops of block ``out`` inside ``tile_loop``, where reverse_compute_at put it:
    (the loop over its other tile axis, the loop over its last axis, the output column
    or channel), each None where there is none.

    reverse_compute_at makes no loop of extent 1: a GEMM tile of one row (M = 1 or
    mr = 1) has no row loop, one of one column (N = 1, or og = 1 per group) no column
    loop. So the loops are told apart by the block's bindings, never by position:
    ``loops[-2]`` may be the parallel tile loop itself, ``loops[-1]`` too.
    """
    loops = sch.get_loops(out)
    tile = sch.get(tile_loop)
    depth = next(i for i, lp in enumerate(loops) if sch.get(lp).same_as(tile))
    own = loops[depth + 1:]
    if not own:
        return None, None
    realize = sch.get(own[-1]).body
    assert isinstance(realize, SBlockRealize), type(realize)
    col_vars = tirx.analysis.undefined_vars(realize.iter_values[-1])
    is_col = [any(v.same_as(sch.get(lp).loop_var) for v in col_vars) for lp in own]
    cols = [lp for lp, c in zip(own, is_col) if c]
    rows = [lp for lp, c in zip(own, is_col) if not c]
    assert len(cols) <= 1 and len(rows) <= 1, (len(cols), len(rows))
    return (rows[0] if rows else None), (cols[0] if cols else None)


def schedule_stage(sch: Schedule, name: str) -> None:
    """A copy/pad stage: outer loops parallel, innermost vectorized."""
    blk = sch.get_sblock(name)
    loops = sch.get_loops(blk)
    sch.parallel(sch.fuse(*loops[:2]) if len(loops) > 2 else loops[0])
    # One zmm of bytes per vector op: wider vectors (K = 2304 in an im2col row) choke LLVM.
    last = sch.get_loops(blk)[-1]
    extent = int(sch.get(last).extent)
    _, inner = sch.split(last, [None, math.gcd(extent, 64)])
    sch.vectorize(inner)

