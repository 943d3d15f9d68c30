"""The tuning-method contract: what a method may do to a backbone, the head and the optimizer.

A method is a small object built from its typed options (a dataclass, ``Options``). Given the
:class:`~rein.backbones.base.ReinBackbone` around an unmodified timm model, it:

* :meth:`TuningMethod.block_adapter` — supplies the module run after every block (the
  backbone's ``reins`` slot, e.g. Rein), or ``None``;
* :meth:`TuningMethod.adapt` — wraps linears or blocks of the loaded timm model (the peft way:
  the wrapped module moves one level down as ``base_layer``);
* :meth:`TuningMethod.is_trainable` — decides which backbone parameters train (everything else
  is frozen, the timm model stays in eval mode unless :attr:`TuningMethod.frozen_backbone` is
  False); the decode head always trains;
* :meth:`TuningMethod.supplies_queries` — whether the head takes its queries from the
  backbone (Rein-link) instead of learning them;
* :meth:`TuningMethod.param_groups` — the AdamW groups (lr multipliers, decay rules);
* :meth:`TuningMethod.report_group` — the group a parameter is reported under by ``rein params``;
* :meth:`TuningMethod.merge` — folds a weight-space adapter into the frozen weights, once.

No backbone wrapper and no engine code names a method; the registry (``rein.methods``) maps
``model.tuning`` to a class.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Collection, Container, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

if TYPE_CHECKING:
    from rein.config import ModelConfig, OptimConfig

__all__ = [
    "NoOptions",
    "TuningMethod",
    "BaseLayerWrapper",
    "adapted_blocks",
    "parse_options",
    "positive_int",
    "boolean",
    "finite_number",
    "linear_targets",
    "reference_param",
    "require_unmerged",
    "strip_merged_wrappers",
]


@dataclasses.dataclass
class NoOptions:
    """A method without options."""


def parse_options(method: str, cls: type, options: Mapping[str, Any] | None) -> Any:
    """``cls(**options)`` with unknown keys named (and the nearest allowed one suggested)."""
    options = dict(options or {})
    names = [f.name for f in dataclasses.fields(cls)]
    for key in options:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            allowed = ", ".join(names) if names else "none"
            raise ValueError(
                f"unknown option '{key}' for tuning '{method}'; allowed options: {allowed}{hint}"
            )
    out = cls(**options)
    check = getattr(out, "validate", None)
    if check is not None:
        check(method)
    return out


def positive_int(method: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"tuning '{method}': option '{key}' must be a positive integer, got {value!r}"
        )
    return value


def boolean(method: str, key: str, value: Any) -> bool:
    """``value`` when it is a bool, else a one-line ValueError naming the option."""
    if not isinstance(value, bool):
        raise ValueError(f"tuning '{method}': option '{key}' must be true or false, got {value!r}")
    return value


def finite_number(method: str, key: str, value: Any, positive: bool = False) -> float:
    import math

    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"tuning '{method}': option '{key}' must be a number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"tuning '{method}': option '{key}' must be > 0, got {value!r}")
    return float(value)


def linear_targets(method: str, value: Any) -> list[str]:
    """Option ``targets``: Linear layer names (a name or a non-empty list), duplicates dropped."""
    items = [value] if isinstance(value, str) else value
    if (
        not isinstance(items, list | tuple)
        or not items
        or not all(isinstance(t, str) and t for t in items)
    ):
        raise ValueError(
            f"tuning '{method}': option 'targets' must be a non-empty list of Linear layer "
            f"names such as [qkv, proj, fc1, fc2], got {value!r}"
        )
    return list(dict.fromkeys(items))  # keep the order


class TuningMethod:
    """Base class of every tuning method; the defaults describe a frozen backbone."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    #: False: every backbone weight trains and the timm model follows train()/eval().
    frozen_backbone: ClassVar[bool] = True

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    # -- construction -------------------------------------------------------------------------
    def block_adapter(self, backbone: nn.Module, model_cfg: ModelConfig) -> nn.Module | None:
        """The module the backbone runs after every block (its ``reins`` slot), or None."""
        return None

    def adapt(self, backbone: nn.Module) -> None:
        """Wrap modules of the loaded (pretrained) timm model; called once, after loading."""

    def supplies_queries(self, backbone: nn.Module) -> bool:
        """Whether the backbone returns the head's object queries (Rein-link)."""
        return False

    def is_trainable(self, name: str) -> bool:
        """Whether backbone parameter ``name`` (``backbone.``-prefixed) trains."""
        return False

    def report_group(self, name: str) -> str | None:
        """Reporting group of a backbone parameter this method added (e.g. ``lora``), else None."""
        return None

    def is_method_param(self, name: str) -> bool:
        """A backbone parameter that belongs to the method, not to the foundation model."""
        return self.report_group(name) is not None

    # -- training -----------------------------------------------------------------------------
    def param_groups(self, model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
        """AdamW groups: the official Rein rules (see :func:`rein.engine.optim.build_param_groups`)."""
        from rein.engine.optim import build_param_groups

        return build_param_groups(
            model, cfg.weight_decay, cfg.lr, cfg.backbone_lr_mult, is_method=self.is_method_param
        )

    # -- inference ----------------------------------------------------------------------------
    def merge(self, model: nn.Module) -> bool:
        """Fold the method into the frozen weights; False when it cannot be merged."""
        return False

    # -- checkpoints --------------------------------------------------------------------------
    #: options that only steer training (lr multipliers, where the init runs): a checkpoint
    #: trained with other values still fits the model; every other option shapes the weights.
    training_only_options: ClassVar[tuple[str, ...]] = ()

    def weight_options(self) -> dict[str, Any]:
        """The options that decide what the weights mean (see ``training_only_options``)."""
        if not dataclasses.is_dataclass(self.options):
            return {}
        return {
            f.name: getattr(self.options, f.name)
            for f in dataclasses.fields(self.options)
            if f.name not in self.training_only_options
        }

    # -- official checkpoints (see rein.interop) ------------------------------------------------
    #: whether the official code saves the whole model (SoMA, RecycleLoRA) or only the
    #: trainable weights (Rein); an export of the whole model needs the real frozen weights.
    official_saves_whole_model: ClassVar[bool] = False

    @classmethod
    def claims_official(cls, keys: Collection[str]) -> bool:
        """Whether an official state dict with these keys was written by this method's code."""
        return False

    def official_to_ours(
        self, state: Mapping[str, Tensor], model_keys: Container[str]
    ) -> dict[str, Tensor]:
        """Our names for an official state dict (default: Rein's mmseg layout)."""
        from rein.interop import official_to_ours

        return official_to_ours(state)

    def ours_to_official(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The official names of our state dict (default: Rein's mmseg layout)."""
        from rein.interop import ours_to_official

        return ours_to_official(state)

    def official_export(self, model: nn.Module) -> dict[str, Tensor]:
        """What the official code saves: the trainable weights, or the whole (unmerged) model
        when ``official_saves_whole_model``."""
        from rein.engine.checkpoint import trainable_state_dict

        if not self.official_saves_whole_model:
            return self.ours_to_official(trainable_state_dict(model))
        require_unmerged(model, "exported in the official layout")
        state = {k: v for k, v in model.state_dict().items() if k.startswith(_MODEL_PREFIXES)}
        return self.ours_to_official(state)

    def check_official(
        self, state: Mapping[str, Tensor], model_state: Mapping[str, Tensor], src: str
    ) -> None:
        """Raise :class:`rein.interop.InteropError` when a converted official state dict was
        written with other method options (e.g. another rank); shapes are checked later."""

    def prepare_official_load(self, model: nn.Module, state: Mapping[str, Tensor]) -> None:
        """Adjust the model before ``state`` (our names, already checked) is copied in."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"


class BaseLayerWrapper(nn.Module):
    """A module wrapping a frozen ``base_layer``; unknown attributes fall through to it."""

    base_layer: nn.Module

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)


_MODEL_PREFIXES = ("backbone.", "decode_head.")


def require_unmerged(model: nn.Module, what: str) -> None:
    """Raise :class:`rein.interop.InteropError` when an adapter of ``model`` is merged: its
    weights then hold ``W_res + s * B @ A``, which no official layout stores."""
    from rein.interop import InteropError

    merged = [n for n, m in model.named_modules() if getattr(m, "merged", False)]
    if merged:
        raise InteropError(
            f"the model's adapters are merged ({merged[0]}, ...) and cannot be {what}; "
            "use the unmerged model (a checkpoint as training wrote it)"
        )


def reference_param(module: nn.Module) -> Tensor:
    """A parameter of ``module`` giving the device and dtype for new adapter weights."""
    return next(module.parameters())


def adapted_blocks(backbone: nn.Module, method: str) -> tuple[nn.Module, range]:
    """The transformer blocks of the backbone's timm model and the indices of those that run.

    Blocks after the last output block never run, so they are not adapted.
    """
    blocks = getattr(getattr(backbone, "vit", None), "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList):
        raise ValueError(
            f"tuning '{method}' adapts transformer blocks (timm ViT / EVA / SAM backbones); "
            f"{type(backbone).__name__} has none: use rein, frozen or full"
        )
    last = getattr(backbone, "last_index", len(blocks) - 1)
    return blocks, range(last + 1)


def strip_merged_wrappers(root: nn.Module) -> int:
    """Replace every merged wrapper under ``root`` (a module with ``base_layer`` and a true
    ``merged`` flag, ours or peft's) by its ``base_layer``; returns how many were replaced."""
    replaced = 0
    for module in list(root.modules()):
        for name, child in list(module.named_children()):
            if isinstance(getattr(child, "base_layer", None), nn.Module) and getattr(
                child, "merged", False
            ):
                setattr(module, name, child.base_layer)
                replaced += 1
    return replaced
