import json
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_config, tiny_run, tiny_segmentor
from safetensors.torch import load_file

from rein.cli import main
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
    assert ours == {
        "backbone.vit.blocks.0.attn.qkv.weight": 1,
        "backbone.reins.scale": 2,
        "backbone.mask_token": 3,
        "decode_head.cls_embed.weight": 4,
    }
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


# -- a hand-built official checkpoint (full weights) for the tiny model of conftest -------------
# The tiny model: width 32, 4 blocks, MLP hidden 128, patch 16 at 64 px (a 4x4 grid + class).
C, DEPTH, HIDDEN, PATCH, GRID = 32, 4, 128, 16, 4


def _dinov2_hub_shapes() -> dict[str, tuple[int, ...]]:
    """The original DINOv2 torch-hub layout (spec section 3), written out for the tiny model."""
    shapes = {
        "cls_token": (1, 1, C),
        "pos_embed": (1, 1 + GRID * GRID, C),
        "mask_token": (1, C),
        "patch_embed.proj.weight": (C, 3, PATCH, PATCH),
        "patch_embed.proj.bias": (C,),
        "norm.weight": (C,),
        "norm.bias": (C,),
    }
    for i in range(DEPTH):
        b = f"blocks.{i}."
        shapes.update(
            {
                b + "norm1.weight": (C,),
                b + "norm1.bias": (C,),
                b + "attn.qkv.weight": (3 * C, C),
                b + "attn.qkv.bias": (3 * C,),
                b + "attn.proj.weight": (C, C),
                b + "attn.proj.bias": (C,),
                b + "ls1.gamma": (C,),
                b + "norm2.weight": (C,),
                b + "norm2.bias": (C,),
                b + "mlp.fc1.weight": (HIDDEN, C),
                b + "mlp.fc1.bias": (HIDDEN,),
                b + "mlp.fc2.weight": (C, HIDDEN),
                b + "mlp.fc2.bias": (C,),
                b + "ls2.gamma": (C,),
            }
        )
    return shapes


def _pattern(keys) -> set[str]:
    return {re.sub(r"\.\d+\.", ".#.", k) for k in keys}


class PickledMeta:
    """What mmengine sometimes puts in ``meta``: an object weights_only loading refuses."""

    def __init__(self, note: str) -> None:
        self.note = note


