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
    generate_repeats: int = opt(8, "rounds over the prompts for data=generate (pairs = rounds x prompts); 0 = enough "
                                "rounds for at least 80 pairs")
    generate_steps: int = opt(20, "denoising steps for data=generate")

    def validate(self) -> None:
        super().validate()
        if not self.data:
            raise ConfigError("data: required; a .jsonl/.parquet file, a folder, or 'generate'")
        for key in ("num_per_prompt", "generate_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1; got {getattr(self, key)}")
        if self.generate_repeats < 0:
            raise ConfigError(f"generate_repeats: must be >= 0 (0 = enough rounds for 80 pairs); got {self.generate_repeats}")


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
        prompts = read_prompts(cfg.prompts)
        rounds = generate_rounds(cfg, len(prompts)) if repeats is None else repeats
        why = (f" ({rounds} rounds over {len(prompts)} prompts: generate_repeats 0 = at least {AUTO_GENERATED_PAIRS} pairs)"
               if repeats is None and not cfg.generate_repeats else "")
        prompts = prompts * rounds
        trainer._print(f"generating preference pairs ({name}): {len(prompts)} prompts x {cfg.num_per_prompt} samples{why}")
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


def pair_work(per_prompt: int, steps: int) -> float:
    """Denoiser image-evaluations of one prompt's samples (CFG: two per step) -- the ETA's unit."""
    return per_prompt * steps * 2


@torch.no_grad()
def generate_pairs(trainer, prompts: list[str], per_prompt: int, reward: str, steps: int, folder: Path,
                   labelled: bool = False, tie_margin: float = 0.1, salt: int = 0) -> None:
    """Sample ``per_prompt`` images per prompt with the initial model, score them with ``reward``;
    write PNGs and ``pairs.jsonl`` into ``folder`` (atomically). Rows: (best, worst) per prompt, or
    with ``labelled`` the disjoint pairs (0, 1), (2, 3), ... in Pick-a-Pic's layout with soft labels
    (``label_0`` 1 / 0 / 0.5, a tie when the scores differ by <= ``tie_margin`` x the s.d. of all
    scores). ``salt`` gives another set of seeds (held-out pairs).

    Work in progress lives in ``folder.tmp``: each finished batch of prompts is recorded in its
    ``progress.jsonl`` (after its PNGs), so an interrupted run (Ctrl-C) resumed with the same settings
    generates only the rest -- every sample's seed depends on its prompt's index alone. The run's
    ``trainer.clock`` (if any) times it as the phase ``folder.name``."""
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
    progress = tmp / "progress.jsonl"
    settings = {"prompts": prompts, "per_prompt": per_prompt, "reward": str(reward), "steps": steps, "labelled": labelled,
                "salt": salt, "seed": cfg.seed, "model": str(cfg.model), "resolution": trainer.resolution,
                "guidance_scale": cfg.guidance_scale}
    finished = _finished_chunks(progress, settings)
    if not finished:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        progress.write_text(json.dumps(settings) + "\n")
    run = from_pipe(model.pipe, guidance=CFG(cfg.guidance_scale))
    chunk = max(1, 32 // per_prompt)  # prompts per sampling call
    done = sum(len(c["scores"]) for c in finished.values())
    clock = getattr(trainer, "clock", None)
    if clock is not None:
        clock.plan(folder.name, len(prompts), pair_work(per_prompt, steps), "prompts")
        clock.phases[folder.name].done = done  # already made: no time of this run
        clock.start(folder.name)
    if done:
        trainer._print(f"pairs ({folder.name}): {done} of {len(prompts)} prompts already generated in {tmp}; generating the rest")
    bar = tqdm(total=len(prompts), initial=done, desc=f"pairs ({folder.name})", unit="prompt",
               disable=not trainer.accelerator.is_main_process)
    try:
        with model.reference(model.unet), bar:  # the initial model (LoRA adapters off)
            for start in range(0, len(prompts), chunk):
                if start in finished:
                    continue
                batch = prompts[start : start + chunk]
                gens = [torch.Generator().manual_seed(((cfg.seed * 7919 + start + i) * 64 + j) * (1 + 2 * salt) + salt)
                        for i in range(len(batch)) for j in range(per_prompt)]
                images = run(
                    batch, num_images_per_prompt=per_prompt, num_inference_steps=steps, generator=gens,
                    height=trainer.resolution, width=trainer.resolution, output_type="pt",
                ).images.float().cpu()
                scores = torch.as_tensor(score(images, [p for p in batch for _ in range(per_prompt)])).float().flatten().cpu()
                for k, image in enumerate(images):  # every sample, named by its prompt's index
                    save_image(image, str(tmp / f"{start + k // per_prompt:05d}_{k % per_prompt}.png"))
                with progress.open("a") as f:
                    f.write(json.dumps({"start": start, "scores": scores.view(len(batch), per_prompt).tolist()}) + "\n")
                finished[start] = {"start": start, "scores": scores.view(len(batch), per_prompt).tolist()}
                bar.update(len(batch))
                if clock is not None:
                    first = not any(p.seconds for p in clock.phases.values())  # nothing timed yet in this process
                    clock.advance(folder.name, len(batch))
                    bar.set_postfix(run_eta=clock.short())
                    if first:
                        trainer._print(clock.describe())
    except KeyboardInterrupt:
        from .trainer import Interrupted

        made = sum(len(c["scores"]) for c in finished.values())
        raise Interrupted(f"interrupted while generating pairs ({folder.name}): the {made} of {len(prompts)} prompts "
                          f"done are kept in {tmp}; resumed with the same settings, only the rest is generated") from None
    rows = _pair_rows(prompts, finished, per_prompt, labelled, tie_margin, tmp)
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    progress.unlink()
    tmp.rename(folder)


def _finished_chunks(progress: Path, settings: dict) -> dict:
    """``{start: {"start", "scores"}}`` of an earlier, interrupted generation with the same settings; {} else."""
    if not progress.is_file():
        return {}
    lines = progress.read_text().splitlines()
    try:
        if not lines or json.loads(lines[0]) != json.loads(json.dumps(settings)):
            return {}
    except json.JSONDecodeError:
        return {}
    out = {}
    for line in lines[1:]:
        try:
            c = json.loads(line)
            out[int(c["start"])] = c
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):  # a line cut short by a kill
            break
    return out


