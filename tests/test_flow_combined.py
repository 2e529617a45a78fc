"""APG + Adaptive Guidance + DC-Solver in one ``from_pipe`` call (benchmarks/flow_combined.py) on tiny:flux:
it runs, saves network calls against CFG at the same steps, and each part at its identity setting gives
back what it replaces."""

import sys
from pathlib import Path

import pytest
import torch
from diffplug.guidance import CFG, AdaptiveAPG, AdaptiveGuidance
from diffplug.pipelines import from_pipe
from diffplug.samplers import DCSolverScheduler
from diffplug.testing import tiny_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

STEPS, W = 5, 4.0
PROMPTS = ["a photo of a sneaker", "an emoji of red apple"]
APG_IDENTITY = dict(eta=1.0, norm_threshold=0.0, momentum=0.0)  # APG's update is then CFG's, bit for bit
NEVER = 1.0  # AG's γ̄ >= 1: never switches, every step runs both passes


@pytest.fixture(scope="module")
def pipe():
    p = tiny_pipeline("flux")
    p.set_progress_bar_config(disable=True)
    return p


def run(pipe, guidance, scheduler=None, prompts=PROMPTS):
    original = pipe.scheduler
    pipe.scheduler = scheduler or original
    try:
        out = from_pipe(pipe, guidance=guidance)(
            prompts, num_inference_steps=STEPS, negative_prompt="", output_type="latent",
            max_sequence_length=pipe.tokenizer_2.model_max_length, generator=torch.Generator().manual_seed(0),
        )
    finally:
        pipe.scheduler = original
    return out.images, out.nfe


def dc(pipe, ratios):
    return DCSolverScheduler.from_config(pipe.scheduler.config, dc_ratios=ratios)


def test_combined_call_runs_and_saves_network_calls(pipe):
    ratios = [1.0, 1.0, 0.9, 1.1, 0.95]  # a compensation that changes the trajectory
    cfg, cfg_nfe = run(pipe, CFG(W), dc(pipe, ratios))
    # γ̄ = -1: every image switches after the first CFG step, then conditional passes only
    combined = AdaptiveAPG(W, threshold=-1.0, eta=0.0, norm_threshold=1.0, momentum=-0.5)
    out, nfe = run(pipe, combined, dc(pipe, ratios))
    assert torch.isfinite(out).all()
    assert cfg_nfe == 2 * STEPS and nfe == STEPS + 1 < cfg_nfe
    assert combined.switch_steps == [0, 0]
    assert not torch.allclose(out, cfg, atol=1e-4)
    # the DC-Solver's ratios are used (not a silent fallback to UniPC) inside the same call
    plain, _ = run(pipe, AdaptiveAPG(W, threshold=-1.0, eta=0.0, norm_threshold=1.0, momentum=-0.5), dc(pipe, None))
    assert not torch.allclose(out, plain, atol=1e-5)


def test_identity_settings_give_cfg_with_euler_exactly(pipe):
    euler = pipe.scheduler
    cfg, cfg_nfe = run(pipe, CFG(W), euler)
    same, nfe = run(pipe, AdaptiveAPG(W, threshold=NEVER, **APG_IDENTITY), euler)
    assert nfe == cfg_nfe and torch.equal(same, cfg)
    # and with the DC-Solver at rho = 1 in the same call: CFG with that scheduler, exactly
    ones = [1.0] * STEPS
    cfg_dc, _ = run(pipe, CFG(W), dc(pipe, ones))
    same_dc, _ = run(pipe, AdaptiveAPG(W, threshold=NEVER, **APG_IDENTITY), dc(pipe, ones))
    assert torch.equal(same_dc, cfg_dc)


@pytest.mark.parametrize("change", [dict(eta=0.0), dict(norm_threshold=0.5), dict(momentum=-0.5)])
def test_each_apg_setting_off_identity_changes_the_result(pipe, change):
    """The identity comparison above can fail: each APG setting away from it moves the output."""
    cfg, _ = run(pipe, CFG(W))
    out, _ = run(pipe, AdaptiveAPG(W, threshold=NEVER, **{**APG_IDENTITY, **change}))
    assert (out - cfg).abs().max() > 1e-5


def test_images_switching_at_different_steps_match_adaptive_guidance(pipe):
    """With APG at its identity, the combined guidance is AG (policy "all") exactly, also while one image
    of the call has switched and the other has not (switched images take the conditional prediction)."""
    recorder = AdaptiveGuidance(W, threshold=2.0)  # never switches: records γ_t of both images
    run(pipe, recorder)
    gammas = recorder.gammas(STEPS)  # (steps, images)
    step = next(k for k in range(STEPS) if abs(gammas[k, 0] - gammas[k, 1]) > 1e-4)
    threshold = float(gammas[step].mean())  # between the two images' γ at that step
    ag = AdaptiveGuidance(W, threshold, policy="all")
    expected, expected_nfe = run(pipe, ag)
    combined = AdaptiveAPG(W, threshold=threshold, **APG_IDENTITY)
    out, nfe = run(pipe, combined)
    assert combined.switch_steps == ag.switch_steps and len(set(ag.switch_steps)) == 2  # one switched first
    assert nfe == expected_nfe and torch.allclose(out, expected, atol=1e-6, rtol=0)


def test_adaptive_apg_is_a_named_guidance_that_round_trips(tmp_path):
    from diffplug.guidance import get_guidance

    g = get_guidance("apg-ag", guidance_scale="3", threshold="0.99", momentum="-0.25")
    assert isinstance(g, AdaptiveAPG) and g.apg.guidance_scale == 3.0 and g.apg.momentum == -0.25
    g.save_pretrained(tmp_path)
    again = AdaptiveAPG.from_pretrained(tmp_path)
    assert dict(again.config) == dict(g.config) and again.threshold == 0.99


def test_eta_on_a_pipeline_without_eta_is_refused():
    pipe = tiny_pipeline("flux")
    with pytest.raises(ValueError, match="eta=1.0: FluxPipeline takes no eta"):
        from_pipe(pipe)("a sneaker", num_inference_steps=2, height=32, width=32, eta=1.0, output_type="latent")
