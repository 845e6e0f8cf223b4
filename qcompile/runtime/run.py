"""Load an artifact and run or time it with TVM's Relax VM (``loader.Model`` plus the
quantized graph the oracle runs)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qcompile.errors import ArtifactError, DeviceError, NonFiniteInputError
from qcompile.runtime.loader import Model, summarize_ms
from qcompile.ir.qgraph import QGraph
from qcompile.ir.serialize import qgraph_from_json

__all__ = ["Artifact", "REQUIRED", "artifact_qgraph", "summarize_ms"]

REQUIRED = ("manifest.json", "module.so", "weights.npz", "qgraph.npz", "qconfig.json")


@dataclass
class Artifact(Model):
    """A loaded artifact with its quantization config (qconfig.json, qgraph.npz)."""

    qconfig: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> "Artifact":
        path = Path(path)
        missing = [f for f in REQUIRED if not (path / f).is_file()]
        if missing:
            raise ArtifactError(f"{path} is not a qcompile artifact (missing {', '.join(missing)}); "
                                "create one with `qcompile compile MODEL -o DIR`")
        qconfig = json.loads((path / "qconfig.json").read_text())
        art = cls.open(path, error=ArtifactError, device_error=DeviceError,
                       input_error=NonFiniteInputError, qconfig=qconfig)
        assert isinstance(art, Artifact)
        return art

    def qgraph(self) -> QGraph:
        """The quantized graph the oracle runs, from qconfig.json + qgraph.npz."""
        return artifact_qgraph(self.path, self.qconfig)


def artifact_qgraph(path: str | Path, qconfig: dict | None = None) -> QGraph:
    """An artifact's quantized graph, without loading its module (any target, no device)."""
    path = Path(path)
    if qconfig is None:
        qconfig = json.loads((path / "qconfig.json").read_text())
    with np.load(path / "qgraph.npz", allow_pickle=False) as z:
        return qgraph_from_json(qconfig["graph"], {k: z[k] for k in z.files})
