"""qcompile.hw.facts: the CUDA arch table, --target/--arch validation, and what the cost model
and the allocator make of each arch (int4 emulated on sm_90: no 4-bit speed gain)."""
from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from qcompile.mixed import ilp as A
from qcompile.hw import gpus
from qcompile.mixed import costs
from qcompile.cli.main import main
from qcompile.errors import UsageError
from qcompile.targets.cuda import tensor_core as ct
from qcompile.hw.facts import CUDA_ARCHS, CudaArch, check_arch, cuda_arch
from qcompile.hw.backends import make_target, precisions
from tests.mixed.test_costs import tiny_residual

pytestmark = pytest.mark.unit


# --- the table ------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(CUDA_ARCHS))
def test_arch_rows_agree_with_the_kernels_table(arch: str) -> None:
    """targets.CUDA_ARCHS and cuda_tc.TENSOR_CORES describe the same hardware: every
    mma.sync row the kernels' table allows on the arch is among the arch's shapes, and
    int4 is native exactly where the kernels' int4 rows are."""
    row = CUDA_ARCHS[arch]
    assert row.arch == arch and row.sm == int(arch[3:])
    for bits, shapes in ((8, row.mma_int8), (4, row.mma_int4)):
        for s in ct.mma_shapes(row.sm, bits, native_only=False):
            if s.api == "mma.sync":
                assert f"m{s.m}n{s.n}k{s.k}" in shapes, (arch, s)
    int4_rows = ct.mma_shapes(row.sm, 4, native_only=False)
    assert row.int4_native == all(s.native_on(row.sm) for s in int4_rows)
    assert (4 in row.peak_ops) == row.int4_native
    if row.int4_native:  # where int4 has tensor cores it runs at twice the INT8 rate
        assert row.peak_ops[4] == pytest.approx(2 * row.peak_ops[8])
    # dense INT8 = 2x FP16 (L4: the datasheet rounds 485 and 242 sparse)
    assert row.peak_ops[8] == pytest.approx(2 * row.peak_ops[16], rel=0.01)
    assert ct.kernel_mma(8, row.sm).native_on(row.sm)  # int8 is native everywhere here


def test_table_facts() -> None:
    assert list(CUDA_ARCHS) == ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90"]
    gpus = {a: r.gpu for a, r in CUDA_ARCHS.items()}
    assert gpus == {"sm_75": "NVIDIA T4", "sm_80": "NVIDIA A100", "sm_86": "NVIDIA A10",
                    "sm_89": "NVIDIA L4", "sm_90": "NVIDIA H100 SXM"}
    assert [a for a, r in CUDA_ARCHS.items() if not r.int4_native] == ["sm_90"]
    assert "m16n8k32" not in CUDA_ARCHS["sm_75"].mma_int8  # sm_80+: ptxas rejects it on sm_75
    with pytest.raises(ValueError, match="arch must look like"):
        CudaArch("75", "x", None, 1, 1, 1, 1, 1, 1, ("m8n8k16",), ("m8n8k32",), ("m16n8k8",))
    with pytest.raises(ValueError, match="positive"):
        CudaArch("sm_75", "x", None, 1, 0, 1, 1, 1, 1, ("m8n8k16",), ("m8n8k32",), ("m16n8k8",))


@pytest.mark.parametrize("arch", list(CUDA_ARCHS))
def test_make_target_carries_the_arch(arch: str) -> None:
    t = make_target("cuda", arch=arch)
    assert t.kind.name == "cuda" and str(t.attrs["arch"]) == arch  # H100's tag says sm_90a
    assert int(t.attrs["max_threads_per_block"]) == 1024 and int(t.attrs["thread_warp_size"]) == 32
    assert str(make_target("cuda").attrs["arch"]) == "sm_75"


def test_targets_import_without_tvm() -> None:
    """The CLI validates --target/--arch before TVM (seconds to import) is loaded."""
    code = "import sys, qcompile.hw.facts, qcompile.mixed.costs; assert 'tvm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- usage errors ---------------------------------------------------------------------
def test_check_arch() -> None:
    assert check_arch("llvm", None) is None
    assert check_arch("cuda", None) == "sm_75" and check_arch("cuda", "sm_90") == "sm_90"
    assert check_arch("t4", None) == "sm_75"
    with pytest.raises(UsageError, match="--arch sm_90 needs --target cuda"):
        check_arch("llvm", "sm_90")
    with pytest.raises(UsageError, match="one of sm_75, sm_80, sm_86, sm_89, sm_90; got 'sm_70'"):
        cuda_arch("sm_70")
    with pytest.raises(UsageError, match="--target t4 means sm_75"):
        check_arch("t4", "sm_90")


