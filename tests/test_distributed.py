"""Two gloo ranks (torch.multiprocessing.spawn): loss normaliser and evaluation sharding."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo test on linux")

WORLD = 2
H = W = 8
Q, K = 6, 5


def _worker(rank: int, tmp: str) -> None:
    """One process group per test module: both checks run in it (spawning costs seconds)."""
    _init(rank, tmp)
    out = {"criterion": _criterion_job(rank), "eval": _eval_job(rank)}
    (Path(tmp) / f"rank{rank}.json").write_text(json.dumps(out))
    dist.barrier()  # neither rank tears the group down while the other still uses it
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of the 2 ranks computed (JSON written by the spawned processes)."""
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(tmp),), nprocs=WORLD, join=True)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _init(rank: int, tmp: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD)


# -- the matched-mask normaliser ---------------------------------------------------------------
# (rank 0 classes, rank 1 classes) -> the global normaliser max(mean matched count, 1)
SCENARIOS = [
    (((3,), (0, 2, 4)), 2.0),  # counts 1 and 3 -> mean 2
    (((), (1,)), 1.0),  # counts 0 and 1 -> mean 0.5, clamped to 1
]


def _label(classes: tuple[int, ...]) -> torch.Tensor:
    """(H, W) label: vertical stripes of ``classes``; 255 (ignored) when there are none."""
    lab = torch.full((H, W), 255, dtype=torch.long)
    for j, c in enumerate(classes):
        lab[:, j * W // len(classes) : (j + 1) * W // len(classes)] = c
    return lab


def _predictions(classes: tuple[int, ...], seed: int, levels: int = 2):
    """Logits where query i obviously matches class ``classes[i]`` (any other query: noise)."""
    g = torch.Generator().manual_seed(seed)
    lab = _label(classes)
    cls_preds, mask_preds = [], []
    for _ in range(levels):
        cls = torch.randn(1, Q, K + 1, generator=g)
        mask = torch.randn(1, Q, H, W, generator=g)
        for i, c in enumerate(classes):
            cls[0, i, c] += 8.0
            mask[0, i] += 6.0 * ((lab == c).float() * 2 - 1)
        cls_preds.append(cls)
        mask_preds.append(mask)
    return cls_preds, mask_preds, lab[None]


def _reference_loss(cls_preds, mask_preds, label, classes, normaliser: float) -> dict:
    """The criterion written out (weights 2/5/5, no-object 0.1, every pixel, query i <-> gt i)."""
    out = {}
    for lvl, (cls, mask) in enumerate(zip(cls_preds, mask_preds)):
        target = torch.full((Q,), K, dtype=torch.long)
        target[: len(classes)] = torch.tensor(classes, dtype=torch.long)
        weight = torch.ones(K + 1)
        weight[K] = 0.1
        l_cls = F.cross_entropy(cls[0], target, weight=weight) * 2.0
        l_mask = l_dice = torch.tensor(0.0)
        if classes:
            src = mask[0, : len(classes)].reshape(len(classes), -1)
            tgt = torch.stack([(label[0] == c).float().reshape(-1) for c in classes])
            bce = F.binary_cross_entropy_with_logits(src, tgt, reduction="sum")
            l_mask = bce / (normaliser * H * W) * 5.0
            p = src.sigmoid()
            dice = 1 - (2 * (p * tgt).sum(-1) + 1) / (p.sum(-1) + tgt.sum(-1) + 1)
            l_dice = dice.sum() / normaliser * 5.0
        prefix = "" if lvl == len(cls_preds) - 1 else f"d{lvl}."
        out[prefix + "loss_cls"] = float(l_cls)
        out[prefix + "loss_mask"] = float(l_mask)
        out[prefix + "loss_dice"] = float(l_dice)
    return out


def _criterion_job(rank: int) -> list[dict]:
    from rein.losses import Mask2FormerCriterion

    criterion = Mask2FormerCriterion(num_classes=K, num_points=0)  # dense: deterministic
    result = []
    for s, (per_rank, _) in enumerate(SCENARIOS):
        cls_preds, mask_preds, label = _predictions(per_rank[rank], seed=10 * s + rank)
        losses = criterion(cls_preds, mask_preds, label)
        result.append({k: float(v) for k, v in losses.items()})
    return result


def test_ddp_mask_loss_normaliser_is_the_global_mean_count(ranks):
    """Each rank divides its mask/dice sums by the all-reduced mean matched count (>= 1).

    E.g. rank 0 sees 1 mask, rank 1 sees 3: both divide by 2 (not by 1 and 3).
    """
    got = [r["criterion"] for r in ranks]
    for s, (per_rank, normaliser) in enumerate(SCENARIOS):
        for rank in range(WORLD):
            classes = per_rank[rank]
            cls_preds, mask_preds, label = _predictions(classes, seed=10 * s + rank)
            want = _reference_loss(cls_preds, mask_preds, label, classes, normaliser)
            for k, v in want.items():
                assert got[rank][s][k] == pytest.approx(v, rel=1e-5, abs=1e-7), (s, rank, k)
            assert got[rank][s]["loss"] == pytest.approx(sum(want.values()), rel=1e-5)
    # the scenario is a real test: the local count would give another loss on both ranks
    local = _reference_loss(*_predictions((3,), seed=0), (3,), 1.0)
    assert local["loss_mask"] == pytest.approx(2 * got[0][0]["loss_mask"], rel=1e-5)


# -- evaluation sharding -----------------------------------------------------------------------
NUM_VAL = 5


class _Recording(torch.utils.data.Dataset):
    def __init__(self, inner) -> None:
        self.inner, self.seen = inner, []

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i):
        self.seen.append(int(i))
        return self.inner[i]


