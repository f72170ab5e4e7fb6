"""Comparing a half-precision network against eager PyTorch in the same precision.

Through a whole network, bfloat16 outputs of two orderings of the same arithmetic differ by many
roundings of its largest activations (a fused kernel rounds once where eager rounds after each
op), so a direct comparison either fails on an unlucky seed or needs a tolerance too loose to
catch anything. Instead the accelerated and the eager model are each measured against the same
model in float64: the accelerated one may not be clearly less accurate than eager."""
import copy

import torch


def to_float64(value):
    """Floating tensors (also inside tuples, lists and dicts) in float64; the rest unchanged."""
    if isinstance(value, torch.Tensor):
        return value.double() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(to_float64(v) for v in value)
    if isinstance(value, dict):
        return {k: to_float64(v) for k, v in value.items()}
    return value


def float64_copy(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).double()


def assert_as_accurate_as_eager(accelerated, eager, exact, max_factor=1.5, mean_factor=1.25):
    """accelerated and eager: outputs in the low precision; exact: the float64 model's output.
    The largest and the mean error of the accelerated output may exceed eager's by the given
    factors plus 1% (largest) and 0.1% (mean) of the output's magnitude. Measured over 59 seeds
    of the four tests that use it (SANA, DC-AE's ten outputs, both UNets; bfloat16 under the
    Triton interpreter): the largest error takes at most 57% of its bound and the mean 67%. The
    ratio of largest errors alone reaches 1.52x (a UNet), past max_factor: the magnitude term,
    not the factor, is what keeps one ill-rounded element from failing the test."""
    exact = exact.double()
    scale = exact.abs().max().item()
    eager_error = (eager.double() - exact).abs()
    accelerated_error = (accelerated.double() - exact).abs()
    assert not accelerated_error.isnan().any(), "the accelerated output has NaN where the exact one has none"
    largest, eager_largest = accelerated_error.max().item(), eager_error.max().item()
    mean, eager_mean = accelerated_error.mean().item(), eager_error.mean().item()
    assert largest <= max_factor * eager_largest + 1e-2 * scale, (
        f"largest error {largest:.4g} vs eager's {eager_largest:.4g} (output magnitude {scale:.4g})")
    assert mean <= mean_factor * eager_mean + 1e-3 * scale, (
        f"mean error {mean:.4g} vs eager's {eager_mean:.4g} (output magnitude {scale:.4g})")
