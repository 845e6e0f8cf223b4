"""A seeded sample of the front-end fuzz corpus (``tools/fuzz_corpus.py``) through the CLI.

``make fuzz`` runs the whole corpus; here 30 files (one valid control that must
compile, 29 broken ones) go through ``benchmarks/fuzz.py``'s pool: no exit 70, traceback,
hang or crash, a one-line stderr, the input untouched and nothing written outside ``-o``.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tools"))

import fuzz  # noqa: E402
import fuzz_corpus  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("fuzz") / "corpus"
    return d, fuzz_corpus.generate(d, seed=0)


@pytest.mark.unit
def test_corpus_is_big_seeded_and_covers_every_category(corpus: tuple[Path, dict],
                                                        tmp_path: Path) -> None:
    d, manifest = corpus
    assert len(manifest) >= 200
    cats = {m["category"] for m in manifest.values()}
    assert {"truncated", "random-bytes", "bad-varint", "cycle", "ssa", "external-data",
            "nan-inf", "dims", "dtype", "missing-init", "domain", "opset", "attribute",
            "shape", "empty", "weird", "control"} <= cats
    again = fuzz_corpus.generate(tmp_path / "again", seed=0)
    assert again == manifest
    for case in list(manifest)[:40]:
        assert (tmp_path / "again" / case / "model.onnx").read_bytes() == \
            (d / case / "model.onnx").read_bytes()


@pytest.mark.tvm
def test_fuzz_sample_through_the_cli(corpus: tuple[Path, dict],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    d, manifest = corpus
    monkeypatch.setenv("QC_FUZZ_LAUNCH_DIR", str(ROOT))
    broken = sorted(k for k, m in manifest.items() if m["expect"] == "refuse")
    sample = ["000-control-conv", *random.Random(11).sample(broken, 29)]
    results = fuzz.run_corpus(d, sample, workers=2, timeout=60)
    assert set(results) == set(sample)
    bad = fuzz.violations(results, manifest)
    assert not bad, "\n".join(bad)
    for k, r in results.items():
        assert r["exit_code"] != 70, (k, r)
        assert r["class"] == ("compiled" if k == "000-control-conv" else "refused"), (k, r)
        assert r["class"] == "compiled" or r["stderr_lines"] == 1, (k, r)
        assert r["line"].startswith("error: ") or r["class"] == "compiled", (k, r)