def _pair_rows(prompts, finished: dict, per_prompt: int, labelled: bool, tie_margin: float, folder: Path) -> list[dict]:
    """``pairs.jsonl`` rows from every prompt's scores (unused PNGs removed)."""
    scores = {c["start"] + i: s for c in finished.values() for i, s in enumerate(c["scores"])}
    rows, keep = [], set()
    margin = tie_margin * float(torch.tensor([v for s in scores.values() for v in s]).std()) if labelled and scores else 0.0
    for n in sorted(scores):
        s, prompt = scores[n], prompts[n]
        if labelled:
            for j in range(0, per_prompt - 1, 2):
                names = [f"{n:05d}_{j + k}.png" for k in (0, 1)]
                keep.update(names)
                rows.append({"caption": prompt, "jpg_0": names[0], "jpg_1": names[1],
                             "label_0": soft_label(s[j], s[j + 1], margin), "score_0": s[j], "score_1": s[j + 1]})
            continue
        best, worst = max(range(per_prompt), key=s.__getitem__), min(range(per_prompt), key=s.__getitem__)
        if s[best] == s[worst]:
            continue
        names = [f"{n:05d}_{best}.png", f"{n:05d}_{worst}.png"]
        keep.update(names)
        rows.append({"caption": prompt, "image_w": names[0], "image_l": names[1], "score_w": s[best], "score_l": s[worst]})
    for png in folder.glob("*.png"):
        if png.name not in keep:
            png.unlink()
    return rows


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


