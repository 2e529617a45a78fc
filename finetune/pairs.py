"""Preference pairs ``(caption, preferred image, rejected image)`` from local files or from a reward.

Accepted sources (``--data``):

* a ``.jsonl`` file, one pair per line;
* a ``.parquet`` file (needs ``pyarrow``);
* a folder holding ``pairs.jsonl`` or ``metadata.jsonl`` (image paths relative to the folder);
* a folder written by ``datasets.Dataset.save_to_disk`` (needs ``datasets``; a ``DatasetDict``'s
  ``train`` split is used);
* ``generate``: pairs made on the fly from a reward (sample N images per prompt, score them, keep
  the best and the worst), cached in ``output_dir/pairs/``.

Row layouts: Pick-a-Pic's ``caption, jpg_0, jpg_1, label_0`` (ties ``label_0 = 0.5`` dropped for
DPO, kept as soft labels for the SPM; the winner put first), or ``caption|prompt`` with ``chosen/rejected`` or ``image_w/image_l``. Images
are paths, encoded bytes (``{"bytes": ...}`` as ``datasets`` stores them), or PIL images.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, TrainConfig, opt

FASHION_PROMPTS = [
    f"a photo of {'an' if c[0] in 'aeiou' else 'a'} {c}"
    for c in ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
]
#: the classes the testbed classifier confuses most (the classifier_logprob reward has headroom there)
HARD_FASHION_PROMPTS = ["a photo of a shirt", "a photo of a t-shirt", "a photo of a pullover", "a photo of a coat"]


@dataclass
class PairDataConfig(TrainConfig):
    """Keys of methods trained on preference pairs (Diffusion-DPO, the SPM)."""

    data: str = opt("generate", "preference pairs: a .jsonl/.parquet file, a folder, or 'generate' (from --reward)")
    reward: str = opt("testbed", "reward for data=generate: a diffplug.evals reward name or module:function")
    prompts: list = opt(list(FASHION_PROMPTS), "prompts for data=generate: a list or a .txt/.json file")
    num_per_prompt: int = opt(4, "samples per prompt for data=generate (best and worst become a pair)")
    generate_repeats: int = opt(8, "rounds over the prompts for data=generate (pairs = rounds x prompts)")
    generate_steps: int = opt(20, "denoising steps for data=generate")

    def validate(self) -> None:
        super().validate()
        if not self.data:
            raise ConfigError("data: required; a .jsonl/.parquet file, a folder, or 'generate'")
        for key in ("num_per_prompt", "generate_repeats", "generate_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1; got {getattr(self, key)}")


def pair_dataset(trainer, cfg: PairDataConfig, reward=None, name: str = "pairs", repeats: int | None = None,
                 salt: int = 0, **generate) -> "PreferencePairs":
    """The dataset of ``cfg.data``; for 'generate', made once by the main process into output_dir/``name``
    (``generate``: extra keywords of :func:`generate_pairs`, e.g. labelled pairs with ties for the SPM)."""
    keep_ties = generate.get("labelled", False)
    if cfg.data != "generate":
        return load_pairs(cfg.data, trainer.resolution, keep_ties)
    folder = trainer.out / name
    acc = trainer.accelerator
    if acc.is_main_process and not (folder / "pairs.jsonl").is_file():
        prompts = read_prompts(cfg.prompts) * (cfg.generate_repeats if repeats is None else repeats)
        trainer._print(f"generating preference pairs ({name}): {len(prompts)} prompts x {cfg.num_per_prompt} samples")
        generate_pairs(trainer, prompts, cfg.num_per_prompt, reward or cfg.reward, cfg.generate_steps, folder,
                       salt=salt, **generate)
    acc.wait_for_everyone()
    return load_pairs(str(folder), trainer.resolution, keep_ties)

CAPTION_KEYS = ("caption", "prompt", "text")
PAIR_KEYS = (("jpg_0", "jpg_1"), ("image_w", "image_l"), ("chosen", "rejected"))


def normalise_row(row: dict, where: str, keep_ties: bool = False) -> tuple | None:
    """A raw row -> ``(caption, winner, loser)``; a tie -> None, or with ``keep_ties``
    ``(caption, image_0, image_1, 0.5)`` (and ``(caption, winner, loser, 1.0)`` otherwise)."""
    caption = next((row[k] for k in CAPTION_KEYS if k in row), None)
    if caption is None:
        raise ConfigError(f"data: {where} has no caption column (one of {CAPTION_KEYS}); columns: {sorted(row)}")
    for a, b in PAIR_KEYS:
        if a in row and b in row:
            if a == "jpg_0":  # Pick-a-Pic: label_0 = 1 -> image 0 preferred, 0.5 -> tie
                if "label_0" not in row:
                    raise ConfigError(f"data: {where} has jpg_0/jpg_1 but no label_0 (the Pick-a-Pic preference label)")
                label = float(row["label_0"])
                if label == 0.5:
                    return (str(caption), row[a], row[b], 0.5) if keep_ties else None
                out = (str(caption), row[a], row[b]) if label > 0.5 else (str(caption), row[b], row[a])
            else:
                out = (str(caption), row[a], row[b])
            return out + (1.0,) if keep_ties else out
    raise ConfigError(
        f"data: {where} has no image pair; expected columns jpg_0, jpg_1, label_0 (Pick-a-Pic), image_w/image_l "
        f"or chosen/rejected; columns: {sorted(row)}"
    )


def load_image(value, root: Path | None = None):
    from PIL import Image

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):  # datasets' Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value)).convert("RGB")
    if isinstance(value, str):
        path = Path(value)
        if not path.is_absolute() and root is not None:
            path = root / path
        if not path.is_file():
            raise FileNotFoundError(f"data: image {str(path)!r} does not exist")
        return Image.open(path).convert("RGB")
    raise TypeError(f"data: cannot read an image from {type(value).__name__}")


def to_tensor(image, size: int) -> torch.Tensor:
    """PIL -> (3, size, size) in [-1, 1]: resize the short side (bilinear), centre crop."""
    import numpy as np
    from PIL import Image

    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
    return x


class PreferencePairs(torch.utils.data.Dataset):
    """Items ``{"caption": str, "image_w": (3,H,W), "image_l": (3,H,W)}`` in [-1, 1]; with
    ``keep_ties`` also ``"label_w"`` (1.0, or 0.5 for a tie, whose images keep their file order).

    ``rows``: a list of dicts, or a ``datasets.Dataset`` (rows are read, and images decoded, only
    when an item is fetched; ties are found from the ``label_0`` column alone)."""

    def __init__(self, rows, size: int, root: Path | None = None, where: str = "data", keep_ties: bool = False):
        self.rows, self.size, self.root, self.where, self.keep_ties = rows, size, root, where, keep_ties
        columns = getattr(rows, "column_names", None)
        if columns is not None:  # a datasets.Dataset: check the layout on the first row only
            if len(rows):
                normalise_row(rows[0], f"{where} row 0")
            labels = rows["label_0"] if "label_0" in columns and not keep_ties else None
            self.index = [i for i in range(len(rows)) if labels is None or float(labels[i]) != 0.5]
        else:
            self.index = [i for i, row in enumerate(rows) if normalise_row(row, f"{where} row {i}", keep_ties) is not None]
        if not self.index:
            raise ConfigError(f"data: {where} holds no usable (non-tie) preference pairs")

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        caption, w, l, *label = normalise_row(self.rows[self.index[i]], f"{self.where} row {self.index[i]}", self.keep_ties)
        item = {
            "caption": caption,
            "image_w": to_tensor(load_image(w, self.root), self.size),
            "image_l": to_tensor(load_image(l, self.root), self.size),
        }
        if self.keep_ties:
            item["label_w"] = label[0]
        return item

    @staticmethod
    def collate(items: list[dict]) -> dict:
        batch = {
            "captions": [it["caption"] for it in items],
            "image_w": torch.stack([it["image_w"] for it in items]),
            "image_l": torch.stack([it["image_l"] for it in items]),
        }
        if "label_w" in items[0]:
            batch["label_w"] = torch.tensor([it["label_w"] for it in items], dtype=torch.float32)
        return batch


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(f"data: {path} line {n} is not JSON: {e}") from None
    return rows


def read_rows(source: str) -> tuple[list, Path | None]:
    """``source`` -> (rows, folder that relative image paths refer to)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise ConfigError(f"data: {source!r} does not exist (a .jsonl/.parquet file, a folder, or 'generate')")
    if path.is_file():
        if path.suffix == ".jsonl":
            return _read_jsonl(path), path.parent
        if path.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ConfigError("data: reading .parquet needs pyarrow: pip install pyarrow") from None
            return pq.read_table(str(path)).to_pylist(), path.parent
        raise ConfigError(f"data: {source!r}: unknown file type {path.suffix!r}; use .jsonl or .parquet")
    for name in ("pairs.jsonl", "metadata.jsonl"):
        if (path / name).is_file():
            return _read_jsonl(path / name), path
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        try:
            import datasets
        except ImportError:
            raise ConfigError(
                f"data: {source!r} is a `datasets.save_to_disk` folder; reading it needs the datasets package: "
                "pip install datasets"
            ) from None
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ConfigError(f"data: {source!r} is a DatasetDict without a 'train' split (splits: {list(ds)})")
            ds = ds["train"]
        for column, feature in ds.features.items():  # keep images encoded until an item is fetched
            if isinstance(feature, datasets.Image):
                ds = ds.cast_column(column, datasets.Image(decode=False))
        return ds, path
    raise ConfigError(
        f"data: folder {source!r} holds neither pairs.jsonl/metadata.jsonl nor a datasets.save_to_disk dataset"
    )


