"""Every Triton launcher at the largest shapes the models reach stays inside CUDA's grid limits:
2^31 - 1 programs along axis 0, 65,535 along axes 1 and 2. A launch past them fails on the GPU
(CUDA_ERROR_INVALID_VALUE) while the interpreter runs it.

The launchers run on meta tensors (nothing is allocated) with Triton's interpreted launch
replaced by a recorder of each kernel's grid, and with grids sized for an H100's 132 SMs as
`fastgen precompile` sizes them. The CUDA kernels' grids are computed in C++ (csrc/): there
every launch puts its blocks on grid axis x, checked against 2^31 - 1 or capped with a
grid-stride loop, and axis y only ever holds a bounded split count (vq's codebook splits,
bias_act's row splits)."""
import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

import fastgen.kernels
from fastgen.ops.ada_norm import (ADA_GROUP_NORM, ADA_GROUP_NORM_BACKWARD, ADA_LAYER_NORM, ADA_LAYER_NORM_BACKWARD,
                                  GATED_RESIDUAL_ADA_LAYER_NORM, GATED_RESIDUAL_ADA_LAYER_NORM_BACKWARD)
from fastgen.ops.bias_act import BIAS_ACT, BIAS_ACT_BACKWARD
from fastgen.ops.cross_attention import CROSS_ATTENTION_BACKWARD, CROSS_ATTENTION_FORWARD
from fastgen.ops.filtered_lrelu import FILTERED_LRELU_BACKWARD, FILTERED_LRELU_WITH_CODES
from fastgen.ops.linear_attention import LINEAR_ATTENTION, LINEAR_ATTENTION_BACKWARD
from fastgen.ops.qk_norm_rope import QK_NORM_ROPE, QK_NORM_ROPE_BACKWARD
from fastgen.ops.rms_norm_2d import TRMS2D, TRMS2D_BACKWARD
from fastgen.ops.shortcut import CHANNEL_DUP_PIXEL_SHUFFLE, PIXEL_UNSHUFFLE_CHANNEL_AVG
from fastgen.ops.upfirdn2d import UPFIRDN2D
from fastgen.ops.vq import VQ_QUANTIZE

GRID_LIMITS = (2**31 - 1, 65535, 65535)
H100_SMS = 132


def _meta(*shape, channels_last=False, dtype=torch.float16):
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device="meta", memory_format=layout)


def _filter(taps: int) -> torch.Tensor:
    return torch.empty(taps, device="meta")


# (what, [(op, args)]): the forward and backward launches of one op at one model's largest shape.
def _ada_in_ffhq_1024(channels_last):
    # StyleGAN's AdaIN (G = C) on the 32 x 32 layer of ffhq-1024 (512 channels) at batch 128.
    x, modulation = _meta(128, 512, 32, 32, channels_last=channels_last), _meta(128, 512)
    args = (x, modulation, modulation, 512, None, None, 1e-8, None)
    return [(ADA_GROUP_NORM, args), (ADA_GROUP_NORM_BACKWARD, (x, *args))]


def _ada_in_ffhq_1024_full_resolution():
    # The same network's 1024 x 1024 layer (16 channels): the split path, many chunks per group.
    x, modulation = _meta(128, 16, 1024, 1024), _meta(128, 16)
    args = (x, modulation, modulation, 16, None, None, 1e-8, None)
    return [(ADA_GROUP_NORM, args), (ADA_GROUP_NORM_BACKWARD, (x, *args))]


def _ada_ln_dit_xl():
    # DiT-XL/2 (256 tokens of 1152 channels) sampling at batch 4096; the batch is grid axis 1.
    x, modulation = _meta(4096, 256, 1152), _meta(4096, 1152)
    args = (x, modulation, modulation, 1e-6)
    return [(ADA_LAYER_NORM, args), (ADA_LAYER_NORM_BACKWARD, (x, *args))]


