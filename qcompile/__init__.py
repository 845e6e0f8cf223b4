"""qcompile: integer-only mixed-precision compiler for ONNX CNNs on Apache TVM."""
from qcompile.env import tvm_threads

__version__ = "0.1.0"

# TVM's pool defaults to half the hardware threads on x86 (1 of 2 on a 2-vCPU machine) and
# reads TVM_NUM_THREADS once, at its first parallel call: default it to every core here,
# before any stage can run a kernel (a value the user set is kept).
tvm_threads()
