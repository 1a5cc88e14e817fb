"""Output paths of the command-line tools: checked before any work, written atomically.

Every command that writes a file or a folder named on its command line checks the path first
(`check_output_file`, `check_output_dir`), before a model loads or an image is read, so that a
mistake costs seconds, not a finished computation; and writes files through `atomic_write`, so
that a failure leaves neither a half-written file nor a stray temporary one.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path


class OutputPathError(ValueError):
    """An output path that cannot or must not be written; the message names it."""


def _existing_ancestor(path: Path, what: str) -> Path:
    """The nearest ancestor of `path` that exists (the folders below it would be created).
    OutputPathError when that ancestor is a file: a path under a file can never be created."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputPathError(f"{what} {path}: {parent} is a file, not a folder")
            return parent
    return Path(path.anchor or ".")


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_file(path: str | Path, inputs: Iterable[str | Path] = (), what: str = "output") -> Path:
    """`path` as a file the command may write: returned resolved, or OutputPathError naming it.

    Refused: an existing folder; a path under a file; a path whose nearest existing folder is not
    writable (or an existing file that is not); the same file (same path, hard or symbolic link)
    as any of `inputs` (the command's input files: it must never overwrite what it reads).
    Missing parent folders are allowed: the writer creates them (`atomic_write`).
    """
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        raise OutputPathError(f"{what} {path} is a folder; give a file name")
    folder = _existing_ancestor(path, what)
    for source in inputs:
        if _same(path, Path(source)) or path.resolve() == Path(source).expanduser().resolve():
            raise OutputPathError(f"{what} {path} is an input of this command ({source}); it would be overwritten")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputPathError(f"{what} {path} is not writable")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} {path}: folder {folder} is not writable")
    return path


def check_output_dir(path: str | Path, inputs: Iterable[str | Path] = (), what: str = "output folder") -> Path:
    """`path` as a folder the command may create or write into: returned resolved, or
    OutputPathError naming it. Refused: an existing file; a path under a file; a nearest existing
    folder that is not writable; a folder that is (or holds) one of `inputs` as its own file name
    would be rewritten: `inputs` here are files the command reads and must not replace."""
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{what} {path} is a file, not a folder")
    folder = path if path.is_dir() else _existing_ancestor(path, what)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} {path}: folder {folder} is not writable")
    for source in inputs:
        if _same(path, Path(source)):
            raise OutputPathError(f"{what} {path} is an input of this command ({source})")
    return path


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it onto `path` (one
    atomic step on one file system). Any failure removes the temporary file and leaves `path`
    as it was. Missing parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
