"""Per-dataset data options: ``eval_scale`` (val), ``subset`` (train) and ``data.pad_position``.

SoMA / RecycleLoRA evaluate Cityscapes and Mapillary at (2048, 1024); RecycleLoRA trains on a
random 12,403 of GTAV's images (RandomSubsetDataset) and pads raw pixels with 0 right after the
crop, before the flip and the photometric distortion.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_data import make_cityscapes
from test_trainer import tiny_train_config

import rein.data
import rein.engine.trainer as trainer
from rein.config import ConfigError, config_from_dict, config_to_dict, load_config, save_config
from rein.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    Pad,
    PhotoMetricDistortion,
    RandomCrop,
    RandomFlip,
    RandomResizeShortEdge,
    RandomSubsetDataset,
    ToTensorNormalize,
    build_train_pipeline,
    subset_indices,
)
from rein.data.transforms import rescale_size
from rein.engine.checkpoint import load_checkpoint

NEG = -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)  # raw 0 after normalisation


# -- config keys ---------------------------------------------------------------------------------
def test_options_parse_round_trip_and_default_to_off(tmp_path):
    cfg = config_from_dict(
        {
            "data": {
                "train": [{"name": "gtav", "subset": {"num_samples": 12403}}],
                "val": [{"name": "cityscapes", "eval_scale": [2048, 1024]}, {"name": "bdd100k"}],
                "pad_position": "before_flip",
            }
        }
    )
    assert cfg.data.train[0].subset.num_samples == 12403 and cfg.data.train[0].subset.seed is None
    assert cfg.data.val[0].eval_scale == (2048, 1024) and cfg.data.val[1].eval_scale is None
    assert cfg.data.train[0].eval_scale is None and cfg.data.val[0].subset is None
    save_config(cfg, tmp_path / "c.yaml")
    assert config_to_dict(load_config(tmp_path / "c.yaml")) == config_to_dict(cfg)
    default = config_from_dict({"data": {"train": [{"name": "gtav"}]}})
    assert default.data.pad_position == "after_normalize" and default.data.train[0].subset is None
    over = load_config(tmp_path / "c.yaml", ["data.val.1.eval_scale=[1280, 720]"])
    assert over.data.val[1].eval_scale == (1280, 720)


@pytest.mark.parametrize(
    "data, key, hint",
    [
        ({"val": [{"name": "x", "eval_scale": [2048, 0]}]}, "data.val[0].eval_scale", "positive"),
        ({"val": [{"name": "x", "eval_scale": [-1, 5]}]}, "data.val[0].eval_scale", "[2048, 1024]"),
        ({"val": [{"name": "x", "eval_scale": [2048]}]}, "data.val[0].eval_scale", "2 items"),
        ({"val": [{"name": "x", "eval_scale": "full"}]}, "data.val[0].eval_scale", "tuple[int"),
        ({"val": [{"name": "x", "eval_scale": [1.5, 2]}]}, "data.val[0].eval_scale[0]", "int"),
        ({"train": [{"name": "x", "eval_scale": [8, 8]}]}, "data.train[0].eval_scale", "data.val"),
        ({"val": [{"name": "x", "subset": {"num_samples": 3}}]}, "data.val[0].subset", "train"),
        (
            {"train": [{"name": "x", "subset": {"num_samples": 0}}]},
            "data.train[0].subset.num_samples",
            "positive",
        ),
        (
            {"train": [{"name": "x", "subset": {"num_samples": 3, "seed": -2}}]},
            "data.train[0].subset.seed",
            "null",
        ),
        (
            {"train": [{"name": "x", "subset": {"seed": 3}}]},
            "data.train[0].subset.num_samples",
            "missing",
        ),
        ({"train": [{"name": "x", "subset": 5}]}, "data.train[0].subset", "SubsetConfig"),
        ({"pad_position": "before"}, "data.pad_position", "after_normalize, before_flip"),
    ],
)
def test_bad_values_are_one_line_config_errors(data, key, hint):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"data": data}, source="x.yaml")
    msg = str(err.value)
    assert "\n" not in msg and f"'{key}'" in msg and "x.yaml" in msg and hint in msg, msg


# -- evaluation resize ---------------------------------------------------------------------------
def test_val_eval_scale_overrides_the_dataset_default_and_null_keeps_it(tmp_path):
    make_cityscapes(tmp_path / "cs", "val")  # 6 x 8 images
    root = str(tmp_path / "cs")
    cfg = config_from_dict(
        {
            "data": {
                "val": [
                    {"name": "cityscapes", "root": root, "split": "val"},
                    {"name": "cityscapes", "root": root, "split": "val", "eval_scale": [16, 8]},
                ]
            }
        }
    )
    default, override = trainer.build_val_sets(cfg).values()
    assert default.transform.transforms[0].scale == (1024, 512)  # eval_scale("cityscapes", 512)
    assert override.transform.transforms[0].scale == (16, 8)
    assert tuple(default[0]["image"].shape[1:]) == rescale_size((6, 8), (1024, 512))
    assert tuple(override[0]["image"].shape[1:]) == rescale_size((6, 8), (16, 8)) == (8, 11)
    assert override[0]["label"].shape == (6, 8)  # labels stay at the original size


# -- the raw-pixel pad ---------------------------------------------------------------------------
def _sample(h: int = 20, w: int = 30, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(1, 256, (h, w, 3), dtype=np.uint8),  # no raw 0 in the image
        "label": rng.integers(0, 19, (h, w)).astype(np.uint8),
        "meta": {"ori_shape": (h, w)},
    }


def _types(pipe: Compose) -> list[type]:
    return [type(t) for t in pipe.transforms]


def test_default_pipeline_is_unchanged():
    kw = dict(crop=32, scales=[20, 40, 64])
    default = build_train_pipeline(**kw, seed=4)
    assert _types(default) == [
        RandomResizeShortEdge,
        RandomCrop,
        RandomFlip,
        PhotoMetricDistortion,
        ToTensorNormalize,
        Pad,
    ]
    old = Compose(  # the pipeline as it was before pad_position existed
        [
            RandomResizeShortEdge([20, 40, 64], 2048),
            RandomCrop((32, 32), cat_max_ratio=0.75),
            RandomFlip(0.5),
            PhotoMetricDistortion(),
            ToTensorNormalize(),
            Pad((32, 32), img_pad=0.0, label_pad=255),
        ],
        seed=4,
    )
    explicit = build_train_pipeline(**kw, seed=4, pad_position="after_normalize")
    for i in range(6):
        s = _sample(seed=i)
        a, b, c = default(s), old(s), explicit(s)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["image"], c["image"])
        assert torch.equal(a["label"], b["label"]) and torch.equal(a["label"], c["label"])
    with pytest.raises(ValueError, match="before_flip"):
        build_train_pipeline(pad_position="first")


def test_pad_before_flip_pads_raw_zero_then_flips_and_normalises():
    kw = dict(crop=(32, 40), scales=[20], photometric=False, seed=1)  # 20 x 30 -> pad 12 / 10
    pipe = build_train_pipeline(pad_position="before_flip", flip_p=0.0, **kw)
    assert _types(pipe) == [RandomResizeShortEdge, RandomCrop, Pad, RandomFlip, ToTensorNormalize]
    s = _sample()
    out = pipe(s)
    assert out["image"].shape == (3, 32, 40) and out["label"].shape == (32, 40)
    pad = torch.ones(32, 40, dtype=torch.bool)
    pad[:20, :30] = False
    expect = NEG[:, None].expand(3, int(pad.sum()))
    assert torch.allclose(out["image"][:, pad], expect, atol=1e-6)
    assert (out["label"][pad] == 255).all()
    # the image part equals the default pipeline's (which pads 0 *after* normalisation)
    after = build_train_pipeline(flip_p=0.0, **kw)(s)
    assert torch.equal(out["image"][:, :20, :30], after["image"][:, :20, :30])
    assert (after["image"][:, pad] == 0).all() and torch.equal(out["label"], after["label"])
    # flipped after padding: the pad lands on the left
    flipped = build_train_pipeline(pad_position="before_flip", flip_p=1.0, **kw)(s)
    assert torch.allclose(flipped["image"][:, :, :10], NEG[:, None, None].expand(3, 32, 10))
    assert (flipped["label"][:, :10] == 255).all()


def test_pad_before_flip_goes_through_the_photometric_distortion():
    pipe = build_train_pipeline(crop=32, scales=[20], pad_position="before_flip", seed=0)
    seen = []
    spy = lambda s, rng=None: (seen.append(s["image"].copy()), s)[1]  # noqa: E731
    pipe.transforms.insert(3, spy)  # right after the Pad, before the flip
    for i in range(8):
        pipe(_sample(seed=i))
    for raw in seen:
        assert raw.dtype == np.uint8 and raw.shape == (32, 32, 3)
        assert (raw[20:] == 0).all() and (raw[:20, 30:] == 0).all() and raw[:20, :30].min() > 0


# -- RandomSubsetDataset -------------------------------------------------------------------------
class _Range:
    """A dataset of ``n`` integers with ``sample`` as the trainer calls it."""

    name = "range"

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i

    def sample(self, i, transform=None, rng=None):
        return {"index": i, "rng": rng}


def _formula(n: int, k: int, seed: int) -> list[int]:
    return sorted(np.random.default_rng(seed).choice(n, size=min(k, n), replace=False).tolist())


def test_subset_indices_follow_the_official_formula():
    ds = RandomSubsetDataset(_Range(24966), 12403, seed=7)
    assert ds.indices == _formula(24966, 12403, 7) and len(ds) == 12403
    assert ds.indices == sorted(set(ds.indices)) and not ds.seed_drawn
    assert [ds[i] for i in (0, 1, -1)] == [ds.indices[0], ds.indices[1], ds.indices[-1]]
    assert ds.sample(2, None, "g") == {"index": ds.indices[2], "rng": "g"}
    with pytest.raises(IndexError):
        ds[12403]
    small = RandomSubsetDataset(_Range(10), 25, seed=3)  # min(N, num_samples)
    assert small.indices == list(range(10)) and "kept 10/10" in small.describe()
    assert subset_indices(50, 20, 0) == _formula(50, 20, 0) != subset_indices(50, 20, 1)


def test_subset_seed_null_draws_from_os_entropy_and_says_so():
    a, b = RandomSubsetDataset(_Range(1000), 10), RandomSubsetDataset(_Range(1000), 10)
    assert a.seed_drawn and 0 <= a.seed < 2**32 and a.seed != b.seed
    assert a.indices == _formula(1000, 10, a.seed)
    assert f"seed={a.seed} (drawn from OS entropy)" in a.describe()


# -- the trainer: log, record, resume ------------------------------------------------------------
def _subset_cfg(out: Path, seed=None, **train):
    cfg = tiny_train_config(out, **train)
    cfg.data.train[0].options["num_images"] = 12
    d = config_to_dict(cfg)
    d["data"]["train"][0]["subset"] = {"num_samples": 5, "seed": seed}
    d["data"]["pad_position"] = "before_flip"
    return config_from_dict(d)


def test_trainer_logs_records_and_resumes_the_drawn_subset(tmp_path, monkeypatch, capsys):
    built, pipelines = [], []
    build, pipeline = trainer.build_train_set, rein.data.build_train_pipeline
    monkeypatch.setattr(
        trainer, "build_train_set", lambda *a, **k: built.append(build(*a, **k)) or built[-1]
    )
    monkeypatch.setattr(
        rein.data, "build_train_pipeline", lambda **k: pipelines.append(k) or pipeline(**k)
    )
    trainer.train(_subset_cfg(tmp_path), progress=False, stop_after=2)
    first = built[-1][0]
    assert isinstance(first, RandomSubsetDataset) and len(first) == 5
    assert first.indices == _formula(12, 5, first.seed)
    assert pipelines[-1]["pad_position"] == "before_flip"
    lines = [x for x in capsys.readouterr().out.splitlines() if "RandomSubsetDataset" in x]
    assert len(lines) == 1 and f"seed={first.seed} (drawn from OS entropy" in lines[0]
    _, meta, state = load_checkpoint(tmp_path / "tiny", "latest")
    want = {"index": 0, "name": "synthetic", "num_samples": 5, "seed": first.seed, "total": 12}
    assert state["data_subsets"] == [{**want, "kept": 5}] == meta["data_subsets"]
    on_disk = json.loads((tmp_path / "tiny" / "latest.json").read_text())
    assert on_disk["data_subsets"][0]["seed"] == first.seed

    def no_draw():
        raise AssertionError("a resumed run drew a new subset seed")

    monkeypatch.setattr(rein.data, "draw_subset_seed", no_draw)
    result = trainer.train(_subset_cfg(tmp_path), progress=False)
    assert result["iteration"] == 4
    resumed = built[-1][0]
    assert resumed.seed == first.seed and resumed.indices == first.indices
    out = capsys.readouterr().out
    assert f"seed={first.seed} (recorded in {tmp_path / 'tiny' / 'latest'})" in out
    _, _, state = load_checkpoint(tmp_path / "tiny", "latest")
    assert state["data_subsets"][0]["seed"] == first.seed  # carried on into later checkpoints
    # a resume that asks for another subset is refused, naming the key and the recorded seed
    # (checked before the rest of the config, which may not change either)
    other = (first.seed + 1) % 2**32
    cfg = _subset_cfg(tmp_path, seed=other)
    with pytest.raises(ValueError, match=rf"data.train\[0\].subset.seed={first.seed}"):
        trainer.train(cfg, progress=False)


def test_fixed_subset_seed_is_used_as_given(tmp_path, monkeypatch):
    built = []
    build = trainer.build_train_set
    monkeypatch.setattr(
        trainer, "build_train_set", lambda *a, **k: built.append(build(*a, **k)) or built[-1]
    )
    trainer.train(_subset_cfg(tmp_path, seed=11, max_iters=2), progress=False)
    assert built[-1][0].seed == 11 and built[-1][0].indices == _formula(12, 5, 11)
    _, _, state = load_checkpoint(tmp_path / "tiny", "latest")
    assert state["data_subsets"][0]["seed"] == 11


# -- two ranks train on one subset ---------------------------------------------------------------
WORLD = 2


def _rank_worker(rank: int, tmp: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD)
    cfg = config_from_dict({"data": {"train": [{"name": "x", "subset": {"num_samples": 4}}]}})
    seeds, _ = trainer._subset_seeds(cfg, None, None, WORLD)
    ds = RandomSubsetDataset(_Range(100), 4, seeds[0])
    (Path(tmp) / f"rank{rank}.json").write_text(json.dumps({"seed": ds.seed, "idx": ds.indices}))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.skipif(sys.platform != "linux", reason="gloo test on linux")
def test_all_ranks_use_rank_zeros_subset(tmp_path):
    mp.spawn(_rank_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD))
    assert r0 == r1 and r0["idx"] == _formula(100, 4, r0["seed"])
