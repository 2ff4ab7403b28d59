"""`curate decontaminate` (curation/decontaminate.py): exactly the planted overlaps with the evaluation set go."""

import csv
import json

import numpy as np
import pytest

pytest.importorskip("faiss")

from test_curation_dedup import TINY, shapes_image  # noqa: E402

from dinov2_repro.curation.calibration import planted_copy  # noqa: E402
from dinov2_repro.curation.cli import main  # noqa: E402
from dinov2_repro.data.datasets import CsvDataset  # noqa: E402


def test_decontamination_removes_exactly_the_planted_overlaps(tmp_path):
    pretrain, evaluation = tmp_path / "pretrain", tmp_path / "eval"
    pretrain.mkdir(), evaluation.mkdir()
    for i in range(10):
        shapes_image(i).save(pretrain / f"p{i:02d}.png")
    for i in range(100, 106):
        shapes_image(i).save(evaluation / f"e{i}.png")
    shapes_image(100).save(pretrain / "leak_exact.png")  # the same pixels as an evaluation image
    planted_copy(shapes_image(101), "jpeg", np.random.default_rng(0)).save(pretrain / "leak_jpeg.png")
    planted_copy(shapes_image(102), "resize", np.random.default_rng(1)).save(pretrain / "leak_resize.png")
    assert main(["embed", "--data", str(pretrain), "--backbone", TINY, "--out", str(tmp_path / "emb"),
                 "--no-progress"]) == 0
    out = tmp_path / "clean"
    assert main(["decontaminate", "--embeddings", str(tmp_path / "emb"), "--against", str(evaluation),
                 "--out", str(out), "--threshold", "0.995"]) == 0
    with open(out / "removed.csv") as handle:
        removed = {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader(handle)}
    assert set(removed) == {"leak_exact.png", "leak_jpeg.png", "leak_resize.png"}
    assert removed["leak_exact.png"]["exact"] == "1" and removed["leak_jpeg.png"]["exact"] == "0"
    assert removed["leak_jpeg.png"]["evaluation_path"].endswith("e101.png")
    kept = sorted(p.rsplit("/", 1)[-1] for p, _ in CsvDataset(out / "kept.csv").samples)
    assert kept == [f"p{i:02d}.png" for i in range(10)]
    params = json.loads((out / "params.json").read_text())
    assert (params["n_removed"], params["n_evaluation"], params["step"]) == (3, 6, "decontaminate")
    # the evaluation set, already embedded, is accepted as it is
    assert main(["decontaminate", "--embeddings", str(tmp_path / "emb"), "--against", str(out / "against"),
                 "--out", str(tmp_path / "again"), "--threshold", "0.995"]) == 0
    assert (tmp_path / "again" / "removed.csv").read_text() == (out / "removed.csv").read_text()
    assert params["verify"] and params["n_verified_pairs"] == 3  # the three leaks (the exact one too) on pixels
    # --no-verify: the nearest evaluation image at cosine >= --threshold, as before verification existed
    assert main(["decontaminate", "--embeddings", str(tmp_path / "emb"), "--against", str(out / "against"),
                 "--out", str(tmp_path / "plain"), "--threshold", "0.995", "--no-verify"]) == 0
    plain = json.loads((tmp_path / "plain" / "params.json").read_text())
    assert (plain["verify"], plain["k"], plain["n_removed"]) == (False, 1, 3)
