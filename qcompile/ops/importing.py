"""Helpers the ONNX handlers share: window geometry and constant integer inputs."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from qcompile.ir.node import Node
from qcompile.ops.contexts import ImportContext


def window_pads(ctx: ImportContext, kernel: tuple[int, ...], ceil: bool
                ) -> tuple[dict[str, Any], bool]:
    """Explicit (top, left, bottom, right) pads for Conv/MaxPool/AveragePool.

    auto_pad and ceil_mode become plain pads; the result must reproduce the inferred
    output size, which catches the ceil_mode corner where ONNX shape inference and
    onnxruntime disagree on the size of the last window.  Also says whether ceil_mode
    added padding past the explicit pads.
    """
    x_shape, y_shape = ctx.shapes[ctx.onode.input[0]], ctx.shapes[ctx.onode.output[0]]
    if len(x_shape) != 4 or len(kernel) != 2:
        ctx.unsupported(f"{len(x_shape) - 2}-D windows", "only 2-D (N, C, H, W) is supported")
    strides = tuple(ctx.attrs.get("strides", (1, 1)))
    dilations = tuple(ctx.attrs.get("dilations", (1, 1)))
    auto_pad = ctx.attrs.get("auto_pad", "NOTSET")
    pads = list(ctx.attrs.get("pads", (0, 0, 0, 0)))
    ceil_extra = False
    for ax in range(2):
        size, k, s, d = x_shape[2 + ax], kernel[ax], strides[ax], dilations[ax]
        span = (k - 1) * d + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            total = max(0, (math.ceil(size / s) - 1) * s + span - size)
            small, big = total // 2, total - total // 2
            pads[ax], pads[2 + ax] = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
        elif auto_pad == "VALID":
            pads[ax] = pads[2 + ax] = 0
        elif auto_pad != "NOTSET":
            ctx.unsupported(f"auto_pad={auto_pad}", "unknown value")
        padded = size + pads[ax] + pads[2 + ax]
        out = (padded - span) // s + 1
        if ceil and auto_pad == "NOTSET":
            out = -(-(padded - span) // s) + 1
            if (out - 1) * s >= size + pads[ax]:  # last window may not start in the end pad
                out -= 1
            extra = max(0, (out - 1) * s + span - padded)
            pads[2 + ax] += extra
            ceil_extra |= extra > 0
        if out != y_shape[2 + ax]:
            ctx.unsupported("ceil_mode=1" if ceil else "this window geometry",
                            f"output size {y_shape[2 + ax]} on axis {2 + ax} from shape "
                            f"inference, {out} from the window arithmetic")
    attrs = {"kernel_shape": tuple(kernel), "strides": strides, "dilations": dilations,
             "pads": tuple(pads)}
    return attrs, ceil_extra


def shape_of(ctx: ImportContext, i: int) -> tuple[int, ...]:
    return ctx.shapes[ctx.onode.input[i]]


def ints(ctx: ImportContext, i: int, role: str) -> tuple[int, ...]:
    """A constant integer input (shapes, axes, pads ...) as a tuple."""
    t = ctx.onode.input[i]
    if t not in ctx.consts:
        ctx.unsupported(f"non-constant {role} input {t!r}",
                        f"{role} must be an initializer or foldable to one")
    return tuple(int(v) for v in np.asarray(ctx.consts[t]).reshape(-1))


def axes(ctx: ImportContext, rank: int, input_index: int = 1) -> tuple[int, ...] | None:
    """``axes`` from the attribute (old opsets) or the optional input (new ones)."""
    if "axes" in ctx.attrs:
        raw = tuple(ctx.attrs["axes"])
    elif ctx.has(input_index):
        raw = ints(ctx, input_index, "axes")
    else:
        return None
    return tuple(sorted(a + rank if a < 0 else a for a in raw))


def unary(ctx: ImportContext) -> Node:
    """One activation input, the attributes as they are (Relu, Softmax, the tables ...)."""
    return ctx.node((ctx.act(0),), ctx.attrs)


def four_d(ctx: ImportContext) -> None:
    """Refuse an input that is not (N, C, H, W)."""
    if len(shape_of(ctx, 0)) != 4:
        ctx.unsupported("a non-4-D input", "only (N, C, H, W) is supported")