# ---------------------------------------------------------------------------------------------
# Runs over a fixed set of pairs: a held-out split, steps from the data, early stopping

#: the pairs ``generate_repeats 0`` generates at least (the number the ``dpo --preset lora`` sweep used)
AUTO_GENERATED_PAIRS = 80
#: stream positions of the scoring draws (``trainer.generators``): far past any training position
SCORING_POSITION = 1 << 40


def generate_rounds(cfg: PairDataConfig, num_prompts: int) -> int:
    """``generate_repeats``, or for 0 the rounds over the prompts that give >= AUTO_GENERATED_PAIRS pairs."""
    return cfg.generate_repeats or -(-AUTO_GENERATED_PAIRS // max(1, num_prompts))


def held_out_count(n: int, fraction: float, min_pairs: int, max_pairs: int = 10**9) -> int:
    """Pairs to hold out of ``n``: ``min(max_pairs, max(min_pairs, round(fraction n)))``, or 0 (no split) when
    ``fraction`` is 0 or that would leave fewer training pairs than held-out ones."""
    if fraction <= 0:
        return 0
    k = min(max_pairs, max(min_pairs, round(fraction * n)))
    return k if n - k >= k else 0


def split_pairs(n: int, fraction: float, min_pairs: int, seed: int, max_pairs: int = 10**9) -> tuple[list[int], list[int]]:
    """``(train, held_out)``: disjoint sorted indices covering ``range(n)``, a function of ``seed`` alone."""
    k = held_out_count(n, fraction, min_pairs, max_pairs)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + 104729)).tolist()
    return sorted(perm[k:]), sorted(perm[:k])


def derive_steps(cfg, train_pairs: int, pairs_per_step: int) -> tuple[int, str]:
    """``max_steps`` 0 -> ``min(max_auto_steps, ceil(epochs x train_pairs / pairs_per_step))`` and the reason, in words."""
    import math

    raw = max(1, math.ceil(cfg.epochs * train_pairs / pairs_per_step))
    steps = min(raw, cfg.max_auto_steps)
    why = (f"{cfg.epochs:g} epochs x {train_pairs} training pairs / {pairs_per_step} pairs per step (train_batch_size x "
           f"processes x gradient_accumulation_steps) = {raw}" + (f", capped at max_auto_steps {cfg.max_auto_steps}"
                                                                   if raw > steps else ""))
    return steps, why


def scoring_key(step: int, record: dict, metric: str, initial_trained: bool = False) -> tuple:
    """Order of held-out scorings, smaller = better: ``(-heldout_acc, heldout_loss)`` (the initial model, which
    prefers neither image, counts as chance: 0.5) or ``(heldout_loss,)`` for ``metric`` "loss"."""
    if metric == "loss":
        return (record["heldout_loss"],)
    acc = 0.5 if step == 0 and not initial_trained else record["heldout_acc"]
    return (-acc, record["heldout_loss"])


def best_scoring(history: list[dict], metric: str) -> dict:
    """The record of logs.jsonl's held-out scorings whose weights early stopping keeps (the first of equals)."""
    return min(history, key=lambda r: scoring_key(r["step"], r, metric))


