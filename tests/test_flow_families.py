"""Flow-matching pipeline families (Flux, Chroma) against the stock diffusers pipelines, and Flux's two
guidance scales (the embedding and the second pass)."""

import warnings

import pytest
import torch

from diffplug.guidance import CFG
from diffplug.pipelines import family_of, from_pipe
from diffplug.testing import tiny_pipeline

PROMPTS = ["a cat", "a photo of a sneaker"]
NEGATIVE = ["blurry", "dark"]
KW = dict(num_inference_steps=3, output_type="latent", max_sequence_length=32)


@pytest.fixture(scope="module")
def pipes():
    out = {f: tiny_pipeline(f) for f in ("flux", "flux-schnell", "chroma")}
    for p in out.values():
        p.set_progress_bar_config(disable=True)
    return out


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _both(pipe, run=None, **kw):
    stock = pipe(PROMPTS, generator=_gen(), **KW, **kw).images
    ours = (run or from_pipe(pipe))(PROMPTS, generator=_gen(), **KW, **kw)
    return stock, ours


def test_tiny_pipelines_are_the_stock_classes(pipes):
    from diffusers import ChromaPipeline, FluxPipeline

    assert isinstance(pipes["flux"], FluxPipeline) and pipes["flux"].transformer.config.guidance_embeds
    assert not pipes["flux-schnell"].transformer.config.guidance_embeds
    assert isinstance(pipes["chroma"], ChromaPipeline)
    # 4 VAE latent channels packed 2x2 -> the transformer's 16 input channels
    assert pipes["flux"].transformer.config.in_channels == 4 * pipes["flux"].vae.config.latent_channels
    assert pipes["flux"].scheduler.config.use_dynamic_shifting
    assert type(tiny_pipeline("flow")).__name__ == type(tiny_pipeline("sd3")).__name__ == "StableDiffusion3Pipeline"
    with pytest.raises(ValueError, match="flux"):
        tiny_pipeline("flux3")


@pytest.mark.parametrize("family", ["flux", "flux-schnell"])
@pytest.mark.parametrize("true_cfg", [False, True])
def test_flux_reproduces_the_stock_pipeline_exactly(pipes, family, true_cfg):
    """Packed latents as the stock pipeline returns them, bit for bit: embedding on/off, true CFG on/off."""
    extra = dict(negative_prompt=NEGATIVE, true_cfg_scale=3.0) if true_cfg else {}
    stock, ours = _both(pipes[family], **extra)
    assert stock.shape == ours.images.shape == (2, 64, 16)
    assert torch.equal(ours.images, stock)
    assert ours.nfe == 3 * (2 if true_cfg else 1)


@pytest.mark.parametrize("family", ["flux", "chroma"])
def test_decoded_images_match_the_stock_pipeline(pipes, family):
    kw = dict(num_inference_steps=2, output_type="np", max_sequence_length=32)
    stock = pipes[family]("a cat", generator=_gen(), **kw).images
    ours = from_pipe(pipes[family])("a cat", generator=_gen(), **kw).images
    assert ours.shape == stock.shape == (1, 32, 32, 3)
    assert abs(ours - stock).max() == 0.0
    # a non-square size unpacks with the size it was generated at
    kw.update(height=32, width=64)
    stock = pipes[family]("a cat", generator=_gen(), **kw).images
    ours = from_pipe(pipes[family])("a cat", generator=_gen(), **kw).images
    assert ours.shape == stock.shape == (1, 32, 64, 3) and abs(ours - stock).max() == 0.0


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_chroma_reproduces_the_stock_pipeline_exactly(pipes, guidance_scale):
    stock, ours = _both(pipes["chroma"], negative_prompt=NEGATIVE, guidance_scale=guidance_scale)
    assert torch.equal(ours.images, stock)
    default_stock, default_ours = _both(pipes["chroma"])  # stock default: w = 5, negative ""
    assert torch.equal(default_ours.images, default_stock) and default_ours.nfe == 6


