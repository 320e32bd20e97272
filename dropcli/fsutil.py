"""Atomic output: write to a temporary file beside the target, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import DropcliError, UsageError


def check_output_path(out: str | os.PathLike, inputs: list[str | os.PathLike], force: bool = False) -> Path:
    """Refuse to overwrite an input, and fail early when the folder can't be written."""
    out_p = Path(out)
    for inp in inputs:
        if inp is None or str(inp) == "-":
            continue
        ip = Path(inp)
        if ip.exists() and out_p.exists() and os.path.samefile(ip, out_p) or (
            not out_p.exists() and out_p.resolve() == ip.resolve()
        ):
            if not force:
                raise UsageError(
                    f"output path {out} is the input model", "choose another -o path, or pass --force to overwrite it"
                )
    parent = out_p.resolve().parent
    if parent.exists() and not parent.is_dir():
        raise DropcliError(f"output folder {parent} is a file, not a folder", "choose another -o path")
    if not parent.is_dir():
        raise DropcliError(f"output folder {parent} does not exist", "create it first or choose another -o path")
    if not os.access(parent, os.W_OK):
        raise DropcliError(f"output folder {parent} is not writable", "choose a writable -o path")
    if out_p.is_dir():
        raise DropcliError(f"output path {out} is a folder", "give a file name with -o")
    return out_p


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto the target on success.

    On any exception (KeyboardInterrupt included) the temporary file is removed and the
    target is left as it was.
    """
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp" + suffix, dir=target.resolve().parent)
    os.close(fd)
    tmp_p = Path(tmp)
    try:
        yield tmp_p
        # mkstemp creates 0600 files; give the output the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_p, 0o666 & ~umask)
        os.replace(tmp_p, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_p.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(target_dir: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``target_dir``'s files; the caller moves files out of it."""
    target_dir = Path(target_dir).resolve()
    tmp = Path(tempfile.mkdtemp(prefix=".dropcli.", dir=target_dir))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
