"""SPO's step-aware preference model (SPM): an image-text scorer conditioned on the timestep, that
judges the *predicted clean image* of a noisy sample (Liang et al., arXiv:2406.04314, Sec. 3.2).

    s(x0_hat, c, t) = logit_scale * < text(c), adaLN_t(image(x0_hat)) >

The paper initialises from PickScore (CLIP-H) and adds DiT-style adaLN modulation (shift, scale,
gate from a sinusoidal timestep embedding) inside every vision layer. Here the modulation is one
adaLN-Zero block on the image embedding, so any image-text scorer works as the backbone (the
testbed's LiT scorer, a local CLIP/PickScore folder): ``f_t = f + gate_t * MLP(LN(f) (1 + scale_t) + shift_t)``.
The modulation starts at zero, so an untrained SPM *is* the backbone scorer at every t.

Backbones (``--backbone``): ``testbed`` (``diffplug.testbed.load_scorer()``), ``clip:<folder>`` (a
local transformers CLIP folder, e.g. PickScore_v1), ``module:function`` (returns a backbone).
A backbone has ``encode_image(images in [0,1]) -> (B, D)`` and ``encode_text(prompts) -> (B, D)``
(or the testbed scorer's ``embed_images`` / ``embed_text``), and optionally ``logit_scale`` (a scalar,
or ``image_tower.logit_scale`` holding its log as in the testbed scorer; 100 if absent, as CLIP's).

``diffplug finetune spo-pm`` trains it on preference pairs labelled by the backbone on the clean
images (Sec. 3.2: pairs noised with the same noise at a random t, denoised in one step by the frozen
diffusion model with CFG, decoded, scored at t; PickScore's pairwise softmax loss).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data as D
from .config import ConfigError, opt
from ..predictions import noise_levels, split
from .pairs import PairDataConfig, PreferencePairs, pair_dataset
from .trainer import Method


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """DiT's sinusoidal embedding of (possibly fractional) timesteps."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _projected(out) -> torch.Tensor:
    """transformers < 5 returns the projected embedding; 5.x an output whose pooler_output holds it."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class _CLIPBackbone(nn.Module):
    """A local transformers CLIP folder (CLIP, PickScore_v1) as a scorer backbone."""

    def __init__(self, folder: str):
        super().__init__()
        from transformers import CLIPModel, CLIPProcessor

        if not Path(folder).is_dir():
            raise ConfigError(f"backbone: {folder!r} -- no such folder (PickScore/CLIP weights must be local)")
        self.model = CLIPModel.from_pretrained(folder)
        self.processor = CLIPProcessor.from_pretrained(folder)
        size = self.processor.image_processor.crop_size
        self.size = int(getattr(size, "height", None) or (size["height"] if isinstance(size, dict) else size))
        self.register_buffer("mean", torch.tensor(self.processor.image_processor.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.processor.image_processor.image_std).view(1, 3, 1, 1), persistent=False)

    @property
    def logit_scale(self):
        return self.model.logit_scale.exp()

    def encode_image(self, images):
        x = F.interpolate(images.float(), size=(self.size, self.size), mode="bicubic", align_corners=False)
        x = (x - self.mean.to(x)) / self.std.to(x)
        return F.normalize(_projected(self.model.get_image_features(pixel_values=x)), dim=-1)

    def encode_text(self, prompts):
        tok = self.processor.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
        tok = {k: v.to(self.model.device) for k, v in tok.items()}
        return F.normalize(_projected(self.model.get_text_features(**tok)), dim=-1)


def load_backbone(spec: str) -> nn.Module:
    if spec == "testbed":
        try:
            from ..testbed import load_scorer
        except ImportError as e:
            raise ConfigError(f"backbone: the testbed scorer is not available ({e}); pass --backbone clip:<folder> or module:function") from None
        return load_scorer()
    if spec.startswith(("clip:", "pickscore:")):  # PickScore_v1 is a transformers CLIP folder
        return _CLIPBackbone(spec.split(":", 1)[1])
    if ":" in spec:
        import importlib

        module, attr = spec.split(":", 1)
        try:
            return getattr(importlib.import_module(module), attr)()
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"backbone: cannot import {spec!r}: {e}") from None
    raise ConfigError(f"backbone: {spec!r}: expected 'testbed', 'clip:<folder>', 'pickscore:<folder>' or 'module:function'")


class StepAwarePreferenceModel(nn.Module):
    """``score(images, prompts, timesteps) -> (B,)`` on images in [0, 1]."""

    def __init__(self, backbone: nn.Module, embed_dim: int, freq_dim: int = 256, backbone_spec: str = ""):
        super().__init__()
        self.backbone, self.freq_dim, self.backbone_spec = backbone, freq_dim, backbone_spec
        self.t_mlp = nn.Sequential(nn.Linear(freq_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, 3 * embed_dim))
        self.norm = nn.LayerNorm(embed_dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim))
        nn.init.zeros_(self.t_mlp[-1].weight)  # adaLN-Zero: the SPM starts as the backbone
        nn.init.zeros_(self.t_mlp[-1].bias)

    def train(self, mode: bool = True):
        """The backbone stays in eval mode (its normalisation statistics are frozen); only the
        gradients flow. Small preference batches would otherwise wreck BatchNorm statistics."""
        super().train(mode)
        self.backbone.eval()
        return self

    @classmethod
    def from_backbone(cls, spec: str, freq_dim: int = 256) -> "StepAwarePreferenceModel":
        backbone = load_backbone(spec)
        model = cls(backbone, 1, freq_dim, backbone_spec=spec)
        with torch.no_grad():
            dim = model._encode_text(["a"]).shape[-1]
        return cls(backbone, dim, freq_dim, backbone_spec=spec)

    def logit_scale(self) -> torch.Tensor:
        scale = getattr(self.backbone, "logit_scale", None)
        if scale is None and hasattr(getattr(self.backbone, "image_tower", None), "logit_scale"):
            return self.backbone.image_tower.logit_scale.exp().float()  # stored as a log (CLIP style)
        if scale is None:
            return torch.tensor(100.0)
        return torch.as_tensor(scale() if callable(scale) else scale).float()

    def _encode_image(self, images):
        fn = getattr(self.backbone, "encode_image", None) or self.backbone.embed_images
        return fn(images)

    def _encode_text(self, prompts):
        fn = getattr(self.backbone, "encode_text", None) or self.backbone.embed_text
        return fn(list(prompts))

    def image_features(self, images: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        f = self._encode_image(images).float()
        shift, scale, gate = self.t_mlp(timestep_embedding(timesteps.to(f.device), self.freq_dim)).chunk(3, dim=-1)
        f = f + gate * self.mlp(self.norm(f) * (1 + scale) + shift)
        return F.normalize(f, dim=-1)

    def forward(self, images: torch.Tensor, prompts: list[str], timesteps) -> torch.Tensor:
        t = torch.as_tensor(timesteps, device=images.device).reshape(-1).expand(images.shape[0])
        text = F.normalize(self._encode_text(prompts).float().to(images.device), dim=-1)
        return self.logit_scale().to(images.device) * (text * self.image_features(images, t)).sum(-1)

    score = forward

    # -- persistence: safetensors + JSON -----------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / "spm.safetensors"))
        (folder / "spm_config.json").write_text(json.dumps({"backbone": self.backbone_spec, "freq_dim": self.freq_dim}))

    @classmethod
    def load(cls, folder: str | Path) -> "StepAwarePreferenceModel":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "spm_config.json").is_file():
            raise ConfigError(f"preference_model: {str(folder)!r} holds no spm_config.json (train one with `diffplug finetune spo-pm`)")
        config = json.loads((folder / "spm_config.json").read_text())
        model = cls.from_backbone(config["backbone"], config["freq_dim"])
        model.load_state_dict(load_file(str(folder / "spm.safetensors")))
        return model


def load_preference_model(spec: str) -> StepAwarePreferenceModel:
    """A trained SPM folder, or a backbone spec (an untrained SPM = the backbone at every t)."""
    if Path(spec).is_dir() and (Path(spec) / "spm_config.json").is_file():
        return StepAwarePreferenceModel.load(spec)
    if Path(spec).is_dir() and (Path(spec) / "final" / "spm_config.json").is_file():
        return StepAwarePreferenceModel.load(Path(spec) / "final")
    return StepAwarePreferenceModel.from_backbone(spec)


def pickscore_loss(scores_w: torch.Tensor, scores_l: torch.Tensor, label_w: torch.Tensor | None = None) -> torch.Tensor:
    """PickScore's pairwise objective: cross-entropy of softmax([s_w, s_l]) against (label_w, 1 - label_w)."""
    logits = torch.stack([scores_w, scores_l], dim=-1)
    target = torch.stack([label_w, 1 - label_w], dim=-1) if label_w is not None else torch.tensor([1.0, 0.0]).to(logits).expand_as(logits)
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1)


