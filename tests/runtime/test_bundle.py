"""Runtime-only bundles (issue 12): a folder that runs artifacts with Python + numpy alone,
bit-identical to `qcompile run`, and the GPU check's CPU dry run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from qcompile import api
from qcompile.frontend import zoo
from qcompile.runtime.bundle import make_bundle
from qcompile.errors import ArtifactError, UsageError
from qcompile.runtime.run import Artifact
from qcompile.verify import cuda_tools

ROOT = Path(__file__).resolve().parents[2]
SIZE = 32


@pytest.fixture(scope="module")
def arts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny ResNet-18 at batch 1 and 2 (same weights) and a W4A8 build of it."""
    d = tmp_path_factory.mktemp("bundle")
    model = zoo.save(zoo.build("resnet18", input_size=SIZE, num_classes=10), d / "r18.onnx")
    out = {}
    for name, kw in (("r18-b1", {}), ("r18-b2", {"batch": 2})):
        api.compile_model(model, d / name, progress=False, verify=0, **kw)
        out[name] = d / name
    return out


@pytest.fixture(scope="module")
def numpy_only_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv whose site-packages holds numpy and nothing else (no tvm, no qcompile)."""
    d = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(d)], check=True)
    py = d / "bin" / "python"
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    ours = Path(sysconfig.get_paths()["purelib"])
    for name in ("numpy", "numpy.libs"):
        if (ours / name).exists():
            (site / name).symlink_to(ours / name)
    return py


def _run(py: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "TVM_"))}
    return subprocess.run([str(py), *args], capture_output=True, text=True, cwd=cwd or "/", env=env)


@pytest.mark.tvm
def test_bundle_runs_with_numpy_alone(arts, numpy_only_python, tmp_path) -> None:
    b = tmp_path / "b"
    rep = make_bundle([arts["r18-b1"], arts["r18-b2"]], b)
    assert set(rep.models) == {"r18-b1", "r18-b2"}
    # batch 1 and 2 share their parameters: stored once
    assert len(list((b / "weights").iterdir())) == 1
    assert not list(b.rglob("libtvm_compiler*")) and (b / "runtime/tvm/lib/libtvm_runtime.so").is_file()
    x = np.random.default_rng(3).normal(size=(3, 3, SIZE, SIZE)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    for name in ("r18-b1", "r18-b2"):
        r = _run(numpy_only_python, str(b / "run.py"), "--model", name,
                 "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / f"{name}.npy"))
        assert r.returncode == 0, r.stderr
        want = Artifact.load(arts[name]).run(x)  # what `qcompile run` returns
        np.testing.assert_array_equal(np.load(tmp_path / f"{name}.npy"), want)
    # the documented snippet, and proof that it ran the bundle's runtime-only TVM
    snippet = (f"import sys; sys.path.insert(0, {str(b)!r}); import run, numpy as np, tvm; "
               f"m = run.load('r18-b1'); y = m.run(np.load({str(tmp_path / 'x.npy')!r})); "
               "print(tvm.base._RUNTIME_ONLY, tvm.__file__, float(y.sum()))")
    r = _run(numpy_only_python, "-c", snippet)
    assert r.returncode == 0, r.stderr
    ro, where, total = r.stdout.split()
    assert ro == "True" and where.startswith(str(b))
    assert float(total) == pytest.approx(float(Artifact.load(arts["r18-b1"]).run(x).sum()), rel=1e-6)


@pytest.mark.tvm
def test_bundle_errors_are_one_line(arts, numpy_only_python, tmp_path) -> None:
    b = tmp_path / "b"
    make_bundle([arts["r18-b1"], arts["r18-b2"]], b)
    np.save(tmp_path / "bad.npy", np.zeros((1, 3, SIZE + 1, SIZE), np.float32))
    nan = np.zeros((1, 3, SIZE, SIZE), np.float32)
    nan[0, 0, 0, :2] = [np.nan, np.inf]
    np.save(tmp_path / "nan.npy", nan)
    cases = {
        2: ["--input", str(tmp_path / "bad.npy"), "--output", str(tmp_path / "y.npy")],  # which model?
        7: ["--model", "r18-b1", "--input", str(tmp_path / "bad.npy"), "--output", str(tmp_path / "y.npy")],
        14: ["--model", "r18-b1", "--input", str(tmp_path / "nan.npy"), "--output", str(tmp_path / "y.npy")],
    }
    for code, args in cases.items():
        r = _run(numpy_only_python, str(b / "run.py"), *args)
        assert r.returncode == code, r.stderr
        assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
        assert code != 14 or "1 NaN and 1 Inf" in r.stderr, r.stderr
        assert not (tmp_path / "y.npy").exists()
    r = _run(numpy_only_python, str(b / "run.py"), "--model", "nope", "--list")
    assert r.returncode == 0 and "r18-b2" in r.stdout
    # A Python the bundle has no tvm-ffi core for: say which to rebuild for.
    for core in (b / "runtime/tvm_ffi").glob("core.*.so"):
        core.unlink()
    r = _run(numpy_only_python, str(b / "run.py"), "--model", "r18-b1", "--input",
             str(tmp_path / "bad.npy"), "--output", str(tmp_path / "y.npy"))
    assert r.returncode == 12 and "--python" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.tvm
def test_bundle_refusals(arts, tmp_path) -> None:
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "precious.txt").write_text("x")
    with pytest.raises(UsageError, match="not a qcompile bundle"):
        make_bundle([arts["r18-b1"]], tmp_path / "keep")
    assert (tmp_path / "keep" / "precious.txt").read_text() == "x"
    with pytest.raises(ArtifactError, match="not a qcompile artifact"):
        make_bundle([tmp_path / "keep"], tmp_path / "b")
    with pytest.raises(UsageError, match="CPython version"):
        make_bundle([arts["r18-b1"]], tmp_path / "b", pythons=["python3"])
    assert not (tmp_path / "b").exists()


@pytest.mark.tvm
def test_bundle_cli(arts, tmp_path) -> None:
    from click.testing import CliRunner
    from qcompile.cli.main import main

    r = CliRunner().invoke(main, ["bundle", str(arts["r18-b1"]), "-o", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    assert "run.py --input x.npy --output y.npy" in r.output
    info = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert list(info["models"]) == ["r18-b1"] and info["models"]["r18-b1"]["batch"] == 1
    r = CliRunner().invoke(main, ["bundle", str(tmp_path / "nope"), "-o", str(tmp_path / "c")])
    assert r.exit_code == 7 and "no such artifact" in r.output


def _dry_run(tmp_path: Path, models: list[str], peers: bool) -> dict:
    """The GPU check end to end on its CPU twin: build, oracle answers, bundle, then the
    GPU-side script through the runtime-only path. Proves the script before GPU time."""
    py = sys.executable
    r = subprocess.run([py, str(ROOT / "benchmarks/gpu_check.py"), "--target", "llvm",
                        "--input-size", str(SIZE), "--calib-samples", "4", "--python",
                        f"{sys.version_info[0]}.{sys.version_info[1]}", "--models", *models,
                        "--work", str(tmp_path / "work"), "--out", str(tmp_path / "bundle")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "gpu_side.py --out" in r.stdout
    r = subprocess.run([py, str(tmp_path / "bundle/gpu_side.py"), "--out", str(tmp_path / "res"),
                        "--device", "cpu", "--repeat", "3", "--warmup", "1",
                        *([] if peers else ["--no-peers"])],
                       capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(next((tmp_path / "res").glob("gpu-dryrun-*.json")).read_text())
    assert next((tmp_path / "res").glob("gpu-dryrun-*.md")).read_text().startswith("**GPU check")
    rows = {a["name"]: a for a in res["artifacts"]}
    assert set(rows) == set(models)
    for a in rows.values():
        assert a["bit_exact"] and a["tvm"] == {"runtime_only": True, "from_bundle": True}
        assert ("median_ms" in a) == a["timed"]
        assert not a["timed"] or a["median_ms"] > 0
    return res


@pytest.mark.tvm
def test_gpu_check_dry_run(tmp_path) -> None:
    _dry_run(tmp_path, ["resnet18-int8-b1", "resnet18-int8-b8"], peers=False)


@pytest.mark.tvm
@pytest.mark.slow
def test_gpu_check_dry_run_every_config_with_peers(tmp_path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import CONFIGS
    res = _dry_run(tmp_path, [c.name for c in CONFIGS], peers=True)
    peers = res["peers"]
    assert peers["resnet18"]["weights_match"] and peers["resnet50"]["weights_match"]
    if "torch" not in peers["resnet18"]:  # torch installed: its rows are there
        assert peers["resnet18"]["torch_fp32/b1"]["median_ms"] > 0


@pytest.mark.tvm
@pytest.mark.slow
def test_bundle_of_resnet18_and_resnet50_int8_is_under_45_mib(numpy_only_python, tmp_path) -> None:
    """Issue 12's size bound, at the real 224 px, and the bundle still runs bit-identically."""
    arts = []
    for name in ("resnet18", "resnet50"):
        model = zoo.save(zoo.build(name), tmp_path / f"{name}.onnx")
        api.compile_model(model, tmp_path / f"{name}-int8", progress=False, verify=0)
        arts.append(tmp_path / f"{name}-int8")
    rep = make_bundle(arts, tmp_path / "b")
    assert rep.total_bytes < 45 * 2 ** 20, rep
    x = np.random.default_rng(0).normal(size=(1, 3, 224, 224)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    r = _run(numpy_only_python, str(tmp_path / "b/run.py"), "--model", "resnet50-int8",
             "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy"))
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), Artifact.load(arts[1]).run(x))


