"""What the reference model modules share: resolving a config by name, loading a checkpoint
file without allocating the weights twice, an example_step's image side and random inputs,
scalar-or-per-sample inputs, the latent check of patch models, the sinusoidal timestep embedding,
cutting latents into patch tokens and turning them back into a map, the two-layer MLPs that embed
timesteps and text (diffusers' `TimestepEmbedding` and `PixArtAlphaTextProjection` layouts), an
RMSNorm over the last dimension, and a plain GroupNorm (with its activation) run as one fused
`ada_group_norm` pass."""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.ops.ada_norm import ada_group_norm


def resolve_config(name_or_config, configs: dict, config_type: type, family: str):
    """The config object for a name in `configs`, or the given config instance."""
    if isinstance(name_or_config, config_type):
        return name_or_config
    if not isinstance(name_or_config, str) or name_or_config not in configs:
        raise ValueError(f"unknown {family} config {name_or_config!r}; expected one of {', '.join(configs)} "
                         f"or a {config_type.__name__}")
    return configs[name_or_config]


def load_safetensors(path, build_model: Callable[[], nn.Module], device: Union[str, torch.device] = "cpu",
                     adapt_state: Optional[Callable[[dict], dict]] = None) -> nn.Module:
    """A model built on the meta device that takes the file's tensors as they are (dtype
    included), so the weights are allocated once; every key must match (strict).
    `adapt_state` maps the file's state dict to the model's (dropping training-only entries,
    selecting one network of several). The model comes in eval mode, ready for inference as
    diffusers' from_pretrained returns one (no dropout, no running averages updated by a call);
    `.train()` turns training back on."""
    from safetensors.torch import load_file

    state = load_file(str(path), device=str(device))
    if adapt_state is not None:
        state = adapt_state(state)
    with torch.device("meta"):
        model = build_model()
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def example_resolution_multiple_of(resolution, default: int, factor: int, why: str) -> int:
    """An example_step's image side: `resolution`, or `default` for None; a positive multiple of
    `factor` pixels (`why` says what sets the factor)."""
    resolution = default if resolution is None else resolution
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < factor or resolution % factor:
        raise ValueError(f"resolution must be a positive multiple of {factor} pixels ({why}); got {resolution!r}")
    return resolution


def example_resolution_fixed(resolution, only: int, why: str) -> int:
    """An example_step's image side for a model that takes one size: `only`, which `resolution`
    may repeat (`why` says what fixes it)."""
    if resolution is not None and (type(resolution) is not int or resolution != only):
        raise ValueError(f"resolution must be {only} ({why}); got {resolution!r}")
    return only


def example_random(model: nn.Module, batch, generator: Optional[torch.Generator]
                   ) -> tuple[Callable[..., torch.Tensor], torch.device]:
    """An example_step's source of inputs, once `batch` is checked to be a positive int:
    random(*shape), standard normal values drawn from `generator` (a CPU generator: the same
    values whatever the device) and moved to the model's device and dtype; and that device."""
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int; got {batch!r}")
    parameter = next(model.parameters())

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(device=parameter.device, dtype=parameter.dtype)

    return random, parameter.device


def decode_step(model: nn.Module, batch: int, resolution: int,
                generator: Optional[torch.Generator]) -> Callable[[], torch.Tensor]:
    """An autoencoder's example step: one `model.decode`, without autograd, of `batch` random
    latents for images of side `resolution` pixels (`example_random`)."""
    random, _ = example_random(model, batch, generator)
    side = resolution // model.config.spatial_compression
    latents = random(batch, model.config.latent_channels, side, side)

    def step() -> torch.Tensor:
        with torch.no_grad():
            return model.decode(latents)

    return step


def per_sample(value, batch: int, device: torch.device) -> torch.Tensor:
    """A model input given as a scalar or one value per sample (a timestep, a guidance scale) as a
    tensor on `device`, a scalar expanded to (batch,)."""
    value = torch.as_tensor(value, device=device)
    return value.expand(batch) if value.ndim == 0 else value


