"""The stochastic DDIM step with its log-density, written once for the online methods
(SPO, D3PO, PSO-online, FIND).

DDIM (Song et al., 2021, Eq. 12) with ``alpha = sqrt(abar)``, ``sigma = sqrt(1 - abar)``:

    x_{t-1} = alpha_{t-1} x0_hat + sqrt(sigma_{t-1}^2 - s_t^2) eps_hat + s_t z,    z ~ N(0, I)
    s_t     = eta * (sigma_{t-1} / sigma_t) * sqrt(1 - alpha_t^2 / alpha_{t-1}^2)     (Eq. 16)

so ``p(x_{t-1} | x_t) = N(mu, s_t^2 I)`` and its log-density is a closed form. As in DDPO/D3PO/SPO it
is *averaged* over the latent elements (not summed), so ratio clipping and betas are per element.
"""

from __future__ import annotations

import math

import torch

from ..predictions import noise_levels, prediction_type_of, split


def previous_timestep(scheduler, t: torch.Tensor, num_inference_steps: int) -> torch.Tensor:
    return t - scheduler.config.num_train_timesteps // num_inference_steps


def _levels(scheduler, t: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) at integer timesteps; t < 0 means the end of sampling (``final_alpha_cumprod``)."""
    t = torch.as_tensor(t).reshape(-1).cpu()
    alpha, sigma = noise_levels(scheduler, t.clamp(min=0))
    final = torch.as_tensor(getattr(scheduler, "final_alpha_cumprod", scheduler.alphas_cumprod[0])).float()
    alpha = torch.where(t < 0, final.sqrt(), alpha)
    sigma = torch.where(t < 0, (1 - final).sqrt(), sigma)
    return alpha.to(device), sigma.to(device)


def ddim_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor,
    sample: torch.Tensor,
    num_inference_steps: int,
    eta: float = 1.0,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    prediction_type: str | None = None,
):
    """One DDIM step ``x_t -> x_{t-1}`` -> ``(x_{t-1}, log p(x_{t-1} | x_t))``, log-prob per sample.

    ``timestep``: a scalar or one per sample. Pass ``prev_sample`` to score a given transition
    (training), else ``noise`` (standard normal, like ``sample``) or nothing (``torch.randn``).
    ``eta`` must be > 0 for a density (eta = 1: the DDPM posterior variance).
    """
    if eta <= 0:
        raise ValueError("eta must be > 0: the DDIM transition is deterministic at eta = 0 and has no density")
    prediction_type = prediction_type or prediction_type_of(scheduler)
    b = sample.shape[0]
    t = torch.as_tensor(timestep).reshape(-1).expand(b) if torch.as_tensor(timestep).numel() == 1 else torch.as_tensor(timestep)
    shape = (b,) + (1,) * (sample.dim() - 1)
    alpha_t, sigma_t = (v.view(shape) for v in _levels(scheduler, t, sample.device))
    alpha_prev, sigma_prev = (v.view(shape) for v in _levels(scheduler, previous_timestep(scheduler, t, num_inference_steps), sample.device))

    x0, eps = split(model_output.float(), sample.float(), alpha_t, sigma_t, prediction_type)
    if getattr(scheduler.config, "clip_sample", False):  # as DDIMScheduler.step: clip x0, keep eps
        r = scheduler.config.clip_sample_range
        x0 = x0.clamp(-r, r)
    std = eta * (sigma_prev / sigma_t) * (1 - alpha_t**2 / alpha_prev**2).clamp(min=0).sqrt()  # Eq. 16
    mean = alpha_prev * x0 + (sigma_prev**2 - std**2).clamp(min=0).sqrt() * eps  # Eq. 12
    if prev_sample is None:
        if noise is None:
            noise = torch.randn_like(mean)
        prev_sample = mean + std * noise.to(mean)
    std = std.clamp(min=1e-12)  # the last step into abar = 1 is deterministic
    log_prob = -((prev_sample.detach().float() - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.dim())))


def guided_prediction(model, unet, x: torch.Tensor, t: torch.Tensor, conditions: dict, guidance_scale: float) -> torch.Tensor:
    """CFG ``uncond + w (cond - uncond)`` in one batched call. ``conditions``: ``{keyword: (cond, uncond)}``
    as ``DiffusionModel.encode_prompts(..., uncond=True)`` returns; ``model`` a ``DiffusionModel``."""
    if guidance_scale == 1.0:
        return model.predict(unet, x, t, {k: c for k, (c, _) in conditions.items()})
    both = {k: torch.cat([u, c]) for k, (c, u) in conditions.items()}
    t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
    out_u, out_c = model.predict(unet, torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
    return out_u + guidance_scale * (out_c - out_u)
