"""The dedup report: counts, parameters, a similarity histogram in text, and a PNG grid of example pairs at several
similarity levels on both sides of the threshold, so that the user can see where copies end and pick a threshold."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from ..files import write_atomic, write_text_atomic


def similarity_levels(threshold: float) -> List[float]:
    """Bin edges around ``threshold``: three bins below it (0.15 wide in all), two from it up to 1."""
    top = threshold + (1.0 - threshold) / 2
    return [threshold - 0.15, threshold - 0.10, threshold - 0.05, threshold, top, 1.01]


def example_pairs(pairs: np.ndarray, sims: np.ndarray, threshold: float,
                  per_level: int = 2) -> List[Tuple[int, int, float]]:
    """Up to ``per_level`` candidate pairs (i, j, similarity) per similarity bin, spread over the bin, high to low."""
    edges = similarity_levels(threshold)
    chosen = []
    for low, high in reversed(list(zip(edges[:-1], edges[1:]))):
        inside = np.flatnonzero((sims >= low) & (sims < high))
        inside = inside[np.argsort(-sims[inside], kind="stable")]
        picks = inside[np.linspace(0, len(inside) - 1, min(per_level, len(inside))).round().astype(int)]
        chosen += [(int(pairs[p, 0]), int(pairs[p, 1]), float(sims[p])) for p in dict.fromkeys(picks.tolist())]
    return chosen


def pairs_figure(path, dataset, samples: Sequence[int], examples, threshold: float) -> Path:
    """A PNG with one row per example pair (images of rows i and j), titled with their cosine similarity."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # object API: no pyplot, no global backend switch
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.4, 2.2 * len(examples)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(examples), 2, squeeze=False)
    for (i, j, sim), row in zip(examples, axes):
        for ax, r in zip(row, (i, j)):
            image = dataset.load_image(samples[r])
            if image is not None:
                ax.imshow(image.permute(1, 2, 0).numpy())
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_xlabel(Path(dataset.samples[samples[r]][0]).name[-28:], fontsize=6)
        verdict = "duplicate" if sim >= threshold else "kept apart"
        row[0].set_title(f"cos {sim:.4f}: {verdict}", fontsize=8, loc="left")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    return Path(path)


def histogram_lines(sims: np.ndarray, threshold: float) -> List[str]:
    """A Markdown table: how many nearest-neighbour pairs fall in each similarity bin."""
    edges = [-1.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.01]
    counts, _ = np.histogram(sims, bins=edges)
    lines = ["| cosine similarity | k-NN pairs | |", "| --- | ---: | --- |"]
    for low, high, count in zip(edges[:-1], edges[1:], counts):
        mark = "duplicates" if low >= threshold else ("straddles the threshold" if high > threshold else "")
        lines.append(f"| [{max(low, -1):.2f}, {min(high, 1):.2f}) | {count} | {mark} |")
    return lines


def write_dedup_report(out_dir, params: Dict[str, Any], sims: np.ndarray, figure: str) -> Path:
    """``report.md``: what was kept and removed, the parameters, the histogram and the pair grid."""
    index = params["index"]
    lines = ["# Deduplication report", "",
             f"- images embedded: {params['n']}; kept: {params['n_kept']}; removed: {params['n_removed']} "
             f"in {params['n_groups']} duplicate group(s)",
             f"- exact duplicates (same decoded pixels): {params['n_exact_pairs']} pair(s)",
             f"- near duplicates: {params['n_near_pairs']} k-NN pair(s) with cosine >= {params['threshold']}",
             f"- search: {index.get('kind')} ({', '.join(f'{k}={v}' for k, v in index.items() if k != 'kind')})",
             f"- embeddings: {params['embeddings']}", "",
             "Outputs: `kept.csv` (manifest for `train` with `data.kind=csv`), `removed.csv`, `groups.csv` "
             "(every member of every group, its representative marked `kept=1`).", "",
             "## Similarity of nearest neighbours", "", *histogram_lines(sims, params["threshold"]), ""]
    if figure:
        lines += ["## Example pairs", "", "Pairs at several similarity levels, high to low; pick the threshold "
                  "where copies stop and distinct images start (`--threshold`).", "", f"![pairs]({figure})", ""]
    return write_text_atomic(Path(out_dir) / "report.md", "\n".join(lines))
