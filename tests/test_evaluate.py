"""Evaluation gives the right numbers: oracle and hand-built predictions through
``evaluate_dataset``, ``evaluate_domains`` and ``rein eval``.

The models here stand in for a Segmentor: they read which image they were given from its
(constant) grey level, so they know the image's ground truth and return chosen class
scores. The expected confusion matrices, IoUs and averages are written out by hand.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import tiny_model_config
from PIL import Image
from torch import nn

from rein.cli import main
from rein.config import EvalConfig
from rein.data import FolderDataset, build_eval_pipeline
from rein.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from rein.engine.evaluate import evaluate_dataset, evaluate_domains
from rein.segmentor import Segmentor

K = 3  # classes
X = 255  # ignore


def _write_domain(root: Path, images: dict[int, list[list[int]]]) -> Path:
    """``root/images/<grey>.png`` (constant grey RGB) and ``root/labels/<grey>.png``."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for grey, label in images.items():
        lab = np.asarray(label, dtype=np.uint8)
        img = np.full((*lab.shape, 3), grey, dtype=np.uint8)
        Image.fromarray(img).save(root / "images" / f"{grey:03d}.png")
        Image.fromarray(lab, mode="L").save(root / "labels" / f"{grey:03d}.png")
    return root


def _folder(root: Path, scale: tuple[int, int] | None = None) -> FolderDataset:
    return FolderDataset(
        root / "images", root / "labels", transform=build_eval_pipeline("folder", scale=scale)
    )


def _grey_of(images: torch.Tensor) -> int:
    """The grey level of a normalised constant image (as the eval pipeline made it)."""
    return round(float(images[0, 0, 0, 0]) * IMAGENET_STD[0] + IMAGENET_MEAN[0])


def _one_hot(pred: torch.Tensor, batch: int) -> torch.Tensor:
    return F.one_hot(pred, K).permute(2, 0, 1).float()[None].repeat(batch, 1, 1, 1)


class Oracle(nn.Module):
    """``inference`` returns the one-hot ground truth at ``out_size`` (so mIoU is 100),
    after ``remap`` (grey -> {gt class: predicted class}) for deliberate mistakes; ignored
    pixels get class 1 (they must not count). Records every call."""

    def __init__(
        self, labels: dict[int, list[list[int]]], remap: dict[int, dict[int, int]] | None = None
    ):
        super().__init__()
        self.labels = {g: torch.tensor(v) for g, v in labels.items()}
        self.remap = remap or {}
        self.calls: list[dict] = []

    def inference(self, images, mode="slide", crop_size=512, stride=341, out_size=None, flip=False):
        grey = _grey_of(images)
        self.calls.append(
            dict(grey=grey, size=tuple(images.shape[-2:]), out_size=tuple(out_size), mode=mode,
                 crop_size=crop_size, stride=stride, flip=flip, training=self.training)
        )  # fmt: skip
        gt = self.labels[grey]
        assert tuple(out_size) == tuple(gt.shape), "scores must be asked at the label size"
        pred = gt.clone()
        for a, b in self.remap.get(grey, {}).items():
            pred[gt == a] = b
        pred[gt == X] = 1
        return _one_hot(pred, images.shape[0])


EVAL = EvalConfig(mode="slide", crop_size=4, stride=3)

# domain "clear": two images, predicted perfectly
CLEAR = {
    10: [[0, 0, 1, 1, 2], [0, X, 1, 1, 2], [2, 2, 2, 0, 0]],
    20: [[1, 1], [2, X], [0, 0], [1, 2]],
}
# domain "night": the model predicts class 2 wherever the ground truth is 1
NIGHT = {30: [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [2, 2, X, X]]}
# night confusion (rows gt, cols pred): [[4, 0, 0], [0, 0, 4], [0, 0, 6]]
# IoU: 4/4 = 1, 0/(4 + 0 - 0) = 0, 6/(6 + 10 - 6) = 0.6 -> mIoU 160/3
NIGHT_MIOU = 100 * (1 + 0 + 0.6) / 3


def test_oracle_scores_100_on_every_image(tmp_path):
    root = _write_domain(tmp_path / "clear", CLEAR)
    oracle = Oracle(CLEAR)
    cm = evaluate_dataset(oracle, _folder(root), K, EVAL)
    assert torch.equal(cm.mat, torch.tensor([[7, 0, 0], [0, 7, 0], [0, 0, 7]]))
    assert cm.miou() == 100.0 and cm.acc() == 100.0 and cm.macc() == 100.0
    assert int(cm.mat.sum()) == 15 + 8 - 2  # every labelled pixel once, ignored ones never
    # each image once, at its own size, with the eval settings passed through
    assert sorted(c["grey"] for c in oracle.calls) == [10, 20]
    for c in oracle.calls:
        assert (c["mode"], c["crop_size"], c["stride"], c["flip"]) == ("slide", 4, 3, False)
        assert c["out_size"] == c["size"]
    assert not any(c["training"] for c in oracle.calls)  # run in eval mode ...
    assert oracle.training  # ... and put back in the mode it was in
    oracle.eval()
    evaluate_dataset(oracle, _folder(root), K, EvalConfig(mode="whole", flip=True))
    assert not oracle.training
    assert oracle.calls[-1]["mode"] == "whole" and oracle.calls[-1]["flip"] is True


