"""Rewards behind one interface, shared by evals/ and finetune/:

    reward = get_reward(name, **kwargs)
    scores = reward(images, prompts)          # images (N, C, H, W) uint8 or float 0..1 -> (N,) float

Every reward has ``name`` and ``higher_is_better``. Registered names (:func:`list_rewards`):

==========================  ==================================================================
``jpeg_compressibility``    minus the JPEG size in kB at quality 95 (DDPO's reward); prompts unused
``jpeg_incompressibility``  plus the JPEG size in kB
``clip_score``              ``100 * max(cos, 0)`` from a CLIP scorer (``scorer=``, ``path=``, ...)
``testbed``                 the testbed's image-text scorer, ``diffplug.testbed.load_scorer(**kw)``
``pickscore``               PickScore (Kirstain et al. 2023): ``path=`` a local transformers CLIP
                            folder holding the PickScore_v1 weights; ``logit_scale * cos``
``hpsv2``                   HPS v2 (Wu et al. 2023): open_clip ``ViT-H-14`` with ``path=`` a
                            local ``.safetensors`` conversion of the HPS v2 checkpoint; ``cos``
``aesthetic``               LAION aesthetic predictor v2: a CLIP ViT-L/14 (``clip_path=`` folder,
                            or ``clip_model=`` + ``clip_path=`` open_clip safetensors) and the
                            MLP head ``path=`` (safetensors, keys ``layers.{0,2,4,6,7}.*``)
``imagereward``             ImageReward (Xu et al. 2023): needs the ``image-reward`` package for
                            its BLIP model code and ``path=`` a ``.safetensors`` state dict plus
                            ``med_config=`` (its BLIP config json)
==========================  ==================================================================

No weights are downloaded and no third-party code is vendored: a reward whose weights are missing
raises ``FileNotFoundError`` naming the argument; original pickled checkpoints (``.pt``/``.pth``)
must first be converted to safetensors by the user. :func:`register_reward` adds new ones.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .clip_score import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, _features, clip_preprocess, get_clip_scorer

_REGISTRY: dict[str, Callable] = {}


def register_reward(name: str):
    """Decorator: register a factory ``(**kwargs) -> reward`` under ``name``."""

    def deco(factory):
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def list_rewards() -> list[str]:
    return sorted(_REGISTRY)


def get_reward(name: str | Callable, **kwargs):
    """Build a reward by name (see module doc), or wrap a callable ``(images, prompts) -> (N,)``."""
    if callable(name):
        return FunctionReward(name, getattr(name, "name", getattr(name, "__name__", "custom")))
    if name not in _REGISTRY:
        raise ValueError(f"reward {name!r} unknown; registered: {', '.join(list_rewards())}")
    return _REGISTRY[name](**kwargs)


class FunctionReward:
    def __init__(self, fn: Callable, name: str, higher_is_better: bool = True):
        self.fn, self.name, self.higher_is_better = fn, name, higher_is_better

    def __call__(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        """Scores (N,) float32 on the images' device."""
        out = torch.as_tensor(self.fn(images, prompts)).float().reshape(len(images))
        return out.to(images.device) if torch.is_tensor(images) else out

    score = __call__


def _need_file(path, arg: str, what: str, suffix: str | None = ".safetensors") -> Path:
    if path is None:
        raise FileNotFoundError(f"{arg}= is required: {what}")
    p = Path(path)
    if not p.exists() or (suffix and p.is_file() and p.suffix != suffix):
        raise FileNotFoundError(f"{arg}={str(path)!r}: {what}" + (f" (a local {suffix} file)" if suffix else ""))
    return p


def _uint8_hwc(images: torch.Tensor) -> np.ndarray:
    x = images if images.dtype == torch.uint8 else (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    from PIL import Image

    sizes = []
    for a in _uint8_hwc(images):
        buf = io.BytesIO()
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000)
    return torch.tensor(sizes)


@register_reward("jpeg_compressibility")
def _jpeg_comp(quality: int = 95):
    return FunctionReward(lambda im, p: -jpeg_size_kb(im, quality), "jpeg_compressibility")


@register_reward("jpeg_incompressibility")
def _jpeg_incomp(quality: int = 95):
    return FunctionReward(lambda im, p: jpeg_size_kb(im, quality), "jpeg_incompressibility")


@register_reward("clip_score")
def _clip(scorer="transformers", path=None, model_name=None, **kw):
    s = get_clip_scorer(scorer, path, model_name, **kw)
    return FunctionReward(lambda im, p: 100 * torch.as_tensor(s(im, list(p))).float().clamp(min=0), "clip_score")


