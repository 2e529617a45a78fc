"""`diffplug eval` folder mode end to end, with a cheap feature network passed as py:<module>:<attr>."""

import argparse
import json
import textwrap

import pytest
import torch
from PIL import Image

from diffplug.evals import fid_from_features, kernel_inception_distance, precision_recall
from diffplug.evals.cli import register, run
from diffplug.evals.data import ImageFolder
from diffplug.testbed.data import FASHION_DIR

FEATURES = textwrap.dedent("""
    import torch
    def tiny_features(images):
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)  # 48-d, any input size
    tiny_features.num_features = 48
""")


def _write_pngs(folder, n, seed, shift=0.0, size=32):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        a = (torch.rand(size, size, 3, generator=g) * 0.6 + shift).clamp(0, 1)
        Image.fromarray((a * 255).round().to(torch.uint8).numpy()).save(folder / f"{i:03d}.png")


def _parse(argv):
    parser = argparse.ArgumentParser(prog="diffplug")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    return parser.parse_args(["eval", *argv])


@pytest.fixture
def setup(tmp_path, monkeypatch):
    (tmp_path / "featmod.py").write_text(FEATURES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("DIFFPLUG_CACHE", str(tmp_path / "cache"))
    _write_pngs(tmp_path / "gen", 30, 0, shift=0.3)
    _write_pngs(tmp_path / "gen" / "sub", 3, 1, shift=0.3, size=40)  # a second size: grouped per size
    _write_pngs(tmp_path / "ref", 40, 2)
    return tmp_path


def _features_of(folder):
    from featmod import tiny_features

    return torch.cat([tiny_features(ImageFolder(folder)[i][None]) for i in range(len(ImageFolder(folder)))])


def test_folder_mode_writes_metrics_and_report(setup):
    tmp = setup
    argv = ["--generated", str(tmp / "gen"), "--reference", str(tmp / "ref"), "--features", "py:featmod:tiny_features",
            "--metrics", "fid,kid,precision,recall,saturation", "--out", str(tmp / "out"), "--num-workers", "2",
            "--batch-size", "8", "--no-progress", "--kid-subsets", "10"]
    args = _parse(argv)
    run(args)
    m = json.loads((tmp / "out" / "metrics.json").read_text())
    assert {"fid", "kid", "precision", "recall", "protocol", "saturation", "reference_saturation"} <= set(m)
    assert m["n_generated"] == 33 and m["n_reference"] == 40
    gen, ref = _features_of(tmp / "gen"), _features_of(tmp / "ref")
    assert m["fid"] == pytest.approx(fid_from_features(ref, gen).item(), rel=1e-6)
    kid, _ = kernel_inception_distance(gen, ref, subsets=10, subset_size=33)
    assert m["kid"] == pytest.approx(kid.item(), rel=1e-6)
    p, r = precision_recall(ref, gen)
    assert (m["precision"], m["recall"]) == pytest.approx((p.item(), r.item()))
    assert m["protocol"]["kid"]["subset_size"] == 33 and m["protocol"]["precision_recall"]["k"] == 3
    assert m["saturation"] != pytest.approx(m["reference_saturation"])
    html = (tmp / "out" / "report.html").read_text()
    assert "data:image/png;base64" in html and html.count("<svg") >= 2 and "Feature PCA" in html

    # never overwrite silently; --overwrite reuses the cached reference features
    with pytest.raises(FileExistsError, match="--overwrite"):
        run(_parse(argv))
    a = _parse(argv + ["--overwrite"])
    assert a.func(a) == 0  # what `diffplug eval` returns as its exit status
    cache = m["reference_cache"]
    assert cache and (tmp / "cache") in __import__("pathlib").Path(cache).parents
    args = _parse(argv + ["--overwrite"])
    m2 = run(args)
    assert m2["fid"] == pytest.approx(m["fid"], rel=1e-12) and m2["reference_cache"] == cache


def test_bad_arguments_fail_clearly(setup):
    tmp = setup
    with pytest.raises(ValueError, match="unknown"):
        a = _parse(["--generated", str(tmp / "gen"), "--reference", str(tmp / "ref"), "--metrics", "fid,lpips",
                    "--out", str(tmp / "o")])
        run(a)
    with pytest.raises(FileNotFoundError, match="--generated .*nope: no such folder"):
        a = _parse(["--generated", str(tmp / "nope"), "--reference", str(tmp / "ref"), "--features",
                    "py:featmod:tiny_features", "--out", str(tmp / "o2"), "--no-progress"])
        run(a)


@pytest.mark.skipif(not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_reference(setup):
    from diffplug.evals.data import fashion_mnist

    tmp = setup
    x = fashion_mnist("test", 5)
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.uint8
    assert (x[:, :, :2] == 0).all() and torch.equal(x[:, 0], x[:, 2])  # zero padding, gray as RGB
    a = _parse(["--generated", str(tmp / "gen"), "--reference", "fashion-mnist:test", "--reference-limit", "50",
                "--features", "py:featmod:tiny_features", "--metrics", "fid,precision,recall,contrast",
                "--out", str(tmp / "fm"), "--no-progress"])
    m = run(a)
    assert m["n_reference"] == 50 and m["reference"].startswith("fashion-mnist-test")
    assert m["reference_clip_black"] > 0.3  # Fashion-MNIST's black background


def test_spec_mode_sweeps_guidance_from_the_same_noise(setup):
    pytest.importorskip("diffplug.testing")
    tmp = setup
    spec = {"model": "tiny-sd", "steps": 1, "prompts": ["a photo of a bag"], "images_per_prompt": 2,
            "methods": [{"name": "CFG", "guidance": "cfg"}], "sweep": {"guidance_scale": [1.0, 4.0]},
            "reference": str(tmp / "ref"), "features": "py:featmod:tiny_features",
            "metrics": ["fid", "kid", "saturation", "accuracy"], "batch_size": 2,
            "accuracy_reference": {"scheduler": "ddim", "steps": 1}}  # = the runs' own sampler
    (tmp / "spec.json").write_text(json.dumps(spec))
    a = _parse(["--spec", str(tmp / "spec.json"), "--out", str(tmp / "sweep"), "--device", "cpu", "--no-progress"])
    res = run(a)
    runs = res["runs"]
    assert [r["guidance_scale"] for r in runs] == [1.0, 4.0]
    assert all({"fid", "kid", "saturation", "latent_mse", "image_psnr"} <= set(r) for r in runs)
    # the reference run is the same sampler, guidance and noise: zero error (a different noise would not be)
    assert all(r["latent_mse"] == 0 and r["image_psnr"] == float("inf") for r in runs)
    pngs = sorted((tmp / "sweep" / "images" / "CFG").rglob("*.png"))
    assert len(pngs) == 4
    # the scores are those of the saved images
    gen = _features_of(tmp / "sweep" / "images" / "CFG" / "guidance_scale=4.0")
    ref = _features_of(tmp / "ref")
    assert runs[1]["fid"] == pytest.approx(fid_from_features(ref, gen).item(), rel=1e-6)
    html = (tmp / "sweep" / "report.html").read_text()
    assert "fid vs guidance_scale" in html and "<polyline" in html
    assert json.loads((tmp / "sweep" / "metrics.json").read_text())["protocol"]["sweep"] == "guidance_scale"


def test_spec_mode_sweeps_steps_with_a_scheduler_per_method(setup):
    pytest.importorskip("diffplug.testing")
    tmp = setup
    spec = {"model": "tiny-sd", "prompts": ["a photo of a bag"], "images_per_prompt": 1,
            "methods": [{"name": "DDIM", "scheduler": "ddim"},
                        {"name": "UniPC", "scheduler": "unipc", "scheduler_options": {"solver_order": 1}}],
            "sweep": {"steps": [1, 2]}, "metrics": ["accuracy"], "batch_size": 1,
            "accuracy_reference": {"scheduler": "ddim", "steps": 2}}
    (tmp / "spec.json").write_text(json.dumps(spec))
    res = run(_parse(["--spec", str(tmp / "spec.json"), "--out", str(tmp / "steps"), "--device", "cpu", "--no-progress"]))
    runs = {(r["method"], r["steps"]): r for r in res["runs"]}
    assert runs[("DDIM", 2)]["scheduler"] == "DDIMScheduler" and runs[("UniPC", 1)]["scheduler"] == "UniPCMultistepScheduler"
    assert runs[("DDIM", 2)]["latent_mse"] == 0  # the reference run itself
    assert runs[("DDIM", 1)]["latent_mse"] > 0 and runs[("UniPC", 2)]["latent_mse"] > 0
    assert res["protocol"]["sweep"] == "steps" and "steps" not in runs[("DDIM", 1)]["options"]
    bad = dict(spec, methods=[{"name": "x", "schedular": "ddim"}])
    (tmp / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="schedular"):
        run(_parse(["--spec", str(tmp / "bad.json"), "--out", str(tmp / "bad"), "--device", "cpu", "--no-progress"]))


def test_image_folder_composites_alpha_on_white_and_matches_testbed_data(tmp_path):
    from diffplug.evals.data import fashion_mnist, image_loader

    rgba = torch.zeros(4, 4, 4, dtype=torch.uint8)
    rgba[..., 0] = 255  # red, fully transparent except one opaque pixel
    rgba[0, 0, 3] = 255
    (tmp_path / "a").mkdir()
    Image.fromarray(rgba.numpy(), mode="RGBA").save(tmp_path / "a" / "x.png")
    x = ImageFolder(tmp_path / "a")[0]
    assert x[:, 0, 0].tolist() == [255, 0, 0] and x[:, 1, 1].tolist() == [255, 255, 255]
    try:
        loader, ident = image_loader("testbed:fashion_mnist:test", 8, 0, limit=8)
    except Exception as e:  # noqa: BLE001  (data not installed)
        pytest.skip(f"testbed data unavailable: {e}")
    assert torch.equal(next(iter(loader)), fashion_mnist("test", 8)) and ident == "testbed-fashion_mnist-test-first8"
    with pytest.raises(ValueError, match="testbed:<dataset>:<split>"):
        image_loader("testbed:nope", 8, 0)


def _prompted_pngs(folder, n=4):
    _write_pngs(folder, n, 3)
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"file": f"{i:03d}.png", "prompt": "a photo of a bag"}) + "\n"
                                                  for i in range(n)))
    return folder / "prompts.jsonl"


