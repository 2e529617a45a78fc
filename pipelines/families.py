"""Family adapters: how a stock diffusers pipeline encodes prompts, prepares latents, calls its
denoiser and decodes. Each adapter reuses the pipeline's own methods (``encode_prompt``,
``prepare_latents``, ``_get_add_time_ids``, its image processor) and adds only the glue the shared
loop needs: the condition tensors as ``(cond, uncond)`` pairs and one model call.
"""

from __future__ import annotations

import inspect

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps


class Family:
    """Stable Diffusion 1.x/2.x (``StableDiffusionPipeline``): UNet + CLIP text encoder."""

    name = "sd"
    denoiser_attr = "unet"

    def __init__(self, pipe):
        self.pipe = pipe

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_attr)

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    def default_size(self) -> tuple[int, int]:
        size = self.denoiser.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        return h * self.pipe.vae_scale_factor, w * self.pipe.vae_scale_factor

    def size_factor(self) -> int:
        """Height and width must be multiples of this: the VAE's factor (times a transformer's patch)."""
        return self.pipe.vae_scale_factor * (getattr(self.denoiser.config, "patch_size", None) or 1)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        f = self.pipe.vae_scale_factor
        return (batch, self.denoiser.config.in_channels, height // f, width // f)

    def call_arguments(self) -> set[str]:
        """Family keywords ``run(...)`` passes on: ``encode_prompt``'s, ``conditions``' and ``timesteps``'."""
        names = set(inspect.signature(self.pipe.encode_prompt).parameters) - {"device", "do_classifier_free_guidance"}
        for fn in (self.conditions, self.timesteps):
            names |= {k for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}
        return names

    # Stock-pipeline arguments accepted at the one value diffplug's loop behaves like.
    neutral_arguments: dict = {}

    def distilled_guidance(self, guidance, conditions: dict):
        """A guidance-distilled UNet (``time_cond_proj_dim``, e.g. LCM) takes CFG's scale as an input, as
        ``StableDiffusionPipeline`` gives it (``timestep_cond`` = embedding of ``w - 1``), in one conditional
        pass -> ``(guidance to run, conditions)``; other UNets are returned unchanged."""
        dim = getattr(self.denoiser.config, "time_cond_proj_dim", None)
        if dim is None:
            return guidance, conditions
        from ..guidance.base import CFG

        if type(guidance) is not CFG:
            raise ValueError(f"this UNet is guidance-distilled (time_cond_proj_dim is set): it takes its guidance "
                             f"scale as an input; {type(guidance).__name__} cannot steer it; use plain CFG (--guidance cfg)")
        n = conditions["encoder_hidden_states"][0].shape[0]
        w = torch.full((n,), float(guidance.guidance_scale) - 1.0)
        emb = self.pipe.get_guidance_scale_embedding(w, embedding_dim=dim).to(self.device)
        return CFG(1.0), {**conditions, "timestep_cond": (emb, emb)}

    def encode(self, **call) -> dict:
        """The pipeline's own ``encode_prompt`` -> conditions ``{model keyword: (cond, uncond)}``.

        ``call`` holds the user's call arguments; each pipeline's ``encode_prompt`` takes the ones it
        names (``prompt_2``, ``clip_skip``, ``max_sequence_length``, ...). ``None`` keeps its default.
        """
        params = inspect.signature(self.pipe.encode_prompt).parameters
        call = {**call, "device": self.device, "do_classifier_free_guidance": True}
        required = {
            k for k, p in params.items()
            if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }
        encoded = self.pipe.encode_prompt(
            **{k: call.get(k) for k in params if k in required or call.get(k) is not None}
        )
        return self.conditions(*encoded, **call)

    def conditions(self, cond, uncond, **call) -> dict:
        return {"encoder_hidden_states": (cond, uncond)}

    def timesteps(self, num_inference_steps, timesteps=None, sigmas=None, latents=None, **kw):
        return retrieve_timesteps(self.pipe.scheduler, num_inference_steps, self.device, timesteps, sigmas)

    def prepare_latents(self, batch, height, width, generator, latents):
        channels = self.denoiser.config.in_channels
        return self.pipe.prepare_latents(
            batch, channels, height, width, torch.float32, self.device, generator, latents
        ).float()

    def model(self, x, t, encoder_hidden_states, timestep_cond=None, **fields):
        unet = self.pipe.unet
        return unet(
            x.to(unet.dtype),
            t,
            encoder_hidden_states=encoder_hidden_states,
            timestep_cond=None if timestep_cond is None else timestep_cond.to(unet.dtype),
            added_cond_kwargs=fields or None,
            return_dict=False,
        )[0].float()

    def decode(self, latents, output_type, generator=None):
        """-> (images, nsfw flags or None): the VAE, the pipeline's safety checker if it has one, its
        image processor."""
        if output_type == "latent":
            return latents, None
        vae = self.pipe.vae
        latents = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        image = vae.decode(latents.to(vae.dtype), return_dict=False, generator=generator)[0]
        nsfw = None
        if hasattr(self.pipe, "run_safety_checker"):
            image, nsfw = self.pipe.run_safety_checker(image, self.device, image.dtype)
        denormalize = None if nsfw is None else [not flag for flag in nsfw]
        return self.pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize), nsfw


