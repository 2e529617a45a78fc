"""diffplug guidance inside diffusers' modular SDXL pipeline, built offline from tiny parts.

The modular denoise block drives a guider as ``set_state -> prepare_inputs -> one UNet call per
batch -> guider(batches)``; it never calls ``set_context`` and ignores ``rows``.
"""

import warnings

import pytest
import torch
from diffusers import AdaptiveProjectedGuidance, ClassifierFreeGuidance
from diffusers.modular_pipelines.stable_diffusion_xl import StableDiffusionXLAutoBlocks

from diffplug.guidance import APG, CFG, AdaptiveGuidance, LinearAG
from diffplug.testing import tiny_pipeline

STEPS = 2


@pytest.fixture(scope="module")
def modular():
    parts = tiny_pipeline("sdxl")
    pipe = StableDiffusionXLAutoBlocks().init_pipeline()
    pipe.update_components(
        unet=parts.unet, vae=parts.vae, text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2,
        tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2, scheduler=parts.scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    rows = []
    pipe.unet.register_forward_pre_hook(lambda m, args, kwargs: rows.append(args[0].shape[0]), with_kwargs=True)
    pipe.rows = rows
    return pipe


def _run(pipe, guider, prompts=("a cat",)):
    pipe.update_components(guider=guider)
    pipe.rows.clear()
    latents = pipe(prompt=list(prompts), num_inference_steps=STEPS, height=32, width=32,
                   generator=torch.Generator().manual_seed(0), output="latents")
    return latents, sum(pipe.rows)


def test_diffplug_cfg_equals_diffusers_cfg(modular):
    ref, ref_rows = _run(modular, ClassifierFreeGuidance(guidance_scale=5.0))
    ours, rows = _run(modular, CFG(5.0))
    assert torch.equal(ours, ref)
    assert rows == ref_rows == 2 * STEPS
    cut, cut_rows = _run(modular, CFG(5.0, stop=0.5))  # fixed cut-off: guided for int(0.5 * 2) = 1 step
    assert cut_rows == 2 + (STEPS - 1)
    assert not torch.equal(cut, ref)


def test_apg_falls_back_to_model_output_and_matches_diffusers(modular):
    w, r, beta = 8.0, 2.0, -0.5
    ref, _ = _run(modular, AdaptiveProjectedGuidance(
        guidance_scale=w - 1, adaptive_projected_guidance_momentum=beta, adaptive_projected_guidance_rescale=r,
        eta=0.0, use_original_formulation=True,
    ))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours, rows = _run(modular, APG(w, eta=0.0, norm_threshold=r, momentum=beta))
    assert any("StepContext" in str(c.message) for c in caught)
    assert rows == 2 * STEPS
    assert torch.allclose(ours, ref, atol=1e-5)


def test_adaptive_guidance_runs_and_skips_unconditional_passes(modular):
    prompts = ("a cat", "a dog")
    ref, ref_rows = _run(modular, CFG(6.0), prompts)
    never, never_rows = _run(modular, AdaptiveGuidance(6.0, threshold=1.0), prompts)
    assert torch.equal(never, ref) and never_rows == ref_rows == 2 * 2 * STEPS
    ag = AdaptiveGuidance(6.0, threshold=0.5, policy="all")  # the tiny UNet's γ is ~0.99 from the start
    out, rows = _run(modular, ag, prompts)
    ks = ag.switch_steps
    assert all(k is not None for k in ks)
    assert rows == 2 * (STEPS + max(ks) + 1) < ref_rows
    per = AdaptiveGuidance(6.0, threshold=0.5, policy="per_sample")  # rows are ignored here: same result
    out_per, _ = _run(modular, per, prompts)
    assert torch.equal(out_per, out)


def test_linear_ag_runs(modular):
    lag = LinearAG(6.0, coefficients=[None, [0.0, 0.0, 1.0, 0.0]])
    _, rows = _run(modular, lag)
    assert rows == 2 * STEPS - 1
