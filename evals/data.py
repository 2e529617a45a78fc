"""Image sources for the evals: PNG/JPEG folders (decoded in parallel by a DataLoader) and
Fashion-MNIST (the testbed's data: 28x28 gray zero-padded to 32x32, repeated to RGB)."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
GRID = "grid.png"  # the contact sheet `diffplug sample` writes next to its images: never a sample
BAD_IMAGES = ("skip", "error")

# modes whose values are not 0..255: full-scale value per mode (PIL's own convert() clips these)
_FULL_SCALE = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 255}
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


def to_rgb_uint8(im) -> np.ndarray:
    """A PIL image of any mode -> uint8 ``(H, W, 3)`` RGB over its full range.

    16-bit gray (``I;16*``, and ``I`` as PNG decodes it) is scaled from 0..65535, ``F`` from
    0..255 (PIL's convention); values outside that range are an error, not clipped. Transparent
    pixels (alpha band or ``transparency`` key) are composited on white, in float, the way the
    testbed composites its emoji. Other modes (1, L, P, RGB, CMYK, YCbCr, ...) go through PIL."""
    alpha = None
    if im.mode in _FULL_SCALE:
        raw = np.asarray(im)
        x, top = raw.astype(np.float64), _FULL_SCALE[im.mode]
        if x.size and (x.min() < 0 or x.max() > top):
            raise ValueError(f"mode {im.mode} values span {x.min():g}..{x.max():g}, outside 0..{top}")
        rgb = np.repeat(x[..., None] / top, 3, axis=-1)
        if isinstance(im.info.get("transparency"), int):
            alpha = (raw != im.info["transparency"])[..., None].astype(np.float64)
    elif im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = np.asarray((im.convert("LA") if im.mode == "La" else im).convert("RGBA"), np.float64) / 255
        rgb, alpha = rgba[..., :3], rgba[..., 3:]
    else:
        return np.asarray(im.convert("RGB")).copy()
    if alpha is not None:
        rgb = rgb * alpha + (1.0 - alpha)
    return np.round(rgb * 255).astype(np.uint8)


def load_image(path) -> torch.Tensor:
    """uint8 ``(3, H, W)`` RGB of one image file (see :func:`to_rgb_uint8`)."""
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(to_rgb_uint8(im)).permute(2, 0, 1).contiguous()


def sample_manifest(folder: str | os.PathLike) -> list[dict] | None:
    """The per-image list ``[{"file", "prompt"}, ...]`` that ``diffplug sample`` writes into
    ``settings.json``, or None when the folder has none."""
    from ..checked import UserFileError, read_json

    f = Path(folder) / "settings.json"
    if not f.is_file():
        return None
    what = "the settings.json of a `diffplug sample` folder (or any JSON file)"
    fix = "restore it from the sample run, or remove it to score every image in the folder"
    try:  # a damaged file is named, not read as "no list of images" (which would drop the prompts)
        doc = read_json(f, what=what, kind=None)
    except UserFileError as e:
        raise UserFileError(f, e.problem, what=what, fix=fix) from None
    images = doc.get("images") if isinstance(doc, dict) else None
    if images is None:
        return None
    if not (isinstance(images, list) and all(isinstance(e, dict) and isinstance(e.get("file"), str) for e in images)):
        raise UserFileError(f, '"images" is not a list of {"file": ..., "prompt": ...} entries', what=what, fix=fix)
    return images


def select_images(folder: str | os.PathLike) -> tuple[list[Path], list[dict]]:
    """(images to score under ``folder``, recursive and sorted; ``[{"file", "reason"}]`` left out).

    A folder that ``diffplug sample`` wrote (its settings.json lists the images) gives exactly the
    listed files; anywhere else every image except one named grid.png."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a directory of images")
    files, left_out, manifests = [], [], {}
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() not in IMAGE_EXTS or not p.is_file():
            continue
        if p.parent not in manifests:
            m = sample_manifest(p.parent)
            manifests[p.parent] = None if m is None else {e["file"] for e in m}
            for name in sorted((manifests[p.parent] or set()) - {q.name for q in p.parent.iterdir()}):
                left_out.append({"file": str(p.parent / name), "reason": "listed in settings.json but missing"})
        listed = manifests[p.parent]
        if listed is not None and p.name not in listed:
            left_out.append({"file": str(p), "reason": "not in settings.json's image list (diffplug sample)"})
        elif listed is None and p.name == GRID:
            left_out.append({"file": str(p), "reason": "grid.png: diffplug sample's contact sheet, not a sample"})
        else:
            files.append(p)
    if not files:
        raise FileNotFoundError(f"{folder}: no images ({', '.join(IMAGE_EXTS)}) found")
    return files, left_out


