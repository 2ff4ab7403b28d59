"""State-dict converters into the published DINOv2 hub layout (the layout of `DinoVisionTransformer.state_dict()`).

- Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel`: same tensors under other names, with q/k/v split.
  Both naming schemes are accepted: the one stored in the published files (`attention.attention.query`,
  `attention.output.dense`, `mlp.weights_in` ...) and the one transformers >= 5 uses in memory (`attention.q_proj`,
  `attention.o_proj`, `mlp.gate_proj`/`up_proj`/`down_proj` ...). Every input key must be consumed; unknown keys
  are an error that names them.
- `hf_config_to_arch`: the architecture in a Hugging Face ``config.json``.
- `flatten_block_chunks`: the reference's chunked block names.

Only renames live here; reading files, picking the backbone and inferring the architecture is `models.weights`.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any, Dict, Mapping, Tuple

import torch
from torch import Tensor

# HF top-level names -> hub names.
_HF_TOP_LEVEL = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
# HF per-layer names (after "encoder.layer.{i}.") that are plain renames -> hub names (after "blocks.{i}.").
_HF_LAYER_RENAMES = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",  # published files
    "attention.o_proj": "attn.proj",  # transformers >= 5
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.w12",  # SwiGLU, already packed [gate; value]
    "mlp.weights_out": "mlp.w3",
    "mlp.down_proj": "mlp.w3",
}
# HF per-layer pieces that are concatenated along dim 0, in this order, into one hub tensor.
_HF_LAYER_CONCATS = {
    "attn.qkv": [("attention.attention.query", "attention.attention.key", "attention.attention.value"),
                 ("attention.q_proj", "attention.k_proj", "attention.v_proj")],
    "mlp.w12": [("mlp.gate_proj", "mlp.up_proj")],  # silu(gate) * up: the gate is the first half of w12
}
_HF_MODEL_PREFIXES = ("dinov2.", "dinov2_with_registers.")
_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$")


def short_list(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def convert_hf_state_dict(hf_sd: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Hugging Face DINOv2 state dict -> hub-layout state dict (loadable into `DinoVisionTransformer` strictly).

    Accepts the keys of `Dinov2Model` / `Dinov2WithRegistersModel`, optionally under the `dinov2.` /
    `dinov2_with_registers.` prefix of the task models. Raises KeyError naming any key it does not know (e.g. a
    classifier head) and any incomplete q/k/v or gate/up group.
    """
    source: Dict[str, Tensor] = {}
    for key, value in hf_sd.items():
        stripped = key
        for prefix in _HF_MODEL_PREFIXES:
            if key.startswith(prefix):
                stripped = key[len(prefix):]
                break
        if stripped in source:
            raise KeyError(f"HF state dict has the key {stripped!r} twice (with and without a model prefix)")
        source[stripped] = value

    hub: Dict[str, Tensor] = {}
    consumed = set()
    # pieces[(layer, hub_name, suffix)][part name] = tensor, for q/k/v and gate/up
    pieces: Dict[Tuple[int, str, str], Dict[str, Tensor]] = defaultdict(dict)
    concat_part_to_target = {part: target for target, groups in _HF_LAYER_CONCATS.items()
                             for group in groups for part in group}

    for key, value in source.items():
        if key in _HF_TOP_LEVEL:
            name = _HF_TOP_LEVEL[key]
            if name == "mask_token":
                value = value.reshape(1, -1)  # (1, D) in the hub layout
            hub[name] = value
            consumed.add(key)
            continue
        match = _LAYER_KEY.match(key)
        if match is None:
            continue
        layer, module, suffix = int(match.group(1)), match.group(2), match.group(3)
        if suffix == "lambda1":  # layer_scale{1,2}.lambda1 has no weight/bias suffix
            module, suffix = f"{module}.lambda1", ""
        if module in _HF_LAYER_RENAMES:
            name = f"blocks.{layer}.{_HF_LAYER_RENAMES[module]}" + (f".{suffix}" if suffix else "")
            if name in hub:
                raise KeyError(f"HF state dict maps twice onto {name!r} (second source: {key!r})")
            hub[name] = value
            consumed.add(key)
        elif module in concat_part_to_target:
            pieces[(layer, concat_part_to_target[module], suffix)][module] = value
            consumed.add(key)

    for (layer, target, suffix), parts in sorted(pieces.items()):
        group = next((g for g in _HF_LAYER_CONCATS[target] if set(g) == parts.keys()), None)
        if group is None:
            expected = " / ".join("+".join(g) for g in _HF_LAYER_CONCATS[target])
            raise KeyError(f"encoder.layer.{layer}: incomplete {target} group for '{suffix}': found "
                           f"{sorted(parts)}, expected {expected}")
        name = f"blocks.{layer}.{target}.{suffix}"
        if name in hub:
            raise KeyError(f"HF state dict maps twice onto {name!r}")
        hub[name] = torch.cat([parts[p] for p in group], dim=0)

    unknown = set(source) - consumed
    if unknown:
        raise KeyError(f"HF state dict has keys with no hub-layout equivalent: {short_list(unknown)}")
    return hub


def hf_config_to_arch(config: Mapping[str, Any], config_path: str) -> Dict[str, Any]:
    def single(name: str) -> int:
        value = config[name]
        if isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                raise ValueError(f"{config_path}: {name}={value} is not square; only square sizes are supported")
            value = value[0]
        return int(value)

    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size", "image_size")
               if k not in config]
    if missing:
        raise KeyError(f"{config_path} lacks {missing}")
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"{config_path}: hidden_act={act!r} is not supported (the backbone uses exact GELU)")
    eps = float(config.get("layer_norm_eps", 1e-6))
    if not math.isclose(eps, 1e-6):
        raise ValueError(f"{config_path}: layer_norm_eps={eps} differs from the backbone's 1e-6")
    return dict(
        embed_dim=int(config["hidden_size"]),
        depth=int(config["num_hidden_layers"]),
        num_heads=int(config["num_attention_heads"]),
        patch_size=single("patch_size"),
        img_size=single("image_size"),
        num_register_tokens=int(config.get("num_register_tokens", 0)),
        ffn_layer="swiglufused" if config.get("use_swiglu_ffn", False) else "mlp",
        init_values=float(config.get("layerscale_value", 1.0)),
        mlp_ratio=float(config.get("mlp_ratio", 4)),
        qkv_bias=bool(config.get("qkv_bias", True)),
        in_chans=int(config.get("num_channels", 3)),
    )


_CHUNKED_BLOCK_KEY = re.compile(r"^blocks\.\d+\.(\d+)\.")


def flatten_block_chunks(sd: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The reference's block chunks store block i as ``blocks.{chunk}.{i}`` (global i); the hub layout is
    ``blocks.{i}``."""
    if not any(_CHUNKED_BLOCK_KEY.match(k) for k in sd):
        return sd
    return {_CHUNKED_BLOCK_KEY.sub(r"blocks.\1.", k): v for k, v in sd.items()}
