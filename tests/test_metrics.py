"""Confusion matrix, IoU, DG average and result tables."""

from __future__ import annotations

import json
import math
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from rein.engine import distributed
from rein.engine.metrics import (
    ConfusionMatrix,
    dg_average,
    format_summary,
    format_table,
    write_json_atomic,
)


def hand_matrix() -> ConfusionMatrix:
    """4 classes. gt 0: 3 px (2 right, 1 predicted as 1); gt 1: 2 px, both right; the pixel
    predicted as 2 is ignored in the gt, so classes 2 and 3 never occur -> IoU NaN."""
    cm = ConfusionMatrix(4, ignore_index=255)
    target = torch.tensor([[0, 0, 0], [1, 1, 255]])
    pred = torch.tensor([[0, 0, 1], [1, 1, 2]])
    cm.update(pred, target)
    return cm


def test_hand_built_iou_values():
    cm = hand_matrix()
    expected = torch.tensor([[2, 1, 0, 0], [0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert torch.equal(cm.mat, expected)
    iou = cm.iou()
    # class 0: tp 2, fn 1, fp 0 -> 2/3; class 1: tp 2, fp 1 -> 2/3; classes 2, 3 absent -> nan
    assert iou[0].item() == pytest.approx(2 / 3)
    assert iou[1].item() == pytest.approx(2 / 3)
    assert math.isnan(iou[2].item()) and math.isnan(iou[3].item())
    assert cm.miou() == pytest.approx(100 * 2 / 3)
    assert cm.acc() == pytest.approx(100 * 4 / 5)
    assert cm.macc() == pytest.approx(100 * (2 / 3 + 1) / 2)


def test_false_positive_only_class_has_zero_iou():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 2, 2]), torch.tensor([0, 0, 1]))
    iou = cm.iou()
    assert iou.tolist()[0] == pytest.approx(0.5)  # tp 1, fn 1
    assert iou[1].item() == 0.0  # gt only, never predicted
    assert iou[2].item() == 0.0  # predicted only, never in gt: 0, not nan
    assert cm.miou() == pytest.approx(100 * 0.5 / 3)


def test_ignore_and_out_of_range_targets_are_skipped():
    cm = ConfusionMatrix(2, ignore_index=255)
    target = torch.tensor([0, 1, 255, 7, -1, 1])
    pred = torch.tensor([0, 1, 1, 0, 0, 0])
    cm.update(pred, target)
    assert torch.equal(cm.mat, torch.tensor([[1, 0], [1, 1]]))
    assert int(cm.mat.sum()) == 3
    # a custom ignore index inside the class range
    cm0 = ConfusionMatrix(3, ignore_index=0)
    cm0.update(torch.tensor([1, 2, 2]), torch.tensor([0, 2, 1]))
    assert int(cm0.mat.sum()) == 2 and cm0.mat[0].sum() == 0


def test_all_ignored_and_empty():
    cm = ConfusionMatrix(3)
    cm.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 255))
    assert int(cm.mat.sum()) == 0
    assert torch.isnan(cm.iou()).all()
    assert math.isnan(cm.miou()) and math.isnan(cm.acc())


