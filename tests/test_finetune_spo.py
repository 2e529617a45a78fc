"""SPO: the stochastic DDIM step with log-prob, the compare function, the clipped pairwise loss, the
step-wise resampler, the step-aware preference model (time conditioning in every block, soft labels,
held-out step-wise accuracy), the official update schedule with exact mid-rollout resume, and both
commands end to end (tiny, CPU)."""

from __future__ import annotations

import json
import math
import shutil
import sys
import types

import pytest
import torch
import torch.nn as nn

from safetensors.torch import load_file

from diffplug.finetune import ConfigError, Trainer, load_config
from diffplug.finetune.logprob import ddim_step_with_logprob
from diffplug.finetune.spm import SPMConfig, SPMTraining, StepAwarePreferenceModel, load_preference_model, pickscore_loss
from diffplug.finetune.spo import SPO, SPOConfig, compare, spo_loss
from diffplug.testing import BrightnessBackbone

torch.set_num_threads(1)




@pytest.fixture(autouse=True)
def scorer_module(monkeypatch):
    mod = types.ModuleType("finetune_test_scorers")
    mod.bright = BrightnessBackbone
    mod.brightness = lambda images, prompts: images.float().mean(dim=(1, 2, 3))
    monkeypatch.setitem(sys.modules, "finetune_test_scorers", mod)


REWARD = "finetune_test_scorers:brightness"
BACKBONE = "finetune_test_scorers:bright"


@pytest.fixture
def pm(tmp_path):
    """A 'trained' SPM folder on the brightness backbone (modulation perturbed, one recorded step)."""
    spm = StepAwarePreferenceModel.from_backbone("finetune_test_scorers:bright")
    torch.manual_seed(0)
    with torch.no_grad():
        spm.embed_mod.modulation[-1].weight.normal_(0, 0.01)
    folder = tmp_path / "pm" / "final"
    spm.save(folder, reward=REWARD, steps=1)
    return str(tmp_path / "pm")


def ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False)