def list_images(folder: str | os.PathLike) -> list[Path]:
    return select_images(folder)[0]


def prompt_map(folder: str | os.PathLike, prompts_file: str | os.PathLike | None = None) -> dict[Path, str]:
    """Resolved image path -> prompt, from every settings.json ``diffplug sample`` wrote under
    ``folder``, then ``prompts_file`` (JSONL, one ``{"file", "prompt"}`` per line, ``file`` relative
    to ``folder`` or absolute), which wins where both name a file."""
    folder = Path(folder)
    out = {}
    for settings in sorted(folder.rglob("settings.json")):
        for e in sample_manifest(settings.parent) or []:
            if isinstance(e.get("prompt"), str):
                out[(settings.parent / e["file"]).resolve()] = e["prompt"]
    if prompts_file is None:
        return out
    pf = Path(prompts_file)
    if not pf.is_file():
        raise FileNotFoundError(f"--prompts {pf}: no such file (JSONL of {{\"file\": ..., \"prompt\": ...}})")
    for n, line in enumerate(pf.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"--prompts {pf}:{n}: not JSON ({err}); each line is {{\"file\": ..., \"prompt\": ...}}") from err
        if not (isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("prompt"), str)):
            raise ValueError(f"--prompts {pf}:{n}: each line needs string keys \"file\" and \"prompt\", got {line[:80]!r}")
        path = (folder / e["file"]).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"--prompts {pf}:{n}: {e['file']!r} is not a file under {folder}")
        out[path] = e["prompt"]
    return out


