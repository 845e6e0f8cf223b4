"""What an artifact's kernels compiled to: instruction histograms per kernel.

CPU artifacts are disassembled with binutils' ``objdump``; each kernel PrimFunc
becomes a few symbols (the FFI wrapper and ``<name>_compute_`` bodies), which
are summed per kernel.  ``CPU_HOT``/``CUDA_HOT`` list the instructions users look
for first. Which of the two reports an artifact gets is its backend's ``inspect``.
"""
from __future__ import annotations

import collections
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable, Mapping

from qcompile.errors import ArtifactError, DeviceError
from qcompile.runtime.run import REQUIRED
from qcompile.verify import cuda_tools  # read at call time: tests stand in for the tools

CPU_HOT = ("vpdpbusd", "tdpbusd", "vpmaddubsw", "vpmaddwd", "vpmuldq", "vpmullq", "vmovdqu8",
           "vpbroadcastd")
CUDA_HOT = ("IMMA", "HMMA", "CALL", "LDS", "LDG", "SHFL", "BAR")
_SYMBOL = re.compile(r"^[0-9a-f]+ <(.+)>:$")


def _objdump(so: Path) -> dict[str, collections.Counter]:
    tool = shutil.which("objdump")
    if tool is None:
        raise ArtifactError("objdump (binutils) is needed to inspect CPU code; "
                            "install it with `apt-get install binutils`")
    text = subprocess.run([tool, "-d", "--no-show-raw-insn", str(so)], check=True,
                          capture_output=True, text=True).stdout
    out: dict[str, collections.Counter] = {}
    current: collections.Counter | None = None
    for line in text.splitlines():
        m = _SYMBOL.match(line)
        if m:
            current = out.setdefault(m.group(1), collections.Counter())
            continue
        parts = line.split("\t")
        if current is not None and len(parts) >= 2 and parts[-1].strip():
            current[parts[-1].split()[0]] += 1
    return out


def inspect_artifact(art_dir: str | Path) -> dict:
    """Per kernel: its name, the layer it serves, and its instruction histogram."""
    art = Path(art_dir)
    if not all((art / f).is_file() for f in REQUIRED):
        raise ArtifactError(f"{art} is not a qcompile artifact; create one with "
                            "`qcompile compile MODEL -o DIR`")
    manifest = json.loads((art / "manifest.json").read_text())
    kind = manifest["target"]["kind"]
    if kind not in INSPECTORS:
        raise ArtifactError(f"{art}: unknown target kind {kind!r} in manifest.json; "
                            "recompile it with this qcompile")
    return INSPECTORS[kind](art, manifest)


def inspect_cpu(art: Path, manifest: Mapping[str, Any]) -> dict:
    """x86 code per kernel PrimFunc (objdump of module.so)."""
    funcs: dict[str, str] = manifest.get("kernel_funcs", {})
    symbols = _objdump(art / "module.so")
    kernels = []
    for fname in sorted(funcs, key=len, reverse=True):
        hist: collections.Counter = collections.Counter()
        for sym in [s for s in symbols if s == fname or s.startswith(fname + "_compute")]:
            hist += symbols.pop(sym)
        kernels.append({"kernel": fname, "layer": funcs[fname], "instructions": sum(hist.values()),
                        "hot": {h: hist[h] for h in CPU_HOT if hist[h]},
                        "histogram": dict(hist.most_common())})
    generic: collections.Counter = collections.Counter()
    for sym, hist in symbols.items():
        if sym.startswith("__tvm_ffi_") or "@plt" in sym:
            continue
        generic += hist
    kernels.sort(key=lambda k: k["kernel"])
    return {"artifact": str(art), "target": manifest["target"]["str"], "kernels": kernels,
            "other_code": {"instructions": sum(generic.values()),
                           "hot": {h: generic[h] for h in CPU_HOT if generic[h]}},
            "totals": {h: sum(k["hot"].get(h, 0) for k in kernels) for h in CPU_HOT}}


