"""Kernel selection for x86: a layer description -> the first kernel whose rule applies.

Each rule returns a ``KernelSpec`` or None ("not mine"); ``select_kernel`` tries
``RULES`` in order and also checks the CPU flags the kernel needs. None from
``select_kernel`` means "use TVM's generic lowering".

4-bit weights (``w_bits=4``): conv/dense take the packed-nibble kernels (layout
"vnni16x4_int4", half the weight bytes) where the CPU has GFNI for the in-kernel
unpack; elsewhere the next rule gives the int8 kernel, which holds 4-bit values
exactly. Depthwise keeps int8 weights (layout "hwc"): it reads kh*kw bytes per channel,
so its weights are a rounding error next to its activation traffic.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from qcompile.env import NO_AMX_ENV, env_flag
from qcompile.tvm_compat import tirx

from qcompile.targets.x86 import amx
from qcompile.targets.x86.depthwise import depthwise_conv2d_nhwc_vnni
from qcompile.targets.x86.epilogue import Post
from qcompile.targets.x86.int4 import GFNI
from qcompile.targets.x86.vnni import (
    KG, LANES, ISA, conv2d_nhwc_vnni, conv2d_nhwc_vnni_grouped, dense_vnni)
from qcompile.targets.x86.window import (
    depthwise_conv2d_nhwc, global_sum_pool_nhwc, max_pool2d_nhwc, sum_pool2d_nhwc)


@dataclass(frozen=True)
class LayerDesc:
    """One layer as the kernel library sees it. Activations are NHWC ``in_shape``
    (dense: (M, K)); ``channels`` is OC for conv/dense; pads = (top, left, bottom, right).
    ``requant``: how the epilogue requantizes (``x86_epilogue``; "mulhi" is what a layer
    gets unless its parameters need "int64"); ``post``: ops fused behind it (conv, dense
    and depthwise kernels take them; pools don't)."""

    op: str  # "conv2d" | "dense" | "maxpool" | "avgpool" | "gap"
    in_shape: tuple[int, ...]
    in_dtype: str = "uint8"
    out_dtype: str = "int8"
    raw: bool = False
    channels: int = 0
    kernel: tuple[int, int] = (1, 1)
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)
    group: int = 1
    lo: int | None = None
    hi: int | None = None
    w_bits: int = 8  # weight bit width; 4-bit weights are int8 values in [-8, 7]
    requant: str = "mulhi"
    post: tuple[Post, ...] = ()


@dataclass(frozen=True)
class KernelSpec:
    """A kernel chosen for a layer. ``build()`` returns the PrimFunc; the caller
    prepares weights per ``weight_layout`` ("vnni16x4": pack_weights /
    pack_conv_weights, "vnni16x4_int4": pack_weights_int4 / pack_conv_weights_int4,
    "hwc": depthwise (kh, kw, C), "none") and, when ``signed_bias``, replaces the bias
    with ``signed_input_bias(w, bias)``. ``requires``: CPU flags, all needed."""

    name: str
    build: Callable[[], tirx.PrimFunc] = field(repr=False)
    weight_layout: str = "none"
    signed_bias: bool = False
    requires: tuple[str, ...] = (ISA.cpu_flag,)


Rule = Callable[[LayerDesc], "KernelSpec | None"]
_ACT = ("uint8", "int8")


@dataclass(frozen=True)
class WeightFormat:
    """How conv/dense weights of one bit width reach the VNNI kernels."""

    suffix: str                # of the kernel name
    layout: str                # KernelSpec.weight_layout
    requires: tuple[str, ...]  # CPU flags


WEIGHT_FORMATS: dict[int, WeightFormat] = {
    8: WeightFormat("", "vnni16x4", (ISA.cpu_flag,)),
    4: WeightFormat("_int4", "vnni16x4_int4", (ISA.cpu_flag, GFNI.cpu_flag)),  # GFNI unpack
}


def _requant_kw(d: LayerDesc) -> dict:
    return {"out_dtype": d.out_dtype, "raw": d.raw, "lo": d.lo, "hi": d.hi,
            "requant": d.requant}


def _epilogue_kw(d: LayerDesc) -> dict:
    """The requant and the fused ops: for the kernels that take both."""
    return {**_requant_kw(d), "post": d.post}


