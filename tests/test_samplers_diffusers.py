"""fastgen.samplers step by step against diffusers' schedulers: the same random model drives
both loops, and every model call (its timestep and its input state) and the final sample must
agree. diffusers runs its schedulers' arithmetic in float32, so states agree to about 1e-6 of
their scale (tolerance 1e-5 of the largest entry of each state); timesteps agree exactly."""
import pytest
import torch

from fastgen import samplers

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (it is in the test extra)")
# diffusers' schedulers pass torch tensors to np.array with numpy 2's copy keyword.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


class RandomMLP:
    """A fixed random model f(x, t) = tanh(x W1 + sin(3 t / T) c) W2 over the last dim of x,
    computed in float64 and returned in x's dtype, recording each call's (t, x)."""

    def __init__(self, generator, features, time_range=1000.0, hidden=16):
        self.w1 = torch.randn(features, hidden, generator=generator, dtype=torch.float64) / features ** 0.5
        self.c = torch.randn(hidden, generator=generator, dtype=torch.float64)
        self.w2 = torch.randn(hidden, features, generator=generator, dtype=torch.float64) / hidden ** 0.5
        self.time_range, self.calls = time_range, []

    def __call__(self, x, t, cond=None):
        self.calls.append((t.clone(), x.clone()))
        phase = torch.sin(3 * t.double() / self.time_range).view(-1, *([1] * (x.ndim - 1)))
        return (torch.tanh(x.double() @ self.w1 + phase * self.c) @ self.w2).to(x.dtype)

    def twin(self):
        """The same function with its own record of calls."""
        twin = RandomMLP.__new__(RandomMLP)
        twin.__dict__.update(self.__dict__, calls=[])
        return twin


def run_scheduler(scheduler, model, noise, time_scale=1.0):
    """diffusers' denoising loop: the model at each scheduler timestep (divided by time_scale
    for fastgen's time units) on the scheduler's model input, then scheduler.step."""
    x = noise
    for timestep in scheduler.timesteps:
        time = (timestep.expand(noise.shape[0]).to(torch.float64) / time_scale).float()
        model_input = scheduler.scale_model_input(x, timestep) if hasattr(scheduler, "scale_model_input") else x
        x = scheduler.step(model(model_input, time), timestep, x).prev_sample
    return x


def assert_same_run(ours, reference, out, expected):
    """The same number of calls at the same timesteps on the same states, and the same sample."""
    assert len(ours.calls) == len(reference.calls)
    for (t, x), (t_ref, x_ref) in zip(ours.calls, reference.calls):
        torch.testing.assert_close(t.double(), t_ref.double(), rtol=0, atol=1e-4)
        torch.testing.assert_close(x, x_ref.to(x.dtype), rtol=1e-5, atol=1e-5 * x_ref.abs().max().item())
    torch.testing.assert_close(out, expected.to(out.dtype), rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def _noise(generator, dtype, shape=(3, 5, 7)):
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("num_steps", [1, 2, 7, 20, 50])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_euler_on_the_flow_match_euler_grid_is_the_scheduler(generator, num_steps, dtype):
    """SANA's and SD3's Euler: FlowMatchEulerDiscreteScheduler(shift=3)."""
    noise = _noise(generator, dtype)
    ours = RandomMLP(generator, 7)
    reference = ours.twin()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(num_steps)
    expected = run_scheduler(scheduler, reference, noise, time_scale=1000.0)
    out = samplers.flow_matching_euler(ours, noise, timesteps=samplers.sd3_timesteps(num_steps, 3.0))
    assert_same_run(ours, reference, out, expected)


@pytest.mark.parametrize("num_steps", [1, 2, 7, 20, 50])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flow_dpm_solver_is_sanas_scheduler(generator, num_steps, dtype):
    """SanaPipeline's scheduler: DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3,
    prediction_type="flow_prediction"), the network seeing its integer timesteps."""
    noise = _noise(generator, dtype)
    ours = RandomMLP(generator, 7)
    reference = ours.twin()
    scheduler = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0,
                                                      prediction_type="flow_prediction")
    scheduler.set_timesteps(num_steps)
    expected = run_scheduler(scheduler, reference, noise, time_scale=1000.0)
    out = samplers.flow_dpm_solver(ours, noise, num_steps=num_steps, shift=3.0)
    assert_same_run(ours, reference, out, expected)
    torch.testing.assert_close(samplers.flow_dpm_solver_sigmas(num_steps, 3.0).float(), scheduler.sigmas)
    # The times the model sees are whole training timesteps: exactly the scheduler's.
    assert [round(t[0].item() * 1000) for t, _ in ours.calls] == scheduler.timesteps.tolist()


