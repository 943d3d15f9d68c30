"""AdamW parameter groups (official Rein recipe) and the poly learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

if TYPE_CHECKING:
    from rein.config import OptimConfig

__all__ = [
    "NO_DECAY_KEYS",
    "is_no_decay",
    "build_param_groups",
    "build_optimizer",
    "PolyLR",
    "CosineWeightDecay",
    "build_schedules",
]

# Parameter-name substrings that never get weight decay (besides norm layers).
NO_DECAY_KEYS = ("query_embed", "level_embed", "learnable_tokens")

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.CrossMapLRN2d,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def _is_norm_module(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or type(module).__module__ == (
        "torch.nn.modules.normalization"
    )


def _is_reins_module(module: nn.Module) -> bool:
    return "reins" in type(module).__name__.lower()


def is_no_decay(name: str, owner: nn.Module | None = None) -> bool:
    """Whether parameter ``name`` (owned directly by module ``owner``) skips weight decay."""
    if owner is not None and _is_norm_module(owner):
        return True
    if "norm" in name or any(key in name for key in NO_DECAY_KEYS):
        return True
    if name == "scale" or name.endswith(".scale"):
        return name.endswith("reins.scale") or (owner is not None and _is_reins_module(owner))
    return False


def build_param_groups(
    model: nn.Module,
    weight_decay: float,
    lr: float,
    backbone_lr_mult: float = 1.0,
    is_method: Callable[[str], bool] | None = None,
) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``model`` into AdamW groups.

    Weight decay is 0 for norm layers (by module type, or ``norm`` in the name),
    ``query_embed``, ``level_embed``, ``learnable_tokens*`` and the Rein ``scale``; every
    other parameter gets ``weight_decay``. Backbone parameters of the foundation model itself
    (not Rein, not a method's adapter: ``is_method(name)``, by default the tuning method the
    model carries) get ``lr * backbone_lr_mult``. Each group also carries ``names``.
    """
    if is_method is None:
        method = getattr(model, "method", None)
        is_method = method.is_method_param if method is not None else (lambda name: False)

    def foundation_weight(name: str) -> bool:
        return name.startswith("backbone.") and "reins" not in name and not is_method(name)

    owners: dict[int, nn.Module] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), module)

    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        wd = 0.0 if is_no_decay(name, owners.get(id(param))) else weight_decay
        group_lr = lr * backbone_lr_mult if foundation_weight(name) else lr
        group = groups.setdefault(
            (wd, group_lr), {"params": [], "names": [], "lr": group_lr, "weight_decay": wd}
        )
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over :func:`build_param_groups` with the settings of ``cfg``."""
    method = getattr(model, "method", None)
    if method is not None:
        groups = method.param_groups(model, cfg)
    else:
        groups = build_param_groups(model, cfg.weight_decay, cfg.lr, cfg.backbone_lr_mult)
    if not groups:
        raise ValueError("the model has no trainable parameters (requires_grad=True)")
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )


class PolyLR(LRScheduler):
    """Poly decay per iteration, with optional linear warm-up.

    ``lr(it) = (base - min_lr) * (1 - it / T) ** power + min_lr`` for each param group's own
    base lr, with ``T = max_iters`` or, for ``horizon="max_iters-1"`` (mmengine's PolyLR),
    ``T = max_iters - 1`` (``it`` is clamped to ``T``). During the first
    ``warmup_iters`` iterations that value is scaled by a factor rising linearly from
    ``warmup_ratio`` (at it=0) to 1 (at it=warmup_iters). ``begin > 0`` starts the decay at
    iteration ``begin`` instead (mmengine's ``PolyLR(begin=...)`` after a ``LinearLR`` warm-up):
    the decay is 1 before it, and after it ``it - begin`` runs over ``T - begin``. Call
    :meth:`step` once per iteration, after ``optimizer.step()``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_iters: int,
        power: float = 0.9,
        min_lr: float = 0.0,
        warmup_iters: int = 0,
        warmup_ratio: float = 1e-6,
        last_epoch: int = -1,
        horizon: str = "max_iters",
        begin: int = 0,
    ) -> None:
        if horizon not in ("max_iters", "max_iters-1"):
            raise ValueError(f"poly horizon must be 'max_iters' or 'max_iters-1', got {horizon!r}")
        self.horizon = horizon
        if max_iters < 1:
            raise ValueError(f"max_iters must be >= 1, got {max_iters}")
        if warmup_iters < 0:
            raise ValueError(f"warmup_iters must be >= 0, got {warmup_iters}")
        if not 0 <= begin < max_iters:
            raise ValueError(
                f"optim.poly_begin must be in [0, max_iters) = [0, {max_iters}), got {begin}"
            )
        self.begin = int(begin)
        self.max_iters = int(max_iters)
        self.power = float(power)
        self.min_lr = float(min_lr)
        self.warmup_iters = int(warmup_iters)
        self.warmup_ratio = float(warmup_ratio)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, iteration: int) -> list[float]:
        """Learning rates of every param group at ``iteration`` (closed form)."""
        span = self.max_iters - 1 if self.horizon == "max_iters-1" else self.max_iters
        span = max(span - self.begin, 1)
        it = max(int(iteration), 0)
        decay = (1.0 - min(max(it - self.begin, 0), span) / span) ** self.power
        it = min(it, span + self.begin)
        factor = 1.0
        if self.warmup_iters > 0 and it < self.warmup_iters:
            factor = self.warmup_ratio + (1.0 - self.warmup_ratio) * it / self.warmup_iters
        out = []
        for base in self.base_lrs:
            out.append(((float(base) - self.min_lr) * decay + self.min_lr) * factor)
        return out

    def get_lr(self) -> list[float]:
        return self.lr_at(self.last_epoch)

    def _get_closed_form_lr(self) -> list[float]:
        return self.lr_at(self.last_epoch)


