"""Segmentation metrics: confusion matrix -> IoU per class / per domain / DG average.

The result dict of one domain (:meth:`ConfusionMatrix.to_dict`) is::

    {"mIoU": 66.4, "aAcc": 94.1, "mAcc": 75.0,
     "IoU": {"road": 92.3, ...}, "Acc": {"road": 96.0, ...}, "num_pixels": 1234567}

All values are percentages; a class absent from both predictions and ground truth has IoU
NaN (``null`` once written as JSON) and is left out of the mean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from rein.engine.checkpoint import write_json_atomic

__all__ = [
    "ConfusionMatrix",
    "dg_average",
    "format_table",
    "format_summary",
    "markdown_table",
    "write_json_atomic",
]


class ConfusionMatrix:
    """Accumulates a ``num_classes x num_classes`` confusion matrix (rows: gt, cols: pred).

    Target pixels equal to ``ignore_index`` or outside ``[0, num_classes)`` are skipped.
    """

    def __init__(
        self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        """Zero the counts."""
        self.mat.zero_()

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch of predicted and ground-truth label maps (same shape, integer dtype)."""
        if pred.shape != target.shape:
            raise ValueError(
                f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)} "
                "(pass label maps, e.g. logits.argmax(1), not logits)"
            )
        if pred.is_floating_point() or target.is_floating_point():
            raise TypeError("pred and target must be integer label maps")
        k = self.num_classes
        if self.mat.device != target.device:
            self.mat = self.mat.to(target.device)
        pred = pred.reshape(-1).to(device=target.device, dtype=torch.int64)
        target = target.reshape(-1).to(torch.int64)
        valid = (target >= 0) & (target < k) & (target != self.ignore_index)
        pred, target = pred[valid], target[valid]
        if pred.numel() == 0:
            return
        lo, hi = int(pred.min()), int(pred.max())
        if lo < 0 or hi >= k:
            raise ValueError(f"predicted labels must lie in [0, {k}), got values in [{lo}, {hi}]")
        counts = torch.bincount(target * k + pred, minlength=k * k)
        self.mat += counts.reshape(k, k)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add the counts of ``other`` (e.g. from another worker); returns self."""
        if other.num_classes != self.num_classes:
            raise ValueError(
                f"cannot merge confusion matrices of {other.num_classes} and "
                f"{self.num_classes} classes"
            )
        self.mat += other.mat.to(self.mat.device)
        return self

    def all_reduce(self) -> ConfusionMatrix:
        """Sum the counts over all DDP ranks (no-op without torch.distributed); returns self."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        t = self.mat
        if dist.get_backend() == "nccl" and t.device.type != "cuda":
            t = t.to(torch.device("cuda", torch.cuda.current_device()))
        elif dist.get_backend() == "gloo" and t.device.type != "cpu":
            t = t.cpu()
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        self.mat = t.to(self.mat.device)
        return self

    # ---- derived metrics (float64, on CPU) -------------------------------------------

    def _counts(self) -> tuple[Tensor, Tensor, Tensor]:
        mat = self.mat.detach().cpu().to(torch.float64)
        tp = mat.diagonal()
        return tp, mat.sum(1), mat.sum(0)  # true positives, gt totals, prediction totals

    def iou(self) -> Tensor:
        """Per-class IoU in [0, 1]; NaN for classes absent from both predictions and gt."""
        tp, gt, pr = self._counts()
        union = gt + pr - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))

    def class_acc(self) -> Tensor:
        """Per-class recall in [0, 1]; NaN for classes absent from the gt."""
        tp, gt, _ = self._counts()
        return torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, math.nan))

    def miou(self) -> float:
        """Mean IoU over classes present in predictions or gt, in %."""
        return _nanmean_pct(self.iou())

    def macc(self) -> float:
        """Mean per-class accuracy over classes present in the gt, in %."""
        return _nanmean_pct(self.class_acc())

    def acc(self) -> float:
        """Overall pixel accuracy, in % (NaN before any valid pixel)."""
        tp, gt, _ = self._counts()
        total = gt.sum().item()
        return 100.0 * tp.sum().item() / total if total > 0 else math.nan

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """Results as plain Python (percentages), keyed by class name."""
        names = list(class_names) if class_names is not None else []
        if not names:
            names = [str(i) for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"got {len(names)} class names for {self.num_classes} classes")
        iou = (self.iou() * 100).tolist()
        cacc = (self.class_acc() * 100).tolist()
        return {
            "mIoU": self.miou(),
            "aAcc": self.acc(),
            "mAcc": self.macc(),
            "IoU": dict(zip(names, iou)),
            "Acc": dict(zip(names, cacc)),
            "num_pixels": int(self.mat.sum().item()),
        }


