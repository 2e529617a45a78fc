"""Rewards behind one interface, shared by evals/ and finetune/:

    reward = get_reward(name, **kwargs)
    scores = reward(images, prompts)          # images (N, C, H, W) uint8 or float 0..1 -> (N,) float

Every reward has ``name``, ``higher_is_better`` (its direction; all registered ones: True) and
``range`` (``(low, high)``, ``math.inf`` where unbounded). Registered names (:func:`list_rewards`):

==========================  ==================================================================
``jpeg_compressibility``    minus the JPEG size in kB at quality 95 (DDPO's reward); prompts unused;
                            range (-inf, 0]
``jpeg_incompressibility``  plus the JPEG size in kB; range [0, inf)
``classifier_logprob``      log p(prompted class | image) from the testbed classifier (19 classes:
                            Fashion-MNIST's ten, the nine emoji categories); range (-inf, 0].
                            The class is read from the prompt (:func:`prompt_class`)
``colorfulness``            Hasler & Suesstrunk (2003) colourfulness on 0..255 RGB:
                            ``sqrt(sd_rg^2 + sd_yb^2) + 0.3 sqrt(mu_rg^2 + mu_yb^2)``, ``rg = R - G``,
                            ``yb = (R + G) / 2 - B``; prompts unused; range [0, 468] (gray = 0)
``clip_score``              ``100 * max(cos, 0)`` from a CLIP scorer (``scorer=``, ``path=``, ...); [0, 100]
``testbed``                 the testbed's image-text scorer (cosine), ``diffplug.testbed.load_scorer(**kw)``;
                            range [-1, 1]
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

Headroom on the testbed base model (DDIM 20, CFG 5, 200 images per prompt set; mean, s.d.; by
``benchmarks/finetune_bench.py --rewards_only``, table in ``benchmarks/finetune_results.md``): the
testbed scorer is saturated on Fashion-MNIST prompts (0.5135, s.d. 0.0055); JPEG size (-1.202 kB,
s.d. 0.107), the classifier log-probability on the hard classes shirt / t-shirt / pullover / coat
(-0.093, s.d. 0.153) and on emoji prompts (-0.83, s.d. 1.74), and colourfulness on emoji prompts
(62.2, s.d. 29.1) leave room to optimise.
"""

from __future__ import annotations

import io
import math
import re
from functools import lru_cache
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
    def __init__(self, fn: Callable, name: str, higher_is_better: bool = True,
                 range: tuple[float, float] = (-math.inf, math.inf)):
        self.fn, self.name, self.higher_is_better, self.range = fn, name, higher_is_better, tuple(range)

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
    return FunctionReward(lambda im, p: -jpeg_size_kb(im, quality), "jpeg_compressibility", range=(-math.inf, 0.0))


@register_reward("jpeg_incompressibility")
def _jpeg_incomp(quality: int = 95):
    return FunctionReward(lambda im, p: jpeg_size_kb(im, quality), "jpeg_incompressibility", range=(0.0, math.inf))