class CosineWeightDecay:
    """Cosine annealing of every group's weight decay (mmengine ``CosineAnnealingParamScheduler``
    on ``weight_decay``, as SoMA and RecycleLoRA use it).

    ``wd(it) = wd_min + (wd0 - wd_min) * (1 + cos(pi * it / max_iters)) / 2`` with each group's
    initial decay ``wd0``; groups with ``wd0 = 0`` therefore rise from 0 to ``wd_min`` (the
    official behaviour). Closed form: :meth:`set_iteration` before the step of iteration ``it``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_iters: int, wd_min: float) -> None:
        if max_iters < 1:
            raise ValueError(f"max_iters must be >= 1, got {max_iters}")
        self.optimizer = optimizer
        self.max_iters = int(max_iters)
        self.wd_min = float(wd_min)
        for group in optimizer.param_groups:
            group.setdefault("initial_weight_decay", group["weight_decay"])

    def wd_at(self, iteration: int) -> list[float]:
        it = min(max(int(iteration), 0), self.max_iters)
        cos = (1.0 + math.cos(math.pi * it / self.max_iters)) / 2.0
        return [
            self.wd_min + (g["initial_weight_decay"] - self.wd_min) * cos
            for g in self.optimizer.param_groups
        ]

    def set_iteration(self, iteration: int) -> None:
        for group, wd in zip(self.optimizer.param_groups, self.wd_at(iteration)):
            group["weight_decay"] = wd


def build_schedules(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_iters: int
) -> tuple[PolyLR, CosineWeightDecay | None]:
    """The lr schedule and (``optim.wd_schedule: cosine``) the weight-decay schedule of a run."""
    lr = PolyLR(
        optimizer,
        max_iters,
        power=cfg.poly_power,
        min_lr=cfg.min_lr,
        warmup_iters=cfg.warmup_iters,
        warmup_ratio=cfg.warmup_ratio,
        horizon=cfg.poly_horizon,
        begin=cfg.poly_begin,
    )
    wd = (
        CosineWeightDecay(optimizer, max_iters, cfg.wd_min) if cfg.wd_schedule == "cosine" else None
    )
    return lr, wd
