"""Second line of evidence for the integer-only proof: scan the generated code.

x86: the LLVM module's assembly (``inspect_source("asm")``) is split into
functions (``.type NAME,@function``); ``compile`` then scans the exported ``module.so``
the same way (``shipcheck``: objdump's disassembly, read by the same line grammar).  The
core's functions are, for each PrimFunc reachable from Relax ``core``,
``__tvm_ffi_<name>``, ``<name>_compute_`` and the ``.L__tvm_parallel_lambda*`` bodies
they reference.  Every token of every instruction line of those is classified
(:func:`classify_line`: prefixes such as ``{evex}`` and ``lock``, the mnemonic, each
operand; a line it cannot read fails), the mnemonic so:

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

CUDA: ``build_cuda`` hands the sm_75 fatbin(s) nvcc produced to
:func:`scan_cuda_binaries`, which disassembles them with ``cuobjdump -sass``.  The core's
device kernels are, for each PrimFunc reachable from Relax ``core``, the kernels TVM
split it into: ``<name>_kernel`` (and ``<name>_kernel_<i>`` / ``<name>_kernel<i>`` when
one PrimFunc launches several).  Every instruction's opcode (the mnemonic before the
first ``.`` modifier, after any ``@P`` predicate) is checked against
:data:`SASS_FLOAT_OPS`, the float opcodes of sm_75 and its neighbours:

* fp32 arithmetic, compares and selects: ``FFMA FMUL FADD`` (and their ``32I``
  immediate forms), ``FMNMX FSETP FSET FCMP FSEL FCHK FRND FSWZADD``;
* the special-function unit ``MUFU`` (rcp, rsq, ex2, lg2, sin ...);
* conversions with a float side: ``I2F I2FP F2I F2IP F2F F2FP``;
* fp64: ``DADD DMUL DFMA DSETP DSET DMNMX``; fp16x2: ``HADD2 HMUL2 HFMA2`` (and
  ``_32I``), ``HSETP2 HSET2 HMNMX2``;
* float tensor-core MMAs: ``HMMA`` (fp16/bf16/tf32), ``DMMA``.

The SASS allow-list (:data:`SASS_ALLOWED`) is empty: no float opcode is accepted in a
core kernel.  Integer work (``IMAD IADD3 LOP3 SHF SEL ISETP IMNMX PRMT I2I IMMA LDG LDS
LDSM STG BAR ...``) never matches.  One nvcc idiom would: a 32-bit integer division by
a *run-time* divisor is an ``I2F.U32.RP`` / ``MUFU.RCP`` / ``F2I.FTZ.U32.TRUNC``
estimate plus an exact integer fix-up.  The core's divisors are compile-time constants
(static shapes), so it does not occur; should it appear, the build fails and the
sequence must be allow-listed here by name, with the reason.

Without ``cuobjdump``/``nvdisasm`` (the ``cuda`` extra) the CUDA build is refused; a
float opcode in a core kernel fails the build.  The boundary kernels
(``quantize``, ``dequantize``, softmax) are float by design and are not scanned.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

from qcompile.errors import error_line
from qcompile.verify import cuda_tools  # read at call time: tests stand in for the tools

#: FP-domain x86 instructions allowed on integer data: pure moves (vmovsh included: LLVM
#: moves int16 scalars with AVX512-FP16's 16-bit move on Sapphire Rapids), shuffles,
#: broadcasts, blends and bitwise ops (no rounding, no arithmetic).
FP_DOMAIN_ALLOWED = re.compile(
    r"^v?(mov(a|u|h|l|nt)?p[sd]|movs[sdh]|movhlps|movlhps|movshdup|movsldup|movddup"
    r"|andn?p[sd]|orp[sd]|xorp[sd]|blendv?p[sd]|blendmp[sd]|shufp[sd]|unpck[hl]p[sd]"
    r"|permilp[sd]|perm[it]2p[sd]|permp[sd]|broadcasts[sd]|insertps|extractps"
    r"|insertf(128|32x4|64x2|32x8|64x4)|extractf(128|32x4|64x2|32x8|64x4)"
    r"|shuff(32x4|64x2)|perm2f128|broadcastf(128|32x2|32x4|64x2|32x8|64x4)"
    r"|maskmovp[sd]|compressp[sd]|expandp[sd]|movmskp[sd]|testp[sd])$")
#: AMX integer tile ops: u8/s8 dot products into s32 (tdpbusd, tdpbssd, tdpbsud, tdpbuud;
#: "sd" ends them, as it ends double-precision scalars) and tile config/load/store/zero.
#: The float ones (tdpbf16ps, tdpfp16ps) end in "ps" and are not listed.
AMX_INT_OPS = re.compile(r"^(tdpb[su][su]d|ldtilecfg|sttilecfg|tileloadd(t1)?|tilestored"
                         r"|tilezero|tilerelease)$")
_FP_SUFFIX = re.compile(r"(ps|pd|ss|sd|ph|sh)$")
_FP_LANE = re.compile(r"f(128|32x[248]|64x[24])$")
_CONVERT = re.compile(r"^v?cvt")
#: SASS opcodes (without modifiers) that compute on, compare or convert floats.
SASS_FLOAT_OPS: frozenset[str] = frozenset({
    "FFMA", "FFMA32I", "FMUL", "FMUL32I", "FADD", "FADD32I", "FMNMX", "FSETP", "FSET",
    "FCMP", "FSEL", "FCHK", "FRND", "FSWZADD", "MUFU",
    "I2F", "I2FP", "F2I", "F2IP", "F2F", "F2FP",
    "DADD", "DMUL", "DFMA", "DSETP", "DSET", "DMNMX",
    "HADD2", "HADD2_32I", "HMUL2", "HMUL2_32I", "HFMA2", "HFMA2_32I", "HSETP2", "HSET2",
    "HMNMX2", "HMMA", "DMMA"})
#: Float opcodes accepted in core kernels anyway (see the module docstring): none.
SASS_ALLOWED: frozenset[str] = frozenset()
# "/*0450*/  @!P0 FFMA.FTZ R1, ..." -> FFMA (the opcode before its modifiers)
_SASS_INSN = re.compile(r"/\*[0-9a-fA-F]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")

# The x86 line grammar of classify_line (AT&T, as objdump and LLVM print it).
_OTHER_FLOAT = re.compile(r"^(pf|pi2f|v?p?dpph|.*bf16$)")  # 3DNow!, AVX10.2 fp16/bf16 math
_PREFIX = re.compile(r"^(lock|rep|repn?[ez]|data(16|32)|addr(16|32)|[c-gs]s|notrack|bnd"
                     r"|xacquire|xrelease|rex(64|\.[wrxb]+)?"
                     r"|\{(vex[23]?|evex|rex2?|disp(8|16|32)|load|store|nf|nooverride)\})$")
_COMMA = re.compile(r",(?![^(]*\))(?![^{]*\})(?![^<]*>)")
_SPACE_BRACE = re.compile(r"\s+(?=\{)")
_MNEMONIC = re.compile(r"^[a-z][a-z0-9]*(\.s)?(,p[nt])?$")
_REG = (r"%(?:[re]?(?:ax|bx|cx|dx|si|di|bp|sp|ip)|[abcd][lh]|(?:si|di|bp|sp)l|[re]iz"
        r"|r(?:[89]|[12][0-9]|3[01])[bwdl]?|[c-gs]s|[xyz]mm(?:[12]?[0-9]|3[01])|k[0-7]"
        r"|tmm[0-7]|mm[0-7]|bnd[0-3]|[cd]r[0-9]+|st(?:\([0-7]\))?)")
_NUM = r"-?(?:0x[0-9a-f]+|[0-9]+)"
_DISP = rf"(?:{_NUM}|[A-Za-z_.$][\w.$@]*(?:[+-](?:0x[0-9a-f]+|[0-9]+))*)"  # or symbol+off
_MEM = (rf"(?:%[c-gs]s:)?(?:{_DISP}?\((?:{_REG})?(?:,{_REG}(?:,[1248])?)?\)|{_DISP})")
_OPERAND = re.compile(rf"\*?(?:{_REG}|\${_DISP}|{_MEM}|[0-9a-f]+ <[^<>]+>)"
                      rf"(?:\{{(?:%k[0-7]|z|1to[0-9]+)\}})*|\{{(?:r[nduz]-)?sae\}}")

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
    missing_tools: tuple[str, ...] = ()  # CUDA: cuobjdump/nvdisasm not installed

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
    if _OTHER_FLOAT.match(m):
        return "float arithmetic"
    if m.startswith(("p", "vp", "k")) or AMX_INT_OPS.match(m):
        return None  # packed-integer and mask families (vpdpbusd, vpmaddubsw, kmovw ...)
    if (_FP_SUFFIX.search(m) or _FP_LANE.search(m)) and not FP_DOMAIN_ALLOWED.match(m):
        return "float arithmetic"
    if m in ("comiss", "comisd", "ucomiss", "ucomisd", "vcomiss", "vcomisd", "vucomiss",
             "vucomisd", "ldmxcsr", "stmxcsr", "vldmxcsr", "vstmxcsr"):
        return "float compare/control"
    return None


def _split_operands(ops: str) -> list[str]:
    """AT&T operands, split at the commas outside ``()``, ``{}`` and ``<>``; LLVM's
    ``%zmm1 {%k1} {z}`` is read as objdump's ``%zmm1{%k1}{z}``."""
    return [_SPACE_BRACE.sub("", op.strip()) for op in _COMMA.split(ops)] if ops else []


