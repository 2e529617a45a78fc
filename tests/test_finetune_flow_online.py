"""SPO and FIND on flow models (tiny Flux, CPU): the online step on the model's own flow schedule,
spo-pm on the flow noise levels, a few SPO steps with exact mid-rollout resume and the output loading
with `diffplug sample --adapter`, FIND's packed-latent policy with the ODE / SDE rollout choice and exact
resume, and the refusals that name why. The SDE itself is tested on a Gaussian toy in test_flow_sde.py."""

from __future__ import annotations

import json
import math
import shutil
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from diffplug.finetune import ConfigError, Trainer, load_config
from diffplug.finetune.find import FIND, FINDConfig, load_noise_policy
from diffplug.finetune.logprob import FlowSDESampler, OnlineStep, ddim_step_with_logprob, flow_sde_step_with_logprob
from diffplug.finetune.model import DiffusionModel, FAMILIES, load_pipeline
from diffplug.finetune.spm import SPMConfig, SPMTraining, StepAwarePreferenceModel
from diffplug.finetune.spo import SPO, SPOConfig
from diffplug.testing import BrightnessBackbone

torch.set_num_threads(1)
REWARD, BACKBONE = "flow_online_scorers:brightness", "flow_online_scorers:bright"




@pytest.fixture(autouse=True)
def scorers(monkeypatch):
    mod = types.ModuleType("flow_online_scorers")
    mod.bright = BrightnessBackbone
    mod.brightness = lambda images, prompts: 100 * (images.float().mean(dim=(1, 2, 3)) - 0.468)
    monkeypatch.setitem(sys.modules, "flow_online_scorers", mod)


# -- the online step on a flow model's schedule ---------------------------------------------------------


def test_online_step_follows_the_flux_schedule_and_dispatches_per_family():
    pipe = load_pipeline("tiny:flux")
    model = DiffusionModel(pipe, FAMILIES)
    size = model.default_resolution()
    step = OnlineStep(model, 4, 0.7, size)
    # the stock FluxPipeline's schedule: sigmas linear 1 -> 1/4, dynamic shift from the packed token count
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    import numpy as np

    c = pipe.scheduler.config
    mu = calculate_shift(model.latent_shape(size)[0], c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    expected = pipe.scheduler.time_shift(mu, 1.0, torch.from_numpy(np.linspace(1.0, 0.25, 4)).float())
    torch.testing.assert_close(step.timesteps, 1000 * expected)
    assert step.sigmas[0] == 1 and step.sigmas[-1] == 0 and len(step.sigmas) == 5
    assert pipe.scheduler.sigmas is None or len(pipe.scheduler.timesteps) != 4  # the pipeline's own scheduler untouched
    # a step at each timestep is the flow SDE between that level and the next (the first one at sigma = 1)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, *model.latent_shape(size), generator=g), torch.randn(2, *model.latent_shape(size), generator=g)
    noise = torch.randn(x.shape, generator=g)
    for i in (0, 3):
        got = step(v, step.timesteps[i], x, noise=noise)
        want = flow_sde_step_with_logprob(v, step.sigmas[i], step.sigmas[i + 1], x, 0.7, noise=noise)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])
    per_sample = step(v, step.timesteps[[0, 3]], x, noise=noise)[1]  # one timestep per sample
    torch.testing.assert_close(per_sample[1], step(v, step.timesteps[3], x, noise=noise)[1][1])
    with pytest.raises(ValueError, match="not in this 4-step schedule"):
        step(v, torch.tensor(500.0), x)
    # a noise-prediction model keeps SPO's DDIM step
    sd = DiffusionModel(load_pipeline("tiny:sd"), FAMILIES)
    vp = OnlineStep(sd, 4, 1.0, 32)
    xs, es = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    t = vp.timesteps[1]
    torch.testing.assert_close(vp(es, t, xs, prev_sample=xs)[1], ddim_step_with_logprob(vp.scheduler, es, t, xs, 4, 1.0, prev_sample=xs)[1])


