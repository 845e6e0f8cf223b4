"""The ``qcompile`` command line: parse, call ``qcompile.api``, print.

Every command is thin on purpose; behaviour lives in the API so scripts and the CLI
agree.  Errors the user can cause are ``QCompileError``s: they print one line,
``error: ...``, and exit with the class's code (see ``errors.py``).  Anything else is
a bug: one line and exit 70, or the traceback with ``QCOMPILE_DEBUG=1``.

``compile`` is the default command: ``qcompile model.onnx -o out/`` works.
"""
from __future__ import annotations

import json
import os
import warnings
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Sequence

import click
import numpy as np

from qcompile import __version__
from qcompile.runtime.artifact import check_output_dir
from qcompile.config import AUTO, ROUNDINGS, VERIFY_INPUTS, CalibSpec, FidelitySpec, QuantSpec
from qcompile.cli.options import (
    QCompileCommand, alloc_options, alloc_spec, alloc_unless_dry_run, arch_option, calib_options,
    data_option, fidelity_options, preprocess, preprocess_options, sensitivity_options)
from qcompile.env import debug
from qcompile.files import atomic_open
from qcompile.report.results import EvalResult
from qcompile.errors import ArtifactError, BadModelError, DataError, QCompileError, UsageError, one_line
from qcompile.hw.backends import BACKENDS, check_options

EXIT_INTERNAL = 70  # EX_SOFTWARE from sysexits.h
DEFAULT_COMMAND = "compile"
F = Callable[..., Any]


def _api() -> ModuleType:
    # Imported on use (TVM takes seconds), like every TVM-bound module here; a plain import
    # the layers contract sees. Tests swap this function for a fake.
    import qcompile.api
    return qcompile.api


def _version() -> str:
    def v(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "unknown"
    return f"{__version__} (apache-tvm {v('apache-tvm')}, onnx {v('onnx')})"


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    # Library warnings (e.g. synthetic calibration) as one line, not file:line + source.
    click.echo(f"warning: {one_line(str(message))}", err=True)


# ----------------------------------------------------------------------------- the group

class QCompileGroup(click.Group):
    """A group with a default command and one error policy for every command."""

    command_class = QCompileCommand

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if _wants_default(args, self.commands, ctx.help_option_names):
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        with warnings.catch_warnings():  # restores the caller's hooks (CliRunner, pytest)
            warnings.showwarning = _show_warning
            try:
                return super().invoke(ctx)
            except (click.exceptions.ClickException, click.exceptions.Exit,
                    click.exceptions.Abort):
                raise
            except QCompileError as e:
                click.echo(f"error: {one_line(str(e))}", err=True)
                ctx.exit(e.exit_code)
            except Exception as e:
                if debug():
                    raise
                click.echo(f"internal error: {type(e).__name__}: {one_line(str(e))}; "
                           "rerun with QCOMPILE_DEBUG=1 for the traceback", err=True)
                ctx.exit(EXIT_INTERNAL)


def _looks_like_model(arg: str) -> bool:
    return arg.lower().endswith(".onnx") or os.path.isfile(arg)


def _wants_default(args: Sequence[str], commands: dict[str, click.Command],
                   help_names: Sequence[str]) -> bool:
    """True when ``args`` are a ``compile`` invocation without the command name.

    The first word must not be a command; it is either the model itself or an option
    of ``compile`` (the group owns only --help/--version) with a model further on.
    """
    if not args or args[0] in commands:
        return False
    if args[0].startswith("-"):
        if args[0] in (*help_names, "--version"):
            return False
        return any(_looks_like_model(a) for a in args[1:] if not a.startswith("-"))
    return _looks_like_model(args[0])


@click.group(cls=QCompileGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), "--version", prog_name="qcompile", message="%(prog)s %(version)s")
def main() -> None:
    """Compile ONNX CNNs into integer-only quantized TVM modules.

    \b
    qcompile zoo resnet18 -o r18.onnx
    qcompile r18.onnx -o r18-int8/          (same as: qcompile compile ...)
    qcompile eval r18.onnx r18-int8/
    qcompile bench r18-int8/
    """


