"""Turn a backbone SPEC string into a `DinoVisionTransformer` with its weights, and describe it.

Accepted SPECs (nothing is ever downloaded):

- a run directory of ours: ``<run>/export/teacher_backbone.pth`` + ``backbone.json``; without an export yet, the
  ``teacher.backbone.*`` weights of the latest checkpoint (``checkpoints/latest``);
- one of our files: an export folder or its ``backbone.json``, a training checkpoint (``checkpoint_*.pth``,
  teacher backbone taken), or a hub-layout state dict we wrote;
- a published hub checkpoint file (``dinov2_vits14_pretrain.pth``, ``dinov2_vitg14_reg4_pretrain.pth``, ...):
  the architecture comes from the file name and the tensor shapes; hub files were trained at 518 px, and the
  ``*_reg4`` ones resize the positional embedding with offset 0 + antialias (recipe section 4);
- a local Hugging Face ``facebook/dinov2-*`` folder (``config.json`` + weights), converted by `models.convert`;
- ``random:ARCH/PATCH[,key=value...]`` (``random:vit_small/14``, ``random:vit_small/8,embed_dim=32,depth=2,
  num_heads=2,img_size=32``), or ``random:<any SPEC above>``: the same architecture, randomly initialised
  (with a fixed seed, so the baseline is reproducible and cacheable; for one of our runs with the run's LayerScale
  init, so it is drawn the way the run's own start was, though not with the run's seed).

`load_backbone` returns ``(model, info)``; ``info`` is a JSON-able dict with the architecture, where the weights
came from, the input size and normalisation the backbone expects, and ``weights_sha1`` (a hash of every tensor,
used to key the feature cache).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HUB_IMG_SIZE = 518  # published weights were trained at 518 px (pos_embed has 1 + 37 * 37 rows)
DEFAULT_EVAL_SIZE = 224
RANDOM_SEED = 0

# Hub short names -> our arch names and the published widths (num_heads cannot be read off tensor shapes).
_HUB_ARCHS = {"s": "vit_small", "b": "vit_base", "l": "vit_large", "g": "vit_giant2"}
_HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1536: 24}
_HUB_NAME = re.compile(r"dinov2_vit([sblg])(\d+)(_reg(\d+))?", re.IGNORECASE)


class BackboneSpecError(ValueError):
    """A SPEC that cannot be turned into a backbone; the message names the SPEC and what was looked for."""


# ------------------------------------------------------------------------------------------------ helpers
def weights_sha1(state_dict: Mapping[str, Any]) -> str:
    """SHA-1 over every tensor's name, dtype, shape and bytes (sorted by name): equal hashes = equal weights."""
    import torch

    digest = hashlib.sha1()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _torch_load(path: Path, spec: str) -> Any:
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        try:  # weights_only first: a hub or exported file is a plain state dict
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            # our training checkpoints also hold python objects (RNG states, config) in `meta`
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise BackboneSpecError(f"backbone spec {spec!r}: cannot load {path}: {type(exc).__name__}: {exc}") from exc


def _strip_training_prefix(state: Mapping[str, Any], spec: str) -> Dict[str, Any]:
    """A training checkpoint (or its ``model`` dict) -> the teacher backbone in hub layout."""
    model_sd = state.get("model", state) if isinstance(state, Mapping) else state
    prefix = "teacher.backbone."
    if not any(k.startswith(prefix) for k in model_sd):
        raise BackboneSpecError(f"backbone spec {spec!r}: training checkpoint has no '{prefix}*' tensors "
                                f"(first keys: {list(model_sd)[:5]})")
    try:
        from ..models.convert import hub_layout_from_training_checkpoint

        return dict(hub_layout_from_training_checkpoint(model_sd, prefix=prefix))
    except ImportError:  # converter not available: the mapping is a plain prefix strip
        return {k[len(prefix):]: v for k, v in model_sd.items() if k.startswith(prefix)}


def _looks_like_hub_layout(state: Mapping[str, Any]) -> bool:
    return "cls_token" in state and "patch_embed.proj.weight" in state


def _looks_like_hf_layout(state: Mapping[str, Any]) -> bool:
    return any(k.startswith(("embeddings.", "dinov2.embeddings.")) for k in state)


