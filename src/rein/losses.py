"""Mask2Former training criterion for semantic segmentation.

Follows the loss semantics of mmdet 3.x ``Mask2FormerHead`` as used by mmseg / Rein:

* labels are turned into one binary mask per present class (mmseg's
  ``_seg_data_to_instance_data``);
* every prediction level (9 auxiliary decoder outputs + the final one) is
  matched to the ground truth with a Hungarian matcher (classification,
  sigmoid-BCE and dice costs on a shared set of random points);
* losses: weighted class cross-entropy over all queries, and point-sampled
  (importance sampling) mask BCE and naive dice on matched pairs.

The module is split into three pieces: point-sampling helpers, the matcher and
the criterion.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

__all__ = [
    "point_sample",
    "get_uncertain_point_coords_with_randomness",
    "grid_coords",
    "sem_seg_to_instances",
    "sigmoid_bce_cost",
    "dice_cost",
    "dice_loss",
    "HungarianMatcher",
    "Mask2FormerCriterion",
]


# --------------------------------------------------------------------------------------
# Point sampling helpers
# --------------------------------------------------------------------------------------


def _rand(
    shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None
) -> Tensor:
    """Uniform [0, 1) draw through ``generator`` (on its own device), moved to ``device``."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def grid_coords(h: int, w: int, device: torch.device | None = None) -> Tensor:
    """Pixel-centre coordinates of an (h, w) map as (1, h*w, 2) in [0, 1] (x, y), row-major.

    Used when ``num_points <= 0``: the losses then use every pixel of the mask predictions
    (deterministic, no random points).
    """
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1).reshape(1, h * w, 2)


def point_sample(input: Tensor, coords: Tensor) -> Tensor:
    """Bilinearly sample ``input`` at normalised points.

    Args:
        input: (N, C, H, W) feature map.
        coords: (N, P, 2) point coordinates in [0, 1], ordered (x, y).

    Returns:
        (N, C, P) sampled values (zeros padding, ``align_corners=False``).
    """
    grid = 2.0 * coords.to(input.dtype) - 1.0  # (N, P, 2) in [-1, 1]
    out = F.grid_sample(
        input, grid.unsqueeze(2), mode="bilinear", padding_mode="zeros", align_corners=False
    )  # (N, C, P, 1)
    return out.squeeze(3)


