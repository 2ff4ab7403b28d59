"""The training engine in one CPU process: run directory, exact resume, guards, accumulation, export, CLI."""

import json
import shutil

import pytest
import torch

from dinov2_repro.config import ConfigError, load_config
from dinov2_repro.train import checkpoint as ckpt
from dinov2_repro.models.weights import build_from_export
from dinov2_repro.train import engine, loop
from dinov2_repro.train.engine import train
from dinov2_repro.train.guards import NonFiniteLossError
from dinov2_repro.train.metrics import read_metrics
from test_engine_common import TINY, FixedLoader, real_data, synthetic_mri, tiny_cfg  # noqa: F401 (fixture)

LOSS_KEYS = ("total_loss", "dino_loss", "dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss", "koleo_loss")


def _final_state(run_dir):
    return torch.load(ckpt.latest_checkpoint(run_dir), weights_only=False)


def test_run_directory_layout_metrics_export_and_restartable_config(tmp_path):
    run = tmp_path / "run"
    cfg = tiny_cfg("train.max_iterations=3", "evaluation.eval_period_iterations=2", "checkpoint.keep_last=1")
    summary = train(cfg, run, data_loader_fn=FixedLoader(skipped_every=2))

    for name in ("config.yaml", "train.log", "metrics.jsonl", "loss_curves.png", "summary.json",
                 "export/teacher_backbone.pth", "export/backbone.json", "checkpoints/latest"):
        assert (run / name).is_file(), name
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["checkpoint_0000003.pth"]  # keep_last=1

    records = read_metrics(run / "metrics.jsonl")
    assert [r["iteration"] for r in records] == [1, 2, 3]
    for key in LOSS_KEYS + ("lr", "wd", "momentum", "teacher_temp", "images_per_s", "data_time_s", "step_time_s",
                            "peak_memory_mb", "teacher_entropy", "student_cls_std", "grad_norm_backbone"):
        assert key in records[-1], key
    # What is logged is what is optimised: total = dino + ibot + 0.1 koleo.
    r = records[-1]
    assert r["total_loss"] == pytest.approx(r["dino_loss"] + r["ibot_loss"] + 0.1 * r["koleo_loss"], rel=1e-5)

    saved = json.loads((run / "summary.json").read_text())
    assert saved["iterations"] == 3 and saved["final_losses"]["total_loss"] == pytest.approx(r["total_loss"])
    assert saved["skipped_files"]["count"] == 2  # iterations 0 and 2 each dropped one unreadable file
    assert saved["skipped_files"]["paths"] == ["/data/broken_0_0_0.png", "/data/broken_2_0_0.png"]
    assert saved["images_per_s"] > 0 and summary["global_batch"] == 4

    # The export is the final teacher backbone, strict-loadable into the architecture backbone.json describes.
    model = build_from_export(run / "export")
    teacher = {k[len("teacher.backbone."):]: v for k, v in _final_state(run)["model"].items()
               if k.startswith("teacher.backbone.")}
    assert set(model.state_dict()) == set(teacher)
    assert all(torch.equal(v, teacher[k]) for k, v in model.state_dict().items())
    assert json.loads((run / "export/backbone.json").read_text())["iteration"] == 3

    # config.yaml alone restarts the run: same knobs, same run directory.
    reloaded = load_config(run / "config.yaml")
    assert reloaded.train.output_dir == str(run) and reloaded.student.embed_dim == 32
    log_text = (run / "train.log").read_text()
    assert "world size 1" in log_text and "student backbone" in log_text and "peak lr" in log_text


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path, synthetic_mri):
    # Real data pipeline (sampler position, per-sample augmentation, masks), gradient accumulation, and drop
    # path, whose RNG state must come back from the checkpoint.
    cfg = tiny_cfg(*real_data(synthetic_mri), "student.drop_path_rate=0.2", "train.max_iterations=4",
                   "train.batch_size_per_gpu=2", "train.grad_accum_steps=2", "checkpoint.period_iterations=2")
    straight = tmp_path / "straight"
    train(cfg, straight)

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "checkpoints/checkpoint_0000002.pth", resumed / "checkpoints")
    (resumed / "checkpoints/latest").write_text("checkpoint_0000002.pth\n")
    summary = train(cfg, resumed)
    assert summary["start_iteration"] == 2

    a, b = _final_state(straight), _final_state(resumed)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for name, state in a["optimizer"]["state"].items():
        for field, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][name][field]), (name, field)
    losses_a = [{k: r[k] for k in LOSS_KEYS} for r in read_metrics(straight / "metrics.jsonl")[2:]]
    losses_b = [{k: r[k] for k in LOSS_KEYS} for r in read_metrics(resumed / "metrics.jsonl")]
    assert losses_a == losses_b


