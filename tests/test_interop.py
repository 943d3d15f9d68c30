from pathlib import Path

import pytest
import torch
from conftest import tiny_model_config, tiny_segmentor

from rein.config import default_config
from rein.interop import (
    InteropError,
    export_official,
    load_official,
    official_to_ours,
    ours_to_official,
)
from rein.segmentor import build_segmentor

# copied from ../shared/docs/official_state_dict_keys.txt (the official model, instantiated)
KEYS_FILE = Path(__file__).resolve().parent / "data" / "official_state_dict_keys.txt"


def _official_sections():
    assert KEYS_FILE.is_file(), f"{KEYS_FILE} is missing: it ships with the repository"
    sections, current = {}, None
    for line in KEYS_FILE.read_text().splitlines():
        if line.startswith("# "):
            current = "full" if "FULL" in line else "saved" if "SAVED" in line else None
            if current:
                sections[current] = {}
            continue
        if current and "\t" in line:
            key, shape, _ = line.split("\t")
            sections[current][key] = tuple(
                int(s) for s in shape.strip("()").split(",") if s.strip()
            )
    return sections


def test_our_dinov2_l_model_has_the_official_key_layout():
    sections = _official_sections()
    with torch.device("meta"):
        model = build_segmentor(default_config().model, load_weights=False, with_criterion=False)
    saved = {k: tuple(v.shape) for k, v in ours_to_official(model.trainable_state_dict()).items()}
    assert saved == sections["saved"]
    assert len(saved) == 303
    full = {k: tuple(v.shape) for k, v in ours_to_official(model.state_dict()).items()}
    assert full == sections["full"]
    assert sum(v.numel() for v in model.trainable_state_dict().values()) == 23_569_877


def test_key_mapping_round_trip():
    state = {
        "backbone.blocks.0.attn.qkv.weight": 1,
        "backbone.reins.scale": 2,
        "backbone.mask_token": 3,
        "decode_head.cls_embed.weight": 4,
    }
    ours = official_to_ours(state)
    assert "backbone.vit.blocks.0.attn.qkv.weight" in ours and "backbone.mask_token" in ours
    assert ours_to_official(ours) == state


def test_export_import_round_trip_gives_identical_outputs(tmp_path):
    a = tiny_segmentor(seed=0).eval()
    path = tmp_path / "official.pth"
    n = export_official(a, path)
    obj = torch.load(path, weights_only=True)
    assert set(obj) == {"meta", "state_dict"} and len(obj["state_dict"]) == n
    assert all(k.startswith(("backbone.reins.", "decode_head.")) for k in obj["state_dict"])
    b = tiny_segmentor(seed=1).eval()
    b.backbone.load_state_dict(a.backbone.state_dict())  # same frozen backbone weights
    x = torch.randn(1, 3, 64, 64)
    assert not torch.allclose(a.inference(x, mode="whole"), b.inference(x, mode="whole"))
    load_official(b, path)
    torch.testing.assert_close(
        a.inference(x, mode="whole"), b.inference(x, mode="whole"), rtol=0, atol=0
    )


def test_checkpoint_for_another_model_is_rejected_without_partial_load(tmp_path):
    a = tiny_segmentor()
    path = tmp_path / "official.pth"
    export_official(a, path)
    from rein.segmentor import build_segmentor as build

    other = build(tiny_model_config(num_classes=7))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(
        InteropError, match=r"cls_embed.weight: checkpoint \(20, 32\) vs model \(8, 32\)"
    ):
        load_official(other, path)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    state = torch.load(path, weights_only=True)["state_dict"]
    state.pop("backbone.reins.scale")
    state["decode_head.extra.weight"] = torch.zeros(1)
    torch.save({"meta": {}, "state_dict": state}, tmp_path / "bad.pth")
    with pytest.raises(
        InteropError, match=r"missing.*backbone.reins.scale(.|\n)*unexpected.*extra"
    ):
        load_official(a, tmp_path / "bad.pth")


def test_truncated_file_names_the_file(tmp_path):
    a = tiny_segmentor()
    path = tmp_path / "official.pth"
    export_official(a, path)
    data = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(InteropError, match="cut.pth"):
        load_official(a, tmp_path / "cut.pth")
