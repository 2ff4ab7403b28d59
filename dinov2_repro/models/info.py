"""Size and cost of a backbone: parameters, GFLOPs of one forward pass, token counts (`dinov2-repro info`).

GFLOPs come from fvcore, which counts one fused multiply-add as ONE flop (so its "flops" are MACs; multiply by 2
for the other convention). fvcore has no rule for scaled_dot_product_attention, so we add one: q k^T and
attn v cost B*H*N*M*d multiply-adds each. Element-wise ops (add, mul, GELU, softmax) are not counted, as in
fvcore's defaults; LayerNorm is (5 per element).
"""

from __future__ import annotations

import argparse
import json
import warnings
from typing import Any, Dict, List, Optional

import torch

from .vision_transformer import build_backbone

FLOP_CONVENTION = "fvcore: 1 multiply-add = 1 flop; attention matmuls included; element-wise ops not counted"


def _sdpa_flop_handle(inputs: List[Any], outputs: List[Any]) -> int:
    from fvcore.nn.jit_handles import get_shape

    q_shape, k_shape, v_shape = (get_shape(v) for v in inputs[:3])  # (..., N, d), (..., M, d), (..., M, dv)
    batch_heads = 1
    for size in q_shape[:-2]:
        batch_heads *= size
    n_queries, head_dim = q_shape[-2:]
    n_keys, value_dim = k_shape[-2], v_shape[-1]
    return batch_heads * n_queries * n_keys * (head_dim + value_dim)


def _fvcore_flops_by_module(model: torch.nn.Module, x: torch.Tensor) -> Dict[str, int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore's TorchScript use and the tracer emit deprecation warnings
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(model, x)
        analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flop_handle)
        for op in ("aten::add", "aten::mul", "aten::gelu", "aten::silu", "aten::div"):
            analysis.set_op_handle(op, None)  # element-wise: deliberately not counted
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        return dict(analysis.by_module())


def model_info(arch: str, patch_size: int, img_size: int, num_register_tokens: int = 0,
               **model_kwargs: Any) -> Dict[str, Any]:
    """dict(params, gflops, n_patch_tokens, n_tokens, flop_convention) for one img_size x img_size image.

    The model is built like the published ones (LayerScale on, pos_embed sized for `img_size`). Parameters are
    counted on a meta-device copy (no memory); FLOPs are traced on a 1-block copy and extrapolated, since all
    blocks are identical.
    """
    options = dict(patch_size=patch_size, img_size=img_size, num_register_tokens=num_register_tokens,
                   init_values=1.0, **model_kwargs)
    with torch.device("meta"):
        full = build_backbone(arch, **options)
    params = sum(p.numel() for p in full.parameters())

    one_block = build_backbone(arch, **{**options, "depth": 1}).eval()
    with torch.no_grad():
        flops = _fvcore_flops_by_module(one_block, torch.zeros(1, one_block.patch_embed.in_chans, img_size, img_size))
    total = flops[""] + (full.n_blocks - 1) * flops["blocks.0"]
    n_patch_tokens = (img_size // patch_size) ** 2
    return dict(
        params=params,
        gflops=total / 1e9,
        n_patch_tokens=n_patch_tokens,
        n_tokens=1 + num_register_tokens + n_patch_tokens,
        flop_convention=FLOP_CONVENTION,
    )


def main(argv: Optional[List[str]] = None) -> int:
    """`dinov2-repro info`: print parameters, GFLOPs and token counts of a backbone."""
    parser = argparse.ArgumentParser(prog="dinov2-repro info", description=main.__doc__)
    parser.add_argument("--arch", default="vit_small", choices=["vit_small", "vit_base", "vit_large", "vit_giant2"])
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--num-register-tokens", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.img_size % args.patch_size:
        parser.error(f"--img-size {args.img_size} is not a multiple of --patch-size {args.patch_size}")

    info = model_info(args.arch, args.patch_size, args.img_size, args.num_register_tokens)
    if args.json:
        print(json.dumps({"arch": args.arch, "patch_size": args.patch_size, "img_size": args.img_size,
                          "num_register_tokens": args.num_register_tokens, **info}))
        return 0
    print(f"{args.arch}/{args.patch_size}, {args.img_size}x{args.img_size} px, {args.num_register_tokens} registers")
    print(f"  parameters : {info['params']:,} ({info['params'] / 1e6:.2f}M)")
    print(f"  GFLOPs     : {info['gflops']:.2f} per image ({info['flop_convention']})")
    print(f"  tokens     : {info['n_tokens']} = 1 CLS + {args.num_register_tokens} registers + "
          f"{info['n_patch_tokens']} patches")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
