"""Frozen foundation-model backbones with Rein."""

from __future__ import annotations

from rein.backbones.vit import ReinViT, create_timm_vit, default_out_indices
from rein.backbones.weights import WeightsError, load_backbone_weights
from rein.reins import LoRAReins, Reins

__all__ = ["ReinViT", "build_backbone", "build_reins", "default_out_indices", "WeightsError"]


def build_reins(rein_cfg, num_layers: int, embed_dims: int, patch_size: int, query_dims: int) -> Reins:
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


def build_backbone(model_cfg, load_weights: bool = True) -> ReinViT:
    """Backbone (+ Rein when ``model_cfg.tuning == 'rein'``) from a :class:`ModelConfig`."""
    bcfg = model_cfg.backbone
    kwargs = dict(bcfg.timm_kwargs)
    if bcfg.patch_size is not None:
        kwargs.setdefault("patch_size", bcfg.patch_size)
    kwargs.setdefault("img_size", bcfg.img_size)
    vit = create_timm_vit(bcfg.name, **kwargs)
    backbone = ReinViT(vit, None, out_indices=bcfg.out_indices, mask_token=bcfg.mask_token)
    if model_cfg.tuning == "rein":
        backbone.reins = build_reins(
            model_cfg.rein,
            num_layers=backbone.depth,
            embed_dims=backbone.embed_dim,
            patch_size=backbone.patch_size,
            query_dims=model_cfg.head.feat_channels,
        )
    if load_weights and bcfg.weights:
        load_backbone_weights(backbone, bcfg.weights, model_name=bcfg.name)
    return backbone