def test_oracle_at_an_eval_scale_is_asked_for_scores_at_the_original_size(tmp_path):
    labels = {40: [[0, 1, 1, 2] * 2] * 2 + [[2, 2, X, 0] * 2] * 2}  # 4 x 8
    root = _write_domain(tmp_path / "big", labels)
    oracle = Oracle(labels)
    cm = evaluate_dataset(oracle, _folder(root, scale=(4, 2)), K, EVAL)
    assert oracle.calls[0]["size"] == (2, 4) and oracle.calls[0]["out_size"] == (4, 8)
    assert cm.miou() == 100.0 and int(cm.mat.sum()) == 28


def test_domains_and_dg_average(tmp_path):
    sets = {
        "clear": _folder(_write_domain(tmp_path / "clear", CLEAR)),
        "night": _folder(_write_domain(tmp_path / "night", NIGHT)),
    }
    oracle = Oracle({**CLEAR, **NIGHT}, remap={30: {1: 2}})
    res = evaluate_domains(oracle, sets, K, EVAL, class_names=["road", "car", "sky"])
    assert set(res) == {"clear", "night", "DG avg"}
    assert res["clear"]["mIoU"] == 100.0 and res["clear"]["num_pixels"] == 21
    night = res["night"]
    assert night["IoU"] == pytest.approx({"road": 100.0, "car": 0.0, "sky": 60.0})
    assert night["Acc"] == pytest.approx({"road": 100.0, "car": 0.0, "sky": 100.0})
    assert night["mIoU"] == pytest.approx(NIGHT_MIOU)
    assert night["aAcc"] == pytest.approx(100 * 10 / 14) and night["num_pixels"] == 14
    assert res["DG avg"] == pytest.approx((100 + NIGHT_MIOU) / 2)  # mean over the domains


class FixedMapSegmentor(Segmentor):
    """A Segmentor whose network predicts a fixed label map per image (chosen by its grey
    level) at the resolution it is given; the real ``Segmentor.inference`` resizes the
    scores back to the original size."""

    def __init__(self, maps: dict[int, list[list[int]]]):
        nn.Module.__init__(self)
        self.num_classes, self.window_batch = K, 4
        self.maps = {g: torch.tensor(m) for g, m in maps.items()}

    def seg_scores(self, images):
        pred = self.maps[_grey_of(images)]
        assert tuple(pred.shape) == tuple(images.shape[-2:])
        return _one_hot(pred, images.shape[0])


def test_hand_built_confusion_matrix_with_resizing_and_ignore(tmp_path):
    # Originals 4 x 8 and 4 x 4, evaluated at half size (keep-ratio scale (4, 2)). The
    # model's 2 x 4 / 2 x 2 map, bilinearly upsampled x2, argmaxes to 2 x 2 blocks.
    gt = {
        50: [
            [0, 0, 0, 0, 1, 1, 1, 2],
            [0, 0, 0, X, 1, 1, 2, 2],
            [0, 0, 0, 1, 1, 1, 2, 2],
            [X, 0, 1, 1, 2, 1, 2, 0],
        ],
        60: [
            [2, 2, 0, 0],
            [2, 0, 0, X],
            [1, 1, 2, 2],
            [X, X, 1, 1],
        ],
    }
    low = {50: [[0, 0, 1, 2], [0, 1, 1, 2]], 60: [[2, 0], [1, 1]]}
    # upsampled predictions:     50: 0 0 0 0 1 1 2 2      60: 2 2 0 0
    #                                0 0 0 0 1 1 2 2          2 2 0 0
    #                                0 0 1 1 1 1 2 2          1 1 1 1
    #                                0 0 1 1 1 1 2 2          1 1 1 1
    # image 50: (0,0) 10, (0,1) 1, (0,2) 1, (1,1) 10, (1,2) 1, (2,1) 1, (2,2) 6  [30 px]
    # image 60: (0,0) 3, (0,2) 1, (1,1) 4, (2,1) 2, (2,2) 3                      [13 px]
    expected = torch.tensor([[13, 1, 2], [0, 14, 1], [0, 3, 9]])
    root = _write_domain(tmp_path / "d", gt)
    model = FixedMapSegmentor(low)
    cm = evaluate_dataset(model, _folder(root, scale=(4, 2)), K, EvalConfig(mode="whole"))
    assert torch.equal(cm.mat, expected)
    # gt totals 16, 15, 12; prediction totals 13, 18, 12
    iou = [13 / (16 + 13 - 13), 14 / (15 + 18 - 14), 9 / (12 + 12 - 9)]
    assert cm.iou().tolist() == pytest.approx(iou)
    assert cm.class_acc().tolist() == pytest.approx([13 / 16, 14 / 15, 9 / 12])
    assert cm.miou() == pytest.approx(100 * sum(iou) / 3)
    assert cm.acc() == pytest.approx(100 * 36 / 43)
    d = cm.to_dict(["a", "b", "c"])
    assert d["IoU"]["b"] == pytest.approx(1400 / 19) and d["num_pixels"] == 43