def test_ddim_logprob_is_the_analytic_gaussian():
    sched = ddim()
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x, eps_hat = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = sched.timesteps[3]
    prev, logp = ddim_step_with_logprob(sched, eps_hat, t, x, 10, eta=1.0, noise=torch.randn(3, 4, 8, 8, generator=g))
    # the same mean and variance as diffusers' DDIMScheduler.step with eta = 1 (variance_noise = 0 -> mean)
    mean = sched.step(eps_hat, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
    std = (sched._get_variance(t, t - 100)) ** 0.5
    ref = torch.distributions.Normal(mean, std).log_prob(prev).mean(dim=(1, 2, 3))
    torch.testing.assert_close(logp, ref, rtol=1e-4, atol=1e-4)
    # scoring a given transition gives the same number; a far-away sample is less likely
    _, again = ddim_step_with_logprob(sched, eps_hat, t, x, 10, prev_sample=prev)
    torch.testing.assert_close(again, logp)
    _, far = ddim_step_with_logprob(sched, eps_hat, t, x, 10, prev_sample=prev + 3 * std)
    assert (far < logp).all()
    with pytest.raises(ValueError, match="eta must be > 0"):
        ddim_step_with_logprob(sched, eps_hat, t, x, 10, eta=0.0)


def test_compare_respects_order_and_rejects_ties():
    scores = torch.tensor([[1.0, 5.0, 3.0], [2.0, 2.0, 2.0], [0.0, 0.1, 0.05]])
    win, lose, valid = compare(scores, threshold=0.3)
    assert win.tolist()[0] == 1 and lose.tolist()[0] == 0
    assert valid.tolist() == [True, False, False]  # a tie, and a gap below the threshold


def test_spo_loss_log2_at_reference_and_clipping():
    lp = torch.randn(5)
    losses, clipped = spo_loss(lp, lp + 0.3, lp, lp + 0.3, beta=10.0, eps=0.1)
    torch.testing.assert_close(losses, torch.full((5,), math.log(2.0)))
    assert not clipped.any()
    # inside [1-eps, 1+eps]: raising the winner's log-prob lowers the loss
    w = torch.zeros(3, requires_grad=True)
    spo_loss(w, torch.zeros(3), torch.zeros(3), torch.zeros(3), 10.0, 0.1)[0].sum().backward()
    assert (w.grad < 0).all()
    # outside it the clamp has zero gradient (the trust region of the spec)
    w = torch.full((3,), 0.5, requires_grad=True)
    losses, clipped = spo_loss(w, torch.zeros(3), torch.zeros(3), torch.zeros(3), 10.0, 0.1)
    losses.sum().backward()
    assert clipped[0].all() and (w.grad == 0).all()


def test_spm_starts_as_its_backbone_and_pickscore_loss():
    spm = StepAwarePreferenceModel.from_backbone("finetune_test_scorers:bright")
    images = torch.rand(4, 3, 16, 16)
    prompts = ["a"] * 4
    backbone = spm.backbone
    f = nn.functional.normalize(backbone.encode_image(images), dim=-1)
    expected = 100.0 * (f * torch.tensor([1.0, 0.0])).sum(-1)
    for t in (0, 500, 999):
        torch.testing.assert_close(spm(images, prompts, t), expected)
    s = torch.tensor([3.0, -1.0])
    torch.testing.assert_close(pickscore_loss(s[:1], s[1:]), -torch.log_softmax(s, 0)[:1])


def spo_config(out, pm, **kw):
    base = dict(
        output_dir=str(out), model="tiny:sd", preference_model=pm, reward=REWARD, backbone=BACKBONE, num_steps=4,
        divert_start_step=1, num_sample_each_step=3, threshold=0.0, train_batch_size=2, max_steps=2,
        checkpoint_every=0, log_every=1, tensorboard=False, prompts=["a", "b", "c", "d"], learning_rate=1e-3,
    )
    base.update(kw)
    return load_config(SPOConfig, None, base)


def test_resampler_one_continuation_and_pairs_from_candidates(tmp_path, pm):
    method = SPO(spo_config(tmp_path / "o", pm, transitions_per_step=0))
    trainer = Trainer(method)
    trainer._setup()
    gens = trainer.generators(torch.tensor([0, 1]))
    tr = method.resampler(trainer.unet, ["a", "b"], gens, trainer.resolution, trainer.device)
    n_steps = method.config.num_steps - method.config.divert_start_step
    assert tr["x_t_w"].shape[0] == n_steps * 2 and tr["final"].shape[0] == 2  # one path per prompt
    assert torch.equal(tr["x_t_w"], tr["x_t_l"])  # num_inner_step = 1: winner and loser share the parent
    assert torch.equal(tr["prompt"], torch.arange(2).repeat(n_steps))
    # each step branches from a new parent, and the pair is two distinct candidates of that parent
    parents = tr["x_t_w"].view(n_steps, 2, -1)
    assert all(not torch.equal(parents[s], parents[s + 1]) for s in range(n_steps - 1))
    # a kept pair is two distinct candidates; identical ones (the deterministic last DDIM step into
    # abar = 1 of this scheduler) tie and are rejected
    for w, l, v in zip(tr["x_w"], tr["x_l"], tr["valid"]):
        assert not torch.equal(w, l) if v else True
    assert tr["valid"][: 2 * (n_steps - 1)].all()
    assert not tr["valid"][-2:].any()
    # winners score higher: the scorer prefers brightness, so the winner's predicted image is brighter
    assert (tr["scores"].max(1).values >= tr["scores"].min(1).values).all()
    # the same generators reproduce the same rollout (seeded per sample)
    again = method.resampler(trainer.unet, ["a", "b"], trainer.generators(torch.tensor([0, 1])), trainer.resolution, trainer.device)
    torch.testing.assert_close(again["x_w"], tr["x_w"])

    # SPO-SDXL: chains of m = 2 steps before each comparison; pairs of j-th transitions
    method.config.num_inner_step = 2
    tr = method.resampler(trainer.unet, ["a", "b"], trainer.generators(torch.tensor([0, 1])), trainer.resolution, trainer.device)
    assert tr["x_t_w"].shape[0] == n_steps * 2  # still one transition per step after the divert step
    assert torch.equal(tr["x_t_w"][:2], tr["x_t_l"][:2])  # the first transition of a segment: shared parent
    assert torch.equal(tr["x_t_w"][2:4], tr["x_w"][:2]) and torch.equal(tr["x_t_l"][2:4], tr["x_l"][:2])  # chains
    assert tr["t"][:2].tolist() != tr["t"][2:4].tolist()
    parts = method.prepare(trainer, {"prompts": ["a", "b"], "positions": torch.tensor([0, 1])})
    loss, logs = method.loss(trainer, parts[0])
    assert abs(float(loss) - math.log(2)) < 1e-5  # theta = ref, separate parents


def test_spo_command_runs_and_starts_at_log2(tmp_path, pm):
    from diffplug.finetune.cli import main

    out = tmp_path / "spo"
    args = ["spo", "--output_dir", str(out), "--model", "tiny:sd", "--preference_model", pm, "--reward", REWARD,
            "--backbone", BACKBONE,
            "--num_steps", "3", "--divert_start_step", "1", "--num_sample_each_step", "2", "--threshold", "0",
            "--max_steps", "2", "--train_batch_size", "1", "--checkpoint_every", "1", "--log_every", "1",
            "--tensorboard", "false", "--prompts", "a,b"]
    assert main(args) == 0
    logs = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    assert abs(logs[0]["loss"] - math.log(2)) < 1e-5  # theta = ref at step 1 (LoRA B = 0)
    assert 0 <= logs[0]["valid_pair_fraction"] <= 1 and "clipped_fraction" in logs[0]
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "checkpoint-1" / "trainer_state.json").is_file() and (out / "checkpoint-2").is_dir()


