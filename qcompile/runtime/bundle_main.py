#!/usr/bin/env python3
"""Run this bundle's models with TVM's runtime alone (Python 3 and numpy are all it needs).

    python run.py --list
    python run.py --input x.npy --output y.npy [--model NAME]
    python run.py --bench [--model NAME] [--repeat 50]

From Python::

    import sys; sys.path.insert(0, "path/to/bundle")
    import run
    model = run.load("resnet18-int8")        # or run.load() when the bundle holds one model
    y = model.run(x)                         # float32 (N, C, H, W) in, float32 out

``qcompile bundle`` writes this file; it is qcompile's ``bundle_main.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXIT_USAGE, EXIT_ARTIFACT, EXIT_DEVICE, EXIT_PYTHON, EXIT_INPUT = 2, 7, 9, 12, 14

# Runtime-only TVM from this folder, before any other tvm on the path.
os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
if str(HERE / "runtime") not in sys.path:
    sys.path.insert(0, str(HERE / "runtime"))
if str(HERE) not in sys.path:
    sys.path.insert(1, str(HERE))


class BundleError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def info() -> dict:
    return json.loads((HERE / "bundle.json").read_text())


def _check_python() -> None:
    tag = f"{sys.version_info[0]}{sys.version_info[1]}"
    if not list((HERE / "runtime" / "tvm_ffi").glob(f"core.cpython-{tag}-*.so")):
        have = ", ".join(info()["pythons"])
        raise BundleError(f"this bundle runs on Python {have}, not {sys.version_info[0]}."
                          f"{sys.version_info[1]}; rebuild it with `qcompile bundle ... --python "
                          f"{sys.version_info[0]}.{sys.version_info[1]}`", EXIT_PYTHON)


def load(name: str | None = None):
    """The bundled model ``name`` (the only one when None), loaded and ready to run."""
    models = info()["models"]
    if name is None:
        if len(models) != 1:
            raise BundleError(f"this bundle holds {len(models)} models; name one with --model "
                              f"({', '.join(models)})", EXIT_USAGE)
        name = next(iter(models))
    if name not in models:
        raise BundleError(f"--model {name!r} is not in this bundle; it holds "
                          f"{', '.join(models)}", EXIT_USAGE)
    _check_python()
    import qloader
    m = models[name]
    try:
        return qloader.Model.open(HERE / m["dir"], weights=HERE / m["weights"],
                                  cudart_dirs=(HERE / "runtime" / "cuda",))
    except qloader.NoDeviceError as e:
        raise BundleError(str(e), EXIT_DEVICE) from None
    except qloader.LoadError as e:
        raise BundleError(str(e), EXIT_ARTIFACT) from None


def _run(args: argparse.Namespace) -> None:
    import numpy as np
    model = load(args.model)
    if args.bench:
        r = model.bench(model.batch or 1, repeat=args.repeat, warmup=args.warmup)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}))
        return
    if not args.input or not args.output:
        raise BundleError("give --input x.npy and --output y.npy (or --bench, --list)", EXIT_USAGE)
    try:
        x = np.load(args.input, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BundleError(f"--input {args.input}: not a readable .npy file ({e})", EXIT_USAGE)
    import qloader
    try:
        y = model.run(x)
    except qloader.BadInputError as e:
        raise BundleError(f"--input {args.input}: {e}", EXIT_INPUT) from None
    except Exception as e:  # the loader's shape check, TVM errors: one line
        raise BundleError(f"{str(e).splitlines()[0]}", EXIT_ARTIFACT) from None
    tmp = Path(args.output).with_name(Path(args.output).name + ".tmp.npy")
    np.save(tmp, y)
    os.replace(tmp, args.output)  # never a half-written output


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run a qcompile bundle with TVM's runtime alone.")
    p.add_argument("--model", help="Which bundled model (default: the only one).")
    p.add_argument("--input", help="Input batch as .npy (float32, N x C x H x W).")
    p.add_argument("--output", help="Where to write the output .npy.")
    p.add_argument("--list", action="store_true", help="List the bundled models.")
    p.add_argument("--bench", action="store_true", help="Time the model on random input.")
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args(argv)
    try:
        if args.list:
            for name, m in info()["models"].items():
                print(f"{name}\t{m['target']['str']}\tbatch {m['batch']}\t"
                      f"input {m['input']['shape']}")
            return 0
        _run(args)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except Exception as e:  # a defect of the bundle itself: still one line
        if os.environ.get("QCOMPILE_DEBUG", "") not in ("", "0"):
            raise
        print(f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
              "rerun with QCOMPILE_DEBUG=1 for the traceback", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
