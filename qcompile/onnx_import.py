"""Load, check and shape-infer an ONNX file, then turn it into a ``Graph`` of ONNX ops.

Two steps, both refusing anything qcompile cannot lower with one actionable line:

* ``load_model`` reads a file (never writing it), refuses hostile external data,
  runs the full checker, converts to opset 17 and infers shapes strictly.
* ``import_onnx`` fixes a symbolic batch dimension, re-infers static shapes and
  builds ``Node``s that keep their ONNX ``op_type``; constants move to ``params``
  by role and window ops get explicit ``pads`` (top, left, bottom, right) with
  ``auto_pad`` and ``ceil_mode`` resolved.  ``prepare`` canonicalises from there.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
import tempfile
from typing import Any, Callable, Iterator, Mapping, NoReturn, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import external_data_helper, helper, numpy_helper, shape_inference, version_converter

from .errors import BadModelError, UnsupportedOpError, UsageError
from .activations import UNARY_FUNCTIONS
from .graph import Graph, Node

TARGET_OPSET = 17
MIN_OPSET = 7
MAX_INPUT_ELEMENTS = 1 << 28  # 256 Mi input values: far beyond any image batch
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16)
_DEFAULT_DOMAINS = ("", "ai.onnx")
_CONTROL_FLOW = ("If", "Loop", "Scan")


def _one_line(err: BaseException | str) -> str:
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


# --------------------------------------------------------------------------- loading

def load_model(path: str | os.PathLike, input_shape: Sequence[int] | None = None
               ) -> onnx.ModelProto:
    """Read, validate and normalise an ONNX file: static input shape, constants folded,
    opset 17, shapes inferred.

    ``input_shape`` fixes every dimension of the input (trtexec's ``--shapes`` habit);
    without it a symbolic batch becomes 1 and any other symbolic dimension is refused
    with a line that names ``--input-shape``.  Every subgraph that depends only on
    initializers and static shapes (Shape, ConstantOfShape, Gather, Cast, Range ...) is
    evaluated by onnxruntime's BASIC graph optimizer, which emits standard ops only.

    Raises ``BadModelError`` for missing/empty/non-ONNX/invalid/hostile files,
    ``UsageError`` for a bad ``input_shape`` and ``UnsupportedOpError`` for valid models
    outside qcompile's scope.  The file on disk is only ever read.
    """
    path = os.fspath(path)
    # Step 1. The file itself: clear messages before protobuf gets a say.
    if not os.path.exists(path):
        raise BadModelError(f"{path}: no such file; pass the path of an .onnx model")
    if os.path.isdir(path):
        raise BadModelError(f"{path}: is a directory; pass the .onnx file inside it")
    if os.path.getsize(path) == 0:
        raise BadModelError(f"{path}: file is empty; re-export or re-download the model")
    try:
        model = onnx.load(path, load_external_data=False)
    except OSError as err:
        raise BadModelError(f"{path}: cannot read the file ({err.strerror or err}); "
                            "check its permissions") from None
    except Exception as err:  # DecodeError and friends all mean "not ONNX"
        raise BadModelError(f"{path}: not a readable ONNX model ({_one_line(err)}); "
                            "the file may be truncated or another format") from None
    if model.ir_version <= 0 or not model.HasField("graph") or not model.graph.node:
        raise BadModelError(f"{path}: not an ONNX model (no IR version or empty graph); "
                            "the file may be truncated or another format")
    # Step 2. External data must stay inside the model's folder, then load it.
    base_dir = os.path.dirname(os.path.abspath(path))
    _check_external_data(model, base_dir, path)
    try:
        external_data_helper.load_external_data_for_model(model, base_dir)
    except Exception as err:
        raise BadModelError(f"{path}: cannot read external data ({_one_line(err)}); "
                            "keep the .onnx file next to its data files") from None
    # Step 3. Refuse what no later step can lower, before the checker's cryptic view of it.
    _check_scope(model)
    _untyped_outputs_to_float(model)
    # Step 4. The structural checker.  Shapes are not checked here: exporters leave
    # outputs without shapes, and everything is re-inferred after the input is fixed.
    domains = [o.domain or "ai.onnx" for o in model.opset_import]
    if len(set(domains)) != len(domains):  # which version would apply is ambiguous
        raise BadModelError(f"{path}: opset_import lists a domain twice ({', '.join(domains)}); "
                            "re-export the model")
    version = _default_opset(model)
    if not MIN_OPSET <= version:
        raise UnsupportedOpError(f"{path}: opset {version} is older than {MIN_OPSET}; "
                                 f"re-export the model with opset {MIN_OPSET} or newer")
    try:
        onnx.checker.check_model(_for_checker(model))
    except Exception as err:
        raise BadModelError(f"{path}: fails the ONNX checker: {_one_line(err)}") from None
    _check_io(model, path)
    _check_weights(model, path)
    # Step 5. A static input, then constant folding, opset 17 and strict inference.
    _fix_input(model, input_shape, path)
    model = _fold_constants(model, path)
    model = _to_target_opset(model, path)
    model = _infer(model, path)
    _check_io(model, path)
    return model


def _untyped_outputs_to_float(model: onnx.ModelProto) -> None:
    """Outputs declared without a type (onnxruntime runs such graphs) get float32 and
    no shape: the checker insists on a type, and inference fills in the shape."""
    for out in model.graph.output:
        if not out.type.HasField("tensor_type") or not out.type.tensor_type.elem_type:
            out.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
            out.type.tensor_type.ClearField("shape")


def _for_checker(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as the structural checker wants it: every output with a shape field.

    Exporters may leave outputs shapeless, which onnxruntime accepts; the shape only
    matters after folding, where inference fills it in.  The copy shares nothing."""
    if all(o.type.tensor_type.HasField("shape") for o in model.graph.output):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for out in copy.graph.output:
        if not out.type.tensor_type.HasField("shape"):
            out.type.tensor_type.shape.dim.add().dim_param = "unknown"
    return copy


def _check_weights(model: onnx.ModelProto, path: str) -> None:
    """NaN or Inf in a float initializer makes every later step garbage: refuse it here."""
    for t in _all_tensors(model):
        if t.data_type not in _FLOAT_TYPES or t.data_location == onnx.TensorProto.EXTERNAL \
                and not t.raw_data:
            continue
        try:
            a = numpy_helper.to_array(t)
        except Exception as err:
            raise BadModelError(f"{path}: tensor {t.name!r} cannot be read "
                                f"({_one_line(err)}); re-export the model") from None
        if a.size and not np.all(np.isfinite(a)):
            raise BadModelError(f"{path}: weight {t.name!r} contains NaN or Inf; fix the "
                                "trained weights before compiling")


def _fix_input(model: onnx.ModelProto, input_shape: Sequence[int] | None, path: str) -> None:
    """Give the input a fully static shape in place: ``input_shape``, else symbolic batch -> 1."""
    x = _graph_inputs(model)[0]
    t = x.type.tensor_type
    dims = t.shape.dim if t.HasField("shape") else []
    if input_shape is not None:
        want = tuple(int(d) for d in input_shape)
        if dims and len(want) != len(dims):
            raise UsageError(f"--input-shape has {len(want)} dimensions, input {x.name!r} has "
                             f"{len(dims)}; pass all of them, e.g. 1x3x224x224")
        for axis, d in enumerate(dims):
            if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != want[axis] \
                    and axis != 0:
                raise UsageError(f"--input-shape sets axis {axis} of input {x.name!r} to "
                                 f"{want[axis]}, but the model fixes it at {d.dim_value}")
    else:
        if not dims:
            raise UsageError(f"{path}: input {x.name!r} has no shape; pass --input-shape, "
                             "e.g. --input-shape 1x3x224x224")
        want = []
        for axis, d in enumerate(dims):
            if d.HasField("dim_value") and d.dim_value <= 0:
                raise BadModelError(f"{path}: input {x.name!r} has a zero-sized or negative "
                                    f"dimension at axis {axis}; re-export it with a real "
                                    "image shape")
            if d.HasField("dim_value"):
                want.append(d.dim_value)
            elif axis == 0:
                want.append(1)
            else:
                name = d.dim_param or "?"
                raise UsageError(f"{path}: input {x.name!r} has a dynamic dimension {name!r} "
                                 f"at axis {axis}; fix it with --input-shape, e.g. "
                                 f"--input-shape {'x'.join(['1', '3', '224', '224'][:len(dims)])}")
    if any(d == 0 for d in want):
        raise BadModelError(f"{path}: input {x.name!r} has a zero-sized dimension; "
                            "re-export it with a real image shape")
    if math.prod(want) > MAX_INPUT_ELEMENTS:
        raise UsageError(f"input {x.name!r} of shape {'x'.join(map(str, want))} has more than "
                         f"{MAX_INPUT_ELEMENTS:,} elements; pass a smaller --input-shape")
    t.ClearField("shape")
    for d in want:
        t.shape.dim.add().dim_value = int(d)
    # Stale symbolic shapes would fight the fixed ones in strict inference.
    del model.graph.value_info[:]
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")


def _fold_constants(model: onnx.ModelProto, path: str) -> onnx.ModelProto:
    """onnxruntime's BASIC optimizer: constant folding (Shape of static tensors included),
    Identity/Dropout elimination and Conv+BN/Add/Mul fusion, all in standard ops.

    It runs on a static input shape, so shape subgraphs become initializers.  The result
    is read back from the file onnxruntime writes; the caller's model is not touched."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.log_severity_level = 4  # fatal only: its errors are raised, one line
    with tempfile.TemporaryDirectory(prefix="qcompile-fold-") as tmp:
        out = os.path.join(tmp, "folded.onnx")
        opts.optimized_model_filepath = out
        try:
            ort.InferenceSession(model.SerializeToString(), opts,
                                 providers=["CPUExecutionProvider"])
            folded = onnx.load(out)
        except Exception as err:
            raise BadModelError(f"{path}: onnxruntime cannot load the model "
                                f"({_one_line(err)}); check it with onnx.checker and "
                                "onnxruntime first") from None
    # onnxruntime may leave initializers listed as inputs; keep the single real input.
    inits = {t.name for t in folded.graph.initializer}
    keep = [v for v in folded.graph.input if v.name not in inits]
    del folded.graph.input[:]
    folded.graph.input.extend(keep)
    return folded


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors


def _check_external_data(model: onnx.ModelProto, base_dir: str, path: str) -> None:
    root = os.path.realpath(base_dir)
    for tensor in _all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = {e.key: e.value for e in tensor.external_data}.get("location", "")
        # realpath resolves symlinks and "..", so one commonpath test covers every escape.
        ok = bool(location) and "\0" not in location and not os.path.isabs(location)
        resolved = os.path.realpath(os.path.join(root, location)) if ok else ""
        if not ok or os.path.commonpath([root, resolved]) != root:
            raise BadModelError(
                f"{path}: tensor {tensor.name!r} points at external data {location!r} outside "
                "the model's folder; refusing it (move the data next to the model)")
        if not os.path.isfile(resolved):
            raise BadModelError(f"{path}: tensor {tensor.name!r} needs external data file "
                                f"{location!r}, which is missing; copy it next to the model")


def _check_scope(model: onnx.ModelProto) -> None:
    """Refuse custom-domain ops, control flow and sparse weights, naming the culprit."""
    if model.graph.sparse_initializer:
        raise UnsupportedOpError(
            f"sparse initializer {model.graph.sparse_initializer[0].values.name!r} is not "
            "supported; store the weights densely")
    for i, node in enumerate(model.graph.node):
        if node.domain not in _DEFAULT_DOMAINS:
            raise UnsupportedOpError(_unsupported_msg(_node_name(node, i),
                                                      f"{node.domain}.{node.op_type}"))
        if node.op_type in _CONTROL_FLOW:
            raise UnsupportedOpError(_unsupported_msg(_node_name(node, i), node.op_type))


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), 0)


def _to_target_opset(model: onnx.ModelProto, path: str) -> onnx.ModelProto:
    """Older opsets are converted up to 17; newer ones (18+) are kept as they are, since
    downgrading loses ops such as Mish and Gelu, and the handlers read both spellings."""
    version = _default_opset(model)
    if version >= TARGET_OPSET:
        return model
    try:
        return version_converter.convert_version(model, TARGET_OPSET)
    except Exception as err:
        raise UnsupportedOpError(
            f"{path}: cannot convert opset {version} to {TARGET_OPSET} ({_one_line(err)}); "
            f"re-export the model with opset {TARGET_OPSET}") from None


_SKELETON_MIN_ELEMENTS = 4096  # float weights this big only matter to inference by shape


def _infer(model: onnx.ModelProto, source: str) -> onnx.ModelProto:
    """Strict shape inference, returning ``model`` with its value_info/outputs filled in.

    infer_shapes serialises the whole model; on a weight-free skeleton (large float
    initializers turned into typed inputs) it takes milliseconds instead of seconds,
    and the result is the same because only small int constants feed shape functions.
    """
    g = model.graph
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
              onnx.TensorProto.BFLOAT16)
    big = [t for t in g.initializer
           if t.data_type in floats and math.prod(t.dims) >= _SKELETON_MIN_ELEMENTS]
    names = {t.name for t in big}
    skeleton = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import,
                               functions=model.functions)
    sg = skeleton.graph
    sg.name = g.name
    sg.node.extend(g.node)
    sg.input.extend(v for v in g.input if v.name not in names)
    sg.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in big)
    sg.initializer.extend(t for t in g.initializer if t.name not in names)
    sg.output.extend(g.output)
    sg.value_info.extend(g.value_info)
    try:
        inferred = shape_inference.infer_shapes(skeleton, check_type=True, strict_mode=True)
    except Exception as err:
        raise BadModelError(f"{source}: shape inference failed: {_one_line(err)}") from None
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.value_info[:]
    out.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in names)
    del out.graph.output[:]
    out.graph.output.extend(inferred.graph.output)
    return out


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    # Old exporters list initializers among the inputs; those are weights, not inputs.
    inits = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits]


def _check_io(model: onnx.ModelProto, source: str) -> None:
    inputs, outputs = _graph_inputs(model), model.graph.output
    if len(inputs) != 1 or len(outputs) != 1:
        raise UnsupportedOpError(
            f"{source}: model has {len(inputs)} inputs and {len(outputs)} outputs "
            f"({', '.join(v.name for v in [*inputs, *outputs])}); qcompile needs exactly one "
            "image input and one output")
    elem = inputs[0].type.tensor_type.elem_type
    if elem != onnx.TensorProto.FLOAT:
        known = elem in onnx.TensorProto.DataType.values()  # Name() raises on e.g. 99
        raise UnsupportedOpError(
            f"{source}: input {inputs[0].name!r} is "
            f"{onnx.TensorProto.DataType.Name(elem) if known else f'of unknown type {elem}'}; "
            "qcompile needs a float32 input (move casts/preprocessing out of the model)")
    # Axis 0 is the batch everywhere downstream: a 1-D tensor would be nothing but batch.
    for v, what in ((inputs[0], "input"), (outputs[0], "output")):
        t = v.type.tensor_type
        if t.HasField("shape") and len(t.shape.dim) < 2:
            raise UnsupportedOpError(
                f"{source}: {what} {v.name!r} has rank {len(t.shape.dim)}; qcompile needs a "
                "batch axis and at least one more, e.g. (N, C, H, W) or (N, classes)")


# --------------------------------------------------------------------------- importing

def _unsupported_msg(name: str, op: str) -> str:
    return (f"node {name!r} (op {op}) is not supported; supported ops: "
            f"{', '.join(sorted(SUPPORTED_OPS))}. Replace it or file an issue.")


def _node_name(node: onnx.NodeProto, index: int) -> str:
    # Unnamed nodes are common; their first output is unique and findable in Netron.
    return node.name or (node.output[0] if node.output else f"{node.op_type}_{index}")


def import_onnx(model: onnx.ModelProto, *, batch: int = 1, source: str = "") -> Graph:
    """Turn a (checked) ONNX model into a ``Graph`` of ONNX ops with static shapes.

    A symbolic or unknown batch dimension becomes ``batch``; every other dimension
    must be static.  Constants become float32 ``params``; unsupported ops or
    attributes raise ``UnsupportedOpError`` naming the node.
    """
    if batch <= 0:
        raise UsageError(f"--batch must be positive, got {batch}")
    src = source or model.graph.name or "model"
    # Step 1. Work on a copy at opset 17 with the batch fixed, then re-infer.
    fixed = onnx.ModelProto()
    fixed.CopyFrom(_to_target_opset(model, src))
    _check_scope(fixed)
    _check_io(fixed, src)
    _fix_batch(fixed, batch, src)
    fixed = _infer(fixed, src)
    g = fixed.graph
    x = _graph_inputs(fixed)[0]
    # Step 2. Static shapes of every activation, and every constant by name.
    shapes = _static_shapes(fixed)
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    used = {t for n in g.node for t in n.input} | {o.name for o in g.output}
    # Step 3. One handler per op type; Constant nodes only feed the constant table.
    nodes: list[Node] = []
    for i, onode in enumerate(g.node):
        if onode.op_type == "Constant":
            consts[onode.output[0]] = _constant_value(onode, i)
            continue
        name = _node_name(onode, i)
        handler = _HANDLERS.get(onode.op_type)
        if handler is None:
            raise UnsupportedOpError(_unsupported_msg(name, onode.op_type))
        if onode.output[0] not in shapes:
            raise BadModelError(f"{src}: node {name!r} output {onode.output[0]!r} has no "
                                "static inferred shape; re-export with static shapes")
        if math.prod(shapes[onode.output[0]]) > MAX_INPUT_ELEMENTS << 6:  # e.g. pads=2**40
            raise BadModelError(f"{src}: node {name!r} output {onode.output[0]!r} has shape "
                                f"{shapes[onode.output[0]]}, an implausible size; fix the "
                                "node's attributes")
        ctx = _Ctx(name, onode, _parse_attrs(onode), consts, shapes)
        for extra in list(onode.output)[1:]:
            if extra in used and onode.op_type not in _MULTI_OUTPUT:
                ctx.unsupported(f"output {extra!r}", "only the first output may be used")
        made = handler(ctx)
        nodes.extend(made if isinstance(made, list) else [made])
    if len(nodes) == 0:
        raise UnsupportedOpError(f"{src}: the graph does nothing after constant folding "
                                 "(its output does not depend on the input)")
    activations = {x.name, *(n.output for n in nodes)}  # Constant outputs are not activations
    graph = Graph(input=x.name, input_shape=shapes[x.name], output=g.output[0].name,
                  nodes=tuple(nodes), source=src,
                  shapes={t: s for t, s in shapes.items() if t in activations})
    try:
        graph.validate()
    except ValueError as err:
        raise BadModelError(f"{src}: {err}") from None
    return graph


def _fix_batch(model: onnx.ModelProto, batch: int, source: str) -> None:
    x = _graph_inputs(model)[0]
    dims = x.type.tensor_type.shape.dim
    if not x.type.tensor_type.HasField("shape") or len(dims) == 0:
        raise BadModelError(f"{source}: input {x.name!r} has no shape; re-export it with a "
                            "static shape such as (N, C, H, W)")
    for axis, d in enumerate(dims):
        if d.HasField("dim_value") and d.dim_value > 0:
            continue
        if axis != 0:
            raise BadModelError(f"{source}: input {x.name!r} has a dynamic dimension "
                                f"{d.dim_param or '?'!r} at axis {axis}; only the batch "
                                "may be dynamic, re-export with a fixed size")
        d.Clear()
        d.dim_value = batch
    # Stale symbolic shapes would fight the new batch in strict inference.
    del model.graph.value_info[:]
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")


def _static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Every fully static inferred shape; the node loop refuses outputs missing here."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    shapes: dict[str, tuple[int, ...]] = {}
    for v in [*g.input, *g.value_info, *g.output]:
        t = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        if v.name not in inits and t.HasField("shape") and all(d > 0 for d in dims):
            shapes[v.name] = dims
    return shapes


def _constant_value(node: onnx.NodeProto, index: int) -> np.ndarray:
    attr = node.attribute[0]  # the checker guarantees exactly one value attribute
    if attr.name in ("sparse_value",):
        raise UnsupportedOpError(f"node {_node_name(node, index)!r} (op Constant): "
                                 "sparse_value is not supported; use a dense tensor")
    return np.asarray(helper.get_attribute_value(attr) if attr.name != "value"
                      else numpy_helper.to_array(attr.t))


def _parse_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        elif isinstance(v, onnx.TensorProto):
            v = numpy_helper.to_array(v)
        elif isinstance(v, list):
            v = tuple(x.decode() if isinstance(x, bytes) else x for x in v)
        out[a.name] = v
    return out


@dataclass
class _Ctx:
    """What a handler needs to turn one ONNX node into a ``Node``."""

    name: str
    onode: onnx.NodeProto
    attrs: dict[str, Any]
    consts: Mapping[str, np.ndarray]
    shapes: Mapping[str, tuple[int, ...]]

    @property
    def op(self) -> str:
        return self.onode.op_type

    def unsupported(self, what: str, why: str) -> NoReturn:
        raise UnsupportedOpError(f"node {self.name!r} (op {self.op}): {what} is not "
                                 f"supported ({why}); change it in the model or file an issue")

    def _input(self, i: int) -> str:
        ins = self.onode.input
        return ins[i] if i < len(ins) else ""

    def has(self, i: int) -> bool:
        return self._input(i) != ""

    def is_const(self, i: int) -> bool:
        return self._input(i) in self.consts

    def act(self, i: int) -> str:
        """Input ``i`` as an activation tensor (constants are refused)."""
        t = self._input(i)
        if t in self.consts:
            self.unsupported(f"constant input {t!r}", "this input must be an activation")
        return t

    def const(self, i: int, role: str) -> np.ndarray:
        """Input ``i`` as a float32 constant (activations are refused)."""
        t = self._input(i)
        if t not in self.consts:
            self.unsupported(f"non-constant {role} input {t!r}", f"{role} must be an initializer")
        return np.array(self.consts[t], dtype=np.float32)  # a private copy

    def node(self, inputs: tuple[str, ...], attrs: Mapping[str, Any] | None = None,
             params: Mapping[str, np.ndarray] | None = None) -> Node:
        return Node(op=self.op, name=self.name, inputs=inputs, output=self.onode.output[0],
                    attrs=self.attrs if attrs is None else attrs, params=params or {})


# --------------------------------------------------------------------------- windows

def _window_pads(ctx: _Ctx, kernel: tuple[int, ...], ceil: bool) -> tuple[dict[str, Any], bool]:
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


# --------------------------------------------------------------------------- handlers

def _conv(ctx: _Ctx) -> Node:
    w = ctx.const(1, "weight")
    params = {"w": w} | ({"b": ctx.const(2, "bias")} if ctx.has(2) else {})
    if "b" in params and params["b"].shape != w.shape[:1]:  # onnxruntime does not check it
        raise BadModelError(f"node {ctx.name!r} (op Conv): bias has shape {params['b'].shape}, "
                            f"the weight has {w.shape[0]} output channels; the model is invalid")
    x_shape, group = ctx.shapes.get(ctx.onode.input[0], ()), int(ctx.attrs.get("group", 1))
    if (group < 1 or w.ndim < 3 or w.shape[0] % group
            or (len(x_shape) > 1 and w.shape[1] * group != x_shape[1])
            or tuple(ctx.attrs.get("kernel_shape", w.shape[2:])) != w.shape[2:]):
        raise BadModelError(f"node {ctx.name!r} (op Conv): weight {w.shape} with group={group}"
                            f" and kernel_shape={tuple(ctx.attrs.get('kernel_shape', ()))} does "
                            f"not fit input {x_shape}; the model is invalid")
    attrs, _ = _window_pads(ctx, tuple(ctx.attrs.get("kernel_shape", w.shape[2:])), ceil=False)
    return ctx.node((ctx.act(0),), attrs | {"group": int(ctx.attrs.get("group", 1))}, params)


def _pool(ctx: _Ctx) -> Node:
    if ctx.attrs.get("storage_order", 0) != 0:
        ctx.unsupported("storage_order=1", "only row-major (0) pooling indices are supported")
    ceil = bool(ctx.attrs.get("ceil_mode", 0))
    attrs, ceil_extra = _window_pads(ctx, tuple(ctx.attrs["kernel_shape"]), ceil)
    if ctx.op == "AveragePool":
        include = bool(ctx.attrs.get("count_include_pad", 0))
        # onnxruntime divides by the window clipped to the explicit pads, so a ceil-mode
        # extra would be counted wrongly once merged into the pads.
        if include and ceil_extra:
            ctx.unsupported("ceil_mode=1 with count_include_pad=1",
                            "the partial last window cannot be expressed with plain pads")
        if attrs["dilations"] != (1, 1):
            ctx.unsupported("dilations", "AveragePool dilation is not supported")
        attrs["count_include_pad"] = include
    return ctx.node((ctx.act(0),), attrs)


def _batchnorm(ctx: _Ctx) -> Node:
    if ctx.attrs.get("training_mode", 0):
        ctx.unsupported("training_mode=1", "export the model in inference mode")
    params = {role: ctx.const(i, role)
              for i, role in enumerate(("scale", "bias", "mean", "var"), start=1)}
    return ctx.node((ctx.act(0),), {"epsilon": float(ctx.attrs.get("epsilon", 1e-5))}, params)


def _clip(ctx: _Ctx) -> Node:
    # opset >= 11 passes bounds as optional inputs; older opsets as attributes.
    lo = float(ctx.attrs.get("min", -np.inf))
    hi = float(ctx.attrs.get("max", np.inf))
    if ctx.has(1):
        lo = float(ctx.const(1, "min").reshape(()))
    if ctx.has(2):
        hi = float(ctx.const(2, "max").reshape(()))
    return ctx.node((ctx.act(0),), {"min": lo, "max": hi})


def _gemm(ctx: _Ctx) -> Node:
    if ctx.attrs.get("transA", 0):
        ctx.unsupported("attribute transA=1", "transpose the input before Gemm")
    attrs = {"transA": 0, "transB": int(ctx.attrs.get("transB", 0)),
             "alpha": float(ctx.attrs.get("alpha", 1.0)), "beta": float(ctx.attrs.get("beta", 1.0))}
    if not (np.isfinite(attrs["alpha"]) and np.isfinite(attrs["beta"])):
        raise BadModelError(f"node {ctx.name!r} (op Gemm): alpha={attrs['alpha']} "
                            f"beta={attrs['beta']} must be finite; the model is invalid")
    params = {"w": ctx.const(1, "weight")} | ({"b": ctx.const(2, "bias")} if ctx.has(2) else {})
    return ctx.node((ctx.act(0),), attrs, params)


def _matmul(ctx: _Ctx) -> Node:
    w = ctx.const(1, "weight")
    if w.ndim != 2:
        ctx.unsupported(f"a {w.ndim}-D weight", "only a constant 2-D right operand is supported")
    return ctx.node((ctx.act(0),), {}, {"w": w})


def _reshape(ctx: _Ctx) -> Node:
    if not ctx.is_const(1):
        ctx.unsupported(f"non-constant shape input {ctx.onode.input[1]!r}",
                        "the target shape must be an initializer or Constant")
    target = tuple(int(v) for v in np.asarray(ctx.consts[ctx.onode.input[1]]).reshape(-1))
    attrs = {"shape": target, "allowzero": int(ctx.attrs.get("allowzero", 0))}
    return ctx.node((ctx.act(0),), attrs)


def _dropout(ctx: _Ctx) -> Node:
    if ctx.has(2) and (not ctx.is_const(2) or bool(ctx.consts[ctx.onode.input[2]])):
        ctx.unsupported("training_mode", "export the model in inference mode")
    return ctx.node((ctx.act(0),), {})


def _gap(ctx: _Ctx) -> Node:
    if len(ctx.shapes[ctx.onode.output[0]]) != 4:
        ctx.unsupported("a non-4-D input", "only (N, C, H, W) is supported")
    return ctx.node((ctx.act(0),), {})


def _unary(ctx: _Ctx) -> Node:
    return ctx.node((ctx.act(0),), ctx.attrs)


def _concat(ctx: _Ctx) -> Node:
    return ctx.node(tuple(ctx.act(i) for i in range(len(ctx.onode.input))), ctx.attrs)


def _shape_of(ctx: _Ctx, i: int) -> tuple[int, ...]:
    return ctx.shapes[ctx.onode.input[i]]


def _ints(ctx: _Ctx, i: int, role: str) -> tuple[int, ...]:
    """A constant integer input (shapes, axes, pads ...) as a tuple."""
    t = ctx.onode.input[i]
    if t not in ctx.consts:
        ctx.unsupported(f"non-constant {role} input {t!r}",
                        f"{role} must be an initializer or foldable to one")
    return tuple(int(v) for v in np.asarray(ctx.consts[t]).reshape(-1))


def _axes(ctx: _Ctx, rank: int, input_index: int = 1) -> tuple[int, ...] | None:
    """``axes`` from the attribute (old opsets) or the optional input (new ones)."""
    if "axes" in ctx.attrs:
        raw = tuple(ctx.attrs["axes"])
    elif ctx.has(input_index):
        raw = _ints(ctx, input_index, "axes")
    else:
        return None
    return tuple(sorted(a + rank if a < 0 else a for a in raw))


def _elementwise(ctx: _Ctx) -> Node:
    """Add/Sub/Mul/Div/Sum/Max/Min: activations in ``inputs``, at most one constant ``c``.

    ``const_at`` says where the constant stood, since Sub and Div are not symmetric."""
    n = len(ctx.onode.input)
    const_at = [i for i in range(n) if ctx.is_const(i)]
    if len(const_at) == n:
        ctx.unsupported("all-constant inputs", "nothing depends on the model input")
    if len(const_at) > 1:
        ctx.unsupported("more than one constant input", "fold the constants into one")
    params = {"c": ctx.const(const_at[0], "constant")} if const_at else {}
    acts = tuple(ctx.act(i) for i in range(n) if i not in const_at)
    return ctx.node(acts, {"const_at": const_at[0] if const_at else -1}, params)


def _prelu(ctx: _Ctx) -> Node:
    return ctx.node((ctx.act(0),), {}, {"slope": ctx.const(1, "slope")})


def _pad(ctx: _Ctx) -> Node:
    rank = len(_shape_of(ctx, 0))
    if "pads" in ctx.attrs:  # opset < 11
        pads, value = tuple(ctx.attrs["pads"]), float(ctx.attrs.get("value", 0.0))
    else:
        pads = _ints(ctx, 1, "pads")
        value = float(ctx.const(2, "constant_value").reshape(-1)[0]) if ctx.has(2) else 0.0
    axes = _axes(ctx, rank, input_index=3) if not "pads" in ctx.attrs else None
    if axes is not None:  # opset 18: pads only for ``axes``
        full = [0] * (2 * rank)
        k = len(axes)
        for j, a in enumerate(axes):
            full[a], full[rank + a] = pads[j], pads[k + j]
        pads = tuple(full)
    if len(pads) != 2 * rank:
        ctx.unsupported(f"pads of length {len(pads)}", f"need {2 * rank} for rank {rank}")
    mode = ctx.attrs.get("mode", "constant")
    if mode not in ("constant", "reflect", "edge"):
        ctx.unsupported(f"mode={mode}", "only constant, reflect and edge are supported")
    if any(p < 0 for p in pads):
        ctx.unsupported("negative pads (cropping)", "use Slice to crop")
    return ctx.node((ctx.act(0),), {"pads": pads, "mode": mode, "value": value})


def _transpose(ctx: _Ctx) -> Node:
    rank = len(_shape_of(ctx, 0))
    perm = tuple(int(p) for p in ctx.attrs.get("perm", tuple(range(rank))[::-1]))
    return ctx.node((ctx.act(0),), {"perm": perm})


def _to_shape(ctx: _Ctx) -> Node:
    """Squeeze/Unsqueeze/Reshape: a reshape to the statically inferred output shape."""
    if ctx.op == "Reshape" and not ctx.is_const(1):
        ctx.unsupported(f"non-constant shape input {ctx.onode.input[1]!r}",
                        "the target shape must be an initializer or foldable to one")
    node = ctx.node((ctx.act(0),), {"shape": tuple(ctx.shapes[ctx.onode.output[0]])})
    return node.with_(op="Reshape")


def _slice(ctx: _Ctx) -> Node:
    shape = _shape_of(ctx, 0)
    rank = len(shape)
    if "starts" in ctx.attrs:  # opset < 10
        starts, ends = tuple(ctx.attrs["starts"]), tuple(ctx.attrs["ends"])
        axes = tuple(ctx.attrs.get("axes", range(len(starts))))
        steps = (1,) * len(starts)
    else:
        starts, ends = _ints(ctx, 1, "starts"), _ints(ctx, 2, "ends")
        axes = _ints(ctx, 3, "axes") if ctx.has(3) else tuple(range(len(starts)))
        steps = _ints(ctx, 4, "steps") if ctx.has(4) else (1,) * len(starts)
    begin, end, step = [0] * rank, list(shape), [1] * rank
    for a, b, e, st in zip(axes, starts, ends, steps):
        a = a + rank if a < 0 else a
        if st <= 0:
            ctx.unsupported(f"step {st}", "only positive Slice steps are supported")
        size = shape[a]
        b = min(max(b + size if b < 0 else b, 0), size)
        e = min(max(e + size if e < 0 else e, 0), size)
        begin[a], end[a], step[a] = b, e, st
    return ctx.node((ctx.act(0),), {"begin": tuple(begin), "end": tuple(end),
                                    "step": tuple(step)}).with_(op="Slice")


def _split(ctx: _Ctx) -> list[Node]:
    """One Slice node per output: the graph stays single-output per node."""
    shape = _shape_of(ctx, 0)
    rank = len(shape)
    axis = int(ctx.attrs.get("axis", 0))
    axis = axis + rank if axis < 0 else axis
    outs = list(ctx.onode.output)
    if "split" in ctx.attrs:
        sizes = tuple(ctx.attrs["split"])
    elif ctx.has(1):
        sizes = _ints(ctx, 1, "split")
    else:  # equal parts; opset 18's num_outputs gives the last one the remainder
        k = len(outs)
        part = -(-shape[axis] // k)
        sizes = tuple(min(part, shape[axis] - i * part) for i in range(k))
    if len(sizes) != len(outs) or sum(sizes) != shape[axis]:
        ctx.unsupported(f"split sizes {sizes}", f"they must cover axis {axis} of {shape}")
    nodes, start = [], 0
    for i, (out, size) in enumerate(zip(outs, sizes)):
        begin, end = [0] * rank, list(shape)
        begin[axis], end[axis] = start, start + size
        start += size
        if not out:
            continue
        nodes.append(Node(op="Slice", name=f"{ctx.name}:{i}" if len(outs) > 1 else ctx.name,
                          inputs=(ctx.act(0),), output=out,
                          attrs={"begin": tuple(begin), "end": tuple(end),
                                 "step": (1,) * rank}))
    return nodes


def _nearest_index(out_size: int, in_size: int, scale: float, ctm: str, mode: str) -> np.ndarray:
    """ONNX Resize's input index for every output index of one axis, nearest mode."""
    o = np.arange(out_size, dtype=np.float64)
    if ctm == "half_pixel":
        x = (o + 0.5) / scale - 0.5
    elif ctm == "pytorch_half_pixel":
        x = (o + 0.5) / scale - 0.5 if out_size > 1 else np.zeros_like(o)
    elif ctm == "align_corners":
        x = o * (in_size - 1) / (out_size - 1) if out_size > 1 else np.zeros_like(o)
    elif ctm == "asymmetric":
        x = o / scale
    elif ctm == "tf_half_pixel_for_nn":
        x = (o + 0.5) / scale
    else:
        raise ValueError(ctm)
    if mode == "round_prefer_floor":
        i = np.where(x - np.floor(x) == 0.5, np.floor(x), np.round(x))
    elif mode == "round_prefer_ceil":
        i = np.where(x - np.floor(x) == 0.5, np.ceil(x), np.round(x))
    elif mode == "floor":
        i = np.floor(x)
    elif mode == "ceil":
        i = np.ceil(x)
    else:
        raise ValueError(mode)
    return np.clip(i, 0, in_size - 1).astype(np.int64)


def _resize(ctx: _Ctx) -> Node:
    """Nearest Resize/Upsample -> a gather per resized axis, indices computed here."""
    mode = ctx.attrs.get("mode", "nearest")
    if mode != "nearest":
        ctx.unsupported(f"mode={mode}", "only nearest Resize is integer-only here; "
                        "re-export with mode='nearest'")
    in_shape, out_shape = _shape_of(ctx, 0), ctx.shapes[ctx.onode.output[0]]
    ctm = ctx.attrs.get("coordinate_transformation_mode", "half_pixel")
    nmode = ctx.attrs.get("nearest_mode", "round_prefer_floor")
    if ctx.op == "Upsample":
        ctm, nmode = "asymmetric", "floor"
    if ctm == "tf_crop_and_resize":
        ctx.unsupported("coordinate_transformation_mode=tf_crop_and_resize", "not supported")
    scales: tuple[float, ...] = ()
    scale_input = 2 if ctx.op == "Resize" else 1
    if ctx.has(scale_input) and ctx.is_const(scale_input):
        scales = tuple(float(v) for v in ctx.const(scale_input, "scales").reshape(-1))
    if len(scales) != len(in_shape):
        scales = tuple(o / i for o, i in zip(out_shape, in_shape))
    idx = {}
    for a, (i_size, o_size) in enumerate(zip(in_shape, out_shape)):
        if i_size == o_size and scales[a] == 1.0:
            continue
        if a < 2 and len(in_shape) == 4:
            ctx.unsupported(f"resizing axis {a}", "only H and W may be resized")
        try:
            idx[a] = _nearest_index(o_size, i_size, scales[a], ctm, nmode)
        except ValueError as err:
            ctx.unsupported(f"mode {err}", "unknown Resize mode")
    return Node(op="Gather", name=ctx.name, inputs=(ctx.act(0),), output=ctx.onode.output[0],
                attrs={"axes": tuple(sorted(idx))},
                params={f"idx{a}": v for a, v in idx.items()})


def _reduce(ctx: _Ctx) -> Node:
    rank = len(_shape_of(ctx, 0))
    axes = _axes(ctx, rank) or tuple(range(rank))
    if ctx.attrs.get("noop_with_empty_axes", 0) and not _axes(ctx, rank):
        return ctx.node((ctx.act(0),), {}).with_(op="Identity")
    if rank != 4 or axes != (2, 3):
        ctx.unsupported(f"axes {axes}", "only reductions over H and W of (N, C, H, W) "
                                        "are supported")
    return ctx.node((ctx.act(0),), {"keepdims": bool(ctx.attrs.get("keepdims", 1))})


def _lrn(ctx: _Ctx) -> Node:
    if len(_shape_of(ctx, 0)) != 4:
        ctx.unsupported("a non-4-D input", "only (N, C, H, W) is supported")
    a = ctx.attrs
    return ctx.node((ctx.act(0),), {"size": int(a["size"]), "alpha": float(a.get("alpha", 1e-4)),
                                    "beta": float(a.get("beta", 0.75)),
                                    "bias": float(a.get("bias", 1.0))})


def _cast(ctx: _Ctx) -> Node:
    if int(ctx.attrs.get("to", 0)) != onnx.TensorProto.FLOAT:
        ctx.unsupported(f"a cast to {onnx.TensorProto.DataType.Name(ctx.attrs.get('to', 0))}",
                        "only casts to float32 inside the network are supported")
    return ctx.node((ctx.act(0),), {}).with_(op="Identity")


def _global_max(ctx: _Ctx) -> Node:
    if len(_shape_of(ctx, 0)) != 4:
        ctx.unsupported("a non-4-D input", "only (N, C, H, W) is supported")
    return ctx.node((ctx.act(0),), {"keepdims": True}).with_(op="ReduceMax")


# Unary elementwise functions with a float definition in ``activations.py``: each becomes
# a table lookup on its quantized input.
_MULTI_OUTPUT = ("Split",)

_HANDLERS: dict[str, Callable[[_Ctx], "Node | list[Node]"]] = {
    "Conv": _conv, "MaxPool": _pool, "AveragePool": _pool, "BatchNormalization": _batchnorm,
    "Clip": _clip, "Gemm": _gemm, "MatMul": _matmul, "Reshape": _to_shape,
    "Squeeze": _to_shape, "Unsqueeze": _to_shape, "Dropout": _dropout, "Concat": _concat,
    "Relu": _unary, "GlobalAveragePool": _gap, "Flatten": _unary, "Softmax": _unary,
    "Identity": _unary, "Add": _elementwise, "Sub": _elementwise, "Mul": _elementwise,
    "Div": _elementwise, "Sum": _elementwise, "Max": _elementwise, "Min": _elementwise,
    "PRelu": _prelu, "Pad": _pad, "Transpose": _transpose, "Slice": _slice, "Split": _split,
    "Resize": _resize, "Upsample": _resize, "ReduceMean": _reduce, "ReduceSum": _reduce,
    "ReduceMax": _reduce, "GlobalMaxPool": _global_max, "LRN": _lrn, "Cast": _cast,
    **{op: _unary for op in UNARY_FUNCTIONS},
}
SUPPORTED_OPS: frozenset[str] = frozenset(_HANDLERS)

# What each supported op becomes inside the integer core (README's table is made from this).
_LUT = "table lookup (256 entries at 8 bits, 16 at 4), built from the float function"
LOWERED_AS: dict[str, str] = {
    "Conv": "VNNI implicit GEMM / depthwise kernel, dyadic requant epilogue",
    "Gemm": "VNNI dense kernel", "MatMul": "VNNI dense kernel (constant 2-D right operand)",
    "BatchNormalization": "folded into the conv before it, else a per-channel dyadic affine",
    "Relu": "fused as output bounds, else an integer clip", "Clip": "same as Relu",
    "Add": "dyadic sum with broadcasting; with a constant: folded into the bias or a dyadic "
           "affine",
    "Sub": "same as Add, negative multiplier", "Sum": "n-ary dyadic sum",
    "Mul": "int16 product x dyadic multiplier (squeeze-excitation); x * f(x) fuses into one "
           "table; with a constant: dyadic affine",
    "Div": "by a constant only: dyadic affine", "Max": "with a scalar constant: clip",
    "Min": "with a scalar constant: clip", "PRelu": "per-channel table lookup",
    "MaxPool": "vectorized window max", "AveragePool": "window sum x dyadic factor",
    "GlobalAveragePool": "global sum x dyadic factor", "GlobalMaxPool": "window max",
    "ReduceMean": "over H, W: global sum x dyadic factor",
    "ReduceSum": "over H, W: global sum x dyadic factor", "ReduceMax": "over H, W: window max",
    "LRN": "integer sum of squares, dyadic table for the power",
    "Pad": "constant: integer pad (zero pads fold into the next conv); reflect/edge: gather",
    "Transpose": "integer permute (folds into neighbouring layout changes)",
    "Reshape": "reshape (the batch axis must stay)", "Flatten": "reshape",
    "Squeeze": "reshape", "Unsqueeze": "reshape", "Slice": "strided slice (positive steps)",
    "Split": "one strided slice per output", "Concat": "dyadic requant per input, concat",
    "Resize": "nearest: a gather of precomputed indices", "Upsample": "as Resize",
    "Softmax": "last node only, in float after dequantize", "Identity": "removed",
    "Dropout": "removed (inference mode)", "Cast": "to float32 only: removed",
    **{op: _LUT for op in UNARY_FUNCTIONS},
}
assert set(LOWERED_AS) == SUPPORTED_OPS, "document every supported op"


def ops_table() -> str:
    """The supported-ops table in Markdown, one row per ONNX op."""
    rows = ["| ONNX op | inside the integer core |", "| --- | --- |"]
    rows += [f"| `{op}` | {LOWERED_AS[op]} |" for op in sorted(SUPPORTED_OPS)]
    return "\n".join(rows) + "\n"
