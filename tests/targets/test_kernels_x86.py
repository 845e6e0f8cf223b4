"""qcompile/targets/x86/vnni.py: every kernel bit-exact against NumPy integers, and vpdpbusd in the asm.

Each case compiles one small PrimFunc for this CPU (~0.5 s each) and compares the
whole output with ``np.array_equal``: integer kernels have no tolerance.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pytest
import tvm

from qcompile.targets.x86 import kernel_rules as Rl
from qcompile.targets.x86 import vnni as V
from qcompile.targets.x86 import int4 as I4
from qcompile.hw.facts import cpu_flags, has_vnni
from qcompile.hw.backends import make_target
from tests.helpers.x86_kernel_helpers import (Pads, _compile, _expected, _qparams, _rand, _requant,
                                              _requant_setup, _run, _weights, _windows, _wrap32)

pytestmark = pytest.mark.skipif(
    not has_vnni(), reason="CPU lacks avx512_vnni (no 'avx512_vnni' in /proc/cpuinfo flags)")
needs_gfni = pytest.mark.skipif(
    I4.GFNI.cpu_flag not in cpu_flags(),
    reason="the int4 unpack needs GFNI (no 'gfni' in /proc/cpuinfo flags)")

UNPACK = ["tile", "prologue"]  # where the int4 kernels unpack (x86_int4.unpack_mode)


# ----------------------------------------------------------------------------- packing
@pytest.mark.unit
def test_pack_weights_layout() -> None:
    w = np.arange(-60, 60, dtype=np.int8)[:35 * 3].reshape(35, 3)
    p = V.pack_weights(w)
    assert p.shape == (3, 1, 16, 4) and p.dtype == np.int8
    assert p[1, 0, 2, 1] == w[18, 1] and p[2, 0, 2, 2] == w[34, 2]
    assert not p[..., 3].any() and not p[2, 0, 3:].any()  # zero padding in K and N


@pytest.mark.unit
def test_pack_weights_int4_layout_and_round_trip() -> None:
    """Byte b = 4*r + k of a block holds element b (low nibble) and b + 32 (high)."""
    w = np.tile(np.arange(-8, 8, dtype=np.int8), 35 * 9 // 16 + 1)[:35 * 9].reshape(35, 9)
    p8, p4 = V.pack_weights(w), V.pack_weights_int4(w)
    assert p4.shape == (3, 3, 8, 4) and p4.dtype == np.uint8  # half of (3, 3, 16, 4) int8
    flat8, flat4 = p8.reshape(3, 3, 64).view(np.uint8) & 15, p4.reshape(3, 3, 32)
    np.testing.assert_array_equal(flat4 & 15, flat8[..., :32])
    np.testing.assert_array_equal(flat4 >> 4, flat8[..., 32:])
    np.testing.assert_array_equal(I4.nibble_unpack(p4), p8)
    wc = np.random.default_rng(0).integers(-8, 8, (20, 7, 3, 3)).astype(np.int8)
    np.testing.assert_array_equal(I4.nibble_unpack(V.pack_conv_weights_int4(wc)),
                                  V.pack_conv_weights(wc))


@pytest.mark.unit
def test_pack_weights_int4_rejects_wide_values() -> None:
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        V.pack_weights_int4(np.full((16, 4), 8, np.int8))


@pytest.mark.hardware
@needs_gfni
@pytest.mark.parametrize("unpack", UNPACK)
def test_int4_minus_eight_and_extremes_are_exact(unpack: str) -> None:
    """-8 is 0b1000 (sign bit only) in either nibble: the unpack must give -8, not 8;
    all -8 weights against all-255 activations is the largest product sum."""
    rng = np.random.default_rng(7)
    w = np.full((32, 64), -8, np.int8)
    w[16:, ::3] = 7
    w[:8, 1::5] = rng.integers(-8, 8, w[:8, 1::5].shape)
    a = np.full((9, 64), 255, np.uint8)
    a[3:] = _rand(rng, (6, 64), "uint8")
    got = _run(V.dense_vnni(9, 32, 64, out_dtype="int32", raw=True, w_bits=4, int4_unpack=unpack),
               [a, V.pack_weights_int4(w), np.zeros(32, np.int32)], (9, 32), "int32")
    np.testing.assert_array_equal(got, a.astype(np.int64) @ w.astype(np.int64).T)


@pytest.mark.unit
def test_signed_input_bias_folds_the_shift() -> None:
    rng = np.random.default_rng(0)
    w, x, b = _rand(rng, (5, 7), "int8"), _rand(rng, (3, 7), "int8"), _rand(rng, (5,), "int32")
    shifted = (x.astype(np.int64) + 128) @ w.astype(np.int64).T + V.signed_input_bias(w, b)
    np.testing.assert_array_equal(shifted, x.astype(np.int64) @ w.astype(np.int64).T + b)


# ----------------------------------------------------------------------------- GEMM
@pytest.mark.hardware
@pytest.mark.parametrize("M,N,K,in_dtype,out_dtype,raw", [
    (256, 256, 256, "uint8", "int8", False),
    (64, 48, 128, "int8", "int32", True),
    (7, 10, 5, "int8", "uint8", False),      # every dimension ragged
    (49, 1000, 512, "uint8", "int32", True),  # N tail, M = 7x7
])
def test_dense_vnni_exact(M: int, N: int, K: int, in_dtype: str, out_dtype: str, raw: bool) -> None:
    _check_dense(M, N, K, in_dtype, out_dtype, raw, w_bits=8)


@pytest.mark.hardware
@needs_gfni
@pytest.mark.parametrize("unpack", UNPACK)
@pytest.mark.parametrize("M,N,K,in_dtype,out_dtype,raw", [
    (256, 256, 256, "uint8", "int8", False),
    (64, 48, 128, "int8", "int32", True),
    (7, 10, 5, "int8", "uint8", False),      # every dimension ragged
    (1, 1000, 512, "uint8", "int32", True),   # batch-1 fc: N tail, one row
])
def test_dense_vnni_int4_exact(M: int, N: int, K: int, in_dtype: str, out_dtype: str,
                               raw: bool, unpack: str) -> None:
    _check_dense(M, N, K, in_dtype, out_dtype, raw, w_bits=4, unpack=unpack)


def _dense_case(M: int, N: int, K: int, in_dtype: str, out_dtype: str, raw: bool,
                w_bits: int, unpack: str | None, seed: int):
    """(kernel, its arguments, the expected output) for a random dense problem."""
    rng = np.random.default_rng(seed)
    a, w = _rand(rng, (M, K), in_dtype), _weights(rng, (N, K), w_bits)
    bias = rng.integers(-2**20, 2**20, N).astype(np.int32)
    acc, bias, q = _requant_setup(rng, a.astype(np.int64) @ w.astype(np.int64).T + bias, bias,
                                  raw, out_dtype)
    kbias = V.signed_input_bias(w, bias) if in_dtype == "int8" else bias
    pack = V.pack_weights if w_bits == 8 else V.pack_weights_int4
    f = V.dense_vnni(M, N, K, out_dtype=out_dtype, raw=raw, in_dtype=in_dtype, w_bits=w_bits,
                     int4_unpack=unpack)
    return f, [a, pack(w), kbias, *(q or [])], _expected(acc, q, out_dtype)


def _check_dense(M: int, N: int, K: int, in_dtype: str, out_dtype: str, raw: bool,
                 w_bits: int, unpack: str | None = None) -> None:
    f, args, want = _dense_case(M, N, K, in_dtype, out_dtype, raw, w_bits, unpack, M + N + K)
    got = _run(f, args, (M, N), "int32" if raw else out_dtype)
    np.testing.assert_array_equal(got, want)


@pytest.mark.hardware
def test_dense_custom_clip_and_int32_wrap() -> None:
    """lo/hi narrower than the dtype (4-bit), and acc + bias wrapping past 2^31."""
    rng = np.random.default_rng(1)
    a, w = _rand(rng, (16, 64), "uint8"), _rand(rng, (32, 64), "int8")
    bias = np.full(32, 2**31 - 1, np.int32)
    q, _ = _qparams(rng, a.astype(np.int64) @ w.astype(np.int64).T + bias, "int8")  # bias kept
    got = _run(V.dense_vnni(16, 32, 64, out_dtype="int8", raw=False, lo=-8, hi=7),
               [a, V.pack_weights(w), bias, *q], (16, 32), "int8")
    acc = _wrap32(a.astype(np.int64) @ w.astype(np.int64).T + bias)
    np.testing.assert_array_equal(got, _requant(acc, q, -8, 7, "int8"))


# ----------------------------------------------------------------------------- conv2d
CONV_CASES = [  # N, H, W, C, OC, kh, kw, strides, pads, dilations, in, out, raw, im2col
    (1, 7, 7, 64, 48, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), "uint8", "uint8", False, False),  # plain GEMM
    (1, 11, 11, 3, 16, 7, 7, (2, 2), (3, 3, 3, 3), (1, 1), "int8", "int8", False, False),  # stem-like
    (2, 11, 7, 5, 20, 3, 3, (2, 2), (0, 1, 1, 0), (1, 1), "int8", "int32", True, False),   # asym pad
    (1, 11, 11, 7, 32, 3, 3, (1, 1), (2, 2, 2, 2), (2, 2), "uint8", "int8", False, False),  # dilated
    (1, 7, 11, 16, 24, 1, 1, (2, 2), (0, 0, 0, 0), (1, 1), "uint8", "int8", False, False),  # 1x1 s2
    (1, 9, 9, 8, 32, 3, 3, (2, 2), (1, 1, 0, 0), (1, 1), "uint8", "uint8", False, True),   # im2col
]


def _conv_ref(x: np.ndarray, w: np.ndarray, strides: Sequence[int], pads: Pads,
              dil: Sequence[int]) -> np.ndarray:
    win = _windows(x.astype(np.int64), w.shape[2], w.shape[3], strides, pads, dil, 0)
    return np.einsum("bhwcij,ocij->bhwo", win, w.astype(np.int64))


@pytest.mark.hardware
@pytest.mark.parametrize("N,H,W,C,OC,kh,kw,st,pads,dil,in_dtype,out_dtype,raw,im2col", CONV_CASES)
def test_conv2d_nhwc_vnni_exact(N: int, H: int, W: int, C: int, OC: int, kh: int, kw: int,
                                st: tuple[int, int], pads: Pads, dil: tuple[int, int],
                                in_dtype: str, out_dtype: str, raw: bool, im2col: bool) -> None:
    _check_conv(N, H, W, C, OC, kh, kw, st, pads, dil, in_dtype, out_dtype, raw, im2col, 8)


CONV_INT4_CASES = [  # same columns as CONV_CASES
    (1, 9, 9, 7, 20, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), "int8", "int8", False, False),  # pad 1
    (1, 9, 9, 16, 40, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), "uint8", "int32", True, False),  # raw
    (1, 7, 7, 64, 48, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), "uint8", "uint8", False, False),  # 1x1
    (2, 11, 7, 5, 13, 3, 3, (2, 2), (0, 1, 1, 0), (1, 1), "uint8", "int32", True, False),  # odd
    (1, 7, 11, 13, 24, 1, 1, (2, 2), (0, 0, 0, 0), (1, 1), "int8", "uint8", False, False),  # s2
    (1, 9, 9, 8, 32, 3, 3, (2, 2), (1, 1, 0, 0), (1, 1), "uint8", "int8", False, True),  # im2col
]


@pytest.mark.hardware
@needs_gfni
@pytest.mark.parametrize("unpack", UNPACK)
@pytest.mark.parametrize("N,H,W,C,OC,kh,kw,st,pads,dil,in_dtype,out_dtype,raw,im2col",
                         CONV_INT4_CASES)
def test_conv2d_nhwc_vnni_int4_exact(N: int, H: int, W: int, C: int, OC: int, kh: int, kw: int,
                                     st: tuple[int, int], pads: Pads, dil: tuple[int, int],
                                     in_dtype: str, out_dtype: str, raw: bool,
                                     im2col: bool, unpack: str) -> None:
    _check_conv(N, H, W, C, OC, kh, kw, st, pads, dil, in_dtype, out_dtype, raw, im2col, 4,
                unpack)


def _check_conv(N: int, H: int, W: int, C: int, OC: int, kh: int, kw: int, st: tuple[int, int],
                pads: Pads, dil: tuple[int, int], in_dtype: str, out_dtype: str, raw: bool,
                im2col: bool, w_bits: int, unpack: str | None = None) -> None:
    rng = np.random.default_rng(H * C + OC)
    x, w = _rand(rng, (N, H, W, C), in_dtype), _weights(rng, (OC, C, kh, kw), w_bits)
    bias = rng.integers(-2**20, 2**20, OC).astype(np.int32)
    acc, bias, q = _requant_setup(rng, _conv_ref(x, w, st, pads, dil) + bias, bias, raw, out_dtype)
    kbias = V.signed_input_bias(w, bias) if in_dtype == "int8" else bias
    f = V.conv2d_nhwc_vnni(N, H, W, C, OC, kh, kw, st, pads, dil, out_dtype=out_dtype, raw=raw,
                           in_dtype=in_dtype, im2col=im2col, w_bits=w_bits, int4_unpack=unpack)
    pack = V.pack_conv_weights if w_bits == 8 else V.pack_conv_weights_int4
    got = _run(f, [x, pack(w), kbias, *(q or [])], acc.shape, "int32" if raw else out_dtype)
    np.testing.assert_array_equal(got, _expected(acc, q, out_dtype))


@pytest.mark.hardware
@pytest.mark.parametrize("N,H,W,C,OC,k,group,st,pads,in_dtype,out_dtype,raw", [
    (1, 7, 7, 32, 32, 3, 8, (1, 1), (1, 1, 1, 1), "uint8", "uint8", False),  # RegNet-like
    (2, 9, 8, 64, 48, 3, 4, (2, 2), (1, 0, 1, 1), "int8", "int8", False),    # og 12 < 16
    (1, 6, 6, 128, 128, 3, 32, (1, 1), (1, 1, 1, 1), "uint8", "int32", True),  # ResNeXt-like
    (1, 5, 5, 48, 48, 1, 3, (1, 1), (0, 0, 0, 0), "int8", "uint8", False),   # grouped 1x1
])
def test_conv2d_grouped_exact(N: int, H: int, W: int, C: int, OC: int, k: int, group: int,
                              st: tuple[int, int], pads: Pads, in_dtype: str, out_dtype: str,
                              raw: bool) -> None:
    rng = np.random.default_rng(C + OC + group)
    x, w = _rand(rng, (N, H, W, C), in_dtype), _weights(rng, (OC, C // group, k, k), 8)
    bias = rng.integers(-2**20, 2**20, OC).astype(np.int32)
    og, ipg = OC // group, C // group
    acc = np.concatenate([_conv_ref(x[..., g * ipg:(g + 1) * ipg], w[g * og:(g + 1) * og], st,
                                    pads, (1, 1)) for g in range(group)], axis=-1) + bias
    acc, bias, q = _requant_setup(rng, acc, bias, raw, out_dtype)
    kbias = V.signed_input_bias(w, bias) if in_dtype == "int8" else bias
    f = V.conv2d_nhwc_vnni_grouped(N, H, W, C, OC, k, k, group, st, pads, out_dtype=out_dtype,
                                   raw=raw, in_dtype=in_dtype)
    got = _run(f, [x, V.pack_conv_weights_grouped(w, group), kbias, *(q or [])], acc.shape,
               "int32" if raw else out_dtype)
    np.testing.assert_array_equal(got, _expected(acc, q, out_dtype))


@pytest.mark.unit
def test_conv_1x1_reads_input_directly() -> None:
    """1x1 stride 1 on uint8 with C % 4 == 0 is a plain GEMM: no pad/im2col buffer."""
    script = V.conv2d_nhwc_vnni(1, 7, 7, 64, 64, 1, 1).script()
    assert "x_pad" not in script and "col" not in script


# ----------------------------------------------------------------------------- codegen, rules
@pytest.mark.hardware
def test_asm_uses_vpdpbusd_in_a_register_tile() -> None:
    asm = _compile(V.dense_vnni(64, 64, 64, out_dtype="int32", raw=True)).mod.inspect_source("asm")
    tile = V.gemm_tile(64, 64, 64)
    assert asm.count(V.ISA.instruction) >= tile.mr * tile.nb  # the unrolled register tile
    assert "TVMBackendAllocWorkspace" not in asm.split(".L__tvm_parallel_lambda:")[-1]


#: The VNNI CPUs whose code the rule chain emits; the asm test compiles for each (codegen
#: only, nothing runs), so it asserts about the target it compiles for on any host.
VNNI_MCPUS = ("cascadelake", "icelake-server", "sapphirerapids", "znver4")


@pytest.mark.hardware
@pytest.mark.parametrize("mcpu", VNNI_MCPUS)
@pytest.mark.parametrize("K", [40, 240])
def test_three_block_tiles_keep_their_accumulators_in_registers(K: int, mcpu: str) -> None:
    """nb = 3 (N = 48): the tile's zero-init once was one <48 x i32> vector, which LLVM
    legalized through the stack lane by lane (10x slower): at least one vpinsrd/vpextrd per
    accumulator lane, 237-254 of them at K = 240 on every mcpu here. OC = 40 also leaves
    the tile's last block ragged: its epilogue, unrolled to scalars, once let znver4's SLP
    vectorizer assemble the parameter vectors lane by lane (13-14 vpinsrd/vpextrd, 1.18x
    slower on a Zen 4); now per-row vectors of 16 + 16 + 8 lanes, none on any mcpu."""
    tile = V.gemm_tile(784, 48, K)
    assert tile.nb == 3
    f = V.conv2d_nhwc_vnni(1, 28, 28, K, 40, 1, 1, requant="mulhi")
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": 2})
    asm = tvm.compile(tvm.IRModule({"main": f}), target=target).mod.inspect_source("asm")
    assert V.ISA.instruction in asm
    lane_moves = asm.count("vpinsrd") + asm.count("vpextrd")
    assert lane_moves == 0, (mcpu, lane_moves)


def _asm(f: tvm.tirx.PrimFunc) -> str:
    return _compile(f).mod.inspect_source("asm")


@pytest.mark.hardware
@needs_gfni
def test_int4_asm_unpacks_once_per_block_with_gfni() -> None:
    """"tile": one vgf2p8affineqb per 16x4 weight block and K step, shared by the tile's
    mr rows; "prologue": the GEMM is the int8 one, after one unpack loop."""
    tile = V.gemm_tile(64, 64, 64)
    asm = _asm(V.dense_vnni(64, 64, 64, out_dtype="int32", raw=True, w_bits=4,
                            int4_unpack="tile"))
    n_dot, n_unpack = asm.count(V.ISA.instruction), asm.count(I4.GFNI.instruction)
    assert n_dot >= tile.mr * tile.nb and n_unpack * tile.mr == n_dot
    asm = _asm(V.dense_vnni(64, 64, 64, out_dtype="int32", raw=True, w_bits=4))  # prologue
    int8 = _asm(V.dense_vnni(64, 64, 64, out_dtype="int32", raw=True))
    assert asm.count(I4.GFNI.instruction) > 0  # in the (LLVM-unrolled) unpack loop
    assert asm.count(V.ISA.instruction) == int8.count(V.ISA.instruction)


@pytest.mark.unit
def test_select_kernel_int4_rules() -> None:
    conv = Rl.LayerDesc("conv2d", (1, 8, 8, 16), channels=32, kernel=(3, 3), w_bits=4)
    spec = Rl.select_kernel(conv, cpu_flags=frozenset({"avx512_vnni", "gfni"}))
    assert (spec.name, spec.weight_layout) == ("conv2d_nhwc_vnni_int4", "vnni16x4_int4")
    # Without GFNI the int8 kernel takes the layer: 4-bit values are exact in int8.
    spec = Rl.select_kernel(conv, cpu_flags=frozenset({"avx512_vnni"}))
    assert (spec.name, spec.weight_layout) == ("conv2d_nhwc_vnni", "vnni16x4")
    dense = Rl.LayerDesc("dense", (1, 64), in_dtype="int8", channels=10, w_bits=4)
    spec = Rl.select_kernel(dense)
    assert (spec.name, spec.weight_layout, spec.signed_bias) == (
        "dense_vnni_int4", "vnni16x4_int4", True)
    assert isinstance(spec.build(), tvm.tirx.PrimFunc)
    dw = Rl.LayerDesc("conv2d", (1, 8, 8, 16), channels=16, kernel=(3, 3), group=16, w_bits=4)
    assert Rl.select_kernel(dw).weight_layout == "hwc"  # depthwise keeps int8 weights


@pytest.mark.unit
def test_select_kernel_rules() -> None:
    conv = Rl.LayerDesc("conv2d", (1, 8, 8, 16), channels=32, kernel=(3, 3), pads=(1, 1, 1, 1))
    assert Rl.select_kernel(conv).name == "conv2d_nhwc_vnni"
    assert Rl.select_kernel(conv).weight_layout == "vnni16x4"
    dw = Rl.LayerDesc("conv2d", (1, 8, 8, 16), channels=16, kernel=(3, 3), group=16)
    assert Rl.select_kernel(dw).name == "depthwise_conv2d_nhwc_vnni"
    dw12 = Rl.LayerDesc("conv2d", (1, 8, 8, 12), channels=12, kernel=(3, 3), group=12)
    assert Rl.select_kernel(dw12).name == "depthwise_conv2d_nhwc"  # C % 16 != 0
    assert Rl.select_kernel(dw, cpu_flags=frozenset({"avx512f"})).name == "depthwise_conv2d_nhwc"
    grouped = Rl.select_kernel(Rl.LayerDesc("conv2d", (1, 8, 8, 16), channels=16, group=4))
    assert grouped.name == "conv2d_nhwc_vnni_grouped"  # 4 channels per group: one quad
    # 2 channels per group cannot fill a vpdpbusd quad: TVM's generic lowering takes it
    assert Rl.select_kernel(Rl.LayerDesc("conv2d", (1, 8, 8, 16), channels=16, group=8)) is None
    assert Rl.select_kernel(conv, cpu_flags=frozenset({"avx2"})) is None
    dense = Rl.LayerDesc("dense", (1, 64), in_dtype="int8", channels=10, raw=True, out_dtype="int32")
    spec = Rl.select_kernel(dense)
    assert spec.signed_bias and isinstance(spec.build(), tvm.tirx.PrimFunc)
    assert Rl.select_kernel(Rl.LayerDesc("gap", (1, 7, 7, 8), raw=True, out_dtype="int32")) is not None


@pytest.mark.hardware
def test_kernel_runs_inside_relax_via_call_tir() -> None:
    """How lowering uses a kernel: add the PrimFunc to a Relax module, R.call_tir it."""
    from tvm import relax

    f = V.conv2d_nhwc_vnni(1, 8, 8, 16, 32, 3, 3, (1, 1), (1, 1, 1, 1), out_dtype="int32",
                           raw=True)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 8, 16), "uint8"))
    w = relax.Var("w", relax.TensorType((2, 36, 16, 4), "int8"))
    b = relax.Var("b", relax.TensorType((32,), "int32"))
    with bb.function("main", [x, w, b]):
        gv = bb.add_func(f.without_attr("global_symbol"), "conv0")
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.call_tir(
                gv, [x, w, b], relax.TensorType((1, 8, 8, 32), "int32"))))
        bb.emit_func_output(y)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=make_target("llvm")), tvm.cpu())
    rng = np.random.default_rng(6)
    xs, ws = _rand(rng, (1, 8, 8, 16), "uint8"), _rand(rng, (32, 16, 3, 3), "int8")
    bias = np.zeros(32, np.int32)
    got = vm["main"](*[tvm.runtime.tensor(a) for a in (xs, V.pack_conv_weights(ws), bias)])
    np.testing.assert_array_equal(got.numpy(), _conv_ref(xs, ws, (1, 1), (1, 1, 1, 1), (1, 1)))


# ----------------------------------------------------------------------------- output bounds
GUARD = 64  # poisoned bytes either side of the output


def _run_guarded(f: tvm.tirx.PrimFunc, args: Sequence[np.ndarray], out_shape: tuple[int, ...],
                 out_dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run ``f`` with its output a 64-byte-aligned view inside a bigger 0x5A-filled buffer
    (zero-copy, via DLPack): (output, the guard bytes before it, the guard bytes after it)."""
    nbytes = int(np.prod(out_shape)) * np.dtype(out_dtype).itemsize
    raw = np.full(nbytes + 3 * GUARD, 0x5A, np.uint8)
    start = (-raw.ctypes.data) % 64 + GUARD
    view = raw[start:start + nbytes].view(out_dtype).reshape(out_shape)
    ts = [tvm.runtime.tensor(a) for a in args] + [tvm.runtime.from_dlpack(view)]
    _compile(f)(*ts)
    return view.copy(), raw[start - GUARD:start], raw[start + nbytes:start + nbytes + GUARD]


