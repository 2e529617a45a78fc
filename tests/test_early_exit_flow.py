"""DeeDiff early exit on the rectified-flow transformers: Flux (double- then single-stream blocks) and
SD3 (joint blocks). Threshold 0 is the wrapped model bit for bit; exits are keyed on sigma (Flux
passes sigma, SD3 sigma * 1000); exited rows skip later blocks and equal running alone; the stock
pipelines and diffplug's loop run with it; ``finetune deediff`` runs on the generic model side
(``DiffusionModel``: the same noisy inputs, conditions and family model call as every method, PixArt too),
trains heads (and the backbone), resumes bit for bit and refuses the UNet families."""

import shutil

import pytest
import torch
from diffusers import ChromaTransformer2DModel, FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel
from safetensors.torch import load_file

from diffplug.pipelines import from_pipe
from diffplug.samplers import EarlyExit
from diffplug.testing import tiny_pipeline

SIGMAS = torch.linspace(0.95, 0.05, 6)  # three rows above sigma 0.5, three below


def _flux(guidance: bool = True, double: int = 2, single: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=double, num_single_layers=single, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6),
    ).eval()


def _chroma(seed: int = 0):
    torch.manual_seed(seed)
    return ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6), approximator_num_channels=16, approximator_hidden_dim=32,
        approximator_layers=1,
    ).eval()


def _sd3(layers: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=layers, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=8,
    ).eval()


def _flux_inputs(guidance: bool = True, batch: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    kw = dict(
        hidden_states=torch.randn(batch, 16, 16, generator=g),  # 4x4 packed latents of 4 channels
        encoder_hidden_states=torch.randn(batch, 5, 32, generator=g),
        pooled_projections=torch.randn(batch, 32, generator=g),
        timestep=SIGMAS[:batch].clone(),  # Flux's timestep input is sigma
        img_ids=FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32),
        txt_ids=torch.zeros(5, 3),
    )
    if guidance:
        kw["guidance"] = torch.full((batch,), 3.5)
    return kw


def _chroma_inputs(batch: int = 6, seed: int = 1):
    kw = _flux_inputs(False, batch, seed)
    del kw["pooled_projections"]
    mask = torch.ones(batch, 5 + 16)  # text then image tokens, as ChromaPipeline masks them
    mask[::2, 3:5] = 0
    return {**kw, "attention_mask": mask}


def _sd3_inputs(batch: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(batch, 5, 32, generator=g),
        pooled_projections=torch.randn(batch, 32, generator=g),
        timestep=SIGMAS[:batch] * 1000,  # SD3's timestep input is sigma * 1000
    )


CASES = {
    "flux": (lambda: _flux(True), lambda **k: _flux_inputs(True, **k)),
    "flux-no-guidance": (lambda: _flux(False), lambda **k: _flux_inputs(False, **k)),
    "chroma": (_chroma, _chroma_inputs),
    "sd3": (_sd3, _sd3_inputs),
}


def _rows(kw: dict, i: int) -> dict:
    """Row ``i`` of a batch of forward arguments (ids and other shared inputs as they are)."""
    return {k: v[i : i + 1] if k not in ("img_ids", "txt_ids") else v for k, v in kw.items()}


def _block_rows(ee: EarlyExit) -> list[list[int]]:
    """Rows each block (Flux: double-stream, then single-stream) receives, by forward hooks."""
    rows = [[] for _ in ee.blocks]
    for i, block in enumerate(ee.blocks):
        block.register_forward_hook(  # double-stream blocks return (text, image); Chroma's single ones a tensor
            lambda m, args, out, i=i: rows[i].append((out[1] if isinstance(out, tuple) else out).shape[0]))
    return rows


