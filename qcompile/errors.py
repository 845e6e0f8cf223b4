"""Error classes, one per exit code, so the CLI can map failures to distinct statuses.

Every error carries a single-line message that names the offending node or option
and what to do about it; the CLI prints it and exits with ``exit_code``.
"""
from __future__ import annotations


class QCompileError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code: int = 1


class UsageError(QCompileError):
    """Bad option or argument (mirrors click's own usage code)."""

    exit_code = 2


class BadModelError(QCompileError):
    """Missing, truncated, non-ONNX, invalid or hostile model file."""

    exit_code = 3


class UnsupportedOpError(QCompileError):
    """The model uses an operator or attribute qcompile cannot lower."""

    exit_code = 4


class BuildError(QCompileError):
    """TVM failed to compile or export the module."""

    exit_code = 5


class DataError(QCompileError):
    """Calibration or evaluation data is missing or malformed."""

    exit_code = 6


class ArtifactError(QCompileError):
    """An artifact directory is missing, incomplete or from another version."""

    exit_code = 7


class InfeasibleBudgetError(QCompileError):
    """No bit plan satisfies the requested budgets."""

    exit_code = 8


class DeviceError(QCompileError):
    """The requested device (e.g. a CUDA GPU) is not present."""

    exit_code = 9


class AccumulatorOverflowError(QCompileError):
    """A layer's integer accumulator could leave int32 (static worst case), or its
    quantized bias does not fit int32: refused rather than wrapped or clipped."""

    exit_code = 10


class VerificationError(QCompileError):
    """The built artifact disagrees with the NumPy integer oracle (``compile``'s check)."""

    exit_code = 11


class FidelityError(QCompileError):
    """The compiled model is unfaithful to the float model (output SQNR under
    ``--min-sqnr`` on held-out inputs): refused, nothing written."""

    exit_code = 13


class NonFiniteInputError(QCompileError):
    """An input to run holds NaN or Inf values."""

    exit_code = 14


EXIT_CODES: dict[str, int] = {
    cls.__name__: cls.exit_code
    for cls in (UsageError, BadModelError, UnsupportedOpError, BuildError,
                DataError, ArtifactError, InfeasibleBudgetError, DeviceError,
                AccumulatorOverflowError, VerificationError, FidelityError,
                NonFiniteInputError)
}


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
