"""SPO's step-aware preference model (SPM): an image-text scorer conditioned on the timestep, that
judges the *predicted clean image* of a noisy sample (Liang et al., arXiv:2406.04314, Sec. 3.2).

    s(x0_hat, c, t) = logit_scale * < text(c), image_t(x0_hat) >

As the paper (PickScore + DiT-style adaLN in every vision layer and the post-LayerNorm), *every
block of the image tower* is conditioned on t: after each block's output ``h`` an adaLN-Zero unit
adds ``gate_t * W(norm(h) (1 + scale_t) + shift_t)`` (shift, scale, gate from a sinusoidal timestep
embedding and an MLP, DiT's ``TimestepEmbedder``). Blocks: each ConvNet stage of the testbed scorer,
each ViT encoder layer and the post-LayerNorm of a CLIP backbone; a backbone may list its own with
``time_blocks() -> [(module, dim)]``, else its image embedding is modulated. The gates start at zero,
so an *untrained* SPM is the backbone scorer at every t -- which is why SPO refuses one.

Backbones (``--backbone``): ``testbed`` (``diffplug.testbed.load_scorer()``), ``clip:<folder>`` (a
local transformers CLIP folder, e.g. PickScore_v1), ``module:function`` (returns a backbone). A saved
SPM records its backbone; a recorded ``module:function`` is imported only when the user passes the
same ``--backbone`` again (a name read back from a file is never resolved on its own).
A backbone has ``encode_image(images in [0,1]) -> (B, D)`` and ``encode_text(prompts) -> (B, D)``
(or the testbed scorer's ``embed_images`` / ``embed_text``), and optionally ``logit_scale`` (a scalar,
or ``image_tower.logit_scale`` holding its log as in the testbed scorer; 100 if absent, as CLIP's).

``diffplug finetune spo-pm --reward NAME`` trains it on pairs of the base model's samples labelled by
that reward with soft labels (ties 0.5/0.5; Sec. 3.2: both noised with the same noise at a random t,
denoised in one step by the frozen diffusion model with CFG, decoded, scored at t; PickScore's
pairwise softmax loss), then reports its held-out accuracy per noise level next to the labelling
reward applied to the same one-step predictions (``final/stepwise_accuracy.json``).
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
from .logprob import PromptCache
from .model import FAMILIES
from .pairs import PairDataConfig, PreferencePairs, generate_rounds, pair_dataset, pair_work, read_prompts, resolve_reward
from .trainer import Method

EVAL_TIMESTEPS = (0, 251, 501, 701, 951)  # the paper's evaluation noise levels


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
        self.model = CLIPModel.from_pretrained(folder, use_safetensors=True)
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


def is_import_name(spec: str) -> bool:
    """A ``module:function`` backbone (imported and called), as opposed to a built-in name."""
    return ":" in spec and not spec.startswith(("clip:", "pickscore:"))


def checked_backbone(folder, recorded: str, given: str | None) -> str:
    """The backbone to rebuild a saved SPM on. A ``module:function`` recorded in the folder is used
    only when the user passed the same name; a given backbone must match the recorded one."""
    if not recorded:
        raise ConfigError(f"preference_model: {str(folder)!r}: spm_config.json records no backbone")
    if given and given != recorded:
        raise ConfigError(f"backbone: {given!r}, but the preference model {str(folder)!r} was trained on "
                          f"{recorded!r}; pass --backbone {recorded} or train one on {given!r}")
    if is_import_name(recorded) and given != recorded:
        raise ConfigError(f"backbone: the preference model {str(folder)!r} records the backbone {recorded!r}, a "
                          "module:function that would be imported and called; diffplug does not run names read "
                          f"from a file. If you trust it, pass --backbone {recorded}")
    return recorded


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


class AdaLNZero(nn.Module):
    """``h + gate_t * W(LN(h) (1 + scale_t) + shift_t)`` over the channels of a block output ``h``:
    (B, D), (B, L, D) or (B, D, H, W). Zero-initialised modulation: it starts as the identity."""

    def __init__(self, dim: int, t_dim: int):
        super().__init__()
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(t_dim, 3 * dim))
        nn.init.zeros_(self.modulation[-1].weight)
        nn.init.zeros_(self.modulation[-1].bias)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        conv = h.dim() == 4
        x = h.permute(0, 2, 3, 1) if conv else h  # channels last
        shift, scale, gate = (v.reshape((x.shape[0],) + (1,) * (x.dim() - 2) + (-1,)).to(x.dtype)
                              for v in self.modulation(temb).chunk(3, dim=-1))
        x = x + gate * self.proj(self.norm(x) * (1 + scale) + shift)
        return x.permute(0, 3, 1, 2) if conv else x


def time_blocks(backbone: nn.Module) -> list[tuple[nn.Module, int]]:
    """``[(module, channels)]`` of the image tower's blocks whose outputs get a time modulation."""
    if hasattr(backbone, "time_blocks"):
        return list(backbone.time_blocks())
    tower = getattr(backbone, "image_tower", None)
    if tower is not None and hasattr(getattr(tower, "net", None), "features"):  # testbed ConvNet: stage ends
        layers = list(tower.net.features)
        acts = [i for i, m in enumerate(layers) if isinstance(m, nn.SiLU)][1::2]  # 2nd activation of a stage
        return [(layers[i], layers[i - 1].num_features) for i in acts]
    vision = getattr(getattr(backbone, "model", None), "vision_model", None)
    if vision is not None:  # transformers CLIP: every encoder layer + post-LayerNorm
        dim = vision.config.hidden_size
        return [(layer, dim) for layer in vision.encoder.layers] + [(vision.post_layernorm, dim)]
    return []


