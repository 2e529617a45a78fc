"""The flow reverse SDE with its log-probability (finetune/logprob.py, flow.md §5), on a Gaussian toy
whose velocity is known in closed form: data x0 ~ N(mu, s^2) per element, x_sigma = (1 - sigma) x0 + sigma eps.

    m(sigma) = (1 - sigma) mu,   V(sigma) = (1 - sigma)^2 s^2 + sigma^2
    v(x, sigma) = E[eps - x0 | x_sigma = x] = (sigma - (1 - sigma) s^2) / V (x - m) - mu

Tolerances (500 Euler-Maruyama steps, sigma linear 1 -> 0, a = 0.7 and 1, 200k samples): Monte Carlo
error (4 standard errors) plus a stated discretisation tolerance: 0.005 on the mean everywhere; on the
standard deviation 2.5 % of the ODE's at sigma = 0.9 (the first steps, where g_sigma is large, leave
Euler-Maruyama 1.3-1.4 % high there), 1 % at 0.75 (0.4-0.7 % measured), 0.5 % at sigma <= 0.5."""

from __future__ import annotations

import math

import pytest
import torch

from diffplug.finetune.logprob import flow_noise_std, flow_sde_step_with_logprob

torch.set_num_threads(1)

MU, S = 0.7, 0.5  # the toy's data distribution N(MU, S^2)


def marginal(sigma: float) -> tuple[float, float]:
    """The ODE's (and the forward process's) marginal mean and std at sigma."""
    return (1 - sigma) * MU, math.sqrt((1 - sigma) ** 2 * S**2 + sigma**2)


def velocity(x: torch.Tensor, sigma) -> torch.Tensor:
    m, sd = marginal(float(sigma))
    return (sigma - (1 - sigma) * S**2) / sd**2 * (x - m) - MU


