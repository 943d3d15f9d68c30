"""The same numbers whatever the thread count and ``data.num_workers``; the same frozen weights
at every build of a backbone without pretrained weights.

A DataLoader worker runs torch on one thread, the main process on several: the training
pipeline must give the same pixels in both, so a run with ``num_workers: 0`` and one with
``num_workers: 2`` end with bit-identical weights. A backbone with ``weights: null`` is rebuilt
at every ``eval`` / ``predict`` (checkpoints hold only the trainable weights), so its random
init must come from ``model.backbone.init_seed``, not from whatever the global RNG holds.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from conftest import tiny_model_config
from test_trainer import tiny_train_config

import rein.backbones
from rein.backbones import build_backbone, seeded_init
from rein.data import build_eval_pipeline, build_train_pipeline
from rein.data.transforms import Resize, _resize_image, short_edge_scales
from rein.engine.checkpoint import load_checkpoint
from rein.engine.trainer import train
from rein.segmentor import build_segmentor


@contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    # smooth content (like a photo) plus noise: many resized values land near a .5 boundary
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 127.5 + 100 * np.sin(yy / 7.0)[..., None] * np.cos(xx / 11.0)[..., None]
    img = base + rng.normal(0, 20, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


# -- the pipeline ----------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(170, 227), (245, 371), (512, 683)])
def test_image_resize_is_the_same_on_one_and_two_threads(size):
    img = _image(300, 400)
    with threads(1):
        one = _resize_image(img, size)
    with threads(2):
        two = _resize_image(img, size)
        assert torch.get_num_threads() == 2  # the single-thread guard restored the count
    assert np.array_equal(one, two), f"{int((one != two).sum())} values differ"


def test_training_sample_is_the_same_on_one_and_two_threads():
    img = _image(320, 480, seed=1)
    label = np.random.default_rng(2).integers(0, 19, (320, 480), dtype=np.uint8)
    pipeline = build_train_pipeline(crop=256, scales=short_edge_scales(256), max_long=1024)
    for seed in range(8):  # 8 random scales / crops / flips / distortions
        out = {}
        for n in (1, 2):
            with threads(n):
                sample = {"image": img, "label": label, "meta": {"ori_shape": img.shape[:2]}}
                out[n] = pipeline(sample, np.random.default_rng(seed))
                assert torch.get_num_threads() == n  # restored after the single-thread resize
        assert torch.equal(out[1]["image"], out[2]["image"]), seed
        assert torch.equal(out[1]["label"], out[2]["label"]), seed


def test_eval_resize_is_the_same_on_one_and_two_threads():
    img = _image(300, 400, seed=3)
    pipeline = build_eval_pipeline("folder", scale=(683, 512))
    assert isinstance(pipeline.transforms[0], Resize)
    out = {}
    for n in (1, 2):
        with threads(n):
            out[n] = pipeline({"image": img, "meta": {"ori_shape": img.shape[:2]}})["image"]
    assert torch.equal(out[1], out[2])


def test_training_gives_the_same_weights_with_0_and_2_workers(tmp_path):
    """The trainer's loader in the main process (2 threads) and in 2 workers (1 thread each)."""
    results = {}
    for workers in (0, 2):
        cfg = tiny_train_config(tmp_path / f"w{workers}", max_iters=3, checkpoint_interval=3)
        cfg.data.num_workers = workers
        # crops of 64 from images resized to short edges up to 128 px: big enough for torch to
        # split the resize over threads
        cfg.data.train[0].options["size"] = [96, 128]
        with threads(2):
            train(cfg, progress=False)
        state, _, _ = load_checkpoint(tmp_path / f"w{workers}" / "tiny", "latest")
        results[workers] = state
    a, b = results[0], results[2]
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


# -- the random backbone ---------------------------------------------------------------------------
def _frozen(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "reins." not in k}


def test_seeded_init_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with seeded_init(5):
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    with seeded_init(5):
        assert torch.equal(torch.rand(4), a)


def test_random_backbone_is_the_same_at_every_build():
    cfg = tiny_model_config()
    assert cfg.backbone.weights is None and cfg.backbone.init_seed == 0
    torch.manual_seed(1)
    one = build_segmentor(cfg)
    torch.manual_seed(2)  # e.g. `rein eval` in a fresh process: an unseeded global RNG
    two = build_segmentor(cfg)
    f1, f2 = _frozen(one.backbone), _frozen(two.backbone)
    assert f1.keys() == f2.keys() and len(f1) > 10
    for k in f1:
        assert torch.equal(f1[k], f2[k]), k
    # the trainable weights still come from the global RNG (the run's seed)
    assert not torch.equal(
        one.backbone.reins.learnable_tokens_a, two.backbone.reins.learnable_tokens_a
    )
    # so a checkpoint (the trainable weights) restores the whole model: equal outputs
    two.load_state_dict(one.state_dict())
    x = torch.randn(1, 3, 64, 64)
    one.eval()
    two.eval()
    with torch.no_grad():
        assert torch.equal(one.seg_scores(x), two.seg_scores(x))
    cfg.backbone.init_seed = 1
    other = _frozen(build_backbone(cfg))
    assert any(not torch.equal(f1[k], other[k]) for k in f1)


def test_random_backbone_warns_once_per_process(monkeypatch, caplog):
    monkeypatch.setattr(rein.backbones, "_warned_random", False)
    cfg = tiny_model_config()
    with caplog.at_level(logging.WARNING, logger="rein"):
        with torch.device("meta"):  # `rein params`: nothing is initialised, nothing to say
            build_backbone(cfg)
        assert not caplog.records
        build_backbone(cfg)
        build_backbone(cfg)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1, msgs
    assert "\n" not in msgs[0] and "model.backbone.weights" in msgs[0]
    assert "randomly initialised" in msgs[0] and "init_seed=0" in msgs[0]
