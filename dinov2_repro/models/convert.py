"""State-dict converters into the published DINOv2 hub layout (the layout of `DinoVisionTransformer.state_dict()`).

- Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel`: same tensors under other names, with q/k/v split.
  Both naming schemes are accepted: the one stored in the published files (`attention.attention.query`,
  `attention.output.dense`, `mlp.weights_in` ...) and the one transformers >= 5 uses in memory (`attention.q_proj`,
  `attention.o_proj`, `mlp.gate_proj`/`up_proj`/`down_proj` ...). Every input key must be consumed; unknown keys
  are an error that names them.
- Training checkpoints (`teacher.backbone.*` inside an SSL meta-architecture state dict).
- `infer_arch_from_state_dict`: constructor arguments for `DinoVisionTransformer` read off a hub-layout state dict.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

from ..layers.swiglu_ffn import swiglu_hidden_features

# Published variants: embed_dim -> num_heads (all use 64-dim heads).
PUBLISHED_NUM_HEADS = {384: 6, 768: 12, 1024: 16, 1536: 24}

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


def _short_list(keys, limit: int = 12) -> str:
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
        raise KeyError(f"HF state dict has keys with no hub-layout equivalent: {_short_list(unknown)}")
    return hub


def _hf_config_to_arch(config: Mapping[str, Any], config_path: str) -> Dict[str, Any]:
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


def load_hf_folder(path: str) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """Read a Hugging Face DINOv2 folder (config.json + model.safetensors, a sharded safetensors index, or
    pytorch_model.bin) -> (hub-layout state dict, `DinoVisionTransformer` keyword arguments from config.json).

    The keyword arguments cover the architecture only; pick the pos-embed interpolation mode separately
    (`dinov2_repro.hub.hub_interpolation_kwargs`).
    """
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in the Hugging Face folder {path!r}")
    with open(config_path) as f:
        config = json.load(f)
    arch = _hf_config_to_arch(config, config_path)

    single_file = os.path.join(path, "model.safetensors")
    index_file = os.path.join(path, "model.safetensors.index.json")
    bin_file = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(single_file) or os.path.isfile(index_file):
        from safetensors.torch import load_file

        if os.path.isfile(single_file):
            hf_sd = load_file(single_file)
        else:
            with open(index_file) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            hf_sd = {}
            for shard in shards:
                hf_sd.update(load_file(os.path.join(path, shard)))
    elif os.path.isfile(bin_file):
        hf_sd = torch.load(bin_file, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"no model.safetensors, model.safetensors.index.json or pytorch_model.bin in {path!r}")
    try:
        return convert_hf_state_dict(hf_sd), arch
    except KeyError as error:
        raise KeyError(f"{path}: {error.args[0]}") from error


_CHUNKED_BLOCK_KEY = re.compile(r"^blocks\.\d+\.(\d+)\.")


def _flatten_block_chunks(sd: Dict[str, Tensor]) -> Dict[str, Tensor]:
    # The reference's block chunks store block i as blocks.{chunk}.{i} (global i); the hub layout is blocks.{i}.
    if not any(_CHUNKED_BLOCK_KEY.match(k) for k in sd):
        return sd
    return {_CHUNKED_BLOCK_KEY.sub(r"blocks.\1.", k): v for k, v in sd.items()}


def hub_layout_from_training_checkpoint(sd: Mapping[str, Tensor],
                                        prefix: str = "teacher.backbone.") -> Dict[str, Tensor]:
    """Select one backbone from a training state dict (default: the EMA teacher) in the hub layout.

    Keeps the keys starting with `prefix` (other modules -- student, heads, loss centers -- are not part of the
    backbone), strips it, removes torch.compile's `_orig_mod.` and flattens reference-style block chunks.
    Raises ValueError, listing the prefixes present, when no key has `prefix`.
    """
    selected = {k[len(prefix):].replace("_orig_mod.", ""): v for k, v in sd.items() if k.startswith(prefix)}
    if not selected:
        seen = sorted({".".join(k.split(".")[:2]) + "." for k in sd})
        raise ValueError(f"no key starts with {prefix!r}; prefixes present: {_short_list(seen)}")
    return _flatten_block_chunks(selected)


def _swiglu_mlp_ratio(embed_dim: int, hidden: int) -> float:
    # SwiGLU stores the rounded hidden size; find an mlp_ratio whose MLP width rounds to it (4 when possible).
    if swiglu_hidden_features(4 * embed_dim) == hidden:
        return 4.0
    for mlp_hidden in range(hidden, 2 * hidden + 8):
        ratio = mlp_hidden / embed_dim
        if swiglu_hidden_features(int(embed_dim * ratio)) == hidden:
            return ratio
    raise ValueError(f"cannot find an mlp_ratio giving a SwiGLU hidden size of {hidden}")


def infer_arch_from_state_dict(sd: Mapping[str, Tensor], num_heads: Optional[int] = None) -> Dict[str, Any]:
    """`DinoVisionTransformer` keyword arguments that reproduce the shapes of a hub-layout state dict.

    num_heads cannot be read from the tensors: unless given, it is taken from the published variants (384->6,
    768->12, 1024->16, 1536->24), else embed_dim // 64. Interpolation settings are not stored in the weights
    either (see `dinov2_repro.hub.hub_interpolation_kwargs` for the published convention).
    """
    required = ("cls_token", "pos_embed", "patch_embed.proj.weight")
    missing = [k for k in required if k not in sd]
    if missing:
        raise KeyError(f"state dict is not in the hub layout: missing {missing} (keys: {_short_list(sd)})")
    sd = _flatten_block_chunks(dict(sd))
    embed_dim = sd["cls_token"].shape[-1]
    if num_heads is not None:
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
    elif embed_dim in PUBLISHED_NUM_HEADS:
        num_heads = PUBLISHED_NUM_HEADS[embed_dim]
    elif embed_dim % 64 == 0:
        num_heads = embed_dim // 64
    else:
        raise ValueError(f"cannot guess num_heads for embed_dim={embed_dim}; pass num_heads explicitly")
    block_ids = {int(m.group(1)) for k in sd for m in [re.match(r"^blocks\.(\d+)\.", k)] if m}
    depth = max(block_ids) + 1 if block_ids else 0
    if block_ids != set(range(depth)):
        raise ValueError(f"blocks are not numbered 0..{depth - 1}: missing {sorted(set(range(depth)) - block_ids)}")
    proj = sd["patch_embed.proj.weight"]  # (D, C, p, p)
    patch_size = proj.shape[-1]
    n_patches = sd["pos_embed"].shape[1] - 1
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise ValueError(f"pos_embed has {n_patches} patch positions, which is not a square grid")

    if "blocks.0.mlp.w12.weight" in sd:
        ffn_layer = "swiglufused"
        mlp_ratio = _swiglu_mlp_ratio(embed_dim, sd["blocks.0.mlp.w3.weight"].shape[1])
        ffn_bias = "blocks.0.mlp.w12.bias" in sd
    elif "blocks.0.mlp.fc1.weight" in sd:
        ffn_layer = "mlp"
        mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
        ffn_bias = "blocks.0.mlp.fc1.bias" in sd
    else:  # no blocks
        ffn_layer, mlp_ratio, ffn_bias = "mlp", 4.0, True

    return dict(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        patch_size=patch_size,
        img_size=side * patch_size,
        in_chans=proj.shape[1],
        num_register_tokens=sd["register_tokens"].shape[1] if "register_tokens" in sd else 0,
        ffn_layer=ffn_layer,
        mlp_ratio=mlp_ratio,
        # the LayerScale init value is irrelevant once weights are loaded; only its presence matters
        init_values=1.0 if "blocks.0.ls1.gamma" in sd else None,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        proj_bias="blocks.0.attn.proj.bias" in sd,
        ffn_bias=ffn_bias,
    )
