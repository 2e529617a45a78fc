"""Presets that hold: steps from the number of pairs, a held-out split, early stopping, the over-fitting warning
(``finetune/pairs.py``: split_pairs, derive_steps, HeldOutMonitor, HeldOutPairs; keys in ``config.PairRunConfig``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from diffplug.finetune import ConfigError, Method, Trainer, load_config
from diffplug.finetune.config import PairRunConfig, auto_max_steps
from diffplug.finetune.dpo import DPOConfig
from diffplug.finetune.pairs import (HeldOutMonitor, HeldOutPairs, PairDataConfig, PreferencePairs, derive_steps,
                                     generate_rounds, held_out_count, load_pairs, split_pairs)

torch.set_num_threads(1)


def write_pairs(folder: Path, n: int, flipped=()) -> Path:
    """``n`` pairs, bright preferred over dark, except the ``flipped`` indices (dark preferred)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        for name, mu in (("d", 60), ("b", 190)):
            Image.fromarray(np.clip(rng.normal(mu, 25, (32, 32, 3)), 0, 255).astype(np.uint8)).save(folder / f"{i}{name}.png")
        w, l = ("d", "b") if i in flipped else ("b", "d")
        rows.append({"caption": f"a photo {i % 3}", "chosen": f"{i}{w}.png", "rejected": f"{i}{l}.png"})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


# -- the split and the step count --------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_covers_every_pair():
    train, held = split_pairs(32, 0.2, 4, seed=0)
    assert len(held) == 6 and len(train) == 26  # round(0.2 x 32)
    assert not set(train) & set(held) and sorted(train + held) == list(range(32))
    assert split_pairs(32, 0.2, 4, seed=0) == (train, held)  # a function of the seed alone
    assert split_pairs(32, 0.2, 4, seed=1)[1] != held
    assert len(split_pairs(10, 0.2, 4, seed=0)[1]) == 4  # at least heldout_min_pairs
    assert split_pairs(7, 0.2, 4, seed=0) == (list(range(7)), [])  # fewer than 2 x min: nothing held out
    assert held_out_count(100, 0.0, 4) == 0 and held_out_count(8, 0.2, 4) == 4 and held_out_count(100, 0.5, 4) == 50
    assert held_out_count(851_293, 0.2, 4, max_pairs=64) == 64  # Pick-a-Pic's size: a scoring stays cheap
    assert DPOConfig(output_dir="x").heldout_max_pairs == 64


def test_steps_and_generated_pairs_follow_the_data():
    cfg = DPOConfig.from_preset("lora", output_dir="x")
    assert cfg.max_steps == 0 and cfg.epochs == 20 and cfg.max_auto_steps == 100 and cfg.generate_repeats == 0
    assert derive_steps(cfg, 26, 16)[0] == 33  # ceil(20 x 26 / 16): the new user's 32 pairs no longer get 100 steps
    assert derive_steps(cfg, 64, 16)[0] == 80
    steps, why = derive_steps(cfg, 400, 16)
    assert steps == 100 and "capped at max_auto_steps 100" in why
    assert generate_rounds(cfg, 4) == 20 and generate_rounds(cfg, 20) == 4 and generate_rounds(cfg, 7) == 12  # >= 80
    assert generate_rounds(DPOConfig(output_dir="x", generate_repeats=3), 4) == 3
    assert DPOConfig.from_preset("lora", output_dir="x", max_steps=7).max_steps == 7  # given: kept
    paper = DPOConfig.from_preset("paper", output_dir="x")
    assert paper.warmup_fraction == 0.25 and paper.lr_warmup_steps == 0  # a quarter of the steps once they are known


@pytest.mark.parametrize("values,key", [
    (dict(warmup_fraction=0.1, lr_warmup_steps=5), "warmup_fraction, lr_warmup_steps"),
    (dict(heldout_fraction=0.6), "heldout_fraction"),
    (dict(epochs=0), "epochs"),
    (dict(patience=0), "patience"),
    (dict(heldout_max_pairs=2), "heldout_max_pairs"),
    (dict(max_steps=-1), "max_steps"),
    (dict(adapter="sara"), "sara_progressive_step"),  # half of a max_steps not yet known
])
def test_bad_run_keys_name_the_key(values, key):
    with pytest.raises(ConfigError, match=key):
        load_config(DPOConfig, None, {"output_dir": "x", **values})


def test_max_steps_zero_is_refused_where_steps_are_not_derived():
    from diffplug.finetune.spm import SPMConfig

    with pytest.raises(ConfigError, match="max_steps: must be >= 1"):
        load_config(SPMConfig, None, {"output_dir": "x", "max_steps": 0})
    assert "epochs" not in SPMConfig.__dataclass_fields__  # keys a method does not read are not offered


# -- early stopping, on stubbed scores ------------------------------------------------------------------------------