def inspect_cuda(art: Path, manifest: Mapping[str, Any]) -> dict:
    """SASS of the fatbin embedded in module.so, per kernel (cuobjdump), with each kernel's
    tensor-core math for the artifact's arch: ``native``, ``emulated`` or ``-`` (none)."""
    funcs: dict[str, str] = manifest.get("kernel_funcs", {})
    absent = [t for t in ("cuobjdump", "nvdisasm") if cuda_tools.tool_path(t) is None]
    if absent:
        raise DeviceError(f"{' and '.join(absent)} not found: reading a CUDA artifact's SASS "
                          "needs them; pip install 'qcompile[cuda]' (nvidia-cuda-cuobjdump, "
                          "nvidia-cuda-nvdisasm)")
    fatbins = cuda_tools.embedded_fatbins((art / "module.so").read_bytes())
    if not fatbins:
        raise ArtifactError(f"{art}/module.so embeds no fatbin; rebuild with `--target cuda`")
    sass: dict[str, dict[str, int]] = {}
    archs: set[str] = set()
    subs: dict[str, tuple[str, ...]] = {}
    for fb in fatbins:
        sass.update(cuda_tools.sass_histogram(fb))
        info = cuda_tools.elf_info(fb)
        archs |= info.archs
        subs.update(info.subroutines)
    planned: dict[str, dict] = manifest.get("tensor_cores", {})
    kernels = []
    for kname, hist in sorted(sass.items()):
        # device kernels are named <func>_kernel (TVM's split of a PrimFunc into launches)
        func = next((f for f in sorted(funcs, key=len, reverse=True) if kname.startswith(f)), "")
        hot = {h: sum(c for op, c in hist.items() if op.split(".")[0] == h) for h in CUDA_HOT}
        imma = {op: c for op, c in hist.items() if op.startswith("IMMA")}
        kernels.append({"kernel": kname, "layer": funcs.get(func, ""),
                        "instructions": sum(hist.values()),
                        "tensor_cores": tensor_core_math(hist, subs.get(kname, ()),
                                                         planned.get(func, {}).get("bits")),
                        "hot": {**{k: v for k, v in hot.items() if v}, **imma},
                        "histogram": dict(sorted(hist.items(), key=lambda kv: -kv[1]))})
    return {"artifact": str(art), "target": manifest["target"]["str"],
            "arch": manifest["target"].get("arch", "sm_75"), "sass_archs": sorted(archs),
            "kernels": kernels, "other_code": {"instructions": 0, "hot": {}},
            "totals": {h: sum(k["hot"].get(h, 0) for k in kernels) for h in CUDA_HOT}}


# Integer MMA opcodes that take 4-bit operands natively (sm_75 8832, sm_80+ 16864).
INT4_IMMA = ("IMMA.8832", "IMMA.16864")
EMULATION = "mma_sub_byte_internal"  # ptxas' sm_90 int4 mma helper: __cuda_sm_9x_mma_sub_byte_*


def tensor_core_math(hist: dict[str, int], subroutines: tuple[str, ...],
                     bits: int | None) -> str:
    """``emulated`` when the kernel calls ptxas' sub-byte mma helper, or is a 4-bit layer
    (``bits``, from the manifest) without a 4-bit IMMA; ``native`` when it issues IMMA or
    HMMA itself; ``-`` when it has no tensor-core math (depthwise, elementwise)."""
    calls = any(op.startswith("CALL") for op in hist)
    if calls and any(EMULATION in s for s in subroutines):
        return "emulated"
    if bits == 4 and not any(op.startswith(INT4_IMMA) for op in hist):
        return "emulated"
    return "native" if any(op.startswith(("IMMA", "HMMA")) for op in hist) else "-"


# The manifest's target.kind -> what ``qcompile inspect`` reads from that kind of artifact.
INSPECTORS: dict[str, Callable[[Path, Mapping[str, Any]], dict]] = {
    "llvm": inspect_cpu, "cuda": inspect_cuda}
