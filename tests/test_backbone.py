import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_rein_vit, tiny_vit

from rein.backbones.vit import ReinViT, create_timm_vit, default_out_indices
from rein.backbones.weights import (
    WeightsError,
    convert_vit_state_dict,
    load_backbone_weights,
    read_state_dict,
)
from rein.reins import LoRAReins


@pytest.mark.parametrize(("width", "heads"), [(384, 6), (768, 12), (1024, 16)])
def test_dinov2_shaped_outputs(width, heads):
    """S/B/L widths, 4 blocks: four maps at strides 4/8/16/32 and (m, Q) queries."""
    m = tiny_rein_vit(embed_dim=width, heads=heads, token_length=10)
    feats, queries = m(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [
        (1, width, 16, 16),
        (1, width, 8, 8),
        (1, width, 4, 4),
        (1, width, 2, 2),
    ]
    assert queries.shape == (10, 16)
    assert m.out_channels == [width] * 4


def test_default_out_indices():
    assert default_out_indices(24) == [7, 11, 15, 23]
    assert default_out_indices(12) == [3, 5, 7, 11]
    assert default_out_indices(40) == [9, 19, 29, 39]
    assert default_out_indices(4) == [0, 1, 2, 3]


def test_without_rein_matches_timm_intermediates():
    """No Rein: our block loop + resize equals timm's own intermediate features."""
    vit = tiny_vit(depth=4)
    m = ReinViT(vit, None, out_indices=[0, 1, 2, 3])
    x = torch.randn(2, 3, 64, 64)
    feats, queries = m(x)
    assert queries is None
    ref = vit.forward_intermediates(x, indices=[0, 1, 2, 3], norm=False, intermediates_only=True)
    scales = (4, 2, 1, 0.5)
    for f, r, s in zip(feats, ref, scales):
        r = r if s == 1 else F.interpolate(r, scale_factor=s, mode="bilinear", align_corners=False)
        torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-5)


def test_frozen_weights_get_no_gradient_but_rein_does():
    m = tiny_rein_vit()
    m.train()
    assert not m.vit.training and m.reins.training
    feats, queries = m(torch.randn(1, 3, 64, 64))
    # Only the stride-4 map (block 0) and the queries: gradients must still reach Rein of layer 0.
    (feats[3].square().mean() + queries.sum()).backward()
    for name, p in m.named_parameters():
        if name.startswith("reins."):
            assert p.requires_grad
        else:
            assert not p.requires_grad and p.grad is None, name
    assert m.reins.learnable_tokens_a.grad[0].abs().sum() > 0  # through frozen blocks 1..3
    assert m.reins.scale.grad is not None


def test_gradient_flows_through_frozen_activations_to_the_input():
    m = tiny_rein_vit()
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    feats, _ = m(x)
    feats[3].sum().backward()
    assert x.grad.abs().sum() > 0


def test_pos_embed_interpolated_only_when_needed():
    m = tiny_rein_vit()
    pos = m.vit.pos_embed
    assert m._pos_embed(4, 4, 64, 64) is pos  # same grid, square: untouched
    p2 = m._pos_embed(4, 6, 64, 96)
    assert p2.shape == (1, 1 + 24, 32)
    torch.testing.assert_close(p2[:, :1], pos[:, :1])
    grid = pos[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, scale_factor=(4.1 / 4, 6.1 / 4), mode="bicubic", align_corners=False)
    torch.testing.assert_close(p2[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, -1, 32))
    feats, _ = m(torch.randn(1, 3, 64, 96))  # non-square input works
    assert feats[2].shape[-2:] == (4, 6)


def test_input_not_multiple_of_patch_is_a_clear_error():
    m = tiny_rein_vit()
    with pytest.raises(ValueError, match="pad it to 64x80"):
        m(torch.randn(1, 3, 60, 70))


def test_register_tokens_pass_through():
    vit = tiny_vit(name="vit_small_patch14_reg4_dinov2")
    reins = LoRAReins(
        num_layers=4, embed_dims=32, patch_size=16, token_length=5, lora_dim=4, query_dims=8
    )
    m = ReinViT(vit, reins)
    assert m.num_prefix_tokens == 5
    feats, q = m(torch.randn(1, 3, 64, 64))
    assert feats[2].shape == (1, 32, 4, 4) and q.shape == (5, 8)


def test_wrong_rein_width_is_rejected():
    vit = tiny_vit()
    with pytest.raises(ValueError, match="backbone width 32"):
        ReinViT(vit, LoRAReins(num_layers=4, embed_dims=64, patch_size=16, token_length=4))


def test_unknown_backbone_name_lists_close_names():
    with pytest.raises(ValueError, match="vit_large_patch14_dinov2"):
        create_timm_vit("vit_large_patch14_dinov3x")


def _original_dinov2_file(tmp_path, registers: bool = False):
    """A tiny checkpoint in the original DINOv2 torch-hub layout: patch 14, 6x6 grid."""
    torch.manual_seed(3)
    src = tiny_vit(patch=14, img_size=84)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    sd["mask_token"] = torch.randn(1, 32)
    if registers:
        sd["register_tokens"] = torch.randn(1, 4, 32)
    path = tmp_path / "dinov2_vits14_tiny.pth"
    torch.save(sd, path)
    return path, sd