def test_spo_pm_soft_labels_trains_reloads_and_reports_stepwise_accuracy(tmp_path):
    from PIL import Image

    data = tmp_path / "pairs"
    data.mkdir()
    rows = []
    for i in range(3):
        Image.new("RGB", (32, 32), (220, 220, 220)).save(data / f"{i}w.png")
        Image.new("RGB", (32, 32), (30, 30, 30)).save(data / f"{i}l.png")
        rows.append({"prompt": "x", "jpg_0": f"{i}l.png", "jpg_1": f"{i}w.png", "label_0": 0 if i < 2 else 0.5})
    (data / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(SPMConfig, None, dict(
        output_dir=str(tmp_path / "pm"), model="tiny:sd", backbone="finetune_test_scorers:bright", data=str(data),
        max_steps=2, train_batch_size=3, checkpoint_every=0, tensorboard=False, learning_rate=1e-2, log_every=1,
    ))
    method = SPMTraining(cfg)
    final = Trainer(method).train()
    logs = [json.loads(line) for line in (tmp_path / "pm" / "logs.jsonl").read_text().splitlines()]
    assert abs(logs[0]["tie_fraction"] - 1 / 3) < 1e-6  # the tie is kept, as a 0.5/0.5 soft label
    spm = StepAwarePreferenceModel.load(final, backbone=BACKBONE)
    assert spm.backbone_spec == "finetune_test_scorers:bright" and spm.info["steps"] == 2
    assert any(p.abs().sum() > 0 for p in spm.embed_mod.modulation[-1].parameters())  # time conditioning trained
    assert isinstance(load_preference_model(str(tmp_path / "pm"), backbone=BACKBONE), StepAwarePreferenceModel)
    # the soft-label loss: a tie at equal scores is log 2 and pulls unequal scores together
    s = torch.tensor([2.0, 0.0], requires_grad=True)
    loss = pickscore_loss(s[:1], s[1:], torch.tensor([0.5]))
    loss.sum().backward()
    assert s.grad[0] > 0 > s.grad[1]
    torch.testing.assert_close(pickscore_loss(s[1:], s[1:], torch.tensor([0.5])).detach(), torch.tensor([math.log(2)]))


def test_keyboard_interrupt_inside_an_spm_step_saves_the_last_complete_one(tmp_path, monkeypatch):
    """A KeyboardInterrupt raised in step 3's loss: checkpoint-2 is saved (the step's random draws put back),
    and resuming from it gives the uninterrupted run's weights bit for bit. In step 1 nothing is saved."""
    from PIL import Image

    from diffplug.finetune import checkpoint as ckpt
    from diffplug.finetune.trainer import Interrupted

    data = tmp_path / "pairs"
    data.mkdir()
    rows = []
    for i in range(4):
        Image.new("RGB", (32, 32), (200 + 10 * i, 200, 200)).save(data / f"{i}w.png")
        Image.new("RGB", (32, 32), (30 + 10 * i, 30, 30)).save(data / f"{i}l.png")
        rows.append({"prompt": f"p{i}", "jpg_0": f"{i}l.png", "jpg_1": f"{i}w.png", "label_0": 0})
    (data / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def config(out, **kw):
        return load_config(SPMConfig, None, dict(
            output_dir=str(out), model="tiny:sd", backbone=BACKBONE, data=str(data), max_steps=4, train_batch_size=2,
            checkpoint_every=0, tensorboard=False, learning_rate=1e-2, log_every=1, **kw))

    def weights(out):
        return load_file(str(out / "final" / "spm.safetensors"))

    Trainer(SPMTraining(config(tmp_path / "ref"))).train()
    real, calls = SPMTraining.loss, []

    def loss(self, trainer, batch):
        calls.append(trainer.step)
        if len(calls) in (3, 4):  # step 3 of the next run; step 1 of the one after
            raise KeyboardInterrupt
        return real(self, trainer, batch)

    monkeypatch.setattr(SPMTraining, "loss", loss)
    out = tmp_path / "raised"
    with pytest.raises(Interrupted, match=r"interrupted in step 3 of 4: saved .*checkpoint-2 \(step 2, the last complete"):
        Trainer(SPMTraining(config(out))).train()
    assert [p.name for p in ckpt.checkpoints(out)] == ["checkpoint-2"]
    with pytest.raises(Interrupted, match=r"in step 1 of 4: not saved \(nothing trained since the start\)"):
        Trainer(SPMTraining(config(tmp_path / "first"))).train()
    monkeypatch.setattr(SPMTraining, "loss", real)
    Trainer(SPMTraining(config(out, resume="latest"))).train()
    a, b = weights(tmp_path / "ref"), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(v, load_file(str(out / "checkpoint-2" / "trainable.safetensors"))[k]) for k, v in
               load_file(str(out / "checkpoint-4" / "trainable.safetensors")).items())  # it trained steps 3-4


def test_spo_pm_on_generated_pairs_reports_stepwise_accuracy(tmp_path):
    out = tmp_path / "pm"
    cfg = load_config(SPMConfig, None, dict(
        output_dir=str(out), model="tiny:sd", backbone="finetune_test_scorers:bright", reward=REWARD,
        prompts=["a", "b"], num_per_prompt=4, generate_repeats=1, eval_repeats=1, generate_steps=2, max_steps=1,
        train_batch_size=2, checkpoint_every=0, tensorboard=False, log_every=1,
    ))
    Trainer(SPMTraining(cfg)).train()
    rows = [json.loads(line) for line in (out / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["label_0"] in (0.0, 0.5, 1.0) for r in rows)  # 2 prompts x 2 disjoint pairs
    assert all((r["label_0"] == 1.0) == (r["score_0"] > r["score_1"]) for r in rows if r["label_0"] != 0.5)
    assert (out / "pairs-heldout" / "pairs.jsonl").read_text() != (out / "pairs" / "pairs.jsonl").read_text()
    acc = json.loads((out / "final" / "stepwise_accuracy.json").read_text())
    assert set(acc) == {"0", "251", "501", "701", "951"}
    assert all(0 <= a["spm"] <= 1 and 0 <= a["reward"] <= 1 for a in acc.values())
    assert json.loads((out / "final" / "spm_config.json").read_text())["reward"] == REWARD


def test_interrupted_pair_generation_keeps_the_finished_prompts_and_resumes_to_the_same_pairs(tmp_path, monkeypatch,
                                                                                            capsys):
    from diffplug.finetune.trainer import Interrupted

    calls, stop_at = [], [2]

    def flaky(images, prompts):  # Ctrl-C while the second batch of prompts is scored
        calls.append(len(prompts))
        if len(calls) in stop_at:
            raise KeyboardInterrupt
        return images.float().mean(dim=(1, 2, 3))

    monkeypatch.setattr(sys.modules["finetune_test_scorers"], "flaky", flaky, raising=False)

    def config(out, **kw):  # 16 samples a prompt: 2 prompts per sampling call, 2 calls for 3 prompts
        return load_config(SPMConfig, None, dict(
            output_dir=str(out), model="tiny:sd", backbone=BACKBONE, reward="finetune_test_scorers:flaky",
            prompts=["a", "b", "c"], num_per_prompt=16, generate_repeats=1, eval_repeats=0, generate_steps=2,
            max_steps=1, train_batch_size=2, checkpoint_every=0, tensorboard=False, **kw))

    out = tmp_path / "pm"
    with pytest.raises(Interrupted, match=r"generating pairs \(pairs\): the 2 of 3 prompts done are kept in .*pairs.tmp"):
        Trainer(SPMTraining(config(out))).train()
    assert "ETA for the whole run" in capsys.readouterr().out  # printed after the first batch of prompts
    assert len(list((out / "pairs.tmp").glob("*.png"))) == 32 and not (out / "pairs").exists()
    Trainer(SPMTraining(config(out, resume="latest"))).train()
    assert "2 of 3 prompts already generated" in capsys.readouterr().out and calls[2:] == [16]  # only prompt c
    ref = tmp_path / "ref"
    stop_at.clear()  # no interruption this time
    Trainer(SPMTraining(config(ref))).train()
    assert (out / "pairs" / "pairs.jsonl").read_text() == (ref / "pairs" / "pairs.jsonl").read_text()
    names = sorted(p.name for p in (ref / "pairs").iterdir())
    assert names == sorted(p.name for p in (out / "pairs").iterdir()) and len(names) == 3 * 16 + 1
    assert all((out / "pairs" / n).read_bytes() == (ref / "pairs" / n).read_bytes() for n in names)


def test_every_block_of_the_testbed_scorer_is_time_conditioned():
    spm = StepAwarePreferenceModel.from_backbone("testbed").eval()
    assert len(spm.blocks) == 3 and spm.embed_mod is None  # one per ConvNet stage
    images, prompts = torch.rand(2, 3, 32, 32), ["a photo of a bag", "a photo of a coat"]
    with torch.no_grad():
        base = spm.backbone(images, prompts) * spm.logit_scale()
        torch.testing.assert_close(spm(images, prompts, 700), base, rtol=1e-4, atol=1e-4)  # zero-init = backbone
        for unit in spm.blocks:
            unit.modulation[-1].weight.normal_(0, 0.1)
            unit.modulation[-1].bias.normal_(0, 0.1)
        assert not torch.allclose(spm(images, prompts, 0), spm(images, prompts, 900))
        torch.testing.assert_close(spm.backbone(images, prompts) * spm.logit_scale(), base)  # outside the SPM: unchanged


def test_spo_refuses_missing_untrained_or_mismatched_preference_models(tmp_path, pm):
    with pytest.raises(ConfigError, match="preference_model: required.*spo-pm"):
        load_config(SPOConfig, None, dict(output_dir=str(tmp_path / "o"), reward=REWARD))
    untrained = tmp_path / "untrained"
    StepAwarePreferenceModel.from_backbone("finetune_test_scorers:bright").save(untrained)
    for bad in (str(untrained), "testbed", str(tmp_path / "nothing")):
        with pytest.raises(ConfigError, match="spo-pm"):
            load_preference_model(bad, REWARD)
    with pytest.raises(ConfigError, match="reward: 'jpeg_compressibility', but the preference model .* trained on"):
        load_preference_model(pm, "jpeg_compressibility")
    cfg = spo_config(tmp_path / "o2", pm)
    assert cfg.eval_reward == REWARD  # '' = --reward


def test_a_recorded_module_function_backbone_is_imported_only_when_passed_again(tmp_path, pm, monkeypatch, capsys):
    import finetune_test_scorers

    calls = []
    monkeypatch.setattr(finetune_test_scorers, "bright", lambda real=finetune_test_scorers.bright: calls.append(1) or real())
    for given in (None, ""):  # the folder's name is never resolved on its own
        with pytest.raises(ConfigError, match=r"backbone: .*module:function.*pass --backbone finetune_test_scorers:bright"):
            load_preference_model(pm, REWARD, given)
    with pytest.raises(ConfigError, match=r"backbone: 'testbed', but the preference model .* pass --backbone"):
        load_preference_model(pm, REWARD, "testbed")
    assert calls == []  # refused before anything was imported or called
    spm = load_preference_model(pm, REWARD, BACKBONE)  # the user asks for it: loaded
    assert calls == [1] and spm.backbone_spec == BACKBONE
    from diffplug.finetune.cli import main

    capsys.readouterr()
    assert main(["spo", "--output_dir", str(tmp_path / "o3"), "--model", "tiny:sd", "--preference_model", pm,
                 "--reward", REWARD, "--max_steps", "1", "--tensorboard", "false"]) == 2  # the SPO command refuses too
    assert "error: backbone: the preference model" in capsys.readouterr().err and calls == [1]
    # a built-in backbone name is fine without --backbone
    testbed_pm = tmp_path / "tb"
    StepAwarePreferenceModel.from_backbone("testbed").save(testbed_pm, reward=REWARD, steps=1)
    assert load_preference_model(str(testbed_pm), REWARD).backbone_spec == "testbed"


def test_official_update_schedule_and_exact_resume_mid_rollout(tmp_path, pm):
    kw = dict(transitions_per_step=1, max_steps=5, checkpoint_every=3, train_batch_size=1, num_steps=4)
    ref = tmp_path / "ref"
    method = SPO(spo_config(ref, pm, **kw))
    Trainer(method).train()
    # a rollout of 1 prompt gives 3 transitions (2 valid: the last DDIM step is deterministic and ties),
    # one optimiser step each: 5 steps = 3 rollouts, the last one interrupted
    assert method.stats["rollouts"] == 3 and method.stats["valid"] == 6 and len(method.queue) == 1
    q = load_file(str(ref / "checkpoint-3" / "spo_rollout_0.safetensors"))
    assert "0.x_w" in q and "1.x_w" not in q  # checkpoint 3 holds the 2nd rollout's second half
    # resume from checkpoint-3 (in the middle of rollout 2): the same final weights
    res = tmp_path / "res"
    shutil.copytree(ref / "checkpoint-3", res / "checkpoint-3")
    shutil.copy(ref / "config.yaml", res / "config.yaml")
    Trainer(SPO(spo_config(res, pm, resume="latest", **kw))).train()
    a = load_file(str(ref / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(res / "final" / "pytorch_lora_weights.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_a_run_that_learns_nothing_says_so(tmp_path, pm, capsys):
    Trainer(SPO(spo_config(tmp_path / "o", pm, threshold=0.999, max_steps=2, train_batch_size=1))).train()
    out = capsys.readouterr().out
    assert "no valid pair" in out and "WARNING: this SPO run learned nothing" in out


def test_spm_on_a_local_clip_folder(tmp_path):
    """The PickScore path: a local transformers CLIP folder (here tiny and random) as the backbone."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from diffplug.testing import byte_level_vocab, tiny_tokenizer

    text = dict(vocab_size=len(byte_level_vocab()), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=512, eos_token_id=513, pad_token_id=513)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(str(tmp_path))
    CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}), tiny_tokenizer()).save_pretrained(str(tmp_path))
    spm = StepAwarePreferenceModel.from_backbone(f"pickscore:{tmp_path}")
    scores = spm(torch.rand(3, 3, 32, 32), ["a cat", "a dog", "x"], 250)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    assert len(spm.blocks) == 2  # the ViT layer and the post-LayerNorm are time-conditioned
    assert abs(float(spm.logit_scale()) - float(spm.backbone.model.logit_scale.exp())) < 1e-6
    with pytest.raises(Exception, match="backbone: .* no such folder"):
        StepAwarePreferenceModel.from_backbone(f"clip:{tmp_path / 'missing'}")
