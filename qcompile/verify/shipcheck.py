"""The integer-only proof on the code that ships: the exported ``module.so``, disassembled.

``build`` scans the machine code it generated in memory (``asmcheck``); ``compile`` then
runs ``build.ship.prove_shipped`` on the ``module.so`` it has just exported, before anything is
moved into place, so the proof covers the file a user runs (the backend's
``check_shipped``):

* **x86** (the llvm backend, and the CUDA host code): ``objdump -d -z`` of the library,
  parsed once. The core's entry points are its symbols ``__tvm_ffi_<name>``,
  ``<name>_compute_`` and ``<name>`` for each PrimFunc reachable from Relax ``core``
  (each PrimFunc needs at least one). From each entry the code is scanned up to the next
  symbol, and every code address it calls, jumps to or takes (a parallel lambda has no
  symbol of its own: the ``lea`` that passes it to the thread pool names it) is scanned
  the same way, transitively. Every line is classified by ``asmcheck.classify_line``; a
  float instruction, a line objdump could not decode (``(bad)``) or of any shape the
  grammar does not know fails. A call through the PLT must name a function of
  :data:`ALLOWED_EXTERNAL`.
* **CUDA**: the fatbins embedded in the library, read back and scanned as
  ``asmcheck.scan_sass`` scans the build's (``cuobjdump -sass``).

A violation raises ``BuildError`` (``compile`` writes nothing); the result is the
manifest's ``intcheck.shipped``. Bundles strip copies of ``module.so`` later, so the scan
always sees the symbol table.
"""
from __future__ import annotations

import bisect
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from qcompile.verify.asmcheck import AsmReport, classify_line, scan_cuda_binaries
from qcompile.verify.cuda_tools import embedded_fatbins
from qcompile.errors import BuildError


#: Functions outside the library that core code may call (through the PLT): memory fill
#: and copy, and the FFI's error report. A call of anything else (``expf``) fails.
ALLOWED_EXTERNAL = frozenset({"memset", "memcpy", "memmove", "TVMFFIErrorSetRaisedFromCStrParts",
                              "TVMFFIErrorSetRaisedFromCStr", "__stack_chk_fail"})
_HEAD = re.compile(r"^([0-9a-f]+) <(.+)>:$")
_INSN = re.compile(r"^ *([0-9a-f]+):\t(.*)$")
_REF = re.compile(r"\b([0-9a-f]+) <([^<>]+)>")  # a branch target, or objdump's "# addr <sym>"
_NOISE = re.compile(r"^(|.*:\s+file format .*|Disassembly of section .*:)$")


@dataclass
class Disassembly:
    """``objdump -d`` as lists: per line its address (-1 for a line of unknown shape) and
    instruction text (None for unknown); symbols as the index of their first line."""

    addrs: list[int]
    texts: list[str | None]
    symbols: dict[str, int]
    bounds: list[int]  # sorted line indices where a symbol starts

    @classmethod
    def parse(cls, text: str) -> "Disassembly":
        addrs: list[int] = []
        texts: list[str | None] = []
        symbols: dict[str, int] = {}
        for line in text.splitlines():
            if m := _INSN.match(line):
                addrs.append(int(m.group(1), 16))
                texts.append(m.group(2))
            elif m := _HEAD.match(line):
                symbols.setdefault(m.group(2), len(addrs))
            elif not _NOISE.match(line):
                addrs.append(-1)
                texts.append(None)
        return cls(addrs, texts, symbols, sorted(set(symbols.values())))


def objdump_path() -> str:
    tool = shutil.which("objdump")
    if tool is None:
        raise BuildError("objdump (binutils) not found: the integer-only proof disassembles "
                         "the exported module.so with it; install binutils")
    return tool


def disassemble(so: Path) -> Disassembly:
    """The code sections of ``so`` (``objdump -d -z``: zero runs decoded, not skipped)."""
    out = subprocess.run([objdump_path(), "-d", "-z", "--no-show-raw-insn", str(so)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise BuildError(f"objdump -d {so.name} failed: {out.stderr.strip()[:200]}")
    return Disassembly.parse(out.stdout)


def scan_x86_so(so: Path, prim_funcs: list[str], dis: Disassembly | None = None) -> AsmReport:
    """Scan the core's code in the x86 library ``so`` (see the module docstring)."""
    dis = dis if dis is not None else disassemble(so)
    rep = AsmReport(kind="x86 module.so", scanned=True)
    todo = [(dis.symbols[s], s) for n in reversed(prim_funcs)
            for s in (n, f"{n}_compute_", f"__tvm_ffi_{n}") if s in dis.symbols]
    missing = [n for n in prim_funcs
               if not {n, f"{n}_compute_", f"__tvm_ffi_{n}"} & dis.symbols.keys()]
    done = bytearray(len(dis.texts))
    index = {a: j for j, a in enumerate(dis.addrs) if a >= 0}
    while todo:
        i, name = todo.pop()
        if done[i]:
            continue
        rep.functions.append(name)
        k = bisect.bisect_right(dis.bounds, i)
        end = dis.bounds[k] if k < len(dis.bounds) else len(dis.texts)
        for j in range(i, end):
            if done[j]:
                break
            done[j] = 1
            rep.instructions += 1
            text = dis.texts[j]
            why = "unclassified line" if text is None else classify_line(text)[1]
            if why:
                rep.violations.append(f"{name}: {why}: {' '.join((text or '?').split())}")
            for addr, label in _REF.findall(text or ""):
                if label.endswith("@plt"):
                    if label[:-4] not in ALLOWED_EXTERNAL:
                        rep.violations.append(f"{name}: call of external {label[:-4]}: "
                                              f"{' '.join((text or '').split())}")
                elif (t := index.get(int(addr, 16))) is not None and not done[t]:
                    todo.append((t, label))
    if missing:
        rep.violations.append(f"no code found in {so.name} for core PrimFuncs {missing[:5]}")
    return rep


def scan_cuda_so(so: Path, prim_funcs: list[str]) -> AsmReport:
    """The SASS of the fatbins embedded in the CUDA library ``so``."""
    rep = scan_cuda_binaries(embedded_fatbins(so.read_bytes()), prim_funcs)
    rep.kind = "sass module.so"
    return rep
