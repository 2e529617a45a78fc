"""CLIP score (tiny random CLIP built offline), pixel statistics, sampler accuracy, rewards."""

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from diffplug.evals import (CLIPScore, GrayContrast, SamplerAccuracy, Saturation, brightness, clip_score, get_reward,
                            gray_contrast, list_rewards, psnr, saturation, trajectory_error)
from diffplug.evals.clip_score import TransformersCLIP, clip_preprocess


def _byte_chars():
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    extra = [b for b in range(256) if b not in keep]
    return [chr(c) for c in keep] + [chr(256 + i) for i in range(len(extra))]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialised CLIPModel + a byte-level CLIPTokenizer (no merges), saved locally."""
    import transformers

    d = tmp_path_factory.mktemp("tinyclip")
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    eos = vocab["<|endoftext|>"]
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=24, eos_token_id=eos,
                         bos_token_id=vocab["<|startoftext|>"], pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    transformers.CLIPModel(cfg).save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    return str(d / "model")


def _imgs(n, size=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def test_transformers_clip_cosine_is_the_models_own(tiny_clip):
    import transformers

    scorer = TransformersCLIP(tiny_clip)
    images, prompts = _imgs(3), ["a cat", "a red dress", "shoe"]
    cos = scorer(images, prompts)
    model = transformers.CLIPModel.from_pretrained(tiny_clip)
    tok = transformers.AutoTokenizer.from_pretrained(tiny_clip)
    with torch.no_grad():
        out = model(**tok(prompts, padding=True, return_tensors="pt"), pixel_values=clip_preprocess(images, 32))
    # CLIPModel's logits are logit_scale * cosine
    ref = out.logits_per_image.diagonal() / model.logit_scale.exp()
    torch.testing.assert_close(cos, ref, rtol=1e-4, atol=1e-5)
    s = clip_score(images, prompts, scorer)
    torch.testing.assert_close(s, 100 * cos.clamp(min=0))


def test_long_prompts_truncate_keeping_end_token_or_error(tiny_clip):
    scorer = TransformersCLIP(tiny_clip)
    long = "a very long prompt " * 10
    with pytest.warns(UserWarning, match="1 prompt"):
        ids = scorer.tokenize(["short", long])["input_ids"]
    assert ids.shape[1] == 24
    eos = scorer.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert ids[1, -1].item() == eos  # the end token survives truncation
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scorer.tokenize(["short"])  # no warning for prompts that fit
    strict = TransformersCLIP(tiny_clip, long_prompts="error")
    with pytest.raises(ValueError, match="context of 24"):
        strict(_imgs(1), [long])


def test_clip_score_metric_and_callable_scorer():
    fixed = torch.tensor([0.3, -0.2, 0.5, 0.1])
    scorer = lambda images, prompts: fixed[: len(images)]  # noqa: E731  (the testbed's scorer has this shape)
    m = CLIPScore(scorer=scorer)
    m.update(_imgs(2), ["a", "b"])
    m.update(_imgs(2), "same prompt for all")
    expected = 100 * (0.3 + 0.0 + 0.3 + 0.0) / 4  # second update sees fixed[:2] again; negatives clamp to 0
    assert m.compute().item() == pytest.approx(expected, rel=1e-6)
    assert m.mean_cosine.item() == pytest.approx((0.3 - 0.2 + 0.3 - 0.2) / 4, rel=1e-6)
    with pytest.raises(ValueError, match="prompts"):
        clip_score(_imgs(2), ["only one"], scorer)


def test_clip_backends_fail_clearly_without_local_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="path="):
        TransformersCLIP(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="pretrained="):
        CLIPScore(scorer="open_clip", model_name="ViT-B-32", path=str(tmp_path / "w.bin"))
    with pytest.raises(ValueError, match="model_name"):
        CLIPScore(scorer="open_clip")


def test_open_clip_backend_on_a_tiny_model(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    from diffplug.evals.clip_score import OpenCLIP

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                            "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "tiny-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "tiny-test.json")
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-test")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    scorer = OpenCLIP("tiny-test", str(tmp_path / "w.safetensors"))
    images, prompts = _imgs(2, 32), ["a cat", "a dog"]
    model.eval()
    with torch.no_grad():
        img = model.encode_image(clip_preprocess(images, 32, scorer.mean, scorer.std))
        txt = model.encode_text(open_clip.get_tokenizer("tiny-test")(prompts))
    torch.testing.assert_close(scorer(images, prompts), F.cosine_similarity(img, txt, dim=-1), rtol=1e-4, atol=1e-5)
    with pytest.warns(UserWarning, match="exceed"):
        scorer(images[:1], ["word " * 100])


def test_saturation_definition():
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1.0
    gray = torch.full((1, 3, 4, 4), 0.5)
    half = torch.zeros(1, 3, 4, 4)
    half[:, 0], half[:, 1], half[:, 2] = 1.0, 0.5, 0.5  # (1 - 0.5) / 1
    black = torch.zeros(1, 3, 4, 4)
    s = saturation(torch.cat([red, gray, half, black]))
    torch.testing.assert_close(s, torch.tensor([1.0, 0.0, 0.5, 0.0]))
    assert saturation((red * 255).to(torch.uint8)).item() == pytest.approx(1.0)
    torch.testing.assert_close(brightness(torch.cat([red, gray, half, black])), torch.tensor([1 / 3, 0.5, 2 / 3, 0.0]))
    assert brightness((gray * 255).to(torch.uint8)).item() == pytest.approx(127 / 255)
    m = Saturation()
    m.update(torch.cat([red, gray]))
    m.update(half)
    assert m.compute().item() == pytest.approx(0.5)
    # against PIL's HSV conversion on random colours
    from PIL import Image
    x = (torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).round().to(torch.uint8)
    hsv = Image.fromarray(x[0].permute(1, 2, 0).numpy()).convert("HSV")
    pil_s = torch.tensor(list(hsv.getdata()), dtype=torch.float32)[:, 1].mean() / 255
    assert saturation(x).item() == pytest.approx(pil_s.item(), abs=3e-3)  # PIL rounds S to 8 bits
    with pytest.raises(ValueError, match="colour"):
        saturation(torch.zeros(1, 1, 4, 4))


def test_gray_contrast_and_clipping():
    x = torch.zeros(2, 1, 2, 2)
    x[0] = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    x[1] = 0.5
    out = gray_contrast(x)
    torch.testing.assert_close(out["clip_black"], torch.tensor([0.25, 0.0]))
    torch.testing.assert_close(out["clip_white"], torch.tensor([0.25, 0.0]))
    torch.testing.assert_close(out["contrast"], torch.tensor([math.sqrt(0.125), 0.0]))
    m = GrayContrast()
    m.update(x)
    assert m.compute()["clip_black"].item() == pytest.approx(0.125)
    # RGB gray input reduces to the same luma
    torch.testing.assert_close(gray_contrast(x.expand(-1, 3, -1, -1))["contrast"], out["contrast"])


def test_sampler_accuracy():
    ref = torch.zeros(2, 4, 8, 8)
    x = ref.clone()
    x[0] += 0.1
    x[1] += 0.2
    e = trajectory_error(x, ref, data_range=1.0)
    assert e["mse"].item() == pytest.approx((0.01 + 0.04) / 2)
    assert e["psnr"].item() == pytest.approx((20 + 10 * math.log10(1 / 0.04)) / 2)
    torch.testing.assert_close(psnr(x, ref), torch.tensor([20.0, 10 * math.log10(25)], dtype=torch.float64))
    m = SamplerAccuracy(data_range=2.0)
    m.update(x[:1], ref[:1])
    m.update(x[1:], ref[1:])
    assert m.compute()["mse"].item() == pytest.approx(0.025)
    with pytest.raises(ValueError, match="same noise"):
        trajectory_error(x, ref[:1])


def test_rewards_registry_and_jpeg():
    assert {"jpeg_compressibility", "pickscore", "hpsv2", "aesthetic", "imagereward", "testbed",
            "clip_score"} <= set(list_rewards())
    flat = torch.full((1, 3, 64, 64), 0.5)
    noisy = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    r = get_reward("jpeg_compressibility")
    s = r(torch.cat([flat, noisy]), ["", ""])
    assert s.shape == (2,) and s[0] > s[1]  # flat compresses better -> higher reward
    assert torch.equal(get_reward("jpeg_incompressibility")(noisy, [""]), -r(noisy, [""]))
    with pytest.raises(ValueError, match="registered"):
        get_reward("nope")
    custom = get_reward(lambda images, prompts: images.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(custom(flat, None), torch.tensor([0.5]))


@pytest.mark.parametrize("name,kw,arg", [("pickscore", {}, "path="), ("hpsv2", {}, "path="),
                                         ("aesthetic", {}, "path="), ("imagereward", {}, "path="),
                                         ("hpsv2", {"path": "/no/such.pt"}, "path=")])
def test_local_weight_rewards_name_what_is_missing(name, kw, arg):
    with pytest.raises(FileNotFoundError, match=arg):
        get_reward(name, **kw)


def test_aesthetic_and_pickscore_on_tiny_clip(tiny_clip, tmp_path):
    import transformers
    from safetensors.torch import save_file

    from diffplug.evals.rewards import AestheticMLP

    torch.manual_seed(1)
    head = AestheticMLP(16)
    save_file(head.state_dict(), str(tmp_path / "head.safetensors"))
    r = get_reward("aesthetic", path=str(tmp_path / "head.safetensors"), clip_path=tiny_clip)
    images = _imgs(2, 32)
    model = transformers.CLIPModel.from_pretrained(tiny_clip)
    with torch.no_grad():
        emb = model.get_image_features(pixel_values=clip_preprocess(images, 32))
        emb = emb if torch.is_tensor(emb) else emb.pooler_output
        ref = head.eval()(F.normalize(emb, dim=-1))
    torch.testing.assert_close(r(images, None), ref, rtol=1e-4, atol=1e-5)

    ps = get_reward("pickscore", path=tiny_clip)
    cos = TransformersCLIP(tiny_clip)(images, ["a", "b"])
    torch.testing.assert_close(ps(images, ["a", "b"]), model.logit_scale.exp().detach() * cos, rtol=1e-4, atol=1e-5)


def test_testbed_features_and_scorer_wiring(monkeypatch):
    """The testbed hooks, with randomly initialised testbed models standing in for trained weights."""
    from diffplug import testbed
    from diffplug.evals import get_feature_network
    from diffplug.testbed.models import Classifier, ImageTower, Scorer

    torch.manual_seed(0)
    clf = Classifier().eval()
    monkeypatch.setattr(testbed, "load_classifier", lambda device=None, weights=None: clf)
    feats = get_feature_network("testbed")
    x = (torch.rand(3, 3, 32, 32) * 255).round().to(torch.uint8)
    f = feats(x)
    assert f.shape == (3, feats.num_features) == (3, 128)
    with torch.no_grad():
        ref = clf.net.features(2 * (x.float() / 255) - 1).mean(dim=(2, 3))
    torch.testing.assert_close(f, ref)

    class FakeText(torch.nn.Module):
        def forward(self, prompts):
            return F.normalize(torch.stack([torch.arange(384.0).roll(len(p)) for p in prompts]), dim=-1)

    scorer = Scorer(ImageTower(), FakeText()).eval()
    monkeypatch.setattr(testbed, "load_scorer", lambda **kw: scorer)
    r = get_reward("testbed")
    prompts = ["a photo of a bag", "an emoji of red apple", "x"]
    with torch.no_grad():
        torch.testing.assert_close(r(x, prompts), scorer(x.float() / 255, prompts))
    m = CLIPScore(scorer="testbed")
    m.update(x, prompts)
    assert 0 <= m.compute().item() <= 100


def test_clip_image_features_as_a_feature_network(tiny_clip):
    import transformers

    from diffplug.evals import FID, get_feature_network

    net = get_feature_network(f"clip:{tiny_clip}")
    images = (torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 255).round().to(torch.uint8)
    f = net(images)
    assert f.shape == (4, net.num_features) == (4, 16)
    model = transformers.CLIPModel.from_pretrained(tiny_clip)
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=clip_preprocess(images, 32))
    torch.testing.assert_close(f, ref if torch.is_tensor(ref) else ref.pooler_output, rtol=1e-4, atol=1e-5)
    m = FID(features=net)  # any feature network plugs into the metrics
    m.update(images, real=True)
    assert int(m.real_n) == 4
    with pytest.raises(FileNotFoundError, match="clip:"):
        get_feature_network("clip:/no/such/dir")


def test_dinov2_features_as_a_feature_network(tmp_path):
    """DINOv2 (the FD-DINOv2 protocol's network) from a local folder: the CLS token of the last layer
    after bicubic resize and ImageNet normalisation; a tiny random model built offline."""
    import transformers

    from diffplug.evals import FID, get_feature_network

    cfg = transformers.Dinov2Config(hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=32, image_size=28, patch_size=14)
    torch.manual_seed(0)
    transformers.Dinov2Model(cfg).save_pretrained(tmp_path / "dino", safe_serialization=True)
    net = get_feature_network(f"dinov2:{tmp_path / 'dino'}")
    images = (torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 255).round().to(torch.uint8)
    f = net(images)
    assert f.shape == (3, net.num_features) == (3, 24)
    x = torch.nn.functional.interpolate(images.float() / 255, size=(28, 28), mode="bicubic", align_corners=False,
                                        antialias=True).clamp(0, 1)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    model = transformers.Dinov2Model.from_pretrained(tmp_path / "dino").eval()
    with torch.no_grad():
        ref = model(pixel_values=x).last_hidden_state[:, 0]
    torch.testing.assert_close(f, ref, rtol=1e-4, atol=1e-5)
    m = FID(features=net)
    m.update(images, real=True)
    m.update(images.flip(-1), real=False)
    assert torch.isfinite(m.compute())
    with pytest.raises(FileNotFoundError, match="dinov2:"):
        get_feature_network("dinov2:/no/such/dir")


def _testbed_ready(*names):
    from pathlib import Path

    import diffplug.testbed as tb

    return all((Path(tb.WEIGHTS_DIR) / f"{n}.safetensors").is_file() for n in names)


@pytest.mark.skipif(not _testbed_ready("classifier", "scorer"), reason="testbed weights not trained yet")
def test_testbed_metrics_on_real_fashion_mnist():
    """Real data, real testbed models: the numbers move the right way."""
    from diffplug.evals import fid_from_features, get_feature_network
    from diffplug.evals.data import fashion_mnist
    from diffplug.testbed import data as D
    from diffplug.testbed import prompt_for_class

    if not (D.FASHION_DIR / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("apt-get install dataset-fashion-mnist")
    test, train = fashion_mnist("test", 300), fashion_mnist("train", 300)
    noisy = (train.float() + 60 * torch.randn(300, 1, 32, 32, generator=torch.Generator().manual_seed(0)))
    noisy = noisy.round().clamp(0, 255).to(torch.uint8)
    feats = get_feature_network("testbed")
    ft, fr, fn = feats(test), feats(train), feats(noisy)
    assert fid_from_features(ft, fr).item() < 0.5 * fid_from_features(ft, fn).item()

    labels = D.fashion_mnist("test").labels[:100].tolist()
    right = [prompt_for_class(k) for k in labels]
    wrong = [prompt_for_class((k + 5) % 10) for k in labels]
    m_right, m_wrong = CLIPScore(scorer="testbed"), CLIPScore(scorer="testbed")
    m_right.update(test[:100], right)
    m_wrong.update(test[:100], wrong)
    assert m_right.compute().item() > m_wrong.compute().item() + 5


def test_saturation_rises_with_colour_enhancement_on_real_emoji():
    import numpy as np
    from PIL import Image, ImageEnhance

    try:
        from diffplug.testbed import data
        images = data.emoji("test").images[:64]
    except Exception as e:  # noqa: BLE001  (emoji tarball not installed)
        pytest.skip(f"testbed emoji unavailable: {e}")

    def enhance(x, factor):
        return torch.stack([torch.from_numpy(np.asarray(ImageEnhance.Color(Image.fromarray(
            a.permute(1, 2, 0).numpy())).enhance(factor)).copy()).permute(2, 0, 1) for a in x])

    sats = [saturation(enhance(images, f)).mean().item() for f in (0.0, 0.5, 1.0, 2.0)]
    assert sats[0] < 0.02 and sats == sorted(sats) and sats[3] > sats[2] + 0.03
