"""The shared loop against the stock pipelines it stands in for."""

import warnings

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.guiders import ClassifierFreeGuidance

from diffplug.guidance import CFG, Guidance
from diffplug.pipelines import from_pipe
from diffplug.testing import tiny_pipeline

warnings.filterwarnings("ignore")

PROMPTS = ["a cat", "a photo of a sneaker"]
NEGATIVE = ["blurry", ""]


@pytest.fixture(scope="module")
def pipes():
    out = {f: tiny_pipeline(f) for f in ("sd", "sdxl", "flow", "pixart")}
    for p in out.values():
        p.set_progress_bar_config(disable=True)
    return out


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


class CallCounter:
    """Counts the denoiser's forward calls and the samples they carry."""

    def __init__(self, module):
        self.calls = self.samples = 0
        module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        self.calls += 1
        self.samples += x.shape[0]


FAMILY_KWARGS = {"pixart": dict(max_sequence_length=32, use_resolution_binning=False, clean_caption=False)}


@pytest.mark.parametrize("family", ["sd", "sdxl", "flow", "pixart"])
def test_cfg_reproduces_the_stock_pipeline(pipes, family):
    pipe = pipes[family]
    kw = dict(num_inference_steps=4, guidance_scale=5.0, negative_prompt=NEGATIVE, output_type="latent")
    kw.update(FAMILY_KWARGS.get(family, {}))
    stock = pipe(PROMPTS, generator=_gen(), **kw).images
    ours = from_pipe(pipe)(PROMPTS, generator=_gen(), **kw).images
    assert ours.shape == stock.shape
    assert (ours - stock).abs().max() <= 1e-6