def _eval_config(tmp_path: Path, roots: list[Path]) -> Path:
    from dataclasses import asdict

    cfg = {
        "model": asdict(tiny_model_config(num_classes=K)),
        "data": {"val": [{"name": "folder", "root": str(r), "split": "all"} for r in roots]},
        "eval": {"mode": "slide", "crop_size": 4, "stride": 3},
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_rein_eval_cli_reports_the_oracle_numbers(tmp_path, monkeypatch, capsys):
    roots = [_write_domain(tmp_path / "clear", CLEAR), _write_domain(tmp_path / "night", NIGHT)]
    cfg = _eval_config(tmp_path, roots)
    oracle = Oracle({**CLEAR, **NIGHT}, remap={30: {1: 2}})
    seen = {}

    def load_model(cfg, checkpoint, **_):  # the seam where `rein eval` builds the segmentor
        seen.update(num_classes=cfg.model.head.num_classes, checkpoint=checkpoint)
        return oracle

    monkeypatch.setattr("rein.commands._load_model", load_model)
    out = tmp_path / "res.json"
    argv = ["eval", str(cfg), str(tmp_path / "ckpt"), "--out", str(out)]
    assert main([*argv, "--device", "cpu", "--no-progress"]) == 0
    assert seen == {"num_classes": K, "checkpoint": str(tmp_path / "ckpt")}
    assert {c["mode"] for c in oracle.calls} == {"slide"} and len(oracle.calls) == 3
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].split("|")[1:-1] == [" class ", " folder ", " folder_1 "]
    miou = next(line for line in lines if line.startswith("| mIoU"))
    assert [c.strip() for c in miou.split("|")[2:-1]] == ["100.00", f"{NIGHT_MIOU:.2f}"]
    car = next(line for line in lines if line.startswith("| 1 "))
    assert [c.strip() for c in car.split("|")[2:-1]] == ["100.00", "0.00"]
    dg = (100 + NIGHT_MIOU) / 2
    assert f"DG average mIoU over 2 target domain(s): {dg:.2f}" in text
    res = json.loads(out.read_text())
    assert res["folder"]["mIoU"] == 100.0 and res["folder"]["IoU"] == {
        "0": 100.0, "1": 100.0, "2": 100.0
    }  # fmt: skip
    assert res["folder_1"]["mIoU"] == pytest.approx(NIGHT_MIOU)
    assert res["DG avg"] == pytest.approx(dg)
    assert not any(isinstance(v, float) and math.isnan(v) for v in res["folder"].values())


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_bad_in_evaluation_skips_instead_of_counting_the_next_image_twice(tmp_path, workers):
    root = _write_domain(tmp_path / "clear", CLEAR)  # 010.png, 020.png
    (root / "images" / "015.png").write_bytes(b"not a png")  # sorted between them
    Image.fromarray(np.zeros((2, 2), np.uint8), mode="L").save(root / "labels" / "015.png")
    ds = FolderDataset(
        root / "images", root / "labels", transform=build_eval_pipeline("folder"), skip_bad=True
    )
    assert len(ds) == 3
    oracle = Oracle(CLEAR)
    with pytest.warns(UserWarning, match="015.png") if workers == 0 else nullcontext():
        cm = evaluate_dataset(oracle, ds, K, EVAL, num_workers=workers)
    assert int(cm.mat.sum()) == 15 + 8 - 2  # the 2 good images, each once
    assert sorted(c["grey"] for c in oracle.calls) == [10, 20]
    # training still substitutes: every stream position needs a sample (the main process's
    # copy learns that 015.png is bad only now when the workers read it)
    with pytest.warns(UserWarning, match="015.png") if workers else nullcontext():
        assert ds.substitute_bad and ds[1]["meta"]["index"] == 2
