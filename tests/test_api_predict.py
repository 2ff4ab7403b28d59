"""The Python API (`dinov2_repro.pretrain / evaluate / predict`) and `dinov2-repro predict`: the classifiers the
evaluations save reproduce the evaluations' own test predictions, image by image."""

import csv

import pytest
import torch

import dinov2_repro
from dinov2_repro.eval.predict import main as predict_main
from dinov2_repro.eval.predict import open_images
from test_engine_common import TINY
from test_eval_cli import TINY as TINY_SPEC
from test_eval_cli import make_dataset

EVAL = ["progress=false", "data.num_workers=0", "data.dedup_test=false"]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("api") / "data")


def test_pretrain_evaluate_predict_through_the_python_api(data, tmp_path):
    summary = dinov2_repro.pretrain(None, data=str(data), output_dir=tmp_path / "run", iterations=3,
                                    overrides=[o for o in TINY if not o.startswith(("data.kind", "train.max_"))]
                                    + ["data.kind=kaggle", "data.split=Training"])
    assert summary["iterations"] == 3 and (tmp_path / "run" / "export" / "teacher_backbone.pth").is_file()
    result = dinov2_repro.evaluate("linear", tmp_path / "run", data, output_dir=tmp_path / "linear",
                                   overrides=EVAL + ["linear.iterations=40"])
    assert (tmp_path / "linear" / "classifier.pth").is_file()
    predictions = dinov2_repro.predict(tmp_path / "linear", data / "Testing", output=tmp_path / "p.csv")
    evaluated = {r["path"]: r for r in _rows(tmp_path / "linear" / "predictions.csv")}
    assert sorted(predictions.paths) == sorted(evaluated)  # the whole test split, nothing skipped
    for row in _rows(tmp_path / "p.csv"):
        same = evaluated[row["path"]]
        assert row["predicted"] == same["predicted"]
        for c in predictions.classes:  # the same head on the same features: the same probabilities
            assert float(row[f"p_{c}"]) == pytest.approx(float(same[f"p_{c}"]), abs=1e-4)
    assert result["runs"][result["main_run"]]["test"]["n_samples"] == len(predictions.paths)


def test_predict_cli_with_a_finetuned_model_skips_and_names_unreadable_images(data, tmp_path, capsys):
    out = tmp_path / "ft"
    dinov2_repro.evaluate("finetune", TINY_SPEC, data, output_dir=out,  # one epoch needs no warm-up override
                          overrides=EVAL + ["finetune.epochs=1", "finetune.precision=fp32"])
    assert "finetune.warmup_epochs=2 does not fit 1 epoch(s): warming up for 0.5" in (out / "eval.log").read_text()
    images = tmp_path / "new"
    images.mkdir()
    for path in sorted((data / "Testing").rglob("*.png"))[:3]:
        (images / path.name.replace(".png", f"_{path.parent.name}.png")).write_bytes(path.read_bytes())
    (images / "broken.png").write_bytes(b"not an image")
    before = sorted(p.name for p in images.iterdir())
    assert predict_main(["--model", str(out), "--data", str(images), "--output-dir", str(tmp_path),
                         "--device", "cpu", "--no-progress"]) == 0
    (tmp_path / "predictions.csv").rename(tmp_path / "p.csv")
    captured = capsys.readouterr()
    assert "3 images classified into ['class0', 'class1', 'class2']" in captured.out
    assert "skipped 1 unreadable image(s)" in captured.err and "broken.png" in captured.err
    rows = _rows(tmp_path / "p.csv")
    assert len(rows) == 3 and all(abs(sum(float(r[f"p_class{k}"]) for k in range(3)) - 1) < 1e-4 for r in rows)
    assert sorted(p.name for p in images.iterdir()) == before  # the input folder is only read
    assert predict_main(["--model", str(tmp_path / "nothing"), "--data", str(images)]) == 2
    assert "nothing: no such file or folder" in capsys.readouterr().err
    assert predict_main(["--model", str(images), "--data", str(images)]) == 2  # a folder without a classifier
    assert "no classifier.pth (eval linear) or runs/*/best.pth (eval finetune)" in capsys.readouterr().err


def test_a_linear_head_refuses_a_backbone_whose_weights_changed(data, tmp_path):
    from dinov2_repro.eval.classifier import ClassifierError, load_classifier
    from dinov2_repro.models.weights import read_weights_file, write_tensor_file

    dinov2_repro.evaluate("linear", TINY_SPEC, data, output_dir=tmp_path / "lin",
                          overrides=EVAL + ["linear.iterations=20"])
    payload = read_weights_file(tmp_path / "lin" / "classifier.pth")
    payload["weights_sha1"] = "0" * 40  # as if the backbone file had been retrained since
    write_tensor_file(tmp_path / "lin" / "classifier.pth", payload)
    with pytest.raises(ClassifierError, match="is not the one this head was trained on"):
        load_classifier(tmp_path / "lin").predict(open_images(str(data / "Testing")))
    assert torch.is_tensor(payload["weight"]) and payload["weight"].shape[1] == 3


def test_predict_reads_volumes_alone_in_folders_and_in_csv_manifests(tmp_path):
    import numpy as np
    from PIL import Image

    nib = pytest.importorskip("nibabel")
    volume = np.zeros((12, 10, 9), dtype=np.float32)
    volume[2:10, 2:8, 3:7] = np.arange(1, 1 + 8 * 6 * 4, dtype=np.float32).reshape(8, 6, 4)  # axial slices 3-6
    folder = tmp_path / "scans"
    folder.mkdir()
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(folder / "patient1.nii.gz"))
    Image.fromarray(np.full((16, 16), 128, dtype=np.uint8)).save(folder / "photo.png")
    (tmp_path / "list.csv").write_text(f"path\n{folder / 'patient1.nii.gz'}\n")

    def slices(dataset):
        return sorted(int(p.rsplit("=", 1)[1]) for p, _ in dataset.samples if "::" in p)

    assert slices(open_images(str(folder / "patient1.nii.gz"))) == [3, 4, 5, 6]  # one row per kept slice
    mixed = open_images(str(folder))
    assert slices(mixed) == [3, 4, 5, 6] and sum("photo.png" in p for p, _ in mixed.samples) == 1
    shapes = {("::" in path): tuple(mixed.load_image(i).shape[-2:]) for i, (path, _) in enumerate(mixed.samples)}
    assert shapes == {False: (16, 16), True: (10, 12)}  # the photo as is; axial slices are (y, x) = (10, 12)
    assert slices(open_images(str(tmp_path / "list.csv"))) == [3, 4, 5, 6]
