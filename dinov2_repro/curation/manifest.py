"""CSV manifests that ``train`` (``data.kind=csv``) and ``eval`` read: ``path[,label]``, absolute paths."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Sequence

from .embed import write_csv_atomic


def write_manifest(path, paths: Sequence[str], labels: Sequence[int], classes: Sequence[str]) -> Path:
    """``path`` column always; ``label`` (class names) when the dataset had classes and every row a label."""
    if classes and all(0 <= int(y) < len(classes) for y in labels):
        return write_csv_atomic(Path(path), ["path", "label"], [(p, classes[int(y)]) for p, y in zip(paths, labels)])
    return write_csv_atomic(Path(path), ["path"], [(p,) for p in paths])


def write_params(out_dir, step: str, params: Dict[str, Any]) -> Path:
    """``<out_dir>/params.json``: what a curation step ran with, so its outputs say how they were made."""
    from ..files import write_text_atomic

    return write_text_atomic(Path(out_dir) / "params.json", json.dumps(dict(step=step, **params), indent=1) + "\n")
