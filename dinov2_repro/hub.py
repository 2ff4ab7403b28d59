"""torch.hub-style entry points for the published DINOv2 backbones (names, URLs and settings of the reference).

    model = dinov2_vits14(pretrained=False)              # architecture only
    model = dinov2_vits14(pretrained="weights.pth")      # a local hub-layout state dict, loaded strictly
    model = dinov2_vits14()                              # the published weights (torch hub cache, or download)
    model = dinov2_vitb14_reg(pretrained=False, img_size=224)

The original weights resize pos_embed with "offset 0.1, scale factor"; the *_reg (4 registers) weights with
"offset 0, explicit size, antialias" -- each entry point sets the mode its weights were trained with.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Union

import torch

from .models.vision_transformer import DinoVisionTransformer, build_backbone
from .models.weights import backbone_state, fit_pos_embed, load_strict, read_weights_file

HUB_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"
PUBLISHED_IMG_SIZE = 518  # the published weights were trained at 518 px: pos_embed has 1 + 37 * 37 rows
PUBLISHED_REGISTERS = 4

Pretrained = Union[bool, str, "os.PathLike[str]"]


def hub_interpolation_kwargs(num_register_tokens: int) -> Dict[str, Any]:
    """The pos-embed interpolation mode of the published weights: original ones use offset 0.1 without
    antialias, the register ones an explicit size with antialias."""
    if num_register_tokens:
        return dict(interpolate_offset=0.0, interpolate_antialias=True)
    return dict(interpolate_offset=0.1, interpolate_antialias=False)


def hub_model_name(arch: str, patch_size: int = 14, num_register_tokens: int = 0) -> str:
    """`dinov2_vits14`, `dinov2_vitg14_reg4`, ... (the file-name stem of the published weights)."""
    compact = arch.replace("_", "")[:4]  # vit_small -> vits, vit_giant2 -> vitg
    suffix = f"_reg{num_register_tokens}" if num_register_tokens else ""
    return f"dinov2_{compact}{patch_size}{suffix}"


def hub_weights_url(arch: str, patch_size: int = 14, num_register_tokens: int = 0) -> str:
    """URL of the published weights, e.g. .../dinov2_vits14/dinov2_vits14_reg4_pretrain.pth."""
    base = hub_model_name(arch, patch_size, 0)
    return f"{HUB_BASE_URL}/{base}/{hub_model_name(arch, patch_size, num_register_tokens)}_pretrain.pth"


def _download_or_cached(url: str) -> Any:
    file_name = os.path.basename(url)
    cache_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
    cached = os.path.join(cache_dir, file_name)
    if os.path.isfile(cached):
        return read_weights_file(cached)
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", file_name=file_name, weights_only=True)
    except Exception as error:  # no network, proxy, HTTP error, truncated download ...
        raise RuntimeError(
            f"could not download the pretrained weights {file_name} from {url} ({type(error).__name__}: {error}). "
            f"Offline: download {file_name} on a machine with network access and put it in {cache_dir}, "
            f"or pass pretrained='/path/to/{file_name}'."
        ) from error


def load_pretrained(model: DinoVisionTransformer, pretrained: Pretrained, url: str) -> DinoVisionTransformer:
    """Load `pretrained` (True: the published weights at `url`; a path: a local file) into `model`, strictly.

    A path may hold a hub-layout state dict or anything `models.weights.backbone_state` reads (our exports,
    ``teacher.backbone.*`` state dicts, compiled or DDP-wrapped keys)."""
    if pretrained is True:
        source = os.path.basename(url)
        loaded = _download_or_cached(url)
    else:
        source = os.fspath(pretrained)
        loaded = read_weights_file(source)
    state_dict = backbone_state(loaded, source)
    fit_pos_embed(model, state_dict, source)
    load_strict(model, state_dict, source)
    return model


def _make_dinov2_model(arch: str, pretrained: Pretrained, num_register_tokens: int = 0,
                       weights: str = "LVD142M", **kwargs) -> DinoVisionTransformer:
    # `weights` exists for call compatibility with the reference's hub; LVD-142M is the only published set.
    if str(weights).rsplit(".", 1)[-1].upper() != "LVD142M":
        raise ValueError(f"weights={weights!r}: only 'LVD142M' weights are published")
    options: Dict[str, Any] = dict(
        patch_size=14,
        img_size=PUBLISHED_IMG_SIZE,
        init_values=1.0,  # LayerScale present; the loaded gammas override the value
        num_register_tokens=num_register_tokens,
        **hub_interpolation_kwargs(num_register_tokens),
    )
    if arch == "vit_giant2":
        options["ffn_layer"] = "swiglufused"
    options.update(kwargs)
    model = build_backbone(arch, **options)
    if pretrained is not False and pretrained is not None:
        url = hub_weights_url(arch, options["patch_size"], options["num_register_tokens"])
        load_pretrained(model, pretrained, url)
    return model


def dinov2_vits14(*, pretrained: Pretrained = True, **kwargs) -> DinoVisionTransformer:
    """DINOv2 ViT-S/14 (21M parameters). pretrained: False | True (published weights) | path to a .pth."""
    return _make_dinov2_model("vit_small", pretrained, **kwargs)


def dinov2_vitb14(*, pretrained: Pretrained = True, **kwargs) -> DinoVisionTransformer:
    """DINOv2 ViT-B/14 (86M parameters). pretrained: False | True (published weights) | path to a .pth."""
    return _make_dinov2_model("vit_base", pretrained, **kwargs)


def dinov2_vitl14(*, pretrained: Pretrained = True, **kwargs) -> DinoVisionTransformer:
    """DINOv2 ViT-L/14 (300M parameters). pretrained: False | True (published weights) | path to a .pth."""
    return _make_dinov2_model("vit_large", pretrained, **kwargs)


def dinov2_vitg14(*, pretrained: Pretrained = True, **kwargs) -> DinoVisionTransformer:
    """DINOv2 ViT-g/14 (1.1B parameters, SwiGLU). pretrained: False | True (published weights) | path to a .pth."""
    return _make_dinov2_model("vit_giant2", pretrained, **kwargs)


def dinov2_vits14_reg(*, pretrained: Pretrained = True, **kwargs) -> DinoVisionTransformer:
    """DINOv2 ViT-S/14 with 4 registers."""
    return _make_dinov2_model("vit_small", pretrained, num_register_tokens=PUBLISHED_REGISTERS, **kwargs)


def dinov2_vitb14_reg(*, pretrained: Pretrained = True, **kwargs) -> DinoVisionTransformer:
    """DINOv2 ViT-B/14 with 4 registers."""
    return _make_dinov2_model("vit_base", pretrained, num_register_tokens=PUBLISHED_REGISTERS, **kwargs)


def dinov2_vitl14_reg(*, pretrained: Pretrained = True, **kwargs) -> DinoVisionTransformer:
    """DINOv2 ViT-L/14 with 4 registers."""
    return _make_dinov2_model("vit_large", pretrained, num_register_tokens=PUBLISHED_REGISTERS, **kwargs)


def dinov2_vitg14_reg(*, pretrained: Pretrained = True, **kwargs) -> DinoVisionTransformer:
    """DINOv2 ViT-g/14 with 4 registers."""
    return _make_dinov2_model("vit_giant2", pretrained, num_register_tokens=PUBLISHED_REGISTERS, **kwargs)


ENTRY_POINTS = {
    fn.__name__: fn
    for fn in (dinov2_vits14, dinov2_vitb14, dinov2_vitl14, dinov2_vitg14,
               dinov2_vits14_reg, dinov2_vitb14_reg, dinov2_vitl14_reg, dinov2_vitg14_reg)
}
