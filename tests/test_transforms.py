"""Augmentation and preprocessing: mmseg semantics, exact padding, reproducible randomness."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rein.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    Pad,
    PhotoMetricDistortion,
    RandomCrop,
    RandomFlip,
    RandomResizeShortEdge,
    Resize,
    ToTensorNormalize,
    build_eval_pipeline,
    build_train_pipeline,
)
from rein.data.transforms import eval_scale, hsv_to_rgb, rescale_size, rgb_to_hsv, short_edge_scales


def sample(h: int, w: int, seed: int = 0, label: np.ndarray | None = None) -> dict:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    lab = rng.integers(0, 19, (h, w), dtype=np.uint8) if label is None else label
    return {"image": img, "label": lab, "meta": {"ori_shape": (h, w)}}


def test_short_edge_scales():
    scales = short_edge_scales(512)
    assert scales[:4] == [256, 307, 358, 409] and scales[-1] == 1024 and len(scales) == 16


def test_random_resize_short_edge():
    full = RandomResizeShortEdge()
    assert full.scales == short_edge_scales(512) and full.max_long == 2048
    assert full.output_size((1052, 1914), 512) == (512, 932)  # a GTAV frame
    assert full.output_size((100, 1000), 1024) == (205, 2048)  # long edge capped at 2048
    t = RandomResizeShortEdge([8, 12, 16, 20, 24, 28, 32], max_long=None)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(40):
        out = t(sample(20, 30), rng)
        h, w = out["image"].shape[:2]
        assert out["label"].shape == (h, w) and out["meta"]["img_shape"] == (h, w)
        assert min(h, w) in t.scales
        seen.add(min(h, w))
    assert len(seen) > 5
    capped = RandomResizeShortEdge([32], max_long=40)(sample(10, 40), rng)
    assert capped["image"].shape[:2] == (10, 40)  # 32 x 128 scaled back to a long side of 40
    lab = np.zeros((20, 30), np.uint8)
    lab[:, 15:] = 7
    out = t(sample(20, 30, label=lab), rng)
    assert set(np.unique(out["label"])) == {0, 7}  # nearest: no new values


def test_resize_keep_ratio_and_eval_label():
    assert rescale_size((1024, 2048), (1024, 512)) == (512, 1024)
    assert rescale_size((720, 1280), (1280, 720)) == (720, 1280)
    assert rescale_size((3024, 4032), (1024, 512)) == (512, 683)
    s = sample(64, 128)
    out = Resize((64, 32), keep_ratio=True, resize_label=False)(s)
    assert out["image"].shape == (32, 64, 3) and out["label"].shape == (64, 128)
    assert out["meta"]["scale_factor"] == (0.5, 0.5)
    out = Resize((50, 20), keep_ratio=False)(s)
    assert out["image"].shape == (20, 50, 3) and out["label"].shape == (20, 50)


def test_random_crop_honours_cat_max_ratio():
    lab = np.zeros((64, 64), np.uint8)
    lab[:, 48:] = 1  # most 32x32 crops hold only class 0
    lab[:4] = 255  # ignored pixels are not counted
    s = sample(64, 64, label=lab)

    def fraction_ok(ratio: float) -> float:
        crop, rng, ok = RandomCrop(32, cat_max_ratio=ratio), np.random.default_rng(1), 0
        for _ in range(200):
            out = crop(s, rng)
            vals, cnt = np.unique(out["label"], return_counts=True)
            cnt = cnt[vals != 255]
            ok += len(cnt) > 1 and cnt.max() / cnt.sum() < 0.75
            assert out["image"].shape == (32, 32, 3)
        return ok / 200

    assert fraction_ok(0.75) > 0.85
    assert fraction_ok(1.0) < 0.4


def test_random_crop_gives_up_after_ten_retries():
    class Counting:
        def __init__(self) -> None:
            self.calls = 0

        def integers(self, lo: int, hi: int) -> int:
            self.calls += 1
            return 0

    rng = Counting()
    out = RandomCrop(8)(sample(16, 16, label=np.zeros((16, 16), np.uint8)), rng)  # type: ignore[arg-type]
    assert rng.calls == 22  # 1 + 10 boxes, two offsets each, as in mmseg
    assert out["label"].shape == (8, 8)
    small = RandomCrop(32)(sample(10, 40), np.random.default_rng(0))
    assert small["image"].shape == (10, 32, 3)  # smaller side kept; padding comes later


def test_flip_flips_both():
    s = sample(5, 7)
    out = RandomFlip(p=1.0)(s)
    assert (out["image"] == s["image"][:, ::-1]).all() and (
        out["label"] == s["label"][:, ::-1]
    ).all()
    assert out["meta"]["flip"] is True
    same = RandomFlip(p=0.0)(s)
    assert (same["image"] == s["image"]).all() and same["meta"]["flip"] is False


def test_hsv_matches_opencv():
    # reference values from cv2.cvtColor (COLOR_RGB2HSV / COLOR_HSV2RGB), 8-bit, hue in [0, 180)
    rgb = [[168, 229, 184], [171, 238, 171], [20, 206, 245], [153, 204, 5], [37, 53, 213]]
    hsv = [[68, 68, 229], [60, 72, 238], [95, 234, 245], [38, 249, 204], [117, 211, 213]]
    assert rgb_to_hsv(np.array([rgb], np.uint8))[0].tolist() == hsv
    px = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]]], np.uint8)
    assert rgb_to_hsv(px)[0].tolist() == [
        [0, 255, 255],
        [60, 255, 255],
        [120, 255, 255],
        [0, 0, 128],
    ]
    # OpenCV's HSV -> RGB truncates in its vectorised path and rounds in its scalar tail
    hsv_in = [[63, 96, 236], [131, 118, 4], [87, 161, 124], [71, 42, 73], [57, 16, 194]]
    rgb_ref = np.array([[147, 236, 156], [3, 2, 4], [46, 124, 116], [61, 73, 65], [183, 194, 182]])
    got = hsv_to_rgb(np.array([hsv_in], np.uint8))[0].astype(int)
    assert np.abs(got - rgb_ref).max() <= 1
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    back = hsv_to_rgb(rgb_to_hsv(img)).astype(int)
    assert np.abs(back - img).mean() < 1.0


def test_photometric_keeps_label_and_changes_image():
    s = sample(16, 16)
    t = PhotoMetricDistortion()
    changed = 0
    for seed in range(8):
        out = t(s, np.random.default_rng(seed))
        assert out["label"] is s["label"] and out["image"].dtype == np.uint8
        assert out["image"].shape == s["image"].shape
        changed += not np.array_equal(out["image"], s["image"])
    assert changed >= 6
    a = t(s, np.random.default_rng(3))["image"]
    b = t(s, np.random.default_rng(3))["image"]
    assert (a == b).all()


def test_normalise_then_pad_exact_values():
    s = sample(5, 7)
    out = Pad((8, 10))(ToTensorNormalize()(s))
    img, lab = out["image"], out["label"]
    assert img.shape == (3, 8, 10) and lab.shape == (8, 10) and lab.dtype == torch.int64
    assert (img[:, 5:, :] == 0).all() and (img[:, :, 7:] == 0).all()
    assert (lab[5:, :] == 255).all() and (lab[:, 7:] == 255).all()
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    expect = (torch.tensor(s["image"][2, 3], dtype=torch.float32) - mean) / std
    assert torch.allclose(img[:, 2, 3], expect)
    assert (lab[:5, :7].numpy() == s["label"]).all()
    assert out["meta"]["pad_shape"] == (8, 10)
    same = Pad((4, 4))(ToTensorNormalize()(s))
    assert same["image"].shape == (3, 5, 7)


@pytest.mark.parametrize("as_tensor", [True, False])
def test_pad_is_bottom_right_against_explicit_canvas(as_tensor):
    h, w, size = 5, 9, (8, 11)  # 3 rows at the bottom, 2 columns at the right
    rng = np.random.default_rng(4)
    img = rng.normal(size=(3, h, w)).astype(np.float32)
    lab = rng.integers(0, 19, (h, w))
    canvas = np.zeros((3, *size), np.float32)  # image pad 0
    canvas[:, :h, :w] = img
    lab_canvas = np.full(size, 255, np.int64)  # label pad 255
    lab_canvas[:h, :w] = lab
    if as_tensor:
        s = {"image": torch.from_numpy(img), "label": torch.from_numpy(lab), "meta": {}}
        out = Pad(size)(s)
        got_img, got_lab = out["image"].numpy(), out["label"].numpy()
    else:
        s = {"image": img.transpose(1, 2, 0).copy(), "label": lab, "meta": {}}
        out = Pad(size)(s)
        got_img, got_lab = out["image"].transpose(2, 0, 1), out["label"]
    assert got_img.shape == canvas.shape and got_lab.shape == lab_canvas.shape
    assert np.array_equal(got_img, canvas)
    assert np.array_equal(got_lab, lab_canvas)
    assert out["meta"]["pad_shape"] == size


def test_train_pipeline_pads_to_the_crop_bottom_right():
    s = sample(60, 90, seed=2)
    crop = (32, 40)  # larger than the 20 x 30 resized image in both sides, by different amounts
    kw = dict(crop=crop, scales=[20], photometric=False, flip_p=0.0, seed=3)
    out = build_train_pipeline(**kw)(s)
    unpadded = build_train_pipeline(pad=False, **kw)(s)
    img, lab = unpadded["image"], unpadded["label"]
    assert img.shape == (3, 20, 30)
    canvas = torch.zeros(3, *crop)
    canvas[:, :20, :30] = img
    lab_canvas = torch.full(crop, 255, dtype=torch.int64)
    lab_canvas[:20, :30] = lab
    assert torch.equal(out["image"], canvas)
    assert torch.equal(out["label"], lab_canvas)


def test_train_pipeline_shapes_and_reproducibility():
    s = sample(60, 90)
    out = build_train_pipeline(crop=32, scales=[20, 40, 64], seed=0)(s)
    assert out["image"].shape == (3, 32, 32) and out["label"].shape == (32, 32)
    a = [build_train_pipeline(crop=32, scales=[20, 40, 64], seed=5)(s) for _ in range(2)]
    assert torch.equal(a[0]["image"], a[1]["image"]) and torch.equal(a[0]["label"], a[1]["label"])
    p = build_train_pipeline(crop=32, scales=[20, 40, 64], seed=5)
    first, second = p(s), p(s)
    assert not torch.equal(first["image"], second["image"])  # the stream moves on
    p.reseed(5)
    assert torch.equal(p(s)["image"], first["image"])
    padded = build_train_pipeline(crop=32, scales=[20], seed=1)(s)  # short edge 20 < crop
    assert (padded["label"][20:] == 255).all()


class _Repeat(torch.utils.data.Dataset):
    def __init__(self, transform: Compose) -> None:
        self.transform = transform
        self.base = sample(40, 40)

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.base)["image"]


def test_dataloader_workers_get_distinct_reproducible_streams():
    def run() -> list[torch.Tensor]:
        torch.manual_seed(0)
        ds = _Repeat(build_train_pipeline(crop=16, scales=[16, 24, 40], seed=3))
        loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2)
        return [b[0] for b in loader]

    first, again = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    # sample 0 comes from worker 0, sample 1 from worker 1: their first draws must differ
    assert not torch.equal(first[0], first[1])


def test_eval_pipeline_scales():
    assert eval_scale("cityscapes") == (1024, 512) and eval_scale("bdd100k") == (1280, 720)
    assert eval_scale("acdc", crop=1024) == (1920, 1080) and eval_scale("mapillary") == (1024, 512)
    s = sample(128, 256)
    out = build_eval_pipeline("cityscapes")(s)
    assert out["image"].shape == (3, 512, 1024) and out["label"].shape == (128, 256)
    assert out["meta"]["ori_shape"] == (128, 256)
    out = build_eval_pipeline("synthetic")(s)
    assert out["image"].shape == (3, 128, 256)
    out = build_eval_pipeline("cityscapes", scale=(64, 32))(s)
    assert out["image"].shape == (3, 32, 64)
    with pytest.raises(KeyError, match="cityscapes"):
        eval_scale("kitti")
