"""A frozen timm SAM image encoder with Rein after every block.

The SAM encoder (timm ``VisionTransformerSAM``) is a ViT without class token whose tokens stay
on the grid, ``(B, H, W, C)``: a 2-D absolute positional embedding (resampled to the input grid
as timm does), windowed attention in most blocks and global attention in a few, and a conv neck.
:class:`ReinSAM` runs the blocks itself; after each block the grid is flattened to
``(B, H*W, C)`` for Rein (every token is a patch token) and folded back. The four outputs are
taken at ``out_indices`` *before* the neck (which is kept, unused, so that SAM files load
strictly) and resized from stride 16 to strides 4/8/16/32 as for the other ViTs. The default
``out_indices`` are the four global-attention blocks ([7, 15, 23, 31] for SAM-H).
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from rein.backbones.base import (
    ReinBackbone,
    check_input_size,
    check_out_indices,
    check_reins_fit,
    timm_patch_size,
    to_strides,
)
from rein.backbones.vit import default_out_indices
from rein.reins import Reins

__all__ = ["ReinSAM"]


class ReinSAM(ReinBackbone):
    """Frozen timm SAM ViT + Rein after every block on all spatial tokens.

    Args:
        sam: a timm ``VisionTransformerSAM`` (weights under ``vit.*``).
        reins: the Rein module, or ``None``.
        out_indices: four blocks whose post-Rein outputs are returned; default the four
            global-attention blocks when there are four, else as for other ViTs.
        freeze: freeze the encoder (no weight gradients, always in eval mode).
    """

    num_prefix_tokens = 0

    def __init__(
        self,
        sam: nn.Module,
        reins: Reins | None = None,
        out_indices: list[int] | None = None,
        freeze: bool = True,
    ) -> None:
        super().__init__()
        self.vit = sam
        self.embed_dim: int = sam.embed_dim
        self.depth = len(sam.blocks)
        self.patch_size = timm_patch_size(sam)
        global_blocks = [i for i, b in enumerate(sam.blocks) if getattr(b, "window_size", 0) == 0]
        default = global_blocks if len(global_blocks) == 4 else default_out_indices(self.depth)
        self.out_indices = check_out_indices(out_indices if out_indices else default, self.depth)
        self.last_index = max(self.out_indices)
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

    def embed(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) -> grid tokens (B, H/p, W/p, C), as timm's SAM forward."""
        from timm.layers import resample_abs_pos_embed_nhwc

        check_input_size(x.shape[-2], x.shape[-1], self.patch_size)
        tokens = self.vit.patch_embed(x)  # (B, h, w, C)
        if self.vit.pos_embed is not None:
            tokens = tokens + resample_abs_pos_embed_nhwc(self.vit.pos_embed, tokens.shape[1:3])
        tokens = self.vit.pos_drop(tokens)
        tokens = self.vit.patch_drop(tokens)
        return self.vit.norm_pre(tokens)

    def _rein_nhwc(self, tokens: Tensor, layer: int) -> Tensor:
        """Rein layer ``layer`` on (B, h, w, C) tokens."""
        batch, h, w, dim = tokens.shape
        flat = self.reins(tokens.reshape(batch, h * w, dim), layer, num_prefix_tokens=0)
        return flat.reshape(batch, h, w, dim)

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor | None]:
        """Images (B, 3, H, W) -> ([4 maps at strides 4/8/16/32], queries (m, Q) or None)."""
        tokens = self.embed(x)
        taken: dict[int, Tensor] = {}
        for i, block in enumerate(self.vit.blocks[: self.last_index + 1]):
            after = None
            if self.reins is not None:
                after = partial(self._rein_nhwc, layer=i)
            tokens = self.run_block(block, tokens, after)  # (B, h, w, C), windowed or global
            if i in self.out_indices:
                taken[i] = tokens.permute(0, 3, 1, 2)  # (B, C, h, w), before the neck
        return to_strides([taken[i] for i in self.out_indices]), self.link_queries()
