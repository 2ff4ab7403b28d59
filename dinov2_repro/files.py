"""Files written whole or not at all: a reader, or a crash half-way, never sees half of one.

Every writer of run directories, exports, caches, reports and synthetic data goes through `write_atomic`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def write_atomic(path: os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path`` (per process, so concurrent writers never share
    it), then rename it over ``path``; on failure the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