def test_flux_schedule_is_the_stock_one(pipes):
    """sigmas linear 1 -> 1/n, dynamic shift mu from the packed token count, timestep input t/1000."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    pipe = pipes["flux"]
    family = family_of(pipe)
    latents = family.prepare_latents(1, 32, 32, _gen(), None)
    steps, n = family.timesteps(4, latents=latents)
    mu = calculate_shift(64, 256, 4096, 0.5, 1.15)
    sigma = torch.linspace(1.0, 0.25, 4, dtype=torch.float64)
    shifted = torch.exp(torch.tensor(mu)) / (torch.exp(torch.tensor(mu)) + (1 / sigma - 1))
    assert n == 4 and torch.allclose(steps.double() / 1000, shifted, atol=1e-6)
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k["timestep"].clone()), with_kwargs=True)
    try:
        from_pipe(pipe)("a cat", num_inference_steps=4, output_type="latent", max_sequence_length=32)
    finally:
        hook.remove()
    assert torch.allclose(torch.stack([s[0] for s in seen]).double(), shifted, atol=1e-6)


def test_flux_refuses_what_the_stock_pipeline_cannot_take(pipes):
    run = from_pipe(pipes["flux"])
    with pytest.raises(ValueError, match="sigmas"):
        run("a cat", timesteps=[999, 500], **KW)
    with pytest.raises(ValueError, match="multiple of 4"):
        run("a cat", height=30, **KW)
    with pytest.raises(ValueError, match=r"\(1, 64, 16\)"):
        run("a cat", latents=torch.zeros(1, 4, 16, 16), **KW)
    with pytest.raises(ValueError, match="true_cfg_scale"):
        run("a cat", true_cfg_scale=float("nan"), **KW)


# -- two guidance scales, pinned (issue 23 item 2) ----------------------------------------------------
def test_guidance_scale_is_the_embedding(pipes):
    pipe = pipes["flux"]
    stock, ours = _both(pipe, guidance_scale=6.0)
    assert torch.equal(ours.images, stock) and ours.nfe == 3  # no second pass
    other = from_pipe(pipe)(PROMPTS, generator=_gen(), guidance_scale=1.5, **KW).images
    assert not torch.allclose(other, ours.images), "the embedding must reach the model"


def test_guidance_object_runs_the_second_pass_with_the_embedding_in_both(pipes):
    pipe = pipes["flux"]
    stock, ours = _both(pipe, run=from_pipe(pipe, guidance=CFG(3.0)), negative_prompt=NEGATIVE, guidance_scale=5.0)
    want = pipe(PROMPTS, generator=_gen(), negative_prompt=NEGATIVE, true_cfg_scale=3.0, guidance_scale=5.0, **KW).images
    assert torch.equal(ours.images, want) and ours.nfe == 6
    assert not torch.equal(ours.images, stock)  # stock without true_cfg_scale: one pass
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k["guidance"].clone()), with_kwargs=True)
    try:
        from_pipe(pipe, guidance=CFG(3.0))(PROMPTS, negative_prompt=NEGATIVE, guidance_scale=5.0, **KW)
    finally:
        hook.remove()
    assert len(seen) == 3 and all(torch.equal(g, torch.full((4,), 5.0)) for g in seen)  # both passes, batched
    # true_cfg_scale with a guidance object: a copy of it at that scale (the object keeps its own)
    guidance = CFG(2.0)
    a = from_pipe(pipe, guidance=guidance)(PROMPTS, generator=_gen(), negative_prompt=NEGATIVE, true_cfg_scale=3.0, **KW)
    b = from_pipe(pipe, guidance=CFG(3.0))(PROMPTS, generator=_gen(), negative_prompt=NEGATIVE, **KW)
    assert torch.equal(a.images, b.images) and guidance.guidance_scale == 2.0


def test_no_negative_prompt_uses_the_empty_prompt_and_says_so_once(pipes):
    pipe = pipes["flux"]
    run = from_pipe(pipe, guidance=CFG(3.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = run(PROMPTS, generator=_gen(), **KW).images
        run(PROMPTS, generator=_gen(), **KW)
    said = [w for w in caught if "empty prompt" in str(w.message)]
    assert len(said) == 1 and "FluxPipeline" in str(said[0].message)
    want = pipe(PROMPTS, generator=_gen(), negative_prompt=["", ""], true_cfg_scale=3.0, **KW).images
    assert torch.equal(ours, want)
    # stock true_cfg_scale without a negative prompt: the stock pipeline ignores it; diffplug runs "" and says so
    with pytest.warns(UserWarning, match="empty prompt"):
        stock_way = from_pipe(pipe)(PROMPTS, generator=_gen(), true_cfg_scale=3.0, **KW).images
    assert torch.equal(stock_way, want)


def test_a_scale_the_model_cannot_use_is_refused_or_said(pipes):
    schnell = pipes["flux-schnell"]
    for run in (from_pipe(schnell), from_pipe(schnell, guidance=CFG(3.0))):
        with pytest.raises(ValueError, match=r"FluxPipeline \(flux\).*guidance_embeds=False"):
            run("a cat", guidance_scale=3.5, **KW)
    with pytest.warns(UserWarning, match="negative_prompt is unused"):
        out = from_pipe(pipes["flux"])(PROMPTS, generator=_gen(), negative_prompt=NEGATIVE, **KW)
    assert out.nfe == 3
    # schnell's second pass works: CFG through the guidance object
    stock = schnell(PROMPTS, generator=_gen(), negative_prompt=NEGATIVE, true_cfg_scale=4.0, **KW).images
    ours = from_pipe(schnell, guidance=CFG(4.0))(PROMPTS, generator=_gen(), negative_prompt=NEGATIVE, **KW).images
    assert torch.equal(ours, stock)


def test_chroma_guidance_scale_is_cfg(pipes):
    """No embedding: guidance_scale is the second pass's w, as ChromaPipeline's."""
    pipe = pipes["chroma"]
    a = from_pipe(pipe)(PROMPTS, generator=_gen(), guidance_scale=3.0, **KW)
    b = from_pipe(pipe, guidance=CFG(1.0))(PROMPTS, generator=_gen(), guidance_scale=3.0, **KW)
    assert torch.equal(a.images, b.images) and a.nfe == 6
    with pytest.raises(ValueError, match="true_cfg_scale"):
        from_pipe(pipe)("a cat", true_cfg_scale=2.0, **KW)


# -- a third family: Z-Image (its own combination, w = 1 + s) -----------------------------------------
ZKW = dict(KW, height=32, width=32)


@pytest.fixture(scope="module")
def zimage():
    pipe = tiny_pipeline("zimage")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _copy(kw):  # ZImagePipeline rewrites the prompt lists it is given (chat template): hand it copies
    return {k: list(v) if isinstance(v, list) else v for k, v in kw.items()}


@pytest.mark.parametrize("extra", [
    {},
    dict(negative_prompt=NEGATIVE, guidance_scale=3.0),
    dict(guidance_scale=0.0),
    dict(cfg_normalization=0.5, negative_prompt=NEGATIVE),
    dict(cfg_truncation=0.3, cfg_normalization=True),
], ids=["default", "negative", "s0", "normalised", "truncated"])
def test_zimage_reproduces_the_stock_pipeline_exactly(zimage, extra):
    stock = zimage(list(PROMPTS), generator=_gen(), **ZKW, **_copy(extra)).images
    ours = from_pipe(zimage)(list(PROMPTS), generator=_gen(), **ZKW, **_copy(extra))
    assert torch.equal(ours.images, stock)
    passes = {"s0": 3, "truncated": 5}.get  # truncation: the last step's 1 - σ = 0.4 > 0.3 runs one pass
    key = "s0" if extra.get("guidance_scale") == 0.0 else "truncated" if "cfg_truncation" in extra else None
    assert ours.nfe == (passes(key) if key else 6)


def test_zimage_decodes_and_combines_its_own_way(zimage):
    kw = dict(ZKW, output_type="np", num_inference_steps=2)
    assert abs(from_pipe(zimage)("a cat", generator=_gen(), **kw).images - zimage("a cat", generator=_gen(), **kw).images).max() == 0.0
    plain = from_pipe(zimage)(list(PROMPTS), generator=_gen(), **ZKW).images
    capped = from_pipe(zimage)(list(PROMPTS), generator=_gen(), cfg_normalization=0.5, **ZKW).images
    assert not torch.allclose(plain, capped), "the norm cap must engage at 0.5 x |pos|"
    # Z-Image's s is CFG's w - 1 (same maths, another order of operations)
    w = from_pipe(zimage, guidance=CFG(6.0))(list(PROMPTS), generator=_gen(), **ZKW).images
    assert torch.allclose(w, plain, atol=1e-4) and not torch.equal(w, plain)
    copy = from_pipe(zimage, guidance=CFG(2.0))(list(PROMPTS), generator=_gen(), guidance_scale=5.0, **ZKW).images
    assert torch.equal(copy, w)  # guidance_scale = s -> the object's copy at w = 1 + s
    with pytest.raises(ValueError, match=r"ZImagePipeline \(zimage\): cfg_normalization"):
        from_pipe(zimage, guidance=CFG(2.0))("a cat", cfg_normalization=True, **ZKW)


@torch.no_grad()
def test_zimage_velocity_is_the_flow_convention(zimage):
    """The family's model output is ε − x0 (the stock loop negates the transformer's), so every
    x0-space method (x0 = x − σ v, predictions.py) and the scheduler's Euler
    direction is the stock one."""
    family = family_of(zimage)
    x = torch.randn(1, 4, 16, 16, generator=_gen(3))
    cond = {k: v[0] for k, v in family.encode(prompt=["a cat"], max_sequence_length=32).items()}
    t = torch.tensor(600.0)
    raw = zimage.transformer([x.unsqueeze(2)[0]], (1000 - t.expand(1)) / 1000, [cond["cap_feats"][0][: int(cond["cap_lengths"][0])]],
                             return_dict=False)[0][0]
    assert torch.equal(family.model(x, t, **cond), -raw.float().squeeze(1).unsqueeze(0))


# -- built-in model names (issue 23 item 4) -----------------------------------------------------------
def test_builtin_model_names_have_two_spellings(tmp_path, monkeypatch):
    from diffplug.pipelines.registry import BUILTIN_MODELS, canonical_model, load_pipeline

    for a, b in [("tiny:sd", "tiny-sd"), ("tiny:flux", "tiny-flux"), ("testbed:dit", "testbed-dit"),
                 ("testbed:sd", "testbed"), ("testbed:sd-lcm", "testbed-lcm"), ("tiny:flow", "tiny-flow")]:
        assert canonical_model(a) == canonical_model(b) == b and b in BUILTIN_MODELS
    assert canonical_model("org/name") is None and canonical_model("./folder") is None
    from diffplug.pipelines.registry import builtin_model

    assert builtin_model("tiny:flux") == builtin_model("tiny-flux") == ("tiny", "flux")
    assert builtin_model("testbed") == builtin_model("testbed:sd") == ("testbed", "sd")
    assert builtin_model("testbed-lcm") == ("testbed", "sd-lcm") and builtin_model("testbed:dit") == ("testbed", "dit")
    assert builtin_model("org/name") is None
    with pytest.raises(ValueError, match="tiny:nope: no built-in model.*tiny-flux"):
        canonical_model("tiny:nope")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-mine").mkdir()
    assert canonical_model("tiny-mine") is None  # an existing folder of that name is a folder
    for name, cls in [("tiny:flux", "FluxPipeline"), ("tiny-chroma", "ChromaPipeline"), ("tiny-sd3", "StableDiffusion3Pipeline")]:
        assert type(load_pipeline(name, "cpu")).__name__ == cls


def test_sample_runs_tiny_flux(tmp_path):
    import json

    from diffplug.cli import main

    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["sample", "--model", "tiny-flux", "--prompt", "a cat", "--steps", "2", "--device", "cpu",
                     "--out", str(out)]) == 0
    assert json.loads((out / "settings.json").read_text())["pipeline"] == "FluxPipeline"


def test_x0_space_guidance_on_flux_uses_x_minus_sigma_v(pipes):
    """APG/AG see x0 = x − σ v (predictions.py) with σ = t / 1000 of Flux's shifted schedule."""

    class Probe(CFG):
        def forward(self, pred_cond, pred_uncond=None):
            self.seen.append((self._context, self._timestep, pred_cond))
            return super().forward(pred_cond, pred_uncond)

    probe = Probe(3.0)
    probe.seen = []
    from_pipe(pipes["flux"], guidance=probe)("a cat", negative_prompt="blurry", **KW)
    assert len(probe.seen) == 3
    for ctx, t, v in probe.seen:
        sigma = t.float() / 1000
        assert ctx.prediction_type == "flow" and torch.allclose(ctx.sigma, sigma)
        assert torch.allclose(ctx.to_x0(v), ctx.sample - sigma * v, atol=1e-6)


