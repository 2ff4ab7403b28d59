"""Backbone weights, owned in one place.

Everything that turns a file into a loaded `DinoVisionTransformer`, or a trained backbone into a file, goes
through here: `hub.py`, the training meta-architecture (``student.pretrained_weights``), the engine's export and
the evaluation's SPEC parser (`eval/backbone_spec.py`) all call these functions.

- `read_backbone_source`: a run directory of ours (``export/`` or the latest checkpoint), an export folder or its
  ``backbone.json``, a training or fine-tuning checkpoint, a published hub file, a Hugging Face folder or state
  dict -> (state, architecture, where it came from and the preprocessing it expects);

- `read_weights_file`: a ``.pth``/``.pt``/``.bin`` (``torch.load(weights_only=True)``: tensors and plain
  containers only) or a ``.safetensors`` file;
- `read_hf_folder`: a Hugging Face ``facebook/dinov2-*`` folder, through the renames of `models.convert`;
- `backbone_state`: the backbone, in the hub layout, out of whatever those returned -- a hub state dict, our
  training checkpoints (``model`` -> ``teacher.backbone.*``), DINO v1 style ``teacher``/``student`` nesting,
  torch.compile's ``_orig_mod.``, DDP's ``module.``, FSDP1's wrapper names, reference block chunks, HF keys;
- `infer_architecture`: constructor arguments read off the tensor shapes (one table of published head counts);
- `fit_pos_embed`, `load_strict`: resize a checkpoint's positional embedding to the model, then load strictly
  with an error that names the missing and unexpected keys;
- `write_export` / `read_sidecar` / `arch_from_sidecar` / `build_from_export`: the exported backbone and its
  architecture sidecar (``backbone.json``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

from ..layers.swiglu_ffn import swiglu_hidden_features
from ..files import write_atomic
from .convert import convert_hf_state_dict, flatten_block_chunks, hf_config_to_arch, short_list

# Published variants: width -> heads (all 64-dim heads). Other widths need num_heads from a sidecar or a config.
PUBLISHED_NUM_HEADS = {384: 6, 768: 12, 1024: 16, 1536: 24}
SIDECAR = "backbone.json"
EXPORT_WEIGHTS = "teacher_backbone.pth"
# Preferred first: the EMA teacher is the model DINO evaluates.
BACKBONE_PREFIXES = ("teacher.backbone.", "student.backbone.", "backbone.")
NESTING_KEYS = ("model", "teacher", "student", "state_dict")
# Names that wrappers insert into keys: torch.compile, FSDP1, activation checkpointing.
WRAPPER_PARTS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
HUB_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight")
HUB_IMG_SIZE = 518  # published weights were trained at 518 px (pos_embed has 1 + 37 * 37 rows)
DEFAULT_EVAL_SIZE = 224
HUB_NAME = re.compile(r"dinov2_vit([sblg])(\d+)(_reg(\d+))?", re.IGNORECASE)  # published file names
_HUB_ARCHS = {"s": "vit_small", "b": "vit_base", "l": "vit_large", "g": "vit_giant2"}
_CHECKPOINT_NAME = re.compile(r"checkpoint_\d+\.pth")  # our training checkpoints


class WeightsError(ValueError):
    """Weights that cannot be read or do not fit; the message names the source and what was wrong."""


# ------------------------------------------------------------------------------------------------ reading
def read_weights_file(path: os.PathLike) -> Any:
    """The object stored in a weights file (or another file of tensors, such as a feature cache), on the CPU.

    Never unpickles arbitrary Python objects: tensors, numbers, strings and plain containers only."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(f"{path}: holds Python objects besides tensors, so it is not read as weights "
                           f"(a training checkpoint of ours is read by its run directory or checkpoint_*.pth "
                           f"name): {str(exc).splitlines()[0]}") from exc
    except Exception as exc:  # truncated file, not a torch file, ...
        raise WeightsError(f"{path}: cannot read: {type(exc).__name__}: {exc}") from exc


