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

from typing import Any

from torch import nn

from rein.backbones.base import ReinBackbone, check_timm_name, create_timm_model
from rein.backbones.convnet import ReinConvNet
from rein.backbones.eva import ReinEva
from rein.backbones.sam import ReinSAM
from rein.backbones.stage_reins import StageReins
from rein.backbones.vit import ReinViT, default_out_indices
from rein.backbones.weights import WeightsError, load_backbone_weights

__all__ = [
    "ReinBackbone",
    "ReinViT",
    "ReinEva",
    "ReinSAM",
    "ReinConvNet",
    "StageReins",
    "build_backbone",
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


def build_backbone(model_cfg, load_weights: bool = True, method=None) -> ReinBackbone:
    """Backbone from a :class:`ModelConfig`, with the tuning method's block adapter (if any).

    ``method`` (a :class:`rein.methods.TuningMethod`) defaults to the one ``model_cfg.tuning``
    names. Its ``adapt`` step (wrapping linears or blocks) runs later, on the loaded weights
    (:func:`rein.methods.apply_tuning`).
    """
    from rein.methods import build_method

    if method is None:
        method = build_method(model_cfg.tuning, model_cfg.tuning_options)
    bcfg = model_cfg.backbone
    family = backbone_family(bcfg.name)
    backbone = _wrap(create_timm_model(bcfg.name, **_timm_kwargs(bcfg, family)), bcfg)
    adapter = method.block_adapter(backbone, model_cfg)
    if adapter is not None:
        backbone.reins = adapter
    if load_weights and bcfg.weights:
        load_backbone_weights(backbone, bcfg.weights, model_name=bcfg.name)
    return backbone
