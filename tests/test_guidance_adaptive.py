"""Adaptive Guidance and LinearAG: switch steps, real savings in network evaluations, CFG equivalence."""

import inspect
import math

import pytest
import torch
from diffusers import DDIMScheduler

from diffplug.guidance import CFG, AdaptiveGuidance, LinearAG, calibrate, get_guidance
from diffplug.pipelines import denoise, from_pipe
from diffplug.testing import tiny_pipeline

N = 8
LATENT = (4, 8, 8)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd")


def _scheduler():
    s = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    s.set_timesteps(N)
    return s


def _patterns():
    g = torch.Generator().manual_seed(0)
    e1, e2 = torch.randn(LATENT, generator=g), torch.randn(LATENT, generator=g)
    e1 = e1 / e1.norm()
    e2 = e2 - (e2 * e1).sum() * e1
    return e1, e2 / e2.norm()


class ScriptedModel:
    """ε_c = e1 and ε_u = cos θ e1 + sin θ e2 with a scripted cosine per (sample, step); counts rows.

    Conditions are encoded in the embedding: +(s+1) for sample s's prompt, −(s+1) for its negative.
    """

    def __init__(self, cosines, timesteps):
        self.cosines = cosines  # [sample][step]
        self.step_of = {int(t): i for i, t in enumerate(timesteps)}
        self.e1, self.e2 = _patterns()
        self.rows = 0
        self.calls = []

    def __call__(self, x, t, encoder_hidden_states):
        self.rows += x.shape[0]
        i = self.step_of[int(t)]
        self.calls.append(x.shape[0])
        out = []
        for code in encoder_hidden_states[:, 0, 0].tolist():
            s = int(abs(code)) - 1
            if code > 0:
                out.append(self.e1)
            else:
                c = self.cosines[s][i]
                out.append(c * self.e1 + math.sqrt(1 - c * c) * self.e2)
        return torch.stack(out)


def _run_scripted(guidance, cosines):
    sched = _scheduler()
    model = ScriptedModel(cosines, sched.timesteps)
    b = len(cosines)
    codes = torch.arange(1, b + 1, dtype=torch.float32).view(b, 1, 1).expand(b, 2, 3)
    conditions = {"encoder_hidden_states": (codes, -codes)}
    latents = torch.randn((b, *LATENT), generator=torch.Generator().manual_seed(0))
    out = denoise(model, sched, latents, sched.timesteps, conditions, guidance)
    return out, model


def _cosines(k):
    """A γ trajectory that first exceeds 0.99 at step k."""
    return [0.5 + 0.05 * i if i < k else 0.995 for i in range(N)]


@pytest.mark.parametrize("k", [0, 3, N - 1])
def test_switch_step_and_nfe_is_n_plus_k_plus_1(k):
    ag = AdaptiveGuidance(5.0, threshold=0.99, space="model_output")  # the script sets the ε cosines
    _, model = _run_scripted(ag, [_cosines(k)])
    assert ag.switch_steps == [k]
    assert model.rows == N + k + 1


def test_per_sample_policy_skips_rows_and_all_policy_waits_for_the_batch():
    cos = [_cosines(2), _cosines(5)]
    per = AdaptiveGuidance(5.0, threshold=0.99, policy="per_sample", space="model_output")
    out_per, model_per = _run_scripted(per, cos)
    assert per.switch_steps == [2, 5]
    assert model_per.rows == (N + 2 + 1) + (N + 5 + 1)
    assert model_per.calls[3] == 3  # step 3: two conditional rows + sample 1's unconditional row only
    whole = AdaptiveGuidance(5.0, threshold=0.99, policy="all", space="model_output")
    out_all, model_all = _run_scripted(whole, cos)
    assert whole.switch_steps == [2, 5]
    assert model_all.rows == 2 * (N + 5 + 1)
    assert torch.equal(out_per, out_all)  # same images, different cost


def test_gammas_are_recorded_per_sample():
    cos = [_cosines(4), _cosines(N)]  # the second never converges
    ag = AdaptiveGuidance(5.0, threshold=0.99, policy="per_sample", space="model_output")
    _run_scripted(ag, cos)
    gam = ag.gammas()
    assert ag.switch_steps == [4, None]
    assert torch.allclose(gam[:5, 0], torch.tensor(cos[0][:5], dtype=torch.float64), atol=1e-5)
    assert gam[5:, 0].isnan().all()  # not measured after the switch
    assert torch.allclose(gam[:, 1], torch.tensor(cos[1], dtype=torch.float64), atol=1e-5)