def _gated_residual_flux_2048():
    # A FLUX.1 joint block's image stream at 2048 px (16,384 tokens of 3072 channels), batch 64.
    x, modulation = _meta(64, 16384, 3072), _meta(64, 3072)
    args = (x, x, modulation, modulation, modulation, 1e-6)
    return [(GATED_RESIDUAL_ADA_LAYER_NORM, args), (GATED_RESIDUAL_ADA_LAYER_NORM_BACKWARD, (x, x, *args))]


def _attention_dit_xl():
    # DiT-XL/2 self-attention (16 heads of 72 over 256 tokens) at batch 4096: B * H = 65,536.
    q = _meta(4096, 256, 16, 72)
    lse = _meta(4096, 16, 256, dtype=torch.float64)
    return [(CROSS_ATTENTION_FORWARD, (q, q, q, None, None)),
            (CROSS_ATTENTION_BACKWARD, (q, q, q, q, q, lse, None, None))]


def _linear_attention_sana():
    # SANA-1.6B's linear self-attention (70 heads of 32 over 32 x 32 latent tokens) at batch 1024.
    q = _meta(1024, 1024, 70, 32)
    return [(LINEAR_ATTENTION, (q, q, q, 1e-15)), (LINEAR_ATTENTION_BACKWARD, (q, q, q, q, 1e-15))]


def _trms2d_dcae_2048():
    # DC-AE's decoder norm at 2048 px (128 channels) at batch 16.
    x, weight = _meta(16, 128, 2048, 2048), _meta(128)
    return [(TRMS2D, (x, weight, weight, 1e-5)), (TRMS2D_BACKWARD, (x, x, weight, weight, 1e-5))]


def _qk_norm_rope_flux_2048():
    # FLUX.1's q and k at 2048 px (16,384 image and 512 text tokens, 24 heads of 128) at batch 64:
    # 26M rows, past 2^31 elements.
    q, weight = _meta(64, 16384 + 512, 24, 128, dtype=torch.bfloat16), _meta(128, dtype=torch.bfloat16)
    table = _meta(16384 + 512, 64, dtype=torch.float32)
    args = (q, q, weight, weight, table, table, 1e-6, "interleaved")
    return [(QK_NORM_ROPE, args), (QK_NORM_ROPE_BACKWARD, (q, q, *args))]


def _shortcuts_dcae_2048():
    # DC-AE's first down and last up shortcuts at 2048 px (128 <-> 256 channels) at batch 16.
    full, half = _meta(16, 128, 2048, 2048), _meta(16, 256, 1024, 1024)
    return [(PIXEL_UNSHUFFLE_CHANNEL_AVG, (full, 2, 256, half, None)),
            (CHANNEL_DUP_PIXEL_SHUFFLE, (half, 2, 128, full, None))]


