"""ADM: the class-conditional UNet of "Diffusion Models Beat GANs on Image Synthesis"
(Dhariwal & Nichol, 2021, arXiv:2105.05233; openai/guided-diffusion), in pixel space.

The network maps a noisy image x_t, its timestep t and a class label y to the noise estimate
eps (and, with learn_sigma, a second set of channels v that interpolates the reverse-process
variance in log space between beta_t and the posterior variance). The conditioning vector is

    e = MLP(sinusoidal(t)) + Embedding(y)          (width 4 x model_channels)

and every residual block is conditioned through AdaGN ("use_scale_shift_norm"):

    h = conv(silu(GroupNorm32(x)))                 (with nearest 2x up / 2x2 average-pool down
                                                    of h and of the skip in resampling blocks)
    (scale, shift) = Linear(silu(e))               (each of the block's output width)
    h = silu(GroupNorm32(h) * (1 + scale) + shift) (one `fastgen.ops.ada_group_norm` call)
    out = skip(x) + conv(dropout(h))

GroupNorm32 is a 32-group GroupNorm computed in float32. At the downsample rates listed in
the config the blocks are followed by multi-head self-attention over the H x W positions
(heads of num_head_channels channels, softmax(q k^T / sqrt(d)) v through
`fastgen.ops.cross_attention` with Lq = Lkv); the middle of the UNet is ResBlock, attention,
ResBlock; the decoder concatenates the encoder's activations (the UNet skips) channel-wise.

The attention's 1x1 qkv convolution produces 3C channels that guided-diffusion splits in one
of two orders, and a checkpoint only loads correctly with the order it was trained with:

- legacy (QKVAttentionLegacy, the 256x256 model): heads first, channel h*3d + {0 q,1 k,2 v}*d + i;
- new (QKVAttention, `use_new_attention_order`, the 64x64 model): q, k, v first,
  channel {0 q,1 k,2 v}*C + h*d + i.

Both become strided (B, T, H, d) views of one token-major projection, with no copy.
Parameter names and nesting are guided-diffusion's (`time_embed.*`, `label_emb.*`,
`input_blocks.*`, `middle_block.*`, `output_blocks.*`, `out.*`), so its released state dicts
(saved as safetensors) load as they are. Not supported: use_scale_shift_norm=False,
resblock_updown=False (convolutional resampling), num_heads instead of num_head_channels and
the super-resolution models. The noisy-image classifiers that guide sampling are
`fastgen.models.adm_classifier`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastgen import samplers
from fastgen.models.common import (example_resolution_multiple_of, load_safetensors, per_sample, resolve_config,
                                   sinusoidal_embedding)
from fastgen.ops.ada_norm import ada_group_norm
from fastgen.ops.cross_attention import cross_attention

NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_NUM_STEPS = 250  # guided-diffusion's sampling flags: --timestep_respacing 250
_GROUPS = 32
_GROUP_NORM_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class EncoderGeometry:
    """The config fields of the encoder half that the ADM UNet and its noisy-image classifier
    share, and what they derive from them alike."""

    image_size: int
    model_channels: int
    num_res_blocks: int
    channel_mult: tuple
    # Image resolutions (pixels) that get self-attention, as the --attention_resolutions flag
    # (the classifier's --classifier_attention_resolutions).
    attention_resolutions: tuple = (32, 16, 8)
    num_head_channels: int = 64

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def downsampling(self) -> int:
        """How many times smaller the deepest feature map is than the input."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def attention_downsample_rates(self) -> frozenset:
        return frozenset(self.image_size // resolution for resolution in self.attention_resolutions)


@dataclasses.dataclass(frozen=True)
class ADMConfig(EncoderGeometry):
    """Field names follow guided-diffusion's `UNetModel` arguments and script flags."""

    num_classes: Optional[int] = 1000
    in_channels: int = 3
    learn_sigma: bool = True
    use_new_attention_order: bool = False
    dropout: float = 0.0
    noise_schedule: str = "linear"

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels



CONFIGS = {
    # 256x256_diffusion.pt: 554M parameters, linear schedule, the legacy attention order.
    "imagenet256": ADMConfig(
        image_size=256, model_channels=256, num_res_blocks=2, channel_mult=(1, 1, 2, 2, 4, 4),
    ),
    # 64x64_diffusion.pt: 296M parameters, cosine schedule, the new attention order.
    "imagenet64": ADMConfig(
        image_size=64, model_channels=192, num_res_blocks=3, channel_mult=(1, 2, 3, 4),
        use_new_attention_order=True, dropout=0.1, noise_schedule="cosine",
    ),
    # Channels multiples of 32 (GroupNorm32); heads of 16 channels so Triton's tl.dot takes them.
    "tiny": ADMConfig(
        image_size=16, model_channels=32, num_res_blocks=1, channel_mult=(1, 2),
        attention_resolutions=(8,), num_head_channels=16, num_classes=10,
    ),
}


class GroupNorm32(nn.GroupNorm):
    """guided-diffusion's normalization(): 32 groups, statistics and affine in float32, the
    result in the input dtype."""

    def __init__(self, channels: int):
        super().__init__(_GROUPS, channels, eps=_GROUP_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)


class ResBlock(nn.Module):
    """AdaGN residual block (module docstring); `resample` is None, "up" or "down". The
    parameter-free slots of the Sequentials (SiLU, Dropout) keep guided-diffusion's indices."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float,
                 resample: Optional[str] = None):
        super().__init__()
        self.resample = resample
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), _conv3x3(channels, out_channels))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(dropout), _conv3x3(out_channels, out_channels))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, kernel_size=1))

    def _resampled(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.resample == "down":
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        in_norm, _, in_conv = self.in_layers
        h = in_conv(self._resampled(F.silu(in_norm(x))))
        scale, shift = self.emb_layers(emb).to(h.dtype).chunk(2, dim=1)
        out_norm, _, dropout, out_conv = self.out_layers
        h = ada_group_norm(h, scale, shift, out_norm.num_groups, out_norm.weight, out_norm.bias, out_norm.eps, "silu")
        return self.skip_connection(self._resampled(x)) + out_conv(dropout(h))


class AttentionBlock(nn.Module):
    """Pre-norm multi-head self-attention over the spatial positions, with a residual."""

    def __init__(self, channels: int, head_channels: int, new_order: bool):
        super().__init__()
        if channels % head_channels:
            raise ValueError(f"attention channels {channels} must be a multiple of num_head_channels {head_channels}")
        self.heads, self.new_order = channels // head_channels, new_order
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, kernel_size=1)
        self.proj_out = nn.Conv1d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, *spatial = x.shape
        tokens = self.norm(x.flatten(2)).transpose(1, 2)  # (B, T, C)
        # The 1x1 convolutions as matmuls on tokens: every head's channels end up contiguous.
        qkv = F.linear(tokens, self.qkv.weight[..., 0], self.qkv.bias)
        if self.new_order:
            q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).unbind(2)
        else:
            q, k, v = qkv.unflatten(-1, (self.heads, 3, -1)).unbind(3)
        attended = cross_attention(q, k, v).flatten(2)
        out = F.linear(attended, self.proj_out.weight[..., 0], self.proj_out.bias)
        return x + out.transpose(1, 2).reshape(batch, channels, *spatial)


class EmbedSequential(nn.Sequential):
    """A Sequential that hands the conditioning vector to its residual blocks."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class EncoderNetwork(nn.Module):
    """What the UNet and the noisy-image classifier (adm_classifier) are both built of, under
    guided-diffusion's names: the timestep MLP `time_embed`, the class embedding `label_emb`
    (given num_classes), the encoder half `input_blocks` and the `middle_block` (ResBlock,
    attention, ResBlock). The encoder half: a 3x3 convolution to channel_mult[0] x model_channels
    channels, then per level num_res_blocks ResBlocks to mult x model_channels (each followed by
    attention where the level's downsample rate is one of config.attention_downsample_rates)
    and, below every level but the last, a ResBlock that halves the resolution. skip_channels:
    the channels of each input block's output (the UNet's skips), in guided-diffusion's order."""

    def __init__(self, config: EncoderGeometry, dropout: float, new_attention_order: bool,
                 num_classes: Optional[int] = None):
        super().__init__()
        self.config, self._dropout, self._new_attention_order = config, dropout, new_attention_order
        emb = config.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(config.model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb)

        ch = int(config.channel_mult[0] * config.model_channels)
        self.input_blocks = nn.ModuleList([EmbedSequential(_conv3x3(config.in_channels, ch))])
        self.skip_channels, rate = [ch], 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers = [self._res_block(ch, int(mult * config.model_channels))]
                ch = int(mult * config.model_channels)
                if rate in config.attention_downsample_rates:
                    layers.append(self._attention(ch))
                self.input_blocks.append(EmbedSequential(*layers))
                self.skip_channels.append(ch)
            if level != len(config.channel_mult) - 1:
                self.input_blocks.append(EmbedSequential(self._res_block(ch, ch, "down")))
                self.skip_channels.append(ch)
                rate *= 2
        self.middle_block = EmbedSequential(self._res_block(ch, ch), self._attention(ch), self._res_block(ch, ch))

    def _res_block(self, channels: int, out_channels: int, resample: Optional[str] = None) -> ResBlock:
        return ResBlock(channels, self.config.time_embed_dim, out_channels, self._dropout, resample)

    def _attention(self, channels: int) -> AttentionBlock:
        return AttentionBlock(channels, self.config.num_head_channels, self._new_attention_order)

    def _embedding(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The timestep MLP of the sinusoidal embedding, in the MLP's dtype."""
        dtype = self.time_embed[0].weight.dtype
        return self.time_embed(sinusoidal_embedding(timesteps, self.config.model_channels).to(dtype))


class ADMUNet(EncoderNetwork):
    def __init__(self, config: ADMConfig):
        super().__init__(config, config.dropout, config.use_new_attention_order, config.num_classes)
        c, skip_channels = config, list(self.skip_channels)
        ch, rate, attends = skip_channels[-1], c.downsampling, c.attention_downsample_rates

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [self._res_block(ch + skip_channels.pop(), mult * c.model_channels)]
                ch = mult * c.model_channels
                if rate in attends:
                    layers.append(self._attention(ch))
                if level and i == c.num_res_blocks:
                    layers.append(self._res_block(ch, ch, "up"))
                    rate //= 2
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), _conv3x3(ch, c.out_channels))

    def _check_inputs(self, x: torch.Tensor, timesteps: torch.Tensor, labels: Optional[torch.Tensor]) -> None:
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"x must be a (B, {c.in_channels}, H, W) tensor; got {tuple(x.shape)}")
        factor = c.downsampling
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"x height and width must be multiples of {factor} (the UNet's downsampling); "
                             f"got {tuple(x.shape[2:])}")
        batch = x.shape[0]
        if timesteps.shape != (batch,):
            raise ValueError(f"timesteps must be a scalar or of shape ({batch},); got {tuple(timesteps.shape)}")
        if c.num_classes is None:
            if labels is not None:
                raise ValueError("labels must be None: this model is not class-conditional")
            return
        if labels is None:
            raise ValueError(f"labels are required: this model is conditioned on {c.num_classes} classes")
        if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"labels must be an int32 or int64 tensor of class indices; got "
                            f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}")
        if labels.shape != (batch,):
            raise ValueError(f"labels must have shape ({batch},); got {tuple(labels.shape)}")

    def forward(self, x: torch.Tensor, timesteps: Union[torch.Tensor, float],
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, in_channels, H, W); timesteps in [0, 1000), a scalar or (B,); labels (B,) class
        indices (class-conditional configs). Returns (B, out_channels, H, W): eps, then the
        variance interpolation v when learn_sigma."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
        timesteps = per_sample(timesteps, x.shape[0], x.device)
        self._check_inputs(x, timesteps, labels)
        emb = self._embedding(timesteps)
        if labels is not None:
            emb = emb + self.label_emb(labels)

        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        norm, _, conv = self.out
        return conv(F.silu(norm(h)))