def load_pairs(source: str, size: int, keep_ties: bool = False) -> PreferencePairs:
    rows, root = read_rows(source)
    return PreferencePairs(rows, size, root, where=source, keep_ties=keep_ties)


# ---------------------------------------------------------------------------------------------
# Pairs generated from a reward


def resolve_reward(name):
    """A reward ``score(images [0,1] (B,3,H,W), prompts) -> (B,)``: a callable, a name of
    ``diffplug.evals.get_reward`` or ``package.module:attribute``."""
    if callable(name):
        return name
    if ":" in name:
        import importlib

        module, attr = name.split(":", 1)
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"reward: cannot import {name!r}: {e}") from None
    else:
        try:
            from ..evals import get_reward
        except ImportError:
            raise ConfigError(
                f"reward: diffplug.evals.get_reward is not available to resolve {name!r}; pass module:function"
            ) from None
        try:
            obj = get_reward(name)
        except (KeyError, ValueError, RuntimeError, FileNotFoundError) as e:
            raise ConfigError(f"reward: {e}") from None
    fn = getattr(obj, "score", obj)
    if not callable(fn):
        raise ConfigError(f"reward: {name!r} is neither callable nor has a score(images, prompts) method")
    return fn


def soft_label(score_0: float, score_1: float, margin: float) -> float:
    """PickScore-style label of image 0: 1 or 0, or 0.5 (a tie) when the scores differ by <= ``margin``."""
    if abs(score_0 - score_1) <= margin:
        return 0.5
    return 1.0 if score_0 > score_1 else 0.0


