"""Plain fine-tuning with the denoising loss on captioned images (the task SaRA's paper evaluates).

    diffplug finetune sft --adapter sara --data testbed:emoji-heldout --max_steps 300 --output_dir runs/sft
    diffplug finetune sft --adapter lora --data my_images/ ...     # metadata.jsonl or one .txt per image

For an image ``x`` with caption ``c``: ``x0 ~ VAE posterior``, ``t`` drawn as the family pre-trains
(``t ~ U{0..T-1}``; flow models: SD3's logit-normal sigma, ``DiffusionModel.sample_timesteps``),
``eps ~ N(0, I)``, ``L = ||target - f(alpha_t x0 + sigma_t eps, t, c)||^2`` with the scheduler's own
target (epsilon, v, x0, or the velocity eps - x0 of SD3/Flux: rectified-flow matching, unweighted).
Runs on every family (UNets, PixArt, SD3, Flux, Chroma) with any adapter. Every draw comes from the
sample's own generator (exact resumption, any process count).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..testbed.data import EMOJI_CATEGORIES, FASHION_CLASSES
from . import data as D
from .config import ConfigError, TrainConfig, opt
from .model import FAMILIES
from .trainer import Method


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def testbed_subsets() -> dict[str, str]:
    """``testbed:SUBSET`` names -> what they hold (training split unless said)."""
    out = {"emoji": "every training emoji", "emoji-heldout": "the held-out emoji (about 10 %; the testbed never saw them)",
           "fashion": "Fashion-MNIST's 60k training images"}
    out.update({_slug(c): f"Fashion-MNIST class {c!r}" for c in FASHION_CLASSES})
    out.update({_slug(c): f"emoji category {c!r}" for c in EMOJI_CATEGORIES})
    return out


def testbed_set(subset: str):
    """The :class:`~diffplug.testbed.data.ImageSet` of ``testbed:SUBSET``."""
    from ..testbed import data as T

    names = testbed_subsets()
    if subset not in names:
        raise ConfigError(f"data: testbed:{subset} is not a testbed subset; use one of {', '.join('testbed:' + n for n in names)}")
    if subset == "emoji-heldout":
        return T.emoji("test")
    if subset in ("emoji", "fashion"):
        return T.emoji("train") if subset == "emoji" else T.fashion_mnist("train")
    fashion = {_slug(c): i for i, c in enumerate(T.FASHION_CLASSES)}
    if subset in fashion:
        s = T.fashion_mnist("train")
        return s.subset(torch.nonzero(s.labels == fashion[subset]).flatten())
    s = T.emoji("train")
    label = len(T.FASHION_CLASSES) + [_slug(c) for c in T.EMOJI_CATEGORIES].index(subset)
    return s.subset(torch.nonzero(s.labels == label).flatten())


class CaptionedImages(torch.utils.data.Dataset):
    """``(image in [-1, 1] at ``size``, caption)`` from a testbed subset or a folder: diffusers'
    ``metadata.jsonl`` (``{"file_name", "text"}`` per line) or ``name.txt`` beside each image."""

    def __init__(self, spec: str, size: int):
        self.size, self.set, self.files = size, None, []
        if spec.startswith("testbed:"):
            self.set = testbed_set(spec.split(":", 1)[1])
            self.captions = [c[0] for c in self.set.captions]
            return
        from ..evals.data import IMAGE_EXTS

        folder = Path(spec)
        if not folder.is_dir():
            raise ConfigError(f"data: {spec!r} is neither a folder of captioned images nor testbed:SUBSET")
        meta = folder / "metadata.jsonl"
        if meta.is_file():
            for n, line in enumerate(meta.read_text().splitlines(), 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row.get("file_name"), str) or not isinstance(row.get("text"), str):
                        raise ConfigError(f"data: {meta}:{n} needs string keys file_name and text (diffusers' layout)")
                    self.files.append((folder / row["file_name"], row["text"]))
        else:
            for p in sorted(folder.iterdir()):
                if p.suffix.lower() in IMAGE_EXTS:
                    if not p.with_suffix(".txt").is_file():
                        raise ConfigError(f"data: {p} has no caption: add {p.with_suffix('.txt').name} or a metadata.jsonl")
                    self.files.append((p, p.with_suffix(".txt").read_text().strip()))
        missing = [str(p) for p, _ in self.files if not p.is_file()]
        if missing or not self.files:
            raise ConfigError(f"data: {spec}: " + (f"missing images {missing[:3]}" if missing else "no images"))
        self.captions = [c for _, c in self.files]

    def __len__(self) -> int:
        return len(self.captions)

    @staticmethod
    def collate(items):
        return {"images": torch.stack([x for x, _ in items]), "captions": [c for _, c in items]}

    def __getitem__(self, i: int):
        if self.set is not None:
            image = self.set.images[i]
        else:
            from ..evals.data import load_image

            image = load_image(self.files[i][0])
        x = image.float().unsqueeze(0) / 127.5 - 1.0
        if x.shape[-2:] != (self.size, self.size):  # centre crop to a square, then resize
            h, w = x.shape[-2:]
            s = min(h, w)
            x = x[..., (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return x[0], self.captions[i]


@dataclass
class SFTConfig(TrainConfig):
    data: str = opt("testbed:emoji-heldout", "a folder of captioned images (metadata.jsonl with file_name/text, or "
                    "NAME.txt beside each image) or testbed:SUBSET, SUBSET one of: " + ", ".join(testbed_subsets()))
    random_flip: bool = opt(False, "flip each image horizontally with p = 0.5")

    method = "sft"


def encode_targets(trainer, images: torch.Tensor, gens, random_flip: bool) -> torch.Tensor:
    """Images in [-1, 1] -> VAE latents (posterior sample), each flipped with p = 0.5 under
    ``random_flip``; draws, per sample from its generator: the flip, then the posterior noise."""
    if random_flip:
        flip = D.rand(gens) < 0.5
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    shape = trainer.model.latent_shape(trainer.resolution)
    return trainer.model.encode_images(images.to(trainer.device), D.randn(gens, shape).to(trainer.device))


class SFT(Method):
    name = "sft"
    Config = SFTConfig
    families = FAMILIES

    def setup(self, trainer):
        dataset = CaptionedImages(self.config.data, trainer.resolution)
        trainer._print(f"data: {len(dataset)} captioned images from {self.config.data}")
        return dataset, CaptionedImages.collate

    def loss(self, trainer, batch):
        model, device = trainer.model, trainer.device
        gens = trainer.generators(batch["positions"])
        x0 = encode_targets(trainer, batch["images"], gens, self.config.random_flip)
        shape = model.latent_shape(trainer.resolution)
        t = model.sample_timesteps(gens).to(device)
        x_t, target = model.noisy(x0, D.randn(gens, shape).to(device), t)
        cond = model.encode_prompts(batch["captions"], trainer.resolution)
        pred = trainer.predict(trainer.unet, x_t, t, cond)
        return (pred - target).pow(2).mean(), {}


__all__ = ["SFTConfig", "SFT", "CaptionedImages", "encode_targets", "testbed_subsets", "testbed_set"]
