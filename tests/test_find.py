"""FIND: the per-prompt initial-noise policy (log-density, update direction, ratio clipping), the
untrained policy reproducing the base pipeline exactly, a toy brightness reward rising on fresh draws,
exact resume in the middle of a rollout, the policy file and `diffplug sample --noise-policy` (tiny, CPU)."""

from __future__ import annotations

import math
import shutil
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from diffplug.finetune import ConfigError, Trainer, load_config
from diffplug.finetune.find import (FIND, FINDConfig, InitialNoisePolicy, NoisePolicy, find_loss, group_advantage,
                                    load_noise_policy, prior_log_prob)

torch.set_num_threads(1)
REWARD = "find_test_rewards:brightness"


@pytest.fixture(autouse=True)
def reward_module(monkeypatch):
    mod = types.ModuleType("find_test_rewards")
    # mean brightness about the tiny pipeline's mid value, scaled so that its spread is O(1)
    mod.brightness = lambda images, prompts: 100 * (images.float().mean(dim=(1, 2, 3)) - 0.468)
    monkeypatch.setitem(sys.modules, "find_test_rewards", mod)


def config(out, **kw):
    base = dict(output_dir=str(out), model="tiny:sd", reward=REWARD, prompts=["a cat", "a dog"], num_steps=2,
                guidance_scale=3.0, log_every=1, checkpoint_every=0, tensorboard=False)
    return load_config(FINDConfig, None, {**base, **kw})


def policy_with(mean, std):
    p = InitialNoisePolicy(len(mean), mean.shape[1:])
    with torch.no_grad():
        p.mean.copy_(mean)
        p.log_std.copy_(std.log())
    return p


def test_log_prob_is_the_mean_normal_log_density():
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(3, 4, 5, 5, generator=g), torch.rand(3, 4, 5, 5, generator=g) + 0.3
    p, z, idx = policy_with(mean, std), torch.randn(6, 4, 5, 5, generator=g), torch.tensor([2, 0, 1, 1, 0, 2])
    want = torch.distributions.Normal(mean[idx], std[idx]).log_prob(z).mean(dim=(1, 2, 3))
    torch.testing.assert_close(p.log_prob(z, idx), want)
    torch.testing.assert_close(prior_log_prob(z), torch.distributions.Normal(0.0, 1.0).log_prob(z).mean(dim=(1, 2, 3)))
    reg = (mean[idx] ** 2 + (std[idx] - 1) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(p.regulariser(idx), reg)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_positive_advantage_moves_the_mean_toward_the_sample(sign):
    p = InitialNoisePolicy(1, (4, 3, 3))
    z, idx = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(1)), torch.zeros(1, dtype=torch.long)
    logp, reg = p(z, idx)
    loss, _ = find_loss(logp, prior_log_prob(z), torch.tensor([sign]), reg, 10.0, 0.0, 0.2)
    loss.backward()
    step = -p.mean.grad[0]  # a gradient-descent step
    assert sign * float((step * z[0]).sum()) > 0  # toward z for A > 0, away for A < 0
    assert sign * float(torch.nn.functional.cosine_similarity(step.flatten(), z.flatten(), dim=0)) > 0.99


def test_ratio_clamp_has_no_gradient_outside_the_bounds_and_ppo_keeps_the_pessimistic_side():
    logp_old = torch.zeros(4)
    logp = torch.tensor([math.log(1.5), math.log(1.1), math.log(0.5), math.log(0.9)], requires_grad=True)
    adv, reg = torch.tensor([1.0, 1.0, -1.0, -1.0]), torch.zeros(4)
    loss, ratio = find_loss(logp, logp_old, adv, reg, 1.0, 0.0, 0.2)
    loss.backward()
    torch.testing.assert_close(ratio.detach(), torch.tensor([1.5, 1.1, 0.5, 0.9]))
    assert logp.grad[0] == 0 and logp.grad[2] == 0 and logp.grad[1] != 0 and logp.grad[3] != 0
    torch.testing.assert_close(loss.detach(), torch.tensor(-(1.2 + 1.1 - 0.8 - 0.9) / 4))
    # PPO's min: ratio 1.5 is clipped for A > 0 but, pessimistically, not for A < 0
    logp = torch.full((2,), math.log(1.5), requires_grad=True)
    find_loss(logp, torch.zeros(2), torch.tensor([1.0, -1.0]), torch.zeros(2), 1.0, 0.0, 0.2, mode="ppo")[0].backward()
    assert logp.grad[0] == 0 and logp.grad[1] != 0


