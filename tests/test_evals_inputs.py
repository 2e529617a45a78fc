"""`diffplug eval` on awkward inputs: every PIL mode decoded to its full range, broken files, tiny
sets, diffplug sample folders (grid.png, prompts), reward metrics, the reference-time estimate."""

import argparse
import json
import struct
import textwrap
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from diffplug.evals import fid_from_features, get_reward, list_rewards, register_reward
from diffplug.evals.cli import command, register, run
from diffplug.evals.data import ImageFolder, load_image, select_images, to_rgb_uint8

FEATURES = textwrap.dedent("""
    import torch
    def tiny_features(images):
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)  # 48-d, any input size
    tiny_features.num_features = 48
""")

if "test_prompt_length" not in list_rewards():  # a reward that reads its prompts, registered once
    register_reward("test_prompt_length")(
        lambda scale=1.0: lambda images, prompts: torch.tensor([scale * len(p) for p in prompts]))


def _png16(path, arr: np.ndarray, color_type: int, trns: int | None = None):
    """Write a 16-bit PNG by hand (PIL cannot write 16-bit RGB): colour type 0 gray, 2 RGB, 4 gray+alpha."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    body = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
    if trns is not None:
        body += chunk(b"tRNS", struct.pack(">H", trns))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _rgb8(seed, n=1, size=16, gray=False):
    g = np.random.default_rng(seed)
    a = g.integers(0, 256, (n, size, size, 1 if gray else 3), dtype=np.uint8)
    a[:, :3, :3] = 255  # some pure white: what clipping would inflate
    return a


def _parse(argv):
    parser = argparse.ArgumentParser(prog="diffplug")
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["eval", *argv])


@pytest.fixture
def feats(tmp_path, monkeypatch):
    (tmp_path / "featmod.py").write_text(FEATURES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("DIFFPLUG_CACHE", str(tmp_path / "cache"))
    return ["--features", "py:featmod:tiny_features", "--num-workers", "0", "--no-progress"]


def test_16_bit_pngs_decode_like_their_8_bit_twins(tmp_path):
    gray, rgb = _rgb8(0, gray=True)[0], _rgb8(1)[0]
    Image.fromarray(gray[..., 0]).save(tmp_path / "g8.png")
    Image.fromarray(gray[..., 0].astype(np.uint16) * 257).save(tmp_path / "g16.png")  # PIL: mode I;16
    Image.fromarray(rgb).save(tmp_path / "c8.png")
    _png16(tmp_path / "c16.png", rgb.astype(np.uint16) * 257, 2)
    # not a multiple of 257: still within one 8-bit level
    _png16(tmp_path / "c16b.png", np.clip(rgb.astype(np.int64) * 257 + 100, 0, 65535), 2)
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    assert torch.equal(load_image(tmp_path / "g16.png"), load_image(tmp_path / "g8.png"))
    assert torch.equal(load_image(tmp_path / "c16.png"), load_image(tmp_path / "c8.png"))
    assert (load_image(tmp_path / "c16b.png").int() - load_image(tmp_path / "c8.png").int()).abs().max() <= 1
    # 16-bit gray with a transparent value and 16-bit gray + alpha: composited on white, like 8-bit RGBA
    g16 = gray[..., 0].astype(np.uint16) * 257
    _png16(tmp_path / "t16.png", g16, 0, trns=int(g16[5, 5]))
    x = load_image(tmp_path / "t16.png")
    keep = torch.from_numpy(gray[..., 0] != gray[5, 5, 0])
    assert (x[:, ~keep] == 255).all() and torch.equal(x[0][keep], torch.from_numpy(gray[..., 0])[keep])
    alpha = np.full_like(g16, 65535)
    alpha[0] = 0
    _png16(tmp_path / "la16.png", np.stack([g16, alpha], -1), 4)
    y = load_image(tmp_path / "la16.png")
    assert (y[:, 0] == 255).all() and torch.equal(y[0, 1:], torch.from_numpy(gray[1:, :, 0]))


@pytest.mark.parametrize("mode,make,expect", [
    ("I", lambda: Image.fromarray(np.array([[0, 65535, 257 * 128]], np.int32)), [0, 255, 128]),  # older PIL's 16-bit
    ("F", lambda: Image.fromarray(np.array([[0.0, 255.0, 127.6]], np.float32)), [0, 255, 128]),
    ("1", lambda: Image.fromarray(np.array([[0, 1, 1]], bool)), [0, 255, 255]),
    ("CMYK", lambda: Image.new("CMYK", (3, 1), (0, 0, 0, 0)), [255, 255, 255]),
    ("P", lambda: _palette_with_transparency(), [255, 0, 255]),  # index 0 transparent -> white
    ("La", lambda: Image.new("La", (3, 1), (40, 255)), [40, 40, 40]),
])
def test_every_mode_decodes_to_full_range_rgb(mode, make, expect):
    im = make()
    assert im.mode == mode
    a = to_rgb_uint8(im)
    assert a.dtype == np.uint8 and a.shape == (1, 3, 3)
    assert a[0, :, 0].tolist() == expect


def _palette_with_transparency():
    im = Image.new("P", (3, 1))
    im.putpalette([0, 0, 0, 0, 0, 0, 255, 255, 255])
    im.putdata([2, 1, 2])
    im.info["transparency"] = 2
    return im


def test_out_of_range_wide_modes_are_an_error():
    with pytest.raises(ValueError, match="outside 0..65535"):
        to_rgb_uint8(Image.fromarray(np.array([[70000]], np.int32)))


def test_16_bit_vs_8_bit_folders_give_fid_zero(tmp_path, feats):
    imgs = _rgb8(2, n=12, gray=True)
    for d in ("a8", "a16"):
        (tmp_path / d).mkdir()
    for i, a in enumerate(imgs):
        Image.fromarray(a[..., 0]).save(tmp_path / "a8" / f"{i}.png")
        Image.fromarray(a[..., 0].astype(np.uint16) * 257).save(tmp_path / "a16" / f"{i}.png")
    m = run(_parse(["--generated", str(tmp_path / "a16"), "--reference", str(tmp_path / "a8"), "--metrics",
                    "fid,contrast", "--out", str(tmp_path / "o"), *feats]))
    assert m["fid"] == pytest.approx(0, abs=1e-6)
    assert m["clip_white"] == pytest.approx(m["reference_clip_white"]) and m["clip_white"] < 0.2


def test_broken_file_is_skipped_and_named_or_stops_the_run(tmp_path, feats):
    gen = tmp_path / "gen"
    gen.mkdir()
    for i, a in enumerate(_rgb8(3, n=6)):
        Image.fromarray(a).save(gen / f"{i}.png")
    data = (gen / "2.png").read_bytes()
    (gen / "2.png").write_bytes(data[: len(data) // 2])  # truncated
    argv = ["--generated", str(gen), "--reference", str(gen), "--metrics", "fid", "--no-cache", *feats]
    with pytest.warns(UserWarning, match="2.png"):
        m = run(_parse([*argv, "--out", str(tmp_path / "o")]))
    assert m["n_generated"] == 5 and m["n_reference"] == 5
    assert {(x["set"], x["file"]) for x in m["skipped_images"]} == {("generated", str(gen / "2.png")),
                                                                   ("reference", str(gen / "2.png"))}
    assert "truncated" in m["skipped_images"][0]["reason"]
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["skipped_images"] == m["skipped_images"]
    with pytest.raises(ValueError, match=r"2\.png: cannot decode"):
        run(_parse([*argv, "--out", str(tmp_path / "o2"), "--bad-images", "error"]))
    assert not (tmp_path / "o2" / "metrics.json").exists()
    with pytest.raises(ValueError, match=r"2\.png: cannot decode"):  # direct Dataset use names it too
        ImageFolder(gen)[2]


def test_too_few_images_writes_what_can_be_computed(tmp_path, feats):
    gen, ref = tmp_path / "gen", tmp_path / "ref"
    for d, n, seed in ((gen, 2, 4), (ref, 10, 5)):
        d.mkdir()
        for i, a in enumerate(_rgb8(seed, n=n)):
            Image.fromarray(a).save(d / f"{i}.png")
    args = _parse(["--generated", str(gen), "--reference", str(ref), "--metrics", "fid,kid,precision,recall",
                   "--out", str(tmp_path / "o"), *feats])
    assert command(args) == 1  # written, but not everything could be computed
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert "fid" in m and "kid" in m and "precision" not in m and "recall" not in m
    assert set(m["skipped"]) == {"precision", "recall"} and "k=3" in m["skipped"]["precision"]
    assert "precision not computed" in (tmp_path / "o" / "report.html").read_text()
    a2 = _parse(["--generated", str(gen), "--reference", str(ref), "--metrics", "precision", "--k", "1",
                 "--out", str(tmp_path / "o2"), *feats])
    assert command(a2) == 0 and "skipped" not in json.loads((tmp_path / "o2" / "metrics.json").read_text())


def _sample_folder(d, prompts=("a photo of a bag", "an emoji of a cat"), per=2, manifest=True):
    d.mkdir()
    imgs = _rgb8(6, n=len(prompts) * per)
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(d / f"{i:03d}.png")
    Image.fromarray(np.concatenate(list(imgs), 1)).save(d / "grid.png")
    settings = {"prompts": list(prompts)}
    if manifest:
        settings["images"] = [{"file": f"{i:03d}.png", "prompt": prompts[i // per]} for i in range(len(imgs))]
    (d / "settings.json").write_text(json.dumps(settings))
    return imgs


def test_grid_png_is_never_a_sample(tmp_path):
    _sample_folder(tmp_path / "new")
    files, out = select_images(tmp_path / "new")
    assert [f.name for f in files] == ["000.png", "001.png", "002.png", "003.png"]
    assert out[0]["file"].endswith("grid.png") and "settings.json" in out[0]["reason"]
    _sample_folder(tmp_path / "old", manifest=False)  # settings.json without a list: left out by name
    files, out = select_images(tmp_path / "old")
    assert len(files) == 4 and "contact sheet" in out[0]["reason"]
    (tmp_path / "new" / "003.png").unlink()
    assert "missing" in select_images(tmp_path / "new")[1][0]["reason"]


def test_reward_metric_reads_prompts_from_settings_or_jsonl(tmp_path, feats):
    _sample_folder(tmp_path / "s")
    out = tmp_path / "o"
    args = _parse(["--generated", str(tmp_path / "s"), "--metrics", "reward:test_prompt_length,saturation",
                   "--reward-opt", "scale=2", "--out", str(out), *feats])
    assert command(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    lens = torch.tensor([2.0 * len("a photo of a bag")] * 2 + [2.0 * len("an emoji of a cat")] * 2, dtype=torch.float64)
    assert m["n_generated"] == 4 and m["excluded_files"][0]["file"].endswith("grid.png")
    assert m["reward_test_prompt_length"] == pytest.approx(lens.mean().item())
    assert m["reward_test_prompt_length_stderr"] == pytest.approx((lens.std() / 2).item())
    assert m["protocol"]["reward:test_prompt_length"]["options"] == {"scale": 2}
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a photo of a bag"] * 2 + ["an emoji of a cat"] * 2
    # a JSONL prompt file wins over settings.json; a plain folder needs one
    plain = tmp_path / "plain"
    plain.mkdir()
    for i, a in enumerate(_rgb8(7, n=3)):
        Image.fromarray(a).save(plain / f"{i}.png")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"file": f"{i}.png", "prompt": "x" * (i + 1)}) + "\n"
                                              for i in range(3)))
    m = run(_parse(["--generated", str(plain), "--metrics", "reward:test_prompt_length", "--prompts",
                    str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o2"), *feats]))
    assert m["reward_test_prompt_length"] == pytest.approx(2.0)
    # a reward that ignores prompts needs none
    m = run(_parse(["--generated", str(plain), "--metrics", "reward:jpeg_compressibility", "--out",
                    str(tmp_path / "o3"), *feats]))
    x = torch.stack([load_image(plain / f"{i}.png") for i in range(3)])
    assert m["reward_jpeg_compressibility"] == pytest.approx(get_reward("jpeg_compressibility")(x, None).mean().item())


@pytest.mark.parametrize("extra,error,match", [
    (["--metrics", "reward:nope"], ValueError, "jpeg_compressibility"),  # lists the registered names
    (["--metrics", "reward:test_prompt_length"], ValueError, r"0\.png has none"),
    (["--metrics", "reward:jpeg_compressibility", "--reward-opt", "colour=1"], ValueError, "does not take"),
    (["--metrics", "saturation", "--reward-opt", "scale=1"], ValueError, "no reward"),
    (["--metrics", "reward:test_prompt_length", "--prompts", "BAD"], ValueError, "BAD:2"),
    (["--metrics", "reward:test_prompt_length", "--prompts", "MISSING"], FileNotFoundError, "MISSING"),
    (["--metrics", "fid"], ValueError, "--reference"),
])
def test_reward_and_input_errors_are_clear(tmp_path, feats, extra, error, match):
    plain = tmp_path / "plain"
    plain.mkdir()
    for i, a in enumerate(_rgb8(8, n=2)):
        Image.fromarray(a).save(plain / f"{i}.png")
    (tmp_path / "BAD").write_text('{"file": "0.png", "prompt": "a"}\n{"file": "1.png"}\n')
    extra = [str(tmp_path / e) if e in ("BAD", "MISSING") else e for e in extra]
    with pytest.raises(error, match=match):
        run(_parse(["--generated", str(plain), "--out", str(tmp_path / "o"), *feats, *extra]))
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_reference_featurising_announces_its_duration_and_the_limit(tmp_path, feats, capsys):
    from featmod import tiny_features

    from diffplug.evals.features import get_feature_network
    from diffplug.evals.reference import reference_stats

    ref = tmp_path / "ref"
    ref.mkdir()
    for i, a in enumerate(_rgb8(9, n=5)):
        Image.fromarray(a).save(ref / f"{i}.png")
    net = get_feature_network("py:featmod:tiny_features")
    st = reference_stats(str(ref), net, batch_size=2, num_workers=0, progress=True)
    err = capsys.readouterr().err
    assert "featurising 5 images" in err and "--reference-limit" in err and "cached afterwards" in err
    assert "images/s" in err and "about" in err
    st2 = reference_stats(str(ref), net, batch_size=2, num_workers=0, progress=True)  # cached: no notice
    assert "featurising" not in capsys.readouterr().err and st2["cache"] == st["cache"]
    x = torch.stack([load_image(ref / f"{i}.png") for i in range(5)])
    f = tiny_features(x)
    torch.testing.assert_close(st["sum"], f.double().sum(0))
    assert fid_from_features(f, f).item() == pytest.approx(0, abs=1e-6)


def test_a_diffplug_sample_folder_scores_its_images_with_their_prompts(tmp_path, feats):
    pytest.importorskip("diffplug.testing")
    from diffplug.cli import main

    out = tmp_path / "s"
    assert main(["sample", "--model", "tiny-sd", "--prompt", "a photo of a bag", "--prompt", "a cat",
                 "--num-images", "2", "--steps", "1", "--device", "cpu", "--out", str(out)]) == 0
    listed = json.loads((out / "settings.json").read_text())["images"]
    assert listed == [{"file": f"{i:03d}.png", "prompt": p} for i, p in
                      enumerate(["a photo of a bag"] * 2 + ["a cat"] * 2)]
    m = run(_parse(["--generated", str(out), "--metrics", "reward:test_prompt_length", "--out", str(tmp_path / "e"),
                    *feats]))
    assert m["n_generated"] == 4 and m["reward_test_prompt_length"] == pytest.approx((16 * 2 + 5 * 2) / 4)
