"""The contract every Rein backbone keeps, and the pieces its wrappers share.

A backbone module wraps one **unmodified** timm model (the frozen vision foundation model) and
maps images ``(B, 3, H, W)`` to ``(features, queries)``:

* ``features``: four maps at strides 4, 8, 16 and 32 of the input, ``(B, C_i, H/s, W/s)`` with
  ``C_i = out_channels[i]``;
* ``queries``: the Rein-link object queries ``(token_length, query_dims)``, or ``None`` without
  Rein or without Rein-link.

Besides ``forward`` every backbone exposes ``reins`` (the Rein module or ``None``; its parameters
are named ``reins.*``), ``out_channels`` (four widths), ``patch_size`` (input sides must be a
multiple of it; the segmentor pads to it), ``timm_model`` (the wrapped timm model),
``frozen``, ``freeze()`` and ``frozen_parameters()``. Everything but ``reins.*`` belongs to the
foundation model: when frozen its weights never get gradients and it stays in eval mode (no
dropout or drop-path, BatchNorm on its running statistics) whatever ``train()`` is asked.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "OUT_SCALES",
    "ReinBackbone",
    "check_input_size",
    "check_out_indices",
    "check_reins_fit",
    "create_timm_model",
    "to_strides",
    "timm_patch_size",
]

# Resize factors that turn four stride-16 (patch) maps into strides 4, 8, 16 and 32.
OUT_SCALES = (4.0, 2.0, 1.0, 0.5)


def create_timm_model(name: str, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=0, **kwargs)`` with a clear error.

    ``name`` may carry a pretrained tag (``vit_large_patch16_224.mae``). An unknown name raises
    :class:`ValueError` listing the closest timm names.
    """
    import timm

    check_timm_name(name)
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


def check_timm_name(name: str) -> None:
    """Raise :class:`ValueError` with the closest timm names when timm does not know ``name``."""
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.5)
        hint = f"; closest timm names: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown backbone '{name}'{hint}")


def timm_patch_size(model: nn.Module) -> int:
    """Patch size of a timm ViT-like model (``patch_embed.patch_size``, first side)."""
    ps = model.patch_embed.patch_size
    return int(ps if isinstance(ps, int) else ps[0])


def check_input_size(height: int, width: int, multiple: int) -> None:
    """Raise a :class:`ValueError` naming a padded size when a side is not a multiple."""
    if height % multiple or width % multiple:
        ok_h = math.ceil(height / multiple) * multiple
        ok_w = math.ceil(width / multiple) * multiple
        raise ValueError(
            f"input size {height}x{width} is not a multiple of the patch size {multiple}; "
            f"pad it to {ok_h}x{ok_w} (the segmentor pads automatically)"
        )


def check_out_indices(out_indices: Sequence[int], depth: int) -> list[int]:
    """Four block indices in ``[0, depth)``, or a :class:`ValueError`."""
    indices = list(out_indices)
    if len(indices) != 4 or not all(0 <= i < depth for i in indices):
        raise ValueError(f"out_indices must be 4 block indices in [0, {depth}); got {indices}")
    return indices


def check_reins_fit(reins: nn.Module | None, num_layers: int, embed_dims: int) -> None:
    """Reject a Rein module whose width or number of layers does not fit the backbone."""
    if reins is None:
        return
    if reins.embed_dims != embed_dims:
        raise ValueError(
            f"Rein embed_dims={reins.embed_dims} does not match the backbone width "
            f"{embed_dims}; set it to {embed_dims}"
        )
    if reins.num_layers != num_layers:
        raise ValueError(
            f"Rein num_layers={reins.num_layers} but the backbone has {num_layers} "
            f"blocks; Rein follows every block, set num_layers={num_layers}"
        )


def to_strides(maps: Sequence[Tensor]) -> list[Tensor]:
    """Four patch-stride maps -> strides 4/8/16/32 (bilinear x4, x2, x1, x0.5, as official)."""
    return [
        fmap
        if s == 1
        else F.interpolate(fmap, scale_factor=s, mode="bilinear", align_corners=False)
        for fmap, s in zip(maps, OUT_SCALES)
    ]


class ReinBackbone(nn.Module):
    """Base of the backbone wrappers: freezing policy, train/eval and Rein-link queries.

    Subclasses set ``patch_size`` and ``reins``, implement ``timm_model``, ``out_channels`` and
    ``forward``, and call :meth:`freeze` at the end of their constructor when asked to freeze.
    """

    reins: nn.Module | None
    patch_size: int
    #: whether a tuning method may insert extra (prompt) tokens into the blocks' sequences
    supports_prompts: bool = False
    #: strides of the stages of a hierarchical backbone (None: a ViT with one token grid)
    stage_strides: tuple[int, ...] | None = None

    def __init__(self) -> None:
        super().__init__()
        self.frozen = False
        #: recompute each transformer block's activations in the backward pass instead of
        #: keeping them (``model.backbone.checkpointing``; ViT / EVA / SAM backbones)
        self.checkpointing = False

    def run_block(
        self,
        block: nn.Module,
        tokens: Tensor,
        after: Callable[[Tensor], Tensor] | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """``after(block(tokens, **kwargs))`` (``after``: the Rein layer that follows the block,
        if any), under activation checkpointing when it is on and a backward pass will follow.

        Block and Rein layer are checkpointed as one: only the block's input is kept, and both
        are recomputed in the backward pass (the random state is replayed, so gradients are
        the same). Checkpointing the block alone would still keep every activation of Rein.
        """

        def step(x: Tensor) -> Tensor:
            x = block(x, **kwargs)
            return after(x) if after is not None else x

        if self.checkpointing and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(step, tokens, use_reentrant=False)
        return step(tokens)

    @property
    def timm_model(self) -> nn.Module:
        """The wrapped timm model (holds every frozen weight but ``mask_token``)."""
        raise NotImplementedError

    @property
    def out_channels(self) -> list[int]:
        """Widths of the four output maps (strides 4, 8, 16, 32)."""
        raise NotImplementedError

    def frozen_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the foundation model (everything but Rein)."""
        return (p for n, p in self.named_parameters() if not n.startswith("reins."))

    def freeze(self) -> None:
        """Stop weight gradients of the foundation model; it stays in eval mode."""
        self.frozen = True
        for p in self.frozen_parameters():
            p.requires_grad_(False)
        self.timm_model.eval()

    def train(self, mode: bool = True) -> ReinBackbone:
        super().train(mode)
        if self.frozen:
            self.timm_model.eval()  # no dropout / drop-path, BatchNorm keeps running stats
        return self

    def link_queries(self) -> Tensor | None:
        """Rein-link queries (token_length, query_dims), or ``None`` without them."""
        if self.reins is not None and self.reins.link_token_to_query:
            return self.reins.queries()
        return None