def _val_set():
    from rein.data import build_dataset, build_eval_pipeline

    return build_dataset(
        "synthetic",
        split="val",
        transform=build_eval_pipeline("synthetic", crop=64),
        num_images=NUM_VAL,
        size=[64, 64],
        style="fog",
    )


def _eval_cfg():
    from rein.config import config_from_dict

    return config_from_dict({"eval": {"mode": "whole", "crop_size": 64, "stride": 32}}).eval


def _eval_job(rank: int) -> dict:
    from conftest import tiny_segmentor

    from rein.engine.evaluate import evaluate_domains

    model = tiny_segmentor()  # same seed: identical weights on both ranks
    ds = _Recording(_val_set())
    res = evaluate_domains(model, {"fog": ds}, 19, _eval_cfg(), distributed=True)
    return {"seen": ds.seen, "res": res}


def test_ddp_evaluation_shards_are_disjoint_and_sum_to_single_process(ranks):
    from conftest import tiny_segmentor

    from rein.engine.evaluate import evaluate_domains

    got = [r["eval"] for r in ranks]
    seen = [g["seen"] for g in got]
    assert not set(seen[0]) & set(seen[1])  # disjoint
    assert sorted(seen[0] + seen[1]) == list(range(NUM_VAL))  # together every image, once
    ds = _Recording(_val_set())
    single = evaluate_domains(tiny_segmentor(), {"fog": ds}, 19, _eval_cfg(), distributed=False)
    assert sorted(ds.seen) == list(range(NUM_VAL))
    labelled = sum(int((ds.inner[i]["label"] != 255).sum()) for i in range(NUM_VAL))
    assert single["fog"]["num_pixels"] == labelled
    for g in got:  # every rank holds the all-reduced (= single-process) result
        assert g["res"]["fog"]["num_pixels"] == labelled
        assert g["res"]["fog"]["mIoU"] == pytest.approx(single["fog"]["mIoU"], abs=1e-9)
        for c, v in single["fog"]["IoU"].items():
            w = g["res"]["fog"]["IoU"][c]
            assert (w != w and v != v) or w == pytest.approx(v, abs=1e-9), c
