"""Sampler accuracy: distance of a sampler's final latents (or images) to a reference run from the
same initial noise, e.g. a 200-step DDIM solve -- the error DC-Solver (Zhao et al. 2024) and
Adaptive Guidance (Castillo et al. 2023) report as MSE.

    MSE_i  = mean over (C, H, W) of (x_i - x_i^ref)^2
    PSNR_i = 10 log10(data_range^2 / MSE_i)           (images: data_range 1 for [0, 1], 2 for [-1, 1])

PSNR is only meaningful for images; for latents report the MSE.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


def per_sample_mse(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    if x.shape != ref.shape:
        raise ValueError(f"x {tuple(x.shape)} and ref {tuple(ref.shape)}: same shapes required "
                         "(run both samplers from the same noise)")
    return (x.double() - ref.double().to(x.device)).square().flatten(1).mean(1)


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-sample PSNR in dB (inf where identical)."""
    return 10 * torch.log10(data_range ** 2 / per_sample_mse(x, ref))


def trajectory_error(x: torch.Tensor, ref: torch.Tensor, data_range: float | None = None) -> dict:
    """Mean MSE (and mean per-sample PSNR when ``data_range`` is given) against the reference."""
    mse = per_sample_mse(x, ref)
    out = {"mse": mse.mean()}
    if data_range is not None:
        out["psnr"] = (10 * torch.log10(data_range ** 2 / mse)).mean()
    return out


class SamplerAccuracy(Metric):
    """Running mean per-sample MSE (and PSNR if ``data_range``) against reference-run outputs."""

    higher_is_better = False
    is_differentiable = False
    full_state_update = False

    def __init__(self, data_range: float | None = None, **kwargs):
        super().__init__(**kwargs)
        self.data_range = data_range
        self.add_state("mse_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("psnr_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, x: torch.Tensor, ref: torch.Tensor) -> None:
        mse = per_sample_mse(x, ref).to(self.mse_sum.device)
        self.mse_sum += mse.sum()
        if self.data_range is not None:
            self.psnr_sum += (10 * torch.log10(self.data_range ** 2 / mse)).sum()
        self.n += len(mse)

    def compute(self) -> dict:
        out = {"mse": self.mse_sum / self.n}
        if self.data_range is not None:
            out["psnr"] = self.psnr_sum / self.n
        return out
