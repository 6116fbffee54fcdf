"""Writing files so that a failed save never leaves a half-written or mixed set of files behind.

Every file of a save is first written to a temporary file in the target directory (so the final
``os.replace`` is a same-filesystem rename, atomic on POSIX and Windows); only when all of them
have been written completely are they moved over their final names. A failure while writing
(disk full, an exception in a serialiser, Ctrl-C) leaves the previous files untouched and removes
the temporaries.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Union

PathLike = Union[str, os.PathLike]
Writer = Callable[[str], None]  # writes the whole file at the given (temporary) path


def ensure_dir(directory: PathLike, what: str = "output directory") -> Path:
    """Create ``directory`` (and its parents) if needed and check that we can write into it.

    Raises:
        NotADirectoryError: ``directory`` (or a parent) is an existing file.
        PermissionError: the directory cannot be created or written to.
    """
    path = Path(directory)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise NotADirectoryError(f"{what} {str(path)!r}: {str(p)!r} is an existing file, not a directory; "
                                     "give a directory path (nothing was overwritten)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        raise PermissionError(f"{what} {str(path)!r} cannot be created: permission denied") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {str(path)!r} is not writable: permission denied")
    return path


def write_files_atomically(directory: PathLike, writers: Mapping[str, Writer]) -> list[Path]:
    """Write ``{file name: writer}`` into ``directory``, all or nothing.

    Each writer receives a temporary path in ``directory`` and writes the complete file there;
    after every writer has succeeded, each temporary file is ``os.replace``-d onto its name.

    Returns:
        The final paths, in the order given.

    Raises:
        IsADirectoryError: a target name is an existing directory.
        Whatever a writer raises, after removing every temporary file.
    """
    directory = ensure_dir(directory)
    targets = {name: directory / name for name in writers}
    for name, target in targets.items():
        if target.is_dir():
            raise IsADirectoryError(f"cannot write {name!r}: {str(target)!r} is an existing directory")
    temps: dict[str, str] = {}
    try:
        for name, write in writers.items():
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
            os.close(fd)
            temps[name] = tmp
            write(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp (and safetensors) make 0600; give the mode open() gives
            _fsync(tmp)
        for name, tmp in temps.items():
            os.replace(tmp, targets[name])
    except BaseException:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    _fsync_dir(directory)
    return list(targets.values())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_file(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _fsync(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    """Make the renames durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