def test_unreachable_threshold_is_cfg_bit_for_bit(pipe):
    kw = dict(num_inference_steps=4, output_type="latent")
    prompts = ["a cat", "a dog"]
    ref = from_pipe(pipe, guidance=CFG(6.0))(prompts, generator=torch.Generator().manual_seed(0), **kw)
    ag = AdaptiveGuidance(6.0, threshold=1.0, policy="per_sample")
    out = from_pipe(pipe, guidance=ag)(prompts, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(out.images, ref.images)
    assert out.nfe == ref.nfe == 2 * 4
    assert ag.switch_steps == [None, None]


def test_reachable_threshold_counts_fewer_unet_calls(pipe):
    rows = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args, kwargs: rows.append(args[0].shape[0]), with_kwargs=True)
    try:
        steps = 6
        ag = AdaptiveGuidance(6.0, threshold=0.5, policy="per_sample")  # the tiny UNet's γ is ~0.99 at once
        out = from_pipe(pipe, guidance=ag)(["a cat", "a dog"], num_inference_steps=steps,
                                           generator=torch.Generator().manual_seed(0), output_type="latent")
    finally:
        hook.remove()
    assert all(k is not None for k in ag.switch_steps)
    expected = sum(steps + k + 1 for k in ag.switch_steps)
    assert sum(rows) == expected == 2 * out.nfe  # .nfe is per image
    assert sum(rows) < 2 * 2 * steps


def test_calibration_matches_a_real_run(pipe):
    prompts = ["a cat", "a red dog", "a blue bird"]
    steps = 5
    gam_run = calibrate(pipe, prompts, thresholds=(0.999, 2.0), guidance_scale=6.0, num_inference_steps=steps, batch_size=3)
    cal, never = gam_run
    assert never.switch_steps == [None] * 3 and never.saving == 0.0
    ag = AdaptiveGuidance(6.0, threshold=0.999, policy="per_sample")  # the defaults' space: x0, as calibrate's
    rows = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args, kwargs: rows.append(args[0].shape[0]), with_kwargs=True)
    try:
        from_pipe(pipe, guidance=ag)(prompts, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                                     output_type="latent")
    finally:
        hook.remove()
    assert ag.switch_steps == cal.switch_steps
    assert sum(rows) == sum(cal.nfe)  # the sample-passes really evaluated
    assert cal.saving == pytest.approx(1 - sum(cal.nfe) / (3 * 2 * steps))


# -- LinearAG -----------------------------------------------------------------------------------------


def test_fit_recovers_known_coefficients():
    g = torch.Generator().manual_seed(0)
    n, truth = 6, {2: [0.7, -0.2, 0.4, 0.05], 3: [1.1, 0.3, -0.5, -0.02], 5: [0.2, 0.1, 0.6, 0.0]}
    cond = [torch.randn(5, *LATENT, generator=g) for _ in range(n)]
    uncond = [torch.randn(5, *LATENT, generator=g) for _ in range(n)]
    for i, (a, b, c, d) in truth.items():
        uncond[i] = a * cond[i] + b * cond[i - 1] + c * uncond[i - 1] + d
    fitted = LinearAG.fit(cond, uncond, steps=list(truth), guidance_scale=5.0)
    for i in range(n):
        if i in truth:
            assert fitted.coefficients[i] == pytest.approx(truth[i], abs=1e-5)
            assert fitted.fit_residuals[i] < 1e-5
        else:
            assert fitted.coefficients[i] is None


