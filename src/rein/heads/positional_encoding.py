"""Sine positional encoding (DETR style), as used by Mask2Former's pixel decoder and decoder."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class SinePositionalEncoding(nn.Module):
    """Fixed 2-D sine/cosine positional encoding.

    Input: a padding mask ``(B, H, W)`` (True = padded). Output: ``(B, 2 * num_feats, H, W)``,
    the ``num_feats`` y-channels first, then the ``num_feats`` x-channels; within each half
    the channels alternate ``sin, cos, sin, cos, ...``. No parameters.

    The arithmetic follows mmdet 3.x ``SinePositionalEncoding`` op for op, so the values
    match it bit for bit in float32.
    """

    def __init__(
        self,
        num_feats: int = 128,
        temperature: int = 10000,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        eps: float = 1e-6,
        offset: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_feats = num_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.eps = eps
        self.offset = offset

    def forward(self, mask: Tensor) -> Tensor:
        """(B, H, W) bool padding mask -> (B, 2 * num_feats, H, W) float32 encoding."""
        batch, height, width = mask.shape
        not_mask = 1 - mask.to(torch.int)
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale
        dim_t = torch.arange(self.num_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4)
        pos_x = pos_x.view(batch, height, width, -1)
        pos_y = pos_y.view(batch, height, width, -1)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)

    def for_shape(self, height: int, width: int, device: torch.device | None = None) -> Tensor:
        """Encoding of an unpadded ``height x width`` map: (1, 2 * num_feats, H, W).

        Equal to ``forward`` on an all-False mask (every image of a batch gets the same
        values, so callers broadcast over the batch instead of recomputing it).
        """
        mask = torch.zeros((1, height, width), dtype=torch.bool, device=device)
        return self.forward(mask)

    def extra_repr(self) -> str:
        return (
            f"num_feats={self.num_feats}, temperature={self.temperature}, "
            f"normalize={self.normalize}, scale={self.scale}, eps={self.eps}"
        )
