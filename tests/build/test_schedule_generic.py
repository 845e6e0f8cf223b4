"""Default CPU schedules of the generic (legalized) PrimFuncs: scheduled, and bit-exact."""
from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax, tirx

from qcompile.build import default_schedules as sg
from qcompile.build.compile import _untuned_back, build, legalize
from qcompile.hw.backends import make_target

R = relax.op
TARGET = make_target("llvm")


def _core(shape: tuple[int, int, int, int]) -> tvm.IRModule:
    """core(x int8 NHWC, x2 int8, m/r/s int64 (C,), b int32 (C,), table int8 (256,)) ->
    a tuple of independent integer ops, so each legalizes to its own PrimFunc."""
    n, h, w, c = shape
    x = relax.Var("x", relax.TensorType(shape, "int8"))
    x2 = relax.Var("x2", relax.TensorType((n, h, w, 5), "int8"))
    m, r, s = (relax.Var(k, relax.TensorType((c,), "int64")) for k in "mrs")
    b = relax.Var("b", relax.TensorType((c,), "int32"))
    table = relax.Var("table", relax.TensorType((256,), "int8"))
    bb = relax.BlockBuilder()
    with bb.function("core", [x, x2, m, r, s, b, table]):
        with bb.dataflow():
            outs = []
            v = bb.emit(R.multiply(R.astype(x, "int64"), m))  # requant: int64 * >> clip
            v = bb.emit(R.right_shift(R.add(v, r), s))
            outs.append(bb.emit(R.astype(R.clip(v, -128, 127), "int8")))
            outs.append(bb.emit(R.add(R.astype(x, "int32"), b)))  # broadcast add
            idx = bb.emit(R.add(R.astype(x, "int32"), relax.const(128, "int32")))
            outs.append(bb.emit(R.take(table, idx, axis=0)))  # 256-entry table lookup
            outs.append(bb.emit(R.permute_dims(x, [0, 3, 1, 2])))
            outs.append(bb.emit(R.strided_slice(x, axes=[1, 2], begin=[1, 0], end=[h, w - 1],
                                                strides=[2, 1])))
            outs.append(bb.emit(R.concat([x, x2], axis=3)))
            outs.append(bb.emit(R.nn.pad(x, [0, 0, 1, 2, 1, 1, 0, 0], pad_value=0)))
            outs.append(bb.emit(R.sum(R.astype(x, "int32"), axis=[1, 2], keepdims=True)))
            outs.append(bb.emit(R.sum(R.astype(x, "int32"), axis=[3])))
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    return bb.get()


