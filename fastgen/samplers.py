"""Samplers shared by the reference models.

A model is passed as `model_fn(x, t, cond) -> prediction`, with x the current sample (B, ...),
t a (B,) float tensor of times and cond whatever the model needs besides x and t: a tensor, or a
dict / tuple / list of tensors (for example a caption and its mask), batched along dim 0.
Wrapping a network into this form (scaling t to its timestep range, unpacking cond) is the
caller's job, which keeps the samplers independent of any one model.

Two families: flow matching (the model predicts a velocity, t runs from 1 to 0; the schedules
of SANA, Stable Diffusion 3 and FLUX.1 differ in how they shift the times) and discrete-time
diffusion (the model predicts the noise eps, or v, t is a training timestep in [0, T), the
forward process is x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with abar_t the cumulative
product of 1 - beta over steps 0..t). Each sampler and schedule follows one original, and the
tests compare it step by step (every model call's timestep and state) with it:

- flow_matching_euler: Euler on the flow ODE; on `sd3_timesteps` it is diffusers'
  FlowMatchEulerDiscreteScheduler (SD3, SANA's Euler), on `flux_timesteps` FLUX.1's pipeline;
  `flow_matching_timesteps` is a plain shifted grid of no pipeline.
- flow_dpm_solver: SANA's Flow-DPM-Solver, DPM-Solver++(2M) on the flow (diffusers'
  DPMSolverMultistepScheduler with use_flow_sigmas, flow_shift, flow_prediction).
- dpm_solver: DPM-Solver++(2M) (Lu et al. 2022) for eps / v models, as diffusers'
  DPMSolverMultistepScheduler by default, on its "linspace" timesteps (`linspace_timesteps`).
- ddim: DDIM (Song et al. 2021) as diffusers' DDIMScheduler and guided-diffusion's
  ddim_sample (clip_denoised); v-prediction and zero terminal SNR (Lin et al. 2024:
  `zero_terminal_snr`, `trailing_timesteps`) as DDIMScheduler with those options. Timesteps:
  `spaced_timesteps` (diffusers' "leading"; SD), or a model's own (ADM: guided-diffusion's
  ddimN respacing, fastgen.models.adm_unet.ddim_timesteps).
- ddpm: DDPM ancestral sampling with improved DDPM's respacing and learned variance, as
  guided-diffusion's p_sample_loop.
- edm_sampler: EDM's Algorithm 2 (Karras et al. 2022; Algorithm 1 without churn) on its
  rho = 7 levels (`karras_sigmas`) through EDM's preconditioning of a discrete VP model; without
  churn and with diffusers' timestep lookup it is diffusers' Heun / Euler DiscreteScheduler with
  use_karras_sigmas.
- beta_schedule: DDPM's linear, Stable Diffusion's scaled_linear and improved DDPM's cosine
  betas (diffusers' "linear", "scaled_linear", "squaredcos_cap_v2").

Classifier-free guidance: pred = pred_u + s (pred_c - pred_u), where pred_u is the prediction
under `uncond` and pred_c under `cond`. Both halves are computed in ONE model call on the
batch concatenated as [uncond; cond], which keeps the GPU busy with one large batch instead of
two small ones.

Classifier guidance (Dhariwal & Nichol 2021, as guided-diffusion's sampling): `cond_fn(x, t,
cond)` returns s grad_x log p(cond | x) at the current sample x_t, the gradient of a noisy-image
classifier's log-probability scaled by the classifier scale s. DDPM shifts the step's mean by
variance x gradient; DDIM shifts the noise estimate, eps <- eps - sqrt(1 - abar_t) gradient.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import math

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def _concat_halves(uncond: Any, cond: Any, where: str = "") -> Any:
    """[uncond; cond] along dim 0, leaf by leaf through dicts, tuples and lists. `where` is the
    position of this leaf inside cond, for error messages."""
    if isinstance(cond, torch.Tensor):
        if not isinstance(uncond, torch.Tensor) or uncond.shape != cond.shape:
            got = tuple(uncond.shape) if isinstance(uncond, torch.Tensor) else type(uncond).__name__
            raise ValueError(f"uncond{where} must be a tensor shaped like cond{where}, {tuple(cond.shape)}; got {got}")
        return torch.cat([uncond, cond])
    if isinstance(cond, dict):
        if not isinstance(uncond, dict) or uncond.keys() != cond.keys():
            raise ValueError(f"uncond{where} must be a dict with the keys of cond{where}: {sorted(cond)}")
        return {key: _concat_halves(uncond[key], cond[key], f"{where}[{key!r}]") for key in cond}
    if isinstance(cond, (tuple, list)):
        if not isinstance(uncond, (tuple, list)) or len(uncond) != len(cond):
            raise ValueError(f"uncond{where} must be a sequence of {len(cond)} items like cond{where}")
        return type(cond)(_concat_halves(u, c, f"{where}[{i}]") for i, (u, c) in enumerate(zip(uncond, cond)))
    if cond is None and uncond is None:
        return None
    raise TypeError(
        f"cond{where} must be a tensor, a dict / tuple / list of tensors, or None; got {type(cond).__name__}"
    )


def guided_prediction(
    model_fn: ModelFn,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Any,
    uncond: Any = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """The model's prediction at (x, t), with classifier-free guidance when `uncond` is given and
    `guidance_scale` != 1 (at scale 1 the guided prediction is the conditional one, so the
    unconditional half is not computed)."""
    if uncond is None or guidance_scale == 1.0:
        return model_fn(x, t, cond)
    both = model_fn(torch.cat([x, x]), torch.cat([t, t]), _concat_halves(uncond, cond))
    unconditional, conditional = both.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


def flow_matching_timesteps(
    num_steps: int, shift: float = 1.0, device: Optional[torch.device] = None
) -> torch.Tensor:
    """num_steps + 1 times from 1 (noise) down to 0 (data): an even grid s passed through the
    time shift t = shift s / (1 + (shift - 1) s), which spends more steps at high noise for
    shift > 1. float32.

    This plain grid is no pipeline's: the SD3 and SANA pipelines step the Euler sampler on
    diffusers' FlowMatchEulerDiscreteScheduler grid (`sd3_timesteps`, whose last nonzero time is
    shifted twice), and SANA's default sampler is `flow_dpm_solver` on its own grid."""
    _check_num_steps(num_steps)
    grid = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float32, device=device)
    return shifted_time(grid, shift)