def _inject_nan(monkeypatch, calls_with_nan, term="koleo_loss", on_call=None):
    from dinov2_repro.train.meta_arch import SSLMetaArch

    original = SSLMetaArch.training_step
    count = {"n": 0}

    def patched(self, batch, teacher_temp):
        if on_call is not None:
            on_call(count["n"], self)
        out = original(self, batch, teacher_temp)
        if count["n"] in calls_with_nan:
            nan = torch.tensor(float("nan"))
            out[term] = out[term] + nan
            out["total_loss"] = out["total_loss"] + nan  # backward then fills the gradients with NaN
        count["n"] += 1
        return out

    monkeypatch.setattr(SSLMetaArch, "training_step", patched)


def test_nan_loss_stops_naming_term_and_iteration_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    _inject_nan(monkeypatch, {3})
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as info:
        train(tiny_cfg("train.max_iterations=6"), run, data_loader_fn=FixedLoader())
    message = str(info.value)
    assert "koleo_loss" in message and "iteration 3" in message and "checkpoint_0000002.pth" in message
    assert (info.value.term, info.value.iteration) == ("koleo_loss", 3)
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["checkpoint_0000002.pth"]
    assert ckpt.latest_checkpoint(run).name == "checkpoint_0000002.pth"
    assert not (run / "summary.json").exists()
    assert "koleo_loss" in (run / "train.log").read_text()


def test_skip_batch_drops_the_whole_update_and_counts_it(tmp_path, monkeypatch):
    snapshots = {}

    def snapshot(call, meta_arch):
        snapshots[call] = {k: v.clone() for k, v in meta_arch.state_dict().items()}

    _inject_nan(monkeypatch, {1}, term="dino_loss", on_call=snapshot)
    summary = train(tiny_cfg("train.nonfinite=skip_batch", "train.max_iterations=3"), tmp_path / "run",
                    data_loader_fn=FixedLoader())
    assert summary["skipped_batches"] == 1
    assert all(torch.isfinite(torch.tensor(v)) for v in summary["final_losses"].values())
    # Iteration 1 was skipped: student, teacher and loss centers are exactly as before it...
    for key, value in snapshots[1].items():
        assert torch.equal(value, snapshots[2][key]), key
    # ...whereas a normal iteration changes them.
    assert not torch.equal(snapshots[0]["student.backbone.cls_token"], snapshots[1]["student.backbone.cls_token"])
    assert read_metrics(tmp_path / "run/metrics.jsonl")[-1]["skipped_batches"] == 1


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    # One step: k=2 micro-batches of 2 images == 1 batch of 4 images (same images); KoLeo is per micro-batch
    # by design, so it is off here, and the centers, updated once per micro-batch, are frozen (momentum 1).
    common = ["train.max_iterations=1", "koleo.loss_weight=0", "dino.center_momentum=1.0"]
    big = train(tiny_cfg(*common), tmp_path / "big", data_loader_fn=FixedLoader())
    accum = train(tiny_cfg(*common, "train.batch_size_per_gpu=2", "train.grad_accum_steps=2"),
                  tmp_path / "accum", data_loader_fn=FixedLoader())
    assert accum["global_batch"] == big["global_batch"] == 4
    for key in ("dino_loss", "ibot_loss", "total_loss"):
        assert accum["final_losses"][key] == pytest.approx(big["final_losses"][key], rel=1e-5)
    a, b = _final_state(tmp_path / "big")["model"], _final_state(tmp_path / "accum")["model"]
    for key in a:
        if key.startswith(("student.", "teacher.")):
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # the step did move the student (the teacher, 0.992 EMA of it, is still close to the initial weights)
    qkv = "backbone.blocks.0.attn.qkv.weight"
    assert (a["student." + qkv] - a["teacher." + qkv]).abs().max() > 1e-4


