"""Synthetic CNN architectures (torchvision layouts) built with ``onnx.helper``.

These are real *architectures* with seeded random weights: good for latency,
bit-exactness and compile tests, meaningless for accuracy. No torch needed.

    from qcompile import zoo
    m = zoo.build("resnet50", input_size=64, seed=1)
    zoo.save(m, "out/resnet50.onnx")

Every conv is followed by a BatchNormalization whose statistics are deliberately
far from identity, so BN folding and calibration are really exercised.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qcompile.errors import UsageError

OPSET = 17
IR_VERSION = 8  # loads in every onnxruntime >= 1.14, including the pinned 1.32
BN_EPS = 1e-5
# Residual branches end in a BN whose gamma is scaled down (like torchvision's
# zero_init_residual, but not zero). With gamma ~ U(0.5, 1.5) unscaled, the residual
# stream's variance roughly doubles per block: ResNet-50 logits std was ~990 at 224 px
# (ResNet-18: ~42). At 0.3 they are ~8 and ~5, and MobileNetV2 ~2.
RESIDUAL_GAMMA_SCALE = 0.3

IntPair = int | tuple[int, int]


def _pair(v: IntPair) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else v


class _Builder:
    """Accumulates nodes and initializers; tracks channel count per tensor name."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.channels: dict[str, int] = {}
        self._names: set[str] = set()

    # -- plumbing -------------------------------------------------------------
    def _node(self, op: str, name: str, inputs: Sequence[str], channels: int, **attrs: object) -> str:
        """Add one node; its single output tensor is named after the node (both unique)."""
        if name in self._names:
            raise ValueError(f"duplicate node name {name!r}")  # a zoo bug, not user error
        self._names.add(name)
        self.nodes.append(helper.make_node(op, list(inputs), [name], name=name, **attrs))
        self.channels[name] = channels
        return name

    def _init(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    # -- layers ---------------------------------------------------------------
    def conv_bn(self, x: str, cout: int, name: str, kernel: IntPair = 1, stride: IntPair = 1,
                pad: IntPair = 0, group: int = 1, act: str | None = "relu", gamma_scale: float = 1.0,
                names: tuple[str, str, str] = ("conv", "bn", "relu")) -> str:
        """Conv (no bias) -> BatchNormalization -> optional Relu / ReLU6 (Clip).

        ``names`` are suffixes appended to ``name`` with a dot; an empty ``name``
        uses the suffixes alone (ResNet's top-level ``conv1``/``bn1``).
        """
        cin = self.channels[x]
        (kh, kw), (sh, sw), (ph, pw) = _pair(kernel), _pair(stride), _pair(pad)
        prefix = f"{name}." if name else ""
        conv, bn, relu = (prefix + n for n in names)
        # He-normal: keeps activation variance roughly constant through ReLU layers.
        fan_in = cin // group * kh * kw
        w = self.rng.standard_normal((cout, cin // group, kh, kw)) * np.sqrt(2.0 / fan_in)
        y = self._node("Conv", conv, [x, self._init(f"{conv}.weight", w)], cout,
                       kernel_shape=[kh, kw], strides=[sh, sw], pads=[ph, pw, ph, pw],
                       dilations=[1, 1], group=group)
        y = self.bn(y, bn, gamma_scale)
        if act == "relu":
            y = self._node("Relu", relu, [y], cout)
        elif act == "relu6":
            y = self.relu6(y, relu)
        return y

    def bn(self, x: str, name: str, gamma_scale: float = 1.0) -> str:
        c, r = self.channels[x], self.rng
        # Far from identity on purpose, so folding bugs show up numerically.
        gamma = r.uniform(0.5, 1.5, c) * gamma_scale
        beta = r.normal(0.0, 0.1, c)
        mean = r.normal(0.0, 0.1, c)
        var = r.uniform(0.5, 2.0, c)
        ins = [x] + [self._init(f"{name}.{k}", v) for k, v in
                     (("weight", gamma), ("bias", beta), ("running_mean", mean), ("running_var", var))]
        return self._node("BatchNormalization", name, ins, c, epsilon=BN_EPS)

    def relu6(self, x: str, name: str) -> str:
        # Opset-13+ Clip takes min/max as inputs; shared scalar initializers, as torch exports.
        if not any(t.name == "relu6.min" for t in self.inits):
            self._init("relu6.min", np.array(0.0))
            self._init("relu6.max", np.array(6.0))
        return self._node("Clip", name, [x, "relu6.min", "relu6.max"], self.channels[x])

    def maxpool(self, x: str, name: str, kernel: int = 3, stride: int = 2, pad: int = 0) -> str:
        return self._node("MaxPool", name, [x], self.channels[x], kernel_shape=[kernel, kernel],
                          strides=[stride, stride], pads=[pad] * 4)

    def avgpool3x3(self, x: str, name: str) -> str:
        # torchvision Inception: F.avg_pool2d(x, 3, stride=1, padding=1), count_include_pad=True.
        return self._node("AveragePool", name, [x], self.channels[x], kernel_shape=[3, 3],
                          strides=[1, 1], pads=[1, 1, 1, 1], count_include_pad=1)

    def add(self, a: str, b: str, name: str) -> str:
        return self._node("Add", name, [a, b], self.channels[a])

    def relu(self, x: str, name: str) -> str:
        return self._node("Relu", name, [x], self.channels[x])

    def concat(self, xs: Sequence[str], name: str) -> str:
        return self._node("Concat", name, xs, sum(self.channels[x] for x in xs), axis=1)

    # -- model ----------------------------------------------------------------
    def head_and_model(self, x: str, num_classes: int, batch: int, input_size: int,
                       softmax: bool, graph_name: str) -> onnx.ModelProto:
        """GlobalAveragePool -> Flatten -> Gemm(transB=1) [-> Softmax], then wrap as a model."""
        c = self.channels[x]
        x = self._node("GlobalAveragePool", "avgpool", [x], c)
        x = self._node("Flatten", "flatten", [x], c, axis=1)
        w = self.rng.standard_normal((num_classes, c)) * np.sqrt(2.0 / c)
        b = self.rng.normal(0.0, 0.01, num_classes)  # small, so logits are driven by features
        self.nodes.append(helper.make_node(
            "Gemm", [x, self._init("fc.weight", w), self._init("fc.bias", b)], ["logits"],
            name="fc", transB=1))
        out = "logits"
        if softmax:
            self.nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=1))
            out = "probs"
        graph = helper.make_graph(
            self.nodes, graph_name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, input_size, input_size])],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, [batch, num_classes])],
            initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  ir_version=IR_VERSION, producer_name="qcompile.frontend.zoo")
        model.doc_string = f"{graph_name}: synthetic weights, not trained"
        return model


