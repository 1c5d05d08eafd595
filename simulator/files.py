"""Writing files so that a reader sees the old file or the new one, never half of one.

Every output of simtune (profiles, launch files, traces) goes through `write_text_atomic`: the
text is written and synced to a temporary file beside the target, given its permissions
(mkstemp's 0600 would make shared outputs unreadable to others), and renamed over the target.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str, mode: int = 0o644) -> Path:
    """Write `text` to `path` with `mode` through a temporary file beside it and os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
