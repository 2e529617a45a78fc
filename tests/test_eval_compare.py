"""`diffplug eval --compare A B`: paired gains of two sample folders, refusals, the reward-hacking label."""

import argparse
import json

import pytest
import torch
from PIL import Image

from diffplug.evals.cli import register
from diffplug.evals.image_stats import sharpness
from diffplug.evals.stats import gain
from diffplug.testbed import data as D


def _parse(argv):
    parser = argparse.ArgumentParser(prog="diffplug")
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["eval", *argv])


def _sample_folder(folder, images, prompts, seed=0, per_prompt=None):
    """A folder as `diffplug sample` writes it: NNN.png and settings.json with the image list."""
    folder.mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    unique = list(dict.fromkeys(prompts))
    settings = {"model": "testbed", "prompts": unique, "negative_prompt": None, "seed": seed,
                "num_images_per_prompt": per_prompt or len(images) // len(unique),
                "images": [{"file": f"{i:03d}.png", "prompt": p} for i, p in enumerate(prompts)]}
    (folder / "settings.json").write_text(json.dumps(settings))
    return folder


def _blur(images):
    x = images.float()
    k = torch.ones(3, 1, 3, 3) / 9
    return torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3
                                      ).round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def real():
    """24 held-out Fashion-MNIST test images (3 per class of the first 8) with their class prompts."""
    test = D.fashion_mnist("test")
    idx = [i for c in range(8) for i in (test.labels[5000:] == c).nonzero()[:3, 0].add(5000).tolist()]
    return test.images[idx], [D.prompt_for_class(int(test.labels[i])) for i in idx]


def test_blur_raises_jpeg_reward_and_is_labelled_reward_hacking(tmp_path, real):
    images, prompts = real
    b = _sample_folder(tmp_path / "base", images, prompts)
    a = _sample_folder(tmp_path / "tuned", _blur(images), prompts)
    args = _parse(["--compare", str(a), str(b), "--metrics", "reward:jpeg_compressibility,sharpness",
                   "--out", str(tmp_path / "out"), "--no-progress"])
    assert args.func(args) == 0
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["n_pairs"] == 24
    # the numbers are diffplug.evals.stats.gain of the per-image values, A over B
    want = gain(sharpness(images), sharpness(_blur(images))).as_dict()
    got = m["gains"]["sharpness"]
    assert got["gain"] == pytest.approx(want["gain"], rel=1e-5) and got["paired_se"] == pytest.approx(want["paired_se"], rel=1e-4)
    assert got["two_sample_se"] == pytest.approx(want["two_sample_se"], rel=1e-4) and got["two_sample_se"] != got["paired_se"]
    assert got["z_paired"] < -2 and m["gains"]["reward_jpeg_compressibility"]["z_paired"] > 2
    assert m["reward_hacking"]["label"] == "reward hacking?"
    assert m["reward_hacking"]["reward_gains"] == ["reward_jpeg_compressibility"]
    assert m["reward_hacking"]["costs"][0].startswith("sharpness")
    report = (tmp_path / "out" / "report.html").read_text()
    assert "reward hacking?" in report and f"A ({a})" in report and f"B ({b})" in report  # grids side by side


def test_a_folder_against_itself_gains_nothing(tmp_path, real):
    images, prompts = real
    b = _sample_folder(tmp_path / "base", images, prompts)
    args = _parse(["--compare", str(b), str(b), "--metrics", "reward:jpeg_compressibility,sharpness",
                   "--out", str(tmp_path / "out"), "--no-progress"])
    assert args.func(args) == 0
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert all(g["gain"] == 0 and g["paired_se"] == 0 for g in m["gains"].values())
    assert m["reward_hacking"]["label"] is None


@pytest.mark.parametrize("change, message", [
    (dict(seed=1), "seed differs"),
    (dict(n=2), "num_images_per_prompt differs"),
    (dict(prompts=True), "prompts differs"),
])
def test_unpaired_folders_are_refused_naming_the_mismatch(tmp_path, real, change, message):
    images, prompts = real
    b = _sample_folder(tmp_path / "base", images, prompts)
    keep = [i for i in range(24) if i % 3 != 2] if "n" in change else list(range(24))  # 2 per prompt, not 3
    other = [prompts[i] for i in keep]
    if change.get("prompts"):
        other[0] = "a photo of a bag"
    a = _sample_folder(tmp_path / "tuned", images[keep], other, seed=change.get("seed", 0))
    args = _parse(["--compare", str(a), str(b), "--metrics", "sharpness", "--out", str(tmp_path / "out"),
                   "--no-progress"])
    with pytest.raises(ValueError, match=message):
        args.func(args)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_compare_needs_sample_folders_and_paired_metrics(tmp_path, real):
    images, prompts = real
    b = _sample_folder(tmp_path / "base", images, prompts)
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="no settings.json"):
        a = _parse(["--compare", str(tmp_path / "plain"), str(b), "--metrics", "sharpness", "--out", str(tmp_path / "o")])
        a.func(a)
    with pytest.raises(ValueError, match="not paired metrics"):
        a = _parse(["--compare", str(b), str(b), "--metrics", "kid", "--out", str(tmp_path / "o")])
        a.func(a)
    with pytest.raises(ValueError, match="replaces --generated"):
        a = _parse(["--compare", str(b), str(b), "--generated", str(b), "--metrics", "sharpness", "--out", str(tmp_path / "o")])
        a.func(a)


