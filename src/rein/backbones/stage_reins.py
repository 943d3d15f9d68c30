"""Rein for hierarchical backbones whose stages have different widths.

A ConvNet has four stages of widths ``C_1..C_4`` (e.g. 256/512/1024/2048 for ResNet-50), so one
:class:`~rein.reins.Reins` with a single ``embed_dims`` cannot follow all of them.
:class:`StageReins` holds one Rein module per stage, each with one layer of ``token_length``
tokens of that stage's width, its own ``mlp_token2feat`` / ``mlp_delta_f`` and its own
``scale``. ``StageReins(feats, stage)`` refines the flattened stage output exactly as Rein refines
a ViT block output (first token a sink, ``f + scale * mlp_delta_f(attn @ mlp_token2feat(T) + f)``).

Rein-link over stages: each stage's tokens (m, C_i) go through their own ``transform[i]``
(Linear C_i -> Q), giving (S, m, Q) for S stages; max, mean and last over the stages are stacked
per channel and ``merge`` (Linear 3Q -> Q) maps them to the (m, Q) object queries, exactly as
:meth:`Reins.queries` does over the layers of a ViT. Token ``j`` of every stage feeds query ``j``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from rein.reins import Reins

__all__ = ["StageReins"]


class StageReins(nn.Module):
    """One single-layer Rein per stage, plus Rein-link over the stages.

    Args:
        stages: one :class:`Reins` (or ``LoRAReins``) per stage, each with ``num_layers=1``,
            the stage's width and ``link_token_to_query=False``; all with the same token_length.
        query_dims: width Q of the object queries.
        link_token_to_query: build ``transform`` / ``merge`` (Rein-link).
    """

    def __init__(
        self, stages: Sequence[Reins], query_dims: int = 256, link_token_to_query: bool = True
    ) -> None:
        super().__init__()
        lengths = {r.token_length for r in stages}
        if not stages or len(lengths) != 1:
            raise ValueError(f"StageReins needs stages with one token_length; got {lengths}")
        for r in stages:
            if r.num_layers != 1 or r.link_token_to_query:
                raise ValueError("each stage Rein needs num_layers=1 and link_token_to_query=False")
        self.stages = nn.ModuleList(stages)
        self.token_length = lengths.pop()
        self.query_dims = query_dims
        self.link_token_to_query = link_token_to_query
        if link_token_to_query:
            self.transform = nn.ModuleList(nn.Linear(r.embed_dims, query_dims) for r in stages)
            self.merge = nn.Linear(query_dims * 3, query_dims)

    @property
    def num_layers(self) -> int:
        """Number of stages Rein follows."""
        return len(self.stages)

    @property
    def embed_dims(self) -> list[int]:
        """Width of each stage."""
        return [r.embed_dims for r in self.stages]

    def forward(self, feats: Tensor, layer: int, num_prefix_tokens: int = 0) -> Tensor:
        """Refine the flattened output (B, N, C_layer) of stage ``layer``."""
        return self.stages[layer](feats, 0, num_prefix_tokens=num_prefix_tokens)

    def queries(self) -> Tensor:
        """Rein-link object queries (token_length, query_dims) from the tokens of all stages."""
        if not self.link_token_to_query:
            raise RuntimeError("this StageReins was built with link_token_to_query=False")
        t = torch.stack(
            [proj(r.get_tokens(0)) for proj, r in zip(self.transform, self.stages)]
        )  # (S, m, Q)
        stacked = torch.stack([t.amax(dim=0), t.mean(dim=0), t[-1]], dim=-1)  # (m, Q, 3)
        return self.merge(stacked.flatten(-2))  # (m, Q)