def read_hf_folder(folder: os.PathLike) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """A Hugging Face DINOv2 folder (config.json + model.safetensors, a sharded safetensors index, or
    pytorch_model.bin) -> (hub-layout state dict, architecture kwargs from config.json)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    try:
        arch = hf_config_to_arch(json.loads(config_path.read_text()), str(config_path))
    except (OSError, ValueError, KeyError) as exc:
        raise WeightsError(f"{folder}: cannot read the Hugging Face config: {exc}") from exc
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif index.is_file():
        files = [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    elif (folder / "pytorch_model.bin").is_file():
        files = [folder / "pytorch_model.bin"]
    else:
        raise WeightsError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    hf_state: Dict[str, Tensor] = {}
    for file in files:
        hf_state.update(read_weights_file(file))
    try:
        return convert_hf_state_dict(hf_state), arch
    except KeyError as exc:
        raise WeightsError(f"{folder}: {exc.args[0]}") from exc


def _unwrap(obj: Any, source: str) -> Mapping[str, Any]:
    """Descend ``model`` / ``teacher`` / ``student`` / ``state_dict`` nesting to the dict that holds tensors."""
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        if any(isinstance(v, Tensor) for v in obj.values()):
            return obj
        inner = next((obj[k] for k in NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{source}: holds a {type(obj).__name__}, not a state dict")
    return obj


def _clean_key(key: str) -> str:
    for part in WRAPPER_PARTS:
        key = key.replace(part, "")
    return key.removeprefix("module.")  # DDP, and DINO v1's teacher/student dicts


def is_hub_layout(state: Mapping[str, Any]) -> bool:
    return all(k in state for k in HUB_KEYS)


def backbone_state(obj: Any, source: str, prefix: Optional[str] = None) -> Dict[str, Tensor]:
    """The backbone held in ``obj`` (what `read_weights_file` returned), in the hub layout.

    ``prefix`` picks one module of a training state dict (default: the first of `BACKBONE_PREFIXES` present).
    Raises `WeightsError` naming the prefixes present when no backbone is found.
    """
    state = {_clean_key(str(k)): v for k, v in _unwrap(obj, source).items()}
    prefixes = (prefix,) if prefix else BACKBONE_PREFIXES
    chosen = next((p for p in prefixes if any(k.startswith(p) for k in state)), None)
    if chosen is not None:
        state = {k[len(chosen):]: v for k, v in state.items() if k.startswith(chosen)}
    elif prefix:
        seen = sorted({".".join(k.split(".")[:2]) + "." for k in state})
        raise WeightsError(f"{source}: no key starts with {prefix!r}; prefixes present: {short_list(seen)}")
    if any(k.startswith(("embeddings.", "dinov2.embeddings.", "dinov2_with_registers.")) for k in state):
        try:
            state = convert_hf_state_dict(state)
        except KeyError as exc:
            raise WeightsError(f"{source}: {exc.args[0]}") from exc
    state = flatten_block_chunks(state)
    if not is_hub_layout(state):
        raise WeightsError(f"{source}: no ViT backbone found (needs {', '.join(HUB_KEYS)}); keys: "
                           f"{short_list(state)}")
    return state


# ------------------------------------------------------------------------------------------------ architecture
def _swiglu_mlp_ratio(embed_dim: int, hidden: int) -> float:
    # SwiGLU stores the rounded hidden size; find an mlp_ratio whose width rounds to it (4 when possible).
    for mlp_hidden in [4 * embed_dim, *range(hidden, 2 * hidden + 8)]:
        if swiglu_hidden_features(mlp_hidden) == hidden:
            return mlp_hidden / embed_dim
    raise WeightsError(f"no mlp_ratio gives a SwiGLU hidden size of {hidden} at width {embed_dim}")


def pos_embed_img_size(state: Mapping[str, Tensor], source: str) -> int:
    """The input size a hub-layout state dict was trained at: its square pos_embed grid times the patch size."""
    missing = [k for k in ("pos_embed", "patch_embed.proj.weight") if k not in state]
    if missing:
        raise WeightsError(f"{source}: not a hub-layout backbone: missing {missing}")
    n_patches = int(state["pos_embed"].shape[1]) - 1
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise WeightsError(f"{source}: pos_embed has {n_patches} patch positions, not a square grid")
    return side * int(state["patch_embed.proj.weight"].shape[-1])


def infer_architecture(state: Mapping[str, Tensor], num_heads: Optional[int] = None,
                       source: str = "state dict") -> Dict[str, Any]:
    """`DinoVisionTransformer` keyword arguments that reproduce a hub-layout state dict's shapes.

    The number of heads is not in the shapes: give it, or it is the published value for the width; any other
    width raises (a guess would build a different network that still loads).
    """
    missing = [k for k in HUB_KEYS if k not in state]
    if missing:
        raise WeightsError(f"{source}: not a hub-layout backbone: missing {missing}")
    embed_dim = int(state["cls_token"].shape[-1])
    if num_heads is None:
        if embed_dim not in PUBLISHED_NUM_HEADS:
            raise WeightsError(f"{source}: width {embed_dim} is not a published one, so the number of heads cannot "
                               f"be read off the weights; give num_heads (backbone.json, or num_heads= in the SPEC)")
        num_heads = PUBLISHED_NUM_HEADS[embed_dim]
    if embed_dim % int(num_heads):
        raise WeightsError(f"{source}: width {embed_dim} is not divisible by num_heads={num_heads}")
    block_ids = {int(m.group(1)) for k in state for m in [re.match(r"^blocks\.(\d+)\.", k)] if m}
    depth = len(block_ids)
    if block_ids != set(range(depth)):
        raise WeightsError(f"{source}: blocks are not numbered 0..{depth - 1}: have {sorted(block_ids)[:8]}")
    proj = state["patch_embed.proj.weight"]  # (D, C, p, p)
    img_size = pos_embed_img_size(state, source)
    if "blocks.0.mlp.w12.weight" in state:
        ffn_layer, ffn_bias = "swiglufused", "blocks.0.mlp.w12.bias" in state
        mlp_ratio = _swiglu_mlp_ratio(embed_dim, int(state["blocks.0.mlp.w3.weight"].shape[1]))
    elif "blocks.0.mlp.fc1.weight" in state:
        ffn_layer, ffn_bias = "mlp", "blocks.0.mlp.fc1.bias" in state
        mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    elif depth:
        raise WeightsError(f"{source}: unknown feed-forward layout: neither blocks.0.mlp.fc1 nor blocks.0.mlp.w12")
    else:
        ffn_layer, mlp_ratio, ffn_bias = "mlp", 4.0, True
    return dict(
        img_size=img_size, patch_size=int(proj.shape[-1]), in_chans=int(proj.shape[1]),
        embed_dim=embed_dim, depth=depth, num_heads=int(num_heads), mlp_ratio=float(mlp_ratio),
        qkv_bias="blocks.0.attn.qkv.bias" in state, proj_bias="blocks.0.attn.proj.bias" in state,
        ffn_bias=ffn_bias, ffn_layer=ffn_layer,
        # only LayerScale's presence matters once weights are loaded: the stored gammas override the init
        init_values=1.0 if "blocks.0.ls1.gamma" in state else None,
        num_register_tokens=int(state["register_tokens"].shape[1]) if "register_tokens" in state else 0,
    )


def build_model(arch: Mapping[str, Any]):
    """A `DinoVisionTransformer` from `infer_architecture`-style kwargs (SDPA unless given; never drop path)."""
    from .vision_transformer import DinoVisionTransformer

    kwargs = {k: v for k, v in arch.items() if k not in ("drop_path_rate", "drop_path_uniform")}
    kwargs.setdefault("attn_backend", "sdpa")
    return DinoVisionTransformer(**kwargs)


# ------------------------------------------------------------------------------------------------ loading
def fit_pos_embed(model, state: Dict[str, Tensor], source: str) -> None:
    """Resize ``state['pos_embed']`` in place to ``model``'s grid, with the model's own interpolation (what its
    forward pass would do at that size), and warn: other input sizes are then resized from this grid."""
    from .vision_transformer import resize_pos_embed

    pos_embed = state.get("pos_embed")
    if pos_embed is None or pos_embed.shape == model.pos_embed.shape:
        return
    grid_h, grid_w = model.patch_embed.patches_resolution
    resized = resize_pos_embed(pos_embed, grid_h, grid_w, model.interpolate_offset, model.interpolate_antialias)
    warnings.warn(f"{source}: pos_embed {tuple(pos_embed.shape)} resized to {tuple(resized.shape)} for img_size "
                  f"{grid_h * model.patch_size}; inputs of other sizes are resized from this grid, not the original",
                  stacklevel=2)
    state["pos_embed"] = resized.to(pos_embed.dtype)


def load_strict(model, state: Mapping[str, Tensor], source: str) -> None:
    """``model.load_state_dict(state, strict=True)`` with one error naming missing, unexpected and misshapen keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshapen = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in set(own) & set(state)
                       if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or misshapen:
        parts = [f"{label} {short_list(keys, 6)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", misshapen)) if keys]
        raise WeightsError(f"{source}: weights do not match the architecture: " + "; ".join(parts))
    model.load_state_dict(dict(state), strict=True)


