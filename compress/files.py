"""Crash-safe writing: every file compress writes appears whole or not at all.

A file is written to a temporary name in the same folder (``.compress-tmp-*``), flushed to disk and
renamed over the target, so a run killed mid-write leaves the old or the new file, never a truncated
one; ``--resume`` sweeps the temporaries a kill left. Temporaries get the permissions the user's umask
gives a new file (``tempfile`` would make them private).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Union

TMP_PREFIX = ".compress-tmp-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def user_mode(directory: bool = False) -> int:
    """The mode a new file (or folder) gets under the user's umask."""
    return (0o777 if directory else 0o666) & ~_umask()


@contextlib.contextmanager
def atomic_path(path: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is flushed and renamed to ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, user_mode())
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text(path: Union[str, Path], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_with(path: Union[str, Path], writer: Callable[[str], None]) -> None:
    """``writer(tmp_name)`` writes the file (e.g. ``safetensors.torch.save_file``); it lands atomically."""
    with atomic_path(path) as tmp:
        writer(str(tmp))


@contextlib.contextmanager
def atomic_dir(path: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` (an old folder there is
    moved aside first and removed after, so ``path`` is never missing a complete version)."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, user_mode(directory=True))
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + path.name + ".old.", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sweep_temporaries(folder: Union[str, Path]) -> int:
    """Remove the temporaries an interrupted writer left anywhere under ``folder``; returns how many."""
    n = 0
    for tmp in sorted(Path(folder).rglob(TMP_PREFIX + "*"), reverse=True):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        n += 1
    return n
