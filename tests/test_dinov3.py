"""DINOv3 backbones (timm ``Eva``: RoPE, 4 registers, LayerScale, SwiGLU for H+) with Rein, SoMA
and RecycleLoRA, on tiny random models; weights in timm's and in Meta's original layout."""

from pathlib import Path

import pytest
import torch
from conftest import loss_of, train_steps_move_only_trainable
from safetensors.torch import save_file
from test_backbone_families import tiny_config
from timm.layers import SwiGLU

from rein.backbones import ReinEva, build_backbone
from rein.backbones.weights import WeightsError, load_backbone_weights
from rein.segmentor import build_segmentor

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
C, DEPTH, HEADS = 64, 4, 4
L16 = "vit_large_patch16_dinov3"  # plain MLP, no qkv bias (the released S/B/L/H+ timm names)
HPLUS_QKVB = "vit_huge_plus_patch16_dinov3_qkvb"  # SwiGLU MLP, q/v bias beside the fused qkv
OPTIONS = {
    "rein": {},
    "soma": {"start_block": 2, "rank": 4, "alpha": 4},
    "recyclelora": {"r_max": 6, "r_main": 4},
    "lora": {"rank": 4},  # peft LoRA on the fused qkv
}


def swiglu_targets(name: str) -> dict:
    return {"targets": ["qkv", "proj", "fc1_g", "fc1_x", "fc2"]} if "huge_plus" in name else {}


def tiny_cfg(tuning: str = "rein", name: str = L16, **backbone):
    """The tiny family-test config (Rein 6 tokens, 2-layer head) at width 64, 4 blocks, 4 heads."""
    kwargs = {"embed_dim": C, "depth": DEPTH, "num_heads": HEADS}
    cfg = tiny_config("dinov3", tuning, name=name, timm_kwargs=kwargs, **backbone)
    cfg.tuning_options = {
        **OPTIONS[tuning],
        **(swiglu_targets(name) if tuning in ("soma", "recyclelora") else {}),
    }
    return cfg


def open_gammas(vit) -> None:
    """DINOv3's LayerScale starts at 1e-5, which hides what a block does: set it to 1."""
    with torch.no_grad():
        for n, p in vit.named_parameters():
            if n.endswith(("gamma_1", "gamma_2")):
                p.fill_(1.0)


def tiny_segmentor(tuning: str, name: str = L16, seed: int = 0):
    torch.manual_seed(seed)
    model = build_segmentor(tiny_cfg(tuning, name))
    open_gammas(model.backbone.vit)
    return model


def test_tiny_model_is_dinov3_shaped():
    m = build_backbone(tiny_cfg())
    assert type(m) is ReinEva and m.vit.pos_embed is None and not m.vit.rope_mixed
    assert m.num_prefix_tokens == 5 and m.vit.reg_token.shape == (1, 4, C)
    assert type(m.vit.rope).__name__ == "RotaryEmbeddingDinoV3" and m.patch_size == 16


# -- training: each method, frozen weights get no gradient ------------------------------------
def _method_tensor(tuning: str, name: str) -> bool:
    """The backbone tensors a method adds or trains (everything else there is frozen)."""
    if tuning == "rein":
        return name.startswith("backbone.reins.")
    if tuning == "recyclelora":
        return ".lora_" in name
    block = int(name.split(".blocks.")[1].split(".")[0]) if ".blocks." in name else -1
    return ".lora_" in name or (
        block >= 2 and name.endswith(("base_layer.bias", "attn.q_bias", "attn.v_bias"))
    )


@pytest.mark.parametrize("name", [L16, HPLUS_QKVB])
@pytest.mark.parametrize("tuning", ["rein", "soma", "recyclelora"])
def test_each_method_trains_and_frozen_weights_get_no_gradient(tuning, name):
    model = tiny_segmentor(tuning, name).train()
    backbone = {n: p for n, p in model.named_parameters() if n.startswith("backbone.")}
    trainable = {n for n, p in backbone.items() if p.requires_grad}
    assert trainable == {n for n in backbone if _method_tensor(tuning, n)}
    if tuning == "soma" and "qkvb" in name:  # the fused qkv's bias trains (SoMA trains biases)
        assert "backbone.vit.blocks.2.attn.q_bias" in trainable
    assert not any(mod.training for mod in model.backbone.vit.modules())
    loss_of(model).backward()
    assert all(p.grad is None for n, p in backbone.items() if n not in trainable)
    assert all(backbone[n].grad is not None for n in trainable)
    model.zero_grad(set_to_none=True)
    train_steps_move_only_trainable(model, lambda k: k in trainable, steps=4)


