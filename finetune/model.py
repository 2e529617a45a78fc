"""The model side of training: load a pipeline, make its UNet trainable (LoRA or full), call it,
and give the reference model (LoRA: adapters disabled; full: a frozen copy).

Prompt encoding reuses the pipeline family adapters of ``diffplug.pipelines`` (SD1.x, SDXL), noise
levels and prediction targets come from ``diffplug.predictions``.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch

from ..predictions import join, noise_levels, prediction_type_of
from .config import ConfigError

SUPPORTED = ("sd", "sdxl")


def load_pipeline(spec: str):
    """``spec`` ('testbed', 'testbed:NAME', 'tiny:sd', 'tiny:sdxl', a local folder, a hub id) -> pipeline."""
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
    if spec.startswith("tiny:"):
        from ..testing import tiny_pipeline

        return tiny_pipeline(spec.split(":", 1)[1])
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


class DiffusionModel:
    """A pipeline's trainable denoiser plus its frozen encoders, as the trainer and losses see it."""

    def __init__(self, pipe, families: tuple | None = None, guidance_scale: float | None = None):
        from ..pipelines import family_of

        self.pipe = pipe
        self.guidance_scale = guidance_scale  # a guidance-conditioned UNet's (LCM) w input; see encode_prompts
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)  # the trainer has its own bar
        self.family = family_of(pipe)
        families = families or SUPPORTED  # a method may support others (deediff: pixart)
        if self.family.name not in families:
            raise ConfigError(
                f"model: {type(pipe).__name__} ({self.family.name}) is not supported by this method; "
                f"supported families: {', '.join(families)}"
            )
        self.unet = self.family.denoiser  # the UNet, or a method's transformer
        self.scheduler = pipe.scheduler
        self.prediction_type = prediction_type_of(pipe.scheduler)
        self.reference_copy: torch.nn.Module | None = None
        self.lora = False
        self.sara = None  # the SaRA adapter (finetune/sara.py) when adapter=sara

    # -- setup ------------------------------------------------------------------------------------
    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def default_resolution(self) -> int:
        return self.family.default_size()[0]

    def freeze_encoders(self, device, dtype) -> None:
        pipe = self.pipe
        for name in ("vae", "text_encoder", "text_encoder_2"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.requires_grad_(False).eval().to(device=device)
                if dtype != torch.float32:
                    module.to(dtype=dtype)
        vae = pipe.vae
        if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            vae.to(dtype=torch.float32)  # SD VAEs overflow in fp16 unless fixed

    def add_lora(self, rank: int, alpha: float, target_modules: list, init: str) -> None:
        from peft import LoraConfig

        self.unet.requires_grad_(False)
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha or rank,
            init_lora_weights="gaussian" if init == "gaussian" else True,
            target_modules=list(target_modules),
        )
        try:
            self.unet.add_adapter(config)
        except ValueError as e:
            raise ConfigError(f"lora_target_modules: {e}") from None
        self.lora = True

    def add_sara(self, cfg, device, dtype) -> str:
        """Select SaRA's entries on the base weights (float32 hash), then store the frozen base in
        ``dtype``; the deltas train in float32. -> the selection's description."""
        from . import sara

        try:
            sara.prepare(self.unet, threshold=cfg.sara_threshold or None,
                         fraction=None if cfg.sara_threshold else cfg.sara_fraction or sara.DEFAULT_FRACTION,
                         exclude=cfg.sara_exclude)
        except sara.SaRAError as e:
            raise ConfigError(f"sara_threshold / sara_fraction / sara_exclude: {e}") from None
        self.sara = sara.adapter_of(self.unet)
        self.unet.to(device)
        if dtype != torch.float32:
            self.unet.to(dtype=dtype)
            for p in self.sara.parameters():
                p.data = p.data.float()
        return self.sara.describe()

    def make_full_trainable(self, ref_dtype) -> None:
        self.reference_copy = copy.deepcopy(self.unet).requires_grad_(False).eval()
        if ref_dtype != torch.float32:
            self.reference_copy.to(dtype=ref_dtype)
        self.unet.requires_grad_(True)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    # -- encoders (frozen, no grad) -------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], size: int, uncond: bool = False) -> dict:
        """Condition tensors ``{model keyword: tensor}``; with ``uncond`` each value is ``(cond, uncond)``."""
        conditions = self.family.encode(prompt=list(prompts), num_images_per_prompt=1, height=size, width=size)
        dim = getattr(self.unet.config, "time_cond_proj_dim", None)
        if dim:  # an LCM-style UNet takes the guidance scale as an input, as StableDiffusionPipeline gives it
            w = self.guidance_embedding(len(prompts), dim)
            conditions["timestep_cond"] = (w, w)
        if uncond:
            return {k: (v[0].float(), v[1].float()) for k, v in conditions.items()}
        return {k: v[0].float() for k, v in conditions.items()}

    def guidance_embedding(self, n: int, dim: int) -> torch.Tensor:
        if self.guidance_scale is None:
            raise ConfigError("guidance_scale: this UNet takes the guidance scale as an input (time_cond_proj_dim, "
                              "an LCM-style model); pass --guidance_scale W")
        from diffusers import StableDiffusionPipeline

        w = torch.full((n,), float(self.guidance_scale) - 1.0)  # the pipeline embeds w - 1
        return StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim).to(self.unet.device)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [-1, 1] (B,3,H,W) -> scaled VAE latents; ``noise`` samples the posterior
        (``mean + std * noise``), None takes its mean."""
        vae = self.pipe.vae
        dist = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist
        latents = dist.mean if noise is None else dist.mean + dist.std * noise.to(dist.mean)
        mean, std = self._latent_stats(latents)
        return (latents.float() - mean) * vae.config.scaling_factor / std

    def _latent_stats(self, like: torch.Tensor):
        """VAE latent statistics: SDXL-style ``latents_mean/std``, SD3-style ``shift_factor``, or none."""
        cfg = self.pipe.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, -1, 1, 1)
            return torch.tensor(mean).view(shape).to(like.device).float(), torch.tensor(std).view(shape).to(like.device).float()
        return float(getattr(cfg, "shift_factor", None) or 0.0), 1.0

    def latent_shape(self, size: int) -> tuple[int, int, int]:
        f = self.pipe.vae_scale_factor
        return (self.unet.config.in_channels, size // f, size // f)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1] (B,3,H,W), float32."""
        vae = self.pipe.vae
        mean, std = self._latent_stats(latents)
        latents = latents.float() * std / vae.config.scaling_factor + mean
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    # -- the denoiser call ----------------------------------------------------------------------------
    def predict(self, unet, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """``unet(x_t, t, cond)`` in the scheduler's prediction type, float32. The trainer runs losses
        under ``accelerator.autocast()``, so fp16/bf16 weights take float32 inputs."""
        extra = {k: v for k, v in cond.items() if k not in ("encoder_hidden_states", "timestep_cond")}
        out = unet(
            x,
            t.to(x.device),
            encoder_hidden_states=cond["encoder_hidden_states"],
            timestep_cond=cond.get("timestep_cond"),
            added_cond_kwargs=extra or None,
            return_dict=False,
        )[0]
        return out.float()

    @contextlib.contextmanager
    def reference(self, unet):
        """Inside: a callable ``ref(unet_call_args)`` of the frozen initial model, under no_grad.

        LoRA: the same (wrapped) UNet with adapters disabled; full fine-tuning: the frozen copy.
        """
        with torch.no_grad():
            if self.reference_copy is not None:
                yield self.reference_copy
                return
            if self.sara is not None:  # the base weights: dense copies of the selected tensors, no grad
                with self.sara.disabled():
                    yield unet
                return
            if not self.lora:  # the UNet is not trained (a method trains another module): it is the reference
                yield self.unet
                return
            self.unet.disable_adapters()
            try:
                yield unet
            finally:
                self.unet.enable_adapters()

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        """``x_t = alpha_t x0 + sigma_t eps`` and the regression target of the prediction type."""
        alpha, sigma = noise_levels(self.scheduler, t.cpu())
        shape = (-1,) + (1,) * (x0.dim() - 1)
        alpha, sigma = alpha.to(x0.device).view(shape), sigma.to(x0.device).view(shape)
        x_t = alpha * x0 + sigma * noise
        return x_t, join(x0, noise, alpha, sigma, self.prediction_type)

    # -- saving -------------------------------------------------------------------------------------
    def save_final(self, unet, directory: Path) -> None:
        """SaRA: ``sara.safetensors`` (``diffplug.finetune.sara.load(unet, dir)``);
        LoRA: diffusers-format ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(dir)``);
        full: ``directory/unet`` (``UNet2DConditionModel.from_pretrained(dir, subfolder='unet')``)."""
        directory.mkdir(parents=True, exist_ok=True)
        if self.sara is not None:  # sara.load(base_unet, directory) applies it
            self.sara.save(directory)
        elif self.lora:
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
            kwargs = {"unet_lora_layers": layers}
            try:
                from diffusers.training_utils import _collate_lora_metadata

                kwargs.update(_collate_lora_metadata({"unet": unet}))
            except ImportError:
                pass
            type(self.pipe).save_lora_weights(str(directory), **kwargs)
        else:
            unet.save_pretrained(str(directory / "unet"))
