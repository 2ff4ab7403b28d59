"""Pixel verification of candidate copies: the second stage of copy detection (retrieve, then verify).

Embedding k-NN proposes candidate pairs at a loose cosine; each candidate is then checked on its pixels. Both
images become ``side`` x ``side`` grey thumbnails (64 by default), band-passed (a difference of Gaussians, so that
two smooth tiles of one sky or one gradient do not correlate on their shading alone), and each is searched inside
the other with normalised cross-correlation (NCC) over every translation and a grid of scales (the template is the
thumbnail shrunk to ``round(side * k)`` for each ``k``). The score is the best NCC found (refined between pixels
by a parabola through the peak, as a crop's offset is rarely a whole thumbnail pixel): near 1 for a resized,
recompressed or brightness/contrast-shifted copy (NCC ignores gain and offset) and for a crop of ``k`` of each side
resized back (the shrunk crop sits inside the original), low for distinct images. This is template matching by
FFT (Lewis 1995, "Fast normalized cross-correlation", as in ``skimage.feature.match_template``: correlation by FFT,
window norms from summed-area tables), run only on the pairs the embeddings propose.

Speed: an image's band-passed thumbnail, its spectrum, the spectra of its shrunk templates and the norms of its
windows are computed per image and kept for the ``FEATURE_CACHE`` images used last (thumbnails for many more); a
pair of cached images then costs two batched inverse FFTs in float32, a partner outside the cache its features too
(timed by ``benchmarks/curation_calibration.py``; figures in docs/curation.md).
"""

from __future__ import annotations

import functools
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

DEFAULT_SIDE = 64
DEFAULT_SCALES = tuple(round(1.0 - 0.02 * i, 2) for i in range(11))  # 1.00, 0.98, ..., 0.80: crops down to 80 %
DEFAULT_VERIFY_THRESHOLD = 0.85  # calibration: docs/curation.md
BAND = (0.7, 4.0)  # difference-of-Gaussians sigmas in thumbnail pixels: detail kept, shading removed
FLAT_STD = 1e-3  # band-passed grey levels (0-1) below this spread carry no structure to compare
FEATURE_CACHE = 256  # images whose features are kept (about 0.25 MB each at the defaults)
THUMB_CACHE = 1 << 18  # images whose uint8 thumbnails are kept (side**2 bytes each: 1 GiB at most at 64 px)


def gray_thumbnail(image, side: int = DEFAULT_SIDE) -> np.ndarray:
    """(H, W) or (H, W, C) array (integers over their dtype's range, floats in [0, 1]) or PIL image -> float32
    (side, side) grey in [0, 1]."""
    from PIL import Image

    array = np.asarray(image)
    scale = float(np.iinfo(array.dtype).max) if np.issubdtype(array.dtype, np.integer) else 1.0
    array = array.astype(np.float32) / scale
    if array.ndim == 3:
        array = array[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32) if array.shape[2] >= 3 \
            else array[..., 0]
    small = Image.fromarray(np.ascontiguousarray(array)).resize((side, side), Image.BILINEAR)
    return np.asarray(small, dtype=np.float32)  # PIL's resize filters with the shrink factor: antialiased


def stored_thumbnail(image, side: int = DEFAULT_SIDE) -> np.ndarray:
    """`gray_thumbnail` rounded to uint8, the form verification keeps (``side**2`` bytes an image) and scores."""
    return np.round(np.clip(gray_thumbnail(image, side), 0, 1) * 255).astype(np.uint8)


def stored_features(thumb: np.ndarray, scales: Sequence[float] = DEFAULT_SCALES) -> Features:
    """`image_features` of a `stored_thumbnail` (uint8): what every pair is scored on."""
    return image_features(thumb.astype(np.float32) / 255.0, scales)


def band_pass(thumb: np.ndarray, band: Optional[Tuple[float, float]] = BAND) -> np.ndarray:
    """(S, S) -> (S, S) difference of Gaussians (``band`` None: unchanged)."""
    from scipy.ndimage import gaussian_filter

    if not band:
        return thumb
    return gaussian_filter(thumb, band[0], mode="reflect") - gaussian_filter(thumb, band[1], mode="reflect")


def integral(x: np.ndarray) -> np.ndarray:
    """(S, S) -> (S + 1, S + 1) summed-area table with a zero first row and column."""
    out = np.zeros((x.shape[0] + 1, x.shape[1] + 1), np.float64)
    out[1:, 1:] = x.cumsum(0).cumsum(1)
    return out


def window_sums(table: np.ndarray, size: int) -> np.ndarray:
    """Summed-area ``table`` (S + 1, S + 1) -> (S - size + 1, S - size + 1) sums of every size x size window."""
    return table[size:, size:] - table[:-size, size:] - table[size:, :-size] + table[:-size, :-size]


