"""Near-duplicate detection between training and test images (difference hash, Krawetz 2013).

The Kaggle brain-MRI set holds near-identical slices in both Training and Testing (recipe section 7), which
inflates test accuracy. Each image is reduced to a 256-bit difference hash: grayscale, resized (antialiased) to
17 x 16, one bit per "is this cell brighter than its left neighbour by more than 2 grey levels". The margin keeps
flat regions at 0 whatever their noise; the usual 64-bit hash (9 x 8, no margin) is too coarse for MRI slices,
which all share one layout (on the synthetic phantoms, distinct images are then often within 4 bits). Measured on
the synthetic set: a resized, JPEG-compressed copy stays within 3 bits, distinct images are 20+ bits apart.
Two images whose hashes differ in at most ``max_distance`` bits are near-duplicates. The report then gives the test metrics a second time without the test images that have a
near-duplicate among the training (train + val) images.

Next to the hash, the linear probe and k-NN also count the test images whose CLS embedding (the features they
already extracted) has cosine >= ``data.dedup_cosine`` with a training image: the copy detection of
`dinov2-repro curate dedup`, whose threshold is calibrated in docs/curation.md. That count is reported, not removed
from the *w/o near-dups* accuracy, which stays the hash's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Tuple

import torch
from torch import Tensor

from ..data.datasets import image_list_sha1, loader_workers
from ..models.weights import read_weights_file, write_tensor_file


HASH_SIDE = 16  # bits = HASH_SIDE ** 2
HASH_MARGIN = 2.0  # grey levels (0..255)


def difference_hash(image: Tensor) -> Tensor:
    """uint8 (3, H, W) -> bool (256,) difference hash (see module docstring)."""
    from torchvision.transforms.v2 import functional as TF

    gray = image.float().mean(0, keepdim=True)  # (1, H, W)
    small = TF.resize(gray, [HASH_SIDE, HASH_SIDE + 1], antialias=True)[0]  # (16, 17)
    return (small[:, 1:] - small[:, :-1] > HASH_MARGIN).flatten()


class _HashImages(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image = self.dataset.load_image(index)
        ok = image is not None
        return (difference_hash(image) if ok else torch.zeros(HASH_SIDE ** 2, dtype=torch.bool)), ok


def image_hashes(dataset, num_workers: int = 0, progress: bool = False, desc: str = "hashes") -> Tuple[Tensor, Tensor]:
    """(bits (N, 256) bool, decodable (N,) bool) for every image of an `ImageFileDataset`, in order."""
    loader = torch.utils.data.DataLoader(_HashImages(dataset), batch_size=64,
                                         num_workers=loader_workers(num_workers, len(dataset), 64))
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc=desc, unit="batch", leave=False)
    bits, ok = zip(*[(b, o) for b, o in loader])
    return torch.cat(bits), torch.cat(ok)


def cached_image_hashes(dataset, cache_dir: os.PathLike | str, split: str, num_workers: int = 0,
                        progress: bool = False) -> Tuple[Tensor, Tensor]:
    """`image_hashes` cached under ``cache_dir``, keyed by the image list (paths, labels, sizes, mtimes)."""
    key = image_list_sha1(dataset.samples)
    path = Path(cache_dir) / f"dhash_{split}_{key[:20]}.pt"
    if path.is_file():
        stored = read_weights_file(path)
        return stored["bits"], stored["ok"]
    bits, ok = image_hashes(dataset, num_workers, progress, desc=f"hashes {split}")
    write_tensor_file(path, dict(bits=bits, ok=ok))
    return bits, ok


def near_duplicates(reference_bits: Tensor, query_bits: Tensor, max_distance: int,
                    reference_ok: Tensor = None, query_ok: Tensor = None) -> Tuple[Tensor, Tensor]:
    """(is_duplicate (N_query,) bool, min Hamming distance (N_query,)) of each query to the reference set."""
    ref = reference_bits.float()
    if reference_ok is not None:
        ref = ref[reference_ok]
    query = query_bits.float()
    n_bits = query.shape[1]
    if ref.shape[0] == 0:
        distance = torch.full((query.shape[0],), n_bits + 1)
    else:
        # Hamming distance = n_bits - agreements; agreements = a.b + (1-a).(1-b), one matmul each
        agree = query @ ref.T + (1 - query) @ (1 - ref).T  # (N_query, N_ref)
        distance = (n_bits - agree).min(dim=1).values.round().long()
    duplicate = distance <= max_distance
    if query_ok is not None:
        duplicate &= query_ok
    return duplicate, distance


def embedding_near_duplicates(reference: Tensor, query: Tensor, min_cosine: float,
                              backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """(is_duplicate (N_query,) bool, max cosine (N_query,)) of each query embedding to the reference embeddings."""
    from .knn import nearest_neighbours

    if reference.shape[0] == 0:
        cosine = torch.full((query.shape[0],), -1.0)
    else:
        cosine = nearest_neighbours(reference, query, k=1, backend=backend)[0][:, 0].cpu()
    return cosine >= min_cosine, cosine
