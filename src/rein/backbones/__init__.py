"""Frozen foundation-model backbones with Rein, built from timm models by name.

:func:`build_backbone` creates the timm model named by ``model.backbone.name`` and wraps it by
its class:

===========================================  ===================  ==============================
timm class (module)                          wrapper              Rein
===========================================  ===================  ==============================
``VisionTransformer`` (DINOv2, CLIP, MAE)    :class:`ReinViT`     after every block, patch tokens
``Eva`` (EVA02, DINOv3; RoPE)               :class:`ReinEva`     after every block, patch tokens
``VisionTransformerSAM`` (SAM encoder)       :class:`ReinSAM`     after every block, all tokens
``ConvNeXt``, ``ResNet``                     :class:`ReinConvNet` after every stage (StageReins)
===========================================  ===================  ==============================

ViT-like models get ``patch_size`` / ``img_size`` from the config (EVA also
``dynamic_img_size=True``); ConvNets take neither (their ``patch_size`` is 32) and ignore
``mask_token`` and ``patch_size``/``img_size``.

With ``model.backbone.weights: null`` the frozen model keeps its random init. That init is drawn
from ``model.backbone.init_seed`` under :func:`torch.random.fork_rng` (the global RNG is left
as it was), so a training run, its evaluation and ``rein predict`` all rebuild the same frozen
weights (a checkpoint holds only the trainable ones); the first such build in a process logs
a one-line warning.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
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
    "seeded_init",
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
            f"modules: {', '.join(sorted(_FAMILIES))} (ViT/DINOv2/CLIP/MAE, EVA/DINOv3, "
            f"SAM, ConvNeXt, ResNet)"
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


_log = logging.getLogger("rein")
_warned_random = False


@contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Draw the enclosed random inits from ``seed``; the global RNG state is restored after.

    Seeds the CPU generator, and the current CUDA device's when the default device is CUDA.
    """
    device = torch.get_default_device()
    cuda = device.type == "cuda"
    index = (
        (device.index if device.index is not None else torch.cuda.current_device())
        if cuda
        else None
    )
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.default_generator.manual_seed(int(seed))
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(int(seed))
        yield


def _warn_random_backbone(bcfg) -> None:
    global _warned_random
    if _warned_random:
        return
    _warned_random = True
    _log.warning(
        "warning: model.backbone.weights is null: the frozen backbone %r is randomly "
        "initialised (seed model.backbone.init_seed=%d), not pretrained; set "
        "model.backbone.weights to a weights file or 'timm' for a real foundation model",
        bcfg.name,
        getattr(bcfg, "init_seed", 0),
    )


_UNEXPECTED = re.compile(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'")


def _create(bcfg, family: str) -> nn.Module:
    """The timm model; a keyword timm rejects becomes one line naming it and the model."""
    kwargs = _timm_kwargs(bcfg, family)
    try:
        return create_timm_model(bcfg.name, **kwargs)
    except TypeError as exc:
        user = dict(bcfg.timm_kwargs)
        match = _UNEXPECTED.search(str(exc))
        if match is None:
            raise ValueError(
                f"timm cannot build '{bcfg.name}' with model.backbone.timm_kwargs {user}: {exc}"
            ) from None
        cls_name, key = match.groups()
        where = f"model.backbone.timm_kwargs.{key}" if key in user else f"timm keyword '{key}'"
        valid = _constructor_args(bcfg.name, cls_name)
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(
            f"unknown key {where}: timm model '{bcfg.name}' ({cls_name}) has no argument "
            f"'{key}'{hint}"
        ) from None


def _constructor_args(model_name: str, cls_name: str) -> list[str]:
    """Argument names of class ``cls_name`` in the timm module of ``model_name`` ([] if unknown)."""
    import importlib

    from timm.models import model_entrypoint

    try:
        module = importlib.import_module(model_entrypoint(model_name).__module__)
        cls = getattr(module, cls_name)
        params = inspect.signature(cls.__init__).parameters
    except Exception:
        return []
    return [n for n, p in params.items() if n != "self" and p.kind is not p.VAR_KEYWORD]


def build_backbone(model_cfg, load_weights: bool = True, method=None) -> ReinBackbone:
    """Backbone from a :class:`ModelConfig`, with the tuning method's block adapter (if any).

    ``method`` (a :class:`rein.methods.TuningMethod`) defaults to the one ``model_cfg.tuning``
    names. Its ``adapt`` step (wrapping linears or blocks) runs later, on the loaded weights
    (:func:`rein.methods.apply_tuning`). Without weights (``model.backbone.weights: null``)
    the timm model's random init is drawn from ``model.backbone.init_seed`` (the global RNG is
    untouched); the adapter's init comes from the global RNG (the run's seed) as before.
    """
    from rein.methods import build_method

    if method is None:
        method = build_method(model_cfg.tuning, model_cfg.tuning_options)
    bcfg = model_cfg.backbone
    family = backbone_family(bcfg.name)
    if bcfg.weights:
        timm_model = _create(bcfg, family)  # its init is overwritten by the weights
    else:
        with seeded_init(getattr(bcfg, "init_seed", 0)):
            timm_model = _create(bcfg, family)
        if load_weights and not any(p.is_meta for p in timm_model.parameters()):
            _warn_random_backbone(bcfg)
    backbone = _wrap(timm_model, bcfg)
    if getattr(bcfg, "checkpointing", False):
        if backbone.stage_strides is not None:
            raise ValueError(
                f"model.backbone.checkpointing is for transformer backbones (ViT, EVA, SAM); "
                f"{bcfg.name} is a ConvNet: set it to false"
            )
        backbone.checkpointing = True
    adapter = method.block_adapter(backbone, model_cfg)
    if adapter is not None:
        backbone.reins = adapter
    if load_weights and bcfg.weights:
        load_backbone_weights(backbone, bcfg.weights, model_name=bcfg.name)
    return backbone
