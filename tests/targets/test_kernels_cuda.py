"""Tensor-core kernels (qcompile.targets.cuda.tensor_core): NumPy-exact definitions, T4 SASS, GPU runs.

Three layers, because CI has no GPU:
1. each kernel's unscheduled compute, built for CPU, is bit-exact against NumPy;
2. each scheduled kernel compiles with nvcc for sm_75 to native IMMA (no emulation CALL);
3. ``@pytest.mark.gpu``: the scheduled kernels run bit-exact on a real GPU.
"""
from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import tvm

from qcompile.targets.cuda import tensor_core as ct

HAVE_NVCC = shutil.which("nvcc") is not None  # TVM runs plain `nvcc` from PATH
HAVE_CUOBJDUMP = ct.tool_path("cuobjdump") is not None and ct.tool_path("nvdisasm") is not None
needs_toolchain = pytest.mark.skipif(
    not (HAVE_NVCC and HAVE_CUOBJDUMP),
    reason="needs nvcc (CUDA toolkit) and cuobjdump + nvdisasm "
           "(pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")


@dataclass(frozen=True)
class Case:
    """One kernel instance: generator kind, shape, options, and the IMMA it must compile to."""

    kind: str  # dense | conv | dw
    shape: tuple  # dense: (M, N, K); conv: (data_shape, O, kernel); dw: (data_shape, kernel)
    opts: dict = field(default_factory=dict, hash=False)
    sass: str | None = None

    @property
    def bits(self) -> int:
        return self.opts.get("bits", 8)

    def scheduled(self) -> tvm.tirx.PrimFunc:
        if self.kind == "dense":
            return ct.dense_tc(*self.shape, **self.opts)
        if self.kind == "conv":
            return ct.conv2d_nhwc_tc(*self.shape, **self.opts)
        return ct.depthwise_conv2d_nhwc(*self.shape, **self.opts)

    def reference_func(self) -> tvm.tirx.PrimFunc:
        """The same computation, unscheduled (buildable for CPU)."""
        o = dict(self.opts)
        if self.kind == "dw":
            return ct.depthwise_conv2d_nhwc(*self.shape, schedule=False, **o)
        conv = {k: o.pop(k) for k in ("strides", "pads", "dilations") if k in o}
        q = ct.QuantOpts(**o)
        if self.kind == "dense":
            return ct.dense_compute(*self.shape, q)
        data, oc, kernel = self.shape
        return ct.conv2d_nhwc_compute(data, oc, kernel, conv.get("strides", (1, 1)),
                                      conv.get("pads", (0, 0, 0, 0)),
                                      conv.get("dilations", (1, 1)), q)


U4 = dict(bits=4, out_dtype="uint8", lo=0, hi=15)  # int4 layer feeding a ReLU'd int4 layer
CASES: dict[str, Case] = {
    "dense_u8s8": Case("dense", (64, 64, 128), {}, "IMMA.8816.U8.S8"),
    "dense_s8s8_raw": Case("dense", (32, 48, 96), dict(a_signed=True, raw=True), "IMMA.8816.S8.S8"),
    "dense_u4s4": Case("dense", (64, 64, 256), U4, "IMMA.8832.U4.S4"),
    "dense_u8s8_ragged": Case("dense", (3, 10, 100), dict(out_dtype="uint8", lo=0, hi=255),
                              "IMMA.8816.U8.S8"),
    "conv3x3": Case("conv", ((1, 8, 8, 32), 32, (3, 3)), dict(pads=(1, 1, 1, 1)), "IMMA.8816.U8.S8"),
    "conv1x1": Case("conv", ((2, 7, 7, 64), 32, (1, 1)), {}, "IMMA.8816.U8.S8"),
    "conv3x3_s2": Case("conv", ((1, 9, 9, 16), 24, (3, 3)), dict(strides=(2, 2), pads=(1, 1, 1, 1)),
                       "IMMA.8816.U8.S8"),
    "conv1x1_s2": Case("conv", ((1, 8, 8, 32), 64, (1, 1)), dict(strides=(2, 2)), "IMMA.8816.U8.S8"),
    "conv3x3_dil2": Case("conv", ((1, 9, 9, 16), 16, (3, 3)), dict(pads=(2, 2, 2, 2), dilations=(2, 2)),
                         "IMMA.8816.U8.S8"),
    "conv_stem_c3": Case("conv", ((1, 12, 12, 3), 16, (3, 3)), dict(pads=(1, 1, 1, 1)),
                         "IMMA.8816.U8.S8"),
    "conv3x3_u4s4": Case("conv", ((1, 6, 6, 64), 32, (3, 3)), dict(pads=(1, 1, 1, 1), **U4),
                         "IMMA.8832.U4.S4"),
    "depthwise3x3": Case("dw", ((1, 6, 6, 16), (3, 3)), dict(pads=(1, 1, 1, 1))),
}
TC_CASES = [k for k, c in CASES.items() if c.sass]


