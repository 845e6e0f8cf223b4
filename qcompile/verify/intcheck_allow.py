"""The integer-only proof's allow-lists, as data: every TIR call, statement and
expression kind and every Relax op / ExternFunc a core may use, each with its reason.

``intcheck`` walks the IR and fails on anything not listed here; keeping the tables
apart keeps the walker readable and the lists reviewable in one place.
"""
from __future__ import annotations

# ----------------------------------------------------------------------------
# Allow-lists
# ----------------------------------------------------------------------------

#: TIR builtins / intrinsics a core kernel may call, with the reason.  Matched on
#: the op name (``tirx.X``) or, for ``call_llvm_(pure_)intrin``/``call_extern``
#: /``call_pure_extern``, on the callee name in the first argument.
ALLOWED_CALLS: dict[str, str] = {
    # addressing and pointers
    "tirx.tvm_access_ptr": "pointer into a buffer (addressing)",
    "tirx.address_of": "address of a buffer element (addressing)",
    "tirx.reinterpret": "bit-cast; only between integer types (checked)",
    "tirx.type_annotation": "dtype marker argument of tvm_access_ptr",
    "tirx.isnullptr": "null check of an argument pointer",
    "tirx.handle_add_byte_offset": "pointer arithmetic",
    "tirx.ret": "packed-API return code",
    "tirx.buffer_data": "data pointer of a buffer",
    "tirx.TVMBackendAllocWorkspace": "scratch allocation", "TVMBackendAllocWorkspace": "scratch",
    "tirx.TVMBackendFreeWorkspace": "scratch free", "TVMBackendFreeWorkspace": "scratch free",
    # integer arithmetic spelled as calls
    "tirx.shift_left": "integer shift", "tirx.shift_right": "integer shift",
    "tirx.bitwise_and": "integer bit op", "tirx.bitwise_or": "integer bit op",
    "tirx.bitwise_xor": "integer bit op", "tirx.bitwise_not": "integer bit op",
    "tirx.if_then_else": "integer select (condition checked)",
    "tirx.likely": "branch hint",
    "tirx.q_multiply_shift": "integer fixed-point multiply",
    "tirx.vectorlow": "half of an integer vector", "tirx.vectorhigh": "half of an integer vector",
    "tirx.vectorcombine": "concatenate integer vectors",
    "tirx.popcount": "integer popcount",
    "tirx.assume": "analysis hint",
    # packed-API / runtime plumbing added by MakePackedAPI and LowerTVMBuiltin
    "tirx.tvm_struct_get": "read packed-API argument fields",
    "tirx.tvm_struct_set": "write packed-API argument fields",
    "tirx.tvm_stack_alloca": "argument stack",
    "tirx.tvm_stack_make_shape": "argument stack", "tirx.tvm_stack_make_array": "argument stack",
    "tirx.tvm_call_packed_lowered": "runtime call (device launch)",
    "tirx.tvm_call_cpacked_lowered": "runtime call",
    "tirx.tvm_throw_last_error": "error path", "tirx.tvm_check_return": "error path",
    "tirx.lookup_param": "constant parameter",
    "tirx.tvm_thread_allreduce": "integer cross-thread reduction",
    # threading / synchronisation
    "tirx.tvm_storage_sync": "barrier", "tirx.tvm_warp_shuffle": "integer warp shuffle",
    "tirx.tvm_warp_activemask": "warp mask",
    "tirx.cuda.__shfl_sync": "warp shuffle of an integer register (LowerWarpMemory)",
    "tirx.cuda.__shfl_down_sync": "warp shuffle of an integer register (dlight reductions)",
    "tirx.cuda.__activemask": "warp mask", "tirx.tvm_thread_invariant": "hint",
    "tirx.tvm_global_barrier_kinit": "barrier", "tirx.tvm_thread_context": "threading",
    # x86 integer intrinsics (qcompile/targets/x86/vnni.py, qcompile/targets/x86/int4.py)
    "llvm.x86.avx512.vpdpbusd.512": "VNNI u8 x s8 -> s32 dot product (x86_vnni)",
    "llvm.x86.avx512.vpdpbusds.512": "VNNI saturating dot product",
    "llvm.x86.vgf2p8affineqb.512": "GFNI affine byte transform: int4 unpack (x86_int4)",
    "llvm.x86.avx512.pmaddubs.w.512": "u8 x s8 -> s16 multiply-add",
    "llvm.x86.avx512.pmaddw.d.512": "s16 x s16 -> s32 multiply-add",
    # AMX integer tiles (qcompile/targets/x86/amx.py); tdpbf16ps/tdpfp16ps are not listed
    "llvm.x86.tdpbusd": "AMX u8 x s8 -> s32 tile dot product",
    "llvm.x86.ldtilecfg": "AMX tile configuration (shapes)",
    "llvm.x86.tilezero": "AMX tile zero (integer accumulators)",
    "llvm.x86.tileloadd64": "AMX tile load (bytes)", "llvm.x86.tilestored64": "AMX tile store",
    "llvm.x86.tilerelease": "AMX tile state release",
    # CUDA integer tensor cores (qcompile/targets/cuda/tensor_core.py)
    "tirx.ptx_mma": "mma.sync; operand dtypes checked integer",
    "tirx.ptx_mma_sp": "sparse mma.sync; operand dtypes checked integer",
    "tirx.ptx_ldmatrix": "shared -> register fragment load",
    "tirx.ptx_cp_async": "async copy", "tirx.ptx_commit_group": "async copy",
    "tirx.ptx_wait_group": "async copy",
    "tirx.ptx_legacy.mma": "mma.sync (qcompile/targets/cuda/tensor_core.py); operand dtypes checked integer",
    "tirx.ptx_legacy.ldmatrix": "shared -> register fragment load",
    "tirx.mma_store": "fragment store", "tirx.mma_fill": "fragment fill (integer zero)",
    "tirx.mma_store_legacy": "fragment store", "tirx.mma_fill_legacy": "fragment fill (cuda_tc)",
    "tirx.tvm_load_matrix_sync": "WMMA fragment load", "tirx.tvm_store_matrix_sync": "WMMA store",
    "tirx.tvm_mma_sync": "WMMA multiply; operand dtypes checked integer",
    "tirx.tvm_bmma_sync": "binary WMMA", "tirx.tvm_fill_fragment": "WMMA fill (value checked)",
}