def test_update_validates_inputs():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shapes differ"):
        cm.update(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(TypeError):
        cm.update(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        cm.update(torch.tensor([0, 3]), torch.tensor([0, 1]))


def test_accumulates_over_batches_and_merges():
    g = torch.Generator().manual_seed(0)
    preds = torch.randint(0, 5, (4, 8, 8), generator=g)
    targets = torch.randint(0, 6, (4, 8, 8), generator=g)
    targets[targets == 5] = 255
    whole = ConfusionMatrix(5)
    whole.update(preds, targets)
    a, b = ConfusionMatrix(5), ConfusionMatrix(5)
    a.update(preds[:2], targets[:2])
    b.update(preds[2:], targets[2:])
    assert torch.equal(a.merge(b).mat, whole.mat)
    # brute-force reference
    ref = torch.zeros(5, 5, dtype=torch.long)
    for p, t in zip(preds.flatten().tolist(), targets.flatten().tolist()):
        if t != 255:
            ref[t, p] += 1
    assert torch.equal(whole.mat, ref)
    assert whole.all_reduce() is whole  # no process group: no-op
    with pytest.raises(ValueError):
        whole.merge(ConfusionMatrix(4))
    whole.reset()
    assert int(whole.mat.sum()) == 0


def test_to_dict_and_json(tmp_path):
    d = hand_matrix().to_dict(["road", "sidewalk", "building", "wall"])
    assert d["IoU"]["road"] == pytest.approx(200 / 3)
    assert math.isnan(d["IoU"]["building"])
    assert d["mIoU"] == pytest.approx(200 / 3) and d["num_pixels"] == 5
    write_json_atomic({"val": d}, tmp_path / "metrics.json")
    back = json.loads((tmp_path / "metrics.json").read_text())
    assert back["val"]["IoU"]["building"] is None  # NaN -> null (strict JSON)
    assert back["val"]["mIoU"] == pytest.approx(d["mIoU"])
    with pytest.raises(ValueError):
        hand_matrix().to_dict(["only", "two"])


def domain(miou: float, road: float) -> dict:
    return {"mIoU": miou, "aAcc": 90.0, "IoU": {"road": road, "sidewalk": float("nan")}}


def test_dg_average():
    results = {"cityscapes": domain(66.4, 90), "bdd100k": domain(60.4, 88), "mapillary": 66.1}
    assert dg_average(results) == pytest.approx((66.4 + 60.4 + 66.1) / 3)
    assert dg_average(results, ["cityscapes", "bdd100k"]) == pytest.approx(63.4)
    with pytest.raises(KeyError, match="acdc"):
        dg_average(results, ["acdc"])
    assert math.isnan(dg_average({}))


def test_format_table_contains_classes_and_miou():
    results = {"cityscapes": domain(66.4, 92.25), "bdd100k": domain(60.4, 88.0)}
    table = format_table(results, ["road", "sidewalk"])
    lines = table.splitlines()
    assert "cityscapes" in lines[0] and "bdd100k" in lines[0]
    assert "road" in table and "sidewalk" in table and "mIoU" in table
    road = next(line for line in lines if line.startswith("| road"))
    assert "92.25" in road and "88.00" in road
    sidewalk = next(line for line in lines if line.startswith("| sidewalk"))
    assert "-" in sidewalk and "nan" not in sidewalk
    miou = next(line for line in lines if line.startswith("| mIoU"))
    assert "66.40" in miou and "60.40" in miou
    assert len({len(line) for line in lines}) == 1  # aligned
    assert format_table(results) == table  # class names default to the first domain's


def test_format_summary_rows_methods_columns_domains():
    summary = {
        "Rein": {"cityscapes": domain(66.4, 1), "bdd100k": 60.4, "mapillary": 66.1},
        "frozen": {"cityscapes": 63.3, "bdd100k": 56.1, "mapillary": 63.9},
        "partial": {"cityscapes": 50.0},
    }
    text = format_summary(summary)
    lines = text.splitlines()
    assert lines[0].split("|")[1:-1] == [
        " method  ",
        " cityscapes ",
        " bdd100k ",
        " mapillary ",
        " DG avg ",
    ]
    rein = next(line for line in lines if line.startswith("| Rein"))
    assert "64.30" in rein  # (66.4 + 60.4 + 66.1) / 3
    frozen = next(line for line in lines if line.startswith("| frozen"))
    assert "61.10" in frozen
    partial = next(line for line in lines if line.startswith("| partial"))
    assert partial.rstrip(" |").endswith("-")
    assert "DG avg" not in format_summary(summary, avg_label="avg")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        CUDA_VISIBLE_DEVICES="",
    )
    info = distributed.init_distributed()
    try:
        assert (info.rank, info.world_size, info.device.type) == (rank, world_size, "cpu")
        assert distributed.is_main() == (rank == 0)
        cm = ConfusionMatrix(3)
        # rank r sees r + 1 pixels of gt class r, all predicted as class 0
        cm.update(torch.zeros(rank + 1, dtype=torch.long), torch.full((rank + 1,), rank))
        cm.all_reduce()
        mean = distributed.all_reduce_mean(torch.tensor(float(rank)))
        distributed.barrier()
        torch.save({"mat": cm.mat, "mean": mean}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        distributed.cleanup()


def test_all_reduce_across_two_gloo_processes(tmp_path):
    ctx = mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):  # raises if a worker failed
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("DDP workers did not finish within 120 s")
    for rank in range(2):
        res = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert torch.equal(res["mat"], torch.tensor([[1, 0, 0], [2, 0, 0], [0, 0, 0]]))
        assert res["mean"].item() == pytest.approx(0.5)


def test_distributed_helpers_without_process_group(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = distributed.init_distributed()
    rank, world_size, local_rank, device = info
    assert (rank, world_size, local_rank) == (0, 1, 0)
    assert distributed.is_main() and distributed.get_world_size() == 1
    distributed.barrier()
    t = torch.tensor([1.0, 2.0])
    out = distributed.all_reduce_mean(t)
    assert torch.equal(out, t) and out is not t
    distributed.cleanup()