def test_group_advantage_standardises_each_prompts_samples():
    r = torch.tensor([1.0, 2.0, 3.0, -5.0, -5.0, -5.0])  # two prompts x 3 samples; the second all equal
    a = group_advantage(r, 3)
    torch.testing.assert_close(a, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(group_advantage(10 * r + 7, 3), a)  # invariant to the reward's scale and offset


def test_untrained_policy_reproduces_the_base_pipeline_exactly():
    from diffplug.testing import tiny_pipeline

    pipe = tiny_pipeline("sd")
    shape = tuple(pipe.unet.config.in_channels if i == 0 else pipe.unet.config.sample_size for i in range(3))
    policy = NoisePolicy(torch.zeros(2, *shape), torch.ones(2, *shape), ["a cat", "a dog"], {})
    kw = dict(num_inference_steps=2, output_type="np", num_images_per_prompt=2)
    base = pipe(["a dog", "a cat"], generator=torch.manual_seed(3), **kw).images
    z = policy.sample_initial_noise(["a dog", "a cat"], 2, generator=torch.manual_seed(3), pipe=pipe)
    assert (pipe(["a dog", "a cat"], latents=z, **kw).images == base).all()
    moved = NoisePolicy(torch.zeros(2, *shape), torch.ones(2, *shape), ["a cat", "a dog"], {})
    moved.mean[1] += 1.0  # only "a dog" moves
    z2 = moved.sample_initial_noise(["a dog", "a cat"], 2, generator=torch.manual_seed(3), pipe=pipe)
    torch.testing.assert_close(z2[:2] - z[:2], torch.ones_like(z[:2]))
    torch.testing.assert_close(z2[2:], z[2:])


def test_policy_file_round_trip_and_checks(tmp_path):
    from diffplug.testing import tiny_pipeline

    pipe = tiny_pipeline("sd")
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    meta = {"num_inference_steps": 10, "guidance_scale": 2.0, "eta": 1.0, "scheduler": type(pipe.scheduler).__name__}
    path = tmp_path / "p.safetensors"
    NoisePolicy(torch.randn(1, *shape), torch.rand(1, *shape) + 0.5, ["a cat"], meta).save(path)
    p = load_noise_policy(path)
    assert p.prompts == ["a cat"] and p.meta == meta and p.latent_shape == shape
    with pytest.raises(ValueError, match="prompt 'a dog'.*no distribution.*trained on \\['a cat'\\]"):
        p.sample_initial_noise(["a dog"], pipe=pipe)
    with pytest.raises(ValueError, match="latents: the noise policy draws latents of shape"):
        p.sample_initial_noise(["a cat"], pipe=pipe, height=2 * pipe.vae_scale_factor * shape[1])
    with pytest.warns(UserWarning, match="trained with num_inference_steps=10, sampling with 4"):
        p.sample_initial_noise(["a cat"], pipe=pipe, num_inference_steps=4)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated"):
        load_noise_policy(bad)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="reward: required"):
        config(tmp_path / "o", reward="")
    with pytest.raises(ConfigError, match="ratio_clip"):
        config(tmp_path / "o", ratio_clip=1.5)
    with pytest.raises(ConfigError, match="prompts: a prompt is listed twice"):
        config(tmp_path / "o", prompts=["a cat", "a cat"])
    assert config(tmp_path / "o", prompt="a fox").prompt_list() == ["a fox"]
    with pytest.raises(ConfigError, match="advantage: 'group'.*--samples_per_prompt >= 2"):
        config(tmp_path / "o", advantage="group", samples_per_prompt=1)
    with pytest.raises(ConfigError, match="eta: EulerDiscreteScheduler has no eta"):
        Trainer(FIND(config(tmp_path / "e", scheduler="euler", max_steps=1))).train()


