"""fastgen.samplers: flow-matching Euler and classifier-free guidance on analytic models, the
SD3 and FLUX.1 schedules against diffusers' scheduler, DDPM and DDIM."""
import math

import pytest
import torch

from fastgen import samplers
from fastgen.models import adm_unet


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("num_steps", [1, 3, 10])
def test_euler_follows_a_straight_flow_to_its_endpoint(generator, shift, num_steps):
    """On x_t = (1 - t) x0 + t noise the exact velocity at (x, t) is (x - x0) / t, and every
    Euler step stays on the line, so the sampler must land on x0 whatever the schedule."""
    x0 = torch.randn(3, 4, 5, generator=generator, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)

    def velocity(x, t, cond):
        return (x - x0) / t.view(-1, 1, 1)

    out = samplers.flow_matching_euler(velocity, noise, num_steps=num_steps, shift=shift)
    torch.testing.assert_close(out, x0)


def test_euler_with_explicit_timesteps_integrates_a_constant_field(generator):
    noise = torch.randn(2, 6, generator=generator)
    drift = torch.randn(2, 6, generator=generator)
    out = samplers.flow_matching_euler(lambda x, t, cond: drift, noise, timesteps=torch.tensor([0.9, 0.4, 0.1]))
    torch.testing.assert_close(out, noise - 0.8 * drift)


