"""``soma``: SoMA (Yun et al., CVPR 2025), low-rank adapters from the *minor* singular components.

Each adapted ``nn.Linear`` (weight ``W``, out x in) gets rank-``rank`` adapters ``A`` (rank x in)
and ``B`` (out x rank) with scaling ``s = alpha / rank``. ``init="pretrained"`` (default, the
paper): ``U, S, Vh = svd(W)`` in float32, keep the r *smallest* components, ``S_r <- S_r / s``,
``A = diag(sqrt S_r) Vh_r``, ``B = U_r diag(sqrt S_r)`` and the frozen residual
``W_res = W - s * B @ A`` (cast back to W's dtype), so the adapted layer starts as ``W``.
``init="official_random"`` reproduces the official training (its SVD runs on the random init
before the pretrained weights are loaded): ``W_res = W`` unchanged and ``A``, ``B`` are the minor
factors of a fresh default ``nn.Linear`` weight of the same shape, U(+-1/sqrt(in)) (kaiming-uniform,
a = sqrt 5), drawn from ``torch.Generator().manual_seed(seed)`` on the CPU in float32, one
(out x in) draw per adapter in this order: blocks ascending, then the block's linears in module
order (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``), the fused qkv as its q, k, v row
blocks. The README numbers were presumably trained that way.

Forward (unmerged): ``F.linear(x, W_res, b) + s * ((x A^T) B^T)``. A fused ``qkv`` (3C x C) is
kept fused; its three C x C row blocks q / k / v get three independent adapters, each from the
SVD of its own block (never one SVD of the fused matrix), and the deltas are concatenated.
Adapted: the Linear layers named by ``targets`` (default qkv, proj, fc1, fc2) in every running
block with index >= ``start_block`` (8). Trainable (spec section 6): the adapters, the biases of
the adapted linears (for the fused qkv: its bias; timm's Eva keeps it as ``attn.q_bias`` /
``attn.v_bias``) and ``mask_token``; everything else is frozen.

On the meta device (``rein params``) the SVD cannot run: the adapters are only allocated (meta
tensors of the right shape) and ``W_res`` stays the meta weight; counts are exact.

Parameter names and the official checkpoint layout (``SoraModel``, keys ``backbone.model.*``):

=================================================  ================================================
ours (``backbone.vit.blocks.{i}.``...)              official (``backbone.model.blocks.{i}.``...)
=================================================  ================================================
``attn.qkv.base_layer.weight`` rows [0,C)/[C,2C)/   ``attn.q.weight`` / ``attn.k.weight`` /
[2C,3C) (W_res), same for ``.bias``                 ``attn.v.weight`` (and ``.bias``)
``attn.qkv.{q,k,v}.lora_A.weight`` / ``lora_B``     ``attn.{q,k,v}.lora_A.weight`` / ``lora_B``
``attn.proj.base_layer.{weight,bias}``              ``attn.proj.{weight,bias}``
``attn.proj.lora_{A,B}.weight``                     ``attn.proj.lora_{A,B}.weight``
``mlp.fc1`` / ``mlp.fc2``: as ``attn.proj``         ``mlp.fc1`` / ``mlp.fc2``
``backbone.mask_token``                             ``backbone.model.mask_token``
=================================================  ================================================

Optimizer (spec section 8): every trainable backbone tensor (adapters, biases, mask_token) at
``lr * backbone_lr_mult`` (the method option, 0.5; ``optim.backbone_lr_mult`` multiplies on top
and is 1 by default), weight decay ``optim.weight_decay``; in the head, ``norm`` / ``query_embed``
/ ``query_feat`` / ``level_embed`` names and norm layers get no decay, the rest
``optim.weight_decay``. :meth:`SoMAMethod.merge` folds ``s * B @ A`` into ``W_res`` once.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Collection, Container, Mapping, Sequence
from typing import TYPE_CHECKING, Any

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
    "SoMAOptions",
    "SoMAMethod",
    "SoMAAdapter",
    "SoMALinear",
    "SoMAQKV",
    "minor_factors",
    "default_linear_weight",
]

INITS = ("pretrained", "official_random")
NO_DECAY_HEAD_KEYS = ("norm", "query_embed", "query_feat", "level_embed")


@dataclasses.dataclass
class SoMAOptions:
    rank: int = 16
    alpha: float = 16.0  # scaling s = alpha / rank
    start_block: int = 8
    targets: list[str] = dataclasses.field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])
    init: str = "pretrained"  # or "official_random" (spec section 11.1)
    seed: int = 0  # the random weights of init "official_random"
    backbone_lr_mult: float = 0.5  # lr multiplier of every trainable backbone tensor
    svd_device: str | None = None  # where the SVDs run (None: the weight's device), e.g. "cuda"
    init_cache: bool = True  # reuse the SVDs of an earlier build (rein.methods.init_cache)

    def validate(self, method: str) -> None:
        self.rank = positive_int(method, "rank", self.rank)
        self.alpha = finite_number(method, "alpha", self.alpha, positive=True)
        if isinstance(self.start_block, bool) or not isinstance(self.start_block, int):
            raise ValueError(
                f"tuning '{method}': option 'start_block' must be an integer >= 0, "
                f"got {self.start_block!r}"
            )
        if self.start_block < 0:
            raise ValueError(
                f"tuning '{method}': option 'start_block' must be >= 0, got {self.start_block}"
            )
        self.targets = linear_targets(method, self.targets)
        if self.init not in INITS:
            hint = " (the randomized svd_lowrank init keeps the largest components: not SoMA)"
            raise ValueError(
                f"tuning '{method}': option 'init' must be one of {', '.join(INITS)}, "
                f"got {self.init!r}" + (hint if "niter" in str(self.init) else "")
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(
                f"tuning '{method}': option 'seed' must be an integer, got {self.seed!r}"
            )
        self.backbone_lr_mult = finite_number(
            method, "backbone_lr_mult", self.backbone_lr_mult, positive=True
        )
        self.init_cache = boolean(method, "init_cache", self.init_cache)
        if self.svd_device is not None:
            try:
                torch.device(self.svd_device)
            except (RuntimeError, TypeError) as exc:
                raise ValueError(
                    f"tuning '{method}': option 'svd_device' must be a torch device such as "
                    f"'cuda' or 'cpu' (or null), got {self.svd_device!r}"
                ) from exc


# -- the decomposition --------------------------------------------------------------------------
def minor_factors(
    weight: Tensor, rank: int, scaling: float, device: str | torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """``(A, B)`` (float32, on ``weight``'s device) from the ``rank`` smallest singular components
    of ``weight`` (out x in): ``A = diag(sqrt(S_r / s)) Vh_r``, ``B = U_r diag(sqrt(S_r / s))``,
    so ``s * B @ A`` is the minor rank-``rank`` part of ``weight``."""
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"SoMA init needs a float32/float16/bfloat16 weight, got {weight.dtype}")
    w = weight.detach().to(device=device or weight.device, dtype=torch.float32)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # s descending
    k = s.numel()
    root = (s[k - rank :] / scaling).sqrt()
    a = root[:, None] * vh[k - rank :, :]
    b = u[:, k - rank :] * root[None, :]
    return a.to(weight.device).contiguous(), b.to(weight.device).contiguous()


def default_linear_weight(
    out_features: int, in_features: int, generator: torch.Generator
) -> Tensor:
    """A default ``nn.Linear`` weight (kaiming-uniform a = sqrt 5, i.e. U(+-1/sqrt(in))), float32
    on the CPU, drawn from ``generator``."""
    bound = 1.0 / math.sqrt(in_features)
    w = torch.empty(out_features, in_features, dtype=torch.float32)
    return w.uniform_(-bound, bound, generator=generator)


def _pair(a: Tensor, b: Tensor) -> tuple[nn.Linear, nn.Linear]:
    """``lora_A`` (rank x in) and ``lora_B`` (out x rank) as bias-free Linear layers holding
    ``a`` and ``b`` (so the keys read ``lora_A.weight`` / ``lora_B.weight``)."""
    lora_a = nn.Linear(a.shape[1], a.shape[0], bias=False, device="meta")  # no init work
    lora_b = nn.Linear(b.shape[1], b.shape[0], bias=False, device="meta")
    lora_a.weight = nn.Parameter(a)
    lora_b.weight = nn.Parameter(b)
    return lora_a, lora_b


def _delta(lora_a: nn.Linear, lora_b: nn.Linear, x: Tensor, scaling: float) -> Tensor:
    """``s * ((x A^T) B^T)``."""
    return lora_b(lora_a(x.to(lora_a.weight.dtype))) * scaling


class SoMAAdapter(nn.Module):
    """The adapters ``lora_A`` (rank x in) / ``lora_B`` (out x rank) of one row block of a fused
    qkv weight."""

    def __init__(self, a: Tensor, b: Tensor) -> None:
        super().__init__()
        self.lora_A, self.lora_B = _pair(a, b)


def _cached_minor_factors(
    weight: Tensor, rank: int, scaling: float, device: str | None, cache: bool
) -> tuple[Tensor, Tensor]:
    """:func:`minor_factors`, through the disk cache of :mod:`rein.methods.init_cache`."""
    from rein.methods.init_cache import cached_factors

    def compute() -> dict[str, Tensor]:
        a, b = minor_factors(weight, rank, scaling, device)
        return {"A": a.cpu(), "B": b.cpu()}

    params = {"rank": rank, "scaling": scaling}
    out = cached_factors("soma-minor-svd", weight, params, compute, enabled=cache)
    return out["A"].to(weight.device), out["B"].to(weight.device)


def _factors(
    weight: Tensor,
    rank: int,
    scaling: float,
    init: str,
    generator: torch.Generator,
    device: str | None,
    cache: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(A, B, W_res)`` for one weight block; ``W_res`` None: keep the weight as is."""
    out_features, in_features = weight.shape
    if weight.is_meta:  # no SVD on meta tensors: allocate only (exact shapes for counting)
        a = torch.empty(rank, in_features, device="meta")
        b = torch.empty(out_features, rank, device="meta")
        return a, b, None
    if init == "official_random":
        random = default_linear_weight(out_features, in_features, generator)
        a, b = _cached_minor_factors(random.to(weight.device), rank, scaling, device, cache)
        return a, b, None
    a, b = _cached_minor_factors(weight, rank, scaling, device, cache)
    residual = weight.detach().float() - (b @ a) * scaling
    return a, b, residual.to(weight.dtype)


class _SoMAWrapper(BaseLayerWrapper):
    """A frozen ``base_layer`` (weight = W_res, bias) plus SoMA adapters; merges once."""

    base_layer: nn.Linear

    def __init__(self, base_layer: nn.Linear, scaling: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.scaling = float(scaling)
        self.merged = False

    def adapters(self) -> list[tuple[slice, nn.Linear, nn.Linear]]:
        """``(rows of W_res, lora_A, lora_B)`` for every adapter."""
        raise NotImplementedError

    def delta(self, x: Tensor) -> Tensor:
        """The adapters' output ``s * ((x A^T) B^T)`` (per row block for qkv)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        result = F.linear(x, self.base_layer.weight, self.base_layer.bias)
        if self.merged:
            return result
        return result + self.delta(x).to(result.dtype)

    @torch.no_grad()
    def add_adapters_to_base(self) -> None:
        """``W_res += s * B @ A`` for every adapter (float32 sum, cast back to W's dtype)."""
        weight = self.base_layer.weight
        for rows, lora_a, lora_b in self.adapters():
            delta = (lora_b.weight @ lora_a.weight) * self.scaling
            weight[rows] = (weight[rows].float() + delta.to(weight.device)).to(weight.dtype)

    def merge(self) -> None:
        """Fold ``s * B @ A`` into ``W_res`` (once; later calls do nothing)."""
        if self.merged:
            return
        self.add_adapters_to_base()
        self.merged = True

    def extra_repr(self) -> str:
        return f"scaling={self.scaling}, merged={self.merged}"


class SoMALinear(_SoMAWrapper):
    """``F.linear(x, W_res, b) + s * ((x A^T) B^T)`` around one Linear layer."""

    def __init__(self, base_layer: nn.Linear, a: Tensor, b: Tensor, scaling: float) -> None:
        super().__init__(base_layer, scaling)
        self.lora_A, self.lora_B = _pair(a, b)

    def adapters(self) -> list[tuple[slice, nn.Linear, nn.Linear]]:
        return [(slice(None), self.lora_A, self.lora_B)]

    def delta(self, x: Tensor) -> Tensor:
        return _delta(self.lora_A, self.lora_B, x, self.scaling)


class SoMAQKV(_SoMAWrapper):
    """A fused qkv Linear (3C x C) with independent adapters ``q``, ``k``, ``v`` on its three
    C x C row blocks; the three deltas are concatenated along the output."""

    def __init__(
        self, base_layer: nn.Linear, factors: Sequence[tuple[Tensor, Tensor]], scaling: float
    ) -> None:
        super().__init__(base_layer, scaling)
        self.q, self.k, self.v = (SoMAAdapter(a, b) for a, b in factors)

    def adapters(self) -> list[tuple[slice, nn.Linear, nn.Linear]]:
        c = self.base_layer.out_features // 3
        return [
            (slice(i * c, (i + 1) * c), m.lora_A, m.lora_B)
            for i, m in enumerate((self.q, self.k, self.v))
        ]

    def delta(self, x: Tensor) -> Tensor:
        parts = [_delta(m.lora_A, m.lora_B, x, self.scaling) for m in (self.q, self.k, self.v)]
        return torch.cat(parts, dim=-1)


_BLOCK_INDEX = re.compile(r"\.blocks\.(\d+)\.")


def _matches(name: str, targets: Sequence[str]) -> bool:
    """Whether module path ``name`` (inside a block) is one of ``targets`` (or ends in one)."""
    return any(name == t or name.endswith(f".{t}") for t in targets)


class SoMAMethod(TuningMethod):
    name = "soma"
    Options = SoMAOptions

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        #: the q_bias / v_bias of adapted fused qkv layers that keep their bias beside them
        self._beside_biases: set[str] = set()

    @property
    def scaling(self) -> float:
        return self.options.alpha / self.options.rank

    # -- construction -------------------------------------------------------------------------
    def adapt(self, backbone: nn.Module) -> None:
        opts = self.options
        blocks, indices = adapted_blocks(backbone, self.name)
        chosen = [i for i in indices if i >= opts.start_block]
        if not chosen:
            raise ValueError(
                f"tuning 'soma': start_block {opts.start_block} leaves no block to adapt (the "
                f"backbone runs blocks 0-{indices[-1]}); lower model.tuning_options.start_block"
            )
        generator = torch.Generator().manual_seed(opts.seed)
        for i in chosen:
            block = blocks[i]
            linears = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
            for target in opts.targets:
                if not any(_matches(n, [target]) for n in linears):
                    raise ValueError(
                        f"tuning 'soma': target '{target}' matches no Linear layer of "
                        f"blocks.{i}; its Linear layers are: {', '.join(linears) or 'none'}"
                    )
            for name in linears:  # module order: the order of the official_random draws
                if _matches(name, opts.targets):
                    self._wrap(block, name, f"blocks.{i}.{name}", generator)

    def _wrap(self, block: nn.Module, name: str, full: str, generator: torch.Generator) -> None:
        opts = self.options
        parent_name, _, leaf = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        layer: nn.Linear = getattr(parent, leaf)
        out_features, in_features = layer.weight.shape
        fused = leaf == "qkv"
        if fused and out_features % 3:
            raise ValueError(
                f"tuning 'soma': {full} is a fused qkv layer but has {out_features} outputs, "
                "not a multiple of 3"
            )
        rows = out_features // 3 if fused else out_features
        if opts.rank > min(rows, in_features):
            what = (
                f"its q/k/v blocks are {rows} x {in_features}"
                if fused
                else (f"it is {out_features} x {in_features}")
            )
            raise ValueError(
                f"tuning 'soma': rank {opts.rank} exceeds min(out, in) of {full} ({what}); "
                "choose rank <= min(out, in)"
            )
        weight = layer.weight
        blocks_rows = (
            [slice(j * rows, (j + 1) * rows) for j in range(3)] if fused else [slice(None)]
        )
        factors = []
        residuals = []
        for sl in blocks_rows:
            a, b, residual = _factors(
                weight[sl],
                opts.rank,
                self.scaling,
                opts.init,
                generator,
                opts.svd_device,
                opts.init_cache,
            )
            factors.append((a, b))
            residuals.append(residual)
        if not weight.is_meta and opts.init == "pretrained":
            with torch.no_grad():
                for sl, residual in zip(blocks_rows, residuals, strict=True):
                    weight[sl] = residual
        layer.weight.requires_grad_(False)
        if fused:
            wrapper: nn.Module = SoMAQKV(layer, factors, self.scaling)
            if isinstance(getattr(parent, "q_bias", None), nn.Parameter):
                # timm's Eva (DINOv3 _qkvb, EVA-CLIP) keeps this qkv's bias beside it, as
                # q_bias / v_bias (its k bias is a fixed zero buffer): they train as its bias
                where = f"backbone.vit.{full.rpartition('.')[0]}"
                self._beside_biases |= {f"{where}.q_bias", f"{where}.v_bias"}
        else:
            wrapper = SoMALinear(layer, *factors[0], self.scaling)
        setattr(parent, leaf, wrapper)

    # -- what trains --------------------------------------------------------------------------
    def _adapted_bias(self, name: str) -> bool:
        match = _BLOCK_INDEX.search(name)
        if match is None or int(match.group(1)) < self.options.start_block:
            return False
        if name in self._beside_biases:
            return True
        return name.endswith(".base_layer.bias") and _matches(
            name[match.end() : -len(".base_layer.bias")], self.options.targets
        )

    def report_group(self, name: str) -> str | None:
        return "soma" if name.startswith("backbone.") and ".lora_" in name else None

    def is_trainable(self, name: str) -> bool:
        return (
            self.report_group(name) is not None
            or name == "backbone.mask_token"
            or (name.startswith("backbone.") and self._adapted_bias(name))
        )

    # -- training -----------------------------------------------------------------------------
    def param_groups(self, model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
        """Spec section 8: the trainable backbone tensors at ``lr * backbone_lr_mult`` (the
        method option times ``optim.backbone_lr_mult``) with decay; in the head, no decay for
        norm layers and ``norm`` / ``query_embed`` / ``query_feat`` / ``level_embed`` names."""
        from rein.engine.optim import build_param_groups

        mult = self.options.backbone_lr_mult * cfg.backbone_lr_mult
        # Every backbone tensor counts as a foundation weight here, so all get the multiplier.
        base = build_param_groups(
            model, cfg.weight_decay, cfg.lr, mult, is_method=lambda name: False
        )
        groups: dict[tuple[float, float], dict[str, Any]] = {}
        for group in base:
            for name, param in zip(group["names"], group["params"], strict=True):
                wd = group["weight_decay"]
                if not name.startswith("backbone.") and any(k in name for k in NO_DECAY_HEAD_KEYS):
                    wd = 0.0
                key = (wd, group["lr"])
                out = groups.setdefault(
                    key, {"params": [], "names": [], "lr": group["lr"], "weight_decay": wd}
                )
                out["params"].append(param)
                out["names"].append(name)
        return list(groups.values())

    # -- inference ----------------------------------------------------------------------------
    def merge(self, model: nn.Module) -> bool:
        """Fold every adapter into its frozen ``W_res`` (idempotent); then the layers are plain
        linears."""
        for module in model.modules():
            if isinstance(module, _SoMAWrapper):
                module.merge()
        return True

    # -- checkpoints --------------------------------------------------------------------------
    training_only_options = ("backbone_lr_mult", "svd_device", "init_cache")
    official_saves_whole_model = True

    @classmethod
    def claims_official(cls, keys: Collection[str]) -> bool:
        return any(k.startswith(_OFFICIAL) and k.endswith(".lora_A.weight") for k in keys)

    def official_to_ours(
        self, state: Mapping[str, Tensor], model_keys: Container[str]
    ) -> dict[str, Tensor]:
        """``backbone.model.*`` -> ``backbone.vit.*`` (``mask_token`` -> ``backbone.mask_token``),
        the split ``attn.q/k/v`` weights and biases concatenated into the fused qkv, their
        adapters under ``attn.qkv.{q,k,v}``, adapted layers' weights under ``base_layer``."""
        from rein.interop import InteropError, with_base_layer

        out: dict[str, Tensor] = {}
        split: dict[tuple[str, str], dict[str, Tensor]] = {}
        for key, value in state.items():
            if not key.startswith(_OFFICIAL):
                out[key] = value
                continue
            rest = key[len(_OFFICIAL) :]
            if rest == "mask_token":
                out["backbone.mask_token"] = value
                continue
            match = _OFFICIAL_QKV.match(rest)
            if match is None:
                out[with_base_layer("backbone.vit." + rest, model_keys)] = value
                continue
            prefix, part, suffix = match.groups()
            if suffix.startswith("lora_"):
                out[f"backbone.vit.{prefix}qkv.{part}.{suffix}"] = value
            else:
                split.setdefault((prefix, suffix), {})[part] = value
        for (prefix, suffix), parts in split.items():
            if len(parts) != 3:
                missing = ", ".join(
                    f"{_OFFICIAL}{prefix}{p}.{suffix}" for p in "qkv" if p not in parts
                )
                raise InteropError(f"the SoMA checkpoint lacks {missing} (q, k, v come together)")
            fused = torch.cat([parts[p] for p in "qkv"], dim=0)
            out[with_base_layer(f"backbone.vit.{prefix}qkv.{suffix}", model_keys)] = fused
        return out

    def ours_to_official(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Inverse of :meth:`official_to_ours` (the fused qkv split into its row blocks)."""
        from rein.interop import without_base_layer

        out: dict[str, Tensor] = {}
        for key, value in state.items():
            if key == "backbone.mask_token":
                out[_OFFICIAL + "mask_token"] = value
                continue
            if not key.startswith("backbone.vit."):
                out[key] = value
                continue
            rest = without_base_layer(key[len("backbone.vit.") :])
            match = _OURS_QKV.match(rest)
            if match is None:
                out[_OFFICIAL + rest] = value
                continue
            prefix, suffix = match.groups()
            if suffix[:2] in ("q.", "k.", "v."):  # an adapter: attn.qkv.q.lora_A.weight
                out[f"{_OFFICIAL}{prefix}{suffix}"] = value
                continue
            for part, rows in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[f"{_OFFICIAL}{prefix}{part}.{suffix}"] = rows
        return out

    def check_official(
        self, state: Mapping[str, Tensor], model_state: Mapping[str, Tensor], src: str
    ) -> None:
        from rein.interop import InteropError

        ranks = sorted({int(v.shape[0]) for k, v in state.items() if k.endswith(".lora_A.weight")})
        if ranks and ranks != [self.options.rank]:
            raise InteropError(
                f"{src} holds SoMA adapters of rank {'/'.join(map(str, ranks))} but the config "
                f"has model.tuning_options.rank {self.options.rank}; set it to {ranks[0]}"
            )
        blocks_file = _lora_blocks(state)
        blocks_model = _lora_blocks(model_state)
        if blocks_file and blocks_model and blocks_file != blocks_model:
            raise InteropError(
                f"{src} adapts blocks {_span(blocks_file)} but the config adapts "
                f"{_span(blocks_model)}; set model.tuning_options.start_block: {min(blocks_file)}"
            )

    def prepare_official_load(self, model: nn.Module, state: Mapping[str, Tensor]) -> None:
        """A release file (adapters, biases and head, no weights of the adapted layers) runs on
        base = the full pretrained W (spec section 10): with ``init: pretrained`` the base holds
        ``W - s * B0 @ A0``, so the initial adapters are folded back first."""
        from rein.methods.base import require_unmerged

        require_unmerged(model, "loaded from an official checkpoint")
        release = not any(k.endswith(".base_layer.weight") for k in state)
        if not release or self.options.init != "pretrained":
            return
        for module in model.modules():
            if isinstance(module, _SoMAWrapper) and not module.base_layer.weight.is_meta:
                module.add_adapters_to_base()  # base = W - s B0 A0 + s B0 A0 = W


_OFFICIAL = "backbone.model."
_OFFICIAL_QKV = re.compile(r"^(blocks\.\d+\.attn\.)([qkv])\.(.+)$")
_OURS_QKV = re.compile(r"^(blocks\.\d+\.attn\.)qkv\.(.+)$")


def _lora_blocks(state: Mapping[str, Tensor]) -> set[int]:
    return {
        int(m.group(1))
        for k in state
        if ".lora_" in k and (m := _BLOCK_INDEX.search(k)) is not None
    }


def _span(blocks: set[int]) -> str:
    ordered = sorted(blocks)
    if ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{ordered[0]}-{ordered[-1]}"
    return ", ".join(map(str, ordered))
