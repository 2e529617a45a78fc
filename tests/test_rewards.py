"""The reward registry: every reward states its direction and range; the testbed rewards with headroom
(JPEG size, classifier log-probability of the prompted class, Hasler-Suesstrunk colourfulness)."""

from __future__ import annotations

import io
import math

import pytest
import torch

from diffplug.evals.rewards import colorfulness, get_reward, jpeg_size_kb, list_rewards, prompt_class

torch.set_num_threads(1)

LOCAL = ("jpeg_compressibility", "jpeg_incompressibility", "classifier_logprob", "colorfulness", "testbed")


def test_every_registered_reward_has_a_direction_and_range():
    assert set(LOCAL) <= set(list_rewards())
    for name in LOCAL:
        r = get_reward(name)
        lo, hi = r.range
        assert r.higher_is_better is True and lo < hi, name


@pytest.mark.parametrize("name", LOCAL)
def test_scores_lie_in_the_stated_range(name):
    r = get_reward(name)
    images = torch.rand(3, 3, 32, 32)
    images[1] = 0.5  # flat gray
    s = r(images, ["a photo of a coat", "a photo of a shirt", "a photo of a bag"])
    assert s.shape == (3,) and torch.isfinite(s).all()
    assert (s >= r.range[0]).all() and (s <= r.range[1]).all()


def test_jpeg_rewards_are_minus_and_plus_the_file_size():
    from PIL import Image

    images = torch.rand(2, 3, 32, 32)
    images[0] = 0.0
    a = (images[1].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=95)
    assert abs(float(jpeg_size_kb(images)[1]) - buf.tell() / 1000) < 1e-6
    comp, incomp = get_reward("jpeg_compressibility"), get_reward("jpeg_incompressibility")
    torch.testing.assert_close(comp(images, None), -incomp(images, None))
    assert comp(images, None)[0] > comp(images, None)[1]  # a flat image compresses better than noise


def test_colorfulness_matches_hasler_suesstrunk_by_hand():
    gray = torch.full((1, 3, 8, 8), 0.4)
    assert float(colorfulness(gray)) == 0.0
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1.0  # rg = 255, yb = 127.5 everywhere: no spread, M = 0.3 * |mean|
    assert abs(float(colorfulness(red)) - 0.3 * math.hypot(255, 127.5)) < 1e-3
    half = torch.zeros(1, 3, 2, 2)
    half[0, 0, 0] = 1.0  # rg = 255 on half the pixels: sd 127.5, yb: 127.5 on half: sd 63.75
    expected = math.hypot(127.5, 63.75) + 0.3 * math.hypot(127.5, 63.75)
    assert abs(float(colorfulness(half)) - expected) < 1e-3
    assert colorfulness(torch.rand(4, 3, 16, 16)).max() <= get_reward("colorfulness").range[1]
    with pytest.raises(ValueError, match="images: expected"):
        colorfulness(torch.rand(2, 1, 8, 8))


def test_prompt_class_reads_fashion_and_emoji_prompts():
    from diffplug.testbed.data import CLASSES

    assert CLASSES[prompt_class("a photo of a t-shirt")] == "t-shirt"
    assert CLASSES[prompt_class("a photo of a shirt")] == "shirt"
    assert CLASSES[prompt_class("a photo of an ankle boot")] == "ankle boot"
    assert CLASSES[prompt_class("an emoji of red apple")] == "Food & Drink"
    assert CLASSES[prompt_class("a red apple emoji")] == "Food & Drink"
    with pytest.raises(ValueError, match="prompts: 'a photo of a cat' names no testbed class"):
        prompt_class("a photo of a cat")
    with pytest.raises(ValueError, match="names no testbed emoji"):
        prompt_class("an emoji of nothing at all")


def test_classifier_logprob_is_the_log_softmax_of_the_prompted_class():
    from diffplug.testbed import load_classifier

    images = torch.rand(3, 3, 32, 32)
    prompts = ["a photo of a coat", "a photo of a shirt", "an emoji of red apple"]
    s = get_reward("classifier_logprob")(images, prompts)
    with torch.no_grad():
        logp = load_classifier()(images).log_softmax(-1)
    torch.testing.assert_close(s, logp[torch.arange(3), torch.tensor([4, 6, 13])])
    assert (s <= 0).all()
    with pytest.raises(ValueError, match="prompts: classifier_logprob needs one prompt per image"):
        get_reward("classifier_logprob")(images, None)


def test_list_rewards_command_prints_one_name_a_line(capsys):
    from diffplug.cli import main

    with pytest.raises(SystemExit) as e:
        main(["finetune", "--list-rewards"])
    assert e.value.code == 0
    assert capsys.readouterr().out.split() == list_rewards()