def test_shifted_timesteps():
    torch.testing.assert_close(samplers.flow_matching_timesteps(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    # t = 3 s / (1 + 2 s): s = 0.5 -> 0.75, s = 0.25 -> 0.5.
    torch.testing.assert_close(samplers.flow_matching_timesteps(4, shift=3.0), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))


class CountingModel:
    """v(x, t, cond) = cond["scale"] * x + t: distinct for the two halves, and it records the
    batch of every call."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, cond):
        self.batches.append(x.shape[0])
        return cond["scale"].view(-1, 1) * x + t.view(-1, 1)


def test_guidance_is_one_batched_call_combining_the_halves(generator):
    x = torch.randn(3, 5, generator=generator)
    t = torch.rand(3, generator=generator)
    cond = {"scale": torch.rand(3, generator=generator)}
    uncond = {"scale": torch.rand(3, generator=generator)}
    model = CountingModel()
    guided = samplers.guided_prediction(model, x, t, cond, uncond, guidance_scale=7.0)
    assert model.batches == [6]
    conditional = cond["scale"].view(-1, 1) * x + t.view(-1, 1)
    unconditional = uncond["scale"].view(-1, 1) * x + t.view(-1, 1)
    torch.testing.assert_close(guided, unconditional + 7.0 * (conditional - unconditional))


@pytest.mark.parametrize("guidance_scale, batch_per_call", [(3.0, 4), (1.0, 2)])
def test_sampler_makes_one_call_per_step(generator, guidance_scale, batch_per_call):
    """Guided: both halves in one call of twice the batch. At scale 1 the guided prediction is
    the conditional one, so the unconditional half is skipped."""
    noise = torch.randn(2, 4, generator=generator)
    model = CountingModel()
    cond, uncond = {"scale": torch.full((2,), 0.5)}, {"scale": torch.full((2,), -0.5)}
    samplers.flow_matching_euler(model, noise, num_steps=5, guidance_scale=guidance_scale, cond=cond, uncond=uncond)
    assert model.batches == [batch_per_call] * 5


def test_conditions_are_concatenated_leaf_by_leaf():
    cond = (torch.ones(2, 3), {"mask": torch.ones(2, dtype=torch.bool)}, None)
    uncond = (torch.zeros(2, 3), {"mask": torch.zeros(2, dtype=torch.bool)}, None)
    tensor, mapping, nothing = samplers._concat_halves(uncond, cond)
    torch.testing.assert_close(tensor, torch.cat([torch.zeros(2, 3), torch.ones(2, 3)]))
    assert mapping["mask"].tolist() == [False, False, True, True]
    assert nothing is None


def test_bad_arguments_are_refused():
    noise = torch.zeros(2, 3)

    def model(x, t, cond):
        return x

    with pytest.raises(ValueError, match="exactly one"):
        samplers.flow_matching_euler(model, noise)
    with pytest.raises(ValueError, match="exactly one"):
        samplers.flow_matching_euler(model, noise, num_steps=2, timesteps=torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="timesteps"):
        samplers.flow_matching_euler(model, noise, timesteps=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="num_steps"):
        samplers.flow_matching_timesteps(0)
    with pytest.raises(ValueError, match=r"uncond\['mask'\]"):
        samplers.flow_matching_euler(
            model, noise, num_steps=1, guidance_scale=2.0,
            cond={"mask": torch.ones(2, 4)}, uncond={"mask": torch.ones(2, 5)},
        )


def _schedule(kind="linear", steps=50):
    return samplers.alphas_cumprod(samplers.beta_schedule(kind, steps))


class PointMassDenoiser:
    """The exact noise prediction when the data is the single point x0:
    eps(x_t, t) = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t). Every step of DDIM (any eta) and of
    DDPM then predicts x0 exactly, so both must end on x0 whatever the chain and the noise."""

    def __init__(self, x0, alphas_cumprod):
        self.x0, self.abar, self.times = x0, alphas_cumprod, []

    def __call__(self, x, t, cond):
        self.times.append(t[0].item())
        abar = self.abar[t.long()].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return (x - abar.sqrt() * self.x0) / (1 - abar).sqrt()


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_lands_on_the_point_mass(generator, kind, eta):
    abar = _schedule(kind)
    x0 = torch.randn(2, 3, 4, generator=generator, dtype=torch.float64)
    model = PointMassDenoiser(x0, abar)
    out = samplers.ddim(model, torch.randn(x0.shape, generator=generator, dtype=torch.float64), abar,
                        num_steps=7, eta=eta, generator=generator)
    torch.testing.assert_close(out, x0)
    assert model.times == [float(t) for t in samplers.spaced_timesteps(7, 50)]


@pytest.mark.parametrize("timesteps", [None, torch.tensor([40, 25, 9, 3, 0])])
def test_ddpm_lands_on_the_point_mass(generator, timesteps):
    abar = _schedule("cosine")
    x0 = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    model = PointMassDenoiser(x0, abar)
    out = samplers.ddpm(model, torch.randn(x0.shape, generator=generator, dtype=torch.float64), abar,
                        timesteps=timesteps, generator=generator)
    torch.testing.assert_close(out, x0)
    expected = list(range(49, -1, -1)) if timesteps is None else timesteps.tolist()
    assert model.times == [float(t) for t in expected]


def test_ddpm_step_is_the_spec_formula(generator):
    """One ancestral step with an arbitrary eps: x' = (x - beta / sqrt(1 - abar_t) eps) /
    sqrt(alpha) + sigma z with sigma^2 the posterior variance, then the final noiseless step."""
    abar = _schedule("linear", 20)
    x = torch.randn(2, 6, generator=generator, dtype=torch.float64)
    eps = torch.randn(2, 6, generator=generator, dtype=torch.float64)
    out = samplers.ddpm(lambda x_, t, c: eps, x, abar, timesteps=torch.tensor([12, 5]),
                        generator=torch.Generator().manual_seed(3))
    beta = 1 - abar[12] / abar[5]
    sigma = (beta * (1 - abar[5]) / (1 - abar[12])).sqrt()
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x5 = (x - beta / (1 - abar[12]).sqrt() * eps) / (1 - beta).sqrt() + sigma * z
    final = (x5 - (1 - abar[5]).sqrt() * eps) / abar[5].sqrt()  # abar_prev = 1: the mean is x0
    torch.testing.assert_close(out, final)


def test_learned_variance_interpolates_between_the_posterior_and_beta(generator):
    """v = -1 is the posterior variance (the default chain, same noise draws); v = +1 is beta."""
    abar = _schedule("linear", 20)
    x = torch.randn(2, 3, 4, generator=generator, dtype=torch.float64)
    eps = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    chain = torch.tensor([15, 7, 2])

    def sample(v, learned):
        def model(x_, t, c):
            return torch.cat([eps, torch.full_like(eps, v)], dim=1) if learned else eps
        return samplers.ddpm(model, x, abar, timesteps=chain, learned_variance=learned,
                             generator=torch.Generator().manual_seed(7))

    torch.testing.assert_close(sample(-1.0, True), sample(None, False))
    # With v = +1 the first step's noise is scaled by sqrt(beta) instead of the posterior sigma;
    # the two later steps are deterministic functions of x, so compare through one step.
    def one_step(v):
        model = lambda x_, t, c: torch.cat([eps, torch.full_like(eps, v)], dim=1)  # noqa: E731
        return samplers.ddpm(model, x, abar, timesteps=chain[:2], learned_variance=True,
                             generator=torch.Generator().manual_seed(7))
    beta = 1 - abar[15] / abar[7]
    posterior = beta * (1 - abar[7]) / (1 - abar[15])
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    # one_step returns x0 of the second step: (x7 - sqrt(1 - abar_7) eps) / sqrt(abar_7); the
    # difference between v = +1 and v = -1 is only the noise term, divided by sqrt(abar_7).
    difference = (one_step(1.0) - one_step(-1.0)) * abar[7].sqrt()
    torch.testing.assert_close(difference, (beta.sqrt() - posterior.sqrt()) * z)


def test_diffusion_guidance_is_one_batched_call(generator):
    abar = _schedule("scaled_linear", 30)
    model = CountingModel()
    cond, uncond = {"scale": torch.full((2,), 0.1)}, {"scale": torch.full((2,), -0.1)}
    noise = torch.randn(2, 4, generator=generator)
    samplers.ddim(model, noise, abar, num_steps=3, cond=cond, uncond=uncond, guidance_scale=5.0)
    assert model.batches == [4] * 3


def test_learned_variance_guidance_mixes_eps_only(generator):
    x = torch.randn(2, 3, generator=generator)
    time = torch.full((2,), 4.0)

    def model(x_, t, cond):
        return torch.cat([cond * x_, cond.expand_as(x_)], dim=1)

    cond, uncond = torch.full((2, 1), 2.0), torch.full((2, 1), -1.0)
    eps, fraction = samplers._eps_and_variance_fraction(model, x, time, cond, uncond, 3.0, True)
    torch.testing.assert_close(eps, -x + 3.0 * (2 * x + x))
    torch.testing.assert_close(fraction, torch.full((2, 3), 2.0))


def test_schedules():
    linear = samplers.beta_schedule("linear")
    assert linear[0].item() == pytest.approx(1e-4) and linear[-1].item() == pytest.approx(0.02)
    scaled = samplers.beta_schedule("scaled_linear")
    assert scaled[0].item() == pytest.approx(0.00085) and scaled[-1].item() == pytest.approx(0.012)
    abar = samplers.alphas_cumprod(samplers.beta_schedule("cosine"))
    assert (abar[1:] < abar[:-1]).all() and abar[-1] < 1e-4 and abar[0] > 0.9999
    assert samplers.spaced_timesteps(50, offset=1)[:3].tolist() == [981, 961, 941]
    assert samplers.spaced_timesteps(50, offset=1)[-1].item() == 1


def test_bad_diffusion_arguments_are_refused():
    abar = _schedule()
    noise = torch.zeros(1, 2)
    eps = lambda x, t, c: x  # noqa: E731
    with pytest.raises(ValueError, match="kind"):
        samplers.beta_schedule("quadratic")
    with pytest.raises(ValueError, match="num_steps must be in"):
        samplers.spaced_timesteps(0, 50)
    with pytest.raises(ValueError, match="offset"):
        samplers.spaced_timesteps(10, 50, offset=5)
    with pytest.raises(ValueError, match="num_steps or timesteps"):
        samplers.ddim(eps, noise, abar)
    with pytest.raises(ValueError, match="at most one"):
        samplers.ddim(eps, noise, abar, num_steps=2, timesteps=torch.tensor([3, 1]))
    with pytest.raises(ValueError, match="strictly descending"):
        samplers.ddpm(eps, noise, abar, timesteps=torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="strictly descending"):
        samplers.ddpm(eps, noise, abar, timesteps=torch.tensor([50, 3]))
    with pytest.raises(ValueError, match="2 x 2 channels"):
        samplers.ddpm(eps, noise, abar, timesteps=torch.tensor([5, 1]), learned_variance=True)


def test_ddim_step_is_the_spec_formula(generator):
    abar = _schedule("scaled_linear", 30)
    x = torch.randn(2, 5, generator=generator, dtype=torch.float64)
    eps = torch.randn(2, 5, generator=generator, dtype=torch.float64)
    out = samplers.ddim(lambda x_, t, c: eps, x, abar, timesteps=torch.tensor([20]), eta=0.5,
                        final_alpha_cumprod=abar[4].item(), generator=torch.Generator().manual_seed(5))
    abar_t, abar_p = abar[20], abar[4]
    sigma = 0.5 * ((1 - abar_p) / (1 - abar_t) * (1 - abar_t / abar_p)).sqrt()
    x0 = (x - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(out, abar_p.sqrt() * x0 + (1 - abar_p - sigma ** 2).sqrt() * eps + sigma * z)


def test_ddim_clip_denoised_steps_from_the_clamped_estimate(generator):
    """ADM's DDIM: x0 clamped to [-1, 1] and eps re-derived from it (guided-diffusion's
    _predict_eps_from_xstart) before the step."""
    abar = _schedule("linear", 30)
    x = 3 * torch.randn(2, 5, generator=generator, dtype=torch.float64)
    eps = torch.randn(2, 5, generator=generator, dtype=torch.float64)
    out = samplers.ddim(lambda x_, t, c: eps, x, abar, timesteps=torch.tensor([25]), clip_denoised=True,
                        final_alpha_cumprod=abar[10].item())
    x0 = ((x - (1 - abar[25]).sqrt() * eps) / abar[25].sqrt()).clamp(-1, 1)
    assert (x0.abs() == 1).any()  # the clamp is exercised
    eps_clipped = (x - abar[25].sqrt() * x0) / (1 - abar[25]).sqrt()
    torch.testing.assert_close(out, abar[10].sqrt() * x0 + (1 - abar[10]).sqrt() * eps_clipped)


@pytest.mark.parametrize("num_steps", [1, 4, 28])
def test_sd3_timesteps_are_the_sd3_schedulers_sigmas(num_steps):
    """StableDiffusion3Pipeline's scheduler config: FlowMatchEulerDiscreteScheduler(shift=3.0),
    set_timesteps(num_steps) without sigmas."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (it is in the test extra)")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(num_steps)
    times = samplers.sd3_timesteps(num_steps, shift=3.0)
    torch.testing.assert_close(times, scheduler.sigmas, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(times[:-1] * 1000, scheduler.timesteps, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("num_steps", [1, 4, 28])
@pytest.mark.parametrize("image_tokens", [15, 256, 1024, 4096, 16384])
def test_flux_timesteps_are_the_flux_dev_schedulers_sigmas(num_steps, image_tokens):
    """FLUX.1 [dev]'s scheduler config (dynamic shifting between 0.5 at 256 and 1.15 at 4096
    tokens) with FluxPipeline's sigmas linspace(1, 1 / n, n) and its calculate_shift mu."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (it is in the test extra)")
    import numpy as np

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096)
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (image_tokens - 256)
    assert samplers.resolution_shift(image_tokens) == pytest.approx(mu)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    torch.testing.assert_close(samplers.flux_timesteps(num_steps, image_tokens), scheduler.sigmas,
                               rtol=1e-6, atol=1e-6)


def test_flux_schnell_timesteps_are_unshifted():
    """FLUX.1 [schnell]'s scheduler: shift 1, no dynamic shifting."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (it is in the test extra)")
    import numpy as np

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4))
    torch.testing.assert_close(samplers.flux_timesteps(4), scheduler.sigmas)
    torch.testing.assert_close(samplers.flux_timesteps(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


def test_time_shifts():
    t = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    torch.testing.assert_close(samplers.shifted_time(t, 3.0), 3 * t / (1 + 2 * t))
    # The resolution shift is the static shift with shift = e^mu.
    torch.testing.assert_close(samplers.resolution_shifted_time(t, 0.8), samplers.shifted_time(t, math.exp(0.8)))
    assert samplers.resolution_shift(256) == pytest.approx(0.5)
    assert samplers.resolution_shift(4096) == pytest.approx(1.15)
    with pytest.raises(ValueError, match="shift"):
        samplers.shifted_time(t, 0.0)
    with pytest.raises(ValueError, match="num_steps"):
        samplers.flux_timesteps(0)


# guided-diffusion's sampling flags of the ADM paper's DDIM results: --timestep_respacing ddimN.
ADM_DDIM_STRIDES = {10: 100, 25: 40, 30: 34, 50: 20, 100: 10, 250: 4}


@pytest.mark.parametrize("num_steps", sorted(ADM_DDIM_STRIDES))
def test_adm_ddim_timesteps_are_guided_diffusions(num_steps):
    """space_timesteps(1000, "ddimN"), in integers: the smallest stride k in [1, 1000) with
    exactly N multiples of k below 1000; those multiples, descending."""
    stride = next(k for k in range(1, 1000) if len(range(0, 1000, k)) == num_steps)
    assert stride == ADM_DDIM_STRIDES[num_steps]
    timesteps = adm_unet.ddim_timesteps(num_steps)
    assert timesteps.dtype == torch.int64
    assert timesteps.tolist() == list(range(0, 1000, stride))[::-1]
    assert timesteps[0].item() == stride * (num_steps - 1) and timesteps[-1].item() == 0


@pytest.mark.parametrize("num_steps, nearest", [(300, "250 or 334"), (1, "2"), (999, "500 or 1000")])
def test_adm_ddim_timesteps_without_an_integer_stride_are_refused(num_steps, nearest):
    with pytest.raises(ValueError, match=f"num_steps={num_steps} cannot be DDIM-respaced.*are {nearest}$"):
        adm_unet.ddim_timesteps(num_steps)


def test_bad_dpm_solver_arguments_are_refused():
    abar = _schedule()
    noise = torch.zeros(1, 2)
    eps = lambda x, t, c: x  # noqa: E731
    with pytest.raises(ValueError, match="prediction_type must be 'epsilon' or 'v_prediction'; got 'sample'"):
        samplers.dpm_solver(eps, noise, abar, num_steps=2, prediction_type="sample")
    with pytest.raises(ValueError, match=r"num_steps must be in \[1, 49\] .*; got 50"):
        samplers.dpm_solver(eps, noise, abar, num_steps=50)
    with pytest.raises(ValueError, match="at most one"):
        samplers.dpm_solver(eps, noise, abar, num_steps=2, timesteps=torch.tensor([3, 1]))
    with pytest.raises(ValueError, match="strictly descending"):
        samplers.dpm_solver(eps, noise, abar, timesteps=torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="num_steps must be >= 1; got 0"):
        samplers.flow_dpm_solver(eps, noise, num_steps=0)
    with pytest.raises(ValueError, match="shift must be > 0"):
        samplers.flow_dpm_solver(eps, noise, num_steps=2, shift=-1.0)


def test_dpm_solver_lands_on_the_point_mass(generator):
    """With the exact eps of a point mass every x0 estimate is x0, the second-order correction
    vanishes and each step keeps x on the path x = alpha x0 + sigma eps: the sample is x0."""
    abar = _schedule("cosine")
    x0 = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64)
    model = PointMassDenoiser(x0, abar)
    out = samplers.dpm_solver(model, torch.randn(x0.shape, generator=generator, dtype=torch.float64), abar,
                              num_steps=6)
    torch.testing.assert_close(out, x0)
    assert model.times == [float(t) for t in samplers.linspace_timesteps(6, 50)]


class PointMassVelocity(PointMassDenoiser):
    """The exact v = sqrt(abar) eps - sqrt(1 - abar) x0 of the point mass x0, defined at abar = 0
    (pure noise, where v = eps = x)."""

    def __call__(self, x, t, cond):
        abar = self.abar[t.long()].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        eps = super().__call__(x, t, cond)
        return abar.sqrt() * eps - (1 - abar).sqrt() * self.x0


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_v_prediction_from_zero_terminal_snr_lands_on_the_point_mass(generator, eta):
    """On a zero-terminal-SNR schedule with trailing timesteps the chain starts at abar = 0."""
    abar = samplers.alphas_cumprod(samplers.zero_terminal_snr(samplers.beta_schedule("scaled_linear", 50)))
    assert abar[-1].item() == 0 and abar[:-1].min().item() > 0
    x0 = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64)
    model = PointMassVelocity(x0, abar)
    chain = samplers.trailing_timesteps(7, 50)
    assert chain[0].item() == 49
    out = samplers.ddim(model, torch.randn(x0.shape, generator=generator, dtype=torch.float64), abar,
                        timesteps=chain, eta=eta, generator=generator, prediction_type="v_prediction")
    torch.testing.assert_close(out, x0)
    assert model.times == [float(t) for t in chain]


