"""``lora``: LoRA (Hugging Face ``peft``) on Linear layers of the frozen ViT's blocks.

Rank ``rank`` (16), ``alpha`` (= rank when null), dropout 0, on the Linear layers named by
``targets`` (default ``[qkv]``) in every block that runs. peft wraps each targeted layer, so the
frozen weight reads ``...qkv.base_layer.weight`` and the adapter ``...qkv.lora_A.default.weight``.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from rein.methods.base import (
    TuningMethod,
    adapted_blocks,
    finite_number,
    linear_targets,
    positive_int,
)

__all__ = ["LoRAOptions", "LoRAMethod"]


@dataclasses.dataclass
class LoRAOptions:
    rank: int = 16
    alpha: float | None = None  # None: = rank
    targets: list[str] = dataclasses.field(default_factory=lambda: ["qkv"])

    def validate(self, method: str) -> None:
        self.rank = positive_int(method, "rank", self.rank)
        alpha = self.rank if self.alpha is None else self.alpha
        self.alpha = finite_number(method, "alpha", alpha, positive=True)
        self.targets = linear_targets(method, self.targets)


class LoRAMethod(TuningMethod):
    name = "lora"
    Options = LoRAOptions

    def adapt(self, backbone: nn.Module) -> None:
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "tuning 'lora' needs Hugging Face peft: pip install 'rein[baselines]' "
                "(or peft>=0.10)"
            ) from exc

        opts = self.options
        blocks, indices = adapted_blocks(backbone, self.name)
        names: list[str] = []
        for i in indices:
            linears = [n for n, m in blocks[i].named_modules() if isinstance(m, nn.Linear)]
            for target in opts.targets:
                hits = [n for n in linears if n == target or n.endswith(f".{target}")]
                if not hits:
                    raise ValueError(
                        f"tuning 'lora': target '{target}' matches no Linear layer of "
                        f"blocks.{i}; its Linear layers are: {', '.join(linears) or 'none'}"
                    )
                names.extend(f"blocks.{i}.{n}" for n in hits)
        config = LoraConfig(
            r=opts.rank,
            lora_alpha=opts.alpha,
            lora_dropout=0.0,  # the frozen ViT always runs in eval mode: dropout would be inert
            bias="none",
            target_modules=sorted(set(names)),
        )
        inject_adapter_in_model(config, backbone.vit)

    def merge(self, model: nn.Module) -> bool:
        """Fold every peft LoRA layer into its frozen weight (peft's ``merge``; idempotent)."""
        from peft.tuners.lora import LoraLayer

        for module in model.modules():
            if isinstance(module, LoraLayer) and not module.merged:
                module.merge()
        return True

    def report_group(self, name: str) -> str | None:
        return "lora" if name.startswith("backbone.") and ".lora_" in name else None

    def is_trainable(self, name: str) -> bool:
        return self.report_group(name) is not None
