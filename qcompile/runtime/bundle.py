"""Runtime-only bundles: artifacts plus the part of TVM that runs them, in one folder.

A bundle runs on a machine with Python and numpy and nothing else: no TVM wheel (100 MB,
whose libtvm_compiler.so is 259 MB unpacked), no qcompile, no onnx. It holds::

    run.py           the command line and the import entry point (``run.load(name)``)
    qloader.py       qcompile/runtime/loader.py, verbatim: the code ``qcompile run`` runs
    bundle.json      models, their targets and files, versions, Python versions
    runtime/tvm      TVM's Python runtime modules + lib/libtvm_runtime.so (+ _cuda)
    runtime/tvm_ffi  tvm-ffi's Python modules, lib/libtvm_ffi.so, one core per Python
    runtime/cuda     libcudart.so.13, used only where the system has none
    models/NAME      manifest.json + module.so of each artifact
    weights/HASH.npz parameters, compressed, stored once per distinct content

Artifacts compiled for batch 1 and 8 share their weights; so do repeated bundles of one
model. tvm-ffi's core is a CPython extension, one per Python minor version: the
builder's own is always included, others (``pythons``) come from tvm-ffi wheels.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from qcompile import __version__
from qcompile.runtime.artifact import atomic_dir, check_output_dir
from qcompile.errors import ArtifactError, UsageError
from qcompile.env import cache_dir
from qcompile.files import write_json
from qcompile.runtime.loader import CUDART

MARKER = "bundle.json"
LOADER = Path(__file__).with_name("loader.py")
MAIN = Path(__file__).with_name("bundle_main.py")

# TVM's Python tree minus what only the compiler uses (runtime-only `import tvm` never
# reaches these; the bundle's own CPU run proves it, and the GPU check the CUDA path).
TVM_SKIP = frozenset({"3rdparty", "src", "include", "web", "cmake", "licenses", "lib", "lib64",
                      "relax", "s_tir", "topi", "contrib", "testing", "exec",
                      "meta_schedule", "dlight", "__pycache__"})
FFI_SKIP = frozenset({"3rdparty", "src", "include", "cmake", "share", "lib", "__pycache__"})


@dataclass(frozen=True)
class BundleReport:
    out: Path
    models: dict[str, dict]
    pythons: tuple[str, ...]
    total_bytes: int
    runtime_bytes: int
    weights_bytes: int


def _py_tag(version: str) -> str:
    if not re.fullmatch(r"3\.\d{1,2}", version):
        raise UsageError(f"--python {version!r}: give a CPython version such as 3.12")
    return "cp" + version.replace(".", "")


def _copy_tree(src: Path, dst: Path, skip: frozenset[str], top_skip_only: bool = False) -> None:
    """Copy the .py files of package ``src`` into ``dst``, leaving out ``skip`` folders."""
    for f in sorted(src.rglob("*.py")):
        rel = f.relative_to(src)
        parts = rel.parts[:-1]
        if any(p in skip for p in (parts[:1] if top_skip_only else parts)):
            continue
        # tvm/backend/<device>/ are compile-time hooks; runtime-only mode never loads them
        if rel.parts[0] == "backend" and len(rel.parts) > 2:
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dst / rel)


def _ffi_core(version: str, wheels: Sequence[Path]) -> tuple[str, bytes]:
    """(file name, bytes) of tvm-ffi's core extension for CPython ``version``."""
    import tvm_ffi

    tag = _py_tag(version)
    here = Path(tvm_ffi.__file__).parent
    for f in here.glob(f"core.{tag.replace('cp', 'cpython-')}-*.so"):
        return f.name, f.read_bytes()
    from importlib import metadata
    ffi_version = metadata.version("apache-tvm-ffi")
    candidates = [w for w in wheels if f"-{tag}-" in Path(w).name]
    if not candidates:
        candidates = sorted(cache_dir("wheels").glob(f"apache_tvm_ffi-{ffi_version}-{tag}-*.whl"))
    if not candidates:
        candidates = _download_ffi_wheel(ffi_version, version)
    import zipfile
    with zipfile.ZipFile(candidates[0]) as z:
        for name in z.namelist():
            if re.fullmatch(rf"tvm_ffi/core\.cpython-{tag[2:]}-x86_64-linux-gnu\.so", name):
                return Path(name).name, z.read(name)
    raise UsageError(f"{candidates[0]} holds no tvm_ffi core for Python {version}")


def _download_ffi_wheel(ffi_version: str, version: str) -> list[Path]:
    wheels = cache_dir("wheels")
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", version, "--implementation", "cp",
           "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
           "-d", str(wheels), f"apache-tvm-ffi=={ffi_version}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    got = sorted(wheels.glob(f"apache_tvm_ffi-{ffi_version}-{_py_tag(version)}-*.whl"))
    if r.returncode or not got:
        raise UsageError(f"--python {version}: no apache-tvm-ffi {ffi_version} wheel for that "
                         "Python here and pip could not download one; pass it with --ffi-wheel")
    return got


