"""DeeDiff: train early-exit heads and uncertainty estimation modules (UEMs) for a transformer
denoiser (Tang et al., arXiv:2309.17074; the model side is ``diffplug.samplers.EarlyExit``).

For a noisy latent ``x_t = alpha_t x_0 + sigma_t eps`` (``t`` uniform, one ``eps`` for every head)
the wrapped model gives each block's head output ``g_i`` and per-token uncertainty ``u_i``; ``y`` is
the model's regression target (``eps`` for PixArt; the velocity ``eps - x_0`` for the rectified-flow
transformers, SD3, Flux and Chroma, with ``alpha_t = 1 - sigma``, ``sigma = t / 1000``):

    L_simple = ||g_N - y||^2                                   (the final layer's MSE)
    u_hat_i  = tanh(|g_i - y|), averaged over each token's patch (pseudo-label, no gradient)
    L_u      = sum_{i<N} mean_tokens (u_i - u_hat_i)^2
    L_UAL    = sum_{i<N} mean_tokens (1 - u_i) ||g_i - y||^2_token
    L        = L_simple + lambda L_u + beta L_UAL (+ gamma_layer sum_{i<N} ||g_i - y||^2)

``lambda = beta = 1`` and ``gamma_layer = 0`` are the paper's. The spec's ambiguities, resolved:

* **Token aggregation.** ``u`` is per token (the paper's linear UEM) and is trained per token against
  the pseudo-label of that token's patch (mean of ``tanh|g_i - eps|`` over the patch's p x p x C
  values). The exit decision takes the mean over tokens: since both are averaged the same way, the
  mean ``u`` estimates the mean pseudo-label of the image. Cheap (one dot product per token) and
  dense supervision (64 targets per image on the testbed instead of one).
* **Pseudo-label reduction.** As above: element-wise ``tanh(|g - eps|)``, then the per-token mean,
  i.e. reduced exactly as ``u``.
* **Per-timestep UEMs.** Default one UEM per layer with the model's own timestep embedding as input
  (``uem_buckets=1``); ``uem_buckets=1000`` gives the literal per-timestep weights (the reproduction
  found those fail to exit), anything between buckets the timesteps.
* **Degenerate optimum** (``(1 - u)`` lets the model lower L_UAL by raising ``u``): paper-faithful,
  ``u`` is not detached in L_UAL; ``gamma_layer`` adds the reproduction's unweighted layer-wise term.
* **Backbone.** Frozen by default (``train_backbone=false``): the shipped heads then pair with the
  shipped DiT, and threshold 0 stays the pretrained model exactly; the reproduction also found a
  frozen backbone keeps quality better. ``train_backbone=true`` trains it jointly (the paper's
  set-up) and saves it next to the heads.

Models: PixArt (the testbed DiT), SD3 (joint blocks), Flux and Chroma (double- then single-stream
blocks; their latents are packed 2x2 as the stock pipelines pack them and the loss is taken on the
packed tokens; a guidance-distilled Flux gets the pipeline's default embedding, 3.5, as at sampling).
Flow models draw ``t`` uniform as the paper does (not SD3's logit-normal the other methods use).
``gradient_checkpointing`` with ``train_backbone`` recomputes the blocks in backward.

    diffplug finetune deediff --model testbed:flux --output_dir runs/deediff-flux --max_steps 3000

Data: ``data=testbed``, the images and captions the testbed denoisers were trained on (Fashion-MNIST
1,000 per class + training emoji), encoded by the pipeline's own VAE (posterior sample) and text
encoder(s) (at most ``min(300, first tokenizer's max length)`` tokens: the captions are short);
captions are dropped to the empty prompt with ``prompt_dropout`` so that the heads also serve CFG's
unconditional pass.

    diffplug finetune deediff --output_dir runs/deediff --max_steps 3000 --seed 0
    -> runs/deediff/final/early_exit.safetensors (EarlyExit(transformer, heads=...))
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import torch

from . import data as D
from .config import LR_SCHEDULERS, ConfigError, TrainConfig, choice, opt
from .trainer import Method

HEADS_FILE = "early_exit.safetensors"


@dataclass
class DeeDiffConfig(TrainConfig):
    model: str = opt("testbed:dit", "a PixArt, SD3, Flux or Chroma pipeline: 'testbed:dit' (the testbed DiT), "
                     "'tiny:sd3', 'tiny:flux', 'tiny:chroma' or a local diffusers folder")
    data: str = opt("testbed", "training images and captions: 'testbed' (the testbed denoisers' training set)")
    train_backbone: bool = opt(False, "train the transformer jointly with the heads (paper); false = frozen backbone")
    lambda_u: float = opt(1.0, "lambda: weight of the uncertainty loss L_u (paper: 1)")
    beta_ual: float = opt(1.0, "beta: weight of the uncertainty-aware layer-wise loss L_UAL (paper: 1)")
    gamma_layer: float = opt(0.0, "weight of the unweighted layer-wise loss sum ||g_i - eps||^2 (reproduction); 0 = off")
    uem_buckets: int = opt(1, "UEM weight sets per layer, indexed by timestep: 1 = one UEM per layer, 1000 = per timestep")
    prompt_dropout: float = opt(0.1, "fraction of empty prompts (CFG's unconditional pass); the testbed DiT's own")
    use_lora: bool = opt(False, "unused by deediff (heads and UEMs are trained in full)")
    learning_rate: float = opt(1e-3, "peak learning rate (heads and UEMs start from the final layer / zero)")
    lr_scheduler: str = choice("cosine", LR_SCHEDULERS, "diffusers.optimization.get_scheduler name")
    lr_warmup_steps: int = opt(100, "warm-up optimiser steps")
    train_batch_size: int = opt(32, "samples per device per micro-batch")

    method = "deediff"

    def validate(self) -> None:
        super().validate()
        if self.data != "testbed":
            raise ConfigError(f"data: only 'testbed' is supported (the testbed DiT's training set); got {self.data!r}")
        for key in ("lambda_u", "beta_ual", "gamma_layer"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0; got {getattr(self, key)}")
        if not 1 <= self.uem_buckets <= 1000:
            raise ConfigError(f"uem_buckets: must be in 1..1000 (1 = one UEM per layer); got {self.uem_buckets}")
        if not 0 <= self.prompt_dropout < 1:
            raise ConfigError(f"prompt_dropout: must be in [0, 1); got {self.prompt_dropout}")
        if self.use_lora:
            raise ConfigError("use_lora: deediff trains heads and UEMs (and the backbone with train_backbone), not LoRA")


class CaptionedImages(torch.utils.data.Dataset):
    """``{"image": uint8 (3, H, W), "captions": (str, ...)}`` items."""

    def __init__(self, images: torch.Tensor, captions: list[tuple[str, ...]]):
        self.images, self.captions = images, captions

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return {"image": self.images[i], "captions": self.captions[i]}

    @staticmethod
    def collate(items):
        return {"images": torch.stack([it["image"] for it in items]), "captions": [it["captions"] for it in items]}


def per_token(values: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L): the mean over each p x p patch and the channels, in the tokens' order;
    (B, L, F) tokens (Flux's packed latents) -> their mean over F."""
    if values.dim() == 3:
        return values.mean(dim=-1)
    b, c, h, w = values.shape
    return values.reshape(b, c, h // patch, patch, w // patch, patch).mean(dim=(1, 3, 5)).flatten(1)


def deediff_loss(preds: list, uncertainties: list, eps: torch.Tensor, patch: int, lambda_u: float = 1.0,
                 beta_ual: float = 1.0, gamma_layer: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The module docstring's loss from :meth:`EarlyExit.all_exits`' outputs -> ``(loss, logs)``;
    ``eps`` is the regression target ``y``, shaped as the model's output."""
    channels = eps.shape[1]
    preds = [(p[:, :channels] if eps.dim() == 4 else p).float() for p in preds]  # learned sigma: the mean half
    l_simple = (preds[-1] - eps).pow(2).mean()
    l_u = l_ual = l_layer = preds[-1].new_zeros(())
    logs = {"l_simple": l_simple.detach()}
    for i, (g, u) in enumerate(zip(preds[:-1], uncertainties), start=1):
        err = per_token((g - eps).pow(2), patch)
        target = per_token(torch.tanh((g - eps).abs()), patch).detach()
        u = u.float()
        l_u = l_u + (u - target).pow(2).mean()
        l_ual = l_ual + ((1 - u) * err).mean()
        l_layer = l_layer + err.mean()
        logs[f"mse_{i}"], logs[f"u_{i}"], logs[f"u_hat_{i}"] = err.mean().detach(), u.mean().detach(), target.mean().detach()
    loss = l_simple + lambda_u * l_u + beta_ual * l_ual + gamma_layer * l_layer
    logs.update(l_u=l_u.detach(), l_ual=l_ual.detach())
    return loss, logs


# Condition tensors that differ per caption; the rest (Flux's RoPE ids, guidance) are one row for all.
PER_CAPTION = ("encoder_hidden_states", "encoder_attention_mask", "pooled_projections", "attention_mask")


class DeeDiff(Method):
    name = "deediff"
    Config = DeeDiffConfig
    families = ("pixart", "sd3", "flux", "chroma")

    def trainable(self, trainer):
        from ..samplers.early_exit import EarlyExit

        cfg = self.config
        transformer = trainer.model.unet
        if cfg.train_backbone:  # the trainer freezes the pipeline's own transformer: train a copy
            transformer = copy.deepcopy(transformer)
        try:
            module = EarlyExit(transformer, uem_buckets=cfg.uem_buckets, threshold=0.0)
        except TypeError as e:
            raise ConfigError(f"model: {e}") from None
        module.transformer.requires_grad_(cfg.train_backbone)
        if cfg.gradient_checkpointing and cfg.train_backbone:  # EarlyExit's training view honours the model's flag
            module.transformer.enable_gradient_checkpointing()
        return module.to(trainer.device)

    def setup(self, trainer):
        from ..testbed.train import diffusion_set

        data = diffusion_set()
        captions = sorted({c for cs in data.captions for c in cs} | {""})
        self.caption_index = {c: i for i, c in enumerate(captions)}
        self.conditions, self.shared = self._encode(trainer, captions)
        return CaptionedImages(data.images, data.captions), CaptionedImages.collate

    @torch.no_grad()
    def _encode(self, trainer, captions: list[str], chunk: int = 256):
        """Every caption once, through the family adapter (the pipeline's own ``encode_prompt``; masked
        for PixArt) -> ``({keyword: (captions, ...)}, {keyword: one row shared by all})``."""
        import logging

        family, pipe = trainer.model.family, trainer.model.pipe
        length = min(300, int(getattr(pipe.tokenizer, "model_max_length", 300)))
        size = trainer.resolution
        log = logging.getLogger(type(pipe).__module__)  # its per-chunk "truncated" notice: long names are cut, as in training
        level, parts, shared = log.level, {}, {}
        log.setLevel(logging.ERROR)
        try:
            for i in range(0, len(captions), chunk):
                cond = family.encode(prompt=captions[i : i + chunk], num_images_per_prompt=1, max_sequence_length=length,
                                     height=size, width=size, unconditional=False)
                for key, (value, _) in cond.items():
                    if key in PER_CAPTION:
                        parts.setdefault(key, []).append(value.float().cpu() if value.is_floating_point() else value.cpu())
                    else:
                        shared[key] = value[0].cpu()
        finally:
            log.setLevel(level)
        return {k: torch.cat(v) for k, v in parts.items()}, shared

    def model_inputs(self, trainer, x_t: torch.Tensor, t: torch.Tensor, idx: torch.Tensor) -> dict:
        """The transformer's forward arguments for the family, as its stock pipeline makes them (the family
        adapters' ``model`` in ``pipelines/families.py`` make the same call; here all exits are asked for)."""
        family, device = trainer.model.family.name, trainer.device
        cond = {k: v[idx].to(device) for k, v in self.conditions.items()}
        if family == "pixart":
            return dict(hidden_states=x_t, timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}, **cond)
        if family == "sd3":  # the timestep input is sigma * 1000
            return dict(hidden_states=x_t, timestep=t.float(), **cond)
        inputs = dict(hidden_states=x_t, timestep=t.float() / 1000, txt_ids=self.shared["txt_ids"].to(device),
                      img_ids=self.shared["img_ids"].to(device), **cond)  # flux, chroma: the timestep input is sigma
        if "guidance" in self.shared:
            inputs["guidance"] = self.shared["guidance"].to(device).expand(x_t.shape[0])
        return inputs

    def loss(self, trainer, batch):
        cfg, model, device = self.config, trainer.model, trainer.device
        gens = trainer.generators(batch["positions"])
        # per-sample draws, in a fixed order from the sample's own generator: caption, dropout, posterior, t, eps
        pick, drop = D.rand(gens), D.rand(gens) < cfg.prompt_dropout
        captions = ["" if d else cs[int(r * len(cs))] for cs, r, d in zip(batch["captions"], pick.tolist(), drop.tolist())]
        idx = torch.tensor([self.caption_index[c] for c in captions])
        shape = model.latent_shape(trainer.resolution)  # the denoiser's layout (Flux: packed 2x2 tokens)
        images = batch["images"].float() / 127.5 - 1.0
        x0 = model.encode_images(images.to(device), D.randn(gens, shape).to(device))
        t = D.randint(gens, 0, model.num_train_timesteps).to(device)  # uniform, as the paper (flow too)
        eps = D.randn(gens, shape).to(device)
        x_t, target = model.noisy(x0, eps, t)
        preds, uncertainties = trainer.unet(**self.model_inputs(trainer, x_t, t, idx), return_all_exits=True)
        patch = getattr(model.unet.config, "patch_size", 1)
        return deediff_loss(preds, uncertainties, target, patch, cfg.lambda_u, cfg.beta_ual, cfg.gamma_layer)

    def save_final(self, trainer, module, folder):
        """``early_exit.safetensors`` (heads + UEMs, float32); with ``train_backbone`` also ``transformer/``."""
        folder.mkdir(parents=True, exist_ok=True)
        module.save_heads(folder / HEADS_FILE)
        if self.config.train_backbone:
            module.transformer.save_pretrained(str(folder / "transformer"), safe_serialization=True)
        (folder / "early_exit.json").write_text(json.dumps(
            {"heads": HEADS_FILE, "backbone": "transformer/" if self.config.train_backbone else self.config.model,
             **module.heads_config()}, indent=2) + "\n")


__all__ = ["DeeDiffConfig", "DeeDiff", "deediff_loss", "per_token"]