@pytest.mark.parametrize("args, message", [
    (["--arch", "sm_90"], "error: --arch sm_90 needs --target cuda; --target llvm builds for "
                          "this CPU"),
    (["--target", "cuda", "--arch", "sm_70"],
     "error: --arch must be one of sm_75, sm_80, sm_86, sm_89, sm_90; got 'sm_70'"),
])
@pytest.mark.parametrize("command", ["compile", "allocate"])
def test_cli_usage_errors_before_any_work(command: str, args: list[str], message: str,
                                          tmp_path) -> None:
    """One line, exit 2, and checked first: the model need not even exist."""
    extra = ["-o", str(tmp_path / "out")] if command == "compile" else []
    r = CliRunner().invoke(main, [command, str(tmp_path / "missing.onnx"), *extra, *args])
    assert r.exit_code == UsageError.exit_code, r.output
    assert r.output.strip() == message
    assert not (tmp_path / "out").exists()


# --- cost model and allocator ---------------------------------------------------------
def test_precisions_follow_the_arch() -> None:
    assert precisions("cuda").allocator == {8: "w8a8", 4: "w4a4"}
    assert precisions("cuda", "sm_90").allocator == {8: "w8a8", 4: "w4a4"}
    assert "emulat" in precisions("cuda", "sm_90").why and precisions("cuda", "sm_90") \
        is precisions(make_target("cuda", arch="sm_90"))
    assert precisions(make_target("cuda", arch="sm_89")) is precisions("cuda")
    assert precisions("llvm").allocator == {8: "w8a8", 4: "w4a8"}


def test_gpu_specs_and_labels() -> None:
    h100 = gpus.gpu_spec("sm_90")
    assert costs.T4 == gpus.gpu_spec() and costs.T4.peak_ops[4] == 260e12
    assert h100.name == "NVIDIA H100 SXM" and dict(h100.emulated) == {4: 8}
    assert 4 not in h100.peak_ops and h100.peak_ops[8] == 1979e12 and h100.sms == 132
    assert gpus.predicted_label(h100) == "predicted (H100 SXM roofline model)"
    assert gpus.predicted_label(costs.T4) == costs.PREDICTED


@pytest.mark.parametrize("arch", list(CUDA_ARCHS))
def test_emulated_int4_is_never_faster(arch: str) -> None:
    gpu = gpus.gpu_spec(arch)
    for la in costs.layers_of(tiny_residual()):
        for batch in (1, 64):
            t4, t8 = (costs.t4_layer_ms(la, b, batch, gpu) for b in (4, 8))
            if CUDA_ARCHS[arch].int4_native:
                assert t4 < t8
            else:  # sm_90: 4 bits cost the 8-bit time, even where the layer is memory-bound
                assert t4 == t8
            assert costs.t4_layer_ms(la, "w4a8", batch, gpu) <= t8


def _plan_at_min_latency(arch: str) -> dict[str, int]:
    """The allocator under the tightest relative latency budget (alpha 0 = the all-4-bit
    plan's latency), on the arch's predicted table, with Omega(4) > Omega(8)."""
    from qcompile.mixed.plan import predicted_cost_model

    graph = tiny_residual()
    cost = predicted_cost_model(graph, gpus.gpu_spec(arch), batch=1)
    omega = {la.name: {4: 1.0 + i, 8: 0.01} for i, la in enumerate(costs.layers_of(graph))}
    problem = A.Problem.from_graph(graph, omega, latency=cost.latency,
                                   overhead_ms=cost.overhead_ms, pin_first=None, pin_last=None,
                                   pairs=precisions("cuda", arch).allocator)
    return dict(A.solve(problem, A.parse_budgets(latency="0")).bits)


def test_allocator_counts_no_4bit_speed_gain_where_int4_is_emulated() -> None:
    # T4: all-INT4 is the only plan as fast as all-INT4
    assert set(_plan_at_min_latency("sm_75").values()) == {4}
    # H100: 4 bits buy no time, so the same budget is met at 8 bits (lower Omega) everywhere
    assert set(_plan_at_min_latency("sm_90").values()) == {8}