# ----------------------------------------------------------------------------- helpers

def _check_model(model: str) -> Path:
    path = Path(model)
    if not path.exists():
        raise BadModelError(f"{model}: no such file; pass the path of an .onnx model")
    if path.is_dir():
        raise BadModelError(f"{model}: is a directory; pass the .onnx file inside it")
    return path


def _check_artifact(art: str) -> Path:
    # Cheap early check; the runtime checks the files themselves when it loads them.
    path = Path(art)
    if not path.is_dir():
        raise ArtifactError(f"{art}: no such artifact directory; "
                            "create one with `qcompile compile MODEL -o DIR`")
    return path


def _load_npy(path: str) -> np.ndarray:
    if not Path(path).is_file():
        raise DataError(f"{path}: no such file; pass a .npy array")
    try:
        x = np.load(path, allow_pickle=False)  # never unpickle user files
    except Exception as e:
        raise DataError(f"{path}: not a readable .npy array ({one_line(str(e))})") from None
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "fiub":
        raise DataError(f"{path}: expected a numeric array, got {getattr(x, 'dtype', type(x))}")
    return x.astype(np.float32, copy=False)


def _save_npy(path: str, y: np.ndarray) -> None:
    with atomic_open(Path(path)) as f:  # readers never see half an array
        np.save(f, y, allow_pickle=False)


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _print_json(d: dict) -> None:
    click.echo(json.dumps(d, indent=2, default=_jsonable))


# ----------------------------------------------------------------------------- commands

@main.command("zoo")
@click.argument("name", required=False)
@click.option("-o", "--output", metavar="FILE", help="Where to write the .onnx file.")
@click.option("--list", "list_", is_flag=True, help="List the available architectures.")
@click.option("--input-size", type=int, default=None, metavar="N",
              help="Input height/width (default: the architecture's own).")
@click.option("--num-classes", type=int, default=1000, show_default=True, metavar="N")
@click.option("--seed", type=int, default=0, show_default=True, metavar="N")
def zoo_cmd(name: str | None, output: str | None, list_: bool, input_size: int | None,
            num_classes: int, seed: int) -> None:
    """Write a synthetic architecture (seeded random weights) as ONNX."""
    from qcompile.frontend import zoo  # onnx only; no TVM

    if list_:
        for n in sorted(zoo.ZOO):
            click.echo(n)
        return
    if name is None:
        raise UsageError("zoo needs a NAME (see `qcompile zoo --list`)")
    if output is None:
        raise UsageError("zoo needs -o FILE")
    model = zoo.build(name, input_size=input_size, num_classes=num_classes, seed=seed)
    path = zoo.save(model, output)
    dims = "x".join(str(d.dim_value or d.dim_param)
                    for d in model.graph.input[0].type.tensor_type.shape.dim)
    click.echo(f"wrote {path} ({name}, input {dims}, {path.stat().st_size / 1e6:.1f} MB)")


@main.command("compile")
@click.argument("model", metavar="MODEL")
@click.option("-o", "--output", "out", required=True, metavar="OUT",
              help="Artifact directory (new, empty, or a previous artifact).")
@click.option("--target", type=click.Choice(tuple(BACKENDS)), default="llvm", show_default=True)
@arch_option
@click.option("--bits", default="8", show_default=True, metavar="8|4|w8a8|w4a8|w4a4",
              help="Precision of the layers between the first and the last: 8 (W8A8), "
                   "4 (W4A4, weights and input activations), or a weight/activation pair "
                   "such as w4a8 (4-bit weights, 8-bit activations).")
@calib_options
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="Batch size the kernels are specialized for.")
@click.option("--kernels/--no-kernels", default=True, show_default=True,
              help="Use qcompile's scheduled kernels; --no-kernels uses TVM's generic "
                   "lowering (slow, but any batch size).")
