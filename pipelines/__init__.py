"""Run any diffplug guidance, scheduler or sampler inside the stock pipeline a user already has.

    from diffusers import StableDiffusionPipeline, UniPCMultistepScheduler
    from diffplug.guidance import CFG
    from diffplug.pipelines import from_pipe

    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    run = from_pipe(pipe, guidance=CFG(5.0))
    images = run("a photo of a sneaker", num_inference_steps=20).images

``from_pipe`` keeps the pipeline's components, its scheduler and its prompt encoding, latent
preparation and decoding; only the denoising loop is diffplug's (see ``loop.py``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from .families import Family, _second_pass, family_of
from .graphs import GraphChoice
from .loop import Sampler, denoise, evaluate
from .validate import check_call, check_final_latents, check_guidance

__all__ = ["DiffplugPipeline", "GenerationOutput", "Sampler", "denoise", "evaluate", "family_of", "from_pipe"]


@dataclass
class GenerationOutput:
    """What the stock pipeline returns (``.images``), plus what diffplug knows about the run."""

    images: Any
    nsfw_content_detected: Any = None
    nfe: int = 0  # network evaluations per output image, in samples x steps (one CFG step of batch 1 = 2)
    sampler_output: Any = None

    def __getitem__(self, index):  # `pipe(...)[0]` works as with diffusers outputs
        return (self.images, self.nsfw_content_detected)[index]


class _Counted:
    """The model, counting network evaluations in samples (a second model's too, via ``count``)."""

    def __init__(self, model):
        self.model, self.n = model, 0

    def count(self, samples: int) -> None:
        self.n += samples

    def __call__(self, x, t, **fields):
        self.count(x.shape[0])
        return self.model(x, t, **fields)


class DiffplugPipeline:
    """A stock pipeline run through diffplug's loop; called like the original pipeline."""

    def __init__(self, pipe, guidance=None, sampler: Sampler | None = None, cuda_graph: bool | None = None):
        self.pipe = pipe
        self.family: Family = family_of(pipe)
        self.guidance = check_guidance(self.family, guidance)
        self.sampler = sampler
        if hasattr(sampler, "check_scheduler"):  # e.g. FKC refuses a scheduler whose update it would ignore
            sampler.check_scheduler(pipe.scheduler)
        self.graphs = GraphChoice(self.family, cuda_graph)  # eager or CUDA graphs, per call

    def __getattr__(self, name):  # components, scheduler, config, ... are the pipeline's
        if name == "pipe":
            raise AttributeError(name)
        return getattr(self.pipe, name)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        **family_kwargs,
    ):
        """Generate as ``pipe(...)`` would.

        ``guidance_scale``: with no guidance object, CFG at this scale (if omitted, the stock
        pipeline's default);
        with one, a copy of it at this scale (omit it to keep the object's own scale).
        Flux (guidance-distilled transformers): the guidance *embedding*, as stock; the guidance
        object (or ``true_cfg_scale`` with ``negative_prompt``) runs the second pass (``FluxFamily``).
        Z-Image: its s (w = 1 + s). Each family's rule is its ``guidance_for``.
        Family-specific arguments (``prompt_2``, ``original_size``, ``mu``, ``max_sequence_length``,
        Flux's ``true_cfg_scale``, Z-Image's ``cfg_normalization``...) pass through to the family adapter.
        """
        pipe, family = self.pipe, self.family
        height, width = check_call(
            family, prompt=prompt, prompt_embeds=prompt_embeds, height=height, width=width,
            num_inference_steps=num_inference_steps, num_images_per_prompt=num_images_per_prompt,
            guidance_scale=guidance_scale, latents=latents, output_type=output_type, family_kwargs=family_kwargs,
            negative_prompt=negative_prompt, negative_prompt_embeds=negative_prompt_embeds,
        )
        if set(callback_on_step_end_tensor_inputs) - {"latents"}:
            raise ValueError("callback_on_step_end_tensor_inputs: diffplug's loop hands callbacks `latents` only")
        guidance = family.guidance_for(self.guidance, guidance_scale, {"negative_prompt": negative_prompt,
                                       "negative_prompt_embeds": negative_prompt_embeds, **family_kwargs})
        conditions = family.encode(
            prompt=prompt,
            negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            height=height,
            width=width,
            guidance_scale=guidance_scale,
            unconditional=_second_pass(guidance),
            **family_kwargs,
        )
        guidance, conditions = family.distilled_guidance(guidance, conditions)  # LCM: w is a UNet input
        batch = next(iter(conditions.values()))[0].shape[0]
        latents = family.prepare_latents(batch, height, width, generator, latents)
        told = getattr(pipe.scheduler, "told_guidance_scale", contextlib.nullcontext)
        with told(getattr(guidance, "guidance_scale", None)):  # DC-Solver: CPR ratios for the real scale
            steps, num_inference_steps = family.timesteps(
                num_inference_steps, timesteps=timesteps, sigmas=sigmas, latents=latents, **family_kwargs
            )
        if hasattr(pipe.scheduler, "set_begin_index"):
            pipe.scheduler.set_begin_index(0)
        if hasattr(pipe, "prepare_extra_step_kwargs"):
            extra_step_kwargs = pipe.prepare_extra_step_kwargs(generator, eta)
        elif eta:  # Flux, SD3, ...: the stock pipeline takes no eta, and its step would ignore it
            raise ValueError(f"eta={eta}: {type(pipe).__name__} takes no eta (its scheduler's step has none); "
                             "drop it, or use a stochastic sampler (sampler=...) for noise injection")
        else:  # a stochastic sampler (FKC) still draws its noise from the call's generator
            extra_step_kwargs = {"generator": generator} if self.sampler is not None else {}

        counted = _Counted(self.graphs.model(guidance))

        def on_step(i, t, latents):
            if callback_on_step_end is None:
                return latents
            out = callback_on_step_end(pipe, i, t, {"latents": latents}) or {}
            return out.get("latents", latents)

        with pipe.progress_bar(total=len(steps)) as progress:
            latents = denoise(
                counted, pipe.scheduler, latents, steps, conditions, guidance,
                sampler=self.sampler, extra_step_kwargs=extra_step_kwargs, denoiser=family.denoiser,
                on_step=on_step, progress=progress,
            )
        check_final_latents(latents, len(steps))  # once per call: NaN/inf is an error, not a black image
        images, nsfw = family.decode(latents, output_type, generator)
        if hasattr(pipe, "maybe_free_model_hooks"):
            pipe.maybe_free_model_hooks()
        if not return_dict:
            return images, nsfw
        outputs = batch // getattr(self.sampler, "rows_per_output", 1)  # SMC: K particles make one image
        return GenerationOutput(images, nsfw, counted.n // outputs, getattr(self.sampler, "output", None))


def from_pipe(pipe, guidance=None, sampler: Sampler | None = None, cuda_graph: bool | None = None) -> DiffplugPipeline:
    """Wrap a stock diffusers pipeline so it runs ``guidance`` (a ``BaseGuidance``; default CFG)
    and ``sampler`` (default: the pipeline's scheduler's own step) in diffplug's loop.

    ``cuda_graph``: None (auto) replays the denoiser from CUDA graphs when the pipeline is on CUDA
    and the model allows it (else eager; on CUDA with one warning saying why), True insists
    (``ValueError`` where it cannot), False keeps it eager (see ``graphs.py``)."""
    return DiffplugPipeline(pipe, guidance=guidance, sampler=sampler, cuda_graph=cuda_graph)
