"""Frozen foundation-model backbones with Rein, built from timm models by name.

:func:`build_backbone` creates the timm model named by ``model.backbone.name`` and wraps it by
its class:

===========================================  ===================  ==============================
timm class (module)                          wrapper              Rein
===========================================  ===================  ==============================
``VisionTransformer`` (DINOv2, CLIP, MAE)    :class:`ReinViT`     after every block, patch tokens
``Eva`` (EVA02, RoPE)                        :class:`ReinEva`     after every block, patch tokens
``VisionTransformerSAM`` (SAM encoder)       :class:`ReinSAM`     after every block, all tokens
``ConvNeXt``, ``ResNet``                     :class:`ReinConvNet` after every stage (StageReins)
===========================================  ===================  ==============================

ViT-like models get ``patch_size`` / ``img_size`` from the config (EVA also
``dynamic_img_size=True``); ConvNets take neither (their ``patch_size`` is 32) and ignore
``mask_token`` and ``patch_size``/``img_size``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from rein.backbones.base import ReinBackbone, check_timm_name, create_timm_model
from rein.backbones.convnet import STAGE_STRIDES, ReinConvNet
from rein.backbones.eva import ReinEva
from rein.backbones.sam import ReinSAM
from rein.backbones.stage_reins import StageReins
from rein.backbones.vit import ReinViT, default_out_indices
from rein.backbones.weights import WeightsError, load_backbone_weights
from rein.reins import LoRAReins, Reins

__all__ = [
    "ReinBackbone",
    "ReinViT",
    "ReinEva",
    "ReinSAM",
    "ReinConvNet",
    "StageReins",
    "build_backbone",
    "build_reins",
    "build_stage_reins",
    "backbone_family",
    "default_out_indices",
    "WeightsError",
]

# timm module of a model name -> family (decides the constructor arguments).
_FAMILIES = {
    "vision_transformer": "vit",
    "eva": "eva",
    "vision_transformer_sam": "sam",
    "convnext": "convnet",
    "resnet": "convnet",
}


def backbone_family(name: str) -> str:
    """``vit``, ``eva``, ``sam`` or ``convnet`` for a timm model name (tags allowed)."""
    from timm.models import model_entrypoint

    check_timm_name(name)
    module = model_entrypoint(name).__module__.rsplit(".", 1)[-1]
    if module not in _FAMILIES:
        raise ValueError(
            f"backbone '{name}' (timm module '{module}') is not supported; supported timm "
            f"modules: {', '.join(sorted(_FAMILIES))} (ViT/DINOv2/CLIP/MAE, EVA, SAM, "
            f"ConvNeXt, ResNet)"
        )
    return _FAMILIES[module]


def build_reins(
    rein_cfg, num_layers: int, embed_dims: int, patch_size: int, query_dims: int
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
    rein_cfg, stage_dims: list[int], strides: tuple[int, ...], query_dims: int
) -> StageReins:
    """A :class:`StageReins` (one single-layer Rein per stage, token init by stage stride)."""
    stage_cfg = dataclasses.replace(rein_cfg, link_token_to_query=False)
    stages = [
        build_reins(stage_cfg, num_layers=1, embed_dims=c, patch_size=s, query_dims=query_dims)
        for c, s in zip(stage_dims, strides)
    ]
    return StageReins(
        stages, query_dims=query_dims, link_token_to_query=rein_cfg.link_token_to_query
    )


def _timm_kwargs(bcfg, family: str) -> dict[str, Any]:
    kwargs = dict(bcfg.timm_kwargs)
    if family == "convnet":
        return kwargs
    if bcfg.patch_size is not None:
        kwargs.setdefault("patch_size", bcfg.patch_size)
    kwargs.setdefault("img_size", bcfg.img_size)
    if family == "eva":
        kwargs.setdefault("dynamic_img_size", True)
    return kwargs


def _wrap(model: nn.Module, bcfg) -> ReinBackbone:
    """The wrapper for a timm model, chosen by its class."""
    from timm.models.convnext import ConvNeXt
    from timm.models.eva import Eva
    from timm.models.resnet import ResNet
    from timm.models.vision_transformer import VisionTransformer
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    if isinstance(model, VisionTransformer):
        return ReinViT(model, None, out_indices=bcfg.out_indices, mask_token=bcfg.mask_token)
    if isinstance(model, Eva):
        return ReinEva(model, None, out_indices=bcfg.out_indices)
    if isinstance(model, VisionTransformerSAM):
        return ReinSAM(model, None, out_indices=bcfg.out_indices)
    if isinstance(model, ConvNeXt | ResNet):
        if bcfg.out_indices not in (None, [0, 1, 2, 3]):
            raise ValueError(
                f"a ConvNet backbone returns its 4 stages; out_indices must be null or "
                f"[0, 1, 2, 3], got {bcfg.out_indices}"
            )
        return ReinConvNet(model, None)
    raise ValueError(f"backbone '{bcfg.name}' ({type(model).__name__}) is not supported")


def build_backbone(model_cfg, load_weights: bool = True) -> ReinBackbone:
    """Backbone (+ Rein when ``model_cfg.tuning == 'rein'``) from a :class:`ModelConfig`."""
    bcfg = model_cfg.backbone
    family = backbone_family(bcfg.name)
    backbone = _wrap(create_timm_model(bcfg.name, **_timm_kwargs(bcfg, family)), bcfg)
    if model_cfg.tuning == "rein":
        query_dims = model_cfg.head.feat_channels
        if isinstance(backbone, ReinConvNet):
            backbone.reins = build_stage_reins(
                model_cfg.rein, backbone.out_channels, STAGE_STRIDES, query_dims
            )
        else:
            backbone.reins = build_reins(
                model_cfg.rein,
                num_layers=backbone.depth,
                embed_dims=backbone.embed_dim,
                patch_size=backbone.patch_size,
                query_dims=query_dims,
            )
    if load_weights and bcfg.weights:
        load_backbone_weights(backbone, bcfg.weights, model_name=bcfg.name)
    return backbone