def weights_sha1(state: Mapping[str, Any]) -> str:
    """SHA-1 over every tensor's name, dtype, shape and bytes (sorted by name): equal hashes = equal weights."""
    digest = hashlib.sha1()
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, Tensor):
            continue
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ export + sidecar
def sidecar_description(backbone, state: Mapping[str, Tensor], *, arch: str, ffn_layer: str, layerscale: float,
                        **extra: Any) -> Dict[str, Any]:
    """What ``backbone.json`` holds: everything needed to rebuild ``backbone`` for its (full) ``state``."""
    side = math.isqrt(int(state["pos_embed"].shape[1]) - 1)
    blocks = state
    return dict(
        arch=str(arch), patch_size=int(backbone.patch_size), num_register_tokens=int(backbone.num_register_tokens),
        ffn_layer=str(ffn_layer), img_size=side * int(backbone.patch_size),
        interpolate_offset=float(backbone.interpolate_offset),
        interpolate_antialias=bool(backbone.interpolate_antialias),
        embed_dim=int(backbone.embed_dim), depth=int(backbone.n_blocks), num_heads=int(backbone.num_heads),
        layerscale=float(layerscale), qkv_bias="blocks.0.attn.qkv.bias" in blocks,
        proj_bias="blocks.0.attn.proj.bias" in blocks,
        ffn_bias=any(k in blocks for k in ("blocks.0.mlp.fc1.bias", "blocks.0.mlp.w12.bias")), **extra)