@pytest.mark.hardware
@pytest.mark.parametrize("case", [
    # (M, N, K, in, out, raw, w_bits, unpack): N % 16 != 0, so the epilogue's last
    # 16-column block is predicated; several M tiles, so each row has a next row.
    (50, 13, 20, "uint8", "int8", False, 8, None),
    (50, 13, 20, "uint8", "int8", False, 4, "prologue"),
    (50, 13, 20, "uint8", "int8", False, 4, "tile"),
    (64, 20, 36, "int8", "uint8", False, 8, None),
    (64, 20, 36, "int8", "uint8", False, 4, "prologue"),
    (30, 5, 24, "uint8", "int32", True, 8, None),
    (24, 24, 16, "uint8", "uint8", False, 8, None),  # M == N: the column guard is no row one
    (40, 40, 36, "int8", "int8", False, 8, None),
    (50, 47, 20, "uint8", "int8", False, 8, None),  # one N tile: 16 + 16 + a 15-lane vector
    (50, 72, 20, "uint8", "int8", False, 8, None),  # several N tiles, the last one ragged
])
def test_ragged_n_epilogue_writes_only_its_output(case: tuple) -> None:
    """The epilogue stores nothing outside its output: with N not a multiple of 16 LLVM 22
    emitted the last column's masked int8 store as an 8-byte ``vmovq``, 7 bytes of sign
    fill into the next row's first channels. Inside a tile the next row fixed them up; the
    first row of the next tile, on another thread, kept them when stored first
    (test_schedule's core failed intermittently under 2 threads), and the last row wrote
    past the buffer. The bytes past the buffer show it deterministically."""
    M, N, K, in_dtype, out_dtype, raw, w_bits, unpack = case
    if w_bits == 4 and I4.GFNI.cpu_flag not in cpu_flags():
        pytest.skip("the int4 unpack needs GFNI")
    f, args, want = _dense_case(M, N, K, in_dtype, out_dtype, raw, w_bits, unpack, M * N + K)
    got, before, after = _run_guarded(f, args, (M, N), "int32" if raw else out_dtype)
    assert (before == 0x5A).all() and (after == 0x5A).all(), (
        f"stores outside the output: after it {np.flatnonzero(after != 0x5A).tolist()}")
    np.testing.assert_array_equal(got, want)


