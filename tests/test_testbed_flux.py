"""The rectified-flow testbed model: ``testbed.load("flux")`` is a stock FluxPipeline that computes what
the transformer was trained on (text contract, sigma schedule), exports and reloads offline, and its
weights are recorded like the other testbed weights."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from diffplug import testbed
from diffplug.testbed import models as M

PROMPTS = ["a photo of a bag", "a photo of a sneaker"]


@pytest.fixture(scope="module")
def flux():
    pipe = testbed.load("flux")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, steps: int = 2, **kwargs):
    kwargs = dict(
        num_inference_steps=steps,
        max_sequence_length=pipe.tokenizer_2.model_max_length,
        height=32,
        width=32,
        negative_prompt=["", ""],
        true_cfg_scale=3.0,
        generator=torch.Generator().manual_seed(1),
    ) | kwargs
    return pipe(PROMPTS, **kwargs)


def test_load_is_a_stock_flux_pipeline(flux):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    assert type(flux) is FluxPipeline and type(flux.transformer) is FluxTransformer2DModel
    assert type(flux.scheduler) is FlowMatchEulerDiscreteScheduler
    cfg = flux.transformer.config
    assert cfg.num_layers + cfg.num_single_layers >= 8 and not cfg.guidance_embeds
    assert flux.text_encoder is flux.text_encoder_2 and type(flux.text_encoder).__name__ == "BertModel"
    images = _call(flux, output_type="pt").images
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    # the loaded pipeline's default size is the trained 32x32 (FluxPipeline's own default is 256)
    latents = flux(PROMPTS[0], num_inference_steps=1, max_sequence_length=20, output_type="latent").images
    assert latents.shape == (1, 64, 16)


def test_pipeline_runs_the_trained_flow(flux):
    """Two Euler steps written out by hand with the training code's text encoding and sigma input
    (v = eps - x0, x' = x + (sigma' - sigma) v, CFG on v) equal the stock pipeline's packed latents:
    the unshifted sigmas, the timestep scaling and the text contract are what training used."""
    from diffusers import FluxPipeline

    steps, w = 2, 3.0
    got = _call(flux, steps=steps, output_type="latent", true_cfg_scale=w).images
    enc, tok = flux.text_encoder, flux.tokenizer_2
    emb, pooled = M.encode_flux_text(enc, tok, PROMPTS + ["", ""])
    x = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(1))
    x = FluxPipeline._pack_latents(x, 2, 4, 16, 16)
    img_ids = FluxPipeline._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32)
    txt_ids = torch.zeros(emb.shape[1], 3)
    sigmas = [1.0, 0.5, 0.0]  # linspace(1, 1/N, N) then 0: shift 1 at 64 image tokens
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            v = flux.transformer(hidden_states=torch.cat([x, x]), timestep=torch.full((4,), s), pooled_projections=pooled,
                                 encoder_hidden_states=emb, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
            v_c, v_u = v.chunk(2)
            x = x + (s_next - s) * (v_u + w * (v_c - v_u))
    torch.testing.assert_close(got, x, atol=1e-4, rtol=1e-4)


def test_text_contract(flux):
    """The trained length is tokenizer_2.model_max_length; FluxPipeline's default (512) gives other
    embeddings (MiniLM runs with no mask), so every call passes max_sequence_length explicitly."""
    record = json.loads((M.WEIGHTS_DIR / "flux.record.json").read_text())
    length = flux.tokenizer_2.model_max_length
    assert length == flux.tokenizer.model_max_length == M.FLUX_TEXT_LENGTH == record["text_length"]
    trained, pooled_trained = M.encode_flux_text(flux.text_encoder, flux.tokenizer_2, PROMPTS)
    with torch.no_grad():
        emb, pooled, _ = flux.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=length)
        emb_512, pooled_512, _ = flux.encode_prompt(PROMPTS, prompt_2=None)
    torch.testing.assert_close(emb, trained, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, pooled_trained, atol=1e-5, rtol=0)
    assert emb_512.shape[1] == 512
    # the real tokens' embeddings move with the padding: a different conditioning, not just longer
    drift = (emb_512[:, :length] - emb).norm(dim=-1) / emb.norm(dim=-1)
    assert drift.mean() > 0.05, drift


def test_diffplug_encodes_at_the_trained_length_by_default(flux):
    """from_pipe without max_sequence_length gives the stock pipeline's output *with* the trained length:
    diffplug's Flux family reads tokenizer_2.model_max_length where the stock default (512) would not."""
    from diffplug.pipelines import from_pipe

    kw = dict(num_inference_steps=2, height=32, width=32, output_type="latent", negative_prompt=["", ""], true_cfg_scale=3.0)
    ours = from_pipe(flux)(PROMPTS, generator=torch.Generator().manual_seed(1), **kw).images
    stock = flux(PROMPTS, generator=torch.Generator().manual_seed(1), max_sequence_length=20, **kw).images
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=0)