class SDXLFamily(Family):
    """``StableDiffusionXLPipeline``: two text encoders, pooled embeddings and micro-conditioning ids."""

    name = "sdxl"

    def conditions(
        self,
        cond,
        uncond,
        pooled,
        pooled_uncond,
        *,
        height,
        width,
        original_size=None,
        crops_coords_top_left=(0, 0),
        target_size=None,
        negative_original_size=None,
        negative_crops_coords_top_left=(0, 0),
        negative_target_size=None,
        **call,
    ):
        pipe = self.pipe
        projection = (
            int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
        )

        def time_ids(orig, crops, target):
            ids = pipe._get_add_time_ids(
                orig or (height, width), crops, target or (height, width), dtype=cond.dtype,
                text_encoder_projection_dim=projection,
            )
            return ids.to(self.device).repeat(cond.shape[0], 1)

        ids = time_ids(original_size, crops_coords_top_left, target_size)
        ids_uncond = (
            time_ids(negative_original_size, negative_crops_coords_top_left, negative_target_size)
            if negative_original_size is not None and negative_target_size is not None
            else ids
        )
        return {"encoder_hidden_states": (cond, uncond), "text_embeds": (pooled, pooled_uncond), "time_ids": (ids, ids_uncond)}

    def decode(self, latents, output_type, generator=None):
        if output_type == "latent":
            return latents, None
        vae = self.pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        decoder = vae.float() if upcast else vae
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, -1, 1, 1)
            latents = latents * torch.tensor(std).view(shape).to(latents) / vae.config.scaling_factor
            latents = latents + torch.tensor(mean).view(shape).to(latents)
        else:
            latents = latents / vae.config.scaling_factor
        image = decoder.decode(latents.to(decoder.dtype), return_dict=False)[0]
        if upcast:
            vae.to(dtype=torch.float16)
        if self.pipe.watermark is not None:
            image = self.pipe.watermark.apply_watermark(image)
        return self.pipe.image_processor.postprocess(image, output_type=output_type), None


class SD3Family(Family):
    """``StableDiffusion3Pipeline``: MMDiT transformer, rectified flow (velocity prediction)."""

    name = "sd3"
    denoiser_attr = "transformer"

    def conditions(self, cond, uncond, pooled, pooled_uncond, **call) -> dict:
        return {"encoder_hidden_states": (cond, uncond), "pooled_projections": (pooled, pooled_uncond)}

    def timesteps(self, num_inference_steps, timesteps=None, sigmas=None, latents=None, mu=None, **kw):
        scheduler, config = self.pipe.scheduler, self.pipe.scheduler.config
        extra = {}
        if config.get("use_dynamic_shifting", None) and mu is None:
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            patch = self.denoiser.config.patch_size
            seq_len = (latents.shape[-2] // patch) * (latents.shape[-1] // patch)
            mu = calculate_shift(
                seq_len,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )
        if mu is not None:
            extra["mu"] = mu
        return retrieve_timesteps(scheduler, num_inference_steps, self.device, timesteps, sigmas, **extra)

    def model(self, x, t, encoder_hidden_states, pooled_projections):
        transformer = self.pipe.transformer
        return transformer(
            hidden_states=x.to(transformer.dtype),
            timestep=t.expand(x.shape[0]),
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            return_dict=False,
        )[0].float()


class PixArtFamily(Family):
    """``PixArtSigmaPipeline`` / ``PixArtAlphaPipeline``: DiT with a T5-style (masked) text encoder."""

    name = "pixart"
    denoiser_attr = "transformer"
    neutral_arguments = {"use_resolution_binning": False}  # diffplug never bins sizes

    def conditions(self, cond, mask, uncond, mask_uncond, **call) -> dict:
        return {"encoder_hidden_states": (cond, uncond), "encoder_attention_mask": (mask, mask_uncond)}

    def model(self, x, t, encoder_hidden_states, encoder_attention_mask):
        transformer = self.pipe.transformer
        out = transformer(
            x.to(transformer.dtype),
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            timestep=t.expand(x.shape[0]),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )[0].float()
        if transformer.config.out_channels // 2 == x.shape[1]:  # learned sigma: keep the mean part
            out = out.chunk(2, dim=1)[0]
        return out


# Most specific first: SDXL pipelines also have `unet`, PixArt and SD3 both have `transformer`.
_FAMILIES = {
    "StableDiffusionXLPipeline": SDXLFamily,
    "StableDiffusion3Pipeline": SD3Family,
    "PixArtSigmaPipeline": PixArtFamily,
    "PixArtAlphaPipeline": PixArtFamily,
    "StableDiffusionPipeline": Family,
}


def family_of(pipe) -> Family:
    """The adapter for ``pipe``, found by its class (or a base class) name."""
    for cls in inspect.getmro(type(pipe)):
        if cls.__name__ in _FAMILIES:
            return _FAMILIES[cls.__name__](pipe)
    raise TypeError(
        f"diffplug.pipelines.from_pipe does not know {type(pipe).__name__}; supported: "
        f"{', '.join(_FAMILIES)} (and their subclasses)"
    )
