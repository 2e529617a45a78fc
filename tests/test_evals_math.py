"""FID / KID / precision-recall maths against torchmetrics and torch-fidelity on identical features."""

import pytest
import torch

from diffplug.evals import (FID, KID, PrecisionRecall, fid_from_features, frechet_distance, gaussian_stats,
                            kernel_inception_distance, precision_recall, stats_from_sums)


def _features(n, d, seed, power=1.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, d, generator=g, dtype=torch.float64) ** power * scale
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(1000 + d), dtype=torch.float64) / d ** 0.5
    return base @ (torch.eye(d, dtype=torch.float64) + 0.5 * mix)  # correlated, non-diagonal covariances


@pytest.mark.parametrize("n1,n2,d", [(400, 350, 64), (300, 300, 128), (40, 50, 96)])  # last: N < D, singular
def test_frechet_distance_matches_torchmetrics_and_torch_fidelity(n1, n2, d):
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    from torchmetrics.image.fid import _compute_fid

    m1, s1 = gaussian_stats(_features(n1, d, 0))
    m2, s2 = gaussian_stats(_features(n2, d, 1, power=1.4, scale=1.2))
    ours = frechet_distance(m1, s1, m2, s2).item()
    tm = _compute_fid(m1, s1, m2, s2).item()
    assert ours == pytest.approx(tm, rel=1e-6)
    if n1 > d:  # scipy's sqrtm (torch-fidelity) is itself inaccurate on singular covariances
        tf = fid_statistics_to_metric({"mu": m1.numpy(), "sigma": s1.numpy()},
                                      {"mu": m2.numpy(), "sigma": s2.numpy()}, False)["frechet_inception_distance"]
        assert ours == pytest.approx(tf, rel=1e-6)
    # symmetric, and the Cholesky / eigen paths agree
    assert frechet_distance(m2, s2, m1, s1).item() == pytest.approx(ours, rel=1e-8)


def test_frechet_distance_closed_forms():
    d = 16
    mu = torch.randn(d, dtype=torch.float64)
    a = torch.randn(d, d, dtype=torch.float64)
    sigma = a @ a.T + torch.eye(d, dtype=torch.float64)
    assert frechet_distance(mu, sigma, mu, sigma).item() == pytest.approx(0, abs=1e-9)
    shift = torch.full((d,), 0.5, dtype=torch.float64)
    assert frechet_distance(mu, sigma, mu + shift, sigma).item() == pytest.approx(d * 0.25, rel=1e-9)
    # isotropic: d^2 = d (sqrt(a) - sqrt(b))^2
    i = torch.eye(d, dtype=torch.float64)
    assert frechet_distance(mu, 4 * i, mu, 9 * i).item() == pytest.approx(d * 1.0, rel=1e-9)
    assert frechet_distance(mu.numpy(), (4 * i).numpy(), mu.numpy(), (9 * i).numpy()).item() == pytest.approx(d)
    with pytest.raises(ValueError, match="mu"):
        frechet_distance(mu, sigma, mu[:-1], sigma)


def test_fid_metric_running_sums_equal_functional_and_torchmetrics_metric():
    from torchmetrics.image.fid import FrechetInceptionDistance as TMFID

    real, fake = _features(500, 32, 2), _features(450, 32, 3, power=2)
    m = FID(features=None, num_features=32)
    for chunk in real.split(128):
        m.update(features=chunk, real=True)
    for chunk in fake.split(100):
        m.update_features(chunk, real=False)
    ours = m.compute().item()
    assert ours == pytest.approx(fid_from_features(real, fake).item(), rel=1e-9)

    class Ident(torch.nn.Module):  # torchmetrics' FID with the features as the "network"
        num_features = 32

        def forward(self, x):
            return x

    tm = TMFID(feature=Ident(), normalize=True)
    tm.update(real.float(), real=True)
    tm.update(fake.float(), real=False)
    assert ours == pytest.approx(tm.compute().item(), rel=1e-5)  # theirs holds float32 features

    # cached reference stats round-trip exactly; reset keeps them then
    mu, sigma = m.stats(real=True)
    m2 = FID(features=None, num_features=32)
    m2.load_reference(mu, sigma, 500)
    m2.update(features=fake, real=False)
    assert m2.compute().item() == pytest.approx(ours, rel=1e-9)
    m2.reset()
    assert int(m2.real_n) == 500 and int(m2.fake_n) == 0
    mu3, sig3 = stats_from_sums(m2.real_sum, m2.real_outer, m2.real_n)
    torch.testing.assert_close(mu3, mu)
    torch.testing.assert_close(sig3, sigma)


@pytest.mark.parametrize("n, d", [(40, 8), (30, 64)])  # more images than dimensions, and fewer
def test_paired_bootstrap_draws_are_exact_fids_of_their_resamples(n, d):
    from diffplug.evals.fid import paired_bootstrap

    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, d, generator=g, dtype=torch.float64)
    a = torch.randn(n, d, generator=g, dtype=torch.float64) + 0.3
    b = a + 0.1 * torch.randn(n, d, generator=g, dtype=torch.float64)
    mu, sigma = gaussian_stats(real)
    draws = paired_bootstrap((mu, sigma), {"a": a, "b": b}, draws=3, seed=7)
    gen = torch.Generator().manual_seed(7)
    index = [torch.randint(n, (n,), generator=gen) for _ in range(3)]  # the resamples it draws
    for k, idx in enumerate(index):
        for name, f in (("a", a), ("b", b)):
            assert draws[name][k].item() == pytest.approx(frechet_distance(mu, sigma, *gaussian_stats(f[idx])).item(),
                                                          rel=1e-6)