class _FakeTrainer:
    def __init__(self, **keys):
        self.config = DPOConfig(output_dir="x", max_steps=20, **keys)
        self.params = [torch.nn.Parameter(torch.zeros(3))]
        self.ema, self.is_main, self.printed = None, False, []

    def _print(self, msg):
        self.printed.append(msg)


def _monitor(trainer, losses, accs):
    monitor = HeldOutMonitor(None, trainer, [{}] * 8, [0, 1], [2, 3], None, every=2)
    seq = iter([{"heldout_loss": lo, "heldout_acc": ha, "train_loss": 0.1, "train_acc": ta} for lo, (ha, ta) in zip(losses, accs)])
    monitor.score = lambda tr: next(seq)
    return monitor


@pytest.mark.parametrize("metric", ["accuracy", "loss"])
def test_early_stopping_keeps_the_best_held_out_weights_and_warns_once(metric):
    tr = _FakeTrainer(patience=3, heldout_metric=metric)
    losses = [0.693, 0.60, 0.50, 0.55, 0.52, 0.70]
    accs = [(0.0, 0.0), (0.6, 0.6), (0.7, 0.8), (0.6, 0.9), (0.6, 1.0), (0.5, 1.0)]
    m = _monitor(tr, losses, accs)
    stops = []
    for k, step in enumerate(range(0, 12, 2)):
        with torch.no_grad():
            tr.params[0].fill_(float(k))  # the weights at this scoring: k
        stops.append(m.check(tr, step))
    assert stops == [False] * 5 + [True]  # 3 scorings without a lower held-out loss than step 4's
    assert m.best["step"] == 4 and m.stopped_at == 10
    warnings = [p for p in tr.printed if "OVER-FITTING" in p]
    assert len(warnings) == 1 and "step 6" in warnings[0]  # 0.9 on training pairs vs 0.6 held out; said once
    m.finish(tr)
    assert torch.equal(tr.params[0].detach(), torch.full((3,), 2.0))  # the weights scored at step 4
    assert any("kept the weights of step 4" in p for p in tr.printed)


def test_accuracy_and_loss_disagree_as_measured_on_the_emoji_prompts():
    """As `preset_check` saw (emoji prompts, colorfulness, lora): held-out accuracy 0.83 while the beta-5000 loss rose above
    ln 2. By accuracy the trained step wins; by loss the initial model does, and the run keeps it."""
    picks = {}
    for metric in ("accuracy", "loss"):
        tr = _FakeTrainer(patience=2, heldout_metric=metric)
        m = _monitor(tr, [0.6931, 1.05, 1.28, 1.40], [(0.0, 0.0), (0.83, 0.89), (0.81, 0.89), (0.80, 0.9)])
        stopped = []
        for k, step in enumerate(range(0, 8, 2)):
            with torch.no_grad():
                tr.params[0].fill_(float(k))
            stopped.append(m.check(tr, step))
        m.finish(tr)
        picks[metric] = (m.best["step"], float(tr.params[0][0].detach()), stopped.index(True) if True in stopped else None)
    assert picks == {"accuracy": (2, 1.0, 3), "loss": (0, 0.0, 2)}


def test_without_early_stopping_the_run_goes_on_and_keeps_its_last_weights():
    tr = _FakeTrainer(early_stopping=False, patience=1)
    m = _monitor(tr, [0.69, 0.5, 0.6, 0.7], [(0, 0), (0.7, 0.7), (0.6, 0.7), (0.5, 0.7)])
    for k, step in enumerate(range(0, 8, 2)):
        with torch.no_grad():
            tr.params[0].fill_(float(k))
        assert m.check(tr, step) is False
    m.finish(tr)
    assert torch.equal(tr.params[0].detach(), torch.full((3,), 3.0))
    assert not any("OVER-FITTING" in p for p in tr.printed)  # gap 0.2 < overfit_gap 0.25


# -- a synthetic over-fitting run through the real trainer ------------------------------------------------------------


@dataclass
class ToyConfig(PairDataConfig, PairRunConfig):
    max_steps: int = auto_max_steps()
    method = "toy"