def classify_line(text: str) -> tuple[str, str | None]:
    """One AT&T instruction line (``objdump -d`` or LLVM's assembly; a ``#`` comment
    is dropped): its mnemonic, and why it is float or cannot be classified (None when it
    is allowed). Every token is classified: the prefixes (:data:`_PREFIX`: ``{vex}``,
    ``{evex}``, ``lock``, ``rep``, ``data16``, ``notrack``, ``{disp32}`` ...; a line of
    prefixes alone is a stray prefix byte), the mnemonic (:func:`classify_x86`) and
    each operand (:data:`_OPERAND`: registers, immediates, memory, branch targets and
    their ``{%k1}{z}{1to16}`` decorations; an x87 ``%st`` register or an embedded
    rounding ``{rn-sae}``/``{sae}`` is float). Anything else is unclassified."""
    return _classify_words(" ".join(text.split("#", 1)[0].split()))


@functools.lru_cache(maxsize=1 << 16)
def _classify_words(text: str) -> tuple[str, str | None]:
    words = text.split()
    i = 0
    while i < len(words) and _PREFIX.match(words[i].lower()):
        i += 1
    if i == len(words):
        return (words[-1] if words else "", None if words else "unclassified empty line")
    mnem = words[i].lower()
    if not _MNEMONIC.match(mnem):
        return mnem, f"unclassified token {words[i]!r}"
    mnem = mnem.split(",")[0].removesuffix(".s")
    why = classify_x86(mnem)
    for op in _split_operands(" ".join(words[i + 1:])):
        if not _OPERAND.fullmatch(op):
            return mnem, f"unclassified operand {op!r}"
        if op.startswith("%st"):
            why = why or "x87 register"
        elif op.startswith("{"):
            why = why or "embedded rounding (float only)"
    return mnem, why