class HeldOutMonitor:
    """Scores the model on held-out pairs (and as many training pairs) every ``every`` steps with the method's
    own loss, from fixed draws; keeps the weights of the best held-out scoring; says when to stop.

    The loss is ``method.loss(trainer, batch)``; ``accuracy`` names its log of per-pair accuracy (DPO:
    ``implicit_acc``, the fraction of pairs whose winner the model prefers more than the reference does).
    "Best" (``heldout_metric``): the highest held-out accuracy, ties broken by the lower loss, or the lowest
    loss. Step 0 (the initial model, which prefers neither image: accuracy counted as chance, 0.5) is scored
    first and counts as a candidate: if no step beats it, the final weights are the initial ones, and the
    log says so."""

    def __init__(self, method, trainer, dataset, held: list[int], probe: list[int], collate, every: int,
                 accuracy: str = "implicit_acc"):
        cfg = trainer.config
        self.method, self.cfg, self.every, self.accuracy, self.collate = method, cfg, every, accuracy, collate
        self.sets = {"heldout": self._rows(dataset, held), "train": self._rows(dataset, probe)}
        self.num_held = len(held)
        self.best = None  # {"step", "loss", "acc", "train_acc"}
        self.best_weights: list[torch.Tensor] = []
        self.bad, self.warned, self.stopped_at, self.history = 0, False, 0, []

    def _rows(self, dataset, indices: list[int]) -> list[tuple[dict, int]]:
        """(item, stream position) per (pair, draw): the same draws at every scoring."""
        draws = self.cfg.heldout_draws
        return [(item, SCORING_POSITION + i * draws + d) for i in indices for item in [dataset[i]] for d in range(draws)]

    @torch.no_grad()
    def score(self, trainer) -> dict:
        """Mean loss and accuracy over each set's (pair, draw) rows; every process gets the same numbers."""
        unet, out = trainer.unet, {}
        was_training = unet.training
        unet.eval()
        size = self.cfg.train_batch_size
        for name, rows in self.sets.items():
            loss = acc = 0.0
            for start in range(0, len(rows), size):
                part = rows[start:start + size]
                batch = self.collate([item for item, _ in part])
                batch["positions"] = torch.tensor([p for _, p in part], dtype=torch.long)
                with trainer.accelerator.autocast():
                    value, logs = self.method.loss(trainer, batch)
                loss += float(value) * len(part)
                acc += float(logs[self.accuracy]) * len(part)
            out[f"{name}_loss"], out[f"{name}_acc"] = loss / len(rows), acc / len(rows)
        unet.train(was_training)
        acc_ = trainer.accelerator
        if acc_.num_processes > 1:  # one decision on every process
            values = acc_.reduce(torch.tensor(list(out.values()), device=trainer.device, dtype=torch.float64), "mean")
            out = dict(zip(out, values.tolist()))
        return out

    def _snapshot(self, trainer) -> list[torch.Tensor]:
        tensors = [p.detach().cpu().clone() for p in trainer.params]
        if trainer.ema is not None:
            tensors += [s.detach().cpu().clone() for s in trainer.ema.shadow]
        return tensors

    def _log(self, trainer, record: dict) -> None:
        if trainer.is_main:
            trainer.jsonl.write(json.dumps(record) + "\n")
            trainer.jsonl.flush()
            if trainer.tb is not None:
                for k, v in record.items():
                    if k != "step":
                        trainer.tb.add_scalar(k, v, record["step"])

    def check(self, trainer, step: int) -> bool:
        """Score at ``step`` (0 = before training); True when the run should stop."""
        s = self.score(trainer)
        record = {"step": step, **{k: round(v, 6) for k, v in s.items()}}
        self.history.append(record)
        self._log(trainer, record)
        if self.best is None or self._key(step, s) < self._key(self.best["step"], self.best):
            self.best = {"step": step, "loss": s["heldout_loss"], "acc": s["heldout_acc"], "train_acc": s["train_acc"],
                         "heldout_loss": s["heldout_loss"], "heldout_acc": s["heldout_acc"]}
            self.best_weights, self.bad = self._snapshot(trainer), 0
        else:
            self.bad += 1
        gap = s["train_acc"] - s["heldout_acc"]
        if step and gap >= self.cfg.overfit_gap and not self.warned:
            self.warned = True
            trainer._print(
                f"WARNING: OVER-FITTING the training pairs at step {step}: implicit accuracy {s['train_acc']:.2f} on training "
                f"pairs vs {s['heldout_acc']:.2f} on the {self.num_held} held-out pairs (gap >= overfit_gap "
                f"{self.cfg.overfit_gap:g}); held-out loss {s['heldout_loss']:.4f}; the best held-out scoring so far is step "
                f"{self.best['step']}'s. More pairs (--generate_repeats), fewer steps or a lower --learning_rate help"
                + ("; early stopping keeps the best held-out weights" if self.cfg.early_stopping else ""))
        if self.cfg.early_stopping and self.bad >= self.cfg.patience and step < self.cfg.max_steps:
            self.stopped_at = step
            trainer._print(f"early stopping at step {step} of {self.cfg.max_steps}: {self.bad} scorings without a better "
                           f"held-out {self.cfg.heldout_metric} than step {self.best['step']}'s (accuracy "
                           f"{self.best['acc']:.2f}, loss {self.best['loss']:.4f}; patience {self.cfg.patience})")
            return True
        return False

    def _key(self, step: int, s: dict) -> tuple:
        return scoring_key(step, s, self.cfg.heldout_metric, self.initial_trained)

    initial_trained = False  # True for a method whose step-0 model already prefers (its accuracy then counts as is)

    def after_step(self, trainer, step: int) -> bool:
        if step % self.every and step != self.cfg.max_steps:
            return False
        return self.check(trainer, step)

    @torch.no_grad()
    def finish(self, trainer) -> None:
        """Put the best scored weights back (early_stopping) and say what the final weights are."""
        if self.best is None:
            return
        last = self.history[-1]
        if self.cfg.early_stopping and self.best["step"] != last["step"]:
            n = len(trainer.params)
            for p, v in zip(trainer.params, self.best_weights[:n]):
                p.copy_(v.to(p.device, p.dtype))
            if trainer.ema is not None:
                for s, v in zip(trainer.ema.shadow, self.best_weights[n:]):
                    s.copy_(v.to(s.device, s.dtype))
            kept = f"kept the weights of step {self.best['step']}"
        else:
            kept = f"kept the weights of the last step, {last['step']}"
        trainer._print(f"held-out pairs: {kept} (held-out loss {self.best['loss']:.4f}, implicit accuracy "
                       f"{self.best['acc']:.2f}; the last scoring, step {last['step']}: {last['heldout_loss']:.4f}, "
                       f"{last['heldout_acc']:.2f}, on training pairs {last['train_acc']:.2f})")
        if self.best["step"] == 0 and self.cfg.early_stopping:
            trainer._print("WARNING: no step scored better on the held-out pairs than the initial model: the final weights "
                           "ARE the initial model's. Training did not generalise to unseen pairs; more pairs, another "
                           "--learning_rate or a reward with more spread between the pairs may")

    # -- resumable state: safetensors + JSON through finetune/state.py ------------------------------
    def state(self) -> dict:
        return {"best": self.best, "bad": self.bad, "warned": self.warned, "stopped_at": self.stopped_at,
                "history": self.history, "best_weights": list(self.best_weights)}

    def restore(self, state: dict, trainer) -> None:
        weights = list(state["best_weights"])
        live = list(trainer.params) + (list(trainer.ema.shadow) if trainer.ema is not None else [])
        if [tuple(w.shape) for w in weights] != [tuple(p.shape) for p in live]:
            raise ValueError(f"heldout: {len(weights)} best-weight tensors do not match the run's {len(live)} trained tensors")
        self.best, self.bad, self.warned = state["best"], int(state["bad"]), bool(state["warned"])
        self.stopped_at, self.history, self.best_weights = int(state["stopped_at"]), list(state["history"]), weights