# --- NumPy oracle ---------------------------------------------------------------------------

def _im2col(x: np.ndarray, kernel: tuple[int, int], strides: tuple[int, int],
            pads: tuple[int, int, int, int], dil: tuple[int, int]) -> np.ndarray:
    """(N*OH*OW, KH*KW*C) rows in (kh, kw, c) order, matching OHWI weights."""
    n, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), (pads[0], pads[2]), (pads[1], pads[3]), (0, 0)))
    oh, ow = ct.conv_out_hw(x.shape, kernel, strides, pads, dil)
    cols = [xp[:, a * dil[0]: a * dil[0] + strides[0] * oh: strides[0],
               b * dil[1]: b * dil[1] + strides[1] * ow: strides[1], :]
            for a in range(kernel[0]) for b in range(kernel[1])]
    return np.concatenate(cols, axis=-1).reshape(n * oh * ow, -1)


def _requant(acc: np.ndarray, p: dict[str, np.ndarray], opts: dict) -> np.ndarray:
    acc = ((acc + p["bias"] + (1 << 31)) % (1 << 32)) - (1 << 31)  # int32 wrap, like the oracle
    if opts.get("raw"):
        return acc.astype(np.int32)
    dt = opts.get("out_dtype", "int8")
    lo, hi = opts.get("lo", np.iinfo(dt).min), opts.get("hi", np.iinfo(dt).max)
    return np.clip((acc * p["m"] + p["r"]) >> p["s"], lo, hi).astype(dt)