# -- SPO ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flow_pm(tmp_path_factory):
    """A step-aware preference model trained (one step, generated pairs) by spo-pm on tiny Flux."""
    out = tmp_path_factory.mktemp("pm")
    mod = types.ModuleType("flow_online_scorers")  # the module fixture runs before the autouse one
    mod.bright, mod.brightness = BrightnessBackbone, lambda images, prompts: 100 * (images.float().mean(dim=(1, 2, 3)) - 0.468)
    sys.modules["flow_online_scorers"] = mod
    cfg = load_config(SPMConfig, None, dict(
        output_dir=str(out), model="tiny:flux", backbone=BACKBONE, reward=REWARD, prompts=["a", "b"], num_per_prompt=2,
        generate_repeats=1, eval_repeats=1, generate_steps=2, max_steps=1, train_batch_size=2, checkpoint_every=0,
        tensorboard=False, log_every=1, learning_rate=1e-2,
    ))
    method = SPMTraining(cfg)
    trainer = Trainer(method)
    trainer.train()
    return out, trainer


def test_spo_pm_trains_on_the_flow_noise_levels(flow_pm, monkeypatch):
    out, trainer = flow_pm
    acc = json.loads((out / "final" / "stepwise_accuracy.json").read_text())
    assert set(acc) == {"0", "251", "501", "701", "951"}  # t = 1000 sigma on the flow path
    # the one-step prediction the SPM sees at t: x_sigma = (1 - sigma) x0 + sigma eps, x0_hat = x_sigma - sigma v
    model = trainer.model
    seen = {}
    real = model.predict

    def spy(unet, x, t, cond):
        seen["x"], seen["t"] = x, t
        return real(unet, x, t, cond)

    monkeypatch.setattr(model, "predict", spy)
    x0 = torch.randn(2, *model.latent_shape(trainer.resolution))
    gens = [torch.Generator().manual_seed(1)]
    trainer.method.predicted_x0(trainer, x0, gens, ["a"], torch.tensor([700]))
    eps = torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(seen["x"][:2], 0.3 * x0 + 0.7 * eps.expand_as(x0))
    assert seen["t"].tolist() == [700] * 4


def spo_config(out, pm, **kw):
    base = dict(output_dir=str(out), model="tiny:flux", preference_model=str(pm), reward=REWARD, backbone=BACKBONE,
                num_steps=3, divert_start_step=0, num_sample_each_step=2, threshold=0.0, train_batch_size=1,
                max_steps=2, checkpoint_every=0, log_every=1, tensorboard=False, prompts=["a", "b"], learning_rate=1e-3,
                guidance_scale=2.0)
    base.update(kw)
    return load_config(SPOConfig, None, base)


