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
        try:
            yield tmp_path
        except OSError as e:
            raise _naming(e, tmp_path, path) from None
        os.chmod(tmp_path, user_mode())
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _naming(e: OSError, tmp: Path, target: Path) -> OSError:
    """The same error, naming the file the user asked for instead of its temporary stand-in."""
    name = str(e.filename or "")
    if name.startswith(str(tmp)):
        return OSError(e.errno, e.strerror, str(target) + name[len(str(tmp)):])
    return e


def write_text(path: Union[str, Path], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_with(path: Union[str, Path], writer: Callable[[str], None]) -> None:
    """``writer(tmp_name)`` writes the file (e.g. ``torch.save``); it lands atomically."""
    with atomic_path(path) as tmp:
        writer(str(tmp))


def save_safetensors(state, path: Union[str, Path], metadata=None) -> None:
    """``safetensors.torch.save_file`` whose I/O failures (no space, file too large) are ``OSError``s naming
    ``path``, as Python's own writes are (safetensors reports them as ``SafetensorError`` text)."""
    import errno as errno_names
    import re

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(state, str(path), metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        num = int(code.group(1))
        raise OSError(num, os.strerror(num) if num in errno_names.errorcode else str(e), str(path)) from None


@contextlib.contextmanager
def atomic_dir(path: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` (an old folder there is
    moved aside first and removed after, so ``path`` is never missing a complete version)."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent))
    try:
        try:
            yield tmp
        except OSError as e:
            raise _naming(e, tmp, path) from None
        for f in tmp.rglob("*"):  # some writers (safetensors) make private files
            os.chmod(f, user_mode(directory=f.is_dir()))
        os.chmod(tmp, user_mode(directory=True))
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Union[str, Path], path: Union[str, Path]) -> None:
    """Put the complete folder ``tmp`` at ``path``: an old folder there is moved aside first and removed after,
    so ``path`` never holds a partial version."""
    tmp, path = Path(tmp), Path(path)
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + path.name + ".old.", dir=path.parent))
        os.replace(path, old / path.name)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
