"""Resuming reads safetensors and JSON only: pickles planted in a checkpoint are never executed, an
unreadable checkpoint is named (and ``--resume latest`` falls back past it), logs.jsonl keeps each
step once, and a resumed run still ends bit-identical to an uninterrupted one (tiny pipeline, CPU)."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffplug.finetune import ConfigError, Trainer
from diffplug.finetune import checkpoint as ckpt
from diffplug.finetune.dpo import DiffusionDPO, DPOConfig
from diffplug.finetune.trainer import _refuse_sharded_checkpoints

_spec = importlib.util.spec_from_file_location("_finetune_helpers", Path(__file__).with_name("test_finetune.py"))
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)
make_pairs, dpo_config, lora_state = _helpers.make_pairs, _helpers.dpo_config, _helpers.lora_state

# what accelerate's save_state writes (all unpickled by its load_state)
ACCELERATE_NAMES = [
    "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl", "random_states_1.pkl",
    "optimizer.bin", "scheduler.bin", "scaler.pt", "sampler.bin", "dl_state_dict.bin", "pytorch_model.bin",
    "model.safetensors", "pytorch_model_fsdp.bin", "optimizer_0.bin",
]


class Payload:
    """Unpickling it runs ``os.system("touch MARKER")``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path) -> None:
    if path.suffix in (".bin", ".pt"):
        torch.save({"state": Payload(marker)}, str(path))  # torch.load(weights_only=False) runs it
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))


pairs, reference_run = _helpers.pairs, _helpers.reference_run  # the same module-scoped fixtures


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_payload_really_runs_when_unpickled(tmp_path):
    """The planted files are live: loading them the pickle way creates the marker."""
    marker = tmp_path / "marker"
    plant(tmp_path / "x.pkl", marker)
    pickle.loads((tmp_path / "x.pkl").read_bytes())
    assert marker.exists()
    marker.unlink()
    plant(tmp_path / "x.bin", marker)
    torch.load(str(tmp_path / "x.bin"), weights_only=False)
    assert marker.exists()


def test_planted_accelerate_pickles_are_not_run(tmp_path, reference_run, pairs):
    out, marker = tmp_path / "resumed", tmp_path / "marker"
    out.mkdir()
    shutil.copytree(reference_run / "checkpoint-2", out / "checkpoint-2")
    for name in ACCELERATE_NAMES:
        plant(out / "checkpoint-2" / name, marker)
    Trainer(DiffusionDPO(dpo_config(out, pairs, resume="latest"))).train()
    assert not marker.exists()
    assert_bit_identical(lora_state(reference_run), lora_state(out))  # resume exact (not just close)
    # the new checkpoints hold safetensors and JSON only
    names = {p.name for p in (out / "checkpoint-4").iterdir()}
    assert names == {"trainable.safetensors", "optimizer.json", "optimizer.safetensors", "scheduler.json",
                     "rng-rank0.json", "rng-rank0.safetensors", "config.yaml", "trainer_state.json"}


def test_full_finetune_with_ema_resumes_bit_identically(tmp_path, pairs):
    kw = dict(use_lora=False, ema_decay=0.5)
    ref, res = tmp_path / "ref", tmp_path / "res"
    Trainer(DiffusionDPO(dpo_config(ref, pairs, **kw))).train()
    assert {"ema.json", "ema.safetensors"} <= {p.name for p in (ref / "checkpoint-2").iterdir()}
    shutil.copytree(ref / "checkpoint-2", res / "checkpoint-2")
    Trainer(DiffusionDPO(dpo_config(res, pairs, resume="latest", **kw))).train()
    weights = "final/unet/diffusion_pytorch_model.safetensors"
    assert_bit_identical(load_file(str(ref / weights)), load_file(str(res / weights)))  # EMA weights
    assert_bit_identical(load_file(str(ref / "checkpoint-4/trainable.safetensors")),
                         load_file(str(res / "checkpoint-4/trainable.safetensors")))  # trained weights


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, pairs):
    t = Trainer(DiffusionDPO(dpo_config(tmp_path_factory.mktemp("runs") / "loader", pairs)))
    t._setup()
    return t


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_a_tensor(path: Path) -> None:
    state = load_file(str(path))
    state.pop(sorted(state)[0])
    save_file(state, str(path))


