"""Writing files so that a reader sees the old file or the new one, never half of one.

Every output of simtune (profiles, launch files, traces, figures, sweep tables) goes through
`atomic_path` (or `write_text_atomic`, its text form): the content is written to a temporary
file beside the target, given its permissions (mkstemp's 0600 would make shared outputs
unreadable to others), and renamed over the target. On any failure (an unwritable folder, a
full disk) the temporary file is removed, the target is left as it was, and the OSError names
the target, not the temporary file, so the command line can say which output failed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write; renamed over `path` at its end."""
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if e.filename == str(path):
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str, mode: int = 0o644) -> Path:
    """Write `text` to `path` with `mode` through a temporary file beside it and os.replace."""
    with atomic_path(path, mode) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(path)
