"""Bad inputs found by trying rein as a new user would: each is one clear line, not a traceback.

Covers the config values that crashed the loop (intervals of 0, ``grad_accum: 0``), unknown keys
in ``data.*.options`` and ``model.backbone.timm_kwargs``, a folder of ``.jpg`` images read with
the default ``img_suffix: .png``, a corrupt file read in a DataLoader worker, and two settings
that were silently ignored (a relative ``mapping:`` file, the matcher's costs).
"""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_model_config
from PIL import Image
from test_trainer import tiny_train_config

from rein.cli import main
from rein.config import ConfigError, config_from_dict, config_to_dict, load_config
from rein.data import DataError, FolderDataset, build_dataset
from rein.segmentor import build_segmentor


def _one_line(text: str) -> str:
    text = text.strip()
    assert "\n" not in text and "Traceback" not in text, text
    return text


def _write_folder(root, n: int = 3, suffix: str = ".png", bad: int | None = None, value: int = 1):
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "ann").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = root / "img" / f"{i:03d}{suffix}"
        if i == bad:
            img.write_bytes(b"not an image")
        else:
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(img)
        Image.fromarray(np.full((64, 64), value, np.uint8)).save(root / "ann" / f"{i:03d}.png")
    return root


# -- config values -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "value", "hint"),
    [
        ("checkpoint_interval", 0, "integer >= 1"),
        ("log_interval", 0, "integer >= 1"),
        ("grad_accum", 0, "micro-batches per optimizer step"),
        ("val_interval", -1, "0: never"),
        ("max_iters", -5, "integer >= 0"),
    ],
)
def test_bad_loop_values_are_one_line_config_errors(key, value, hint):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"train": {key: value}})
    msg = _one_line(str(err.value))
    assert f"'train.{key}'" in msg and str(value) in msg and hint in msg


def test_bad_loader_values_are_one_line_config_errors():
    with pytest.raises(ConfigError, match=r"'data.batch_size'.*>= 1"):
        config_from_dict({"data": {"batch_size": 0}})
    with pytest.raises(ConfigError, match=r"'data.num_workers'.*>= 0"):
        config_from_dict({"data": {"num_workers": -1}})


def test_val_interval_zero_still_means_never():
    assert config_from_dict({"train": {"val_interval": 0}}).train.val_interval == 0


def test_zero_interval_on_the_command_line_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config_to_dict(tiny_train_config(tmp_path))))
    for override in ("train.checkpoint_interval=0", "train.log_interval=0", "train.grad_accum=0"):
        assert main(["train", str(cfg), "--no-progress", "--set", override]) == 2
        err = _one_line(capsys.readouterr().err)
        assert override.split("=")[0] in err and ">= 1" in err
    assert not (tmp_path / "tiny").exists()  # refused before anything was written


# -- unknown keys in data.*.options ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("entry", "suggestion"),
    [
        ({"name": "synthetic", "options": {"num_imgs": 4}}, "'num_images'"),
        ({"name": "folder", "root": "/x", "options": {"img_suffx": ".jpg"}}, "'img_suffix'"),
        ({"name": "acdc", "root": "/x", "options": {"conditon": "fog"}}, "'condition'"),
        ({"name": "gtav", "root": "/x", "options": {"skip_bad": True}}, "data.skip_bad"),
        ({"name": "cityscapes", "root": "/x", "options": {"zzz": 1}}, "valid options"),
    ],
)
def test_unknown_dataset_option_is_a_config_error_with_a_suggestion(entry, suggestion):
    option = next(iter(entry["options"]))
    with pytest.raises(ConfigError) as err:
        config_from_dict({"data": {"val": [entry]}})
    msg = _one_line(str(err.value))
    assert f"data.val[0].options.{option}" in msg and suggestion in msg


def test_valid_dataset_options_are_accepted(tmp_path):
    cfg = config_from_dict(
        {
            "data": {
                "train": [
                    {"name": "folder", "root": "/x", "options": {"img_dir": "a", "ann_dir": "b"}},
                    {"name": "synthetic", "options": {"num_images": 2, "size": [8, 8]}},
                    {"name": "gta5", "root": "/x", "options": {"split_file": "s.txt"}},
                ],
                "val": [{"name": "acdc", "root": "/x", "options": {"condition": "fog"}}],
            }
        }
    )
    assert cfg.data.train[2].options == {"split_file": "s.txt"}
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  val:\n  - name: synthetic\n    options: {style: fog, sede: 1}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*'seed'"):
        load_config(path)


def test_build_dataset_names_an_unknown_option():
    with pytest.raises(ValueError, match="did you mean 'num_images'"):
        build_dataset("synthetic", None, "val", num_image=2)


