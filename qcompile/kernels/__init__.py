"""TIR tensor intrinsics and schedule rules (installed as ``qcompile.kernels``).

Empty until the custom-kernels issue lands: today every integer op is lowered by
TVM's default legalization, unscheduled.
"""