@register_reward("testbed")
def _testbed(**kw):
    from .clip_score import testbed_scorer

    s = testbed_scorer(**kw)
    return FunctionReward(lambda im, p: s(im, list(p)), "testbed")


class PickScore(nn.Module):
    """``logit_scale.exp() * cos(image, prompt)`` from a local PickScore_v1 CLIP folder."""

    name, higher_is_better = "pickscore", True

    def __init__(self, path=None, processor_path=None, device=None):
        super().__init__()
        p = _need_file(path, "path", "folder with the PickScore_v1 CLIPModel (config.json + model.safetensors)",
                       suffix=None)
        from .clip_score import TransformersCLIP

        self.clip = TransformersCLIP(str(p), device=device)
        if processor_path is not None:  # PickScore ships its weights apart from the CLIP-H tokenizer
            import transformers
            self.clip.tokenizer = transformers.AutoTokenizer.from_pretrained(processor_path, local_files_only=True)

    @torch.no_grad()
    def forward(self, images, prompts):
        img, txt = self.clip.embed(images, prompts)
        return self.clip.model.logit_scale.exp().float() * F.cosine_similarity(img, txt, dim=-1)

    score = forward


@register_reward("pickscore")
def _pickscore(**kw):
    return PickScore(**kw)


@register_reward("hpsv2")
def _hpsv2(path=None, model_name: str = "ViT-H-14", device=None):
    from .clip_score import OpenCLIP

    p = _need_file(path, "path", "HPS v2 weights converted to safetensors (open_clip ViT-H-14 state dict)")
    s = OpenCLIP(model_name, str(p), device=device)
    return FunctionReward(lambda im, pr: s(im, list(pr)), "hpsv2")


class AestheticMLP(nn.Module):
    """The LAION aesthetic predictor v2 head: Linear-Dropout stack 1024-128-64-16-1 on a
    unit-normalised CLIP image embedding (keys ``layers.{0,2,4,6,7}``)."""

    def __init__(self, in_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, emb):
        return self.layers(emb).squeeze(-1)


class Aesthetic(nn.Module):
    name, higher_is_better = "aesthetic", True

    def __init__(self, path=None, clip_path=None, clip_model: str | None = None, device=None):
        super().__init__()
        from safetensors.torch import load_file

        head = _need_file(path, "path", "LAION aesthetic MLP weights (safetensors, keys layers.{0,2,4,6,7}.*)")
        cp = _need_file(clip_path, "clip_path", "the CLIP ViT-L/14 the head was trained on: a transformers "
                        "folder, or an open_clip .safetensors with clip_model='ViT-L-14'", suffix=None)
        if clip_model is None:
            import transformers
            self.clip = transformers.CLIPModel.from_pretrained(str(cp), local_files_only=True, use_safetensors=True)
            self.size = self.clip.config.vision_config.image_size
            self._encode = lambda x: _features(self.clip.get_image_features(pixel_values=x))
        else:
            import open_clip
            self.clip = open_clip.create_model(clip_model, pretrained=str(cp))
            self.size = self.clip.visual.image_size
            self.size = self.size if isinstance(self.size, int) else self.size[0]
            self._encode = self.clip.encode_image
        self.clip.eval().requires_grad_(False)
        sd = load_file(str(head))
        self.mlp = AestheticMLP(sd["layers.0.weight"].shape[1])
        self.mlp.load_state_dict(sd)
        self.mlp.eval().requires_grad_(False)
        if device is not None:
            self.to(device)

    @torch.no_grad()
    def forward(self, images, prompts=None):
        dev = self.mlp.layers[0].weight.device
        emb = self._encode(clip_preprocess(images.to(dev), self.size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)).float()
        return self.mlp(F.normalize(emb, dim=-1))

    score = forward


@register_reward("aesthetic")
def _aesthetic(**kw):
    return Aesthetic(**kw)


@register_reward("imagereward")
def _imagereward(path=None, med_config=None, device="cpu"):
    p = _need_file(path, "path", "ImageReward weights converted to safetensors")
    mc = _need_file(med_config, "med_config", "ImageReward's BLIP med_config.json", suffix=".json")
    try:
        from ImageReward.ImageReward import ImageReward as _IR  # the image-reward package's model code
    except ImportError as e:
        raise RuntimeError("reward 'imagereward' needs the model code: pip install image-reward") from e
    from PIL import Image
    from safetensors.torch import load_file

    model = _IR(med_config=str(mc), device=device)
    model.load_state_dict(load_file(str(p)), strict=False)
    model.eval()

    def score(images, prompts):
        out = []
        for a, prompt in zip(_uint8_hwc(images), prompts):
            out.append(float(model.score(prompt, [Image.fromarray(a)])))
        return torch.tensor(out)

    return FunctionReward(score, "imagereward")
