"""The options the ``qcompile`` commands share, declared once: preprocessing, data and
calibration, the sensitivity measure, budgets and pins, ``--arch``; and the old spellings
of renamed options (``RENAMED``), which still work with a one-line deprecation warning."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click

from qcompile.config import (
    AUTO, CALIBRATORS, LAYOUTS, SENSITIVITY_METHODS, AllocSpec, CalibSpec, FidelitySpec,
    Preprocess, parse_shape)
from qcompile.errors import UsageError
from qcompile.hw.facts import CUDA_ARCHS, DEFAULT_ARCH

F = Callable[..., Any]


# Old option spellings per command -> the one spelling every command now uses: sample
# counts are --<stage>-samples, data is --data, the sensitivity measure --sensitivity.
# The old ones still work, with a one-line deprecation warning.
RENAMED: dict[str, dict[str, str]] = {
    "compile": {"--calib": "--data"},
    "allocate": {"--calib": "--data"},
    "sensitivity": {"--calib": "--data", "--samples": "--sensitivity-samples",
                    "--method": "--sensitivity"},
    "eval": {"--num-samples": "--eval-samples"},
}


class QCompileCommand(click.Command):
    """A command that still takes its old option spellings (``RENAMED``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        renamed, out = RENAMED.get(self.name or "", {}), []
        for i, arg in enumerate(args):
            if arg == "--":  # what follows are arguments, never options
                out += args[i:]
                break
            opt, eq, value = arg.partition("=")
            if opt in renamed:
                click.echo(f"warning: {opt} is deprecated; use {renamed[opt]}", err=True)
                arg = renamed[opt] + eq + value
            out.append(arg)
        return super().parse_args(ctx, out)


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{option} takes comma-separated numbers like 0.5,0.5,0.5; "
                         f"got {text!r}") from None
    if len(values) not in (1, 3):
        raise UsageError(f"{option} takes 1 or 3 values, got {len(values)}")
    return values


def _model_dims(model: Path, input_shape: tuple[int, ...] | None) -> list[int]:
    """The model input's dims (0 where symbolic), or ``input_shape``; [] when unknowable."""
    if input_shape is not None:
        return list(input_shape)
    try:
        import onnx  # deferred: only compile/eval with images need it
        graph = onnx.load(str(model), load_external_data=False).graph
        inits = {t.name for t in graph.initializer}
        # max(.., 0): a negative dim reads as symbolic here; the loader refuses it (exit 3).
        return [max(d.dim_value, 0) for d in next(i for i in graph.input if i.name not in inits)
                .type.tensor_type.shape.dim]
    except Exception:  # any failure: fall back to defaults, the API will say what's wrong
        return []


def _guess_layout(dims: list[int]) -> str:
    """NHWC when the last axis looks like colour channels and axis 1 does not (TF exports)."""
    if len(dims) == 4 and dims[3] in (1, 3, 4) and dims[1] not in (1, 3, 4):
        return "NHWC"
    return "NCHW"


def _model_input(model: Path, layout: str, input_shape: tuple[int, ...] | None = None
                 ) -> tuple[int | None, int | None]:
    """(spatial size, channels) of the model's input when cheaply knowable, else None.

    Only a default for --size and grayscale; the API reports broken models properly.
    """
    dims = _model_dims(model, input_shape)
    if len(dims) != 4:
        return None, None
    c, h = (dims[1], dims[2]) if layout == "NCHW" else (dims[3], dims[1])
    return (h or None), (c or None)


def preprocess(model: Path, size: int | None, resize: int, mean: str | None, std: str | None,
                layout: str | None, input_shape: str | None = None) -> Preprocess:
    """Preprocess from options; unset --size, --layout and the channel count follow the
    model's input (or ``--input-shape``)."""
    fixed = parse_shape(input_shape) if input_shape else None
    layout = layout or _guess_layout(_model_dims(model, fixed))
    model_size, channels = _model_input(model, layout, fixed)
    gray = channels == 1
    m, s = _floats(mean, "--mean"), _floats(std, "--std")
    base = Preprocess()
    if gray:  # ImageNet's per-channel defaults don't apply to one channel
        m, s = m or (0.5,), s or (0.5,)
    m, s = m or base.mean, s or base.std
    # One value stands for every channel: "--std 0.5" next to a 3-value mean.
    n = max(len(m), len(s))
    m, s = (m * n if len(m) == 1 else m), (s * n if len(s) == 1 else s)
    return Preprocess(size=size or model_size or base.size, resize=resize, mean=m, std=s,
                      layout=layout, grayscale=gray, input_shape=fixed)


def _options(*opts: Callable[[F], F]) -> Callable[[F], F]:
    """Several click options as one decorator, in --help order."""
    def apply(f: F) -> F:
        for opt in reversed(opts):
            f = opt(f)
        return f
    return apply