def test_scheduler_shift_is_the_trained_one(flux):
    """FluxPipeline computes mu from the image-token count at every call; the scheduler must give the
    trained shift (FLOW_SHIFT, here 1: sigmas unchanged) at 32x32 and at any other size."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cfg = flux.scheduler.config
    base = np.linspace(1.0, 1 / 8, 8)
    for tokens in (64, 256, 4096):
        mu = calculate_shift(tokens, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
        flux.scheduler.set_timesteps(sigmas=base, mu=mu)
        s = M.FLOW_SHIFT
        want = s * base / (1 + (s - 1) * base)
        np.testing.assert_allclose(flux.scheduler.sigmas[:-1].numpy(), want, atol=1e-6)
    record = json.loads((M.WEIGHTS_DIR / "flux.record.json").read_text())
    assert record["shift"] == M.FLOW_SHIFT and record["scheduler"] == M.FLOW_SCHEDULER_CONFIG


def test_record_and_weights_follow_the_conventions():
    from safetensors import safe_open

    path = M.WEIGHTS_DIR / "flux.safetensors"
    assert path.stat().st_size <= 8 * 2**20
    with safe_open(str(path), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    config = json.loads((M.WEIGHTS_DIR / "flux.json").read_text())
    assert {k: config[k] for k in M.FLUX_CONFIG} == {k: list(v) if isinstance(v, tuple) else v for k, v in M.FLUX_CONFIG.items()}
    record = json.loads((M.WEIGHTS_DIR / "flux.record.json").read_text())
    runs = [record] + record.get("resumed_from", [])
    for run in runs:
        assert run["command"].startswith("python -m diffplug.testbed.train flux ")
        assert run["minutes"] > 0 and run["steps"] > 0 and len(run["loss_curve"]) >= 1
        assert run["seed"] == 0 and run["prompt_dropout"] == 0.1
        assert "logit-normal" in run["sigma_sampling"] and "eps - x0" in run["objective"]
    steps = [s for s, _, _ in record["loss_curve"]]
    assert steps == sorted(steps)
    first = runs[-1]  # the run from scratch: the loss fell from the untrained ~2.6 (Var(eps - x0) ~ 2)
    assert first["final_loss"] < first["loss_curve"][0][2] - 0.3


def test_export_round_trip(flux, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline, FluxPipeline

    from diffplug.testbed import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    target = tmp_path / "testbed-flux"
    args = parser.parse_args(["testbed", "export", str(target), "--model", "flux"])
    assert args.func(args) == 0

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = DiffusionPipeline.from_pretrained(target, local_files_only=True)
    assert type(loaded) is FluxPipeline
    assert loaded.tokenizer_2.model_max_length == flux.tokenizer_2.model_max_length
    loaded.set_progress_bar_config(disable=True)
    a = _call(flux, output_type="pt").images
    b = _call(loaded, output_type="pt").images
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_unknown_name_is_refused():
    with pytest.raises(ValueError, match="flux"):
        testbed.load("fluxx")
