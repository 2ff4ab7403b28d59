"""The DINOv2 Vision Transformer backbone (Oquab et al. 2023, arXiv 2304.07193; registers: Darcet et al. 2023).

Token sequence: [CLS, registers (R), patches (N)]. The learned `pos_embed` covers CLS + patches only (registers
have no position) and is resized bicubically to the input's patch grid. The module's `state_dict()` is the
published hub layout (cls_token, pos_embed, register_tokens, mask_token, patch_embed.proj.*, blocks.{i}.*,
norm.*), so the released checkpoints load with strict=True and our exports load into theirs.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import Attention, Block, LayerScale, Mlp, PatchEmbed, SwiGLUFFNFused

FFN_LAYERS: Dict[str, Callable[..., nn.Module]] = {
    "mlp": Mlp,
    # The reference maps both names to the rounded SwiGLU; keeping that makes ViT-g/14's shapes match.
    "swiglu": SwiGLUFFNFused,
    "swiglufused": SwiGLUFFNFused,
}


def _init_module(module: nn.Module) -> None:
    # ViT initialisation (timm "vit_timm"): truncated normal weights, zero biases, for every Linear.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    # Everything else gets its own default init again, so that init_weights() fully initialises a model
    # materialised from the meta device (to_empty) -- same distributions as at construction.
    elif isinstance(module, (nn.LayerNorm, nn.Conv2d, LayerScale)):
        module.reset_parameters()


def resize_pos_embed(pos_embed: Tensor, grid_h: int, grid_w: int, interpolate_offset: float = 0.1,
                     interpolate_antialias: bool = False) -> Tensor:
    """Resize a (1, 1 + M*M, D) [CLS, patches] positional embedding to a grid_h x grid_w patch grid (fp32 result).

    The CLS position is kept; the M x M patch part is resized bicubically in fp32:
    - interpolate_offset > 0 (original DINOv2 weights): scale_factor ((grid_h + offset) / M, (grid_w + offset) / M);
      the offset keeps floor(M * scale) from landing one short (DINO issue #8);
    - interpolate_offset == 0 (*_reg4 weights): explicit size (grid_h, grid_w).
    antialias=interpolate_antialias in both modes, as in the reference.
    """
    n_trained = pos_embed.shape[1] - 1
    side = math.isqrt(n_trained)
    if side * side != n_trained:
        raise ValueError(f"pos_embed has {n_trained} patch positions, which is not a square grid")
    pos_embed = pos_embed.float()
    cls_pos = pos_embed[:, :1]
    patch_pos = pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, D, M, M)
    if interpolate_offset:
        # float(): under jit tracing (fvcore) sizes are tensors, which F.interpolate's scale_factor rejects
        resize = dict(scale_factor=(float(grid_h + interpolate_offset) / side,
                                    float(grid_w + interpolate_offset) / side))
    else:
        resize = dict(size=(grid_h, grid_w))
    patch_pos = F.interpolate(patch_pos, mode="bicubic", antialias=interpolate_antialias, **resize)
    if patch_pos.shape[-2:] != (grid_h, grid_w):
        raise RuntimeError(f"pos_embed resized to {tuple(patch_pos.shape[-2:])}, expected {(grid_h, grid_w)}")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)  # row-major, like the patches
    return torch.cat((cls_pos, patch_pos), dim=1)


class DinoVisionTransformer(nn.Module):
    """ViT backbone; see the module docstring for the token layout.

    Args mirror the reference: `init_values` is the LayerScale init (None/0: no LayerScale), `drop_path_rate`
    the stochastic-depth rate (same in every block if `drop_path_uniform`, else linear from 0 to the rate),
    `ffn_layer` one of "mlp" | "swiglu" | "swiglufused" (or a module class), `num_register_tokens` the number of
    registers, `interpolate_offset`/`interpolate_antialias` the pos-embed resizing mode (offset 0.1 for the
    original weights, offset 0 + antialias for the *_reg4 weights), `attn_backend` "sdpa" | "xformers" | "auto".
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_bias: bool = True,
        proj_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        init_values: Optional[float] = None,
        embed_layer: Callable[..., nn.Module] = PatchEmbed,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        block_fn: Callable[..., nn.Module] = Block,
        ffn_layer: Union[str, Callable[..., nn.Module]] = "mlp",
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
        attn_backend: str = "sdpa",
    ) -> None:
        super().__init__()
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if isinstance(ffn_layer, str):
            if ffn_layer not in FFN_LAYERS:
                raise ValueError(f"ffn_layer={ffn_layer!r} is not one of {tuple(FFN_LAYERS)}")
            ffn_class = FFN_LAYERS[ffn_layer]
        else:
            ffn_class = ffn_layer
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        self.num_features = self.embed_dim = embed_dim
        self.num_tokens = 1  # CLS; registers are counted separately
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset

        self.patch_embed = embed_layer(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                       embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_tokens, embed_dim))
        if num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        else:
            self.register_tokens = None  # absent from state_dict(), as in the non-register checkpoints
        # iBOT mask token, shape (1, D) as in the published checkpoints.
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))

        if drop_path_uniform:
            drop_rates = [drop_path_rate] * depth
        else:  # stochastic depth decay rule: deeper blocks are dropped more often
            # plain Python (not torch.linspace) so the model can be built under torch.device("meta")
            drop_rates = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        attn_class = partial(Attention, backend=attn_backend)
        # Flat blocks.{i}: the reference's "block chunks" gave blocks.{chunk}.{i} keys that hub models cannot load.
        self.blocks = nn.ModuleList(
            block_fn(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                drop_path=drop_rates[i],
                norm_layer=norm_layer,
                act_layer=act_layer,
                ffn_layer=ffn_class,
                init_values=init_values,
                attn_class=attn_class,
            )
            for i in range(depth)
        )
        self.norm = norm_layer(embed_dim)
        self.head = nn.Identity()  # the reference's forward() returns head(CLS); users may replace it

        self.init_weights()

    # ------------------------------------------------------------------ init
    def init_weights(self) -> None:
        """Reference initialisation: pos_embed and Linear weights trunc-normal(0.02), CLS and registers
        normal(1e-6), mask token zeros; LayerScale, LayerNorm and the patch-embed conv get their default init.
        Initialises every parameter, so it also completes a model built on the meta device after to_empty()."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        self.apply(_init_module)

    # ------------------------------------------------------------------ tokens
    def interpolate_pos_encoding(self, x: Tensor, height: int, width: int) -> Tensor:
        """Positional embedding (1, 1 + h*w, D) for an input of `height` x `width` pixels (h, w = patch grid).

        Returns `self.pos_embed` itself when the grid already matches the trained one; otherwise see
        `resize_pos_embed`. `x` only provides the output dtype.
        """
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        if grid_h * grid_w == self.pos_embed.shape[1] - 1 and grid_h == grid_w:
            return self.pos_embed
        resized = resize_pos_embed(self.pos_embed, grid_h, grid_w, self.interpolate_offset,
                                   self.interpolate_antialias)
        return resized.to(x.dtype)

    def prepare_tokens_with_masks(self, x: Tensor, masks: Optional[Tensor] = None) -> Tensor:
        """Images (B, C, H, W) -> tokens (B, 1 + R + N, D) entering the first block.

        masks: bool (B, N), True = masked. A masked patch's embedding is replaced by `mask_token` before the
        positional embedding is added, so the model still knows where the masked patch is (iBOT).
        """
        _, _, height, width = x.shape
        tokens = self.patch_embed(x)  # (B, N, D)
        if masks is not None:
            if masks.shape != tokens.shape[:2]:
                raise ValueError(f"masks shape {tuple(masks.shape)} does not match (batch, patches) "
                                 f"{tuple(tokens.shape[:2])}")
            # torch.where, not masked assignment: no in-place write into a tensor autograd needs.
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        tokens = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)  # (B, 1 + N, D)
        tokens = tokens + self.interpolate_pos_encoding(tokens, height, width)
        if self.register_tokens is not None:
            registers = self.register_tokens.expand(tokens.shape[0], -1, -1)
            tokens = torch.cat((tokens[:, :1], registers, tokens[:, 1:]), dim=1)  # (B, 1 + R + N, D)
        return tokens

    def _output_dict(self, tokens: Tensor, masks: Optional[Tensor]) -> Dict[str, Any]:
        tokens_norm = self.norm(tokens)
        first_patch = 1 + self.num_register_tokens
        return {
            "x_norm_clstoken": tokens_norm[:, 0],  # (B, D)
            "x_norm_regtokens": tokens_norm[:, 1:first_patch],  # (B, R, D)
            "x_norm_patchtokens": tokens_norm[:, first_patch:],  # (B, N, D)
            "x_prenorm": tokens,  # (B, 1 + R + N, D)
            "masks": masks,
        }

    # ------------------------------------------------------------------ forward
    def forward_features_list(self, x_list: Sequence[Tensor],
                              masks_list: Optional[Sequence[Optional[Tensor]]] = None) -> List[Dict[str, Any]]:
        """Several batches of different crop sizes; each stays a dense batch through every block (no padding).

        Returns one output dict per input, identical to `forward_features` on that input alone.
        """
        if masks_list is None:
            masks_list = [None] * len(x_list)
        if len(masks_list) != len(x_list):
            raise ValueError(f"got {len(x_list)} image batches but {len(masks_list)} mask entries")
        tokens = [self.prepare_tokens_with_masks(x, m) for x, m in zip(x_list, masks_list)]
        for block in self.blocks:
            tokens = block(tokens)
        return [self._output_dict(t, m) for t, m in zip(tokens, masks_list)]

    def forward_features(self, x: Union[Tensor, Sequence[Tensor]], masks: Optional[Any] = None):
        """x (B, C, H, W) -> dict(x_norm_clstoken (B, D), x_norm_regtokens (B, R, D), x_norm_patchtokens (B, N, D),
        x_prenorm (B, 1 + R + N, D), masks). A list of batches is delegated to `forward_features_list`."""
        if isinstance(x, (list, tuple)):
            return self.forward_features_list(x, masks)
        tokens = self.prepare_tokens_with_masks(x, masks)
        for block in self.blocks:
            tokens = block(tokens)
        return self._output_dict(tokens, masks)

    def forward(self, *args, is_training: bool = False, **kwargs):
        """CLS embedding (B, D) after the final norm (through `head`, an identity by default);
        with is_training=True, the full `forward_features` dict."""
        features = self.forward_features(*args, **kwargs)
        if is_training:
            return features
        return self.head(features["x_norm_clstoken"])

    def _block_outputs(self, x: Tensor, n: Union[int, Sequence[int]]) -> List[Tensor]:
        if isinstance(n, int):
            if not 1 <= n <= len(self.blocks):
                raise ValueError(f"n={n} must be between 1 and the number of blocks ({len(self.blocks)})")
            wanted = set(range(len(self.blocks) - n, len(self.blocks)))
        else:
            wanted = set(n)
            bad = sorted(i for i in wanted if not 0 <= i < len(self.blocks))
            if bad:
                raise ValueError(f"block indices {bad} out of range for a model with {len(self.blocks)} blocks")
        tokens = self.prepare_tokens_with_masks(x)
        outputs = []
        for i, block in enumerate(self.blocks):
            if not wanted:
                break  # no later block is needed
            tokens = block(tokens)
            if i in wanted:
                outputs.append(tokens)
                wanted.discard(i)
        return outputs

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: Union[int, Sequence[int]] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> Tuple:
        """Outputs of several blocks, in block order.

        n: an int takes the last n blocks; a sequence gives block indices. norm applies the final LayerNorm.
        Patch tokens exclude CLS and registers: (B, N, D), or (B, D, h, w) with reshape=True.
        With return_class_token, each entry is (patch_tokens, cls_token (B, D)).
        """
        outputs = self._block_outputs(x, n)
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        outputs = [out[:, 1 + self.num_register_tokens:] for out in outputs]
        if reshape:
            batch, _, height, width = x.shape
            grid_h, grid_w = height // self.patch_size, width // self.patch_size
            outputs = [out.reshape(batch, grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous() for out in outputs]
        if return_class_token:
            return tuple(zip(outputs, class_tokens))
        return tuple(outputs)


# ---------------------------------------------------------------------- variants
# Published widths/depths/heads; every entry can be overridden by keyword (depth=2 for a quick test).
VARIANTS: Dict[str, Dict[str, Any]] = {
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4),
    # ViT-g/14 of the paper: 1536 wide, 40 blocks, 24 heads of 64, SwiGLU FFN (hidden 4096).
    "vit_giant2": dict(embed_dim=1536, depth=40, num_heads=24, mlp_ratio=4, ffn_layer="swiglufused"),
}


def _build(arch: str, patch_size: int, num_register_tokens: int, kwargs: Dict[str, Any]) -> DinoVisionTransformer:
    # Keyword arguments override the variant's defaults (e.g. depth=2 for a quick test).
    options = {**VARIANTS[arch], "patch_size": patch_size, "num_register_tokens": num_register_tokens, **kwargs}
    return DinoVisionTransformer(**options)


def vit_small(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-S: 384 wide, 12 blocks, 6 heads (~21M parameters)."""
    return _build("vit_small", patch_size, num_register_tokens, kwargs)


def vit_base(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-B: 768 wide, 12 blocks, 12 heads (~86M parameters)."""
    return _build("vit_base", patch_size, num_register_tokens, kwargs)


def vit_large(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-L: 1024 wide, 24 blocks, 16 heads (~300M parameters)."""
    return _build("vit_large", patch_size, num_register_tokens, kwargs)


def vit_giant2(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-g (DINOv2's "giant2"): 1536 wide, 40 blocks, 24 heads, SwiGLU FFN (~1.1B parameters)."""
    return _build("vit_giant2", patch_size, num_register_tokens, kwargs)


def build_backbone(arch: str, **kwargs) -> DinoVisionTransformer:
    """Build a variant by name ("vit_small" | "vit_base" | "vit_large" | "vit_giant2"); kwargs override defaults."""
    if arch not in VARIANTS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {tuple(VARIANTS)}")
    return _build(arch, kwargs.pop("patch_size", 16), kwargs.pop("num_register_tokens", 0), kwargs)
