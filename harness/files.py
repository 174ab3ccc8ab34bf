"""Atomic writers: a reader sees the old file or folder, or the complete new one, never half of either.

Every writer builds its output beside the destination (same folder, so the rename stays on one filesystem),
flushes it to disk with `fsync`, then renames it into place and syncs the folder. A folder is swapped in with
one atomic exchange where the kernel offers it (Linux `renameat2(RENAME_EXCHANGE)`); elsewhere the old folder is
first renamed aside, so a crash between the two renames leaves it under its aside name, never deleted.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def make_world_readable(path: str | os.PathLike) -> None:
    """Give a file made by `mkstemp` (mode 0600) the mode a plain `open()` would have given it under the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask)


def sync_folder(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename inside it) to disk; a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without error, it replaces `path` atomically.

    The caller writes the whole file to the yielded path (by any library). On error the temporary file is removed
    and `path` is left as it was.

    Example:
        >>> with atomic_path("profile.h5") as tmp:
        ...     write_everything(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _sync_file(tmp)
        make_world_readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_files_atomic(out_dir: str | os.PathLike, files: dict[str, bytes]) -> list[Path]:
    """Write every `relative path → bytes` under `out_dir`: all staged and synced first, then each renamed in."""
    out_dir = Path(out_dir)
    staged: list[tuple[Path, Path]] = []
    try:
        for relative, data in files.items():
            path = out_dir / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            staged.append((Path(tmp), path))
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            make_world_readable(tmp)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, path in staged:
        os.replace(tmp, path)
        sync_folder(path.parent)
    return [path for _, path in staged]


def staging_folder(destination: str | os.PathLike) -> Path:
    """A new empty folder beside `destination` in which to build the folder that will replace it."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent))


def replace_folder(staged: Path, destination: str | os.PathLike) -> None:
    """Put the complete folder `staged` at `destination`; the folder that was there is removed only afterwards.

    Every file in `staged` is synced first. Where the kernel can exchange two names atomically the swap is one
    step; otherwise the old folder is renamed aside, the new one renamed in, and the old one removed.
    """
    destination = Path(destination)
    for path in staged.rglob("*"):
        if path.is_file():
            _sync_file(path)
    make_world_readable(staged)
    if not destination.exists():
        os.replace(staged, destination)
    elif _exchange(staged, destination):
        shutil.rmtree(staged)
    else:
        aside = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".old", dir=destination.parent))
        os.replace(destination, aside / destination.name)
        os.replace(staged, destination)
        shutil.rmtree(aside)
    sync_folder(destination.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux `renameat2(RENAME_EXCHANGE)`; False where that is unavailable."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0
