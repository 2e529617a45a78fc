"""The stochastic steps with their log-densities, written once for the online methods (SPO, D3PO,
PSO-online, FIND): DDIM on noise-prediction models, a reverse SDE on flow models.

DDIM (Song et al., 2021, Eq. 12) with ``alpha = sqrt(abar)``, ``sigma = sqrt(1 - abar)``:

    x_{t-1} = alpha_{t-1} x0_hat + sqrt(sigma_{t-1}^2 - s_t^2) eps_hat + s_t z,    z ~ N(0, I)
    s_t     = eta * (sigma_{t-1} / sigma_t) * sqrt(1 - alpha_t^2 / alpha_{t-1}^2)     (Eq. 16)

so ``p(x_{t-1} | x_t) = N(mu, s_t^2 I)`` and its log-density is a closed form. As in DDPO/D3PO/SPO it
is *averaged* over the latent elements (not summed), so ratio clipping and betas are per element.

Flow models (``x_s = (1 - s) x0 + s eps``, velocity ``v = eps - x0``; shared/methods/flow.md §5): the
reverse SDE with the flow ODE's marginals of Flow-GRPO's ODE-to-SDE conversion (Liu et al. 2025,
arXiv:2505.05470; its public ``sd3_sde_with_logprob.py`` read for the rule at s = 1), flow time s from 1 to 0:

    dx = [v + g_s^2 / (2 s) (x + (1 - s) v)] ds + g_s dW,        g_s = a sqrt(s / (1 - s))

(``x + (1 - s) v`` is the noise prediction, ``-(x + (1 - s) v) / s`` the score). One Euler-Maruyama
step from s to s' < s is Gaussian, mean ``x + [v + g^2/(2s) (x + (1 - s) v)] (s' - s)``, std
``g sqrt(s - s')`` (:func:`flow_sde_step_with_logprob`). ``a`` is Flow-GRPO's ``noise_level`` (0.7 there);
``a = sqrt(2)`` is the forward process's own diffusion (the DDPM-like reverse SDE); ``a = 0`` is the
ODE's Euler step (FlowMatchEulerDiscreteScheduler.step). At s = 1 g diverges; as Flow-GRPO, the first
step takes the next level in the denominator, ``g = a sqrt(1 / (1 - s'))`` (a clamp: it keeps a density
at every step, so a method may branch or train at the first step too). Euler-Maruyama is biased where
g is large (the first steps): on a 1-D Gaussian toy the std at s = 0.9 is 1.4 % high at 500 steps (the
marginals converge as steps grow; tests/test_flow_sde.py states the tolerances).
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


def flow_noise_std(sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float) -> torch.Tensor:
    """Flow-GRPO's ``g = a sqrt(s / (1 - s))``; at ``s = 1`` the next level takes the denominator's place."""
    return noise_level * (sigma / (1 - torch.where(sigma >= 1, sigma_next, sigma))).sqrt()


def flow_sde_step_with_logprob(model_output: torch.Tensor, sigma, sigma_next, sample: torch.Tensor,
                               noise_level: float = 0.7, noise: torch.Tensor | None = None,
                               prev_sample: torch.Tensor | None = None):
    """One Euler-Maruyama step ``x_s -> x_{s'}`` of the flow reverse SDE (module docstring) ->
    ``(x_{s'}, log p(x_{s'} | x_s))``, the log-prob per sample (mean over elements, as DDIM's).

    ``model_output``: the velocity ``v = eps - x0``. ``sigma``, ``sigma_next``: the levels s > s' (scalars
    or one per sample). Pass ``prev_sample`` to score a given transition, else ``noise`` (standard normal)
    or nothing (``torch.randn``). ``noise_level = 0``: the deterministic Euler step, log-prob ``None``."""
    if not noise_level >= 0:
        raise ValueError(f"noise_level must be >= 0 (Flow-GRPO's a; 0 = the ODE's Euler step); got {noise_level}")
    x, v = sample.float(), model_output.float()
    shape = (-1,) + (1,) * (x.dim() - 1)
    s, s_next = (torch.as_tensor(level, dtype=torch.float32) for level in (sigma, sigma_next))
    if s.device.type == "cpu" and s_next.device.type == "cpu" and bool((s_next >= s).any() | (s <= 0).any()):
        raise ValueError("flow_sde_step_with_logprob: need 1 >= sigma > sigma_next >= 0 (flow time runs from 1 to 0)")
    s, s_next = s.to(x.device).reshape(shape), s_next.to(x.device).reshape(shape)  # host levels: no device sync
    dt = s_next - s  # < 0
    if noise_level == 0:
        if prev_sample is not None:
            raise ValueError("noise_level = 0: the Euler step is deterministic and has no density to score a transition with")
        return x + dt * v, None
    g = flow_noise_std(s, s_next, noise_level)
    mean = x + (v + g**2 / (2 * s) * (x + (1 - s) * v)) * dt  # drift: v + g^2/(2s) * noise prediction
    std = g * (-dt).sqrt()
    if prev_sample is None:
        prev_sample = mean + std * (torch.randn_like(mean) if noise is None else noise.to(mean))
    return prev_sample, gaussian_logprob(prev_sample, mean, std)


class OnlineStep:
    """The stochastic transition of an online method on any family, with its schedule:
    ``step(pred, t, x, noise=None, prev_sample=None) -> (x_next, log-prob)``.

    Noise-prediction models: DDIM (``eta``) on a ``DDIMScheduler`` copy of the model's config (SPO, D3PO).
    Flow models: :func:`flow_sde_step_with_logprob` with ``a = eta`` on the model's own flow schedule
    (its shift; Flux's dynamic ``mu`` from the image token count at ``size``), as the stock pipeline
    samples. ``t`` is the scheduler's timestep (flow: 1000 s); the next level is looked up in the schedule."""

    def __init__(self, model, num_steps: int, eta: float, size: int):
        self.model, self.num_steps, self.eta, self.flow = model, num_steps, eta, model.is_flow
        if not self.flow:
            from diffusers import DDIMScheduler

            self.scheduler = DDIMScheduler.from_config(model.scheduler.config)
            self.scheduler.set_timesteps(num_steps)
            self.timesteps = self.scheduler.timesteps
            self.init_noise_sigma = self.scheduler.init_noise_sigma
            return
        self.scheduler = type(model.scheduler).from_config(model.scheduler.config)
        latents = torch.zeros((1,) + tuple(model.latent_shape(size)))
        pipe_scheduler = model.pipe.scheduler
        model.pipe.scheduler = self.scheduler  # the family sets this copy's schedule as the stock pipeline would
        try:
            timesteps, _ = model.family.timesteps(num_steps, latents=latents)
        finally:
            model.pipe.scheduler = pipe_scheduler
        self.timesteps = timesteps.float().cpu()
        self.sigmas = self.scheduler.sigmas.float().cpu()  # num_steps + 1 levels, the last 0
        self.init_noise_sigma = 1.0

    def levels(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow: ``(s, s')`` of each timestep in the schedule (a timestep not in it is an error)."""
        t = torch.as_tensor(t).float().reshape(-1).cpu()
        gap, index = (t[:, None] - self.timesteps[None]).abs().min(dim=1)
        if bool((gap > 1e-3).any()):
            raise ValueError(f"timestep {t[gap.argmax()].item()} is not in this {self.num_steps}-step schedule")
        return self.sigmas[index], self.sigmas[index + 1]

    def __call__(self, pred, t, x, noise=None, prev_sample=None):
        if not self.flow:
            return ddim_step_with_logprob(self.scheduler, pred, t, x, self.num_steps, self.eta, noise=noise, prev_sample=prev_sample)
        b = x.shape[0]
        s, s_next = (v.to(x.device).expand(b) if v.numel() == 1 else v.to(x.device) for v in self.levels(t))
        return flow_sde_step_with_logprob(pred, s, s_next, x, self.eta, noise=noise, prev_sample=prev_sample)


class FlowSDESampler:
    """The flow reverse SDE as a sampler of diffplug's loop (``pipelines/loop.py``: ``from_pipe(pipe,
    sampler=FlowSDESampler(a))``): each step is :func:`flow_sde_step_with_logprob` between the scheduler's
    consecutive sigmas (its shift, Flux's dynamic ``mu``), in place of the scheduler's Euler step. Row i's
    noise comes from ``generators[i]`` (set before each call), else from ``torch.randn``."""

    def __init__(self, noise_level: float):
        if not noise_level > 0:
            raise ValueError(f"noise_level must be > 0 for a stochastic sampler (0 is the scheduler's own ODE step); got {noise_level}")
        self.noise_level, self.generators = noise_level, None

    def check_scheduler(self, scheduler) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            raise ValueError(f"the flow SDE steps between a FlowMatchEulerDiscreteScheduler's sigmas; got "
                             f"{type(scheduler).__name__} (use --scheduler flow-euler)")

    def begin(self, latents, timesteps, scheduler, guidance):
        self.sigmas = scheduler.sigmas.float().cpu()  # host levels, as the loop gives schedulers a host t
        return latents

    def step(self, i, t, latents, guided, batches, context, scheduler, extra_step_kwargs):
        from . import data as D

        noise = D.randn(self.generators, latents.shape[1:], latents.device) if self.generators else None
        return flow_sde_step_with_logprob(guided, self.sigmas[i], self.sigmas[i + 1], latents, self.noise_level, noise=noise)[0]


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