# --- ResNet -------------------------------------------------------------------
def _residual(b: _Builder, x: str, out: str, cout: int, stride: int, name: str, relu: str) -> str:
    """relu(out + x), x through a 1x1 conv + BN where the shape changes (torchvision)."""
    identity = x
    if stride != 1 or b.channels[x] != cout:
        identity = b.conv_bn(x, cout, name, 1, stride, 0, act=None,
                             names=("downsample.0", "downsample.1", ""))
    return b.relu(b.add(out, identity, f"{name}.add"), relu)


def _basic_block(b: _Builder, x: str, planes: int, stride: int, name: str) -> str:
    out = b.conv_bn(x, planes, name, 3, stride, 1, names=("conv1", "bn1", "relu1"))
    out = b.conv_bn(out, planes, name, 3, 1, 1, act=None, gamma_scale=RESIDUAL_GAMMA_SCALE,
                    names=("conv2", "bn2", ""))
    return _residual(b, x, out, planes, stride, name, f"{name}.relu2")


def _bottleneck(b: _Builder, x: str, planes: int, stride: int, name: str) -> str:
    # torchvision v1.5: the stride sits on the 3x3 conv, not the first 1x1.
    cout = planes * 4
    out = b.conv_bn(x, planes, name, 1, 1, 0, names=("conv1", "bn1", "relu1"))
    out = b.conv_bn(out, planes, name, 3, stride, 1, names=("conv2", "bn2", "relu2"))
    out = b.conv_bn(out, cout, name, 1, 1, 0, act=None, gamma_scale=RESIDUAL_GAMMA_SCALE,
                    names=("conv3", "bn3", ""))
    return _residual(b, x, out, cout, stride, name, f"{name}.relu3")


