"""Mask2Former head (masked-attention transformer decoder), optionally fed by Rein queries.

Follows mmdet 3.x ``Mask2FormerHead`` as wrapped by mmseg and by the official Rein
``ReinMask2FormerHead``; state-dict keys match the official ``decode_head.*`` layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .pixel_decoder import FFN, MSDeformAttnPixelDecoder
from .positional_encoding import SinePositionalEncoding

QuerySource = Literal["rein", "learned"]


class MultiheadAttentionBlock(nn.Module):
    """``nn.MultiheadAttention`` (batch first) with positional encodings and a residual,
    like mmcv's ``MultiheadAttention`` wrapper (key prefix ``attn.``).

    ``forward(query (B, Nq, C), key (B, Nk, C), value (B, Nk, C)) -> (B, Nq, C)``.
    """

    def __init__(self, embed_dims: int = 256, num_heads: int = 8) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dims, num_heads, batch_first=True)

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        query_pos: Tensor | None = None,
        key_pos: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """Cross-attention when ``key`` is given (``value`` defaults to ``key``);
        self-attention when ``key`` is None (key = query + query_pos, value = query)."""
        identity = query
        if query_pos is not None:
            query = query + query_pos
        if key is None:
            key, value = query, identity
        else:
            if value is None:
                value = key
            if key_pos is not None:
                key = key + key_pos
        # need_weights=False: the fused scaled-dot-product kernel, without materialising the
        # head-averaged attention weights that the reference (mmcv calls
        # nn.MultiheadAttention with its defaults) computes and throws away. Equal to that
        # explicit softmax(QK^T + mask) V path up to float rounding.
        out = self.attn(query, key, value, attn_mask=attn_mask, need_weights=False)[0]
        return identity + out


class Mask2FormerDecoderLayer(nn.Module):
    """Masked cross-attention -> LN -> self-attention -> LN -> FFN -> LN (post-norm).

    ``forward(query (B, Q, C), query_pos (B, Q, C), memory (B, hw, C),
    memory_pos (1 or B, hw, C), attn_mask (B*heads, Q, hw) bool, True = masked)
    -> (B, Q, C)``.
    """

    def __init__(
        self, embed_dims: int = 256, num_heads: int = 8, feedforward_channels: int = 2048
    ) -> None:
        super().__init__()
        self.self_attn = MultiheadAttentionBlock(embed_dims, num_heads)
        self.cross_attn = MultiheadAttentionBlock(embed_dims, num_heads)
        self.ffn = FFN(embed_dims, feedforward_channels)
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dims) for _ in range(3)])

    def forward(
        self,
        query: Tensor,
        query_pos: Tensor,
        memory: Tensor,
        memory_pos: Tensor,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        query = self.cross_attn(
            query, memory, memory, query_pos=query_pos, key_pos=memory_pos, attn_mask=attn_mask
        )
        query = self.norms[0](query)
        query = self.self_attn(query, query_pos=query_pos)
        query = self.norms[1](query)
        query = self.ffn(query)
        return self.norms[2](query)


class Mask2FormerTransformerDecoder(nn.Module):
    """``num_layers`` decoder layers plus the shared ``post_norm`` of the prediction heads."""

    def __init__(
        self,
        num_layers: int = 9,
        embed_dims: int = 256,
        num_heads: int = 8,
        feedforward_channels: int = 2048,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [
                Mask2FormerDecoderLayer(embed_dims, num_heads, feedforward_channels)
                for _ in range(num_layers)
            ]
        )
        self.post_norm = nn.LayerNorm(embed_dims)


class Mask2FormerHead(nn.Module):
    """Mask2Former decode head: pixel decoder + masked-attention transformer decoder.

    ``forward(feats, queries=None) -> (cls_preds, mask_preds)``:

    * ``feats``: 4 maps ``(B, in_channels[i], H / s, W / s)`` for strides 4, 8, 16, 32.
    * ``queries``: with ``query_source="rein"``, the Rein-link queries ``(Q, C)`` or
      ``(B, Q, C)`` (positional query = queries, content query = ``querys2feat(queries)``);
      must be None with ``query_source="learned"`` (``query_embed`` / ``query_feat``).
    * ``cls_preds``: ``num_decoder_layers + 1`` tensors ``(B, Q, num_classes + 1)``, the last
      class being "no object".
    * ``mask_preds``: as many tensors ``(B, Q, H / 4, W / 4)`` of mask logits.

    The last pair is the final prediction; ``predict_seg`` turns it into per-class scores.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int = 19,
        feat_channels: int = 256,
        out_channels: int = 256,
        num_queries: int = 100,
        num_transformer_feat_level: int = 3,
        num_decoder_layers: int = 9,
        num_heads: int = 8,
        feedforward_channels: int = 2048,
        query_source: QuerySource = "rein",
        strides: Sequence[int] = (4, 8, 16, 32),
        num_encoder_layers: int = 6,
        encoder_feedforward_channels: int = 1024,
        num_groups: int = 32,
        num_points: int = 4,
    ) -> None:
        super().__init__()
        if query_source not in ("rein", "learned"):
            raise ValueError(f"query_source must be 'rein' or 'learned', got {query_source!r}")
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.num_transformer_feat_level = num_transformer_feat_level
        self.num_heads = num_heads
        self.query_source = query_source
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            in_channels,
            strides=strides,
            feat_channels=feat_channels,
            out_channels=out_channels,
            num_outs=num_transformer_feat_level,
            num_encoder_levels=num_transformer_feat_level,
            num_encoder_layers=num_encoder_layers,
            num_heads=num_heads,
            num_points=num_points,
            feedforward_channels=encoder_feedforward_channels,
            num_groups=num_groups,
        )
        self.transformer_decoder = Mask2FormerTransformerDecoder(
            num_decoder_layers, feat_channels, num_heads, feedforward_channels
        )
        # the decoder input projections of mmdet are Identity (feat_channels == embed dims)
        self.decoder_positional_encoding = SinePositionalEncoding(num_feats=feat_channels // 2)
        if query_source == "learned":
            self.query_embed = nn.Embedding(num_queries, feat_channels)
            self.query_feat = nn.Embedding(num_queries, feat_channels)
        self.level_embed = nn.Embedding(num_transformer_feat_level, feat_channels)
        self.cls_embed = nn.Linear(feat_channels, num_classes + 1)
        self.mask_embed = nn.Sequential(
            nn.Linear(feat_channels, feat_channels),
            nn.ReLU(inplace=True),
            nn.Linear(feat_channels, feat_channels),
            nn.ReLU(inplace=True),
            nn.Linear(feat_channels, out_channels),
        )
        if query_source == "rein":
            self.querys2feat = nn.Linear(feat_channels, feat_channels)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """mmdet init: the pixel decoder's own scheme, xavier-normal decoder matrices.
        Embeddings and the class / mask / query linears keep PyTorch's default init."""
        self.pixel_decoder.init_weights()
        for p in self.transformer_decoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)

    def forward(
        self, feats: Sequence[Tensor], queries: Tensor | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """feats: 4 maps, strides 4/8/16/32 -> (cls_preds, mask_preds), one per stage."""
        batch = feats[0].shape[0]
        # mask_features: (B, C, H/4, W/4); multi_scale: (B, C, h, w), strides 32, 16, 8
        mask_features, multi_scale = self.pixel_decoder(feats)
        memories, memory_pos = [], []
        for i, feat in enumerate(multi_scale):
            # (B, C, h, w) -> (B, h*w, C)
            memories.append(
                feat.flatten(2).transpose(1, 2) + self.level_embed.weight[i].view(1, 1, -1)
            )
            # (1, C, h, w) -> (1, h*w, C), broadcast over the batch
            pos = self.decoder_positional_encoding.for_shape(*feat.shape[-2:], device=feat.device)
            memory_pos.append(pos.flatten(2).transpose(1, 2))
        query_feat, query_embed = self._initial_queries(batch, queries)  # (B, Q, C) each

        cls_pred, mask_pred, attn_mask = self._forward_head(
            query_feat, mask_features, multi_scale[0].shape[-2:]
        )
        cls_preds, mask_preds = [cls_pred], [mask_pred]
        num_levels = self.num_transformer_feat_level
        for i, layer in enumerate(self.transformer_decoder.layers):
            level = i % num_levels
            # a query whose mask covers nothing attends everywhere instead
            attn_mask = attn_mask & ~attn_mask.all(-1, keepdim=True)
            # (B, Q, hw) -> (B*heads, Q, hw), the layout nn.MultiheadAttention expects
            attn_mask = attn_mask.unsqueeze(1).expand(-1, self.num_heads, -1, -1).flatten(0, 1)
            query_feat = layer(
                query_feat, query_embed, memories[level], memory_pos[level], attn_mask
            )
            cls_pred, mask_pred, attn_mask = self._forward_head(
                query_feat, mask_features, multi_scale[(i + 1) % num_levels].shape[-2:]
            )
            cls_preds.append(cls_pred)
            mask_preds.append(mask_pred)
        return cls_preds, mask_preds

    def _initial_queries(self, batch: int, queries: Tensor | None) -> tuple[Tensor, Tensor]:
        """-> (content query, positional query), each (B, Q, C)."""
        if self.query_source == "learned":
            if queries is not None:
                raise ValueError("this head learns its own queries; do not pass queries")
            query_feat = self.query_feat.weight.unsqueeze(0).expand(batch, -1, -1)
            query_embed = self.query_embed.weight.unsqueeze(0).expand(batch, -1, -1)
            return query_feat, query_embed
        if queries is None:
            raise ValueError("query_source='rein' needs the Rein-link queries, (Q, C) or (B, Q, C)")
        if queries.dim() == 2:
            queries = queries.expand(batch, -1, -1)
        elif queries.dim() != 3 or queries.shape[0] != batch:
            raise ValueError(
                f"queries must be (Q, C) or ({batch}, Q, C), got {tuple(queries.shape)}"
            )
        return self.querys2feat(queries), queries

    def _forward_head(
        self, decoder_out: Tensor, mask_features: Tensor, attn_mask_size: Sequence[int]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(B, Q, C) queries -> class logits (B, Q, K+1), mask logits (B, Q, H/4, W/4) and the
        next attention mask (B, Q, h*w) bool at ``attn_mask_size`` (True = masked)."""
        decoder_out = self.transformer_decoder.post_norm(decoder_out)
        cls_pred = self.cls_embed(decoder_out)
        mask_embed = self.mask_embed(decoder_out)
        mask_pred = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
        attn_mask = F.interpolate(
            mask_pred, tuple(attn_mask_size), mode="bilinear", align_corners=False
        )
        attn_mask = (attn_mask.flatten(2).sigmoid() < 0.5).detach()
        return cls_pred, mask_pred, attn_mask

    @staticmethod
    def predict_seg(cls_pred: Tensor, mask_pred: Tensor, size: Sequence[int]) -> Tensor:
        """Semantic scores (B, num_classes, *size) from one stage's predictions.

        ``cls_pred`` (B, Q, K+1) and ``mask_pred`` (B, Q, h, w): the masks are upsampled
        bilinearly to ``size``; the result sums class probabilities times mask probabilities
        over the queries (not logits), the "no object" class dropped.
        """
        mask_pred = F.interpolate(mask_pred, size=tuple(size), mode="bilinear", align_corners=False)
        cls_score = F.softmax(cls_pred, dim=-1)[..., :-1]
        return torch.einsum("bqc,bqhw->bchw", cls_score, mask_pred.sigmoid())
