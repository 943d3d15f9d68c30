"""A frozen timm Vision Transformer with Rein after every block.

:class:`ReinViT` wraps an unmodified timm ``VisionTransformer``: DINOv2 (S/B/L/g, with or without
registers), CLIP (pre-norm, ``norm_pre``) and MAE. It runs the patch embedding and the blocks
itself so that Rein can refine the patch tokens after *every* block; the prefix tokens (class,
registers) pass through untouched. It returns four maps taken at ``out_indices`` *without* the
final norm, resized from stride ``patch`` to strides 4/8/16/32 (x4, x2, x1, x0.5 bilinear, as the
official code), plus the Rein-link queries. With a patch size other than 16 the maps are at
strides p/4, p/2, p and 2p; the configs therefore run every ViT at patch 16 (the patch kernel and
the positional grid are converted when the weights load, as the official code does offline).

Positional embeddings follow the DINOv2 rule of the official code: they are interpolated
(bicubic with ``scale_factor`` and the "+0.1" trick) only when the patch grid differs from the
stored grid or the input is not square.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rein.backbones.base import (
    OUT_SCALES,
    ReinBackbone,
    check_input_size,
    check_out_indices,
    check_reins_fit,
    create_timm_model,
    timm_patch_size,
    to_strides,
)
from rein.reins import Reins

__all__ = ["ReinViT", "default_out_indices", "create_timm_vit", "OUT_SCALES"]

_KNOWN_OUT_INDICES = {
    12: [3, 5, 7, 11],
    24: [7, 11, 15, 23],
    32: [7, 15, 23, 31],
    40: [9, 19, 29, 39],
}

# Kept under its first name: builds any timm backbone, ViT or not.
create_timm_vit = create_timm_model


def default_out_indices(depth: int) -> list[int]:
    """Default output blocks: [7, 11, 15, 23] for 24 blocks, similar fractions otherwise."""
    if depth in _KNOWN_OUT_INDICES:
        return list(_KNOWN_OUT_INDICES[depth])
    return [max(0, round(depth * f) - 1) for f in (1 / 3, 1 / 2, 2 / 3)] + [depth - 1]


class ReinViT(ReinBackbone):
    """Frozen timm ViT + :class:`~rein.reins.Reins` after every block.

    Args:
        vit: a timm ``VisionTransformer`` (kept as is; its weights are ``vit.*``).
        reins: the Rein module, or ``None`` for the frozen / fully fine-tuned baselines.
        out_indices: blocks whose (post-Rein) outputs are returned; 4 of them.
        mask_token: keep a (1, C) ``mask_token`` parameter as in the original DINOv2 layout.
            It is unused (as in the official model) but lets the original torch-hub file load
            strictly and makes parameter counts equal the official report.
        freeze: freeze the ViT (no weight gradients, always in eval mode).
    """

    supports_prompts = True  # token sequences with absolute positions (VPT fits)

    def __init__(
        self,
        vit: nn.Module,
        reins: Reins | None = None,
        out_indices: list[int] | None = None,
        mask_token: bool = False,
        freeze: bool = True,
    ) -> None:
        super().__init__()
        self.vit = vit
        self.embed_dim: int = vit.embed_dim
        self.depth = len(vit.blocks)
        self.patch_size = timm_patch_size(vit)
        self.num_prefix_tokens: int = getattr(vit, "num_prefix_tokens", 1)
        self.out_indices = check_out_indices(
            out_indices if out_indices else default_out_indices(self.depth), self.depth
        )
        self.last_index = max(self.out_indices)
        if mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, self.embed_dim))
        check_reins_fit(reins, self.depth, self.embed_dim)
        self.reins = reins
        if freeze:
            self.freeze()

    @property
    def timm_model(self) -> nn.Module:
        return self.vit

    @property
    def out_channels(self) -> list[int]:
        return [self.embed_dim] * 4

    # -- tokens -------------------------------------------------------------------------------
    def _prefix_tokens(self, batch: int) -> list[Tensor]:
        out = []
        for name in ("cls_token", "reg_token"):
            tok = getattr(self.vit, name, None)
            if tok is not None:
                out.append(tok.expand(batch, -1, -1))
        return out

    def _pos_embed(self, num_patch_h: int, num_patch_w: int, img_h: int, img_w: int) -> Tensor:
        """Positional embedding for this input, DINOv2 rule (see module docstring)."""
        pos = self.vit.pos_embed
        n_prefix = 0 if getattr(self.vit, "no_embed_class", False) else self.num_prefix_tokens
        grid = math.isqrt(pos.shape[1] - n_prefix)
        if num_patch_h * num_patch_w == grid * grid and img_h == img_w:
            return pos
        prefix_pos, patch_pos = pos[:, :n_prefix], pos[:, n_prefix:]
        dim = pos.shape[-1]
        patch_pos = patch_pos.float().reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(
            patch_pos,
            scale_factor=(float(num_patch_h + 0.1) / grid, float(num_patch_w + 0.1) / grid),
            mode="bicubic",
            align_corners=False,
        )
        if patch_pos.shape[-2:] != (num_patch_h, num_patch_w):  # pragma: no cover - float guard
            raise RuntimeError(f"pos-embed resize gave {tuple(patch_pos.shape[-2:])}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos.dtype)
        return torch.cat([prefix_pos, patch_pos], dim=1)

    def embed(self, x: Tensor) -> tuple[Tensor, int, int]:
        """Patch embedding + prefix tokens + positional embedding -> (B, P + h*w, C), h, w."""
        batch, _, img_h, img_w = x.shape
        check_input_size(img_h, img_w, self.patch_size)
        pe = self.vit.patch_embed
        tokens = pe.proj(x)  # (B, C, h, w)
        h, w = tokens.shape[-2:]
        tokens = pe.norm(tokens.flatten(2).transpose(1, 2))  # (B, h*w, C)
        prefix = self._prefix_tokens(batch)
        pos = self._pos_embed(h, w, img_h, img_w) if self.vit.pos_embed is not None else None
        if getattr(self.vit, "no_embed_class", False):
            tokens = tokens + pos if pos is not None else tokens
            tokens = torch.cat([*prefix, tokens], dim=1)
        else:
            tokens = torch.cat([*prefix, tokens], dim=1)
            tokens = tokens + pos if pos is not None else tokens
        tokens = self.vit.pos_drop(tokens)
        tokens = self.vit.norm_pre(tokens)
        return tokens, h, w

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor | None]:
        """Images (B, 3, H, W) -> ([4 maps (B, C, H/4..H/32, ...)], queries (m, Q) or None)."""
        tokens, h, w = self.embed(x)
        return self.forward_tokens(tokens, h, w)

    def forward_tokens(
        self,
        tokens: Tensor,
        h: int,
        w: int,
        block_kwargs: Callable[[int], dict[str, Any]] | None = None,
    ) -> tuple[list[Tensor], Tensor | None]:
        """Blocks with Rein after each on embedded tokens (B, P + h*w, C) -> outputs.

        ``block_kwargs(i)`` gives extra keyword arguments of block ``i`` (e.g. EVA's ``rope``).
        """
        batch, n_prefix = tokens.shape[0], self.num_prefix_tokens
        taken: dict[int, Tensor] = {}
        for i, block in enumerate(self.vit.blocks[: self.last_index + 1]):
            after = None
            if self.reins is not None:
                after = partial(self.reins, layer=i, num_prefix_tokens=n_prefix)
            tokens = self.run_block(
                block, tokens, after, **(block_kwargs(i) if block_kwargs else {})
            )
            if i in self.out_indices:
                taken[i] = tokens[:, n_prefix:].transpose(1, 2).reshape(batch, -1, h, w)
        feats = to_strides([taken[i] for i in self.out_indices])
        return feats, self.link_queries()
