"""Infinite sharded sampler (coverage, disjointness, resume, O(1) start) and the seeded SSL loader."""

import itertools
import time

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2_repro.data.loaders import (MultiCropDataset, WorkerSeeder, build_ssl_data_loader, make_data_loader,
                                       sample_seed)
from dinov2_repro.data.samplers import InfiniteShardedSampler


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def _reference_stream(size, seed, n):
    """The global stream by definition: concatenated randperm(size, seed + pass)."""
    passes = (torch.randperm(size, generator=torch.Generator().manual_seed(seed + p)).tolist()
              for p in itertools.count())
    return list(itertools.islice(itertools.chain.from_iterable(passes), n))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_are_disjoint_and_cover_each_pass(world):
    size = 10
    per_rank = [_take(InfiniteShardedSampler(size, r, world, seed=4), len(range(r, size, world)))
                for r in range(world)]
    flat = [i for part in per_rank for i in part]
    assert sorted(flat) == list(range(size))  # one pass: disjoint and complete
    # interleaving the ranks gives back the global stream
    streams = [iter(InfiniteShardedSampler(size, r, world, seed=4)) for r in range(world)]
    interleaved = [next(streams[k % world]) for k in range(3 * size + 1)]
    assert interleaved == _reference_stream(size, 4, 3 * size + 1)


@pytest.mark.parametrize("world, start", [(1, 7), (2, 4), (3, 5), (3, 0), (2, 13)])
def test_resume_equals_uninterrupted_stream(world, start):
    for rank in range(world):
        full = _take(InfiniteShardedSampler(7, rank, world, seed=1), start + 12)
        resumed = _take(InfiniteShardedSampler(7, rank, world, seed=1, start=start), 12)
        assert resumed == full[start:]
        with_pos = _take(InfiniteShardedSampler(7, rank, world, seed=1, start=start, with_positions=True), 12)
        assert [i for i, _ in with_pos] == resumed
        assert [p for _, p in with_pos] == [rank + (start + j) * world for j in range(12)]


def test_huge_start_is_constant_time():
    size, world, rank, start = 1000, 4, 3, 10**13
    t0 = time.perf_counter()
    first = _take(InfiniteShardedSampler(size, rank, world, seed=2, start=start), 3)
    assert time.perf_counter() - t0 < 2.0
    position = rank + start * world
    expected = []
    for k in range(3):
        p, offset = divmod(position + k * world, size)
        expected.append(torch.randperm(size, generator=torch.Generator().manual_seed(2 + p))[offset].item())
    assert first == expected


def test_no_shuffle_and_argument_checks():
    assert _take(InfiniteShardedSampler(4, 1, 2, shuffle=False), 5) == [1, 3, 1, 3, 1]
    with pytest.raises(ValueError, match="rank"):
        InfiniteShardedSampler(4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="dataset_size"):
        InfiniteShardedSampler(0)


def test_worker_seeder_depends_on_seed_rank_worker():
    def state(seed, rank, worker):
        WorkerSeeder(seed, rank)(worker)
        return np.random.random(), torch.rand(1).item()

    saved_np, saved_torch = np.random.get_state(), torch.get_rng_state()
    try:
        assert state(0, 0, 1) == state(0, 0, 1)
        assert len({state(0, 0, 1), state(0, 1, 1), state(0, 0, 2), state(1, 0, 1)}) == 4
    finally:
        np.random.set_state(saved_np)
        torch.set_rng_state(saved_torch)
    assert sample_seed(0, 5) == sample_seed(0, 5) != sample_seed(0, 6) != sample_seed(1, 5)


@pytest.fixture
def tiny_dataset(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        for i in range(5):
            path = tmp_path / "ds" / "Training" / cls / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(path)
    (tmp_path / "ds" / "Training" / "b" / "9_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    return tmp_path / "ds"


def _cfg(path, workers=0, batch=4):
    from dinov2_repro.config import load_config

    return load_config(overrides=[
        f"data.path={path}", "data.kind=kaggle", "data.split=Training", "data.augmentation=mri",
        f"data.num_workers={workers}", "data.persistent_workers=false", "data.pin_memory=false",
        "student.patch_size=8", "crops.global_crops_size=32", "crops.local_crops_size=16",
        "crops.local_crops_number=2", f"train.batch_size_per_gpu={batch}", "train.seed=5"])


def _same(a, b):
    return all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_ssl_loader_contract_resume_and_worker_independence(tiny_dataset):
    loader = build_ssl_data_loader(_cfg(tiny_dataset), rank=0, world_size=1, start_iter=0)
    assert isinstance(loader.dataset, MultiCropDataset) and len(loader.dataset) == 11
    threads = torch.get_num_threads()
    with pytest.warns(RuntimeWarning, match="9_corrupt.png"):
        batches = list(itertools.islice(iter(loader), 6))  # 24 samples: > 2 passes, the corrupt file shows up
    assert torch.get_num_threads() == threads  # in-process augmentation runs single-threaded, then restores
    first = batches[0]
    assert first["collated_global_crops"].shape == (2 * (4 - first["n_skipped"]), 3, 32, 32)
    assert first["collated_masks"].shape[1] == 16  # (32 / 8) ** 2 patches
    assert sum(b["n_skipped"] for b in batches) >= 2
    assert all(p.endswith("9_corrupt.png") for b in batches for p in b["skipped_paths"])
    resumed = next(iter(build_ssl_data_loader(_cfg(tiny_dataset), 0, 1, start_iter=3)))
    assert _same(resumed, batches[3])  # bit-identical crops and masks after a resume
    # (workers warn in their own processes; the batch's skipped_paths is what reaches the trainer)
    with_workers = list(itertools.islice(iter(build_ssl_data_loader(_cfg(tiny_dataset, workers=2), 0, 1)), 4))
    assert all(_same(x, y) for x, y in zip(with_workers, batches))  # augmentation independent of workers
    rank1 = next(iter(build_ssl_data_loader(_cfg(tiny_dataset), rank=1, world_size=2, start_iter=0)))
    assert not torch.equal(rank1["collated_global_crops"][:2], first["collated_global_crops"][:2])


def test_make_data_loader_plain_dataset(tiny_dataset):
    from dinov2_repro.data.datasets import ClassFolderDataset

    ds = ClassFolderDataset(tiny_dataset, split="Training", transform=lambda t: t.float().mean())
    sampler = InfiniteShardedSampler(len(ds) - 1, seed=0)  # leave the corrupt file (last) out
    loader = make_data_loader(ds, 3, sampler, num_workers=0, seed=0)
    images, labels = next(iter(loader))
    assert images.shape == (3,) and labels.dtype == torch.int64