@pytest.mark.parametrize("scheduler_cls", [UniPCMultistepScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_swapped_scheduler_reproduces_the_stock_pipeline_and_swaps_back(pipes, scheduler_cls):
    pipe = pipes["sd"]
    original = pipe.scheduler
    try:
        pipe.scheduler = scheduler_cls.from_config(original.config)
        kw = dict(num_inference_steps=5, guidance_scale=3.0, output_type="latent")
        stock = pipe(PROMPTS, generator=_gen(1), **kw).images
        ours = from_pipe(pipe)(PROMPTS, generator=_gen(1), **kw).images
        assert (ours - stock).abs().max() <= 1e-6
        back = DDIMScheduler.from_config(pipe.scheduler.config)
        assert back.config.beta_schedule == original.config.beta_schedule
        assert back.config.num_train_timesteps == original.config.num_train_timesteps
    finally:
        pipe.scheduler = original


@pytest.mark.parametrize("family", ["sd", "sdxl", "flow", "pixart"])
def test_decoded_images_match_the_stock_pipeline(pipes, family):
    pipe = pipes[family]
    kw = dict(num_inference_steps=3, output_type="np", **FAMILY_KWARGS.get(family, {}))
    stock = pipe(PROMPTS[0], generator=_gen(), **kw).images
    ours = from_pipe(pipe)(PROMPTS[0], generator=_gen(), **kw).images
    assert ours.shape == stock.shape == (1, 32, 32, 3)
    assert abs(ours - stock).max() <= 1e-5
    kw["output_type"] = "pil"
    pil = from_pipe(pipe)(PROMPTS[0], generator=_gen(), **kw).images
    assert pil[0].size == (32, 32)


@pytest.mark.parametrize("family", ["sd", "flow"])
def test_one_condition_guidance_halves_the_network_work(pipes, family):
    pipe = pipes[family]
    counter = CallCounter(pipe.unet if family == "sd" else pipe.transformer)
    steps = 6
    full = from_pipe(pipe, guidance=CFG(4.0))(PROMPTS, num_inference_steps=steps, output_type="latent")
    calls, samples = counter.calls, counter.samples
    assert calls == steps, "both condition passes run in one batched call per step"
    assert samples == 2 * len(PROMPTS) * steps
    assert full.nfe == 2 * steps

    counter.calls = counter.samples = 0
    cond_only = from_pipe(pipe, guidance=CFG(1.0))(PROMPTS, num_inference_steps=steps, output_type="latent")
    assert counter.calls == steps and counter.samples == samples // 2
    assert cond_only.nfe == steps

    counter.calls = counter.samples = 0
    cut = from_pipe(pipe, guidance=CFG(4.0, stop=0.5))(PROMPTS, num_inference_steps=steps, output_type="latent")
    assert counter.samples == len(PROMPTS) * (2 * 3 + 3)
    assert cut.nfe == 9


def test_guidance_scale_one_equals_conditional_only_sampling(pipes):
    pipe = pipes["sd"]
    stock = pipe(PROMPTS, num_inference_steps=3, guidance_scale=1.0, generator=_gen(), output_type="latent").images
    ours = from_pipe(pipe)(PROMPTS, num_inference_steps=3, guidance_scale=1.0, generator=_gen(), output_type="latent")
    assert (ours.images - stock).abs().max() <= 1e-6


def test_guidance_scale_argument_overrides_a_copy_not_the_object(pipes):
    guidance = CFG(3.0)
    run = from_pipe(pipes["sd"], guidance=guidance)
    a = run(PROMPTS, num_inference_steps=3, guidance_scale=6.0, generator=_gen(), output_type="latent").images
    b = from_pipe(pipes["sd"], guidance=CFG(6.0))(PROMPTS, num_inference_steps=3, generator=_gen(), output_type="latent").images
    assert torch.equal(a, b)
    assert guidance.guidance_scale == 3.0


def test_diffusers_guiders_run_unchanged(pipes):
    """A diffusers guider (not a diffplug one) runs pass by pass, with its model hooks."""
    pipe = pipes["sdxl"]
    kw = dict(num_inference_steps=3, output_type="latent")
    ours = from_pipe(pipe, guidance=CFG(4.0))(PROMPTS, generator=_gen(), **kw).images
    theirs = from_pipe(pipe, guidance=ClassifierFreeGuidance(guidance_scale=4.0))(PROMPTS, generator=_gen(), **kw).images
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-4)  # batched vs one pass at a time


def test_callback_can_replace_latents(pipes):
    seen = []

    def callback(pipe, i, t, kwargs):
        seen.append(i)
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == 2 else {}

    out = from_pipe(pipes["sd"])(PROMPTS[0], num_inference_steps=3, output_type="latent", callback_on_step_end=callback)
    assert seen == [0, 1, 2]
    assert torch.count_nonzero(out.images) == 0


def test_guidance_gets_the_step_context(pipes):
    """x0-space methods receive the model input and noise level; x0 from it is the scheduler's."""

    class Probe(CFG):
        def forward(self, pred_cond, pred_uncond=None):
            self.seen.append((self._context, pred_cond))
            return super().forward(pred_cond, pred_uncond)

    probe = Probe(3.0)
    probe.seen = []
    pipe = pipes["sd"]
    from_pipe(pipe, guidance=probe)(PROMPTS[0], num_inference_steps=3, output_type="latent")
    assert len(probe.seen) == 3
    for step, (ctx, eps) in enumerate(probe.seen):
        ac = pipe.scheduler.alphas_cumprod[pipe.scheduler.timesteps[step]].float()
        x0_table = (ctx.sample - (1 - ac).sqrt() * eps) / ac.sqrt()
        assert torch.allclose(ctx.to_x0(eps), x0_table, atol=1e-5)


def test_clear_errors(pipes):
    with pytest.raises(ValueError, match="prompt"):
        from_pipe(pipes["sd"])(num_inference_steps=2)
    with pytest.raises(TypeError, match="supported"):
        from_pipe(object())


def test_guidance_config_round_trips(tmp_path):
    guidance = CFG(5.5, stop=0.6)
    guidance.save_pretrained(tmp_path)
    loaded = CFG.from_pretrained(tmp_path)
    assert (loaded.guidance_scale, loaded._stop) == (5.5, 0.6)
    assert guidance.new().guidance_scale == 5.5  # positional args survive from_config
    assert isinstance(loaded, Guidance)
