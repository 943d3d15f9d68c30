"""``adaptformer``: a parallel bottleneck adapter on every block's MLP.

``mlp(x) + scale * up(relu(down(x)))`` with ``bottleneck`` (64) and ``scale`` (0.1).
"""

from __future__ import annotations

import dataclasses
import math

from torch import Tensor, nn

from rein.methods.base import (
    BaseLayerWrapper,
    TuningMethod,
    adapted_blocks,
    finite_number,
    positive_int,
    reference_param,
)

__all__ = ["AdaptFormerOptions", "AdaptFormerMethod", "AdaptFormerMlp", "BottleneckAdapter"]


@dataclasses.dataclass
class AdaptFormerOptions:
    bottleneck: int = 64
    scale: float = 0.1

    def validate(self, method: str) -> None:
        self.bottleneck = positive_int(method, "bottleneck", self.bottleneck)
        self.scale = finite_number(method, "scale", self.scale)


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


class AdaptFormerMlp(BaseLayerWrapper):
    """AdaptFormer (parallel): ``base_layer(x) + scale * adapter(x)`` around a block's MLP.

    The adapter sees the MLP's input (after the block's ``norm2``), and the sum goes through
    the block's LayerScale / residual like the MLP output would.
    """

    def __init__(self, base_layer: nn.Module, dim: int, bottleneck: int, scale: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        ref = reference_param(base_layer)
        self.adapter = BottleneckAdapter(dim, bottleneck).to(device=ref.device, dtype=ref.dtype)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.base_layer(x) + self.scale * self.adapter(x)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class AdaptFormerMethod(TuningMethod):
    name = "adaptformer"
    Options = AdaptFormerOptions

    def adapt(self, backbone: nn.Module) -> None:
        blocks, indices = adapted_blocks(backbone, self.name)
        for i in indices:
            block = blocks[i]
            if not isinstance(getattr(block, "mlp", None), nn.Module):
                raise ValueError(f"tuning 'adaptformer': blocks.{i} has no 'mlp' module to adapt")
            block.mlp = AdaptFormerMlp(
                block.mlp, backbone.embed_dim, self.options.bottleneck, self.options.scale
            )

    def report_group(self, name: str) -> str | None:
        return "adaptformer" if name.startswith("backbone.") and ".adapter." in name else None

    def is_trainable(self, name: str) -> bool:
        return self.report_group(name) is not None
