"""Second line of evidence for the integer-only proof: scan the generated code.

x86: the LLVM module's assembly (``inspect_source("asm")``) is split into
functions (``.type NAME,@function``).  The core's functions are, for each PrimFunc
reachable from Relax ``core``, ``__tvm_ffi_<name>``, ``<name>_compute_`` and the
``.L__tvm_parallel_lambda*`` bodies they reference.  Every instruction of those is
classified:

* x87 (any mnemonic starting with ``f``): float, rejected;
* any conversion ``cvt*``/``vcvt*`` (all x86 conversions have a float side): rejected;
* any other *FP-domain* instruction (mnemonic ending in ``ps/pd/ss/sd/ph/sh``
  outside the packed-integer ``p``/``vp`` families, or an ``f128``/``f32x4``-style
  lane move) must be in :data:`FP_DOMAIN_ALLOWED`: moves, shuffles, broadcasts and
  bitwise ops that LLVM freely picks for integer data (``vmovups``, ``vxorps`` to
  zero a register, ``vbroadcastss`` of an int32 ...).  They copy bits and never
  round or compute; arithmetic (``vaddps``, ``vfmadd231ps``, ``vmulss``,
  ``vdivps``, ``vsqrtps``, ``vrcp14ps``, ``vrsqrt*``, ``vcmpps``, ``ucomiss`` ...)
  is not in the list and is rejected.

CUDA: SASS from ``cuobjdump -sass`` when a cubin is available; FFMA, FMUL, FADD,
MUFU, I2F, F2I, F2F, FSETP, FMNMX, DADD/DMUL/DFMA, HADD2/HMUL2/HFMA2 and HMMA are
rejected.  Without a cubin the scan is skipped and says so.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

#: FP-domain x86 instructions allowed on integer data: pure moves, shuffles,
#: broadcasts, blends and bitwise ops (no rounding, no arithmetic).
FP_DOMAIN_ALLOWED = re.compile(
    r"^v?(mov(a|u|h|l|nt)?p[sd]|movs[sd]|movhlps|movlhps|movshdup|movsldup|movddup"
    r"|andn?p[sd]|orp[sd]|xorp[sd]|blendv?p[sd]|blendmp[sd]|shufp[sd]|unpck[hl]p[sd]"
    r"|permilp[sd]|perm[it]2p[sd]|permp[sd]|broadcasts[sd]|insertps|extractps"
    r"|insertf(128|32x4|64x2|32x8|64x4)|extractf(128|32x4|64x2|32x8|64x4)"
    r"|shuff(32x4|64x2)|perm2f128|broadcastf(128|32x2|32x4|64x2|32x8|64x4)"
    r"|maskmovp[sd]|compressp[sd]|expandp[sd]|movmskp[sd]|testp[sd])$")
_FP_SUFFIX = re.compile(r"(ps|pd|ss|sd|ph|sh)$")
_FP_LANE = re.compile(r"f(128|32x[248]|64x[24])$")
_CONVERT = re.compile(r"^v?cvt")
SASS_FLOAT = re.compile(r"\b(FFMA|FMUL|FADD|FMNMX|FSETP|FSET|FCHK|MUFU|I2F|F2I|F2F|FRND|"
                        r"DADD|DMUL|DFMA|DSETP|HADD2|HMUL2|HFMA2|HMMA)\b")

_TYPE = re.compile(r"^\s*\.type\s+([^,\s]+),@function")
_LAMBDA_REF = re.compile(r"(\.L__tvm_parallel_lambda[\w.]*)")


@dataclass
class AsmReport:
    scanned: bool = False
    kind: str = "x86"
    functions: list[str] = field(default_factory=list)
    instructions: int = 0
    violations: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.scanned and not self.violations and self.instructions > 0

    def as_dict(self) -> dict:
        return {"scanned": self.scanned, "kind": self.kind, "ok": self.ok,
                "functions": len(self.functions), "instructions": self.instructions,
                "violations": self.violations[:20], "note": self.note}


def classify_x86(mnemonic: str) -> str | None:
    """Why ``mnemonic`` is floating point, or None when it is allowed."""
    m = mnemonic.lower()
    if m.startswith("f"):
        return "x87"
    if _CONVERT.match(m):
        return "float conversion"
    if m.startswith(("p", "vp", "k")):
        return None  # packed-integer and mask families (vpdpbusd, vpmaddubsw, kmovw ...)
    if (_FP_SUFFIX.search(m) or _FP_LANE.search(m)) and not FP_DOMAIN_ALLOWED.match(m):
        return "float arithmetic"
    if m in ("comiss", "comisd", "ucomiss", "ucomisd", "vcomiss", "vcomisd", "vucomiss",
             "vucomisd", "ldmxcsr", "stmxcsr", "vldmxcsr", "vstmxcsr"):
        return "float compare/control"
    return None


def split_functions(asm: str) -> dict[str, list[str]]:
    """Function name -> its instruction lines (text after a tab, not directives)."""
    out: dict[str, list[str]] = {}
    cur: list[str] | None = None
    for line in asm.splitlines():
        t = _TYPE.match(line)
        if t:
            cur = out.setdefault(t.group(1), [])
            continue
        if cur is not None and line.startswith("\t") and not line.startswith("\t."):
            cur.append(line.strip())
    return out


def scan_x86_asm(asm: str, prim_funcs: list[str]) -> AsmReport:
    """Scan the core functions of an LLVM module's assembly for FP instructions."""
    rep = AsmReport(kind="x86")
    funcs = split_functions(asm)
    todo = [s for n in prim_funcs for s in (f"__tvm_ffi_{n}", f"{n}_compute_", n)
            if s in funcs]
    seen: set[str] = set()
    while todo:
        sym = todo.pop()
        if sym in seen:
            continue
        seen.add(sym)
        rep.functions.append(sym)
        for ins in funcs[sym]:
            mnem = ins.split()[0]
            rep.instructions += 1
            why = classify_x86(mnem)
            if why:
                rep.violations.append(f"{sym}: {why}: {ins}")
            for lam in _LAMBDA_REF.findall(ins):
                if lam in funcs and lam not in seen:
                    todo.append(lam)
    missing = [n for n in prim_funcs if f"{n}_compute_" not in funcs
               and f"__tvm_ffi_{n}" not in funcs and n not in funcs]
    if missing:
        rep.violations.append(f"no code found for core PrimFuncs {missing[:5]}")
    rep.scanned = True
    return rep