@click.option("--tune", type=click.IntRange(min=0), default=0, show_default=True,
              metavar="TRIALS", help="Meta-schedule trials per unique shape of the ops no "
              "kernel covers (llvm); the database persists under ~/.cache/qcompile/tune.")
@click.option("--equalize/--no-equalize", default=False, show_default=True,
              help="Cross-layer equalization and bias absorption before calibration "
                   "(the float function is unchanged).")
@click.option("--bias-correction/--no-bias-correction", default=False, show_default=True,
              help="Empirical bias correction of the int32 biases on the calibration data.")
@click.option("--rounding", type=click.Choice(ROUNDINGS + (AUTO,)), default=AUTO,
              show_default=True,
              help="How weights become integers: round each to nearest, or gptq "
                   "(Hessian-aware GPTQ on the calibration data; slower to compile). "
                   "auto: gptq with --data DIR, nearest on synthetic data.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help=f"Run {VERIFY_INPUTS} inputs through the written artifact and the NumPy "
                   "integer oracle and require them bit-exact (exit 11 otherwise); recorded in the "
                   "manifest's `verified`. Skipped, with a note, for --target cuda without "
                   "a GPU of the --arch.")
@fidelity_options
@alloc_options
@preprocess_options
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or summary.")
def compile_cmd(model: str, out: str, target: str, arch: str | None, bits: str, data: str,
                calib_samples: int, calibrator: str, percentile: float, batch: int,
                kernels: bool, tune: int,
                equalize: bool, bias_correction: bool, rounding: str, verify: bool,
                min_sqnr: float, fidelity_samples: int, size: int | None, resize: int,
                mean: str | None, std: str | None, layout: str | None, input_shape: str | None,
                quiet: bool, budget_latency: str | None, budget_size: str | None, budget_bops: str | None,
                pins: tuple[str, ...], pin_dry_run: bool, sens_method: str,
                sensitivity_samples: int) -> None:
    """Quantize MODEL and build an integer-only TVM artifact in OUT.

    With a --budget-* option each conv/dense gets 4 or 8 bits from an ILP over the
    layers' sensitivity and their latency measured on the target."""
    # Step 1. Everything cheap first: no TVM import or calibration before this passes.
    check_options(target, arch, tune=tune)
    fidelity = FidelitySpec(min_sqnr, fidelity_samples)
    model_path, out_path = _check_model(model), Path(out)
    alloc = alloc_unless_dry_run(model_path, alloc_spec(budget_latency, budget_size, budget_bops,
                                                         pins, sens_method, sensitivity_samples),
                                  pin_dry_run, input_shape)
    if alloc is None:
        return
    check_output_dir(out_path, protect=(model_path,))
    quant = QuantSpec(bits=int(bits) if bits.isdigit() else bits, equalize=equalize,
                      bias_correction=bias_correction,
                      rounding=rounding)
    calib_spec = CalibSpec(source=data, method=calibrator, num_samples=calib_samples,
                           percentile=percentile,
                           preprocess=preprocess(model_path, size, resize, mean, std, layout, input_shape))
    # Step 2. The work.
    res = _api().compile_model(model_path, out_path, target=target, arch=arch, quant=quant,
                               calib=calib_spec, progress=not quiet, batch=batch, kernels=kernels,
                               alloc=alloc, tune=tune,
                               verify=VERIFY_INPUTS if verify else 0,
                               fidelity=fidelity)
    if not quiet:
        core = "integer-only" if res.integer_only else "NOT integer-only"
        v = res.verified
        checked = ("not verified" if v is None else
                   f"bit-exact vs the oracle on {v.inputs} inputs" if v.bit_exact
                   else "oracle check skipped")
        click.echo(f"compiled {model} -> {res.out_dir} in {res.compile_seconds:.1f} s "
                   f"({res.num_layers} layers, {core}, {checked}); "
                   f"see {Path(res.out_dir) / 'report.md'}")
        if res.fidelity is not None:
            click.echo(f"fidelity: {res.fidelity.line()}")


