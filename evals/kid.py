"""Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs").

KID is the unbiased estimate of the squared MMD with the cubic polynomial kernel
k(x, y) = (gamma x.y + coef0)^degree, gamma = 1/D, averaged over random subsets:

    MMD^2_u = 1/(m(m-1)) sum_{i!=j} [k(x_i,x_j) + k(y_i,y_j)] - 2/m^2 sum_{i,j} k(x_i,y_j)

Subsets are drawn exactly as torch-fidelity draws them (``numpy.random.RandomState(seed)``, one
``choice`` without replacement from the generated set, then one from the real set, per subset),
so the two agree to float64 rounding on identical features; the kernels run in float64 with torch
on the features' device.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from .features import FeatureMetric


def poly_kernel(x, y, degree: int = 3, gamma: float | None = None, coef0: float = 1.0):
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(k_xx, k_xy, k_yy) -> torch.Tensor:
    m = k_xx.shape[0]
    sum_xx = k_xx.sum() - k_xx.diagonal().sum()
    sum_yy = k_yy.sum() - k_yy.diagonal().sum()
    return (sum_xx + sum_yy) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m)


def kernel_inception_distance(fake, real, subsets: int = 100, subset_size: int | None = 1000,
                              degree: int = 3, gamma: float | None = None, coef0: float = 1.0,
                              seed: int = 2020) -> tuple[torch.Tensor, torch.Tensor]:
    """KID mean and (population) std over ``subsets`` random subsets; float64 tensors.

    ``subset_size=None`` uses ``min(1000, len(fake), len(real))``. Argument order and defaults
    (100 subsets of 1000, seed 2020) are torch-fidelity's: ``fake`` is its ``input1``.
    """
    fake = torch.as_tensor(fake).to(torch.float64)
    real = torch.as_tensor(real).to(torch.float64).to(fake.device)
    if fake.ndim != 2 or real.ndim != 2 or fake.shape[1] != real.shape[1]:
        raise ValueError(f"features: expected (N, D) and (M, D), got {tuple(fake.shape)} and {tuple(real.shape)}")
    n1, n2 = len(fake), len(real)
    if subset_size is None:
        subset_size = min(1000, n1, n2)
    if subset_size > min(n1, n2) or subset_size < 2:
        raise ValueError(f"subset_size={subset_size}: must be in [2, min(#fake={n1}, #real={n2})]; "
                         "lower it or pass subset_size=None")
    rng = np.random.RandomState(seed)
    mmds = torch.empty(subsets, dtype=torch.float64, device=fake.device)
    for i in range(subsets):
        a = fake[torch.from_numpy(rng.choice(n1, subset_size, replace=False)).to(fake.device)]
        b = real[torch.from_numpy(rng.choice(n2, subset_size, replace=False)).to(fake.device)]
        kw = dict(degree=degree, gamma=gamma, coef0=coef0)
        mmds[i] = mmd2_unbiased(poly_kernel(a, a, **kw), poly_kernel(a, b, **kw), poly_kernel(b, b, **kw))
    return mmds.mean(), mmds.std(unbiased=False)


class KernelInceptionDistance(FeatureMetric, Metric):
    """KID as a torchmetrics ``Metric``; ``compute()`` returns ``(mean, std)``.

    KID needs the features themselves (random subsets), so the states are feature lists
    (``dist_reduce_fx="cat"``, gathered across processes). Arguments as in
    :class:`~diffplug.evals.fid.FrechetInceptionDistance` plus the KID ones.
    """

    higher_is_better = False
    is_differentiable = False
    full_state_update = False

    def __init__(self, features="inception", protocol: str = "clean", subsets: int = 100,
                 subset_size: int | None = 1000, degree: int = 3, gamma: float | None = None,
                 coef0: float = 1.0, seed: int = 2020, feature_kwargs: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self._init_features(features, protocol, feature_kwargs)
        self.kid_kwargs = dict(subsets=subsets, subset_size=subset_size, degree=degree, gamma=gamma,
                               coef0=coef0, seed=seed)
        self.add_state("real_features", [], dist_reduce_fx="cat")
        self.add_state("fake_features", [], dist_reduce_fx="cat")

    def _update_features(self, features, real: bool) -> None:
        (self.real_features if real else self.fake_features).append(features.float())

    def compute(self):
        real, fake = dim_zero_cat(self.real_features), dim_zero_cat(self.fake_features)
        kw = dict(self.kid_kwargs)
        if kw["subset_size"] is not None and kw["subset_size"] > min(len(real), len(fake)):
            warnings.warn(f"KID subset_size {kw['subset_size']} > available samples; using "
                          f"{min(len(real), len(fake))}")
            kw["subset_size"] = None
        return kernel_inception_distance(fake, real, **kw)


KID = KernelInceptionDistance
