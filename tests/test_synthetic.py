"""The built-in synthetic street world: determinism, shared layouts, style shift.

Render times: benchmarks/synthetic_render.py."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from rein.data import (
    SOURCE_STYLE,
    STYLES,
    SYNTHETIC_CLASSES,
    TARGET_STYLES,
    SyntheticDataset,
    build_train_pipeline,
    render_scene,
)

SIZE = (64, 96)


def test_constants():
    assert SOURCE_STYLE == "game" and SOURCE_STYLE not in TARGET_STYLES
    assert set(TARGET_STYLES) >= {"realistic", "fog", "night", "rain", "snow"}
    assert len(SYNTHETIC_CLASSES) >= 8 and all(0 <= c < 19 for c in SYNTHETIC_CLASSES)


def test_deterministic():
    for style in ("game", "night"):
        a_img, a_lab = render_scene(7, SIZE, style)
        b_img, b_lab = render_scene(7, SIZE, style)
        assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    assert not np.array_equal(render_scene(7, SIZE)[1], render_scene(8, SIZE)[1])


def test_output_format_and_classes():
    seen: set[int] = set()
    for seed in range(6):
        img, lab = render_scene(seed, SIZE, "realistic")
        assert img.shape == (*SIZE, 3) and img.dtype == np.uint8
        assert lab.shape == SIZE and lab.dtype == np.uint8
        seen |= set(np.unique(lab).tolist())
    assert seen <= set(SYNTHETIC_CLASSES)
    assert len(seen) >= 10


def test_styles_share_the_label_and_differ_in_pixels():
    for seed in (0, 1):
        renders = {s: render_scene(seed, SIZE, s) for s in STYLES}
        label = renders[SOURCE_STYLE][1]
        for style, (_, lab) in renders.items():
            assert np.array_equal(lab, label), style
        for a, b in itertools.combinations(STYLES, 2):
            diff = np.abs(renders[a][0].astype(int) - renders[b][0].astype(int)).mean()
            assert diff > 8, (a, b, diff)


def test_scenes_look_like_streets():
    road_bottom = sky_top = 0
    for seed in range(10):
        _, lab = render_scene(seed, (96, 128))
        road_bottom += (lab[-1, 40:88] == 0).mean() > 0.5
        sky_top += np.isin(lab[0], (2, 8, 10)).mean() > 0.8
    assert road_bottom >= 8 and sky_top >= 8


def test_source_style_is_flat():
    # the game style has no sensor noise: a road region is a handful of flat colours
    img, lab = render_scene(3, (96, 128), SOURCE_STYLE)
    road = img[lab == 0]
    assert len(np.unique(road, axis=0)) <= 6
    img_r, _ = render_scene(3, (96, 128), "realistic")
    assert len(np.unique(img_r[lab == 0], axis=0)) > 50


def test_dataset_format():
    ds = SyntheticDataset(num_images=3, style=["game", "fog"], size=SIZE, seed=1)
    assert len(ds) == 3
    s = ds[1]
    assert s["image"].shape == (3, *SIZE) and s["image"].dtype == torch.float32
    assert s["label"].shape == SIZE and s["label"].dtype == torch.int64
    assert s["meta"]["style"] == "fog" and s["meta"]["image_path"] == "synthetic://fog/train/1"
    img, lab = render_scene(s["meta"]["scene_seed"], SIZE, "fog")
    assert (s["label"].numpy() == lab).all()


def test_dataset_splits_and_styles():
    train = SyntheticDataset(2, "game", SIZE, seed=0)
    night = SyntheticDataset(2, "night", SIZE, seed=0)
    val = SyntheticDataset(2, "game", SIZE, seed=0, split="val")
    assert torch.equal(train[0]["label"], night[0]["label"])
    assert not torch.equal(train[0]["image"], night[0]["image"])
    assert train.scene_seed(0) != val.scene_seed(0)
    piped = SyntheticDataset(2, "game", SIZE, transform=build_train_pipeline(crop=32, scales=[48]))
    assert piped[0]["image"].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="style"):
        SyntheticDataset(2, "sepia")
    with pytest.raises(ValueError, match="style"):
        render_scene(0, SIZE, "sepia")


def test_position_seeded_sample():
    ds = SyntheticDataset(3, "game", SIZE, seed=2)
    pipe = build_train_pipeline(crop=32, scales=[40, 48, 64])
    a = ds.sample(1, pipe, np.random.default_rng([0, 5]))
    b = ds.sample(1, pipe, np.random.default_rng([0, 5]))
    c = ds.sample(1, pipe, np.random.default_rng([0, 6]))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(a["image"], c["image"])
    assert a["image"].shape == (3, 32, 32)