def test_zero_terminal_snr_refusals():
    abar = samplers.alphas_cumprod(samplers.zero_terminal_snr(samplers.beta_schedule("linear", 50)))
    noise = torch.zeros(1, 2)
    model = lambda x, t, c: x  # noqa: E731
    chain = samplers.trailing_timesteps(5, 50)
    with pytest.raises(ValueError, match="alphas_cumprod is 0 at timestep 49 .*epsilon model's data estimate"):
        samplers.ddim(model, noise, abar, timesteps=chain)
    with pytest.raises(ValueError, match="alphas_cumprod is 0 at timestep 49 .*DPM-Solver's log"):
        samplers.dpm_solver(model, noise, abar, timesteps=chain, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="prediction_type must be 'epsilon' or 'v_prediction'; got 'v'"):
        samplers.ddim(model, noise, abar, timesteps=chain, prediction_type="v")
    with pytest.raises(ValueError, match=r"num_steps must be in \[1, 50\]; got 51"):
        samplers.trailing_timesteps(51, 50)
    # Below the terminal timestep an epsilon model is fine.
    samplers.ddim(model, noise, abar, timesteps=chain[1:])


NEW_SAMPLERS = {
    "dpm_solver": lambda model, noise, abar: samplers.dpm_solver(model, noise, abar, num_steps=8),
    "flow_dpm_solver": lambda model, noise, abar: samplers.flow_dpm_solver(model, noise, num_steps=8, shift=3.0),
    "edm_sampler": lambda model, noise, abar: samplers.edm_sampler(model, noise, abar, num_steps=8),
    "ddim_v": lambda model, noise, abar: samplers.ddim(model, noise, abar, num_steps=8, prediction_type="v_prediction"),
}


@pytest.mark.parametrize("name", sorted(NEW_SAMPLERS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_samples_keep_their_dtype_and_follow_float64(generator, name, dtype):
    """A half-precision chain stays in its dtype and within 8 of its rounding steps (relative to
    the sample's scale; measured: about 2 of them) of the float64 chain, on a contractive random
    linear model x W (W's norm 1/2)."""
    abar = _schedule("scaled_linear")
    weight = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    weight = 0.5 * weight / torch.linalg.matrix_norm(weight, ord=2)

    def model(x, t, cond):
        return (x.double() @ weight).to(x.dtype)

    noise = torch.randn(3, 5, 6, generator=generator, dtype=torch.float64)
    exact = NEW_SAMPLERS[name](model, noise, abar)
    low = NEW_SAMPLERS[name](model, noise.to(dtype), abar)
    assert low.dtype == dtype and torch.isfinite(low).all()
    scale = exact.abs().max().item()
    torch.testing.assert_close(low.double(), exact, rtol=0, atol=8 * torch.finfo(dtype).eps * scale)
