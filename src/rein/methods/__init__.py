"""Tuning methods, one file each, behind one contract (:class:`TuningMethod`) and a registry.

``model.tuning: NAME`` picks a method and ``model.tuning_options`` its typed options:

=============  ==========================================================================
``rein``       the foundation model is frozen; Rein and the decode head train.
``frozen``     the foundation model is frozen; only the decode head (learned queries) trains.
``full``       everything trains (the backbone leaves eval mode).
``lora``       LoRA (Hugging Face ``peft``) on the frozen ViT's Linear layers ``targets``
               (default ``[qkv]``), rank ``rank`` (16), ``alpha`` (= rank), dropout 0.
``vpt``        deep visual prompt tuning: ``num_prompts`` (10) tokens per block.
``adaptformer`` a parallel bottleneck adapter on every block's MLP (``bottleneck`` 64,
               ``scale`` 0.1).
``soma``       SoMA: rank-16 adapters from the minor SVD components of the ViT's
               qkv / proj / fc1 / fc2 in blocks >= 8 (``rank``, ``start_block``, ``init``).
``recyclelora`` RecycleLoRA: main (minor) + sub (major) adapters from a pivoted QR of every
               qkv / proj / fc1 / fc2 (``r_max`` 36, ``r_main`` 32, ``alpha`` 1).
``fada``       FADA: Rein on a Haar split of the features (low band C/4, high band 3C/4
               with instance norm); ``wavelet_mode`` faithful (official) or fixed.
``set``        SET: Rein on the FFT phase (LoRA tokens) and amplitude (full-rank tokens,
               instance norm) of the features; ``fft_mode`` faithful (official) or per_image.
=============  ==========================================================================

Adding a method is one new file with a :class:`TuningMethod` subclass and a line in
``_BUILTIN`` below (or :func:`register_method` from outside the package).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import nn

from rein.methods.adaptformer import AdaptFormerMethod
from rein.methods.base import NoOptions, TuningMethod, parse_options, strip_merged_wrappers
from rein.methods.fada import FADAMethod
from rein.methods.frozen import FrozenMethod
from rein.methods.full import FullMethod
from rein.methods.lora import LoRAMethod
from rein.methods.recyclelora import RecycleLoRAMethod
from rein.methods.rein import ReinMethod
from rein.methods.set_tokens import SETMethod
from rein.methods.soma import SoMAMethod
from rein.methods.vpt import VPTMethod

__all__ = [
    "TuningMethod",
    "NoOptions",
    "METHODS",
    "check_checkpoint_method",
    "method_names",
    "register_method",
    "build_method",
    "resolve_tuning_options",
    "apply_tuning",
    "merge_model",
    "plain_backbone_state",
]

_BUILTIN: tuple[type[TuningMethod], ...] = (
    ReinMethod,
    FrozenMethod,
    FullMethod,
    LoRAMethod,
    VPTMethod,
    AdaptFormerMethod,
    SoMAMethod,
    RecycleLoRAMethod,
    FADAMethod,
    SETMethod,
)
METHODS: dict[str, type[TuningMethod]] = {cls.name: cls for cls in _BUILTIN}


def method_names() -> tuple[str, ...]:
    """Names of the registered methods, in registration order."""
    return tuple(METHODS)


def register_method(cls: type[TuningMethod]) -> type[TuningMethod]:
    """Register a :class:`TuningMethod` subclass under ``cls.name`` (usable as a decorator)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"a tuning method named '{cls.name}' is already registered")
    METHODS[cls.name] = cls
    return cls


def build_method(name: str, options: Mapping[str, Any] | None = None) -> TuningMethod:
    """The method ``name`` with its options (a mapping, validated against its dataclass)."""
    if name not in METHODS:
        raise ValueError(f"unknown tuning method '{name}'; choose one of {method_names()}")
    cls = METHODS[name]
    return cls(parse_options(name, cls.Options, options))


