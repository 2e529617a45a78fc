"""The testbed: data loaders, the shipped pipelines, export, scorers, the training CLI guard."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffplug import testbed
from diffplug.testbed import data as D

HAVE_FASHION = (D.FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file()
needs_fashion = pytest.mark.skipif(not HAVE_FASHION, reason="apt-get install dataset-fashion-mnist")


def _have_emoji() -> bool:
    try:
        D._emoji_source(None)
        return True
    except D.DataMissingError:
        return False


needs_emoji = pytest.mark.skipif(not _have_emoji(), reason="npm pack emoji-datasource-google into ~/.cache/diffplug/emoji")


# ------------------------------------------------------------------------------------------ data
def test_article_and_prompts():
    assert D.prompt_for_class("sneaker") == "a photo of a sneaker"
    assert D.prompt_for_class("ankle boot") == "a photo of an ankle boot"
    assert D.prompt_for_class(9) == "a photo of an ankle boot"
    assert [D.article(w) for w in ("apple", "bag", "unicorn", "hourglass", "umbrella")] == ["an", "a", "a", "an", "an"]
    with pytest.raises(ValueError, match="name_or_index"):
        D.prompt_for_class("sock")


@needs_fashion
def test_fashion_mnist_shapes_captions_padding():
    test = D.fashion_mnist("test")
    assert test.images.shape == (10000, 3, 32, 32) and test.images.dtype == torch.uint8
    assert len(test) == len(test.labels) == len(test.captions) == 10000
    assert set(test.labels.unique().tolist()) == set(range(10))
    assert torch.equal(test.images[:, 0], test.images[:, 1]) and torch.equal(test.images[:, 0], test.images[:, 2])
    # 2-pixel black border from padding 28 -> 32
    assert test.images[:, :, :2].max() == 0 and test.images[:, :, :, -2:].max() == 0
    # the t10k file starts with an ankle boot (label 9)
    assert int(test.labels[0]) == 9 and test.captions[0][0] == "a photo of an ankle boot"
    for label, caps in zip(test.labels[:50].tolist(), test.captions[:50]):
        assert caps[0] == D.prompt_for_class(label) and caps[0].islower()
    image, label, caption = test[0]
    assert image.dtype == torch.float32 and 0.0 <= image.min() and image.max() <= 1.0 and caption.startswith("a photo of")


@needs_emoji
def test_emoji_split_is_fixed_and_disjoint():
    train, test = D.emoji("train"), D.emoji("test")
    assert train.images.shape[1:] == (3, 32, 32) and train.images.dtype == torch.uint8
    assert 3000 < len(train) + len(test) < 4000 and 0.05 < len(test) / (len(train) + len(test)) < 0.2
    assert set(train.names).isdisjoint(test.names)
    assert all(int(label) >= len(D.FASHION_CLASSES) for label in test.labels)
    # composited on white: the corners of nearly every emoji are white
    assert (train.images[:, :, 0, 0] == 255).all(dim=1).float().mean() > 0.8
    again = D.emoji("test")
    assert again.names == test.names and torch.equal(again.images, test.images)
    assert test.captions[0][0] == f"an emoji of {test.names[0]}"
    assert any("skin tone" in n for n in train.names)


def test_missing_data_errors_name_the_install_command(tmp_path, monkeypatch):
    with pytest.raises(D.DataMissingError, match="apt-get install -y dataset-fashion-mnist"):
        D.fashion_mnist("test", root=tmp_path)
    monkeypatch.setenv("DIFFPLUG_DATA", str(tmp_path))
    with pytest.raises(D.DataMissingError, match="npm pack emoji-datasource-google") as err:
        D.emoji("train")
    assert str(tmp_path / "emoji") in str(err.value)
    with pytest.raises(D.DataMissingError, match="npm pack"):
        D.emoji("train", source=tmp_path / "nope.tgz")
    with pytest.raises(ValueError, match="split"):
        D.fashion_mnist("validation")


def test_emoji_from_extracted_folder_composites_on_white(tmp_path):
    from PIL import Image

    img_dir = tmp_path / "package" / "img" / "google" / "64"
    img_dir.mkdir(parents=True)
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[16:48, 16:48] = (255, 0, 0, 255)  # opaque red square on a transparent background
    Image.fromarray(rgba, "RGBA").save(img_dir / "1f34e.png")
    Image.fromarray(rgba, "RGBA").save(img_dir / "1f385-1f3fd.png")
    meta = [
        {"name": "RED APPLE", "unified": "1F34E", "image": "1f34e.png", "category": "Food & Drink", "has_img_google": True},
        {
            "name": "FATHER CHRISTMAS", "unified": "1F385", "image": "1f385.png", "category": "People & Body",
            "has_img_google": True,
            "skin_variations": {"1F3FD": {"image": "1f385-1f3fd.png", "has_img_google": True}},
        },
        {"name": "EMOJI COMPONENT RED HAIR", "unified": "1F9B0", "image": "1f9b0.png", "category": "Component"},
    ]  # fmt: skip
    (tmp_path / "package" / "emoji.json").write_text(json.dumps(meta))
    both = D.ImageSet.concat([D.emoji("train", source=tmp_path), D.emoji("test", source=tmp_path)])
    assert sorted(both.names) == ["father christmas, medium skin tone", "red apple"]  # base image missing: skipped
    image = both.images[both.names.index("red apple")]
    assert image[:, 0, 0].tolist() == [255, 255, 255] and image[:, 16, 16].tolist() == [255, 0, 0]
    label = int(both.labels[both.names.index("red apple")])
    assert D.CLASSES[label] == "Food & Drink"
    assert both.captions[both.names.index("red apple")] == ("an emoji of red apple", "a red apple emoji", "red apple")


def test_data_import_installs_nothing():
    import subprocess
    import sys

    code = "import sys; import diffplug.testbed; print('diffusers' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]  # importing the testbed loads no model library, installs nothing


# ------------------------------------------------------------------------------------ pipelines
@pytest.fixture(scope="module")
def sd():
    return testbed.load("sd")


def test_load_sd_generates_32px(sd):
    from diffusers import StableDiffusionPipeline

    assert isinstance(sd, StableDiffusionPipeline)
    assert sd.safety_checker is None and sd.tokenizer.model_max_length == 20
    assert sd.unet.config.cross_attention_dim == 384 and sd.unet.config.in_channels == 4
    out = sd("a photo of a sneaker", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    image = out.images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
    assert 0.0 <= image.min() and image.max() <= 1.0
    # the empty prompt embedding (what prompt dropout trained on) is what CFG's negative branch reads
    cond, uncond = sd.encode_prompt("a photo of a sneaker", "cpu", 1, True, None)
    assert cond.shape == uncond.shape == (1, 20, 384) and not torch.allclose(cond, uncond)


def test_vae_latents_have_unit_scale(sd):
    fashion = D.fashion_mnist("test").subset(range(64))
    x = fashion.floats() * 2 - 1
    with torch.no_grad():
        z = sd.vae.encode(x).latent_dist.mean * sd.vae.config.scaling_factor
        recon = sd.vae.decode(z / sd.vae.config.scaling_factor).sample
    assert z.shape == (64, 4, 16, 16)
    assert 0.6 < z.std().item() < 1.6
    assert (recon.clamp(-1, 1) - x).pow(2).mean().item() / 4 < 0.002  # PSNR > 27 dB (29.5 held out)


def test_export_round_trip(sd, tmp_path, monkeypatch):
    import argparse

    from diffusers import StableDiffusionPipeline

    from diffplug.testbed import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    target = tmp_path / "testbed-sd"
    args = parser.parse_args(["testbed", "export", str(target)])
    assert args.func(args) == 0
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("user file")
    refused = parser.parse_args(["testbed", "export", str(tmp_path / "busy")])
    with pytest.raises(SystemExit, match="not empty"):
        refused.func(refused)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "user file"

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = StableDiffusionPipeline.from_pretrained(target, local_files_only=True)
    assert loaded.tokenizer.model_max_length == 20 and loaded.text_encoder.config.use_attention_mask
    loaded.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=3, guidance_scale=4.0, output_type="pt")
    a = sd("a photo of a bag", generator=torch.Generator().manual_seed(1), **kwargs).images
    b = loaded("a photo of a bag", generator=torch.Generator().manual_seed(1), **kwargs).images
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_load_dit():
    from diffusers import PixArtSigmaPipeline

    pipe = testbed.load("dit")
    assert isinstance(pipe, PixArtSigmaPipeline)
    out = pipe(
        "a photo of a sneaker", num_inference_steps=2, use_resolution_binning=False,
        max_sequence_length=20, generator=torch.Generator().manual_seed(0), output_type="pt",
    )  # fmt: skip
    assert out.images.shape == (1, 3, 32, 32) and torch.isfinite(out.images).all()


def test_bad_name():
    with pytest.raises(ValueError, match="name="):
        testbed.load("sdxl")


# -------------------------------------------------------------------------------------- scorers
@needs_fashion
def test_classifier_shapes_and_accuracy():
    clf = testbed.load_classifier()
    test = D.fashion_mnist("test").subset(range(300))
    with torch.no_grad():
        logits = clf(test.floats())
        gray28 = clf(test.floats()[:4, :1, 2:30, 2:30])  # 1-channel 28x28 also accepted
        big = clf(torch.nn.functional.interpolate(test.floats()[:4], size=64))
    assert logits.shape == (300, len(D.CLASSES)) and gray28.shape == big.shape == (4, len(D.CLASSES))
    assert clf.classes[7] == "sneaker"
    accuracy = (logits.argmax(-1) == test.labels).float().mean().item()
    assert accuracy > 0.88  # 92% on the full test set (weights/classifier.record.json)
    with pytest.raises(ValueError, match="images"):
        clf(torch.rand(3, 32, 32))


@needs_fashion
def test_scorer_api_and_alignment():
    scorer = testbed.load_scorer()
    test = D.fashion_mnist("test").subset(range(200))
    prompts = [D.prompt_for_class(c) for c in D.FASHION_CLASSES]
    with torch.no_grad():
        sims = scorer.similarity_matrix(test.floats(), prompts)
        right = scorer(test.floats(), [prompts[k] for k in test.labels.tolist()])
        wrong = scorer(test.floats(), [prompts[(k + 5) % 10] for k in test.labels.tolist()])
        one = scorer(test.floats()[:3], "a photo of a bag")
    assert sims.shape == (200, 10) and right.shape == (200,) and one.shape == (3,)
    assert sims.abs().max() <= 1.0 + 1e-5
    torch.testing.assert_close(right, sims[torch.arange(200), test.labels])
    assert (right > wrong).float().mean() > 0.85
    with pytest.raises(ValueError, match="prompts"):
        scorer(test.floats()[:3], ["a", "b"])


# ----------------------------------------------------------------------------------- training
def test_train_refuses_to_overwrite(tmp_path):
    from diffplug.testbed import train

    (tmp_path / "classifier.safetensors").write_bytes(b"keep")
    with pytest.raises(SystemExit, match="--force"):
        train.main(["classifier", "--out", str(tmp_path), "--steps", "1"])
    assert (tmp_path / "classifier.safetensors").read_bytes() == b"keep"


def test_weights_within_budget_and_records():
    files = list(testbed.WEIGHTS_DIR.glob("*.safetensors"))
    assert {f.stem for f in files} >= {"vae", "unet", "dit", "classifier", "scorer"}
    assert sum(f.stat().st_size for f in files) <= 30 * 2**20
    for f in files:
        record = json.loads((f.parent / f"{f.stem}.record.json").read_text())
        runs = [record] + record.get("resumed_from", [])  # a zero-step run may re-finish saved weights
        assert record.get("total_steps", record["steps"]) > 0 and record["minutes"] > 0
        assert any(r["final_loss"] is not None for r in runs)


def test_center_latents_keeps_reconstructions_and_zero_means_the_latents():
    from diffusers import AutoencoderKL

    from diffplug.testbed import train

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), norm_num_groups=4, latent_channels=4).eval()
    x = torch.rand(6, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        vae.post_quant_conv.bias.normal_()  # a bias that the fold must carry, not overwrite
        z = vae.encode(x).latent_dist.mean
        before = vae.decode(z).sample
        shift = train.center_latents(vae, z.mean((0, 2, 3)) + 0.5)
        z2 = vae.encode(x).latent_dist.mean
        after = vae.decode(z2).sample
    torch.testing.assert_close(z2, z - shift.view(1, 4, 1, 1))
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z2.mean((0, 2, 3)), torch.full((4,), -0.5), atol=1e-5, rtol=0)


def test_training_noise_offset_is_a_per_channel_constant():
    from diffplug.testbed import train

    plain = train.training_noise((512, 4, 8, 8), torch.Generator().manual_seed(0))
    torch.testing.assert_close(plain, torch.randn(512, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    offset = train.training_noise((512, 4, 8, 8), torch.Generator().manual_seed(0), offset=0.3) - plain
    torch.testing.assert_close(offset, offset[..., :1, :1].expand_as(offset))  # constant over H, W
    assert 0.25 < offset[:, :, 0, 0].std().item() < 0.35