def _dense_spec(d: LayerDesc, w_bits: int) -> KernelSpec | None:
    if d.op != "dense" or d.in_dtype not in _ACT or len(d.in_shape) != 2:
        return None
    (m, k), kw = d.in_shape, _epilogue_kw(d)
    f = WEIGHT_FORMATS[w_bits]
    return KernelSpec("dense_vnni" + f.suffix, lambda: dense_vnni(
        m, d.channels, k, in_dtype=d.in_dtype, w_bits=w_bits, **kw),
        f.layout, d.in_dtype == "int8", f.requires)


def _conv_spec(d: LayerDesc, w_bits: int) -> KernelSpec | None:
    if d.op != "conv2d" or d.group != 1 or d.in_dtype not in _ACT:
        return None
    n, h, w, c = d.in_shape
    f = WEIGHT_FORMATS[w_bits]
    return KernelSpec("conv2d_nhwc_vnni" + f.suffix, lambda: conv2d_nhwc_vnni(
        n, h, w, c, d.channels, *d.kernel, d.strides, d.pads, d.dilations,
        in_dtype=d.in_dtype, w_bits=w_bits, **_epilogue_kw(d)),
        f.layout, d.in_dtype == "int8", f.requires)


def _amx_ok(d: LayerDesc, c: int) -> bool:
    """A group-1 layer on 8-bit activations whose channels come in whole 64-byte chunks.
    Narrower ones (C = 16..40, the pointwise convs of EfficientNet-Lite0) leave the tile
    unit idle behind the epilogue: AMX there made the model 2.3x slower than its VNNI
    kernels (5.14 vs 2.26 ms at batch 1)."""
    return d.in_dtype in _ACT and d.group == 1 and c % amx.TILE_BYTES == 0


def rule_dense_amx(d: LayerDesc) -> KernelSpec | None:
    """Dense on the tile unit (uint8 rows, K in whole 64-byte chunks)."""
    if d.op != "dense" or len(d.in_shape) != 2 or d.in_dtype != "uint8" or not _amx_ok(d, d.in_shape[1]):
        return None
    (m, k), kw = d.in_shape, _epilogue_kw(d)
    return KernelSpec(amx.DENSE_NAME, lambda: amx.dense_amx(m, d.channels, k, **kw),
                      "vnni16x4", False, amx.CPU_FLAGS)


def rule_conv_amx(d: LayerDesc) -> KernelSpec | None:
    """Conv on the tile unit: flattened rows (1x1, stride 1, unpadded), 16-pixel runs of
    an output row, or, for rows under ``x86_amx.MIN_ROW`` pixels (7x7 maps), an im2col
    matrix (3x3 512 -> 512 at 7x7, batch 8: 0.84 ms against VNNI's 1.37); and a stem
    whose kernel rows fill a tile row (``x86_amx.merged_taps``)."""
    if d.op != "conv2d" or len(d.in_shape) != 4:
        return None
    n, h, w, c = d.in_shape
    stem = amx.merged_taps(c, d.kernel[1], d.dilations[1])
    if not _amx_ok(d, amx.TILE_BYTES if stem else c):  # a stem's 4 channels fill a row
        return None
    return KernelSpec(amx.CONV_NAME, lambda: amx.conv2d_nhwc_amx(
        n, h, w, c, d.channels, *d.kernel, d.strides, d.pads, d.dilations,
        in_dtype=d.in_dtype, **_epilogue_kw(d)), "vnni16x4", d.in_dtype == "int8",
        amx.CPU_FLAGS)


def rule_dense_int4(d: LayerDesc) -> KernelSpec | None:
    return _dense_spec(d, 4) if d.w_bits == 4 else None


def rule_dense(d: LayerDesc) -> KernelSpec | None:
    """Any weight width: 4-bit values are exact in the int8 layout (the int4 fallback)."""
    return _dense_spec(d, 8)


def rule_conv_int4(d: LayerDesc) -> KernelSpec | None:
    return _conv_spec(d, 4) if d.w_bits == 4 else None


def rule_conv_vnni(d: LayerDesc) -> KernelSpec | None:
    """Any weight width, like ``rule_dense``."""
    return _conv_spec(d, 8)