@pytest.mark.parametrize(
    ("tuning", "name"),
    [("soma", HPLUS_QKVB), ("recyclelora", HPLUS_QKVB), ("lora", HPLUS_QKVB)],
)
def test_qkv_adapters_start_as_the_frozen_model_and_reach_the_output(tuning, name):
    """With a qkv bias beside the fused qkv (DINOv3 _qkvb) the adapted model starts as the
    frozen one, and the qkv adapters do reach the output (timm's biased path would skip them)."""
    x = torch.randn(1, 3, 64, 64)
    m = tiny_segmentor(tuning, name).eval()
    plain = build_backbone(tiny_cfg(tuning, name)).eval()  # not adapted, same init seed
    open_gammas(plain.vit)
    assert plain.vit.blocks[2].attn.q_bias is not None
    with torch.no_grad():
        want = plain.vit.forward_intermediates(x, indices=[2], norm=False, intermediates_only=True)
        got = m.backbone(x)[0][2]  # block 2's map at stride 16
        torch.testing.assert_close(got, want[0], rtol=1e-4, atol=1e-4)
        qkv = m.backbone.vit.blocks[2].attn.qkv
        lora_b = {
            "soma": lambda: qkv.v.lora_B.weight,
            "recyclelora": lambda: qkv.lora_B_main,
            "lora": lambda: qkv.lora_B["default"].weight,
        }[tuning]()
        lora_b.add_(0.5)
        moved = m.backbone(x)[0][2]
    assert not torch.allclose(moved, got, atol=1e-3)


