"""Checkpoint folders: ``output_dir/checkpoint-N/``, written atomically, found and pruned.

A checkpoint is first written to ``output_dir/.tmp-checkpoint-N`` and renamed into place only when
complete (the rename is atomic on POSIX). A kill during a save therefore leaves at worst a stale
``.tmp-*`` folder, never a half-written ``checkpoint-N``; the previous checkpoint stays loadable.
A complete checkpoint always holds ``trainer_state.json`` (written last, before the rename).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from .. import atomic
from .config import ConfigError

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be read; the message starts with the file's path."""


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest(output_dir: str | Path) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1] if found else None


def resolve(resume: str, output_dir: str | Path) -> list[Path]:
    """``resume`` -> the checkpoints to try, best first: 'latest' gives every complete checkpoint,
    newest first (the trainer falls back along it when one is unreadable); a folder gives itself;
    '' or no checkpoint yet gives []."""
    if not resume:
        return []
    if resume == "latest":
        return checkpoints(output_dir)[::-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(
            f"resume: {resume!r} is not a complete checkpoint folder (no {STATE_FILE}); "
            f"pass --resume latest or one of {[str(p) for p in checkpoints(output_dir)]}"
        )
    return [path]


def set_aside(path: Path) -> Path:
    """Rename an unreadable checkpoint to ``checkpoint-N.corrupt`` (kept for inspection, no longer found)."""
    target, i = path.with_name(path.name + ".corrupt"), 1
    while target.exists():
        i += 1
        target = path.with_name(f"{path.name}.corrupt-{i}")
    os.replace(path, target)
    return target


def tmp_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f".tmp-checkpoint-{step}"


def clean_stale(output_dir: str | Path) -> None:
    """Remove leftovers of interrupted saves."""
    root = Path(output_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-checkpoint-", ".old-checkpoint-", ".tmp-final")):
                shutil.rmtree(p, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, final: Path, state: dict) -> Path:
    """Finish a save: write the state file into ``tmp``, flush, rename ``tmp`` -> ``final``."""
    atomic.write_text(tmp / STATE_FILE, json.dumps(state, indent=2))  # a failed write names the file
    _fsync_tree(tmp)
    old = None
    if final.exists():  # re-saving the same step (e.g. after a resume): swap, never delete first
        old = final.with_name(".old-" + final.name)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def prune(output_dir: str | Path, keep: int) -> list[Path]:
    """Keep the newest ``keep`` checkpoints (0 = all); return the removed ones."""
    if keep <= 0:
        return []
    found = checkpoints(output_dir)
    removed = found[: max(0, len(found) - keep)]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def read_state(path: str | Path) -> dict:
    """``trainer_state.json`` of a checkpoint; a bad file raises a ConfigError naming it."""
    from ..checked import UserFileError, read_json

    file = Path(path) / STATE_FILE
    try:
        state = read_json(file, what="a checkpoint's trainer state (written by diffplug finetune)")
        if not (isinstance(state.get("step"), int) and state["step"] >= 0):
            raise ValueError(f"step {state.get('step')!r} is not a step number")
    except UserFileError as e:  # missing, truncated, NaN, not UTF-8
        raise CheckpointError(f"{file}: not a readable trainer state ({e.problem})") from None
    except ValueError as e:
        raise CheckpointError(f"{file}: not a readable trainer state ({e})") from None
    return state
