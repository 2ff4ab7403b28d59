"""Turn a backbone SPEC string into a `DinoVisionTransformer` with its weights, and describe it.

Only the SPEC is parsed here; files and folders are read by `models.weights.read_backbone_source`.
Accepted SPECs (nothing is ever downloaded):

- a run directory of ours: ``<run>/export/teacher_backbone.pth`` + ``backbone.json``; without an export yet, the
  ``teacher.backbone.*`` weights of the latest checkpoint (``checkpoints/latest``);
- one of our files: an export folder or its ``backbone.json``, a training checkpoint (``checkpoint_*.pth``,
  teacher backbone taken), or a hub-layout state dict we wrote;
- a published hub checkpoint file (``dinov2_vits14_pretrain.pth``, ``dinov2_vitg14_reg4_pretrain.pth``, ...):
  the architecture comes from the file name and the tensor shapes; hub files were trained at 518 px, and the
  ``*_reg4`` ones resize the positional embedding with offset 0 + antialias (recipe section 4);
- a local Hugging Face ``facebook/dinov2-*`` folder (``config.json`` + weights), converted through `models.convert`'s renames;
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
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from ..models.weights import (DEFAULT_EVAL_SIZE, HUB_NAME, WeightsError, build_model, load_strict,
                              read_backbone_source, weights_sha1)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_SEED = 0


class BackboneSpecError(WeightsError):
    """A SPEC that cannot be turned into a backbone; the message names the SPEC and what was looked for."""


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
            _, arch, extra = read_backbone_source(Path(rest).expanduser())
            extra = {k: v for k, v in extra.items() if k in ("eval_img_size", "mean", "std", "arch_name")}
            extra.update(source="random", like=str(Path(rest).expanduser()))
            return None, arch, extra
        arch = parse_random_arch(rest, spec)
        return None, arch, dict(source="random", eval_img_size=arch["img_size"])
    path = Path(spec).expanduser()
    if path.exists():
        return read_backbone_source(path)
    hint = ""
    if HUB_NAME.fullmatch(spec.split("/")[-1].removesuffix("_pretrain.pth")):
        hint = (f"; weights are never downloaded: fetch {spec.split('/')[-1]}_pretrain.pth yourself and pass its "
                f"path")
    raise BackboneSpecError(f"backbone spec {spec!r}: no such file or directory, and not 'random:ARCH/PATCH' "
                            f"(e.g. random:vit_small/14){hint}")


def load_backbone(spec: str, device: Any = "cpu") -> Tuple[Any, Dict[str, Any]]:
    """SPEC -> ``(model in eval mode on device, info dict)``; see the module docstring for the SPECs."""
    import torch

    try:
        state, arch, extra = resolve_spec(spec)
    except BackboneSpecError:
        raise
    except WeightsError as exc:  # from models.weights: name the SPEC too
        raise BackboneSpecError(f"backbone spec {spec!r}: {exc}") from exc
    if state is None:
        # A fixed seed: "random init" is the same network every time, so its features can be cached.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model = build_model(arch)
        state_for_hash = model.state_dict()
    else:
        model = build_model(arch)
        load_strict(model, state, f"backbone spec {spec!r}: weights in {extra.get('path', spec)}")
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