def write_tensor_file(path: os.PathLike, obj: Any) -> Path:
    """Tensors and plain containers (what `read_weights_file` reads back), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: torch.save(obj, tmp))
    return path


def write_export(export_dir: os.PathLike, state: Mapping[str, Tensor], description: Mapping[str, Any]) -> Path:
    """Write ``teacher_backbone.pth`` (fp32, CPU, hub layout) and ``backbone.json``, each atomically."""
    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().float().cpu().contiguous() for k, v in state.items()}
    target = export_dir / EXPORT_WEIGHTS
    write_atomic(target, lambda tmp: torch.save(state, tmp))
    write_atomic(export_dir / SIDECAR, lambda tmp: tmp.write_text(json.dumps(dict(description), indent=2) + "\n"))
    return target


def read_sidecar(export_dir: os.PathLike) -> Dict[str, Any]:
    path = Path(export_dir) / SIDECAR
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{path}: cannot read the architecture sidecar: {exc}") from exc


def arch_from_sidecar(description: Mapping[str, Any], state: Mapping[str, Tensor], source: str) -> Dict[str, Any]:
    """Constructor kwargs for an exported backbone: the shapes, with the sidecar's heads, LayerScale init and
    pos-embed interpolation (which the shapes cannot tell)."""
    arch = infer_architecture(state, description.get("num_heads"), source)
    for key in ("interpolate_offset", "interpolate_antialias"):
        if key in description:
            arch[key] = description[key]
    if "layerscale" in description:  # random:<run> then starts where the run did
        arch["init_values"] = description["layerscale"] or None
    return arch


def build_from_export(export_dir: os.PathLike):
    """The exported backbone (``backbone.json`` + ``teacher_backbone.pth``), rebuilt and loaded strictly."""
    export_dir = Path(export_dir)
    description = read_sidecar(export_dir)
    source = str(export_dir / EXPORT_WEIGHTS)
    state = backbone_state(read_weights_file(export_dir / EXPORT_WEIGHTS), source)
    model = build_model(arch_from_sidecar(description, state, source))
    load_strict(model, state, source)
    return model


# ------------------------------------------------------------------------------------------------ sources
# Files and folders of ours (run directories, exports, training and fine-tuning checkpoints), the hub's and
# Hugging Face's, each to (hub-layout state, architecture kwargs, extra info: source, path, preprocessing).
def _read(path: Path) -> Any:
    """A weights file (tensors only); our own training checkpoints (checkpoint_<N>.pth), which also hold RNG
    states and the config, through the checkpoint module."""
    if _CHECKPOINT_NAME.fullmatch(path.name):
        from ..train.checkpoint import read_checkpoint_file  # holds RNG states: read by its owner, not here

        try:
            return read_checkpoint_file(path)
        except Exception as exc:
            raise WeightsError(f"cannot load {path}: {type(exc).__name__}: {exc}") from exc
    return read_weights_file(path)


def _teacher_backbone(state: Any, source: str) -> Dict[str, Any]:
    """A training checkpoint (or its ``model`` dict) -> the teacher backbone in hub layout."""
    return backbone_state(state, source, prefix="teacher.backbone.")


def _looks_like_hf_layout(state: Mapping[str, Any]) -> bool:
    return any(k.startswith(("embeddings.", "dinov2.embeddings.")) for k in state)


def _run_config(run_dir: Path) -> Optional[Any]:
    """The run's resolved ``config.yaml`` as an OmegaConf object (None when absent)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    return OmegaConf.load(path)


