"""Atomic output: build a directory next to the target, then rename it into place.
(Single files: ``files.atomic_open``.)"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from qcompile.errors import UsageError

MANIFEST = "manifest.json"


def check_output_dir(out: Path, protect: tuple[Path, ...] = (), marker: str = MANIFEST,
                     what: str = "artifact") -> None:
    """Refuse outputs that would destroy something that is not a qcompile ``what``
    (a directory holding ``marker``)."""
    out = Path(out)
    for p in protect:
        if p.exists() and out.resolve() == Path(p).resolve():
            raise UsageError(f"-o {out} is the input model; choose another output directory")
        if p.exists() and Path(p).resolve().is_relative_to(out.resolve()):
            raise UsageError(f"-o {out} contains the input model; choose another output directory")
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"-o {out} exists and is not a directory; choose another path")
        if any(out.iterdir()) and not (out / marker).is_file():
            raise UsageError(f"-o {out} is a non-empty directory that is not a qcompile "
                             f"{what}; refusing to overwrite it")


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temp dir beside ``out``; on success it replaces ``out`` atomically.

    On any error the temp dir is removed and ``out`` is left exactly as it was.
    An existing artifact is moved aside first and deleted only after the rename.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rmdir(old)
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
