"""APG (diffplug.guidance.APG): identities the paper's update must satisfy, parity with diffusers."""

import importlib.util
import math
import os
from pathlib import Path
import warnings

import pytest
import torch
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

from diffplug.guidance import APG, CFG, get_guidance
from diffplug.guidance.apg import x0_frame
from diffplug.pipelines import from_pipe
from diffplug.predictions import StepContext, split
from diffplug.testing import tiny_pipeline

SHAPE = (3, 4, 8, 8)


def _flat_dot(a, b):
    return (a.double() * b.double()).flatten(1).sum(1)


def _norm(a):
    return a.double().flatten(1).norm(dim=1)


def _context(prediction_type="epsilon", alpha=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    sigma = math.sqrt(1 - alpha**2) if prediction_type != "flow" else 1 - alpha
    return StepContext(torch.randn(SHAPE, generator=g), torch.tensor(alpha), torch.tensor(sigma), prediction_type)


def _preds(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


def _apg(step=0, n=10, context=None, **kw):
    guider = APG(**kw)
    guider.set_state(step, n, torch.tensor(999))
    guider.set_context(context)
    return guider


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow"])
def test_neutral_setting_is_cfg(prediction_type):
    cond, uncond = _preds()
    apg = _apg(context=_context(prediction_type), guidance_scale=6.0, eta=1.0, norm_threshold=0.0, momentum=0.0)
    cfg = CFG(6.0)
    cfg.set_state(0, 10, torch.tensor(999))
    assert (apg.forward(cond, uncond).pred - cfg.forward(cond, uncond).pred).abs().max() <= 1e-6


def test_neutral_setting_is_cfg_end_to_end():
    pipe = tiny_pipeline("sd")
    kw = dict(num_inference_steps=4, output_type="latent")
    ref = from_pipe(pipe, guidance=CFG(7.0))(["a cat", "a dog"], generator=torch.Generator().manual_seed(0), **kw)
    apg = APG(7.0, eta=1.0, norm_threshold=0.0, momentum=0.0)
    out = from_pipe(pipe, guidance=apg)(["a cat", "a dog"], generator=torch.Generator().manual_seed(0), **kw)
    assert (out.images - ref.images).abs().max() <= 1e-6
    assert out.nfe == ref.nfe == 8
    paper = from_pipe(pipe, guidance=APG(7.0))(["a cat", "a dog"], generator=torch.Generator().manual_seed(0), **kw)
    assert (paper.images - ref.images).abs().max() > 1e-3  # the default settings do change the result


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow", "sample"])
def test_x0_space_matches_explicit_conversion(prediction_type):
    """APG in x0 space = convert both predictions to x0, apply Algorithm 1 there, convert back."""
    ctx = _context(prediction_type)
    w, eta, r, beta = 9.0, 0.25, 0.5, -0.5
    apg = APG(w, eta=eta, norm_threshold=r, momentum=beta)
    running = 0
    for step in range(3):
        cond, uncond = _preds(seed=10 + step)
        apg.set_state(step, 10, torch.tensor(999))
        apg.set_context(ctx)
        got = apg.forward(cond, uncond).pred
        d_c, _ = split(cond.double(), ctx.sample.double(), ctx.alpha.double(), ctx.sigma.double(), prediction_type)
        d_u, _ = split(uncond.double(), ctx.sample.double(), ctx.alpha.double(), ctx.sigma.double(), prediction_type)
        delta = d_c - d_u
        running = delta + beta * running
        delta = running * torch.clamp(r / _norm(running), max=1.0).view(-1, 1, 1, 1)
        par = (_flat_dot(delta, d_c) / _norm(d_c) ** 2).view(-1, 1, 1, 1) * d_c
        guided_x0 = d_c + (w - 1) * (delta - par + eta * par)
        expected = ctx.from_x0(guided_x0.float())
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4), (step, (got - expected).abs().max())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow", "sample"])
def test_x0_frame_is_the_affine_form_of_split(prediction_type):
    """u ∥ D_c and D_c − D_u = sign·s·(out_c − out_u), against the shared conversion."""
    ctx = _context(prediction_type)
    cond, uncond = _preds()
    u = torch.empty(SHAPE)
    s, sign = x0_frame(prediction_type, ctx.sample, ctx.alpha, ctx.sigma, cond, u)
    d_c, d_u = ctx.to_x0(cond), ctx.to_x0(uncond)
    assert torch.allclose(d_c - d_u, sign * s * (cond - uncond), atol=1e-5)
    cos = _flat_dot(u, d_c) / (_norm(u) * _norm(d_c))
    assert torch.allclose(cos.abs(), torch.ones(SHAPE[0], dtype=torch.float64), atol=1e-6)


def _reference(prediction_type, steps, w=7.5, eta=0.0, r=15.0, beta=-0.5):
    """Algorithm 1 in float64 with explicit x0 conversions (α clamped at 1e-4 for ε, as APG does)."""
    running, outs = 0, []
    for ctx, cond, uncond in steps:
        alpha, sigma, x = ctx.alpha.double(), ctx.sigma.double(), ctx.sample.double()
        if prediction_type == "epsilon":
            alpha = alpha.clamp_min(1e-4)
        d_c, _ = split(cond.double(), x, alpha, sigma, prediction_type)
        d_u, _ = split(uncond.double(), x, alpha, sigma, prediction_type)
        running = (d_c - d_u) + beta * running
        delta = running * torch.clamp(r / _norm(running), max=1.0).view(-1, 1, 1, 1)
        par = (_flat_dot(delta, d_c) / _norm(d_c) ** 2).view(-1, 1, 1, 1) * d_c
        guided = d_c + (w - 1) * (delta - par + eta * par)
        outs.append(StepContext(x, alpha, sigma, prediction_type).from_x0(guided))
    return outs


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow", "sample"])
def test_lean_update_equals_float64_reference_to_1e6(prediction_type):
    g = torch.Generator().manual_seed(7)
    shape = (2, 4, 64, 64)  # the benchmark's shape: float32 sums over 16k elements
    steps = []
    for alpha in (0.05, 0.3, 0.6, 0.9, 0.999):
        sigma = 1 - alpha if prediction_type == "flow" else math.sqrt(1 - alpha**2)
        ctx = StepContext(torch.randn(shape, generator=g), torch.tensor(alpha), torch.tensor(sigma), prediction_type)
        steps.append((ctx, torch.randn(shape, generator=g), torch.randn(shape, generator=g)))
    apg = APG(7.5, eta=0.0, norm_threshold=15.0, momentum=-0.5)
    expected = _reference(prediction_type, steps, r=apg.norm_threshold)
    for i, (ctx, cond, uncond) in enumerate(steps):
        apg.set_state(i, len(steps), torch.tensor(999))
        apg.set_context(ctx)
        got = apg.forward(cond, uncond).pred.double()
        assert (got - expected[i]).abs().max() <= 2e-6 * expected[i].abs().max(), i


def _timing_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "guidance_apg_timing.py"
    spec = importlib.util.spec_from_file_location("guidance_apg_timing", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("space", ["x0", "model_output"])
def test_one_step_dispatches_at_most_14_aten_ops(space):
    """The GPU-cost proxy the timing benchmark reports, counted the same way (TorchDispatchMode)."""
    bench = _timing_module()
    shape = (2, 4, 64, 64)
    g = torch.Generator().manual_seed(0)
    cond, uncond, sample = (torch.randn(shape, generator=g) for _ in range(3))
    ctx = StepContext(sample, torch.tensor(0.6), torch.tensor(0.8), "epsilon") if space == "x0" else None
    apg = APG(7.5, eta=0.0, norm_threshold=15.0, momentum=-0.5, space=space)
    for i in range(3):  # past the first step: momentum, rescale and projection all run
        bench.step(apg, ctx, cond, uncond, i, 10)
    with bench.OpCounter() as counter:
        bench.step(apg, ctx, cond, uncond, 3, 10)
    assert 0 < len(counter.ops) <= 14, counter.ops
    with bench.OpCounter() as cfg_counter:
        bench.step(CFG(7.5), None, cond, uncond, 3, 10)
    assert len(cfg_counter.ops) == 3  # the counter sees every op: CFG's sub, mul, add


def test_projected_component_is_orthogonal_to_conditional_x0():
    ctx = _context("epsilon")
    cond, uncond = _preds()
    w = 5.0
    apg = _apg(context=ctx, guidance_scale=w, eta=0.0, norm_threshold=0.0, momentum=0.0)
    d_c = ctx.to_x0(cond)
    perp = (ctx.to_x0(apg.forward(cond, uncond).pred) - d_c) / (w - 1)  # = Δ⊥ in x0 space
    cos = _flat_dot(perp, d_c) / (_norm(perp) * _norm(d_c))
    assert cos.abs().max() < 1e-5
    assert _norm(perp).min() > 1e-3
    # the projection is against D_c, not the raw ε_c ...
    assert (_flat_dot(perp, cond) / (_norm(perp) * _norm(cond))).abs().max() > 1e-2
    # ... and without projection (η = 1) the update is not orthogonal: the test can fail
    full = _apg(context=ctx, guidance_scale=w, eta=1.0, norm_threshold=0.0, momentum=0.0)
    upd = (ctx.to_x0(full.forward(cond, uncond).pred) - d_c) / (w - 1)
    assert (_flat_dot(upd, d_c) / (_norm(upd) * _norm(d_c))).abs().max() > 1e-2


def test_projection_orthogonal_in_model_output_space():
    cond, uncond = _preds()
    apg = _apg(guidance_scale=4.0, eta=0.0, norm_threshold=0.0, momentum=0.0, space="model_output")
    perp = (apg.forward(cond, uncond).pred - cond) / 3.0
    assert (_flat_dot(perp, cond) / (_norm(perp) * _norm(cond))).abs().max() < 1e-5


def test_rescaled_update_norm_is_bounded():
    ctx = _context("v_prediction")
    cond, uncond = _preds()
    uncond[0] = cond[0] + 1e-4 * uncond[0]  # sample 0: a tiny difference, left unclipped
    w, r = 8.0, 0.7
    apg = _apg(context=ctx, guidance_scale=w, eta=1.0, norm_threshold=r, momentum=0.0)
    d_c, d_u = ctx.to_x0(cond), ctx.to_x0(uncond)
    update = (ctx.to_x0(apg.forward(cond, uncond).pred) - d_c) / (w - 1)
    norms = _norm(update)
    assert (norms <= r * (1 + 1e-5)).all()
    assert torch.allclose(norms[1:], torch.full_like(norms[1:], r), rtol=1e-4)  # clipped ones sit on the bound
    assert torch.allclose(update[0].double(), (d_c - d_u)[0].double(), atol=1e-6)  # small one untouched
    assert _norm(d_c - d_u)[1:].min() > 2 * r  # the bound was really active


def test_momentum_follows_its_recurrence_and_resets():
    """M_t = Δ_t + β M_{t−1}; scripted Δ_t; a new generation (step 0) starts from M = 0."""
    w, beta = 3.0, -0.75
    g = torch.Generator().manual_seed(3)
    seq = [(torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)) for _ in range(5)]
    apg = APG(w, eta=1.0, norm_threshold=0.0, momentum=beta, space="model_output")
    for _generation in range(2):
        running = torch.zeros(SHAPE, dtype=torch.float64)
        for step, (cond, uncond) in enumerate(seq):
            apg.set_state(step, len(seq), torch.tensor(999))
            got = (apg.forward(cond, uncond).pred.double() - cond.double()) / (w - 1)
            running = (cond - uncond).double() + beta * running
            assert torch.allclose(got, running, atol=1e-5), step
    # β = 0 is no momentum: the update is the plain difference at every step
    plain = APG(w, eta=1.0, norm_threshold=0.0, momentum=0.0, space="model_output")
    for step, (cond, uncond) in enumerate(seq):
        plain.set_state(step, len(seq), torch.tensor(999))
        assert torch.allclose((plain.forward(cond, uncond).pred - cond) / (w - 1), cond - uncond, atol=1e-5)


def test_momentum_is_kept_in_x0_units_across_changing_noise_levels():
    w, beta = 3.0, -0.5
    apg = APG(w, eta=1.0, norm_threshold=0.0, momentum=beta)
    running = 0
    for step, alpha in enumerate([0.2, 0.5, 0.9]):
        ctx = _context("epsilon", alpha=alpha, seed=step)
        cond, uncond = _preds(seed=20 + step)
        apg.set_state(step, 3, torch.tensor(999))
        apg.set_context(ctx)
        got = (ctx.to_x0(apg.forward(cond, uncond).pred).double() - ctx.to_x0(cond).double()) / (w - 1)
        running = (ctx.to_x0(cond) - ctx.to_x0(uncond)).double() + beta * running
        assert torch.allclose(got, running, rtol=1e-4, atol=1e-4), step


def test_paper_update_and_diffusers_default_differ_by_the_parallel_part():
    cond, uncond = _preds()
    w = 7.5
    ours = _apg(guidance_scale=w, eta=0.0, norm_threshold=0.0, momentum=0.0, space="model_output").forward(cond, uncond).pred
    theirs = normalized_guidance(cond, uncond, w, None, eta=0.0, norm_threshold=0.0, use_original_formulation=False)
    delta = (cond - uncond).double()
    parallel = (_flat_dot(delta, cond) / _norm(cond) ** 2).view(-1, 1, 1, 1) * cond.double()
    assert torch.allclose((ours - theirs).double(), parallel, atol=1e-5)
    assert _norm(parallel).min() > 1e-2


def test_model_output_space_matches_diffusers_original_formulation_over_steps():
    w, r, beta = 6.0, 3.0, -0.5
    apg = APG(w, eta=0.0, norm_threshold=r, momentum=beta, space="model_output")
    buffer = MomentumBuffer(beta)
    g = torch.Generator().manual_seed(5)
    for step in range(4):
        cond, uncond = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
        apg.set_state(step, 4, torch.tensor(999))
        ref = normalized_guidance(cond, uncond, w - 1, buffer, 0.0, r, use_original_formulation=True)
        assert torch.allclose(apg.forward(cond, uncond).pred, ref, atol=1e-5)


def test_no_context_falls_back_to_model_output_with_one_warning():
    cond, uncond = _preds()
    apg = APG(5.0)
    ref = APG(5.0, space="model_output")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(2):
            apg.set_state(step, 2, torch.tensor(999))
            ref.set_state(step, 2, torch.tensor(999))
            assert torch.equal(apg.forward(cond, uncond).pred, ref.forward(cond, uncond).pred)
    assert sum("StepContext" in str(w.message) for w in caught) == 1


def test_half_precision_inputs_are_computed_in_float32():
    ctx = _context("epsilon")
    cond, uncond = _preds()
    out16 = _apg(context=ctx, guidance_scale=9.0).forward(cond.half(), uncond.half()).pred
    out32 = _apg(context=ctx, guidance_scale=9.0).forward(cond.half().float(), uncond.half().float()).pred
    assert out16.dtype == torch.float16
    assert torch.equal(out16, out32.half())


def test_zero_conditional_prediction_and_zero_alpha_stay_finite():
    cond, uncond = torch.zeros(SHAPE), torch.randn(SHAPE)
    assert torch.isfinite(_apg(guidance_scale=5.0, space="model_output").forward(cond, uncond).pred).all()
    ctx = StepContext(torch.randn(SHAPE), torch.tensor(0.0), torch.tensor(1.0), "epsilon")  # zero terminal SNR
    cond, uncond = _preds()
    assert torch.isfinite(_apg(context=ctx, guidance_scale=5.0).forward(cond, uncond).pred).all()


def test_generations_do_not_leak_momentum_and_config_round_trips(tmp_path):
    pipe = tiny_pipeline("sd")
    apg = APG(12.0, norm_threshold=2.0, momentum=-0.5)
    run = from_pipe(pipe, guidance=apg)
    kw = dict(num_inference_steps=3, output_type="latent")
    first = run("a red cat", generator=torch.Generator().manual_seed(0), **kw).images
    second = run("a red cat", generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(first, second)
    apg.save_pretrained(tmp_path)
    loaded = APG.from_pretrained(tmp_path)
    public = lambda g: {k: v for k, v in g.config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded) == public(apg)
    assert loaded.new(guidance_scale=3.0).norm_threshold == 2.0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="space"):
        APG(5.0, space="eps")
    with pytest.raises(ValueError, match="momentum"):
        APG(5.0, momentum=float("nan"))


def test_get_guidance_parses_cli_strings():
    apg = get_guidance("apg", guidance_scale="12", momentum="-0.25", norm_threshold="4", space="x0")
    assert isinstance(apg, APG) and apg.guidance_scale == 12.0 and apg.momentum == -0.25 and apg.norm_threshold == 4.0
    assert isinstance(get_guidance("CFG", guidance_scale="5", stop="0.5"), CFG)
    with pytest.raises(ValueError, match="valid options"):
        get_guidance("apg", beta="0.5")
    with pytest.raises(ValueError, match="unknown guidance"):
        get_guidance("pag")


@pytest.mark.skipif(not os.environ.get("DIFFPLUG_SLOW_TESTS"), reason="torch.compile takes ~1 min on CPU; set DIFFPLUG_SLOW_TESTS=1")
def test_compiled_update_matches_eager():
    ctx = _context("epsilon")
    eager, compiled = APG(12.0, norm_threshold=0.5), APG(12.0, norm_threshold=0.5, compile=True)
    for step in range(3):
        cond, uncond = _preds(seed=30 + step)
        outs = []
        for guider in (eager, compiled):
            guider.set_state(step, 3, torch.tensor(999))
            guider.set_context(ctx)
            outs.append(guider.forward(cond, uncond).pred)
        assert torch.allclose(outs[0], outs[1], atol=1e-5)
