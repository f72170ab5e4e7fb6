"""Triton kernels, one module per op family, installed as `fastgen.kernels`.

Import these modules only after deciding on TRITON_INTERPRET: `triton.jit` reads it when a
kernel is defined. fastgen imports them lazily, on the first call of a Triton implementation.
"""