@pytest.mark.parametrize("metric, opts", [("reward:testbed", []), ("reward:clip_score", ["--reward-opt", "scorer=testbed"])])
def test_differentiable_rewards_write_the_report(tmp_path, metric, opts):
    # the testbed scorer returns scores that require grad: report.html used to crash on .numpy()
    prompts = _prompted_pngs(tmp_path / "gen")
    args = _parse(["--generated", str(tmp_path / "gen"), "--prompts", str(prompts), "--metrics", metric, *opts,
                   "--out", str(tmp_path / "out"), "--no-progress", "--num-workers", "0"])
    assert args.func(args) == 0
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    name = metric.split(":")[1]
    assert m[f"reward_{name}"] == pytest.approx(
        sum(json.loads(line)[metric] for line in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()) / 4)
    assert f"reward {name} per image" in (tmp_path / "out" / "report.html").read_text()


def test_clip_score_without_a_folder_names_the_offline_scorer(tmp_path, capsys):
    from diffplug.cli import build_parser, main

    prompts = _prompted_pngs(tmp_path / "gen", 2)
    argv = ["eval", "--generated", str(tmp_path / "gen"), "--prompts", str(prompts), "--metrics", "reward:clip_score",
            "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 2
    assert "scorer=testbed" in capsys.readouterr().err and not (tmp_path / "out" / "metrics.json").exists()
    help_text = build_parser("eval")._subparsers._group_actions[0].choices["eval"].format_help()
    assert "scorer=testbed" in help_text


def test_a_full_disk_leaves_no_partial_output(tmp_path, monkeypatch, capsys, disk_full_at):
    from diffplug.cli import main

    prompts = _prompted_pngs(tmp_path / "gen")
    disk_full_at("report")  # report.html gets 100 bytes written, then the disk is full
    out = tmp_path / "out"
    argv = ["eval", "--generated", str(tmp_path / "gen"), "--prompts", str(prompts), "--metrics", "saturation,reward:testbed",
            "--out", str(out), "--no-progress", "--num-workers", "0"]
    assert main(argv) == 2  # as --help says: 2, nothing written
    err = capsys.readouterr().err
    assert f"could not write {out / 'report.html'}: No space left on device" in err and "Traceback" not in err
    assert list(out.iterdir()) == [], "no metrics.json without its report, no partial report, no temporary file"
    monkeypatch.undo()
    assert main(argv) == 0 and sorted(p.name for p in out.iterdir()) == ["metrics.json", "report.html", "scores.jsonl"]


def test_fid_paired_reads_a_spec_run_back_and_pairs_its_runs(setup, capsys):
    """benchmarks/fid_paired.py: the saved images give each run's FID back, and the base's difference is 0."""
    import re
    import sys
    from pathlib import Path

    pytest.importorskip("diffplug.testing")
    tmp = setup
    spec = {"model": "tiny-sd", "prompts": ["a photo of a bag", "a photo of a coat"], "images_per_prompt": 4,
            "methods": [{"name": "DDIM", "scheduler": "ddim"}, {"name": "UniPC", "scheduler": "unipc"}],
            "sweep": {"steps": [2]}, "reference": str(tmp / "ref"), "features": "py:featmod:tiny_features",
            "metrics": ["fid"], "batch_size": 4}
    (tmp / "spec.json").write_text(json.dumps(spec))
    res = run(_parse(["--spec", str(tmp / "spec.json"), "--out", str(tmp / "pair"), "--device", "cpu", "--no-progress"]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import fid_paired

    kept = sorted(p.name for p in (tmp / "pair" / "features").iterdir())  # the spec run keeps its features
    assert kept == ["DDIM_steps=2.safetensors", "UniPC_steps=2.safetensors"]
    fid_paired.main([str(tmp / "pair"), "--base", "DDIM", "--draws", "20"])
    out = capsys.readouterr().out
    (tmp / "pair" / "features" / "UniPC_steps=2.safetensors").unlink()  # a run from before: its images again
    fid_paired.main([str(tmp / "pair"), "--base", "DDIM", "--draws", "20"])
    assert capsys.readouterr().out.split("\n\n")[0] == out.split("\n\n")[0]
    assert (tmp / "pair" / "features" / "UniPC_steps=2.safetensors").is_file()
    fids = {r["method"]: r["fid"] for r in res["runs"]}
    ddim = re.search(r"^\| DDIM \| steps=2 \| ([\d.]+) \| ([\d.]+) \| – \|$", out, re.M)
    unipc = re.search(r"^\| UniPC \| steps=2 \| ([\d.]+) \| ([\d.]+) \| ([+-][\d.]+) ± ([\d.]+) ", out, re.M)
    assert ddim and unipc, out
    assert float(ddim[1]) == pytest.approx(fids["DDIM"], abs=0.01)
    assert float(unipc[3]) == pytest.approx(fids["UniPC"] - fids["DDIM"], abs=0.01) and float(unipc[4]) > 0
    with pytest.raises(SystemExit, match="matches 0 runs"):
        fid_paired.main([str(tmp / "pair"), "--base", "Euler"])