def fresh_reward(pipe, policy: NoisePolicy, prompts, n: int, seed: int):
    """Rewards of ``n`` fresh draws per prompt (held out: seeds the run never used)."""
    z = policy.sample_initial_noise(prompts, n, generator=torch.Generator().manual_seed(seed), pipe=pipe)
    images = pipe(prompts, latents=z, num_images_per_prompt=n, num_inference_steps=2, guidance_scale=3.0,
                  output_type="pt").images
    return sys.modules["find_test_rewards"].brightness(images, None)


@pytest.mark.parametrize("advantage", ["value", "group"])
def test_a_toy_brightness_reward_rises_on_fresh_draws(tmp_path, advantage):
    cfg = config(tmp_path / "o", max_steps=24, samples_per_prompt=4, policy_steps=2, learning_rate=0.02,
                 train_batch_size=2, eta=0.0, advantage=advantage)
    method = FIND(cfg)
    final = Trainer(method).train()
    policy = load_noise_policy(final / "noise_policy.safetensors")
    assert policy.meta["num_inference_steps"] == 2 and policy.meta["rollouts"] == 12 and policy.meta["eta"] == 0.0
    from diffusers import DDIMScheduler

    from diffplug.finetune.model import load_pipeline

    pipe = load_pipeline("tiny:sd")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    prior = NoisePolicy(torch.zeros_like(policy.mean), torch.ones_like(policy.std), policy.prompts, {})
    # the same eps for both (common random numbers): z_after = mu + sigma * eps, z_before = eps
    gain = fresh_reward(pipe, policy, policy.prompts, 32, seed=1234) - fresh_reward(pipe, prior, policy.prompts, 32, seed=1234)
    assert gain.mean() > 3 * gain.std() / math.sqrt(len(gain))


def test_exact_resume_in_the_middle_of_a_rollout(tmp_path):
    kw = dict(max_steps=5, checkpoint_every=2, policy_steps=3, samples_per_prompt=2, train_batch_size=1)
    ref = tmp_path / "ref"
    method = FIND(config(ref, **kw))
    Trainer(method).train()
    assert method.stats["rollouts"] == 2  # steps 0-2 and 3-5: checkpoint-2 holds rollout 1 with 1 step left
    res = tmp_path / "res"
    shutil.copytree(ref / "checkpoint-2", res / "checkpoint-2")
    shutil.copy(ref / "config.yaml", res / "config.yaml")
    Trainer(FIND(config(res, resume="latest", **kw))).train()
    a, b = (load_file(str(d / "final" / "noise_policy.safetensors")) for d in (ref, res))
    for k in ("mean", "std"):
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert a["mean"].abs().max() > 0


def test_diffplug_sample_noise_policy(tmp_path, capsys):
    from diffplug.cli import main
    from diffplug.testing import tiny_pipeline

    pipe = tiny_pipeline("sd")
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    path = tmp_path / "p.safetensors"
    NoisePolicy(torch.zeros(1, *shape), torch.ones(1, *shape), ["a cat"], {"num_inference_steps": 2}).save(path)
    args = ["sample", "--model", "tiny-sd", "--prompt", "a cat", "--steps", "2", "--num-images", "2", "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "base")]) == 0
    assert main(args + ["--out", str(tmp_path / "pol"), "--noise-policy", str(path)]) == 0
    for name in ("000.png", "001.png"):  # the untrained policy samples as the base model
        assert (tmp_path / "base" / name).read_bytes() == (tmp_path / "pol" / name).read_bytes()
    assert main(["sample", "--model", "tiny-sd", "--prompt", "a dog", "--out", str(tmp_path / "x"),
                 "--noise-policy", str(path)]) == 2
    assert "prompt 'a dog': the noise policy has no distribution" in capsys.readouterr().err