def resolve_tuning_options(name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The method's options with defaults filled in, as a plain dict."""
    return dataclasses.asdict(build_method(name, options).options)


def apply_tuning(
    model: nn.Module, method: str | TuningMethod, options: Mapping[str, Any] | None = None
) -> TuningMethod:
    """Apply a tuning method to a :class:`~rein.segmentor.Segmentor` (weights already loaded).

    Adapts the backbone (:meth:`TuningMethod.adapt`), then sets ``requires_grad`` (the method's
    parameters and the decode head) and the train/eval policy. Returns the method, which the
    model keeps as ``model.method``.

    Raises:
        ValueError: unknown method or option, a bad option value, a block adapter that the
            method does not expect, or a backbone that is already adapted.
    """
    if isinstance(method, str):
        method = build_method(method, options)
    backbone = model.backbone  # type: ignore[attr-defined]
    reins = getattr(backbone, "reins", None)
    expects_adapter = type(method).block_adapter is not TuningMethod.block_adapter
    if expects_adapter and reins is None:
        raise ValueError(f"tuning '{method.name}' needs a backbone built with its block adapter")
    if not expects_adapter and reins is not None and method.frozen_backbone:
        raise ValueError(
            f"tuning '{method.name}' runs on the plain frozen backbone, but this one has Rein; "
            "build it with model.tuning set to the method"
        )
    previous = getattr(model, "method", None)
    adapted = sorted(
        {g for n, _ in model.named_parameters() if previous and (g := previous.report_group(n))}
    )
    if adapted:
        raise ValueError(f"the backbone already has {'/'.join(adapted)} parameters")
    method.adapt(backbone)
    if method.frozen_backbone:
        backbone.freeze()
    else:
        backbone.frozen = False
    for name, p in backbone.named_parameters(prefix="backbone"):
        p.requires_grad_(method.is_trainable(name))
    backbone.train(backbone.training)  # re-apply eval mode to the frozen model and new modules
    for p in model.decode_head.parameters():  # type: ignore[attr-defined]
        p.requires_grad_(True)
    model.method = method
    return method


def merge_model(model: nn.Module) -> None:
    """Fold the model's weight-space adapter into the frozen weights and drop the wrappers, so
    the backbone is a plain timm model again (inference costs nothing extra). Idempotent.

    Raises:
        ValueError: the method is not a weight-space adapter (Rein, VPT, AdaptFormer, ...).
    """
    method = getattr(model, "method", None)
    if method is None or not method.merge(model):
        name = getattr(method, "name", "?")
        mergeable = ", ".join(n for n, c in METHODS.items() if c.merge is not TuningMethod.merge)
        raise ValueError(
            f"tuning '{name}' cannot be merged into the backbone weights (it is not a "
            f"weight-space adapter); methods that merge: {mergeable}"
        )
    strip_merged_wrappers(model.backbone.timm_model)  # type: ignore[attr-defined]


def plain_backbone_state(model: nn.Module) -> dict[str, Any]:
    """The backbone's weights in the timm layout (+ ``mask_token``), loadable as
    ``model.backbone.weights`` of any config with the same backbone."""
    backbone = model.backbone  # type: ignore[attr-defined]
    state = {k: v.detach().contiguous() for k, v in backbone.timm_model.state_dict().items()}
    if hasattr(backbone, "mask_token"):
        state["mask_token"] = backbone.mask_token.detach().contiguous()
    return state


def check_checkpoint_method(meta: Mapping[str, Any], model_cfg: Any, src: str) -> None:
    """Raise :class:`rein.engine.checkpoint.CheckpointError` when a checkpoint was written for
    another tuning method, or with method options that change what its weights mean (a rank, a
    SoMA init), than ``model_cfg``. Checkpoints without a recorded config pass."""
    from rein.engine.checkpoint import CheckpointError

    saved = (meta.get("config") or {}).get("model") if isinstance(meta, Mapping) else None
    if not isinstance(saved, Mapping):
        return
    tuning = saved.get("tuning", "rein")
    if tuning != model_cfg.tuning:
        raise CheckpointError(
            f"{src} holds a model.tuning: {tuning} checkpoint but the config has "
            f"model.tuning: {model_cfg.tuning}; use the config it was written with"
        )
    if tuning not in METHODS:
        return
    try:
        theirs = build_method(tuning, saved.get("tuning_options")).weight_options()
    except ValueError:  # options of an older version: the key / shape checks still apply
        return
    ours = build_method(model_cfg.tuning, model_cfg.tuning_options).weight_options()
    for key, value in theirs.items():
        if ours.get(key) != value:
            shown = value if not isinstance(value, list) else "[" + ",".join(map(str, value)) + "]"
            raise CheckpointError(
                f"{src} was written with model.tuning_options.{key}: {value} ({tuning}) but the "
                f"config has {ours.get(key)}; add --set model.tuning_options.{key}={shown} or "
                "use the config it was written with"
            )
