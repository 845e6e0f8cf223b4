"""The environment variables qcompile reads, read the same way by every stage:

    QCOMPILE_DEBUG        "" / "0" / unset: off; anything else: on (tracebacks, IR dumps)
    QCOMPILE_CACHE_DIR    the cache root (default ~/.cache/qcompile): latency, overhead,
                          sensitivity, tuning databases
    TVM_NUM_THREADS       TVM's pool size; ``qcompile/__init__.py`` defaults it to every core
    QCOMPILE_NO_AMX       on: x86 builds keep to the VNNI kernels (for artifacts that must
                          run on CPUs without AMX tiles)

Standard library only: the CLI reads these before deciding whether TVM is needed.
(``runtime/loader.py`` keeps its own TVM_NUM_THREADS default: bundles run it without qcompile.)
"""
from __future__ import annotations

import os
from pathlib import Path

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