def _check_num_steps(num_steps: int) -> None:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")


def shifted_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The static time shift t' = shift t / (1 + (shift - 1) t): for shift > 1 it moves every
    time towards the noise end, 0 and 1 staying put (SD3: shift 3)."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0; got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(image_tokens: int, base_tokens: int = 256, max_tokens: int = 4096, base_shift: float = 0.5,
                     max_shift: float = 1.15) -> float:
    """FLUX.1's log-shift mu for an image of `image_tokens` tokens: linear in the token count,
    base_shift at base_tokens (256 px) and max_shift at max_tokens (1024 px), extrapolated
    beyond."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return base_shift + slope * (image_tokens - base_tokens)


def resolution_shifted_time(t: torch.Tensor, mu: float) -> torch.Tensor:
    """FLUX.1's time shift t' = e^mu / (e^mu + (1 / t - 1)), the static shift with shift = e^mu
    written for t > 0."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def sd3_timesteps(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000,
                  device: Optional[torch.device] = None) -> torch.Tensor:
    """num_steps + 1 times from 1 to 0 as the Stable Diffusion 3 pipeline, and SANA's with its
    Euler sampler, sample them (diffusers' FlowMatchEulerDiscreteScheduler with `shift`):
    num_steps times evenly spaced from 1 down to the scheduler's smallest training time
    s_min = shifted_time(1 / num_train_timesteps, shift), each passed through shifted_time,
    then 0. (s_min is shifted once more there, which sets the
    last nonzero time; flow_matching_timesteps' grid ends at 0 instead.) float32; the network's
    timestep is num_train_timesteps times these."""
    _check_num_steps(num_steps)
    smallest = float(shifted_time(torch.tensor(1.0 / num_train_timesteps, dtype=torch.float64), shift))
    grid = torch.linspace(1.0, smallest, num_steps, dtype=torch.float64, device=device)
    return _with_final_zero(shifted_time(grid, shift))


def flux_timesteps(num_steps: int, image_tokens: Optional[int] = None,
                   device: Optional[torch.device] = None) -> torch.Tensor:
    """num_steps + 1 times from 1 to 0 as FLUX.1's pipeline samples them: num_steps times evenly
    spaced from 1 down to 1 / num_steps, passed through resolution_shifted_time with
    mu = resolution_shift(image_tokens) ([dev]; image_tokens None: unshifted, [schnell]), then 0.
    float32."""
    _check_num_steps(num_steps)
    grid = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64, device=device)
    if image_tokens is not None:
        grid = resolution_shifted_time(grid, resolution_shift(image_tokens))
    return _with_final_zero(grid)


def _with_final_zero(times: torch.Tensor) -> torch.Tensor:
    return torch.cat([times, times.new_zeros(1)]).float()


