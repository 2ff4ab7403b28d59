"""Config loading: every shipped preset validates; merge order; errors name key, value and file."""

from pathlib import Path

import pytest

from dinov2_repro.config import ConfigError, config_to_dict, configs_dir, load_config, save_config

TRAIN_PRESETS = sorted((configs_dir() / "train").glob("*.yaml"))


def test_presets_are_shipped():
    names = {p.name for p in TRAIN_PRESETS}
    required = {"vits14_brain_mri.yaml", "vitb14_brain_mri.yaml", "vitl14_long.yaml", "vitl16_short.yaml",
                "demo_cpu.yaml"}
    assert required <= names


@pytest.mark.parametrize("preset", TRAIN_PRESETS, ids=lambda p: p.name)
def test_every_shipped_train_preset_validates(preset):
    cfg = load_config(preset)
    assert cfg.crops.local_crops_size % cfg.student.patch_size == 0
    assert cfg.crops.global_crops_size % cfg.student.patch_size == 0


def test_defaults_hold_the_published_recipe():
    cfg = load_config()
    assert cfg.teacher.momentum_teacher == 0.992 and cfg.teacher.final_momentum_teacher == 1.0
    assert (cfg.teacher.warmup_teacher_temp, cfg.teacher.teacher_temp) == (0.04, 0.07)
    assert cfg.teacher.warmup_teacher_temp_epochs == 30
    assert cfg.dino.student_temp == 0.1 and cfg.dino.center_momentum == 0.9
    assert (cfg.dino.head_n_prototypes, cfg.dino.head_hidden_dim, cfg.dino.head_bottleneck_dim) == (65536, 2048, 256)
    assert cfg.ibot.separate_head is False and list(cfg.ibot.mask_ratio_min_max) == [0.1, 0.5]
    assert cfg.koleo.loss_weight == 0.1
    assert (cfg.optim.base_lr, cfg.optim.weight_decay, cfg.optim.weight_decay_end) == (0.004, 0.04, 0.4)
    assert (cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult, cfg.optim.clip_grad) == (0.9, 0.2, 3.0)
    assert list(cfg.crops.global_crops_scale) == [0.32, 1.0] and list(cfg.crops.local_crops_scale) == [0.05, 0.32]
    assert cfg.train.official_epoch_length == 1250 and cfg.student.layerscale == 1e-5


def test_long_recipe_preset_values():
    cfg = load_config(configs_dir() / "train" / "vitl14_long.yaml")
    assert cfg.train.centering == "sinkhorn_knopp" and cfg.ibot.separate_head is True
    assert cfg.dino.head_n_prototypes == 131072 and cfg.dino.head_bottleneck_dim == 384
    assert cfg.optim.layerwise_decay == 1.0 and cfg.student.drop_path_rate == 0.4
    assert cfg.crops.local_crops_size == 98 and cfg.student.patch_size == 14


