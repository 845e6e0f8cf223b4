"""Per-layer costs for bit allocation: size, BOPs, tie groups and a GPU roofline model
(one ``GpuSpec`` per CUDA arch, from ``targets.CUDA_ARCHS``; the T4 by default).

HAWQ-V3 semantics: a layer (conv or dense) at ``b`` bits has ``b``-bit weights *and*
reads its input activation at ``b`` bits.  Every layer that reads the same quantized
tensor must therefore use the same bits; ``tie_groups`` finds those sets.

Units: size in MB = 2^20 bytes (HAWQ-V3's tables: ResNet-50 INT8 = 24.5 MB); BOPs in
G = 1e9 bit-operations (``macs * b_w * b_a``); latency in ms.  Every latency here is a
model, not a measurement: label it with ``PREDICTED`` wherever it is shown.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from qcompile.config import precision
from qcompile.ir.graph import LAYER_OPS, Graph
from qcompile.hw.gpus import PREDICTED, T4, GpuSpec, predicted_label

# Non-layer ops that cost nothing at run time: views, or fused into the producer.
FREE_OPS: frozenset[str] = frozenset({"flatten", "reshape", "clip"})
BIAS_BITS = 32  # int32 bias, one per output channel
MB = float(1 << 20)


@dataclass(frozen=True)
class Layer:
    """One conv/dense layer, as the cost model and the allocator see it.

    Shapes are the graph's (batch 1).  ``macs`` is per sample.  A conv is the GEMM
    ``m x n x k`` per group with m = out H*W, n = cout/group, k = cin/group*kh*kw;
    a dense layer has m = 1, n = cout, k = cin, group 1.
    """

    name: str
    op: str
    params: int                     # weight count (bias excluded)
    macs: int                       # multiply-accumulates per sample
    input: str                      # tensor the node reads
    source: str                     # quantized tensor behind ``input`` (``Graph.source_of``)
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    cin: int
    cout: int
    kernel: tuple[int, int] = (1, 1)
    strides: tuple[int, int] = (1, 1)
    group: int = 1

    def __post_init__(self) -> None:
        if self.op not in LAYER_OPS:
            raise ValueError(f"layer {self.name!r}: op must be conv or dense, got {self.op!r}")
        if min(self.params, self.macs, self.cout, self.group) < 0 or self.cout == 0:
            raise ValueError(f"layer {self.name!r}: negative or empty sizes")

    @property
    def gemm(self) -> tuple[int, int, int]:
        """Per-sample, per-group GEMM (m, n, k)."""
        m = math.prod(self.out_shape[2:]) if self.op == "conv" else 1
        return m, self.cout // self.group, self.cin // self.group * self.kernel[0] * self.kernel[1]

    @property
    def in_elems(self) -> int:
        return math.prod(self.in_shape[1:])

    @property
    def out_elems(self) -> int:
        return math.prod(self.out_shape[1:])


def layers_of(graph: Graph) -> list[Layer]:
    """The conv/dense layers of a canonical graph, in graph order."""
    layers = []
    for n in graph.nodes:
        if n.op not in LAYER_OPS:
            continue
        w = n.params["w"]
        out_shape = tuple(graph.shapes[n.output])
        in_shape = tuple(graph.shapes[n.inputs[0]]) if n.inputs[0] in graph.shapes else graph.input_shape
        cout = int(w.shape[0])
        per_out = int(w.size) // cout  # MACs per output element
        common = dict(name=n.name, op=n.op, params=int(w.size), input=n.inputs[0],
                      source=graph.source_of(n.inputs[0]), in_shape=in_shape,
                      out_shape=out_shape, cout=cout, macs=math.prod(out_shape[1:]) * per_out)
        if n.op == "conv":
            group = int(n.attrs.get("group", 1))
            layers.append(Layer(**common, cin=int(w.shape[1]) * group, group=group,
                                kernel=(int(w.shape[2]), int(w.shape[3])),
                                strides=tuple(n.attrs.get("strides", (1, 1)))))
        else:
            layers.append(Layer(**common, cin=int(w.shape[1])))
    return layers


def tie_groups(graph: Graph) -> list[tuple[str, ...]]:
    """Layers that read the same quantized tensor, in graph order; every layer once.

    The tensor is traced back through pass-through ops (maxpool, clip, flatten,
    reshape), so e.g. a ResNet downsample conv joins the block's first conv.
    """
    return groups_by_source(layers_of(graph))


def groups_by_source(layers: Sequence[Layer]) -> list[tuple[str, ...]]:
    """``tie_groups`` for an already extracted layer list."""
    by_source: dict[str, list[str]] = {}
    for layer in layers:  # dicts keep insertion order: groups in order of first member
        by_source.setdefault(layer.source, []).append(layer.name)
    return [tuple(names) for names in by_source.values()]


# --- size and BOPs ----------------------------------------------------------------
def layer_size_bits(layer: Layer, bits: int) -> int:
    """Stored bits of one layer: weights at ``bits`` plus an int32 bias per channel."""
    return layer.params * bits + BIAS_BITS * layer.cout


def layer_bops(layer: Layer, bits: int, a_bits: int | None = None) -> int:
    """Bit-operations per sample: macs * b_w * b_a (b_a = b_w unless given)."""
    return layer.macs * bits * (bits if a_bits is None else a_bits)


def _pair(bits: int | str | tuple[int, int]) -> tuple[int, int]:
    """(weight, activation) bits of a plan entry; float widths (16, 32) stand for both."""
    if isinstance(bits, (int, np.integer)):  # a bare width: weights and activations
        return int(bits), int(bits)
    return precision(bits)


def size_mb(layers: Sequence[Layer], plan: Mapping[str, int | str]) -> float:
    """Model size in MB (2^20 bytes) under ``plan`` (layer name -> bits or "w4a8" ...)."""
    return sum(layer_size_bits(la, _pair(plan[la.name])[0]) for la in layers) / 8 / MB


def bops_g(layers: Sequence[Layer], plan: Mapping[str, int | str]) -> float:
    """Giga bit-operations per sample under ``plan``: macs * b_w * b_a."""
    return sum(layer_bops(la, *_pair(plan[la.name])) for la in layers) / 1e9


def uniform(layers: Sequence[Layer], bits: int) -> dict[str, int]:
    """The plan with every layer at ``bits``."""
    return {la.name: bits for la in layers}


# --- GPU roofline model -------------------------------------------------------------
FLOAT_BITS: frozenset[int] = frozenset({16, 32})


def _bias_bytes(layer: Layer, bits: int) -> float:
    # Integer kernels keep an int32 bias; float kernels store it in their own format.
    return layer.cout * (bits if bits in FLOAT_BITS else BIAS_BITS) / 8


def t4_layer_ms(layer: Layer, bits: int, batch: int = 1, gpu: GpuSpec = T4) -> float:
    """Predicted time of one layer: max(compute, memory) + launch, in ms.

    Bytes moved = weights + bias + input and output activations, all at ``bits``.
    A width the GPU only emulates (int4 on sm_90) costs the time of the width it runs on:
    the emulation unpacks to int8 IMMA behind a CALL per mma, so we credit no gain, not
    even the halved bytes of a memory-bound layer (the unpack work is not modelled).
    """
    w_bits, a_bits = _pair(bits)
    # The tensor-core rate is the wider operand's: W4A8 runs on the INT8 MMA.
    bits = max(w_bits, a_bits)
    if bits in gpu.emulated:
        to = gpu.emulated[bits]
        return t4_layer_ms(layer, (max(w_bits, to), max(a_bits, to)), batch, gpu)
    if bits not in gpu.peak_ops:
        raise ValueError(f"{gpu.name} model has no {bits}-bit rate (have {sorted(gpu.peak_ops)})")
    m, n, k = layer.gemm
    # Step 1. Compute: real ops at the rate the occupied SMs deliver.
    ctas = layer.group * math.ceil(batch * m / gpu.tile[0]) * math.ceil(n / gpu.tile[1])
    waves = math.ceil(ctas / gpu.sms)
    occupancy = ctas / (waves * gpu.sms)
    ops = 2 * layer.macs * batch
    compute_s = ops / (gpu.peak_ops[bits] * gpu.compute_eff * occupancy)
    # Step 2. Memory: weights once per batch, activations per sample.
    weight_bytes = layer.params * w_bits / 8 + _bias_bytes(layer, w_bits)
    act_bytes = batch * (layer.in_elems + layer.out_elems) * a_bits / 8
    memory_s = (weight_bytes + act_bytes) / (gpu.dram_bytes_s * gpu.memory_eff)
    return (max(compute_s, memory_s) + gpu.launch_s) * 1e3


def t4_other_ms(graph: Graph, batch: int = 1, bits: int = 8, gpu: GpuSpec = T4) -> float:
    """Predicted time of the non-layer ops (add, pools, concat, softmax), in ms.

    They are memory-bound: inputs + output at ``bits`` (8 for the integer paths, 16
    or 32 for float), plus one launch each; views and fused clips are free.  This is
    the allocator's constant ``overhead_ms``: it does not depend on the bit plan.
    """
    total_s = 0.0
    for n in graph.nodes:
        if n.op in LAYER_OPS or n.op in FREE_OPS:
            continue
        elems = sum(math.prod(graph.shapes[t][1:]) for t in n.inputs if t in graph.shapes)
        elems += math.prod(graph.shapes[n.output][1:])
        total_s += batch * elems * bits / 8 / (gpu.dram_bytes_s * gpu.memory_eff) + gpu.launch_s
    return total_s * 1e3


def t4_latency_table(layers: Sequence[Layer], batch: int = 1, bits: Sequence[int] = (4, 8),
                     gpu: GpuSpec = T4) -> dict[str, dict[int, float]]:
    """Layer name -> bits -> predicted ms: the allocator's latency table."""
    return {la.name: {b: t4_layer_ms(la, b, batch, gpu) for b in bits} for la in layers}


