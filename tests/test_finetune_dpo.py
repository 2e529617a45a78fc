"""Diffusion-DPO presets (`--preset paper | lora`) and the reward plumbing of `diffplug finetune dpo`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from diffplug.finetune import ConfigError
from diffplug.finetune.cli import main
from diffplug.finetune.dpo import PRESETS, DPOConfig

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        for name, mu in (("d", 60), ("b", 190)):
            Image.fromarray(np.clip(rng.normal(mu, 25, (32, 32, 3)), 0, 255).astype(np.uint8)).save(folder / f"{i}{name}.png")
        rows.append({"caption": f"a photo {i}", "chosen": f"{i}b.png", "rejected": f"{i}d.png"})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_paper_preset_is_the_papers_recipe_scaled_by_the_stated_rule():
    cfg = DPOConfig.from_preset("paper", output_dir="x", max_steps=200)
    assert cfg.use_lora is False and cfg.scale_lr is True and cfg.beta == 5000.0
    assert cfg.learning_rate == pytest.approx(1e-8 * 10)  # 1e-8 per sample x (testbed / SD pre-training LR)
    assert cfg.lr_scheduler == "constant_with_warmup" and cfg.lr_warmup_steps == 50  # 500 of 2000 steps
    tuned = DPOConfig.from_preset("lora", output_dir="x")
    assert tuned.learning_rate == 2e-3 and tuned.max_steps == 0  # LR chosen by the testbed sweep; steps from the pairs
    assert tuned.epochs == 20 and tuned.max_auto_steps == 100  # the sweep's 100 steps of 16 over 80 pairs, at most
    lora = DPOConfig.from_preset("lora", output_dir="x", learning_rate=3e-4)
    assert lora.use_lora and lora.lora_rank == 8 and lora.learning_rate == 3e-4  # an explicit key wins
    assert lora.gradient_accumulation_steps == 2 and lora.lr_warmup_steps == 0
    with pytest.raises(ConfigError, match="preset: must be one of"):
        DPOConfig.from_preset("fast", output_dir="x")
    assert DPOConfig(output_dir="x", reward="jpeg_compressibility").eval_reward == "jpeg_compressibility"


def _train_preset(tmp_path, pairs, preset: str, max_steps: int):
    """`diffplug finetune dpo --preset PRESET` on the tiny model: asserts it succeeds, returns its output folder."""
    out = tmp_path / preset
    args = ["dpo", "--preset", preset, "--output_dir", str(out), "--model", "tiny:sd", "--data", str(pairs),
            "--max_steps", str(max_steps), "--train_batch_size", "2", "--checkpoint_every", "0",
            "--tensorboard", "false", "--log_every", "1"]
    assert main(args) == 0
    return out


def test_cli_preset_lora_trains_and_records_the_resolved_config(tmp_path, pairs):
    out = _train_preset(tmp_path, pairs, "lora", 2)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["preset"] == "lora" and saved["gradient_accumulation_steps"] == 2 and saved["train_batch_size"] == 2
    assert saved["learning_rate"] == PRESETS["lora"]["learning_rate"]
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_cli_preset_paper_fine_tunes_the_full_unet_with_scaled_lr(tmp_path, pairs):
    out = _train_preset(tmp_path, pairs, "paper", 4)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["use_lora"] is False and saved["scale_lr"] is True and saved["lr_warmup_steps"] == 1
    logs = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    assert logs[-1]["lr"] == pytest.approx(1e-7 * 2)  # scale_lr: per-sample LR x global batch, after warm-up
    assert (out / "final" / "unet" / "config.json").is_file()


def test_cli_rejects_an_unknown_preset(tmp_path, capsys):
    assert main(["dpo", "--preset", "fast", "--output_dir", str(tmp_path / "o")]) == 2
    assert "preset: must be one of" in capsys.readouterr().err


def test_generated_pairs_show_progress_and_are_best_vs_worst(tmp_path, capsys):
    out = tmp_path / "gen"
    args = ["dpo", "--preset", "lora", "--output_dir", str(out), "--model", "tiny:sd", "--reward", "jpeg_compressibility",
            "--prompts", "a,b", "--num_per_prompt", "3", "--generate_repeats", "1", "--generate_steps", "2",
            "--max_steps", "1", "--train_batch_size", "2", "--checkpoint_every", "0", "--tensorboard", "false"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "pairs (pairs)" in err and "2/2" in err  # a bar over the prompts, on the main process
    rows = [json.loads(line) for line in (out / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert [r["caption"] for r in rows] == ["a", "b"] and all(r["score_w"] > r["score_l"] for r in rows)
