"""Fréchet distance between feature Gaussians (FID; Heusel et al. 2017).

    d^2 = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})                      (FID, eq. 6)

Tr((S_1 S_2)^{1/2}) is computed exactly in float64 through symmetric eigendecompositions:
S_1 S_2 is similar to the PSD matrix M = S_1^{1/2} S_2 S_1^{1/2}, so the trace of its square root is
the sum of sqrt(eig(M)). This is the same quantity scipy's ``sqrtm`` (torch-fidelity, pytorch-fid)
and torchmetrics' ``eigvals(S_1 S_2)`` compute, without complex arithmetic, on any device.

:class:`FrechetInceptionDistance` (alias ``FID``) keeps running float64 sums (sum of features, sum
of outer products, count) for real and generated images -- O(D^2) memory however many images --
registered with ``dist_reduce_fx="sum"`` so torchmetrics adds them across processes on ``compute``.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from .features import FeatureMetric


def _as64(x) -> torch.Tensor:
    return torch.as_tensor(x).to(torch.float64)


def _sqrt_psd(s: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def trace_sqrt_product(sigma1, sigma2) -> torch.Tensor:
    """Tr((S_1 S_2)^{1/2}) for PSD S_1, S_2, in float64.

    With S_1 = L L^T (Cholesky, when S_1 is positive definite) the symmetric L^T S_2 L has the
    eigenvalues of S_1 S_2; a singular S_1 (fewer samples than dimensions) uses S_1^{1/2} instead.
    """
    sigma1 = _as64(sigma1)
    sigma2 = _as64(sigma2).to(sigma1.device)
    chol, info = torch.linalg.cholesky_ex(sigma1)
    if int(info) == 0:
        m = chol.T @ sigma2 @ chol
    else:
        s1h = _sqrt_psd(sigma1)
        m = s1h @ sigma2 @ s1h
    m = (m + m.T) / 2
    return torch.linalg.eigvalsh(m).clamp(min=0).sqrt().sum()


def frechet_distance(mu1, sigma1, mu2, sigma2) -> torch.Tensor:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); float64 scalar tensor.

    Accepts tensors or numpy arrays: ``mu`` of shape (D,), ``sigma`` of shape (D, D).
    """
    mu1, mu2, sigma1, sigma2 = _as64(mu1), _as64(mu2), _as64(sigma1), _as64(sigma2)
    d = mu1.shape[-1]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"frechet_distance: expected mu (D,) and sigma (D, D) with one D; got mu1 "
                         f"{tuple(mu1.shape)}, sigma1 {tuple(sigma1.shape)}, mu2 {tuple(mu2.shape)}, "
                         f"sigma2 {tuple(sigma2.shape)}")
    mu2, sigma2 = mu2.to(mu1.device), sigma2.to(mu1.device)
    diff = mu1 - mu2
    return diff @ diff + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt_product(sigma1, sigma2)


def gaussian_stats(features) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (float64) of ``(N, D)`` features."""
    f = _as64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features: expected (N >= 2, D), got {tuple(f.shape)}")
    return f.mean(0), torch.cov(f.T)


def stats_from_sums(total, outer, n) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance from running sums: sum f, sum f f^T, N."""
    n = int(n)
    if n < 2:
        raise ValueError(f"need at least 2 samples for a covariance, have {n}")
    mu = total / n
    sigma = (outer - n * torch.outer(mu, mu)) / (n - 1)
    return mu, (sigma + sigma.T) / 2


def fid_from_features(real, fake) -> torch.Tensor:
    """Functional twin of :class:`FrechetInceptionDistance` on precomputed features."""
    return frechet_distance(*gaussian_stats(real), *gaussian_stats(fake))


