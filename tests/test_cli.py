from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_run, tiny_vit
from PIL import Image

from rein.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_params_reproduces_the_official_counts(capsys):
    assert main(["params", str(REPO / "configs/rein_dinov2-l_mask2former_gta_512.yaml")]) == 0
    out = capsys.readouterr().out
    assert "304,199,680" in out and "2,990,081" in out and "20,579,796" in out
    assert "327,769,557" in out and "23,569,877" in out
    assert main(["params", "frozen_dinov2-l_mask2former_gta_512"]) == 0
    out = capsys.readouterr().out
    assert "324,764,884" in out and "20,565,204" in out


def test_unknown_config_key_is_a_clear_error(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model:\n  rein:\n    token_lenght: 50\n")
    assert main(["params", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "model.rein.token_lenght" in err and "token_length" in err


def test_convert_backbone_writes_converted_weights(tmp_path, capsys):
    from safetensors.torch import load_file

    src = tiny_vit(patch=14, img_size=84)
    sd = dict(src.state_dict())
    sd["mask_token"] = torch.zeros(1, 32)
    torch.save(sd, tmp_path / "dinov2.pth")
    dst = tmp_path / "dinov2_p16.safetensors"
    assert (
        main(["convert-backbone", str(tmp_path / "dinov2.pth"), str(dst), "--img-size", "64"]) == 0
    )
    out = load_file(str(dst))
    assert out["patch_embed.proj.weight"].shape == (32, 3, 16, 16)
    assert out["pos_embed"].shape == (1, 17, 32)
    assert "mask_token" in out


def _tiny_run(tmp_path: Path) -> tuple[Path, Path]:
    return tiny_run(tmp_path, style="night", mode="slide")


def test_eval_and_predict_commands(tmp_path, capsys):
    cfg, ckpt = _tiny_run(tmp_path)
    assert (
        main(["eval", str(cfg), str(ckpt), "--out", str(tmp_path / "res.json"), "--no-progress"])
        == 0
    )
    out = capsys.readouterr().out
    assert "mIoU" in out and "night" in out and (tmp_path / "res.json").is_file()
    img = tmp_path / "street.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(
        img
    )
    assert main(["predict", str(cfg), str(ckpt), str(img), "--out", str(tmp_path / "pred")]) == 0
    label = np.array(Image.open(tmp_path / "pred" / "street_labelTrainIds.png"))
    assert label.shape == (50, 70) and label.max() < 19
    assert (tmp_path / "pred" / "street_overlay.png").is_file()


def test_checkpoint_of_another_config_is_rejected(tmp_path, capsys):
    cfg, ckpt = _tiny_run(tmp_path)
    data = yaml.safe_load(cfg.read_text())
    data["model"]["rein"]["token_length"] = 5
    cfg.write_text(yaml.safe_dump(data))
    assert main(["eval", str(cfg), str(ckpt), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "learnable_tokens_a" in err and "(4, 8, 4) vs model (4, 5, 4)" in err and "ckpt" in err


def test_missing_dataset_root_lists_the_layout(tmp_path, capsys):
    cfg, ckpt = _tiny_run(tmp_path)
    data = yaml.safe_load(cfg.read_text())
    data["data"]["val"] = [
        {"name": "cityscapes", "root": str(tmp_path / "nowhere"), "split": "val"}
    ]
    cfg.write_text(yaml.safe_dump(data))
    assert main(["eval", str(cfg), str(ckpt), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "leftImg8bit" in err and "nowhere" in err


@pytest.mark.parametrize(
    "argv", [["params", "no_such_config.yaml"], ["params", "vit_lage_patch14_dinov2"]]
)
def test_unknown_config_or_backbone(argv, capsys):
    assert main(argv) == 2
    assert "error" in capsys.readouterr().err


# -- bad command-line inputs: one line, no traceback -------------------------------------------
def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"rein {command}: error: "), err
    return err


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_device_cuda_without_a_gpu(tmp_path, capsys, monkeypatch, command):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg, ckpt = _tiny_run(tmp_path)
    img = tmp_path / "street.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(img)
    extra = [str(img), "--out", str(tmp_path / "pred")] if command == "predict" else []
    assert main([command, str(cfg), str(ckpt), *extra, "--device", "cuda"]) == 2
    err = _one_line_error(capsys, command)
    assert err.endswith("CUDA is not available on this machine; use --device cpu")
    assert main([command, str(cfg), str(ckpt), *extra, "--device", "gpu"]) == 2
    err = _one_line_error(capsys, command)
    assert "unknown device 'gpu'" in err and "--device cpu" in err


def test_out_pointing_at_an_existing_file(tmp_path, capsys):
    cfg, ckpt = _tiny_run(tmp_path)
    img = tmp_path / "street.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(img)
    taken = tmp_path / "taken.txt"
    taken.write_text("keep me")
    for out in (taken, taken / "sub"):
        assert main(["predict", str(cfg), str(ckpt), str(img), "--out", str(out)]) == 2
        err = _one_line_error(capsys, "predict")
        assert "taken.txt" in err and "existing file" in err
    assert taken.read_text() == "keep me"
    # eval --out names a JSON file: a directory or a file on the way is refused
    assert main(["eval", str(cfg), str(ckpt), "--out", str(tmp_path), "--no-progress"]) == 2
    assert "is a directory" in _one_line_error(capsys, "eval")
    argv = ["eval", str(cfg), str(ckpt), "--out", str(taken / "r.json"), "--no-progress"]
    assert main(argv) == 2
    assert "taken.txt is an existing file" in _one_line_error(capsys, "eval")


class PickledMeta:
    """Stands for the mmengine objects an official checkpoint's meta pickles."""

    def __init__(self, name: str) -> None:
        self.name = name


def test_eval_accepts_trust_pickle_and_warns(tmp_path, capsys):
    from conftest import tiny_segmentor

    cfg, _ = _tiny_run(tmp_path)
    official = tmp_path / "official.pth"
    state = tiny_segmentor().trainable_state_dict()
    torch.save({"meta": {"hook_msgs": PickledMeta("best_mIoU")}, "state_dict": state}, official)
    assert main(["eval", str(cfg), str(official), "--no-progress"]) == 2
    err = _one_line_error(capsys, "eval")
    assert "--trust-pickle" in err and "official.pth" in err
    assert main(["eval", str(cfg), str(official), "--no-progress", "--trust-pickle"]) == 0
    out, err = capsys.readouterr()
    assert "mIoU" in out
    warning = [line for line in err.splitlines() if "--trust-pickle" in line]
    assert len(warning) == 1 and warning[0].startswith("WARNING") and "arbitrary code" in err


def test_commands_do_not_import_the_cli_module():
    """cli.py registers the commands of commands.py; the reverse import would be a circle."""
    import ast

    import rein.commands

    tree = ast.parse(Path(rein.commands.__file__).read_text())
    imported = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    } | {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    assert "rein.cli" not in imported


def test_train_work_dir_pointing_at_a_file_is_one_line(tmp_path, capsys):
    from conftest import tiny_run

    config, _ = tiny_run(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["train", str(config), "--work-dir", str(blocker), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--work-dir" in err[0] and "existing file" in err[0]


def test_a_random_backbone_checkpoint_needs_its_init_seed(tmp_path):
    """weights: null draws the frozen backbone from model.backbone.init_seed: a checkpoint
    trained with seed 0 evaluated with seed 3 would silently run on other frozen weights."""
    from dataclasses import asdict

    from conftest import tiny_model_config

    from rein import commands
    from rein.config import resolve_config
    from rein.engine.checkpoint import CheckpointError, save_checkpoint

    model_cfg = asdict(tiny_model_config())
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump({"model": model_cfg}))
    cfg = resolve_config(str(cfg_path))
    from rein.segmentor import build_segmentor

    model = build_segmentor(cfg.model, with_criterion=False)
    save_checkpoint(
        tmp_path / "ckpt",
        "latest",
        model.trainable_state_dict(),
        {"iteration": 0, "config": {"model": model_cfg}},
    )
    commands._load_model(cfg, str(tmp_path / "ckpt"))  # the same seed: loads
    other = resolve_config(str(cfg_path), ["model.backbone.init_seed=3"])
    with pytest.raises(CheckpointError, match=r"init_seed 0, but the config draws it from 3"):
        commands._load_model(other, str(tmp_path / "ckpt"))