def run(steps: int, a: float, n: int = 200_000, at=(0.9, 0.75, 0.5, 0.25, 0.0), seed: int = 0, step=None):
    """Sample x_1 ~ N(0, 1) and integrate the SDE on sigma_i = 1 - i / steps -> {sigma: (mean, std)}."""
    g = torch.Generator().manual_seed(seed)
    sigmas = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    x = torch.randn(n, 1, generator=g, dtype=torch.float64)
    out = {}
    for i in range(steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        noise = torch.randn(n, 1, generator=g, dtype=torch.float64)
        if step is None:
            x = flow_sde_step_with_logprob(velocity(x, s), s, s_next, x.double(), a, noise=noise)[0].double()
        else:
            x = step(velocity(x, s), s, s_next, x, a, noise)
        for c in at:
            if abs(float(s_next) - c) < 1e-9:
                out[c] = (float(x.mean()), float(x.std()))
    return out


def within(stats: dict, n: int = 200_000) -> dict:
    """``{sigma: (mean error / its tolerance, std error / its tolerance)}``: <= 1 passes."""
    ratios = {}
    for c, (mean, std) in stats.items():
        m, sd = marginal(c)
        disc_std = 0.025 if c > 0.8 else 0.01 if c > 0.6 else 0.005
        mean_tol = 4 * sd / math.sqrt(n) + 0.005
        std_tol = 4 * sd / math.sqrt(2 * n) + disc_std * sd
        ratios[c] = (abs(mean - m) / mean_tol, abs(std - sd) / std_tol)
    return ratios


@pytest.mark.parametrize("a", [0.7, 1.0])
def test_sde_marginals_equal_the_odes_on_a_gaussian_toy(a):
    ratios = within(run(500, a))
    assert set(ratios) == {0.9, 0.75, 0.5, 0.25, 0.0}
    for c, (rm, rs) in ratios.items():
        assert rm <= 1 and rs <= 1, (c, rm, rs)


def test_the_discretisation_error_shrinks_with_steps():
    """Euler-Maruyama is biased at few steps (the final std for a target 0.5 is ~0.48 at 10 steps) and
    converges: the final-std error at 500 steps is several times smaller than at 10."""
    err = {n: abs(run(n, 0.7, n=100_000, at=(0.0,))[0.0][1] - S) for n in (10, 500)}
    assert err[10] > 0.01 and err[500] < err[10] / 5, err


def test_a_drift_without_the_score_correction_fails_the_same_test():
    """The test can fail: noise added with the plain ODE drift (no g^2/(2 sigma) correction) inflates
    the marginals far beyond the tolerance."""

    def wrong(v, s, s_next, x, a, noise):
        g = flow_noise_std(s, s_next, a)
        return x + v * (s_next - s) + g * (s - s_next).sqrt() * noise

    ratios = within(run(500, 0.7, at=(0.5,), step=wrong))
    assert ratios[0.5][1] > 5


def test_logprob_is_the_direct_normal_log_prob():
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(3, 16, 8, generator=g), torch.randn(3, 16, 8, generator=g)  # Flux-like packed (B, tokens, C)
    s, s_next = torch.tensor([0.8, 0.5, 0.2]), torch.tensor([0.7, 0.3, 0.0])
    prev, logp = flow_sde_step_with_logprob(v, s, s_next, x, 0.7, noise=torch.randn(3, 16, 8, generator=g))
    # the Gaussian of one Euler-Maruyama step, written out here
    s3, n3 = s.view(-1, 1, 1), s_next.view(-1, 1, 1)
    gs = 0.7 * torch.sqrt(s3 / (1 - s3))
    mean = x + (v + gs**2 / (2 * s3) * (x + (1 - s3) * v)) * (n3 - s3)
    std = gs * torch.sqrt(s3 - n3)
    ref = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(prev).mean(dim=(1, 2))
    torch.testing.assert_close(logp, ref, rtol=1e-5, atol=1e-5)
    # scoring the given transition gives the same number; the mean is the most likely point
    torch.testing.assert_close(flow_sde_step_with_logprob(v, s, s_next, x, 0.7, prev_sample=prev)[1], logp)
    at_mean = flow_sde_step_with_logprob(v, s, s_next, x, 0.7, prev_sample=mean)[1]
    assert (at_mean > logp).all()
    # scalar levels broadcast over the batch
    one = flow_sde_step_with_logprob(v, 0.8, 0.7, x, 0.7, prev_sample=prev)[1]
    torch.testing.assert_close(one[0], logp[0])


def test_first_step_rule_at_sigma_one():
    """g diverges at sigma = 1; as Flow-GRPO the denominator takes the next level there."""
    s, s_next = torch.tensor([1.0]), torch.tensor([0.95])
    torch.testing.assert_close(flow_noise_std(s, s_next, 0.7), torch.tensor([0.7 * math.sqrt(1 / 0.05)]))
    torch.testing.assert_close(flow_noise_std(torch.tensor([0.5]), s_next, 0.7), torch.tensor([0.7]))
    x = torch.randn(2, 4, 4)
    prev, logp = flow_sde_step_with_logprob(torch.randn(2, 4, 4), 1.0, 0.95, x, 0.7)
    assert torch.isfinite(prev).all() and torch.isfinite(logp).all()


def test_g_to_zero_is_exactly_the_euler_step():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(8)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for i in (0, 3, 7):  # the first (sigma = 1), a middle and the last step (into sigma = 0)
        v = torch.randn(2, 4, 8, 8, generator=g)
        sched._step_index = i
        euler = sched.step(v, sched.timesteps[i], x).prev_sample
        s, s_next = sched.sigmas[i], sched.sigmas[i + 1]
        exact, logp = flow_sde_step_with_logprob(v, s, s_next, x, 0.0)
        assert logp is None and torch.equal(exact, euler)
        near = flow_sde_step_with_logprob(v, s, s_next, x, 1e-4, noise=torch.randn(2, 4, 8, 8, generator=g))[0]
        torch.testing.assert_close(near, euler, rtol=0, atol=1e-3)


def test_bad_arguments_are_refused():
    x = torch.randn(1, 4)
    with pytest.raises(ValueError, match="noise_level must be >= 0"):
        flow_sde_step_with_logprob(x, 0.5, 0.4, x, -0.1)
    with pytest.raises(ValueError, match="sigma > sigma_next"):
        flow_sde_step_with_logprob(x, 0.4, 0.5, x, 0.7)
    with pytest.raises(ValueError, match="no density"):
        flow_sde_step_with_logprob(x, 0.5, 0.4, x, 0.0, prev_sample=x)