# diffusers' names and arguments for fastgen's beta schedules.
DIFFUSERS_SCHEDULES = {
    "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
}


@pytest.mark.parametrize("kind", sorted(DIFFUSERS_SCHEDULES))
def test_beta_schedules_are_diffusers(kind):
    scheduler = diffusers.DDIMScheduler(**DIFFUSERS_SCHEDULES[kind])
    torch.testing.assert_close(samplers.beta_schedule(kind).float(), scheduler.betas)
    torch.testing.assert_close(samplers.alphas_cumprod(samplers.beta_schedule(kind)).float(), scheduler.alphas_cumprod)


@pytest.mark.parametrize("num_steps", [1, 2, 7, 20, 50])
@pytest.mark.parametrize("kind, prediction_type", [("scaled_linear", "epsilon"), ("linear", "epsilon"),
                                                    ("cosine", "epsilon"), ("scaled_linear", "v_prediction")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dpm_solver_is_diffusers_dpm_solver_pp_2m(generator, num_steps, kind, prediction_type, dtype):
    """DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2) with its default
    "linspace" spacing. fastgen runs on the scheduler's own float32 alphas_cumprod (the schedules
    themselves are compared above), so this compares the solver."""
    noise = _noise(generator, dtype)
    ours = RandomMLP(generator, 7)
    reference = ours.twin()
    scheduler = diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                                      prediction_type=prediction_type, **DIFFUSERS_SCHEDULES[kind])
    scheduler.set_timesteps(num_steps)
    expected = run_scheduler(scheduler, reference, noise)
    out = samplers.dpm_solver(ours, noise, scheduler.alphas_cumprod, num_steps=num_steps,
                              prediction_type=prediction_type)
    assert_same_run(ours, reference, out, expected)
    assert samplers.linspace_timesteps(num_steps).tolist() == scheduler.timesteps.tolist()


def test_dpm_solver_timesteps_are_diffusers_for_every_count():
    """The integer timesteps, where one rounding or truncation differs from diffusers' numpy
    arithmetic first: "linspace" spacing, and the flow grid's timesteps floor(1000 t)."""
    scheduler = diffusers.DPMSolverMultistepScheduler()
    flow_scheduler = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0,
                                                           prediction_type="flow_prediction")
    for num_steps in range(1, 1000):
        scheduler.set_timesteps(num_steps)
        assert samplers.linspace_timesteps(num_steps).tolist() == scheduler.timesteps.tolist(), num_steps
        flow_scheduler.set_timesteps(num_steps)
        times = samplers.flow_dpm_solver_sigmas(num_steps, 3.0)[:-1]
        assert (times * 1000).long().tolist() == flow_scheduler.timesteps.tolist(), num_steps


def test_zero_terminal_snr_is_diffusers_rescale():
    """diffusers rescales in float32: its sqrt(abar) agrees to float32 rounding of 1, and the
    betas, ratios of the small abar near the end, to 1e-5."""
    for kind in ("scaled_linear", "linear"):
        scheduler = diffusers.DDIMScheduler(rescale_betas_zero_snr=True, **DIFFUSERS_SCHEDULES[kind])
        betas = samplers.zero_terminal_snr(samplers.beta_schedule(kind))
        abar = samplers.alphas_cumprod(betas)
        torch.testing.assert_close(abar.sqrt().float(), scheduler.alphas_cumprod.sqrt(), rtol=0, atol=1e-6)
        torch.testing.assert_close(betas.float(), scheduler.betas, rtol=1e-5, atol=1e-5)
        assert abar[-1].item() == 0 and abar[0].item() == pytest.approx(1 - samplers.beta_schedule(kind)[0].item())


