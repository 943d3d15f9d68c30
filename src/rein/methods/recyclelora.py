"""``recyclelora``: RecycleLoRA (Cho et al., CVPR 2026 Findings), dual LoRA from a pivoted QR.

Every adapted ``nn.Linear`` (weight ``W0``, out x in, ``k = min(out, in)``) gets two adapters
with one shared scaling ``s = alpha / r_max``: a *main* one of rank ``r_m = min(r_main, r_max)``
and a *sub* one of rank ``r_s = r_max - r_m`` (an adapter of rank 0 has no tensors at all).

Init (spec section 3), on the loaded weights, once per linear: the rank-revealing QR
``Q, R, P = scipy.linalg.qr(W0 (float32), pivoting=True, mode="economic")`` (LAPACK geqp3,
``W0[:, P] = Q R``, pivots greedy by largest remaining column norm). The main adapter takes the
*minor* directions, ``B_m = Q[:, k-r_m:k]`` with ``A_m[i, P[k-r_m+i]] = 1``; the sub adapter the
*major* ones, ``B_s = Q[:, :r_s]`` with ``A_s[i, P[i]] = 1`` (A's are 0/1 selection rows). For a
wide matrix (fc2, out < in) "minor" means the last ``r_m`` of the first ``k`` pivots; the other
``in - k`` columns are never selected. The frozen residual
``W_res = W0 - s * (B_m A_m + B_s A_s)`` (float32, main product first) replaces the weight; the
bias is unchanged, so the adapted layer starts as ``W0`` (to rounding). The QR runs on the CPU
in float32 (torch has no pivoted QR); at DINOv2-L size that is seconds per linear, minutes for
the 96 linears (:func:`rrqr_factors` is a pure function of the weight, so its results can be
cached). On the meta device (``rein params``) the QR cannot run: the adapters are only
allocated (meta tensors of the right shapes) and ``W_res`` stays the meta weight; counts are
exact.

Forward (unmerged): ``F.linear(x, W_res, b) + s*((x A_m^T) B_m^T) + s*((x A_s^T) B_s^T)``, added
in that order. :meth:`RecycleLoRAMethod.merge` folds ``s * (B_m A_m + B_s A_s)`` into ``W_res``
once (idempotent, not the official train()/eval() toggle, spec 11.1); the layer is then a plain
linear. Adapted: the Linear layers named by ``targets`` (default qkv (fused), proj, fc1, fc2) in
every running block. Trainable (spec section 5): the four ``lora_*`` tensors and ``mask_token``;
everything else (W_res, all biases, norms, ...) is frozen.

Parameter names and the official checkpoint layout (spec section 9):

=============================================  =================================================
ours (``backbone.vit.blocks.{i}.{layer}.``...)  official (``backbone.blocks.{i}.{layer}.``...)
=============================================  =================================================
``base_layer.weight`` (W_res)                   ``weight`` (W_res, not W0)
``base_layer.bias``                             ``bias``
``lora_A_main`` (r_m, in), ``lora_B_main``      ``lora_A_main``, ``lora_B_main`` (out, r_m)
``lora_A_sub`` (r_s, in), ``lora_B_sub``        ``lora_A_sub``, ``lora_B_sub`` (out, r_s)
``backbone.mask_token``                         ``backbone.mask_token``
=============================================  =================================================

with ``{layer}`` one of ``attn.qkv`` (fused), ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``. An
official checkpoint is imported without rerunning the QR (its ``weight`` is already W_res).

Optimizer (spec section 8): ``lora_*_main`` at ``lr``, ``lora_*_sub`` at ``lr * sub_lr_mult``,
both without weight decay; other trainable backbone tensors (``mask_token``) at
``lr * backbone_lr_mult`` (the option, 0.5, times ``optim.backbone_lr_mult``) with
``optim.weight_decay``; in the head, norm layers and ``norm`` / ``query_embed`` / ``level_embed``
names get no decay, the rest (``query_feat``, ``pixel_decoder.level_encoding`` included)
``optim.weight_decay``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Container, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rein.methods.base import (
    BaseLayerWrapper,
    TuningMethod,
    adapted_blocks,
    boolean,
    finite_number,
    linear_targets,
    positive_int,
)

if TYPE_CHECKING:
    from rein.config import OptimConfig

__all__ = [
    "RecycleLoRAOptions",
    "RecycleLoRAMethod",
    "RecycleLoRALinear",
    "RRQRFactors",
    "rrqr_factors",
]

ADAPTER_NAMES = ("lora_A_main", "lora_B_main", "lora_A_sub", "lora_B_sub")


@dataclasses.dataclass
class RecycleLoRAOptions:
    r_max: int = 36  # total rank; the scaling is alpha / r_max
    r_main: int = 32  # main rank r_m = min(r_main, r_max); sub rank r_s = r_max - r_m
    alpha: float = 1.0
    targets: list[str] = dataclasses.field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])
    sub_lr_mult: float = 0.5  # the sub adapters train at lr * sub_lr_mult
    backbone_lr_mult: float = 0.5  # other trainable backbone tensors (mask_token)
    init_cache: bool = True  # reuse the QRs of an earlier build (rein.methods.init_cache)

    def validate(self, method: str) -> None:
        self.r_max = positive_int(method, "r_max", self.r_max)
        if isinstance(self.r_main, bool) or not isinstance(self.r_main, int) or self.r_main < 0:
            raise ValueError(
                f"tuning '{method}': option 'r_main' must be an integer >= 0, got {self.r_main!r}"
            )
        self.alpha = finite_number(method, "alpha", self.alpha, positive=True)
        self.targets = linear_targets(method, self.targets)
        self.sub_lr_mult = finite_number(method, "sub_lr_mult", self.sub_lr_mult, positive=True)
        self.backbone_lr_mult = finite_number(
            method, "backbone_lr_mult", self.backbone_lr_mult, positive=True
        )
        self.init_cache = boolean(method, "init_cache", self.init_cache)

    @property
    def rank_main(self) -> int:
        return min(self.r_main, self.r_max)

    @property
    def rank_sub(self) -> int:
        return self.r_max - self.rank_main

    @property
    def scaling(self) -> float:
        return self.alpha / self.r_max


# -- the decomposition --------------------------------------------------------------------------
@dataclasses.dataclass
class RRQRFactors:
    """The RRQR init of one weight: adapters (float32, CPU) and ``W_res`` (float32, CPU).

    ``a_sub`` / ``b_sub`` (and ``a_main`` / ``b_main``) are None for an adapter of rank 0.
    """

    a_main: Tensor | None
    b_main: Tensor | None
    a_sub: Tensor | None
    b_sub: Tensor | None
    residual: Tensor
    pivots: np.ndarray


def _selection(pivots: np.ndarray, in_features: int) -> Tensor:
    """The 0/1 matrix (len(pivots), in) with a one at ``[i, pivots[i]]``."""
    a = torch.zeros(len(pivots), in_features, dtype=torch.float32)
    a[torch.arange(len(pivots)), torch.as_tensor(pivots, dtype=torch.long)] = 1.0
    return a


def rrqr_factors(
    weight: Tensor, r_main: int, r_sub: int, scaling: float, cache: bool = False
) -> RRQRFactors:
    """The RecycleLoRA init of ``weight`` (out x in): one ``scipy.linalg.qr`` with pivoting
    (float32, economic), main adapter on the last ``r_main`` of the first ``k`` pivots (minor
    directions), sub adapter on the first ``r_sub`` (major), ``W_res = W0 - s (B_m A_m + B_s A_s)``.
    ``cache``: read / store the QR's selected columns and pivots in :mod:`rein.methods.init_cache`.
    """
    if weight.is_meta:
        raise ValueError("the RecycleLoRA QR cannot run on meta tensors")
    out_features, in_features = weight.shape
    k = min(out_features, in_features)
    if r_main + r_sub > k:
        raise ValueError(f"rank {r_main + r_sub} exceeds min(out, in) = {k}")
    w0 = weight.detach().to(device="cpu", dtype=torch.float32).contiguous()

    def compute() -> dict[str, Tensor]:
        import scipy.linalg

        q, _, piv = scipy.linalg.qr(w0.numpy(), pivoting=True, mode="economic")
        q = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
        return {
            "q_main": q[:, k - r_main : k].contiguous(),
            "q_sub": q[:, :r_sub].contiguous(),
            "pivots": torch.from_numpy(np.asarray(piv, dtype=np.int64)),
        }

    from rein.methods.init_cache import cached_factors

    params = {"r_main": r_main, "r_sub": r_sub}
    found = cached_factors("recyclelora-rrqr", w0, params, compute, enabled=cache)
    pivots = found["pivots"].numpy()
    delta = torch.zeros_like(w0)
    a_main = b_main = a_sub = b_sub = None
    if r_main:
        b_main = found["q_main"]
        a_main = _selection(pivots[k - r_main : k], in_features)
        delta = b_main @ a_main
    if r_sub:
        b_sub = found["q_sub"]
        a_sub = _selection(pivots[:r_sub], in_features)
        delta = delta + b_sub @ a_sub
    residual = w0 - scaling * delta
    return RRQRFactors(a_main, b_main, a_sub, b_sub, residual, pivots)


# -- the adapted layer --------------------------------------------------------------------------
class RecycleLoRALinear(BaseLayerWrapper):
    """A frozen ``base_layer`` (weight = W_res, bias) plus the main and sub adapters.

    ``forward(x) = F.linear(x, W_res, b) + s*((x A_m^T) B_m^T) + s*((x A_s^T) B_s^T)`` until
    :meth:`merge`, then the plain linear.
    """

    base_layer: nn.Linear

    def __init__(
        self,
        base_layer: nn.Linear,
        adapters: dict[str, Tensor | None],
        scaling: float,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.scaling = float(scaling)
        self.merged = False
        for name in ADAPTER_NAMES:
            value = adapters.get(name)
            self.register_parameter(name, None if value is None else nn.Parameter(value))

    def pairs(self) -> list[tuple[Tensor, Tensor]]:
        """``(A, B)`` of the adapters that exist, main first."""
        out = []
        for part in ("main", "sub"):
            a, b = getattr(self, f"lora_A_{part}"), getattr(self, f"lora_B_{part}")
            if a is not None and b is not None:
                out.append((a, b))
        return out

    def forward(self, x: Tensor) -> Tensor:
        result = F.linear(x, self.base_layer.weight, self.base_layer.bias)
        if self.merged:
            return result
        for a, b in self.pairs():
            result = result + (F.linear(F.linear(x.to(a.dtype), a), b) * self.scaling).to(
                result.dtype
            )
        return result

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """``s * (B_m A_m + B_s A_s)`` (float32; main product first)."""
        weight = self.base_layer.weight
        delta = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for a, b in self.pairs():
            delta = delta + b.float() @ a.float()
        return delta * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``s * (B_m A_m + B_s A_s)`` into ``W_res`` (once; later calls do nothing)."""
        if self.merged:
            return
        weight = self.base_layer.weight
        weight.copy_((weight.float() + self.delta_weight()).to(weight.dtype))
        self.merged = True

    def extra_repr(self) -> str:
        ranks = [a.shape[0] if a is not None else 0 for a in (self.lora_A_main, self.lora_A_sub)]
        return f"r_main={ranks[0]}, r_sub={ranks[1]}, scaling={self.scaling}, merged={self.merged}"