@pytest.mark.parametrize("overrides, key", [
    (["compute.precision=fp16"], "compute.precision"),
    (["compute.parallelism=fsdp"], "compute.parallelism"),
    (["train.batch_size_per_gpu=1"], "train.batch_size_per_gpu"),
])
def test_bad_combinations_fail_before_training(tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        train(tiny_cfg(*overrides), tmp_path / "run", data_loader_fn=FixedLoader())
    assert not (tmp_path / "run/checkpoints").exists()


def test_export_loads_strictly_into_the_hub_constructor(tmp_path):
    from dinov2_repro.hub import dinov2_vits14

    # ViT-S/14 widths (384 wide, 6 heads) at depth 2 to stay fast; the hub constructor takes the same override.
    cfg = tiny_cfg("student.embed_dim=384", "student.depth=2", "student.num_heads=6", "student.patch_size=14",
                   "crops.global_crops_size=28", "crops.local_crops_size=14", "crops.local_crops_number=1",
                   "train.max_iterations=1", "train.batch_size_per_gpu=2")
    train(cfg, tmp_path / "run", data_loader_fn=FixedLoader())
    exported = torch.load(tmp_path / "run/export/teacher_backbone.pth", weights_only=True)
    model = dinov2_vits14(pretrained=False, img_size=28, depth=2)
    model.load_state_dict(exported, strict=True)
    assert model.embed_dim == 384 and len(model.blocks) == 2
    # and through the hub's own loader at the published resolution (pos_embed resized)
    with pytest.warns(UserWarning, match="pos_embed"):
        hub_model = dinov2_vits14(pretrained=str(tmp_path / "run/export/teacher_backbone.pth"), depth=2)
    assert torch.equal(hub_model.blocks[1].attn.qkv.weight, exported["blocks.1.attn.qkv.weight"])


def test_cli_trains_resumes_from_config_yaml_and_reports_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "default_data_loader", FixedLoader())
    run = tmp_path / "run"
    assert engine.main(["--output-dir", str(run), *TINY, "train.max_iterations=2"]) == 0
    assert ckpt.latest_checkpoint(run).name == "checkpoint_0000002.pth"
    # Restart from the run's own config.yaml with a longer schedule: resumes at iteration 2.
    assert engine.main(["--config", str(run / "config.yaml"), "train.max_iterations=3"]) == 0
    assert json.loads((run / "summary.json").read_text())["start_iteration"] == 2
    assert ckpt.latest_checkpoint(run).name == "checkpoint_0000003.pth"
    # --no-resume never overwrites a run that holds checkpoints.
    assert engine.main(["--config", str(run / "config.yaml"), "--no-resume"]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert engine.main(["--output-dir", str(tmp_path / "x"), *TINY, "train.batch_size=3"]) == 2
    assert "train.batch_size" in capsys.readouterr().err
    _inject_nan(monkeypatch, {0})
    assert engine.main(["--output-dir", str(tmp_path / "nan"), *TINY]) == 1
    assert "koleo_loss" in capsys.readouterr().err


def test_rerunning_a_finished_run_changes_nothing_and_says_so(tmp_path):
    run = tmp_path / "run"
    cfg = tiny_cfg("train.max_iterations=3")
    first = train(cfg, run, data_loader_fn=FixedLoader())
    files = ("summary.json", "metrics.jsonl", "export/teacher_backbone.pth", "checkpoints/checkpoint_0000003.pth")
    before = {name: (run / name).read_bytes() for name in files}

    again = train(cfg, run, data_loader_fn=FixedLoader())
    assert again == json.loads(json.dumps(first))  # the finished run's own summary, not an empty one
    assert again["final_losses"] and again["images_per_s"] > 0
    assert {name: (run / name).read_bytes() for name in files} == before
    assert "the run is complete (checkpoint at iteration 3 of 3)" in (run / "train.log").read_text()

    # Extending the schedule continues the run.
    longer = train(tiny_cfg("train.max_iterations=4"), run, data_loader_fn=FixedLoader())
    assert longer["iterations"] == 4 and longer["start_iteration"] == 3


def test_a_cut_off_latest_checkpoint_falls_back_to_the_newest_loadable_one(tmp_path):
    run = tmp_path / "run"
    cfg = tiny_cfg("train.max_iterations=6", "checkpoint.period_iterations=2")
    uninterrupted = train(cfg, run, data_loader_fn=FixedLoader())
    latest = run / "checkpoints" / "checkpoint_0000006.pth"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # a copy cut off half-way
    (run / "summary.json").unlink()  # as if the run had died while writing its last checkpoint

    resumed = train(cfg, run, data_loader_fn=FixedLoader())
    assert "checkpoint_0000006.pth cannot be loaded" in (run / "train.log").read_text()
    assert resumed["start_iteration"] == 4 and resumed["iterations"] == 6
    # Redoing iterations 5-6 from checkpoint 4 gives exactly the uninterrupted run.
    assert resumed["final_losses"] == pytest.approx(uninterrupted["final_losses"], rel=1e-6)

    # When nothing loads: one error naming every checkpoint, newest first.
    for path in ckpt.list_checkpoints(run):
        path.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="checkpoint_0000006.pth .*checkpoint_0000004.pth"):
        train(tiny_cfg("train.max_iterations=8", "checkpoint.period_iterations=2"), run,
              data_loader_fn=FixedLoader())


