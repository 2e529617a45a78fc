"""The few-step testbed model: a stock StableDiffusionPipeline with LCMScheduler whose UNet takes the
guidance scale as an input; the 4-step alignment goal; diffplug's loop runs it exactly as the stock
pipeline (one network call per step); the CLI names; the distillation's pieces."""

from __future__ import annotations

import pytest
import torch

from diffplug import testbed
from diffplug.testbed import data as D

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pipe():
    p = testbed.load("sd-lcm")
    p.set_progress_bar_config(disable=True)
    return p


def test_stock_pipeline_with_lcm_scheduler_and_record(pipe):
    import json

    from diffusers import LCMScheduler, StableDiffusionPipeline

    assert type(pipe) is StableDiffusionPipeline and type(pipe.scheduler) is LCMScheduler
    assert pipe.unet.config.time_cond_proj_dim == 256
    record = json.loads((testbed.WEIGHTS_DIR / "unet_lcm.record.json").read_text())
    assert record["teacher"] == "unet" and record["steps"] > 0 and record["w_range"] == [2.0, 8.0]


def test_four_steps_align_at_least_80_percent(pipe):
    labels = torch.arange(20) % 10
    prompts = [D.prompt_for_class(int(k)) for k in labels]
    images = pipe(prompts, num_inference_steps=4, generator=torch.manual_seed(0), output_type="pt").images
    with torch.no_grad():
        acc = (testbed.load_classifier()(images).argmax(-1) == labels).float().mean().item()
    assert acc >= 0.8, acc


def test_diffplug_loop_equals_stock_pipeline(pipe):
    from diffplug.guidance import APG
    from diffplug.pipelines import from_pipe

    prompts = ["a photo of a sneaker", "a photo of a bag"]
    stock = pipe(prompts, num_inference_steps=2, guidance_scale=5.0, generator=torch.manual_seed(1), output_type="pt").images
    run = from_pipe(pipe)(prompts, num_inference_steps=2, guidance_scale=5.0, generator=torch.manual_seed(1), output_type="pt")
    assert torch.equal(run.images, stock) and run.nfe == 2  # one conditional call per step
    other = pipe(prompts, num_inference_steps=2, guidance_scale=2.0, generator=torch.manual_seed(1), output_type="pt").images
    assert not torch.equal(other, stock)  # the scale is a real input
    with pytest.raises(ValueError, match="guidance-distilled"):
        from_pipe(pipe, guidance=APG(guidance_scale=5.0))(prompts, num_inference_steps=2)


def test_model_names():
    from diffusers import LCMScheduler

    from diffplug.finetune.model import DiffusionModel, load_pipeline
    from diffplug.pipelines.registry import BUILTIN_MODELS

    assert "testbed-lcm" in BUILTIN_MODELS
    pipe = load_pipeline("testbed:sd-lcm")
    assert type(pipe.scheduler) is LCMScheduler
    model = DiffusionModel(pipe, guidance_scale=4.0)
    cond = model.encode_prompts(["a photo of a bag"], 32)
    want = pipe.get_guidance_scale_embedding(torch.tensor([3.0]), embedding_dim=256)
    assert torch.allclose(cond["timestep_cond"], want)
    with pytest.raises(Exception, match="guidance_scale"):
        DiffusionModel(pipe).encode_prompts(["a"], 32)
    with pytest.raises(ValueError, match="sd-lcm"):
        testbed.load("lcm")


def test_distillation_pieces():
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from diffplug.testbed import models as M
    from diffplug.testbed.train import boundary, guidance_embedding

    w = torch.tensor([2.0, 7.5])
    assert torch.equal(guidance_embedding(w), StableDiffusionPipeline.get_guidance_scale_embedding(None, w - 1, 256))
    sched = LCMScheduler(**M.LCM_CONFIG)
    x, eps = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    assert torch.allclose(boundary(sched, x, torch.tensor([0, 0]), eps), x)  # f(x, 0) = x
    out = boundary(sched, x, torch.tensor([999, 999]), eps)
    abar = sched.alphas_cumprod[999]
    assert torch.allclose(out, (x - (1 - abar).sqrt() * eps) / abar.sqrt(), atol=1e-3)  # ~ x0 at high noise