def folder_fingerprint(folder: str | os.PathLike) -> str:
    """Cheap identity of a folder's content: names, sizes and mtimes of its images."""
    h = hashlib.sha1()
    for p in list_images(folder):
        st = p.stat()
        h.update(f"{p.relative_to(folder)}|{st.st_size}|{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:16]


class ImageFolder(Dataset):
    """uint8 ``(3, H, W)`` RGB tensors from an image folder (recursive, sorted; see
    :func:`select_images`). A file that does not decode raises ValueError naming it; with
    ``tagged=True`` (the loaders') item i is ``(i, tensor)`` or ``(i, (file, reason))`` instead."""

    def __init__(self, folder, limit: int | None = None, shard: tuple[int, int] = (0, 1), tagged: bool = False):
        files, self.left_out = select_images(folder)
        self.files = files[:limit][shard[0]::shard[1]]
        self.tagged = tagged

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            x = load_image(self.files[i])
        except Exception as e:  # noqa: BLE001  (PIL raises OSError, SyntaxError, ValueError, ...)
            if not self.tagged:
                raise ValueError(f"{self.files[i]}: cannot decode ({type(e).__name__}: {e})") from e
            return i, (str(self.files[i]), f"{type(e).__name__}: {e}")
        return (i, x) if self.tagged else x


def fashion_mnist(split: str = "test", limit: int | None = None) -> torch.Tensor:
    """Fashion-MNIST as uint8 ``(N, 3, 32, 32)``: zero-padded by 2 pixels, gray repeated to RGB, read
    by the testbed's loader (``diffplug.testbed.data``: one reader, one install hint when missing)."""
    if split not in ("test", "train"):
        raise ValueError(f"split={split!r}: use 'test' or 'train'")
    from diffplug.testbed.data import fashion_mnist as load

    return load(split).images[:limit]


def _collate(items):
    """Tagged folder items -> ``{"groups": [(indices, uint8 stack)] one per image size, "bad": [(file, reason)]}``."""
    groups: dict = {}
    bad = []
    for i, x in items:
        if isinstance(x, torch.Tensor):
            groups.setdefault(tuple(x.shape), []).append((i, x))
        else:
            bad.append(x)
    return {"groups": [([i for i, _ in g], torch.stack([x for _, x in g])) for g in groups.values()], "bad": bad}


def image_loader(source: str, batch_size: int = 64, num_workers: int | None = None,
                 limit: int | None = None, shard: tuple[int, int] = (0, 1)) -> tuple[DataLoader, str]:
    """DataLoader over ``source`` (a folder or ``fashion-mnist:test|train``) and its cache identity.

    ``shard=(rank, world)`` keeps every world-th image from the rank-th (multi-process runs); the
    identity always names the whole source. Read it with :func:`iterate_batches`."""
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)
    if source.startswith("testbed:"):  # any testbed dataset: testbed:emoji:test, testbed:fashion_mnist:train
        try:
            _, name, split = source.split(":")
            from diffplug.testbed import data as tbdata
            images = getattr(tbdata, name.replace("-", "_"))(split).images[:limit]
        except (ValueError, AttributeError, ImportError) as e:
            raise ValueError(f"reference {source!r}: use testbed:<dataset>:<split>, e.g. testbed:emoji:test "
                             f"({e})") from e
        ds = TensorDataset(images[shard[0]::shard[1]])
        loader = DataLoader(ds, batch_size=batch_size, collate_fn=lambda b: torch.stack([t[0] for t in b]))
        return loader, f"testbed-{name}-{split}" + (f"-first{limit}" if limit else "")
    if source.startswith("fashion-mnist:"):
        split = source.split(":", 1)[1]
        ds = TensorDataset(fashion_mnist(split, limit)[shard[0]::shard[1]])
        loader = DataLoader(ds, batch_size=batch_size, collate_fn=lambda b: torch.stack([t[0] for t in b]))
        return loader, f"fashion-mnist-{split}-pad32-rgb" + (f"-first{limit}" if limit else "")
    ds = ImageFolder(source, limit, shard, tagged=True)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                        pin_memory=torch.cuda.is_available(), persistent_workers=False,
                        prefetch_factor=4 if num_workers > 0 else None)
    ident = f"folder-{Path(source).resolve().name}-{folder_fingerprint(source)}" + (f"-first{limit}" if limit else "")
    return loader, ident


def iterate_batches(loader, bad_images: str = "skip", skipped: list | None = None, with_index: bool = False):
    """Yield uint8 ``(N, 3, H, W)`` batches of one size each (``(batch, dataset indices)`` with
    ``with_index``; indices are None for tensor datasets).

    A file that does not decode is skipped with a warning and appended to ``skipped`` as
    ``{"file", "reason"}`` (``bad_images="skip"``), or raises ValueError naming it (``"error"``)."""
    if bad_images not in BAD_IMAGES:
        raise ValueError(f"bad_images={bad_images!r}: use one of {BAD_IMAGES}")
    for b in loader:
        if isinstance(b, torch.Tensor):
            yield (b, None) if with_index else b
            continue
        for file, reason in b["bad"]:
            if bad_images == "error":
                raise ValueError(f"{file}: cannot decode ({reason}); fix or remove it, or skip such files "
                                 "(--bad-images skip)")
            warnings.warn(f"skipping {file}: cannot decode ({reason})")
            if skipped is not None:
                skipped.append({"file": file, "reason": reason})
        for idx, x in b["groups"]:
            yield (x, idx) if with_index else x


def dist_info() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a (N_r, ...) tensor from every rank, rank by rank (uneven N_r allowed)."""
    if dist_info()[1] == 1:
        return x
    from torchmetrics.utilities.distributed import gather_all_tensors

    return torch.cat(gather_all_tensors(x.contiguous()))


def gather_json(items: list, device=None) -> list:
    """Concatenate a JSON-able list from every rank, rank by rank (sent as UTF-8 bytes, no pickle)."""
    if dist_info()[1] == 1:
        return items
    data = torch.tensor(list((json.dumps(items) + "\n").encode()), dtype=torch.uint8, device=device)
    text = bytes(gather_rows(data).cpu().tolist()).decode()
    return [x for line in text.splitlines() for x in json.loads(line)]
