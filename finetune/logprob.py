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
    return prev_sample, gaussian_logprob(prev_sample, mean, std)


def gaussian_logprob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2 I) averaged over the non-batch elements (DDPO convention); ``x`` detached."""
    std = std.clamp(min=1e-12)  # a deterministic step (e.g. into abar = 1)
    log_prob = -((x.detach().float() - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)
    return log_prob.mean(dim=tuple(range(1, log_prob.dim())))


def renoise_step_with_logprob(scheduler, model_output, timestep, sample, next_timestep, noise=None, prev_sample=None,
                              prediction_type: str | None = None):
    """The consistency-model stochastic step (LCM, multistep CM sampling; PSO-online) ``x_t -> x_s``:
    ``x0_hat = f(x_t, t)``, then ``x_s ~ N(alpha_s x0_hat, sigma_s^2 I)`` -> ``(x_s, log-prob per sample,
    x0_hat)``. ``f`` is ``LCMScheduler``'s ``c_skip x_t + c_out x0`` when the scheduler has that boundary
    condition, else the plain x0 prediction. ``next_timestep`` < 0: the end (``final_alpha_cumprod``)."""
    prediction_type = prediction_type or prediction_type_of(scheduler)
    b, shape = sample.shape[0], (sample.shape[0],) + (1,) * (sample.dim() - 1)
    t = torch.as_tensor(timestep).reshape(-1).expand(b)
    alpha_t, sigma_t = (v.view(shape) for v in _levels(scheduler, t, sample.device))
    alpha_s, sigma_s = (v.view(shape) for v in _levels(scheduler, torch.as_tensor(next_timestep).reshape(-1).expand(b), sample.device))
    x0 = split(model_output.float(), sample.float(), alpha_t, sigma_t, prediction_type)[0]
    if hasattr(scheduler, "get_scalings_for_boundary_condition_discrete"):
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t.cpu().float())
        x0 = c_skip.to(sample.device).view(shape) * sample.float() + c_out.to(sample.device).view(shape) * x0
    mean = alpha_s * x0
    if prev_sample is None:
        prev_sample = mean + sigma_s * (torch.randn_like(mean) if noise is None else noise.to(mean))
    return prev_sample, gaussian_logprob(prev_sample, mean, sigma_s), x0


def guided_prediction(model, unet, x: torch.Tensor, t: torch.Tensor, conditions: dict, guidance_scale: float) -> torch.Tensor:
    """CFG ``uncond + w (cond - uncond)`` in one batched call. ``conditions``: ``{keyword: (cond, uncond)}``
    as ``DiffusionModel.encode_prompts(..., uncond=True)`` returns; ``model`` a ``DiffusionModel``."""
    if guidance_scale == 1.0:
        return model.predict(unet, x, t, {k: c for k, (c, _) in conditions.items()})
    both = {k: torch.cat([u, c]) for k, (c, u) in conditions.items()}
    t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
    out_u, out_c = model.predict(unet, torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
    return out_u + guidance_scale * (out_c - out_u)


class PromptCache:
    """``model.encode_prompts(prompts, size, uncond=True)`` with each distinct prompt encoded once
    (the text encoder is frozen; online methods re-encode the same few prompts every step)."""

    def __init__(self, model, size: int):
        self.model, self.size, self.rows = model, size, {}

    def __call__(self, prompts: list[str]) -> dict:
        new = list(dict.fromkeys(p for p in prompts if p not in self.rows))
        if new:
            enc = self.model.encode_prompts(new, self.size, uncond=True)
            for i, p in enumerate(new):
                self.rows[p] = {k: (c[i], u[i]) for k, (c, u) in enc.items()}
        keys = self.rows[prompts[0]].keys()
        return {k: (torch.stack([self.rows[p][k][0] for p in prompts]), torch.stack([self.rows[p][k][1] for p in prompts]))
                for k in keys}
