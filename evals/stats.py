"""The one statistic every diffplug table uses: a mean with its standard error, and the gain of one
model over another with its **paired** standard error (the headline) and its two-sample standard
error (beside it).

Paired means: both models were sampled with the same seeds and prompts, so image i of one and image i
of the other share their initial noise; the gain's s.e. is the s.e. of the per-image differences,
which removes the spread the seeds put into both. Two-sample ignores the pairing
(sqrt(se_a^2 + se_b^2)). Standard errors use the sample standard deviation (ddof = 1) / sqrt(n); with
n = 1 there is none (``nan``), never 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["MeanSE", "Gain", "mean_se", "gain"]


def _vector(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().double().numpy()
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name}: no values")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: {int((~np.isfinite(a)).sum())} of {a.size} values are not finite")
    return a


@dataclass(frozen=True)
class MeanSE:
    mean: float
    se: float  # nan for n = 1
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.4g} ± {self.se:.2g}"


def mean_se(x, name: str = "values") -> MeanSE:
    """Mean and standard error (sample s.d. with ddof = 1, over sqrt(n)) of a 1-d set of values."""
    a = _vector(x, name)
    se = float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else float("nan")
    return MeanSE(float(a.mean()), se, int(a.size))


def _z(value: float, se: float) -> float:
    """``value / se``; nan without an s.e. (n = 1), +-inf for a nonzero value with zero spread."""
    if math.isnan(se) or se > 0:
        return value / se
    return math.copysign(math.inf, value) if value else 0.0


@dataclass(frozen=True)
class Gain:
    """``tuned - base``: the mean gain, its paired s.e. (headline) and two-sample s.e., and each in units of
    its s.e. (``z_paired`` is the number tables quote as "N paired s.e.")."""

    base: MeanSE
    tuned: MeanSE
    gain: float
    paired_se: float
    two_sample_se: float

    @property
    def z_paired(self) -> float:
        return _z(self.gain, self.paired_se)

    @property
    def z_two_sample(self) -> float:
        return _z(self.gain, self.two_sample_se)

    def as_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k not in ("base", "tuned")},
                "base": asdict(self.base), "tuned": asdict(self.tuned),
                "z_paired": self.z_paired, "z_two_sample": self.z_two_sample}

    def __str__(self) -> str:
        return (f"{self.gain:+.4g} ± {self.paired_se:.2g} paired ({self.z_paired:+.1f} s.e.; "
                f"two-sample ± {self.two_sample_se:.2g}, {self.z_two_sample:+.1f} s.e.)")


def gain(base, tuned, name: str = "gain") -> Gain:
    """The gain of ``tuned`` over ``base``, scored image by image on the same seeds and prompts (equal
    lengths: element i of each comes from the same initial noise). Different lengths are an error: an
    unpaired comparison is not this statistic's headline."""
    b, t = _vector(base, f"{name}: base"), _vector(tuned, f"{name}: tuned")
    if b.size != t.size:
        raise ValueError(f"{name}: base has {b.size} scores and tuned {t.size}; a paired gain needs the same seeds "
                         "for both (sample both models with the same --seed and --num-images)")
    mb, mt, d = mean_se(b), mean_se(t), mean_se(t - b)
    return Gain(mb, mt, d.mean, d.se, math.hypot(mb.se, mt.se))