def flow_matching_euler(
    model_fn: ModelFn,
    noise: torch.Tensor,
    *,
    timesteps: Optional[torch.Tensor] = None,
    num_steps: Optional[int] = None,
    shift: float = 1.0,
    guidance_scale: float = 1.0,
    cond: Any = None,
    uncond: Any = None,
) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) with Euler steps x <- x + (t_next - t) v from x = `noise` at
    timesteps[0] to timesteps[-1].

    The model predicts the velocity v of the straight path x_t = (1 - t) x_0 + t noise, that is
    v = noise - x_0 (rectified flow as in SANA and SD3), so the default schedule runs from t = 1
    to t = 0. Give either `timesteps` (1-D, at least two times, in order of integration) or
    `num_steps` (with `shift`, see `flow_matching_timesteps`). The sample keeps the dtype of
    `noise`; guidance is as in the module docstring."""
    if (timesteps is None) == (num_steps is None):
        raise ValueError("give exactly one of timesteps and num_steps")
    if timesteps is None:
        timesteps = flow_matching_timesteps(num_steps, shift, device=noise.device)
    timesteps = torch.as_tensor(timesteps, dtype=torch.float32, device=noise.device)
    if timesteps.ndim != 1 or timesteps.numel() < 2:
        raise ValueError(f"timesteps must be 1-D with at least 2 entries; got shape {tuple(timesteps.shape)}")

    x = noise
    batch = noise.shape[0]
    for t, t_next in zip(timesteps[:-1], timesteps[1:]):
        velocity = guided_prediction(model_fn, x, t.expand(batch), cond, uncond, guidance_scale)
        x = x + (t_next - t).to(x.dtype) * velocity.to(x.dtype)
    return x


def beta_schedule(kind: str, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The betas of a diffusion forward process, float64, shape (num_train_timesteps,).

    "linear": evenly spaced from 1e-4 to 0.02 at 1000 steps (DDPM, ADM ImageNet 256); for
    another T both ends scale by 1000 / T so the total noise stays comparable.
    "scaled_linear": evenly spaced in sqrt(beta) from sqrt(0.00085) to sqrt(0.012) (Stable
    Diffusion / LDM). "cosine": abar(t) = cos^2(pi/2 (t/T + 0.008) / 1.008), betas from the ratio
    of consecutive abar, capped at 0.999 where the curve reaches zero (improved DDPM, ADM
    ImageNet 64)."""
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1; got {num_train_timesteps}")
    if kind == "linear":
        scale = 1000.0 / num_train_timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_train_timesteps, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
    if kind == "cosine":
        grid = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
        alpha_bar = torch.cos((grid + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"beta schedule kind must be 'linear', 'scaled_linear' or 'cosine'; got {kind!r}")


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """abar_t = prod_{s <= t} (1 - beta_s), in float64."""
    return torch.cumprod(1 - betas.to(torch.float64), dim=0)


def zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """The betas rescaled to zero terminal SNR (Lin et al., "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", 2024, Algorithm 1): sqrt(abar) is shifted so that its last value is
    0 and scaled so that its first keeps its value, sqrt(abar)' = (sqrt(abar) - sqrt(abar_T))
    sqrt(abar_0) / (sqrt(abar_0) - sqrt(abar_T)); the betas follow from the ratios of
    consecutive abar' (the last beta is 1). The last timestep is then pure noise, which only a
    v-prediction model can denoise (`ddim`'s prediction_type). float64."""
    root = alphas_cumprod(betas).sqrt()
    first, last = root[0].item(), root[-1].item()
    rescaled = ((root - last) * (first / (first - last))) ** 2
    return 1 - torch.cat([rescaled[:1], rescaled[1:] / rescaled[:-1]])


def trailing_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """num_steps training timesteps, descending, from T - 1: T - i T / num_steps, rounded to the
    nearest (ties to even), minus 1, for i = 0 .. num_steps - 1 (the "trailing" spacing of Lin et
    al. 2024, which starts sampling at the last, pure-noise timestep; diffusers'
    timestep_spacing="trailing"). int64.

    The points are T + i d with the stride d = (T - T / num_steps) - T as it is rounded in double
    precision, as numpy's arange computes them in diffusers: that rounding decides the exact ties
    (48 steps: 937.5 - 1e-13, so 936). Where numpy's arange returns one point more (a point near 0,
    so a timestep -1: 62 of the 1000 counts), these are the first num_steps. diffusers'
    DDIMScheduler steps every timestep t to t - T // num_steps, which is the next of these only
    when num_steps divides T; `ddim` always steps to the next."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}]; got {num_steps}")
    total = float(num_train_timesteps)
    stride = (total - total / num_steps) - total
    return (total + torch.arange(num_steps, dtype=torch.float64) * stride).round().to(torch.int64) - 1


def spaced_timesteps(num_steps: int, num_train_timesteps: int = 1000, offset: int = 0) -> torch.Tensor:
    """num_steps training timesteps, descending, evenly spaced with stride T // num_steps from
    `offset` up (diffusers' "leading" spacing; Stable Diffusion uses offset 1). int64."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}]; got {num_steps}")
    stride = num_train_timesteps // num_steps
    if not 0 <= offset < stride:
        raise ValueError(f"offset must be in [0, {stride}) for {num_steps} steps of {num_train_timesteps}; got {offset}")
    return (torch.arange(num_steps, dtype=torch.int64) * stride + offset).flip(0)


def _diffusion_timesteps(alphas_cumprod: torch.Tensor, num_steps: Optional[int], timesteps, required: bool) -> list:
    """The chain's training timesteps as Python ints, validated: strictly descending, in range."""
    if num_steps is not None and timesteps is not None:
        raise ValueError("give at most one of num_steps and timesteps")
    if alphas_cumprod.ndim != 1 or alphas_cumprod.numel() == 0:
        raise ValueError(f"alphas_cumprod must be a non-empty 1-D tensor; got shape {tuple(alphas_cumprod.shape)}")
    total = alphas_cumprod.numel()
    if timesteps is None:
        if num_steps is None and required:
            raise ValueError("give num_steps or timesteps")
        timesteps = spaced_timesteps(num_steps, total) if num_steps is not None else torch.arange(total).flip(0)
    steps = [int(t) for t in torch.as_tensor(timesteps).reshape(-1).tolist()]
    if not steps or any(a <= b for a, b in zip(steps, steps[1:])) or steps[0] >= total or steps[-1] < 0:
        raise ValueError(f"timesteps must be strictly descending training timesteps in [0, {total}); got {steps}")
    return steps


def _check_signal_left(alphas_cumprod: torch.Tensor, steps: list, consequence: str) -> None:
    """Refuses a chain visiting a timestep whose abar is 0 (zero terminal SNR: pure noise)."""
    empty = [t for t in steps if alphas_cumprod[t].item() <= 0]
    if empty:
        raise ValueError(f"alphas_cumprod is 0 at timestep {empty[0]} of the chain (zero terminal SNR): {consequence}")


def _chain(alphas_cumprod: torch.Tensor, steps: list, final_alpha_cumprod: float, noise: torch.Tensor) -> Iterator:
    """Per step: the model's time input (a (B,) float tensor of t), abar_t, abar of the next
    timestep (`final_alpha_cumprod` after the last) and whether it is the last step."""
    abar = alphas_cumprod.to(torch.float64).tolist()
    for i, t in enumerate(steps):
        last = i + 1 == len(steps)
        time = torch.full((noise.shape[0],), float(t), device=noise.device)
        yield time, abar[t], final_alpha_cumprod if last else abar[steps[i + 1]], last


def _gaussian(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def ddim(
    model_fn: ModelFn,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    num_steps: Optional[int] = None,
    timesteps: Optional[torch.Tensor] = None,
    eta: float = 0.0,
    final_alpha_cumprod: float = 1.0,
    clip_denoised: bool = False,
    cond: Any = None,
    uncond: Any = None,
    guidance_scale: float = 1.0,
    generator: Optional[torch.Generator] = None,
    cond_fn: Optional[ModelFn] = None,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """DDIM from x = `noise` at timesteps[0] down to the data.

    Each step from t to the next timestep p (abar_p = `final_alpha_cumprod` after the last):
    x0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t) for an eps model; for `prediction_type`
    "v_prediction" (SD 2.x) the model predicts v and x0 = sqrt(abar_t) x - sqrt(1 - abar_t) v,
    eps = sqrt(1 - abar_t) x + sqrt(abar_t) v, defined at abar_t = 0 too (the first timestep of
    a `zero_terminal_snr` schedule with `trailing_timesteps`, where an eps model is refused).
    Then sigma = eta sqrt((1 - abar_p) / (1 - abar_t)) sqrt(1 - abar_t / abar_p) and
    x <- sqrt(abar_p) x0 + sqrt(1 - abar_p - sigma^2) eps + sigma z.
    eta = 0 is deterministic, eta = 1 is DDPM's posterior noise. Give `num_steps` (evenly spaced,
    see spaced_timesteps) or explicit descending `timesteps`. The model's prediction is guided as
    in the module docstring. Stable Diffusion passes final_alpha_cumprod = alphas_cumprod[0]. With
    `clip_denoised` (pixel-space models such as ADM), x0 is clamped to [-1, 1] and eps
    re-derived from it, so the step stays consistent with the clamped estimate. `cond_fn`
    (classifier guidance, module docstring) then shifts eps, and x0 follows it unclamped, as
    guided-diffusion's condition_score."""
    _check_prediction_type(prediction_type)
    steps = _diffusion_timesteps(alphas_cumprod, num_steps, timesteps, required=True)
    if prediction_type == "epsilon":
        _check_signal_left(alphas_cumprod, steps, "an epsilon model's data estimate (x - sqrt(1 - abar) eps) / "
                                                  "sqrt(abar) is undefined there; a v_prediction model works")
    elif cond_fn is not None:
        _check_signal_left(alphas_cumprod, steps, "classifier guidance re-derives the data estimate from the "
                                                  "shifted eps, which divides by sqrt(abar)")
    x = noise
    for time, abar_t, abar_prev, _ in _chain(alphas_cumprod, steps, final_alpha_cumprod, noise):
        output = guided_prediction(model_fn, x, time, cond, uncond, guidance_scale).to(x.dtype)
        x0, eps = _x0_and_eps(output, x, abar_t, prediction_type)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
            eps = (x - math.sqrt(abar_t) * x0) / math.sqrt(1 - abar_t)
        if cond_fn is not None:
            eps = eps - math.sqrt(1 - abar_t) * cond_fn(x, time, cond).to(x.dtype)
            x0 = (x - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)
        sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
        x = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - sigma ** 2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * _gaussian(x, generator)
    return x


def _eps_and_variance_fraction(model_fn, x, time, cond, uncond, guidance_scale, learned_variance):
    """eps (guided) and, for a learned-variance model, v in [-1, 1] from the conditional half.

    Such a model returns 2C channels, [eps, v]; guidance mixes eps only, because interpolating
    the two halves' variances has no meaning as a guided score."""
    if not learned_variance:
        return guided_prediction(model_fn, x, time, cond, uncond, guidance_scale), None
    channels = x.shape[1]
    if uncond is None or guidance_scale == 1.0:
        out = model_fn(x, time, cond)
        _check_learned_variance_output(out, x)
        return out[:, :channels], out[:, channels:]
    both = model_fn(torch.cat([x, x]), torch.cat([time, time]), _concat_halves(uncond, cond))
    unconditional, conditional = both.chunk(2)
    _check_learned_variance_output(conditional, x)
    eps_u, eps_c = unconditional[:, :channels], conditional[:, :channels]
    return eps_u + guidance_scale * (eps_c - eps_u), conditional[:, channels:]


def _check_learned_variance_output(out: torch.Tensor, x: torch.Tensor) -> None:
    if out.ndim < 2 or out.shape[1] != 2 * x.shape[1] or out.shape[2:] != x.shape[2:]:
        raise ValueError(
            f"with learned_variance the model must return [eps, v] with 2 x {x.shape[1]} channels shaped like x "
            f"otherwise; got {tuple(out.shape)} for x {tuple(x.shape)}"
        )


def ddpm(
    model_fn: ModelFn,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    timesteps: Optional[torch.Tensor] = None,
    learned_variance: bool = False,
    clip_denoised: bool = False,
    cond: Any = None,
    uncond: Any = None,
    guidance_scale: float = 1.0,
    generator: Optional[torch.Generator] = None,
    cond_fn: Optional[ModelFn] = None,
) -> torch.Tensor:
    """DDPM ancestral sampling from x = `noise` at timesteps[0] (default: every training step,
    T-1 down to 0).

    A step from t to the next timestep p (abar_p = 1 after the last) has beta = 1 - abar_t /
    abar_p, which is the training beta_t on the full chain and the respaced beta on a sparser
    `timesteps` (improved DDPM's respacing). The step is
    x <- (x - beta / sqrt(1 - abar_t) eps) / sqrt(1 - beta) + sigma z, computed in the
    equivalent posterior-mean form from x0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t), which
    `clip_denoised` clamps to [-1, 1] first (ADM's pixel-space models). sigma^2 is the posterior
    variance beta (1 - abar_p) / (1 - abar_t), or, with `learned_variance` (ADM), the model's
    interpolation exp(f log beta + (1 - f) log posterior) with f = (v + 1) / 2. No noise is added
    on the last step. `cond_fn` (classifier guidance, module docstring) adds sigma^2 x its
    gradient to the mean, on every step: on the last, where the posterior variance is 0, the
    learned variance interpolates towards the step before's posterior variance instead, as
    guided-diffusion clips it (a guided learned-variance chain therefore needs two steps or more)."""
    steps = _diffusion_timesteps(alphas_cumprod, None, timesteps, required=False)
    if cond_fn is not None and learned_variance and len(steps) < 2:
        raise ValueError(f"cond_fn with learned_variance needs at least 2 timesteps (the last step's variance "
                         f"comes from the step before); got {steps}")
    x = noise
    for time, abar_t, abar_prev, last in _chain(alphas_cumprod, steps, 1.0, noise):
        beta = 1 - abar_t / abar_prev
        eps, fraction = _eps_and_variance_fraction(model_fn, x, time, cond, uncond, guidance_scale, learned_variance)
        x0 = (x - math.sqrt(1 - abar_t) * eps.to(x.dtype)) / math.sqrt(abar_t)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean = (math.sqrt(abar_prev) * beta / (1 - abar_t)) * x0 + (
            math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar_t)) * x
        if not last:
            posterior_variance = beta * (1 - abar_prev) / (1 - abar_t)
        if fraction is not None and (cond_fn is not None or not last):
            f = (fraction.to(torch.promote_types(fraction.dtype, torch.float32)) + 1) / 2
            log_variance = f * math.log(beta) + (1 - f) * math.log(posterior_variance)
        if cond_fn is not None:
            variance = (0.0 if last else posterior_variance) if fraction is None else log_variance.exp().to(x.dtype)
            mean = mean + variance * cond_fn(x, time, cond).to(x.dtype)
        if last:
            return mean
        if fraction is None:
            x = mean + math.sqrt(posterior_variance) * _gaussian(x, generator)
        else:
            x = mean + (0.5 * log_variance).exp().to(x.dtype) * _gaussian(x, generator)
    return x


def linspace_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """num_steps training timesteps, descending: num_steps + 1 points spread evenly over
    [0, T - 1], rounded to the nearest (ties to even), highest first, the last point (0) left out
    (diffusers' "linspace" spacing, its DPM-Solver scheduler's default). int64."""
    if not 1 <= num_steps < num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps - 1}] for distinct timesteps spread over "
                         f"{num_train_timesteps}; got {num_steps}")
    points = torch.arange(num_steps + 1, dtype=torch.float64) * ((num_train_timesteps - 1) / num_steps)
    return points.round().to(torch.int64).flip(0)[:-1]