# -- outputs and tokens ----------------------------------------------------------------------
@pytest.mark.parametrize("name", [L16, HPLUS_QKVB])
def test_four_maps_at_strides_4_to_32_for_a_non_square_input(name):
    m = build_backbone(tiny_cfg("rein", name))
    feats, queries = m(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(2, C, 64 // s, 96 // s) for s in (4, 8, 16, 32)]
    assert queries is not None and queries.shape[0] == 6


def test_register_and_class_tokens_pass_rein_untouched():
    m = build_backbone(tiny_cfg()).eval()
    seen = []
    m.reins.register_forward_hook(
        lambda mod, args, kwargs, out: seen.append((args[0], out)), with_kwargs=True
    )
    with torch.no_grad():
        m(torch.randn(1, 3, 64, 96))
    assert len(seen) == DEPTH
    for tokens, out in seen:
        assert tokens.shape[1] == 5 + 4 * 6  # class + 4 registers + the 4x6 patch grid
        assert torch.equal(out[:, :5], tokens[:, :5])
        assert not torch.equal(out[:, 5:], tokens[:, 5:])


def test_rope_follows_the_grid_and_is_used():
    m = build_backbone(tiny_cfg()).eval()
    tokens, h, w, rope = m.embed_with_rope(torch.randn(1, 3, 64, 96))
    assert (h, w) == (4, 6) and tokens.shape[1] == 5 + h * w and rope.shape[0] == h * w
    assert not torch.equal(m.embed_with_rope(torch.randn(1, 3, 96, 64))[3], rope)
    open_gammas(m.vit)
    with torch.no_grad():
        with_rope = m.forward_tokens(tokens, h, w, lambda i: {"rope": rope})[0]
        without = m.forward_tokens(tokens, h, w, lambda i: {"rope": None})[0]
    assert not torch.allclose(with_rope[-1], without[-1])


# -- weights -------------------------------------------------------------------------------------
def meta_layout(vit, k_bias_noise: bool = True) -> dict[str, torch.Tensor]:
    """A timm DINOv3 state in Meta's original layout: the inverse of timm's checkpoint filter."""
    g = torch.Generator().manual_seed(3)
    out: dict[str, torch.Tensor] = {}
    swiglu = isinstance(vit.blocks[0].mlp, SwiGLU)  # H+: w1 (gate), w2 (value), w3 (out)
    for key, value in vit.state_dict().items():
        key = key.replace("reg_token", "storage_tokens")
        key = key.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        if swiglu:
            key = key.replace("mlp.fc1_g.", "mlp.w1.").replace("mlp.fc1_x.", "mlp.w2.")
            key = key.replace("mlp.fc2.", "mlp.w3.")
        if key.endswith(("attn.q_bias", "attn.v_bias")):
            continue  # written below as the fused qkv bias
        out[key] = value.clone()
    for i, block in enumerate(vit.blocks):
        attn = block.attn
        dim = attn.qkv.weight.shape[1]
        k = torch.randn(dim, generator=g) if k_bias_noise else torch.zeros(dim)  # masked anyway
        if attn.q_bias is not None:
            bias = torch.cat([attn.q_bias.detach(), k, attn.v_bias.detach()])
        else:
            bias = torch.cat([torch.zeros(dim), k, torch.zeros(dim)])
        out[f"blocks.{i}.attn.qkv.bias"] = bias
        out[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat(
            [torch.ones(dim), torch.zeros(dim), torch.ones(dim)]
        )
    head_dim = C // HEADS
    out["rope_embed.periods"] = torch.rand(head_dim // 4, generator=g)
    out["mask_token"] = torch.randn(1, C, generator=g)
    return out


def randomize(vit, seed: int) -> None:
    """Non-zero values everywhere (biases and LayerScale included), so that a mix-up shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vit.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("name", [L16, HPLUS_QKVB])
def test_original_meta_layout_loads_identically(name, tmp_path):
    src = build_backbone(tiny_cfg("rein", name)).eval()
    randomize(src.vit, seed=1)
    if "qkvb" not in name:
        assert src.vit.blocks[0].attn.q_bias is None
    state = meta_layout(src.vit)
    assert "storage_tokens" in state and "blocks.0.ls1.gamma" in state
    assert ("blocks.0.mlp.w1.weight" in state) == ("huge_plus" in name)
    path = tmp_path / "dinov3_tiny_pretrain.pth"
    torch.save({"model": {f"backbone.{k}": v for k, v in state.items()}}, path)  # a wrapper too
    dst = build_backbone(tiny_cfg("rein", name, weights=str(path), init_seed=5)).eval()
    own = dst.vit.state_dict()
    assert own.keys() == src.vit.state_dict().keys()
    for k, v in src.vit.state_dict().items():
        assert torch.equal(own[k], v), k
    dst.reins.load_state_dict(src.reins.state_dict())
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for a, b in zip(dst(x)[0], src(x)[0]):
            assert torch.equal(a, b)


def test_original_file_with_a_qkv_bias_needs_the_qkvb_name(tmp_path):
    src = build_backbone(tiny_cfg()).eval()
    state = meta_layout(src.vit)
    state["blocks.1.attn.qkv.bias"][:C] = 0.5  # a real q bias: dropping it would change the model
    path = tmp_path / "biased.pth"
    torch.save(state, path)
    dst = build_backbone(tiny_cfg(), load_weights=False)
    with pytest.raises(WeightsError, match=r"blocks.1.attn.qkv.bias in .*biased.pth .*_qkvb"):
        load_backbone_weights(dst, path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_layout_files_load(suffix, tmp_path):
    src = build_backbone(tiny_cfg("rein", HPLUS_QKVB))
    randomize(src.vit, seed=2)
    path = tmp_path / f"timm{suffix}"
    state = {k: v.contiguous() for k, v in src.vit.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    dst = build_backbone(tiny_cfg("rein", HPLUS_QKVB, weights=str(path), init_seed=7))
    for k, v in src.vit.state_dict().items():
        assert torch.equal(dst.vit.state_dict()[k], v), k


def test_a_file_of_another_model_is_a_one_line_error(tmp_path):
    """A DINOv2 file in a DINOv3 model, and a DINOv3 original file in a DINOv2 model."""
    dinov2 = build_backbone(
        tiny_cfg(name="vit_small_patch14_reg4_dinov2", mask_token=True), load_weights=False
    )
    v2_path = tmp_path / "dinov2_tiny.pth"
    torch.save(dinov2.vit.state_dict(), v2_path)
    dinov3 = build_backbone(tiny_cfg(), load_weights=False)
    with pytest.raises(WeightsError) as err:
        load_backbone_weights(dinov3, v2_path)
    msg = str(err.value)
    assert "\n" not in msg and str(v2_path) in msg
    assert "missing (" in msg and "unexpected (" in msg and "gamma_1" in msg
    v3_path = tmp_path / "dinov3_tiny.pth"
    torch.save(meta_layout(dinov3.vit), v3_path)
    with pytest.raises(
        WeightsError, match=r"dinov3_tiny.pth do not fit .*unexpected \(\d+\)"
    ) as err:
        load_backbone_weights(dinov2, v3_path)
    assert "\n" not in str(err.value)


# -- configs -------------------------------------------------------------------------------------
SIZES = {  # config size -> (width, depth, out_indices)
    "s": (384, 12, [3, 5, 7, 11]),
    "b": (768, 12, [3, 5, 7, 11]),
    "l": (1024, 24, [7, 11, 15, 23]),
    "hplus": (1280, 32, [7, 15, 23, 31]),
}
# `rein params` of the Rein configs: (total, trainable)
REIN_COUNTS = {
    "s": (42_195_413, 20_608_469),
    "b": (107_700_437, 22_059_221),
    "l": (326_649_301, 23_569_877),
    "hplus": (865_862_101, 25_352_661),
}


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("method", ["rein", "soma", "recyclelora"])
def test_dinov3_configs_build_on_meta(method, size):
    from rein.config import load_config

    width, depth, out_indices = SIZES[size]
    cfg = load_config(CONFIGS / f"{method}_dinov3-{size}_mask2former_gta_512.yaml")
    assert cfg.model.tuning == method and cfg.model.backbone.weights == "timm"
    with torch.device("meta"):
        model = build_segmentor(cfg.model, load_weights=False, with_criterion=False)
    bb = model.backbone
    assert type(bb) is ReinEva and bb.patch_size == 16 and bb.num_prefix_tokens == 5
    assert bb.embed_dim == width and bb.depth == depth and bb.out_indices == out_indices
    if method == "rein":
        groups = model.parameter_groups()
        total = sum(t for t, _ in groups.values())
        trainable = sum(t for _, t in groups.values())
        assert (total, trainable) == REIN_COUNTS[size]
