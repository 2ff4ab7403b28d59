"""`dinov2-repro eval` end to end, in process, on tiny synthetic images whose intensity encodes the class."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2_repro.eval.backbone_spec import describe_module, load_backbone
from dinov2_repro.eval.cli import main
from dinov2_repro.eval.config import default_preset, load_eval_config
from dinov2_repro.eval.runner import evaluate

# LayerScale 1 (not the 1e-5 of training from scratch): a random CLS token then depends on the image
TINY = "random:vit_small/8,embed_dim=32,depth=2,num_heads=2,img_size=32,init_values=1"
LEVELS = (40, 110, 180)  # grey level of each class


def make_dataset(root, n_train=12, n_test=4, size=36, seed=0):
    rng = np.random.default_rng(seed)
    for split, n in (("Training", n_train), ("Testing", n_test)):
        for k, level in enumerate(LEVELS):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(level + rng.normal(0, 2, (size, size)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("eval_cli") / "data")


FAST = ["--no-progress", "data.num_workers=0", "data.dedup_test=true"]


def test_linear_cli_writes_everything_and_separates_the_classes(data, tmp_path):
    out = tmp_path / "linear"
    rc = main(["linear", "--backbone", TINY, "--data", str(data), "--output-dir", str(out), *FAST,
               "linear.iterations=60", "--train-fractions", "1.0,0.5", "--seeds", "0,1"])
    assert rc == 0
    for name in ("metrics.json", "report.md", "summary.json", "splits.json", "config.yaml", "eval.log",
                 "confusion_matrix.png", "curves.png", "label_efficiency.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["summary"]) == {"1", "0.5"}
    assert metrics["summary"]["0.5"]["n_train"] == 3 * round(0.5 * 11)  # 11 per class after the val hold-out
    assert metrics["summary"]["1"]["accuracy"]["n"] == 2
    main_run = metrics["runs"][metrics["main_run"]]
    assert (main_run["fraction"], main_run["seed"]) == (1.0, 0)
    assert main_run["test"]["accuracy"] == 1.0  # constant-intensity classes: trivially separable features
    assert main_run["test"]["n_samples"] == 12 and metrics["data"]["counts"]["val"] == {
        "class0": 1, "class1": 1, "class2": 1}
    report = (out / "report.md").read_text()
    assert "![Confusion matrix (test)](confusion_matrix.png)" in report and "± " in report
    assert "![Reliability diagram (test)](reliability.png)" in report and (out / "reliability.png").is_file()
    assert "| class | sensitivity (recall) | 95% interval | specificity |" in report
    assert "accuracy **100.00%** [100.00, 100.00]" in report and "Expected calibration error" in report
    assert main_run["test"]["intervals"]["accuracy"] == [1.0, 1.0]
    # one predictions.csv row per (fraction, seed) run and test image, agreeing with each run's accuracy
    rows = [line.split(",") for line in (out / "predictions.csv").read_text().splitlines()]
    assert rows[0] == ["fraction", "seed", "path", "label", "predicted", "correct", "p_class0", "p_class1",
                       "p_class2"] and len(rows) == 1 + 4 * 12
    for run in metrics["runs"]:
        mine = [r for r in rows[1:] if (float(r[0]), int(r[1])) == (run["fraction"], run["seed"])]
        assert len(mine) == 12 and all(r[5] == str(int(r[3] == r[4])) for r in mine)
        probs = np.array([[float(v) for v in r[6:]] for r in mine])
        assert np.allclose(probs.sum(1), 1.0, atol=1e-5)  # a distribution per image, whose argmax is the prediction
        assert [f"class{i}" for i in probs.argmax(1)] == [r[4] for r in mine]
        assert sum(int(r[5]) for r in mine) / 12 == pytest.approx(run["test"]["accuracy"])
    assert "test_predictions" not in main_run  # kept out of metrics.json
    # a second run hits the (shared, content-keyed) feature cache
    rc = main(["knn", "--backbone", TINY, "--data", str(data), "--output-dir", str(tmp_path / "knn"), *FAST])
    assert rc == 0
    assert "cache hit" in (tmp_path / "knn" / "eval.log").read_text()
    knn = json.loads((tmp_path / "knn" / "metrics.json").read_text())
    assert knn["runs"][0]["test"]["accuracy"] == 1.0
    assert knn["runs"][0]["selection"]["ks"] == [10, 20, 33]  # 200 and 100 clipped to the 33 training images


def test_errors_name_the_key_or_spec(data, tmp_path, capsys):
    assert main(["linear", "--backbone", TINY, "--data", str(data), "--output-dir", str(tmp_path),
                 "linear.lrs=[0.1]"]) == 2
    assert "linear.lrs" in capsys.readouterr().err
    assert main(["knn", "--backbone", "random:vit_nope/14", "--data", str(data), "--output-dir", str(tmp_path)]) == 2
    assert "random:vit_nope/14" in capsys.readouterr().err
    assert main(["knn", "--backbone", TINY, "--data", str(tmp_path / "missing"), "--output-dir", str(tmp_path)]) == 2
    assert "missing" in capsys.readouterr().err


def test_bad_data_fails_before_the_backbone_loads_and_leaves_nothing_and_later_errors_reach_the_log(
        data, tmp_path, capsys, monkeypatch):
    import dinov2_repro.eval.backbone_spec as backbone_spec

    loaded = []
    monkeypatch.setattr(backbone_spec, "load_backbone", lambda *a, **k: loaded.append(a) or load_backbone(*a, **k))
    out = tmp_path / "out"
    assert main(["knn", "--backbone", TINY, "--data", str(tmp_path / "missing"), "--output-dir", str(out)]) == 2
    assert "missing" in capsys.readouterr().err
    assert loaded == [] and not out.exists()  # no backbone loaded, no folder left behind

    import dinov2_repro.eval.runner as runner

    def broken(*args, **kwargs):
        raise RuntimeError("feature extraction broke")

    monkeypatch.setattr(runner, "evaluate_features", broken)
    with pytest.raises(RuntimeError):
        evaluate("knn", load_eval_config(default_preset("knn"), ["progress=false", "data.num_workers=0"]), data, out,
                 spec=TINY, echo=False)
    assert "[knn] error: RuntimeError: feature extraction broke" in (out / "eval.log").read_text()


class IntensityOneHot(torch.nn.Module):
    """A stand-in backbone whose features are the one-hot of the class encoded by the image intensity."""

    def __init__(self, mean, std):
        super().__init__()
        centres = (torch.tensor(LEVELS, dtype=torch.float32) / 255 - mean) / std
        self.register_buffer("centres", centres)

    def forward(self, x):
        value = x[:, 0].mean(dim=(1, 2))
        return torch.nn.functional.one_hot((value[:, None] - self.centres).abs().argmin(1), len(LEVELS)).float()


@pytest.mark.parametrize("mode", ["linear", "knn"])
def test_injected_backbone_with_perfect_features(data, tmp_path, mode):
    cfg = load_eval_config(default_preset(mode), ["progress=false", "data.num_workers=0", "data.crop_size=32",
                                                  "linear.iterations=100", "data.dedup_test=false"])
    stub = IntensityOneHot(0.485, 0.229)
    result = evaluate(mode, cfg, data, tmp_path / mode, backbone=(stub, describe_module(stub, "onehot")), echo=False)
    main_run = result["runs"][result["main_run"]]
    assert main_run["test"]["accuracy"] == 1.0 and main_run["val"]["accuracy"] == 1.0
    assert main_run["test"]["confusion_matrix"] == [[4, 0, 0], [0, 4, 0], [0, 0, 4]]
    predictions = result["test_predictions"]  # returned for paired comparisons
    assert len(predictions["paths"]) == 12 and predictions["predicted"] == predictions["labels"]


def test_finetune_cli_checkpoints_the_best_model(data, tmp_path):
    out = tmp_path / "ft"
    rc = main(["finetune", "--backbone", TINY, "--data", str(data), "--output-dir", str(out), *FAST,
               "finetune.epochs=2", "finetune.warmup_epochs=1", "finetune.batch_size=16", "finetune.lr=1e-3",
               "data.batch_size=16"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    run = metrics["runs"][0]
    assert run["selection"]["epochs_run"] == 2 and len(run["curves"]["val_accuracy"]) == 2
    assert run["selection"]["best_epoch"] in (1, 2)
    assert (out / "curves.png").is_file() and (out / "confusion_matrix.png").is_file()
    best = out / "runs" / "fraction1_seed0" / "best.pth"
    model, info = load_backbone(str(best))  # the checkpoint is itself a SPEC
    assert info["source"] == "finetuned" and info["num_heads"] == 2 and info["eval_img_size"] == 32
    saved = torch.load(best, map_location="cpu", weights_only=False)
    torch.testing.assert_close(model.state_dict()["norm.weight"], saved["backbone"]["norm.weight"])
    assert saved["epoch"] == run["selection"]["best_epoch"]


def test_a_small_validation_split_warns_with_counts_and_ties_are_reported(data, tmp_path):
    from dinov2_repro.eval.runner import small_validation_warning

    out = tmp_path / "knn"
    assert main(["knn", "--backbone", TINY, "--data", str(data), "--output-dir", str(out), *FAST,
                 "knn.ks=[1,2,3]"]) == 0
    log_text = (out / "eval.log").read_text()
    assert "WARNING: the validation split is small (3 images; per class {'class0': 1, 'class1': 1, 'class2': 1})" \
        in log_text
    selection = json.loads((out / "metrics.json").read_text())["runs"][0]["selection"]
    accuracies = list(selection["val_accuracy_per_k"].values())
    assert selection["n_tied"] == accuracies.count(max(accuracies))
    assert selection["n_tied"] == 3  # three well-separated grey levels: every k is perfect on validation
    if selection["n_tied"] > 1:  # the smallest k wins, and the report says so
        assert selection["k"] == min(int(k) for k, a in selection["val_accuracy_per_k"].items() if a == max(accuracies))
        assert "tied at the best validation accuracy; the tie was broken by the smallest k" in \
            (out / "report.md").read_text()
    assert small_validation_warning({"val": {"a": 10, "b": 40}}) is None
    assert "per class {'a': 9, 'b': 41}" in small_validation_warning({"val": {"a": 9, "b": 41}})


def test_linear_and_knn_share_features_without_being_told(data, tmp_path, monkeypatch):
    monkeypatch.setenv("DINOV2_REPRO_CACHE", str(tmp_path / "cache"))
    assert main(["linear", "--backbone", TINY, "--data", str(data), "--output-dir", str(tmp_path / "a"), *FAST,
                 "linear.iterations=10"]) == 0
    assert "cache hit" not in (tmp_path / "a" / "eval.log").read_text()
    assert main(["knn", "--backbone", TINY, "--data", str(data), "--output-dir", str(tmp_path / "b"), *FAST]) == 0
    log_text = (tmp_path / "b" / "eval.log").read_text()
    assert log_text.count("cache hit") == 3 and str(tmp_path / "cache" / "features") in log_text  # train, val, test
    assert not (tmp_path / "a" / "feature_cache").exists() and not list(data.rglob("*.pt"))  # data left alone


def test_report_counts_test_images_whose_embedding_copies_a_training_image(tmp_path):
    root = make_dataset(tmp_path / "data", n_train=6, n_test=2)
    rng = np.random.default_rng(1)
    for k, level in enumerate(LEVELS):  # test images unlike the training ones: a bright square on the class level
        pixels = np.clip(level + rng.normal(0, 2, (36, 36)), 0, 255).astype(np.uint8)
        pixels[4:20, 4:20] = 255 - level
        Image.fromarray(pixels, mode="L").save(root / "Testing" / f"class{k}" / "square.png")
    (root / "Testing" / "class1" / "leaked.png").write_bytes((root / "Training" / "class1" / "3.png").read_bytes())
    out = tmp_path / "knn"
    assert main(["knn", "--backbone", TINY, "--data", str(root), "--output-dir", str(out), *FAST,
                 "data.dedup_cosine=0.9999"]) == 0
    embedding = json.loads((out / "metrics.json").read_text())["dedup"]["embedding"]
    names = [p.rsplit("/", 2)[-2] + "/" + p.rsplit("/", 1)[-1] for p in embedding["duplicates"]]
    assert "class1/leaked.png" in names and not any(n.endswith("square.png") for n in names)
    assert embedding["min_cosine"] == 0.9999 and embedding["n_duplicates"] == len(names)
    assert f"Embedding copies: {len(names)} of 10 test images" in (out / "report.md").read_text()
