"""Improved precision and recall (Kynkäänniemi et al. 2019, arXiv:1904.06991).

Each set's manifold is the union of hyperspheres around its feature vectors, of radius the distance
to the k-th nearest neighbour within the set (Sec. 2, eq. 1-2, k = 3 default):

    f(phi, Phi) = 1 if ||phi - phi'|| <= ||phi' - NN_k(phi', Phi)|| for some phi' in Phi, else 0
    precision = mean_{phi_g} f(phi_g, Phi_r)        recall = mean_{phi_r} f(phi_r, Phi_g)

Distances are computed in chunks of ``chunk`` rows with ``torch.cdist`` on the features' device,
so 50k x 50k sets fit on a GPU. Same conventions as torch-fidelity's ``prc`` (its input1 = fake).
"""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from .features import FeatureMetric


def knn_radii(x: torch.Tensor, k: int = 3, chunk: int = 10000) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row (the (k+1)-th counting itself)."""
    if len(x) <= k:
        raise ValueError(f"k={k}: need more than k samples per set, have {len(x)}")
    return torch.cat([torch.cdist(x[i:i + chunk], x).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(x), chunk)])


def in_manifold(query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, chunk: int = 10000) -> torch.Tensor:
    """For each query row: does it fall inside some ref hypersphere? (bool per row)"""
    return torch.cat([(torch.cdist(query[i:i + chunk], ref) <= radii[None]).any(dim=1)
                      for i in range(0, len(query), chunk)])


def precision_recall(real, fake, k: int = 3, chunk: int = 10000) -> tuple[torch.Tensor, torch.Tensor]:
    """Improved precision and recall of ``fake`` w.r.t. ``real`` features ``(N, D)``."""
    real = torch.as_tensor(real).float()
    fake = torch.as_tensor(fake).float().to(real.device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features: expected (N, D) and (M, D), got {tuple(real.shape)} and {tuple(fake.shape)}")
    precision = in_manifold(fake, real, knn_radii(real, k, chunk), chunk).float().mean()
    recall = in_manifold(real, fake, knn_radii(fake, k, chunk), chunk).float().mean()
    return precision, recall


class PrecisionRecall(FeatureMetric, Metric):
    """Improved precision/recall as a torchmetrics ``Metric``; ``compute()`` -> ``(precision, recall)``."""

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    def __init__(self, features="inception", protocol: str = "clean", k: int = 3, chunk: int = 10000,
                 feature_kwargs: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self._init_features(features, protocol, feature_kwargs)
        self.k, self.chunk = k, chunk
        self.add_state("real_features", [], dist_reduce_fx="cat")
        self.add_state("fake_features", [], dist_reduce_fx="cat")

    def _update_features(self, features, real: bool) -> None:
        (self.real_features if real else self.fake_features).append(features.float())

    def compute(self):
        return precision_recall(dim_zero_cat(self.real_features), dim_zero_cat(self.fake_features),
                                self.k, self.chunk)