def build(name_or_config: Union[str, ADMConfig]) -> ADMUNet:
    """A randomly initialised model (build under `with torch.device("meta"):` for the structure
    alone). guided-diffusion zero-initialises the last convolutions; here every layer is random
    so that tests exercise every path."""
    return ADMUNet(resolve_config(name_or_config, CONFIGS, ADMConfig, "ADM"))


def from_safetensors(path: str, config: Union[str, ADMConfig], device: Union[str, torch.device] = "cpu") -> ADMUNet:
    """Load a guided-diffusion UNet state dict saved as one .safetensors file (for the released
    .pt files: `safetensors.torch.save_file(torch.load(pt_path), path)`). The model is built on
    the meta device and takes the file's tensors and dtype as they are."""
    return load_safetensors(path, lambda: build(config), device)


def respaced_timesteps(num_steps: int) -> torch.Tensor:
    """guided-diffusion's `--timestep_respacing N` (one section of N steps) for ancestral
    sampling: N training timesteps from 0 to T - 1 at the positions 0, s, 2 s, ... with
    s = (T - 1) / (N - 1), each rounded to the nearest integer (ties to even); descending.

    The positions are running sums of s in double precision, as in the original: rounding the
    exact multiples i s instead picks another timestep somewhere on the chain for 283 of the
    1000 possible N (where a running sum lands a hair on the other side of a half)."""
    if not 1 <= num_steps <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"num_steps must be in [1, {NUM_TRAIN_TIMESTEPS}]; got {num_steps}")
    stride = (NUM_TRAIN_TIMESTEPS - 1) / (num_steps - 1) if num_steps > 1 else 1.0
    position, chosen = 0.0, []
    for _ in range(num_steps):
        chosen.append(round(position))
        position += stride
    return torch.tensor(chosen[::-1], dtype=torch.int64)


