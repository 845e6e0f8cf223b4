"""qcompile: integer-only mixed-precision compiler for ONNX CNNs on Apache TVM."""

__version__ = "0.1.0"