class BrightnessPairs(HeldOutPairs, Method):
    """A one-weight preference model s(x) = w * mean(x), trained with the logistic pair loss; any method on
    pairs gets the held-out machinery the same way DPO does."""

    name = "toy"
    Config = ToyConfig

    def trainable(self, trainer):
        self.w = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.zeros_(self.w.weight)
        return self.w

    def setup(self, trainer):
        return self.hold_out(trainer, load_pairs(self.config.data, trainer.resolution), PreferencePairs.collate), \
            PreferencePairs.collate

    def loss(self, trainer, batch):
        s = trainer.unet(torch.cat([batch["image_w"], batch["image_l"]]).mean((1, 2, 3))[:, None])[:, 0]
        margin = 10 * (s[: len(s) // 2] - s[len(s) // 2:])
        return -F.logsigmoid(margin).mean(), {"implicit_acc": (margin > 0).float().mean()}

    def save_final(self, trainer, module, folder):
        from safetensors.torch import save_file

        Path(folder).mkdir(parents=True, exist_ok=True)
        save_file({"w": module.weight.detach().contiguous()}, str(Path(folder) / "toy.safetensors"))


def test_over_fitting_run_warns_stops_early_and_keeps_the_initial_weights(tmp_path, capsys):
    """The held-out pairs prefer the opposite of the training pairs: fitting the training pairs makes every
    held-out scoring worse, so the run stops after `patience` scorings and keeps step 0's weights."""
    n = 16
    _, held = split_pairs(n, 0.2, 4, seed=0)
    data = write_pairs(tmp_path / "pairs", n, flipped=held)
    keys = dict(output_dir=str(tmp_path / "run"), model="tiny:sd", data=str(data), train_batch_size=4, learning_rate=0.05,
                lr_scheduler="constant", heldout_draws=1, log_every=1, tensorboard=False, checkpoint_every=0)
    trainer = Trainer(BrightnessPairs(load_config(ToyConfig, None, keys)))
    trainer.train()
    out = capsys.readouterr().out
    assert "pairs: 12 for training, 4 held out (heldout_fraction 0.2 of 16, at least heldout_min_pairs 4" in out
    assert "max_steps 60: 20 epochs x 12 training pairs / 4 pairs per step" in out and "held-out scoring every 6 steps" in out
    assert "OVER-FITTING" in out and "early stopping at step 18 of 60" in out and "kept the weights of step 0" in out
    logs = [json.loads(line) for line in (tmp_path / "run" / "logs.jsonl").read_text().splitlines()]
    scored = [r for r in logs if "heldout_loss" in r]
    assert [r["step"] for r in scored] == [0, 6, 12, 18]
    assert scored[-1]["train_acc"] == 1.0 and scored[-1]["heldout_acc"] == 0.0
    assert all(a["heldout_loss"] < b["heldout_loss"] for a, b in zip(scored, scored[1:]))  # worse at every scoring
    assert max(r["step"] for r in logs) == 18  # no step trained after the stop
    from safetensors.torch import load_file

    assert float(load_file(str(tmp_path / "run" / "final" / "toy.safetensors"))["w"].abs().max()) == 0.0  # step 0's
    # the finished run resumes to the same final weights (the monitor's state is in the checkpoint)
    again = Trainer(BrightnessPairs(load_config(ToyConfig, None, {**keys, "resume": "latest"})))
    again.train()
    assert float(load_file(str(tmp_path / "run" / "final" / "toy.safetensors"))["w"].abs().max()) == 0.0


# -- DPO from the command line ---------------------------------------------------------------------------------------


def test_dpo_cli_derives_steps_holds_out_pairs_and_records_them(tmp_path, capsys):
    from diffplug.finetune.cli import main

    data = write_pairs(tmp_path / "pairs", 10)
    out = tmp_path / "run"
    assert main(["dpo", "--preset", "paper", "--output_dir", str(out), "--model", "tiny:sd", "--data", str(data),
                 "--train_batch_size", "2", "--epochs", "3", "--heldout_draws", "1", "--heldout_every", "3",
                 "--checkpoint_every", "0", "--tensorboard", "false", "--log_every", "1"]) == 0
    text = capsys.readouterr().out
    assert "pairs: 6 for training, 4 held out" in text and "max_steps 9: 3 epochs x 6 training pairs / 2 pairs per step" in text
    assert "lr_warmup_steps 2: warmup_fraction 0.25 of 9 steps" in text  # the paper's quarter, of the derived steps
    saved = yaml.safe_load((out / "final" / "config.yaml").read_text())
    assert saved["max_steps"] == 9 and saved["lr_warmup_steps"] == 2 and saved["warmup_fraction"] == 0.0
    scored = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines() if "heldout_loss" in line]
    assert [r["step"] for r in scored] == [0, 3, 6, 9]
    assert scored[0]["heldout_loss"] == pytest.approx(np.log(2), abs=1e-5)  # the initial model is the reference


def test_too_few_pairs_to_hold_out_is_said_loudly(tmp_path, capsys):
    from diffplug.finetune.cli import main

    data = write_pairs(tmp_path / "pairs", 4)
    assert main(["dpo", "--output_dir", str(tmp_path / "run"), "--model", "tiny:sd", "--data", str(data), "--max_steps", "1",
                 "--train_batch_size", "2", "--checkpoint_every", "0", "--tensorboard", "false"]) == 0
    assert "WARNING: only 4 pairs" in capsys.readouterr().out


def test_help_labels_every_preset_that_failed_the_check(capsys):
    from diffplug.finetune.cli import main
    from diffplug.finetune.dpo import NOT_VALIDATED

    with pytest.raises(SystemExit):
        main(["dpo", "--help"])
    out = capsys.readouterr().out
    for name, why in NOT_VALIDATED.items():
        assert f"{name}: NOT VALIDATED: {why}" in out
