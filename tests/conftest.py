"""Fixtures shared by several test files."""

import errno

import pytest


@pytest.fixture
def disk_full_at(monkeypatch):
    """``disk_full_at(marker)``: diffplug.atomic's writes into a path containing ``marker`` get 100 bytes
    on disk, then ENOSPC (``monkeypatch.undo()`` frees the disk again)."""
    import diffplug.atomic

    real_open = open

    def arm(marker: str) -> None:
        def full_disk(path, mode="r", *a, **k):
            f = real_open(path, mode, *a, **k)
            if marker in str(path):
                write = f.write

                def partial(data):
                    write(data[:100])
                    raise OSError(errno.ENOSPC, "No space left on device")

                f.write = partial
            return f

        monkeypatch.setattr(diffplug.atomic, "open", full_disk, raising=False)

    return arm
