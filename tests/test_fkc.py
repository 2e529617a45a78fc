"""Feynman-Kac correctors: SMC pieces, identities, ground truth on Gaussian mixtures, pipelines.

The ground-truth tests run FKC through diffplug's loop on a 1-D toy "model" whose ε-predictions are
the exact ones of Gaussian-mixture data (closed-form noisy marginals), and compare the weighted
particles with the target ``Π q_i^{β_i}`` integrated on a grid; the uncorrected SDE (plain CFG,
summed scores, scaled score) must be measurably off.
"""

import json

import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, FlowMatchEulerDiscreteScheduler, HeunDiscreteScheduler

from diffplug.guidance import CFG
from diffplug.pipelines import from_pipe
from diffplug.pipelines.loop import denoise
from diffplug.samplers import FKCSampler, ProductGuidance, encode_condition, get_sampler
from diffplug.samplers.fkc import RESAMPLERS, effective_sample_size, fkc_log_weight_increment, resample_indices
from diffplug.testing import tiny_pipeline

# -- toy: 1-D Gaussian mixtures with exact noisy scores --------------------------------------------
MIXTURES = {  # name: (weights, means, stds)
    "c": ([0.5, 0.5], [-2.0, 2.0], [0.4, 0.4]),  # a class whose left mode overlaps the other class
    "u": ([0.25, 0.25, 0.5], [-2.0, 2.0, -2.6], [0.4, 0.4, 0.4]),  # unconditional = c + other class
    "p1": ([0.5, 0.5], [-1.5, 1.5], [0.7, 0.7]),  # two experts for the product
    "p2": ([0.5, 0.5], [-1.2, 2.6], [0.7, 0.7]),
    "a": ([0.5, 0.5], [-1.5, 1.5], [0.3, 0.6]),  # annealing: q^2 favours the narrow mode 2:1
}
NAMES = list(MIXTURES)


def _tables():
    W = torch.zeros(len(NAMES), 3, dtype=torch.float64)
    M, S = torch.zeros_like(W), torch.ones_like(W)
    for i, name in enumerate(NAMES):
        w, m, s = MIXTURES[name]
        W[i, : len(w)], M[i, : len(m)], S[i, : len(s)] = torch.tensor(w), torch.tensor(m), torch.tensor(s)
    return W, M, S


def toy_scheduler():
    return DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
        set_alpha_to_one=True, clip_sample=False,
    )


def toy_model(scheduler):
    """model(x, t, code) -> the exact ε of the mixture named by each row's code, at timestep t."""
    ac = scheduler.alphas_cumprod.double()
    W, M, S = _tables()

    def model(x, t, code):
        a2 = ac[int(t)]
        a, sig = a2.sqrt(), (1 - a2).sqrt()
        k = code[:, 0].long()
        w, m, sd = W[k], M[k], S[k]
        var = a2 * sd**2 + sig**2
        x = x.double()
        logp = torch.log(w) - 0.5 * (x - a * m) ** 2 / var - 0.5 * torch.log(var)
        score = (torch.softmax(logp, 1) * (-(x - a * m) / var)).sum(1, keepdim=True)
        return (-sig * score).float()

    return model


def code(name, n):
    return torch.full((n, 1), float(NAMES.index(name)))


def run_toy(conditions, guidance, sampler, n, steps, seed=0):
    scheduler = toy_scheduler()
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 1, generator=g)
    return denoise(
        toy_model(scheduler), scheduler, latents, scheduler.timesteps, {"code": conditions}, guidance,
        sampler=sampler, extra_step_kwargs={"eta": 1.0, "generator": g},
    )


GRID = torch.linspace(-10, 10, 20001, dtype=torch.float64)


def target(exponents: dict, cut: float) -> dict:
    """Mean, std and mass right of ``cut`` of ``∝ Π q_i^{β_i}`` at t = 0, by quadrature."""
    logp = 0
    for name, beta in exponents.items():
        w, m, s = (torch.tensor(v, dtype=torch.float64) for v in MIXTURES[name])
        logp = logp + beta * torch.logsumexp(torch.log(w) - 0.5 * ((GRID[:, None] - m) / s) ** 2 - torch.log(s), 1)
    return _moments(GRID, torch.softmax(logp, 0), cut)


