"""One digest per model of the quantized graph a checkout makes (default options, seeded
synthetic calibration, the fidelity guard's hold-out): its JSON and every integer
parameter. Two checkouts that print the same lines quantize the same way; a model either
refuses with the same first words (``ERROR ...``) or digests the same.

    python tools/qgraph_digest.py CHECKOUT MODELS_DIR [name,name...] > digests.txt

``CHECKOUT`` is the tree whose ``qcompile`` is imported (a ``git worktree`` of an older
commit, or ``.``); it reads the layout before and after the stage packages (issue 20).
Used to show a refactoring leaves ``make corpus``'s quantized graphs unchanged:

    git worktree add /tmp/old <commit>
    python tools/qgraph_digest.py /tmp/old ~/.cache/qcompile/corpus > old.txt
    python tools/qgraph_digest.py . ~/.cache/qcompile/corpus > new.txt && diff old.txt new.txt
"""
from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(argv[0]).resolve()))
    warnings.filterwarnings("ignore")  # synthetic calibration warns once per model
    import numpy as np

    from qcompile import api
    from qcompile.config import CalibSpec, FidelitySpec, QuantSpec, resolve_auto
    try:  # the stage packages
        from qcompile.ir.serialize import qgraph_to_json
        from qcompile.quant.quantize import quantize_graph
    except ImportError:  # the flat layout before them
        from qcompile.quantize import quantize_graph  # type: ignore[no-redef]
        from qcompile.serialize import qgraph_to_json  # type: ignore[no-redef]

    models = sorted(Path(argv[1]).glob("*.onnx"))
    if len(argv) > 2:
        models = [m for m in models if m.stem in argv[2].split(",")]
    for m in models:
        try:
            calib, quant = resolve_auto(CalibSpec(), QuantSpec())
            front = api._front(m, calib, False, fidelity=FidelitySpec())
            qg = quantize_graph(front[0], front[2], quant)
            h = hashlib.sha256(json.dumps(qgraph_to_json(qg), sort_keys=True,
                                          default=str).encode())
            for k, v in qg.param_items():
                h.update(k.encode())
                h.update(np.ascontiguousarray(v).tobytes())
            print(m.stem, h.hexdigest()[:16], flush=True)
        except Exception as e:  # a refusal is part of the behaviour compared
            print(m.stem, "ERROR", type(e).__name__, str(e)[:80], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