@pytest.mark.hardware
@pytest.mark.parametrize("M,N,K", [(51, 32, 20), (289, 64, 64), (10, 48, 40), (51, 40, 20)])
def test_tail_rows_store_row_m_minus_1_again_and_nothing_outside(M: int, N: int, K: int
                                                                  ) -> None:
    """M % mr != 0: the last tile's rows past M recompute row M-1 and store it again
    (no per-row predicate, which cost 1.8x), and nothing lands outside the output. N = 40
    (one N tile, its last block ragged) has no column predicate either: 16 + 16 + 8 lanes."""
    tile = V.gemm_tile(M, -(-N // V.LANES) * V.LANES, K)
    assert M % tile.mr, "the case must have a tail tile"
    f, args, want = _dense_case(M, N, K, "uint8", "int8", False, 8, None, M + N)
    assert "T.where" not in f.script()
    got, before, after = _run_guarded(f, args, (M, N), "int8")
    assert (before == 0x5A).all() and (after == 0x5A).all()
    np.testing.assert_array_equal(got, want)


def _epilogue_column_loops(f: tvm.tirx.PrimFunc) -> list[tuple[str, bool, int]]:
    """(block, vectorized?, extent) of the innermost loop of every leaf block named out*.
    Building the Schedule checks that the function is well-formed: loop_partition once
    left the copies of a block sharing its iter vars."""
    from qcompile.tvm_compat import Schedule
    sch, found = Schedule(f), []

    def walk(block) -> None:
        children = sch.get_child_blocks(block)
        name = sch.get(block).name_hint
        if not children and name.startswith("out"):
            loop = sch.get(sch.get_loops(block)[-1])
            found.append((name, loop.kind == tvm.tirx.ForKind.VECTORIZED, int(loop.extent)))
        for child in children:
            walk(child)

    walk(sch.get_sblock("root"))
    return found


@pytest.mark.hardware
@pytest.mark.parametrize("M,N,K", [(50, 72, 20), (51, 200, 64), (1, 1000, 64), (50, 40, 20),
                                   (784, 72, 40)])
def test_ragged_n_epilogue_is_vectorized(M: int, N: int, K: int) -> None:
    """N % 16 != 0: every column loop of the epilogue is a vector (no guarded scalars):
    one N tile stores 16-lane vectors and one of N % 16 lanes; with several N tiles the
    columns past N % (tile width) run under one branch per tile (not the last one). The
    guarded scalars cost 2.5x (1x1 conv 28x28x40 -> 72: 30.9 vs 12.1 us, Zen 4, 1 thread),
    and on znver4 the one-tile case assembled vectors lane by lane."""
    f, args, want = _dense_case(M, N, K, "uint8", "int8", False, 8, None, M + N)
    loops = _epilogue_column_loops(f)
    assert loops and all(vec or extent == 1 for _, vec, extent in loops), loops
    got, before, after = _run_guarded(f, args, (M, N), "int8")
    assert (before == 0x5A).all() and (after == 0x5A).all()
    np.testing.assert_array_equal(got, want)


@pytest.mark.hardware
@needs_gfni
def test_int4_1x1_conv_ragged_oc_writes_only_its_output() -> None:
    """test_schedule's failing layer itself: 2x9x9x20 -> 1x1 stride 2 -> 13 int4 channels."""
    rng = np.random.default_rng(13)
    x, w = _rand(rng, (2, 9, 9, 20), "uint8"), _weights(rng, (13, 20, 1, 1), 4)
    bias = rng.integers(-2**10, 2**10, 13).astype(np.int32)
    acc, bias, q = _requant_setup(rng, _conv_ref(x, w, (2, 2), (0, 0, 0, 0), (1, 1)) + bias,
                                  bias, False, "int8")
    f = V.conv2d_nhwc_vnni(2, 9, 9, 20, 13, 1, 1, (2, 2), (0, 0, 0, 0), (1, 1),
                           out_dtype="int8", raw=False, in_dtype="uint8", w_bits=4,
                           int4_unpack="prologue")
    got, before, after = _run_guarded(f, [x, V.pack_conv_weights_int4(w), bias, *q],
                                      acc.shape, "int8")
    assert (before == 0x5A).all() and (after == 0x5A).all(), (
        f"stores outside the output: after it {np.flatnonzero(after != 0x5A).tolist()}")
    np.testing.assert_array_equal(got, _expected(acc, q, "int8"))