def _x0_and_eps(output: torch.Tensor, x: torch.Tensor, alpha_cumprod: float, prediction_type: str):
    """The data and noise estimates (x0, eps) at x = sqrt(abar) x0 + sqrt(1 - abar) eps from the
    model's output: eps itself ("epsilon"), or v = sqrt(abar) eps - sqrt(1 - abar) x0
    ("v_prediction", Salimans & Ho 2022), which gives x0 = sqrt(abar) x - sqrt(1 - abar) v and
    eps = sqrt(1 - abar) x + sqrt(abar) v, both defined at abar = 0 too."""
    alpha, sigma = math.sqrt(alpha_cumprod), math.sqrt(1 - alpha_cumprod)
    if prediction_type == "epsilon":
        return (x - sigma * output) / alpha, output
    return alpha * x - sigma * output, sigma * x + alpha * output


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction'; got {prediction_type!r}")


def _dpm_solver_2m(predict_data: Callable[[torch.Tensor, int], torch.Tensor], noise: torch.Tensor,
                   alphas: list, sigmas: list) -> torch.Tensor:
    """DPM-Solver++(2M) through the states x_i = alphas[i] x0 + sigmas[i] eps, i = 0 .. n, from
    x_0 = `noise` to sigmas[n] = 0 (the data). predict_data(x, i) is the model's estimate of x0
    at step i. With lambda = log(alpha / sigma), h = lambda_{i+1} - lambda_i and
    h' = lambda_i - lambda_{i-1}, a step is

        x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (e^{-h} - 1) D_i,
        D_i = x0_i + h / (2 h') (x0_i - x0_{i-1}),

    first order (D_0 = x0_0) on the first step, and the last step, to sigma = 0, lands on x0."""
    x = noise
    earlier = None  # the previous step's x0 estimate and lambda
    for i in range(len(alphas) - 1):
        x0 = predict_data(x, i)
        if sigmas[i + 1] == 0:
            return x0
        lambda_now = math.log(alphas[i] / sigmas[i])
        h = math.log(alphas[i + 1] / sigmas[i + 1]) - lambda_now
        direction = x0 if earlier is None else x0 + (h / (2 * (lambda_now - earlier[1]))) * (x0 - earlier[0])
        x = (sigmas[i + 1] / sigmas[i]) * x - (alphas[i + 1] * math.expm1(-h)) * direction
        earlier = (x0, lambda_now)
    return x


