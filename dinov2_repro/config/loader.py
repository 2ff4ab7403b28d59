"""Load, merge and validate configs: defaults -> preset -> ``key=value`` overrides.

Every source is merged into the typed `SSLConfig` schema, so an unknown key or a wrong type fails at once; then
`validate_config` checks values that types cannot express (a crop size that the patch size does not divide,
an unknown architecture, ...). Every error names the key, the value and the source file it came from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple

from . import schema

COMMAND_LINE = "<command line>"


class ConfigError(ValueError):
    """A config key, type or value that cannot be used; the message names key, value and file."""


def configs_dir() -> Path:
    """The folder holding ``ssl_default.yaml`` and the presets (``$DINOV2_REPRO_CONFIGS`` overrides it)."""
    env = os.environ.get("DINOV2_REPRO_CONFIGS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / "configs"  # shipped inside the package (wheels too)


def resolve_preset(name: os.PathLike) -> Path:
    """A config path as given, or a preset name (``demo_cpu``, ``knn``) looked up under `configs_dir`."""
    path = Path(name)
    if path.is_file() or path.suffix or len(path.parts) > 1:
        return path
    found = sorted(configs_dir().glob(f"*/{path.name}.yaml"))
    if len(found) == 1:
        return found[0]
    names = sorted(p.stem for p in configs_dir().glob("*/*.yaml"))
    raise ConfigError(f"config {str(name)!r}: no such file, and not a preset name (presets: {', '.join(names)})")


def default_config_path() -> Path:
    return configs_dir() / "ssl_default.yaml"


def _read_yaml(path: Path):
    from omegaconf import OmegaConf

    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        conf = OmegaConf.load(path)
    except Exception as exc:  # yaml syntax errors carry a line number; keep it
        raise ConfigError(f"{path}: cannot parse YAML: {exc}") from exc
    if conf is None:
        conf = OmegaConf.create({})
    return conf


def _parse_overrides(overrides: Sequence[str]):
    from omegaconf import OmegaConf

    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"{COMMAND_LINE}: overrides must look like key=value, got {bad}")
    # "key=" means an empty string (OmegaConf would read it as null, which typed str fields reject)
    dotlist = [o + "''" if o.endswith("=") else o for o in overrides]
    try:
        return OmegaConf.from_dotlist(dotlist)
    except Exception as exc:
        raise ConfigError(f"{COMMAND_LINE}: cannot parse overrides {list(overrides)}: {exc}") from exc


def _merge_into(base, conf, source: str):
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.merge(base, conf)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        value = _lookup(conf, key) if key != "?" else None
        kind = "unknown key" if "not in" in str(exc) or "Key '" in str(exc) else "invalid value"
        raise ConfigError(
            f"{source}: {kind} for '{key}' (value {value!r}): {str(exc).splitlines()[0]}"
        ) from exc


def _lookup(conf, dotted_key: str):
    from omegaconf import OmegaConf

    try:
        return OmegaConf.select(conf, dotted_key, throw_on_missing=False)
    except Exception:
        return None


def load_config(
    preset_path: Optional[os.PathLike] = None,
    overrides: Sequence[str] = (),
    defaults_path: Optional[os.PathLike] = None,
):
    """Return the validated config: schema <- defaults YAML <- preset YAML <- ``key=value`` overrides.

    A resolved ``config.yaml`` saved in a run directory is a complete preset, so
    ``load_config(run_dir / "config.yaml")`` restarts that run from the file alone.
    """
    defaults_path = Path(defaults_path) if defaults_path else default_config_path()
    return load_structured(schema.SSLConfig, [defaults_path, preset_path], overrides, validate_config)


def load_structured(schema_class, yaml_paths: Sequence[Optional[os.PathLike]], overrides: Sequence[str],
                    validate: Callable) -> Any:
    """Merge YAML files (None entries skipped) then overrides into `schema_class`, validate, make read-only.

    `validate(cfg, sources)` receives the (source name, conf) pairs so that its errors can name the file.
    """
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(schema_class)
    paths = [resolve_preset(p) for p in yaml_paths if p]
    sources: List[Tuple[str, Any]] = [(str(p), _read_yaml(p)) for p in paths]
    if overrides:
        sources.append((COMMAND_LINE, _parse_overrides(overrides)))
    for source, conf in sources:
        cfg = _merge_into(cfg, conf, source)
    validate(cfg, sources)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def source_of(key: str, sources: Sequence[Tuple[str, Any]]) -> str:
    """The last source that set ``key`` (where a bad value came from), else the schema default."""
    for source, conf in reversed(sources):
        if _lookup(conf, key) is not None:
            return source
    return "<schema default>"


def validate_config(cfg, sources: Sequence[Tuple[str, Any]] = ()) -> None:
    """Check the values types cannot express; raise `ConfigError` naming key, value and file."""

    def fail(key: str, message: str):
        value = _lookup(cfg, key)
        raise ConfigError(f"{source_of(key, sources)}: '{key}' = {value!r}: {message}")

    def one_of(key: str, choices: Iterable[str]):
        if _lookup(cfg, key) not in choices:
            fail(key, f"must be one of {list(choices)}")

    def in_range(key: str, low: float, high: float, low_open=False, high_open=False):
        v = _lookup(cfg, key)
        if (v < low or (low_open and v == low)) or (v > high or (high_open and v == high)):
            lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
            fail(key, f"must lie in {lo}{low}, {high}{hi}")

    def pair(key: str, low: float, high: float):
        v = list(_lookup(cfg, key))
        if len(v) != 2 or not (low <= v[0] <= v[1] <= high):
            fail(key, f"must be [min, max] with {low} <= min <= max <= {high}")

    one_of("student.arch", schema.ARCHS)
    one_of("student.ffn_layer", schema.FFN_LAYERS)
    one_of("student.attn_backend", schema.ATTN_BACKENDS)
    one_of("train.centering", schema.CENTERINGS)
    one_of("train.nonfinite", schema.NONFINITE_POLICIES)
    one_of("compute.precision", schema.PRECISIONS)
    one_of("compute.param_dtype", schema.PRECISIONS)
    one_of("compute.parallelism", schema.PARALLELISMS)
    one_of("compute.device", schema.DEVICES)
    one_of("data.kind", schema.DATA_KINDS)
    one_of("data.augmentation", schema.AUG_PRESETS)
    one_of("data.augmentation_device", schema.AUG_DEVICES)
    if cfg.data.augmentation == "histology" and cfg.data.augmentation_device != "cpu":
        fail("data.augmentation", "histology runs on the CPU only: set data.augmentation_device=cpu")
    if cfg.data.augmentation_max_side < 0:
        fail("data.augmentation_max_side", "must be >= 0 (0 keeps the decoded size)")
    one_of("data.blur_mode", schema.BLUR_MODES)
    one_of("optim.scaling_rule", ("sqrt_wrt_1024", "linear_wrt_256", "none"))
    one_of("logging.wandb_mode", ("offline", "online", "disabled"))

    patch = cfg.student.patch_size
    if patch < 1:
        fail("student.patch_size", "must be a positive integer")
    for key in ("crops.global_crops_size", "crops.local_crops_size"):
        size = _lookup(cfg, key)
        if size < patch or size % patch:
            fail(key, f"must be a positive multiple of student.patch_size = {patch} (set in "
                      f"{source_of('student.patch_size', sources)}), e.g. {max(1, round(size / patch)) * patch}")
    pair("crops.global_crops_scale", 0.0, 1.0)
    pair("crops.local_crops_scale", 0.0, 1.0)
    pair("ibot.mask_ratio_min_max", 0.0, 1.0)
    in_range("crops.min_source_px_per_patch", 0.0, float("inf"))
    if cfg.crops.local_crops_number < 0:
        fail("crops.local_crops_number", "must be >= 0")
    in_range("student.drop_path_rate", 0.0, 1.0, high_open=True)
    in_range("checkpoint.period_minutes", 0.0, float("inf"))
    in_range("data.volume_min_foreground", 0.0, 1.0)
    in_range("data.slice_spacing_mm", 0.0, float("inf"))
    one_of("data.volume_axis", schema.VOLUME_AXES)
    one_of("data.dicom_window", schema.DICOM_WINDOWS)
    in_range("student.layerscale", 0.0, float("inf"))
    in_range("student.interpolate_offset", 0.0, 1.0)
    custom = [cfg.student.embed_dim, cfg.student.depth, cfg.student.num_heads]
    if any(v < 0 for v in custom) or (any(custom) and not all(custom)):
        fail("student.embed_dim", f"student.embed_dim/depth/num_heads = {custom}: set all three (> 0) or none")
    if all(custom) and cfg.student.embed_dim % cfg.student.num_heads:
        fail("student.embed_dim", f"must divide by student.num_heads = {cfg.student.num_heads}")
    if cfg.student.num_register_tokens < 0:
        fail("student.num_register_tokens", "must be >= 0")
    in_range("teacher.momentum_teacher", 0.0, 1.0)
    in_range("teacher.final_momentum_teacher", 0.0, 1.0)
    for key in ("teacher.teacher_temp", "teacher.warmup_teacher_temp", "dino.student_temp"):
        in_range(key, 0.0, float("inf"), low_open=True)
    in_range("dino.center_momentum", 0.0, 1.0)
    in_range("ibot.mask_sample_probability", 0.0, 1.0)
    for key in ("dino.loss_weight", "ibot.loss_weight", "koleo.loss_weight", "optim.clip_grad",
                "optim.weight_decay", "optim.weight_decay_end", "optim.min_lr", "optim.base_lr"):
        in_range(key, 0.0, float("inf"))
    for key in ("dino.head_n_prototypes", "dino.head_bottleneck_dim", "dino.head_hidden_dim", "dino.head_nlayers",
                "ibot.head_n_prototypes", "ibot.head_bottleneck_dim", "ibot.head_hidden_dim", "ibot.head_nlayers",
                "train.batch_size_per_gpu", "train.grad_accum_steps", "train.official_epoch_length",
                "checkpoint.period_iterations", "checkpoint.keep_last", "evaluation.eval_period_iterations",
                "logging.log_period_iterations"):
        if _lookup(cfg, key) < 1:
            fail(key, "must be >= 1")
    for key in ("optim.epochs", "optim.warmup_epochs", "optim.freeze_last_layer_epochs",
                "teacher.warmup_teacher_temp_epochs", "train.iterations", "train.max_iterations", "data.num_workers"):
        if _lookup(cfg, key) < 0:
            fail(key, "must be >= 0")
    in_range("optim.layerwise_decay", 0.0, 1.0, low_open=True)
    in_range("optim.adamw_beta1", 0.0, 1.0, high_open=True)
    in_range("optim.adamw_beta2", 0.0, 1.0, high_open=True)
    if cfg.optim.epochs == 0:
        fail("optim.epochs", "is 0: nothing to train (every schedule is counted in epochs)")
    schedule = cfg.train.iterations or cfg.optim.epochs * cfg.train.official_epoch_length
    if cfg.train.max_iterations > schedule:
        fail("train.max_iterations", f"stops the run after the end of its {schedule}-iteration schedule; to make "
             f"the run longer set train.iterations={cfg.train.max_iterations} (every schedule scales to it) or raise "
             f"optim.epochs")
    if len(cfg.data.mean) != 3 or len(cfg.data.std) != 3 or min(cfg.data.std) <= 0:
        fail("data.std" if len(cfg.data.mean) == 3 else "data.mean", "need 3 values each, std > 0")
    if cfg.ibot.separate_head is False and cfg.ibot.loss_weight > 0:
        # Tied heads: iBOT reuses the DINO head, so its own head keys must not silently disagree.
        for part in ("head_n_prototypes", "head_bottleneck_dim", "head_nlayers", "head_hidden_dim",
                     "head_norm_last_layer"):
            if cfg.ibot[part] != cfg.dino[part]:
                fail(f"ibot.{part}", f"differs from dino.{part} = {cfg.dino[part]} but ibot.separate_head is "
                                     "false (tied heads share the DINO head); set both equal or untie the heads")


def save_config(cfg, path: os.PathLike) -> None:
    """Write the resolved config as YAML (atomically), so the run restarts from this file alone."""
    from omegaconf import OmegaConf

    from ..files import write_text_atomic

    write_text_atomic(path, OmegaConf.to_yaml(cfg, resolve=True))


def config_to_dict(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)