@torch.no_grad()
def generate_pairs(trainer, prompts: list[str], per_prompt: int, reward: str, steps: int, folder: Path,
                   labelled: bool = False, tie_margin: float = 0.1, salt: int = 0) -> None:
    """Sample ``per_prompt`` images per prompt with the initial model, score them with ``reward``;
    write PNGs and ``pairs.jsonl`` into ``folder`` (atomically). Rows: (best, worst) per prompt, or
    with ``labelled`` the disjoint pairs (0, 1), (2, 3), ... in Pick-a-Pic's layout with soft labels
    (``label_0`` 1 / 0 / 0.5, a tie when the scores differ by <= ``tie_margin`` x the s.d. of all
    scores). ``salt`` gives another set of seeds (held-out pairs)."""
    import shutil

    from torchvision.utils import save_image
    from tqdm.auto import tqdm

    from ..guidance.base import CFG
    from ..pipelines import from_pipe

    if per_prompt < 2:
        raise ConfigError(f"num_per_prompt: need at least 2 samples per prompt to form a pair; got {per_prompt}")
    score = resolve_reward(reward)
    cfg, model = trainer.config, trainer.model
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    run = from_pipe(model.pipe, guidance=CFG(cfg.guidance_scale))
    rows, samples = [], []
    chunk = max(1, 32 // per_prompt)  # prompts per sampling call
    bar = tqdm(total=len(prompts), desc=f"pairs ({folder.name})", unit="prompt",
               disable=not trainer.accelerator.is_main_process)
    with model.reference(model.unet), bar:  # the initial model (LoRA adapters off)
        for start in range(0, len(prompts), chunk):
            batch = prompts[start : start + chunk]
            gens = [torch.Generator().manual_seed(((cfg.seed * 7919 + start + i) * 64 + j) * (1 + 2 * salt) + salt)
                    for i in range(len(batch)) for j in range(per_prompt)]
            images = run(
                batch, num_images_per_prompt=per_prompt, num_inference_steps=steps, generator=gens,
                height=trainer.resolution, width=trainer.resolution, output_type="pt",
            ).images.float().cpu()
            all_scores = torch.as_tensor(score(images, [p for p in batch for _ in range(per_prompt)])).float().flatten().cpu()
            bar.update(len(batch))
            if labelled:
                samples += [(start + i, prompt, images[i * per_prompt : (i + 1) * per_prompt],
                             all_scores[i * per_prompt : (i + 1) * per_prompt]) for i, prompt in enumerate(batch)]
                continue
            for i, prompt in enumerate(batch):
                n = start + i
                scores, imgs = all_scores[i * per_prompt : (i + 1) * per_prompt], images[i * per_prompt : (i + 1) * per_prompt]
                best, worst = int(scores.argmax()), int(scores.argmin())
                if scores[best] == scores[worst]:
                    continue
                save_image(imgs[best], str(tmp / f"{n:05d}_w.png"))
                save_image(imgs[worst], str(tmp / f"{n:05d}_l.png"))
                rows.append({"caption": prompt, "image_w": f"{n:05d}_w.png", "image_l": f"{n:05d}_l.png",
                             "score_w": float(scores[best]), "score_l": float(scores[worst])})
    if labelled:
        margin = tie_margin * float(torch.cat([sc for *_, sc in samples]).std()) if samples else 0.0
        for n, prompt, imgs, scores in samples:
            for j in range(0, per_prompt - 1, 2):
                names = [f"{n:05d}_{j + k}.png" for k in (0, 1)]
                for k in (0, 1):
                    save_image(imgs[j + k], str(tmp / names[k]))
                rows.append({"caption": prompt, "jpg_0": names[0], "jpg_1": names[1],
                             "label_0": soft_label(float(scores[j]), float(scores[j + 1]), margin),
                             "score_0": float(scores[j]), "score_1": float(scores[j + 1])})
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.rename(folder)


PROMPT_FILE_SUFFIXES = (".txt", ".json")


def read_prompts(spec, key: str = "prompts") -> list[str]:
    """A list of prompts, or a path to a .txt (one per line) / .json (a list) file. A single entry
    that names a .txt/.json file must exist: a mistyped path is an error, never trained as a prompt."""
    if isinstance(spec, (list, tuple)):
        if len(spec) == 1 and Path(str(spec[0])).suffix in PROMPT_FILE_SUFFIXES:
            spec = spec[0]
        else:
            return [str(p) for p in spec]
    path = Path(str(spec)).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}: file {str(spec)!r} does not exist; pass an existing .txt (one prompt a line) or "
                          ".json (a list) file, or the prompts themselves (comma-separated or a YAML list)")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{key}: {path} is not valid JSON ({e}); it must hold a list of strings") from None
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            raise ConfigError(f"{key}: {path} must hold a JSON list of strings")
        return list(data)
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]
