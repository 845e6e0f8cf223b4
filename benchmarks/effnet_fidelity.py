"""EfficientNet-Lite0 INT8 fidelity: qcompile beside onnxruntime's static INT8.

    python tools/export_efficientnet.py -o models/efficientnet_lite0.onnx   # needs the models extra
    python benchmarks/effnet_fidelity.py --model models/efficientnet_lite0.onnx

Natural images come from scikit-image's data and Debian's opencv-doc examples.
Each image gives five 224-px crops (centre and four corners after a bicubic
short-side resize to 256, normalised (RGB - 127) / 128).  Images alternate
between a calibration split and an evaluation split, so no evaluated crop was
seen in calibration; both compilers calibrate on the same crops.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import bench_common as bc  # noqa: E402
from peers import ort_int8, ort_runner  # noqa: E402

from qcompile import api  # noqa: E402
from qcompile.config import CalibSpec, Preprocess  # noqa: E402

OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")


def natural_images() -> list[np.ndarray]:
    """RGB uint8 images of at least 224 px from packages installed offline."""
    imgs = []
    try:
        import skimage.data as sd
        for name in ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "hubble_deep_field",
                     "immunohistochemistry", "retina", "colorwheel", "logo", "cat", "page"):
            f = getattr(sd, name, None)
            if f is not None:
                a = f()
                imgs.append(a if isinstance(a, np.ndarray) else a[0])
    except ImportError:
        pass
    for p in sorted(OPENCV_DATA.glob("*.jpg")) + sorted(OPENCV_DATA.glob("*.png")):
        try:
            imgs.append(np.asarray(Image.open(p).convert("RGB")))
        except OSError:
            continue
    out = []
    for a in imgs:
        if a.ndim == 2:
            a = np.stack([a] * 3, -1)
        a = a[..., :3]
        if min(a.shape[:2]) >= 64:
            out.append(np.ascontiguousarray(a.astype(np.uint8)))
    return out


def five_crops(rgb: np.ndarray, size: int = 224, short: int = 256) -> np.ndarray:
    img = Image.fromarray(rgb)
    w, h = img.size
    s = short / min(w, h)
    img = img.resize((max(short, round(w * s)), max(short, round(h * s))), Image.Resampling.BICUBIC)
    a = (np.asarray(img, np.float32) - 127.0) / 128.0
    H, W = a.shape[:2]
    offs = [((H - size) // 2, (W - size) // 2), (0, 0), (0, W - size), (H - size, 0), (H - size, W - size)]
    return np.stack([a[t:t + size, l:l + size].transpose(2, 0, 1) for t, l in offs])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("models/efficientnet_lite0.onnx"))
    ap.add_argument("--calibrator", default="minmax")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    imgs = natural_images()
    crops = [five_crops(a) for a in imgs]
    calib = np.concatenate(crops[0::2]).astype(np.float32)
    evals = np.concatenate(crops[1::2]).astype(np.float32)
    print(f"{len(imgs)} images -> {len(calib)} calibration crops, {len(evals)} evaluation crops")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "calib").mkdir()
        np.save(d / "calib" / "crops.npy", calib)
        spec = CalibSpec(source=str(d / "calib"), method=args.calibrator, num_samples=len(calib),
                         preprocess=Preprocess(size=224, resize=256, mean=(127 / 255,) * 3,
                                               std=(128 / 255,) * 3))
        api.compile_model(args.model, d / "art", calib=spec, progress=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = api.evaluate(args.model, d / "art", inputs=evals, progress=True)
        fp32 = ort_runner(args.model)
        q8 = ort_runner(ort_int8(args.model, d / "ort-int8.onnx", calib))
        ref = np.concatenate([fp32(evals[i:i + 8]) for i in range(0, len(evals), 8)])
        peer = np.concatenate([q8(evals[i:i + 8]) for i in range(0, len(evals), 8)])
    noise = ((ref - peer) ** 2).sum()
    res = {"images": len(imgs), "eval_crops": len(evals), "calib_crops": len(calib),
           "calibrator": args.calibrator,
           "qcompile_int8": {"top1_agreement": ours.top1_agreement, "sqnr_db": ours.sqnr_db,
                             "bit_exact": ours.bit_exact, "integer_only": ours.integer_only},
           "ort_int8_qdq": {"top1_agreement": float((ref.argmax(1) == peer.argmax(1)).mean()),
                            "sqnr_db": float(10 * np.log10((ref ** 2).sum() / noise))}}
    res["provenance"] = bc.provenance(ort_threads=f"{os.cpu_count()} (peers.ort_runner, spinning off)")
    print(json.dumps(res, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"effnet-lite0-fidelity-{args.calibrator}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
