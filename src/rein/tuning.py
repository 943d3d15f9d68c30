"""Which parameters train: the tuning method of an experiment (``model.tuning``).

Every method runs on the same backbone (:class:`~rein.backbones.vit.ReinViT`) and the same
Mask2Former head; the decode head always trains.

=============  ==========================================================================
``rein``       the foundation model is frozen; Rein and the decode head train.
``frozen``     the foundation model is frozen; only the decode head (learned queries) trains.
``full``       everything trains (the backbone leaves eval mode).
``lora``       LoRA (Hugging Face ``peft``) on the frozen ViT's Linear layers ``targets``
               (default ``[qkv]``), rank ``rank`` (16), ``alpha`` (= rank), dropout 0.
``vpt``        deep visual prompt tuning: ``num_prompts`` (10) learnable tokens per block,
               inserted after the prefix tokens (class / registers) before the block and
               dropped after it.
``adaptformer`` a parallel bottleneck adapter on every block's MLP:
               ``mlp(x) + scale * up(relu(down(x)))``, ``bottleneck`` (64), ``scale`` (0.1).
=============  ==========================================================================

Options come from ``model.tuning_options``; unknown ones raise a :class:`ValueError`.
For the three PEFT baselines the ViT stays frozen and in eval mode, and only the blocks that
the backbone runs (``blocks[: last_index + 1]``) are adapted. The adapted frozen module is
wrapped and moves one level down as ``base_layer`` (the ``peft`` convention), so parameter
names read::

    backbone.vit.blocks.3.attn.qkv.lora_A.default.weight    lora   (frozen: ...qkv.base_layer.*)
    backbone.vit.blocks.3.prompts                           vpt    (frozen: ...3.base_layer.*)
    backbone.vit.blocks.3.mlp.adapter.down.weight           adaptformer (...mlp.base_layer.*)

They live under ``backbone.``, so trainable-only checkpoints contain them; :func:`param_group`
maps a parameter name to its reporting group.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "TUNING_METHODS",
    "TUNING_OPTIONS",
    "AdaptFormerMlp",
    "BottleneckAdapter",
    "PromptedBlock",
    "apply_tuning",
    "param_group",
    "resolve_tuning_options",
]

TUNING_METHODS = ("rein", "frozen", "full", "lora", "vpt", "adaptformer")

# Allowed options of each method with their defaults (``alpha: None`` means "= rank").
TUNING_OPTIONS: dict[str, dict[str, Any]] = {
    "rein": {},
    "frozen": {},
    "full": {},
    "lora": {"rank": 16, "alpha": None, "targets": ["qkv"]},
    "vpt": {"num_prompts": 10},
    "adaptformer": {"bottleneck": 64, "scale": 0.1},
}

PEFT_METHODS = ("lora", "vpt", "adaptformer")


# --------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------


def _positive_int(method: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"tuning '{method}': option '{key}' must be a positive integer, got {value!r}"
        )
    return value


def _number(method: str, key: str, value: Any, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"tuning '{method}': option '{key}' must be a number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"tuning '{method}': option '{key}' must be > 0, got {value!r}")
    return float(value)


def _targets(method: str, value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if (
        not isinstance(items, Sequence)
        or not items
        or not all(isinstance(t, str) and t for t in items)
    ):
        raise ValueError(
            f"tuning '{method}': option 'targets' must be a non-empty list of Linear layer "
            f"names such as [qkv, proj, fc1, fc2], got {value!r}"
        )
    return list(dict.fromkeys(items))  # drop duplicates, keep order


def resolve_tuning_options(method: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults of ``method`` updated with ``options``, validated.

    Raises:
        ValueError: unknown method, unknown option (naming the allowed ones) or a bad value.
    """
    if method not in TUNING_METHODS:
        raise ValueError(f"unknown tuning method '{method}'; choose one of {TUNING_METHODS}")
    allowed = TUNING_OPTIONS[method]
    options = dict(options or {})
    unknown = sorted(k for k in options if k not in allowed)
    if unknown:
        names = ", ".join(allowed) if allowed else "none"
        raise ValueError(
            f"unknown option(s) {', '.join(repr(k) for k in unknown)} for tuning '{method}'; "
            f"allowed options: {names}"
        )
    out = {**allowed, **options}
    if method == "lora":
        out["rank"] = _positive_int(method, "rank", out["rank"])
        alpha = out["rank"] if out["alpha"] is None else out["alpha"]
        out["alpha"] = _number(method, "alpha", alpha, positive=True)
        out["targets"] = _targets(method, out["targets"])
    elif method == "vpt":
        out["num_prompts"] = _positive_int(method, "num_prompts", out["num_prompts"])
    elif method == "adaptformer":
        out["bottleneck"] = _positive_int(method, "bottleneck", out["bottleneck"])
        out["scale"] = _number(method, "scale", out["scale"])
    return out