#: ``call_llvm_intrin``/``call_llvm_pure_intrin``/``call_extern`` wrappers: the
#: callee named in the first argument must itself be in :data:`ALLOWED_CALLS`.
NAMED_CALL_WRAPPERS = frozenset({"tirx.call_llvm_intrin", "tirx.call_llvm_pure_intrin",
                                 "tirx.call_extern", "tirx.call_pure_extern"})

#: mma/wmma operand dtype strings (``"int8"``, ``"s4"`` ...): must be integer.
_MMA_OPS = frozenset({"tirx.ptx_mma", "tirx.ptx_mma_sp", "tirx.ptx_legacy.mma"})

#: Relax ops allowed in ``core`` besides ``relax.call_tir`` (views and memory
#: management only, no arithmetic).
ALLOWED_RELAX_OPS: dict[str, str] = {
    "relax.call_tir": "callee must be a PrimFunc; it is walked",
    "relax.reshape": "view", "relax.memory.view": "view",
    "relax.builtin.alloc_tensor": "allocation", "relax.builtin.stop_lift_params": "marker",
    "relax.memory.alloc_storage": "allocation", "relax.memory.alloc_tensor": "allocation",
    "relax.memory.kill_storage": "free", "relax.memory.kill_tensor": "free",
    "relax.vm.alloc_storage": "allocation", "relax.vm.alloc_tensor": "allocation",
    "relax.vm.kill_object": "free", "relax.null_value": "placeholder",
    "relax.call_pure_packed": "callee must be an allowed ExternFunc",
    "relax.call_packed": "callee must be an allowed ExternFunc",
}

