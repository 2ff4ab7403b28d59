"""Pixel verification of copy candidates (curation/verify.py): aligned NCC known answers, a false candidate that the
embedding threshold accepts is removed and a true copy kept, unreadable files skipped and named, and `curate dedup`
with an image broken after `embed`."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from curation_images import shapes_image
from dinov2_repro.curation.verify import aligned_ncc, file_loader, verify_pairs


@pytest.fixture(scope="module")
def photo():
    """A real photograph (scikit-image's astronaut, 512 px) shrunk to 192 px: RGB uint8 (192, 192, 3)."""
    import skimage.data

    return np.asarray(Image.fromarray(skimage.data.astronaut()).resize((192, 192), Image.BICUBIC))


def crop_back(image: np.ndarray, keep: float, left: int, top: int) -> np.ndarray:
    """``keep`` of each side from (left, top), resized back to the full size: the calibration's crop copy."""
    h, w = image.shape[:2]
    box = (left, top, left + round(w * keep), top + round(h * keep))
    return np.asarray(Image.fromarray(image).crop(box).resize((w, h), Image.BICUBIC))


def test_aligned_ncc_known_answers(photo):
    assert aligned_ncc(photo, photo) == pytest.approx(1.0, abs=1e-4)
    # found at scale 0.88 and its offset; 0.97-0.99 at most offsets, down to about 0.946 when the offset falls
    # between two thumbnail pixels (192 px -> 64: thirds of a pixel)
    assert aligned_ncc(photo, crop_back(photo, 0.88, 12, 12)) >= 0.95
    assert aligned_ncc(crop_back(photo, 0.88, 21, 20), photo) >= 0.95  # either order
    brighter = np.clip(photo.astype(np.int16) + 25, 0, 255).astype(np.uint8)
    assert aligned_ncc(photo, brighter) >= 0.99  # NCC ignores gain and offset
    noise = np.random.default_rng(0).integers(0, 256, photo.shape).astype(np.uint8)
    assert aligned_ncc(photo, noise) < 0.3
    assert aligned_ncc(photo, np.ascontiguousarray(photo[::-1])) < 0.6  # the same content upside down is not a copy
    assert aligned_ncc(np.full((40, 40), 7, np.uint8), np.full((50, 50), 9, np.uint8)) == 1.0  # two flat images
    assert aligned_ncc(np.full((40, 40), 7, np.uint8), photo) == 0.0


def test_verification_removes_a_false_candidate_the_embeddings_accepted_and_keeps_a_true_copy(photo):
    """Hand-made embeddings: image 1 (a brightness-shifted copy of 0) and image 2 (another part of the photograph)
    are both at cosine >= 0.99 to image 0; image 3 is far away. Embeddings alone group 0, 1 and 2."""
    from dinov2_repro.curation.dedup import deduplicate

    images = [photo[:96, :96], np.clip(photo[:96, :96].astype(np.int16) - 20, 0, 255).astype(np.uint8),
              photo[96:, 96:], photo[96:, :96]]
    base = np.eye(4, dtype=np.float32)
    vectors = np.stack([base[0], base[0] + 0.1 * base[1], base[0] + 0.12 * base[2], base[3]])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    assert vectors[0] @ vectors[2] > 0.99 and vectors[1] @ vectors[2] > 0.98
    paths, hashes = [f"/d/{i}.png" for i in range(4)], ["a", "b", "c", "d"]

    plain = deduplicate(vectors, hashes, paths, threshold=0.98, k=3)
    assert plain.group[:3].tolist() == [0, 0, 0]

    def verifier(pairs):
        return verify_pairs(pairs, lambda row: images[row], paths, progress=False)

    verified = deduplicate(vectors, hashes, paths, k=3, verifier=verifier)
    assert verified.group.tolist() == [0, 0, -1, -1] and verified.keep.tolist() == [True, False, True, True]
    assert verified.params["verify"] and verified.params["n_verified_pairs"] == 1
    p = verified.pairs.tolist().index([0, 1])
    assert verified.near[p] and verified.ncc[p] > 0.95
    assert verified.params["n_candidates"] == 3  # 0-1, 0-2, 1-2; 3 is below the candidate cosine


def test_the_single_pair_check_scores_as_verification_does(photo):
    """`aligned_ncc` (one pair, the public check) and `verify_pairs` (cached uint8 thumbnails) give each pair the
    same score, to the bit: a copy, a crop, a distinct region and a float image in [0, 1]."""
    images = [photo[:96, :96], crop_back(photo[:96, :96], 0.9, 4, 5), photo[96:, 96:],
              photo[:96, :96].astype(np.float32) / 255.0]
    pairs = np.array([[0, 1], [0, 2], [1, 2], [3, 0], [2, 3]])
    result = verify_pairs(pairs, lambda row: images[row], [str(i) for i in range(4)], progress=False)
    single = np.array([aligned_ncc(images[i], images[j]) for i, j in pairs], np.float32)
    assert np.array_equal(result.scores, single)
    assert single[0] > 0.95 and single[1] < 0.6 and single[3] > 0.99  # and the scores mean what they should


def test_an_unreadable_file_is_skipped_counted_and_named(tmp_path, photo):
    Image.fromarray(photo).save(tmp_path / "a.png")
    Image.fromarray(photo).resize((120, 120), Image.BICUBIC).save(tmp_path / "b.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image at all")
    paths = [str(tmp_path / n) for n in ("a.png", "broken.png", "b.png", "missing.png")]
    result = verify_pairs(np.array([[0, 1], [0, 2], [1, 2], [2, 3]]), file_loader(paths), paths, progress=False)
    assert result.scores[1] > 0.95 and np.isnan(result.scores[[0, 2, 3]]).all()
    assert result.n_skipped_pairs == 3
    assert result.unreadable == [paths[1], paths[3]]  # named once each, in the order met


def test_sixteen_bit_files_are_rescaled_as_training_decodes_them(tmp_path, photo):
    # 12-bit scans in 16-bit PNGs: clipped to 8 bits both would be flat white, and two flat images score 1.0
    gray = photo.mean(axis=2)
    regions = [gray[:96, :96], gray[96:, 96:]]
    for name, region in zip(("a", "b"), regions):
        Image.fromarray((region * (4095 / 255)).astype(np.uint16)).save(tmp_path / f"{name}.png")
    Image.fromarray(regions[0].astype(np.uint8)).save(tmp_path / "a8.png")  # the same region, 8-bit
    paths = [str(tmp_path / n) for n in ("a.png", "b.png", "a8.png")]
    load = file_loader(paths)
    assert load(0).dtype == np.uint8 and load(0).std() > 20  # not saturated
    result = verify_pairs(np.array([[0, 1], [0, 2]]), load, paths, progress=False)
    assert result.scores[0] < 0.5 and result.scores[1] > 0.95


def shapes(seed: int, size: int = 64) -> Image.Image:
    return shapes_image(seed, size, rectangles=5)


def test_dedup_cli_verifies_and_names_an_image_broken_after_embedding(tmp_path):
    pytest.importorskip("faiss")
    from dinov2_repro.curation.cli import main

    from test_curation_dedup import TINY

    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        shapes(i).save(images / f"img{i}.png")
    shapes(0).resize((48, 48), Image.BICUBIC).save(images / "zz_small0.png")  # a copy of img0
    assert main(["embed", "--data", str(images), "--backbone", TINY, "--out", str(tmp_path / "emb"),
                 "--no-progress"]) == 0
    (images / "img3.png").write_bytes(b"broken after embedding")
    out = tmp_path / "dedup"
    with pytest.warns(RuntimeWarning, match="img3.png"):  # the dataset's own one-line warning
        assert main(["dedup", "--embeddings", str(tmp_path / "emb"), "--out", str(out), "--no-progress",
                     "--no-figure"]) == 0
    params = json.loads((out / "params.json").read_text())
    assert params["verify"] and params["n_unreadable"] == 1 and params["unreadable"][0].endswith("img3.png")
    assert (out / "unreadable.txt").read_text().strip().endswith("img3.png")
    for key in ("candidate_threshold", "verify_threshold", "k", "verify_side", "verify_scales", "verify_ms_per_pair"):
        assert key in params, key
    with open(out / "edges.csv") as handle:
        edges = list(csv.DictReader(handle))
    assert [(e["path_a"].rsplit("/", 1)[-1], e["path_b"].rsplit("/", 1)[-1], e["how"]) for e in edges] == [
        ("img0.png", "zz_small0.png", "ncc")]
    assert float(edges[0]["ncc"]) > 0.95
    assert "## Verification" in (out / "report.md").read_text()


def test_the_fft_ncc_is_skimage_match_template(photo):
    """The FFT form equals `skimage.feature.match_template` (valid windows) at every scale of the grid."""
    from skimage.feature import match_template

    from dinov2_repro.curation.verify import (DEFAULT_SCALES, band_pass, gray_thumbnail, image_features,
                                              ncc_surfaces, shrink_matrices, template_sizes)

    a, b = gray_thumbnail(photo), gray_thumbnail(crop_back(photo, 0.9, 6, 9))
    surfaces = ncc_surfaces(image_features(a), image_features(b))
    sizes = template_sizes(64, DEFAULT_SCALES)
    matrices, _ = shrink_matrices(64, sizes)
    for k in (0, 5, 10):
        size = sizes[k]
        template = (matrices[k] @ band_pass(b) @ matrices[k].T)[:size, :size]
        expected = match_template(band_pass(a), template)  # (65 - size, 65 - size)
        assert np.allclose(surfaces[k][:65 - size, :65 - size], expected, atol=2e-4)


def test_volume_slices_are_verified_through_the_dataset_and_a_vanished_folder_is_said(tmp_path, capsys):
    """Slices (``scan.nii.gz::axial=k``) are decoded as `embed` decoded them; with the data folder gone, each row
    is tried as a plain file, counted unreadable, named, and its pairs decided by the cosine alone."""
    nib = pytest.importorskip("nibabel")
    pytest.importorskip("faiss")
    from dinov2_repro.curation.cli import main

    from test_curation_dedup import TINY

    volume = np.stack([np.asarray(shapes(i, 48).convert("L"), np.float32) for i in range(8)], axis=-1)
    volume[..., 6] = volume[..., 2] + 30 + np.random.default_rng(0).normal(0, 2, (48, 48))  # a shifted copy
    (tmp_path / "data").mkdir()
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / "data" / "scan.nii.gz"))
    assert main(["embed", "--data", str(tmp_path / "data"), "--backbone", TINY, "--out", str(tmp_path / "emb"),
                 "--no-progress"]) == 0
    assert main(["dedup", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "dedup"),
                 "--no-progress", "--no-figure"]) == 0
    with open(tmp_path / "dedup" / "edges.csv") as handle:
        edges = [(e["path_a"].rsplit("/", 1)[-1], e["path_b"].rsplit("/", 1)[-1], e["how"])
                 for e in csv.DictReader(handle)]
    assert edges == [("scan.nii.gz::axial=2", "scan.nii.gz::axial=6", "ncc")]

    (tmp_path / "data").rename(tmp_path / "moved")
    assert main(["dedup", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "again"),
                 "--no-progress", "--threshold", "0.9"]) == 0
    log = capsys.readouterr().out
    assert "cannot reopen" in log and "8 image(s) could not be read for verification" in log
    assert main(["dedup", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "plain"),
                 "--no-verify"]) == 0  # nothing to draw the example pairs from: said, and the lists still written
    assert "no pairs.png" in capsys.readouterr().out and (tmp_path / "plain" / "kept.csv").is_file()
    params = json.loads((tmp_path / "again" / "params.json").read_text())
    assert params["n_unreadable"] == 8 and params["n_unverified_near_pairs"] >= 1  # the cosine rule still applies