def _nanmean_pct(values: Tensor) -> float:
    present = values[~torch.isnan(values)]
    return 100.0 * present.mean().item() if present.numel() else math.nan


# --------------------------------------------------------------------------------------
# Across domains / methods
# --------------------------------------------------------------------------------------


def _value(x: Any) -> float:
    """A number from a result entry (a float, None, or a per-domain dict with 'mIoU')."""
    if isinstance(x, Mapping):
        x = x.get("mIoU")
    return math.nan if x is None else float(x)


def dg_average(results: Mapping[str, Any], domains: Sequence[str] | None = None) -> float:
    """Mean of the per-domain mIoU over the target ``domains`` (default: all in ``results``).

    ``results`` maps domain -> result dict (with ``mIoU``) or directly -> mIoU.
    """
    names = list(results) if domains is None else list(domains)
    missing = [d for d in names if d not in results]
    if missing:
        raise KeyError(f"no results for domain(s): {', '.join(missing)}")
    if not names:
        return math.nan
    return sum(_value(results[d]) for d in names) / len(names)


def _fmt(x: Any, digits: int) -> str:
    v = _value(x)
    return "-" if math.isnan(v) else f"{v:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table, first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "| " + " | ".join([first, *rest]) + " |"

    sep = "|" + "|".join(
        "-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)
    )
    return "\n".join([line(header), sep + "|", *(line(r) for r in rows)])


def format_table(
    results: Mapping[str, Mapping[str, Any]],
    class_names: Sequence[str] | None = None,
    digits: int = 2,
) -> str:
    """Markdown table: one row per class (IoU %), one column per domain, then mIoU / aAcc.

    ``results`` maps domain -> :meth:`ConfusionMatrix.to_dict` output. Class names default
    to those of the first domain.
    """
    domains = list(results)
    if class_names is None:
        class_names = list(next(iter(results.values()), {}).get("IoU", {}))
    rows = []
    for name in class_names:
        rows.append([name, *(_fmt(results[d].get("IoU", {}).get(name), digits) for d in domains)])
    rows.append(["mIoU", *(_fmt(results[d].get("mIoU"), digits) for d in domains)])
    if all("aAcc" in results[d] for d in domains):
        rows.append(["aAcc", *(_fmt(results[d]["aAcc"], digits) for d in domains)])
    return markdown_table(["class", *domains], rows)


def format_summary(
    summary: Mapping[str, Mapping[str, Any]],
    domains: Sequence[str] | None = None,
    digits: int = 2,
    avg_label: str = "DG avg",
) -> str:
    """Markdown table of mIoU: one row per method, one column per domain, then the DG average.

    ``summary`` maps method -> domain -> result dict (or mIoU). ``domains`` (default: every
    domain seen, in order) are the target domains averaged; a method missing one gets "-".
    """
    if domains is None:
        domains = list(dict.fromkeys(d for per in summary.values() for d in per))
    rows = []
    for method, per in summary.items():
        cells = [_fmt(per.get(d), digits) for d in domains]
        has_all = all(d in per for d in domains) and bool(domains)
        avg = _fmt(dg_average(per, domains), digits) if has_all else "-"
        rows.append([method, *cells, avg])
    return markdown_table(["method", *domains, avg_label], rows)