def _split_by_sigma(ee: EarlyExit, layer: int) -> None:
    """UEM of ``layer`` (2 buckets): very certain for sigma < 0.5, very uncertain above."""
    with torch.no_grad():
        ee.uems[layer - 1].bias.copy_(torch.tensor([-6.0, 6.0]))


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_threshold_zero_is_the_wrapped_model_exactly(case):
    make, inputs = CASES[case]
    tr = make()
    ee = EarlyExit(tr, threshold=0.0)
    kw = inputs()
    assert torch.equal(ee(**kw).sample, tr(**kw).sample)
    assert torch.equal(ee(**kw, return_dict=False)[0], tr(**kw, return_dict=False)[0])
    n = ee.num_blocks
    assert n == (3 if case == "sd3" else 4)
    assert ee.stats()["exits_per_block"] == [0] * (n - 1) + [12]
    if case == "sd3":  # skip-layer guidance's argument is honoured
        assert torch.equal(ee(**kw, skip_layers=[1]).sample, tr(**kw, skip_layers=[1]).sample)
        assert not torch.equal(ee(**kw, skip_layers=[1]).sample, tr(**kw).sample)


@pytest.mark.parametrize("case", ["flux", "sd3"])
@torch.no_grad()
def test_threshold_one_exits_after_block_one_through_norm_out_and_proj_out(case):
    make, inputs = CASES[case]
    tr = make()
    ee = EarlyExit(tr, threshold=1.0)  # untrained UEMs give u = 0.5 < 1
    rows = _block_rows(ee)
    kw = inputs()
    out = ee(**kw).sample
    assert rows == [[6]] + [[]] * (ee.num_blocks - 1)
    assert ee.stats()["blocks_executed"] == 6 and ee.stats()["exits_per_block"][0] == 6
    # a fresh head is the model's own final layer (norm_out: adaLN on temb, then proj_out) on block 1's image tokens
    p = ee.embed(**kw)
    p.rows["ctx"], p.x = ee.blocks[0](hidden_states=p.x, encoder_hidden_states=p.rows["ctx"], temb=p.rows["temb"],
                                      **({"image_rotary_emb": p.shared["image_rotary_emb"]} if case == "flux" else {}))
    tokens = tr.proj_out(tr.norm_out(p.x, p.rows["temb"]))
    expected = tokens if case == "flux" else tokens.reshape(6, 4, 4, 2, 2, 4).permute(0, 5, 1, 3, 2, 4).reshape(6, 4, 8, 8)
    assert torch.equal(out, expected)
    assert out.shape == tr(**kw).sample.shape


@torch.no_grad()
def test_chroma_heads_read_the_image_tail_of_the_joined_sequence():
    tr = _chroma()
    ee = EarlyExit(tr, threshold=1.0)
    kw = _chroma_inputs()
    p = ee.embed(**kw)
    for i in range(3):  # two double-stream blocks, then the first single-stream one
        ee.trunk.block(i, ee.blocks[i], p)
    assert p.x.shape[1] == 5 + 16 and ee.trunk.image(p).shape[1] == 16
    assert torch.equal(ee.head(3, p), tr.proj_out(tr.norm_out(p.x[:, 5:], p.rows["temb"][:, -2:])))


@pytest.mark.parametrize("case,layer,expect_rows", [
    ("flux", 3, [[6], [6], [6], [3]]),  # exits after the first single-stream block
    ("flux", 1, [[6], [3], [3], [3]]),  # after the first double-stream block
    ("chroma", 3, [[6], [6], [6], [3]]),  # Chroma's single-stream blocks run on [text, image] joined
    ("chroma", 2, [[6], [6], [3], [3]]),
    ("sd3", 1, [[6], [3], [3]]),
])
@torch.no_grad()
def test_exits_keyed_on_sigma_skip_compute_and_match_running_alone(case, layer, expect_rows):
    make, inputs = CASES[case]
    ee = EarlyExit(make(), uem_buckets=2, threshold=0.5)
    _split_by_sigma(ee, layer)
    rows = _block_rows(ee)
    kw = inputs()
    out = ee(**kw).sample
    assert rows == expect_rows  # the three rows at sigma < 0.5 left after `layer`, whatever the raw timestep scale
    exits = [0] * ee.num_blocks
    exits[layer - 1], exits[-1] = 3, 3
    assert ee.stats()["exits_per_block"] == exits
    alone = torch.cat([ee(**_rows(kw, i)).sample for i in range(6)])
    torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)
    full = ee.transformer(**kw).sample
    torch.testing.assert_close(out[:3], full[:3], atol=1e-5, rtol=1e-5)  # uncertain rows ran every block
    assert not torch.allclose(out[3:], full[3:], atol=1e-3)