def test_flux_without_dynamic_shifting(pipes):
    """FLUX.1-schnell's scheduler (shift 1, no dynamic shifting): the stock pipeline passes mu anyway and
    FlowMatchEuler ignores it; diffplug passes it only to schedulers that shift with it (DPM-Solver-style
    ones assert on an unused mu)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffplug.samplers import DCDPMSolverScheduler

    pipe = pipes["flux-schnell"]
    original = pipe.scheduler
    try:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
        stock, ours = _both(pipe)
        assert torch.equal(ours.images, stock)
        pipe.scheduler = DCDPMSolverScheduler.from_config(pipe.scheduler.config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = from_pipe(pipe)(PROMPTS, generator=_gen(), **KW).images
        assert torch.isfinite(out).all() and not torch.allclose(out, stock)
    finally:
        pipe.scheduler = original


@torch.no_grad()
def test_flux_inputs_beyond_prompts(pipes):
    pipe = pipes["flux"]
    # one negative prompt for a list of prompts: one per prompt (the stock pipeline would batch it once)
    ours = from_pipe(pipe)(PROMPTS, negative_prompt="blurry", true_cfg_scale=3.0, generator=_gen(), **KW).images
    stock = pipe(PROMPTS, negative_prompt=["blurry"] * 2, true_cfg_scale=3.0, generator=_gen(), **KW).images
    assert torch.equal(ours, stock)
    # precomputed embeddings, with the empty negative prompt built per row
    embeds, pooled, _ = pipe.encode_prompt(PROMPTS, max_sequence_length=32)
    with pytest.warns(UserWarning, match="empty prompt"):
        out = from_pipe(pipe, guidance=CFG(3.0))(prompt_embeds=embeds, pooled_prompt_embeds=pooled, generator=_gen(), **KW)
    assert torch.equal(out.images, pipe(PROMPTS, negative_prompt=["", ""], true_cfg_scale=3.0, generator=_gen(), **KW).images)
    # decode unpacks latents of another run's (square) size, and says what to pass when it cannot tell
    run = from_pipe(pipe)
    big = run("a cat", height=64, width=64, generator=_gen(), **KW).images
    run("a cat", generator=_gen(), **KW)
    assert run.family.decode(big, "np")[0].shape == (1, 64, 64, 3)
    with pytest.raises(ValueError, match="size=\\(height, width\\)"):
        run.family.decode(big[:, :32], "np")


# -- a fourth family: Qwen-Image (passes apart, each its own text length; per-token norm rescale) ------
@pytest.fixture(scope="module")
def qwen():
    pipe = tiny_pipeline("qwenimage")
    pipe.set_progress_bar_config(disable=True)
    return pipe


QKW = dict(num_inference_steps=3, output_type="latent")


@pytest.mark.parametrize("extra, passes", [
    ({}, 1),  # stock default true_cfg_scale 4, but no negative prompt: one pass
    (dict(negative_prompt=NEGATIVE), 2),
    (dict(negative_prompt=["blurry", "a much longer negative prompt"], true_cfg_scale=2.5), 2),
    (dict(negative_prompt=NEGATIVE, true_cfg_scale=1.0), 1),
], ids=["default", "negative", "longer-negative", "w1"])
def test_qwenimage_reproduces_the_stock_pipeline_exactly(qwen, extra, passes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = qwen(list(PROMPTS), generator=_gen(), **QKW, **_copy(extra)).images
        ours = from_pipe(qwen)(list(PROMPTS), generator=_gen(), **QKW, **_copy(extra))
    assert torch.equal(ours.images, stock) and ours.nfe == 3 * passes


def test_qwenimage_decodes_and_combines_its_own_way(qwen):
    from diffplug.guidance.stock import QwenImageCFG

    kw = dict(num_inference_steps=2, output_type="np")
    assert abs(from_pipe(qwen)("a cat", generator=_gen(), **kw).images - qwen("a cat", generator=_gen(), **kw).images).max() == 0.0
    cond, uncond = torch.randn(2, 2, 64, 16, generator=_gen(1)).unbind(0)
    out = QwenImageCFG(3.0).forward(cond, uncond).pred
    assert torch.allclose(out.norm(dim=-1), cond.norm(dim=-1), atol=1e-5)  # each token at the conditional's norm
    combined = uncond + 3.0 * (cond - uncond)
    assert torch.allclose(out / out.norm(dim=-1, keepdim=True), combined / combined.norm(dim=-1, keepdim=True), atol=1e-5)
    # a guidance object runs the second pass; no negative prompt: the empty one, said once
    with pytest.warns(UserWarning, match="QwenImagePipeline: the second .* empty prompt"):
        plain = from_pipe(qwen, guidance=CFG(3.0))(list(PROMPTS), generator=_gen(), **QKW)
    assert plain.nfe == 6
    with pytest.raises(ValueError, match=r"QwenImagePipeline \(qwenimage\): guidance_scale=3.5 .*guidance_embeds=False"):
        from_pipe(qwen)("a cat", guidance_scale=3.5, **QKW)