def _run_preprocessing(run_cfg: Optional[Any]) -> Dict[str, Any]:
    """Input size and normalisation a backbone pretrained by our engine expects."""
    if run_cfg is None:
        return {}
    from omegaconf import OmegaConf

    out: Dict[str, Any] = {}
    size = OmegaConf.select(run_cfg, "crops.global_crops_size")
    if size:
        out["eval_img_size"] = int(size)
    mean, std = OmegaConf.select(run_cfg, "data.mean"), OmegaConf.select(run_cfg, "data.std")
    if mean is not None and std is not None:
        out["mean"], out["std"] = [float(v) for v in mean], [float(v) for v in std]
    return out


def _num_heads_from(description: Mapping[str, Any], run_cfg: Optional[Any], embed_dim: int) -> Optional[int]:
    if description.get("num_heads"):
        return int(description["num_heads"])
    if run_cfg is not None:
        from omegaconf import OmegaConf

        heads = OmegaConf.select(run_cfg, "student.num_heads")
        width = OmegaConf.select(run_cfg, "student.embed_dim")
        if heads and (not width or int(width) == embed_dim):
            return int(heads)
    return None


def _from_export(export_dir: Path, run_dir: Optional[Path]):
    """``export/backbone.json`` + ``export/teacher_backbone.pth`` written by the training engine."""
    desc_path, weights_path = export_dir / "backbone.json", export_dir / "teacher_backbone.pth"
    if not weights_path.is_file():
        raise WeightsError(f"{desc_path} exists but {weights_path} does not")
    description = read_sidecar(export_dir)
    state = backbone_state(read_weights_file(weights_path), str(weights_path))
    run_dir = run_dir or (export_dir.parent if (export_dir.parent / "config.yaml").is_file() else None)
    run_cfg = _run_config(run_dir) if run_dir else None
    heads = _num_heads_from(description, run_cfg, int(state["cls_token"].shape[-1]))
    arch = arch_from_sidecar(dict(description, num_heads=heads), state, str(weights_path))
    extra = dict(source="export", path=str(weights_path), arch_name=description.get("arch"))
    extra.update(_run_preprocessing(run_cfg))
    return state, arch, extra