def colorfulness(images: torch.Tensor) -> torch.Tensor:
    """Hasler & Suesstrunk (2003) colourfulness M per image (N,) on 0..255 RGB; (N, 3, H, W) uint8 or 0..1."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected (N, 3, H, W) colour images, got {tuple(images.shape)}")
    x = images.double() if images.dtype == torch.uint8 else images.double().clamp(0, 1) * 255
    r, g, b = x[:, 0].flatten(1), x[:, 1].flatten(1), x[:, 2].flatten(1)
    rg, yb = r - g, 0.5 * (r + g) - b
    sd = (rg.var(1, unbiased=False) + yb.var(1, unbiased=False)).sqrt()
    mu = (rg.mean(1) ** 2 + yb.mean(1) ** 2).sqrt()
    return (sd + 0.3 * mu).float()


@register_reward("colorfulness")
def _colorfulness():
    return FunctionReward(lambda im, p: colorfulness(im), "colorfulness", range=(0.0, 468.0))


@lru_cache(maxsize=1)
def _emoji_names() -> dict[str, int]:
    """Emoji name (lower case, as in the testbed captions) -> classifier column of its category."""
    from ..testbed import data as D

    out = {}
    for split in ("train", "test"):
        s = D.emoji(split)
        out.update({name: int(label) for name, label in zip(s.names, s.labels.tolist())})
    return out


def prompt_class(prompt: str) -> int:
    """The testbed classifier column a prompt asks for: a Fashion-MNIST class named in it ("a photo
    of a t-shirt" -> t-shirt, the longest name wins), or the category of the emoji it names ("an
    emoji of red apple"; needs the emoji data). Unknown prompts raise ``ValueError``."""
    from ..testbed import data as D

    text = prompt.strip().lower()
    name = None
    if text.startswith("an emoji of "):
        name = text[len("an emoji of "):]
    elif text.endswith(" emoji"):
        name = re.sub(r"^an? ", "", text[: -len(" emoji")])
    if name is not None:
        names = _emoji_names()
        if name in names:
            return names[name]
        raise ValueError(f"prompts: {prompt!r} names no testbed emoji (see diffplug.testbed.data.emoji())")
    hits = [c for c in D.FASHION_CLASSES if re.search(rf"(?<![\w-]){re.escape(c)}(?![\w-])", text)]
    if not hits:
        raise ValueError(f"prompts: {prompt!r} names no testbed class; use e.g. 'a photo of a shirt' or "
                         f"'an emoji of red apple' (classes: {', '.join(D.FASHION_CLASSES)})")
    return D.FASHION_CLASSES.index(max(hits, key=len))


@register_reward("classifier_logprob")
def _classifier_logprob(device=None, weights=None):
    from ..testbed import load_classifier

    clf = load_classifier(device, weights).eval()

    @torch.no_grad()
    def score(images, prompts):
        if prompts is None or len(prompts) != len(images):
            raise ValueError("prompts: classifier_logprob needs one prompt per image (the class is read from it)")
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float().clamp(0, 1)
        dev = next(clf.parameters()).device
        logp = clf(x.to(dev)).float().log_softmax(-1)
        cls = torch.tensor([prompt_class(p) for p in prompts], device=dev)
        return logp.gather(1, cls[:, None])[:, 0]

    return FunctionReward(score, "classifier_logprob", range=(-math.inf, 0.0))


@register_reward("clip_score")
def _clip(scorer="transformers", path=None, model_name=None, **kw):
    s = get_clip_scorer(scorer, path, model_name, **kw)
    return FunctionReward(lambda im, p: 100 * torch.as_tensor(s(im, list(p))).float().clamp(min=0), "clip_score",
                          range=(0.0, 100.0))


@register_reward("testbed")
def _testbed(**kw):
    from .clip_score import testbed_scorer

    s = testbed_scorer(**kw)
    return FunctionReward(lambda im, p: s(im, list(p)), "testbed", range=(-1.0, 1.0))


class PickScore(nn.Module):
    """``logit_scale.exp() * cos(image, prompt)`` from a local PickScore_v1 CLIP folder."""

    name, higher_is_better, range = "pickscore", True, (-100.0, 100.0)  # logit_scale (100 in PickScore_v1) * cos

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
    return FunctionReward(lambda im, pr: s(im, list(pr)), "hpsv2", range=(-1.0, 1.0))


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
    name, higher_is_better, range = "aesthetic", True, (-math.inf, math.inf)  # about 1..10 in practice

    def __init__(self, path=None, clip_path=None, clip_model: str | None = None, device=None):
        super().__init__()
        from ..checked import UserFileError, like, read_header, read_safetensors

        what = "LAION aesthetic MLP weights (safetensors, keys layers.{0,2,4,6,7}.*)"
        head = _need_file(path, "path", what)
        shape = read_header(head, what=what)[0].get("layers.0.weight", (None, ()))[1]
        if len(shape) != 2:  # the head is read and checked whole before the CLIP loads
            raise UserFileError(head, "has no 2-D tensor 'layers.0.weight'", what=what)
        self.mlp = AestheticMLP(shape[1])
        self.mlp.load_state_dict(read_safetensors(head, like(self.mlp.state_dict()), what=what))
        self.mlp.eval().requires_grad_(False)
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

    from ..checked import UserFileError, like, read_header, read_safetensors

    model = _IR(med_config=str(mc), device=device)
    what, own = "ImageReward weights converted to safetensors (the model's state dict)", model.state_dict()
    keys = read_header(p, what=what)[0]
    unknown = sorted(set(keys) - set(own))
    if unknown:
        raise UserFileError(p, f"{len(unknown)} tensor(s) ImageReward does not have, e.g. {unknown[:3]}", what=what)
    model.load_state_dict(read_safetensors(p, like({k: v for k, v in own.items() if k in keys}, dtype=False), what=what),
                          strict=False)
    model.eval()

    def score(images, prompts):
        out = []
        for a, prompt in zip(_uint8_hwc(images), prompts):
            out.append(float(model.score(prompt, [Image.fromarray(a)])))
        return torch.tensor(out)

    return FunctionReward(score, "imagereward")  # unbounded; about -2..2