def _make_inputs(case: Case, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Kernel inputs (packed for int4) and the expected output, from unpacked NumPy math."""
    rng = np.random.default_rng(seed)
    signed = case.opts.get("a_signed", False)
    amax = (1 << case.bits) - 1 if not signed else (1 << (case.bits - 1)) - 1
    wmax = 127 if case.bits == 8 else 7
    if case.kind == "dense":
        M, N, K = case.shape
        x = rng.integers(-amax - signed if signed else 0, amax + 1, (M, K))
        w = rng.integers(-wmax, wmax + 1, (N, K))
        acc, n_out = x @ w.T, N
    elif case.kind == "conv":
        data, n_out, kernel = case.shape
        x = rng.integers(0, amax + 1, data)
        w = rng.integers(-wmax, wmax + 1, (n_out, *kernel, data[3]))
        conv = [case.opts.get(k, d) for k, d in
                (("strides", (1, 1)), ("pads", (0, 0, 0, 0)), ("dilations", (1, 1)))]
        oh, ow = ct.conv_out_hw(data, kernel, *conv)
        acc = (_im2col(x, kernel, *conv) @ w.reshape(n_out, -1).T).reshape(data[0], oh, ow, n_out)
    else:
        data, kernel = case.shape
        n_out = data[3]
        x = rng.integers(0, 256, data)
        w = rng.integers(-127, 128, (*kernel, n_out))
        s, p = case.opts.get("strides", (1, 1)), case.opts.get("pads", (0, 0, 0, 0))
        cols = _im2col(x, kernel, s, p, (1, 1)).reshape(-1, kernel[0] * kernel[1], n_out)
        oh, ow = ct.conv_out_hw(data, kernel, s, p)
        acc = np.einsum("mkc,kc->mc", cols, w.reshape(-1, n_out)).reshape(data[0], oh, ow, n_out)
    s = rng.integers(40, 44, n_out)
    params = {"bias": rng.integers(-5000, 5000, n_out), "m": rng.integers(1 << 30, 1 << 31, n_out),
              "s": s, "r": np.left_shift(1, s - 1)}
    expect = _requant(acc.astype(np.int64), params, case.opts)
    pack = ct.pack_int4 if case.bits == 4 else (lambda v: v)
    a_dt = "int8" if signed else "uint8"
    args = [pack(x).astype(a_dt if case.bits == 8 else "uint8"),
            pack(w).astype("int8" if case.bits == 8 else "uint8"),
            params["bias"].astype(np.int32)]
    if not case.opts.get("raw"):
        args += [params[k].astype(np.int64) for k in ("m", "r", "s")]
    return args, expect


def _run(func: tvm.tirx.PrimFunc, target: tvm.target.Target, dev: tvm.runtime.Device,
         args: list[np.ndarray], expect: np.ndarray) -> np.ndarray:
    ex = tvm.compile(tvm.IRModule({"main": func}), target=target)
    tensors = [tvm.runtime.tensor(a, device=dev) for a in args]
    out = tvm.runtime.tensor(np.zeros(expect.shape, expect.dtype), device=dev)
    ex["main"](*tensors, out)
    return out.numpy()


# --- 0. hardware table ----------------------------------------------------------------------

def _tvm_cuda_intrin_source() -> str:
    # find_spec would import the package, whose __init__ imports every backend's intrinsics
    return (Path(tvm.s_tir.__file__).parent / "tensor_intrin" / "cuda.py").read_text()


@pytest.mark.unit
def test_table_intrinsics_exist() -> None:
    """Ours register on demand; TVM's are checked in its source (importing it costs ~60 s)."""
    for bits, signed in ((8, False), (8, True), (4, False), (4, True)):
        for name in ct.ensure_intrins(bits, signed):
            assert tvm.s_tir.TensorIntrin.get(name) is not None
    src = _tvm_cuda_intrin_source()
    for shape in ct.TENSOR_CORES:
        for name in shape.tvm_intrins:
            if not name.startswith(ct.INTRIN_PREFIX):
                assert f'"{name}"' in src, (shape, name)


@pytest.mark.tvm
@pytest.mark.slow
def test_table_intrinsics_registered_in_tvm() -> None:
    import tvm.s_tir.tensor_intrin.cuda  # noqa: F401  (~60 s: registers TVM's CUDA intrinsics)

    for bits, signed in ((8, False), (8, True), (4, False), (4, True)):
        ct.ensure_intrins(bits, signed)
    for shape in ct.TENSOR_CORES:
        for name in shape.tvm_intrins:
            assert tvm.s_tir.TensorIntrin.get(name) is not None, (shape, name)


@pytest.mark.unit
def test_table_arch_rules() -> None:
    t4_8 = {(s.api, s.m, s.n, s.k) for s in ct.mma_shapes(75, 8)}
    assert ("mma.sync", 8, 8, 16) in t4_8 and ("wmma", 16, 16, 16) in t4_8
    assert ("mma.sync", 16, 8, 32) not in t4_8  # sm_80+: ptxas rejects it for sm_75
    assert ct.mma_shapes(90, 4) == ()  # Hopper: no native int4 tensor cores
    assert {s.k for s in ct.mma_shapes(90, 4, native_only=False)} == {32, 64}
    with pytest.raises(ValueError):
        ct.MmaShape("mma.sync", 8, 8, 16, ("u8",), ("s4",), True, 75, None, "IMMA", ())


@pytest.mark.unit
def test_accumulator_quadrants_are_ptx_m8n8_fragments() -> None:
    """Our mma writes quadrant (qi, qj) to regs 4*qj + 2*qi + {0, 1} of lane 4*row + col/2
    (PTX m8n8 C fragment); TVM's 16x16 fill/store layout must agree."""
    for i in range(16):
        for j in range(16):
            lane, reg = ct._acc_layout(i, j)
            assert (lane, reg) == (4 * (i % 8) + (j % 8) // 2, 4 * (j // 8) + 2 * (i // 8) + j % 2)


@pytest.mark.unit
def test_pack_int4_low_nibble_first() -> None:
    assert ct.pack_int4(np.array([1, -2, 15, 0])).tolist() == [0xE1, 0x0F]


# --- 1. definitions vs NumPy (CPU) ----------------------------------------------------------

@pytest.mark.tvm
@pytest.mark.parametrize("name", list(CASES))
def test_compute_matches_numpy_on_cpu(name: str) -> None:
    case = CASES[name]
    args, expect = _make_inputs(case)
    got = _run(case.reference_func(), tvm.target.Target({"kind": "llvm"}), tvm.cpu(), args, expect)
    np.testing.assert_array_equal(got, expect)


# --- 2. sm_75 SASS --------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _sass(name: str, arch: str = "sm_75") -> dict[str, int]:
    hist = ct.sass_histogram(ct.compile_cubin(CASES[name].scheduled(), arch))
    assert len(hist) == 1, f"expected one kernel, got {list(hist)}"
    return next(iter(hist.values()))


@pytest.mark.hardware
@needs_toolchain
@pytest.mark.parametrize("name", TC_CASES)
def test_sm75_sass_uses_native_imma(name: str) -> None:
    ops = _sass(name)
    want = CASES[name].sass
    imma = {op: n for op, n in ops.items() if op.startswith("IMMA")}
    assert set(imma) == {want}, f"{name}: IMMA variants {imma}, want only {want}"
    assert not [op for op in ops if op.startswith("CALL")], f"{name}: calls a helper: {ops}"
    # warp-scope accumulators must live in registers, not local memory
    assert not [op for op in ops if op.startswith(("LDL", "STL"))], f"{name}: spills: {ops}"


@pytest.mark.hardware
@needs_toolchain
def test_depthwise_compiles_without_tensor_cores() -> None:
    ops = _sass("depthwise3x3")
    assert ops and not any(op.startswith(("IMMA", "CALL")) for op in ops)


@pytest.mark.hardware
@needs_toolchain
def test_hopper_int8_native_int4_emulated() -> None:
    """The module docstring's claim: sm_90 keeps int8 IMMA, turns int4 mma into CALLs."""
    int8, int4 = _sass("dense_u8s8", "sm_90"), _sass("dense_u4s4", "sm_90")
    assert any(op.startswith("IMMA.8816") for op in int8)
    assert not any(op.startswith("CALL") for op in int8)
    assert any(op.startswith("CALL") for op in int4)
    assert not any(op.startswith("IMMA.8832") for op in int4)


# --- 3. real GPU ----------------------------------------------------------------------------

@pytest.mark.hardware
@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
def test_gpu_bit_exact(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if not tvm.cuda().exist:
        pytest.skip("no CUDA GPU (tvm.cuda().exist is False)")
    if importlib.util.find_spec("cuda.bindings") is None:  # NVRTC path needs cuda-bindings
        if not HAVE_NVCC:
            pytest.skip("neither cuda-bindings (NVRTC) nor nvcc available to load kernels")
        monkeypatch.setenv("TVM_CUDA_COMPILE_MODE", "nvcc")
    case = CASES[name]
    args, expect = _make_inputs(case, seed=1)
    # The device's own arch: an sm_75 cubin does not load on newer GPUs (int4 is emulated
    # on sm_90 but must still be exact).
    target = tvm.target.Target.from_device(tvm.cuda())
    got = _run(case.scheduled(), target, tvm.cuda(), args, expect)
    np.testing.assert_array_equal(got, expect)