def _resnet(block: Callable[[_Builder, str, int, int, str], str], layers: Sequence[int], graph_name: str,
            *, input_size: int, num_classes: int, seed: int, batch: int, softmax: bool) -> onnx.ModelProto:
    b = _Builder(seed)
    b.channels["input"] = 3
    x = b.conv_bn("input", 64, "", 7, 2, 3, names=("conv1", "bn1", "relu"))
    x = b.maxpool(x, "maxpool", 3, 2, 1)
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
        for j in range(n):
            x = block(b, x, planes, 2 if (i > 0 and j == 0) else 1, f"layer{i + 1}.{j}")
    return b.head_and_model(x, num_classes, batch, input_size, softmax, graph_name)


def resnet18(*, input_size: int = 224, num_classes: int = 1000, seed: int = 0, batch: int = 1,
             softmax: bool = False) -> onnx.ModelProto:
    """ResNet-18: BasicBlocks [2, 2, 2, 2] (11.69M parameters at 1000 classes, as torchvision)."""
    return _resnet(_basic_block, (2, 2, 2, 2), "resnet18", input_size=input_size,
                   num_classes=num_classes, seed=seed, batch=batch, softmax=softmax)


def resnet50(*, input_size: int = 224, num_classes: int = 1000, seed: int = 0, batch: int = 1,
             softmax: bool = False) -> onnx.ModelProto:
    """ResNet-50 (v1.5): Bottlenecks [3, 4, 6, 3] (25.56M parameters at 1000 classes, as torchvision)."""
    return _resnet(_bottleneck, (3, 4, 6, 3), "resnet50", input_size=input_size,
                   num_classes=num_classes, seed=seed, batch=batch, softmax=softmax)


# --- Inception-v3 -------------------------------------------------------------
def _inception_a(b: _Builder, x: str, pool_features: int, n: str) -> str:
    b1 = b.conv_bn(x, 64, f"{n}.branch1x1")
    b5 = b.conv_bn(x, 48, f"{n}.branch5x5_1")
    b5 = b.conv_bn(b5, 64, f"{n}.branch5x5_2", 5, 1, 2)
    b3 = b.conv_bn(x, 64, f"{n}.branch3x3dbl_1")
    b3 = b.conv_bn(b3, 96, f"{n}.branch3x3dbl_2", 3, 1, 1)
    b3 = b.conv_bn(b3, 96, f"{n}.branch3x3dbl_3", 3, 1, 1)
    bp = b.conv_bn(b.avgpool3x3(x, f"{n}.branch_pool.avgpool"), pool_features, f"{n}.branch_pool")
    return b.concat([b1, b5, b3, bp], f"{n}.concat")


def _inception_b(b: _Builder, x: str, n: str) -> str:
    b3 = b.conv_bn(x, 384, f"{n}.branch3x3", 3, 2, 0)
    bd = b.conv_bn(x, 64, f"{n}.branch3x3dbl_1")
    bd = b.conv_bn(bd, 96, f"{n}.branch3x3dbl_2", 3, 1, 1)
    bd = b.conv_bn(bd, 96, f"{n}.branch3x3dbl_3", 3, 2, 0)
    bp = b.maxpool(x, f"{n}.branch_pool.maxpool", 3, 2)
    return b.concat([b3, bd, bp], f"{n}.concat")


