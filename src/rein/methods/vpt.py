"""``vpt``: deep visual prompt tuning, ``num_prompts`` (10) learnable tokens per block."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor, nn

from rein.methods.base import (
    BaseLayerWrapper,
    TuningMethod,
    adapted_blocks,
    positive_int,
    reference_param,
)

__all__ = ["VPTOptions", "VPTMethod", "PromptedBlock"]


@dataclasses.dataclass
class VPTOptions:
    num_prompts: int = 10

    def validate(self, method: str) -> None:
        self.num_prompts = positive_int(method, "num_prompts", self.num_prompts)


class PromptedBlock(BaseLayerWrapper):
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
        ref = reference_param(base_layer)
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


class VPTMethod(TuningMethod):
    name = "vpt"
    Options = VPTOptions

    def adapt(self, backbone: nn.Module) -> None:
        blocks, indices = adapted_blocks(backbone, self.name)
        if not getattr(backbone, "supports_prompts", False):
            raise ValueError(
                "tuning 'vpt' needs a plain ViT backbone (DINOv2, CLIP, MAE: token sequences "
                f"with absolute positions); {type(backbone).__name__} runs its blocks on rotary "
                "positions or 2-D token maps where prompt tokens do not fit"
            )
        for i in indices:
            blocks[i] = PromptedBlock(
                blocks[i],
                num_prompts=self.options.num_prompts,
                embed_dim=backbone.embed_dim,
                num_prefix_tokens=backbone.num_prefix_tokens,
                patch_size=backbone.patch_size,
            )

    def report_group(self, name: str) -> str | None:
        if name.startswith("backbone.") and name.endswith(".prompts") and ".blocks." in name:
            return "vpt"
        return None

    def is_trainable(self, name: str) -> bool:
        return self.report_group(name) is not None
