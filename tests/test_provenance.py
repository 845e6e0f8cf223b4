"""Result files say where they came from (issue 19): every file under benchmarks/results/
that the README (or docs/) cites carries ``bench_common.provenance()``'s fields, and a
figure comes from one clean commit.

A file measured before provenance was recorded may carry a block reconstructed from the
file itself, git history and closing notes (``"reconstructed": true``, a ``source``, and
``"unrecorded"`` where a fact was never written down). The README must then say so right
after each citation of it: "provenance reconstructed". No benchmark runs here.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_common as bc  # noqa: E402

pytestmark = pytest.mark.unit

LABEL = "provenance reconstructed"
WINDOW = 200  # characters after a citation in which its label must stand
CORE_VERSIONS = ("python", *bc.CORE_PACKAGES)
THREAD_KEYS = ("cpu_count", "tvm_num_threads", "ort_intra_op_threads")
# `benchmarks/results/x.md`, `results/x.{json,md}`, or a bare dated result name.
_EXT = r"(?:\.\{[a-z,]+\}|\.(?:md|json|png))"
CITED = re.compile(r"(?:benchmarks/)?results/([A-Za-z0-9_.-]+?" + _EXT + r")")
BARE = re.compile(r"(?<![/\w.-])([a-z0-9][a-z0-9_-]*-\d{4}-\d{2}-\d{2}[a-z0-9_-]*" + _EXT + r")")


def _documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]


def _expand(name: str) -> list[str]:
    m = re.fullmatch(r"(.+)\.\{([a-z,]+)\}", name)
    return [f"{m[1]}.{ext}" for ext in m[2].split(",")] if m else [name]


def citations() -> list[dict[str, Any]]:
    """Each citation: document, name as written, files, and the text after it up to the
    next citation, the paragraph's end or WINDOW characters (where its label goes)."""
    out = []
    for doc in _documents():
        text = doc.read_text()
        hits = sorted({(m.start(1), m.end(1), m[1]) for rx in (CITED, BARE) for m in rx.finditer(text)})
        for i, (start, end, name) in enumerate(hits):
            stop = min(end + WINDOW, hits[i + 1][0] if i + 1 < len(hits) else len(text))
            para = text.find("\n\n", end)
            after = text[end:stop if para < 0 else min(stop, para)]
            line = text.count("\n", 0, start) + 1
            out.append({"doc": doc.name, "line": line, "name": name, "files": _expand(name),
                        "after": " ".join(after.lower().split()), "start": start})
    return out


def _empty(v: Any) -> bool:
    return v is None or v == "" or v == [] or v == {}


def provenance_problems(prov: Any) -> list[str]:
    """What is missing or wrong in a "provenance" block; empty when it is complete."""
    if not isinstance(prov, dict):
        return ["no provenance block"]
    bad = [f"{k} missing or empty" for k in bc.PROVENANCE_FIELDS if _empty(prov.get(k))]
    if bad:
        return bad
    rec = prov.get("reconstructed") is True
    versions, cpu, threads = prov["versions"], prov["cpu"], prov["threads"]
    bad += [f"versions.{k} missing" for k in CORE_VERSIONS if _empty(versions.get(k))]
    bad += [f"cpu.{k} missing" for k in ("model", "flags") if _empty(cpu.get(k))]
    bad += [f"cpu.flags.{f} missing" for f in bc.KERNEL_FLAGS if f not in (cpu.get("flags") or {})]
    bad += [f"threads.{k} missing" for k in THREAD_KEYS if _empty(threads.get(k))]
    if rec:
        if not isinstance(prov.get("source"), str) or len(prov["source"]) < 20:
            bad.append("reconstructed without a source saying where each fact came from")
        return bad
    if not re.fullmatch(r"[0-9a-f]{40}", str(prov["commit"])):
        bad.append(f"commit is not a full sha: {prov['commit']!r}")
    if prov["dirty"] is not False:
        bad.append(f"not from a clean commit (dirty: {prov['dirty']!r}, {prov.get('dirty_paths')})")
    if not all(isinstance(v, bool) for v in cpu["flags"].values()):
        bad.append("cpu.flags values must be true/false")
    unrecorded = [k for k in ("command", "date") if prov[k] == bc.UNRECORDED]
    return bad + [f"{k} unrecorded outside a reconstructed block" for k in unrecorded]


def _twin(name: str) -> Path:
    return RESULTS / (name.rsplit(".", 1)[0] + ".json")


CITES = citations()


def test_the_readme_cites_result_files() -> None:
    assert len({c["name"] for c in CITES}) >= 5, CITES  # the parser still finds them


@pytest.mark.parametrize("cite", CITES, ids=[f"{c['doc']}:{c['line']}:{c['name']}" for c in CITES])
def test_cited_result_carries_provenance(cite: dict[str, Any]) -> None:
    missing = [f for f in cite["files"] if not (RESULTS / f).is_file()]
    assert not missing, f"{cite['doc']} line {cite['line']} cites missing {missing}"
    twin = _twin(cite["files"][0])
    assert twin.is_file(), f"{cite['name']}: no {twin.name} beside it to hold its provenance"
    data = json.loads(twin.read_text())
    prov = data.get("provenance") if isinstance(data, dict) else None
    problems = provenance_problems(prov)
    assert not problems, f"{twin.name}: " + "; ".join(problems)
    if prov.get("reconstructed") is True:
        assert LABEL in cite["after"], (
            f"{cite['doc']} line {cite['line']}: {cite['name']} has reconstructed provenance; "
            f"write '{LABEL}' right after the citation")


