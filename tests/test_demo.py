"""Smoke run of `dinov2-repro demo` with a tiny budget: every stage runs and the report compares both backbones."""

import json

import pytest

from dinov2_repro.demo import main, pretrain_overrides


def test_reduced_budget_compresses_the_schedules():
    from dinov2_repro.config import load_config
    from dinov2_repro.train.schedules import Schedules

    overrides = pretrain_overrides(40, "d", "r", 6, "cpu", False)
    assert "train.iterations=40" in overrides and not any("max_iterations" in o for o in overrides)
    assert not any(o.startswith("train.iterations") for o in pretrain_overrides(0, "d", "r", 6, "cpu", False))
    sched = Schedules.from_config(load_config("demo_cpu", overrides), global_batch=32)
    assert (sched.total_iterations, sched.stop_iteration, sched.lr_warmup_iterations) == (40, 40, 4)  # 1 of 10 epochs


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_demo_smoke(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["--output-dir", str(out), "--iterations", "2", "--n-per-class", "4", "--no-progress",
               "--probe-iterations", "20", "train.batch_size_per_gpu=4", "crops.local_crops_number=2",
               "dino.head_n_prototypes=256", "ibot.head_n_prototypes=256",
               "data.synthetic_n_test_per_class=1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "pretrained (teacher)" in printed and "random init" in printed and str(out / "report.md") in printed
    assert (out / "pretrain" / "export" / "teacher_backbone.pth").is_file()
    summary = json.loads((out / "demo_summary.json").read_text())
    assert [r["backbone"] for r in summary["rows"]] == ["pretrained (teacher)", "random init"]
    assert summary["pretrain"]["iterations"] == 2
    assert summary["data"] == dict(path=str(out / "synthetic_brain_mri"), train=12, val=4, test=4)
    linear = summary["comparison"]["linear"]
    pre, rnd = summary["rows"][0]["linear_test_accuracy"], summary["rows"][1]["linear_test_accuracy"]
    assert linear["difference"] == pytest.approx(pre - rnd) and linear["n"] == 4
    assert linear["low"] <= linear["difference"] <= linear["high"]
    rows = (out / "eval" / "pretrained" / "linear" / "predictions.csv").read_text().splitlines()
    assert rows[0].startswith("fraction,seed,path,label,predicted,correct,p_") and len(rows) == 1 + 4
    report = (out / "report.md").read_text()
    assert "not patient data" in report and "eval/pretrained/linear/report.md" in report
    # the wording follows the measured verdict, and the pretrained probe's per-class table and confusion matrix show
    from dinov2_repro.demo import FINDING

    assert FINDING[linear["verdict"]] in report
    assert sum(finding in report for finding in FINDING.values()) == 1
    assert "| class | sensitivity (recall) |" in report and "eval/pretrained/linear/confusion_matrix.png" in report
    for tag in ("pretrained", "random"):
        for mode in ("linear", "knn"):
            assert (out / "eval" / tag / mode / "metrics.json").is_file()
