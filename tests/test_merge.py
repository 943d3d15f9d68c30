"""Merging weight-space adapters into a plain backbone: ``merge_model`` and ``rein merge``."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from conftest import tiny_model_config
from safetensors.torch import save_file

from rein.backbones.weights import load_backbone_weights
from rein.cli import main
from rein.engine.checkpoint import save_checkpoint
from rein.methods import merge_model, plain_backbone_state
from rein.segmentor import build_segmentor


def _lora_model(seed: int = 0, weights=None):
    pytest.importorskip("peft")
    cfg = tiny_model_config("lora")
    cfg.backbone.weights = None if weights is None else str(weights)
    cfg.tuning_options = {"rank": 4, "targets": ["qkv", "fc2"]}
    torch.manual_seed(seed)
    model = build_segmentor(cfg).eval()
    with torch.no_grad():  # lora_B starts at zero: make the adapters matter
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.2)
    return cfg, model


def test_merged_lora_equals_unmerged_and_is_a_plain_vit():
    _, model = _lora_model()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model.backbone(x)[0]
        merge_model(model)
        after = model.backbone(x)[0]
        merge_model(model)  # idempotent
        again = model.backbone(x)[0]
    for a, b, c in zip(before, after, again):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c, b, rtol=0, atol=0)
    names = list(plain_backbone_state(model))
    assert not any("lora" in n or "base_layer" in n for n in names)
    assert "blocks.0.attn.qkv.weight" in names and "mask_token" in names


def test_merge_of_a_token_method_is_refused():
    torch.manual_seed(0)
    model = build_segmentor(tiny_model_config("rein"))
    with pytest.raises(
        ValueError, match=r"tuning 'rein' cannot be merged.*methods that merge: lora"
    ):
        merge_model(model)


def test_rein_merge_cli_writes_a_backbone_for_a_frozen_config(tmp_path):
    # the frozen weights come from a file, so the command rebuilds the same backbone
    torch.manual_seed(2)
    pretrained = build_segmentor(tiny_model_config("frozen"))
    weights = tmp_path / "pretrained.safetensors"
    save_file(plain_backbone_state(pretrained), str(weights))
    cfg, model = _lora_model(weights=weights)
    save_checkpoint(tmp_path / "ckpt", "latest", model.trainable_state_dict(), {"iteration": 0})
    config = tmp_path / "lora.yaml"
    config.write_text(yaml.safe_dump({"model": dataclasses.asdict(cfg)}))
    out = tmp_path / "merged.safetensors"
    assert main(["merge", str(config), str(tmp_path / "ckpt"), "--out", str(out)]) == 0
    torch.manual_seed(1)  # a different random init: everything must come from the file
    plain = build_segmentor(tiny_model_config("frozen")).eval()
    load_backbone_weights(plain.backbone, out)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model.backbone(x)[0]
        got = plain.backbone(x)[0]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_rein_merge_cli_errors_are_one_line(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_segmentor(tiny_model_config("rein"))
    save_checkpoint(tmp_path / "ckpt", "latest", model.trainable_state_dict(), {"iteration": 0})
    config = tmp_path / "rein.yaml"
    config.write_text(yaml.safe_dump({"model": dataclasses.asdict(tiny_model_config("rein"))}))
    assert (
        main(["merge", str(config), str(tmp_path / "ckpt"), "--out", str(tmp_path / "m.pt")]) == 2
    )
    assert "must name a .safetensors file" in capsys.readouterr().err
    code = main(
        ["merge", str(config), str(tmp_path / "ckpt"), "--out", str(tmp_path / "m.safetensors")]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot be merged" in err
