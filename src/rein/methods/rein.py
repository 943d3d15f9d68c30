"""``rein``: Rein after every block of the frozen backbone, its tokens as the head's queries.

The method's math lives in :mod:`rein.reins`; this file only builds it from ``model.rein``:
``Reins`` / ``LoRAReins`` (one token set per block) for ViTs, and a
:class:`~rein.backbones.stage_reins.StageReins` (one single-layer Rein per stage) for ConvNets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import TYPE_CHECKING

from torch import nn

from rein.methods.base import TuningMethod
from rein.reins import LoRAReins, Reins

if TYPE_CHECKING:
    from rein.backbones.stage_reins import StageReins
    from rein.config import ModelConfig, ReinConfig

__all__ = ["ReinMethod", "build_reins", "build_stage_reins"]

#: keys of the two-branch successors (FADA, SET), which no Rein checkpoint has
_TWO_BRANCH_KEYS = (
    "backbone.reins.learnable_tokens2",
    "backbone.reins.learnable_tokens_a2",
    "backbone.reins.learnable_tokens_b2",
    "backbone.reins.mlp_token2feat2.",
    "backbone.reins.mlp_delta_f2.",
    "backbone.reins.wavepool.",
)


def build_reins(
    rein_cfg: ReinConfig, num_layers: int, embed_dims: int, patch_size: int, query_dims: int
) -> Reins:
    """Reins or LoRAReins from a :class:`rein.config.ReinConfig`."""
    kwargs = dict(
        num_layers=num_layers,
        embed_dims=embed_dims,
        patch_size=patch_size,
        query_dims=query_dims,
        token_length=rein_cfg.token_length,
        link_token_to_query=rein_cfg.link_token_to_query,
        scale_init=rein_cfg.scale_init,
        zero_mlp_delta_f=rein_cfg.zero_mlp_delta_f,
        share_mlps=rein_cfg.share_mlps,
    )
    if rein_cfg.lora_dim:
        return LoRAReins(lora_dim=rein_cfg.lora_dim, **kwargs)
    return Reins(**kwargs)


def build_stage_reins(
    rein_cfg: ReinConfig, stage_dims: list[int], strides: tuple[int, ...], query_dims: int
) -> StageReins:
    """A :class:`StageReins` (one single-layer Rein per stage, token init by stage stride)."""
    from rein.backbones.stage_reins import StageReins

    stage_cfg = dataclasses.replace(rein_cfg, link_token_to_query=False)
    stages = [
        build_reins(stage_cfg, num_layers=1, embed_dims=c, patch_size=s, query_dims=query_dims)
        for c, s in zip(stage_dims, strides)
    ]
    return StageReins(
        stages, query_dims=query_dims, link_token_to_query=rein_cfg.link_token_to_query
    )


class ReinMethod(TuningMethod):
    """The foundation model is frozen; Rein (``backbone.reins.*``) and the decode head train."""

    name = "rein"

    def block_adapter(self, backbone: nn.Module, model_cfg: ModelConfig) -> nn.Module:
        query_dims = model_cfg.head.feat_channels
        strides = getattr(backbone, "stage_strides", None)
        if strides is not None:  # hierarchical backbone: one Rein per stage
            return build_stage_reins(model_cfg.rein, backbone.out_channels, strides, query_dims)
        return build_reins(
            model_cfg.rein,
            num_layers=backbone.depth,
            embed_dims=backbone.embed_dim,
            patch_size=backbone.patch_size,
            query_dims=query_dims,
        )

    def supplies_queries(self, backbone: nn.Module) -> bool:
        reins = getattr(backbone, "reins", None)
        return reins is not None and bool(getattr(reins, "link_token_to_query", False))

    def is_trainable(self, name: str) -> bool:
        return name.startswith("backbone.reins.")

    @classmethod
    def claims_official(cls, keys: Collection[str]) -> bool:
        # FADA's official module is also ``backbone.reins.*``: its second token set is not Rein
        keys = list(keys)
        return any(k.startswith("backbone.reins.") for k in keys) and not any(
            k.startswith(_TWO_BRANCH_KEYS) for k in keys
        )
