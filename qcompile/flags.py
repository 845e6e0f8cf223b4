"""Shared plumbing: environment flags, the cache directory, TVM's thread count, atomic
writes, JSON caches that survive a corrupt file, and the one-line form of an error.

Every stage reads these from here, so they behave the same everywhere:

    QCOMPILE_DEBUG        "" / "0" / unset: off; anything else: on (tracebacks, IR dumps)
    QCOMPILE_CACHE_DIR    the cache root (default ~/.cache/qcompile): latency, overhead,
                          sensitivity, tuning databases
    TVM_NUM_THREADS       defaulted to every core when this module is imported
    QCOMPILE_NO_AMX       on: x86 builds keep to the VNNI kernels (for artifacts that must
                          run on CPUs without AMX tiles)

Standard library only: the CLI imports it before deciding whether TVM is needed.
(``loader.py`` keeps its own TVM_NUM_THREADS default: bundles run it without qcompile.)
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

DEBUG_ENV = "QCOMPILE_DEBUG"
CACHE_ENV = "QCOMPILE_CACHE_DIR"
THREADS_ENV = "TVM_NUM_THREADS"
NO_AMX_ENV = "QCOMPILE_NO_AMX"


def env_flag(name: str) -> bool:
    """An on/off environment variable: unset, "" and "0" are off, anything else is on."""
    return os.environ.get(name, "") not in ("", "0")


def debug() -> bool:
    """``QCOMPILE_DEBUG``: tracebacks instead of one-line internal errors, IR dumps."""
    return env_flag(DEBUG_ENV)


def cache_dir(*parts: str) -> Path:
    """``$QCOMPILE_CACHE_DIR`` (default ``~/.cache/qcompile``) joined with ``parts``."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root) if root else Path.home() / ".cache" / "qcompile").joinpath(*parts)


def tvm_threads() -> int:
    """TVM's thread-pool size, ``TVM_NUM_THREADS`` defaulted to every core.

    TVM's pool defaults to half the hardware threads on x86 (1 of 2 here) and reads the
    variable once, at its first parallel call: it must be set before any kernel runs,
    or every timing and run is single-threaded on a 2-vCPU machine.
    """
    return int(os.environ.setdefault(THREADS_ENV, str(os.cpu_count() or 1)))


tvm_threads()  # at import: every module that runs kernels imports this one first


def error_line(e: BaseException | str, *, last: bool = False) -> str:
    """The first (or ``last``) non-empty line of an error, else the exception's class
    name: TVM's messages carry whole tracebacks, and the CLI prints one line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return "" if isinstance(e, str) else type(e).__name__
    return lines[-1] if last else lines[0]


def one_line(text: str) -> str:
    """All of ``text``'s lines joined into one (a multi-line message, printed whole)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


# ----------------------------------------------------------------------------- files
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
