"""The denoising loop: one, for every guidance, scheduler and sampler in diffplug.

Per step (architecture.md):

    guidance.set_state / set_context / prepare_inputs   which condition passes, and the x0 context
    model(x_t, t, condition batches)                     one batched network call
    guidance(batches)                                    -> combined prediction
    sampler.step / scheduler.step                        x_t -> x_{t-1}, in float32

Latents and scheduler maths stay float32 whatever the model's dtype; the model sees its own dtype.
Nothing here reads a tensor back to the host, so a step launches asynchronously unless a guidance
or sampler asks for a decision (per-sample ``rows``, resampling). The timesteps are copied to the
host once per run: schedulers get a host ``t`` (DDIM indexes its CPU tables with it, which a device
``t`` would turn into a sync per step), the model and guidance the device one. ``syncs.py`` counts
the syncs that remain (benchmarks/loop_results.md).
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch

from ..guidance.base import Guidance
from ..predictions import StepContext, noise_levels, prediction_type_of

ModelFn = Callable[..., torch.Tensor]  # model(x, t, **fields) -> prediction


class Sampler(Protocol):
    """A sampler owns the step from ``x_t`` to ``x_{t-1}`` for the whole batch (e.g. SMC with
    resampling). ``step`` receives the guided prediction and each condition's own prediction.

    Optional: ``begin(latents, timesteps, scheduler, guidance) -> latents``, called once before the
    first step (reset per-run state, read the guidance's settings, adjust the initial latents)."""

    def step(
        self,
        i: int,
        t: torch.Tensor,
        latents: torch.Tensor,
        guided: torch.Tensor,
        batches: list,
        context: StepContext,
        scheduler,
        extra_step_kwargs: dict,
    ) -> torch.Tensor: ...


def evaluate(model: ModelFn, x: torch.Tensor, t: torch.Tensor, batches: Sequence, fields: Sequence[str]) -> list:
    """Run every condition batch through ``model`` in one call; return one prediction per batch.

    A batch's ``rows`` (sample indices), if set, restricts that condition to those samples.
    A batch that carries its own ``model`` (a second network sharing the latent space, e.g. the
    second expert of a product) is evaluated by that model, with the inputs named in its ``fields``.
    """
    shared = [b for b in batches if getattr(b, "model", None) is None]
    xs, cat = [], {k: [] for k in fields}
    for batch in shared:
        rows = getattr(batch, "rows", None)
        xs.append(x if rows is None else x[rows])
        for k in fields:
            value = getattr(batch, k, None)
            if value is not None:
                cat[k].append(value if rows is None else value[rows])
    outs = iter(())
    if shared:
        kwargs = {k: torch.cat(v) for k, v in cat.items() if v}
        outs = iter(model(torch.cat(xs), t, **kwargs).split([len(xi) for xi in xs]))
    preds = []
    for batch in batches:
        own = getattr(batch, "model", None)
        if own is None:
            preds.append(next(outs))
            continue
        rows = getattr(batch, "rows", None)
        kwargs = {k: getattr(batch, k) if rows is None else getattr(batch, k)[rows] for k in batch.fields}
        x_own = x if rows is None else x[rows]
        if hasattr(model, "count"):  # keep the caller's evaluation count whole
            model.count(x_own.shape[0])
        preds.append(own(x_own, t, **kwargs))
    return preds


def _evaluate_sequentially(model, x, t, batches, fields, guidance, denoiser) -> list:
    # Guiders that patch the model per batch (diffusers' PAG, SLG, ...) need one call per batch,
    # bracketed by prepare_models/cleanup_models, exactly as modular pipelines run them.
    outs = []
    for batch in batches:
        guidance.prepare_models(denoiser)
        outs.extend(evaluate(model, x, t, [batch], fields))
        guidance.cleanup_models(denoiser)
    return outs


def denoise(
    model: ModelFn,
    scheduler,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    conditions: dict,
    guidance,
    *,
    sampler: Sampler | None = None,
    extra_step_kwargs: dict | None = None,
    denoiser: torch.nn.Module | None = None,
    on_step: Callable | None = None,
    progress=None,
) -> torch.Tensor:
    """Denoise ``latents`` over ``timesteps`` with ``guidance`` and return the final latents.

    ``conditions`` maps each model keyword to a tuple ``(cond, uncond, ...)`` of per-condition tensors,
    as diffusers guiders expect. ``on_step(i, t, latents) -> latents`` runs after each step (callbacks).
    """
    extra_step_kwargs = extra_step_kwargs or {}
    latents = latents.float()
    alphas, sigmas = (levels.unbind() for levels in noise_levels(scheduler, timesteps))  # no per-step indexing op
    prediction_type = prediction_type_of(scheduler)
    batched = isinstance(guidance, Guidance)
    fields = list(conditions)
    n = len(timesteps)
    host_timesteps = torch.as_tensor(timesteps).cpu()  # one read per run; see the module docstring
    if sampler is not None and hasattr(sampler, "begin"):
        latents = sampler.begin(latents, timesteps, scheduler, guidance).float()
    for i, (t, t_host) in enumerate(zip(timesteps, host_timesteps)):
        x_in = scheduler.scale_model_input(latents, t_host) if hasattr(scheduler, "scale_model_input") else latents
        guidance.set_state(step=i, num_inference_steps=n, timestep=t)
        context = StepContext(x_in, alphas[i], sigmas[i], prediction_type)
        if batched:
            guidance.set_context(context)
        batches = guidance.prepare_inputs(conditions)
        if batched:
            preds = evaluate(model, x_in, t, batches, fields)
        else:
            preds = _evaluate_sequentially(model, x_in, t, batches, fields, guidance, denoiser)
        for batch, pred in zip(batches, preds):
            batch.noise_pred = pred
        guided = guidance(batches).pred
        if sampler is None:
            latents = scheduler.step(guided, t_host, latents, **extra_step_kwargs, return_dict=False)[0]
        else:
            latents = sampler.step(i, t, latents, guided, batches, context, scheduler, extra_step_kwargs)
        if on_step is not None:
            latents = on_step(i, t, latents)
        if progress is not None:
            progress.update()
    return latents