def write_runtime(dst: Path, *, cuda: bool, pythons: Iterable[str] = (),
                  wheels: Sequence[Path] = ()) -> tuple[str, ...]:
    """TVM's runtime-only Python + libraries under ``dst``; returns the Python versions."""
    import tvm
    import tvm_ffi

    tvm_src, ffi_src = Path(tvm.__file__).parent, Path(tvm_ffi.__file__).parent
    _copy_tree(tvm_src, dst / "tvm", TVM_SKIP, top_skip_only=True)
    libs = ["libtvm_runtime.so"] + (["libtvm_runtime_cuda.so"] if cuda else [])
    (dst / "tvm" / "lib").mkdir(parents=True, exist_ok=True)
    for lib in libs:
        shutil.copy2(tvm_src / "lib" / lib, dst / "tvm" / "lib" / lib)
    _copy_tree(ffi_src, dst / "tvm_ffi", FFI_SKIP)
    (dst / "tvm_ffi" / "lib").mkdir(parents=True, exist_ok=True)
    for lib in ("libtvm_ffi.so", "libtvm_ffi_testing.so"):  # the core links both
        shutil.copy2(ffi_src / "lib" / lib, dst / "tvm_ffi" / "lib" / lib)
    import typing_extensions  # tvm-ffi's one pure-Python dependency
    shutil.copy2(typing_extensions.__file__, dst / "typing_extensions.py")
    versions = dict.fromkeys([f"{sys.version_info[0]}.{sys.version_info[1]}", *pythons])
    for v in versions:
        name, data = _ffi_core(v, wheels)
        (dst / "tvm_ffi" / name).write_bytes(data)
    if cuda:
        _copy_cudart(dst / "cuda")
    return tuple(versions)


def _copy_cudart(dst: Path) -> None:
    """The CUDA runtime libtvm_runtime_cuda links against, for hosts without CUDA 13's."""
    roots = [Path("/usr/local/cuda/lib64"), Path("/usr/local/cuda/lib"),
             *sorted(Path("/usr/local").glob("cuda-*/lib*"))]
    for root in roots:
        if (root / CUDART).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2((root / CUDART).resolve(), dst / CUDART)
            return
    # Not fatal: the host's own CUDA runtime is used first anyway.


def _weights_key(arrays: dict[str, np.ndarray], names: Sequence[str]) -> str:
    h = hashlib.sha256()
    for k in names:
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _model_name(art: Path, taken: dict[str, dict]) -> str:
    # the folder's own name (a symlink's, not its target's); "." -> the real folder's
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(os.path.abspath(art)).name or art.resolve().name)
    if name in taken:
        raise UsageError(f"two artifacts are named {name!r}; give them distinct folder names")
    return name


def make_bundle(artifacts: Sequence[Path], out: Path, *, pythons: Sequence[str] = (),
                wheels: Sequence[Path] = (), extra: dict[str, Path] | None = None) -> BundleReport:
    """Write the runtime-only bundle of ``artifacts`` to ``out`` (atomically).

    ``extra`` maps bundle-relative paths to files copied in as they are (inputs, expected
    outputs, scripts that travel with the bundle)."""
    if not artifacts:
        raise UsageError("give at least one artifact to bundle")
    for v in pythons:
        _py_tag(v)
    check_output_dir(out, tuple(Path(a) for a in artifacts), marker=MARKER, what="bundle")
    models: dict[str, dict] = {}
    with atomic_dir(out) as tmp:
        stored: set[str] = set()
        (tmp / "weights").mkdir()
        for art in map(Path, artifacts):
            name = _model_name(art, models)
            models[name] = _add_model(art, tmp, name, stored)
        cuda = any(m["target"]["kind"] != "llvm" for m in models.values())
        versions = write_runtime(tmp / "runtime", cuda=cuda, pythons=pythons, wheels=wheels)
        shutil.copy2(LOADER, tmp / "qloader.py")
        shutil.copy2(MAIN, tmp / "run.py")
        for rel, src in (extra or {}).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tmp / rel)
        import tvm
        runtime_bytes = _du(tmp / "runtime") + _du(tmp / "qloader.py") + _du(tmp / "run.py")
        write_json(tmp / MARKER, {"format": 1, "qcompile": __version__, "tvm": tvm.__version__,
                                  "pythons": list(versions), "models": models})
        total, weights = _du(tmp), _du(tmp / "weights")
    return BundleReport(out, models, versions, total, runtime_bytes, weights)


def _add_model(art: Path, tmp: Path, name: str, stored: set[str]) -> dict:
    missing = [f for f in ("manifest.json", "module.so", "weights.npz") if not (art / f).is_file()]
    if missing:
        raise ArtifactError(f"{art} is not a qcompile artifact (missing {', '.join(missing)}); "
                            "create one with `qcompile compile MODEL -o DIR`")
    manifest = json.loads((art / "manifest.json").read_text())
    with np.load(art / "weights.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in manifest["params"]}
    key = _weights_key(arrays, manifest["params"])
    if key not in stored:  # same parameters (batch 1 and 8 builds): stored once
        np.savez_compressed(tmp / "weights" / f"{key}.npz", **arrays)
        stored.add(key)
    (tmp / "models" / name).mkdir(parents=True)
    shutil.copy2(art / "manifest.json", tmp / "models" / name / "manifest.json")
    stripped = _copy_stripped(art / "module.so", tmp / "models" / name / "module.so")
    return {"stripped": stripped, "dir": f"models/{name}", "weights": f"weights/{key}.npz",
            "target": manifest["target"], "batch": manifest.get("batch"),
            "input": manifest["input"], "output": manifest["output"],
            "source": manifest.get("source")}


def _copy_stripped(src: Path, dst: Path) -> bool:
    """Copy a module without its static symbol table (about half of it). TVM finds its
    functions and device binaries through the dynamic symbols, which strip keeps; without
    binutils' strip the copy is simply whole."""
    strip = shutil.which("strip")
    if strip and subprocess.run([strip, "--strip-unneeded", "-o", str(dst), str(src)],
                                capture_output=True).returncode == 0:
        return True
    shutil.copy2(src, dst)
    return False


def _du(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*")
                                                    if f.is_file())