class RecycleLoRAMethod(TuningMethod):
    name = "recyclelora"
    Options = RecycleLoRAOptions

    @property
    def scaling(self) -> float:
        return self.options.scaling

    # -- construction -------------------------------------------------------------------------
    def adapt(self, backbone: nn.Module) -> None:
        opts = self.options
        blocks, indices = adapted_blocks(backbone, self.name)
        chosen: list[tuple[nn.Module, str, str]] = []
        for i in indices:
            block = blocks[i]
            linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
            for target in opts.targets:
                if not any(n == target or n.endswith(f".{target}") for n in linears):
                    raise ValueError(
                        f"tuning 'recyclelora': target '{target}' matches no Linear layer of "
                        f"blocks.{i}; its Linear layers are: {', '.join(linears) or 'none'}"
                    )
            for name, layer in linears.items():
                if name.rsplit(".", 1)[-1] not in opts.targets:
                    continue
                full = f"blocks.{i}.{name}"
                out_features, in_features = layer.weight.shape
                k = min(out_features, in_features)
                if opts.r_max > k:
                    raise ValueError(
                        f"tuning 'recyclelora': r_max {opts.r_max} exceeds min(out, in) of "
                        f"{full} (it is {out_features} x {in_features}); choose r_max <= {k}"
                    )
                chosen.append((block, name, full))
        for block, name, full in chosen:  # every layer checked before any is changed
            self._wrap(block, name, full)

    def _wrap(self, block: nn.Module, name: str, full: str) -> None:
        opts = self.options
        parent_name, _, leaf = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        layer: nn.Linear = getattr(parent, leaf)
        out_features, in_features = layer.weight.shape
        r_m, r_s = opts.rank_main, opts.rank_sub
        weight = layer.weight
        if weight.is_meta:  # no QR on meta tensors: allocate only (exact shapes for counting)
            adapters: dict[str, Tensor | None] = {
                "lora_A_main": torch.empty(r_m, in_features, device="meta") if r_m else None,
                "lora_B_main": torch.empty(out_features, r_m, device="meta") if r_m else None,
                "lora_A_sub": torch.empty(r_s, in_features, device="meta") if r_s else None,
                "lora_B_sub": torch.empty(out_features, r_s, device="meta") if r_s else None,
            }
        else:
            f = rrqr_factors(weight, r_m, r_s, self.scaling, cache=opts.init_cache)
            device = weight.device
            adapters = {
                key: None if t is None else t.to(device)
                for key, t in zip(ADAPTER_NAMES, (f.a_main, f.b_main, f.a_sub, f.b_sub))
            }
            with torch.no_grad():
                weight.copy_(f.residual.to(device=device, dtype=weight.dtype))
        layer.weight.requires_grad_(False)
        setattr(parent, leaf, RecycleLoRALinear(layer, adapters, self.scaling))

    # -- what trains --------------------------------------------------------------------------
    def report_group(self, name: str) -> str | None:
        if name.startswith("backbone.") and name.rsplit(".", 1)[-1] in ADAPTER_NAMES:
            return "recyclelora"
        return None

    def is_trainable(self, name: str) -> bool:
        return self.report_group(name) is not None or name == "backbone.mask_token"

    # -- training -----------------------------------------------------------------------------
    def param_groups(self, model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
        """Spec section 8: main adapters (lr, wd 0), sub adapters (lr * sub_lr_mult, wd 0),
        other trainable backbone tensors (lr * backbone_lr_mult, wd), the head by the Rein
        rules (norms, ``query_embed``, ``level_embed``: wd 0; the rest, ``query_feat`` too: wd).
        """
        from rein.engine.optim import build_param_groups

        opts = self.options
        base = build_param_groups(
            model, cfg.weight_decay, cfg.lr, 1.0, is_method=lambda name: False
        )
        groups: dict[tuple[bool, float, float], dict[str, Any]] = {}
        for group in base:
            for name, param in zip(group["names"], group["params"], strict=True):
                lr, wd = group["lr"], group["weight_decay"]
                if name.startswith("backbone."):
                    leaf = name.rsplit(".", 1)[-1]
                    if leaf in ("lora_A_main", "lora_B_main"):
                        lr, wd = cfg.lr, 0.0
                    elif leaf in ("lora_A_sub", "lora_B_sub"):
                        lr, wd = cfg.lr * opts.sub_lr_mult, 0.0
                    else:
                        lr = cfg.lr * opts.backbone_lr_mult * cfg.backbone_lr_mult
                        wd = cfg.weight_decay
                key = (name.startswith("backbone."), wd, lr)  # backbone and head apart
                out = groups.setdefault(
                    key, {"params": [], "names": [], "lr": lr, "weight_decay": wd}
                )
                out["params"].append(param)
                out["names"].append(name)
        return list(groups.values())

    # -- inference ----------------------------------------------------------------------------
    def merge(self, model: nn.Module) -> bool:
        """Fold both adapters of every layer into its ``W_res`` (idempotent); the layers are
        then plain linears."""
        for module in model.modules():
            if isinstance(module, RecycleLoRALinear):
                module.merge()
        return True

    # -- checkpoints --------------------------------------------------------------------------
    training_only_options = ("sub_lr_mult", "backbone_lr_mult", "init_cache")
    official_saves_whole_model = True

    @classmethod
    def claims_official(cls, keys: Collection[str]) -> bool:
        return any(k.rsplit(".", 1)[-1] in ADAPTER_NAMES for k in keys)

    def official_to_ours(
        self, state: Mapping[str, Tensor], model_keys: Container[str]
    ) -> dict[str, Tensor]:
        """Rein's layout (``backbone.<dinov2 key>`` -> ``backbone.vit.<key>``), the weight and
        bias of every adapted linear under ``base_layer``; the adapters keep their names."""
        from rein.interop import official_to_ours, with_base_layer

        return {with_base_layer(k, model_keys): v for k, v in official_to_ours(state).items()}

    def ours_to_official(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        from rein.interop import ours_to_official, without_base_layer

        return {without_base_layer(k): v for k, v in ours_to_official(state).items()}

    def check_official(
        self, state: Mapping[str, Tensor], model_state: Mapping[str, Tensor], src: str
    ) -> None:
        from rein.interop import InteropError

        def ranks(source: Mapping[str, Tensor]) -> tuple[int, int]:
            found = {0: set(), 1: set()}
            for k, v in source.items():
                leaf = k.rsplit(".", 1)[-1]
                if leaf in ("lora_A_main", "lora_A_sub"):
                    found[leaf == "lora_A_sub"].add(int(v.shape[0]))
            return max(found[0], default=0), max(found[1], default=0)

        r_file, r_model = ranks(state), (self.options.rank_main, self.options.rank_sub)
        if r_file != r_model:
            raise InteropError(
                f"{src} holds RecycleLoRA adapters of main rank {r_file[0]} / sub rank "
                f"{r_file[1]} (r_max {sum(r_file)}) but the config has {r_model[0]} / "
                f"{r_model[1]} (r_max {sum(r_model)}); set model.tuning_options.r_max: "
                f"{sum(r_file)} and r_main: {r_file[0]}"
            )

    def prepare_official_load(self, model: nn.Module, state: Mapping[str, Tensor]) -> None:
        """Official checkpoints hold the residual ``W_res`` as each adapted layer's weight
        (saved unmerged): it is loaded as it is, and no QR runs again."""
        from rein.methods.base import require_unmerged

        require_unmerged(model, "loaded from an official checkpoint")
