"""The quantization card (``report.md``) and the per-layer ``qconfig.json`` table."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from qcompile.ir.qgraph import QGraph

if TYPE_CHECKING:
    from qcompile.report.fidelity import Fidelity

ACC_LIMIT = (1 << 31) - 1  # the quantizer refuses a layer whose bound exceeds this


def layer_table(qg: QGraph) -> list[dict[str, Any]]:
    """Per-layer bits, scales, dyadic m and s, and the accumulator bound."""
    rows = []
    for n in qg.nodes:
        out = qg.tensors[n.output]
        row: dict[str, Any] = {"name": n.name, "op": n.op, "output": n.output,
                               "out_bits": out.qtype.bits, "out_signed": out.qtype.signed,
                               "out_scale": out.scale.tolist()}
        if n.op in ("qconv", "qdense"):
            x = qg.tensors[n.inputs[0]]
            row.update(w_bits=n.attrs["bits"], in_bits=x.qtype.bits, in_scale=float(x.scale),
                       acc_bound=n.attrs["acc_bound"], raw=bool(n.attrs["raw"]),
                       macs=_macs(qg, n), params=int(n.params["w"].size))
        for k in sorted(n.params):  # dyadic multipliers and shifts: m, m0, m1 ..., s
            if (k == "s" or k[0] == "m" and k[1:].isdigit() or k == "m") \
                    and np.asarray(n.params[k]).size <= 4096:
                row[k] = np.asarray(n.params[k]).reshape(-1).tolist()
        rows.append(row)
    return rows


def _macs(qg: QGraph, n: Any) -> int:
    w = n.params["w"]
    out = qg.tensors[n.output].shape
    if n.op == "qconv":
        return int(np.prod(out[1:])) * int(np.prod(w.shape[1:]))
    return int(w.shape[0] * w.shape[1])


def _fmt_scale(s: np.ndarray) -> str:
    return f"{float(s):.4g}" if s.ndim == 0 else f"per-channel ({s.size})"


def _edge_rows(convs: list[Any]) -> list[str]:
    if not convs:
        return ["| layers | none: the model has no conv or dense layer |"]
    first, last = convs[0], convs[-1]
    return [f"| first layer | `{first.name}`: {first.attrs['bits']}-bit weights |",
            f"| last layer | `{last.name}`: {last.attrs['bits']}-bit weights, "
            + ("int32 accumulator dequantized directly" if last.attrs["raw"] else "requantized")
            + " |"]


def render_card(qg: QGraph, meta: dict[str, Any]) -> str:
    """Markdown card listing every choice that affects accuracy and speed."""
    convs = [n for n in qg.nodes if n.op in ("qconv", "qdense")]
    cal = meta["calibration"]
    lines = [
        f"# Quantization card: {qg.source or 'model'}",
        "",
        "| choice | value |",
        "| --- | --- |",
        f"| target | `{meta['target']}` |",
        f"| integer-only core | {'yes, checked on the compiled IR' if meta['integer_only'] else 'NO'} |",
        "| float steps | input quantization (floor(x/s + 0.5), clipped) and output dequantization only |",
        f"| calibration | {cal['method']} on {cal['num_samples']} samples from `{cal['source']}`"
        + (" (synthetic: ranges unrelated to real data)" if cal['source'] == "synthetic" else "") + " |",
        "| weights | per-output-channel symmetric, zero point 0 |",
        "| activations | per-tensor; unsigned after a fused ReLU/ReLU6, signed otherwise; zero point 0 |",
        "| bias | int32, scale s_w * s_x |",
        "| BatchNorm | folded into the preceding conv before quantization, else a dyadic affine |",
        "| requantization | dyadic m / 2^s per output channel, m < 2^31, int64 product, round half up |",
        "| residual add | each branch rescaled dyadically to the output scale, summed in int32 "
        "or int64 |",
        "| activations (sigmoid, swish ...) | integer table lookup built from the float function |",
        "| average pooling | integer window sum times a dyadic per-position factor |",
        f"| input | {qg.input.qtype.dtype} ({qg.input.qtype.bits} bit), scale {_fmt_scale(qg.input.scale)} |",
        *_edge_rows(convs),
        f"| output | {qg.output.qtype.dtype}, scale {_fmt_scale(qg.output.scale)}"
        + (f", then float softmax on axis {qg.softmax_axis}" if qg.softmax_axis is not None else "") + " |",
        "| accumulator | int32 |",
        "",
        "## Accumulator bounds",
        "",
        "Static worst case |acc| = max over output channels of sum|w_q| * max|x_q| + |bias_q|. "
        "It bounds every partial sum too; a layer whose bound exceeds the int32 limit "
        "2^31 - 1 is refused at compile time (exit 10), so no accumulator here can overflow. "
        "Headroom is how many more bits the bound could grow before reaching 2^31.",
        "",
        "| layer | op | w bits | in | out | worst-case abs(acc) | log2 | headroom (bits) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n in convs:
        b = n.attrs["acc_bound"]
        if b > ACC_LIMIT:  # quantize.py refuses these; a card must never show one
            raise ValueError(f"{n.name}: accumulator bound {b} exceeds int32")
        x, y = qg.tensors[n.inputs[0]].qtype, qg.tensors[n.output].qtype
        log2 = math.log2(max(b, 1))
        lines.append(f"| `{n.name}` | {n.op} | {n.attrs['bits']} | {x.dtype} | {y.dtype} | {b} "
                     f"| {log2:.1f} | {31 - log2:.1f} |")
    lines.append("")
    return "\n".join(lines)


def render_fidelity(f: "Fidelity") -> str:
    """The card's fidelity section: what compile's guard measured, in eval's words."""
    floor = (f"the guard refuses under {f.min_sqnr_db:g} dB, `--min-sqnr`" if f.min_sqnr_db > 0
             else "guard off (`--min-sqnr 0`)")
    lines = ["", "## Fidelity against the float model", "",
             f"Measured at compile time on {f.samples} {f.source}, against onnxruntime FP32 "
             f"({floor}).", "",
             "| measure | value |", "| --- | --- |",
             f"| output SQNR | {f.sqnr_db:.1f} dB |",
             f"| top-1 agreement | {f.top1_agreement:.1%} |"]
    d = f.sharpest_drop
    if d is not None:
        lines.append(f"| sharpest per-layer drop (the {f.layer_samples} worst samples) | `{d.name}` "
                     f"({d.op}): {d.input_sqnr_db:.1f} -> {d.sqnr_db:.1f} dB |")
    return "\n".join(lines) + "\n"


