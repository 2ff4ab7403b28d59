"""Slide-level evaluation (`dinov2-repro wsi eval`): attention-MIL over per-slide tile embeddings with label
fractions, on slides the tests draw; half of them carry a planted orange-brown patch (the positive class)."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("skimage")
pytest.importorskip("tifffile")

from wsi_slides import PLANTED, draw_planted_slide, write_slide  # noqa: E402

from dinov2_repro.wsi import TileOptions, tile_slides  # noqa: E402
from dinov2_repro.wsi.cli import main  # noqa: E402
from dinov2_repro.wsi.slide_eval import (SlideEvalOptions, SlideLabels, attention_heatmap,  # noqa: E402
                                         evaluate_slides, fraction_subset, held_out_split, read_slide_labels)

TINY = "random:vit_small/8,embed_dim=32,depth=2,num_heads=2,img_size=32,init_values=1"
N_SLIDES = 16  # 8 patients of 2 slides; patients alternate between the classes
FAST = SlideEvalOptions(seeds=(0, 1), test_fraction=0.5, epochs=40, lr=1e-3)


def planted_tile(box) -> bool:
    x, y, w, h = PLANTED
    return x <= box[0] < x + w and y <= box[1] < y + h


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """(tiles folder, labels CSV, the evaluation's result): slides tiled at 0.5 um into 64-px tiles."""
    root = tmp_path_factory.mktemp("cohort")
    (root / "slides").mkdir()
    rows = ["slide_id,label,patient"]
    for i in range(N_SLIDES):
        patient = i // 2
        positive = patient % 2 == 1
        write_slide(root / "slides" / f"s{i:02d}.tif", draw_planted_slide(512, seed=i, planted=positive), mpp=0.5,
                    n_levels=2, tile=128)
        rows.append(f"s{i:02d},{'tumour' if positive else 'normal'},p{patient}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    tile_slides(sorted((root / "slides").glob("*.tif")), root / "tiles",
                TileOptions(mpp=0.5, tile_size=64, thumbnail_size=256), progress=False)
    result = evaluate_slides(TINY, root / "tiles", root / "labels.csv", root / "out", FAST,
                             cache_dir=root / "cache", progress=False, log=lambda *_: None)
    return root, result


def test_report_has_the_four_fraction_rows_and_heatmaps(cohort):
    root, result = cohort
    report = (root / "out" / "report.md").read_text()
    for fraction in ("100%", "75%", "50%", "25%"):
        assert f"\n| {fraction} | " in report
    metrics = json.loads((root / "out" / "metrics.json").read_text())
    assert list(metrics["summary"]) == ["1", "0.75", "0.5", "0.25"]
    assert len(metrics["runs"]) == 8 and metrics["summary"]["1"]["roc_auc"]["n"] == 2
    test_slides = metrics["test_slides"]
    assert metrics["splits"]["test"]["per_class"] == {"normal": 4, "tumour": 4}
    for sid in test_slides:  # one heatmap per test slide, a few of them embedded
        assert (root / "out" / "heatmaps" / f"{sid}.png").is_file()
    assert report.count("![") == 6 and "![s" in report
    patients = {s: f"p{int(s[1:]) // 2}" for s in metrics["train_slides"] + test_slides}
    assert not {patients[s] for s in test_slides} & {patients[s] for s in metrics["train_slides"]}


def test_planted_signal_gives_auc_well_above_chance_and_attention_on_the_planted_tiles(cohort):
    _, result = cohort
    for fraction in ("1", "0.25"):
        assert result["summary"][fraction]["roc_auc"]["mean"] >= 0.9
    assert result["summary"]["1"]["balanced_accuracy"]["mean"] >= 0.75
    positives = [s for s, info in result["heatmap_slides"].items() if info["label"] == "tumour"]
    assert positives
    for sid in positives:  # the 100% model's attention peaks on a planted tile of every positive test slide
        scores, boxes = result["attention"]["scores"][sid], result["bags"][sid].boxes
        assert planted_tile(boxes[int(scores.argmax())]), sid


def test_cli_caps_tiles_reuses_the_embedding_cache_and_names_unknown_slides(cohort, tmp_path, capsys):
    root, _ = cohort
    args = ["eval", "--backbone", TINY, "--tiles", str(root / "tiles"), "--labels", str(root / "labels.csv"),
            "--seeds", "0", "--fractions", "1,0.5", "--test-fraction", "0.5", "--max-tiles-per-slide", "5",
            "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["n_tiles"] == 5 * N_SLIDES and list(metrics["summary"]) == ["1", "0.5"]
    assert "embeddings of 16 slide(s) (0 from the cache" in capsys.readouterr().out
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    assert "(16 from the cache" in capsys.readouterr().out
    assert (json.loads((tmp_path / "b" / "metrics.json").read_text())["summary"] == metrics["summary"])
    bad = tmp_path / "bad.csv"
    bad.write_text((root / "labels.csv").read_text() + "ghost1,tumour,p9\nghost2,normal,p9\n")
    assert main(args[:6] + [str(bad)] + args[7:] + ["--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 slide id(s) have no tile table: ghost1, ghost2" in err


def test_label_errors_are_one_message(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("slide_id,label\na,x\nb,y\nb,y\nzz,x\nc,\n")
    with pytest.raises(ValueError) as error:
        read_slide_labels(path, ["a", "b", "c"])
    message = str(error.value)
    assert "1 slide id(s) have no tile table: zz" in message and "'b' listed twice" in message
    assert "line 6: empty" in message
    path.write_text("slide_id,label\na,x\nb,x\n")
    with pytest.raises(ValueError, match="one class only"):
        read_slide_labels(path, ["a", "b"])


def test_label_fractions_stay_stratified_and_keep_patients_whole():
    rng = np.random.default_rng(0)
    slide_ids, labels, patients = [], [], []
    for p in range(30):  # 30 patients of 1-3 slides, 2/3 of them of class 0
        for k in range(int(rng.integers(1, 4))):
            slide_ids.append(f"p{p}s{k}")
            labels.append(int(p % 3 == 0))
            patients.append(f"p{p}")
    grouped = SlideLabels(slide_ids, labels, ["a", "b"], patients)
    flat = SlideLabels(slide_ids, labels, ["a", "b"], None)
    y = np.asarray(labels)
    for seed in (0, 1, 2):
        train, test = held_out_split(grouped, 0.3, seed)
        assert not {patients[i] for i in train} & {patients[i] for i in test}
        assert abs(y[test].mean() - y.mean()) < 0.12
        for fraction in (1.0, 0.75, 0.5, 0.25):
            chosen = fraction_subset(grouped, train, fraction, seed)
            assert set(chosen) <= set(train)
            kept = {patients[i] for i in chosen}
            assert {i for i in train if patients[i] in kept} == set(chosen)  # whole patients
            for c in (0, 1):
                n_class = (y[train] == c).sum()
                assert abs((y[chosen] == c).sum() - fraction * n_class) <= 3  # one patient of slack
        train, test = held_out_split(flat, 0.3, seed)
        for fraction in (0.75, 0.5, 0.25):
            chosen = fraction_subset(flat, train, fraction, seed)
            for c in (0, 1):  # exactly stratified without patients
                assert (y[chosen] == c).sum() == max(1, round((y[train] == c).sum() * fraction))


def test_attention_heatmap_paints_scores_at_the_tiles():
    thumbnail = np.full((50, 80, 3), 240, np.uint8)
    boxes = np.array([[0, 0, 40], [40, 0, 40], [80, 40, 40]])  # level-0 boxes; the thumbnail is at 1/2
    picture = attention_heatmap(thumbnail, 0.5, boxes, torch.tensor([0.1, 0.6, 0.3]).numpy())
    assert picture.shape == thumbnail.shape
    lowest, highest = picture[5, 5].astype(int), picture[5, 25].astype(int)
    assert lowest.sum() < highest.sum() - 100  # inferno: black at the lowest score, pale yellow at the highest
    assert (picture[45, 5] == 240).all()  # no tile there: untouched
    assert not (picture[30, 50] == 240).all()  # the third tile


def test_three_classes_use_macro_one_vs_rest_auc():
    from dinov2_repro.wsi.slide_eval import SlideBag, run_label_fractions

    gen = torch.Generator().manual_seed(0)
    ids, labels, bags = [], [], {}
    for i in range(60):  # class c: one tile of each bag leans on direction c (without it, test AUC 0.43-0.67)
        c = i % 3
        tiles = torch.randn(6, 8, generator=gen) * 0.3
        tiles[0, c] += 3.0
        ids.append(f"s{i:02d}")
        labels.append(c)
        bags[ids[-1]] = SlideBag(ids[-1], "", torch.nn.functional.normalize(tiles, dim=1), np.zeros((6, 3)), 6)
    slides = SlideLabels(ids, labels, ["a", "b", "c"], None)
    train, test = held_out_split(slides, 0.5, 0)
    out = run_label_fractions(bags, slides, train, test, SlideEvalOptions(fractions=(1.0,), seeds=(0,), epochs=30,
                                                                          lr=1e-3), log=lambda *_: None)
    run = out["runs"][0]
    per_class = [run["details"]["per_class"][c]["roc_auc"] for c in "abc"]
    assert run["roc_auc"] == pytest.approx(np.mean(per_class)) and run["roc_auc"] > 0.9
    assert sorted(run["probabilities"]) == sorted(ids[i] for i in test) and len(test) == 30
