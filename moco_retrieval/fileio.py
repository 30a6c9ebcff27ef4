"""Atomic file writes: a reader (or a crash) never sees a half-written checkpoint, export, snapshot,
plot or report: a temporary file in the same directory, fsynced, renamed over the target, and the
directory fsynced."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (corpus images, store snapshots, exports)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (setting it to read it back
    would race with files other threads create meanwhile)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | Path, text: bool = False) -> Iterator[IO]:
    """A new file that replaces `path` when the block ends, and only if it ends without an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would hide an export from a server run as another user
        with os.fdopen(fd, "w" if text else "wb", **({"newline": "", "encoding": "utf-8"} if text else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """write(binary file) into a new file that atomically replaces `path`."""
    with atomic_open(path) as f:
        write(f)
    return Path(path)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save, atomically."""
    import torch  # here: the clients use this module and need no torch (seconds to import)

    return atomic_write(path, lambda f: torch.save(obj, f))
