"""`curate retrieve` (curation/retrieve.py): planted neighbours are recovered, by k-NN and by clusters."""

import csv

import numpy as np
import pytest

pytest.importorskip("faiss")

from test_curation_dedup import TINY, shapes_image, unit  # noqa: E402

from dinov2_repro.curation.calibration import planted_copy  # noqa: E402
from dinov2_repro.curation.cli import main  # noqa: E402
from dinov2_repro.curation.cluster import kmeans  # noqa: E402
from dinov2_repro.curation.retrieve import retrieve_clusters, retrieve_knn  # noqa: E402
from dinov2_repro.data.datasets import CsvDataset  # noqa: E402


def test_knn_retrieval_recovers_planted_neighbours():
    rng = np.random.default_rng(0)
    pool = unit(rng.normal(size=(300, 16)))
    planted = [5, 50, 150, 299]
    queries = unit(pool[planted] + 0.05 * rng.normal(size=(4, 16)))
    pairs, params = retrieve_knn(queries, pool, k=1)
    assert [(q, p) for q, p, _ in pairs] == list(enumerate(planted)) and params["kind"] == "IndexFlatIP"
    pairs, _ = retrieve_knn(queries, pool, k=3, min_cosine=0.95)  # the other neighbours are far: cut off
    assert [p for _, p, _ in pairs] == planted


def test_cluster_retrieval_takes_the_query_s_cluster():
    rng = np.random.default_rng(1)
    centres = unit(rng.normal(size=(3, 16))) * 10
    pool = np.concatenate([c + rng.normal(size=(40, 16)) for c in centres]).astype(np.float32)
    truth = np.repeat(np.arange(3), 40)
    centroids = kmeans(pool, 3, seed=0)
    assign = ((pool[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    query = (centres[2] + 0.1 * rng.normal(size=16))[None].astype(np.float32)
    everything = retrieve_clusters(query, centroids, assign, per_query=0)
    assert sorted(p for _, p, _ in everything) == np.flatnonzero(truth == 2).tolist()
    some = retrieve_clusters(query, centroids, assign, per_query=5, seed=0)
    assert len(some) == 5 and all(truth[p] == 2 for _, p, _ in some)
    again = retrieve_clusters(query, centroids, assign, per_query=5, seed=0)
    assert [p for _, p, _ in some] == [p for _, p, _ in again]  # seeded


def test_retrieve_cli_writes_the_pool_images_of_the_queries(tmp_path):
    pool, queries = tmp_path / "pool", tmp_path / "queries"
    pool.mkdir(), queries.mkdir()
    for i in range(16):
        shapes_image(i).save(pool / f"pool{i:02d}.png")
    rng = np.random.default_rng(0)
    planted_copy(shapes_image(3), "jpeg", rng).save(queries / "q3.png")
    planted_copy(shapes_image(11), "resize", rng).save(queries / "q11.png")
    for folder in (pool, queries):
        assert main(["embed", "--data", str(folder), "--backbone", TINY, "--out", str(tmp_path / f"emb_{folder.name}"),
                     "--no-progress"]) == 0
    out = tmp_path / "knn"
    assert main(["retrieve", "--queries", str(tmp_path / "emb_queries"), "--pool", str(tmp_path / "emb_pool"),
                 "--out", str(out), "--k", "1"]) == 0
    names = sorted(p.rsplit("/", 1)[-1] for p, _ in CsvDataset(out / "retrieved.csv").samples)
    assert names == ["pool03.png", "pool11.png"]
    with open(out / "pairs.csv") as handle:
        assert {r["query"].rsplit("/", 1)[-1]: r["pool"].rsplit("/", 1)[-1] for r in csv.DictReader(handle)} == {
            "q3.png": "pool03.png", "q11.png": "pool11.png"}
    assert main(["cluster", "--embeddings", str(tmp_path / "emb_pool"), "--out", str(tmp_path / "clu"),
                 "--ks", "4", "--resampling-steps", "0"]) == 0
    assert main(["retrieve", "--queries", str(tmp_path / "emb_queries"), "--pool", str(tmp_path / "emb_pool"),
                 "--out", str(tmp_path / "by_cluster"), "--clusters", str(tmp_path / "clu")]) == 0
    retrieved = {p.rsplit("/", 1)[-1] for p, _ in CsvDataset(tmp_path / "by_cluster" / "retrieved.csv").samples}
    assert {"pool03.png", "pool11.png"} <= retrieved
