"""Atomic file writes: a file diffplug writes is either complete or absent, never partial.

Each file is written to a temporary name in the same folder, flushed to disk, then renamed onto its
name (``os.replace``: atomic within a file system). A write that fails -- a full disk (ENOSPC), a
quota, an I/O error -- removes the temporary file and raises :class:`WriteError`, an ``OSError``
that names the file it could not write. ``Batch`` stages several files and renames them only when
every one was written, so a run's outputs appear together or not at all (``diffplug sample``: the
images, ``grid.png`` and ``settings.json``; ``diffplug eval``: ``metrics.json``, ``scores.jsonl``
and ``report.html``).

    atomic.write_json(out / "metrics.json", result)
    with atomic.Batch() as batch:
        batch.save_image(image, out / "000.png")
        batch.write_text(out / "settings.json", text)
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["Batch", "WriteError", "replacing", "save_image", "save_safetensors", "write_bytes", "write_json",
           "write_text"]


class WriteError(OSError):
    """A file could not be written (its errno kept); nothing partial was left under its name."""

    def __init__(self, path: Path, err: BaseException):
        reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
        super().__init__(getattr(err, "errno", None), f"could not write {path}: {reason} (nothing partial was left there)")
        self.path = Path(path)

    def __str__(self) -> str:
        return self.strerror


def _tmp_name(path: Path) -> Path:
    # hidden, in the same folder (so the rename stays on one file system), the real suffix last
    # (so PIL and friends still see the format)
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def _fill(tmp: Path, write: Callable) -> None:
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _discard(tmp: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def _staged(path, write: Callable) -> Path:
    """``write(file)`` into the temporary name of ``path``; returns that name (not yet renamed)."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        _fill(tmp, write)
    except BaseException as err:
        _discard(tmp)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise WriteError(path, err) from err
        raise
    return tmp


def _write(path, write: Callable) -> Path:
    path = Path(path)
    tmp = _staged(path, write)
    try:
        os.replace(tmp, path)
    except OSError as err:
        _discard(tmp)
        raise WriteError(path, err) from err
    return path


# -- what to write -----------------------------------------------------------------------------------


def _bytes(data: bytes) -> Callable:
    return lambda f: f.write(data)


def _text(text: str) -> Callable:
    return _bytes(text.encode("utf-8"))


def _json(obj, **kw) -> Callable:
    return _text(json.dumps(obj, **{"indent": 2, **kw}))


def _image(image, format: str | None, path: Path, **kw) -> Callable:
    from PIL import Image

    fmt = format or Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown image format {path.suffix!r}; use .png or .jpg")
    return lambda f: image.save(f, format=fmt, **kw)


def _safetensors(tensors: dict, metadata: dict | None) -> Callable:
    from safetensors.torch import save

    return lambda f: f.write(save(tensors, metadata=metadata))


def write_bytes(path, data: bytes) -> Path:
    return _write(path, _bytes(data))


def write_text(path, text: str) -> Path:
    return _write(path, _text(text))


def write_json(path, obj, **json_kw) -> Path:
    """``json.dumps(obj, indent=2, **json_kw)`` into ``path``."""
    return _write(path, _json(obj, **json_kw))


def save_image(image, path, format: str | None = None, **kw) -> Path:
    """A PIL image, its format from ``path``'s suffix unless ``format`` is given."""
    path = Path(path)
    return _write(path, _image(image, format, path, **kw))


def save_safetensors(tensors: dict, path, metadata: dict | None = None) -> Path:
    """``safetensors.torch.save_file``, atomically."""
    return _write(path, _safetensors(tensors, metadata))


@contextlib.contextmanager
def replacing(path) -> Iterator[Path]:
    """For writers that take a file name: write to the yielded temporary path; on success it replaces
    ``path``, on any error it is removed (and an ``OSError`` becomes a :class:`WriteError` naming ``path``)."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        _discard(tmp)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise WriteError(path, err) from err
        raise


class Batch:
    """Several files written all-or-nothing: each is staged under a temporary name; leaving the
    ``with`` block without an error renames them all into place (renames need no space), an error
    removes them all and nothing of the batch appears.

    ``remove``: files to delete once the batch is in place (an earlier run's leftovers)."""

    def __init__(self):
        self._staged: list[tuple[Path, Path]] = []
        self._remove: list[Path] = []

    def _add(self, path, write: Callable) -> Path:
        path = Path(path)
        self._staged.append((_staged(path, write), path))
        return path

    def write_bytes(self, path, data: bytes) -> Path:
        return self._add(path, _bytes(data))

    def write_text(self, path, text: str) -> Path:
        return self._add(path, _text(text))

    def write_json(self, path, obj, **json_kw) -> Path:
        return self._add(path, _json(obj, **json_kw))

    def save_image(self, image, path, format: str | None = None, **kw) -> Path:
        path = Path(path)
        return self._add(path, _image(image, format, path, **kw))

    def remove(self, path) -> None:
        self._remove.append(Path(path))

    def discard(self) -> None:
        for tmp, _ in self._staged:
            _discard(tmp)
        self._staged.clear()

    def commit(self) -> None:
        written = {path for _, path in self._staged}
        for tmp, path in self._staged:
            try:
                os.replace(tmp, path)
            except OSError as err:
                self.discard()
                raise WriteError(path, err) from err
        self._staged.clear()
        for path in self._remove:
            if path not in written:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def __enter__(self) -> "Batch":
        return self

    def __exit__(self, kind, err, tb) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()