def _inception_c(b: _Builder, x: str, c7: int, n: str) -> str:
    # Factorised 7x7: asymmetric 1x7 / 7x1 kernels with matching asymmetric padding.
    b1 = b.conv_bn(x, 192, f"{n}.branch1x1")
    b7 = b.conv_bn(x, c7, f"{n}.branch7x7_1")
    b7 = b.conv_bn(b7, c7, f"{n}.branch7x7_2", (1, 7), 1, (0, 3))
    b7 = b.conv_bn(b7, 192, f"{n}.branch7x7_3", (7, 1), 1, (3, 0))
    bd = b.conv_bn(x, c7, f"{n}.branch7x7dbl_1")
    bd = b.conv_bn(bd, c7, f"{n}.branch7x7dbl_2", (7, 1), 1, (3, 0))
    bd = b.conv_bn(bd, c7, f"{n}.branch7x7dbl_3", (1, 7), 1, (0, 3))
    bd = b.conv_bn(bd, c7, f"{n}.branch7x7dbl_4", (7, 1), 1, (3, 0))
    bd = b.conv_bn(bd, 192, f"{n}.branch7x7dbl_5", (1, 7), 1, (0, 3))
    bp = b.conv_bn(b.avgpool3x3(x, f"{n}.branch_pool.avgpool"), 192, f"{n}.branch_pool")
    return b.concat([b1, b7, bd, bp], f"{n}.concat")


def _inception_d(b: _Builder, x: str, n: str) -> str:
    b3 = b.conv_bn(x, 192, f"{n}.branch3x3_1")
    b3 = b.conv_bn(b3, 320, f"{n}.branch3x3_2", 3, 2, 0)
    b7 = b.conv_bn(x, 192, f"{n}.branch7x7x3_1")
    b7 = b.conv_bn(b7, 192, f"{n}.branch7x7x3_2", (1, 7), 1, (0, 3))
    b7 = b.conv_bn(b7, 192, f"{n}.branch7x7x3_3", (7, 1), 1, (3, 0))
    b7 = b.conv_bn(b7, 192, f"{n}.branch7x7x3_4", 3, 2, 0)
    bp = b.maxpool(x, f"{n}.branch_pool.maxpool", 3, 2)
    return b.concat([b3, b7, bp], f"{n}.concat")


def _inception_e(b: _Builder, x: str, n: str) -> str:
    b1 = b.conv_bn(x, 320, f"{n}.branch1x1")
    b3 = b.conv_bn(x, 384, f"{n}.branch3x3_1")
    b3 = b.concat([b.conv_bn(b3, 384, f"{n}.branch3x3_2a", (1, 3), 1, (0, 1)),
                   b.conv_bn(b3, 384, f"{n}.branch3x3_2b", (3, 1), 1, (1, 0))], f"{n}.branch3x3.concat")
    bd = b.conv_bn(x, 448, f"{n}.branch3x3dbl_1")
    bd = b.conv_bn(bd, 384, f"{n}.branch3x3dbl_2", 3, 1, 1)
    bd = b.concat([b.conv_bn(bd, 384, f"{n}.branch3x3dbl_3a", (1, 3), 1, (0, 1)),
                   b.conv_bn(bd, 384, f"{n}.branch3x3dbl_3b", (3, 1), 1, (1, 0))], f"{n}.branch3x3dbl.concat")
    bp = b.conv_bn(b.avgpool3x3(x, f"{n}.branch_pool.avgpool"), 192, f"{n}.branch_pool")
    return b.concat([b1, b3, bd, bp], f"{n}.concat")


def inceptionv3(*, input_size: int = 299, num_classes: int = 1000, seed: int = 0, batch: int = 1,
                softmax: bool = False) -> onnx.ModelProto:
    """Inception-v3 as torchvision builds it, without the auxiliary head (23.8M parameters)."""
    b = _Builder(seed)
    b.channels["input"] = 3
    x = b.conv_bn("input", 32, "Conv2d_1a_3x3", 3, 2, 0)
    x = b.conv_bn(x, 32, "Conv2d_2a_3x3", 3, 1, 0)
    x = b.conv_bn(x, 64, "Conv2d_2b_3x3", 3, 1, 1)
    x = b.maxpool(x, "maxpool1", 3, 2)
    x = b.conv_bn(x, 80, "Conv2d_3b_1x1")
    x = b.conv_bn(x, 192, "Conv2d_4a_3x3", 3, 1, 0)
    x = b.maxpool(x, "maxpool2", 3, 2)
    x = _inception_a(b, x, 32, "Mixed_5b")
    x = _inception_a(b, x, 64, "Mixed_5c")
    x = _inception_a(b, x, 64, "Mixed_5d")
    x = _inception_b(b, x, "Mixed_6a")
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        x = _inception_c(b, x, c7, name)
    x = _inception_d(b, x, "Mixed_7a")
    x = _inception_e(b, x, "Mixed_7b")
    x = _inception_e(b, x, "Mixed_7c")
    return b.head_and_model(x, num_classes, batch, input_size, softmax, "inceptionv3")