@dataclass
class Features:
    """One image's side of a pair. As the searched image: ``spectrum`` (S, S//2+1) of its band-passed thumbnail
    and ``inv_norm`` (K, R, S), 1 / the norm of the zero-mean window of each template size at each top-left
    position (0 where the window leaves the image or is flat; R = the most window rows, S - smallest size + 1).
    As the template: ``templates`` (K, S, S//2+1), conjugate spectra of its shrunk, zero-mean, unit-norm
    thumbnails, one per scale, placed at the origin. ``flat``: no structure at all."""

    spectrum: np.ndarray
    inv_norm: np.ndarray
    templates: np.ndarray
    flat: bool


def template_sizes(side: int, scales: Sequence[float]) -> Tuple[int, ...]:
    return tuple(max(4, min(side, int(round(side * k)))) for k in scales)


@functools.lru_cache(maxsize=8)
def shrink_matrices(side: int, sizes: Tuple[int, ...]) -> Tuple[np.ndarray, np.ndarray]:
    """(K, S, S) float32 matrices R_k whose first ``sizes[k]`` rows resample S pixels to sizes[k] exactly as PIL's
    antialiased bilinear resize does (column j: the resize of the j-th unit vector), so that the K shrunk
    templates of an image X are the one batched product R_k X R_k^T; and the (K, S, S) masks of their supports."""
    from PIL import Image

    matrices = np.zeros((len(sizes), side, side), np.float32)
    masks = np.zeros((len(sizes), side, side), np.float32)
    for k, size in enumerate(sizes):
        for j in range(side):
            unit = np.zeros((1, side), np.float32)
            unit[0, j] = 1.0
            matrices[k, :size, j] = np.asarray(Image.fromarray(unit).resize((size, 1), Image.BILINEAR))[0]
        masks[k, :size, :size] = 1.0
    return matrices, masks


def image_features(thumb: np.ndarray, scales: Sequence[float] = DEFAULT_SCALES,
                   band: Optional[Tuple[float, float]] = BAND) -> Features:
    """Per-image precomputation for `pair_ncc` from a (S, S) grey thumbnail."""
    side = thumb.shape[0]
    sizes = template_sizes(side, scales)
    x = band_pass(thumb.astype(np.float32), band)
    matrices, masks = shrink_matrices(side, sizes)
    templates = matrices @ x @ matrices.transpose(0, 2, 1)  # (K, S, S), zero outside each template's support
    area = np.array(sizes, np.float32) ** 2
    templates -= masks * (templates.sum((1, 2)) / area)[:, None, None]
    norms = np.sqrt((templates.astype(np.float64) ** 2).sum((1, 2)))
    scale = np.where(norms > FLAT_STD * np.array(sizes), 1.0 / np.maximum(norms, 1e-12), 0.0)  # flat: all zero
    templates *= scale.astype(np.float32)[:, None, None]
    inv_norm = np.zeros((len(sizes), side - min(sizes) + 1, side), np.float32)
    sums_table, squares_table = integral(x), integral(x.astype(np.float64) ** 2)  # every window size is a slice
    for k, size in enumerate(sizes):
        sums, squares = window_sums(sums_table, size), window_sums(squares_table, size)
        spread = np.maximum(squares - sums * sums / size ** 2, 0.0)  # size**2 * the window's variance
        valid = spread > FLAT_STD ** 2 * size ** 2
        block = np.zeros_like(spread)
        block[valid] = 1.0 / np.sqrt(spread[valid])
        inv_norm[k, :block.shape[0], :block.shape[1]] = block
    return Features(np.fft.rfft2(x).astype(np.complex64), inv_norm,
                    np.conj(np.fft.rfft2(templates)).astype(np.complex64), bool(x.std() < FLAT_STD))


def ncc_surfaces(search: Features, template: Features) -> np.ndarray:
    """(K, R, S) NCC of ``template``'s shrunk thumbnail k with the window of ``search`` whose top-left corner is
    (u, v), 0 where that window leaves the image. The circular correlation of a template placed at the origin is
    exact at the windows that stay inside the image, the only ones ``inv_norm`` keeps, so only its first R rows are
    transformed back."""
    side, rows = search.inv_norm.shape[-1], search.inv_norm.shape[1]
    columns = np.fft.ifft(search.spectrum[None] * template.templates, axis=1)[:, :rows]
    return np.fft.irfft(columns, n=side, axis=2) * search.inv_norm


def directed_ncc(search: Features, template: Features) -> float:
    """Best NCC of ``template``'s shrunk thumbnails over every window of ``search``, refined between pixels."""
    ncc = ncc_surfaces(search, template)
    k, u, v = np.unravel_index(int(ncc.argmax()), ncc.shape)
    return refined_peak(ncc[k], search.inv_norm[k] > 0, u, v)