def check_latents(latents: torch.Tensor, channels: int, patch_size: int) -> None:
    """Raises unless `latents` is (B, channels, H, W) with H and W multiples of `patch_size`."""
    if latents.ndim != 4 or latents.shape[1] != channels:
        raise ValueError(f"latents must be (B, {channels}, H, W); got {tuple(latents.shape)}")
    if latents.shape[2] % patch_size or latents.shape[3] % patch_size:
        raise ValueError(f"latents height and width must be multiples of patch_size {patch_size}; "
                         f"got {tuple(latents.shape)}")


def sinusoidal_embedding(timestep: torch.Tensor, channels: int, max_period: float = 10000.0,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[cos(t w_i), sin(t w_i)] with w_i = max_period^(-i / (channels / 2)), computed in and
    returned as `dtype` (float32 by default), (B, channels) (diffusers' Timesteps with
    flip_sin_to_cos and no frequency shift; guided-diffusion's timestep_embedding)."""
    half = channels // 2
    frequencies = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=dtype, device=timestep.device) / half
    )
    angles = timestep.to(dtype)[:, None] * frequencies[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def unpatchify(tokens: torch.Tensor, grid: tuple, patch_size: int, channels: int) -> torch.Tensor:
    """(B, h w, p p C) tokens, each holding its p x p patch as (row, column, channel), row-major
    over the h x w grid -> the (B, C, h p, w p) map."""
    height, width = grid
    patches = tokens.view(tokens.shape[0], height, width, patch_size, patch_size, channels)
    return patches.permute(0, 5, 1, 3, 2, 4).reshape(tokens.shape[0], channels, height * patch_size,
                                                      width * patch_size)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation, the activation of DiT-family MLPs."""
    return F.gelu(x, approximate="tanh")


class ProjectionMLP(nn.Module):
    """linear_2(activation(linear_1(x))), in_features -> hidden -> hidden (out_features if given):
    the parameter layout of diffusers' `TimestepEmbedding` and `PixArtAlphaTextProjection`."""

    def __init__(self, in_features: int, hidden: int, activation: Callable[[torch.Tensor], torch.Tensor] = F.silu,
                 out_features: Optional[int] = None):
        super().__init__()
        self.activation = activation
        self.linear_1 = nn.Linear(in_features, hidden)
        self.linear_2 = nn.Linear(hidden, hidden if out_features is None else out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.activation(self.linear_1(x)))


class PatchEmbed(nn.Module):
    """(B, C, H, W) latents -> (B, h w, hidden_size) tokens, one per p x p patch, row-major over
    the h x w grid: a convolution of kernel and stride p named `proj`, as in diffusers' `PatchEmbed`."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.proj(latents).flatten(2).transpose(1, 2)


class TimestepEmbedder(ProjectionMLP):
    """The timestep MLP of DiT-family models: the sinusoidal embedding of t (frequency_channels
    wide, see sinusoidal_embedding) cast to `dtype`, then linear, SiLU, linear."""

    def __init__(self, hidden_size: int, frequency_channels: int = 256):
        super().__init__(frequency_channels, hidden_size)
        self.frequency_channels = frequency_channels

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return super().forward(sinusoidal_embedding(timestep, self.frequency_channels).to(dtype))


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2 over the last dimension) + eps) * weight, the statistics in float32 and
    the weight applied in the input dtype (diffusers' RMSNorm; torch.nn.RMSNorm in float32)."""

    def __init__(self, channels: int, eps: float, initial_scale: float = 1.0):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.full((channels,), initial_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean_square = x.float().square().mean(dim=-1, keepdim=True)
        return (x.float() * torch.rsqrt(mean_square + self.eps)).to(x.dtype) * self.weight


def fused_group_norm(norm: nn.GroupNorm, x: torch.Tensor, act: Optional[str] = None,
                     scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """act(norm(x) * (1 + scale) + shift) in one ada_group_norm pass, scale and shift (B, C);
    without them act(norm(x)), the modulation a stride-0 view of one zero (nothing per call to
    allocate or read). The norm's parameters are taken in x's dtype, which the op requires and
    which an autocast region may make differ from theirs."""
    if scale is None:
        scale = shift = x.new_zeros(()).expand(x.shape[:2])
    weight, bias = (None if parameter is None else parameter.to(x.dtype) for parameter in (norm.weight, norm.bias))
    return ada_group_norm(x, scale, shift, norm.num_groups, weight, bias, norm.eps, act)