def _from_training_checkpoint(ckpt_path: Path, run_dir: Optional[Path], state=None):
    state = _read(ckpt_path) if state is None else state
    run_cfg = _run_config(run_dir) if run_dir else None
    if run_cfg is None and isinstance(state, Mapping):
        # our checkpoints carry the resolved config in meta
        meta_cfg = (state.get("meta") or {}).get("config") if isinstance(state.get("meta"), Mapping) else None
        if meta_cfg is not None:
            from omegaconf import OmegaConf

            run_cfg = OmegaConf.create(meta_cfg)
    backbone = _teacher_backbone(state, str(ckpt_path))
    embed_dim = int(backbone["cls_token"].shape[-1])
    arch = infer_architecture(backbone, _num_heads_from({}, run_cfg, embed_dim))
    if run_cfg is not None:
        from omegaconf import OmegaConf

        for key in ("interpolate_offset", "interpolate_antialias"):
            value = OmegaConf.select(run_cfg, f"student.{key}")
            if value is not None:
                arch[key] = value
        layerscale = OmegaConf.select(run_cfg, "student.layerscale")
        if layerscale is not None and "init_values" in arch and arch["init_values"] is not None:
            arch["init_values"] = float(layerscale)  # random:<checkpoint> starts where the run did
    extra = dict(source="training_checkpoint", path=str(ckpt_path))
    extra.update(_run_preprocessing(run_cfg))
    return backbone, arch, extra


def _latest_checkpoint(run_dir: Path) -> Optional[Path]:
    from ..train.checkpoint import latest_checkpoint  # the checkpoint module owns the `latest` pointer

    return latest_checkpoint(run_dir)


def _from_run_dir(run_dir: Path):
    export = run_dir / "export"
    if (export / "backbone.json").is_file():
        return _from_export(export, run_dir)
    ckpt = _latest_checkpoint(run_dir) if (run_dir / "checkpoints").is_dir() else None
    if ckpt is None:
        raise WeightsError(f"run directory {run_dir} has neither export/backbone.json nor a checkpoint in "
                           f"checkpoints/ (is training finished?)")
    if ckpt.is_dir():
        raise WeightsError(f"the latest checkpoint {ckpt} is a sharded (FSDP) folder; export the teacher backbone "
                           f"first (the engine writes export/)")
    return _from_training_checkpoint(ckpt, run_dir)


