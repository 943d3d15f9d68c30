"""Evaluation on target domains: confusion matrix -> per-class IoU, mIoU, DG average.

Each image is predicted at its evaluation scale (the dataset's eval pipeline resizes it) in
whole or sliding-window mode, the class scores are resized to the original image size and the
argmax is compared with the full-resolution label, as mmseg does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from rein.engine.distributed import get_rank, get_world_size, is_main
from rein.engine.metrics import ConfusionMatrix, dg_average

__all__ = ["evaluate_dataset", "evaluate_domains", "predict_labels"]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def predict_labels(
    model: nn.Module,
    image: torch.Tensor,
    out_size: tuple[int, int],
    mode: str = "slide",
    crop_size: int = 512,
    stride: int = 341,
    flip: bool = False,
    scales: tuple[float, ...] = (1.0,),
) -> torch.Tensor:
    """Argmax labels (B, *out_size) for a normalised batch (B, 3, H, W).

    ``scales`` != (1.0,) averages the class scores of rescaled inputs (multi-scale TTA).
    """
    seg = _unwrap(model)
    scores = None
    for s in scales:
        x = image
        if s != 1.0:
            size = (max(1, round(image.shape[-2] * s)), max(1, round(image.shape[-1] * s)))
            x = torch.nn.functional.interpolate(image, size=size, mode="bilinear", align_corners=False)
        out = seg.inference(x, mode=mode, crop_size=crop_size, stride=stride, out_size=out_size, flip=flip)
        scores = out if scores is None else scores + out
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
    """Confusion matrix of ``model`` over ``dataset`` (one image at a time; sizes vary)."""
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, device=device)
    loader = DataLoader(
        dataset, batch_size=1, shuffle=False, num_workers=num_workers,
        collate_fn=_collate_one,
    )
    it = loader
    if progress and is_main():
        from tqdm import tqdm

        it = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
    for sample in it:
        image = sample["image"].unsqueeze(0).to(device)
        label = sample["label"].to(device)
        pred = predict_labels(
            model, image, tuple(label.shape[-2:]),
            mode=eval_cfg.mode, crop_size=eval_cfg.crop_size, stride=eval_cfg.stride,
            flip=eval_cfg.flip, scales=tuple(eval_cfg.scales),
        )
        cm.update(pred[0], label)
    model.train(was_training)
    return cm


def evaluate_domains(
    model: nn.Module,
    datasets: Mapping[str, Dataset],
    num_classes: int,
    eval_cfg: Any,
    class_names: list[str] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    distributed: bool = False,
) -> dict[str, Any]:
    """``{domain: metrics dict, ..., "DG avg": float}`` over several target datasets.

    With ``distributed`` each rank evaluates a shard and the confusion matrices are summed.
    """
    results: dict[str, Any] = {}
    for name, ds in datasets.items():
        shard = ds
        if distributed:  # every image exactly once: rank r takes r, r + world, ...
            shard = Subset(ds, range(get_rank(), len(ds), get_world_size()))
        cm = evaluate_dataset(
            model, shard, num_classes, eval_cfg, device=device, progress=progress,
            desc=f"eval {name}",
        )
        if distributed:
            cm.all_reduce()
        results[name] = cm.to_dict(class_names)
    if results:
        results["DG avg"] = dg_average({k: v for k, v in results.items()})
    return results