def _official_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Official names -> distinct random tensors: backbone.<dinov2 key>, reins, decode_head.

    The Rein / head names are the official ones (the same as ours, checked against the official
    key list below); their shapes come from the tiny model.
    """
    g = torch.Generator().manual_seed(seed)
    shapes = {f"backbone.{k}": s for k, s in _dinov2_hub_shapes().items()}
    trainable = tiny_segmentor().trainable_state_dict()
    shapes.update({k: tuple(v.shape) for k, v in trainable.items()})
    # every tensor distinct; a head of unit scale predicts several classes on the val images
    return {
        k: (1.0 if k.startswith("decode_head.") else 0.3) * torch.randn(s, generator=g)
        for k, s in shapes.items()
    }


def _write_official(path: Path, state, pickled: bool = True) -> Path:
    meta = {"epoch": 1, "iter": 40000, "mmseg_version": "1.2.2"}
    if pickled:
        meta["hook_msgs"] = PickledMeta("best_mIoU")
    torch.save({"meta": meta, "state_dict": state}, path)
    return path


def _set_by_hand(model, state) -> None:
    """Copy official tensors into ``model`` attribute by attribute (no interop code)."""
    vit, bb = model.backbone.vit, model.backbone

    def w(name):
        return state[f"backbone.{name}"]

    with torch.no_grad():
        vit.cls_token.copy_(w("cls_token"))
        vit.pos_embed.copy_(w("pos_embed"))
        bb.mask_token.copy_(w("mask_token"))
        vit.patch_embed.proj.weight.copy_(w("patch_embed.proj.weight"))
        vit.patch_embed.proj.bias.copy_(w("patch_embed.proj.bias"))
        vit.norm.weight.copy_(w("norm.weight"))
        vit.norm.bias.copy_(w("norm.bias"))
        for i, blk in enumerate(vit.blocks):
            for mod, name in [
                (blk.norm1, "norm1"),
                (blk.attn.qkv, "attn.qkv"),
                (blk.attn.proj, "attn.proj"),
                (blk.norm2, "norm2"),
                (blk.mlp.fc1, "mlp.fc1"),
                (blk.mlp.fc2, "mlp.fc2"),
            ]:
                mod.weight.copy_(w(f"blocks.{i}.{name}.weight"))
                mod.bias.copy_(w(f"blocks.{i}.{name}.bias"))
            blk.ls1.gamma.copy_(w(f"blocks.{i}.ls1.gamma"))
            blk.ls2.gamma.copy_(w(f"blocks.{i}.ls2.gamma"))
        params = dict(model.named_parameters())
        for k, v in state.items():
            if k.startswith(("backbone.reins.", "decode_head.")):
                params[k].copy_(v)


def _trainable(state):
    return {k: v for k, v in state.items() if k.startswith(("backbone.reins.", "decode_head."))}


def _assert_same_tensors(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_hand_built_official_file_uses_the_official_key_layout():
    sections = _official_sections()
    state = _official_state()
    backbone = [k for k in state if not k.startswith(("backbone.reins.", "decode_head."))]
    official_backbone = set(sections["full"]) - set(sections["saved"])
    assert _pattern(backbone) == _pattern(official_backbone)
    assert _pattern(_trainable(state)) == _pattern(sections["saved"])
    assert len(backbone) == 7 + 14 * DEPTH


def test_full_official_checkpoint_loads_backbone_rein_and_head(tmp_path):
    state = _official_state(seed=0)
    path = _write_official(tmp_path / "official.pth", state, pickled=False)
    model = tiny_segmentor(seed=1).eval()
    x = torch.randn(1, 3, 64, 64)
    before = model.inference(x, mode="whole")
    loaded = load_official(model, path)
    assert sorted(loaded) == sorted(official_to_ours(state))
    vit = model.backbone.vit
    w = {k[len("backbone.") :]: v for k, v in state.items()}
    assert torch.equal(vit.cls_token, w["cls_token"])
    assert torch.equal(vit.pos_embed, w["pos_embed"])
    assert torch.equal(model.backbone.mask_token, w["mask_token"])
    assert torch.equal(vit.patch_embed.proj.weight, w["patch_embed.proj.weight"])
    assert torch.equal(vit.patch_embed.proj.bias, w["patch_embed.proj.bias"])
    assert torch.equal(vit.norm.weight, w["norm.weight"])
    for i, blk in enumerate(vit.blocks):
        assert torch.equal(blk.attn.qkv.weight, w[f"blocks.{i}.attn.qkv.weight"]), i
        assert torch.equal(blk.attn.proj.bias, w[f"blocks.{i}.attn.proj.bias"]), i
        assert torch.equal(blk.norm1.weight, w[f"blocks.{i}.norm1.weight"]), i
        assert torch.equal(blk.norm2.bias, w[f"blocks.{i}.norm2.bias"]), i
        assert torch.equal(blk.mlp.fc1.weight, w[f"blocks.{i}.mlp.fc1.weight"]), i
        assert torch.equal(blk.mlp.fc2.weight, w[f"blocks.{i}.mlp.fc2.weight"]), i
        assert torch.equal(blk.ls1.gamma, w[f"blocks.{i}.ls1.gamma"]), i
        assert torch.equal(blk.ls2.gamma, w[f"blocks.{i}.ls2.gamma"]), i
    params = dict(model.named_parameters())
    for k, v in _trainable(state).items():
        assert torch.equal(params[k], v), k

    ref = tiny_segmentor(seed=2).eval()
    _set_by_hand(ref, state)
    got, want = model.inference(x, mode="whole"), ref.inference(x, mode="whole")
    assert not torch.allclose(before, want)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_pickled_meta_needs_trust_pickle(tmp_path):
    state = _official_state()
    path = _write_official(tmp_path / "official.pth", state, pickled=True)
    model = tiny_segmentor(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InteropError, match=r"official\.pth(.|\n)*trust_pickle=True"):
        load_official(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    load_official(model, path, trust_pickle=True)
    assert torch.equal(
        model.backbone.vit.blocks[2].attn.qkv.weight, state["backbone.blocks.2.attn.qkv.weight"]
    )
    assert torch.equal(model.backbone.reins.scale, state["backbone.reins.scale"])


def test_cli_refuses_pickled_meta_then_trusts_it(tmp_path, capsys):
    cfg, _ = tiny_run(tmp_path)
    state = _official_state()
    path = _write_official(tmp_path / "official.pth", state, pickled=True)
    assert main(["convert", str(cfg), str(path), str(tmp_path / "ours")]) == 2
    err = capsys.readouterr().err
    assert "official.pth" in err and "--trust-pickle" in err
    assert not (tmp_path / "ours").exists()
    argv = ["convert", str(cfg), str(path), str(tmp_path / "ours"), "--trust-pickle"]
    assert main(argv) == 0
    capsys.readouterr()
    ours = load_file(str(tmp_path / "ours" / "converted.safetensors"))
    _assert_same_tensors(ours, _trainable(state))


def test_cli_error_for_pickled_meta_is_one_clear_line(tmp_path, capsys):
    # cli.main promises "one clear line, no traceback" for checkpoint errors.
    cfg, _ = tiny_run(tmp_path)
    path = _write_official(tmp_path / "official.pth", _official_state(), pickled=True)
    assert main(["convert", str(cfg), str(path), str(tmp_path / "ours")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "\x1b" not in err, (
        f"BUG (src/rein/interop.py read_official_checkpoint): the refusal embeds torch's "
        f"multi-line weights_only message with terminal escapes:\n{err}"
    )


def test_convert_both_ways_and_round_trip(tmp_path, capsys):
    cfg, ckpt = tiny_run(tmp_path)
    # ours -> official: exactly the official names, the tensors of our checkpoint
    ours = load_file(str(ckpt / "latest.safetensors"))
    off = tmp_path / "exported.pth"
    assert main(["convert", str(cfg), str(ckpt), str(off), "--to-official"]) == 0
    obj = torch.load(off, weights_only=True)
    assert set(obj) == {"meta", "state_dict"}
    expected_names = set(_trainable(_official_state()))
    assert set(obj["state_dict"]) == expected_names
    assert set(ours) == expected_names  # Rein + head names are the same in both layouts
    _assert_same_tensors(obj["state_dict"], ours)

    # official -> ours -> official -> ours on a hand-built full file: identical tensors
    state = _official_state(seed=4)
    src = _write_official(tmp_path / "official.pth", state, pickled=False)
    assert main(["convert", str(cfg), str(src), str(tmp_path / "a")]) == 0
    a = load_file(str(tmp_path / "a" / "converted.safetensors"))
    _assert_same_tensors(a, _trainable(state))
    back = tmp_path / "back.pth"
    assert main(["convert", str(cfg), str(tmp_path / "a"), str(back), "--to-official"]) == 0
    _assert_same_tensors(torch.load(back, weights_only=True)["state_dict"], _trainable(state))
    assert main(["convert", str(cfg), str(back), str(tmp_path / "b")]) == 0
    _assert_same_tensors(load_file(str(tmp_path / "b" / "converted.safetensors")), a)
    out = capsys.readouterr().out
    assert "wrote official-layout checkpoint" in out and "115 keys" in out


def test_eval_of_an_official_file_matches_the_model_set_by_hand(tmp_path, capsys):
    from rein.config import load_config
    from rein.data.labels import CLASS_NAMES
    from rein.engine.checkpoint import write_json_atomic
    from rein.engine.evaluate import evaluate_domains
    from rein.engine.trainer import build_val_sets

    cfg_path, _ = tiny_run(tmp_path)
    state = _official_state(seed=5)
    path = _write_official(tmp_path / "official.pth", state, pickled=False)
    res = tmp_path / "res.json"
    argv = ["eval", str(cfg_path), str(path), "--out", str(res), "--no-progress"]
    assert main([*argv, "--device", "cpu"]) == 0
    assert "night" in capsys.readouterr().out
    got = json.loads(res.read_text())

    cfg = load_config(cfg_path)
    ref = build_segmentor(cfg.model, with_criterion=False)
    _set_by_hand(ref, state)
    names = list(CLASS_NAMES)
    want = evaluate_domains(ref.eval(), build_val_sets(cfg), 19, cfg.eval, names, device="cpu")
    write_json_atomic(want, tmp_path / "want.json")
    assert got == json.loads((tmp_path / "want.json").read_text())
    assert want["night"]["aAcc"] > 0 and want["night"]["mIoU"] > 0  # not a degenerate model