def refined_peak(surface: np.ndarray, valid: np.ndarray, u: int, v: int) -> float:
    """The NCC peak at (u, v) of ``surface`` (R, S), refined by a parabola through it and its valid neighbours along
    each axis: the value between grid positions, where a copy shifted by a fraction of a thumbnail pixel peaks."""
    peak = float(surface[u, v])
    gain = 0.0
    for du, dv in ((1, 0), (0, 1)):
        a, b = (u - du, v - dv), (u + du, v + dv)
        if min(a) < 0 or b[0] >= surface.shape[0] or b[1] >= surface.shape[1] or not (valid[a] and valid[b]):
            continue
        low, high = float(surface[a]), float(surface[b])
        curvature = 2 * peak - low - high
        if curvature > 1e-9:
            gain += (high - low) ** 2 / (8 * curvature)
    return min(1.0, peak + gain)


def pair_ncc(a: Features, b: Features) -> float:
    """Aligned NCC of two images' features, both directions (either may be the crop). Two flat images score 1
    (nothing on their pixels contradicts the embedding), a flat and a textured one 0."""
    if a.flat or b.flat:
        return float(a.flat and b.flat)
    return max(directed_ncc(a, b), directed_ncc(b, a))


def aligned_ncc(a, b, scales: Sequence[float] = DEFAULT_SCALES, side: int = DEFAULT_SIDE) -> float:
    """Best normalised cross-correlation of images ``a`` and ``b`` ((H, W) or (H, W, C) arrays, or PIL images)
    over translations and the scale grid ``scales``, both directions, on ``side`` px band-passed grey thumbnails
    (rounded to uint8 as `verify_pairs` keeps them, so both give a pair the same score)."""
    return pair_ncc(*(stored_features(stored_thumbnail(x, side), scales) for x in (a, b)))


class FeatureCache:
    """row -> `Features`, or None when ``load(row)`` (an image, or None when unreadable) fails. Thumbnails (uint8,
    side**2 bytes) are kept for up to ``THUMB_CACHE`` rows, so that every image is decoded once; the heavier
    features for the ``FEATURE_CACHE`` rows used last."""

    def __init__(self, load: Callable[[int], object], scales: Sequence[float], side: int):
        self.load, self.scales, self.side = load, tuple(scales), int(side)
        self.thumbs: "OrderedDict[int, np.ndarray]" = OrderedDict()
        self.features: "OrderedDict[int, Features]" = OrderedDict()
        self.failed: "OrderedDict[int, None]" = OrderedDict()  # unreadable rows in the order met, never retried

    def thumbnail(self, row: int) -> Optional[np.ndarray]:
        if row in self.thumbs:
            self.thumbs.move_to_end(row)
            return self.thumbs[row]
        image = None if row in self.failed else self.load(row)
        if image is None:
            self.failed[row] = None
            return None
        thumb = stored_thumbnail(image, self.side)
        remember(self.thumbs, row, thumb, THUMB_CACHE)
        return thumb

    def __call__(self, row: int) -> Optional[Features]:
        if row in self.features:
            self.features.move_to_end(row)
            return self.features[row]
        thumb = self.thumbnail(row)
        if thumb is None:
            return None
        features = stored_features(thumb, self.scales)
        remember(self.features, row, features, FEATURE_CACHE)
        return features


def remember(cache: OrderedDict, key, value, size: int) -> None:
    cache[key] = value
    if len(cache) > size:
        cache.popitem(last=False)


