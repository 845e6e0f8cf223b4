"""Building CUDA kernels for any sm_XX without a GPU, and reading their SASS back.

nvcc (CUDA toolkit on PATH) compiles TVM's generated CUDA source to a cubin;
``cuobjdump -sass`` (``pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm``)
turns it into per-kernel opcode histograms, which is how CI proves the kernels
use native integer tensor-core instructions (``IMMA``) and no emulation ``CALL``.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import tvm
from qcompile.tvm_compat import tirx

T4 = "nvidia/nvidia-t4"


# Where `pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm` puts its tools.
_CU13_BIN = Path(sysconfig.get_paths()["purelib"]) / "nvidia" / "cu13" / "bin"


def tool_path(name: str) -> str | None:
    """``cuobjdump`` / ``nvdisasm`` (or any tool) from PATH or the pip wheels; None if absent."""
    return shutil.which(name) or shutil.which(name, path=str(_CU13_BIN))


def cuda_source(func_or_mod: tirx.PrimFunc | tvm.IRModule) -> str:
    """CUDA C emitted by ``tvm.compile`` for the T4 (no GPU or nvcc needed)."""
    mod = func_or_mod
    if isinstance(mod, tirx.PrimFunc):
        mod = tvm.IRModule({"main": mod})
    ex = tvm.compile(mod, target=tvm.target.Target(T4))
    todo, seen = [ex.mod], []
    while todo:  # the device module is an import of the host module
        m = todo.pop()
        if m.kind == "cuda":
            return m.inspect_source("cuda")
        seen.append(m.kind)
        todo.extend(m.imports)
    raise RuntimeError(f"no CUDA module in the build (found {seen})")


def compile_cubin(func_or_mod: tirx.PrimFunc | tvm.IRModule | str, arch: str = "sm_75") -> bytes:
    """Build with TVM, then compile the CUDA source to a cubin for ``arch`` with nvcc."""
    from tvm.support import nvcc

    if shutil.which("nvcc") is None:  # TVM's compile_cuda runs plain `nvcc` from PATH
        raise FileNotFoundError("nvcc not found on PATH (install the CUDA toolkit)")
    src = func_or_mod if isinstance(func_or_mod, str) else cuda_source(func_or_mod)
    # nvcc.compile_cuda asks Target.current() for the arch when no GPU is attached.
    with tvm.target.Target({"kind": "cuda", "arch": arch}):
        return bytes(nvcc.compile_cuda(src, target_format="cubin", arch=arch, compiler="nvcc",
                                       options=["-w"]))


def compile_sm75(func_or_mod: tirx.PrimFunc | tvm.IRModule) -> bytes:
    """sm_75 (T4) cubin of a kernel; see :func:`compile_cubin`."""
    return compile_cubin(func_or_mod, "sm_75")


_FUNC_RE = re.compile(r"^\s*Function\s*:\s*(\S+)")
_INSN_RE = re.compile(  # "/*0450*/  @!P0 IMMA.8816.U8.S8 R10, ..." -> IMMA.8816.U8.S8
    r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")


def sass_text(cubin: bytes, what: str = "-sass") -> str:
    """``cuobjdump -sass`` (or ``what``, e.g. ``-elf``) of a cubin or fatbin (per kernel:
    ``Function : name`` + code)."""
    tool = tool_path("cuobjdump")
    if tool is None:
        raise FileNotFoundError("cuobjdump not found (pip install nvidia-cuda-cuobjdump "
                                "nvidia-cuda-nvdisasm)")
    env = dict(os.environ)  # cuobjdump -sass shells out to nvdisasm
    env["PATH"] = os.pathsep.join([str(Path(tool).parent), str(_CU13_BIN), env.get("PATH", "")])
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, what, f.name], capture_output=True, text=True, env=env,
                              check=True).stdout


def sass_histogram(cubin: bytes) -> dict[str, dict[str, int]]:
    """Per kernel name: SASS opcode (with modifiers, e.g. ``IMMA.8816.U8.S8``) -> count."""
    text = sass_text(cubin)
    hist: dict[str, Counter[str]] = {}
    current = None
    for line in text.splitlines():
        if fm := _FUNC_RE.match(line):
            current = hist.setdefault(fm.group(1), Counter())
        elif current is not None and (im := _INSN_RE.search(line)):
            current[im.group(1)] += 1
    return {k: dict(v) for k, v in hist.items()}


_ELF_HEAD = re.compile(r"^\d+-bit ELF: .*\bsm=(\d+)")


@dataclass(frozen=True)
class ElfInfo:
    """What ``cuobjdump -elf`` says of a cubin/fatbin beyond the SASS: the archs of its
    ELF images, and per kernel the device subroutines placed in its code section (e.g.
    ptxas' ``__cuda_sm_9x_mma_sub_byte_internal_*`` int4 emulation on sm_90), which
    ``cuobjdump -sass`` shows only as ``CALL`` to an address."""

    archs: frozenset[str]
    subroutines: dict[str, tuple[str, ...]]


def elf_info(binary: bytes) -> ElfInfo:
    archs: set[str] = set()
    subs: dict[str, set[str]] = {}
    sections: dict[int, str] = {}
    table = ""
    for line in sass_text(binary, "-elf").splitlines():
        if m := _ELF_HEAD.match(line):  # a new ELF image: section indices restart
            archs.add(f"sm_{m.group(1)}")
            sections, table = {}, ""
        elif line.startswith("Sections:") or line.startswith(".section .symtab"):
            table = line.split()[0]
        elif not line.strip() or line.startswith("."):
            table = "" if line.startswith(".") else table
        elif table == "Sections:" and (t := line.split())[0] != "Index":
            sections[int(t[0], 16)] = t[-1]
        elif table == ".section" and len(t := line.split()) > 4 and t[3] == "FUNC" \
                and "ENTRY" not in t:
            code = sections.get(int(t[-2], 16), "")
            if code.startswith(".text."):
                subs.setdefault(code[len(".text."):], set()).add(t[-1])
    return ElfInfo(frozenset(archs), {k: tuple(sorted(v)) for k, v in subs.items()})


# ======== Reading the embedded code back from an exported library (no GPU needed).

FATBIN_MAGIC = 0xBA55ED50


def embedded_fatbins(blob: bytes) -> list[bytes]:
    """The fatbins inside an exported library (header: magic u32, version u16, header size
    u16, payload size u64)."""
    out, i = [], 0
    magic = FATBIN_MAGIC.to_bytes(4, "little")
    while (i := blob.find(magic, i)) >= 0:
        hsize = int.from_bytes(blob[i + 6:i + 8], "little")
        size = int.from_bytes(blob[i + 8:i + 16], "little")
        if hsize == 16 and 0 < size <= len(blob) - i - hsize:
            out.append(blob[i:i + hsize + size])
            i += hsize + size
        else:
            i += 4
    return out
