"""The built-in demo: results files, pretraining cache, label-free pretraining, other backbones."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import rein.pretrain as pretrain
from rein.backbones.weights import write_state_dict
from rein.data.synthetic import SOURCE_STYLE, TARGET_STYLES
from rein.demo import QUICK, demo_config, run_demo
from rein.pretrain import PretrainSettings, UnlabeledViews, build_vit, render_unlabeled_pool


def _quiet(_: str) -> None:
    pass


def _no_pretraining(*args, **kwargs):
    raise AssertionError("pretraining ran although its weights are cached / not needed")


def _check_outputs(out, methods):
    for name in ("results.json", "results.md", "predictions.png", "miou.png"):
        assert (out / name).is_file(), name
    for name in ("predictions.png", "miou.png"):
        with Image.open(out / name) as img:
            assert img.size[0] > 100 and img.size[1] > 100
    report = json.loads((out / "results.json").read_text())
    for m in methods:
        res = report["methods"][m]
        for style in (SOURCE_STYLE, *TARGET_STYLES):
            assert 0.0 <= res["mIoU"][style] <= 100.0, (m, style)
        avg = sum(res["mIoU"][s] for s in TARGET_STYLES) / len(TARGET_STYLES)
        assert math.isclose(res["dg_avg"], avg, rel_tol=1e-9)
        assert res["trainable_params"] > 0 and res["sec_per_iter"] > 0
        # every seed's numbers are kept, and the cells are their mean
        seeds = report["settings"]["seeds"]
        assert [r["seed"] for r in res["runs"]] == seeds == res["seeds"]
        for style in (SOURCE_STYLE, *TARGET_STYLES):
            per_seed = [r["mIoU"][style] for r in res["runs"]]
            assert math.isclose(res["mIoU"][style], sum(per_seed) / len(seeds), rel_tol=1e-9)
            assert res["mIoU_std"][style] >= 0.0
    text = (out / "results.md").read_text()
    assert "DG avg" in text and "Rein" in text and "Frozen" in text
    assert "±" in report["table"] and "Rein - Frozen, DG avg" in text
    assert report["comparisons"]["rein"]["a"] == "Rein"
    return report


def test_quick_demo_writes_results_and_reuses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REIN_CACHE", str(tmp_path / "cache"))
    first = run_demo(out_dir=tmp_path / "a", quick=True, progress=False, log=_quiet)
    report = _check_outputs(tmp_path / "a", ["frozen", "rein"])
    assert report["backbone"]["cached"] is False and first["backbone"]["cached"] is False
    cached = list((tmp_path / "cache" / "demo").glob("vit_*.safetensors"))
    assert len(cached) == 1 and cached[0].with_suffix(".json").is_file()
    # Rein trains its tokens on top of the same head: more trainable parameters than frozen
    methods = report["methods"]
    assert methods["rein"]["trainable_params"] > methods["frozen"]["trainable_params"]

    # Second run: the weights come from the cache; pretraining must not run again.
    monkeypatch.setattr(pretrain, "pretrain_vit", _no_pretraining)
    second = run_demo(out_dir=tmp_path / "b", quick=True, compare=True, progress=False, log=_quiet)
    assert second["backbone"]["cached"] is True
    assert second["backbone"]["path"] == first["backbone"]["path"]
    done = [m for m in ("full", "lora", "soma", "recyclelora", "fada") if m in second["methods"]]
    assert {"full", "soma", "recyclelora", "fada"} <= set(done)
    assert "lora" in done or "lora" in second["skipped"]
    _check_outputs(tmp_path / "b", ["frozen", "rein", *done])
    # Same seed and settings: the frozen and Rein numbers are reproducible.
    for m in ("frozen", "rein"):
        assert second["methods"][m]["mIoU"] == first["methods"][m]["mIoU"]


def test_parallel_runs_give_the_numbers_of_in_process_runs(tmp_path, monkeypatch):
    """Each run uses one thread, so running two at once (jobs=2) changes no number."""
    monkeypatch.setenv("REIN_CACHE", str(tmp_path / "cache"))
    one = run_demo(out_dir=tmp_path / "a", quick=True, progress=False, log=_quiet, jobs=0)
    two = run_demo(out_dir=tmp_path / "b", quick=True, progress=False, log=_quiet, jobs=2)
    for m in ("frozen", "rein"):
        assert [r["mIoU"] for r in two["methods"][m]["runs"]] == [
            r["mIoU"] for r in one["methods"][m]["runs"]
        ]
    _check_outputs(tmp_path / "b", ["frozen", "rein"])
    with (
        Image.open(tmp_path / "a" / "predictions.png") as a,
        Image.open(tmp_path / "b" / "predictions.png") as b,
    ):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_demo_refuses_bad_seeds_and_jobs(tmp_path):
    with pytest.raises(ValueError, match="seeds must be distinct"):
        run_demo(out_dir=tmp_path, quick=True, progress=False, log=_quiet, seeds=[1, 1])
    with pytest.raises(ValueError, match="--jobs must be >= 0"):
        run_demo(out_dir=tmp_path, quick=True, progress=False, log=_quiet, jobs=-1)
    with pytest.raises(ValueError, match="unknown demo method.*rien.*choose from frozen, rein"):
        run_demo(out_dir=tmp_path, quick=True, progress=False, log=_quiet, methods=["rien"])


def test_methods_option_trains_exactly_those(tmp_path, monkeypatch):
    monkeypatch.setenv("REIN_CACHE", str(tmp_path / "cache"))
    report = run_demo(
        out_dir=tmp_path, quick=True, progress=False, log=_quiet, methods=["frozen", "set"],
        seeds=[3],
    )  # fmt: skip
    assert list(report["methods"]) == ["frozen", "set"]
    assert report["methods"]["set"]["seeds"] == [3]
    assert report["comparisons"]["set"]["exceeds_spread"] is None  # one seed: no spread
    assert "one seed only" in (tmp_path / "results.md").read_text()


class _Forbidden:
    """A label map stand-in that fails on any use."""

    def __getattr__(self, name):
        raise AssertionError(f"the pretraining used a label map ({name})")

    def __array__(self, *args, **kwargs):
        raise AssertionError("the pretraining used a label map")

    def __getitem__(self, key):
        raise AssertionError("the pretraining used a label map")

    def __len__(self):
        raise AssertionError("the pretraining used a label map")

    def __bool__(self):
        raise AssertionError("the pretraining used a label map")


def test_pretraining_never_reads_labels(monkeypatch):
    real = pretrain.render_scene
    calls = []

    def images_only(seed, size, style):
        calls.append(style)
        image, _ = real(seed, size, style)
        return image, _Forbidden()

    monkeypatch.setattr(pretrain, "render_scene", images_only)
    settings = QUICK.pretrain
    state, stats = pretrain.pretrain_vit(settings, progress=False, log=_quiet, workers=0)
    assert set(calls) == set(settings.styles)  # every style, source and targets
    assert len(calls) == settings.num_scenes * len(settings.styles)
    assert math.isfinite(stats["final_loss"])
    assert set(state) == set(build_vit(settings).state_dict())  # timm ViT keys

    pool = render_unlabeled_pool(dataclasses.replace(settings, num_scenes=2))
    assert pool.dtype == np.uint8 and pool.shape[1:] == (len(settings.styles), 48, 48, 3)
    with pytest.raises(ValueError, match="uint8"):  # the pair sampler takes images only
        UnlabeledViews(pool[..., 0], settings)


def test_cross_style_views_match_patch_for_patch():
    settings = PretrainSettings(
        img_size=32, render_size=48, num_scenes=3, batch_size=6, jitter=0.0, rescale=(32, 48, 64)
    )
    pool = render_unlabeled_pool(dataclasses.replace(settings, styles=("game",)))
    views = UnlabeledViews(np.concatenate([pool, pool], axis=1), settings)  # two equal "styles"
    gen = torch.Generator().manual_seed(0)
    p = settings.patch_size
    for _ in range(4):
        a, b, idx_a, idx_b = views.batch(gen)
        assert idx_a.numel() > 0

        def patches(x):
            return x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).flatten(0, 2)

        pa, pb = patches(a).flatten(1)[idx_a], patches(b).flatten(1)[idx_b]
        # flips mirror a patch's pixels: compare the sorted values of each patch
        assert torch.allclose(pa.sort(-1).values, pb.sort(-1).values, atol=1e-5)
        shuffled = pb[torch.roll(torch.arange(pb.shape[0]), 1)]
        assert not torch.allclose(pa.sort(-1).values, shuffled.sort(-1).values, atol=1e-5)


def test_config_loads_the_pretrained_file_through_build_segmentor(tmp_path):
    from rein.segmentor import build_segmentor

    torch.manual_seed(1)
    state = build_vit(QUICK.pretrain).state_dict()
    path = tmp_path / "vit.safetensors"
    write_state_dict(state, path)
    cfg = demo_config("rein", QUICK, str(path), tmp_path)
    model = build_segmentor(cfg.model)
    vit = model.backbone.vit.state_dict()
    assert all(torch.equal(vit[k], v) for k, v in state.items())
    assert not any(p.requires_grad for p in model.backbone.vit.parameters())


def test_only_full_fine_tuning_gets_a_lower_backbone_lr(tmp_path):
    from rein.engine.optim import build_optimizer
    from rein.segmentor import build_segmentor

    lrs = {}
    for method in ("full", "rein"):
        cfg = demo_config(method, QUICK, None, tmp_path)
        optimizer = build_optimizer(build_segmentor(cfg.model, load_weights=False), cfg.optim)
        lrs[method] = {g["lr"] for g in optimizer.param_groups}
    lr = QUICK.lr
    assert lrs["full"] == {lr, lr * QUICK.full_backbone_lr_mult}
    assert lrs["rein"] == {lr}


def test_head_widths_follow_the_demo_settings(tmp_path):
    """The head's FFN and mask-feature widths come from DemoSettings, not the 256-channel
    Mask2Former defaults, for every method."""
    from rein.demo import DEFAULT
    from rein.segmentor import build_segmentor

    for method in ("frozen", "rein"):
        head = demo_config(method, DEFAULT, None, tmp_path).model.head
        assert (
            head.feedforward_channels,
            head.encoder_feedforward_channels,
            head.out_channels,
        ) == (
            DEFAULT.feedforward_channels,
            DEFAULT.encoder_feedforward_channels,
            DEFAULT.out_channels,
        )
    model = build_segmentor(demo_config("rein", QUICK, None, tmp_path).model, load_weights=False)
    ffn_widths = {
        m.out_features
        for name, m in model.decode_head.transformer_decoder.named_modules()
        if isinstance(m, torch.nn.Linear) and "ffn" in name
    }
    assert QUICK.feedforward_channels in ffn_widths
    assert 2048 not in ffn_widths


def test_backbone_file_skips_pretraining(tmp_path, monkeypatch):
    monkeypatch.setenv("REIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrain, "pretrain_vit", _no_pretraining)
    path = tmp_path / "my_vit.safetensors"
    write_state_dict(build_vit(QUICK.pretrain).state_dict(), path)
    report = run_demo(
        out_dir=tmp_path / "out", backbone=str(path), quick=True, progress=False, log=_quiet
    )
    assert report["backbone"]["source"] == "file"
    _check_outputs(tmp_path / "out", ["frozen", "rein"])
    assert not (tmp_path / "cache").exists()


def test_cli_demo_quick(tmp_path):
    env = {**os.environ, "REIN_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rein.cli",
            "demo",
            "--quick",
            "--no-progress",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "WITHOUT segmentation labels" in proc.stdout
    assert "DG avg" in proc.stdout
    assert (tmp_path / "out" / "results.json").is_file()