def test_trailing_timesteps_are_diffusers_for_every_count():
    """Where diffusers' numpy arange yields one timestep too many, its extra one is -1 (a point
    within rounding of 0) and the rest agree."""
    scheduler = diffusers.DDIMScheduler(timestep_spacing="trailing")
    overlong = []
    for num_steps in range(1, 1001):
        scheduler.set_timesteps(num_steps)
        expected = scheduler.timesteps.tolist()
        if len(expected) == num_steps + 1:
            assert expected[-1] == -1, num_steps
            expected, overlong = expected[:-1], overlong + [num_steps]
        assert samplers.trailing_timesteps(num_steps).tolist() == expected, num_steps
    assert 0 < len(overlong) < 100 and 1000 not in overlong


@pytest.mark.parametrize("num_steps", [1, 2, 10, 25, 50])
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ddim_v_prediction_on_zero_terminal_snr_is_diffusers(generator, num_steps, eta, dtype):
    """DDIMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
    timestep_spacing="trailing"), SD 2.x's schedule: the first step starts from pure noise
    (abar = 0 at timestep 999). Step counts dividing 1000, where diffusers' previous timestep
    t - 1000 // N is the next one on the chain; with eta > 0 both draw their noise from equally
    seeded generators."""
    noise = _noise(generator, dtype)
    ours = RandomMLP(generator, 7)
    reference = ours.twin()
    scheduler = diffusers.DDIMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                        timestep_spacing="trailing", clip_sample=False,
                                        **DIFFUSERS_SCHEDULES["scaled_linear"])
    scheduler.set_timesteps(num_steps)
    seed = int(torch.randint(2 ** 62, (), generator=generator))
    reference_generator = torch.Generator().manual_seed(seed)
    x = noise
    for timestep in scheduler.timesteps:
        output = reference(x, timestep.expand(x.shape[0]).float())
        x = scheduler.step(output, timestep, x, eta=eta, generator=reference_generator).prev_sample
    assert scheduler.alphas_cumprod[scheduler.timesteps[0]].item() == 0
    out = samplers.ddim(ours, noise, scheduler.alphas_cumprod, timesteps=samplers.trailing_timesteps(num_steps),
                        eta=eta, generator=torch.Generator().manual_seed(seed), prediction_type="v_prediction")
    assert_same_run(ours, reference, out, x)


@pytest.mark.parametrize("heun", [True, False])
@pytest.mark.parametrize("num_steps", [2, 7, 20])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_edm_sampler_is_diffusers_karras_heun_and_euler(generator, heun, num_steps, prediction_type, dtype):
    """HeunDiscreteScheduler / EulerDiscreteScheduler(use_karras_sigmas=True): EDM's rho = 7
    levels between the model's smallest and largest sigma, the model at the log-sigma
    interpolated timestep on x / sqrt(sigma^2 + 1), no churn (diffusers' Euler applies churn with
    the model at sigma instead of the raised sigma^, and its Heun has none). One step is left
    out: diffusers takes both ends of its one-step Karras schedule from timestep 0."""
    noise = _noise(generator, dtype)
    ours = RandomMLP(generator, 7)
    reference = ours.twin()
    kind = diffusers.HeunDiscreteScheduler if heun else diffusers.EulerDiscreteScheduler
    scheduler = kind(use_karras_sigmas=True, prediction_type=prediction_type, **DIFFUSERS_SCHEDULES["scaled_linear"])
    scheduler.set_timesteps(num_steps)
    expected = run_scheduler(scheduler, reference, noise * scheduler.init_noise_sigma)
    out = samplers.edm_sampler(ours, noise, scheduler.alphas_cumprod, num_steps=num_steps, heun=heun,
                               prediction_type=prediction_type, timestep_lookup="log_sigma_interpolated")
    assert_same_run(ours, reference, out, expected)
    sigmas = scheduler.sigmas if not heun else torch.cat([scheduler.sigmas[:1], scheduler.sigmas[1::2]])
    training = ((1 - scheduler.alphas_cumprod.double()) / scheduler.alphas_cumprod.double()).sqrt()
    torch.testing.assert_close(samplers.karras_sigmas(num_steps, training[0].item(), training[-1].item()).float(),
                               sigmas)
