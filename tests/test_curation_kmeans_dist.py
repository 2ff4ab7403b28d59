"""k-means over ranks (curation/kmeans_dist.py): two gloo processes, each holding part of the points, against one
process holding them all; and `curate cluster` under two ranks against one.

One process group per spawn: the k-means cases share a spawn, the CLI case has its own (torchrun's variables)."""

import json
import os
import socket

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("faiss")

from test_curation_cluster import mixture  # noqa: E402

from dinov2_repro.curation.cli import main  # noqa: E402
from dinov2_repro.curation.cluster import (assign_to, closest_members, hierarchical_kmeans, kmeans,  # noqa: E402
                                           point_clusters)
from dinov2_repro.curation.embed import embedding_rows, load_embeddings  # noqa: E402
from dinov2_repro.curation.kmeans_dist import (Ranks, closest_members_ranks, group_ranks,  # noqa: E402
                                               hierarchical_kmeans_ranks, kmeans_ranks, lloyd, update_centroids)
from dinov2_repro.distributed.env import teardown  # noqa: E402

CUT = 1700  # rank 0 holds rows [0, 1700) of the 3840, rank 1 the rest: uneven shards
KS, STEPS, NITER = (40, 5), 2, 10


def far_init(x):
    """k-means++ seeds of 6 clusters with one moved far from every point: that cluster is empty at step 1."""
    init = kmeans(x, 6, 0, niter=0)
    init[2] = 1000.0
    return init


def tied_points():
    """Rows 0-49 and their exact copies 50-99: every distance ties, and the lower row must win."""
    x, _ = mixture()
    return np.concatenate([x[:50], x[:50]])


def scenarios(x, rank, world):
    """Each case on this rank's rows (rank None: every row, one process)."""
    def part(a, cut):
        return a if rank is None else (a[:cut] if rank == 0 else a[cut:])

    ranks = Ranks() if rank is None else Ranks(rank, world)
    levels = hierarchical_kmeans_ranks(part(x, CUT), KS, STEPS, 0, 0, NITER, ranks)
    empty = lloyd(part(x, CUT), far_init(x), 3, ranks)
    lopsided = kmeans_ranks(part(x, len(x)), 5, 0, NITER, ranks=ranks)  # rank 1 holds no point at all
    sampled = kmeans_ranks(part(x, CUT), 5, 0, NITER, ranks=ranks, init_sample=500)  # seeds from 500 rows
    tied = tied_points()
    centroids = kmeans(tied, 3, 0, 5)
    members = closest_members_ranks(part(tied, 50), centroids, assign_to(centroids, part(tied, 50)), 7, ranks)
    return dict(level1=levels[0].centroids, level2=levels[1].centroids, assign1=levels[0].assign,
                assign2=levels[1].assign, empty=empty, lopsided=lopsided, sampled=sampled,
                members=members)


def _kmeans_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        assert group_ranks() == Ranks(rank, world)
        x, _ = mixture()
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **scenarios(x, rank, world))
    finally:
        teardown()