def param_group(name: str) -> str | None:
    """Reporting group of a PEFT-baseline parameter (``lora``/``vpt``/``adaptformer``), else None."""
    if not name.startswith("backbone.") or name.startswith("backbone.reins."):
        return None
    if ".lora_" in name:
        return "lora"
    if name.endswith(".prompts") and ".blocks." in name:
        return "vpt"
    if ".adapter." in name:
        return "adaptformer"
    return None


# --------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------


class _Wrapper(nn.Module):
    """A module wrapping a frozen ``base_layer``; unknown attributes fall through to it."""

    base_layer: nn.Module

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)


def _reference(module: nn.Module) -> Tensor:
    """A parameter of ``module`` giving the device and dtype for new adapter weights."""
    return next(module.parameters())


class PromptedBlock(_Wrapper):
    """Deep VPT around one transformer block.

    ``(B, P + N, C) -> (B, P + N, C)``: the ``num_prompts`` learnable tokens (``prompts``,
    ``(n, C)``) are inserted after the ``P`` prefix tokens, the frozen block runs on
    ``P + n + N`` tokens, and the prompt outputs are dropped, so the next block gets fresh
    prompts (deep VPT) and the caller sees the original token count.

    Init as in the VPT paper: ``U(+-sqrt(6 / (3 * patch**2 + C)))``.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        num_prompts: int,
        embed_dim: int,
        num_prefix_tokens: int,
        patch_size: int,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.num_prefix_tokens = num_prefix_tokens
        ref = _reference(base_layer)
        self.prompts = nn.Parameter(
            torch.empty(num_prompts, embed_dim, device=ref.device, dtype=ref.dtype)
        )
        bound = math.sqrt(6.0 / (3 * patch_size * patch_size + embed_dim))
        nn.init.uniform_(self.prompts, -bound, bound)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        n, p = self.num_prefix_tokens, self.prompts.shape[0]
        prompts = self.prompts.to(x.dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :n], prompts, x[:, n:]], dim=1)
        x = self.base_layer(x, *args, **kwargs)
        return torch.cat([x[:, :n], x[:, n + p :]], dim=1)


class BottleneckAdapter(nn.Module):
    """``up(relu(down(x)))``: ``C -> bottleneck -> C``; ``up`` starts at zero (output 0)."""

    def __init__(self, dim: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.ReLU()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.act(self.down(x)))


class AdaptFormerMlp(_Wrapper):
    """AdaptFormer (parallel): ``base_layer(x) + scale * adapter(x)`` around a block's MLP.

    The adapter sees the MLP's input (after the block's ``norm2``), and the sum goes through
    the block's LayerScale / residual like the MLP output would.
    """

    def __init__(self, base_layer: nn.Module, dim: int, bottleneck: int, scale: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        ref = _reference(base_layer)
        self.adapter = BottleneckAdapter(dim, bottleneck).to(device=ref.device, dtype=ref.dtype)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.base_layer(x) + self.scale * self.adapter(x)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


# --------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------


def _blocks(backbone: nn.Module, method: str) -> tuple[nn.Module, range]:
    """The transformer blocks of ``backbone.vit`` and the indices of those that run.

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


