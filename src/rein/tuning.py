"""Which parameters train: the tuning method of an experiment.

* ``rein``: the foundation model is frozen; Rein and the decode head train.
* ``frozen``: the foundation model is frozen; only the decode head (learned queries) trains.
* ``full``: everything trains (the backbone leaves eval mode).
"""

from __future__ import annotations

from torch import nn

__all__ = ["TUNING_METHODS", "apply_tuning"]

TUNING_METHODS = ("rein", "frozen", "full", "lora", "vpt", "adaptformer")
IMPLEMENTED = ("rein", "frozen", "full")


def apply_tuning(model: nn.Module, method: str) -> None:
    """Set ``requires_grad`` and train/eval policy of a :class:`~rein.segmentor.Segmentor`."""
    if method not in TUNING_METHODS:
        raise ValueError(f"unknown tuning method '{method}'; choose one of {TUNING_METHODS}")
    if method not in IMPLEMENTED:
        raise NotImplementedError(
            f"tuning method '{method}' is not implemented yet; available: {IMPLEMENTED}"
        )
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
    for p in model.decode_head.parameters():  # type: ignore[attr-defined]
        p.requires_grad_(True)
