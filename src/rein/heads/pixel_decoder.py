"""Mask2Former pixel decoder: a deformable-attention encoder over the three coarsest
levels, then an FPN step to the finest level (mmdet ``MSDeformAttnPixelDecoder``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ms_deform_attn import MultiScaleDeformableAttention
from .positional_encoding import SinePositionalEncoding


class ConvGN(nn.Module):
    """Conv2d -> GroupNorm -> optional ReLU (mmcv ``ConvModule``; keys ``conv.*``, ``gn.*``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        bias: bool = False,
        num_groups: int = 32,
        relu: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias
        )
        self.gn = nn.GroupNorm(num_groups, out_channels)
        self.act = nn.ReLU(inplace=True) if relu else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.gn(self.conv(x)))


class FFN(nn.Module):
    """Linear -> ReLU -> Linear with an identity shortcut (mmcv ``FFN``, no dropout).

    Keys: ``layers.0.0`` (embed -> hidden) and ``layers.1`` (hidden -> embed).
    """

    def __init__(self, embed_dims: int, feedforward_channels: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(embed_dims, feedforward_channels), nn.ReLU(inplace=True)),
            nn.Linear(feedforward_channels, embed_dims),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.layers(x)


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: MSDeformAttn -> LN -> FFN -> LN. (B, N, C) -> (B, N, C)."""

    def __init__(
        self,
        embed_dims: int = 256,
        num_heads: int = 8,
        num_levels: int = 3,
        num_points: int = 4,
        feedforward_channels: int = 1024,
    ) -> None:
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(
            embed_dims, num_heads, num_levels, num_points
        )
        self.ffn = FFN(embed_dims, feedforward_channels)
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dims) for _ in range(2)])

    def forward(
        self, query: Tensor, query_pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor
    ) -> Tensor:
        query = self.self_attn(
            query,
            reference_points=reference_points,
            spatial_shapes=spatial_shapes,
            value=query,
            query_pos=query_pos,
        )
        query = self.norms[0](query)
        query = self.ffn(query)
        return self.norms[1](query)


class DeformableEncoder(nn.Module):
    """A stack of ``DeformableEncoderLayer`` (key prefix ``layers.{i}``)."""

    def __init__(self, num_layers: int = 6, **layer_kwargs: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [DeformableEncoderLayer(**layer_kwargs) for _ in range(num_layers)]
        )

    def forward(
        self, query: Tensor, query_pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor
    ) -> Tensor:
        for layer in self.layers:
            query = layer(query, query_pos, reference_points, spatial_shapes)
        return query


class MSDeformAttnPixelDecoder(nn.Module):
    """Pixel decoder with multi-scale deformable attention.

    Input: ``feats``, one map per stride in ``strides`` (finest first), each
    ``(B, in_channels[i], H / stride_i, W / stride_i)``.
    Output: ``(mask_features, multi_scale_features)`` with ``mask_features`` of shape
    ``(B, out_channels, H / strides[0], W / strides[0])`` and ``multi_scale_features`` the
    ``num_outs`` encoder outputs ``(B, feat_channels, h, w)``, coarsest first
    (strides 32, 16, 8 by default).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        strides: Sequence[int] = (4, 8, 16, 32),
        feat_channels: int = 256,
        out_channels: int = 256,
        num_outs: int = 3,
        num_encoder_levels: int = 3,
        num_encoder_layers: int = 6,
        num_heads: int = 8,
        num_points: int = 4,
        feedforward_channels: int = 1024,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        if len(in_channels) != len(strides):
            raise ValueError(f"{len(in_channels)} in_channels but {len(strides)} strides")
        if not 1 <= num_encoder_levels <= len(in_channels):
            raise ValueError(f"num_encoder_levels must be in [1, {len(in_channels)}]")
        self.strides = list(strides)
        self.num_input_levels = len(in_channels)
        self.num_encoder_levels = num_encoder_levels
        self.num_outs = num_outs
        # input_convs[i] projects input level (num_input_levels - 1 - i): coarsest first
        self.input_convs = nn.ModuleList(
            [
                ConvGN(in_channels[level], feat_channels, 1, bias=True, num_groups=num_groups)
                for level in self._encoder_input_levels()
            ]
        )
        self.encoder = DeformableEncoder(
            num_layers=num_encoder_layers,
            embed_dims=feat_channels,
            num_heads=num_heads,
            num_levels=num_encoder_levels,
            num_points=num_points,
            feedforward_channels=feedforward_channels,
        )
        self.postional_encoding = SinePositionalEncoding(num_feats=feat_channels // 2)
        self.level_encoding = nn.Embedding(num_encoder_levels, feat_channels)
        # FPN for the finer levels that skip the encoder; index i is input level i
        self.lateral_convs = nn.ModuleList()
        self.output_convs = nn.ModuleList()
        for level in range(self.num_input_levels - num_encoder_levels):
            self.lateral_convs.append(
                ConvGN(in_channels[level], feat_channels, 1, bias=False, num_groups=num_groups)
            )
            self.output_convs.append(
                ConvGN(
                    feat_channels, feat_channels, 3, bias=False, num_groups=num_groups, relu=True
                )
            )
        self.mask_feature = nn.Conv2d(feat_channels, out_channels, kernel_size=1)
        self.init_weights()

    def _encoder_input_levels(self) -> list[int]:
        return [self.num_input_levels - 1 - i for i in range(self.num_encoder_levels)]

    @torch.no_grad()
    def init_weights(self) -> None:
        """mmdet init: xavier (input convs), caffe2-xavier (FPN convs), N(0, 1) level
        encoding, xavier-normal encoder matrices, then each MSDeformAttn's own init."""
        for conv_gn in self.input_convs:
            nn.init.xavier_uniform_(conv_gn.conv.weight, gain=1.0)
            nn.init.zeros_(conv_gn.conv.bias)
        for conv in [m.conv for m in (*self.lateral_convs, *self.output_convs)] + [
            self.mask_feature
        ]:
            nn.init.kaiming_uniform_(conv.weight, a=1, mode="fan_in", nonlinearity="leaky_relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        nn.init.normal_(self.level_encoding.weight, mean=0.0, std=1.0)
        for p in self.encoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
        for m in self.encoder.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.init_weights()

    def forward(self, feats: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """feats: finest first -> (mask_features, [coarsest, ..., finest encoder output])."""
        batch = feats[0].shape[0]
        inputs, positions, references, shapes = [], [], [], []
        for i, level in enumerate(self._encoder_input_levels()):
            feat = feats[level]
            h, w = feat.shape[-2:]
            # (B, Cin, h, w) -> (B, C, h, w) -> (B, h*w, C)
            inputs.append(self.input_convs[i](feat).flatten(2).transpose(1, 2))
            # (1, C, h, w) -> (1, h*w, C); identical for every image of the batch
            pos = self.postional_encoding.for_shape(h, w, device=feat.device)
            pos = self.level_encoding.weight[i].view(1, -1, 1, 1) + pos
            positions.append(pos.flatten(2).transpose(1, 2))
            references.append(self._reference_points(h, w, feat.device))
            shapes.append((h, w))
        query = torch.cat(inputs, dim=1)  # (B, sum h*w, C)
        query_pos = torch.cat(positions, dim=1)  # (1, sum h*w, C)
        # (sum h*w, 2) -> (1, sum h*w, L, 2): valid ratios are 1, so every level shares it
        reference_points = torch.cat(references, dim=0)[None, :, None, :].expand(
            1, -1, self.num_encoder_levels, 2
        )
        spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=query.device)
        memory = self.encoder(query, query_pos, reference_points, spatial_shapes)

        # (B, sum h*w, C) -> per level (B, C, h, w), coarsest first
        memory = memory.transpose(1, 2)
        outs = [
            x.reshape(batch, -1, h, w)
            for x, (h, w) in zip(memory.split([h * w for h, w in shapes], dim=-1), shapes)
        ]
        # FPN: from the finest encoder level down to the finest input level
        for level in range(self.num_input_levels - self.num_encoder_levels - 1, -1, -1):
            lateral = self.lateral_convs[level](feats[level])
            y = lateral + F.interpolate(
                outs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False
            )
            outs.append(self.output_convs[level](y))
        mask_features = self.mask_feature(outs[-1])  # (B, out_channels, H/4, W/4)
        return mask_features, outs[: self.num_outs]

    @staticmethod
    def _reference_points(h: int, w: int, device: torch.device) -> Tensor:
        """Normalised pixel centres of an h x w map, x fastest: (h*w, 2) as (x, y)."""
        xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
        ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
        return torch.stack([xs.repeat(h), ys.repeat_interleave(w)], dim=-1)