def _from_hub_file(path: Path, state: Mapping[str, Any]):
    match = HUB_NAME.search(path.name)
    num_heads = None
    extra: Dict[str, Any] = dict(source="state_dict", path=str(path))
    if match:
        letter, patch, registers = match.group(1).lower(), int(match.group(2)), match.group(4)
        num_heads = PUBLISHED_NUM_HEADS.get(int(state["cls_token"].shape[-1]))
        extra.update(source="hub_file", arch_name=_HUB_ARCHS[letter], eval_img_size=DEFAULT_EVAL_SIZE)
        arch = infer_architecture(state, num_heads)
        if arch["patch_size"] != patch:
            raise WeightsError(f"{path}: file name says patch {patch}, weights have patch {arch['patch_size']}")
        if registers and int(registers) != arch["num_register_tokens"]:
            raise WeightsError(f"{path}: file name says {registers} registers, weights have "
                               f"{arch['num_register_tokens']}")
    else:
        arch = infer_architecture(state, num_heads)
    if arch["num_register_tokens"] > 0:
        # *_reg4 weights resize pos_embed to an explicit size with antialiasing (Darcet et al. 2023)
        arch.update(interpolate_offset=0.0, interpolate_antialias=True)
    else:
        arch.update(interpolate_offset=0.1, interpolate_antialias=False)
    if match and arch["img_size"] != HUB_IMG_SIZE:
        raise WeightsError(f"{path}: a hub file should hold a {HUB_IMG_SIZE} px pos_embed, this one is "
                           f"{arch['img_size']} px")
    return dict(state), arch, extra


def _from_hf_folder(folder: Path):
    state, hf_arch = read_hf_folder(folder)
    arch = infer_architecture(state, int(hf_arch["num_heads"]))
    if arch["num_register_tokens"] > 0:
        arch.update(interpolate_offset=0.0, interpolate_antialias=True)
    extra = dict(source="hf_folder", path=str(folder), eval_img_size=DEFAULT_EVAL_SIZE)
    return state, arch, extra


def _from_file(path: Path):
    if path.suffix == ".json":
        return _from_export(path.parent, None)
    state = _read(path)
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict")
    if isinstance(state.get("backbone"), Mapping) and is_hub_layout(state["backbone"]):
        # a fine-tuned model saved by `eval finetune` (best.pth): backbone in hub layout + its architecture
        saved_arch = dict(state.get("arch") or {})
        arch = infer_architecture(state["backbone"], saved_arch.get("num_heads"))
        arch.update({k: saved_arch[k] for k in ("interpolate_offset", "interpolate_antialias") if k in saved_arch})
        extra = dict(source="finetuned", path=str(path))
        prep = state.get("preprocessing") or {}
        if prep.get("crop_size"):
            extra["eval_img_size"] = int(prep["crop_size"])
        if prep.get("mean") and prep.get("std"):
            extra.update(mean=list(prep["mean"]), std=list(prep["std"]))
        return dict(state["backbone"]), arch, extra
    model_sd = state.get("model") if isinstance(state.get("model"), Mapping) else state
    if any(k.startswith("teacher.backbone.") for k in model_sd):
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
        return _from_training_checkpoint(path, run_dir, state=state)
    if is_hub_layout(state) and (path.parent / "backbone.json").is_file():  # our export's weights, named directly
        return _from_export(path.parent, None)
    backbone = backbone_state(state, str(path))  # hub, HF, compiled or wrapped keys
    backbone, arch, extra = _from_hub_file(path, backbone)
    if _looks_like_hf_layout(state):
        extra["source"] = "hf_state_dict"
    return backbone, arch, extra


def read_backbone_source(path: os.PathLike) -> Tuple[Dict[str, Tensor], Dict[str, Any], Dict[str, Any]]:
    """A file or folder -> (hub-layout state, architecture kwargs, extra: source, path, and the input size and
    normalisation the backbone expects when the source says so). Raises `WeightsError` naming what was looked for."""
    path = Path(path)
    if path.is_dir():
        if (path / "export" / "backbone.json").is_file() or (path / "checkpoints").is_dir():
            return _from_run_dir(path)
        if (path / "backbone.json").is_file():
            return _from_export(path, None)
        if (path / "config.json").is_file():
            return _from_hf_folder(path)
        raise WeightsError(f"directory {path} is not a run directory (export/ or checkpoints/), an export folder "
                           f"(backbone.json) or a Hugging Face folder (config.json)")
    return _from_file(path)
