"""Prediction-space conversions: round trips on real schedulers and both VP prediction types."""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from diffplug.predictions import PREDICTION_TYPES, StepContext, convert, join, noise_levels, prediction_type_of, split

VP = [DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler]


def _sample(alpha, sigma, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    return x0, eps, alpha * x0 + sigma * eps


@pytest.mark.parametrize("cls", VP)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_vp_round_trip_through_every_type(cls, prediction_type):
    scheduler = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type)
    scheduler.set_timesteps(10)
    alphas, sigmas = noise_levels(scheduler, scheduler.timesteps)
    assert torch.allclose(alphas**2 + sigmas**2, torch.ones_like(alphas), atol=1e-6)
    for a, s in zip(alphas[[0, 4, -1]], sigmas[[0, 4, -1]]):
        x0, eps, x = _sample(a, s)
        out = join(x0, eps, a, s, prediction_type_of(scheduler))
        for dst in PREDICTION_TYPES[:3]:
            there = convert(out, x, a, s, prediction_type, dst)
            back = convert(there, x, a, s, dst, prediction_type)
            assert torch.allclose(back, out, atol=1e-4), dst
        got_x0, got_eps = split(out, x, a, s, prediction_type)
        assert torch.allclose(got_x0, x0, atol=1e-4) and torch.allclose(got_eps, eps, atol=1e-4)


def test_vp_levels_match_the_table_and_euler_scaling():
    ddim = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ddim.set_timesteps(7)
    alpha, _ = noise_levels(ddim, ddim.timesteps)
    assert torch.allclose(alpha**2, ddim.alphas_cumprod[ddim.timesteps].float(), rtol=1e-5)

    # Euler's scaled model input x / sqrt(1 + s^2) is VP with alpha = 1 / sqrt(1 + s^2), also at
    # the fractional timesteps its "linspace" schedule produces.
    euler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    euler.set_timesteps(9)
    assert (euler.timesteps != euler.timesteps.round()).any()
    alpha, sigma = noise_levels(euler, euler.timesteps)
    s = euler.sigmas[:-1].float()
    assert torch.allclose(alpha, 1 / torch.sqrt(1 + s**2), rtol=1e-4)
    assert torch.allclose(sigma, s / torch.sqrt(1 + s**2), rtol=1e-4)


def test_flow_levels_and_velocity():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(6)
    assert prediction_type_of(scheduler) == "flow"
    alpha, sigma = noise_levels(scheduler, scheduler.timesteps)
    assert torch.allclose(sigma, scheduler.sigmas[:-1].float(), atol=1e-6)
    assert torch.allclose(alpha + sigma, torch.ones_like(alpha))
    a, s = alpha[2], sigma[2]
    x0, eps, x = _sample(a, s)
    velocity = eps - x0
    assert torch.allclose(split(velocity, x, a, s, "flow")[0], x0, atol=1e-5)
    assert torch.allclose(convert(velocity, x, a, s, "flow", "epsilon"), eps, atol=1e-5)
    # A flow step x - (s - s_next) * u lands on the interpolant of the same (x0, eps).
    s_next = sigma[3]
    assert torch.allclose(x - (s - s_next) * velocity, (1 - s_next) * x0 + s_next * eps, atol=1e-5)


def test_step_context_converts_to_x0_and_back():
    a, s = torch.tensor(0.6), torch.tensor(0.8)
    x0, eps, x = _sample(a, s)
    for kind in PREDICTION_TYPES:
        if kind == "flow":
            a, s = torch.tensor(0.3), torch.tensor(0.7)
            x = a * x0 + s * eps
        ctx = StepContext(x, a, s, kind)
        out = join(x0, eps, a, s, kind)
        assert torch.allclose(ctx.to_x0(out), x0, atol=1e-5)
        assert torch.allclose(ctx.from_x0(x0), out, atol=1e-5)


def test_unknown_prediction_type_is_named():
    with pytest.raises(ValueError, match="prediction_type"):
        split(torch.zeros(1), torch.zeros(1), 1.0, 0.0, "score")