def ddim_timesteps(num_steps: int) -> torch.Tensor:
    """guided-diffusion's `--timestep_respacing ddimN` for DDIM: every k-th training timestep
    0, k, 2 k, ... below T, with k the smallest integer stride in [1, T) that gives exactly N of
    them (ceil(T / k) = N); descending. For 30 steps k = 34 (986 down to 0). A count that no
    stride gives (300: stride 3 gives 334, stride 4 gives 250; or 1) is refused, as there."""
    for stride in range(1, NUM_TRAIN_TIMESTEPS):
        if -(-NUM_TRAIN_TIMESTEPS // stride) == num_steps:
            return torch.arange(0, NUM_TRAIN_TIMESTEPS, stride, dtype=torch.int64).flip(0)
    counts = sorted({-(-NUM_TRAIN_TIMESTEPS // stride) for stride in range(1, NUM_TRAIN_TIMESTEPS)})
    below = max((c for c in counts if c < num_steps), default=None)
    above = min((c for c in counts if c > num_steps), default=None)
    nearest = " or ".join(str(c) for c in (below, above) if c is not None)
    raise ValueError(
        f"num_steps={num_steps} cannot be DDIM-respaced: no integer stride takes exactly {num_steps} of the "
        f"{NUM_TRAIN_TIMESTEPS} training timesteps (guided-diffusion's ddimN rule); the nearest counts that work "
        f"are {nearest}"
    )


def classifier_gradient(classifier: nn.Module, classifier_scale: float) -> samplers.ModelFn:
    """The samplers' cond_fn for classifier guidance: (x, t, labels) -> s grad_x log p(labels | x, t)
    with s = classifier_scale and log p the log-softmax of `classifier(x, t)`'s logits (in float32
    at least), as guided-diffusion's classifier-guided sampling. The gradient is taken with
    autograd on even inside torch.no_grad(), of x alone (the classifier's parameters get none)."""

    def gradient(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not isinstance(labels, torch.Tensor) or labels.shape != (x.shape[0],):
            raise ValueError(f"classifier guidance needs labels of shape ({x.shape[0]},), the classes to guide "
                             f"towards; got {labels if labels is None else tuple(labels.shape)}")
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            logits = classifier(x_in, t)
            log_probabilities = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
            selected = log_probabilities.gather(1, labels[:, None].long()).sum()
            return torch.autograd.grad(selected, x_in)[0] * classifier_scale

    return gradient


def sample(
    model: ADMUNet,
    noise: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    null_labels: Optional[torch.Tensor] = None,
    guidance_scale: float = 1.0,
    num_steps: int = DEFAULT_NUM_STEPS,
    method: str = "ddpm",
    eta: float = 0.0,
    generator: Optional[torch.Generator] = None,
    classifier: Optional[nn.Module] = None,
    classifier_scale: float = 1.0,
) -> torch.Tensor:
    """Images in [-1, 1] from `noise` (B, in_channels, H, W) in num_steps denoising steps.

    method "ddpm": ancestral sampling on guided-diffusion's respaced chain (`respaced_timesteps`),
    with the learned variance of learn_sigma configs and x0 clipped to [-1, 1], as its
    p_sample_loop; "ddim": DDIM with the given eta and the same clipping on its "ddimN"
    timesteps (`ddim_timesteps`: the smallest integer stride giving exactly num_steps steps);
    "dpm_solver": DPM-Solver++(2M) (`samplers.dpm_solver`: diffusers' DPMSolverMultistepScheduler
    with the config's beta schedule, "linspace" timesteps, no clipping), on the eps channels.
    The schedule is the config's (cosine for imagenet64, linear for imagenet256). Classifier-free
    guidance mixes the eps of `labels` with that of `null_labels` (for a model trained with a
    null class; the released ADM models were not, and sample at the default scale 1).

    Classifier guidance, the paper's: a noisy-image `classifier` (fastgen.models.adm_classifier)
    steers every step towards `labels` with the gradient classifier_scale x grad log p(labels |
    x_t) (`classifier_gradient`), added to the DDPM mean times its variance, or to DDIM's eps
    times -sqrt(1 - abar_t) (fastgen.samplers). An unconditional model (num_classes None) is
    then called without the labels, which only the classifier reads."""
    if method not in ("ddpm", "ddim", "dpm_solver"):
        raise ValueError(f"method must be 'ddpm', 'ddim' or 'dpm_solver'; got {method!r}")
    if classifier is not None and method == "dpm_solver":
        raise ValueError("classifier guidance runs with method 'ddpm' or 'ddim', as guided-diffusion formulates it; "
                         "method 'dpm_solver' takes no classifier")
    config = model.config
    abar = samplers.alphas_cumprod(samplers.beta_schedule(config.noise_schedule, NUM_TRAIN_TIMESTEPS))
    guidance = dict(cond=labels, uncond=null_labels, guidance_scale=guidance_scale)
    cond_fn = None if classifier is None else classifier_gradient(classifier, classifier_scale)
    model_takes_labels = config.num_classes is not None or classifier is None

    def network(x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        return model(x, t, cond if model_takes_labels else None)

    if method == "ddpm":
        return samplers.ddpm(network, noise, abar, timesteps=respaced_timesteps(num_steps),
                             learned_variance=config.learn_sigma, clip_denoised=True, generator=generator,
                             cond_fn=cond_fn, **guidance)

    def eps(x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        return network(x, t, cond)[:, : config.in_channels]

    if method == "dpm_solver":
        return samplers.dpm_solver(eps, noise, abar, num_steps=num_steps, **guidance)
    return samplers.ddim(eps, noise, abar, timesteps=ddim_timesteps(num_steps), eta=eta, clip_denoised=True,
                         generator=generator, cond_fn=cond_fn, **guidance)


def example_resolution(model: ADMUNet, resolution: Optional[int] = None) -> int:
    """The image side example_step uses: `resolution`, by default the config's image size."""
    return example_resolution_multiple_of(resolution, model.config.image_size, model.config.downsampling,
                                          "the UNet's downsampling")


def example_step(model: ADMUNet, batch: int = 1, resolution: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> Callable[[], torch.Tensor]:
    """One denoising call on the guidance batch 2 x `batch` of resolution x resolution images
    (default: the config's image size), random inputs drawn once on the model's device."""
    config = model.config
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1; got {batch!r}")
    resolution = example_resolution(model, resolution)
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    size = 2 * batch
    x = torch.randn(size, config.in_channels, resolution, resolution, generator=generator).to(device, dtype)
    timesteps = torch.randint(NUM_TRAIN_TIMESTEPS, (size,), generator=generator).float().to(device)
    labels = (None if config.num_classes is None
              else torch.randint(config.num_classes, (size,), generator=generator).to(device))

    def step() -> torch.Tensor:
        with torch.no_grad():
            return model(x, timesteps, labels)

    return step
