"""`curate cluster` / `curate sample` (curation/cluster.py): hierarchical k-means levels, water-filling, and a
balanced sample of a planted, very unequal mixture."""

import csv
import json

import numpy as np
import pytest

pytest.importorskip("faiss")

from test_curation_dedup import TINY, shapes_image  # noqa: E402
from test_engine_common import TINY as TINY_TRAIN  # noqa: E402

from dinov2_repro.curation.cli import main  # noqa: E402
from dinov2_repro.curation.cluster import (balanced_sample, hierarchical_kmeans, level_sizes,  # noqa: E402
                                           point_clusters, water_fill)
from dinov2_repro.data.datasets import CsvDataset  # noqa: E402
from dinov2_repro.train import engine  # noqa: E402

SIZES = (3000, 600, 150, 60, 30)  # points per true component: 100x between the largest and the smallest


def mixture(seed=0, dim=16, spread=10.0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(len(SIZES), dim)) * spread
    x = np.concatenate([means[c] + rng.normal(size=(n, dim)) for c, n in enumerate(SIZES)])
    return x.astype(np.float32), np.repeat(np.arange(len(SIZES)), SIZES)


def test_water_fill_shares_equally_and_passes_on_what_a_small_bin_cannot_take():
    rng = np.random.default_rng(0)
    first, second, small = water_fill([100, 100, 5], 60, rng).tolist()  # 20 each, then 7 + 7, then 1 left
    assert small == 5 and sorted([first, second]) == [27, 28]
    assert water_fill([3, 2], 10, rng).tolist() == [3, 2]  # never more than a bin holds


def test_levels_have_the_configured_sizes_and_are_deterministic():
    x, _ = mixture()
    levels = hierarchical_kmeans(x, (40, 5), resampling_steps=2, seed=0, niter=10)
    assert [level.centroids.shape for level in levels] == [(40, 16), (5, 16)]
    assert levels[0].assign.shape == (len(x),) and levels[1].assign.shape == (40,)
    clusters = point_clusters(levels)
    assert clusters.shape == (len(x), 2)
    sizes = level_sizes(clusters, [40, 5])
    assert [len(s) for s in sizes] == [40, 5] and sum(sizes[0]) == sum(sizes[1]) == len(x)
    again = point_clusters(hierarchical_kmeans(x, (40, 5), resampling_steps=2, seed=0, niter=10))
    assert np.array_equal(clusters, again)


def test_balanced_sample_is_much_flatter_than_uniform_on_an_unequal_mixture():
    x, truth = mixture()
    clusters = point_clusters(hierarchical_kmeans(x, (40, 5), resampling_steps=2, seed=0, niter=10))
    chosen = balanced_sample(clusters, 300, seed=0)
    assert len(chosen) == 300 and len(set(chosen.tolist())) == 300
    balanced = np.bincount(truth[chosen], minlength=len(SIZES)) / 300
    uniform = np.bincount(truth[np.random.default_rng(0).choice(len(x), 300, replace=False)],
                          minlength=len(SIZES)) / 300
    # Stated bound: the largest component falls from 78 % of the data to at most 40 % of the sample, the smallest
    # keeps at least 2/3 of its 30 images (uniform sampling keeps about 2), and the spread of the shares is at
    # most a third of uniform sampling's.
    assert balanced[0] <= 0.40 and balanced[-1] * 300 >= 20 and uniform[-1] * 300 <= 6
    assert balanced.std() <= uniform.std() / 3


def test_cluster_and_sample_cli_write_a_manifest_that_pretrains(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(24):
        shapes_image(i).save(images / f"img{i:02d}.png")
    assert main(["embed", "--data", str(images), "--backbone", TINY, "--out", str(tmp_path / "emb"),
                 "--no-progress"]) == 0
    assert main(["cluster", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "clu"),
                 "--ks", "6,2", "--resampling-steps", "1"]) == 0
    params = json.loads((tmp_path / "clu" / "params.json").read_text())
    assert [len(s) for s in params["sizes"]] == [6, 2] and params["ks"] == [6, 2]
    assert main(["sample", "--clusters", str(tmp_path / "clu"), "--size", "10", "--out", str(tmp_path / "s")]) == 0
    sampled = CsvDataset(tmp_path / "s" / "sampled.csv")
    assert len(sampled) == 10 and all(p.startswith(str(images)) for p, _ in sampled.samples)
    with open(tmp_path / "clu" / "clusters.csv") as handle:
        assert list(csv.DictReader(handle))[0].keys() == {"path", "label", "level1", "level2"}
    assert main(["cluster", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "x"), "--ks", "0"]) == 2
    half = tmp_path / "half.csv"  # --subset: only the images a manifest lists (dedup's kept.csv)
    half.write_text("path\n" + "".join(f"{images / f'img{i:02d}.png'}\n" for i in range(0, 24, 2)))
    assert main(["cluster", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "sub"), "--ks", "3",
                 "--subset", str(half)]) == 0
    with open(tmp_path / "sub" / "clusters.csv") as handle:
        assert sorted(r["path"] for r in csv.DictReader(handle)) == sorted(
            str(images / f"img{i:02d}.png") for i in range(0, 24, 2))
    manifest = tmp_path / "s" / "sampled.csv"
    assert engine.main(["--output-dir", str(tmp_path / "run"), *TINY_TRAIN, f"data.path={manifest}", "data.kind=csv",
                        "train.max_iterations=2"]) == 0
    assert (tmp_path / "run" / "export").is_dir()