@pytest.mark.parametrize("case", ["flux", "chroma", "sd3"])
def test_training_view_under_gradient_checkpointing_gives_the_same_gradients(case):
    from diffplug.finetune.deediff import deediff_loss

    make, inputs = CASES[case]
    grads = []
    for checkpointing in (False, True):
        ee = EarlyExit(make())
        if checkpointing:
            ee.transformer.enable_gradient_checkpointing()
        calls = [0] * ee.num_blocks
        for i, block in enumerate(ee.blocks):
            block.register_forward_pre_hook(lambda m, args, i=i: calls.__setitem__(i, calls[i] + 1))
        kw = inputs()
        preds, us = ee(**kw, return_all_exits=True)
        target = torch.randn_like(preds[-1], generator=torch.Generator().manual_seed(0))
        deediff_loss(preds, us, target, patch=getattr(ee.config, "patch_size", 1))[0].backward()
        grads.append({n: p.grad for n, p in ee.named_parameters() if p.grad is not None})
        assert calls == [2 if checkpointing else 1] * ee.num_blocks  # recomputed in backward
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("transformer.") for n in grads[0])
    for n, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][n], rtol=1e-5, atol=1e-6, msg=n)


def test_heads_round_trip_and_another_models_heads(tmp_path):
    ee = EarlyExit(_flux(), uem_buckets=2)
    with torch.no_grad():
        ee.heads[2].scale_shift_table.add_(0.1)
        ee.uems[1].token.add_(0.2)
    path = ee.save_heads(tmp_path / "flux.safetensors")
    again = EarlyExit(_flux(), heads=path, threshold=0.3)
    for k, v in ee.heads_state().items():
        assert torch.equal(v, again.heads_state()[k]), k
    assert again.heads_config()["uem_key"] == "sigma" and again.heads_config()["num_double_layers"] == 2
    with pytest.raises(ValueError, match="flux.safetensors: was trained for another model.*SD3Transformer2DModel"):
        EarlyExit(_sd3(), heads=path)
    with pytest.raises(ValueError, match="num_double_layers 2 != 1"):
        EarlyExit(_flux(double=1, single=3), heads=path)  # as many blocks, another split


def test_attach_without_heads_on_a_flow_model_says_to_train_them():
    from diffplug.samplers.early_exit import attach

    pipe = tiny_pipeline("flux")
    original = pipe.transformer
    with pytest.raises(ValueError, match="no --early-exit-heads given.*FluxTransformer2DModel.*finetune deediff"):
        attach(pipe, 0.2)
    assert pipe.transformer is original


def test_refuses_controlnet_residuals_with_the_reason():
    ee = EarlyExit(_sd3())
    kw = _sd3_inputs()
    with pytest.raises(ValueError, match="block_controlnet_hidden_states not supported"):
        ee(**kw, block_controlnet_hidden_states=[torch.zeros(6, 16, 16)])


CALL = dict(prompt=["a cat", "a dog"], num_inference_steps=3, output_type="latent", max_sequence_length=32)


@pytest.mark.parametrize("family", ["sd3", "flux", "chroma"])
@torch.no_grad()
def test_stock_pipeline_and_diffplug_loop(family):
    pipe = tiny_pipeline(family)
    call = dict(CALL, **({"guidance_scale": 4.0} if family == "sd3" else {}))
    stock = pipe(**call, generator=torch.manual_seed(0)).images
    loop = from_pipe(pipe)(**call, generator=torch.manual_seed(0)).images
    original = pipe.transformer
    pipe.transformer = EarlyExit(original, threshold=0.0)
    assert pipe.transformer.config is original.config and pipe.transformer.dtype == original.dtype
    assert torch.equal(pipe(**call, generator=torch.manual_seed(0)).images, stock)
    assert torch.equal(from_pipe(pipe)(**call, generator=torch.manual_seed(0)).images, loop)
    pipe.transformer.threshold = 1.0  # every row exits after block 1 (of 2)
    pipe.transformer.reset_stats()
    out = from_pipe(pipe)(**call, generator=torch.manual_seed(0)).images
    rows = 2 * 3 * (1 if family == "flux" else 2)  # SD3 and Chroma run CFG's two passes; Flux-dev one (the embedding)
    assert pipe.transformer.stats()["exits_per_block"] == [rows, 0]
    assert torch.isfinite(out).all() and not torch.equal(out, loop)


