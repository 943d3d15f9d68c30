"""Every backbone family of the paper through timm: ViT (DINOv2-reg, CLIP, MAE), EVA02, SAM,
ConvNeXt and ResNet, plus DINOv3 (an Eva), as tiny random models (no downloads)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from rein.backbones import (
    ReinConvNet,
    ReinEva,
    ReinSAM,
    ReinViT,
    StageReins,
    backbone_family,
    build_backbone,
)
from rein.backbones.weights import WeightsError, load_backbone_weights
from rein.config import config_from_dict, load_config
from rein.segmentor import build_segmentor

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_VIT = {"embed_dim": 32, "depth": 4, "num_heads": 2}
# family -> (timm name, tiny timm kwargs, wrapper class, output widths)
FAMILIES = {
    "dinov2_reg": ("vit_small_patch14_reg4_dinov2", TINY_VIT, ReinViT, [32] * 4),
    "clip": ("vit_large_patch14_clip_quickgelu_224.openai", TINY_VIT, ReinViT, [32] * 4),
    "mae": ("vit_large_patch16_224.mae", TINY_VIT, ReinViT, [32] * 4),
    "eva02": ("eva02_large_patch14_224.mim_m38m", TINY_VIT, ReinEva, [32] * 4),
    "dinov3": ("vit_large_patch16_dinov3", TINY_VIT, ReinEva, [32] * 4),
    "sam": (
        "samvit_base_patch16",
        # window 3 on a 4x4 grid: windows with padding; blocks 1 and 3 global
        {**TINY_VIT, "window_size": 3, "global_attn_indexes": [1, 3], "neck_chans": 16},
        ReinSAM,
        [32] * 4,
    ),
    "convnext": (
        "convnext_large",
        {"dims": [8, 16, 32, 64], "depths": [1, 1, 2, 1]},
        ReinConvNet,
        [8, 16, 32, 64],
    ),
    "resnet": (
        "resnet50",
        {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8},
        ReinConvNet,
        [32, 64, 128, 256],
    ),
}


def tiny_config(family: str, tuning: str = "rein", **backbone):
    name, kwargs, _, _ = FAMILIES[family]
    return config_from_dict(
        {
            "model": {
                "tuning": tuning,
                "backbone": {
                    "name": name,
                    "patch_size": 16,
                    "img_size": 64,
                    "mask_token": False,
                    "timm_kwargs": kwargs,
                    **backbone,
                },
                "rein": {"token_length": 6, "lora_dim": 4},
                "head": {
                    "feat_channels": 32,
                    "num_queries": 6,
                    "num_decoder_layers": 2,
                    "num_encoder_layers": 1,
                },
                "loss": {"num_points": 64},
            }
        }
    ).model


def tiny_backbone(family: str, tuning: str = "rein", seed: int = 0, **backbone):
    torch.manual_seed(seed)
    return build_backbone(tiny_config(family, tuning, **backbone))


def zero_rein_scale(backbone) -> None:
    """Rein with scale 0 leaves every feature unchanged."""
    with torch.no_grad():
        for name, p in backbone.reins.named_parameters():
            if name.split(".")[-1] == "scale":
                p.zero_()


def timm_reference(backbone, x):
    """The same four maps computed by timm itself (its own block loop), resized likewise."""
    model = backbone.timm_model
    if isinstance(backbone, ReinConvNet):
        last4 = list(range(len(model.feature_info)))[-4:]  # ResNet also lists its stem (act1)
        return model.forward_intermediates(x, indices=last4, intermediates_only=True)
    maps = model.forward_intermediates(
        x, indices=backbone.out_indices, norm=False, intermediates_only=True
    )
    return [
        m if s == 1 else F.interpolate(m, scale_factor=s, mode="bilinear", align_corners=False)
        for m, s in zip(maps, (4, 2, 1, 0.5))
    ]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_four_maps_at_strides_4_to_32_and_queries(family, size):
    _, _, wrapper, widths = FAMILIES[family]
    m = tiny_backbone(family)
    assert type(m) is wrapper and m.out_channels == widths
    h, w = size
    feats, queries = m(torch.randn(2, 3, h, w))
    assert [tuple(f.shape) for f in feats] == [
        (2, c, h // s, w // s) for c, s in zip(widths, (4, 8, 16, 32))
    ]
    assert queries.shape == (6, 32)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_frozen_weights_get_no_gradient_and_stay_in_eval(family):
    m = tiny_backbone(family)
    m.train()
    assert m.training and m.reins.training
    assert not any(mod.training for mod in m.timm_model.modules())
    feats, queries = m(torch.randn(2, 3, 64, 64))
    # Only the first map and the queries: gradients still reach the Rein of later layers'
    # tokens through the queries, and the first layer's Rein through the frozen activations.
    (feats[0].square().mean() + queries.sum()).backward()
    named = list(m.named_parameters())
    assert all(
        p.grad is None and not p.requires_grad for n, p in named if not n.startswith("reins.")
    )
    rein = {n: p for n, p in named if n.startswith("reins.")}
    assert rein and all(p.requires_grad for p in rein.values())
    assert (
        sum(p.grad is not None and p.grad.abs().sum() > 0 for p in rein.values()) >= len(rein) // 2
    )
    token_grads = [p.grad for n, p in rein.items() if "learnable_tokens_a" in n]
    assert all(g is not None and g.abs().sum() > 0 for g in token_grads)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_rein_scale_zero_equals_timm_forward(family):
    """Scale 0: our embedding + block loop (RoPE for EVA, windows for SAM, stem and stages for
    ConvNets) gives exactly timm's own intermediate features. Non-square for EVA (RoPE and
    positions follow the 4x6 grid), SAM and ConvNets; square for ViTs, whose non-square rule is
    DINOv2's (tested in test_backbone.py) while timm's fixed-size ViT accepts only its size."""
    m = tiny_backbone(family).eval()
    zero_rein_scale(m)
    x = torch.randn(2, 3, 64, 64 if type(m) is ReinViT else 96)
    feats, _ = m(x)
    with torch.no_grad():
        ref = timm_reference(m, x)
    for f, r in zip(feats, ref):
        torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and Rein does change them once its scale is not 0
        for n, p in m.reins.named_parameters():
            if n.split(".")[-1] == "scale":
                p.fill_(1.0)
        assert not torch.allclose(m(x)[0][-1], feats[-1])


def test_eva_rope_is_used_and_follows_the_grid():
    """The rotary table differs between grids; dropping it changes the output."""
    m = tiny_backbone("eva02").eval()
    zero_rein_scale(m)
    x = torch.randn(1, 3, 64, 96)
    tokens, h, w, rope = m.embed_with_rope(x)
    assert (h, w) == (4, 6) and rope is not None and rope.shape[0] == h * w
    with torch.no_grad():
        with_rope = m.forward_tokens(tokens, h, w, lambda i: {"rope": rope})[0]
        without = m.forward_tokens(tokens, h, w, lambda i: {"rope": None})[0]
    assert not torch.allclose(with_rope[-1], without[-1])
    assert m.embed_with_rope(torch.randn(1, 3, 64, 64))[3].shape[0] == 16


def test_prefix_tokens_pass_through_rein_untouched():
    m = tiny_backbone("dinov2_reg")
    assert m.num_prefix_tokens == 5
    tokens = torch.randn(2, 5 + 16, 32)
    out = m.reins(tokens, 0, num_prefix_tokens=m.num_prefix_tokens)
    assert torch.equal(out[:, :5], tokens[:, :5]) and not torch.equal(out[:, 5:], tokens[:, 5:])


def test_sam_default_out_indices_are_the_global_blocks():
    cfg = tiny_config("sam")
    cfg.backbone.timm_kwargs = {
        **cfg.backbone.timm_kwargs,
        "depth": 8,
        "global_attn_indexes": [1, 3, 5, 7],
    }
    assert build_backbone(cfg).out_indices == [1, 3, 5, 7]


def test_convnet_batchnorm_statistics_stay_frozen():
    m = tiny_backbone("resnet")
    m.train()
    bn = m.net.bn1
    before = bn.running_mean.clone()
    m(torch.randn(2, 3, 64, 64) * 5 + 3)
    assert torch.equal(bn.running_mean, before) and not bn.training


def test_stage_reins_link_queries_use_every_stage():
    m = tiny_backbone("convnext")
    assert isinstance(m.reins, StageReins) and m.reins.embed_dims == [8, 16, 32, 64]
    assert [r.patch_size for r in m.reins.stages] == [4, 8, 16, 32]
    q = m.reins.queries()
    q.sum().backward()
    assert q.shape == (6, 32)
    assert all(r.learnable_tokens_b.grad is not None for r in m.reins.stages)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_input_not_a_multiple_is_a_clear_error(family):
    m = tiny_backbone(family)
    ok = "64x80" if m.patch_size == 16 else "64x96"
    with pytest.raises(
        ValueError, match=f"multiple of the patch size {m.patch_size}; pad it to {ok}"
    ):
        m(torch.randn(1, 3, 60, 70))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_segmentor_forward_and_padding(family):
    torch.manual_seed(0)
    model = build_segmentor(tiny_config(family))
    cls_preds, mask_preds = model(torch.randn(1, 3, 64, 64))
    assert cls_preds[-1].shape == (1, 6, 20) and mask_preds[-1].shape == (1, 6, 16, 16)
    model.eval()
    scores = model.inference(torch.randn(1, 3, 50, 70), mode="whole")  # padded to patch_size
    assert scores.shape == (1, 19, 50, 70)
    groups = model.parameter_groups()
    assert groups["rein"][0] == groups["rein"][1] > 0 and groups["backbone"][1] == 0
    with torch.device("meta"):  # what `rein params` does
        build_segmentor(tiny_config(family), load_weights=False, with_criterion=False)


# -- weights --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["clip", "eva02", "dinov3", "convnext", "resnet"])
def test_weights_in_timm_layout_load_strictly(family, tmp_path):
    src = tiny_backbone(family, seed=1)
    state = {k: v.clone() for k, v in src.timm_model.state_dict().items()}
    classifier = "fc" if family == "resnet" else "head.fc" if family == "convnext" else "head"
    state[f"{classifier}.weight"] = torch.randn(10, 4)  # classifier of the file: dropped
    path = tmp_path / f"{family}.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in state.items()}, str(path))
    dst = tiny_backbone(family, seed=2, weights=str(path))
    for k, v in src.timm_model.state_dict().items():
        torch.testing.assert_close(dst.timm_model.state_dict()[k], v, msg=k)
    assert not any(p.requires_grad for p in dst.frozen_parameters())
    # another width: the first mismatched key with both shapes, nothing loaded
    other = tiny_config(family)
    kw = dict(other.backbone.timm_kwargs)
    if family in ("convnext",):
        kw["dims"] = [8, 16, 32, 128]
    elif family == "resnet":
        kw["channels"] = [8, 16, 32, 128]
    else:
        kw["embed_dim"] = 64
    other.backbone.timm_kwargs = kw
    wide = build_backbone(other, load_weights=False)
    with pytest.raises(
        WeightsError, match=r"shape mismatch .*first: .*: file \(.*\) vs model \(.*\)"
    ):
        load_backbone_weights(wide, path)


def test_vit_patch_14_file_converts_to_patch_16(tmp_path):
    """A CLIP-shaped file at patch 14 / 56 px (4x4 grid) loads into the patch-16 model."""
    cfg = tiny_config("clip", patch_size=14, img_size=56)
    src = build_backbone(cfg, load_weights=False)
    path = tmp_path / "clip14.pth"
    torch.save(src.timm_model.state_dict(), path)
    dst = tiny_backbone("clip", weights=str(path))
    w = F.interpolate(
        src.vit.patch_embed.proj.weight, size=(16, 16), mode="bicubic", align_corners=False
    )
    torch.testing.assert_close(dst.vit.patch_embed.proj.weight, w)
    torch.testing.assert_close(dst.vit.pos_embed, src.vit.pos_embed)  # same 4x4 grid


def test_original_dinov2_giant_swiglu_names_load(tmp_path):
    """DINOv2-g's original file names its SwiGLU ``mlp.w12`` / ``mlp.w3`` (timm: fc1 / fc2)."""
    from conftest import tiny_vit

    src = tiny_vit(name="vit_giant_patch14_dinov2", patch=14, img_size=56)
    state = {
        k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3"): v.clone()
        for k, v in src.state_dict().items()
    }
    assert "blocks.0.mlp.w12.weight" in state
    state["mask_token"] = torch.randn(1, 32)
    path = tmp_path / "dinov2_vitg14_tiny.pth"
    torch.save(state, path)
    cfg = tiny_config("dinov2_reg", name="vit_giant_patch14_dinov2", mask_token=True)
    dst = build_backbone(cfg, load_weights=False)
    load_backbone_weights(dst, path)
    torch.testing.assert_close(dst.vit.blocks[3].mlp.fc1.weight, state["blocks.3.mlp.w12.weight"])
    torch.testing.assert_close(dst.mask_token, state["mask_token"])


