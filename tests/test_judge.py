"""The independent judge: another architecture, another split, its own record, never a training reward."""

import argparse
import hashlib
import json
import math
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torch import nn

from diffplug.evals.cli import register
from diffplug.evals.rewards import get_reward, list_rewards
from diffplug.testbed import WEIGHTS_DIR, load_classifier, load_judge
from diffplug.testbed import data as D
from diffplug.testbed.models import Judge
from diffplug.testbed.train import judge_split, training_set

RECORD = json.loads((WEIGHTS_DIR / "judge.record.json").read_text())


@pytest.fixture(scope="module")
def judge():
    return load_judge()


def test_judge_is_another_architecture_with_small_recorded_weights(judge):
    assert isinstance(judge, Judge) and judge.classes == D.CLASSES
    kinds = {type(m) for m in judge.modules()}
    assert nn.BatchNorm2d in {type(m) for m in load_classifier().modules()}
    assert nn.BatchNorm2d not in kinds and nn.MultiheadAttention in kinds
    assert [m.kernel_size for m in judge.modules() if isinstance(m, nn.Conv2d)] == [(4, 4)]  # the patch embedding only
    assert (WEIGHTS_DIR / "judge.safetensors").stat().st_size <= 1 << 20
    assert RECORD["command"].startswith("python -m diffplug.testbed.train judge")
    assert RECORD["threads"] == 1 and RECORD["minutes"] <= 15 and RECORD["steps"] > 0
    assert RECORD["heldout_accuracy"]["fashion_mnist_test_5000_10000"] > 0.7


def _digests(images):
    return {hashlib.sha1(x.numpy().tobytes()).hexdigest() for x in images}


def test_judge_never_saw_a_classifier_training_image():
    train, held = judge_split()
    assert not _digests(train.images) & _digests(training_set("train").images)
    assert not _digests(held["fashion_mnist_test_5000_10000"].images) & _digests(train.images)
    assert set(train.labels.tolist()) == set(range(len(D.CLASSES)))  # every class, emoji categories included


def test_recorded_accuracy_reproduces(judge):
    held = judge_split()[1]["fashion_mnist_test_5000_10000"]
    with torch.no_grad():
        pred = torch.cat([judge(held.images[i:i + 500].float() / 255).argmax(-1) for i in range(0, len(held), 500)])
    acc = (pred == held.labels).float().mean().item()
    assert acc == pytest.approx(RECORD["heldout_accuracy"]["fashion_mnist_test_5000_10000"], abs=0.01)


def test_judge_is_never_a_training_reward():
    assert "judge" not in list_rewards()
    with pytest.raises(ValueError, match="unknown"):
        get_reward("judge")
    out = subprocess.run([sys.executable, "-m", "diffplug", "finetune", "--list-rewards"], capture_output=True, text=True)
    assert out.returncode == 0 and "classifier_logprob" in out.stdout.split()
    assert not [r for r in out.stdout.split() if "judge" in r]


def _parse(argv):
    parser = argparse.ArgumentParser(prog="diffplug")
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["eval", *argv])


def _folder(folder, images, prompts):
    folder.mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    (folder / "settings.json").write_text(json.dumps({
        "prompts": list(dict.fromkeys(prompts)), "seed": 0, "num_images_per_prompt": 4, "negative_prompt": None,
        "images": [{"file": f"{i:03d}.png", "prompt": p} for i, p in enumerate(prompts)]}))
    return folder


@pytest.fixture(scope="module")
def held_images():
    test = D.fashion_mnist("test")
    idx = [i for c in range(10) for i in (test.labels[5000:] == c).nonzero()[:4, 0].add(5000).tolist()]
    return test.images[idx], test.labels[idx]


def test_eval_metrics_judge_scores_the_prompted_class(tmp_path, judge, held_images):
    images, labels = held_images
    right = [D.prompt_for_class(int(c)) for c in labels]
    wrong = [D.prompt_for_class((int(c) + 5) % 10) for c in labels]
    results = {}
    for name, prompts in (("right", right), ("wrong", wrong)):
        folder = _folder(tmp_path / name, images, prompts)
        args = _parse(["--generated", str(folder), "--metrics", "judge", "--out", str(tmp_path / f"out_{name}"),
                       "--no-progress", "--num-workers", "0"])
        assert args.func(args) == 0
        results[name] = json.loads((tmp_path / f"out_{name}" / "metrics.json").read_text())
    with torch.no_grad():
        logp = judge(images.float() / 255).log_softmax(-1)
    want = logp.gather(1, labels[:, None])[:, 0]
    assert results["right"]["judge_logprob"] == pytest.approx(want.mean().item(), abs=1e-4)
    assert results["right"]["judge_accuracy"] == pytest.approx((logp.argmax(-1) == labels).float().mean().item())
    assert results["right"]["judge_accuracy"] > 0.7 and results["wrong"]["judge_accuracy"] < 0.1
    assert results["wrong"]["judge_logprob"] < results["right"]["judge_logprob"] + math.log(0.1)
    assert "judge" in results["right"]["protocol"]
    first = json.loads((tmp_path / "out_right" / "scores.jsonl").read_text().splitlines()[0])
    assert "judge_logprob" in first and not any(k.startswith("reward:") for k in first)  # the judge is no reward


def test_compare_reports_the_judge_gain(tmp_path, judge, held_images):
    images, labels = held_images
    prompts = [D.prompt_for_class(int(c)) for c in labels]
    noisy = (images.float() + 90 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 255)
    noisy = noisy.round().to(torch.uint8)
    a, b = _folder(tmp_path / "a", noisy, prompts), _folder(tmp_path / "b", images, prompts)
    args = _parse(["--compare", str(a), str(b), "--metrics", "judge", "--out", str(tmp_path / "out"), "--no-progress"])
    assert args.func(args) == 0
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    with torch.no_grad():
        la, lb = (judge(x.float() / 255).log_softmax(-1).gather(1, labels[:, None])[:, 0] for x in (noisy, images))
    assert m["gains"]["judge_logprob"]["gain"] == pytest.approx((la - lb).mean().item(), abs=1e-4)
    assert m["gains"]["judge_logprob"]["z_paired"] < -2 and "judge_accuracy" in m["gains"]