def t4_model_ms(layers: Sequence[Layer], plan: Mapping[str, int], batch: int = 1,
                overhead_ms: float = 0.0, gpu: GpuSpec = T4) -> float:
    """Predicted whole-model time under ``plan``: layers + ``overhead_ms`` (``t4_other_ms``)."""
    return sum(t4_layer_ms(la, plan[la.name], batch, gpu) for la in layers) + overhead_ms


def t4_float_ms(layers: Sequence[Layer], batch: int = 1, bits: int = 16,
                overhead_ms: float = 0.0, gpu: GpuSpec = T4) -> float:
    """Predicted float baseline: every layer in FP16 (``bits=16``) or FP32 (``bits=32``)."""
    if bits not in FLOAT_BITS:
        raise ValueError(f"float baseline needs bits 16 or 32, got {bits}")
    return t4_model_ms(layers, uniform(layers, bits), batch, overhead_ms, gpu)


@dataclass(frozen=True)
class CostSummary:
    """Headline numbers for one plan, for reports."""

    size_mb: float
    bops_g: float
    latency_ms: float
    label: str = field(default=PREDICTED)


def summarize(graph: Graph, plan: Mapping[str, int], batch: int = 1,
              gpu: GpuSpec = T4) -> CostSummary:
    """Size, BOPs and ``gpu``-predicted latency (layers + other ops at 8 bits) of ``plan``."""
    layers = layers_of(graph)
    other_bits = 8 if all(plan[la.name] not in FLOAT_BITS for la in layers) else max(plan.values())
    return CostSummary(size_mb(layers, plan), bops_g(layers, plan),
                       t4_model_ms(layers, plan, batch, t4_other_ms(graph, batch, other_bits, gpu),
                                   gpu), predicted_label(gpu))
