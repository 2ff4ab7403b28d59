"""The dedup report: counts, parameters, a similarity histogram in text (and one of the verification scores), and a
PNG grid of example pairs at several levels on both sides of the threshold that decides (the cosine, or the NCC
when candidates are verified), so that the user can see where copies end and pick a threshold."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

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


def pairs_figure(path, dataset, samples: Sequence[int], examples, threshold: float, measure: str = "cos") -> Path:
    """A PNG with one row per example pair (images of rows i and j), titled with their score (``measure``: cos,
    the cosine similarity, or ncc, the aligned cross-correlation of verification)."""
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
        row[0].set_title(f"{measure} {sim:.4f}: {verdict}", fontsize=8, loc="left")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    return Path(path)


def histogram_lines(sims: np.ndarray, threshold: float, edges: Sequence[float] = (-1.0, 0.5, 0.7, 0.8, 0.85, 0.9,
                                                                                 0.95, 0.98, 1.01),
                    what: str = "cosine similarity", counted: str = "k-NN pairs",
                    above: str = "duplicates") -> List[str]:
    """A Markdown table: how many pairs fall in each bin of ``edges``, the bins at or above ``threshold`` marked
    ``above``."""
    counts, _ = np.histogram(sims, bins=list(edges))
    lines = [f"| {what} | {counted} | |", "| --- | ---: | --- |"]
    for low, high, count in zip(edges[:-1], edges[1:], counts):
        mark = above if low >= threshold else ("straddles the threshold" if high > threshold else "")
        lines.append(f"| [{max(low, -1):.2f}, {min(high, 1):.2f}) | {count} | {mark} |")
    return lines


def verification_lines(params: Dict[str, Any], ncc: np.ndarray) -> List[str]:
    """Report lines for the verification stage: counts, timing, unreadable images, the NCC histogram."""
    lines = ["## Verification", "",
             f"- candidates: {params['n_candidates']} k-NN pair(s) (k = {params['k']}) at cosine >= "
             f"{params['candidate_threshold']}",
             f"- copies: {params['n_verified_pairs']} candidate(s) at aligned NCC >= {params['verify_threshold']} "
             f"({params['verify_side']} px band-passed grey thumbnails, scales {min(params['verify_scales'])}-"
             f"{max(params['verify_scales'])}, translations, both directions)",
             f"- time: {params['verify_seconds']} s, {params['verify_ms_per_pair']} ms per candidate pair (image "
             f"decoding included)"]
    if params["n_unreadable"]:
        lines.append(f"- unreadable: {params['n_unreadable']} image(s) (`unreadable.txt`); their "
                     f"{params['n_unverified_pairs']} candidate pair(s) were decided by cosine >= "
                     f"{params['threshold']} alone ({params['n_unverified_near_pairs']} kept as copies)")
    edges = (-1.0, 0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.01)
    return lines + ["", *histogram_lines(ncc, params["verify_threshold"], edges, "aligned NCC", "candidates"), ""]


def write_dedup_report(out_dir, params: Dict[str, Any], sims: np.ndarray, figure: str,
                       ncc: Optional[np.ndarray] = None) -> Path:
    """``report.md``: what was kept and removed, the parameters, the histograms and the pair grid; ``ncc`` the
    verification scores of the candidates (None: no verification)."""
    index = params["index"]
    near = (f"- near duplicates: {params['n_near_pairs']} k-NN pair(s) verified on pixels (below)" if params["verify"]
            else f"- near duplicates: {params['n_near_pairs']} k-NN pair(s) with cosine >= {params['threshold']}")
    lines = ["# Deduplication report", "",
             f"- images embedded: {params['n']}; kept: {params['n_kept']}; removed: {params['n_removed']} "
             f"in {params['n_groups']} duplicate group(s)",
             f"- exact duplicates (same decoded pixels): {params['n_exact_pairs']} pair(s)", near,
             f"- search: {index.get('kind')} ({', '.join(f'{k}={v}' for k, v in index.items() if k != 'kind')})",
             f"- embeddings: {params['embeddings']}", "",
             "Outputs: `kept.csv` (manifest for `train` with `data.kind=csv`), `removed.csv`, `groups.csv` "
             "(every member of every group, its representative marked `kept=1`), `edges.csv` (the pairs that "
             "joined each group: how they were decided, their cosine and NCC).", "",
             "## Similarity of nearest neighbours", "",
             *(histogram_lines(sims, params["candidate_threshold"], above="candidates") if params["verify"]
               else histogram_lines(sims, params["threshold"])), ""]
    if ncc is not None:
        lines += verification_lines(params, ncc)
    if figure:
        knob = "`--verify-threshold` (NCC)" if params["verify"] else "`--threshold`"
        lines += ["## Example pairs", "", f"Pairs at several score levels, high to low; pick the threshold where "
                  f"copies stop and distinct images start ({knob}).", "", f"![pairs]({figure})", ""]
    return write_text_atomic(Path(out_dir) / "report.md", "\n".join(lines))
