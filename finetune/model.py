"""The model side of training: load a pipeline and call its denoiser -- a UNet or a transformer --
the way its family does, with the trainable part handled by an adapter (``adapters.py``).

Everything family-specific is the family adapter's (``diffplug.pipelines.families``): prompt
encoding, the extra inputs (SDXL's micro-conditioning, PixArt's masks, SD3's pooled vector, Flux's
RoPE ids and guidance embedding), the model call (timestep convention, PixArt's learned-sigma half)
and Flux's 2x2 packing. Noise levels and regression targets come from ``diffplug.predictions``:

    x_t = alpha_t x0 + sigma_t eps,    target = join(x0, eps, alpha_t, sigma_t, prediction type)

so epsilon, v and flow-matching (u = eps - x0, alpha = 1 - sigma) models train through one code path.
Training noise levels are drawn as each family pre-trains (:meth:`DiffusionModel.sample_timesteps`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..predictions import join, noise_levels, prediction_type_of
from .config import ConfigError

UNET_FAMILIES = ("sd", "sdxl")
# every family the trainer runs: the two UNets, PixArt's DiT (epsilon, learned sigma), and the
# rectified-flow transformers SD3, Flux/Chroma (packed latents) and Z-Image (velocity)
FAMILIES = ("sd", "sdxl", "pixart", "sd3", "flux", "chroma", "zimage")
SUPPORTED = UNET_FAMILIES  # a method that declares no `families` runs on the UNets only


def load_pipeline(spec: str):
    """``spec`` ('testbed', 'testbed:NAME', 'tiny:FAMILY' -- or 'testbed-NAME', 'tiny-FAMILY' --, a local
    folder, a hub id) -> pipeline."""
    from ..pipelines.registry import builtin_model

    try:
        builtin = builtin_model(spec)  # one spelling rule for sample, eval and finetune
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    if builtin is not None:
        spec = ":".join(builtin)
    if spec == "testbed" or spec.startswith("testbed:"):
        name = spec.split(":", 1)[1] if ":" in spec else "sd"
        try:
            from .. import testbed

            loader = testbed.load
        except (ImportError, AttributeError) as e:
            raise ConfigError(
                f"model: the diffplug testbed is not available here ({e}); pass --model with a local "
                "diffusers folder or a hub id, or --model tiny:sd for a random test pipeline"
            ) from None
        try:
            return loader(name)
        except FileNotFoundError as e:
            raise ConfigError(f"model: the testbed cannot be loaded ({e}); or pass --model with another pipeline") from None
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
    if spec.startswith("tiny:"):
        from ..testing import tiny_pipeline

        try:
            return tiny_pipeline(spec.split(":", 1)[1])
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
    from diffusers import DiffusionPipeline

    local = Path(spec).expanduser()
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise ConfigError(f"model: {spec!r} is a path but holds no model_index.json (not a diffusers pipeline folder)")
        return DiffusionPipeline.from_pretrained(str(local), use_safetensors=True)  # never pickle
    try:
        return DiffusionPipeline.from_pretrained(spec, use_safetensors=True)
    except Exception as e:  # network or cache miss: say what to do
        raise ConfigError(
            f"model: could not load {spec!r}: it is not a local folder, and loading it as a Hugging Face hub id "
            f"failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Offline machines need the "
            "model in the local HF cache or a local folder (pipe.save_pretrained(DIR), then --model DIR)"
        ) from None


# the tokenizer of each family's long (T5-style) prompt sequence: prompts are encoded at the stock
# max_sequence_length, capped by that tokenizer's model_max_length
LONG_TOKENIZER = {"pixart": "tokenizer", "chroma": "tokenizer", "flux": "tokenizer_2", "sd3": "tokenizer_3",
                  "zimage": "tokenizer"}


class _Called:
    """A prepared (e.g. DDP-wrapped) denoiser as the family adapter sees its pipeline's: calls go
    through the wrapper (gradient synchronisation), attributes (``dtype``, ``config``) come from the model."""

    def __init__(self, wrapper, model):
        self._wrapper, self._model = wrapper, model

    def __call__(self, *args, **kwargs):
        return self._wrapper(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


class DiffusionModel:
    """A pipeline's trainable denoiser plus its frozen encoders, as the trainer and losses see it.

    ``unet`` (also ``denoiser``) is the pipeline's UNet or transformer; ``adapter`` is what trains in it
    (``adapters.py``; None when a method trains a module of its own and the denoiser stays frozen).
    """

    def __init__(self, pipe, families: tuple | None = None, guidance_scale: float | None = None):
        from ..pipelines import family_of

        self.pipe = pipe
        self.guidance_scale = guidance_scale  # a guidance-conditioned UNet's (LCM) w input; see encode_prompts
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)  # the trainer has its own bar
        try:
            self.family = family_of(pipe)
        except TypeError as e:
            raise ConfigError(f"model: {e}") from None
        families = families or SUPPORTED  # a method may support more (dpo, sft: every family)
        name = self.family.name
        if name not in families:
            raise ConfigError(
                f"model: {type(pipe).__name__} ({name}) is not supported by this method; it runs on "
                f"{', '.join(families)} (README: the fine-tuning table says which method runs on which family)"
            )
        self.unet = self.denoiser = self.family.denoiser
        self.scheduler = pipe.scheduler
        self.prediction_type = prediction_type_of(pipe.scheduler)
        from ..pipelines.families import FluxFamily

        self.packed = isinstance(self.family, FluxFamily)  # Flux/Chroma: 2x2-packed latent tokens
        self.adapter = None  # set by the trainer (adapters.make)
        self.resolution: int | None = None  # the training size (set by the trainer); Flux's dynamic shift uses it

    # -- setup ------------------------------------------------------------------------------------
    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    @property
    def is_flow(self) -> bool:
        return self.prediction_type == "flow"

    def default_resolution(self) -> int:
        return self.family.default_size()[0]

    def check_resolution(self, size: int) -> None:
        factor = self.family.size_factor()
        if size % factor:
            raise ConfigError(f"resolution: {type(self.pipe).__name__} ({self.family.name}) needs a multiple of "
                              f"{factor} (VAE factor x patch); got {size}")

    def freeze_encoders(self, device, dtype) -> None:
        pipe = self.pipe
        for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.requires_grad_(False).eval().to(device=device)
                if dtype != torch.float32:
                    module.to(dtype=dtype)
        vae = pipe.vae
        if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            vae.to(dtype=torch.float32)  # SD VAEs overflow in fp16 unless fixed

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    # -- noise levels -------------------------------------------------------------------------------
    def sample_timesteps(self, gens) -> torch.Tensor:
        """One training timestep per sample, from its generator (one draw each).

        VP models (SD, SDXL, PixArt): ``t ~ U{0, ..., T-1}`` as DDPM pre-training. Flow models (SD3, Flux,
        Chroma, Z-Image): SD3's logit-normal, ``sigma = sigmoid(u)``, ``u ~ N(0, 1)`` (Esser et al. 2024, §3.1,
        m = 0, s = 1; diffusers' ``weighting_scheme="logit_normal"``), then the scheduler's own time shift,
        the one its sampler applies at this resolution (SD3 §5.3.2): the static ``shift`` (SD3: 3), or
        Flux's dynamic shift with ``mu`` from the image token count. ``t = 1000 sigma`` (float).
        """
        from . import data as D

        if not self.is_flow:
            return D.randint(gens, 0, self.num_train_timesteps)
        sigma = torch.sigmoid(D.randn(gens, ()))
        return self.num_train_timesteps * self._time_shift(sigma)

    def _time_shift(self, sigma: torch.Tensor) -> torch.Tensor:
        config = self.scheduler.config
        if config.get("use_dynamic_shifting", False):
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            size = self.resolution or self.default_resolution()
            seq_len = (size // self.family.size_factor()) ** 2  # image tokens (VAE factor x patch or packing)
            mu = calculate_shift(seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                 config.get("base_shift", 0.5), config.get("max_shift", 1.15))
            return self.scheduler.time_shift(mu, 1.0, sigma)
        shift = float(config.get("shift", 1.0))
        return shift * sigma / (1 + (shift - 1) * sigma)

    def levels(self, t: torch.Tensor, like: torch.Tensor):
        """``(alpha_t, sigma_t)`` of ``predictions.noise_levels``, shaped to broadcast against ``like``."""
        alpha, sigma = noise_levels(self.scheduler, t.cpu())
        shape = (-1,) + (1,) * (like.dim() - 1)
        return alpha.to(like.device).view(shape), sigma.to(like.device).view(shape)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        """``x_t = alpha_t x0 + sigma_t eps`` and the regression target of the prediction type."""
        alpha, sigma = self.levels(t, x0)
        x_t = alpha * x0 + sigma * noise
        return x_t, join(x0, noise, alpha, sigma, self.prediction_type)

    # -- encoders (frozen, no grad) -------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], size: int, uncond: bool = False) -> dict:
        """Condition tensors ``{model keyword: tensor}``; with ``uncond`` each value is ``(cond, uncond)``.
        Flux-dev's guidance embedding takes the stock pipeline's default scale (3.5), as diffusers' Flux
        training scripts do."""
        conditions = self.family.encode(prompt=list(prompts), num_images_per_prompt=1, height=size, width=size,
                                        **self.prompt_arguments())
        dim = getattr(self.unet.config, "time_cond_proj_dim", None)
        if dim:  # an LCM-style UNet takes the guidance scale as an input, as StableDiffusionPipeline gives it
            w = self.guidance_embedding(len(prompts), dim)
            conditions["timestep_cond"] = (w, w)

        def f32(v):  # floating conditions in float32 (autocast casts them); masks keep their dtype
            return v.float() if v.is_floating_point() else v

        if uncond:
            return {k: (f32(v[0]), f32(v[1])) for k, v in conditions.items()}
        return {k: f32(v[0]) for k, v in conditions.items()}

    def prompt_arguments(self) -> dict:
        """``max_sequence_length`` for families with a T5-style prompt: the stock default, capped by the
        tokenizer's ``model_max_length`` (training and the trainer's sample grids encode alike)."""
        tokenizer = getattr(self.pipe, LONG_TOKENIZER.get(self.family.name, ""), None)
        if tokenizer is None:
            return {}
        from ..pipelines.families import stock_default

        return {"max_sequence_length": min(stock_default(self.pipe, "max_sequence_length", 512), tokenizer.model_max_length)}

    def guidance_embedding(self, n: int, dim: int) -> torch.Tensor:
        if self.guidance_scale is None:
            raise ConfigError("guidance_scale: this UNet takes the guidance scale as an input (time_cond_proj_dim, "
                              "an LCM-style model); pass --guidance_scale W")
        from diffusers import StableDiffusionPipeline

        w = torch.full((n,), float(self.guidance_scale) - 1.0)  # the pipeline embeds w - 1
        return StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim).to(self.unet.device)

    def latent_shape(self, size: int) -> tuple[int, ...]:
        """One sample's latent in the denoiser's layout: ``(C, h, w)``, or Flux's ``(tokens, 4C)``."""
        return tuple(self.family.latent_shape(1, size, size)[1:])

    def _vae_layout(self, latents: torch.Tensor, size: int) -> torch.Tensor:
        if not self.packed:
            return latents
        return self.pipe._unpack_latents(latents, size, size, self.pipe.vae_scale_factor)

    def _denoiser_layout(self, latents: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            return latents
        b, c, h, w = latents.shape
        return self.pipe._pack_latents(latents, b, c, h, w)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [-1, 1] (B,3,H,W) -> scaled VAE latents in the denoiser's layout; ``noise`` (same
        layout) samples the posterior (``mean + std * noise``), None takes its mean."""
        vae = self.pipe.vae
        dist = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist
        if noise is not None:
            noise = self._vae_layout(noise, images.shape[-1])
        latents = dist.mean if noise is None else dist.mean + dist.std * noise.to(dist.mean)
        mean, std = self._latent_stats(latents)
        return self._denoiser_layout((latents.float() - mean) * vae.config.scaling_factor / std)

    def _latent_stats(self, like: torch.Tensor):
        """VAE latent statistics: SDXL-style ``latents_mean/std``, SD3/Flux-style ``shift_factor``, or none."""
        cfg = self.pipe.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, -1, 1, 1)
            return torch.tensor(mean).view(shape).to(like.device).float(), torch.tensor(std).view(shape).to(like.device).float()
        return float(getattr(cfg, "shift_factor", None) or 0.0), 1.0

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """Latents (denoiser layout) -> images in [0, 1] (B,3,H,W), float32. ``size``: the image size
        of packed latents (default: the training resolution)."""
        vae = self.pipe.vae
        latents = self._vae_layout(latents.float(), size or self.resolution or self.default_resolution())
        mean, std = self._latent_stats(latents)
        latents = latents * std / vae.config.scaling_factor + mean
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    # -- the denoiser call ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _installed(self, module):
        """Inside: the pipeline's denoiser attribute is ``module`` (the trained wrapper, the frozen
        reference copy), so the family adapter's own model call runs it."""
        attr = self.family.denoiser_attr
        base = self.pipe.__dict__[attr]
        if module is base:
            yield
            return
        inner = getattr(module, "module", module)  # DDP's wrapped model
        self.pipe.__dict__[attr] = module if inner is module else _Called(module, inner)
        try:
            yield
        finally:
            self.pipe.__dict__[attr] = base

    def predict(self, unet, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """``unet(x_t, t, cond)`` through the family's model call, in the scheduler's prediction type
        (flow: the velocity eps - x0), float32. The trainer runs losses under ``accelerator.autocast()``."""
        with self._installed(unet):
            return self.family.model(x, t.to(x.device), **cond).float()

    @contextlib.contextmanager
    def reference(self, unet):
        """Inside: the frozen initial model, called like ``unet`` (under no_grad): the adapter's
        (LoRA: adapters disabled; SaRA: base entries; full: a frozen copy), or the denoiser itself when
        nothing trains in it."""
        with torch.no_grad():
            if self.adapter is None:
                yield self.unet
                return
            with self.adapter.reference(unet) as ref:
                yield ref

    # -- saving -------------------------------------------------------------------------------------
    def save_final(self, unet, directory: Path) -> None:
        """The adapter's final weights and ``adapter.json`` (``adapters.load(pipe, directory)``)."""
        directory.mkdir(parents=True, exist_ok=True)
        self.adapter.save_final(unet, directory)