def paired_bootstrap(reference: tuple, fakes: dict, draws: int = 100, seed: int = 0) -> dict[str, torch.Tensor]:
    """FID of every generated set on ``draws`` bootstrap resamples of its images, the **same** resample
    for every set, against the fixed ``reference = (mu, sigma)``.

    For runs that differ only in the method (image i of each set from the same noise and prompt):
    the s.e. of a difference of FIDs is the standard deviation of its per-draw differences; of one
    FID, of its own draws. Returns ``name -> (draws,)`` float64 FIDs, each exactly the FID of its
    resample. Fast: with R = sigma^{1/2} once and Y = X R per set, Tr((sigma S)^{1/2}) of a resample
    is the sum of sqrt(eig) of the k x k Gram of its k distinct images, weighted by their counts c:
    (sqrt(c) (Y - mean)) (sqrt(c) (Y - mean))^T / (n - 1)."""
    mu_r, sigma_r = _as64(reference[0]), _as64(reference[1])
    root = _sqrt_psd(sigma_r)
    sizes = {name: len(f) for name, f in fakes.items()}
    if len(set(sizes.values())) != 1 or min(sizes.values()) < 2:
        raise ValueError(f"paired_bootstrap: every set needs the same number (>= 2) of images, got {sizes}")
    n = next(iter(sizes.values()))
    gen = torch.Generator().manual_seed(seed)
    picks = [torch.randint(n, (n,), generator=gen).unique(return_counts=True) for _ in range(draws)]
    out = {}
    for name, feats in fakes.items():
        x = _as64(feats).to(mu_r.device)
        y = x @ root
        vals = []
        for index, count in picks:
            index, c = index.to(x.device), count.to(x).unsqueeze(1)
            mu = (c * x[index]).sum(0) / n
            a = c.sqrt() * (y[index] - mu @ root)
            gram = (a @ a.T) / (n - 1)
            tr_sqrt = torch.linalg.eigvalsh((gram + gram.T) / 2).clamp(min=0).sqrt().sum()
            tr_sigma = (c * (x[index] - mu) ** 2).sum() / (n - 1)
            diff = mu - mu_r
            vals.append(diff @ diff + tr_sigma + sigma_r.trace() - 2 * tr_sqrt)
        out[name] = torch.stack(vals)
    return out


class FrechetInceptionDistance(FeatureMetric, Metric):
    """FID as a torchmetrics ``Metric`` with a pluggable feature network.

    Args:
        features: ``"inception"`` (default), ``"testbed"``, ``"clip:<dir>"``, ``"dinov2:<dir>"``, any
            callable ``images -> (N, D)``, or ``None`` to feed features yourself with
            :meth:`update_features` (then give ``num_features``).
        protocol: resize protocol of the Inception (``clean`` default; see ``diffplug.evals.resize``).
        reset_real_features: keep the reference statistics across ``reset()`` when False.
        feature_kwargs: passed to the feature network (e.g. ``weights=``, ``autocast=``).

    ``update(images, real)`` takes uint8 0..255 or float 0..1 images ``(N, C, H, W)``.
    """

    higher_is_better = False
    is_differentiable = False
    full_state_update = False
    plot_lower_bound = 0.0

    def __init__(self, features="inception", protocol: str = "clean", num_features: int | None = None,
                 reset_real_features: bool = True, feature_kwargs: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self._init_features(features, protocol, feature_kwargs)
        d = num_features or getattr(self.feature_net, "num_features", None)
        if not d:
            raise ValueError("num_features: give it when features=None or the feature network has no "
                             "num_features attribute")
        self.num_features = int(d)
        self.reset_real_features = reset_real_features
        for side in ("real", "fake"):
            self.add_state(f"{side}_sum", torch.zeros(d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_outer", torch.zeros(d, d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_n", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _update_features(self, features: torch.Tensor, real: bool) -> None:
        f = features.to(torch.float64)
        if f.ndim != 2 or f.shape[1] != self.num_features:
            raise ValueError(f"features: expected (N, {self.num_features}), got {tuple(f.shape)}")
        side = "real" if real else "fake"
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + f.sum(0))
        setattr(self, f"{side}_outer", getattr(self, f"{side}_outer") + f.T @ f)
        setattr(self, f"{side}_n", getattr(self, f"{side}_n") + f.shape[0])

    def load_reference(self, mu, sigma, n: int) -> None:
        """Set the real-side state from cached statistics (exact inverse of :func:`stats_from_sums`)."""
        mu, sigma = _as64(mu).to(self.real_sum.device), _as64(sigma).to(self.real_sum.device)
        self.real_sum = mu * n
        self.real_outer = sigma * (n - 1) + n * torch.outer(mu, mu)
        self.real_n = torch.tensor(int(n), device=self.real_sum.device)
        self.reset_real_features = False
        self._computed = None  # torchmetrics caches compute(); the states just changed

    def stats(self, real: bool) -> tuple[torch.Tensor, torch.Tensor]:
        side = "real" if real else "fake"
        return stats_from_sums(getattr(self, f"{side}_sum"), getattr(self, f"{side}_outer"),
                               getattr(self, f"{side}_n"))

    def compute(self) -> torch.Tensor:
        return frechet_distance(*self.stats(real=True), *self.stats(real=False))

    def reset(self) -> None:
        if self.reset_real_features:
            return super().reset()
        keep = (self.real_sum, self.real_outer, self.real_n)
        super().reset()
        self.real_sum, self.real_outer, self.real_n = keep


FID = FrechetInceptionDistance