def get_uncertain_point_coords_with_randomness(
    mask_logits: Tensor,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Importance sampling of point coordinates (PointRend / mmcv semantics).

    Draws ``int(num_points * oversample_ratio)`` random points per mask, keeps the
    ``int(importance_sample_ratio * num_points)`` most uncertain ones (uncertainty =
    ``-|logit|``) and appends fresh random points up to ``num_points``.

    Args:
        mask_logits: (N, 1, h, w) class-agnostic mask logits.

    Returns:
        (N, num_points, 2) coordinates in [0, 1] (x, y).
    """
    n = mask_logits.shape[0]
    device = mask_logits.device
    num_sampled = int(num_points * oversample_ratio)
    coords = _rand((n, num_sampled, 2), device, generator)  # (N, S, 2)
    logits = point_sample(mask_logits, coords)  # (N, 1, S)
    uncertainty = -logits.abs()[:, 0, :]  # (N, S)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    # The k most uncertain points. Their order does not matter (the losses sum or average over
    # points), and an unsorted top-k is about 2x faster on CPU than the sorted one.
    idx = torch.topk(uncertainty, k=num_uncertain, dim=1, sorted=False).indices  # (N, k)
    coords = torch.gather(coords, 1, idx.unsqueeze(-1).expand(-1, -1, 2))  # (N, k, 2)
    if num_random > 0:
        coords = torch.cat([coords, _rand((n, num_random, 2), device, generator)], dim=1)
    return coords


def sem_seg_to_instances(
    label: Tensor, num_classes: int, ignore_index: int = 255
) -> tuple[Tensor, Tensor]:
    """Split a semantic label map into one binary mask per present class.

    Args:
        label: (H, W) integer label map.
        num_classes: number of valid classes K; labels must be in [0, K) or ``ignore_index``.

    Returns:
        classes: (G,) long, sorted present class ids.
        masks: (G, H, W) float binary masks.

    Raises:
        ValueError: if a label outside [0, num_classes) other than ``ignore_index`` occurs.
    """
    if label.dim() != 2:
        raise ValueError(f"expected a (H, W) label map, got shape {tuple(label.shape)}")
    classes = torch.unique(label)  # sorted
    classes = classes[classes != ignore_index].long()
    bad = classes[(classes < 0) | (classes >= num_classes)]
    if bad.numel() > 0:
        raise ValueError(
            f"label value {int(bad[0])} is outside [0, {num_classes}) and is not the "
            f"ignore index {ignore_index}"
        )
    masks = (label.unsqueeze(0) == classes[:, None, None]).float()  # (G, H, W)
    return classes, masks


# --------------------------------------------------------------------------------------
# Costs and the Hungarian matcher
# --------------------------------------------------------------------------------------


def sigmoid_bce_cost(pred_logits: Tensor, gt: Tensor) -> Tensor:
    """Pairwise mean sigmoid BCE between (Q, P) logits and (G, P) binary targets -> (Q, G)."""
    num_points = pred_logits.shape[1]
    pos = F.binary_cross_entropy_with_logits(
        pred_logits, torch.ones_like(pred_logits), reduction="none"
    )  # (Q, P)
    neg = F.binary_cross_entropy_with_logits(
        pred_logits, torch.zeros_like(pred_logits), reduction="none"
    )  # (Q, P)
    cost = pos @ gt.T + neg @ (1.0 - gt).T  # (Q, G)
    return cost / num_points


def dice_cost(pred_logits: Tensor, gt: Tensor, eps: float = 1.0) -> Tensor:
    """Pairwise naive dice cost between (Q, P) logits and (G, P) targets -> (Q, G)."""
    prob = pred_logits.sigmoid()  # (Q, P)
    numerator = 2.0 * (prob @ gt.T)  # (Q, G)
    denominator = prob.sum(-1)[:, None] + gt.sum(-1)[None, :]  # (Q, G)
    return 1.0 - (numerator + eps) / (denominator + eps)


class HungarianMatcher(nn.Module):
    """One-to-one query/ground-truth assignment for a single image (mmdet semantics)."""

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        num_points: int = 12544,
    ) -> None:
        super().__init__()
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def cost_matrix(
        self,
        cls_pred: Tensor,
        mask_pred: Tensor,
        gt_classes: Tensor,
        gt_masks: Tensor,
        generator: torch.Generator | None = None,
        point_coords: Tensor | None = None,
    ) -> Tensor:
        """Total matching cost (Q, G).

        Args:
            cls_pred: (Q, K+1) class logits.
            mask_pred: (Q, h, w) mask logits.
            gt_classes: (G,) long.
            gt_masks: (G, H, W) binary masks (any resolution; sampled in normalised coords).
            generator: RNG for the random points.
            point_coords: optional explicit (1, P, 2) or (P, 2) coords in [0, 1] (x, y).
        """
        q = mask_pred.shape[0]
        g = gt_masks.shape[0]
        if point_coords is None and self.num_points <= 0:
            point_coords = grid_coords(*mask_pred.shape[-2:], device=mask_pred.device)
        elif point_coords is None:
            point_coords = _rand((1, self.num_points, 2), mask_pred.device, generator)
        point_coords = point_coords.reshape(1, -1, 2).to(mask_pred.device)  # (1, P, 2)
        pred_pts = point_sample(
            mask_pred.float().unsqueeze(1), point_coords.expand(q, -1, -1)
        ).squeeze(1)  # (Q, P)
        gt_pts = point_sample(
            gt_masks.float().unsqueeze(1), point_coords.expand(g, -1, -1)
        ).squeeze(1)  # (G, P)
        cls_cost = -cls_pred.float().softmax(-1)[:, gt_classes]  # (Q, G)
        mask_cost = sigmoid_bce_cost(pred_pts, gt_pts)
        d_cost = dice_cost(pred_pts, gt_pts)
        return self.cost_class * cls_cost + self.cost_mask * mask_cost + self.cost_dice * d_cost

    @torch.no_grad()
    def forward(
        self,
        cls_pred: Tensor,
        mask_pred: Tensor,
        gt_classes: Tensor,
        gt_masks: Tensor,
        generator: torch.Generator | None = None,
        point_coords: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Match queries to ground truths.

        Returns:
            (pred_idx, gt_idx) long tensors of length min(Q, G), sorted by ``pred_idx``.
        """
        device = mask_pred.device
        if gt_classes.numel() == 0:
            empty = torch.empty(0, dtype=torch.long, device=device)
            return empty, empty.clone()
        cost = self.cost_matrix(cls_pred, mask_pred, gt_classes, gt_masks, generator, point_coords)
        cost_np = np.nan_to_num(cost.cpu().numpy(), nan=1e8, posinf=1e8, neginf=-1e8)
        rows, cols = linear_sum_assignment(cost_np)
        pred_idx = torch.as_tensor(rows, dtype=torch.long, device=device)
        gt_idx = torch.as_tensor(cols, dtype=torch.long, device=device)
        return pred_idx, gt_idx


# --------------------------------------------------------------------------------------
# Criterion
# --------------------------------------------------------------------------------------


def dice_loss(pred_logits: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    """Per-mask naive dice loss (sigmoid inputs): (N, P) logits, (N, P) targets -> (N,)."""
    prob = pred_logits.sigmoid()
    numerator = 2.0 * (prob * target).sum(-1)
    denominator = prob.sum(-1) + target.sum(-1)
    return 1.0 - (numerator + eps) / (denominator + eps)


def _sample_matched_targets(
    gt_masks: list[Tensor], matched_gt: list[Tensor], coords: Tensor
) -> Tensor:
    """Point samples of the matched ground-truth masks, in match order: (M, P).

    Row ``j`` is image ``i``'s mask ``matched_gt[i][k]`` sampled at ``coords[j]``, the same
    values as sampling ``cat(gt_masks[i][matched_gt[i]])``. Instead of copying the matched
    full-resolution masks (the largest tensors of the loss) on every decoder level, each
    image's masks are sampled in place with their rows' coordinates, then put in match order.
    """
    out, start = [], 0
    for masks, g_idx in zip(gt_masks, matched_gt):
        n = int(g_idx.numel())
        rows = coords[start : start + n]  # (n, P, 2)
        start += n
        if n == 0:
            continue
        if n == masks.shape[0]:  # every ground truth matched: g_idx is a permutation
            order = torch.empty_like(g_idx)
            order[g_idx] = torch.arange(n, device=g_idx.device)
            pts = point_sample(masks.float().unsqueeze(1), rows[order]).squeeze(1)  # GT order
            out.append(pts[g_idx])
        else:  # fewer queries than ground truths: sample the matched subset
            out.append(point_sample(masks[g_idx].float().unsqueeze(1), rows).squeeze(1))
    return torch.cat(out)


def _reduce_mean_count(count: int, device: torch.device) -> float:
    """mmdet's ``reduce_mean`` on the matched-mask count, clamped to at least 1."""
    t = torch.tensor(float(count), device=device)
    if dist.is_available() and dist.is_initialized():
        t = t / dist.get_world_size()
        dist.all_reduce(t)
    return max(float(t.item()), 1.0)


class Mask2FormerCriterion(nn.Module):
    """Mask2Former set-prediction loss over all decoder levels.

    ``forward`` returns ``d0.loss_cls`` ... ``d8.loss_dice`` for the auxiliary levels,
    ``loss_cls``/``loss_mask``/``loss_dice`` for the final one and ``loss`` (their sum).
    Without an explicit ``matcher``, the Hungarian matcher's class / mask / dice costs are the
    loss weights (``model.loss``; 2 / 5 / 5 by default, as in the official config).
    """

    def __init__(
        self,
        num_classes: int = 19,
        class_weight: float = 2.0,
        no_object_weight: float = 0.1,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        matcher: HungarianMatcher | None = None,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.class_weight = class_weight
        self.no_object_weight = no_object_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.ignore_index = ignore_index
        if matcher is None:  # mmdet's Mask2Former: the match costs are the loss weights
            matcher = HungarianMatcher(
                cost_class=class_weight,
                cost_mask=mask_weight,
                cost_dice=dice_weight,
                num_points=num_points,
            )
        self.matcher = matcher
        ce_weight = torch.ones(num_classes + 1)
        ce_weight[-1] = no_object_weight
        self.register_buffer("ce_weight", ce_weight, persistent=False)

    def loss_single(
        self,
        cls_pred: Tensor,
        mask_pred: Tensor,
        gt_classes: list[Tensor],
        gt_masks: list[Tensor],
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Losses for one prediction level.

        Args:
            cls_pred: (B, Q, K+1) class logits.
            mask_pred: (B, Q, h, w) mask logits.
            gt_classes: per image (G_b,) long.
            gt_masks: per image (G_b, H, W) float.

        Returns:
            (loss_cls, loss_mask, loss_dice) scalars.
        """
        b, q = cls_pred.shape[:2]
        device = cls_pred.device
        targets = torch.full((b, q), self.num_classes, dtype=torch.long, device=device)
        batch_idx, pred_idx, matched_gt = [], [], []
        for i in range(b):
            p_idx, g_idx = self.matcher(
                cls_pred[i].detach(),
                mask_pred[i].detach(),
                gt_classes[i],
                gt_masks[i],
                generator=generator,
            )
            targets[i, p_idx] = gt_classes[i][g_idx]
            batch_idx.append(torch.full_like(p_idx, i))
            pred_idx.append(p_idx)
            matched_gt.append(g_idx)

        # class loss over all queries: sum(w_i * ce_i) / sum(w_i)
        ce_weight = self.ce_weight.to(device=device, dtype=torch.float32)
        loss_cls = F.cross_entropy(
            cls_pred.float().flatten(0, 1), targets.flatten(), weight=ce_weight, reduction="mean"
        )
        loss_cls = loss_cls * self.class_weight

        batch_idx_t = torch.cat(batch_idx)
        pred_idx_t = torch.cat(pred_idx)
        num_matched = int(pred_idx_t.numel())
        num_total_masks = _reduce_mean_count(num_matched, device)
        if num_matched == 0:
            zero = mask_pred.sum() * 0
            return loss_cls, zero, zero.clone()

        src = mask_pred[batch_idx_t, pred_idx_t].float()  # (M, h, w)
        with torch.no_grad():
            if self.num_points <= 0:  # dense: every pixel of the prediction
                coords = grid_coords(*src.shape[-2:], device=device).expand(len(src), -1, -1)
            else:
                coords = get_uncertain_point_coords_with_randomness(
                    src.detach().unsqueeze(1),
                    self.num_points,
                    self.oversample_ratio,
                    self.importance_sample_ratio,
                    generator,
                )  # (M, P, 2)
            tgt_pts = _sample_matched_targets(gt_masks, matched_gt, coords)  # (M, P)
        src_pts = point_sample(src.unsqueeze(1), coords).squeeze(1)  # (M, P)

        loss_dice = dice_loss(src_pts, tgt_pts).sum() / num_total_masks * self.dice_weight
        loss_mask = (
            F.binary_cross_entropy_with_logits(src_pts, tgt_pts, reduction="sum")
            / (num_total_masks * coords.shape[1])
            * self.mask_weight
        )
        return loss_cls, loss_mask, loss_dice

    def forward(
        self,
        cls_preds: list[Tensor],
        mask_preds: list[Tensor],
        labels: Tensor,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Compute all losses.

        Args:
            cls_preds: per level (B, Q, K+1) class logits; the last entry is the final output.
            mask_preds: per level (B, Q, h, w) mask logits.
            labels: (B, H, W) (or (B, 1, H, W)) long semantic labels, ``ignore_index`` ignored.
            generator: optional RNG for all random point draws (matcher and importance sampling).
        """
        if len(cls_preds) != len(mask_preds):
            raise ValueError("cls_preds and mask_preds must have the same number of levels")
        if labels.dim() == 4:
            labels = labels.squeeze(1)
        gt_classes, gt_masks = [], []
        for lab in labels:
            c, m = sem_seg_to_instances(lab, self.num_classes, self.ignore_index)
            gt_classes.append(c)
            gt_masks.append(m)

        losses: dict[str, Tensor] = {}
        num_levels = len(cls_preds)
        for lvl, (cls_pred, mask_pred) in enumerate(zip(cls_preds, mask_preds)):
            l_cls, l_mask, l_dice = self.loss_single(
                cls_pred, mask_pred, gt_classes, gt_masks, generator
            )
            prefix = "" if lvl == num_levels - 1 else f"d{lvl}."
            losses[f"{prefix}loss_cls"] = l_cls
            losses[f"{prefix}loss_mask"] = l_mask
            losses[f"{prefix}loss_dice"] = l_dice
        losses["loss"] = torch.stack(list(losses.values())).sum()
        return losses