def test_paired_bootstrap_difference_is_tighter_than_either_fid_and_needs_equal_sets():
    from diffplug.evals.fid import paired_bootstrap

    g = torch.Generator().manual_seed(1)
    real = torch.randn(300, 6, generator=g, dtype=torch.float64)
    a = torch.randn(100, 6, generator=g, dtype=torch.float64)
    b = a + 0.05 * torch.randn(100, 6, generator=g, dtype=torch.float64)  # the same images, slightly moved
    draws = paired_bootstrap(gaussian_stats(real), {"a": a, "b": b}, draws=200)
    assert (draws["b"] - draws["a"]).std() < 0.3 * draws["a"].std()
    with pytest.raises(ValueError, match="same number"):
        paired_bootstrap(gaussian_stats(real), {"a": a, "b": b[:50]})


def test_fid_metric_rejects_wrong_features():
    m = FID(features=None, num_features=8)
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        m.update(features=torch.zeros(4, 9), real=True)
    with pytest.raises(RuntimeError, match="features="):
        m.update(torch.zeros(2, 3, 8, 8), real=True)
    with pytest.raises(ValueError, match="num_features"):
        FID(features=None)


def _tf_kid(fake, real, subsets, size):
    from torch_fidelity.metric_kid import kid_features_to_metric

    out = kid_features_to_metric(fake, real, kid_subsets=subsets, kid_subset_size=size, verbose=False,
                                 kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
                                 kid_kernel_poly_coef0=1, rng_seed=2020)
    return out["kernel_inception_distance_mean"], out["kernel_inception_distance_std"]


def test_kid_matches_torch_fidelity():
    real, fake = _features(300, 48, 4), _features(260, 48, 5, power=1.5)  # float64 in both
    mean, std = kernel_inception_distance(fake, real, subsets=8, subset_size=150)
    tf_mean, tf_std = _tf_kid(fake, real, 8, 150)
    assert mean.item() == pytest.approx(tf_mean, rel=1e-6)
    assert std.item() == pytest.approx(tf_std, rel=1e-6)
    # the Metric (feature lists, concatenated) gives the same numbers
    m = KID(features=None, subsets=8, subset_size=150)
    for c in real.split(70):
        m.update(features=c, real=True)
    m.update(features=fake, real=False)
    km, ks = m.compute()
    assert km.item() == pytest.approx(tf_mean, rel=1e-6)
    # same distribution -> KID ~ 0; different -> clearly positive
    same, _ = kernel_inception_distance(_features(300, 48, 6), real, subsets=8, subset_size=150)
    assert abs(same.item()) < 0.2 * mean.item()
    with pytest.raises(ValueError, match="subset_size"):
        kernel_inception_distance(fake, real, subset_size=1000)


def test_precision_recall_matches_torch_fidelity():
    from torch_fidelity.metric_prc import prc_features_to_metric

    real = _features(300, 32, 7).float()
    fake = (_features(250, 32, 8, power=1.2) * 1.05).float()
    p, r = precision_recall(real, fake, k=3, chunk=128)
    tf = prc_features_to_metric(fake, real, prc_neighborhood=3, prc_batch_size=10000, verbose=False)
    assert p.item() == pytest.approx(tf["precision"], abs=1e-7)
    assert r.item() == pytest.approx(tf["recall"], abs=1e-7)
    assert 0 < p.item() < 1 and 0 < r.item() < 1
    m = PrecisionRecall(features=None, k=3)
    m.update(features=real, real=True)
    m.update(features=fake[:100], real=False)
    m.update(features=fake[100:], real=False)
    mp, mr = m.compute()
    assert (mp.item(), mr.item()) == (p.item(), r.item())


def test_precision_recall_definition_on_toy_points():
    # 1-D: real points 0..9, k=1 -> each radius 1; a fake at 20 is outside every sphere
    real = torch.arange(10.0)[:, None]
    fake = torch.tensor([[0.5], [4.0], [20.0]])
    p, r = precision_recall(real, fake, k=1)
    assert p.item() == pytest.approx(2 / 3)
    # fake manifold radii (k=1): 3.5, 3.5, 16 -> covers real points 0..9 within 3.5 of 0.5/4 or 16 of 20
    assert r.item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="k=3"):
        precision_recall(real[:3], fake, k=3)


def test_sharpness_is_laplacian_variance_and_falls_with_blur():
    from diffplug.evals import sharpness

    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 1.0  # a point: the 3x3 Laplacian's valid 3x3 output is the kernel itself
    kernel = torch.tensor([0.0, 1.0, 0.0, 1.0, -4.0, 1.0, 0.0, 1.0, 0.0])
    assert torch.allclose(sharpness(x), kernel.var().view(1))
    img = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    blurred = torch.nn.functional.avg_pool2d(img, 3, stride=1, padding=1)
    assert (sharpness(blurred) < 0.5 * sharpness(img)).all() and sharpness(torch.full((1, 3, 8, 8), 0.3)).item() == 0
