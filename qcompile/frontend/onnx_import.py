"""Load, check and shape-infer an ONNX file, then turn it into a ``Graph`` of ONNX ops.

Two steps, both refusing anything qcompile cannot lower with one actionable line:

* ``load_model`` reads a file (never writing it), refuses hostile external data,
  runs the full checker, converts to opset 17 and infers shapes strictly.
* ``import_onnx`` fixes a symbolic batch dimension, re-infers static shapes and
  builds ``Node``s that keep their ONNX ``op_type`` through the handlers of the op
  registry (``qcompile.ops.ONNX_OPS``); constants move to ``params`` by role and window
  ops get explicit ``pads`` with ``auto_pad`` and ``ceil_mode`` resolved.  ``prepare``
  canonicalises.
"""
from __future__ import annotations

import math
import os
import tempfile
from typing import Any, Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import external_data_helper, helper, numpy_helper, shape_inference, version_converter

from qcompile.errors import BadModelError, UnsupportedOpError, UsageError
from qcompile.errors import error_line
from qcompile.ir.graph import Graph, Node
from qcompile.frontend.onnx_ops import _Ctx, imported
from qcompile.ops import LOWERED_AS, ONNX_OPS, SUPPORTED_OPS, ops_table

__all__ = ["load_model", "import_onnx", "SUPPORTED_OPS", "LOWERED_AS", "ops_table"]

TARGET_OPSET = 17
MIN_OPSET = 7
MAX_INPUT_ELEMENTS = 1 << 28  # 256 Mi input values: far beyond any image batch
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16)
_DEFAULT_DOMAINS = ("", "ai.onnx")
_CONTROL_FLOW = ("If", "Loop", "Scan")


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
        raise BadModelError(f"{path}: not a readable ONNX model ({error_line(err)}); "
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
        raise BadModelError(f"{path}: cannot read external data ({error_line(err)}); "
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
        raise BadModelError(f"{path}: fails the ONNX checker: {error_line(err)}") from None
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
                                f"({error_line(err)}); re-export the model") from None
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
                                f"({error_line(err)}); check it with onnx.checker and "
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
            f"{path}: cannot convert opset {version} to {TARGET_OPSET} ({error_line(err)}); "
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
        raise BadModelError(f"{source}: shape inference failed: {error_line(err)}") from None
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
        entry = ONNX_OPS.get(onode.op_type)
        if entry is None:
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
            if extra in used and not entry.multi_output:
                ctx.unsupported(f"output {extra!r}", "only the first output may be used")
        nodes.extend(imported(entry, ctx))
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
