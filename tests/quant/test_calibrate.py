"""Tests for qcompile.quant.calibrate: readers, preprocessing, observers, float collection."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from qcompile.quant.calibrate import (
    OBSERVERS, FloatRunner, MinMaxObserver, MSEObserver, PercentileObserver, collect_stats,
    run_float, to_stats)
from qcompile.quant.readers import (
    ImageDirReader, NpyDirReader, SyntheticReader, load_inputs, make_reader, preprocess_image)
from qcompile.config import CalibSpec, Preprocess
from qcompile.errors import BadModelError, DataError

pytestmark = pytest.mark.unit

SHAPE = (1, 3, 4, 4)


def _drain(reader) -> list[np.ndarray]:
    out = []
    while (b := reader.get_next()) is not None:
        out.append(b["x"])
    return out


# ----------------------------------------------------------------------------- tiny model

def _tiny_model(batch: int | str = "N", seed: int = 0) -> tuple[onnx.ModelProto, dict]:
    """x (B,3,4,4) -> Conv1x1 -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> y (B,2)."""
    rng = np.random.default_rng(seed)
    w = {"cw": rng.standard_normal((5, 3, 1, 1)).astype(np.float32),
         "cb": rng.standard_normal(5).astype(np.float32),
         "gw": rng.standard_normal((2, 5)).astype(np.float32),
         "gb": rng.standard_normal(2).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["conv"]),
             helper.make_node("Relu", ["conv"], ["relu"]),
             helper.make_node("GlobalAveragePool", ["relu"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"]),
             helper.make_node("Gemm", ["flat", "gw", "gb"], ["y"], transB=1)]
    g = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 2])],
        [numpy_helper.from_array(v, k) for k, v in w.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m, w


def _numpy_tiny(x: np.ndarray, w: dict) -> dict[str, np.ndarray]:
    conv = np.einsum("nchw,oc->nohw", x, w["cw"][:, :, 0, 0]) + w["cb"][None, :, None, None]
    relu = np.maximum(conv, 0)
    flat = relu.mean(axis=(2, 3))
    return {"conv": conv, "relu": relu, "gap": flat[:, :, None, None], "flat": flat,
            "y": flat @ w["gw"].T + w["gb"]}


# ----------------------------------------------------------------------------- readers

def test_npy_reader_samples_batches_order_and_limit(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((3, 4, 4)).astype(np.float64)  # one sample, cast to f32
    b = rng.standard_normal((4, 3, 4, 4)).astype(np.float32)  # a batch of 4
    np.save(tmp_path / "b.npy", b)
    np.save(tmp_path / "a.npy", a)
    r = make_reader(CalibSpec(str(tmp_path), num_samples=4, batch_size=3), "x", SHAPE)
    assert isinstance(r, NpyDirReader) and len(r) == 4
    got = _drain(r)
    assert [g.shape[0] for g in got] == [3, 1] and all(g.dtype == np.float32 for g in got)
    want = np.concatenate([a[None], b[:3]]).astype(np.float32)
    np.testing.assert_array_equal(np.concatenate(got), want)
    r.rewind()
    np.testing.assert_array_equal(_drain(r)[0], got[0])


def test_npz_reader_uses_sorted_keys(tmp_path: Path) -> None:
    z, y = np.full((3, 4, 4), 2.0), np.ones((2, 3, 4, 4))
    np.savez(tmp_path / "d.npz", zz=z, aa=y)
    r = make_reader(CalibSpec(str(tmp_path / "d.npz"), batch_size=8), "x", SHAPE)
    (batch,) = _drain(r)
    assert batch.shape == (3, 3, 4, 4)
    np.testing.assert_array_equal(batch[:, 0, 0, 0], [1.0, 1.0, 2.0])


def test_npy_wrong_shape_names_file_and_shapes(tmp_path: Path) -> None:
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 5, 5), np.float32))
    with pytest.raises(DataError) as e:
        make_reader(CalibSpec(str(tmp_path)), "x", SHAPE)
    msg = str(e.value)
    assert "bad.npy" in msg and "(3, 4, 4)" in msg and "(2, 3, 5, 5)" in msg and "\n" not in msg


def test_missing_empty_and_mixed_sources_raise(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        make_reader(CalibSpec(str(tmp_path / "nope")), "x", SHAPE)
    with pytest.raises(DataError, match="no .npy/.npz"):
        make_reader(CalibSpec(str(tmp_path)), "x", SHAPE)
    np.save(tmp_path / "a.npy", np.zeros((3, 4, 4)))
    Image.new("RGB", (4, 4)).save(tmp_path / "b.png")
    with pytest.raises(DataError, match="both"):
        make_reader(CalibSpec(str(tmp_path)), "x", SHAPE)


def test_synthetic_warns_and_is_seeded() -> None:
    with pytest.warns(UserWarning, match="--data DIR"):
        r = make_reader(CalibSpec("synthetic", num_samples=5, batch_size=2, seed=3), "x", SHAPE)
    assert isinstance(r, SyntheticReader) and len(r) == 5
    first = _drain(r)
    assert [b.shape for b in first] == [(2, 3, 4, 4), (2, 3, 4, 4), (1, 3, 4, 4)]
    r.rewind()
    np.testing.assert_array_equal(np.concatenate(_drain(r)), np.concatenate(first))
    with pytest.raises(DataError, match="symbolic"):
        SyntheticReader("x", (1, 3, 0, 0), 2)


def _rgb(h: int, w: int) -> np.ndarray:
    return (np.arange(h * w * 3).reshape(h, w, 3) * 5 % 256).astype(np.uint8)


def test_preprocess_by_hand_crop_scale_normalise() -> None:
    px = _rgb(4, 6)  # already short side 4: no resize, crop columns 1..4
    p = Preprocess(size=4, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    out = preprocess_image(Image.fromarray(px), p)
    assert out.shape == (3, 4, 4) and out.dtype == np.float32
    for c, (m, s) in enumerate(zip(p.mean, p.std)):
        want = (px[:, 1:5, c] / 255.0 - m) / s
        np.testing.assert_allclose(out[c], want, rtol=1e-6, atol=1e-6)
    # one pixel by hand: row 0, column 1 of the image, red channel = 3*5 = 15
    assert out[0, 0, 0] == pytest.approx((15 / 255 - 0.5) / 0.5, abs=1e-6)
    nhwc = preprocess_image(Image.fromarray(px), Preprocess(size=4, layout="NHWC", scale01=False,
                                                            mean=(0, 0, 0), std=(1, 1, 1)))
    np.testing.assert_array_equal(nhwc, px[:, 1:5].astype(np.float32))


def test_preprocess_resize_grayscale_and_rgba() -> None:
    flat = Image.new("RGBA", (16, 8), (200, 100, 50, 7))  # constant: bicubic keeps it
    out = preprocess_image(flat, Preprocess(size=4, resize=6))
    assert out.shape == (3, 4, 4)
    for c, v in enumerate((200, 100, 50)):
        np.testing.assert_allclose(out[c], (v / 255 - Preprocess().mean[c]) / Preprocess().std[c],
                                   rtol=1e-5)
    g = preprocess_image(Image.new("L", (5, 5), 51), Preprocess(size=4, grayscale=True,
                                                                 mean=(0.1,), std=(0.5,)))
    assert g.shape == (1, 4, 4)
    np.testing.assert_allclose(g, (0.2 - 0.1) / 0.5, rtol=1e-5)
    # a real resize follows Pillow's bicubic with torchvision's short-side/crop arithmetic
    img = Image.fromarray(_rgb(10, 20))
    ref = np.asarray(img.resize((10, 5), Image.Resampling.BICUBIC).crop((3, 0, 7, 4)), np.float32)
    out = preprocess_image(img, Preprocess(size=4, resize=5, scale01=False, mean=(0, 0, 0),
                                           std=(1, 1, 1)))
    np.testing.assert_array_equal(out, ref.transpose(2, 0, 1))


def test_image_reader_sorted_and_shape_checked(tmp_path: Path) -> None:
    imgs = {"b.png": _rgb(4, 4), "a.jpg": np.full((6, 4, 3), 90, np.uint8), "c.bmp": _rgb(5, 4)}
    for name, px in imgs.items():
        Image.fromarray(px).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("ignored")
    spec = CalibSpec(str(tmp_path), num_samples=10, batch_size=2, preprocess=Preprocess(size=4))
    r = make_reader(spec, "x", SHAPE)
    assert isinstance(r, ImageDirReader) and len(r) == 3
    got = np.concatenate(_drain(r))
    for i, name in enumerate(sorted(imgs)):
        with Image.open(tmp_path / name) as im:
            np.testing.assert_array_equal(got[i], preprocess_image(im, spec.preprocess))
    with pytest.raises(DataError, match=r"expects \(1, 28, 28\)"):
        make_reader(spec, "x", (1, 1, 28, 28))
    stacked = load_inputs(str(tmp_path), Preprocess(size=4), SHAPE, limit=0)
    np.testing.assert_array_equal(stacked, got)


# ----------------------------------------------------------------------------- observers

def _quant_mse(x: np.ndarray, t: float, bits: int) -> float:
    """Independent signed quantizer as quantize.py does it: scale t/qmax, round half up,
    clip to [-qmax-1, qmax]."""
    qmax = 2 ** (bits - 1) - 1
    s = t / qmax
    return float(np.mean((np.clip(np.floor(x / s + 0.5), -qmax - 1, qmax) * s - x) ** 2))


def _heavy(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.laplace(size=50_000).astype(np.float32)
    x[:20] = rng.choice([-1, 1], 20) * rng.uniform(30, 60, 20)  # a few big outliers
    return x


def test_minmax_exact_streamed() -> None:
    o = MinMaxObserver()
    o.update(np.array([[-3.0, 1.0]], np.float32))
    o.update(np.array([2.5, -0.5], np.float32))
    assert (o.min, o.max) == (-3.0, 2.5)
    assert o.threshold(True, 8) == 3.0 and o.threshold(False, 8) == 2.5


def test_percentile_matches_numpy() -> None:
    x = _heavy(1)
    o = PercentileObserver(99.0)
    for part in np.array_split(x, 7):  # streaming must not change the answer
        o.update(part)
    assert o.threshold(True, 8) == pytest.approx(np.percentile(np.abs(x), 99.0), rel=1e-6)
    assert o.threshold(False, 8) == pytest.approx(np.percentile(x, 99.0), rel=1e-6)


def test_mse_below_minmax_and_lowers_quant_error() -> None:
    x = _heavy(2)
    mse, mm = MSEObserver(), MinMaxObserver()
    mse.update(x)
    mm.update(x)
    t4, tmax = mse.threshold(True, 4), mm.threshold(True, 4)
    assert 0 < t4 < 0.5 * tmax
    assert mse.threshold(True, 8) <= tmax and mse.threshold(False, 4) <= mm.threshold(False, 4)
    assert _quant_mse(x, t4, 4) < 0.5 * _quant_mse(x, tmax, 4)
    # it is the best point of its own grid under an independent quantizer
    grid = tmax * np.arange(1, 101) / 100
    assert _quant_mse(x, t4, 4) <= min(_quant_mse(x, t, 4) for t in grid) * (1 + 1e-4)


def test_degenerate_tensors_give_positive_finite_threshold() -> None:
    for make in (MinMaxObserver, PercentileObserver, MSEObserver):
        o = make()
        assert o.threshold(True, 8) == 1.0  # nothing observed yet
        o.update(np.zeros((2, 3), np.float32))
        assert o.threshold(True, 8) == 1.0 and o.threshold(False, 4) == 1.0
        o.update(-np.ones(4, np.float32))  # all <= 0: nothing for unsigned to cover
        assert o.threshold(False, 8) == 1.0 and o.threshold(True, 8) == pytest.approx(1.0)


def test_reservoir_is_bounded_and_keeps_exact_extremes() -> None:
    o = PercentileObserver(50.0, max_samples=1000, seed=0)
    for i in range(50):
        o.update(np.arange(i * 1000, (i + 1) * 1000, dtype=np.float32))
    assert len(o._buf) == 1000 and (o.min, o.max) == (0.0, 49_999.0)
    assert o.threshold(False, 8) == pytest.approx(25_000, rel=0.1)  # uniform subsample


def test_registry_builds_from_spec() -> None:
    spec = CalibSpec(percentile=99.5)
    assert set(OBSERVERS) == {"minmax", "percentile", "mse"}
    p = OBSERVERS["percentile"](spec)
    assert isinstance(p, PercentileObserver) and p.percentile == 99.5
    assert isinstance(OBSERVERS["mse"](spec), MSEObserver)


# ----------------------------------------------------------------------------- collection

@pytest.mark.parametrize("batch", ["N", 1])
def test_collect_stats_matches_numpy_and_keeps_model(tmp_path: Path, batch: int | str) -> None:
    model, w = _tiny_model(batch)
    before = model.SerializeToString()
    x = np.random.default_rng(5).standard_normal((7, 3, 4, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    spec = CalibSpec(str(tmp_path), num_samples=7, batch_size=3)
    names = ["conv", "relu", "flat", "y"]
    obs = collect_stats(model, names, make_reader(spec, "x", SHAPE), "minmax", spec)
    ref = _numpy_tiny(x, w)
    for t in names:
        assert obs[t].min == pytest.approx(ref[t].min(), abs=1e-5), t
        assert obs[t].max == pytest.approx(ref[t].max(), abs=1e-5), t
        assert obs[t].count == ref[t].size
    assert model.SerializeToString() == before
    stats = to_stats(obs)
    assert stats["relu"].min == 0.0 and stats["relu"].threshold(False, 8) == obs["relu"].max


def test_run_float_and_runner(tmp_path: Path) -> None:
    model, w = _tiny_model(1)
    before = model.SerializeToString()
    x = np.random.default_rng(6).standard_normal((3, 3, 4, 4)).astype(np.float32)
    out = run_float(model, x, ["relu", "gap"])
    ref = _numpy_tiny(x, w)
    assert set(out) == {"relu", "gap", "y"}
    for k in out:
        np.testing.assert_allclose(out[k], ref[k], rtol=1e-5, atol=1e-5)
    assert run_float(model, x[:1], ["relu", "gap"])["y"].shape == (1, 2)  # cached session
    assert model.SerializeToString() == before
    with pytest.raises(BadModelError, match="nope"):
        FloatRunner(model, ["nope"])


def test_collect_stats_rejects_nan(tmp_path: Path) -> None:
    model, _ = _tiny_model()
    x = np.ones((2, 3, 4, 4), np.float32)
    x[1, 0, 0, 0] = np.nan
    np.save(tmp_path / "x.npy", x)
    spec = CalibSpec(str(tmp_path), num_samples=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="NaN"):
            collect_stats(model, ["conv"], make_reader(spec, "x", SHAPE), "percentile", spec)