def infer_architecture(state: Mapping[str, Any], num_heads: Optional[int] = None) -> Dict[str, Any]:
    """`DinoVisionTransformer` keyword arguments read off a hub-layout state dict's tensor shapes.

    Everything but the number of heads is in the shapes; ``num_heads`` defaults to the published value for the
    width (384 -> 6, 768 -> 12, 1024 -> 16, 1536 -> 24) and must be given for other widths.
    """
    from ..layers import swiglu_hidden_features

    missing = [k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight") if k not in state]
    if missing:
        raise BackboneSpecError(f"not a ViT backbone state dict: missing {missing}")
    embed_dim = int(state["cls_token"].shape[-1])
    patch_size = int(state["patch_embed.proj.weight"].shape[-1])
    block_ids = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
    if not block_ids or block_ids != set(range(len(block_ids))):
        chunked = any(re.match(r"blocks\.\d+\.\d+\.", k) for k in state)
        hint = " (chunked 'blocks.<chunk>.<i>' keys: flatten them first)" if chunked else ""
        raise BackboneSpecError(f"cannot read the block structure from keys {sorted(block_ids)[:8]}...{hint}")
    n_positions = int(state["pos_embed"].shape[1]) - 1
    side = math.isqrt(n_positions)
    if side * side != n_positions:
        raise BackboneSpecError(f"pos_embed has {n_positions} patch positions: not a square grid")
    if "blocks.0.mlp.fc1.weight" in state:
        ffn_layer = "mlp"
        mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
        ffn_bias = "blocks.0.mlp.fc1.bias" in state
    elif "blocks.0.mlp.w12.weight" in state:
        ffn_layer = "swiglufused"
        hidden = state["blocks.0.mlp.w12.weight"].shape[0] // 2
        mlp_ratio = 4.0
        if swiglu_hidden_features(int(embed_dim * mlp_ratio)) != hidden:
            raise BackboneSpecError(f"SwiGLU hidden size {hidden} does not match mlp_ratio 4 at width {embed_dim}")
        ffn_bias = "blocks.0.mlp.w12.bias" in state
    else:
        raise BackboneSpecError("unknown feed-forward layout: neither blocks.0.mlp.fc1 nor blocks.0.mlp.w12")
    if num_heads is None:
        if embed_dim not in _HEADS_BY_WIDTH:
            raise BackboneSpecError(f"width {embed_dim} is not a published one: the number of heads cannot be "
                                    f"inferred (put num_heads in backbone.json)")
        num_heads = _HEADS_BY_WIDTH[embed_dim]
    return dict(
        img_size=side * patch_size,
        patch_size=patch_size,
        in_chans=int(state["patch_embed.proj.weight"].shape[1]),
        embed_dim=embed_dim,
        depth=len(block_ids),
        num_heads=int(num_heads),
        mlp_ratio=float(mlp_ratio),
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        proj_bias="blocks.0.attn.proj.bias" in state,
        ffn_bias=ffn_bias,
        ffn_layer=ffn_layer,
        # the stored gammas override the init value; 1.0 is what the hub models are built with
        init_values=1.0 if "blocks.0.ls1.gamma" in state else None,
        num_register_tokens=int(state["register_tokens"].shape[1]) if "register_tokens" in state else 0,
    )


def _build_model(arch_kwargs: Dict[str, Any]):
    from ..models.vision_transformer import DinoVisionTransformer

    kwargs = dict(arch_kwargs)
    kwargs.setdefault("attn_backend", "sdpa")
    kwargs.pop("drop_path_rate", None)  # evaluation never drops paths (fine-tuning sets its own rate)
    kwargs.pop("drop_path_uniform", None)
    return DinoVisionTransformer(**kwargs)


def _load_into(model, state: Mapping[str, Any], spec: str, where: str) -> None:
    result = model.load_state_dict(dict(state), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise BackboneSpecError(f"backbone spec {spec!r}: weights in {where} do not match the architecture: "
                                f"missing {result.missing_keys[:6]}, unexpected {result.unexpected_keys[:6]}")


# ------------------------------------------------------------------------------------------------ sources
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


def _from_export(export_dir: Path, spec: str, run_dir: Optional[Path]):
    """``export/backbone.json`` + ``export/teacher_backbone.pth`` written by the training engine."""
    desc_path, weights_path = export_dir / "backbone.json", export_dir / "teacher_backbone.pth"
    if not weights_path.is_file():
        raise BackboneSpecError(f"backbone spec {spec!r}: {desc_path} exists but {weights_path} does not")
    try:
        description = json.loads(desc_path.read_text())
    except (OSError, ValueError) as exc:
        raise BackboneSpecError(f"backbone spec {spec!r}: cannot read {desc_path}: {exc}") from exc
    state = _torch_load(weights_path, spec)
    if not _looks_like_hub_layout(state):
        state = _strip_training_prefix(state, spec)
    run_dir = run_dir or (export_dir.parent if (export_dir.parent / "config.yaml").is_file() else None)
    run_cfg = _run_config(run_dir) if run_dir else None
    embed_dim = int(state["cls_token"].shape[-1])
    arch = infer_architecture(state, _num_heads_from(description, run_cfg, embed_dim))
    for key in ("interpolate_offset", "interpolate_antialias"):
        if key in description:
            arch[key] = description[key]
    if "layerscale" in description:  # the run's LayerScale init, so that random:<run> starts where the run did
        arch["init_values"] = description["layerscale"] or None
    extra = dict(source="export", path=str(weights_path), arch_name=description.get("arch"))
    extra.update(_run_preprocessing(run_cfg))
    return state, arch, extra


def _from_training_checkpoint(ckpt_path: Path, spec: str, run_dir: Optional[Path], state=None):
    state = _torch_load(ckpt_path, spec) if state is None else state
    run_cfg = _run_config(run_dir) if run_dir else None
    if run_cfg is None and isinstance(state, Mapping):
        # our checkpoints carry the resolved config in meta
        meta_cfg = (state.get("meta") or {}).get("config") if isinstance(state.get("meta"), Mapping) else None
        if meta_cfg is not None:
            from omegaconf import OmegaConf

            run_cfg = OmegaConf.create(meta_cfg)
    backbone = _strip_training_prefix(state, spec)
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
    from ..train.checkpoint import latest_checkpoint

    return latest_checkpoint(run_dir)


def _from_run_dir(run_dir: Path, spec: str):
    export = run_dir / "export"
    if (export / "backbone.json").is_file():
        return _from_export(export, spec, run_dir)
    ckpt = _latest_checkpoint(run_dir) if (run_dir / "checkpoints").is_dir() else None
    if ckpt is None:
        raise BackboneSpecError(f"backbone spec {spec!r}: run directory {run_dir} has neither "
                                f"export/backbone.json nor a checkpoint in checkpoints/ (is training finished?)")
    if ckpt.is_dir():
        raise BackboneSpecError(f"backbone spec {spec!r}: the latest checkpoint {ckpt} is a sharded (FSDP) "
                                f"folder; export the teacher backbone first (the engine writes export/)")
    return _from_training_checkpoint(ckpt, spec, run_dir)


def _from_hub_file(path: Path, state: Mapping[str, Any], spec: str):
    match = _HUB_NAME.search(path.name)
    num_heads = None
    extra: Dict[str, Any] = dict(source="state_dict", path=str(path))
    if match:
        letter, patch, registers = match.group(1).lower(), int(match.group(2)), match.group(4)
        num_heads = _HEADS_BY_WIDTH.get(int(state["cls_token"].shape[-1]))
        extra.update(source="hub_file", arch_name=_HUB_ARCHS[letter], eval_img_size=DEFAULT_EVAL_SIZE)
        arch = infer_architecture(state, num_heads)
        if arch["patch_size"] != patch:
            raise BackboneSpecError(f"backbone spec {spec!r}: file name says patch {patch}, weights have "
                                    f"patch {arch['patch_size']}")
        if registers and int(registers) != arch["num_register_tokens"]:
            raise BackboneSpecError(f"backbone spec {spec!r}: file name says {registers} registers, weights have "
                                    f"{arch['num_register_tokens']}")
    else:
        arch = infer_architecture(state, num_heads)
    if arch["num_register_tokens"] > 0:
        # *_reg4 weights resize pos_embed to an explicit size with antialiasing (Darcet et al. 2023)
        arch.update(interpolate_offset=0.0, interpolate_antialias=True)
    else:
        arch.update(interpolate_offset=0.1, interpolate_antialias=False)
    if match and arch["img_size"] != HUB_IMG_SIZE:
        raise BackboneSpecError(f"backbone spec {spec!r}: a hub file should hold a {HUB_IMG_SIZE} px pos_embed, "
                                f"this one is {arch['img_size']} px")
    return dict(state), arch, extra


def _from_hf_folder(folder: Path, spec: str):
    from ..models.convert import load_hf_folder

    try:
        state, hf_arch = load_hf_folder(str(folder))
    except (OSError, KeyError, ValueError) as exc:
        raise BackboneSpecError(f"backbone spec {spec!r}: cannot read the Hugging Face folder {folder}: {exc}") from exc
    arch = infer_architecture(state, int(hf_arch["num_heads"]))
    if arch["num_register_tokens"] > 0:
        arch.update(interpolate_offset=0.0, interpolate_antialias=True)
    extra = dict(source="hf_folder", path=str(folder), eval_img_size=DEFAULT_EVAL_SIZE)
    return state, arch, extra


def _from_file(path: Path, spec: str):
    if path.suffix == ".json":
        return _from_export(path.parent, spec, None)
    state = _torch_load(path, spec)
    if not isinstance(state, Mapping):
        raise BackboneSpecError(f"backbone spec {spec!r}: {path} holds a {type(state).__name__}, not a state dict")
    if isinstance(state.get("backbone"), Mapping) and _looks_like_hub_layout(state["backbone"]):
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
        return _from_training_checkpoint(path, spec, run_dir, state=state)
    if _looks_like_hub_layout(state):
        if (path.parent / "backbone.json").is_file():  # our export's weights file, named directly
            return _from_export(path.parent, spec, None)
        return _from_hub_file(path, state, spec)
    if _looks_like_hf_layout(state):
        from ..models.convert import convert_hf_state_dict

        converted = convert_hf_state_dict(state)
        state, arch, extra = _from_hub_file(path, converted, spec)
        extra["source"] = "hf_state_dict"
        return state, arch, extra
    raise BackboneSpecError(f"backbone spec {spec!r}: {path} is neither a hub-layout backbone, a training "
                            f"checkpoint (teacher.backbone.*) nor Hugging Face weights (first keys: {list(state)[:5]})")


def _from_path(path: Path, spec: str):
    if path.is_dir():
        if (path / "export" / "backbone.json").is_file() or (path / "checkpoints").is_dir():
            return _from_run_dir(path, spec)
        if (path / "backbone.json").is_file():
            return _from_export(path, spec, None)
        if (path / "config.json").is_file():
            return _from_hf_folder(path, spec)
        raise BackboneSpecError(f"backbone spec {spec!r}: directory {path} is not a run directory (export/ or "
                                f"checkpoints/), an export folder (backbone.json) or a Hugging Face folder "
                                f"(config.json)")
    return _from_file(path, spec)


def parse_random_arch(text: str, spec: str) -> Dict[str, Any]:
    """``ARCH/PATCH[,key=value...]`` -> DinoVisionTransformer kwargs (published sizes unless overridden)."""
    from ..models.vision_transformer import VARIANTS

    head, *options = [part.strip() for part in text.split(",") if part.strip()]
    arch_name, _, patch = head.partition("/")
    if arch_name not in VARIANTS:
        raise BackboneSpecError(f"backbone spec {spec!r}: unknown arch {arch_name!r} (one of {tuple(VARIANTS)}), "
                                f"and no file or folder of that name exists")
    kwargs: Dict[str, Any] = dict(VARIANTS[arch_name], img_size=DEFAULT_EVAL_SIZE, init_values=1e-5)
    try:
        kwargs["patch_size"] = int(patch) if patch else 14
    except ValueError as exc:
        raise BackboneSpecError(f"backbone spec {spec!r}: patch size {patch!r} is not an integer") from exc
    allowed = {"img_size": int, "embed_dim": int, "depth": int, "num_heads": int, "mlp_ratio": float,
               "num_register_tokens": int, "init_values": float, "ffn_layer": str, "interpolate_offset": float,
               "interpolate_antialias": lambda v: v.lower() in ("1", "true", "yes")}
    for option in options:
        key, _, value = option.partition("=")
        if key not in allowed or not value:
            raise BackboneSpecError(f"backbone spec {spec!r}: bad option {option!r}; use key=value with key in "
                                    f"{sorted(allowed)}")
        try:
            kwargs[key] = allowed[key](value)
        except ValueError as exc:
            raise BackboneSpecError(f"backbone spec {spec!r}: {key}={value!r}: {exc}") from exc
    if kwargs.get("init_values") == 0:
        kwargs["init_values"] = None
    return kwargs


# ------------------------------------------------------------------------------------------------ entry point
def resolve_spec(spec: str) -> Tuple[Optional[Dict[str, Any]], Dict[str, Any], Dict[str, Any]]:
    """SPEC -> (hub-layout state dict or None for random init, architecture kwargs, extra info)."""
    spec = str(spec).strip()
    if not spec:
        raise BackboneSpecError("empty backbone spec")
    if spec.startswith("random:"):
        rest = spec[len("random:"):]
        if rest and Path(rest).expanduser().exists():
            _, arch, extra = _from_path(Path(rest).expanduser(), spec)
            extra = {k: v for k, v in extra.items() if k in ("eval_img_size", "mean", "std", "arch_name")}
            extra.update(source="random", like=str(Path(rest).expanduser()))
            return None, arch, extra
        arch = parse_random_arch(rest, spec)
        return None, arch, dict(source="random", eval_img_size=arch["img_size"])
    path = Path(spec).expanduser()
    if path.exists():
        return _from_path(path, spec)
    hint = ""
    if _HUB_NAME.fullmatch(spec.split("/")[-1].removesuffix("_pretrain.pth")):
        hint = (f"; weights are never downloaded: fetch {spec.split('/')[-1]}_pretrain.pth yourself and pass its "
                f"path")
    raise BackboneSpecError(f"backbone spec {spec!r}: no such file or directory, and not 'random:ARCH/PATCH' "
                            f"(e.g. random:vit_small/14){hint}")


def load_backbone(spec: str, device: Any = "cpu") -> Tuple[Any, Dict[str, Any]]:
    """SPEC -> ``(model in eval mode on device, info dict)``; see the module docstring for the SPECs."""
    import torch

    state, arch, extra = resolve_spec(spec)
    if state is None:
        # A fixed seed: "random init" is the same network every time, so its features can be cached.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model = _build_model(arch)
        state_for_hash = model.state_dict()
    else:
        model = _build_model(arch)
        _load_into(model, state, spec, extra.get("path", spec))
        state_for_hash = state
    info: Dict[str, Any] = dict(spec=str(spec), **{k: v for k, v in arch.items()})
    info.update(extra)
    info.setdefault("eval_img_size", DEFAULT_EVAL_SIZE)
    info.setdefault("mean", list(IMAGENET_MEAN))
    info.setdefault("std", list(IMAGENET_STD))
    info["n_params"] = sum(p.numel() for p in model.parameters())
    info["weights_sha1"] = weights_sha1(state_for_hash)
    model.eval().requires_grad_(False)
    return model.to(device), info


def describe_module(model: Any, name: str = "custom") -> Dict[str, Any]:
    """An ``info`` dict for a backbone passed in as an object (not a SPEC), e.g. from Python or a test.

    Its ``weights_sha1`` covers the module's class and state dict, so the feature cache still tells modules apart.
    """
    state = model.state_dict()
    digest = weights_sha1(state)
    cls = f"{type(model).__module__}.{type(model).__qualname__}"
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(size, (tuple, list)):
        size = size[0]
    return dict(spec=f"module:{name}", source="module", module_class=cls,
                weights_sha1=hashlib.sha1(f"{cls}|{digest}".encode()).hexdigest(),
                eval_img_size=int(size) if size else DEFAULT_EVAL_SIZE,
                mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD),
                embed_dim=getattr(model, "embed_dim", None),
                n_params=sum(p.numel() for p in model.parameters()))


def environment_device(requested: str = "auto") -> str:
    """``auto`` -> cuda when available, else cpu; anything else passes through (validated by torch)."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise BackboneSpecError(f"device {requested!r} requested but CUDA is not available")
    return requested

