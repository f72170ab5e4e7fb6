"""fastgen.samplers: flow-matching Euler and classifier-free guidance on analytic models."""
import pytest
import torch

from fastgen import samplers


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