def test_no_stale_reconstructed_label() -> None:
    """A label stands right after a citation of a file whose provenance is reconstructed:
    rerunning a benchmark at a clean commit means dropping the label too."""
    for doc in _documents():
        text = doc.read_text()
        for m in re.finditer(re.escape(LABEL), text, flags=re.IGNORECASE):
            before = [c for c in CITES if c["doc"] == doc.name and c["start"] < m.start()
                      and LABEL in c["after"]]
            assert before, f"{doc.name}: '{LABEL}' at offset {m.start()} follows no citation"
            prov = json.loads(_twin(before[-1]["files"][0]).read_text()).get("provenance", {})
            assert prov.get("reconstructed") is True, (
                f"{doc.name} line {before[-1]['line']}: {before[-1]['name']} now has recorded "
                f"provenance; drop '{LABEL}'")


def test_provenance_returns_every_field(tmp_path: Path) -> None:
    p = bc.provenance([str(ROOT / "benchmarks" / "x.py"), "--flag", "a b"], peers=("no-such-pkg",),
                      ort_threads=3)
    assert set(bc.PROVENANCE_FIELDS) <= set(p) and not any(_empty(p[k]) for k in bc.PROVENANCE_FIELDS)
    assert p["command"] == "python benchmarks/x.py --flag 'a b'"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", p["date"])
    assert re.fullmatch(r"[0-9a-f]{40}", p["commit"]) and isinstance(p["dirty"], bool)
    assert set(CORE_VERSIONS) <= set(p["versions"]) and p["versions"]["no-such-pkg"] == "not installed"
    cpu = p["cpu"]
    assert cpu["model"] and set(cpu["flags"]) == set(bc.KERNEL_FLAGS)
    assert isinstance(cpu["kernel_flags"], list) and set(cpu["kernel_flags"]) <= set(bc.KERNEL_FLAGS)
    assert cpu["amx"] in ("granted", "absent", "present, not granted")
    assert p["threads"]["ort_intra_op_threads"] == 3 and p["threads"]["cpu_count"] >= 1
    line = bc.provenance_line(p)
    assert bc.revision(p) in line and p["command"] in line and cpu["model"] in line
    # what a writer stores is what the README check reads back
    js, _ = bc.write_results(tmp_path, "x", {"provenance": p}, line + "\n")
    back = json.loads(js.read_text())["provenance"]
    assert provenance_problems({**back, "dirty": False}) == []


def test_provenance_without_the_compiler_or_a_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU bundle: no git checkout, no compiler import; the build's commit stands in."""
    monkeypatch.setattr(bc, "_git", lambda *a: None)
    p = bc.provenance(["gpu_side.py"], kernel_flags=False,
                      built={"commit": "a" * 40, "dirty": False, "versions": {}})
    assert p["commit"] == "a" * 40 and p["dirty"] is False and p["built"]["commit"] == "a" * 40
    assert p["cpu"]["kernel_flags"].startswith("not checked")
    assert bc.provenance(kernel_flags=False)["commit"] == bc.UNRECORDED


@pytest.mark.parametrize("status,dirty,paths", [
    ("", False, []),
    (" M benchmarks/results/x.json\n?? benchmarks/results/new.md\n?? out/demo/a\n", False, []),
    (" M qcompile/api.py\n?? out/a\n", True, ["qcompile/api.py"]),
    ("?? tests/new_test.py\n", True, ["tests/new_test.py"]),
    ("R  qcompile/a.py -> qcompile/b.py\n", True, ["qcompile/b.py"]),
])
def test_git_state_ignores_only_outputs(monkeypatch: pytest.MonkeyPatch, status: str, dirty: bool,
                                        paths: list[str]) -> None:
    monkeypatch.setattr(bc, "_git", lambda *a: "f" * 40 + "\n" if a[0] == "rev-parse" else status)
    st = bc.git_state()
    assert (st["commit"], st["dirty"], st["dirty_paths"]) == ("f" * 40, dirty, paths)
    assert bc.revision(st) == "fffffff" + ("+dirty" if dirty else "")


def test_corpus_refuses_a_dirty_tree(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    import corpus
    (tmp_path / "manifest.json").write_text(json.dumps({"models": [], "versions": {}}))
    dirty = {"commit": "e" * 40, "dirty": True, "dirty_paths": ["qcompile/api.py"]}
    monkeypatch.setattr(corpus, "git_state", lambda: dirty)
    monkeypatch.setattr(bc, "git_state", lambda: dirty)
    argv = ["corpus.py", "--corpus", str(tmp_path), "--out", str(tmp_path / "res")]
    monkeypatch.setattr(sys, "argv", argv)
    assert corpus.main() == 2
    assert "uncommitted changes (qcompile/api.py)" in capsys.readouterr().err
    assert not (tmp_path / "res").exists()
    monkeypatch.setattr(sys, "argv", [*argv, "--allow-dirty"])
    assert corpus.main() == 0
    data = json.loads(next((tmp_path / "res").glob("corpus-*.json")).read_text())
    assert data["compiler"] == "eeeeeee+dirty" and data["provenance"]["dirty"] is True
    assert "--allow-dirty" in data["provenance"]["command"]
    assert any(p.startswith("not from a clean commit") for p in provenance_problems(data["provenance"]))