def _inputs(shape: tuple[int, ...], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    c = shape[3]
    return [rng.integers(-128, 128, size=shape).astype(np.int8),
            rng.integers(-128, 128, size=shape[:3] + (5,)).astype(np.int8),
            rng.integers(1 << 20, 1 << 24, size=c).astype(np.int64),
            (1 << rng.integers(20, 30, size=c)).astype(np.int64),
            rng.integers(21, 31, size=c).astype(np.int64),
            rng.integers(-1000, 1000, size=c).astype(np.int32),
            rng.integers(-128, 128, size=256).astype(np.int8)]


def _numpy(x, x2, m, r, s, b, table) -> list[np.ndarray]:
    h, w = x.shape[1:3]
    x32, x64 = x.astype(np.int32), x.astype(np.int64)
    return [np.clip((x64 * m + r) >> s, -128, 127).astype(np.int8),
            x32 + b,
            table[x32 + 128],
            x.transpose(0, 3, 1, 2),
            x[:, 1:h:2, 0:w - 1],
            np.concatenate([x, x2], axis=3),
            np.pad(x, [(0, 0), (1, 2), (1, 1), (0, 0)]),
            x32.sum(axis=(1, 2), keepdims=True, dtype=np.int32),
            x32.sum(axis=3, dtype=np.int32)]


def _loop_kinds(func: tirx.PrimFunc) -> set[str]:
    text = func.script()
    return {k for k in ("parallel", "vectorized") if f"T.{k}(" in text}


def _run(built, args: list[np.ndarray]) -> list[np.ndarray]:
    vm = relax.VirtualMachine(built.executable, tvm.cpu())
    out = vm["core"](*[tvm.runtime.tensor(a) for a in args])
    return [o.numpy() for o in out]


@pytest.fixture(scope="module", params=[(2, 12, 12, 64), (5, 17, 19, 13)], ids=["even", "prime"])
def case(request: pytest.FixtureRequest):
    shape = request.param
    return shape, build(_core(shape), TARGET)


@pytest.mark.tvm
def test_bit_exact(case) -> None:
    shape, built = case
    args = _inputs(shape)
    got, want = _run(built, args), _numpy(*args)
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, k
        np.testing.assert_array_equal(g, w, err_msg=f"output {k}")


@pytest.mark.tvm
def test_every_generic_func_scheduled(case) -> None:
    shape, built = case
    rep = built.schedules
    assert rep is not None and not rep.skipped, rep.skipped
    assert len(rep.scheduled) >= 9
    assert set(rep.scheduled.values()) == {"injective", "reduction"}
    bare = []
    for name in rep.scheduled:
        f = built.lowered[name]
        assert bool(f.attrs["tirx.is_scheduled"])
        assert "alloc_buffer" not in f.script(), f"{name}: intermediates not inlined"
        if not _loop_kinds(f):
            bare.append(name)
    # Prime extents: no vector width divides them, and the strided slice's 8.5K-element
    # output is below the parallel threshold; everything else runs in parallel.
    assert bare == ([] if shape[3] == 64 else ["strided_slice"]), bare
    assert built.intcheck.ok, built.intcheck.violations


@pytest.mark.tvm
def test_even_shape_parallel_and_vectorized(case) -> None:
    shape, built = case
    if shape[3] != 64:
        pytest.skip("the prime shape has no vector width")
    kinds = {name: _loop_kinds(built.lowered[name]) for name in built.schedules.scheduled}
    # the requant chain, the add and the table lookup (a vector gather): one inlined
    # loop nest each, parallel and vectorized
    vectorized = [n for n, k in kinds.items() if k == {"parallel", "vectorized"}]
    assert len(vectorized) >= 5, kinds
    assert kinds["take"] == {"parallel", "vectorized"}, kinds
    # the transpose's input is strided along the output's inner loop: left to LLVM
    assert kinds["transpose"] == {"parallel"}, kinds
    # the NHWC sum over H, W keeps C innermost and vectorized under the reduction loops
    sums = [n for n, how in built.schedules.scheduled.items() if how == "reduction"]
    assert any("vectorized" in kinds[n] for n in sums), kinds


@pytest.mark.unit
def test_intermediates_inlined() -> None:
    """The requant chain's five fused ops become one block: no intermediate buffers."""
    mod = legalize(_core((2, 12, 12, 64)), TARGET)
    name = next(gv.name_hint for gv, f in mod.functions_items()
                if isinstance(f, tirx.PrimFunc) and "right_shift" in gv.name_hint)
    assert "alloc_buffer" in mod[name].script()
    new, how = sg.schedule_func(mod[name], TARGET)
    assert how == "injective"
    assert "alloc_buffer" not in new.script()


@pytest.mark.unit
def test_tiny_tensors_stay_single_threaded() -> None:
    mod = legalize(_core((1, 2, 3, 16)), TARGET)
    out, rep = sg.apply_default_schedules(mod, TARGET)
    assert rep.scheduled
    for name in rep.scheduled:
        assert "parallel" not in _loop_kinds(out[name]), name


@pytest.mark.unit
def test_lanes() -> None:
    assert sg.lanes_for(64, 8) == 64
    assert sg.lanes_for(64, 64) == 16
    assert sg.lanes_for(1000, 32) == 8
    assert sg.lanes_for(13, 8) is None
    assert sg.lanes_for(tirx.Var("n", "int64"), 8) is None


@pytest.mark.unit
def test_failing_rule_leaves_function_alone() -> None:
    mod = legalize(_core((2, 4, 4, 16)), TARGET)

    def boom(func, target):
        raise RuntimeError("rule bug")

    out, rep = sg.apply_default_schedules(mod, TARGET, rules=[("boom", boom)])
    assert not rep.scheduled and rep.skipped
    assert any("rule bug" in why for why in rep.skipped.values())
    assert tvm_ffi.structural_equal(out, mod)


@pytest.mark.unit
def test_kernels_and_scheduled_funcs_skipped() -> None:
    mod = legalize(_core((2, 4, 4, 16)), TARGET)
    out, rep = sg.apply_default_schedules(mod, TARGET)
    assert "take" in rep.scheduled  # legalized take is op_pattern 8 (opaque), but generic
    vec = next(n for n in rep.scheduled if _loop_kinds(out[n]))
    kernel = out[vec].with_attr("op_pattern", 8).without_attr("tirx.is_scheduled")
    assert sg.skip_reason(kernel) == "hand-scheduled kernel"
    f = mod["take"]
    assert sg.skip_reason(f) is None
    assert sg.skip_reason(f.with_attr("tirx.is_scheduled", True)) == "already scheduled"


@pytest.mark.unit
def test_untuned_record_falls_back_to_default() -> None:
    """A tuned function whose best record is the untuned loop nest gets the default."""
    mod = legalize(_core((2, 4, 4, 16)), TARGET)
    tuned = mod.clone()
    gv, f = next((gv, f) for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc))
    tuned.update_func(gv, f.with_attr("tirx.is_scheduled", True))
    back = _untuned_back(tuned, mod)
    assert "tirx.is_scheduled" not in (back[gv.name_hint].attrs or {})


@pytest.mark.tvm
def test_intcheck_sees_inlined_float() -> None:
    """Scheduling inlines, and the checker still finds float arithmetic inside."""
    x = relax.Var("x", relax.TensorType((4, 64, 64), "int32"))
    bb = relax.BlockBuilder()
    with bb.function("core", [x]):
        with bb.dataflow():
            v = bb.emit(R.multiply(R.astype(x, "float32"), relax.const(0.5, "float32")))
            out = bb.emit_output(R.astype(v, "int32"))
        bb.emit_func_output(out)
    built = build(bb.get(), TARGET)
    assert built.schedules.scheduled
    assert not built.intcheck.ok
    assert any("float32" in v for v in built.intcheck.violations)


@pytest.mark.tvm
def test_compile_failure_falls_back_to_unscheduled(monkeypatch: pytest.MonkeyPatch) -> None:
    """If TVM cannot compile a default schedule, the build warns and compiles without."""
    real = tvm.compile
    calls = []

    def flaky(mod, *a, **k):
        calls.append(any(bool((f.attrs or {}).get("tirx.is_scheduled", False))
                         for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)))
        if calls[-1]:
            raise RuntimeError("codegen bug\nmore")
        return real(mod, *a, **k)

    monkeypatch.setattr(tvm, "compile", flaky)
    shape = (2, 4, 4, 16)
    with pytest.warns(UserWarning, match="codegen bug"):
        built = build(_core(shape), TARGET)
    assert calls == [True, False]
    assert not built.schedules.scheduled
    assert set(built.schedules.skipped.values()) == {"compile failed"}
    args = _inputs(shape)
    for g, w in zip(_run(built, args), _numpy(*args)):
        np.testing.assert_array_equal(g, w)