@main.command("allocate")
@click.argument("model", metavar="MODEL")
@click.option("--target", type=click.Choice(tuple(BACKENDS)), default="llvm", show_default=True,
              help="llvm: latencies measured on this CPU's kernels; cuda: the roofline "
                   "model of the --arch GPU (predicted).")
@arch_option
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, metavar="N")
@calib_options
@alloc_options
@click.option("--pareto", is_flag=True, help="Also sweep the budget from all-INT4 to all-INT8 "
              "and write the frontier (JSON, Markdown, PNG with the plots extra).")
@click.option("--pareto-dir", default="pareto", show_default=True, metavar="DIR")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@preprocess_options
def allocate_cmd(model: str, target: str, arch: str | None, batch: int, data: str,
                 calib_samples: int, calibrator: str, percentile: float,
                 budget_latency: str | None, budget_size: str | None,
                 budget_bops: str | None,
                 pins: tuple[str, ...], pin_dry_run: bool, sens_method: str,
                 sensitivity_samples: int, pareto: bool, pareto_dir: str, as_json: bool,
                 size: int | None, resize: int, mean: str | None, std: str | None,
                 layout: str | None, input_shape: str | None) -> None:
    """Choose 4 or 8 bits per layer of MODEL under the budgets, without compiling."""
    check_options(target, arch)
    model_path = _check_model(model)
    alloc = alloc_unless_dry_run(model_path, alloc_spec(budget_latency, budget_size, budget_bops,
                                                         pins, sens_method, sensitivity_samples),
                                  pin_dry_run, input_shape)
    if alloc is None:
        return
    calib_spec = CalibSpec(source=data, method=calibrator, num_samples=calib_samples,
                           percentile=percentile,
                           preprocess=preprocess(model_path, size, resize, mean, std, layout, input_shape))
    res = _api().allocate_model(model_path, target=target, arch=arch, alloc=alloc,
                                calib=calib_spec, batch=batch, progress=not as_json,
                                pareto_dir=pareto_dir if pareto else None)
    if as_json:
        _print_json(res.to_json())
        return
    plan = res.allocation.plan
    click.echo(f"{res.model} on {res.target} (latency {res.allocation.cost.source}):")
    click.echo(f"  predicted latency {plan.predicted_latency_ms:.3f} ms, size "
               f"{plan.size_mb:.2f} MB, {plan.bops_g:.1f} G BOPs, sum Omega "
               f"{plan.objective:.4g}")
    width = max(len(name) for name in plan.bits)
    for name, b in plan.bits.items():
        click.echo(f"  {name:<{width}}  {b}  {plan.reasons[name]}")
    if res.pareto is not None:
        click.echo(f"Pareto frontier ({res.pareto.points} points): {res.pareto.markdown}")


@main.command("sensitivity")
@click.argument("model", metavar="MODEL")
@sensitivity_options
@data_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@preprocess_options
def sensitivity_cmd(model: str, sens_method: str, sensitivity_samples: int, data: str,
                    as_json: bool, size: int | None, resize: int, mean: str | None,
                    std: str | None, layout: str | None, input_shape: str | None) -> None:
    """Per-layer sensitivity Omega(4), Omega(8) of MODEL (cached on disk)."""
    model_path = _check_model(model)
    calib_spec = CalibSpec(source=data, num_samples=sensitivity_samples,
                           preprocess=preprocess(model_path, size, resize, mean, std, layout, input_shape))
    res = _api().sensitivity_model(model_path, method=sens_method, calib=calib_spec,
                                   num_samples=sensitivity_samples, progress=not as_json)
    if as_json:
        _print_json(res.to_json())
        return
    width = max(len(n) for n in res.omega)
    click.echo(f"{'layer':<{width}}  {'Omega(4)':>10}  {'Omega(8)':>10}")
    for name, per in res.omega.items():
        click.echo(f"{name:<{width}}  {per[4]:10.4g}  {per[8]:10.4g}")


