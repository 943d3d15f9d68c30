"""Robustness evaluation: Cityscapes-C style corruptions, their evaluation and CLI, and TTA."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_run, tiny_segmentor
from torch import nn

from rein.cli import main
from rein.config import EvalConfig
from rein.data import SyntheticDataset, build_eval_pipeline, render_scene
from rein.engine.corruptions import (
    CORRUPTIONS,
    Corrupt,
    CorruptedDataset,
    corrupt,
    evaluate_corruptions,
    format_corruption_table,
)
from rein.engine.evaluate import evaluate_dataset, predict_labels, predict_scores


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    img, _ = render_scene(7, (64, 96), "realistic")
    return img


def _val_set(**kw) -> SyntheticDataset:
    return SyntheticDataset(
        num_images=2, size=(64, 64), style="game", split="val",
        transform=build_eval_pipeline("synthetic", crop=64), **kw,
    )  # fmt: skip


# ---------------------------------------------------------------------------- corruptions


def test_there_are_the_15_cityscapes_c_corruptions():
    assert len(CORRUPTIONS) == 15 and len(set(CORRUPTIONS)) == 15
    assert {"gaussian_noise", "glass_blur", "frost", "fog", "jpeg_compression"} <= set(CORRUPTIONS)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_every_corruption_keeps_shape_and_dtype_and_changes_the_image(name, image):
    for severity in (1, 5):
        out = corrupt(image, name, severity, rng=3)
        assert out.shape == image.shape and out.dtype == np.uint8
        assert not np.array_equal(out, image)
    assert image.shape == (64, 96, 3)  # the input is not modified in place


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruption_is_deterministic_and_depends_on_severity(name, image):
    a = corrupt(image, name, 3, rng=11)
    b = corrupt(image, name, 3, rng=np.random.default_rng(11))
    assert a.tobytes() == b.tobytes()
    assert corrupt(image, name, 4, rng=11).tobytes() != a.tobytes()


def test_severity_makes_it_worse(image):
    for name in ("gaussian_noise", "contrast", "defocus_blur", "brightness"):
        err = [np.abs(corrupt(image, name, s).astype(int) - image).mean() for s in (1, 3, 5)]
        assert err[0] < err[1] < err[2], name


def test_deterministic_ones_follow_the_definition(image):
    x = image.astype(np.float64) / 255
    mean = x.mean(axis=(0, 1), keepdims=True)
    expected = np.uint8(np.clip((x - mean) * 0.2 + mean, 0, 1) * 255)  # contrast, severity 3
    assert np.array_equal(corrupt(image, "contrast", 3), expected)
    out = corrupt(image, "brightness", 2).astype(float)  # HSV value + 0.2: hue is kept
    keep = image.max(-1) < 150
    ratio = out[keep] / np.maximum(image[keep], 1)
    assert np.all(out.max(-1)[keep] >= image.max(-1)[keep] + 50)
    assert np.allclose(ratio.std(-1)[image[keep].min(-1) > 20], 0, atol=0.05)


def test_bad_arguments_are_clear_errors(image):
    with pytest.raises(ValueError, match="did you mean 'gaussian_noise'"):
        corrupt(image, "gausian_noise", 1)
    with pytest.raises(ValueError, match="1..5"):
        corrupt(image, "fog", 6)
    with pytest.raises(ValueError, match="before normalisation"):
        corrupt(image.astype(np.float32), "fog", 1)


def test_corrupt_transform_seeds_per_image_corruption_and_severity():
    ds = _val_set()
    s0, s1 = ds.load(0), ds.load(1)
    t = Corrupt("gaussian_noise", 2)
    a, b = t(s0)["image"], Corrupt("gaussian_noise", 2)(ds.load(0))["image"]
    assert a.tobytes() == b.tobytes()  # rerun: identical bytes
    assert t(s0)["meta"]["corruption"] == {"name": "gaussian_noise", "severity": 2}
    assert "corruption" not in s0["meta"]  # the input sample is not modified
    noise0 = a.astype(int) - s0["image"]
    noise1 = t(s1)["image"].astype(int) - s1["image"]
    assert not np.array_equal(noise0, noise1)  # another image draws other noise
    assert Corrupt("gaussian_noise", 3)(s0)["image"].tobytes() != a.tobytes()
    assert Corrupt("gaussian_noise", 2, seed=1)(s0)["image"].tobytes() != a.tobytes()
    with pytest.raises(ValueError):
        Corrupt("blizzard", 1)


def test_corrupted_dataset_corrupts_before_the_eval_pipeline():
    ds = _val_set()
    ds.transform = build_eval_pipeline("synthetic", scale=(48, 48))  # resize 64 -> 48
    wrapped = CorruptedDataset(ds, "motion_blur", 3)
    got = wrapped[1]
    expected = ds.transform(Corrupt("motion_blur", 3)(ds.load(1)))
    assert len(wrapped) == 2 and got["image"].shape == (3, 48, 48)
    assert torch.equal(got["image"], expected["image"])
    assert torch.equal(got["label"], ds[1]["label"])  # labels untouched, full resolution
    assert not torch.equal(got["image"], ds[1]["image"])
    assert torch.equal(wrapped[1]["image"], got["image"])  # rerun: identical
    with pytest.raises(TypeError, match="SegDataset"):
        CorruptedDataset([1, 2], "fog", 1)


# ---------------------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_segmentor().eval()


def test_corruption_evaluation_table(tiny_model):
    cfg = EvalConfig(mode="whole")
    results = evaluate_corruptions(
        tiny_model, {"game": _val_set()}, 19, cfg,
        corruptions=["fog", "gaussian_noise"], severities=[3, 1],
    )  # fmt: skip
    assert results["corruptions"] == ["fog", "gaussian_noise"]
    assert results["severities"] == [1, 3]
    cells = [results["mIoU"][c][s] for c in ("fog", "gaussian_noise") for s in ("1", "3")]
    assert all(0 <= v <= 100 for v in cells)
    assert results["mean"] == pytest.approx(sum(cells) / 4)
    assert results["mIoU"]["fog"]["mean"] == pytest.approx(
        (results["mIoU"]["fog"]["1"] + results["mIoU"]["fog"]["3"]) / 2
    )
    assert results["severity_mean"]["mean"] == pytest.approx(results["mean"])
    assert results["domains"]["fog"]["3"]["game"] == results["mIoU"]["fog"]["3"]
    table = format_corruption_table(results)
    lines = table.splitlines()
    assert lines[0].split("|")[1].strip() == "corruption"
    assert [c.strip() for c in lines[0].split("|")[2:-1]] == ["s1", "s3", "mean"]
    assert lines[2].startswith("| fog") and lines[-1].startswith("| mean")
    again = evaluate_corruptions(
        tiny_model, {"game": _val_set()}, 19, cfg, corruptions=["fog"], severities=[3]
    )
    assert again["mIoU"]["fog"]["3"] == results["mIoU"]["fog"]["3"]  # rerun: identical


def test_corruption_evaluation_rejects_bad_requests(tiny_model):
    with pytest.raises(ValueError, match="unknown corruption"):
        evaluate_corruptions(tiny_model, {"g": _val_set()}, 19, EvalConfig(), corruptions=["x"])
    with pytest.raises(ValueError, match="1..5"):
        evaluate_corruptions(tiny_model, {"g": _val_set()}, 19, EvalConfig(), severities=[0])


def _tiny_run(tmp_path: Path) -> tuple[Path, Path]:
    return tiny_run(tmp_path, style="game", mode="whole")


def test_eval_corruptions_cli(tmp_path, capsys):
    cfg, ckpt = _tiny_run(tmp_path)
    out = tmp_path / "c.json"
    argv = ["eval", str(cfg), str(ckpt), "--corruptions", "--corruption", "snow", "pixelate"]
    argv += ["--severities", "2", "5", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "| snow" in text and "| pixelate" in text and "s2" in text and "s5" in text
    assert "mean mIoU over 2 corruption(s) x 2 severity(ies)" in text
    res = json.loads(out.read_text())
    assert res["corruptions"] == ["snow", "pixelate"] and res["severities"] == [2, 5]
    assert set(res["mIoU"]["snow"]) == {"2", "5", "mean"}
    assert res["mean"] == pytest.approx(
        np.mean([res["mIoU"][c][s] for c in ("snow", "pixelate") for s in ("2", "5")])
    )
    with pytest.raises(SystemExit):
        main(["eval", str(cfg), str(ckpt), "--corruption", "blizzard"])
    assert "invalid choice" in capsys.readouterr().err


# ---------------------------------------------------------------------------- TTA


class _SizeModel(nn.Module):
    """Stub segmentor: scores = the input width everywhere; records the input sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[int, int]] = []

    def inference(self, x, mode, crop_size, stride, out_size, flip):
        self.sizes.append(tuple(x.shape[-2:]))
        scores = torch.full((x.shape[0], 3, *x.shape[-2:]), float(x.shape[-1]))
        return F.interpolate(scores, size=out_size, mode="bilinear", align_corners=False)