def scan_sass(sass: str) -> AsmReport:
    """Scan ``cuobjdump -sass`` text for float instructions."""
    rep = AsmReport(kind="sass", scanned=True)
    func = "?"
    for line in sass.splitlines():
        if "Function :" in line:
            func = line.split("Function :")[1].strip()
            rep.functions.append(func)
            continue
        if "/*" in line and ";" in line:
            rep.instructions += 1
            m = SASS_FLOAT.search(line.split(";")[0])
            if m:
                rep.violations.append(f"{func}: {m.group(1)}: {' '.join(line.split())}")
    return rep


def scan_executable(ex: object, prim_funcs: list[str]) -> AsmReport:
    """Scan an x86 ``relax.VMExecutable``'s LLVM module; skipped for other targets."""
    mods = [ex.mod, *ex.mod.imports]
    for m in mods:
        if getattr(m, "kind", "") == "llvm":
            try:
                asm = m.inspect_source("asm")
            except Exception as e:  # noqa: BLE001
                return AsmReport(note=f"no assembly: {str(e).splitlines()[0]}")
            return scan_x86_asm(asm, prim_funcs)
    kinds = [getattr(m, "kind", "?") for m in mods]
    return AsmReport(kind="none", note=f"no llvm module (modules: {kinds}); "
                                       "CUDA SASS needs a cubin, see scan_sass")