# -- finetune deediff on the flow transformers ----------------------------------------------------------


def _train(out, model: str, **kw):
    from diffplug.finetune.deediff import DeeDiff, DeeDiffConfig
    from diffplug.finetune.trainer import Trainer

    base = dict(output_dir=str(out), model=model, max_steps=4, checkpoint_every=2, log_every=1, train_batch_size=4,
                learning_rate=1e-2, lr_warmup_steps=0, lr_scheduler="constant", tensorboard=False, seed=0)
    Trainer(DeeDiff(DeeDiffConfig(**{**base, **kw}))).train()
    return out


def _logs(run):
    import json

    return [json.loads(line) for line in (run / "logs.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory):
    torch.set_num_threads(1)
    return _train(tmp_path_factory.mktemp("deediff") / "flux", "tiny:flux", train_backbone=True)


def test_deediff_trains_flux_heads_and_backbone(flux_run):
    logs = _logs(flux_run)
    assert [r["step"] for r in logs] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["l_u"], r["l_ual"]])).all() for r in logs)
    assert logs[-1]["loss"] < logs[0]["loss"]
    pipe = tiny_pipeline("flux")
    heads = flux_run / "final" / "early_exit.safetensors"
    ee = EarlyExit(pipe.transformer, heads=heads, threshold=0.5)
    assert ee.heads_config()["model_class"] == "FluxTransformer2DModel"
    assert any(v.abs().sum() > 0 for k, v in ee.uems.state_dict().items() if k.endswith("token"))  # UEMs start at 0
    trained = load_file(str(flux_run / "final" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(v, pipe.transformer.state_dict()[k]) for k, v in trained.items())  # the backbone moved
    pipe.transformer = ee
    with torch.no_grad():
        out = from_pipe(pipe)(**CALL, generator=torch.manual_seed(0))
    assert torch.isfinite(out.images).all() and ee.stats()["rows"] == 6


def test_deediff_flux_resume_is_bit_identical(tmp_path, flux_run):
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(flux_run / "checkpoint-2", out / "checkpoint-2")
    _train(out, "tiny:flux", train_backbone=True, resume="latest")
    for name in ("early_exit.safetensors", "transformer/diffusion_pytorch_model.safetensors"):
        a, b = load_file(str(flux_run / "final" / name)), load_file(str(out / "final" / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


def _setup(out, model: str, **kw):
    """A deediff trainer on ``model``, set up (model, module, data) but not run."""
    from diffplug.finetune.deediff import DeeDiff, DeeDiffConfig
    from diffplug.finetune.trainer import Trainer

    method = DeeDiff(DeeDiffConfig(output_dir=str(out), model=model, max_steps=1, tensorboard=False, seed=0, **kw))
    trainer = Trainer(method)
    trainer._setup()
    return trainer, method


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_deediff_inputs_and_model_call_are_the_generic_model_sides(tmp_path, family):
    """For the same per-sample generators, deediff's x_t, t, target and conditions are DiffusionModel's
    (the draws of every method: flow models' logit-normal sigma, SFT's posterior sample, encode_prompts),
    and its last exit is the backbone called through the family adapter (DiffusionModel.predict)."""
    from diffplug.finetune import data as D
    from diffplug.finetune.sft import encode_targets

    torch.set_num_threads(1)
    trainer, method = _setup(tmp_path / "run", f"tiny:{family}", prompt_dropout=0.5)
    model = trainer.model
    batch = trainer.collate([trainer.dataset[i] for i in (0, 7, 3000, 9000)])
    batch["positions"] = torch.tensor([5, 6, 7, 8])
    x_t, t, target, cond = method.inputs(trainer, batch)

    gens = D.generators(0, batch["positions"])
    pick, drop = D.rand(gens), D.rand(gens) < 0.5
    captions = ["" if d else cs[int(r * len(cs))] for cs, r, d in zip(batch["captions"], pick.tolist(), drop.tolist())]
    assert "" in captions and any(captions)  # both kinds in this batch
    x0 = encode_targets(trainer, batch["images"].float() / 127.5 - 1, gens, random_flip=False)
    t_model = model.sample_timesteps(gens)
    x_model, target_model = model.noisy(x0, D.randn(gens, model.latent_shape(32)), t_model)
    assert torch.equal(t, t_model) and torch.equal(x_t, x_model) and torch.equal(target, target_model)
    expected = model.encode_prompts(captions, 32)
    assert cond.keys() == expected.keys() and all(torch.equal(cond[k], expected[k]) for k in cond)
    if family == "flux":  # Flux-dev's guidance embedding: the stock default, as encode_prompts gives it
        assert torch.equal(cond["guidance"], torch.full((4,), 3.5))
    if model.is_flow:  # not the paper's uniform integer t
        assert not torch.equal(t, t.round())

    with torch.no_grad():
        exits = trainer.predict(trainer.unet, x_t, t, cond).chunk(method.exits.num_blocks)
        backbone = model.predict(model.unet, x_t, t, cond)
    assert len(method.exits.__dict__.pop("uncertainties")) == method.exits.num_blocks - 1
    assert exits[-1].shape == target.shape  # PixArt's learned-sigma half dropped by the family adapter
    torch.testing.assert_close(exits[-1], backbone, rtol=0, atol=1e-6)
    assert not torch.allclose(exits[0], backbone, atol=1e-4)  # block 1's head is another prediction


def test_deediff_uniform_timesteps_on_a_flow_model(tmp_path):
    """timesteps=uniform: the paper's t ~ U{0..999} on a flow model (sigma = t / 1000)."""
    from diffplug.finetune import data as D

    torch.set_num_threads(1)
    trainer, method = _setup(tmp_path / "run", "tiny:sd3", timesteps="uniform")
    gens = D.generators(0, range(64))
    t = method.timesteps(trainer.model, gens)
    assert torch.equal(t, D.randint(D.generators(0, range(64)), 0, 1000).float())
    assert not torch.equal(t, trainer.model.sample_timesteps(D.generators(0, range(64))))


def test_deediff_refuses_unet_families_and_other_sizes(tmp_path, capsys):
    from diffplug.finetune.cli import main

    for family in ("sd", "sdxl"):
        assert main(["deediff", "--model", f"tiny:{family}", "--output_dir", str(tmp_path / family), "--max_steps", "1"]) == 2
        err = capsys.readouterr().err
        assert "is not supported by this method; it runs on pixart, sd3, flux, chroma" in err, err
    assert main(["deediff", "--model", "tiny:flux", "--output_dir", str(tmp_path / "size"), "--max_steps", "1",
                 "--resolution", "64"]) == 2
    assert "resolution: data=testbed holds 32 px images; pass --resolution 32" in capsys.readouterr().err


def test_deediff_trains_chroma_heads(tmp_path):
    torch.set_num_threads(1)
    run = _train(tmp_path / "chroma", "tiny:chroma", checkpoint_every=0, max_steps=3)
    logs = _logs(run)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logs) and logs[-1]["loss"] < logs[0]["loss"]
    ee = EarlyExit(tiny_pipeline("chroma").transformer, heads=run / "final" / "early_exit.safetensors")
    assert ee.heads_config()["model_class"] == "ChromaTransformer2DModel"


def test_deediff_trains_sd3_heads(tmp_path):
    torch.set_num_threads(1)
    run = _train(tmp_path / "sd3", "tiny:sd3", checkpoint_every=0, uem_buckets=4)
    logs = _logs(run)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logs) and logs[-1]["loss"] < logs[0]["loss"]
    pipe = tiny_pipeline("sd3")
    ee = EarlyExit(pipe.transformer, heads=run / "final" / "early_exit.safetensors", threshold=0.5)
    assert ee.uems[0].bias.shape == (4,) and ee.heads_config()["uem_key"] == "sigma"
    assert not (run / "final" / "transformer").exists()  # frozen backbone: heads only