def _upfirdn2d_stylegan2_1024():
    # StyleGAN2's 2x upsampling into the 1024 x 1024 layer (32 channels) at batch 64, both passes
    # of a 12-tap filter too (StyleGAN3's).
    x = _meta(64, 32, 512, 512)
    return [(UPFIRDN2D, (x, _filter(taps), [2, 2], [1, 1], [taps // 2, taps // 2 - 1] * 2, False, 4.0))
            for taps in (4, 12)]


def _filtered_lrelu_stylegan3_1024():
    # StyleGAN3-T's last 1024 px layer (32 channels at 1044 px with margins, 2x up and down,
    # 12-tap filters) at batch 64.
    x, bias = _meta(64, 32, 1044, 1044), _meta(32)
    args = (x, _filter(12), _filter(12), bias, 2, 2, [11, 10, 11, 10], 1.41, 0.2, 256.0, False)
    y, codes = FILTERED_LRELU_WITH_CODES.allocate_output(*args)
    return [(FILTERED_LRELU_WITH_CODES, args),
            (FILTERED_LRELU_BACKWARD, (y, codes, *args[1:3], *args[4:9], False, 1044, 1044, True))]


def _bias_act_stylegan2_1024():
    # StyleGAN2's 1024 x 1024 conv layer (32 channels) at batch 64.
    x, bias = _meta(64, 32, 1024, 1024), _meta(32)
    args = (x, bias, "lrelu", None, None, 256.0, 1)
    return [(BIAS_ACT, args), (BIAS_ACT_BACKWARD, (x, x, bias, None, *args[2:]))]


def _vq_var_d30():
    # VAR-d30's multi-scale quantizer (680 tokens per image, 4096 codes of 32) at batch 1024.
    z, codebook = _meta(1024 * 680, 32), _meta(4096, 32)
    return [(VQ_QUANTIZE, (z, codebook, 0.25, True, "ieee"))]


WORKLOADS = [
    pytest.param(_ada_in_ffhq_1024, (False,), id="ada_group_norm AdaIN ffhq-1024 32px batch 128"),
    pytest.param(_ada_in_ffhq_1024, (True,), id="ada_group_norm AdaIN ffhq-1024 32px batch 128 channels_last"),
    pytest.param(_ada_in_ffhq_1024_full_resolution, (), id="ada_group_norm AdaIN ffhq-1024 1024px batch 128"),
    pytest.param(_ada_ln_dit_xl, (), id="ada_layer_norm DiT-XL/2 batch 4096"),
    pytest.param(_gated_residual_flux_2048, (), id="gated_residual_ada_layer_norm FLUX.1 2048px batch 64"),
    pytest.param(_attention_dit_xl, (), id="cross_attention DiT-XL/2 batch 4096"),
    pytest.param(_linear_attention_sana, (), id="linear_attention SANA-1.6B batch 1024"),
    pytest.param(_trms2d_dcae_2048, (), id="trms2d DC-AE 2048px batch 16"),
    pytest.param(_qk_norm_rope_flux_2048, (), id="qk_norm_rope FLUX.1 2048px batch 64"),
    pytest.param(_shortcuts_dcae_2048, (), id="shortcuts DC-AE 2048px batch 16"),
    pytest.param(_upfirdn2d_stylegan2_1024, (), id="upfirdn2d StyleGAN2 1024px batch 64"),
    pytest.param(_filtered_lrelu_stylegan3_1024, (), id="filtered_lrelu StyleGAN3 1024px batch 64"),
    pytest.param(_bias_act_stylegan2_1024, (), id="bias_act StyleGAN2 1024px batch 64"),
    pytest.param(_vq_var_d30, (), id="vq_quantize VAR-d30 batch 1024"),
]


@pytest.fixture
def launched_grids(monkeypatch):
    """(kernel name, grid) of every Triton launch, which records instead of running."""
    grids = []

    def record(kernel, *args, grid, warmup, **kwargs):
        grids.append((kernel.fn.__name__, tuple(grid(kwargs) if callable(grid) else grid)))

    monkeypatch.setattr(InterpretedFunction, "run", record)
    monkeypatch.setattr(fastgen.kernels, "compile_target_sm_count", H100_SMS)
    return grids


def assert_grids_within_limits(grids: list) -> None:
    assert grids, "no Triton launch was recorded"
    for name, grid in grids:
        padded = grid + (1,) * (3 - len(grid))
        assert all(0 < size <= limit for size, limit in zip(padded, GRID_LIMITS)), \
            f"{name} launched with grid {grid}, past CUDA's {GRID_LIMITS}"


@pytest.mark.parametrize("workload, options", WORKLOADS)
def test_triton_grids_stay_within_cuda_limits_at_model_sizes(workload, options, launched_grids):
    for op, args in workload(*options):
        op.implementations["triton"].run(*args, out=op.allocate_output(*args))
    assert_grids_within_limits(launched_grids)


def test_the_recorder_reports_a_grid_past_the_limits(launched_grids):
    from fastgen.kernels.rms_norm_2d import _trms2d_forward_kernel

    _trms2d_forward_kernel[(1, 65536)]()
    with pytest.raises(AssertionError, match=r"_trms2d_forward_kernel launched with grid \(1, 65536\), past"):
        assert_grids_within_limits(launched_grids)