class LinearTrajectoryModel:
    """ε_c(t_i) = 0.3 x + pattern_i; the true ε_u(t_i) is an exact affine function of the previous step's
    predictions (so LinearAG with these coefficients must reproduce CFG). Counts evaluated rows."""

    def __init__(self, timesteps, coefficients):
        self.step_of = {int(t): i for i, t in enumerate(timesteps)}
        self.coefficients = coefficients
        g = torch.Generator().manual_seed(1)
        self.patterns = [torch.randn(LATENT, generator=g) for _ in timesteps]
        self.u0 = torch.randn(LATENT, generator=g)
        self.state = {}  # step -> (cond, uncond) of the whole batch
        self.rows = 0

    def true_preds(self, x, i):
        if i not in self.state:
            cond = 0.3 * x + self.patterns[i]
            if i == 0:
                uncond = 0.1 * x + self.u0
            else:
                a, b, c, d = self.coefficients[i] or [0.4, 0.3, 0.2, 0.01]
                prev_c, prev_u = self.state[i - 1]
                uncond = a * cond + b * prev_c + c * prev_u + d
            self.state[i] = (cond, uncond)
        return self.state[i]

    def __call__(self, x, t, encoder_hidden_states):
        i = self.step_of[int(t)]
        b = x.shape[0] // 2 if x.shape[0] % 2 == 0 and (encoder_hidden_states[:, 0, 0] < 0).any() else x.shape[0]
        self.rows += x.shape[0]
        cond, uncond = self.true_preds(x[:b], i)
        return torch.cat([cond, uncond]) if x.shape[0] != b else cond


def test_linear_ag_with_exact_coefficients_reproduces_cfg():
    sched = _scheduler()
    coefficients = [None, [0.8, -0.1, 0.3, 0.02], None, [1.2, 0.2, -0.4, 0.0], None, [0.5, 0.5, 0.1, -0.03], None, None]
    replaced = sum(c is not None for c in coefficients)
    codes = torch.ones(2, 2, 3)
    conditions = {"encoder_hidden_states": (codes, -codes)}
    latents = torch.randn((2, *LATENT), generator=torch.Generator().manual_seed(0))
    outs = {}
    for name, guidance in (("cfg", CFG(5.0)), ("linear", LinearAG(5.0, coefficients=coefficients))):
        model = LinearTrajectoryModel(sched.timesteps, coefficients)
        outs[name] = denoise(model, sched, latents.clone(), sched.timesteps, conditions, guidance), model.rows
    assert torch.allclose(outs["linear"][0], outs["cfg"][0], atol=1e-4)
    assert outs["cfg"][1] == 2 * 2 * N
    assert outs["linear"][1] == 2 * (2 * N - replaced)
    # wrong coefficients give a different image: the test can fail
    wrong = [None if c is None else [c[0] + 0.5, *c[1:]] for c in coefficients]
    model = LinearTrajectoryModel(sched.timesteps, coefficients)
    bad = denoise(model, sched, latents.clone(), sched.timesteps, conditions, LinearAG(5.0, coefficients=wrong))
    assert (bad - outs["cfg"][0]).abs().max() > 1e-2