def test_multi_scale_resizes_scores_to_the_original_size_then_averages():
    stub = _SizeModel()
    image = torch.randn(2, 3, 20, 40)
    scores = predict_scores(stub, image, (30, 60), scales=(0.5, 1.0, 1.5))
    assert stub.sizes == [(10, 20), (20, 40), (30, 60)]
    assert scores.shape == (2, 3, 30, 60)
    assert torch.allclose(scores, torch.full_like(scores, (20 + 40 + 60) / 3))
    with pytest.raises(ValueError, match="positive"):
        predict_scores(stub, image, (30, 60), scales=(1.0, 0.0))
    with pytest.raises(ValueError, match="non-empty"):
        predict_scores(stub, image, (30, 60), scales=())


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_multi_scale_tta_on_the_segmentor(tiny_model, mode):
    image = torch.randn(1, 3, 64, 96)
    out_size = (80, 112)  # the original image size: larger than the eval-scale input
    kw = dict(mode=mode, crop_size=64, stride=48, flip=True)
    scores = predict_scores(tiny_model, image, out_size, scales=(0.75, 1.0, 1.25), **kw)
    assert scores.shape == (1, 19, 80, 112)
    manual = []
    for s, size in ((0.75, (48, 72)), (1.0, (64, 96)), (1.25, (80, 120))):
        x = image if s == 1.0 else F.interpolate(image, size=size, mode="bilinear")
        manual.append(tiny_model.inference(x, out_size=out_size, **kw))
        assert manual[-1].shape == (1, 19, 80, 112)
    assert torch.allclose(scores, torch.stack(manual).mean(0), atol=1e-6)
    labels = predict_labels(tiny_model, image, out_size, scales=(0.75, 1.0, 1.25), **kw)
    assert torch.equal(labels, scores.argmax(1))
    single = predict_scores(tiny_model, image, out_size, scales=[1.0], **kw)
    assert torch.allclose(single, manual[1])


def test_evaluation_with_flip_and_multi_scale(tiny_model):
    cfg = EvalConfig(mode="whole", flip=True, scales=[1.0, 1.5])
    cm = evaluate_dataset(tiny_model, _val_set(), 19, cfg)
    assert int(cm.mat.sum()) == 2 * 64 * 64
    assert 0 <= cm.miou() <= 100