def render_plan(plan: dict[str, Any]) -> str:
    """The mixed-precision section: budgets, totals, and per layer bits, Omega, latency
    share and why (pinned, tied, chosen)."""
    b = plan.get("budgets") or {}
    units = {"latency_ms": "ms", "size_mb": "MB", "bops_g": "G BOPs"}
    asked = ", ".join(f"{k.split('_')[0]} <= {v:.4g} {units[k]}" for k, v in b.items()) or "none"
    total_lat = sum(layer["latency_ms"] for layer in plan["layers"]) or 1.0
    lines = [
        "",
        "## Mixed-precision plan",
        "",
        f"Budgets (resolved to absolute units): {asked}. Latency per layer: "
        f"{plan.get('latency_source', '?')}; non-layer overhead "
        f"{plan.get('overhead_ms') or 0:.3f} ms.",
        "",
        f"Predicted latency {plan['predicted_latency_ms']:.3f} ms, size {plan['size_mb']:.2f} MB, "
        f"{plan['bops_g']:.1f} G BOPs; objective sum Omega = {plan['objective']:.4g}.",
        "",
        "| layer | precision | Omega | latency (ms) | share | why |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for layer in plan["layers"]:
        lines.append(f"| `{layer['name']}` | {layer.get('precision', layer['bits'])} "
                     f"| {layer['omega']:.3g} "
                     f"| {layer['latency_ms']:.4f} | {100 * layer['latency_ms'] / total_lat:.1f}% "
                     f"| {layer['reason']} |")
    lines.append("")
    return "\n".join(lines)