def test_compare_two_diffplug_sample_runs_with_fid(tmp_path, monkeypatch):
    from diffplug.cli import main

    monkeypatch.setenv("DIFFPLUG_CACHE", str(tmp_path / "cache"))
    base = ["sample", "--model", "tiny-sd", "--prompt", "a cat", "--prompt", "a dog", "--num-images", "3", "--steps", "2"]
    assert main(base + ["--seed", "3", "--out", str(tmp_path / "a")]) == 0
    assert main(base + ["--seed", "3", "--guidance-scale", "9", "--out", str(tmp_path / "b")]) == 0
    assert main(base + ["--seed", "4", "--out", str(tmp_path / "c")]) == 0
    args = _parse(["--compare", str(tmp_path / "a"), str(tmp_path / "b"), "--metrics", "sharpness,fid",
                   "--reference", str(tmp_path / "c"), "--features", "testbed", "--out", str(tmp_path / "out"),
                   "--no-progress", "--no-cache"])
    assert args.func(args) == 0
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["n_pairs"] == 6 and m["fid"]["a"] > 0 and m["fid"]["b"] > 0 and m["fid"]["a"] != m["fid"]["b"]
    args = _parse(["--compare", str(tmp_path / "a"), str(tmp_path / "c"), "--metrics", "sharpness",
                   "--out", str(tmp_path / "out2"), "--no-progress"])
    with pytest.raises(ValueError, match="seed differs"):
        args.func(args)


# ------------------------------------------------------------------ the benchmarks' block (tensors, not folders)
def _smoothness(images, prompts):
    """A toy reward that loves blur: minus the mean absolute difference of horizontal neighbours."""
    x = images.float() / 255
    return -(x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3))


def test_block_labels_a_blur_gain_reward_hacking_and_matches_the_statistic(real):
    from diffplug.evals.compare import BLOCK_HEADER, block_cells, block_json, tuned_vs_base

    images, prompts = real
    blurred = _blur(images)
    block = tuned_vs_base(images, blurred, prompts, {"smooth": _smoothness}, reference=images)
    g = block["gains"]
    assert set(g) == {"reward_smooth", "sharpness", "judge_logprob", "judge_accuracy"}
    assert g["reward_smooth"].z_paired > 2 and g["sharpness"].z_paired < -2
    want = gain(sharpness(images), sharpness(blurred))
    assert g["sharpness"].gain == pytest.approx(want.gain, rel=1e-6)
    assert g["sharpness"].paired_se == pytest.approx(want.paired_se, rel=1e-6)
    assert block["fid"]["a"] > block["fid"]["b"] + 1 and abs(block["fid"]["b"]) < 1e-3  # blurred images sit further from the reference
    v = block["reward_hacking"]
    assert v["label"] == "reward hacking?" and v["reward_gains"] == ["reward_smooth"]
    assert any(c.startswith("sharpness") for c in v["costs"])
    cells = block_cells(block)
    assert len(cells) == len(BLOCK_HEADER) and "reward hacking?" in cells[-1] and "sharpness" in cells[-1]
    assert json.loads(json.dumps(block_json(block)))["reward_hacking"]["label"] == "reward hacking?"


def test_block_of_identical_images_gains_nothing(real):
    from diffplug.evals.compare import block_cells, tuned_vs_base

    images, prompts = real
    block = tuned_vs_base(images, images.clone(), prompts, {"smooth": _smoothness}, reference=images)
    assert all(g.gain == 0 and g.paired_se == 0 for g in block["gains"].values())
    assert block["fid"]["a"] == pytest.approx(block["fid"]["b"], abs=1e-6)
    assert block["reward_hacking"]["label"] is None and block["reward_hacking"]["reward_gains"] == []
    assert block_cells(block)[-1].startswith("–")


def test_block_refuses_unpaired_images(real):
    from diffplug.evals.compare import tuned_vs_base

    images, prompts = real
    with pytest.raises(ValueError, match="same seeds"):
        tuned_vs_base(images, images[:-1], prompts)
    with pytest.raises(ValueError, match="one prompt per image"):
        tuned_vs_base(images, images, prompts[:-1])
