"""Triton kernels, one module per op family, installed as `fastgen.kernels`.

Import these modules only after deciding on TRITON_INTERPRET: `triton.jit` reads it when a
kernel is defined. fastgen imports them lazily, on the first call of a Triton implementation.
"""

# Passed to every launch. FMA contraction is pinned on because the kernels are written for it
# (their float32 error budgets count one rounding per multiply-add) and Triton is changing the
# default: 3.9 warns on every compile that 3.10 will turn it off.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}