def dpm_solver(
    model_fn: ModelFn,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    num_steps: Optional[int] = None,
    timesteps: Optional[torch.Tensor] = None,
    prediction_type: str = "epsilon",
    cond: Any = None,
    uncond: Any = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al., 2022, arXiv:2211.01095) for a discrete-time diffusion model,
    as diffusers' DPMSolverMultistepScheduler runs it by default ("dpmsolver++", order 2,
    midpoint form, final sigma 0), from x = `noise` at timesteps[0] down to the data.

    The state at training timestep t is x = alpha x0 + sigma eps with alpha = sqrt(abar_t),
    sigma = sqrt(1 - abar_t); each step is the multistep update of `_dpm_solver_2m` on the data
    estimate x0 from the model's output (`prediction_type` "epsilon": x0 = (x - sigma eps) / alpha;
    "v_prediction": x0 = alpha x - sigma v); after the last timestep the chain ends at sigma = 0,
    whose step returns that timestep's x0. The first step is first order, which is DDIM's.
    Give `num_steps` (diffusers' spacing for this scheduler, `linspace_timesteps`) or explicit
    descending `timesteps`. The model sees the integer timesteps as floats; guidance is as in the
    module docstring. The sample keeps the dtype of `noise`."""
    _check_prediction_type(prediction_type)
    if num_steps is not None and timesteps is None:
        timesteps = linspace_timesteps(num_steps, alphas_cumprod.numel())
        num_steps = None
    steps = _diffusion_timesteps(alphas_cumprod, num_steps, timesteps, required=True)
    _check_signal_left(alphas_cumprod, steps, "DPM-Solver's log signal-to-noise ratio is -infinite there; "
                                              "start below it or use ddim")
    abar = alphas_cumprod.to(torch.float64).tolist()
    alphas = [math.sqrt(abar[t]) for t in steps] + [1.0]
    sigmas = [math.sqrt(1 - abar[t]) for t in steps] + [0.0]

    def predict_data(x: torch.Tensor, i: int) -> torch.Tensor:
        time = torch.full((x.shape[0],), float(steps[i]), device=x.device)
        output = guided_prediction(model_fn, x, time, cond, uncond, guidance_scale).to(x.dtype)
        return _x0_and_eps(output, x, abar[steps[i]], prediction_type)[0]

    return _dpm_solver_2m(predict_data, noise, alphas, sigmas)


def flow_dpm_solver_sigmas(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The num_steps + 1 times (noise levels) of SANA's Flow-DPM-Solver, from high to 0: an even
    grid of num_steps + 1 points from 1 - 1 / T down to 0, passed through shifted_time (diffusers'
    DPMSolverMultistepScheduler with use_flow_sigmas and flow_shift = `shift`; SANA: shift 3).
    float64."""
    _check_num_steps(num_steps)
    # The grid is 1 - (1 + i d) with d = (1 / T - 1) / num_steps and its last point set exactly,
    # the float64 operations of numpy's linspace in diffusers: the network's timestep is T t
    # truncated, which one rounding of t can move by a whole timestep.
    step = (1.0 / num_train_timesteps - 1.0) / num_steps
    grid = 1.0 - (torch.arange(num_steps + 1, dtype=torch.float64) * step + 1.0)
    grid[-1] = 1.0 - 1.0 / num_train_timesteps
    return shifted_time(grid, shift).flip(0)


def flow_dpm_solver(
    model_fn: ModelFn,
    noise: torch.Tensor,
    *,
    num_steps: int,
    shift: float = 1.0,
    num_train_timesteps: int = 1000,
    cond: Any = None,
    uncond: Any = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Flow-DPM-Solver, SANA's sampler: DPM-Solver++(2M) on the rectified flow
    x_t = (1 - t) x0 + t noise, whose velocity model v = noise - x0 gives the data estimate
    x0 = x - t v; the solver steps are those of `_dpm_solver_2m` with alpha = 1 - t, sigma = t,
    on the times `flow_dpm_solver_sigmas(num_steps, shift)` (SANA's pipeline: diffusers'
    DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3, prediction_type=
    "flow_prediction")). The model sees each time truncated down to a whole training timestep,
    t = floor(T t) / T, as that scheduler hands the network integer timesteps, while the
    solver's coefficients use the exact t. Guidance is as in the module docstring; the sample
    keeps the dtype of `noise`."""
    times = flow_dpm_solver_sigmas(num_steps, shift, num_train_timesteps)
    model_times = (times * num_train_timesteps).to(torch.int64).double() / num_train_timesteps
    sigmas = times.tolist()
    alphas = [1.0 - t for t in sigmas]

    def predict_data(x: torch.Tensor, i: int) -> torch.Tensor:
        time = torch.full((x.shape[0],), model_times[i].item(), device=x.device)
        velocity = guided_prediction(model_fn, x, time, cond, uncond, guidance_scale).to(x.dtype)
        return x - sigmas[i] * velocity

    return _dpm_solver_2m(predict_data, noise, alphas, sigmas)


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM's noise levels (Karras et al., 2022, arXiv:2206.00364, eq. 5): num_steps levels
    sigma_i = (sigma_max^(1/rho) + i / (num_steps - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
    from sigma_max down to sigma_min (sigma_max alone for one step), then 0. float64."""
    _check_num_steps(num_steps)
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(
            f"sigma_min and sigma_max must satisfy 0 < sigma_min <= sigma_max; got {sigma_min}, {sigma_max}")
    if rho <= 0:
        raise ValueError(f"rho must be > 0; got {rho}")
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    top, bottom = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return torch.cat([(top + ramp * (bottom - top)) ** rho, torch.zeros(1, dtype=torch.float64)])


def _timestep_lookup(training_sigmas: torch.Tensor, kind: str) -> Callable[[float], float]:
    """sigma -> the discrete model's timestep for it. "nearest": the training timestep whose
    sigma is nearest (EDM's c_noise for a discrete VP model); "log_sigma_interpolated": the
    fractional timestep interpolating log sigma linearly between the two training timesteps
    around it, clamped to [0, T - 1] (diffusers' Euler and Heun schedulers)."""
    if kind == "nearest":
        return lambda sigma: float((training_sigmas - sigma).abs().argmin())
    log_sigmas = training_sigmas.log()

    def interpolated(sigma: float) -> float:
        log_sigma = math.log(max(sigma, 1e-10))
        low = int(torch.searchsorted(log_sigmas, torch.tensor([log_sigma], dtype=torch.float64), right=True)) - 1
        low = min(max(low, 0), log_sigmas.numel() - 2)
        below, above = log_sigmas[low].item(), log_sigmas[low + 1].item()
        return low + min(max((below - log_sigma) / (below - above), 0.0), 1.0)

    return interpolated


def edm_sampler(
    model_fn: ModelFn,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    num_steps: int,
    sigma_min: Optional[float] = None,
    sigma_max: Optional[float] = None,
    rho: float = 7.0,
    heun: bool = True,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    prediction_type: str = "epsilon",
    timestep_lookup: str = "nearest",
    cond: Any = None,
    uncond: Any = None,
    guidance_scale: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """EDM's sampler (Karras et al., 2022, arXiv:2206.00364, Algorithm 2; Algorithm 1 at
    s_churn = 0) for a discrete-time VP model, on the noise levels `karras_sigmas` (sigma_min and
    sigma_max default to the model's sigma at its first and last training timestep).

    The state is x = x0 + sigma n, started at x = sigma_0 `noise`. The model becomes the
    denoiser D(x; sigma) = c_skip x + c_out F(c_in x; t(sigma)) (EDM's preconditioning, with
    sigma^2 = (1 - abar_t) / abar_t): c_in = 1 / sqrt(sigma^2 + 1), which is the model's own
    scaling sqrt(abar) of x; for `prediction_type` "epsilon" c_skip = 1, c_out = -sigma, for
    "v_prediction" c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1). t(sigma) is
    the training timestep nearest sigma (EDM; `timestep_lookup` "nearest") or diffusers'
    fractional timestep interpolated in log sigma ("log_sigma_interpolated"). Each step from
    sigma_i to sigma_{i+1}: gamma = min(s_churn / num_steps, sqrt(2) - 1) where
    s_tmin <= sigma_i <= s_tmax, else 0; sigma^ = (1 + gamma) sigma_i; x^ = x + sqrt(sigma^^2 -
    sigma_i^2) s_noise z (drawn from `generator`, only where gamma > 0); d = (x^ - D(x^; sigma^)) /
    sigma^; x' = x^ + (sigma_{i+1} - sigma^) d, and with `heun`, unless sigma_{i+1} = 0, the
    trapezoidal correction x' = x^ + (sigma_{i+1} - sigma^) (d + d') / 2 with
    d' = (x' - D(x'; sigma_{i+1})) / sigma_{i+1}. (EDM's released sampler also snaps every sigma
    to the model's nearest discrete sigma; here the levels stay on the rho schedule, as diffusers'
    Karras schedules do.) Guidance is as in the module docstring; the sample keeps the dtype of
    `noise`."""
    _check_prediction_type(prediction_type)
    if timestep_lookup not in ("nearest", "log_sigma_interpolated"):
        raise ValueError(f"timestep_lookup must be 'nearest' or 'log_sigma_interpolated'; got {timestep_lookup!r}")
    if alphas_cumprod.ndim != 1 or alphas_cumprod.numel() < 2:
        raise ValueError(
            f"alphas_cumprod must be 1-D with at least 2 timesteps; got shape {tuple(alphas_cumprod.shape)}")
    abar = alphas_cumprod.to(torch.float64)
    if not ((abar > 0) & (abar < 1)).all():
        raise ValueError("alphas_cumprod must lie in (0, 1) for finite, positive sigmas (a zero-terminal-SNR "
                         "schedule has sigma = infinity at its last timestep)")
    training_sigmas = ((1 - abar) / abar).sqrt()
    sigmas = karras_sigmas(num_steps, training_sigmas[0].item() if sigma_min is None else sigma_min,
                           training_sigmas[-1].item() if sigma_max is None else sigma_max, rho).tolist()
    timestep_of = _timestep_lookup(training_sigmas, timestep_lookup)
    gamma_max = min(s_churn / num_steps, math.sqrt(2) - 1)

    def denoised(x: torch.Tensor, sigma: float) -> torch.Tensor:
        time = torch.full((x.shape[0],), timestep_of(sigma), device=x.device)
        c_in = 1 / math.sqrt(sigma ** 2 + 1)
        output = guided_prediction(model_fn, c_in * x, time, cond, uncond, guidance_scale).to(x.dtype)
        if prediction_type == "epsilon":
            return x - sigma * output
        return c_in ** 2 * x - (sigma * c_in) * output

    x = sigmas[0] * noise
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        gamma = gamma_max if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            x = x + (math.sqrt(sigma_hat ** 2 - sigma ** 2) * s_noise) * _gaussian(x, generator)
        slope = (x - denoised(x, sigma_hat)) / sigma_hat
        x_next = x + (sigma_next - sigma_hat) * slope
        if heun and sigma_next > 0:
            slope_next = (x_next - denoised(x_next, sigma_next)) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * ((slope + slope_next) / 2)
        x = x_next
    return x
