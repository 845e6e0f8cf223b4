"""Files written atomically (a reader never sees half a file, a failure leaves the old one),
and JSON caches that survive a corrupt or concurrently rewritten file. Standard library only.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, Mapping


@contextlib.contextmanager
def atomic_open(path: Path) -> Iterator[IO[bytes]]:
    """A binary file that appears at ``path`` whole, when the block succeeds.

    A temp file in the same directory, flushed to disk, then ``os.replace``: readers
    never see half a file, and on any error ``path`` is left as it was. Mode 0644:
    mkstemp's 0600 would surprise anyone sharing the output or the cache.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (``atomic_open``)."""
    with atomic_open(path) as f:
        f.write(data)


def write_json(path: Path, data: Any, *, sort_keys: bool = False) -> None:
    """``data`` as indented JSON, written atomically."""
    atomic_write_bytes(path, (json.dumps(data, indent=1, sort_keys=sort_keys) + "\n").encode())


def read_json(path: Path) -> Any | None:
    """The JSON in ``path``; None when it is missing, unreadable or corrupt."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def save_cache(path: Path, data: Any) -> None:
    """``write_json`` for a cache: one that cannot be written only costs a recomputation
    next time, so it warns instead of failing the run."""
    try:
        write_json(path, data, sort_keys=True)
    except OSError as e:
        warnings.warn(f"cache not written ({path}): {e}", stacklevel=3)


@dataclass(frozen=True)
class JsonCache:
    """A JSON file of entries (key -> JSON value) that several processes may share.

    A missing or corrupt file, or one of another ``format``, reads as empty (it is only
    a cache) and the next ``update`` rewrites it whole. With ``format`` the file is
    ``{"format": N, "entries": {...}}``; without, it is the entries themselves.
    """

    path: Path
    format: int | None = None

    def load(self) -> dict[str, Any]:
        data = read_json(self.path)
        if self.format is not None:
            data = (data.get("entries") if isinstance(data, dict)
                    and data.get("format") == self.format else None)
        return dict(data) if isinstance(data, dict) else {}

    def update(self, new: Mapping[str, Any]) -> dict[str, Any]:
        """Merge ``new`` into the file and return every entry. The file is re-read right
        before the write, so entries another process added meanwhile survive; two
        writers at the same instant lose at most each other's new entries."""
        entries = self.load()
        entries.update(new)
        save_cache(self.path, entries if self.format is None
                   else {"format": self.format, "entries": entries})
        return entries