@pytest.mark.parametrize("workers", [0, 1])
def test_a_dataset_without_a_readable_image_is_one_line_naming_files(tmp_path, capsys, workers):
    folder = tmp_path / "data" / "Training" / "a"
    folder.mkdir(parents=True)
    for i in range(5):
        (folder / f"x{i}.png").write_text("not an image")
    status = engine.main(["--output-dir", str(tmp_path / "run"), *TINY, *real_data(tmp_path / "data"),
                          f"data.num_workers={workers}", "data.persistent_workers=false"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 2
    assert error.startswith("dinov2-repro train: error: none of the 4 images of a batch could be decoded "
                            "(")
    assert f"{folder}/x" in error and "Traceback" not in error  # names files of the dataset


def test_short_runs_scale_the_schedules_or_say_that_they_cut_them(tmp_path, monkeypatch):
    """`--iterations N` fits every epoch-based schedule into N iterations; `train.max_iterations` cuts and warns
    (it once left the lr peaking at the last step and the head's last layer frozen for the whole run, silently)."""
    monkeypatch.setattr(loop, "default_data_loader", FixedLoader())
    short = [*TINY, "optim.epochs=5", "optim.warmup_epochs=2", "optim.freeze_last_layer_epochs=2"]
    scaled = tmp_path / "scaled"  # 5 epochs of 2 iterations in 10: warm-up 4, last layer frozen for 4
    assert engine.main(["--output-dir", str(scaled), *short, "train.max_iterations=0", "--iterations", "10"]) == 0
    records = read_metrics(scaled / "metrics.jsonl")
    lr, last_layer = [r["lr"] for r in records], [r["last_layer_lr"] for r in records]
    assert len(records) == 10 and lr.index(max(lr)) == 3 and lr[-1] < 0.1 * max(lr)
    assert [v > 0 for v in last_layer] == [False] * 4 + [True] * 6
    assert "cuts the" not in (scaled / "train.log").read_text()
    assert "averages the teacher" not in (scaled / "train.log").read_text()  # too short to warn of a lag
    cut = tmp_path / "cut"
    assert engine.main(["--output-dir", str(cut), *short, "train.max_iterations=3"]) == 0
    log_text = (cut / "train.log").read_text()
    assert "train.max_iterations=3 cuts the 10-iteration schedule" in log_text
    assert "the head's last layer never trained" in log_text and "train.iterations=3 instead" in log_text


def test_the_start_warns_when_the_teacher_lags_the_schedule(tmp_path, monkeypatch):
    """The recipe's teacher (horizon 125 iterations) lags a 100-iteration schedule; 0.95 (20) does not."""
    monkeypatch.setattr(loop, "default_data_loader", FixedLoader())
    for momentum, warned in [(0.992, True), (0.95, False)]:
        run = tmp_path / str(momentum)
        assert engine.main(["--output-dir", str(run), *TINY, "optim.epochs=50", "train.max_iterations=1",
                            f"teacher.momentum_teacher={momentum}"]) == 0
        log_text = (run / "train.log").read_text()
        assert (f"teacher.momentum_teacher={momentum:g} averages the teacher over about" in log_text) == warned


def test_train_flags_match_the_other_commands_and_key_value_wins(tmp_path):
    args = engine.build_parser().parse_intermixed_args(
        ["--config", "demo_cpu", "--data", str(tmp_path), "--no-progress", "--iterations", "50", "train.iterations=60"])
    cfg = load_config(args.config, engine.flag_overrides(args) + args.overrides)
    assert cfg.data.path == str(tmp_path) and cfg.logging.progress_bar is False
    assert cfg.train.iterations == 60  # the explicit key=value comes last


def test_checkpoints_also_follow_the_clock(tmp_path):
    """An 80-iteration run with a 100-iteration period once died at 57 with nothing saved: a time period saves too
    (here a period so short that every step is due), and the last iteration always saves."""
    every_step = train(tiny_cfg("checkpoint.period_iterations=100", "checkpoint.period_minutes=1e-9"),
                       tmp_path / "clock", data_loader_fn=FixedLoader())
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "clock")] == [
        f"checkpoint_000000{i}.pth" for i in (1, 2, 3, 4)]
    assert "save_requested" not in every_step["final_diagnostics"]
    train(tiny_cfg("checkpoint.period_iterations=100", "checkpoint.period_minutes=0"), tmp_path / "end",
          data_loader_fn=FixedLoader())
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "end")] == ["checkpoint_0000004.pth"]


def test_a_run_with_the_fixed_head_gain_resumes_only_with_that_setting_and_says_so(tmp_path):
    from dinov2_repro.train.checkpoint import CheckpointError

    fixed = ["dino.head_norm_last_layer=true", "ibot.head_norm_last_layer=true"]
    train(tiny_cfg(*fixed, "train.max_iterations=1"), tmp_path / "run", data_loader_fn=FixedLoader())
    with pytest.raises(CheckpointError, match="resume it with dino.head_norm_last_layer=true"):
        train(tiny_cfg("train.max_iterations=2"), tmp_path / "run", data_loader_fn=FixedLoader())
    summary = train(tiny_cfg(*fixed, "train.max_iterations=2"), tmp_path / "run", data_loader_fn=FixedLoader())
    assert summary["start_iteration"] == 1  # it resumed from the checkpoint of the first run