@pytest.mark.timeout(120)
def test_two_ranks_equal_one_process_lloyd_and_faiss(tmp_path):
    mp.spawn(_kmeans_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (np.load(tmp_path / f"rank{r}.npz") for r in range(2))
    x, _ = mixture()
    one = scenarios(x, None, 1)
    for key in ("level1", "level2", "empty", "lopsided", "sampled"):  # the same centroids on both ranks, as one process
        assert np.array_equal(r0[key], r1[key]), key
        np.testing.assert_array_equal(r0[key], one[key], err_msg=key)  # bit for bit, as docs/curation.md says
    assert np.array_equal(np.concatenate([r0["assign1"], r1["assign1"]]), one["assign1"])
    assert np.array_equal(r0["assign2"], one["assign2"]) and np.array_equal(r1["assign2"], one["assign2"])
    # resampling over ranks: each rank's share of the global closest members; ties go to the lower row (rank 0)
    tied = tied_points()
    centroids = kmeans(tied, 3, 0, 5)
    single = closest_members(tied, centroids, assign_to(centroids, tied), 7)
    assert np.array_equal(np.concatenate([r0["members"], r1["members"] + 50]), single)
    assert set(r1["members"].tolist()) < set(r0["members"].tolist())  # a copy (rank 1) only after its original
    # the empty cluster was split off the largest, and no cluster is empty after the last step
    assert len(np.unique(assign_to(one["empty"], x))) == 6
    # against faiss's own Lloyd's (the single-process path) from the same seeds: same clusters, centroids within
    # float rounding (measured: 3.8e-6 for coordinates up to 26.6)
    faiss_levels = hierarchical_kmeans(x, KS, STEPS, 0, 0, NITER)
    assert np.array_equal(point_clusters(faiss_levels),
                          np.stack([one["assign1"], one["assign2"][one["assign1"]]], axis=1))
    np.testing.assert_allclose(faiss_levels[0].centroids, r0["level1"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(faiss_levels[1].centroids, r0["level2"], rtol=0, atol=1e-4)


def test_update_splits_an_empty_cluster_off_the_largest_as_faiss_does():
    sums = np.array([[2.0, 4.0], [0.0, 0.0], [9.0, 3.0], [0.0, 0.0]])
    counts = np.array([2, 0, 3, 0])
    centroids = update_centroids(sums, counts)
    eps = 1 / 1024
    assert centroids.dtype == np.float32 and centroids.shape == (4, 2)
    # cluster 1 splits the largest, cluster 2 (3 points, mean (3, 1)), which keeps 1.5 of them; cluster 0 (2 points,
    # mean (1, 2)) is then the largest, and cluster 3 splits it
    np.testing.assert_allclose(centroids[1], [3 * (1 + eps), 1 - eps], rtol=1e-6)
    np.testing.assert_allclose(centroids[2], [3 * (1 - eps), 1 + eps], rtol=1e-6)
    np.testing.assert_allclose(centroids[3], [1 + eps, 2 * (1 - eps)], rtol=1e-6)
    np.testing.assert_allclose(centroids[0], [1 - eps, 2 * (1 + eps)], rtol=1e-6)


def fake_embed_folder(folder, x, shard_sizes):
    """An `embed` folder holding ``x`` in shards of ``shard_sizes`` rows (fp16, as embed writes them)."""
    shards = folder / "shards"
    shards.mkdir(parents=True)
    start = 0
    for s, size in enumerate(shard_sizes):
        np.save(shards / f"emb_{s:05d}.npy", x[start:start + size].astype(np.float16))
        (shards / f"rows_{s:05d}.csv").write_text("sample,path,label,sha1\n" + "".join(
            f"{i},/data/img{i:05d}.png,{i % 3},{i:040x}\n" for i in range(start, start + size)))
        (shards / f"done_{s:05d}.json").write_text(json.dumps(dict(shard=s, n_embedded=size, skipped=[])))
        start += size
    (folder / "params.json").write_text(json.dumps(dict(n_shards=len(shard_sizes), classes=["a", "b", "c"])))
    return folder


def test_embedding_rows_reads_the_rows_of_any_shard(tmp_path):
    x, _ = mixture()
    folder = fake_embed_folder(tmp_path / "emb", x / 10, [1000, 0, 1500, 1340])
    rows = np.array([0, 999, 1000, 2499, 2500, 3839])
    assert np.array_equal(embedding_rows(folder, rows), load_embeddings(folder).vectors[rows])
    assert embedding_rows(folder, rows[:0]).shape == (0, 16)
    assert load_embeddings(folder, vectors=False).vectors.shape == (3840, 0)
    with pytest.raises(ValueError, match="increasing"):
        embedding_rows(folder, np.array([5, 3]))


def cluster_args(emb, out, subset):
    return ["cluster", "--embeddings", str(emb), "--out", str(out), "--ks", ",".join(map(str, KS)),
            "--resampling-steps", str(STEPS), "--niter", str(NITER), "--subset", str(subset)]


def _cli_worker(rank, world, port, emb, out, subset):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # as torchrun sets them
    assert main(cluster_args(emb, out, subset)) == 0


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(120)
def test_cluster_cli_under_two_ranks_writes_what_one_process_writes(tmp_path):
    x, _ = mixture()
    emb = fake_embed_folder(tmp_path / "emb", x / 10, [1000, 0, 1500, 1340])  # rank 1's share starts in shard 2
    subset = tmp_path / "subset.csv"  # every row but each 7th: the ranks split the listed rows, not the shards
    subset.write_text("path\n" + "".join(f"/data/img{i:05d}.png\n" for i in range(len(x)) if i % 7))
    assert main(cluster_args(emb, tmp_path / "one", subset)) == 0
    mp.spawn(_cli_worker, args=(2, free_port(), str(emb), str(tmp_path / "two"), str(subset)), nprocs=2, join=True)
    one, two = tmp_path / "one", tmp_path / "two"
    assert (one / "clusters.csv").read_text() == (two / "clusters.csv").read_text()
    for level in (1, 2):  # faiss's Lloyd's (one process) and the all-reduced one agree to float rounding
        np.testing.assert_allclose(np.load(one / f"centroids_level{level}.npy"),
                                   np.load(two / f"centroids_level{level}.npy"), rtol=0, atol=1e-5)
    p1, p2 = (json.loads((d / "params.json").read_text()) for d in (one, two))
    assert p2.pop("world_size") == 2 and p2.pop("init_sample") > len(x)  # so the seeds are one process's
    assert p1 == p2 and p1["n"] == len(x) - len(range(0, len(x), 7))