@main.command("run")
@click.argument("art", metavar="ART")
@click.option("-i", "--input", "inp", required=True, metavar="X.npy", help="Float input array.")
@click.option("-o", "--output", required=True, metavar="Y.npy", help="Where to write the output.")
def run_cmd(art: str, inp: str, output: str) -> None:
    """Run artifact ART on a .npy input and save the float32 output."""
    art_path = _check_artifact(art)
    x = _load_npy(inp)
    y = np.asarray(_api().run_artifact(art_path, x))
    _save_npy(output, y)
    click.echo(f"wrote {output} {y.dtype}{list(y.shape)}")


@main.command("eval")
@click.argument("model", metavar="MODEL")
@click.argument("art", metavar="ART")
@click.option("--data", metavar="DIR", default=None,
              help="Inputs (.npy/.npz or images); default: the API's own choice.")
@click.option("--eval-samples", type=click.IntRange(min=1), default=64, show_default=True,
              metavar="N", help="Inputs evaluated.")
@preprocess_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_cmd(model: str, art: str, data: str | None, eval_samples: int, size: int | None,
             resize: int, mean: str | None, std: str | None, layout: str | None,
             input_shape: str | None, as_json: bool) -> None:
    """Compare artifact ART with MODEL in onnxruntime FP32 and the integer oracle."""
    model_path, art_path = _check_model(model), _check_artifact(art)
    ctx = click.get_current_context()
    # Only override the artifact's recorded preprocessing when asked to.
    touched = any(ctx.get_parameter_source(p) != click.core.ParameterSource.DEFAULT
                  for p in ("size", "resize", "mean", "std", "layout", "input_shape"))
    pre = preprocess(model_path, size, resize, mean, std, layout, input_shape) if touched else None
    res = _api().evaluate(model_path, art_path, data=data, num_samples=eval_samples,
                          preprocess=pre, progress=not as_json)
    if as_json:
        _print_json(res.to_json())
    else:
        _print_eval(res)


def _yes(b: Any) -> str:
    return "yes" if b else "NO"


def _print_eval(r: EvalResult) -> None:
    rows = [("bit-exact vs NumPy oracle", _yes(r.bit_exact)),
            ("integer-only core", _yes(r.integer_only)),
            ("top-1 agreement vs FP32", f"{100 * r.top1_agreement:.1f}%"),
            ("output SQNR vs FP32", f"{r.sqnr_db:.1f} dB")]
    if r.accuracy is not None:
        fp = f" (FP32 {100 * r.float_accuracy:.1f}%)" if r.float_accuracy is not None else ""
        rows.append(("top-1 accuracy", f"{100 * r.accuracy:.1f}%{fp}"))
    rows.append(("samples", str(r.num_samples)))
    for k, v in rows:
        click.echo(f"{k:<28}{v}")
    if r.layers:
        width = max(len(layer.name) for layer in r.layers)
        click.echo(f"\n{'layer':<{width}}  SQNR dB")
        for layer in r.layers:
            click.echo(f"{layer.name:<{width}}  {layer.sqnr_db:7.1f}")


@main.command("bench")
@click.argument("art", metavar="ART")
@click.option("--batch", type=click.IntRange(min=1), default=None, metavar="N",
              help="Batch size (default: the batch the artifact was compiled for).")
