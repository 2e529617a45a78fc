"""Prediction-space conversions: epsilon <-> x0 <-> v <-> flow velocity, written once.

Every scheduler diffplug supports sees the model input as ``x_t = alpha_t * x0 + sigma_t * eps``:

* variance-preserving schedulers (DDPM, DDIM, DPM-Solver++, UniPC, ...): ``alpha_t**2 = alphas_cumprod[t]``,
  ``sigma_t**2 = 1 - alpha_t**2``;
* Euler-style schedulers scale their ``sample`` by ``1/sqrt(1 + s**2)`` in ``scale_model_input``; the
  *scaled* input is again VP, so the same alpha/sigma hold for it (and interpolate at fractional t);
* rectified flow (FlowMatchEuler): ``alpha_t = 1 - s``, ``sigma_t = s`` with ``s = t / num_train_timesteps``,
  and the model predicts the velocity ``u = eps - x0``.

All conversions go through the pair ``(x0, eps)``. Methods that think in x0 (APG, FKC, DC-Solver's
search, DPO targets) ask this module; nobody else re-derives alphas and sigmas.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow")


def prediction_type_of(scheduler) -> str:
    """The prediction type a scheduler expects: diffusers' name, or ``"flow"`` for flow matching."""
    if is_flow_scheduler(scheduler):
        return "flow"
    kind = getattr(scheduler.config, "prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"unsupported prediction_type {kind!r}; diffplug supports {PREDICTION_TYPES}")
    return kind


def is_flow_scheduler(scheduler) -> bool:
    cfg = scheduler.config
    return getattr(cfg, "use_flow_sigmas", False) or (
        not hasattr(scheduler, "alphas_cumprod") and hasattr(cfg, "shift")
    )


def split(output: torch.Tensor, sample: torch.Tensor, alpha, sigma, prediction_type: str):
    """Model output -> ``(x0, eps)`` for ``sample = alpha * x0 + sigma * eps``."""
    if prediction_type == "epsilon":
        eps = output
        return (sample - sigma * eps) / alpha, eps
    if prediction_type == "sample":
        x0 = output
        return x0, (sample - alpha * x0) / sigma
    if prediction_type == "v_prediction":  # v = alpha*eps - sigma*x0, with alpha^2 + sigma^2 = 1
        return alpha * sample - sigma * output, sigma * sample + alpha * output
    if prediction_type == "flow":  # u = eps - x0, with alpha + sigma = 1
        return sample - sigma * output, sample + alpha * output
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def join(x0: torch.Tensor, eps: torch.Tensor, alpha, sigma, prediction_type: str) -> torch.Tensor:
    """``(x0, eps)`` -> the model output of ``prediction_type``."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x0
    if prediction_type == "flow":
        return eps - x0
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def convert(output, sample, alpha, sigma, src: str, dst: str) -> torch.Tensor:
    """Re-express a model output of type ``src`` as type ``dst`` (``"sample"`` is x0)."""
    if src == dst:
        return output
    x0, eps = split(output, sample, alpha, sigma, src)
    return join(x0, eps, alpha, sigma, dst)


def noise_levels(scheduler, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha_t, sigma_t)`` of the *model input* at each timestep, in float32 on ``timesteps.device``.

    Computed for a whole schedule at once, so a sampling loop indexes device tensors and never syncs.
    """
    t = torch.as_tensor(timesteps).float()
    n_train = scheduler.config.num_train_timesteps
    if is_flow_scheduler(scheduler):
        s = t / n_train
        return 1.0 - s, s
    # VP: interpolate log(VE sigma) linearly in t -- the exact inverse of Euler's `_sigma_to_t`,
    # and the table value itself at integer t.
    ac = scheduler.alphas_cumprod.to(device=t.device, dtype=torch.float64)
    log_s = 0.5 * (torch.log1p(-ac) - torch.log(ac))
    t = t.clamp(0, n_train - 1)
    lo = t.floor().long().clamp(max=n_train - 2)
    w = (t - lo).double()
    ls = (1 - w) * log_s[lo] + w * log_s[lo + 1]
    alpha = torch.rsqrt(1 + torch.exp(2 * ls))
    return alpha.float(), (alpha * torch.exp(ls)).float()


@dataclass
class StepContext:
    """What an x0-space method needs at one step: the model input and its noise level.

    The loop hands one of these to guidance/samplers before each combine; ``to_x0`` and
    ``from_x0`` convert predictions of the scheduler's type without the caller knowing it.
    """

    sample: torch.Tensor  # the model input x_t (after scale_model_input), float32
    alpha: torch.Tensor  # 0-d float32
    sigma: torch.Tensor  # 0-d float32
    prediction_type: str

    def to_x0(self, output: torch.Tensor, sample: torch.Tensor | None = None) -> torch.Tensor:
        s = self.sample if sample is None else sample
        return split(output, s, self.alpha, self.sigma, self.prediction_type)[0]

    def from_x0(self, x0: torch.Tensor, sample: torch.Tensor | None = None) -> torch.Tensor:
        s = self.sample if sample is None else sample
        eps = (s - self.alpha * x0) / self.sigma
        return join(x0, eps, self.alpha, self.sigma, self.prediction_type)

    def to_eps(self, output: torch.Tensor, sample: torch.Tensor | None = None) -> torch.Tensor:
        s = self.sample if sample is None else sample
        return split(output, s, self.alpha, self.sigma, self.prediction_type)[1]
