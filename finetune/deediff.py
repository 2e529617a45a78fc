"""DeeDiff: train early-exit heads and uncertainty estimation modules (UEMs) for a transformer
denoiser (Tang et al., arXiv:2309.17074; the model side is ``diffplug.samplers.EarlyExit``).

A method of the one trainer on the generic model side (``model.py`` ``DiffusionModel``), as every
other method: prompts encoded and the transformer called through the family adapter (PixArt's masks
and learned-sigma half, SD3's pooled vector, Flux's packing, RoPE ids and guidance embedding), and
``x_t = alpha_t x_0 + sigma_t eps`` with the regression target ``y`` from ``DiffusionModel.noisy``
(``eps`` for PixArt; the velocity ``eps - x_0`` for SD3, Flux and Chroma). The trained module,
:class:`AllExits`, called as the denoiser gives every block's head output ``g_i`` and per-token
uncertainty ``u_i`` (one ``eps`` for every head):

    L_simple = ||g_N - y||^2                                   (the final layer's MSE)
    u_hat_i  = tanh(|g_i - y|), averaged over each token's patch (pseudo-label, no gradient)
    L_u      = sum_{i<N} mean_tokens (u_i - u_hat_i)^2
    L_UAL    = sum_{i<N} mean_tokens (1 - u_i) ||g_i - y||^2_token
    L        = L_simple + lambda L_u + beta L_UAL (+ gamma_layer sum_{i<N} ||g_i - y||^2)

``lambda = beta = 1`` and ``gamma_layer = 0`` are the paper's.

**Noise levels** (``timesteps``). ``family`` (default) draws them as every other method, as the model
pre-trains (``DiffusionModel.sample_timesteps``): ``t ~ U{0..999}`` on PixArt, the paper's rule;
logit-normal sigma with the scheduler's shift on SD3, Flux and Chroma. ``uniform`` draws
``t ~ U{0..999}``, ``sigma = t / 1000``, on flow models too (the paper's rule; what deediff drew on
them before it ran on the generic side): the heads must exit well at every level a sampler visits,
and SD3's logit-normal with shift 3 puts 0.05 % of the draws below sigma = 0.1 (uniform: 10 %).

The spec's ambiguities, resolved:

* **Token aggregation.** ``u`` is per token (the paper's linear UEM) and is trained per token against
  the pseudo-label of that token's patch (mean of ``tanh|g_i - y|`` over the patch's p x p x C
  values; Flux's packed tokens: over the token's features). The exit decision takes the mean over
  tokens: both averaged alike, the mean ``u`` estimates the mean pseudo-label of the image.
* **Per-timestep UEMs.** Default one UEM per layer with the model's own timestep embedding as input
  (``uem_buckets=1``); ``uem_buckets=1000`` gives the literal per-timestep weights (the reproduction
  found those fail to exit), anything between buckets the noise levels.
* **Degenerate optimum** (``(1 - u)`` lets the model lower L_UAL by raising ``u``): paper-faithful,
  ``u`` is not detached in L_UAL; ``gamma_layer`` adds the reproduction's unweighted layer-wise term.
* **Backbone.** Frozen by default (``train_backbone=false``): the heads then pair with the unchanged
  model, and threshold 0 stays the pretrained model exactly; the reproduction also found a frozen
  backbone keeps quality better. ``train_backbone=true`` trains a copy jointly (the paper's set-up)
  and saves it next to the heads; ``gradient_checkpointing`` then recomputes its blocks in backward.

Models: PixArt (the testbed DiT), SD3, Flux and Chroma (``EarlyExit``'s trunks); UNets have no
linear depth to exit from and are refused. Data: ``data=testbed``, the images and captions the
testbed denoisers were trained on (Fashion-MNIST 1,000 per class + training emoji, 32 px), a
caption drawn per image and dropped to the empty prompt with ``prompt_dropout`` so that the heads
also serve CFG's unconditional pass.

    diffplug finetune deediff --output_dir runs/deediff --max_steps 3000 --seed 0
    -> runs/deediff/final/early_exit.safetensors (EarlyExit(transformer, heads=...))
    diffplug finetune deediff --model testbed:flux --train_backbone true --output_dir runs/deediff-flux
    -> also runs/deediff-flux/final/transformer/
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import torch

from ..samplers.early_exit import EarlyExit
from . import data as D
from .config import LR_SCHEDULERS, ConfigError, TrainConfig, choice, opt
from .sft import encode_targets
from .trainer import Method

HEADS_FILE = "early_exit.safetensors"


@dataclass
class DeeDiffConfig(TrainConfig):
    model: str = opt("testbed:dit", "a PixArt, SD3, Flux or Chroma pipeline: 'testbed:dit' (the testbed DiT), "
                     "'testbed:flux', 'tiny:sd3', 'tiny:flux', 'tiny:chroma' or a local diffusers folder")
    data: str = opt("testbed", "training images and captions: 'testbed' (the testbed denoisers' training set, 32 px)")
    train_backbone: bool = opt(False, "train the transformer jointly with the heads (paper); false = frozen backbone")
    timesteps: str = choice("family", ("family", "uniform"), "noise levels: 'family' = as the model pre-trains "
                            "(PixArt uniform t, flow models logit-normal sigma + shift); 'uniform' = uniform t on every model (paper)")
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


class AllExits(EarlyExit):
    """``EarlyExit``'s training view as a denoiser the family adapter calls (``DiffusionModel.predict``):
    the output is ``[g_1; ...; g_N]`` joined along the batch, so the family's own output handling
    (PixArt: the learned-sigma half dropped) applies to every head; the call's per-token
    uncertainties ``[u_1 .. u_{N-1}]`` are left in ``uncertainties`` for the loss."""

    def forward(self, *args, **kwargs):
        preds, self.uncertainties = self.all_exits(*args, **kwargs)
        return (torch.cat(preds),)


class DeeDiff(Method):
    name = "deediff"
    Config = DeeDiffConfig
    families = ("pixart", "sd3", "flux", "chroma")

    def trainable(self, trainer):
        cfg = self.config
        transformer = trainer.model.unet
        if cfg.train_backbone:  # the trainer freezes the pipeline's own transformer: train a copy
            transformer = copy.deepcopy(transformer)
        try:
            module = AllExits(transformer, uem_buckets=cfg.uem_buckets, threshold=0.0)
        except TypeError as e:
            raise ConfigError(f"model: {e}") from None
        module.transformer.requires_grad_(cfg.train_backbone)
        if cfg.gradient_checkpointing and cfg.train_backbone:  # EarlyExit's training view honours the model's flag
            module.transformer.enable_gradient_checkpointing()
        self.exits = module.to(trainer.device)
        return self.exits

    def setup(self, trainer):
        from ..testbed.train import diffusion_set

        data = diffusion_set()
        size = tuple(data.images.shape[-2:])
        if size != (trainer.resolution, trainer.resolution):
            raise ConfigError(f"resolution: data=testbed holds {size[0]} px images; pass --resolution {size[0]} "
                              f"(the model's default is {trainer.model.default_resolution()})")
        return CaptionedImages(data.images, data.captions), CaptionedImages.collate

    def timesteps(self, model, gens) -> torch.Tensor:
        if self.config.timesteps == "uniform" and model.is_flow:  # the paper's t ~ U{0..T-1}; sigma = t / T
            return D.randint(gens, 0, model.num_train_timesteps).float()
        return model.sample_timesteps(gens)  # PixArt: that same uniform draw

    def inputs(self, trainer, batch) -> tuple:
        """One batch through the generic model side -> ``(x_t, t, target, conditions)``. Per-sample draws,
        in a fixed order from the sample's own generator: caption, dropout, posterior, t, eps."""
        cfg, model, device = self.config, trainer.model, trainer.device
        gens = trainer.generators(batch["positions"])
        pick, drop = D.rand(gens), D.rand(gens) < cfg.prompt_dropout
        captions = ["" if d else cs[int(r * len(cs))] for cs, r, d in zip(batch["captions"], pick.tolist(), drop.tolist())]
        x0 = encode_targets(trainer, batch["images"].float() / 127.5 - 1.0, gens, random_flip=False)
        t = self.timesteps(model, gens).to(device)
        x_t, target = model.noisy(x0, D.randn(gens, model.latent_shape(trainer.resolution)).to(device), t)
        return x_t, t, target, model.encode_prompts(captions, trainer.resolution)

    def loss(self, trainer, batch):
        cfg = self.config
        x_t, t, target, cond = self.inputs(trainer, batch)
        preds = trainer.predict(trainer.unet, x_t, t, cond).chunk(self.exits.num_blocks)
        uncertainties = self.exits.__dict__.pop("uncertainties")
        patch = getattr(self.exits.config, "patch_size", 1)
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


__all__ = ["DeeDiffConfig", "DeeDiff", "AllExits", "deediff_loss", "per_token"]