def test_merge_order_defaults_then_preset_then_overrides(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  batch_size_per_gpu: 7\n  seed: 3\n")
    cfg = load_config(preset, ["train.seed=11"])
    assert cfg.train.batch_size_per_gpu == 7  # preset beats default
    assert cfg.train.seed == 11  # command line beats preset
    assert cfg.optim.base_lr == 0.004  # untouched default survives


def test_unknown_key_names_key_and_file(tmp_path):
    preset = tmp_path / "typo.yaml"
    preset.write_text("optim:\n  base_lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(preset)
    assert "optim.base_lrr" in str(err.value) and str(preset) in str(err.value)


def test_wrong_type_names_key_value_and_file(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("train:\n  batch_size_per_gpu: lots\n")
    with pytest.raises(ConfigError) as err:
        load_config(preset)
    msg = str(err.value)
    assert "train.batch_size_per_gpu" in msg and "lots" in msg and str(preset) in msg


def test_impossible_local_crop_size_fails_naming_the_file(tmp_path):
    preset = tmp_path / "p14.yaml"
    preset.write_text("student:\n  patch_size: 14\n")
    with pytest.raises(ConfigError) as err:
        load_config(preset)
    msg = str(err.value)
    assert "crops.local_crops_size" in msg and "96" in msg and "98" in msg
    # the bad value came from the defaults file, the patch size from the preset: both are named
    assert msg.startswith(str(configs_dir() / "ssl_default.yaml")) and str(preset) in msg


def test_override_errors_name_the_command_line():
    with pytest.raises(ConfigError, match="command line.*compute.precision.*'fp8'"):
        load_config(None, ["compute.precision=fp8"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["compute.precision"])


@pytest.mark.parametrize("override, key", [
    ("student.arch=vit_huge", "student.arch"),
    ("crops.local_crops_scale=[0.5,0.1]", "crops.local_crops_scale"),
    ("crops.min_source_px_per_patch=-1", "crops.min_source_px_per_patch"),
    ("student.drop_path_rate=1.0", "student.drop_path_rate"),
    ("teacher.momentum_teacher=1.5", "teacher.momentum_teacher"),
    ("teacher.teacher_temp=0", "teacher.teacher_temp"),
    ("train.batch_size_per_gpu=0", "train.batch_size_per_gpu"),
    ("student.embed_dim=64", "student.embed_dim"),
    ("ibot.head_n_prototypes=4096", "ibot.head_n_prototypes"),
])
def test_impossible_values_are_rejected(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_untied_heads_may_differ():
    cfg = load_config(None, ["ibot.separate_head=true", "ibot.head_n_prototypes=4096"])
    assert cfg.ibot.head_n_prototypes == 4096


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(configs_dir() / "train" / "demo_cpu.yaml", ["train.seed=5", "optim.epochs=3"])
    saved = tmp_path / "run" / "config.yaml"
    save_config(cfg, saved)
    # the saved file alone restarts the run: loading it as a preset gives the same config
    again = load_config(saved)
    assert config_to_dict(again) == config_to_dict(cfg)
    assert not list(saved.parent.glob("*.tmp"))


def test_config_is_read_only():
    cfg = load_config()
    with pytest.raises(Exception):
        cfg.train.seed = 3


def test_empty_override_means_empty_string():
    cfg = load_config(None, ["data.split=", "data.path=x"])
    assert cfg.data.split == "" and cfg.data.path == "x"


def test_preset_names_resolve_inside_the_package_and_unknown_names_list_the_presets():
    from dinov2_repro.config import configs_dir

    assert configs_dir().parent.name == "dinov2_repro"  # shipped with the package, not beside the checkout
    by_name = load_config("demo_cpu", ["train.seed=3"])
    by_path = load_config(configs_dir() / "train" / "demo_cpu.yaml", ["train.seed=3"])
    assert by_name == by_path and by_name.student.embed_dim == 128
    with pytest.raises(ConfigError, match=r"'demo_gpu': no such file, and not a preset name \(presets: .*demo_cpu"):
        load_config("demo_gpu")
    with pytest.raises(ConfigError, match="config file not found: missing.yaml"):
        load_config("missing.yaml")


def test_config_show_prints_the_resolved_config_of_a_preset_with_overrides(capsys):
    from omegaconf import OmegaConf

    from dinov2_repro.config.cli import main

    assert main(["show", "demo_cpu", "train.seed=7"]) == 0
    shown = OmegaConf.create(capsys.readouterr().out)
    assert shown == OmegaConf.create(OmegaConf.to_yaml(load_config("demo_cpu", ["train.seed=7"])))
    assert shown.train.seed == 7 and shown.student.embed_dim == 128
    assert main(["show", "knn", "knn.temperature=0.1"]) == 0  # an evaluation preset gets the evaluation schema
    assert OmegaConf.create(capsys.readouterr().out).knn.temperature == 0.1
    assert main(["show", "demo_cpu", "train.no_such_key=1"]) == 2
    assert "train.no_such_key" in capsys.readouterr().err
    assert main(["list"]) == 0
    assert "train  demo_cpu" in capsys.readouterr().out
