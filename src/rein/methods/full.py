"""``full``: full fine-tuning; every backbone weight trains (at ``optim.backbone_lr_mult``)."""

from __future__ import annotations

from rein.methods.base import TuningMethod

__all__ = ["FullMethod"]


class FullMethod(TuningMethod):
    """Everything trains and the backbone follows train()/eval().

    ``mask_token`` is unused by the forward pass, so it stays frozen (out of AdamW).
    """

    name = "full"
    frozen_backbone = False

    def is_trainable(self, name: str) -> bool:
        return name != "backbone.mask_token"
