"""The fine-tuning trainer and Diffusion-DPO on tiny offline pipelines (CPU).

One uninterrupted reference run (4 steps, checkpoints every 2) is shared by the resume, kill,
LoRA-loading and 2-process tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffplug.finetune import ConfigError, Trainer, load_config
from diffplug.finetune import checkpoint as ckpt
from diffplug.finetune.config import parse_overrides
from diffplug.finetune.dpo import DiffusionDPO, DPOConfig, dpo_loss

torch.set_num_threads(1)


def make_pairs(folder: Path, n: int = 4) -> Path:
    """Pick-a-Pic layout: jpg_0 dark, jpg_1 bright, label_0 = 0 (bright preferred); one tie row."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        for name, mu in (("d", 60), ("b", 190)):
            arr = np.clip(rng.normal(mu, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(folder / f"{i}_{name}.png")
        rows.append({"caption": f"a photo {i}", "jpg_0": f"{i}_d.png", "jpg_1": f"{i}_b.png", "label_0": 0})
    rows.append({"caption": "tie", "jpg_0": "0_d.png", "jpg_1": "0_b.png", "label_0": 0.5})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def dpo_config(out, data, **kw) -> DPOConfig:
    base = dict(
        output_dir=str(out), model="tiny:sd", data=str(data), max_steps=4, checkpoint_every=2, log_every=1,
        train_batch_size=2, learning_rate=1e-3, lr_scheduler="constant", beta=500.0, tensorboard=False, seed=3,
    )
    base.update(kw)
    return load_config(DPOConfig, None, {k: v for k, v in base.items()})


def lora_state(run: Path) -> dict:
    return load_file(str(run / "final" / "pytorch_lora_weights.safetensors"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_pairs(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, pairs):
    out = tmp_path_factory.mktemp("runs") / "ref"
    Trainer(DiffusionDPO(dpo_config(out, pairs))).train()
    return out


# -- config ---------------------------------------------------------------------------------------


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"learning_rat: unknown config key .*did you mean 'learning_rate'"):
        load_config(DPOConfig, None, {"output_dir": "x", "learning_rat": "1e-4"})
    with pytest.raises(ConfigError, match=r"max_steps: expected int, got 'ten'"):
        load_config(DPOConfig, None, {"output_dir": "x", "max_steps": "ten"})
    with pytest.raises(ConfigError, match=r"loss_type: must be one of sigmoid, hinge, ipo"):
        load_config(DPOConfig, None, {"output_dir": "x", "loss_type": "hinged"})
    with pytest.raises(ConfigError, match=r"output_dir: required"):
        load_config(DPOConfig, None, {})
    with pytest.raises(ConfigError, match=r"beta: must be > 0"):
        load_config(DPOConfig, None, {"output_dir": "x", "beta": "-1"})
    with pytest.raises(ConfigError, match=r"use_lora: expected bool"):
        load_config(DPOConfig, None, {"output_dir": "x", "use_lora": "maybe"})
    # YAML < overrides; YAML keys are checked too
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("max_steps: 7\nbeta: 2500\nlora_target_modules: [to_q, to_v]\n")
    cfg = load_config(DPOConfig, str(cfg_file), parse_overrides(["--output_dir", "o", "--beta=100", "--use_lora", "false"]))
    assert (cfg.max_steps, cfg.beta, cfg.use_lora, cfg.lora_target_modules) == (7, 100.0, False, ["to_q", "to_v"])
    cfg_file.write_text("betta: 3\n")
    with pytest.raises(ConfigError, match=r"betta: unknown config key .*'beta'"):
        load_config(DPOConfig, str(cfg_file), {"output_dir": "o"})


def test_refuses_non_empty_output_dir(tmp_path, pairs):
    (tmp_path / "precious.txt").write_text("user data")
    with pytest.raises(ConfigError, match=r"output_dir: .* is not empty; pass --resume latest"):
        Trainer(DiffusionDPO(dpo_config(tmp_path, pairs))).train()
    assert (tmp_path / "precious.txt").read_text() == "user data"


def test_cli_reports_bad_key(tmp_path, capsys):
    from diffplug.finetune.cli import main

    assert main(["dpo", "--output_dir", str(tmp_path / "o"), "--max_step", "3"]) == 2
    assert "max_step: unknown config key for `dpo`; did you mean 'max_steps'?" in capsys.readouterr().err


# -- the DPO loss -----------------------------------------------------------------------------------


def test_dpo_loss_identities():
    g = torch.Generator().manual_seed(0)
    e = torch.rand(4, 8, generator=g)
    # theta = ref -> log 2
    losses, inside = dpo_loss(e[0], e[1], e[0], e[1], beta=5000.0)
    assert torch.allclose(losses, torch.full_like(losses, np.log(2.0)))
    # swapping winner and loser flips `inside`
    _, a = dpo_loss(e[0], e[1], e[2], e[3], 5000.0)
    _, b = dpo_loss(e[1], e[0], e[3], e[2], 5000.0)
    assert torch.allclose(a, -b)
    # official beta/2 form == diffusers' research form -logsigmoid(beta' (ref_diff - model_diff)), beta' = 2500
    official, _ = dpo_loss(e[0], e[1], e[2], e[3], 5000.0)
    diffusers_form = -torch.nn.functional.logsigmoid(2500.0 * ((e[2] - e[3]) - (e[0] - e[1])))
    assert torch.allclose(official, diffusers_form)
    # gradient sign: lowering the winner's error lowers the loss
    w = e[0].clone().requires_grad_(True)
    dpo_loss(w, e[1], e[2], e[3], 50.0)[0].sum().backward()
    assert (w.grad > 0).all()
    # hinge / ipo at theta = ref: 1 and (1/beta)^2
    assert torch.allclose(dpo_loss(e[0], e[1], e[0], e[1], 10.0, "hinge")[0], torch.ones(8))
    assert torch.allclose(dpo_loss(e[0], e[1], e[0], e[1], 10.0, "ipo")[0], torch.full((8,), 0.01))


def test_pick_a_pic_layout_drops_ties_and_orders_pairs(pairs):
    from diffplug.finetune.pairs import load_pairs

    ds = load_pairs(str(pairs), 32)
    assert len(ds) == 4  # the tie row is gone
    item = ds[0]
    assert item["image_w"].mean() > item["image_l"].mean()  # bright (jpg_1, label_0 = 0) comes first
    assert item["image_w"].shape == (3, 32, 32) and -1 <= item["image_w"].min() <= item["image_w"].max() <= 1


def test_loss_decreases_on_fixed_batch(tmp_path, pairs):
    cfg = dpo_config(tmp_path / "run", pairs, learning_rate=3e-3, random_flip=False)
    method = DiffusionDPO(cfg)
    trainer = Trainer(method)
    trainer._setup()
    batch = method_batch = trainer.collate([trainer.dataset[i] for i in range(2)])
    method_batch["positions"] = torch.tensor([0, 1])  # fixed noise and timesteps
    losses = []
    for _ in range(6):
        loss, logs = method.loss(trainer, batch)
        trainer.accelerator.backward(loss)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        losses.append(float(loss))
    assert abs(losses[0] - np.log(2)) < 1e-5  # LoRA starts at the reference (B = 0)
    assert losses[-1] < losses[0] - 0.05, losses


# -- checkpoints, resume, final weights ---------------------------------------------------------------


def test_run_layout(reference_run):
    names = sorted(p.name for p in reference_run.iterdir())
    assert {"checkpoint-2", "checkpoint-4", "final", "config.yaml", "logs.jsonl"} <= set(names)
    assert not [n for n in names if n.startswith(".tmp")]
    logs = [json.loads(line) for line in (reference_run / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3, 4] and all("implicit_acc" in r for r in logs)
    assert ckpt.read_state(reference_run / "checkpoint-2")["step"] == 2


def test_resume_matches_uninterrupted_run(tmp_path, reference_run, pairs):
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(reference_run / "checkpoint-2", out / "checkpoint-2")
    Trainer(DiffusionDPO(dpo_config(out, pairs, resume="latest"))).train()
    a, b = lora_state(reference_run), lora_state(out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # and it really trained from step 2: the weights moved away from checkpoint-2's
    mid = load_file(str(reference_run / "checkpoint-2" / "trainable.safetensors"))
    assert any(not torch.equal(v, load_file(str(out / "checkpoint-4" / "trainable.safetensors"))[k]) for k, v in mid.items())


def test_periodic_reward_evaluation_logs_and_leaves_training_alone(tmp_path, reference_run, pairs):
    out = tmp_path / "evaluated"
    cfg = dpo_config(out, pairs, eval_every=2, eval_reward="jpeg_compressibility",
                     eval_prompts=["a photo 0"], eval_images_per_prompt=2)
    trainer = Trainer(DiffusionDPO(cfg))
    trainer.train()
    evals = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "eval_reward" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert all(r["train_seconds"] >= 0 for r in evals) and evals[0]["train_seconds"] <= evals[-1]["train_seconds"]
    # the step-4 score is that of the final weights' samples (same seed), recomputed independently
    from diffplug.evals import get_reward

    images = trainer._sample(["a photo 0"], 2)
    assert evals[-1]["eval_reward"] == pytest.approx(float(get_reward("jpeg_compressibility")(images, ["a photo 0"] * 2).mean()))
    # evaluating draws no training randomness: the weights equal those of the run without evaluations
    a, b = lora_state(reference_run), lora_state(out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_killed_save_keeps_previous_checkpoint(tmp_path, pairs, monkeypatch):
    from diffplug.finetune import state as run_state

    out = tmp_path / "killed"
    real = run_state.save
    calls = []

    def dying_save(folder, *args, **kw):
        calls.append(folder)
        if len(calls) == 2:  # the second save dies half-way
            (Path(folder) / "optimizer.json").write_bytes(b"trunc")
            raise KeyboardInterrupt("killed during save")
        return real(folder, *args, **kw)

    monkeypatch.setattr(run_state, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        Trainer(DiffusionDPO(dpo_config(out, pairs))).train()
    monkeypatch.setattr(run_state, "save", real)
    assert ckpt.latest(out).name == "checkpoint-2"
    assert (out / ".tmp-checkpoint-4").exists() and not (out / "checkpoint-4").exists()
    # the previous checkpoint is loadable: resuming from it completes the run and cleans the leftovers
    Trainer(DiffusionDPO(dpo_config(out, pairs, resume="latest"))).train()
    assert not (out / ".tmp-checkpoint-4").exists()
    assert ckpt.read_state(out / "checkpoint-4")["step"] == 4


def _interrupting_loss(monkeypatch, at_call: int, how: str):
    """DiffusionDPO.loss, with a Ctrl-C at its ``at_call``-th call (1 loss call per step here): a real SIGINT
    sent to this process (the trainer's handler), or a KeyboardInterrupt raised inside the step. A raised one
    in a method with its own run state is tested on the SPM (test_finetune_spo.py), which has none."""
    import signal

    real, calls = DiffusionDPO.loss, []

    def loss(self, trainer, batch):
        calls.append(trainer.step)
        if len(calls) == at_call:
            if how == "raise":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, trainer, batch)

    monkeypatch.setattr(DiffusionDPO, "loss", loss)
    return real


def test_ctrl_c_saves_the_step_prints_the_resume_command_and_resumes_exactly(tmp_path, reference_run, pairs,
                                                                              monkeypatch, capsys):
    import shlex

    from diffplug.finetune.cli import main

    out = tmp_path / "ctrl-c"
    flags = ["--output_dir", str(out), "--model", "tiny:sd", "--data", str(pairs), "--max_steps", "4",
             "--checkpoint_every", "2", "--log_every", "1", "--train_batch_size", "2", "--learning_rate", "1e-3",
             "--lr_scheduler", "constant", "--beta", "500", "--tensorboard", "false", "--seed", "3"]
    real = _interrupting_loss(monkeypatch, 3, "signal")  # Ctrl-C in step 3: it ends, then is saved
    assert main(["dpo", *flags]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"interrupted after step 3 of 4: saved {out / 'checkpoint-3'}" in err
    assert ckpt.latest(out).name == "checkpoint-3" and ckpt.read_state(out / "checkpoint-3")["step"] == 3
    command = err.split("resume with: ", 1)[1].strip()
    # main() is `python -m diffplug.finetune`'s entry: the command starts the run the same way
    assert command == shlex.join(["python", "-m", "diffplug.finetune", "dpo", *flags, "--resume", "latest"])
    monkeypatch.setattr(DiffusionDPO, "loss", real)
    assert main(shlex.split(command)[3:]) == 0  # the printed command, as given
    a, b = lora_state(reference_run), lora_state(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit


def test_run_clock_times_phases_and_estimates_the_untimed_through_their_work():
    from diffplug.finetune.progress import RunClock

    now = [0.0]
    clock = RunClock(now=lambda: now[0])
    clock.plan("pairs", 10, work=100, label="prompts")
    clock.plan("train", 5, work=50, label="steps")
    clock.plan("evaluation", 1)  # work unknown: named, not guessed
    clock.start("pairs")
    now[0] = 4.0
    clock.advance("pairs", 2)  # 2 s a prompt, i.e. 0.02 s an image-evaluation
    assert clock.eta() == (pytest.approx(8 * 2.0 + 5 * 50 * 0.02), ["evaluation"])
    assert "train 5 steps 5 s" in clock.describe() and "evaluation 1 units (timed from the first)" in clock.describe()
    now[0] = 20.0
    clock.advance("pairs", 8)
    clock.start("train")
    now[0] = 23.0
    clock.advance("train")  # the first step took 3 s: its own time replaces the estimate
    assert clock.eta() == (pytest.approx(4 * 3.0), ["evaluation"])


def test_checkpoint_total_limit(tmp_path, pairs):
    out = tmp_path / "limited"
    Trainer(DiffusionDPO(dpo_config(out, pairs, max_steps=3, checkpoint_every=1, checkpoints_total_limit=2))).train()
    assert [p.name for p in ckpt.checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]


def test_final_lora_loads_into_stock_pipeline(reference_run, pairs):
    from diffplug.testing import tiny_pipeline

    pipe = tiny_pipeline("sd")
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = pipe.encode_prompt(["a photo 0"], "cpu", 1, False)[0]
    t = torch.tensor([500])
    with torch.no_grad():
        before = pipe.unet(x, t, encoder_hidden_states=cond).sample
        pipe.load_lora_weights(str(reference_run / "final"))
        after = pipe.unet(x, t, encoder_hidden_states=cond).sample
    assert (after - before).abs().max() > 1e-6  # the adapter is active and trained
    # and it is the trained adapter: the same numbers as the trainer's own model at the end
    trained = lora_state(reference_run)
    assert len(trained) > 0 and all(k.startswith("unet.") for k in trained)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_two_processes_equal_one_and_resume(tmp_path, reference_run, pairs):
    def torchrun(out, *extra):
        cmd = [
            "torchrun", "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000),
            "-m", "diffplug.finetune", "dpo", "--model", "tiny:sd", "--data", str(pairs), "--output_dir", str(out),
            "--max_steps", "4", "--checkpoint_every", "2", "--train_batch_size", "1", "--learning_rate", "1e-3",
            "--lr_scheduler", "constant", "--beta", "500", "--tensorboard", "false", "--seed", "3", "--log_every", "1",
            *extra,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "ddp"
    torchrun(out)
    a, b = lora_state(reference_run), lora_state(out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert ckpt.read_state(out / "checkpoint-4")["num_processes"] == 2
    assert {"rng-rank0.json", "rng-rank1.json"} <= {p.name for p in (out / "checkpoint-2").iterdir()}
    # both processes resume from their own files: the same final weights, bit for bit
    resumed = tmp_path / "ddp-resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    torchrun(resumed, "--resume", "latest")
    c = lora_state(resumed)
    assert all(torch.equal(b[k], c[k]) for k in b)


# -- data sources -------------------------------------------------------------------------------------


def _png(colour) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 32), colour).save(buf, format="PNG")
    return buf.getvalue()


PICKAPIC = {
    "caption": ["x", "y", "tie"],
    "jpg_0": [_png((0, 0, 0)), _png((255, 255, 255)), _png((9, 9, 9))],
    "jpg_1": [_png((255, 255, 255)), _png((0, 0, 0)), _png((9, 9, 9))],
    "label_0": [0.0, 1.0, 0.5],
}


def _check_white_wins(ds):
    assert len(ds) == 2
    for i in range(2):
        assert ds[i]["image_w"].mean() == 1.0 and ds[i]["image_l"].mean() == -1.0  # resized + cropped to 32


def test_parquet_pick_a_pic(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from diffplug.finetune.pairs import load_pairs

    pq.write_table(pa.table(PICKAPIC), str(tmp_path / "p.parquet"))
    _check_white_wins(load_pairs(str(tmp_path / "p.parquet"), 32))


def test_save_to_disk_folders(tmp_path):
    datasets = pytest.importorskip("datasets")
    from diffplug.finetune.pairs import load_pairs

    ds = datasets.Dataset.from_dict(PICKAPIC)
    ds = ds.cast_column("jpg_0", datasets.Image()).cast_column("jpg_1", datasets.Image())
    ds.save_to_disk(str(tmp_path / "flat"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    _check_white_wins(load_pairs(str(tmp_path / "flat"), 32))
    _check_white_wins(load_pairs(str(tmp_path / "dict"), 32))


def test_bad_data_sources_name_the_key(tmp_path):
    from diffplug.finetune.pairs import load_pairs

    with pytest.raises(ConfigError, match=r"data: .* does not exist"):
        load_pairs(str(tmp_path / "nope.jsonl"), 32)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"caption": "a", "jpg_0": "x.png"}) + "\n")
    with pytest.raises(ConfigError, match=r"data: .* no image pair; expected columns jpg_0, jpg_1, label_0"):
        load_pairs(str(tmp_path / "bad.jsonl"), 32)


def test_pairs_generated_from_a_reward(tmp_path, monkeypatch):
    import types

    mod = types.ModuleType("finetune_test_rewards")
    mod.brightness = lambda images, prompts: images.float().mean(dim=(1, 2, 3))
    monkeypatch.setitem(sys.modules, "finetune_test_rewards", mod)
    out = tmp_path / "gen"
    cfg = dpo_config(out, "generate", reward="finetune_test_rewards:brightness", prompts=["a", "b"], num_per_prompt=3,
                     generate_repeats=1, generate_steps=2, max_steps=1, checkpoint_every=0)
    Trainer(DiffusionDPO(cfg)).train()
    rows = [json.loads(line) for line in (out / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["score_w"] > r["score_l"] for r in rows)
    assert (out / "pairs" / rows[0]["image_w"]).is_file()


def test_sdxl_full_finetune_with_ema(tmp_path, pairs):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "xl"
    cfg = dpo_config(out, pairs, model="tiny:sdxl", use_lora=False, ema_decay=0.5, max_steps=2, checkpoint_every=0,
                     sample_every=2, sample_prompts=["a"], sample_steps=2)
    trainer = Trainer(DiffusionDPO(cfg))
    trainer.train()
    unet = UNet2DConditionModel.from_pretrained(str(out / "final"), subfolder="unet")
    ema = trainer.ema.shadow
    trained = [p for p in unet.parameters()]
    assert len(trained) == len(ema)
    for s, p in zip(ema, trained):  # the final weights are the EMA's
        torch.testing.assert_close(p.float(), s.float())
    assert (out / "samples" / "step-000002.png").is_file()
    # the frozen reference copy did not move
    from diffplug.testing import tiny_pipeline

    base = tiny_pipeline("sdxl").unet.state_dict()
    ref = trainer.adapter.copy.state_dict()
    assert all(torch.equal(base[k], ref[k]) for k in base)


@pytest.mark.parametrize("env, entry, start", [
    ({}, None, ["diffplug", "finetune"]),
    ({}, ("python", "-m", "diffplug.finetune"), ["python", "-m", "diffplug.finetune"]),
    ({"ACCELERATE_MIXED_PRECISION": "no"}, None, ["accelerate", "launch", "-m", "diffplug.finetune"]),
    ({"ACCELERATE_MIXED_PRECISION": "bf16", "WORLD_SIZE": "2"}, None,
     ["accelerate", "launch", "--num_processes", "2", "--mixed_precision", "bf16", "-m", "diffplug.finetune"]),
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, None, ["torchrun", "--nproc_per_node", "2", "-m", "diffplug.finetune"]),
])
def test_the_resume_command_starts_the_run_the_way_it_was_started(monkeypatch, env, entry, start):
    import argparse
    import shlex

    from diffplug.finetune.cli import resume_command

    for key in ("ACCELERATE_MIXED_PRECISION", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = argparse.Namespace(method_name="dpo", config=None, overrides=["--max_steps", "4", "--resume", "latest"])
    if entry:
        args.entry = entry
    assert shlex.split(resume_command(args)) == [*start, "dpo", "--max_steps", "4", "--resume", "latest"]

