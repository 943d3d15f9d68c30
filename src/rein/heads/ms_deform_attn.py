"""Multi-scale deformable attention (Deformable DETR) in plain PyTorch.

The sampling is done with ``F.grid_sample`` (bilinear, zero padding, ``align_corners=False``),
which is what mmcv's ``multi_scale_deformable_attn_pytorch`` does on CPU. No compiled kernels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _level_shapes(spatial_shapes: Tensor | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def ms_deform_attn_core(
    value: Tensor,
    spatial_shapes: Tensor | Sequence[Sequence[int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Bilinearly sample every level at the given locations and sum them with the weights.

    Args:
        value: (B, Nv, heads, Dh), the levels flattened row-major and concatenated,
            ``Nv = sum(h * w)``.
        spatial_shapes: (L, 2) as (h, w) per level (long tensor or nested ints).
        sampling_locations: (B, Nq, heads, L, P, 2), (x, y) normalised to [0, 1] with the
            ``align_corners=False`` convention (0 and 1 are the outer pixel edges).
        attention_weights: (B, Nq, heads, L, P).

    Returns:
        (B, Nq, heads * Dh).
    """
    shapes = _level_shapes(spatial_shapes)
    batch, _, heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    value_per_level = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample wants coordinates in [-1, 1]
    grids = 2 * sampling_locations - 1
    # (B, Nq, heads, L, P) -> (B*heads, 1, Nq, L, P), broadcast over Dh
    weights = attention_weights.transpose(1, 2).reshape(
        batch * heads, 1, num_queries, num_levels, num_points
    )
    output = None
    for level, (h, w) in enumerate(shapes):
        # (B, h*w, heads, Dh) -> (B*heads, Dh, h, w); one copy, contiguous for grid_sample
        value_l = value_per_level[level].permute(0, 2, 3, 1).reshape(batch * heads, head_dim, h, w)
        # (B, Nq, heads, P, 2) -> (B*heads, Nq, P, 2)
        grid_l = (
            grids[:, :, :, level].transpose(1, 2).reshape(batch * heads, num_queries, num_points, 2)
        )
        # (B*heads, Dh, Nq, P)
        sampled = F.grid_sample(
            value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        # weighted sum over this level's points, accumulated over the levels: (B*heads, Dh, Nq).
        # mmcv stacks all levels into one (B*heads, Dh, Nq, L*P) tensor first; summing level by
        # level gives the same result up to float rounding without that copy (the largest
        # tensor of the pixel decoder) and its backward.
        term = (sampled * weights[..., level, :]).sum(-1)
        output = term if output is None else output + term
    assert output is not None
    # (B*heads, Dh, Nq) -> (B, heads*Dh, Nq) -> (B, Nq, heads*Dh)
    return output.view(batch, heads * head_dim, num_queries).transpose(1, 2).contiguous()


class MultiScaleDeformableAttention(nn.Module):
    """Multi-scale deformable attention, batch-first (mmcv ``MultiScaleDeformableAttention``).

    ``forward(query (B, Nq, C), ...) -> (B, Nq, C)``: every query attends to ``num_points``
    sampled locations per head and level around its reference point, and the result is added
    to ``identity`` (the query before ``query_pos``). Dropout is not used (0 in Mask2Former).
    """

    def __init__(
        self,
        embed_dims: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
    ) -> None:
        super().__init__()
        if embed_dims % num_heads != 0:
            raise ValueError(
                f"embed_dims ({embed_dims}) must be divisible by num_heads ({num_heads})"
            )
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Deformable DETR init: offsets start on a ring of directions, uniform weights."""
        nn.init.zeros_(self.sampling_offsets.weight)
        device = self.sampling_offsets.bias.device
        thetas = torch.arange(self.num_heads, dtype=torch.float32, device=device) * (
            2.0 * math.pi / self.num_heads
        )
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        for i in range(self.num_points):
            grid[:, :, i, :] *= i + 1
        self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        spatial_shapes: Tensor,
        value: Tensor | None = None,
        identity: Tensor | None = None,
        query_pos: Tensor | None = None,
        level_start_index: Tensor | None = None,
    ) -> Tensor:
        """Attend from ``query`` to the multi-level ``value``.

        Args:
            query: (B, Nq, C).
            reference_points: (B or 1, Nq, L, 2), (x, y) normalised to [0, 1].
            spatial_shapes: (L, 2) long, (h, w) per level.
            value: (B, Nv, C), the flattened levels; defaults to ``query``.
            identity: residual, (B, Nq, C); defaults to ``query`` (before ``query_pos``).
            query_pos: positional encoding added to ``query``, broadcastable to (B, Nq, C).
            level_start_index: (L,), unused (kept for signature parity with mmcv).

        Returns:
            (B, Nq, C) = identity + output_proj(attention).
        """
        del level_start_index  # implied by spatial_shapes
        if value is None:
            value = query
        if identity is None:
            identity = query
        if query_pos is not None:
            query = query + query_pos
        batch, num_queries, _ = query.shape
        num_value = value.shape[1]
        heads, levels, points = self.num_heads, self.num_levels, self.num_points

        value = self.value_proj(value).view(batch, num_value, heads, -1)
        offsets = self.sampling_offsets(query).view(batch, num_queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, num_queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, num_queries, heads, levels, points)
        if reference_points.shape[-1] != 2:
            raise ValueError("only 2-d (x, y) reference points are supported")
        # offsets are in pixels of each level: divide by (w, h)
        normalizer = spatial_shapes.flip(-1).to(offsets.dtype)
        locations = (
            reference_points[:, :, None, :, None, :]
            + offsets / normalizer[None, None, None, :, None, :]
        )
        output = ms_deform_attn_core(value, spatial_shapes, locations, weights)
        return identity + self.output_proj(output)

    def extra_repr(self) -> str:
        return (
            f"embed_dims={self.embed_dims}, num_heads={self.num_heads}, "
            f"num_levels={self.num_levels}, num_points={self.num_points}"
        )