def split_functions(asm: str) -> dict[str, list[str]]:
    """Function name -> its instruction lines (text after a tab, not directives)."""
    out: dict[str, list[str]] = {}
    cur: list[str] | None = None
    for line in asm.splitlines():
        t = _TYPE.match(line)
        if t:
            cur = out.setdefault(t.group(1), [])
            continue
        if cur is not None and line.startswith("\t") and not line.startswith(("\t.", "\t#")):
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
            rep.instructions += 1
            why = classify_line(ins)[1]
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


def classify_sass(opcode: str) -> str | None:
    """Why a SASS opcode (modifiers allowed: ``FFMA.FTZ``) is float, or None."""
    base = opcode.split(".")[0]
    if base in SASS_FLOAT_OPS and base not in SASS_ALLOWED:
        return "float instruction"
    return None


def _core_kernel(kernel: str, prim_funcs: list[str]) -> str | None:
    """The core PrimFunc a device kernel was split from (``<pf>_kernel[_]<i>``), or None."""
    for pf in prim_funcs:
        if re.fullmatch(re.escape(pf) + r"_kernel(_?\d+)?", kernel):
            return pf
    return None


def scan_sass(sass: str, prim_funcs: list[str] | None = None) -> AsmReport:
    """Scan ``cuobjdump -sass`` text for float instructions: every kernel, or with
    ``prim_funcs`` only the kernels of those (core) PrimFuncs, each of which must have
    at least one."""
    rep = AsmReport(kind="sass", scanned=True)
    func, scan, found = "?", prim_funcs is None, set()
    for line in sass.splitlines():
        if "Function :" in line:
            func = line.split("Function :")[1].strip()
            pf = _core_kernel(func, prim_funcs) if prim_funcs is not None else func
            scan = pf is not None
            if scan:
                found.add(pf)
                rep.functions.append(func)
            continue
        m = _SASS_INSN.search(line.split(";")[0]) if ";" in line else None
        if scan and m:
            rep.instructions += 1
            why = classify_sass(m.group(1))
            if why:
                rep.violations.append(f"{func}: {why}: {' '.join(line.split(';')[0].split())}")
    missing = [pf for pf in prim_funcs or [] if pf not in found]
    if missing:
        rep.violations.append(f"no device kernel found for core PrimFuncs {missing[:5]}")
    return rep


def scan_cuda_binaries(binaries: list[bytes], prim_funcs: list[str]) -> AsmReport:
    """Disassemble the fatbins/cubins of a CUDA build and scan the core's kernels; not
    scanned (``scanned`` False, ``missing_tools``) without ``cuobjdump``/``nvdisasm``."""
    absent = tuple(t for t in ("cuobjdump", "nvdisasm") if cuda_tools.tool_path(t) is None)
    if absent:
        return AsmReport(kind="sass", note=f"{' and '.join(absent)} not found",
                         missing_tools=absent)
    if not binaries:
        return AsmReport(kind="sass", note="the build holds no device code: SASS not scanned")
    return scan_sass("\n".join(cuda_tools.sass_text(b) for b in binaries), prim_funcs)


def scan_executable(ex: Any, prim_funcs: list[str]) -> AsmReport:
    """Scan an x86 ``relax.VMExecutable``'s LLVM module; skipped for other targets."""
    mods = [ex.mod, *ex.mod.imports]
    for m in mods:
        if getattr(m, "kind", "") == "llvm":
            try:
                asm = m.inspect_source("asm")
            except Exception as e:  # noqa: BLE001
                return AsmReport(note=f"no assembly: {error_line(e)}")
            return scan_x86_asm(asm, prim_funcs)
    kinds = [getattr(m, "kind", "?") for m in mods]
    return AsmReport(kind="none", note=f"no llvm module (modules: {kinds}); "
                                       "CUDA SASS needs a cubin, see scan_sass")
