"""Evaluation on target domains: confusion matrix -> per-class IoU, mIoU, DG average.

Each image is predicted at its evaluation scale (the dataset's eval pipeline resizes it) in
whole or sliding-window mode, the class scores are resized to the original image size and the
argmax is compared with the full-resolution label, as mmseg does.

Every image counts once: with ``data.skip_bad`` an unreadable image is skipped (with a warning
naming it), not replaced by the next one as in training (:func:`rein.data.datasets.no_substitution`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from rein.engine.distributed import get_rank, get_world_size, is_main
from rein.engine.metrics import ConfusionMatrix, dg_average

__all__ = ["evaluate_dataset", "evaluate_domains", "predict_labels", "predict_scores"]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def predict_scores(
    model: nn.Module,
    image: torch.Tensor,
    out_size: tuple[int, int],
    mode: str = "slide",
    crop_size: int = 512,
    stride: int = 341,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
) -> torch.Tensor:
    """Class scores (B, K, *out_size) for a normalised batch (B, 3, H, W), with TTA.

    Each scale ``s`` runs the model on the image resized (bilinear) to ``round(s * (H, W))``
    (with ``flip``, also on its mirror image); the scores of every run are resized to
    ``out_size`` *before* they are averaged, so scales of any size combine pixel by pixel.
    """
    scales = tuple(float(s) for s in scales)
    if not scales or any(not s > 0 for s in scales):
        raise ValueError(f"eval scales must be a non-empty list of positive numbers, got {scales}")
    seg = _unwrap(model)
    total = None
    for s in scales:
        x = image
        if s != 1.0:
            size = (max(1, round(image.shape[-2] * s)), max(1, round(image.shape[-1] * s)))
            x = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        out = seg.inference(
            x, mode=mode, crop_size=crop_size, stride=stride, out_size=out_size, flip=flip
        )
        total = out if total is None else total + out
    return total / len(scales)


@torch.no_grad()
def predict_labels(
    model: nn.Module,
    image: torch.Tensor,
    out_size: tuple[int, int],
    mode: str = "slide",
    crop_size: int = 512,
    stride: int = 341,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
) -> torch.Tensor:
    """Argmax labels (B, *out_size) of :func:`predict_scores` (flip / multi-scale TTA)."""
    scores = predict_scores(
        model,
        image,
        out_size,
        mode=mode,
        crop_size=crop_size,
        stride=stride,
        flip=flip,
        scales=scales,
    )
    return scores.argmax(dim=1)


def _collate_one(batch: list[dict[str, Any]]) -> dict[str, Any]:
    return batch[0]


@torch.no_grad()
def evaluate_dataset(
    model: nn.Module,
    dataset: Dataset,
    num_classes: int,
    eval_cfg: Any,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    progress: bool = False,
    desc: str = "eval",
) -> ConfusionMatrix:
    """Confusion matrix of ``model`` over ``dataset`` (one image at a time; sizes vary).

    Bad images of a ``skip_bad`` dataset are skipped: each good image counts exactly once.
    """
    from rein.data.datasets import no_substitution

    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, device=device)
    loader = DataLoader(
        dataset,
        batch_size=1,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate_one,
    )
    with no_substitution(dataset):
        _accumulate(model, loader, cm, eval_cfg, device, progress, desc)
    model.train(was_training)
    return cm


def _accumulate(model, loader, cm, eval_cfg, device, progress: bool, desc: str) -> None:
    it = loader
    if progress and is_main():
        from rein.progress import progress_iter

        it = progress_iter(loader, desc=desc, leave=False)
    for sample in it:
        if sample is None:  # a bad image of a skip_bad dataset (warned about by the dataset)
            continue
        image = sample["image"].unsqueeze(0).to(device)
        label = sample["label"].to(device)
        pred = predict_labels(
            model,
            image,
            tuple(label.shape[-2:]),
            mode=eval_cfg.mode,
            crop_size=eval_cfg.crop_size,
            stride=eval_cfg.stride,
            flip=eval_cfg.flip,
            scales=tuple(eval_cfg.scales),
        )
        cm.update(pred[0], label)


def evaluate_domains(
    model: nn.Module,
    datasets: Mapping[str, Dataset],
    num_classes: int,
    eval_cfg: Any,
    class_names: list[str] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    distributed: bool = False,
    desc: str = "eval",
    num_workers: int = 0,
) -> dict[str, Any]:
    """``{domain: metrics dict, ..., "DG avg": float}`` over several target datasets.

    With ``distributed`` each rank evaluates a shard and the confusion matrices are summed.
    ``desc`` prefixes the progress-bar label; ``num_workers`` loads (and e.g. corrupts)
    images in DataLoader worker processes.
    """
    results: dict[str, Any] = {}
    for name, ds in datasets.items():
        shard = ds
        if distributed:  # every image exactly once: rank r takes r, r + world, ...
            shard = Subset(ds, range(get_rank(), len(ds), get_world_size()))
        cm = evaluate_dataset(
            model,
            shard,
            num_classes,
            eval_cfg,
            device=device,
            num_workers=num_workers,
            progress=progress,
            desc=f"{desc} {name}",
        )
        if distributed:
            cm.all_reduce()
        results[name] = cm.to_dict(class_names)
    if results:
        results["DG avg"] = dg_average({k: v for k, v in results.items()})
    return results