def test_load_original_dinov2_layout_with_patch_14_to_16(tmp_path):
    path, sd = _original_dinov2_file(tmp_path)
    m = tiny_rein_vit()
    load_backbone_weights(m, path)
    w = F.interpolate(
        sd["patch_embed.proj.weight"], size=(16, 16), mode="bicubic", align_corners=False
    )
    torch.testing.assert_close(m.vit.patch_embed.proj.weight, w)
    grid = sd["pos_embed"][:, 1:].reshape(1, 6, 6, 32).permute(0, 3, 1, 2)
    pos = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
    torch.testing.assert_close(m.vit.pos_embed[:, 1:], pos.permute(0, 2, 3, 1).reshape(1, 16, 32))
    torch.testing.assert_close(m.vit.pos_embed[:, :1], sd["pos_embed"][:, :1])
    torch.testing.assert_close(m.vit.blocks[2].attn.qkv.weight, sd["blocks.2.attn.qkv.weight"])
    torch.testing.assert_close(m.vit.blocks[1].ls2.gamma, sd["blocks.1.ls2.gamma"])
    torch.testing.assert_close(m.mask_token, sd["mask_token"])
    assert not m.vit.blocks[0].attn.qkv.weight.requires_grad  # still frozen after loading


def test_load_wrapped_safetensors_and_prefixes(tmp_path):
    from safetensors.torch import save_file

    _, sd = _original_dinov2_file(tmp_path)
    conv = convert_vit_state_dict(sd, patch_size=16, grid=4)
    path = tmp_path / "converted.safetensors"
    save_file({f"backbone.{k}": v.contiguous() for k, v in conv.items()}, str(path))
    m = tiny_rein_vit()
    load_backbone_weights(m, path)
    torch.testing.assert_close(m.vit.pos_embed, conv["pos_embed"])


def test_weights_for_another_size_name_key_and_shapes(tmp_path):
    path, _ = _original_dinov2_file(tmp_path)
    m = tiny_rein_vit(embed_dim=64)
    with pytest.raises(WeightsError, match=r"file \(1, 1, 32\) vs model \(1, 1, 64\)"):
        load_backbone_weights(m, path)
    m2 = tiny_rein_vit(depth=6)
    with pytest.raises(WeightsError, match="missing .*blocks.4"):
        load_backbone_weights(m2, path)


def test_truncated_or_pickled_file_is_rejected(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="bad.pth"):
        read_state_dict(bad)
    with pytest.raises(WeightsError, match="not found"):
        read_state_dict(tmp_path / "missing.safetensors")


def test_register_layout_loads_into_timm_reg_model(tmp_path):
    torch.manual_seed(3)
    src = tiny_vit(patch=14, img_size=84, name="vit_small_patch14_reg4_dinov2")
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    # original layout: 'register_tokens' and the class position stored in pos_embed
    sd["register_tokens"] = sd.pop("reg_token")
    sd["pos_embed"] = torch.cat([torch.randn(1, 1, 32), sd["pos_embed"]], dim=1)
    path = tmp_path / "reg.pth"
    torch.save(sd, path)
    m = ReinViT(tiny_vit(name="vit_small_patch14_reg4_dinov2"), None)
    load_backbone_weights(m, path)
    torch.testing.assert_close(m.vit.reg_token, sd["register_tokens"])
    torch.testing.assert_close(m.vit.cls_token, sd["cls_token"] + sd["pos_embed"][:, :1])


def _reference_dinov2_forward(m: ReinViT, x: torch.Tensor) -> list[torch.Tensor]:
    """The official ReinsDinoVisionTransformer path written out from the spec: plain softmax
    attention, LayerScale, exact-erf GELU, Rein after every block, no final norm."""
    vit, reins = m.vit, m.reins
    b = x.shape[0]
    t = vit.patch_embed.proj(x)
    h, w = t.shape[-2:]
    t = torch.cat([vit.cls_token.expand(b, -1, -1), t.flatten(2).transpose(1, 2)], dim=1)
    t = t + vit.pos_embed
    outs = []
    for i, blk in enumerate(vit.blocks):
        a = blk.attn
        y = F.layer_norm(t, (t.shape[-1],), blk.norm1.weight, blk.norm1.bias, eps=1e-6)
        qkv = (y @ a.qkv.weight.t() + a.qkv.bias).reshape(b, -1, 3, a.num_heads, a.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q * a.head_dim**-0.5) @ k.transpose(-2, -1)).softmax(-1)
        y = (attn @ v).transpose(1, 2).reshape(b, -1, t.shape[-1]) @ a.proj.weight.t() + a.proj.bias
        t = t + blk.ls1.gamma * y
        y = F.layer_norm(t, (t.shape[-1],), blk.norm2.weight, blk.norm2.bias, eps=1e-6)
        y = F.gelu(y @ blk.mlp.fc1.weight.t() + blk.mlp.fc1.bias)
        t = t + blk.ls2.gamma * (y @ blk.mlp.fc2.weight.t() + blk.mlp.fc2.bias)
        cls, f = t[:, :1], t[:, 1:]
        tokens = reins.get_tokens(i)
        s = (f @ tokens.t() * reins.embed_dims**-0.5).softmax(-1)
        delta = s[..., 1:] @ reins.mlp_token2feat(tokens[1:])
        f = f + reins.mlp_delta_f(delta + f) * reins.scale
        t = torch.cat([cls, f], dim=1)
        if i in m.out_indices:
            outs.append(f.transpose(1, 2).reshape(b, -1, h, w))
    return outs


def test_matches_the_official_dinov2_rein_path_written_from_the_spec():
    m = tiny_rein_vit()
    with torch.no_grad():
        m.reins.scale.fill_(0.5)  # make Rein's contribution large enough to matter
        for blk in m.vit.blocks:
            blk.ls1.gamma.fill_(0.3)
            blk.ls2.gamma.fill_(0.3)
    x = torch.randn(2, 3, 64, 64)
    feats, _ = m(x)
    ref = _reference_dinov2_forward(m, x)
    for f, r, s in zip(feats, ref, (4, 2, 1, 0.5)):
        r = r if s == 1 else F.interpolate(r, scale_factor=s, mode="bilinear", align_corners=False)
        torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-5)