class HeldOutPairs:
    """Mix-in for a :class:`~.trainer.Method` trained on a fixed set of pairs (config: a
    :class:`~.config.PairRunConfig`): ``setup`` calls :meth:`hold_out` on its dataset; the trainer's
    ``after_step`` / ``finish`` hooks and the checkpoint's run state go through the :class:`HeldOutMonitor`."""

    monitor: HeldOutMonitor | None = None
    accuracy_log = "implicit_acc"
    # the monitor's state changes after an update (after_step), or at step 0 before anything trained: a step
    # abandoned half-way can be saved (trainer.Method.steps_change_run_state); a subclass with state of its own says so
    steps_change_run_state = False

    def hold_out(self, trainer, dataset, collate):
        """The training part of ``dataset``; sets ``max_steps`` (when 0) and the warm-up (``warmup_fraction``)
        and says in the log what was chosen and why."""
        cfg = trainer.config
        n = len(dataset)
        train, held = split_pairs(n, cfg.heldout_fraction, cfg.heldout_min_pairs, cfg.seed, cfg.heldout_max_pairs)
        if held:
            trainer._print(f"pairs: {len(train)} for training, {len(held)} held out (heldout_fraction {cfg.heldout_fraction:g} "
                           f"of {n}, at least heldout_min_pairs {cfg.heldout_min_pairs}, at most heldout_max_pairs "
                           f"{cfg.heldout_max_pairs}; drawn from --seed {cfg.seed})")
        elif cfg.heldout_fraction > 0:
            trainer._print(f"WARNING: only {n} pairs, fewer than 2 x heldout_min_pairs ({2 * cfg.heldout_min_pairs}): "
                           "nothing is held out, so over-fitting goes unchecked and unstopped; add pairs "
                           "(--generate_repeats) or pass --heldout_fraction 0 to train on all of them knowingly")
        per_step = cfg.train_batch_size * trainer.accelerator.num_processes * cfg.gradient_accumulation_steps
        if cfg.max_steps == 0:
            cfg.max_steps, why = derive_steps(cfg, len(train), per_step)
            trainer._print(f"max_steps {cfg.max_steps}: {why} (--max_steps N sets it)")
        if cfg.warmup_fraction:
            cfg.lr_warmup_steps, fraction, cfg.warmup_fraction = int(cfg.warmup_fraction * cfg.max_steps), cfg.warmup_fraction, 0.0
            trainer._print(f"lr_warmup_steps {cfg.lr_warmup_steps}: warmup_fraction {fraction:g} of {cfg.max_steps} steps")
        self.monitor = None
        if held:
            every = cfg.heldout_every or max(1, round(cfg.max_steps / 10))
            g = torch.Generator().manual_seed(cfg.seed * 7919 + 1)
            probe = sorted(train[i] for i in torch.randperm(len(train), generator=g)[: len(held)].tolist())
            self.monitor = HeldOutMonitor(self, trainer, dataset, held, probe, collate, every, self.accuracy_log)
            trainer._print(f"held-out scoring every {every} steps: loss and {self.accuracy_log} on the {len(held)} held-out "
                           f"pairs and on {len(probe)} training pairs, {cfg.heldout_draws} fixed draws each; "
                           + (f"early stopping after {cfg.patience} scorings without a better held-out {cfg.heldout_metric}, "
                              "best weights kept"
                              if cfg.early_stopping else "early_stopping off: the last weights are kept"))
        return torch.utils.data.Subset(dataset, train) if held else dataset

    def prepare(self, trainer, batch):
        if self.monitor is not None and self.monitor.best is None:  # step 0: the initial model, before any update
            self.monitor.check(trainer, trainer.step)
        return super().prepare(trainer, batch)

    def after_step(self, trainer, step: int) -> bool:
        return self.monitor.after_step(trainer, step) if self.monitor is not None else False

    def finish(self, trainer) -> None:
        if self.monitor is not None:
            self.monitor.finish(trainer)

    def save_run_state(self, trainer, folder: Path) -> None:
        super().save_run_state(trainer, folder)
        if self.monitor is not None and trainer.is_main:
            from .state import save_tree

            save_tree(Path(folder), "heldout", self.monitor.state())

    def restore_run_state(self, trainer, folder: Path) -> None:
        super().restore_run_state(trainer, folder)
        if self.monitor is not None:
            from .state import load_tree, reading

            state = load_tree(Path(folder), "heldout")
            with reading(Path(folder) / "heldout.json"):
                self.monitor.restore(state, trainer)