def test_sam_weights_at_another_resolution_match_timm_at_run_time(tmp_path):
    """A 128-px SAM file in the 64-px model = the 128-px model run at 64 px by timm."""
    src = tiny_backbone("sam", seed=1, img_size=128).eval()
    with torch.no_grad():  # non-zero relative positions, so that their resize matters
        for n, p in src.vit.named_parameters():
            if "rel_pos" in n:
                p.normal_()
    path = tmp_path / "sam128.safetensors"
    save_file({k: v.contiguous() for k, v in src.timm_model.state_dict().items()}, str(path))
    dst = tiny_backbone("sam", seed=2, weights=str(path)).eval()
    assert (
        dst.vit.pos_embed.shape == (1, 4, 4, 32) and dst.vit.blocks[1].attn.rel_pos_h.shape[0] == 7
    )
    zero_rein_scale(dst)
    x = torch.randn(1, 3, 64, 64)
    feats, _ = dst(x)
    with torch.no_grad():
        ref = timm_reference(src, x)
    for f, r in zip(feats, ref):
        torch.testing.assert_close(f, r, rtol=1e-4, atol=1e-5)


# -- names and configs ------------------------------------------------------------------------
def test_unknown_and_unsupported_names():
    with pytest.raises(ValueError, match="closest timm names: .*convnext_large"):
        backbone_family("convnext_largee")
    with pytest.raises(ValueError, match="not supported; supported timm modules"):
        backbone_family("beit_base_patch16_224")
    cfg = tiny_config("resnet", out_indices=[1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"out_indices must be null or \[0, 1, 2, 3\]"):
        build_backbone(cfg)


FAMILY_CONFIGS = {
    "dinov2-s": (ReinViT, 384, [3, 5, 7, 11]),
    "dinov2-b": (ReinViT, 768, [3, 5, 7, 11]),
    "dinov2-g": (ReinViT, 1536, [9, 19, 29, 39]),
    "dinov2-l-reg4": (ReinViT, 1024, [7, 11, 15, 23]),
    "clip-l": (ReinViT, 1024, [7, 11, 15, 23]),
    "mae-l": (ReinViT, 1024, [7, 11, 15, 23]),
    "eva02-l": (ReinEva, 1024, [7, 11, 15, 23]),
    "sam-h": (ReinSAM, 1280, [7, 15, 23, 31]),
    "convnext-l": (ReinConvNet, 1536, [0, 1, 2, 3]),
    "resnet50": (ReinConvNet, 2048, [0, 1, 2, 3]),
    "resnet101": (ReinConvNet, 2048, [0, 1, 2, 3]),
}  # the DINOv3 configs: test_dinov3.py


@pytest.mark.parametrize("key", list(FAMILY_CONFIGS))
def test_family_configs_build_on_meta(key):
    wrapper, width, out_indices = FAMILY_CONFIGS[key]
    cfg = load_config(CONFIGS / f"rein_{key}_mask2former_gta_512.yaml")
    with torch.device("meta"):
        model = build_segmentor(cfg.model, load_weights=False, with_criterion=False)
    bb = model.backbone
    assert type(bb) is wrapper and bb.out_channels[-1] == width and bb.out_indices == out_indices
    assert bb.patch_size == (32 if wrapper is ReinConvNet else 16)
    assert bb.reins.token_length == 100 and model.decode_head.query_source == "rein"