def _text_features(backbone, prompts) -> torch.Tensor:
    fn = getattr(backbone, "encode_text", None) or backbone.embed_text
    return fn(list(prompts))


class StepAwarePreferenceModel(nn.Module):
    """``score(images, prompts, timesteps) -> (B,)`` on images in [0, 1]."""

    def __init__(self, backbone: nn.Module, embed_dim: int, freq_dim: int = 256, backbone_spec: str = "", t_dim: int = 256):
        super().__init__()
        self.backbone, self.freq_dim, self.backbone_spec = backbone, freq_dim, backbone_spec
        self.t_embedder = nn.Sequential(nn.Linear(freq_dim, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))  # DiT
        blocks = time_blocks(backbone)
        self.blocks = nn.ModuleList(AdaLNZero(dim, t_dim) for _, dim in blocks)
        self.embed_mod = None if blocks else AdaLNZero(embed_dim, t_dim)  # fallback: the embedding
        self._temb = None
        for (module, _), unit in zip(blocks, self.blocks):
            module.register_forward_hook(self._hook(unit))

    def _hook(self, unit):
        def hook(module, inputs, output):
            if self._temb is None:  # used outside the SPM: unchanged
                return output
            if isinstance(output, tuple):  # transformers layers return (hidden_states, ...)
                return (unit(output[0], self._temb),) + tuple(output[1:])
            return unit(output, self._temb)
        return hook

    def train(self, mode: bool = True):
        """The backbone stays in eval mode (its normalisation statistics are frozen); only the
        gradients flow. Small preference batches would otherwise wreck BatchNorm statistics."""
        super().train(mode)
        self.backbone.eval()
        return self

    @classmethod
    def from_backbone(cls, spec: str, freq_dim: int = 256) -> "StepAwarePreferenceModel":
        backbone = load_backbone(spec)
        with torch.no_grad():
            dim = _text_features(backbone, ["a"]).shape[-1]
        return cls(backbone, dim, freq_dim, backbone_spec=spec)

    def logit_scale(self) -> torch.Tensor:
        scale = getattr(self.backbone, "logit_scale", None)
        if scale is None and hasattr(getattr(self.backbone, "image_tower", None), "logit_scale"):
            return self.backbone.image_tower.logit_scale.exp().float()  # stored as a log (CLIP style)
        if scale is None:
            return torch.tensor(100.0)
        return torch.as_tensor(scale() if callable(scale) else scale).float()

    def _encode_text(self, prompts):
        """Text features, each distinct prompt computed once while the text tower is frozen."""
        if any(p.requires_grad for n, p in self.backbone.named_parameters() if "text" in n):
            return _text_features(self.backbone, prompts)
        cache = self.__dict__.setdefault("_text_cache", {})
        new = list(dict.fromkeys(p for p in prompts if p not in cache))
        if new:
            with torch.no_grad():
                cache.update(zip(new, _text_features(self.backbone, new).float()))
        return torch.stack([cache[p] for p in prompts])

    def image_features(self, images: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        temb = self.t_embedder(timestep_embedding(timesteps.to(images.device), self.freq_dim))
        fn = getattr(self.backbone, "encode_image", None) or self.backbone.embed_images
        self._temb = temb
        try:
            f = fn(images).float()
        finally:
            self._temb = None
        if self.embed_mod is not None:
            f = self.embed_mod(f, temb)
        return F.normalize(f, dim=-1)

    def forward(self, images: torch.Tensor, prompts: list[str], timesteps) -> torch.Tensor:
        t = torch.as_tensor(timesteps, device=images.device).reshape(-1).expand(images.shape[0])
        text = F.normalize(self._encode_text(prompts).float().to(images.device), dim=-1)
        return self.logit_scale().to(images.device) * (text * self.image_features(images, t)).sum(-1)

    score = forward

    # -- persistence: safetensors + JSON -----------------------------------------------------------
    def save(self, folder: str | Path, **info) -> None:
        """``spm.safetensors`` + ``spm_config.json`` (backbone, freq_dim and ``info``: the labelling
        reward and the training steps, which SPO checks)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / "spm.safetensors"))
        config = {"backbone": self.backbone_spec, "freq_dim": self.freq_dim, **info}
        (folder / "spm_config.json").write_text(json.dumps(config, indent=1))

    @classmethod
    def load(cls, folder: str | Path, backbone: str | None = None) -> "StepAwarePreferenceModel":
        """``backbone``: the user's ``--backbone``; required to match a recorded ``module:function``."""
        from ..checked import UserFileError, like, read_safetensors

        folder = Path(folder)
        if not (folder / "spm_config.json").is_file():
            raise ConfigError(f"preference_model: {str(folder)!r} holds no spm_config.json (train one with `diffplug finetune spo-pm`)")
        try:  # checked whole (keys, shapes, finite values) before the model takes any of it
            config = _config(folder)
            if not isinstance(config.get("freq_dim"), int) or config["freq_dim"] <= 0:
                raise UserFileError(folder / "spm_config.json", f"freq_dim {config.get('freq_dim')!r} is not a positive "
                                    "integer", what=WHAT)
            model = cls.from_backbone(checked_backbone(folder, config.get("backbone", ""), backbone), config["freq_dim"])
            state = read_safetensors(folder / "spm.safetensors", like(model.state_dict(), dtype=False), what=WHAT, fix=FIX)
        except UserFileError as e:
            raise ConfigError(f"preference_model: {e}") from None
        model.load_state_dict(state)
        model.info = config
        return model


WHAT = "an SPO step-aware preference model (spm.safetensors + spm_config.json written by diffplug finetune spo-pm)"
FIX = "train it again with `diffplug finetune spo-pm --output_dir D` and pass --preference_model D"


def _config(folder: Path) -> dict:
    from ..checked import read_json

    return read_json(folder / "spm_config.json", what=WHAT, fix=FIX)


def load_preference_model(spec: str, reward: str | None = None, backbone: str | None = None) -> StepAwarePreferenceModel:
    """A trained SPM: an ``spo-pm`` output folder (or its ``final``). Refuses anything else -- an
    untrained SPM is its backbone at every t, not step-aware -- and, given ``reward``, a model
    trained on another reward. ``backbone``: the user's ``--backbone`` (see :func:`checked_backbone`)."""
    how = "train one with `diffplug finetune spo-pm --reward NAME --output_dir D`, then pass --preference_model D"
    folder = Path(spec) if spec else None
    if folder is not None and folder.is_dir() and not (folder / "spm_config.json").is_file():
        folder = folder / "final"
    if folder is None or not (folder / "spm_config.json").is_file():
        raise ConfigError(f"preference_model: {spec!r} is not a trained step-aware preference model; {how}")
    from ..checked import UserFileError

    try:
        info = _config(folder)
    except UserFileError as e:
        raise ConfigError(f"preference_model: {e}") from None
    if not info.get("steps"):
        raise ConfigError(f"preference_model: {str(folder)!r} is untrained (no spo-pm training steps recorded); {how}")
    if reward is not None and info.get("reward") != reward:
        raise ConfigError(f"reward: {reward!r}, but the preference model {str(folder)!r} was trained on "
                          f"{info.get('reward')!r}; pass --reward {info.get('reward')} or train one with "
                          f"`diffplug finetune spo-pm --reward {reward}`")
    return StepAwarePreferenceModel.load(folder, backbone)


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
    reward: str = opt("testbed", "reward that labels the generated pairs (diffplug finetune --list-rewards), or module:function")
    tie_margin: float = opt(0.1, "a pair is a tie (label 0.5/0.5) when its rewards differ by <= this x the rewards' s.d.")
    eval_repeats: int = opt(3, "rounds over the prompts for the held-out pairs of the step-wise accuracy (other seeds)")
    use_lora: bool = opt(False, "(not used: the SPM is trained in full; the diffusion model stays frozen)")
    # defaults: the documented run's pairs (10 rounds x 10 prompts x 2 = 200), 150 steps at LR 3e-4 instead of 300 at
    # 1e-4 -- the same held-out step-wise accuracy in 3/4 of the CPU (finetune/README.md, "SPO"); the old recipe:
    # --max_steps 300 --learning_rate 1e-4
    max_steps: int = opt(150, "optimiser steps (150 x 8 pairs = 6 passes over the 200 default pairs)")
    learning_rate: float = opt(3e-4, "peak learning rate")
    train_batch_size: int = opt(8, "pairs per device per step")
    generate_repeats: int = opt(10, "rounds over the prompts for the training pairs (pairs = rounds x prompts x per_prompt/2)")
    checkpoint_every: int = opt(50, "save output_dir/checkpoint-N every this many steps; 0 = only at the end (Ctrl-C "
                                "saves the step in progress)")

    method = "spo-pm"

    def validate(self) -> None:
        super().validate()
        if self.tie_margin < 0:
            raise ConfigError(f"tie_margin: must be >= 0; got {self.tie_margin}")
        if self.eval_repeats < 0:
            raise ConfigError(f"eval_repeats: must be >= 0 (0 = no held-out evaluation); got {self.eval_repeats}")


class SPMTraining(Method):
    """Trains the SPM; the diffusion model stays frozen. Data: pairs of the base model's samples
    labelled by ``--reward`` with soft labels (``--data generate``), or pair files (Pick-a-Pic layout,
    ties kept as 0.5/0.5)."""

    name = "spo-pm"
    Config = SPMConfig
    # flow models too: t ~ U{0, ..., 999} is sigma = t / 1000 uniform on the flow path, the noise levels
    # SPO then queries at (1000 sigma of its schedule); model.noisy / predict / split follow the family
    families = FAMILIES

    def trainable(self, trainer) -> nn.Module:
        spm = StepAwarePreferenceModel.from_backbone(self.config.backbone)
        for name, p in spm.backbone.named_parameters():
            p.requires_grad_(self.config.train_backbone and "text" not in name)
        self.spm = spm.to(trainer.device)
        return self.spm

    # the ETA's cost model, in denoiser image-evaluations (progress.RunClock): per training pair, two images through
    # the VAE, one CFG call and the SPM forward + backward (~12, measured on the testbed against pair generation);
    # per held-out pair, the same without the backward at each of the 5 evaluation noise levels
    STEP_WORK_PER_PAIR, EVAL_WORK_PER_PAIR = 12, 40

    def phases(self, trainer):
        cfg = self.config
        if cfg.data != "generate":
            return [("train", None, None, "steps")]
        n, work = len(read_prompts(cfg.prompts)), pair_work(cfg.num_per_prompt, cfg.generate_steps)

        def todo(name, rounds):  # a cached pair folder (a resumed run) needs no time
            return 0 if (trainer.out / name / "pairs.jsonl").is_file() else n * rounds

        held = n * cfg.eval_repeats * (cfg.num_per_prompt // 2)
        return ([("pairs-heldout", todo("pairs-heldout", cfg.eval_repeats), work, "prompts")] if cfg.eval_repeats else []) + [
            ("pairs", todo("pairs", generate_rounds(cfg, n)), work, "prompts"), ("train", None, None, "steps")] + (
            [("evaluation", 1, self.EVAL_WORK_PER_PAIR * held, "pass")] if cfg.eval_repeats else [])

    def step_work(self, trainer):
        return self.STEP_WORK_PER_PAIR * self.config.train_batch_size * self.config.gradient_accumulation_steps

    def setup(self, trainer):
        cfg = self.config
        self.heldout = None
        if cfg.data == "generate" and cfg.eval_repeats:
            self.heldout = pair_dataset(trainer, cfg, name="pairs-heldout", repeats=cfg.eval_repeats, salt=1,
                                        labelled=True, tie_margin=cfg.tie_margin)
        return pair_dataset(trainer, cfg, labelled=True, tie_margin=cfg.tie_margin), PreferencePairs.collate

    @torch.no_grad()
    def predicted_x0(self, trainer, x0, gens, captions, t=None):
        """Noise the pair with shared noise at t, one CFG step of the frozen model -> decoded x0_hat."""
        model = trainer.model
        if t is None:
            t = D.randint(gens, 0, model.num_train_timesteps)
        eps = D.randn(gens, x0.shape[1:]).to(x0.device)
        t2 = torch.cat([t, t]).to(x0.device)
        x_t, _ = model.noisy(x0, torch.cat([eps, eps]), t2)
        if getattr(self, "prompt_cache", None) is None:
            self.prompt_cache = PromptCache(model, trainer.resolution)
        conditions = self.prompt_cache(list(captions) * 2)
        both = {k: torch.cat([u, c]) for k, (c, u) in conditions.items()}
        out_u, out_c = model.predict(model.unet, torch.cat([x_t, x_t]), torch.cat([t2, t2]), both).chunk(2)
        guided = out_u + self.config.spm_guidance_scale * (out_c - out_u)  # CFG
        alpha, sigma = noise_levels(model.scheduler, t2.cpu())
        shape = (-1,) + (1,) * (x_t.dim() - 1)  # Flux: packed (B, tokens, 4C)
        x0_hat = split(guided, x_t, alpha.to(x_t.device).view(shape), sigma.to(x_t.device).view(shape), model.prediction_type)[0]
        return model.decode(x0_hat), t2

    def loss(self, trainer, batch):
        model, device, n = trainer.model, trainer.device, len(batch["captions"])
        gens = trainer.generators(batch["positions"])
        x0 = model.encode_images(torch.cat([batch["image_w"], batch["image_l"]]).to(device))
        images, t2 = self.predicted_x0(trainer, x0, gens, batch["captions"])
        scores = trainer.unet(images, list(batch["captions"]) * 2, t2)
        label = batch.get("label_w", torch.ones(n)).to(device)
        losses = pickscore_loss(scores[:n], scores[n:], label)
        decided = label != 0.5
        correct = ((scores[:n] > scores[n:]) == (label > 0.5)).float()
        acc = (correct * decided).sum() / decided.sum().clamp(min=1)  # on the decided (non-tie) pairs
        return losses.mean(), {"accuracy": acc.detach(), "tie_fraction": (~decided).float().mean()}

    @torch.no_grad()
    def stepwise_accuracy(self, trainer, spm, pairs, reward) -> dict:
        """Held-out accuracy per noise level on the decided pairs: the SPM on the one-step x0
        predictions at t, and the labelling reward applied to the same predictions."""
        spm.eval()
        model, device = trainer.model, trainer.device
        batch = PreferencePairs.collate([pairs[i] for i in range(len(pairs))])
        keep = batch["label_w"] != 0.5
        if not keep.any():
            return {}
        caps = [c for c, k in zip(batch["captions"], keep.tolist()) if k]
        w, l, label = batch["image_w"][keep], batch["image_l"][keep], batch["label_w"][keep]
        n = len(caps)
        x0 = model.encode_images(torch.cat([w, l]).to(device))
        out = {}
        for t in EVAL_TIMESTEPS:  # the same noise at every t
            gens = D.generators(self.config.seed + 12345, torch.arange(n))
            images, t2 = self.predicted_x0(trainer, x0, gens, caps, torch.full((n,), t))
            s = spm(images, caps * 2, t2).float().cpu()
            r = torch.as_tensor(reward(images.float().clamp(0, 1).cpu(), caps * 2)).float().cpu()
            truth = label > 0.5
            acc_spm = ((s[:n] > s[n:]) == truth).float()
            acc_rew = ((r[:n] > r[n:]) == truth).float()
            out[str(t)] = {"pairs": n, "spm": acc_spm.mean().item(), "spm_se": (acc_spm.std() / n ** 0.5).item(),
                           "reward": acc_rew.mean().item(), "reward_se": (acc_rew.std() / n ** 0.5).item()}
        spm.train()
        return out

    def save_final(self, trainer, module, folder: Path) -> None:
        cfg = self.config
        info = {"reward": cfg.reward if cfg.data == "generate" else f"data:{cfg.data}", "steps": cfg.max_steps}
        if self.heldout is not None:
            trainer.clock.start("evaluation")
            acc = self.stepwise_accuracy(trainer, module, self.heldout, resolve_reward(cfg.reward))
            trainer.clock.advance("evaluation")
            info["stepwise_accuracy"] = acc
            lines = [f"t={t}: spm {a['spm']:.3f} ± {a['spm_se']:.3f}, reward on the same x0_hat {a['reward']:.3f} ± "
                     f"{a['reward_se']:.3f} ({a['pairs']} pairs)" for t, a in acc.items()]
            trainer._print("held-out step-wise accuracy:\n  " + "\n  ".join(lines))
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "stepwise_accuracy.json").write_text(json.dumps(acc, indent=1))
        module.save(folder, **info)