@click.option("--repeat", type=click.IntRange(min=1), default=50, show_default=True, metavar="N")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, metavar="N")
@click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N",
              help="TVM threads (default: TVM_NUM_THREADS, else every core).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def bench_cmd(art: str, batch: int | None, repeat: int, warmup: int, threads: int | None,
              as_json: bool) -> None:
    """Time artifact ART on random input (after warm-up runs)."""
    res = _api().bench_artifact(_check_artifact(art), batch=batch, repeat=repeat, warmup=warmup,
                                threads=threads)
    if as_json:
        _print_json(res.to_json())
        return
    # trtexec-style: the latency distribution first, then throughput.
    click.echo(f"Latency: min = {res.min_ms:.3f} ms, max = {res.max_ms:.3f} ms, "
               f"mean = {res.mean_ms:.3f} ms, median = {res.median_ms:.3f} ms, "
               f"p90 = {res.p90_ms:.3f} ms, p99 = {res.p99_ms:.3f} ms "
               f"(batch {res.batch}, {res.repeat} runs, {res.threads} threads)")
    click.echo(f"Throughput: {res.throughput_ips:.1f} inferences/s")


@main.command("inspect")
@click.argument("art", metavar="ART")
@click.option("--sass", is_flag=True, help="Machine-code histograms (SASS for CUDA, x86 asm for CPU).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def inspect_cmd(art: str, sass: bool, as_json: bool) -> None:
    """List ART's kernels, the layer each serves, and their hot instructions."""
    from qcompile.cli.inspect_artifact import inspect_artifact

    res = inspect_artifact(_check_artifact(art))
    if not sass:
        for k in res["kernels"]:
            k.pop("histogram")
    if as_json:
        _print_json(res)
        return
    click.echo(f"{res['artifact']} ({res['target']}): {len(res['kernels'])} kernels")
    for k in res["kernels"]:
        hot = ", ".join(f"{n} {c}" for n, c in k["hot"].items()) or "-"
        # CUDA: native / emulated tensor-core math on the artifact's arch
        tc = f"{k['tensor_cores']:<9}" if "tensor_cores" in k else ""
        click.echo(f"  {k['kernel']:<48} {k['layer']:<28} {k['instructions']:>6} instr  "
                   f"{tc}{hot}")
    click.echo(f"  other code: {res['other_code']['instructions']} instr; totals: "
               + ", ".join(f"{n} {c}" for n, c in res["totals"].items() if c))



@main.command("bundle")
@click.argument("arts", nargs=-1, required=True, metavar="ART...")
@click.option("-o", "--output", "out", required=True, metavar="DIR",
              help="Bundle folder (new, empty, or an earlier bundle).")
@click.option("--python", "pythons", multiple=True, metavar="X.Y",
              help="Also run under this CPython version (repeatable; the builder's own is "
                   "always included).")
@click.option("--ffi-wheel", "wheels", multiple=True, metavar="WHL",
              type=click.Path(exists=True, dir_okay=False),
              help="apache-tvm-ffi wheel to take a --python core from (else pip downloads it).")
def bundle_cmd(arts: tuple[str, ...], out: str, pythons: tuple[str, ...],
               wheels: tuple[str, ...]) -> None:
    """Pack artifacts with TVM's runtime alone: a folder that runs them where only Python and
    numpy are installed (`python DIR/run.py --input x.npy --output y.npy`)."""
    from qcompile.runtime.bundle import make_bundle

    r = make_bundle([_check_artifact(a) for a in arts], Path(out), pythons=pythons,
                    wheels=[Path(w) for w in wheels])
    mib = 2 ** 20
    click.echo(f"wrote {r.out}: {len(r.models)} model(s), {r.total_bytes / mib:.1f} MiB "
               f"(runtime {r.runtime_bytes / mib:.1f}, weights {r.weights_bytes / mib:.1f}); "
               f"Python {', '.join(r.pythons)}")
    which = " --model NAME" if len(r.models) > 1 else ""
    click.echo(f"run it: python {r.out}/run.py{which} --input x.npy --output y.npy")


@main.command("ops")
def ops_cmd() -> None:
    """Print the supported ONNX ops and what each becomes inside the integer core."""
    from qcompile.ops import ops_table

    click.echo(ops_table(), nl=False)


if __name__ == "__main__":
    main()
