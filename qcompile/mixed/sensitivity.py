"""Per-layer, per-bit-width sensitivity Omega_l(b): what the bit allocator minimizes.

Two methods, both on the canonical (BN-folded) float graph, so the weights they
perturb are exactly the ones ``quantize.py`` quantizes:

- ``hessian`` (HAWQ-V3): ``Omega_l(b) = max(Tr H_l, 0) / n_l * ||Q_b(W_l) - W_l||^2``.
  ``Tr H_l`` (Hessian of the cross-entropy w.r.t. W_l) is Hutchinson's estimate
  ``E[v_l . (H v)_l]`` with one Rademacher ``v`` over all layers per probe; ``H v``
  is a finite difference of float64 Relax gradients (``relax_float``), since TVM
  has no forward-mode or double-backward.  The step is tiny (1e-9 of the weight
  RMS) so that almost no ReLU or max-pool switches inside it: like autograd's
  Hessian-vector product, this measures the curvature of the current linear
  piece (larger steps pick up kinks, which showed up as 10-100x noisier probes
  on ResNet-18).  A non-positive trace means the second-order model predicts no
  loss increase, hence Omega 0.  It needs every op expressible with Relax gradients
  and 2-D logits (``relax_float``); where either is missing, ``compute_sensitivity``
  falls back to ``kl`` with a one-line warning.
- ``kl``: forward-only.  Quantize only W_l to b bits and measure the mean
  ``KL(softmax(float logits) || softmax(perturbed logits))`` in onnxruntime on an
  ONNX export of the canonical graph whose weights are graph inputs (every canonical
  op, table functions as their ONNX ops; the softmax is over axis 1, averaged over
  any further axes of a non-2-D output).

Results are cached as JSON under ``$QCOMPILE_CACHE_DIR/sensitivity`` (default
``~/.cache/qcompile/sensitivity``), keyed by the model bytes, the data and the
method's settings.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from tqdm import tqdm

from qcompile import env, files
from qcompile.errors import DataError, UnsupportedOpError, UsageError
from qcompile.ir.graph import Graph
from qcompile.quant.quantize import quantize_weights
from qcompile.frontend.onnx_export import canonical_onnx
from qcompile.ir.graph import layer_nodes
from qcompile.mixed.float_model import FloatVM, build_float_module
from qcompile.quant.rounding import Rounding, rounding_of

METHODS: tuple[str, ...] = ("hessian", "kl")
CACHE_FORMAT = 1  # bump when a method's numbers change meaning
MIN_PROBES = 4
KL_CHUNK = 32  # samples per onnxruntime call
REL_EPS = 1e-9  # finite-difference step, relative to each layer's weight RMS (float64)


@dataclass(frozen=True)
class Sensitivity:
    """Per-layer sensitivities; ``omega[layer][bits]`` is what the allocator sums."""

    method: str                           # "hessian" | "kl"
    omega: dict[str, dict[int, float]]    # layer name -> bits -> Omega
    trace: dict[str, float]               # Hutchinson Tr(H_l) (hessian; {} for kl)
    stderr: dict[str, float]              # relative std error of the trace (hessian)
    probes: int                           # Hutchinson probes used (0 for kl)
    num_samples: int
    cached: bool = False
    settings: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict:
        """JSON-safe dict (bit widths become string keys)."""
        d = asdict(self)
        d["omega"] = {k: {str(b): v for b, v in om.items()} for k, om in self.omega.items()}
        return d

    @classmethod
    def from_json(cls, d: dict, cached: bool = False) -> "Sensitivity":
        omega = {k: {int(b): float(v) for b, v in om.items()} for k, om in d["omega"].items()}
        return cls(d["method"], omega, dict(d["trace"]), dict(d["stderr"]), int(d["probes"]),
                   int(d["num_samples"]), cached, dict(d.get("settings", {})))


# --- weights -------------------------------------------------------------------------
def fake_quant(w: np.ndarray, bits: int) -> np.ndarray:
    """Q_b(W) = q * scale, per-output-channel symmetric, as ``quantize_weights``."""
    if bits <= 8:
        q, s = quantize_weights(w, bits)
    else:  # quantize_weights stores int8; wider widths (tests, "almost float") here
        qmax = (1 << (bits - 1)) - 1
        amax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1).astype(np.float64)
        s = np.where(amax > 0, amax / qmax, 1.0)
        q = np.clip(np.round(w / s.reshape((-1,) + (1,) * (w.ndim - 1))), -qmax, qmax)
    return (q.astype(np.float64) * s.reshape((-1,) + (1,) * (w.ndim - 1))).astype(w.dtype)


def quant_error(w: np.ndarray, bits: int) -> float:
    """||Q_b(W) - W||^2."""
    d = fake_quant(w, bits).astype(np.float64) - w.astype(np.float64)
    return float((d * d).sum())


# --- data ----------------------------------------------------------------------------
def _chunks(n: int, batch: int) -> list[slice]:
    return [slice(i, min(i + batch, n)) for i in range(0, n, batch)]


def _pad(a: np.ndarray, batch: int) -> np.ndarray:
    """Zero-pad axis 0 to ``batch`` (the static batch the Relax module was built for)."""
    if len(a) == batch:
        return a
    return np.concatenate([a, np.zeros((batch - len(a),) + a.shape[1:], a.dtype)])


def _check_data(graph: Graph, inputs: np.ndarray, labels: np.ndarray | None) -> None:
    want = tuple(graph.input_shape[1:])
    if inputs.ndim != len(graph.input_shape) or tuple(inputs.shape[1:]) != want or not len(inputs):
        raise DataError(f"sensitivity data must be (N, {', '.join(map(str, want))}) with N >= 1; "
                        f"got {tuple(inputs.shape)}")
    if labels is not None and (labels.shape != (len(inputs),) or labels.dtype.kind not in "iu"):
        raise DataError(f"labels must be ({len(inputs)},) integers; "
                        f"got {labels.shape} {labels.dtype}")


# --- hessian -------------------------------------------------------------------------
class GradOracle:
    """Mean cross-entropy gradients over a fixed data set, chunked at a static batch."""

    def __init__(self, graph: Graph, inputs: np.ndarray, labels: np.ndarray | None,
                 batch_size: int = 8, dtype: str = "float64") -> None:
        self.batch = min(batch_size, len(inputs))
        self.dtype = dtype
        self.vm = FloatVM(build_float_module(graph, self.batch, dtype=dtype))
        self.weights = list(self.vm.fm.weights)
        self.x = inputs.astype(dtype)
        self._g0: list[np.ndarray] | None = None  # gradient at W, for forward differences
        # No labels: the float model's own predictions (HAWQ needs none).
        self.labels = (np.asarray(labels, np.int64) if labels is not None
                       else self.logits().argmax(axis=1).astype(np.int64))

    def logits(self, weights: Sequence[np.ndarray] | None = None) -> np.ndarray:
        out = [self.vm.forward(_pad(self.x[s], self.batch), weights)[: s.stop - s.start]
               for s in _chunks(len(self.x), self.batch)]
        return np.concatenate(out)

    def grad(self, weights: Sequence[np.ndarray]) -> list[np.ndarray]:
        """d/dW of the mean loss over all samples (float64 accumulation)."""
        total = [np.zeros(w.shape, np.float64) for w in weights]
        for s in _chunks(len(self.x), self.batch):
            k = s.stop - s.start
            sw = _pad(np.full(k, 1.0 / len(self.x), self.dtype), self.batch)  # pads weigh 0
            _, gs = self.vm.loss_and_grad(_pad(self.x[s], self.batch),
                                          _pad(self.labels[s], self.batch), sw, weights)
            for t, g in zip(total, gs):
                t += g
        return total

    def steps(self) -> list[float]:
        """Per-layer finite-difference step: REL_EPS of the weight RMS."""
        return [REL_EPS * max(float(np.sqrt(np.mean(np.square(w, dtype=np.float64)))), 1e-8)
                for w in self.weights]

    def hvp_blocks(self, v: Sequence[np.ndarray], central: bool = False) -> list[np.ndarray]:
        """``(H D v)_l / eps_l`` with D = diag(eps): a per-layer step keeps v_l.(.)_l
        an unbiased Tr(H_ll) sample, since the cross terms still have zero mean.

        In float64 a forward difference (truncation error ~ REL_EPS) is as good as a
        central one for a trace, at one gradient per probe instead of two.
        """
        eps = self.steps()
        plus = [(w + e * vi).astype(self.dtype) for w, e, vi in zip(self.weights, eps, v)]
        if central:
            minus = [(w - e * vi).astype(self.dtype) for w, e, vi in zip(self.weights, eps, v)]
            gp, gm = self.grad(plus), self.grad(minus)
            return [(a - b) / (2 * e) for a, b, e in zip(gp, gm, eps)]
        if self._g0 is None:
            self._g0 = self.grad(self.weights)
        return [(a - b) / e for a, b, e in zip(self.grad(plus), self._g0, eps)]


def hutchinson(oracle: GradOracle, *, max_probes: int, tol: float, seed: int,
               progress: bool, central: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-layer (trace, relative std error, probes) until every stderr < tol."""
    rng = np.random.default_rng(seed)
    L = len(oracle.weights)
    s1, s2 = np.zeros(L), np.zeros(L)
    k = 0
    with tqdm(total=max_probes, desc="hessian trace", unit="probe", disable=not progress) as bar:
        while k < max_probes:
            v = [rng.integers(0, 2, size=w.shape) * 2.0 - 1.0 for w in oracle.weights]
            hv = oracle.hvp_blocks(v, central)
            est = np.array([float((vi * h).sum()) for vi, h in zip(v, hv)])
            s1, s2, k = s1 + est, s2 + est * est, k + 1
            rel = _rel_stderr(s1, s2, k)
            bar.update(1)
            bar.set_postfix(worst_stderr=f"{float(rel.max()):.3f}")
            if k >= MIN_PROBES and bool(np.all(rel < tol)):
                break
    return s1 / k, _rel_stderr(s1, s2, k), k


