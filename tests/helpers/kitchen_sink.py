"""One tiny model that touches every canonical op, built with onnx.helper."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .onnx_builders import bn_node, conv_node, init, make_model, rng


def kitchen_sink_model(seed: int = 0, size: int = 11, softmax: bool = True) -> onnx.ModelProto:
    """conv(s2, asym pads)+bn+relu -> {dw conv+bn (signed), 1x1 conv} -> add+relu
    -> maxpool(ceil) | avgpool(no pad count) -> concat -> clip -> gap -> flatten -> gemm
    [-> softmax]."""
    r = rng(seed)
    inits: list = []
    n = [conv_node("stem", "x", "s0", r.normal(0, .3, (6, 3, 3, 3)), r.normal(0, .1, 6), inits,
                   strides=[2, 2], pads=[0, 1, 1, 0]),
         bn_node("stem_bn", "s0", "s1", 6, r, inits),
         helper.make_node("Relu", ["s1"], ["a"], name="stem_relu"),
         conv_node("dw", "a", "d0", r.normal(0, .3, (6, 1, 3, 3)), None, inits, group=6,
                   pads=[1, 1, 1, 1]),
         bn_node("dw_bn", "d0", "d1", 6, r, inits),
         conv_node("pw", "a", "p0", r.normal(0, .3, (6, 6, 1, 1)), r.normal(0, .1, 6), inits),
         helper.make_node("Add", ["d1", "p0"], ["s"], name="add"),
         helper.make_node("Relu", ["s"], ["sr"], name="add_relu"),
         helper.make_node("MaxPool", ["sr"], ["mp"], name="maxpool", kernel_shape=[3, 3],
                          strides=[2, 2], ceil_mode=1),
         helper.make_node("AveragePool", ["sr"], ["ap"], name="avgpool", kernel_shape=[3, 3],
                          strides=[2, 2], pads=[0, 0, 1, 1], count_include_pad=0),
         ]
    inits += [init("lo", np.array(0.0)), init("hi", np.array(6.0))]
    n += [helper.make_node("Concat", ["mp", "ap"], ["cat"], name="concat", axis=1),
          helper.make_node("Clip", ["cat", "lo", "hi"], ["cl"], name="clip"),
          helper.make_node("GlobalAveragePool", ["cl"], ["g"], name="gap"),
          helper.make_node("Flatten", ["g"], ["f"], name="flatten", axis=1),
          helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1)]
    inits += [init("fc_w", r.normal(0, .3, (5, 12))), init("fc_b", r.normal(0, .1, 5))]
    out = "logits"
    if softmax:
        n.append(helper.make_node("Softmax", ["logits"], ["y"], name="softmax", axis=1))
        out = "y"
    return make_model(n, inits, [1, 3, size, size], [1, 5], out_name=out)
