"""Typed schema of every pretraining knob.

The dataclasses below are the single source of truth for key names and types; `configs/ssl_default.yaml`
holds the published DINOv2 default *values* (see the recipe page) and must validate against this schema.
Section names mirror Meta's ``ssl_default_config.yaml`` in lower case, so a reader of the paper's code finds
each knob where they expect it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

ARCHS = ("vit_small", "vit_base", "vit_large", "vit_giant2")
FFN_LAYERS = ("mlp", "swiglu", "swiglufused")
CENTERINGS = ("softmax", "sinkhorn_knopp")
PRECISIONS = ("fp32", "bf16", "fp16")
PARALLELISMS = ("none", "ddp", "fsdp")
DEVICES = ("auto", "cpu", "cuda")
ATTN_BACKENDS = ("auto", "sdpa", "xformers")
DATA_KINDS = ("auto", "folder", "class_folder", "kaggle", "csv", "synthetic", "nifti", "dicom", "mixed",
              "wsi_tiles")
VOLUME_AXES = ("axial", "coronal", "sagittal")
DICOM_WINDOWS = ("percentile", "file", "brain", "subdural", "bone", "soft_tissue", "lung")
AUG_PRESETS = ("dinov2", "mri", "histology")
AUG_DEVICES = ("cpu", "cuda")
BLUR_MODES = ("paper", "as_released")
NONFINITE_POLICIES = ("stop", "skip_batch")
DROP_PATH_MODES = ("uniform", "linear")


@dataclass
class StudentConfig:
    arch: str = "vit_large"
    patch_size: int = 16
    # 0 = the architecture's own size; set all three for a custom (e.g. tiny CPU demo) ViT
    embed_dim: int = 0
    depth: int = 0
    num_heads: int = 0
    drop_path_rate: float = 0.3
    drop_path_uniform: bool = True  # True: same rate in every block; False: linearly increasing to the rate
    layerscale: float = 1.0e-5  # LayerScale init for training from scratch; 0 disables LayerScale
    ffn_layer: str = "mlp"
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    num_register_tokens: int = 0
    interpolate_antialias: bool = False
    interpolate_offset: float = 0.1
    attn_backend: str = "auto"  # sdpa always works; xformers only when installed and on CUDA
    pretrained_weights: str = ""  # optional hub-layout .pth to initialise the student (and teacher) from


@dataclass
class TeacherConfig:
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30


@dataclass
class DinoConfig:
    loss_weight: float = 1.0
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_hidden_dim: int = 2048
    head_use_bn: bool = False
    head_norm_last_layer: bool = False  # True: DINO v1's fixed weight-norm gain g = 1; False: g trains (DINOv2)
    student_temp: float = 0.1
    center_momentum: float = 0.9


@dataclass
class IbotConfig:
    loss_weight: float = 1.0
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: List[float] = field(default_factory=lambda: [0.1, 0.5])
    separate_head: bool = False
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_hidden_dim: int = 2048
    head_use_bn: bool = False
    head_norm_last_layer: bool = False


@dataclass
class KoleoConfig:
    loss_weight: float = 0.1


@dataclass
class OptimConfig:
    epochs: int = 100
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    base_lr: float = 0.004  # for a global batch of 1024
    warmup_epochs: int = 10
    min_lr: float = 1.0e-6
    clip_grad: float = 3.0  # 0 disables clipping
    freeze_last_layer_epochs: int = 1
    scaling_rule: str = "sqrt_wrt_1024"  # or "linear_wrt_256" or "none"
    patch_embed_lr_mult: float = 0.2
    layerwise_decay: float = 0.9
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999


@dataclass
class CropsConfig:
    global_crops_scale: List[float] = field(default_factory=lambda: [0.32, 1.0])
    local_crops_number: int = 8
    local_crops_scale: List[float] = field(default_factory=lambda: [0.05, 0.32])
    global_crops_size: int = 224
    local_crops_size: int = 96
    # A crop keeps at least this many source pixels across each output patch (the scale's lower end is raised
    # per image); 0 = the recipe's scales as given. Binds only on images of a few dozen pixels.
    min_source_px_per_patch: float = 1.0


@dataclass
class DataConfig:
    path: str = ""  # dataset root, CSV manifest, or synthetic output folder
    kind: str = "auto"
    split: str = ""  # e.g. "Training" for the Kaggle layout; "" = whole folder
    augmentation: str = "dinov2"  # "mri" drops hue/saturation jitter and adds gamma and noise; "histology" adds
    # H&E stain jitter and right-angle turns/vertical flips to the DINOv2 recipe (data/histology.py)
    augmentation_device: str = "cpu"  # cpu: per image in the loader workers; cuda: per batch on the GPU
    augmentation_max_side: int = 0  # augmentation_device=cuda: workers shrink images to this longer side (0: off)
    blur_mode: str = "paper"  # "as_released" reproduces the released checkpoints' inverted blur
    intensity_jitter: bool = True  # false: no colour jitter/grayscale (MRI: gamma/noise); crops, blur, solarize kept
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    num_workers: int = 10
    pin_memory: bool = True
    persistent_workers: bool = True
    prefetch_factor: int = 2
    synthetic_n_per_class: int = 64  # used when kind == "synthetic" and the folder is missing
    synthetic_n_test_per_class: Optional[int] = None  # Testing images per class; None = synthetic_n_per_class // 4
    volume_axis: str = "axial"  # kind nifti: slices along axial | coronal | sagittal (of the RAS+ volume)
    volume_min_foreground: float = 0.05  # kind nifti: slices with less foreground are skipped
    volume_25d: bool = False  # kind nifti: the slices below, at and above as the 3 channels
    volume_index: int = 0  # kind nifti, 4D files: which volume; -1 = each
    dicom_window: str = "percentile"  # kind dicom: percentile | file (WindowCenter/Width) | brain | bone | ...
    slice_spacing_mm: float = 0.0  # nifti/dicom: kept slices at least this many mm apart along the axis; 0 = all


@dataclass
class TrainConfig:
    batch_size_per_gpu: int = 64
    grad_accum_steps: int = 1
    output_dir: str = "runs/default"
    seed: int = 0
    official_epoch_length: int = 1250  # iterations per "epoch", the unit of every schedule
    iterations: int = 0  # 0 = epochs * official_epoch_length; N = a run of N with every schedule scaled to it
    max_iterations: int = 0  # 0 = the whole schedule; N = stop after N iterations, schedules unchanged
    centering: str = "softmax"  # teacher targets: "softmax" centering (EMA center) or "sinkhorn_knopp"
    nonfinite: str = "stop"  # "skip_batch" drops a step whose loss or grad norm is not finite


@dataclass
class ComputeConfig:
    device: str = "auto"
    precision: str = "bf16"  # fp32 | bf16 autocast | fp16 autocast with a gradient scaler
    parallelism: str = "none"  # none | ddp | fsdp (FSDP2 fully_shard per block)
    param_dtype: str = "bf16"  # FSDP mixed precision: parameters; gradients reduce in fp32
    compile: bool = False  # per-block torch.compile
    activation_checkpointing: bool = False
    fused_optimizer: bool = True  # fused AdamW on CUDA, foreach elsewhere


@dataclass
class CheckpointConfig:
    period_iterations: int = 12500
    period_minutes: float = 30.0  # also save when this much time passed since the last save (0 = off)
    keep_last: int = 3


@dataclass
class LoggingConfig:
    log_period_iterations: int = 10
    progress_bar: bool = True
    tensorboard: bool = False
    wandb: bool = False
    wandb_mode: str = "offline"  # online only when asked for
    wandb_project: str = "dinov2_repro"
    collapse_patience_iterations: int = 200


@dataclass
class EvaluationConfig:
    eval_period_iterations: int = 12500  # teacher backbone exported in hub layout at this period


@dataclass
class SSLConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    ibot: IbotConfig = field(default_factory=IbotConfig)
    koleo: KoleoConfig = field(default_factory=KoleoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