@pytest.mark.unit
def test_onnx_torch_peer_matches_onnxruntime() -> None:
    """The GPU check's PyTorch peer computes the ONNX model's function (same weights)."""
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from onnx_torch import OnnxModule

    for name in ("resnet18", "mobilenetv2"):
        m = zoo.build(name, input_size=SIZE, num_classes=10, batch=2)
        x = np.random.default_rng(0).normal(size=(2, 3, SIZE, SIZE)).astype(np.float32)
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        want = s.run(None, {s.get_inputs()[0].name: x})[0]
        with torch.inference_mode():
            got = OnnxModule(m).eval()(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.hardware  # --target cuda builds need nvcc and cuobjdump
@pytest.mark.skipif(not (shutil.which("nvcc") and cuda_tools.tool_path("cuobjdump")
                         and cuda_tools.tool_path("nvdisasm")),
                    reason="nvcc, cuobjdump or nvdisasm not installed (--target cuda builds)")
def test_cuda_bundle_without_a_gpu_says_so(numpy_only_python, tmp_path) -> None:
    """A CUDA bundle carries the CUDA runtime pieces; with no GPU here, run.py exits 9 in
    one line (the GPU check itself runs it where there is one)."""
    model = zoo.save(zoo.build("resnet18", input_size=SIZE, num_classes=10), tmp_path / "r.onnx")
    api.compile_model(model, tmp_path / "cuda-int8", target="cuda", arch="sm_90",
                      progress=False, verify=0)
    make_bundle([tmp_path / "cuda-int8"], tmp_path / "b")
    assert (tmp_path / "b/runtime/tvm/lib/libtvm_runtime_cuda.so").is_file()
    info = json.loads((tmp_path / "b/bundle.json").read_text())
    assert info["models"]["cuda-int8"]["target"]["kind"] == "cuda"
    np.save(tmp_path / "x.npy", np.zeros((1, 3, SIZE, SIZE), np.float32))
    r = _run(numpy_only_python, str(tmp_path / "b/run.py"), "--input", str(tmp_path / "x.npy"),
             "--output", str(tmp_path / "y.npy"))
    assert r.returncode == 9, r.stderr
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert "GPU" in r.stderr or "CUDA" in r.stderr
