"""Image sources for the evals: PNG/JPEG folders (decoded in parallel by a DataLoader) and
Fashion-MNIST (the testbed's data: 28x28 gray zero-padded to 32x32, repeated to RGB)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a directory of images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise FileNotFoundError(f"{folder}: no images ({', '.join(IMAGE_EXTS)}) found")
    return files


def folder_fingerprint(folder: str | os.PathLike) -> str:
    """Cheap identity of a folder's content: names, sizes and mtimes of its images."""
    h = hashlib.sha1()
    for p in list_images(folder):
        st = p.stat()
        h.update(f"{p.relative_to(folder)}|{st.st_size}|{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:16]


class ImageFolder(Dataset):
    """uint8 ``(3, H, W)`` RGB tensors from an image folder (recursive, sorted)."""

    def __init__(self, folder, limit: int | None = None, shard: tuple[int, int] = (0, 1)):
        self.files = list_images(folder)[:limit][shard[0]::shard[1]]

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.files[i]) as im:
            if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                # transparent pixels are composited on white, as the testbed does for its emoji
                rgba = im.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, rgba)
            a = np.asarray(im.convert("RGB"))
        return torch.from_numpy(a.copy()).permute(2, 0, 1)


def fashion_mnist(split: str = "test", limit: int | None = None) -> torch.Tensor:
    """Fashion-MNIST as uint8 ``(N, 3, 32, 32)``: zero-padded by 2 pixels, gray repeated to RGB, read
    by the testbed's loader (``diffplug.testbed.data``: one reader, one install hint when missing)."""
    if split not in ("test", "train"):
        raise ValueError(f"split={split!r}: use 'test' or 'train'")
    from diffplug.testbed.data import fashion_mnist as load

    return load(split).images[:limit]


def _collate(batch):
    if all(b.shape == batch[0].shape for b in batch):
        return torch.stack(batch)
    return list(batch)  # mixed sizes: the consumer featurises each size group separately


def image_loader(source: str, batch_size: int = 64, num_workers: int | None = None,
                 limit: int | None = None, shard: tuple[int, int] = (0, 1)) -> tuple[DataLoader, str]:
    """DataLoader over ``source`` (a folder or ``fashion-mnist:test|train``) and its cache identity.

    ``shard=(rank, world)`` keeps every world-th image from the rank-th (multi-process runs); the
    identity always names the whole source."""
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
    ds = ImageFolder(source, limit, shard)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                        pin_memory=torch.cuda.is_available(), persistent_workers=False,
                        prefetch_factor=4 if num_workers > 0 else None)
    ident = f"folder-{Path(source).resolve().name}-{folder_fingerprint(source)}" + (f"-first{limit}" if limit else "")
    return loader, ident


def iterate_batches(loader):
    """Yield uint8 batches, splitting mixed-size lists into same-size stacks."""
    for b in loader:
        if isinstance(b, list):
            groups: dict = {}
            for t in b:
                groups.setdefault(tuple(t.shape), []).append(t)
            for g in groups.values():
                yield torch.stack(g)
        else:
            yield b


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
