"""qcompile/targets/x86/amx.py: AMX tile kernels bit-exact against NumPy integers, the rule
that picks them, and what keeps an AMX artifact off a machine that cannot run it."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

from qcompile.runtime import loader
from qcompile.verify.asmcheck import classify_x86
from qcompile.targets.x86 import amx as A
from qcompile.targets.x86 import kernel_rules as Rl
from qcompile.targets.x86 import vnni as V
from qcompile.targets.x86.epilogue import FusedAdd, requant_arrays
from qcompile.hw.facts import cpu_flags
from tests.helpers.x86_kernel_helpers import Pads, _expected, _rand, _requant_setup, _run, _windows

needs_amx = pytest.mark.skipif(
    not set(A.CPU_FLAGS) <= cpu_flags() or not A.request_amx(),
    reason="no AMX tiles here (amx_tile/amx_int8 flags, or the OS refused arch_prctl)")


def _conv_ref(x: np.ndarray, w: np.ndarray, st: Sequence[int], pads: Pads,
              dil: Sequence[int]) -> np.ndarray:
    win = _windows(x.astype(np.int64), w.shape[2], w.shape[3], st, pads, dil, 0)
    return np.einsum("bhwcij,ocij->bhwo", win, w.astype(np.int64))


@pytest.mark.hardware
@needs_amx
@pytest.mark.parametrize("N,H,W,C,OC,k,st,pads,dil,in_dtype,out_dtype,raw", [
    (2, 6, 6, 64, 64, 1, (1, 1), (0, 0, 0, 0), (1, 1), "uint8", "int8", False),  # flat rows
    (1, 7, 7, 64, 48, 1, (1, 1), (0, 0, 0, 0), (1, 1), "uint8", "uint8", False),  # flat tail, 3 C tiles
    (1, 20, 18, 128, 80, 3, (1, 1), (1, 1, 1, 1), (1, 1), "uint8", "int8", False),  # row tails, 2 chunks
    (2, 9, 33, 32, 32, 3, (2, 2), (1, 0, 1, 2), (1, 1), "uint8", "int32", True),  # C < 64, odd pads
    (1, 10, 17, 64, 40, 3, (1, 1), (2, 2, 2, 2), (2, 2), "int8", "int8", False),  # dilated, signed
    (1, 16, 16, 64, 64, 1, (2, 2), (0, 0, 0, 0), (1, 1), "int8", "uint8", False),  # 1x1 s2, signed
    (2, 7, 7, 64, 48, 3, (1, 1), (1, 1, 1, 1), (1, 1), "uint8", "int8", False),  # im2col, 7x7 map
    (1, 9, 9, 128, 32, 3, (2, 2), (1, 0, 0, 1), (1, 1), "int8", "int32", True),  # im2col, s2, signed
    (2, 23, 21, 3, 64, 7, (2, 2), (3, 3, 3, 3), (1, 1), "uint8", "int8", False),  # 7x7x3 stem
    (1, 40, 40, 3, 48, 7, (2, 2), (3, 2, 3, 2), (2, 1), "int8", "uint8", False),  # stem, signed
])
def test_conv2d_nhwc_amx_exact(N: int, H: int, W: int, C: int, OC: int, k: int,
                               st: tuple[int, int], pads: Pads, dil: tuple[int, int],
                               in_dtype: str, out_dtype: str, raw: bool) -> None:
    rng = np.random.default_rng(H * C + OC)
    x, w = _rand(rng, (N, H, W, C), in_dtype), _rand(rng, (OC, C, k, k), "int8")
    bias = rng.integers(-2**20, 2**20, OC).astype(np.int32)
    acc, bias, q = _requant_setup(rng, _conv_ref(x, w, st, pads, dil) + bias, bias, raw, out_dtype)
    kbias = V.signed_input_bias(w, bias) if in_dtype == "int8" else bias
    f = A.conv2d_nhwc_amx(N, H, W, C, OC, k, k, st, pads, dil, out_dtype=out_dtype, raw=raw,
                          in_dtype=in_dtype)
    got = _run(f, [x, V.pack_conv_weights(w), kbias, *(q or [])], acc.shape,
               "int32" if raw else out_dtype)
    np.testing.assert_array_equal(got, _expected(acc, q, out_dtype))


@pytest.mark.hardware
@needs_amx
@pytest.mark.parametrize("M,N,K,raw", [(37, 80, 128, False), (5, 48, 32, True), (16, 1000, 64, False)])
def test_dense_amx_exact(M: int, N: int, K: int, raw: bool) -> None:
    rng = np.random.default_rng(M + N + K)
    a, w = _rand(rng, (M, K), "uint8"), _rand(rng, (N, K), "int8")
    bias = rng.integers(-2**20, 2**20, N).astype(np.int32)
    ref = a.astype(np.int64) @ w.astype(np.int64).T + bias
    acc, bias, q = _requant_setup(rng, ref, bias, raw, "int8")
    f = A.dense_amx(M, N, K, out_dtype="int32" if raw else "int8", raw=raw)
    got = _run(f, [a, V.pack_weights(w), bias, *(q or [])], (M, N), "int32" if raw else "int8")
    np.testing.assert_array_equal(got, _expected(acc, q, "int8"))


@pytest.mark.hardware
@needs_amx
def test_fused_residual_with_mulhi_requant_is_exact() -> None:
    """The epilogue a ResNet block's conv3 gets: mulhi requant, then the residual qadd and
    its ReLU, on a flat (1x1) and a windowed (3x3) kernel."""
    rng = np.random.default_rng(5)
    for k, pads in ((1, (0, 0, 0, 0)), (3, (1, 1, 1, 1))):
        x, w = _rand(rng, (2, 9, 18, 64), "uint8"), _rand(rng, (64, 64, k, k), "int8")
        bias = rng.integers(-2**16, 2**16, 64).astype(np.int32)
        acc = _conv_ref(x, w, (1, 1), pads, (1, 1)) + bias
        s = rng.integers(33, 37, 64)  # mulhi's range; m = 100 / max|acc| in s fraction bits
        m = np.round(100.0 / np.abs(acc).reshape(-1, 64).max(axis=0) * 2.0**s).astype(np.int64)
        assert ((m > 0) & (m < 2**31)).all()
        r = np.left_shift(1, s - 1)
        res = rng.integers(0, 256, acc.shape).astype(np.uint8)
        add = FusedAdd(19000, (4000,), ("uint8",), 1 << 14, 15, 0, 255, "int32", "uint8")
        y = np.clip((acc.astype(np.int64) * m + r) >> s, -128, 127)
        want = np.clip((y * 19000 + res.astype(np.int64) * 4000 + (1 << 14)) >> 15, 0, 255)
        f = A.conv2d_nhwc_amx(2, 9, 18, 64, 64, k, k, (1, 1), pads, requant="mulhi", post=[add])
        got = _run(f, [x, V.pack_conv_weights(w), bias, *requant_arrays("mulhi", m, r, s), res],
                   acc.shape, "uint8")
        np.testing.assert_array_equal(got, want.astype(np.uint8))
        assert 0.2 < float((want > 0).mean()) < 0.9  # neither side of the ReLU dominates


AMX_FLAGS = frozenset({"avx512_vnni", "avx512f", *A.CPU_FLAGS})


@pytest.mark.unit
def test_rules_pick_amx_where_its_tiles_fill() -> None:
    def pick(d: Rl.LayerDesc, flags: frozenset[str] = AMX_FLAGS) -> str:
        spec = Rl.select_kernel(d, flags)
        assert spec is not None
        return spec.name

    conv = Rl.LayerDesc("conv2d", (8, 56, 56, 64), channels=64, kernel=(3, 3), pads=(1, 1, 1, 1))
    assert pick(conv) == "conv2d_nhwc_amx"
    assert pick(conv, AMX_FLAGS - {"amx_int8"}) == "conv2d_nhwc_vnni"     # CPU or OS says no
    small = Rl.LayerDesc("conv2d", (8, 7, 7, 512), channels=512, kernel=(3, 3), pads=(1,) * 4)
    assert pick(small) == "conv2d_nhwc_amx"                  # 7x7: through an im2col matrix
    flat = Rl.LayerDesc("conv2d", (1, 7, 7, 2048), channels=512)
    assert pick(flat) == "conv2d_nhwc_amx"                   # 1x1: flattened rows fill tiles
    assert pick(Rl.LayerDesc("conv2d", (1, 28, 28, 80), channels=80)) == "conv2d_nhwc_vnni"
    assert pick(Rl.LayerDesc("conv2d", (1, 28, 28, 40), channels=240)) == "conv2d_nhwc_vnni"
    assert pick(Rl.LayerDesc("dense", (8, 2048), channels=1000)) == "dense_amx"
    assert pick(Rl.LayerDesc("dense", (8, 2048), in_dtype="int8", channels=10)) == "dense_vnni"
    stem = Rl.LayerDesc("conv2d", (8, 224, 224, 3), in_dtype="int8", channels=64, kernel=(7, 7),
                        strides=(2, 2), pads=(3,) * 4)
    assert pick(stem) == "conv2d_nhwc_amx"                   # a kernel row per tile row
    assert pick(dataclasses.replace(stem, kernel=(3, 3), pads=(1,) * 4)) == "conv2d_nhwc_vnni"
    int4 = Rl.LayerDesc("conv2d", (1, 56, 56, 64), channels=64, w_bits=4)
    assert pick(int4, AMX_FLAGS | {"gfni"}) == "conv2d_nhwc_vnni_int4"  # packed 4-bit first


@pytest.mark.unit
def test_no_amx_env_keeps_to_vnni(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(A, "request_amx", lambda: True)
    assert Rl.usable_flags(AMX_FLAGS) == AMX_FLAGS
    monkeypatch.setenv("QCOMPILE_NO_AMX", "1")
    assert Rl.usable_flags(AMX_FLAGS) == AMX_FLAGS - set(A.CPU_FLAGS)
    monkeypatch.setenv("QCOMPILE_NO_AMX", "0")
    monkeypatch.setattr(A, "request_amx", lambda: False)             # the OS refused
    assert not set(A.CPU_FLAGS) & Rl.usable_flags(AMX_FLAGS)


@pytest.mark.unit
def test_loader_refuses_an_amx_artifact_where_amx_is_not_granted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"target": {"kind": "llvm"}, "cpu_features": ["amx"], "params": []}))
    (tmp_path / "module.so").write_bytes(b"not loaded before the check")
    np.savez(tmp_path / "weights.npz")
    monkeypatch.setattr(loader, "request_amx", lambda: False)
    with pytest.raises(loader.LoadError, match="AMX.*QCOMPILE_NO_AMX=1"):
        loader.Model.open(tmp_path)


@pytest.mark.unit
def test_asm_check_allows_integer_tile_ops_only() -> None:
    for op in ("tdpbusd", "tdpbssd", "tileloadd", "tilestored", "ldtilecfg", "tilezero",
               "tilerelease"):
        assert classify_x86(op) is None, op
    for op in ("tdpbf16ps", "tdpfp16ps", "addsd"):                  # float tile / scalar ops
        assert classify_x86(op) is not None, op
