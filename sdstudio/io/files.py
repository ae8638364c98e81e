"""Atomic file writes: a temp file in the same folder, then a rename, so a crash never leaves half a file
and an existing file is either the old one or the new one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from sdstudio.errors import SdStudioError


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)``, then rename the temp file onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp (and some writers) make 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def check_writable(path: str | os.PathLike, what: str = "output file") -> None:
    """Refuse, before any work, a ``path`` that :func:`atomic_write` could not write: a folder in its place,
    a file where one of its folders should be, or a folder nothing may be created in. Missing folders are
    fine (they are made); the nearest existing one is tried with a real temp file, which also catches
    read-only mounts and permissions root does not bypass."""
    path = Path(path)
    if path.is_dir():
        raise SdStudioError(f"{path}: is a folder; give a file name for the {what}")
    parent = path.parent
    while not parent.exists():
        if parent.is_symlink():  # a dangling link: mkdir would fail on it
            raise SdStudioError(f"{parent}: is a broken link; cannot write the {what} {path} there")
        parent = parent.parent
    if not parent.is_dir():
        raise SdStudioError(f"{parent}: is a file, not a folder; cannot write the {what} {path} there")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".sdstudio-write-test.")
    except OSError as e:
        raise SdStudioError(f"{parent}: cannot write the {what} {path} there ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)