CORRUPTIONS = [(name, "pickle") for name in (
    "trainable.safetensors", "optimizer.json", "optimizer.safetensors", "scheduler.json", "rng-rank0.json",
    "rng-rank0.safetensors", "trainer_state.json")] + [
    ("trainable.safetensors", "truncate"), ("optimizer.safetensors", "truncate"), ("rng-rank0.safetensors", "truncate"),
    ("trainable.safetensors", "drop"), ("optimizer.safetensors", "drop"), ("optimizer.json", "truncate"),
]


def test_bad_files_are_named_and_never_unpickled(tmp_path, reference_run, trainer):
    marker = tmp_path / "marker"
    trainer.config.resume = "folder"
    for i, (name, how) in enumerate(CORRUPTIONS):
        folder = tmp_path / f"c{i}" / "checkpoint-2"
        shutil.copytree(reference_run / "checkpoint-2", folder)
        {"pickle": lambda p: plant(p, marker), "truncate": _truncate, "drop": _drop_a_tensor}[how](folder / name)
        with pytest.raises(ckpt.CheckpointError, match=rf"cannot resume from {re.escape(str(folder))}: {re.escape(str(folder / name))}: ") as info:
            trainer._resume([folder])
        assert isinstance(info.value, ConfigError)  # the CLI prints it, no traceback
        assert not marker.exists(), (name, how)
    # the same trainer then resumes from the intact checkpoint
    assert trainer._resume([reference_run / "checkpoint-2"]) == 2
    trainer.config.resume = ""


def test_no_readable_checkpoint_is_a_clear_error(tmp_path, reference_run, trainer):
    out = tmp_path / "run"
    for step in (2, 4):
        shutil.copytree(reference_run / f"checkpoint-{step}", out / f"checkpoint-{step}")
        _truncate(out / f"checkpoint-{step}" / "optimizer.safetensors")
    trainer.config.resume, trainer.out = "latest", out
    with pytest.raises(ckpt.CheckpointError, match=r"no readable checkpoint .*checkpoint-4/optimizer.safetensors.*"
                                                    r"checkpoint-2/optimizer.safetensors"):
        trainer._resume(ckpt.resolve("latest", out))
    trainer.config.resume, trainer.out = "", Path(trainer.config.output_dir)
    assert [p.name for p in ckpt.checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]  # nothing moved


def test_latest_falls_back_past_a_truncated_checkpoint_and_logs_each_step_once(tmp_path, reference_run, pairs, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for step in (2, 4):
        shutil.copytree(reference_run / f"checkpoint-{step}", out / f"checkpoint-{step}")
    _truncate(out / "checkpoint-4" / "trainable.safetensors")
    old_logs = (reference_run / "logs.jsonl").read_text()
    (out / "logs.jsonl").write_text(old_logs + '{"step": 5, "loss": 0.6')  # a line cut short by a kill
    shutil.copy(reference_run / "config.yaml", out / "config.yaml")
    Trainer(DiffusionDPO(dpo_config(out, pairs, resume="latest"))).train()
    said = capsys.readouterr().out
    assert f"cannot resume from checkpoint-4: {out / 'checkpoint-4' / 'trainable.safetensors'}" in said
    assert "falling back to the previous checkpoint, checkpoint-2" in said
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in said
    # the bad checkpoint is kept aside, not overwritten; the run ends as the uninterrupted one
    assert (out / "checkpoint-4.corrupt" / "trainable.safetensors").is_file()
    assert_bit_identical(lora_state(reference_run), lora_state(out))
    records = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[:2] == [json.loads(line) for line in old_logs.splitlines()[:2]]  # steps 1-2 kept as they were


@pytest.mark.parametrize("key", ["learning_rate", "adam_epsilon", "beta", "max_grad_norm"])
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_floats_are_rejected_naming_the_key(key, value):
    from diffplug.finetune import load_config

    with pytest.raises(ConfigError, match=rf"^{key}: must be a finite number; got {value}$"):
        load_config(DPOConfig, None, {"output_dir": "x", key: value})


def test_sharded_runs_refuse_checkpoints_naming_the_option(tmp_path, pairs):
    with pytest.raises(ConfigError, match=r"^resume: runs under FSDP cannot be resumed"):
        _refuse_sharded_checkpoints(dpo_config(tmp_path, pairs, resume="latest"), "FSDP")
    with pytest.raises(ConfigError, match=r"^checkpoint_every: DEEPSPEED runs write no checkpoints.*--checkpoint_every 0"):
        _refuse_sharded_checkpoints(dpo_config(tmp_path, pairs), "DEEPSPEED")
    _refuse_sharded_checkpoints(dpo_config(tmp_path, pairs, checkpoint_every=0), "FSDP")  # final weights only: fine