def particles(x, log_weights=None, cut=0.0) -> dict:
    """The same statistics of the particles, self-normalised within each group, groups averaged."""
    x = x.double().view(-1)
    if log_weights is None:
        w = torch.full_like(x, 1.0 / len(x))
    else:
        w = (torch.softmax(log_weights.double(), 1) / log_weights.shape[0]).view(-1)
    return _moments(x, w, cut)


def _moments(x, p, cut):
    mean = (p * x).sum()
    return {"mean": float(mean), "std": float((p * (x - mean) ** 2).sum().sqrt()), "right": float(p[x > cut].sum())}


GROUPS, K, STEPS = 16, 256, 200  # 4096 particles in 16 independent SMC groups


def _check(fkc: dict, plain: dict, truth: dict, tol: dict):
    for key, t in tol.items():
        assert abs(fkc[key] - truth[key]) < t, f"FKC {key}: {fkc[key]:.4f} vs target {truth[key]:.4f} ({fkc}, {truth})"
    assert any(abs(plain[key] - truth[key]) > 2 * t for key, t in tol.items()), (
        f"the uncorrected sampler should miss the target: {plain} vs {truth}"
    )


def test_ground_truth_cfg():
    n, w = GROUPS * K, 3.0
    conds = (code("c", n), code("u", n))
    sampler = FKCSampler(K)
    fkc = particles(run_toy(conds, CFG(w), sampler, n, STEPS), sampler.output.log_weights)
    plain = particles(run_toy(tuple(c[: n // 2] for c in conds), CFG(w), None, n // 2, STEPS))  # plain CFG, DDIM eta=1
    truth = target({"c": w, "u": 1 - w}, 0.0)
    _check(fkc, plain, truth, {"right": 0.04, "mean": 0.12, "std": 0.12})
    assert abs(plain["right"] - truth["right"]) > 0.15  # plain CFG over-weights the isolated mode


def test_ground_truth_product():
    n = GROUPS * K
    conds = (code("p1", n), code("u", n))
    product = ProductGuidance({"code": code("p2", n)}, 1.0, 1.0, uncond=False)  # ε₁ + ε₂
    sampler = FKCSampler(K)
    fkc = particles(run_toy(conds, product, sampler, n, STEPS), sampler.output.log_weights, cut=0.3)
    summed = particles(run_toy(conds, product, FKCSampler(K, correct=False), n, STEPS), cut=0.3)
    truth = target({"p1": 1.0, "p2": 1.0}, 0.3)
    _check(fkc, summed, truth, {"right": 0.04, "mean": 0.13})
    assert sampler.output.exponents == {"pred_cond": 1.0, "pred_cond_2": 1.0}


def test_ground_truth_product_of_two_models():
    """The second expert as a separate network with its own input name: the same SMC run, bit for
    bit, as the one-model product (and so the same match to the analytic target)."""
    n = GROUPS * K // 4
    conds = (code("p1", n), code("u", n))
    scheduler = toy_scheduler()
    shared = toy_model(scheduler)
    calls = []

    def expert_2(x, t, label):  # another "model": knows only p2, reads `label`
        calls.append(x.shape[0])
        return shared(x, t, code=label)

    one = FKCSampler(K)
    x_one = run_toy(conds, ProductGuidance({"code": code("p2", n)}, 1.0, 1.0, uncond=False), one, n, STEPS)
    two = FKCSampler(K)
    guidance = ProductGuidance({"label": code("p2", 1)}, 1.0, 1.0, uncond=False, second_model=expert_2)
    x_two = run_toy(conds, guidance, two, n, STEPS)
    assert calls == [n] * STEPS
    torch.testing.assert_close(x_two, x_one, rtol=0, atol=0)
    torch.testing.assert_close(two.output.log_weights, one.output.log_weights, rtol=0, atol=0)
    fkc = particles(x_two, two.output.log_weights, cut=0.3)
    truth = target({"p1": 1.0, "p2": 1.0}, 0.3)
    assert abs(fkc["right"] - truth["right"]) < 0.06 and abs(fkc["mean"] - truth["mean"]) < 0.2


def test_ground_truth_annealing():
    n, beta = GROUPS * K, 2.0
    conds = (code("a", n), code("u", n))
    sampler = FKCSampler(K, beta=beta)
    fkc = particles(run_toy(conds, CFG(1.0), sampler, n, STEPS), sampler.output.log_weights)
    half = tuple(c[: n // 2] for c in conds)
    scaled = particles(run_toy(half, CFG(1.0), FKCSampler(K, beta=beta, correct=False), n // 2, STEPS))
    truth = target({"a": beta}, 0.0)
    _check(fkc, scaled, truth, {"right": 0.04, "mean": 0.12})
    assert sampler.output.exponents == {"pred_cond": beta}


# -- the same targets on a flow-matching schedule, from sigma = 1 ---------------------------------------
def flow_toy_model():
    """model(x, t, code) -> the exact flow velocity v = E[ε|x] − E[x0|x] of the named mixture, for
    x_σ = (1 − σ) x0 + σ ε with σ = t / 1000 (finite at σ = 1, where x is pure noise)."""
    W, M, S = _tables()

    def model(x, t, code):
        sig = torch.as_tensor(float(t) / 1000.0, dtype=torch.float64)
        a = 1 - sig
        k = code[:, 0].long()
        w, m, sd = W[k], M[k], S[k]
        x = x.double()
        var = a**2 * sd**2 + sig**2
        post = torch.softmax(torch.log(w) - 0.5 * (x - a * m) ** 2 / var - 0.5 * torch.log(var), 1)
        x0 = (post * (m + a * sd**2 * (x - a * m) / var)).sum(1, keepdim=True)
        eps = (post * (sig * (x - a * m) / var)).sum(1, keepdim=True)
        return (eps - x0).float()

    return model


def run_flow_toy(conditions, guidance, sampler, n, steps, shift=3.0, seed=0):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    assert float(scheduler.sigmas[0]) == 1.0  # every flow schedule starts at pure noise
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 1, generator=g)
    return denoise(
        flow_toy_model(), scheduler, latents, scheduler.timesteps, {"code": conditions}, guidance,
        sampler=sampler, extra_step_kwargs={"generator": g},
    )


def test_ground_truth_product_on_flow_from_sigma_one():
    n = GROUPS * K
    conds = (code("p1", n), code("u", n))
    product = ProductGuidance({"code": code("p2", n)}, 1.0, 1.0, uncond=False)
    sampler = FKCSampler(K)
    fkc = particles(run_flow_toy(conds, product, sampler, n, STEPS), sampler.output.log_weights, cut=0.3)
    summed = particles(run_flow_toy(conds, product, FKCSampler(K, correct=False), n, STEPS), cut=0.3)
    _check(fkc, summed, target({"p1": 1.0, "p2": 1.0}, 0.3), {"right": 0.04, "mean": 0.13})


def test_ground_truth_cfg_and_annealing_on_flow_from_sigma_one():
    n = GROUPS * K
    conds = (code("c", n), code("u", n))
    sampler = FKCSampler(K)
    fkc = particles(run_flow_toy(conds, CFG(3.0), sampler, n, STEPS), sampler.output.log_weights)
    plain = particles(run_flow_toy(conds, CFG(3.0), FKCSampler(K, correct=False), n, STEPS))
    _check(fkc, plain, target({"c": 3.0, "u": -2.0}, 0.0), {"right": 0.04, "mean": 0.12, "std": 0.12})
    beta = 2.0
    conds = (code("a", n), code("u", n))
    sampler = FKCSampler(K, beta=beta)
    fkc = particles(run_flow_toy(conds, CFG(1.0), sampler, n, STEPS), sampler.output.log_weights)
    scaled = particles(run_flow_toy(conds, CFG(1.0), FKCSampler(K, beta=beta, correct=False), n, STEPS))
    _check(fkc, scaled, target({"a": beta}, 0.0), {"right": 0.04, "mean": 0.12})


def test_targets_wider_than_the_noise_are_refused_at_sigma_one():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match=r"sum to 0.4 <= 1/2 and the schedule starts at sigma = 1"):
        FKCSampler(2, beta=0.4).begin(torch.zeros(4, 1), scheduler.timesteps, scheduler, CFG(1.0))
    ddim = toy_scheduler()  # a VP schedule never reaches alpha = 0: the same target runs there
    ddim.set_timesteps(10)
    FKCSampler(2, beta=0.4).begin(torch.zeros(4, 1), ddim.timesteps, ddim, CFG(1.0))


@pytest.mark.parametrize("name", ["DCSolverScheduler", "FastUniPCScheduler", "UniPCMultistepScheduler", "DPMSolverMultistepScheduler"])
def test_multistep_schedulers_whose_update_fkc_would_ignore_are_refused(name):
    import diffusers

    import diffplug.samplers as samplers

    cls = getattr(samplers, name, None) or getattr(diffusers, name)
    pipe = tiny_pipeline("sd")
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    expected = rf"FKCSampler cannot use {name}: .*would be ignored"
    with pytest.raises(ValueError, match=expected):  # at from_pipe time, before any prompt is encoded
        from_pipe(pipe, sampler=FKCSampler(2))
    pipe.scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match=expected):  # and when the scheduler is swapped in afterwards
        FKCSampler(2).begin(torch.zeros(4, 4, 16, 16), pipe.scheduler.timesteps, pipe.scheduler, CFG(2.0))
    if name == "DCSolverScheduler":
        with pytest.raises(ValueError, match="dynamic compensation"):
            from_pipe(pipe, sampler=FKCSampler(2))


# -- SMC pieces and identities -----------------------------------------------------------------------
@pytest.mark.parametrize("scheme", RESAMPLERS)
def test_resamplers_are_unbiased(scheme):
    w = torch.tensor([0.05, 0.15, 0.3, 0.5])
    logw = w.log().repeat(20000, 1)
    idx = resample_indices(logw, scheme, torch.Generator().manual_seed(0))
    assert idx.shape == logw.shape and idx.min() >= 0 and idx.max() < 4
    counts = torch.stack([(idx == k).sum(1) for k in range(4)], 1).double()  # copies per row
    assert torch.allclose(counts.mean(0), 4 * w.double(), atol=0.03)
    if scheme == "systematic":  # copies are floor or ceil of K w
        assert ((counts - 4 * w.double()).abs() < 1).all()


def test_effective_sample_size():
    K = 8
    assert torch.allclose(effective_sample_size(torch.zeros(2, K)), torch.full((2,), float(K)))
    one_hot = torch.full((1, K), -1e9)
    one_hot[0, 3] = 0
    assert torch.allclose(effective_sample_size(one_hot), torch.ones(1))


def test_log_weight_increments():
    g = torch.Generator().manual_seed(0)
    ec, eu, e1, e2 = (torch.randn(5, 3, 4, generator=g) for _ in range(4))
    rho = 0.7
    zero = fkc_log_weight_increment([ec, eu], [1.0, 0.0], rho)  # w = 1: plain sampling, no weights
    assert torch.allclose(zero, torch.zeros(5), atol=1e-5)
    w = 4.0  # CFG: (w(w-1)/2)(1-rho) ||eps_c - eps_u||^2
    cfg = fkc_log_weight_increment([ec, eu], [w, 1 - w], rho)
    assert torch.allclose(cfg, 0.5 * w * (w - 1) * (1 - rho) * (ec - eu).square().sum((1, 2)), rtol=1e-4)
    prod = fkc_log_weight_increment([e1, e2], [1.0, 1.0], rho)  # product: (1-rho) <eps_1, eps_2>
    assert torch.allclose(prod, (1 - rho) * (e1 * e2).sum((1, 2)), rtol=1e-4, atol=1e-5)
    b = 3.0  # annealing: (b(b-1)/2)(1-rho) ||eps||^2
    assert torch.allclose(fkc_log_weight_increment([ec], [b], rho), 3.0 * (1 - rho) * ec.square().sum((1, 2)), rtol=1e-4)


def test_uncorrected_move_is_the_ddim_eta1_step():
    """Without weights, FKC's move is exactly DDIM(eta=1) on the CFG prediction, noise for noise."""
    n, w = 64, 2.5
    conds = (code("c", n), code("u", n))
    ours = run_toy(conds, CFG(w), FKCSampler(8, correct=False), n, 20, seed=3)
    ddim = run_toy(conds, CFG(w), None, n, 20, seed=3)
    assert torch.allclose(ours, ddim, atol=1e-4)
    # w = 1 with correction on: all increments vanish, nothing is ever resampled away
    sampler = FKCSampler(8, ess_threshold=0.9)
    run_toy((code("c", n), code("u", n)), CFG(1.0), sampler, n, 10)
    assert torch.allclose(sampler.output.log_weights, torch.zeros(n // 8, 8))
    assert not sampler.output.resampled.any()


def test_resampling_stays_within_groups_and_follows_the_threshold():
    n, K = 12, 4
    sampler = FKCSampler(K, ess_threshold=0.5, generator=torch.Generator().manual_seed(0))
    scheduler = toy_scheduler()
    scheduler.set_timesteps(10)
    sampler.begin(torch.zeros(n, 1), scheduler.timesteps, scheduler, CFG(2.0))
    values = torch.arange(n, dtype=torch.float32)[:, None]
    # group 0: uniform increments (ESS = K, kept); groups 1 and 2: one particle dominates
    eps_c = torch.zeros(n, 1)
    eps_c[5] = eps_c[10] = 10.0
    out = sampler._reweight_and_resample(0, values.clone(), [eps_c, torch.zeros(n, 1)], [2.0, -1.0], 0.5)
    assert torch.equal(out[:4, 0], values[:4, 0])  # not resampled
    assert torch.equal(out[4:8, 0], torch.full((4,), 5.0)) and torch.equal(out[8:, 0], torch.full((4,), 10.0))
    assert sampler._trace["resampled"][0].tolist() == [False, True, True]
    assert sampler._log_w[1:].abs().max() == 0 and sampler._log_w[0].abs().max() == 0


def test_clamping_is_off_by_default_and_counted_when_on():
    n, w = 256, 3.0
    conds = (code("c", n), code("u", n))
    off = FKCSampler(64)
    run_toy(conds, CFG(w), off, n, 30)
    on = FKCSampler(64, clamp=0.05)
    run_toy(conds, CFG(w), on, n, 30)
    assert off.output.summary()["clamped_increments"] == 0
    assert on.output.summary()["clamped_increments"] > 0 and on.output.summary()["clamp"] == 0.05


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="num_particles"):
        FKCSampler(0)
    with pytest.raises(ValueError, match="resample"):
        FKCSampler(4, resample="residual")
    with pytest.raises(ValueError, match="ess_threshold"):
        FKCSampler(4, ess_threshold=2)
    with pytest.raises(ValueError, match="clamp"):
        FKCSampler(4, clamp=0)
    scheduler = toy_scheduler()
    scheduler.set_timesteps(5)
    with pytest.raises(ValueError, match="num_images_per_prompt=4"):
        FKCSampler(4).begin(torch.zeros(6, 1), scheduler.timesteps, scheduler, CFG(2.0))
    with pytest.raises(ValueError, match="guidance_rescale"):
        FKCSampler(2).begin(torch.zeros(4, 1), scheduler.timesteps, scheduler, CFG(2.0, guidance_rescale=0.5))
    heun = HeunDiscreteScheduler()
    heun.set_timesteps(5)
    with pytest.raises(ValueError, match="Heun"):
        FKCSampler(2).begin(torch.zeros(4, 1), heun.timesteps, heun, CFG(2.0))
    with pytest.raises(ValueError, match="unknown sampler"):
        get_sampler("smc")


# -- pipelines ------------------------------------------------------------------------------------
def test_tiny_sd_pipeline_through_from_pipe():
    pipe = tiny_pipeline("sd")
    K, steps = 2, 3
    sampler = get_sampler("fkc", particles=K, ess_threshold=1.0)
    out = from_pipe(pipe, sampler=sampler)(
        ["a cat", "a dog"], num_inference_steps=steps, guidance_scale=4.0, num_images_per_prompt=K,
        generator=torch.Generator().manual_seed(0), output_type="np",
    )
    result = out.sampler_output
    assert out.images.shape[0] == 2 * K and result is sampler.output
    assert result.log_weights.shape == (2, K) and result.ess.shape == (steps, 2)
    assert result.chosen[0] in range(K) and result.chosen[1] in range(K, 2 * K)
    assert len(result.select(list(out.images))) == 2
    summary = json.loads(json.dumps(result.summary()))
    assert len(summary["ess_trace"]) == steps and summary["resampling_steps"] == steps - 1
    assert summary["exponents"] == {"pred_cond": 4.0, "pred_uncond": -3.0}
    # .nfe is per output image: every particle of its group, every step, both passes
    assert summary["network_evaluations"] == 2 * K * 2 * steps and out.nfe == K * 2 * steps
    assert summary["network_evaluations_per_output"] == out.nfe

    # a product of two prompts: three passes per particle, exponents (w1, 1 - w1 - w2, w2)
    second = encode_condition(pipe, "a red hat", num_images_per_prompt=K)
    sampler = FKCSampler(K)
    out = from_pipe(pipe, guidance=ProductGuidance(second, 2.0), sampler=sampler)(
        "a cat", num_inference_steps=steps, num_images_per_prompt=K, output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.nfe == K * 3 * steps and torch.isfinite(out.images).all()
    assert sampler.output.exponents == {"pred_cond": 2.0, "pred_uncond": -3.0, "pred_cond_2": 2.0}

    # two models sharing the latent space: the second expert is another pipeline's network
    other = tiny_pipeline("sd")
    torch.manual_seed(1)
    for p in other.unet.parameters():
        p.data.normal_(0, 0.05)
    seen = []
    other.unet.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    second = encode_condition(other, "a red hat", num_images_per_prompt=K)
    run = lambda g: from_pipe(pipe, guidance=g, sampler=FKCSampler(K))(  # noqa: E731
        "a cat", num_inference_steps=steps, num_images_per_prompt=K, output_type="latent",
        generator=torch.Generator().manual_seed(0)).images
    two = from_pipe(pipe, guidance=ProductGuidance(second, 2.0, second_model=other), sampler=FKCSampler(K))(
        "a cat", num_inference_steps=steps, num_images_per_prompt=K, output_type="latent",
        generator=torch.Generator().manual_seed(0))
    assert seen == [K] * steps and two.nfe == K * 3 * steps  # the second network's passes are counted
    assert not torch.allclose(two.images, run(ProductGuidance(second, 2.0)))  # it is not the first network


def test_euler_ancestral_latents_and_step_index():
    """Euler-type schedulers keep VE latents (x / alpha): FKC maps back and keeps step_index moving;
    uncorrected, its move is Euler-ancestral's own step (same mean and variance), noise for noise."""
    pipe = tiny_pipeline("sd")
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    run = from_pipe(pipe, sampler=FKCSampler(2, correct=False))
    call = dict(num_inference_steps=3, num_images_per_prompt=2, output_type="latent", guidance_scale=3.0)
    ours = run("a cat", generator=torch.Generator().manual_seed(0), **call).images
    assert pipe.scheduler.step_index == 3
    stock = from_pipe(pipe)("a cat", generator=torch.Generator().manual_seed(0), **call).images
    assert torch.allclose(ours, stock, rtol=1e-3, atol=1e-3)
    sampler = FKCSampler(2)
    out = from_pipe(pipe, sampler=sampler)("a cat", generator=torch.Generator().manual_seed(0), **call)
    assert torch.isfinite(out.images).all() and sampler.output.ess.shape == (3, 1)


def test_cli_sample_with_fkc_writes_chosen_images_and_ess_trace(tmp_path):
    from diffplug.cli import main

    out = tmp_path / "fkc"
    args = ["sample", "--model", "tiny-sd", "--prompt", "a cat", "--prompt", "a dog", "--steps", "2",
            "--sampler", "fkc", "--particles", "3", "--guidance-scale", "3", "--out", str(out)]
    assert main(args) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["000.png", "001.png", "grid.png"]  # one per prompt
    sampler = json.loads((out / "settings.json").read_text())["sampler"]
    assert sampler["num_particles"] == 3 and len(sampler["ess_trace"]) == 2
    assert sampler["exponents"] == {"pred_cond": 3.0, "pred_uncond": -2.0}


def test_cli_sample_product_of_prompts_and_of_two_models(tmp_path, capsys):
    from diffplug.cli import main

    base = ["sample", "--model", "tiny-sd", "--prompt", "a cat", "--prompt", "a dog", "--steps", "2",
            "--sampler", "fkc", "--particles", "2", "--guidance-scale", "2", "--product-prompt", "a red hat"]
    assert main([*base, "--out", str(tmp_path / "one")]) == 0
    settings = json.loads((tmp_path / "one" / "settings.json").read_text())
    assert settings["sampler"]["exponents"] == {"pred_cond": 2.0, "pred_uncond": -3.0, "pred_cond_2": 2.0}
    assert settings["guidance"]["class"] == "ProductGuidance"
    assert settings["nfe_per_image"] == 2 * 3 * 2  # per output image: 2 particles x 3 passes x 2 steps
    assert main([*base, "--product-model", "tiny-sd", "--out", str(tmp_path / "two")]) == 0
    assert json.loads((tmp_path / "two" / "settings.json").read_text())["guidance"]["product_model"] == "tiny-sd"
    assert main([*base[:-1], "x", "--product-prompt", "y", "--product-prompt", "z", "--out", str(tmp_path / "bad")]) != 0
    assert "--product-prompt: give one, or one per --prompt (2); got 3" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["apg", "ag", "linear-ag"])
def test_guidance_that_is_not_a_geometric_mixture_is_refused(name):
    """APG, AG and LinearAG are not weighted as if they were CFG: a ValueError names what is supported."""
    from diffplug.guidance import get_guidance

    options = {"coefficients": [None, [0.0, 0.0, 1.0, 0.0]]} if name == "linear-ag" else {}
    guidance = get_guidance(name, guidance_scale=3.0, **options)
    scheduler = toy_scheduler()
    scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match=r"cannot weight .*Supported guidance: CFG .*ProductGuidance.*fkc_exponents"):
        FKCSampler(2).begin(torch.zeros(4, 1), scheduler.timesteps, scheduler, guidance)
    pipe = tiny_pipeline("sd")
    with pytest.raises(ValueError, match="cannot weight"):
        from_pipe(pipe, guidance=guidance, sampler=FKCSampler(2))("a cat", num_inference_steps=2, num_images_per_prompt=2,
                                                                 output_type="latent")
    # diffusers' own CFG guider is a geometric mixture: accepted
    from diffusers.guiders import ClassifierFreeGuidance

    FKCSampler(2).begin(torch.zeros(4, 1), scheduler.timesteps, scheduler, ClassifierFreeGuidance(guidance_scale=3.0))


def test_cli_fkc_honours_num_images_and_counts_every_particle(tmp_path, capsys):
    from diffplug.cli import main

    out = tmp_path / "fkc"
    K, steps = 2, 2
    args = ["sample", "--model", "tiny-sd", "--prompt", "a cat", "--prompt", "a dog", "--steps", str(steps),
            "--sampler", "fkc", "--particles", str(K), "--num-images", "2", "--guidance-scale", "3", "--out", str(out)]
    assert main(args) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["000.png", "001.png", "002.png", "003.png", "grid.png"]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["num_images_per_prompt"] == 2
    assert [im["prompt"] for im in settings["images"]] == ["a cat", "a cat", "a dog", "a dog"]
    sampler = settings["sampler"]
    assert sampler["groups"] == 4 and len(sampler["chosen"]) == 4  # one group of K particles per output image
    assert [c // K for c in sampler["chosen"]] == [0, 1, 2, 3]
    assert settings["nfe_per_image"] == K * steps * 2 == sampler["network_evaluations_per_output"]
    assert sampler["network_evaluations"] == 4 * K * steps * 2
    assert f"{K * steps * 2} NFE/image" in capsys.readouterr().out