def rule_conv_grouped(d: LayerDesc) -> KernelSpec | None:
    """Grouped, not depthwise (ResNeXt, RegNet): one GEMM per group. Any weight width
    (4-bit values are exact in the int8 layout)."""
    if d.op != "conv2d" or d.group == 1 or d.in_dtype not in _ACT:
        return None
    n, h, w, c = d.in_shape
    if d.group == c == d.channels or (c // d.group) % KG:
        return None
    return KernelSpec("conv2d_nhwc_vnni_grouped", lambda: conv2d_nhwc_vnni_grouped(
        n, h, w, c, d.channels, *d.kernel, d.group, d.strides, d.pads, d.dilations,
        in_dtype=d.in_dtype, **_epilogue_kw(d)), "vnni16x4_grouped", d.in_dtype == "int8")


def rule_depthwise_vnni(d: LayerDesc) -> KernelSpec | None:
    """Depthwise with C % 16 == 0: one vpdpbusd per 16 channels and tap (int8 inputs fed
    as x + 128, the bias corrected like the GEMM kernels')."""
    if (d.op != "conv2d" or d.in_dtype not in _ACT or not d.group == d.in_shape[3] == d.channels
            or d.channels % LANES):
        return None
    return KernelSpec("depthwise_conv2d_nhwc_vnni", lambda: depthwise_conv2d_nhwc_vnni(
        *d.in_shape, *d.kernel, d.strides, d.pads, d.dilations, in_dtype=d.in_dtype,
        **_epilogue_kw(d)), "hwc", d.in_dtype == "int8")


def rule_depthwise(d: LayerDesc) -> KernelSpec | None:
    if d.op != "conv2d" or d.in_dtype not in _ACT or not d.group == d.in_shape[3] == d.channels:
        return None
    return KernelSpec("depthwise_conv2d_nhwc", lambda: depthwise_conv2d_nhwc(
        *d.in_shape, *d.kernel, d.strides, d.pads, d.dilations, in_dtype=d.in_dtype,
        **_epilogue_kw(d)), "hwc", requires=("avx512f",))


def rule_pool(d: LayerDesc) -> KernelSpec | None:
    if d.in_dtype not in _ACT or d.post:
        return None
    if d.op == "maxpool":
        return KernelSpec("max_pool2d_nhwc", lambda: max_pool2d_nhwc(
            *d.in_shape, d.kernel, d.strides, d.pads, d.dilations, dtype=d.in_dtype),
            requires=("avx512f",))
    if d.op == "avgpool":
        return KernelSpec("sum_pool2d_nhwc", lambda: sum_pool2d_nhwc(
            *d.in_shape, d.kernel, d.strides, d.pads, in_dtype=d.in_dtype, **_requant_kw(d)),
            requires=("avx512f",))
    if d.op == "gap":
        return KernelSpec("global_sum_pool_nhwc", lambda: global_sum_pool_nhwc(
            *d.in_shape, in_dtype=d.in_dtype, **_requant_kw(d)), requires=("avx512f",))
    return None


# The int4 rules go first (their packed weights are the point of a 4-bit layer), then AMX
# where the CPU has it; when a rule's CPU flags are missing the next rule takes the layer.
RULES: tuple[Rule, ...] = (rule_dense_int4, rule_dense_amx, rule_dense, rule_depthwise_vnni,
                           rule_depthwise, rule_conv_grouped, rule_conv_int4, rule_conv_amx,
                           rule_conv_vnni, rule_pool)


def usable_flags(flags: frozenset[str]) -> frozenset[str]:
    """``flags`` less AMX where the OS does not grant its tile state to this process or
    QCOMPILE_NO_AMX is on (an artifact for CPUs without AMX)."""
    if env_flag(NO_AMX_ENV) or not amx.request_amx():
        return flags - set(amx.CPU_FLAGS)
    return flags


def select_kernel(d: LayerDesc, cpu_flags: frozenset[str] | None = None,
                  rules: Sequence[Rule] = RULES) -> KernelSpec | None:
    """The first rule's kernel for ``d`` whose CPU requirements ``cpu_flags`` meets
    (None: assume it does); None means "no kernel here, use the default lowering"."""
    for rule in rules:
        spec = rule(d)
        if spec is not None and (cpu_flags is None or set(spec.requires) <= cpu_flags):
            return spec
    return None