def test_reuse_previous_uncond_coefficients_are_a_cache():
    lag = LinearAG(4.0, coefficients=[None, [0.0, 0.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    c0, u0, c1 = (torch.randn(2, *LATENT, generator=g) for _ in range(3))
    lag.set_state(0, 2, torch.tensor(999))
    assert lag.num_conditions == 2
    lag.forward(c0, u0)
    lag.set_state(1, 2, torch.tensor(500))
    assert lag.num_conditions == 1  # no network evaluation of the unconditional pass
    assert torch.equal(lag.forward(c1).pred, u0 + 4.0 * (c1 - u0))


def test_linear_ag_on_a_pipeline_fit_save_load_and_cli(pipe, tmp_path):
    steps = 6
    lag = LinearAG.fit_from_pipe(pipe, ["a cat", "a dog"], guidance_scale=5.0, num_inference_steps=steps, batch_size=2)
    assert [i for i, c in enumerate(lag.coefficients) if c is not None] == LinearAG.default_steps(steps) == [1]
    lag.save_pretrained(tmp_path)
    loaded = get_guidance("linear-ag", path=str(tmp_path))
    assert isinstance(loaded, LinearAG) and loaded.coefficients == lag.coefficients
    out = from_pipe(pipe, guidance=loaded)("a cat", num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                                            output_type="latent")
    assert out.nfe == 2 * steps - 1
    with pytest.raises(ValueError, match="num_inference_steps=6"):
        from_pipe(pipe, guidance=loaded)("a cat", num_inference_steps=4, output_type="latent")
    with pytest.raises(ValueError, match="coefficients"):
        get_guidance("linear-ag")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="policy"):
        AdaptiveGuidance(5.0, policy="mean")
    with pytest.raises(ValueError, match=r"coefficients\[0\]"):
        LinearAG(5.0, coefficients=[[1, 0, 0, 0]])
    with pytest.raises(ValueError, match=r"coefficients\[1\]"):
        LinearAG(5.0, coefficients=[None, [1, 0]])
    ag = get_guidance("ag", guidance_scale="7", threshold="0.995", policy="per_sample")
    assert isinstance(ag, AdaptiveGuidance) and ag.threshold == 0.995 and ag.policy == "per_sample"


def test_gamma_in_x0_space_uses_the_denoised_predictions():
    from diffplug.guidance.adaptive import cosine_similarity
    from diffplug.predictions import StepContext

    g = torch.Generator().manual_seed(0)
    sample, cond, uncond = (torch.randn(3, *LATENT, generator=g) for _ in range(3))
    ctx = StepContext(sample, torch.tensor(0.3), torch.tensor(0.91**0.5), "epsilon")
    gam = {}
    for space in ("model_output", "x0"):
        ag = AdaptiveGuidance(5.0, threshold=2.0, space=space)
        ag.set_state(0, 4, torch.tensor(999))
        ag.set_context(ctx)
        ag.prepare_inputs({"encoder_hidden_states": (torch.zeros(3, 2, 3), torch.zeros(3, 2, 3))})
        ag.forward(cond, uncond)
        gam[space] = ag.gammas()[0]
    assert torch.allclose(gam["model_output"], cosine_similarity(cond, uncond))
    assert torch.allclose(gam["x0"], cosine_similarity(ctx.to_x0(cond), ctx.to_x0(uncond)))
    assert (gam["x0"] - gam["model_output"]).abs().max() > 1e-3


class DenoisedPatternModel:
    """An ε-model whose *denoised* predictions are fixed patterns p (prompt) and q (negative) with
    cos(p, q) = 0.5: ε = (x − α D)/σ. At high noise both ε ≈ x/σ, so their cosine is ≈ 1 from step 0
    although the prompts disagree — the testbed's situation."""

    def __init__(self, scheduler):
        self.levels = {int(t): i for i, t in enumerate(scheduler.timesteps)}
        ac = scheduler.alphas_cumprod[scheduler.timesteps.long()]
        self.alpha, self.sigma = ac.sqrt(), (1 - ac).sqrt()
        e1, e2 = _patterns()
        self.p, self.q = 3 * e1, 3 * (0.5 * e1 + math.sqrt(0.75) * e2)
        self.rows = 0

    def __call__(self, x, t, encoder_hidden_states):
        i = self.levels[int(t)]
        self.rows += x.shape[0]
        d = torch.stack([self.p if code > 0 else self.q for code in encoder_hidden_states[:, 0, 0].tolist()])
        return (x - self.alpha[i] * d) / self.sigma[i]


def _run_denoised_patterns(guidance):
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    sched.set_timesteps(N)
    model = DenoisedPatternModel(sched)
    codes = torch.ones(2, 2, 3)
    latents = torch.randn((2, *LATENT), generator=torch.Generator().manual_seed(0))
    denoise(model, sched, latents, sched.timesteps, {"encoder_hidden_states": (codes, -codes)}, guidance)
    return model.rows


def test_defaults_keep_guiding_an_epsilon_model_whose_noise_predictions_agree():
    ag = AdaptiveGuidance(5.0)
    assert (ag.threshold, ag.space) == (0.999, "x0")
    assert _run_denoised_patterns(ag) == 2 * 2 * N  # CFG at every step: prompts still disagree in x0
    assert ag.switch_steps == [None, None]
    assert torch.allclose(ag.gammas(), torch.full((N, 2), 0.5, dtype=torch.float64), atol=1e-4)
    # the earlier defaults measured ε and switched at once: unguided sampling from step 0
    eps = AdaptiveGuidance(5.0, threshold=0.99, space="model_output")
    assert _run_denoised_patterns(eps) == 2 * (N + 1)
    assert eps.switch_steps == [0, 0] and float(eps.gammas()[0].min()) > 0.99
    assert inspect.signature(calibrate).parameters["space"].default == "x0"  # calibrates what the default measures


def test_linear_ag_without_coefficients_is_an_error_naming_the_fix():
    for bad in (None, [], [None, None, None]):
        with pytest.raises(ValueError, match=r"coefficients.*fit_from_pipe.*path="):
            LinearAG(5.0, coefficients=bad)
    with pytest.raises(ValueError, match=r"coefficients.*fit_from_pipe"):
        LinearAG()
    with pytest.raises(ValueError, match=r"coefficients.*path="):
        get_guidance("linear-ag", guidance_scale="5")
