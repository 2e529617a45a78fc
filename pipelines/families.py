"""Family adapters: how a stock diffusers pipeline encodes prompts, prepares latents, calls its
denoiser and decodes. Each adapter reuses the pipeline's own methods (``encode_prompt``,
``prepare_latents``, ``_get_add_time_ids``, its image processor) and adds only the glue the shared
loop needs: the condition tensors as ``(cond, uncond)`` pairs and one model call.
"""

from __future__ import annotations

import inspect
import math
import warnings

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps


def stock_default(pipe, name: str, fallback=None):
    """The default of ``name`` in the stock pipeline's ``__call__`` (``fallback`` where it has none)."""
    param = inspect.signature(type(pipe).__call__).parameters.get(name)
    return fallback if param is None or param.default is inspect.Parameter.empty else param.default


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
    # What the stock pipeline's ``guidance_scale`` is: CFG's w ("cfg"), or a guidance-distilled
    # transformer's embedding input ("embedding", Flux / Qwen-Image: CFG is a second, opt-in pass).
    guidance_scale_is = "cfg"
    # Why this family's model call can never be replayed from a CUDA graph (None: it can; graphs.py)
    no_cuda_graph: str | None = None

    def guidance_for(self, guidance, guidance_scale, call: dict):
        """The guidance that combines this call's passes. Here ``guidance_scale`` is CFG's w: with no
        guidance object, CFG at that scale (omitted: the stock pipeline's default, SD 7.5, SDXL 5, SD3 7,
        PixArt 4.5, Chroma 5); with one, a copy of it at that scale (omitted: the object's own)."""
        from ..guidance.base import CFG

        if guidance is None:
            return CFG(stock_default(self.pipe, "guidance_scale", 7.5) if guidance_scale is None else guidance_scale)
        if guidance_scale is None or not hasattr(guidance, "new"):
            return guidance
        return guidance.new(guidance_scale=guidance_scale)

    def _warn_once(self, message: str) -> None:
        warned = self.__dict__.setdefault("_warned", set())
        if message not in warned:
            warned.add(message)
            warnings.warn(message, stacklevel=5)  # the user's run(...) call

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


def _mu(config, mu: float) -> dict:
    """``{"mu": mu}`` for a scheduler with dynamic shifting. The stock Flux-style pipelines pass mu always;
    FlowMatchEuler ignores it without ``use_dynamic_shifting``, and DPM-Solver-style schedulers refuse it."""
    return {"mu": mu} if config.get("use_dynamic_shifting", False) else {}


def _second_pass(guidance) -> bool:
    """Whether ``guidance`` may ask for an unconditional pass (plain CFG at w = 1, or disabled, never does)."""
    from ..guidance.base import CFG

    if getattr(guidance, "_enabled", True) is False:
        return False
    return not (type(guidance) is CFG and math.isclose(guidance.guidance_scale, 1.0))


