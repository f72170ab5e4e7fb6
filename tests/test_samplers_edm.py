"""fastgen.samplers.edm_sampler against a float64 transcription of EDM's Algorithm 2 (Karras et
al., 2022) with stochastic churn, on a discrete VP model through EDM's preconditioning (its
diffusers comparisons, without churn, are in test_samplers_diffusers.py)."""
import math

import pytest
import torch

from fastgen import samplers


def _model(generator, features=7):
    """A fixed random eps / v model f(x, t) = tanh(x W1 + sin(3 t / 1000) c) W2 over the last
    dim, recording (t, x) of each call."""
    w1 = torch.randn(features, 16, generator=generator, dtype=torch.float64) / features ** 0.5
    c = torch.randn(16, generator=generator, dtype=torch.float64)
    w2 = torch.randn(16, features, generator=generator, dtype=torch.float64) / 4
    calls = []

    def model(x, t, cond=None):
        calls.append((t.clone(), x.clone()))
        phase = torch.sin(3 * t.double() / 1000).view(-1, *([1] * (x.ndim - 1)))
        return (torch.tanh(x.double() @ w1 + phase * c) @ w2).to(x.dtype)

    return model, calls


def algorithm_2(model, noise, abar, num_steps, s_churn, s_tmin, s_tmax, s_noise, prediction_type, generator,
                sigma_min, sigma_max, rho=7.0):
    """EDM's Algorithm 2 in float64, its schedule (eq. 5) and its preconditioning of a discrete
    VP model (Table 1: c_in = 1 / sqrt(sigma^2 + 1), c_noise the index of the nearest training
    sigma; c_skip = 1, c_out = -sigma for eps, c_skip = 1 / (sigma^2 + 1),
    c_out = -sigma / sqrt(sigma^2 + 1) for v)."""
    training = ((1 - abar) / abar).sqrt()
    n = num_steps
    steps = [(sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
             for i in range(n)] + [0.0]

    def denoiser(x, sigma):
        timestep = torch.full((x.shape[0],), float((training - sigma).abs().argmin()))
        c_in = 1 / math.sqrt(sigma ** 2 + 1)
        f = model(c_in * x, timestep)
        if prediction_type == "epsilon":
            return x - sigma * f
        return x / (sigma ** 2 + 1) - sigma / math.sqrt(sigma ** 2 + 1) * f

    x = noise * steps[0]
    for i in range(n):
        t, t_next = steps[i], steps[i + 1]
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= t <= s_tmax else 0.0
        t_hat = t + gamma * t
        if gamma > 0:
            x = x + math.sqrt(t_hat ** 2 - t ** 2) * s_noise * torch.randn(x.shape, generator=generator,
                                                                           dtype=torch.float64)
        d = (x - denoiser(x, t_hat)) / t_hat
        x_next = x + (t_next - t_hat) * d
        if t_next != 0:
            d_prime = (x_next - denoiser(x_next, t_next)) / t_next
            x_next = x + (t_next - t_hat) * (d / 2 + d_prime / 2)
        x = x_next
    return x


@pytest.mark.parametrize("num_steps", [2, 5, 18])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("churn", [dict(s_churn=0.0), dict(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003),
                                   dict(s_churn=3.0)])
def test_edm_sampler_is_algorithm_2(generator, num_steps, prediction_type, churn):
    """Churn 40 saturates gamma at sqrt(2) - 1 inside [s_tmin, s_tmax] and leaves the steps
    outside it (the first and the last) deterministic; churn 3 is below the cap at 18 steps. Explicit sigma_min/max of the
    cosine schedule's range, and the model at the nearest training timestep (integers)."""
    abar = samplers.alphas_cumprod(samplers.beta_schedule("cosine", 1000))
    options = dict(s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0) | churn
    noise = torch.randn(3, 5, 7, generator=generator, dtype=torch.float64)
    seed, noise_seed = (int(s) for s in torch.randint(2 ** 62, (2,), generator=generator))
    ours, our_calls = _model(torch.Generator().manual_seed(seed))
    reference, reference_calls = _model(torch.Generator().manual_seed(seed))
    out = samplers.edm_sampler(ours, noise, abar, num_steps=num_steps, sigma_min=0.01, sigma_max=80.0,
                               prediction_type=prediction_type, generator=torch.Generator().manual_seed(noise_seed),
                               **options)
    expected = algorithm_2(reference, noise, abar, num_steps, prediction_type=prediction_type,
                           generator=torch.Generator().manual_seed(noise_seed), sigma_min=0.01, sigma_max=80.0,
                           **options)
    assert len(our_calls) == len(reference_calls) == 2 * num_steps - 1
    for (t, x), (t_ref, x_ref) in zip(our_calls, reference_calls):
        assert t.tolist() == t_ref.tolist() and t.eq(t.round()).all()
        torch.testing.assert_close(x, x_ref, rtol=1e-10, atol=1e-10 * x_ref.abs().max().item())
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10 * expected.abs().max().item())


def test_karras_sigmas_are_equation_5():
    sigmas = samplers.karras_sigmas(4, 0.002, 80.0, rho=7.0)
    ramp = torch.tensor([0, 1 / 3, 2 / 3, 1], dtype=torch.float64)
    expected = (80.0 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    torch.testing.assert_close(sigmas, torch.cat([expected, torch.zeros(1, dtype=torch.float64)]))
    assert samplers.karras_sigmas(1, 0.002, 80.0).tolist() == [80.0, 0.0]


def test_bad_edm_arguments_are_refused():
    abar = samplers.alphas_cumprod(samplers.beta_schedule("linear", 50))
    noise = torch.zeros(1, 2)
    model = lambda x, t, c: x  # noqa: E731
    with pytest.raises(ValueError, match="timestep_lookup must be 'nearest' or 'log_sigma_interpolated'; got 'linear'"):
        samplers.edm_sampler(model, noise, abar, num_steps=2, timestep_lookup="linear")
    with pytest.raises(ValueError, match="prediction_type must be"):
        samplers.edm_sampler(model, noise, abar, num_steps=2, prediction_type="sample")
    with pytest.raises(ValueError, match="num_steps must be >= 1; got 0"):
        samplers.edm_sampler(model, noise, abar, num_steps=0)
    with pytest.raises(ValueError, match="sigma_min and sigma_max must satisfy 0 < sigma_min <= sigma_max; got 5.0, 1.0"):
        samplers.edm_sampler(model, noise, abar, num_steps=2, sigma_min=5.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="rho must be > 0; got 0.0"):
        samplers.karras_sigmas(3, 0.1, 1.0, rho=0.0)
    zero_snr = samplers.alphas_cumprod(samplers.zero_terminal_snr(samplers.beta_schedule("linear", 50)))
    with pytest.raises(ValueError, match=r"alphas_cumprod must lie in \(0, 1\)"):
        samplers.edm_sampler(model, noise, zero_snr, num_steps=2)
    with pytest.raises(ValueError, match="alphas_cumprod must be 1-D"):
        samplers.edm_sampler(model, noise, abar[:1], num_steps=2)
