"""Official SoMA and RecycleLoRA checkpoints: layouts, import / export round trips, refusals.

Layouts from ../shared/docs/methods/soma.md section 10 and recyclelora.md section 9.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml
from conftest import convert_and_back, open_layerscale, perturb_trainable, seg, tiny_model_config

from rein.cli import main
from rein.config import load_config
from rein.engine.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_into,
    save_checkpoint,
    trainable_state_dict,
)
from rein.interop import InteropError, export_official, load_official, official_method
from rein.methods import check_checkpoint_method
from rein.segmentor import build_segmentor

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SOMA = {"start_block": 2, "rank": 4, "alpha": 4}  # the tiny model adapts blocks 2 and 3
RECYCLE = {"r_max": 9, "r_main": 6}  # the tiny layers are 32 wide


def build(tuning: str, seed: int = 0, **options):
    cfg = tiny_model_config(tuning)
    defaults = {"soma": SOMA, "recyclelora": RECYCLE}.get(tuning, {})
    cfg.tuning_options = {**defaults, **options}
    torch.manual_seed(seed)
    return open_layerscale(build_segmentor(cfg, with_criterion=False))


X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(7))


# -- the DINOv2-L layouts ---------------------------------------------------------------------
def _official_layout(name: str) -> dict[str, tuple[int, ...]]:
    cfg = load_config(CONFIGS / f"{name}_dinov2-l_mask2former_gta_512.yaml")
    with torch.device("meta"):
        model = build_segmentor(cfg.model, load_weights=False, with_criterion=False)
    return {k: tuple(v.shape) for k, v in model.method.official_export(model).items()}


def test_soma_dinov2_l_official_layout_has_923_keys_and_the_release_679():
    keys = _official_layout("soma")
    assert len(keys) == 923 and sum(k.startswith("backbone.model.") for k in keys) == 631
    b = "backbone.model.blocks."
    assert keys[b + "8.attn.q.weight"] == (1024, 1024)
    assert keys[b + "0.attn.v.bias"] == (1024,)
    assert keys[b + "8.attn.k.lora_A.weight"] == (16, 1024)
    assert keys[b + "8.mlp.fc1.lora_B.weight"] == (4096, 16)
    assert keys[b + "23.mlp.fc2.lora_A.weight"] == (16, 4096)
    assert b + "7.attn.q.lora_A.weight" not in keys  # blocks 0-7 are plain
    assert keys["backbone.model.pos_embed"] == (1, 1025, 1024)
    assert keys["backbone.model.mask_token"] == (1, 1024)
    assert keys["decode_head.query_feat.weight"] == (100, 256)
    assert not any("qkv" in k for k in keys)
    # the release filter keeps the head, the adapters, mask_token and every backbone bias
    release = [
        k
        for k in keys
        if k.startswith("decode_head.") or "lora_" in k or "mask_token" in k or "bias" in k
    ]
    assert len(release) == 679
    assert sum(k.startswith("backbone.") and k.endswith("bias") for k in release) == 194


def test_recyclelora_dinov2_l_official_layout_has_1019_keys():
    keys = _official_layout("recyclelora")
    assert len(keys) == 1019 and sum(k.startswith("backbone.") for k in keys) == 727
    assert keys["backbone.blocks.0.attn.qkv.weight"] == (3072, 1024)
    assert keys["backbone.blocks.0.attn.qkv.lora_B_main"] == (3072, 32)
    assert keys["backbone.blocks.0.mlp.fc2.lora_A_sub"] == (4, 4096)
    assert keys["backbone.mask_token"] == (1, 1024)
    assert not any("base_layer" in k or k.startswith("backbone.vit.") for k in keys)


# -- SoMA ---------------------------------------------------------------------------------------
def test_soma_runner_checkpoint_round_trip_is_exact(tmp_path):
    a = perturb_trainable(build("soma", init="pretrained"))
    path = tmp_path / "soma.pth"
    export_official(a, path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert official_method(state) == "soma"
    w_res = a.backbone.vit.blocks[2].attn.qkv.base_layer.weight
    torch.testing.assert_close(state["backbone.model.blocks.2.attn.k.weight"], w_res[32:64])
    b = build("soma", seed=5)  # another backbone and head: the file carries the whole model
    assert not torch.allclose(seg(a, X), seg(b, X))
    load_official(b, path)
    torch.testing.assert_close(seg(b, X), seg(a, X), rtol=0, atol=0)


def _release(model) -> dict[str, torch.Tensor]:
    """A SoMA release file as tools/extract_soma_weights.py writes it (spec section 10)."""
    from rein.interop import official_state

    full = official_state(model)
    keep = {
        k: v
        for k, v in full.items()
        if k.startswith("decode_head.") or "lora_" in k or "mask_token" in k or "bias" in k
    }
    raw = {"module." + k: torch.zeros_like(v) for k, v in keep.items()}  # the non-EMA weights
    return {"state_dict": keep, "ema_state_dict": {**raw, "steps": torch.tensor(7)}}


def test_soma_release_runs_on_base_w_whatever_the_init(tmp_path):
    # the official model: base = the full pretrained W, adapters trained
    official = perturb_trainable(build("soma", init="official_random"))
    path = tmp_path / "release.pth"
    torch.save(_release(official), path)
    plain = build("frozen")  # the same pretrained weights (seed 0), unadapted
    w = plain.backbone.vit.blocks[3].mlp.fc1.weight
    for init in ("pretrained", "official_random"):
        ours = build("soma", init=init)
        load_official(ours, path)
        torch.testing.assert_close(ours.backbone.vit.blocks[3].mlp.fc1.base_layer.weight, w)
        torch.testing.assert_close(seg(ours, X), seg(official, X), rtol=1e-5, atol=1e-6)


def test_rein_convert_of_a_soma_release_records_official_random(tmp_path, capsys):
    official = perturb_trainable(build("soma", init="official_random"))
    torch.save(_release(official), tmp_path / "release.pth")
    config = tmp_path / "soma.yaml"
    model_cfg = asdict(tiny_model_config("soma"))
    model_cfg["tuning_options"] = dict(SOMA)
    config.write_text(yaml.safe_dump({"model": model_cfg}))
    assert main(["convert", str(config), str(tmp_path / "release.pth"), str(tmp_path / "out")]) == 0
    assert "official_random" in capsys.readouterr().out
    state, meta, _ = load_checkpoint(tmp_path / "out", "converted")
    assert meta["config"]["model"]["tuning_options"]["init"] == "official_random"
    # evaluating with the default init (pretrained) would run on W - s B0 A0: refused
    with pytest.raises(CheckpointError, match=r"tuning_options\.init: official_random"):
        check_checkpoint_method(meta, model_cfg_of("soma", **SOMA), "out")
    ours = build("soma", init="official_random")
    load_into(ours, state)
    torch.testing.assert_close(seg(ours, X), seg(official, X), rtol=1e-5, atol=1e-6)


def test_soma_file_of_another_rank_or_start_block_is_refused(tmp_path):
    path = tmp_path / "soma.pth"
    export_official(build("soma"), path)
    with pytest.raises(InteropError, match=r"rank 4 but the config has .*rank 2; set it to 4"):
        load_official(build("soma", rank=2, alpha=2), path)
    with pytest.raises(InteropError, match=r"adapts blocks 2-3 but the config adapts 3-3"):
        load_official(build("soma", start_block=3), path)


def test_merged_soma_model_cannot_be_exported_or_loaded_into(tmp_path):
    model = build("soma")
    model.method.merge(model)
    with pytest.raises(InteropError, match="merged"):
        export_official(model, tmp_path / "x.pth")


# -- RecycleLoRA ---------------------------------------------------------------------------------
def test_recyclelora_round_trip_loads_the_residuals_as_they_are(tmp_path):
    a = perturb_trainable(build("recyclelora"))
    path = tmp_path / "recyclelora.pth"
    assert export_official(a, path) == len(a.state_dict())
    state = torch.load(path, weights_only=True)["state_dict"]
    assert official_method(state) == "recyclelora"
    torch.testing.assert_close(
        state["backbone.blocks.1.mlp.fc2.weight"],
        a.backbone.vit.blocks[1].mlp.fc2.base_layer.weight,
        rtol=0,
        atol=0,
    )
    b = build("recyclelora", seed=3)  # another pretrained W: its residuals must be replaced
    load_official(b, path)
    torch.testing.assert_close(seg(b, X), seg(a, X), rtol=0, atol=0)


def test_recyclelora_file_of_another_rank_names_both(tmp_path):
    path = tmp_path / "recyclelora.pth"
    export_official(build("recyclelora"), path)
    with pytest.raises(InteropError, match=r"main rank 6 / sub rank 3 \(r_max 9\).*r_max: 9"):
        load_official(build("recyclelora", r_max=8), path)


def test_cli_convert_and_back_reproduces_the_official_file(tmp_path):
    src = tmp_path / "official.pth"
    export_official(perturb_trainable(build("recyclelora")), src)
    convert_and_back(tmp_path, model_cfg_of("recyclelora", **RECYCLE), src, "--keep-frozen")


# -- files of another method --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("writer", "reader"), [("soma", "recyclelora"), ("recyclelora", "soma"), ("rein", "soma")]
)
def test_a_file_of_another_method_names_both_methods(tmp_path, writer, reader):
    path = tmp_path / f"{writer}.pth"
    model = build(writer) if writer != "rein" else build_segmentor(tiny_model_config("rein"))
    export_official(model, path)
    with pytest.raises(InteropError, match=rf"is a {writer} checkpoint .* model.tuning: {reader}"):
        load_official(build(reader), path)


def test_a_file_without_the_methods_weights_is_refused(tmp_path):
    path = tmp_path / "head_only.pth"
    state = {k: v for k, v in build_segmentor(tiny_model_config("frozen")).state_dict().items()}
    torch.save(
        {"state_dict": {k: v for k, v in state.items() if k.startswith("decode_head.")}}, path
    )
    with pytest.raises(InteropError, match="holds no soma weights"):
        load_official(build("soma"), path)


def test_our_checkpoint_of_another_method_or_rank_is_refused(tmp_path):
    model = build("soma")
    cfg = {"model": {"tuning": "soma", "tuning_options": dict(SOMA)}}
    save_checkpoint(
        tmp_path, "latest", trainable_state_dict(model), {"config": cfg, "iteration": 0}
    )
    _, meta, _ = load_checkpoint(tmp_path)
    check_checkpoint_method(meta, model_cfg_of("soma", **SOMA), "ckpt")  # the same: passes
    lr_only = model_cfg_of("soma", **SOMA, backbone_lr_mult=1.0)
    check_checkpoint_method(meta, lr_only, "ckpt")  # a training-only option: passes
    with pytest.raises(CheckpointError, match=r"tuning_options\.rank: 4 \(soma\) but the config"):
        check_checkpoint_method(meta, model_cfg_of("soma", **{**SOMA, "rank": 8}), "ckpt")
    with pytest.raises(CheckpointError, match="model.tuning: soma checkpoint but the config has"):
        check_checkpoint_method(meta, model_cfg_of("recyclelora", **RECYCLE), "ckpt")


def model_cfg_of(tuning: str, **options):
    cfg = tiny_model_config(tuning)
    cfg.tuning_options = options
    return cfg