def _add_lora(backbone: nn.Module, rank: int, alpha: float, targets: list[str]) -> None:
    """Inject peft LoRA layers into the targeted Linear layers of the adapted blocks."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "tuning 'lora' needs Hugging Face peft: pip install 'rein[baselines]' (or peft>=0.10)"
        ) from exc

    blocks, indices = _blocks(backbone, "lora")
    names: list[str] = []
    for i in indices:
        linears = [n for n, m in blocks[i].named_modules() if isinstance(m, nn.Linear)]
        for target in targets:
            hits = [n for n in linears if n == target or n.endswith(f".{target}")]
            if not hits:
                raise ValueError(
                    f"tuning 'lora': target '{target}' matches no Linear layer of blocks.{i}; "
                    f"its Linear layers are: {', '.join(linears) or 'none'}"
                )
            names.extend(f"blocks.{i}.{n}" for n in hits)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,  # the frozen ViT always runs in eval mode: dropout would be inert
        bias="none",
        target_modules=sorted(set(names)),
    )
    inject_adapter_in_model(config, backbone.vit)


def _add_vpt(backbone: nn.Module, num_prompts: int) -> None:
    from rein.backbones.vit import ReinViT

    blocks, indices = _blocks(backbone, "vpt")
    if type(backbone) is not ReinViT:
        raise ValueError(
            "tuning 'vpt' needs a plain ViT backbone (DINOv2, CLIP, MAE: token sequences with "
            f"absolute positions); {type(backbone).__name__} runs its blocks on rotary "
            "positions or 2-D token maps where prompt tokens do not fit"
        )
    for i in indices:
        blocks[i] = PromptedBlock(
            blocks[i],
            num_prompts=num_prompts,
            embed_dim=backbone.embed_dim,
            num_prefix_tokens=backbone.num_prefix_tokens,
            patch_size=backbone.patch_size,
        )


def _add_adaptformer(backbone: nn.Module, bottleneck: int, scale: float) -> None:
    blocks, indices = _blocks(backbone, "adaptformer")
    for i in indices:
        block = blocks[i]
        if not isinstance(getattr(block, "mlp", None), nn.Module):
            raise ValueError(f"tuning 'adaptformer': blocks.{i} has no 'mlp' module to adapt")
        block.mlp = AdaptFormerMlp(block.mlp, backbone.embed_dim, bottleneck, scale)


def apply_tuning(model: nn.Module, method: str, options: Mapping[str, Any] | None = None) -> None:
    """Apply tuning ``method`` (with ``options``) to a :class:`~rein.segmentor.Segmentor`.

    Adds the method's modules to the backbone (lora / vpt / adaptformer), then sets
    ``requires_grad`` (the method's parameters and the decode head) and the train/eval
    policy (the ViT stays in eval mode unless ``full``).

    Raises:
        ValueError: unknown method or option, a bad option value, Rein missing for ``rein``
            or present for a PEFT baseline, or a backbone that is already adapted.
    """
    opts = resolve_tuning_options(method, options)
    backbone = model.backbone  # type: ignore[attr-defined]
    if method == "full":
        backbone.frozen = False
        for p in backbone.parameters():
            p.requires_grad_(True)
        if hasattr(backbone, "mask_token"):  # unused by the forward pass: keep it out of AdamW
            backbone.mask_token.requires_grad_(False)
    else:
        backbone.freeze()
        if method == "rein" and backbone.reins is None:
            raise ValueError("tuning 'rein' needs a backbone built with Rein")
    if method in PEFT_METHODS:
        if backbone.reins is not None:
            raise ValueError(
                f"tuning '{method}' runs on the plain frozen backbone, but this one has Rein; "
                "build it with model.tuning set to the method"
            )
        adapted = sorted({g for n, _ in model.named_parameters() if (g := param_group(n))})
        if adapted:
            raise ValueError(f"the backbone already has {'/'.join(adapted)} parameters")
        if method == "lora":
            _add_lora(backbone, opts["rank"], opts["alpha"], opts["targets"])
        elif method == "vpt":
            _add_vpt(backbone, opts["num_prompts"])
        else:
            _add_adaptformer(backbone, opts["bottleneck"], opts["scale"])
        for name, p in backbone.named_parameters(prefix="backbone"):
            p.requires_grad_(param_group(name) == method)
        backbone.train(backbone.training)  # re-apply eval mode to the frozen ViT and new modules
    for p in model.decode_head.parameters():  # type: ignore[attr-defined]
        p.requires_grad_(True)