def _rel_stderr(s1: np.ndarray, s2: np.ndarray, k: int) -> np.ndarray:
    if k < 2:  # no spread from one probe
        return np.full_like(s1, np.inf)
    mean = s1 / k
    var = np.maximum(s2 / k - mean * mean, 0.0) * k / (k - 1)
    se = np.sqrt(var / k)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.abs(mean) > 0, se / np.abs(mean), np.inf)


def hessian_omega(graph: Graph, trace: dict[str, float], bits: Sequence[int]
                  ) -> dict[str, dict[int, float]]:
    """HAWQ-V3's Omega from per-layer traces (cheap: no model runs)."""
    out: dict[str, dict[int, float]] = {}
    for n in layer_nodes(graph):
        w = n.params["w"]
        out[n.name] = {b: max(trace[n.name], 0.0) / w.size * quant_error(w, b) for b in bits}
    return out


# --- kl ------------------------------------------------------------------------------
def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.reshape(len(z), z.shape[1], -1).astype(np.float64)  # classes on axis 1
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _rounded_layers(rounding: Rounding, graph: Graph, inputs: np.ndarray, bits: Sequence[int]
                    ) -> dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] | None:
    """Per width, every layer's weights and bias as ``rounding`` makes them, each rounded on
    the float model's input (one layer quantized at a time, as KL measures it); None when
    the method is round-to-nearest (``fake_quant`` is that, with the float bias)."""
    names = [n.name for n in layer_nodes(graph)]
    out: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for b in bits:
        g, rounded = rounding.round_graph(graph, inputs, {n: b for n in names}, sequential=False)
        if rounded is None:
            return None
        bias = {n.name: n.params["b"] for n in g.nodes if n.name in rounded}
        out[b] = {k: ((q * s.reshape((-1,) + (1,) * (q.ndim - 1))).astype(np.float32),
                      np.asarray(bias[k], np.float32)) for k, (q, s) in rounded.items()}
    return out


