"""Tests for the Mask2Former criterion (rein.losses)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from rein.losses import (
    HungarianMatcher,
    Mask2FormerCriterion,
    dice_cost,
    dice_loss,
    get_uncertain_point_coords_with_randomness,
    point_sample,
    sem_seg_to_instances,
    sigmoid_bce_cost,
)


def _pixel_centres(h: int, w: int) -> Tensor:
    """(1, h*w, 2) coords (x, y) of all pixel centres, row-major."""
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=-1)[None]


# ---------------------------------------------------------------- point sampling


def test_point_sample_pixel_centres_and_midpoint() -> None:
    x = torch.arange(12, dtype=torch.float32).reshape(1, 1, 3, 4)
    out = point_sample(x, _pixel_centres(3, 4))
    assert out.shape == (1, 1, 12)
    torch.testing.assert_close(out[0, 0], x.flatten())
    # midpoint between pixel (0,0) and (0,1) in x; centre row 0 in y
    mid = torch.tensor([[[1.0 / 4, 0.5 / 3]]])
    torch.testing.assert_close(point_sample(x, mid)[0, 0, 0], torch.tensor(0.5))


def test_uncertain_point_coords() -> None:
    logits = torch.full((2, 1, 8, 8), 10.0)
    logits[:, :, :, :2] = 0.0  # most uncertain region: x < 0.25
    g = torch.Generator().manual_seed(0)
    coords = get_uncertain_point_coords_with_randomness(logits, 40, 3.0, 0.75, g)
    assert coords.shape == (2, 40, 2)
    assert coords.min() >= 0 and coords.max() <= 1
    # the 30 importance-sampled points are the most uncertain of 120 candidates;
    # ~25% of candidates fall in the x < 0.25 strip (fully uncertain ones at x < 0.1875)
    assert (coords[:, :30, 0] < 0.3).float().mean() > 0.9
    g2 = torch.Generator().manual_seed(0)
    coords2 = get_uncertain_point_coords_with_randomness(logits, 40, 3.0, 0.75, g2)
    torch.testing.assert_close(coords, coords2)


def test_uncertain_points_are_the_most_uncertain_candidates() -> None:
    # the importance-sampled points are exactly the k most uncertain of the candidates (as a
    # set: their order does not enter the losses)
    logits = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    coords = get_uncertain_point_coords_with_randomness(
        logits, 32, 3.0, 0.75, torch.Generator().manual_seed(2)
    )
    g = torch.Generator().manual_seed(2)
    candidates = torch.rand((3, 96, 2), generator=g)
    u = -point_sample(logits, candidates).abs()[:, 0]
    best = torch.topk(u, 24, dim=1).indices
    for i in range(3):
        want = {tuple(c) for c in candidates[i, best[i]].tolist()}
        assert {tuple(c) for c in coords[i, :24].tolist()} == want


# ---------------------------------------------------------------- sem_seg_to_instances


def test_sem_seg_to_instances() -> None:
    label = torch.tensor([[2, 2, 255], [0, 255, 2]])
    classes, masks = sem_seg_to_instances(label, num_classes=3)
    assert classes.dtype == torch.long
    assert classes.tolist() == [0, 2]
    assert masks.dtype == torch.float32
    assert masks.shape == (2, 2, 3)
    assert masks[0].tolist() == [[0, 0, 0], [1, 0, 0]]
    assert masks[1].tolist() == [[1, 1, 0], [0, 0, 1]]


def test_sem_seg_to_instances_all_ignore() -> None:
    classes, masks = sem_seg_to_instances(torch.full((3, 3), 255), num_classes=19)
    assert classes.numel() == 0 and masks.shape == (0, 3, 3)


@pytest.mark.parametrize("bad", [19, 254, -1])
def test_sem_seg_to_instances_out_of_range(bad: int) -> None:
    label = torch.tensor([[0, 1], [bad, 255]])
    with pytest.raises(ValueError, match=str(bad)):
        sem_seg_to_instances(label, num_classes=19)


# ---------------------------------------------------------------- costs and matcher


def test_bce_and_dice_cost_by_hand() -> None:
    pred = torch.tensor([[0.0, 2.0], [-1.0, 3.0]])  # (Q=2, P=2)
    gt = torch.tensor([[1.0, 0.0]])  # (G=1, P=2)

    def softplus(v: float) -> float:
        return math.log1p(math.exp(v))

    bce = sigmoid_bce_cost(pred, gt)
    # target 1 -> softplus(-x); target 0 -> softplus(x)
    exp_bce = [(softplus(-0.0) + softplus(2.0)) / 2, (softplus(1.0) + softplus(3.0)) / 2]
    torch.testing.assert_close(bce[:, 0], torch.tensor(exp_bce))

    def sig(v: float) -> float:
        return 1 / (1 + math.exp(-v))

    d = dice_cost(pred, gt)
    exp_d = [
        1 - (2 * sig(0.0) + 1) / (sig(0.0) + sig(2.0) + 1 + 1),
        1 - (2 * sig(-1.0) + 1) / (sig(-1.0) + sig(3.0) + 1 + 1),
    ]
    torch.testing.assert_close(d[:, 0], torch.tensor(exp_d))
    # the per-pair loss equals the diagonal of the cost
    torch.testing.assert_close(dice_loss(pred[:1], gt), d[:1, 0])


def test_matcher_cost_matrix_by_hand() -> None:
    torch.manual_seed(0)
    cls = torch.randn(3, 4)
    masks = torch.randn(3, 4, 4)
    gt_cls = torch.tensor([1, 2])
    gt = (torch.rand(2, 4, 4) > 0.5).float()
    m = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0)
    cost = m.cost_matrix(cls, masks, gt_cls, gt, point_coords=_pixel_centres(4, 4))
    p, t = masks.flatten(1), gt.flatten(1)
    exp = -2.0 * cls.softmax(-1)[:, gt_cls] + 5.0 * sigmoid_bce_cost(p, t) + 5.0 * dice_cost(p, t)
    torch.testing.assert_close(cost, exp)


def test_matcher_obvious_assignment() -> None:
    # 3 queries, 2 gts (classes 0 and 1): query 2 predicts gt 0, query 0 predicts gt 1.
    gt = torch.zeros(2, 4, 4)
    gt[0, :, :2] = 1
    gt[1, :, 2:] = 1
    gt_cls = torch.tensor([0, 1])
    masks = torch.full((3, 4, 4), -10.0)
    masks[2] = gt[0] * 20 - 10
    masks[0] = gt[1] * 20 - 10
    cls = torch.full((3, 3), -5.0)
    cls[2, 0] = 5.0
    cls[0, 1] = 5.0
    cls[1, 2] = 5.0  # no-object
    m = HungarianMatcher(num_points=64)
    p_idx, g_idx = m(cls, masks, gt_cls, gt, point_coords=_pixel_centres(4, 4))
    assert p_idx.dtype == torch.long and g_idx.dtype == torch.long
    assert dict(zip(p_idx.tolist(), g_idx.tolist())) == {0: 1, 2: 0}
    # random points through a generator give the same (robust) answer
    p_idx, g_idx = m(cls, masks, gt_cls, gt, generator=torch.Generator().manual_seed(1))
    assert dict(zip(p_idx.tolist(), g_idx.tolist())) == {0: 1, 2: 0}


def test_matcher_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        q, n_gt = 5, 3
        cls = torch.randn(q, 6, generator=g)
        masks = torch.randn(q, 6, 6, generator=g) * 3
        gt = (torch.rand(n_gt, 6, 6, generator=g) > 0.5).float()
        gt_cls = torch.tensor([0, 3, 4])
        m = HungarianMatcher(num_points=36)
        coords = _pixel_centres(6, 6)
        cost = m.cost_matrix(cls, masks, gt_cls, gt, point_coords=coords)
        p_idx, g_idx = m(cls, masks, gt_cls, gt, point_coords=coords)
        assert len(p_idx) == n_gt and sorted(g_idx.tolist()) == [0, 1, 2]
        got = cost[p_idx, g_idx].sum().item()
        best = min(
            sum(cost[perm[j], j].item() for j in range(n_gt))
            for perm in itertools.permutations(range(q), n_gt)
        )
        assert got == pytest.approx(best, abs=1e-5)


def test_matcher_no_gt() -> None:
    m = HungarianMatcher(num_points=16)
    p, t = m(
        torch.randn(4, 3),
        torch.randn(4, 5, 5),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, 5, 5),
    )
    assert p.numel() == 0 and t.numel() == 0 and p.dtype == torch.long


# ---------------------------------------------------------------- criterion


K, Q, LEVELS = 3, 5, 10


def _toy_batch(seed: int = 0, b: int = 2) -> tuple[list[Tensor], list[Tensor], Tensor]:
    g = torch.Generator().manual_seed(seed)
    cls = [torch.randn(b, Q, K + 1, generator=g, requires_grad=True) for _ in range(LEVELS)]
    masks = [torch.randn(b, Q, 8, 8, generator=g, requires_grad=True) for _ in range(LEVELS)]
    labels = torch.randint(0, K, (b, 16, 16), generator=g)
    labels[:, :3] = 255
    labels[1, labels[1] == 1] = 2  # image 1 has fewer classes
    return cls, masks, labels


def _criterion(**kw: float) -> Mask2FormerCriterion:
    return Mask2FormerCriterion(num_classes=K, num_points=64, **kw)


def test_criterion_keys_and_finite() -> None:
    cls, masks, labels = _toy_batch()
    losses = _criterion()(cls, masks, labels, generator=torch.Generator().manual_seed(0))
    expected = [f"d{i}.{n}" for i in range(9) for n in ("loss_cls", "loss_mask", "loss_dice")]
    expected += ["loss_cls", "loss_mask", "loss_dice", "loss"]
    assert sorted(losses) == sorted(expected)
    assert len(losses) == 31
    for v in losses.values():
        assert v.dim() == 0 and torch.isfinite(v)
    total = sum(v for k, v in losses.items() if k != "loss")
    torch.testing.assert_close(losses["loss"], total)


def test_criterion_level_naming_order() -> None:
    # make level 0 perfect-ish vs final level random: names follow list order
    cls, masks, labels = _toy_batch()
    crit = _criterion()
    cls[9] = torch.zeros_like(cls[9]).requires_grad_()
    out = crit(cls, masks, labels, generator=torch.Generator().manual_seed(0))
    n_gt = sum(len(torch.unique(lab[lab != 255])) for lab in labels)
    # uniform logits -> CE = log(K+1) for every query whatever the targets
    torch.testing.assert_close(out["loss_cls"], torch.tensor(2.0 * math.log(K + 1)))
    assert not torch.allclose(out["d0.loss_cls"], out["loss_cls"])
    assert n_gt > 0


def test_criterion_seed_reproducibility() -> None:
    cls, masks, labels = _toy_batch()
    crit = _criterion()
    a = crit(cls, masks, labels, generator=torch.Generator().manual_seed(7))["loss"]
    b = crit(cls, masks, labels, generator=torch.Generator().manual_seed(7))["loss"]
    c = crit(cls, masks, labels, generator=torch.Generator().manual_seed(8))["loss"]
    assert a.item() == b.item()
    assert a.item() != c.item()


def test_criterion_gradients() -> None:
    cls, masks, labels = _toy_batch()
    loss = _criterion()(cls, masks, labels, generator=torch.Generator().manual_seed(0))["loss"]
    loss.backward()
    for t in cls + masks:
        assert t.grad is not None and torch.isfinite(t.grad).all()
        assert t.grad.abs().sum() > 0


class _FixedMatcher(HungarianMatcher):
    """Query i <-> gt i (no random draws)."""

    def forward(self, cls_pred, mask_pred, gt_classes, gt_masks, generator=None, point_coords=None):
        idx = torch.arange(len(gt_classes))
        return idx, idx.clone()


def test_criterion_values_by_hand() -> None:
    cls, masks, labels = _toy_batch(seed=1)
    cls, masks = cls[-1:], masks[-1:]
    crit = Mask2FormerCriterion(num_classes=K, num_points=64, matcher=_FixedMatcher())
    out = crit(cls, masks, labels, generator=torch.Generator().manual_seed(5))

    # class loss: weighted mean CE, no-object weight 0.1, times 2
    inst = [sem_seg_to_instances(lab, K) for lab in labels]
    targets = torch.full((2, Q), K)
    for i, (c, _) in enumerate(inst):
        targets[i, : len(c)] = c
    ce = F.cross_entropy(cls[0].flatten(0, 1), targets.flatten(), reduction="none")
    w = torch.tensor([1.0] * K + [0.1])[targets.flatten()]
    torch.testing.assert_close(out["loss_cls"], 2.0 * (w * ce).sum() / w.sum())

    # mask losses: replay the importance sampling with the same generator
    src = torch.cat([masks[0][i, : len(c)] for i, (c, _) in enumerate(inst)])
    tgt = torch.cat([m for _, m in inst])
    n = src.shape[0]
    coords = get_uncertain_point_coords_with_randomness(
        src.detach()[:, None], 64, 3.0, 0.75, torch.Generator().manual_seed(5)
    )
    sp = point_sample(src[:, None], coords)[:, 0]
    tp = point_sample(tgt[:, None], coords)[:, 0]
    exp_dice = (
        5.0
        * (
            1 - (2 * (sp.sigmoid() * tp).sum(-1) + 1) / (sp.sigmoid().sum(-1) + tp.sum(-1) + 1)
        ).sum()
        / n
    )
    exp_mask = 5.0 * F.binary_cross_entropy_with_logits(sp, tp, reduction="sum") / (n * 64)
    torch.testing.assert_close(out["loss_dice"], exp_dice)
    torch.testing.assert_close(out["loss_mask"], exp_mask)


def test_criterion_no_gt() -> None:
    cls, masks, labels = _toy_batch()
    labels = torch.full_like(labels, 255)
    out = _criterion()(cls, masks, labels, generator=torch.Generator().manual_seed(0))
    assert len(out) == 31
    for k, v in out.items():
        assert torch.isfinite(v)
        if "mask" in k or "dice" in k:
            assert v.item() == 0.0 and v.requires_grad
    out["loss"].backward()
    assert masks[0].grad is not None and cls[0].grad is not None
    # all queries -> no-object: CE with target K
    exp = 2.0 * F.cross_entropy(cls[-1].flatten(0, 1), torch.full((2 * Q,), K))
    torch.testing.assert_close(out["loss_cls"], exp)


def test_criterion_optimisation_decreases_loss() -> None:
    torch.manual_seed(0)
    labels = torch.zeros(1, 16, 16, dtype=torch.long)
    labels[:, :, 8:] = 1
    labels[:, :2] = 255
    cls = torch.nn.Parameter(torch.randn(1, 4, 3) * 0.1)
    mask = torch.nn.Parameter(torch.randn(1, 4, 8, 8) * 0.1)
    crit = Mask2FormerCriterion(num_classes=2, num_points=128)
    opt = torch.optim.Adam([cls, mask], lr=0.1)

    def evaluate() -> float:
        with torch.no_grad():
            out = crit([cls] * LEVELS, [mask] * LEVELS, labels, torch.Generator().manual_seed(0))
        return out["loss"].item()

    start = evaluate()
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        opt.zero_grad()
        crit([cls] * LEVELS, [mask] * LEVELS, labels, g)["loss"].backward()
        opt.step()
    end = evaluate()
    assert end < 0.5 * start


# ---------------------------------------------------------------- matched-target sampling


def test_matched_targets_are_sampled_in_place_exactly() -> None:
    """Sampling each image's masks where they lie equals sampling the copied, concatenated
    matched masks (the reference layout), bit for bit: a full permutation, a matched subset
    (fewer queries than ground truths) and an image without ground truth."""
    from rein.losses import _sample_matched_targets

    torch.manual_seed(0)
    gt_masks = [
        (torch.rand(5, 12, 10) > 0.5).float(),
        (torch.rand(4, 12, 10) > 0.5).float(),
        torch.zeros(0, 12, 10),
    ]
    matched = [
        torch.tensor([3, 0, 4, 1, 2]),
        torch.tensor([2, 0]),
        torch.zeros(0, dtype=torch.long),
    ]
    coords = torch.rand(7, 33, 2)
    ref = point_sample(
        torch.cat([m[g] for m, g in zip(gt_masks, matched)]).unsqueeze(1), coords
    ).squeeze(1)
    out = _sample_matched_targets(gt_masks, matched, coords)
    assert out.shape == (7, 33)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