#: ``ExternFunc`` callees allowed in ``core`` (Relax VM builtins that move or
#: allocate memory; none computes on tensor values).
ALLOWED_EXTERN_FUNCS: dict[str, str] = {
    "vm.builtin.alloc_storage": "allocation", "vm.builtin.alloc_tensor": "allocation",
    "vm.builtin.reshape": "view", "vm.builtin.null_value": "placeholder",
    "vm.builtin.match_shape": "shape check", "vm.builtin.make_shape": "shape",
    "vm.builtin.check_tensor_info": "type check", "vm.builtin.check_shape_info": "type check",
    "vm.builtin.check_tuple_info": "type check", "vm.builtin.tuple_getitem": "tuple access",
    "vm.builtin.copy": "copy", "vm.builtin.to_device": "copy",
}

#: TIR statement kinds (class names) and the fields walked.
ALLOWED_STMTS: dict[str, str] = {
    "SeqStmt": "sequence", "For": "loop (min/extent/step must be integer)",
    "While": "loop (integer/bool condition)", "IfThenElse": "branch (integer/bool condition)",
    "BufferStore": "store into an integer buffer", "Evaluate": "evaluate an allowed call",
    "Bind": "let binding of an integer/handle value", "LetStmt": "let binding",
    "AttrStmt": "annotation (value must be integer/handle/string)",
    "AssertStmt": "packed-API argument check (integer/bool condition)",
    "AllocBuffer": "allocation of an integer buffer", "DeclBuffer": "integer buffer declaration",
    "SBlock": "schedulable block", "SBlockRealize": "block instance (integer predicate)",
    "Return": "packed-API return (integer code)", "Break": "loop exit", "Continue": "loop continue",
    "ScopeIdDefStmt": "thread scope ids",
}

#: TIR expression kinds: class names.
_BINARY = ("Add", "Sub", "Mul", "Min", "Max", "EQ", "NE", "LT", "LE", "GT", "GE", "And", "Or",
           "BitwiseAnd", "BitwiseOr", "BitwiseXor", "LShift", "RShift")
_DIVISION = ("Div", "FloorDiv", "Mod", "FloorMod")
ALLOWED_EXPRS = frozenset(_BINARY + _DIVISION + (
    "IntImm", "Var", "SizeVar", "TensorLoad", "Cast", "Ramp", "Broadcast", "Shuffle", "Select",
    "Let", "Not", "BitwiseNot", "Call", "StringImm"))


_POINTER_CALLS = frozenset({"tirx.buffer_data", "tirx.TVMBackendAllocWorkspace",
                            "TVMBackendAllocWorkspace", "tirx.tvm_access_ptr", "tirx.address_of",
                            "tirx.isnullptr",
                            "tirx.handle_add_byte_offset", "tirx.tvm_struct_get",
                            "tirx.tvm_stack_alloca", "tirx.tvm_stack_make_shape",
                            "tirx.tvm_stack_make_array", "tirx.lookup_param"})
_PLUMBING = frozenset({"tirx.tvm_struct_set", "tirx.tvm_call_packed_lowered",
                       "tirx.tvm_call_cpacked_lowered", "tirx.ptx_ldmatrix", "tirx.ptx_mma",
                       "tirx.ptx_mma_sp", "tirx.mma_store", "tirx.mma_fill",
                       "tirx.ptx_legacy.mma", "tirx.ptx_legacy.ldmatrix",
                       "tirx.mma_store_legacy", "tirx.mma_fill_legacy",
                       "tirx.tvm_load_matrix_sync", "tirx.tvm_store_matrix_sync",
                       "tirx.tvm_mma_sync", "tirx.tvm_bmma_sync", "tirx.tvm_fill_fragment",
                       "tirx.ptx_cp_async", "tirx.likely", "tirx.assume", "tirx.ret",
                       "tirx.TVMBackendFreeWorkspace", "TVMBackendFreeWorkspace"})
_FLOAT_MMA_DTYPES = frozenset({"fp16", "bf16", "tf32", "fp32", "fp64", "float16", "bfloat16",
                               "float32", "float64", "e4m3", "e5m2", "fp8"})