# -- unknown timm_kwargs -------------------------------------------------------------------------------
def test_unknown_timm_kwarg_names_the_key_and_the_model(tmp_path, capsys):
    cfg = tiny_model_config()
    cfg.backbone.timm_kwargs["embed_dims"] = 32
    with pytest.raises(ValueError) as err:
        build_segmentor(cfg)
    msg = _one_line(str(err.value))
    assert "model.backbone.timm_kwargs.embed_dims" in msg and "vit_small_patch14_dinov2" in msg
    assert "did you mean 'embed_dim'" in msg
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": dataclasses.asdict(cfg)}))
    assert main(["params", str(path)]) == 2
    assert "timm_kwargs.embed_dims" in _one_line(capsys.readouterr().err)


# -- image suffix -----------------------------------------------------------------------------------------
def test_jpg_images_with_the_default_png_suffix_say_what_was_found(tmp_path):
    _write_folder(tmp_path, n=2, suffix=".jpg")
    with pytest.raises(DataError) as err:
        FolderDataset(tmp_path / "img", tmp_path / "ann")
    msg = _one_line(str(err.value))
    assert "{" not in msg  # no unfilled {img_dir} placeholders
    assert str(tmp_path / "img") in msg and "'.png'" in msg and "2 x .jpg" in msg
    assert "img_suffix: .jpg" in msg
    ds = build_dataset("folder", tmp_path, None, img_dir="img", ann_dir="ann", img_suffix=".jpg")
    assert len(ds) == 2


def test_labels_with_another_suffix_say_what_was_found(tmp_path):
    _write_folder(tmp_path, n=2)
    with pytest.raises(DataError) as err:
        FolderDataset(tmp_path / "img", tmp_path / "ann", ann_suffix="_labelTrainIds.png")
    msg = _one_line(str(err.value))
    assert "{" not in msg and "ann_suffix" in msg and "000_labelTrainIds.png" in msg
    assert "e.g. 000.png" in msg


# -- a bad file read by a DataLoader worker -------------------------------------------------------------
def _as_list(batch):
    return batch


def test_data_error_survives_pickling_and_the_worker_boundary(tmp_path):
    err = DataError("cannot decode image file x.png")
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is DataError and str(again) == str(err)
    _write_folder(tmp_path, n=2, bad=1)
    ds = FolderDataset(tmp_path / "img", tmp_path / "ann")
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1, collate_fn=_as_list)
    with pytest.raises(DataError) as info:
        list(loader)
    msg = _one_line(str(info.value))
    assert "001.png" in msg and "worker process 0" in msg and "Caught" not in msg


def test_rein_train_with_workers_reports_a_bad_file_in_one_line(tmp_path, capsys):
    data = _write_folder(tmp_path / "data", n=3, bad=1)
    cfg = tiny_train_config(tmp_path / "runs", max_iters=2)
    cfg.data.num_workers = 2
    cfg.data.val = []
    cfg.data.train = config_from_dict(
        {
            "data": {
                "train": [
                    {
                        "name": "folder",
                        "root": str(data),
                        "split": "all",
                        "options": {"img_dir": "img", "ann_dir": "ann"},
                    }
                ]
            }
        }
    ).data.train
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert main(["train", str(path), "--no-progress"]) == 2
    text = capsys.readouterr().err
    assert "Traceback" not in text and "Caught DataError" not in text, text
    err = text.strip().splitlines()[-1]  # (a warning line may come first)
    assert err.startswith("rein train: error: ") and "001.png" in err and "worker" in err


# -- settings that were silently ignored -------------------------------------------------------------------
def test_relative_mapping_file_is_read_from_the_dataset_root(tmp_path, monkeypatch):
    root = _write_folder(tmp_path / "data", n=2, value=7)
    (root / "map.yaml").write_text("7: 3\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ds = build_dataset("folder", root, None, img_dir="img", ann_dir="ann", mapping="map.yaml")
    assert (ds[0]["label"] == 3).all()
    with pytest.raises(DataError, match=str(root / "nope.yaml")):
        build_dataset("folder", root, None, img_dir="img", ann_dir="ann", mapping="nope.yaml")
    absolute = build_dataset(
        "folder", root, None, img_dir="img", ann_dir="ann", mapping=str(root / "map.yaml")
    )
    assert (absolute[1]["label"] == 3).all()


def test_matcher_costs_follow_the_loss_weights():
    cfg = tiny_model_config()
    default = build_segmentor(cfg).criterion.matcher
    assert (default.cost_class, default.cost_mask, default.cost_dice) == (2.0, 5.0, 5.0)
    cfg.loss.class_weight, cfg.loss.mask_weight, cfg.loss.dice_weight = 1.0, 3.0, 4.0
    m = build_segmentor(cfg).criterion.matcher
    assert (m.cost_class, m.cost_mask, m.cost_dice) == (1.0, 3.0, 4.0)