def test_spo_on_flux_resumes_exactly_mid_rollout_and_loads_with_sample_adapter(tmp_path, flow_pm, capsys):
    pm = flow_pm[0]
    kw = dict(transitions_per_step=1, max_steps=4, checkpoint_every=2, learning_rate=0.05)
    ref = tmp_path / "ref"
    method = SPO(spo_config(ref, pm, **kw))
    Trainer(method).train()
    # 3 steps from sigma = 1 (the first one too: a density at every step) -> 3 transitions per rollout
    # (the last step into sigma = 0 is stochastic on flow: no tie), one optimiser step each
    assert method.stats["rollouts"] == 2 and method.stats["valid"] == 6 and len(method.queue) == 2
    logs = [json.loads(line) for line in (ref / "logs.jsonl").read_text().splitlines()]
    assert abs(logs[0]["loss"] - math.log(2)) < 1e-5  # theta = ref at step 1
    tr = load_file(str(ref / "checkpoint-2" / "spo_rollout_0.safetensors"))
    assert tr["0.x_w"].shape == (1, 64, 16)  # packed latents; flow timesteps as floats (1000 sigma)
    assert tr["0.t"].dtype == torch.float32 and not torch.equal(tr["0.t"], tr["0.t"].round())
    res = tmp_path / "res"
    shutil.copytree(ref / "checkpoint-2", res / "checkpoint-2")
    shutil.copy(ref / "config.yaml", res / "config.yaml")
    Trainer(SPO(spo_config(res, pm, resume="latest", **kw))).train()
    a = load_file(str(ref / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(res / "final" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    from diffplug.cli import main

    base = ["sample", "--model", "tiny-flux", "--prompt", "a", "--steps", "2", "--seed", "3", "--device", "cpu"]
    assert main(base + ["--out", str(tmp_path / "base")]) == 0
    assert main(base + ["--adapter", str(ref / "final"), "--out", str(tmp_path / "tuned")]) == 0
    assert json.loads((tmp_path / "tuned" / "settings.json").read_text())["adapter"] == str(ref / "final")


# -- FIND --------------------------------------------------------------------------------------------------


def find_config(out, **kw):
    base = dict(output_dir=str(out), model="tiny:flux", reward=REWARD, prompts=["a cat", "a dog"], num_steps=3,
                guidance_scale=1.0, log_every=1, checkpoint_every=0, tensorboard=False, scheduler="flow-euler")
    return load_config(FINDConfig, None, {**base, **kw})


def test_find_on_flux_refuses_a_noise_prediction_sampler(tmp_path):
    with pytest.raises(ConfigError, match=r"scheduler: 'ddim' .* flow model: pass --scheduler auto"):
        Trainer(FIND(find_config(tmp_path / "o", scheduler="ddim"))).train()
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler"):
        from diffusers import DDIMScheduler

        FlowSDESampler(0.7).check_scheduler(DDIMScheduler())
    with pytest.raises(ValueError, match="noise_level must be > 0"):
        FlowSDESampler(0.0)


def test_find_policy_is_packed_and_the_ode_rollout_is_deterministic_given_z(tmp_path):
    results = {}
    for eta in (0.0, 0.7):
        method = FIND(find_config(tmp_path / f"o{eta}", eta=eta))
        trainer = Trainer(method)
        trainer._setup()
        policy = method._policy(trainer)
        assert tuple(policy.mean.shape) == (2, 64, 16)  # (prompts, tokens, 4C): Flux's packed latent
        z = policy.sample(torch.tensor([0]), [torch.Generator().manual_seed(0)])
        images = []
        for seed in (1, 2):  # the same z_T, different sampler noise
            gens = [torch.Generator().manual_seed(seed)]
            if method.sampler is not None:
                method.sampler.generators = gens
            out = method.run(["a cat"], latents=z.clone(), num_inference_steps=3, generator=gens, height=trainer.resolution,
                             width=trainer.resolution, output_type="pt")
            images.append(out.images)
        results[eta] = torch.equal(images[0], images[1])
    assert results == {0.0: True, 0.7: False}


def test_find_on_flux_sde_resumes_exactly_mid_rollout(tmp_path):
    kw = dict(max_steps=5, checkpoint_every=2, policy_steps=3, samples_per_prompt=2, train_batch_size=1, eta=0.7,
              learning_rate=0.05)
    ref = tmp_path / "ref"
    method = FIND(find_config(ref, **kw))
    Trainer(method).train()
    assert method.stats["rollouts"] == 2
    res = tmp_path / "res"
    shutil.copytree(ref / "checkpoint-2", res / "checkpoint-2")
    shutil.copy(ref / "config.yaml", res / "config.yaml")
    Trainer(FIND(find_config(res, resume="latest", **kw))).train()
    a, b = (load_file(str(d / "final" / "noise_policy.safetensors")) for d in (ref, res))
    for k in ("mean", "std"):
        assert torch.equal(a[k], b[k])
    assert a["mean"].abs().max() > 0
    policy = load_noise_policy(ref / "final" / "noise_policy.safetensors")
    assert policy.meta["eta"] == 0.7 and "flow SDE" in policy.meta["scheduler"]
    from diffplug.cli import main

    assert main(["sample", "--model", "tiny-flux", "--prompt", "a cat", "--steps", "2", "--device", "cpu",
                 "--noise-policy", str(ref / "final" / "noise_policy.safetensors"), "--out", str(tmp_path / "s")]) == 0


# -- every family the trainer runs ------------------------------------------------------------------------


@pytest.fixture
def brightness_pm(tmp_path):
    spm = StepAwarePreferenceModel.from_backbone(BACKBONE)
    torch.manual_seed(0)
    with torch.no_grad():
        spm.embed_mod.modulation[-1].weight.normal_(0, 0.01)
    spm.save(tmp_path / "pm" / "final", reward=REWARD, steps=1)
    return tmp_path / "pm"


@pytest.mark.parametrize("family", ["sd3", "chroma", "zimage", "pixart", "sdxl"])
def test_spo_and_find_run_on_every_family(tmp_path, brightness_pm, family):
    flow = family in ("sd3", "chroma", "zimage")
    spo = SPO(spo_config(tmp_path / "spo", brightness_pm, model=f"tiny:{family}", max_steps=1, resolution=32))
    Trainer(spo).train()
    assert spo.stats["valid"] > 0 and spo.step.flow == flow
    find = FIND(find_config(tmp_path / "find", model=f"tiny:{family}", max_steps=1, eta=0.7, resolution=32,
                            scheduler="auto"))  # auto: ddim on noise-prediction models, the model's own on flow
    Trainer(find).train()
    assert find.stats["rollouts"] == 1 and (find.sampler is not None) == flow
