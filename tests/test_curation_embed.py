"""`curate embed` (curation/embed.py): unit-norm fp16 shards, resumable, rank-sharded, bad files named."""

import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("faiss")

from dinov2_repro.curation.embed import embed_dataset, load_embeddings, shard_paths  # noqa: E402

# LayerScale 1 (not the 1e-5 of training from scratch): a random CLS token then depends on the image
TINY = "random:vit_small/8,embed_dim=32,depth=2,num_heads=2,img_size=32,init_values=1"


def make_images(folder, n=9, size=40, seed=0, bad=("broken.png",)):
    """``n`` distinct random colour images and unreadable files named ``bad``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
    for name in bad:
        (folder / name).write_bytes(b"not an image")
    return folder


def snapshot(folder):
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("embed") / "images")


def embed(images, out, **kw):
    kw.setdefault("shard_size", 4)
    return embed_dataset(str(images), out, TINY, batch_size=3, progress=False, log=lambda *_: None, **kw)


def test_embeddings_are_unit_norm_fp16_and_bad_files_are_named(images, tmp_path):
    before = snapshot(images)
    with pytest.warns(RuntimeWarning, match="broken.png"):
        summary = embed(images, tmp_path / "emb")
    assert summary["complete"] and summary["n_shards"] == 3  # 10 files, 4 per shard
    assert [p.rsplit("/", 1)[-1] for p in summary["skipped"]] == ["broken.png"]
    assert (tmp_path / "emb" / "skipped.txt").read_text().strip().endswith("broken.png")
    assert np.load(shard_paths(tmp_path / "emb", 0)["emb"]).dtype == np.float16
    emb = load_embeddings(tmp_path / "emb")
    assert emb.vectors.shape == (9, 32) and len(emb.paths) == 9 and len(set(emb.hashes)) == 9
    assert np.allclose(np.linalg.norm(emb.vectors, axis=1), 1.0, atol=2e-3)
    assert not np.allclose(emb.vectors[0], emb.vectors[1], atol=1e-2)  # image-dependent, not a constant
    assert all(p.startswith("/") for p in emb.paths) and emb.skipped[0].endswith("broken.png")
    assert snapshot(images) == before  # the user's folder is never written


def test_a_second_run_recomputes_nothing_and_a_half_done_run_completes_identically(images, tmp_path):
    out = tmp_path / "emb"
    embed(images, out)
    first = load_embeddings(out)
    files = snapshot(out / "shards")
    assert embed(images, out)["shards_done"] == []
    assert snapshot(out / "shards") == files
    for path in shard_paths(out, 1).values():  # as if killed while shard 1 ran
        path.unlink()
    (out / "index.csv").unlink()
    with pytest.raises(RuntimeError, match="not embedded yet"):
        load_embeddings(out)
    assert embed(images, out)["shards_done"] == [1]
    again = load_embeddings(out)
    assert np.array_equal(again.vectors, first.vectors) and again.paths == first.paths


def test_other_settings_in_the_same_folder_are_refused(images, tmp_path):
    embed(images, tmp_path / "emb")
    with pytest.raises(ValueError, match="shard_size"):
        embed(images, tmp_path / "emb", shard_size=5)


def test_ranks_embed_disjoint_shards_that_add_up_to_the_single_run(images, tmp_path):
    embed(images, tmp_path / "single")
    rank0 = embed(images, tmp_path / "ranked", rank=0, world_size=2)
    assert rank0["shards_done"] == [0, 2] and not rank0["complete"]
    rank1 = embed(images, tmp_path / "ranked", rank=1, world_size=2)
    assert rank1["shards_done"] == [1] and rank1["complete"]  # the last rank to finish writes the index
    single, ranked = load_embeddings(tmp_path / "single"), load_embeddings(tmp_path / "ranked")
    assert np.array_equal(single.vectors, ranked.vectors) and single.paths == ranked.paths
    assert json.loads((tmp_path / "ranked" / "params.json").read_text())["n_shards"] == 3


def test_a_relative_data_path_resumes_the_absolute_one(images, tmp_path, monkeypatch):
    embed(images, tmp_path / "emb")
    monkeypatch.chdir(images.parent)
    assert embed(images.name, tmp_path / "emb")["shards_done"] == []


def test_volume_slices_are_embedded_one_by_one(tmp_path):
    pytest.importorskip("nibabel")
    from test_data_volumes import NZ, pattern, save

    save(pattern(), np.eye(4), tmp_path / "volumes" / "scan.nii.gz")
    summary = embed(tmp_path / "volumes", tmp_path / "emb")
    emb = load_embeddings(tmp_path / "emb")
    assert summary["complete"] and len(emb) == NZ - 3  # the three empty slices are skipped by the dataset
    assert all("scan.nii.gz::axial=" in p for p in emb.paths) and len(set(emb.hashes)) == NZ - 3