# --- MobileNetV2 --------------------------------------------------------------
# (expand ratio t, output channels c, repeats n, first stride s), from the paper / torchvision.
_MBV2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                 (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _inverted_residual(b: _Builder, x: str, cout: int, stride: int, t: int, n: str) -> str:
    cin = b.channels[x]
    use_res = stride == 1 and cin == cout
    y = x
    if t != 1:
        y = b.conv_bn(y, cin * t, f"{n}.expand", act="relu6", names=("conv", "bn", "relu6"))
    y = b.conv_bn(y, cin * t, f"{n}.dw", 3, stride, 1, group=cin * t, act="relu6",
                  names=("conv", "bn", "relu6"))
    # Linear bottleneck: no activation after the projection.
    y = b.conv_bn(y, cout, f"{n}.project", act=None, names=("conv", "bn", ""),
                  gamma_scale=RESIDUAL_GAMMA_SCALE if use_res else 1.0)
    return b.add(x, y, f"{n}.add") if use_res else y


def mobilenetv2(*, input_size: int = 224, num_classes: int = 1000, seed: int = 0, batch: int = 1,
                softmax: bool = False) -> onnx.ModelProto:
    """MobileNetV2 (width 1.0): inverted residuals, depthwise convs, ReLU6 as Clip (3.50M parameters)."""
    b = _Builder(seed)
    b.channels["input"] = 3
    x = b.conv_bn("input", 32, "features.0", 3, 2, 1, act="relu6", names=("conv", "bn", "relu6"))
    i = 1
    for t, c, n, s in _MBV2_SETTING:
        for j in range(n):
            x = _inverted_residual(b, x, c, s if j == 0 else 1, t, f"features.{i}")
            i += 1
    x = b.conv_bn(x, 1280, f"features.{i}", act="relu6", names=("conv", "bn", "relu6"))
    return b.head_and_model(x, num_classes, batch, input_size, softmax, "mobilenetv2")


# --- registry -----------------------------------------------------------------
ZOO: dict[str, Callable[..., onnx.ModelProto]] = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "inceptionv3": inceptionv3,
    "mobilenetv2": mobilenetv2,
}
DEFAULT_INPUT_SIZE: dict[str, int] = {"inceptionv3": 299}  # everything else: 224
# Smallest input whose feature maps stay >= 1 px (torchvision documents 75 for Inception-v3).
MIN_INPUT_SIZE: dict[str, int] = {"inceptionv3": 75}  # everything else: 1


def build(name: str, *, input_size: int | None = None, num_classes: int = 1000, seed: int = 0,
          batch: int = 1, softmax: bool = False) -> onnx.ModelProto:
    """Build zoo model ``name`` with seeded weights; output ``logits`` (or ``probs`` with softmax)."""
    if name not in ZOO:
        raise UsageError(f"unknown zoo model {name!r}; choose one of: {', '.join(sorted(ZOO))}")
    size = DEFAULT_INPUT_SIZE.get(name, 224) if input_size is None else input_size
    min_size = MIN_INPUT_SIZE.get(name, 1)
    if size < min_size:
        raise UsageError(f"input size {size} is too small for {name}; use at least {min_size}")
    if batch < 1 or num_classes < 1:
        raise UsageError(f"batch ({batch}) and num_classes ({num_classes}) must be >= 1")
    return ZOO[name](input_size=size, num_classes=num_classes, seed=seed, batch=batch, softmax=softmax)


def save(model: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` atomically: a temp file in the same directory, then ``os.replace``.

    Not ``files.atomic_open``: benchmarks/gpu_check.py ships this file beside errors.py
    alone, so it imports nothing else of qcompile."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would surprise anyone sharing the output
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