class FluxFamily(Family):
    """``FluxPipeline``: MMDiT with double- and single-stream blocks on *packed* latents (2x2 patches,
    ``(B, H/2 * W/2, 4C)``, RoPE ids for image and text tokens), a CLIP pooled vector and a T5 sequence,
    dynamic shift ``mu`` from the image token count, timestep input σ = t / 1000.

    Two scales, as the stock pipeline: ``guidance_scale`` is the guidance *embedding* of a
    guidance-distilled transformer (``guidance_embeds=True``, Flux.1-dev; default 3.5), fed to every
    pass; classifier-free guidance is a second pass, run by ``true_cfg_scale`` (> 1, with
    ``negative_prompt``) or by ``from_pipe(pipe, guidance=X)``, which then combines the two passes.
    """

    name = "flux"
    denoiser_attr = "transformer"
    guidance_scale_is = "embedding"

    def default_size(self) -> tuple[int, int]:
        size = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return size, size

    def size_factor(self) -> int:
        return self.pipe.vae_scale_factor * 2  # the VAE's factor times the 2x2 packing

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        f = self.pipe.vae_scale_factor * 2
        return (batch, (height // f) * (width // f), self.denoiser.config.in_channels)

    def call_arguments(self) -> set[str]:
        return {
            "prompt_2", "negative_prompt_2", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
            "max_sequence_length", "lora_scale", "true_cfg_scale",
        }

    @property
    def has_embedding(self) -> bool:
        return bool(getattr(self.denoiser.config, "guidance_embeds", False))

    def guidance_for(self, guidance, guidance_scale, call: dict):
        from ..guidance.base import CFG, check_guidance_scale

        pipe_name = type(self.pipe).__name__
        if guidance_scale is not None and not self.has_embedding:
            raise ValueError(
                f"{pipe_name} ({self.name}): guidance_scale={guidance_scale} is the guidance embedding's scale, and "
                f"this transformer has none (guidance_embeds=False), so it would be ignored (the stock pipeline "
                f"ignores it silently). For classifier-free guidance pass negative_prompt with true_cfg_scale="
                f"{guidance_scale}, or from_pipe(pipe, guidance=CFG({guidance_scale}))"
            )
        true_cfg = call.get("true_cfg_scale")
        if true_cfg is not None:
            check_guidance_scale(true_cfg, "true_cfg_scale")
        if guidance is None:
            guidance = CFG(1.0 if true_cfg is None else true_cfg)
        elif true_cfg is not None:
            if not hasattr(guidance, "new"):
                raise ValueError(f"true_cfg_scale: {type(guidance).__name__} has no new(guidance_scale=...); set its scale")
            guidance = guidance.new(guidance_scale=true_cfg)
        negative = call.get("negative_prompt") is not None or call.get("negative_prompt_embeds") is not None
        if _second_pass(guidance) and not negative:
            self._warn_once(
                f"{pipe_name}: the second (unconditional) pass of {type(guidance).__name__} uses the empty prompt "
                f"\"\"; pass negative_prompt to choose it"
            )
        elif negative and not _second_pass(guidance):
            self._warn_once(
                f"{pipe_name}: negative_prompt is unused, no second pass runs (true_cfg_scale is 1); pass "
                f"true_cfg_scale > 1 or from_pipe(pipe, guidance=...) to guide away from it"
            )
        return guidance

    def encode(
        self, *, prompt=None, negative_prompt=None, num_images_per_prompt=1, prompt_embeds=None,
        negative_prompt_embeds=None, prompt_2=None, negative_prompt_2=None, pooled_prompt_embeds=None,
        negative_pooled_prompt_embeds=None, max_sequence_length=None, lora_scale=None, guidance_scale=None,
        unconditional=True, height=None, width=None, **call,
    ) -> dict:
        """The stock ``encode_prompt``, once for the prompt and (``unconditional``) once for the negative
        prompt ("" when none is given, one per prompt) -> conditions with per-sample RoPE ids and the
        guidance embedding's scale.

        ``max_sequence_length`` defaults to the sequence tokenizer's ``model_max_length`` when that is below
        the stock 512: the length such a model was trained at (the testbed's MiniLM: 20). FluxPipeline pads
        to 512 whatever the tokenizer says, with no attention mask, so its own default conditions such a model
        on embeddings it never saw; with a real T5 tokenizer (512) nothing changes."""
        pipe = self.pipe
        common = dict(device=self.device, num_images_per_prompt=num_images_per_prompt, lora_scale=lora_scale)
        tokenizer = getattr(pipe, "tokenizer_2", None)
        if max_sequence_length is None and tokenizer is not None and tokenizer.model_max_length < 512:
            max_sequence_length = tokenizer.model_max_length
        if max_sequence_length is not None:
            common["max_sequence_length"] = max_sequence_length
        cond, pooled, text_ids = pipe.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            **common,
        )
        uncond, pooled_uncond = cond, pooled
        if unconditional:
            if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
                raise ValueError("negative_prompt_embeds needs negative_pooled_prompt_embeds too (Flux has two encoders)")
            if negative_prompt_embeds is None:
                negative_prompt = negative_prompt or ""
                if isinstance(negative_prompt, str):  # one per prompt (the stock pipeline would encode one)
                    prompts = len(prompt) if isinstance(prompt, list) else 1 if prompt is not None else len(cond)
                    negative_prompt = [negative_prompt] * prompts
            uncond, pooled_uncond, _ = pipe.encode_prompt(
                prompt=negative_prompt, prompt_2=negative_prompt_2, prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=negative_pooled_prompt_embeds, **common,
            )
            if uncond.shape != cond.shape:
                raise ValueError(f"the negative prompt's embeddings {tuple(uncond.shape)} must match the prompt's "
                                 f"{tuple(cond.shape)} (one negative prompt per prompt, the same max_sequence_length)")
        n = cond.shape[0]
        conditions = {
            "encoder_hidden_states": (cond, uncond),
            "pooled_projections": (pooled, pooled_uncond),
            **self._ids(text_ids, n, height, width, cond.dtype),
        }
        if self.has_embedding:  # the stock pipeline feeds the same embedding to both passes
            scale = stock_default(pipe, "guidance_scale", 3.5) if guidance_scale is None else guidance_scale
            g = torch.full([1], scale, device=self.device, dtype=torch.float32).expand(n)
            conditions["guidance"] = (g, g)
        return conditions

    def _ids(self, text_ids, n: int, height, width, dtype) -> dict:
        """RoPE ids as per-sample condition tensors, ``(n, tokens, 3)`` (the model takes row 0), so the
        loop can batch them with the passes and CUDA graphs can copy them."""
        if height is None or width is None:
            height, width = self.default_size()
        f = self.pipe.vae_scale_factor * 2
        image_ids = self.pipe._prepare_latent_image_ids(n, int(height) // f, int(width) // f, self.device, dtype)
        text, image = text_ids.expand(n, -1, -1), image_ids.expand(n, -1, -1)
        return {"txt_ids": (text, text), "img_ids": (image, image)}

    def timesteps(self, num_inference_steps, timesteps=None, sigmas=None, latents=None, **kw):
        """As the stock pipeline: ``sigmas`` linear from 1 to 1/n, ``mu`` from the packed token count."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        if timesteps is not None:
            raise ValueError(f"{type(self.pipe).__name__} takes sigmas=..., not timesteps=... (as the stock pipeline)")
        config = self.pipe.scheduler.config
        if sigmas is None:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if config.get("use_flow_sigmas", False):  # as FluxPipeline (ChromaPipeline would pass them, and fail)
            sigmas = None
        mu = calculate_shift(
            latents.shape[1],
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        return retrieve_timesteps(self.pipe.scheduler, num_inference_steps, self.device, sigmas=sigmas, **_mu(config, mu))

    def prepare_latents(self, batch, height, width, generator, latents):
        channels = self.denoiser.config.in_channels // 4
        self._size = (height, width)  # decode unpacks to this size
        packed, _ = self.pipe.prepare_latents(batch, channels, height, width, torch.float32, self.device, generator, latents)
        return packed.float()

    def model(self, x, t, encoder_hidden_states, pooled_projections, txt_ids, img_ids, guidance=None):
        transformer = self.pipe.transformer
        timestep = t.expand(x.shape[0]).to(x.dtype)
        return transformer(
            hidden_states=x.to(transformer.dtype),
            timestep=timestep / 1000,  # σ: the transformer multiplies by 1000 inside
            guidance=guidance,
            pooled_projections=pooled_projections,
            encoder_hidden_states=encoder_hidden_states,
            txt_ids=txt_ids[0],
            img_ids=img_ids[0],
            return_dict=False,
        )[0].float()

    def decode(self, latents, output_type, generator=None, size: tuple[int, int] | None = None):
        """Unpack to ``size`` (default: the last ``prepare_latents``' height and width), then the VAE."""
        if output_type == "latent":
            return latents, None  # packed, as the stock pipeline returns them
        height, width = size or getattr(self, "_size", None) or self.default_size()
        f = self.pipe.vae_scale_factor * 2
        if (height // f) * (width // f) != latents.shape[1]:  # not the last run's latents
            side = math.isqrt(latents.shape[1])
            if side * side != latents.shape[1]:
                raise ValueError(f"decode: {latents.shape[1]} packed tokens are not {height}x{width} pixels; "
                                 "pass size=(height, width)")
            height = width = side * f
        unpacked = self.pipe._unpack_latents(latents, height, width, self.pipe.vae_scale_factor)
        return super().decode(unpacked, output_type, generator)


class ChromaFamily(FluxFamily):
    """``ChromaPipeline``: Flux's packed latents and RoPE ids, one (masked) T5 encoder, no pooled vector,
    no guidance embedding; ``guidance_scale`` is classifier-free guidance (default 5, negative "")."""

    name = "chroma"
    guidance_scale_is = "cfg"

    call_arguments = Family.call_arguments

    def guidance_for(self, guidance, guidance_scale, call: dict):
        return Family.guidance_for(self, guidance, guidance_scale, call)

    def encode(self, **call) -> dict:
        return Family.encode(self, **call)

    def conditions(self, cond, text_ids, mask, uncond, text_ids_uncond, mask_uncond, *, height=None, width=None, **call):
        n = cond.shape[0]
        ids = self._ids(text_ids, n, height, width, cond.dtype)
        f = self.pipe.vae_scale_factor * 2
        h, w = (height, width) if height is not None else self.default_size()
        tokens = (int(h) // f) * (int(w) // f)
        # the stock pipeline's mask: the prompt's (all but the first padding token masked), then the image tokens
        masks = [self.pipe._prepare_attention_mask(n, tokens, cond.dtype, m) for m in (mask, mask_uncond)]
        return {"encoder_hidden_states": (cond, uncond), **ids, "attention_mask": tuple(masks)}

    def model(self, x, t, encoder_hidden_states, txt_ids, img_ids, attention_mask):
        transformer = self.pipe.transformer
        timestep = t.expand(x.shape[0]).to(x.dtype)
        return transformer(
            hidden_states=x.to(transformer.dtype),
            timestep=timestep / 1000,
            encoder_hidden_states=encoder_hidden_states,
            txt_ids=txt_ids[0],
            img_ids=img_ids[0],
            attention_mask=attention_mask,
            return_dict=False,
        )[0].float()


class ZImageFamily(Family):
    """``ZImagePipeline``: single-stream DiT over per-sample lists (latent ``(C, 1, H, W)`` and the
    caption's unpadded Qwen3 features), timestep input ``1 - σ``, output negated (the loop sees the
    velocity ε − x0 as every flow family); mu from the token count; sigmas ``torch.linspace(1, 1/n, n)``.

    ``guidance_scale`` is Z-Image's s (``pos + s·(pos − neg)``, w = 1 + s; default 5): with no guidance
    object the stock combination runs (:class:`~diffplug.guidance.stock.ZImageCFG`, with
    ``cfg_normalization`` and ``cfg_truncation``); with one, a copy of it at w = 1 + s.
    """

    name = "zimage"
    denoiser_attr = "transformer"
    no_cuda_graph = "ZImageTransformer2DModel takes per-sample lists of unpadded captions (a host read of their lengths per call)"

    def default_size(self) -> tuple[int, int]:
        return 1024, 1024  # as the stock pipeline, whatever the model

    def size_factor(self) -> int:
        return self.pipe.vae_scale_factor * 2

    def call_arguments(self) -> set[str]:
        return {"cfg_normalization", "cfg_truncation", "max_sequence_length"}

    def guidance_for(self, guidance, guidance_scale, call: dict):
        from ..guidance.stock import ZImageCFG

        own = {k: call[k] for k in ("cfg_normalization", "cfg_truncation") if call.get(k) is not None}
        s = stock_default(self.pipe, "guidance_scale", 5.0) if guidance_scale is None else guidance_scale
        if guidance is None:
            return ZImageCFG(s, **own)
        if own:
            raise ValueError(f"ZImagePipeline ({self.name}): {', '.join(own)} belong to Z-Image's own combination, "
                             f"not to {type(guidance).__name__}; drop them or drop the guidance object")
        if guidance_scale is None or not hasattr(guidance, "new"):
            return guidance
        return guidance.new(guidance_scale=1.0 + guidance_scale)  # Z-Image's s is w - 1

    def encode(self, *, prompt=None, negative_prompt=None, num_images_per_prompt=1, prompt_embeds=None,
               negative_prompt_embeds=None, max_sequence_length=None, **call) -> dict:
        """The stock ``encode_prompt`` (lists of unpadded features), repeated per image, zero-padded to
        ``max_sequence_length`` (the tokenizer's cut, so conditions encoded apart, e.g. ProductGuidance's
        second prompt, batch together) with the lengths kept: ``cap_feats`` (n, L, D), ``cap_lengths`` (n,)."""
        prompt = [prompt] if isinstance(prompt, str) else (None if prompt is None else list(prompt))  # stock edits lists
        if isinstance(negative_prompt, str) and prompt is not None and len(prompt) > 1:
            negative_prompt = [negative_prompt] * len(prompt)
        elif isinstance(negative_prompt, list):
            negative_prompt = list(negative_prompt)
        extra = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        cond, uncond = self.pipe.encode_prompt(
            prompt=prompt, device=self.device, do_classifier_free_guidance=True, negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, **extra,
        )
        cond = [c for c in cond for _ in range(num_images_per_prompt)]
        uncond = [u for u in uncond for _ in range(num_images_per_prompt)]
        longest = max([f.shape[0] for f in cond + uncond] + [max_sequence_length or stock_default(self.pipe, "max_sequence_length", 512)])

        def padded(feats):
            rows = [torch.nn.functional.pad(f, (0, 0, 0, longest - f.shape[0])) for f in feats]
            return torch.stack(rows), torch.tensor([f.shape[0] for f in feats], device=feats[0].device)

        (c, c_len), (u, u_len) = padded(cond), padded(uncond)
        return {"cap_feats": (c, u), "cap_lengths": (c_len, u_len)}

    def timesteps(self, num_inference_steps, timesteps=None, sigmas=None, latents=None, **kw):
        from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

        if timesteps is not None:
            raise ValueError("ZImagePipeline takes sigmas=..., not timesteps=... (as the stock pipeline)")
        config = self.pipe.scheduler.config
        mu = calculate_shift(
            (latents.shape[2] // 2) * (latents.shape[3] // 2),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        sigmas = get_default_z_image_sigmas(num_inference_steps) if sigmas is None else sigmas
        # an array, not the stock list: FlowMatchEuler reads both alike (np.array(sigmas)), solvers need one;
        # None for diffusers' solvers in flow mode (use_flow_sigmas), which make their own, as FluxPipeline
        sigmas = None if config.get("use_flow_sigmas", False) else np.asarray(sigmas)
        return retrieve_timesteps(self.pipe.scheduler, num_inference_steps, self.device, sigmas=sigmas, **_mu(config, mu))

    def model(self, x, t, cap_feats, cap_lengths):
        transformer = self.pipe.transformer
        timestep = (1000 - t.expand(x.shape[0])) / 1000  # 1 - σ
        images = list(x.to(transformer.dtype).unsqueeze(2).unbind(dim=0))
        captions = [c[:n] for c, n in zip(cap_feats, cap_lengths.tolist())]
        out = transformer(images, timestep, captions, return_dict=False)[0]
        return -torch.stack([o.float() for o in out], dim=0).squeeze(2)  # the stock loop negates: ε − x0


class QwenImageFamily(FluxFamily):
    """``QwenImagePipeline``: Flux-style packed latents, a Qwen2.5-VL text encoder (last hidden states,
    template tokens dropped, masked), ``img_shapes`` for RoPE, timestep σ; the stock loop runs the
    conditional and negative passes apart, each with its own text length, and combines them with
    :class:`~diffplug.guidance.stock.QwenImageCFG` (CFG, then the conditional prediction's per-token norm).

    Scales as stock: ``true_cfg_scale`` (default 4) is the second pass's w, used when a negative prompt
    is given; ``guidance_scale`` is the guidance embedding (``guidance_embeds`` transformers only). A
    guidance object runs the second pass (no negative prompt: the empty one, said once).
    """

    name = "qwenimage"
    no_cuda_graph = ("QwenImageTransformer2DModel runs each pass with its own text length (a host read of the "
                     "lengths per call)")

    def call_arguments(self) -> set[str]:
        return {"true_cfg_scale", "max_sequence_length", "prompt_embeds_mask", "negative_prompt_embeds_mask"}

    def guidance_for(self, guidance, guidance_scale, call: dict):
        from ..guidance.base import CFG, check_guidance_scale
        from ..guidance.stock import QwenImageCFG

        if guidance_scale is not None and not self.has_embedding:
            raise ValueError(
                f"QwenImagePipeline ({self.name}): guidance_scale={guidance_scale} is the guidance embedding's scale "
                f"and this transformer has none (guidance_embeds=False); the CFG scale is true_cfg_scale (with "
                f"negative_prompt), or from_pipe(pipe, guidance=...)"
            )
        if guidance_scale is None and self.has_embedding:
            raise ValueError("QwenImagePipeline (qwenimage): this transformer is guidance-distilled; pass guidance_scale")
        true_cfg = call.get("true_cfg_scale")
        if true_cfg is not None:
            check_guidance_scale(true_cfg, "true_cfg_scale")
        negative = call.get("negative_prompt") is not None or call.get("negative_prompt_embeds") is not None
        if guidance is None:
            w = stock_default(self.pipe, "true_cfg_scale", 4.0) if true_cfg is None else true_cfg
            if w <= 1 or not (negative or true_cfg is not None):  # stock: no negative prompt, no second pass
                guidance = CFG(1.0)
            else:
                guidance = QwenImageCFG(w)
        elif true_cfg is not None:
            guidance = guidance.new(guidance_scale=true_cfg)
        if _second_pass(guidance) and not negative:
            self._warn_once(f"QwenImagePipeline: the second (unconditional) pass of {type(guidance).__name__} uses "
                            f"the empty prompt \"\"; pass negative_prompt to choose it")
        elif negative and not _second_pass(guidance):
            self._warn_once("QwenImagePipeline: negative_prompt is unused, no second pass runs (true_cfg_scale <= 1)")
        return guidance

    def encode(self, *, prompt=None, negative_prompt=None, num_images_per_prompt=1, prompt_embeds=None,
               negative_prompt_embeds=None, prompt_embeds_mask=None, negative_prompt_embeds_mask=None,
               max_sequence_length=None, guidance_scale=None, unconditional=True, height=None, width=None, **call) -> dict:
        """The stock ``encode_prompt`` per pass; both zero-padded to ``max_sequence_length``, each row keeping
        its pass's own length and whether it had a mask (``text_layout``), so the model call splits them back."""
        pipe = self.pipe
        common = dict(device=self.device, num_images_per_prompt=num_images_per_prompt)
        if max_sequence_length is not None:
            common["max_sequence_length"] = max_sequence_length
        passes = [pipe.encode_prompt(prompt=prompt, prompt_embeds=prompt_embeds, prompt_embeds_mask=prompt_embeds_mask, **common)]
        if unconditional:
            if negative_prompt_embeds is None:
                negative_prompt = negative_prompt or ""
                if isinstance(negative_prompt, str):
                    prompts = len(prompt) if isinstance(prompt, list) else 1 if prompt is not None else len(passes[0][0])
                    negative_prompt = [negative_prompt] * prompts
            passes.append(pipe.encode_prompt(prompt=negative_prompt, prompt_embeds=negative_prompt_embeds,
                                             prompt_embeds_mask=negative_prompt_embeds_mask, **common))
        else:
            passes.append(passes[0])
        n = passes[0][0].shape[0]
        # one width for every condition, also those encoded apart (ProductGuidance's second prompt): the cut
        longest = max([e.shape[1] for e, _ in passes] + [max_sequence_length or stock_default(pipe, "max_sequence_length", 512)])
        f = pipe.vae_scale_factor * 2
        h, w = (height, width) if height is not None else self.default_size()
        hw = torch.tensor([[int(h) // f, int(w) // f]], device=self.device).expand(n, -1)
        out = {"encoder_hidden_states": [], "encoder_hidden_states_mask": [], "text_layout": [], "img_hw": (hw, hw)}
        for embeds, mask in passes:
            pad = longest - embeds.shape[1]
            full = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device) if mask is None else mask
            out["encoder_hidden_states"].append(torch.nn.functional.pad(embeds, (0, 0, 0, pad)))
            out["encoder_hidden_states_mask"].append(torch.nn.functional.pad(full, (0, pad)))
            layout = torch.tensor([[embeds.shape[1], int(mask is not None)]], device=embeds.device).expand(n, -1)
            out["text_layout"].append(layout)
        conditions = {k: tuple(v) for k, v in out.items()}
        if self.has_embedding:
            g = torch.full([1], guidance_scale, device=self.device, dtype=torch.float32).expand(n)
            conditions["guidance"] = (g, g)
        return conditions

    def prepare_latents(self, batch, height, width, generator, latents):
        self._size = (height, width)
        channels = self.denoiser.config.in_channels // 4
        return self.pipe.prepare_latents(batch, channels, height, width, torch.float32, self.device, generator, latents).float()

    def model(self, x, t, encoder_hidden_states, encoder_hidden_states_mask, text_layout, img_hw, guidance=None):
        """One transformer call per run of rows that share a text layout (the stock pipeline's passes)."""
        transformer = self.pipe.transformer
        timestep = t.expand(x.shape[0]).to(x.dtype) / 1000
        layout = torch.cat([text_layout, img_hw], dim=1).tolist()
        outs, start = [], 0
        while start < len(layout):
            stop = start + 1
            while stop < len(layout) and layout[stop] == layout[start]:
                stop += 1
            length, masked, h, w = layout[start]
            rows = slice(start, stop)
            outs.append(transformer(
                hidden_states=x[rows].to(transformer.dtype),
                timestep=timestep[rows],
                guidance=None if guidance is None else guidance[rows],
                encoder_hidden_states_mask=encoder_hidden_states_mask[rows, :length] if masked else None,
                encoder_hidden_states=encoder_hidden_states[rows, :length],
                img_shapes=[[(1, h, w)]] * (stop - start),
                return_dict=False,
            )[0].float())
            start = stop
        return torch.cat(outs)

    def decode(self, latents, output_type, generator=None, size: tuple[int, int] | None = None):
        if output_type == "latent":
            return latents, None
        pipe, vae = self.pipe, self.pipe.vae
        height, width = size or getattr(self, "_size", None) or self.default_size()
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor).to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        image = vae.decode(latents / inv_std + mean, return_dict=False)[0][:, :, 0]
        return pipe.image_processor.postprocess(image, output_type=output_type), None


# Most specific first: SDXL pipelines also have `unet`, PixArt and SD3 both have `transformer`.
_FAMILIES = {
    "QwenImagePipeline": QwenImageFamily,
    "ZImagePipeline": ZImageFamily,
    "FluxPipeline": FluxFamily,
    "ChromaPipeline": ChromaFamily,
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