@dataclass
class Verification:
    """``scores`` (P,) float32 aligned NCC of each candidate pair (NaN: not verified, an image was unreadable);
    ``unreadable`` the names of those images, in the order met; ``seconds`` spent (loading included)."""

    scores: np.ndarray
    unreadable: List[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def n_skipped_pairs(self) -> int:
        return int(np.isnan(self.scores).sum())


def verify_pairs(pairs: np.ndarray, load: Callable[[int], object], names: Sequence[str], *,
                 scales: Sequence[float] = DEFAULT_SCALES, side: int = DEFAULT_SIDE, progress: bool = True,
                 desc: str = "verify") -> Verification:
    """Aligned NCC of every candidate pair (P, 2) of row indices. ``load(row)`` returns the image of a row (array
    or PIL image) or None when it cannot be read; that row's pairs are skipped (NaN) and its name (``names[row]``)
    listed. Pairs are visited by first row, so that row's features serve all its partners from the cache."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    cache = FeatureCache(load, scales, side)
    scores = np.full(len(pairs), np.nan, np.float32)
    bar = None
    if progress and len(pairs):
        from tqdm import tqdm

        bar = tqdm(total=len(pairs), desc=desc, unit="pair")
    start = time.perf_counter()
    try:
        for p in np.lexsort((pairs[:, 1], pairs[:, 0])).tolist():
            a, b = cache(int(pairs[p, 0])), cache(int(pairs[p, 1]))
            if a is not None and b is not None:
                scores[p] = pair_ncc(a, b)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return Verification(scores, [names[r] for r in cache.failed], time.perf_counter() - start)


def verified_copies(sims: np.ndarray, ncc: np.ndarray, candidate: np.ndarray, verification: Verification,
                    threshold: float, verify_threshold: float) -> Tuple[np.ndarray, dict]:
    """Which candidate pairs are copies, from their cosines ``sims``, aligned NCC ``ncc`` (NaN where not measured)
    and ``candidate`` mask (all the same shape): NCC >= ``verify_threshold``, or, where an image could not be read,
    cosine >= ``threshold``. Returns (copy mask, the counts and timing `dedup` and `decontaminate` record)."""
    unverified = candidate & np.isnan(ncc)
    copy = (ncc >= verify_threshold) | (unverified & (sims >= threshold))  # NaN >= x is False
    n_candidates = int(candidate.sum())
    return copy, dict(verify_side=DEFAULT_SIDE, verify_scales=list(DEFAULT_SCALES),
                      n_candidates=n_candidates, n_verified_pairs=int((ncc >= verify_threshold).sum()),
                      n_unverified_pairs=int(unverified.sum()), n_unverified_near_pairs=int((unverified & copy).sum()),
                      n_unreadable=len(verification.unreadable), verify_seconds=round(verification.seconds, 3),
                      verify_ms_per_pair=round(1e3 * verification.seconds / max(1, n_candidates), 3))


def report_unreadable(out_dir, names: Sequence[str], params: dict, threshold: float, step: str, log) -> None:
    """Name the images verification could not read (``unreadable.txt``, the first 20 in ``params``) and say what
    it means for step ``step`` (dedup, decontaminate); ``params`` holds `verified_copies`' counts."""
    from pathlib import Path

    from ..files import write_text_atomic

    params["unreadable"] = list(names[:20])
    if not names:
        return
    path = Path(out_dir) / "unreadable.txt"
    write_text_atomic(path, "".join(f"{name}\n" for name in names))
    log(f"[{step}] warning: {len(names)} image(s) could not be read for verification ({', '.join(names[:3])}"
        f"{' ...' if len(names) > 3 else ''}; all in {path}): their {params['n_unverified_pairs']} candidate "
        f"pair(s) were decided by cosine >= {threshold} alone ({params['n_unverified_near_pairs']} kept as copies)")


def file_loader(paths: Sequence[str]) -> Callable[[int], object]:
    """``load(row)`` for plain image files: (H, W, 3) uint8 pixels decoded as training decodes them (16-bit
    images rescaled, not clipped), or None when the file cannot be decoded."""
    def load(row: int):
        from ..data.decode import ImageDecodeError, decode_image_file

        try:
            return decode_image_file(paths[row]).permute(1, 2, 0).numpy()
        except ImageDecodeError:
            return None

    return load


PLAIN_FILES = "rows are read as plain image files (volume slices and slide tiles count as unreadable)"


def reopen_dataset(emb, step: str, consequence: str = PLAIN_FILES, log=print):
    """The dataset `embed` read for `embed.Embeddings` ``emb``, or None when it cannot be reopened (the data moved
    since `embed`), said once with what that means for ``step``."""
    from .embed import open_dataset

    try:
        return open_dataset(emb.params["data"], emb.params["kind"], emb.params["split"])
    except (OSError, ValueError, RuntimeError, ImportError) as exc:
        log(f"[{step}] warning: cannot reopen {emb.params.get('data')} ({exc}): {consequence}")
        return None


def embedding_loader(emb, dataset) -> Callable[[int], object]:
    """``load(row)`` for the rows of `embed.Embeddings` ``emb``: decoded through ``dataset`` (`reopen_dataset`: the
    dataset code `embed` used, so volume slices ``scan.nii.gz::axial=2``, DICOM series and slide tiles decode as
    they were embedded) as (H, W, C) uint8 arrays, None when unreadable. A row whose sample no longer matches its
    path (the data changed since `embed`), or every row when ``dataset`` is None, is read as a plain image file
    instead; a path that is not one (a slice) then counts as unreadable."""
    files = file_loader(emb.paths)
    if dataset is None:
        return files

    def load(row: int):
        sample = emb.samples[row]
        if not (0 <= sample < len(dataset) and dataset.samples[sample][0] == emb.paths[row]):
            return files(row)
        image = dataset.load_image(sample)  # uint8 (C, H, W) tensor, or None (the dataset warned once)
        return None if image is None else image.permute(1, 2, 0).numpy()

    return load
