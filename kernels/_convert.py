"""Triton helpers that several kernel families share (not a family: no op, no launch)."""
import triton
import triton.language as tl


@triton.jit
def to_float32(x):
    """x exactly in float32. A bfloat16 is the high half of the float32 of the same value, so
    its bits are shifted into place: what a GPU's conversion does (no extra work there), spelled
    out because the Triton CPU interpreter's bfloat16 conversion drops the leading bit of a
    subnormal (2^-128 reads as 0, 3 * 2^-130 as 2^-127), which flips the sign tests of relu
    masks and lrelu codes at such values."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)