def _biases_as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """The canonical export with every layer bias (``<layer>::b``) a graph input."""
    biases = [t for t in model.graph.initializer if t.name.endswith("::b")]
    for t in biases:
        model.graph.input.append(helper.make_tensor_value_info(t.name, TensorProto.FLOAT,
                                                               list(t.dims)))
    keep = [t for t in model.graph.initializer if not t.name.endswith("::b")]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return model


def kl_omega(graph: Graph, inputs: np.ndarray, bits: Sequence[int], progress: bool,
             rounding: str = "nearest") -> dict[str, dict[int, float]]:
    """Mean KL(float || only-layer-l-quantized) per layer and bit width.

    ``rounding`` (a name in ``quant.rounding.ROUNDINGS``) quantizes the layer as compile's
    ``--rounding`` will (``gptq``: GPTQ with its bias correction, on the float input): GPTQ
    changes which layers 4 bits hurt (a depthwise layer's error is mostly a mean shift
    that its bias absorbs), so a plan for GPTQ-rounded weights should be ranked by
    GPTQ-rounded sensitivities."""
    sess = ort.InferenceSession(_biases_as_inputs(canonical_onnx(graph)).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    layers = layer_nodes(graph)
    feeds = {f"{n.name}::w": np.asarray(n.params["w"], np.float32) for n in layers}
    feeds |= {f"{n.name}::b": np.asarray(n.params["b"], np.float32) for n in layers}
    gq = _rounded_layers(rounding_of(rounding), graph, inputs.astype(np.float32), bits)
    x = inputs.astype(np.float32)

    def logp(f: dict[str, np.ndarray]) -> np.ndarray:
        # Chunks bound activation memory; onnxruntime's batch dimension is free.
        return np.concatenate([_log_softmax(sess.run(None, {graph.input: x[s], **f})[0])
                               for s in _chunks(len(x), KL_CHUNK)])

    ref = logp(feeds)
    p = np.exp(ref)
    out: dict[str, dict[int, float]] = {}
    with tqdm(total=len(layers) * len(bits), desc="kl sensitivity", unit="run",
              disable=not progress) as bar:
        for n in layers:
            out[n.name] = {}
            for b in bits:
                if gq is None:
                    f = {f"{n.name}::w": fake_quant(feeds[f"{n.name}::w"], b)}
                else:
                    w, bias = gq[b][n.name]
                    f = {f"{n.name}::w": w, f"{n.name}::b": bias}
                q = logp(feeds | f)
                kl = (p * (ref - q)).sum(axis=1).mean()  # sum over classes, mean over rest
                out[n.name][b] = max(float(kl), 0.0)  # rounding can dip a hair below 0
                bar.update(1)
    return out


# --- cache ---------------------------------------------------------------------------
def cache_root(cache_dir: Path | None = None) -> Path:
    """``cache_dir``, else ``$QCOMPILE_CACHE_DIR/sensitivity``, else ``~/.cache/qcompile/...``."""
    return Path(cache_dir) if cache_dir is not None else env.cache_dir("sensitivity")


def data_hash(inputs: np.ndarray, labels: np.ndarray | None) -> str:
    """sha256 of the data as the methods see it (float32 inputs, int64 labels)."""
    h = hashlib.sha256()
    for a, dtype in ((inputs, np.float32), (labels, np.int64)):
        if a is not None:
            a = np.ascontiguousarray(a, dtype=dtype)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        h.update(b"|")
    return h.hexdigest()


def _cache_key(model_bytes: bytes, inputs: np.ndarray, labels: np.ndarray | None,
               settings: dict[str, object]) -> str:
    blob = json.dumps({"format": CACHE_FORMAT, "model": hashlib.sha256(model_bytes).hexdigest(),
                       "data": data_hash(inputs, labels), **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# --- public API ----------------------------------------------------------------------
def compute_sensitivity(graph: Graph, model_bytes: bytes, inputs: np.ndarray,
                        labels: np.ndarray | None = None, *, method: str = "hessian",
                        bits: tuple[int, ...] = (4, 8), max_probes: int = 64, tol: float = 0.05,
                        seed: int = 0, batch_size: int = 8, central: bool = False,
                        cache_dir: Path | None = None, progress: bool = True,
                        fallback: bool = True, rounding: str = "nearest") -> Sensitivity:
    """Omega_l(b) for every conv/dense layer of ``graph`` and every width in ``bits``.

    ``graph`` is the prepared (canonical) graph of ``model_bytes``; ``inputs`` is
    (N, *graph.input_shape[1:]); ``labels`` (N,) are used by ``hessian`` when given
    (else the float model's own argmax).  ``hessian`` runs Hutchinson probes until
    every layer's relative std error is below ``tol`` (at least MIN_PROBES, at most
    ``max_probes``), with ``batch_size`` samples per compiled gradient call, and
    one gradient per probe (forward difference) or two with ``central``.

    A graph the Hessian cannot be taken of (an op without a Relax gradient, outputs
    that are not 2-D logits) falls back to ``kl`` with a one-line warning when
    ``fallback``; without it the ``UnsupportedOpError`` propagates.

    ``rounding`` (``quant.rounding``; ``"gptq"``: GPTQ) is how ``kl`` quantizes each layer
    (``kl_omega``); the Hessian's Omega stays HAWQ-V3's (trace times the nearest-rounding
    error).
    """
    if method not in METHODS:
        raise UsageError(f"--sensitivity must be one of {METHODS}, got {method!r}")
    if not bits or any(not 2 <= int(b) <= 16 for b in bits):
        raise UsageError(f"sensitivity bit widths must be in [2, 16], got {bits}")
    if method == "hessian" and (max_probes < MIN_PROBES or not 0 < tol < 1):
        raise UsageError(f"need max_probes >= {MIN_PROBES} and 0 < tol < 1")
    bits = tuple(sorted({int(b) for b in bits}))
    inputs = np.asarray(inputs)
    labels = None if labels is None else np.asarray(labels)
    _check_data(graph, inputs, labels)
    if method == "kl":  # labels play no part in KL
        settings: dict[str, object] = {"method": "kl", "bits": list(bits)}
        if rounding_of(rounding).keyed:  # (absent for nearest: older cache entries stay valid)
            settings["rounding"] = rounding
        labels = None
    else:  # bits are not in the key: Omega is recomputed from the cached trace
        settings = {"method": "hessian", "max_probes": max_probes, "tol": tol, "seed": seed,
                    "min_probes": MIN_PROBES, "batch_size": batch_size, "rel_eps": REL_EPS,
                    "central": central}
    path = cache_root(cache_dir) / f"{_cache_key(model_bytes, inputs, labels, settings)}.json"
    hit = files.read_json(path)  # missing or corrupt: recompute (and rewrite it)
    if isinstance(hit, dict) and "omega" in hit:
        s = Sensitivity.from_json(hit, cached=True)
        if method == "kl":
            return s
        return Sensitivity(s.method, hessian_omega(graph, s.trace, bits), s.trace, s.stderr,
                           s.probes, s.num_samples, True, s.settings)
    if method == "kl":
        res = Sensitivity("kl", kl_omega(graph, inputs, bits, progress, rounding), {}, {}, 0,
                          len(inputs), False, settings)
    else:
        try:
            oracle = GradOracle(graph, inputs, labels, batch_size)
        except UnsupportedOpError as e:
            if not fallback:
                raise
            why = str(e).split("; use --sensitivity kl")[0]
            warnings.warn(f"hessian sensitivity refused ({why}); using kl (forward-only) instead",
                          stacklevel=2)
            return compute_sensitivity(graph, model_bytes, inputs, None, method="kl", bits=bits,
                                       cache_dir=cache_dir, progress=progress, rounding=rounding)
        tr, se, k = hutchinson(oracle, max_probes=max_probes, tol=tol, seed=seed,
                               progress=progress, central=central)
        names = oracle.vm.fm.layers
        trace = {n: float(t) for n, t in zip(names, tr)}
        stderr = {n: float(s) for n, s in zip(names, se)}
        res = Sensitivity("hessian", hessian_omega(graph, trace, bits), trace, stderr, k,
                          len(inputs), False, settings)
    bad = [name for name, om in res.omega.items() if not np.all(np.isfinite(list(om.values())))]
    if bad:  # e.g. a Log/Sqrt/Reciprocal table function of a value <= 0 in the float model
        raise DataError(f"{res.method} sensitivity is not finite for layer(s) {bad[:3]}: the "
                        "float model produces NaN/Inf on the sensitivity data")
    files.save_cache(path, res.to_json())
    return res