@dataclass
class SPMConfig(PairDataConfig):
    backbone: str = opt("testbed", "image-text scorer to start from: testbed | clip:<folder> | module:function")
    train_backbone: bool = opt(True, "also fine-tune the backbone's image tower (the paper trains the whole SPM)")
    spm_guidance_scale: float = opt(5.0, "CFG scale of the one-step x0 prediction (paper: 5.0)")
    reward: str = opt("backbone", "labels for data=generate: 'backbone' (the backbone scorer on clean images) or a reward")
    use_lora: bool = opt(False, "(not used: the SPM is trained in full; the diffusion model stays frozen)")

    method = "spo-pm"


class SPMTraining(Method):
    """Trains the SPM; the diffusion model stays frozen. Data: preference pairs (files, or generated
    and labelled by the backbone itself: ``--data generate --reward backbone``)."""

    name = "spo-pm"
    Config = SPMConfig

    def trainable(self, trainer) -> nn.Module:
        spm = StepAwarePreferenceModel.from_backbone(self.config.backbone)
        for name, p in spm.backbone.named_parameters():
            p.requires_grad_(self.config.train_backbone and "text" not in name)
        self.spm = spm.to(trainer.device)
        return self.spm

    def setup(self, trainer):
        cfg = self.config
        reward = None
        if cfg.reward == "backbone":
            reward = _ScoreAtZero(StepAwarePreferenceModel.from_backbone(cfg.backbone))
        return pair_dataset(trainer, cfg, reward), PreferencePairs.collate

    @torch.no_grad()
    def predicted_x0(self, trainer, x0, gens, captions, t=None):
        """Noise the pair with shared noise at t, one CFG step of the frozen model -> decoded x0_hat."""
        model = trainer.model
        if t is None:
            t = D.randint(gens, 0, model.num_train_timesteps)
        eps = D.randn(gens, x0.shape[1:]).to(x0.device)
        t2 = torch.cat([t, t]).to(x0.device)
        x_t, _ = model.noisy(x0, torch.cat([eps, eps]), t2)
        conditions = model.encode_prompts(list(captions) * 2, trainer.resolution, uncond=True)
        both = {k: torch.cat([u, c]) for k, (c, u) in conditions.items()}
        out_u, out_c = model.predict(model.unet, torch.cat([x_t, x_t]), torch.cat([t2, t2]), both).chunk(2)
        guided = out_u + self.config.spm_guidance_scale * (out_c - out_u)  # CFG
        alpha, sigma = noise_levels(model.scheduler, t2.cpu())
        shape = (-1, 1, 1, 1)
        x0_hat = split(guided, x_t, alpha.to(x_t.device).view(shape), sigma.to(x_t.device).view(shape), model.prediction_type)[0]
        return model.decode(x0_hat), t2

    def loss(self, trainer, batch):
        model, device, n = trainer.model, trainer.device, len(batch["captions"])
        gens = trainer.generators(batch["positions"])
        x0 = model.encode_images(torch.cat([batch["image_w"], batch["image_l"]]).to(device))
        images, t2 = self.predicted_x0(trainer, x0, gens, batch["captions"])
        scores = trainer.unet(images, list(batch["captions"]) * 2, t2)
        losses = pickscore_loss(scores[:n], scores[n:])
        return losses.mean(), {"accuracy": (scores[:n] > scores[n:]).float().mean().detach()}

    def save_final(self, trainer, module, folder: Path) -> None:
        module.save(folder)


class _ScoreAtZero:
    """A step-aware model used as a plain reward on clean images (t = 0)."""

    def __init__(self, spm):
        self.spm = spm

    @torch.no_grad()
    def __call__(self, images, prompts):
        return self.spm(images, prompts, torch.zeros(len(prompts)))
