"""Typed configuration of the evaluation protocols (linear probe, k-NN, fine-tuning).

Same rules as the pretraining config: schema defaults <- preset YAML (``configs/eval/*.yaml``) <- ``key=value``
overrides; an unknown key, a wrong type or an impossible value fails at load time naming the key, the value and
the file it came from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

from ..config.loader import ConfigError, source_of, load_structured
from ..config.schema import DICOM_WINDOWS, VOLUME_AXES

MODES = ("linear", "knn", "finetune")
# The linear-probe learning-rate grid of the DINOv2 reference (before scaling by batch / 256).
REFERENCE_LINEAR_LRS = [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1]
PRECISIONS = ("auto", "fp32", "bf16")
LR_SCALINGS = ("none", "linear_wrt_256", "sqrt_wrt_256")


@dataclass
class EvalDataConfig:
    train_split: str = ""  # "" = auto: Training / train (folders or the CSV's split column)
    val_split: str = ""  # "" = hold out val_fraction of the training split (stratified, seeded)
    test_split: str = ""  # "" = auto: Testing / test; none found -> test_fraction is held out (and reported)
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    split_seed: int = 0
    crop_size: int = 0  # 0 = the backbone's evaluation size (224 for hub weights, the crop it was pretrained at)
    resize_size: int = 0  # 0 = crop_size / 0.875 (256 for 224): resize shorter side, then centre crop
    mean: List[float] = field(default_factory=list)  # empty = the backbone's own (its run's, else ImageNet)
    std: List[float] = field(default_factory=list)
    batch_size: int = 64  # feature extraction and evaluation batches
    num_workers: int = 2
    dedup_test: bool = True  # also report on the test split minus near-duplicates of training images
    dedup_max_distance: int = 8  # Hamming distance between 256-bit difference hashes (see eval/dedup.py)
    dedup_cosine: float = 0.98  # CLS cosine of a copy (linear/knn; reported only): curate dedup --no-verify default
    group_regex: str = ""  # a patient id in each path (its first group, else the match): splits keep it together
    allow_group_overlap: bool = False  # a group in both training and test is an error unless this is true
    # volumes (NIfTI, DICOM), read as in pretraining: see the pretraining config's data section
    volume_axis: str = "axial"
    volume_min_foreground: float = 0.05
    volume_25d: bool = False
    volume_index: int = 0
    dicom_window: str = "percentile"
    slice_spacing_mm: float = 0.0  # keep slices at least this many mm apart along the slicing axis; 0 = all


@dataclass
class FeatureConfig:
    n_last_blocks: int = 4  # CLS tokens of the last n blocks are extracted (probes use 1..n)
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU


@dataclass
class LinearConfig:
    learning_rates: List[float] = field(default_factory=lambda: list(REFERENCE_LINEAR_LRS))
    lr_scaling: str = "linear_wrt_256"  # lr * batch_size / 256, as in the reference
    n_last_blocks: List[int] = field(default_factory=lambda: [1, 4])
    avgpool: List[bool] = field(default_factory=lambda: [False, True])
    iterations: int = 2000  # fixed budget, whatever the training-set size (reshuffled every epoch)
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 0.0


@dataclass
class KnnConfig:
    ks: List[int] = field(default_factory=lambda: [10, 20, 100, 200])
    temperature: float = 0.07
    backend: str = "torch"  # torch (chunked) | faiss (needs faiss installed) | auto
    chunk_size: int = 1024  # query rows per similarity chunk


@dataclass
class FinetuneConfig:
    optimizer: str = "adamw"  # adamw | adam
    lr: float = 2e-4
    lr_scaling: str = "linear_wrt_256"  # 2e-4 * 64 / 256 = 5e-5 at the default batch
    min_lr: float = 1e-6
    schedule: str = "cosine"  # cosine (after warmup) | constant
    warmup_epochs: float = 2.0
    epochs: int = 25
    batch_size: int = 64
    weight_decay: float = 0.05
    layer_decay: float = 0.75  # lr multiplier decay^(L+1-layer); 1 = no layer-wise decay
    label_smoothing: float = 0.1
    drop_path_rate: float = 0.1
    clip_grad: float = 1.0  # 0 disables clipping
    patience: int = 6  # early stopping: epochs without a better val accuracy; 0 = train all epochs
    head_input: str = "cls_avgpool"  # cls | cls_avgpool (CLS concatenated with the mean patch token)
    train_crop: str = "random_resized"  # random_resized | resize (squash to crop_size x crop_size)
    rrc_scale: List[float] = field(default_factory=lambda: [0.5, 1.0])
    hflip: bool = True
    intensity_jitter: float = 0.1  # brightness and contrast factors drawn in [1 - j, 1 + j]; 0 disables
    precision: str = "auto"
    save_best: bool = True  # checkpoint the best-on-val model (backbone in hub layout + head)


@dataclass
class EvalConfig:
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    train_fractions: List[float] = field(default_factory=lambda: [1.0])
    seeds: List[int] = field(default_factory=lambda: [0])
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    progress: bool = True
    cache_dir: str = ""  # "" = the user cache (features.default_cache_dir), shared by content between evaluations


def eval_configs_dir() -> Path:
    from ..config.loader import configs_dir

    return configs_dir() / "eval"


def default_preset(mode: str) -> Path:
    return eval_configs_dir() / f"{mode}.yaml"


def load_eval_config(preset_path: Optional[os.PathLike] = None, overrides: Sequence[str] = ()):
    """The validated, read-only eval config: schema <- preset <- ``key=value`` overrides."""
    return load_structured(EvalConfig, [preset_path], overrides, validate_eval_config)


def validate_eval_config(cfg, sources: Sequence[Tuple[str, Any]] = ()) -> None:
    """Values the types cannot check; `ConfigError` names key, value and file."""
    from omegaconf import OmegaConf

    def value(key: str):
        return OmegaConf.select(cfg, key)

    def fail(key: str, message: str):
        raise ConfigError(f"{source_of(key, sources)}: '{key}' = {value(key)!r}: {message}")

    def check(key: str, ok: bool, message: str):
        if not ok:
            fail(key, message)

    for key, choices in (("features.precision", PRECISIONS), ("finetune.precision", PRECISIONS),
                         ("linear.lr_scaling", LR_SCALINGS), ("finetune.lr_scaling", LR_SCALINGS),
                         ("knn.backend", ("torch", "faiss", "auto")),
                         ("finetune.optimizer", ("adamw", "adam")), ("finetune.schedule", ("cosine", "constant")),
                         ("finetune.head_input", ("cls", "cls_avgpool")),
                         ("finetune.train_crop", ("random_resized", "resize"))):
        check(key, value(key) in choices, f"must be one of {list(choices)}")
    check("device", value("device") in ("auto", "cpu", "cuda") or str(value("device")).startswith("cuda:"),
          "must be auto, cpu, cuda or cuda:N")
    for key in ("data.val_fraction", "data.test_fraction"):
        check(key, 0.0 < value(key) < 1.0, "must lie in (0, 1)")
    check("data.volume_axis", value("data.volume_axis") in VOLUME_AXES, f"must be one of {list(VOLUME_AXES)}")
    check("data.dicom_window", value("data.dicom_window") in DICOM_WINDOWS, f"must be one of {list(DICOM_WINDOWS)}")
    check("data.volume_min_foreground", 0.0 <= value("data.volume_min_foreground") <= 1.0, "must lie in [0, 1]")
    check("data.dedup_cosine", -1.0 <= value("data.dedup_cosine") <= 1.0, "must lie in [-1, 1]")
    check("data.slice_spacing_mm", value("data.slice_spacing_mm") >= 0, "must be >= 0")
    check("data.val_split", not value("data.val_split") or value("data.val_split") != value("data.test_split"),
          "the validation split must differ from the test split (selection never looks at the test split)")
    for key in ("data.crop_size", "data.resize_size", "data.num_workers", "data.dedup_max_distance",
                "finetune.patience"):
        check(key, value(key) >= 0, "must be >= 0")
    check("data.resize_size", not value("data.resize_size") or not value("data.crop_size")
          or value("data.resize_size") >= value("data.crop_size"), "must be >= data.crop_size")
    for key in ("data.mean", "data.std"):
        check(key, len(value(key)) in (0, 3), "needs 3 values (or none: the backbone's own)")
    check("data.std", all(v > 0 for v in value("data.std")), "values must be > 0")
    for key in ("data.batch_size", "features.n_last_blocks", "linear.iterations", "linear.batch_size",
                "knn.chunk_size", "finetune.epochs", "finetune.batch_size"):
        check(key, value(key) >= 1, "must be >= 1")
    check("linear.learning_rates", len(value("linear.learning_rates")) > 0
          and all(v > 0 for v in value("linear.learning_rates")), "needs at least one learning rate, all > 0")
    check("linear.n_last_blocks", len(value("linear.n_last_blocks")) > 0
          and all(1 <= n <= value("features.n_last_blocks") for n in value("linear.n_last_blocks")),
          f"needs values in [1, features.n_last_blocks = {value('features.n_last_blocks')}]")
    check("linear.avgpool", len(value("linear.avgpool")) > 0, "needs at least one of false / true")
    check("linear.momentum", 0.0 <= value("linear.momentum") < 1.0, "must lie in [0, 1)")
    check("linear.weight_decay", value("linear.weight_decay") >= 0, "must be >= 0")
    check("knn.ks", len(value("knn.ks")) > 0 and all(k >= 1 for k in value("knn.ks")), "needs values >= 1")
    check("knn.temperature", value("knn.temperature") > 0, "must be > 0")
    for key in ("finetune.lr", "finetune.min_lr", "finetune.weight_decay", "finetune.warmup_epochs",
                "finetune.clip_grad", "finetune.intensity_jitter"):
        check(key, value(key) >= 0, "must be >= 0")
    check("finetune.lr", value("finetune.lr") > 0, "must be > 0")
    check("finetune.layer_decay", 0.0 < value("finetune.layer_decay") <= 1.0, "must lie in (0, 1]")
    check("finetune.label_smoothing", 0.0 <= value("finetune.label_smoothing") < 1.0, "must lie in [0, 1)")
    check("finetune.drop_path_rate", 0.0 <= value("finetune.drop_path_rate") < 1.0, "must lie in [0, 1)")
    check("finetune.intensity_jitter", value("finetune.intensity_jitter") < 1.0, "must lie in [0, 1)")
    scale = list(value("finetune.rrc_scale"))
    check("finetune.rrc_scale", len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1, "must be [min, max] in (0, 1]")
    fractions = list(value("train_fractions"))
    check("train_fractions", len(fractions) > 0 and all(0 < f <= 1 for f in fractions),
          "needs values in (0, 1]")
    check("train_fractions", len(set(fractions)) == len(fractions), "has duplicates")
    seeds = list(value("seeds"))
    check("seeds", len(seeds) > 0 and len(set(seeds)) == len(seeds), "needs distinct seeds")