# Image preprocessing (compile, allocate, sensitivity, eval).
preprocess_options = _options(
    click.option("--size", type=click.IntRange(min=1), default=None, metavar="N",
                 help="Centre-crop size (default: the model's input size)."),
    click.option("--resize", type=click.IntRange(min=0), default=0, metavar="N",
                 help="Resize the short side to N before cropping (default: --size)."),
    click.option("--mean", metavar="a,b,c", help="Per-channel mean, after scaling to [0,1] "
                 "(default: ImageNet)."),
    click.option("--std", metavar="a,b,c", help="Per-channel std (default: ImageNet)."),
    click.option("--layout", type=click.Choice(LAYOUTS), default=None,
                 help="Model input layout (default: NHWC when the input's last axis "
                      "has 1, 3 or 4 channels, else NCHW)."),
    click.option("--input-shape", metavar="NxCxHxW", default=None,
                 help="Fix the model input's symbolic dimensions, e.g. 1x3x224x224 "
                      "(the batch entry is ignored: see --batch)."))

data_option = click.option(
    "--data", default="synthetic", show_default=True, metavar="DIR|synthetic",
    help="Calibration data: a folder of .npy/.npz arrays or images (labels not needed).")

# Calibration (compile, allocate: the same options, so a compile line can be reused).
calib_options = _options(
    data_option,
    click.option("--calib-samples", type=int, default=CalibSpec().num_samples,  # CalibSpec
                 show_default=True, metavar="N", help="Calibration samples."),  # checks it
    click.option("--calibrator", type=click.Choice(CALIBRATORS + (AUTO,)), default=AUTO,
                 show_default=True, help="auto: mse with --data DIR, minmax on synthetic data."),
    click.option("--percentile", type=float, default=CalibSpec().percentile, show_default=True,
                 metavar="P", help="Used by --calibrator percentile."))

# The sensitivity measure (compile, allocate, sensitivity).
fidelity_options = _options(
    click.option("--min-sqnr", type=float, default=FidelitySpec().min_sqnr_db, show_default=True,
                 metavar="DB", help="Fidelity guard: refuse (exit 13, nothing written) when "
                 "the output SQNR against onnxruntime FP32 on held-out inputs is under DB; "
                 "0 records it without refusing."),
    click.option("--fidelity-samples", type=click.IntRange(min=0),
                 default=FidelitySpec().samples, show_default=True, metavar="N",
                 help="Held-out inputs the guard runs: --data samples past --calib-samples, "
                      "else a quarter of them held back from calibration (0: no guard)."),
)
sensitivity_options = _options(
    click.option("--sensitivity", "sens_method", type=click.Choice(SENSITIVITY_METHODS),
                 default="hessian", show_default=True,
                 help="hessian: Tr(H)/n * ||Q(W)-W||^2 (HAWQ-V3); kl: output KL, forward only."),
    click.option("--sensitivity-samples", type=click.IntRange(min=1),
                 default=AllocSpec().sensitivity_samples, show_default=True, metavar="N",
                 help="Calibration samples the sensitivity is measured on."))

# Mixed-precision budgets and pins (compile, allocate).
alloc_options = _options(
    click.option("--budget-latency", metavar="L",
                 help="Latency budget: 6ms, or alpha in [0,1] = all-INT4 + alpha * "
                      "(all-INT8 - all-INT4)."),
    click.option("--budget-size", metavar="S", help="Weight size budget: 15MB, or alpha."),
    click.option("--budget-bops", metavar="B", help="BOPs budget: 100G, 2T, or alpha."),
    click.option("--pin", "pins", multiple=True, metavar="GLOB=BITS",
                 help="Fix matching layers' bits, e.g. 'layer4.*=8' (repeatable). The first "
                      "and last layers are pinned to 8 unless a pin says otherwise."),
    click.option("--pin-dry-run", is_flag=True, help="Print what each --pin matches and exit."),
    sensitivity_options)


def alloc_spec(budget_latency: str | None, budget_size: str | None, budget_bops: str | None,
                pins: tuple[str, ...], sens_method: str, sensitivity_samples: int) -> AllocSpec:
    return AllocSpec(latency=budget_latency, size=budget_size, bops=budget_bops,
                     pins=tuple(pins), sensitivity=sens_method,
                     sensitivity_samples=sensitivity_samples)


def arch_option(f: F) -> F:
    """``--arch`` beside ``--target`` (checked by ``targets.check_arch``, not click, so an
    unknown one is the usual one-line usage error listing the valid ones)."""
    archs = ", ".join(f"{a} ({r.gpu.removeprefix('NVIDIA ')})" for a, r in CUDA_ARCHS.items())
    return click.option("--arch", default=None, metavar="SM",
                        help=f"CUDA architecture for --target cuda: {archs}; default "
                             f"{DEFAULT_ARCH}.")(f)


def alloc_unless_dry_run(model: Path, alloc: AllocSpec, pin_dry_run: bool,
                         input_shape: str | None) -> AllocSpec | None:
    """``alloc``; or None, after printing what each --pin matches (--pin-dry-run)."""
    if not pin_dry_run:
        return alloc
    from qcompile.api import pin_matches  # TVM-free commands never import the API

    shape = parse_shape(input_shape) if input_shape else None
    for pin, names in pin_matches(model, alloc.pins, shape).items():
        click.echo(f"{pin}: {len(names)} layer(s)" + (": " + ", ".join(names) if names else ""))
    return None
