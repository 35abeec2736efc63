"""Durability helpers shared by the part cache and the resumable download."""

from __future__ import annotations

import os


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename in directory `path` durable; a filesystem that refuses is not fatal."""
    try:
        fd = os.open(os.fspath(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
