"""Atomic output: write to a temporary file beside the target, then rename. ``-`` as a model
path means stdin (read once into a private temporary file) or stdout (written in one piece
after the model is complete, so a failed run writes nothing there either)."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from dropcli.errors import DropcliError, UsageError


STDIO = "-"
_stdin_holder: list[str] = []  # what this run read from stdin (one thing at most)
_stdin_file: list[Path] = []  # the copy of the model read from stdin
_sizes: dict[str, int] = {}  # bytes last written to stdout ("out")


def stdin_to_file(what: str) -> Path:
    """Read all of stdin into a private temporary file (removed at exit) and return its path."""
    claim_stdin(what)
    data = sys.stdin.buffer.read()
    if not data:
        raise DropcliError(f"no {what} on stdin", f"pipe a {what} in, e.g. dropcli inject model.onnx --after relu -o - | dropcli ... -")
    d = tempfile.mkdtemp(prefix="dropcli-stdin.")
    atexit.register(shutil.rmtree, d, True)
    path = Path(d) / "stdin"
    path.write_bytes(data)
    _stdin_file[:] = [path]
    return path


def model_file(path: str | os.PathLike) -> Path:
    """The file behind a model path: for ``-``, the copy of stdin this run made."""
    if str(path) == STDIO:
        if not _stdin_file:
            raise DropcliError("internal error: the model on stdin has not been read yet")
        return _stdin_file[0]
    return Path(path)


def file_size(path: str | os.PathLike, output: bool = False) -> int:
    """Bytes in a model file; ``-``: what this run read from stdin (or, ``output``, wrote to stdout)."""
    if str(path) == STDIO and output:
        return _sizes.get("out", 0)
    return os.path.getsize(model_file(path))


def claim_stdin(what: str) -> None:
    """Each run reads stdin once: a second reader (the model and the data both '-') is an error."""
    if _stdin_holder:
        raise UsageError(f"stdin already carries the {_stdin_holder[0]}, so it can't carry the {what} too",
                         f"give the {what} as a file")
    _stdin_holder.append(what)


def reset_stdio() -> None:
    """Forget this run's stdin reader (commands run in one process, e.g. under tests)."""
    _stdin_holder.clear()
    _stdin_file.clear()
    _sizes.clear()


def check_output_path(out: str | os.PathLike, inputs: list[str | os.PathLike], force: bool = False) -> Path:
    """Refuse to overwrite an input, and fail early when the folder can't be written."""
    if str(out) == STDIO:
        if sys.stdout.isatty():
            raise UsageError("refusing to write a binary file to the terminal with -o -",
                             "pipe it into another command or redirect it to a file")
        return Path(out)
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
        if ip.is_dir() and out_p.exists() and ip.resolve() in out_p.resolve().parents and not force:
            raise UsageError(f"output path {out} is a file of the input model's folder {inp}",
                             "choose another -o path, or pass --force to overwrite it")
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


_shown_as: dict[str, str] = {}  # a temporary path -> the output it stands for (nested atomic writes)


def shown_path(path: str | os.PathLike) -> str:
    """The output a path stands for: a temporary file of :func:`atomic_path` names its target."""
    return _shown_as.get(str(path), str(path))


@contextlib.contextmanager
def write_errors(target: str | os.PathLike) -> Iterator[None]:
    """Turn an operating-system error while writing ``target`` (a full disk, a quota, a file-size
    limit, a read-only or vanished folder) into a one-line error that names the output."""
    try:
        yield
    except OSError as e:
        cause = e.strerror or str(e) or type(e).__name__
        raise DropcliError(f"cannot write {shown_path(target)}: {cause}",
                           "free some space or choose another output path; nothing was written there") from e


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` (a temporary file of :func:`atomic_path`), errors as one line.

    Serialise to memory first and write with this: torch's own file writers abort the whole
    process (SIGABRT) when the disk fills up, where Python's raise an ``OSError``."""
    with write_errors(path):
        Path(path).write_bytes(data)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto the target on success.

    On any exception (KeyboardInterrupt included) the temporary file is removed and the
    target is left as it was. An ``OSError`` on the way (a full disk...) becomes a one-line
    :class:`DropcliError` naming the target.
    """
    if str(target) == STDIO:
        with _stdout_path(suffix) as tmp:
            yield tmp
        return
    target = Path(target)
    with write_errors(target):
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp" + suffix, dir=target.resolve().parent)
    os.close(fd)
    tmp_p = Path(tmp)
    _shown_as[tmp] = shown_path(target)
    try:
        with write_errors(target):
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
    finally:
        _shown_as.pop(tmp, None)


@contextlib.contextmanager
def _stdout_path(suffix: str) -> Iterator[Path]:
    """A private temporary path whose content goes to stdout, whole, once the block succeeds."""
    d = Path(tempfile.mkdtemp(prefix="dropcli-stdout."))
    try:
        tmp = d / ("stdout" + suffix)
        yield tmp
        _sizes["out"] = tmp.stat().st_size
        with open(tmp, "rb") as fh:
            shutil.copyfileobj(fh, sys.stdout.buffer)
        sys.stdout.buffer.flush()
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target_dir: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``target_dir``'s files; the caller moves files out of it."""
    target_dir = Path(target_dir).resolve()
    tmp = Path(tempfile.mkdtemp(prefix=".dropcli.", dir=target_dir))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
