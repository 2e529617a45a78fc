"""PSO: the distilled timestep subset, the offline losses (log 2 at the reference, lam = 1 is
Diffusion-DPO, pso_db), the consistency re-noising step's log-prob against the analytic Gaussian, pair
labels, and both modes end to end with exact resumption (tiny pipeline, CPU)."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from diffplug.finetune import ConfigError, Trainer, load_config
from diffplug.finetune.dpo import dpo_loss
from diffplug.finetune.logprob import renoise_step_with_logprob
from diffplug.finetune.pso import PSO, PSOConfig, distilled_timesteps, pair_labels, pso_db_loss, pso_loss

torch.set_num_threads(1)
REWARD = "pso_test_rewards:brightness"


@pytest.fixture(autouse=True)
def reward_module(monkeypatch):
    mod = types.ModuleType("pso_test_rewards")
    mod.brightness = lambda images, prompts: images.float().mean(dim=(1, 2, 3))
    monkeypatch.setitem(sys.modules, "pso_test_rewards", mod)


def schedulers():
    from diffusers import DDIMScheduler, LCMScheduler

    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return DDIMScheduler(**kw), LCMScheduler(**kw, original_inference_steps=50)


def test_distilled_timesteps_k_1_2_4():
    ddim, lcm = schedulers()
    assert distilled_timesteps(ddim, 1).tolist() == [999]
    assert distilled_timesteps(ddim, 2).tolist() == [999, 499]
    assert distilled_timesteps(ddim, 4).tolist() == [999, 749, 499, 249]
    assert distilled_timesteps(lcm, 4).tolist() == [999, 759, 499, 259]  # what LCMScheduler samples at
    with pytest.raises(ConfigError, match="num_distilled_steps"):
        distilled_timesteps(ddim, 3)


def test_pso_loss_is_log2_at_reference_and_dpo_at_lambda_one():
    g = torch.Generator().manual_seed(0)
    e = [torch.rand(5, generator=g) for _ in range(4)]
    loss, margin = pso_loss(e[0], e[1], e[0], e[1], beta=5.0, lam=0.1)
    assert torch.allclose(loss, torch.full_like(loss, math.log(2))) and torch.all(margin == 0)
    # lam = 1, the reference's error pair = the winners' pairs: Diffusion-DPO at 2 beta
    loss, _ = pso_loss(e[0], e[1], e[2], e[3], beta=7.0, lam=1.0)
    dpo, _ = dpo_loss(e[0], e[1], e[2], e[3], beta=14.0)
    assert torch.allclose(loss, dpo, atol=1e-6)
    # lower target error than the reference -> loss below log 2
    loss, _ = pso_loss(e[0] * 0.5, e[1], e[0], e[1], beta=5.0, lam=0.1)
    assert torch.all(loss < math.log(2))


def test_pso_db_hinge():
    w, l_ = torch.tensor([0.2, 0.0]), torch.tensor([0.4, 30.0])
    out = pso_db_loss(w, l_, beta=5.0, lam=0.1)
    assert torch.allclose(out, torch.tensor([1 - 5 * (0.04 - 0.2), 0.0]))  # hinge off in the second


def test_renoise_step_is_the_analytic_gaussian():
    _, lcm = schedulers()
    g = torch.Generator().manual_seed(1)
    x, eps_hat = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t, s = torch.tensor([999, 759, 499]), torch.tensor([759, 499, 259])
    prev, logp, x0 = renoise_step_with_logprob(lcm, eps_hat, t, x, s, noise=torch.randn(3, 4, 8, 8, generator=g))
    abar_t, abar_s = lcm.alphas_cumprod[t].view(-1, 1, 1, 1), lcm.alphas_cumprod[s].view(-1, 1, 1, 1)
    c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(t.float())
    want_x0 = c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * (x - (1 - abar_t).sqrt() * eps_hat) / abar_t.sqrt()
    assert torch.allclose(x0, want_x0, atol=1e-5)
    normal = torch.distributions.Normal(abar_s.sqrt() * want_x0, (1 - abar_s).sqrt().expand_as(x))
    assert torch.allclose(logp, normal.log_prob(prev).mean(dim=(1, 2, 3)), atol=1e-4)
    _, again, _ = renoise_step_with_logprob(lcm, eps_hat, t, x, s, prev_sample=prev)
    assert torch.allclose(again, logp)
    # the last step (to the end) is deterministic: x0_hat itself
    last, _, x0 = renoise_step_with_logprob(lcm, eps_hat, 259, x, -1)
    assert torch.allclose(last, x0, atol=1e-6)


def test_pair_labels_with_ties():
    h = pair_labels(torch.tensor([[1.0, 0.5], [0.1, 0.3], [0.2, 0.2]]))
    assert h.tolist() == [[1, -1], [-1, 1], [0, 0]]


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="^data"):
        load_config(PSOConfig, None, {"output_dir": str(tmp_path / "a")}).validate()
    with pytest.raises(ConfigError, match="^reward"):
        load_config(PSOConfig, None, {"output_dir": str(tmp_path / "a"), "mode": "online"}).validate()
    cfg = load_config(PSOConfig, None, {"output_dir": str(tmp_path / "a"), "mode": "online", "reward": REWARD})
    assert (cfg.learning_rate, cfg.beta, cfg.model) == (1e-4, 50.0, "testbed:sd-lcm")


@pytest.fixture
def targets(tmp_path):
    from PIL import Image

    folder = tmp_path / "targets"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (200, 40 * i, 30)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a photo of a red thing")
    return str(folder)


def _run(out, resume: bool = False, max_steps: int = 4, **kw):
    values = dict(output_dir=str(out), model="tiny:sd", max_steps=max_steps, train_batch_size=2, checkpoint_every=2,
                  log_every=1, tensorboard=False, guidance_scale=1.0, **kw)
    if resume:
        values["resume"] = "latest"
    trainer = Trainer(PSO(load_config(PSOConfig, None, values)))
    trainer.train()
    return trainer


@pytest.mark.parametrize("loss_type", ["pso", "pso_db"])
def test_offline_runs_starts_at_log2_and_resumes_exactly(tmp_path, targets, loss_type):
    kw = dict(mode="offline", data=targets, loss_type=loss_type, num_references=3, reference_prompts=["a photo"])
    full = _run(tmp_path / "full", **kw)
    method = full.method
    assert method.timesteps.tolist() == [999, 749, 499, 249] and method.ref_latents.shape == (3, 4, 16, 16)
    logs = [json.loads(line) for line in (tmp_path / "full" / "logs.jsonl").read_text().splitlines()]
    if loss_type == "pso":  # theta = ref at the first step (LoRA B = 0): log 2, plus the released prior gamma e(x-)
        assert abs(logs[0]["loss"] - (math.log(2) + 0.5 * logs[0]["err_reference"])) < 1e-5
    else:
        hinge = 1 - 5.0 * (0.1 * logs[0]["err_reference"] - logs[0]["err_target"])  # active: linear in the means
        assert abs(logs[0]["loss"] - (hinge + 0.5 * logs[0]["err_reference"])) < 1e-4
    _run(tmp_path / "half", max_steps=2, **kw)
    _run(tmp_path / "half", resume=True, **kw)
    a = load_file(str(tmp_path / "full" / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "half" / "final" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k or "lora.up" in k)  # it trained


def test_online_pairs_loss_and_exact_resume(tmp_path):
    kw = dict(mode="online", reward=REWARD, prompts=["a", "b"], eps=0.5, beta=5.0)
    full = _run(tmp_path / "full", **kw)
    logs = [json.loads(line) for line in (tmp_path / "full" / "logs.jsonl").read_text().splitlines()]
    assert abs(logs[0]["loss"] - math.log(2)) < 1e-5 and 0 <= logs[0]["tie_fraction"] <= 1
    roll = full.method.rollout(full, ["a", "b"], torch.tensor([0, 1]))
    assert roll["x"].shape == (4, 4, 4, 16, 16) and roll["rewards"].shape == (2, 2)
    assert torch.equal(roll["x"][0][0], roll["x"][0][1])  # the pair shares x_T ...
    assert not torch.equal(roll["x"][1][0], roll["x"][1][1])  # ... and then diverges
    _run(tmp_path / "half", max_steps=2, **kw)
    _run(tmp_path / "half", resume=True, **kw)
    a = load_file(str(tmp_path / "full" / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "half" / "final" / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_command_line(tmp_path, targets):
    from diffplug.finetune.cli import main

    out = tmp_path / "cli"
    args = ["pso", "--mode", "offline", "--data", targets, "--model", "tiny:sd", "--output_dir", str(out),
            "--max_steps", "1", "--num_references", "2", "--guidance_scale", "1", "--tensorboard", "false", "--seed", "3"]
    assert main(args) == 0
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert main(["pso", "--mode", "online", "--model", "tiny:sd", "--output_dir", str(tmp_path / "x")]) == 2


def test_bench_styles_are_what_they_say():
    """The offline benchmark's target styles: ``mirror`` flips left-right (the style score changes sign
    from the base domain's), ``red`` tints; the style score separates targets from the base domain."""
    import importlib
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        bench = importlib.import_module("pso_bench")
    finally:
        sys.path.pop(0)
    plain, mirror, red = (bench.sneakers("test", 32, s) for s in ("none", "mirror", "red"))
    assert plain.shape == (32, 3, 32, 32) and torch.equal(mirror, plain.flip(-1))
    assert torch.equal(red[:, 0], plain[:, 0]) and torch.allclose(red[:, 1], 0.3 * plain[:, 1])
    base, target = bench.style_score(plain, "mirror"), bench.style_score(mirror, "mirror")
    assert torch.allclose(target, -base) and base.mean() < -0.03 < 0.03 < target.mean()
    assert bench.style_score(red, "red").mean() > 0.05 > bench.style_score(plain, "red").abs().max()
