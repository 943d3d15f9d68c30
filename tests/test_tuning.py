"""Tuning methods: rein / frozen / full and the PEFT baselines lora (peft), vpt, adaptformer."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_config
from torch import nn

from rein.engine.checkpoint import load_into, trainable_state_dict
from rein.methods import apply_tuning, build_method, resolve_tuning_options
from rein.methods.adaptformer import AdaptFormerMlp
from rein.methods.vpt import PromptedBlock
from rein.segmentor import build_segmentor

METHODS = ("rein", "frozen", "full", "lora", "vpt", "adaptformer")
PEFT = ("lora", "vpt", "adaptformer")
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "rein_dinov2-l_mask2former_gta_512.yaml"

# The tiny model of conftest: width 32, 4 blocks (all run), MLP hidden 128, patch 16.
C, L, HIDDEN = 32, 4, 128


def param_group(name: str) -> str | None:
    """The PEFT baseline a backbone parameter belongs to (each method's own report)."""
    groups = {build_method(m).report_group(name) for m in PEFT} - {None}
    return groups.pop() if groups else None


def need_peft(tuning: str) -> None:
    """tuning 'lora' is built on Hugging Face peft, an optional dependency (rein[baselines])."""
    if tuning == "lora":
        pytest.importorskip("peft")


def build(tuning: str, seed: int = 0, **options):
    need_peft(tuning)
    cfg = tiny_model_config(tuning)
    cfg.tuning_options = dict(options)
    torch.manual_seed(seed)
    return build_segmentor(cfg)


def should_train(tuning: str, name: str) -> bool:
    if name.startswith("decode_head."):
        return True
    if tuning == "full":
        return name.startswith("backbone.vit.")
    if tuning == "rein":
        return name.startswith("backbone.reins.")
    return param_group(name) == tuning


def loss_step(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 64, 64, generator=g)
    y = torch.randint(0, 19, (2, 64, 64), generator=g)
    return model.loss(x, y, generator=g)["loss"]


# -- which parameters train ---------------------------------------------------------------------
@pytest.mark.parametrize("tuning", METHODS)
def test_exactly_the_method_parameters_get_gradients(tuning):
    m = build(tuning).train()
    loss_step(m).backward()
    names = [n for n, _ in m.named_parameters()]
    if tuning in PEFT:
        assert any(param_group(n) == tuning for n in names)
    for name, p in m.named_parameters():
        expected = should_train(tuning, name)
        assert p.requires_grad == expected, name
        unused = tuning == "full" and name.startswith("backbone.vit.norm.")  # final norm: unused
        assert (p.grad is not None) == (expected and not unused), name
    # The frozen ViT (and whatever the method put inside it) stays in eval mode.
    assert m.backbone.vit.training == (tuning == "full")
    assert all(not mod.training for mod in m.backbone.vit.modules()) == (tuning != "full")
    assert m.decode_head.training
    if tuning != "rein":
        assert m.backbone.reins is None and hasattr(m.decode_head, "query_embed")


@pytest.mark.parametrize("tuning", PEFT)
def test_optimizer_step_leaves_the_frozen_vit_unchanged(tuning):
    m = build(tuning).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.05)  # all of them
    for step in range(2):  # step 2: the zero-initialised up / B matrices have moved
        opt.zero_grad()
        loss_step(m, step).backward()
        opt.step()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    for k, v in m.state_dict().items():
        if k in trainable:
            continue
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    for k in trainable:
        if param_group(k) == tuning:
            assert not torch.equal(m.state_dict()[k], before[k]), f"{k} did not train"


# -- parameter counts ---------------------------------------------------------------------------
def _lora_count(rank: int, targets: list[str]) -> int:
    shapes = {"qkv": (C, 3 * C), "proj": (C, C), "fc1": (C, HIDDEN), "fc2": (HIDDEN, C)}
    return L * rank * sum(sum(shapes[t]) for t in targets)


@pytest.mark.parametrize(
    ("tuning", "options", "expected"),
    [
        ("lora", {}, L * 16 * (C + 3 * C)),
        (
            "lora",
            {"rank": 2, "targets": ["qkv", "proj", "fc1", "fc2"]},
            _lora_count(2, ["qkv", "proj", "fc1", "fc2"]),
        ),
        ("vpt", {}, L * 10 * C),
        ("vpt", {"num_prompts": 3}, L * 3 * C),
        ("adaptformer", {}, L * (C * 64 + 64 + 64 * C + C)),
        ("adaptformer", {"bottleneck": 8}, L * (C * 8 + 8 + 8 * C + C)),
    ],
)
def test_parameter_counts_follow_the_formulas(tuning, options, expected):
    m = build(tuning, **options)
    frozen = build("frozen")
    groups = m.parameter_groups()
    assert groups[tuning] == (expected, expected)
    assert groups["backbone"] == (frozen.parameter_groups()["backbone"][0], 0)
    assert groups["head"] == frozen.parameter_groups()["head"]
    trainable = sum(t for _, t in groups.values())
    assert trainable == sum(v.numel() for v in trainable_state_dict(m).values())
    assert trainable == expected + groups["head"][1]


@pytest.mark.parametrize(
    ("tuning", "expected"),
    [
        ("lora", 24 * 16 * (1024 + 3072)),
        ("vpt", 24 * 10 * 1024),
        ("adaptformer", 24 * (2 * 1024 * 64 + 64 + 1024)),
    ],
)
def test_dinov2_large_counts_on_meta(tuning, expected):
    from rein.config import load_config

    need_peft(tuning)
    cfg = load_config(CONFIG, [f"model.tuning={tuning}"])
    with torch.device("meta"):
        m = build_segmentor(cfg.model, load_weights=False, with_criterion=False)
    groups = m.parameter_groups()
    assert groups[tuning] == (expected, expected)
    assert groups["backbone"] == (304_199_680, 0)  # the frozen DINOv2-L of the spec
    assert groups["head"] == (20_565_204, 20_565_204)  # the frozen baseline's head


def test_params_cli_reports_lora(capsys):
    from rein.cli import main

    need_peft("lora")
    main(["params", str(CONFIG), "--set", "model.tuning=lora"])
    out = capsys.readouterr().out
    assert "tuning=lora" in out
    assert any(line.split()[:3] == ["lora", "1,572,864", "1,572,864"] for line in out.splitlines())


# -- the methods themselves ---------------------------------------------------------------------
def test_lora_is_injected_by_peft():
    LoraLayer = pytest.importorskip("peft.tuners.lora").LoraLayer

    m = build("lora", targets=["qkv", "fc2"], rank=4, alpha=8)
    blocks = m.backbone.vit.blocks
    for block in blocks:
        for layer in (block.attn.qkv, block.mlp.fc2):
            assert isinstance(layer, LoraLayer)
            assert layer.r["default"] == 4 and layer.scaling["default"] == 2.0
        assert not isinstance(block.attn.proj, LoraLayer)
        assert not isinstance(block.mlp.fc1, LoraLayer)
    lora_layers = [mod for mod in m.modules() if isinstance(mod, LoraLayer)]
    assert len(lora_layers) == 2 * len(blocks)
    # patch_embed.proj is not a block layer: "proj" must never reach it.
    m2 = build("lora", targets=["proj"])
    assert not isinstance(m2.backbone.vit.patch_embed.proj, LoraLayer)
    assert all(isinstance(b.attn.proj, LoraLayer) for b in m2.backbone.vit.blocks)
    names = {n for n, p in m.named_parameters() if p.requires_grad and n.startswith("backbone.")}
    assert "backbone.vit.blocks.0.attn.qkv.lora_A.default.weight" in names
    assert all(".lora_A." in n or ".lora_B." in n for n in names)


@pytest.mark.parametrize("tuning", ["lora", "adaptformer"])
def test_zero_initialised_methods_start_as_the_frozen_model(tuning):
    x = torch.randn(2, 3, 64, 64)
    frozen = build("frozen").eval()
    m = build(tuning).eval()  # same seed: same frozen ViT
    with torch.no_grad():
        ref, _ = frozen.backbone(x)
        out, _ = m.backbone(x)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_adaptformer_wraps_each_mlp():
    m = build("adaptformer", bottleneck=8, scale=0.5)
    for block in m.backbone.vit.blocks:
        mlp = block.mlp
        assert isinstance(mlp, AdaptFormerMlp) and mlp.scale == 0.5
        assert torch.count_nonzero(mlp.adapter.up.weight) == 0
        assert torch.count_nonzero(mlp.adapter.down.weight) > 0
        # out = mlp(x) + s * up(relu(down(x)))
        with torch.no_grad():
            mlp.adapter.up.weight.normal_()
            x = torch.randn(2, 5, C)
            a = mlp.adapter
            ref = mlp.base_layer(x) + 0.5 * a.up(torch.relu(a.down(x)))
            torch.testing.assert_close(mlp(x), ref)
        assert mlp.fc1 is mlp.base_layer.fc1  # attributes fall through to the wrapped MLP


def test_vpt_prompts_are_inserted_after_the_prefix_and_removed():
    seen = {}

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            seen["x"] = x
            return x * 2

    block = PromptedBlock(Probe(), num_prompts=3, embed_dim=4, num_prefix_tokens=2, patch_size=16)
    x = torch.randn(5, 2 + 7, 4)
    out = block(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, 2 * x)
    inner = seen["x"]
    assert inner.shape == (5, 2 + 3 + 7, 4)
    torch.testing.assert_close(inner[:, :2], x[:, :2])
    torch.testing.assert_close(inner[:, 2:5], block.prompts.expand(5, -1, -1))
    torch.testing.assert_close(inner[:, 5:], x[:, 2:])
    bound = math.sqrt(6.0 / (3 * 16 * 16 + 4))
    assert block.prompts.abs().max() <= bound


def test_vpt_in_the_backbone():
    m = build("vpt", num_prompts=4).eval()
    blocks = m.backbone.vit.blocks
    assert all(isinstance(b, PromptedBlock) for b in blocks)
    assert blocks[0].num_prefix_tokens == m.backbone.num_prefix_tokens == 1
    assert blocks[2].prompts.shape == (4, C)
    bound = math.sqrt(6.0 / (3 * 16 * 16 + C))
    assert 0 < blocks[2].prompts.abs().max() <= bound
    assert "backbone.vit.blocks.3.prompts" in dict(m.named_parameters())
    assert blocks[1].attn is blocks[1].base_layer.attn
    feats, queries = m.backbone(torch.randn(1, 3, 64, 64))
    assert queries is None and [f.shape[-1] for f in feats] == [16, 8, 4, 2]
    # The prompts change the output (unlike lora / adaptformer at init).
    frozen = build("frozen").eval()
    with torch.no_grad():
        for name, p in [*m.named_parameters(), *frozen.named_parameters()]:
            if name.endswith(".gamma"):  # LayerScale starts at 1e-5 in a random DINOv2
                p.fill_(1.0)
        ref, _ = frozen.backbone(torch.ones(1, 3, 64, 64))
        out, _ = m.backbone(torch.ones(1, 3, 64, 64))
    assert not torch.allclose(ref[-1], out[-1])


# -- checkpoints --------------------------------------------------------------------------------
@pytest.mark.parametrize("tuning", PEFT)
def test_checkpoint_round_trip(tuning):
    trained = build(tuning).train()
    opt = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        opt.zero_grad()
        loss_step(trained, step).backward()
        opt.step()
    state = {k: v.clone() for k, v in trainable_state_dict(trained).items()}
    backbone_keys = {k for k in state if k.startswith("backbone.")}
    assert backbone_keys and all(param_group(k) == tuning for k in backbone_keys)
    assert all(k.startswith(("backbone.", "decode_head.")) for k in state)

    fresh = build(tuning).eval()  # same frozen ViT, untrained adapters and head
    trained.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(fresh.seg_scores(x), trained.seg_scores(x))
        result = load_into(fresh, state)
        assert result.missing_keys == [] and result.unexpected_keys == []
        torch.testing.assert_close(fresh.seg_scores(x), trained.seg_scores(x), rtol=0, atol=0)


# -- options ------------------------------------------------------------------------------------
def test_default_options():
    assert resolve_tuning_options("lora") == {"rank": 16, "alpha": 16.0, "targets": ["qkv"]}
    assert resolve_tuning_options("lora", {"rank": 4, "targets": "qkv"})["alpha"] == 4.0
    assert resolve_tuning_options("vpt") == {"num_prompts": 10}
    assert resolve_tuning_options("adaptformer") == {"bottleneck": 64, "scale": 0.1}
    for method in ("rein", "frozen", "full"):
        assert resolve_tuning_options(method, {}) == {}


@pytest.mark.parametrize(
    ("tuning", "options", "match"),
    [
        ("lora", {"ranks": 4}, r"'ranks'.*allowed options: rank, alpha, targets"),
        ("lora", {"dropout": 0.1}, r"'dropout'.*allowed options"),
        ("vpt", {"rank": 4}, r"'rank' for tuning 'vpt'; allowed options: num_prompts"),
        ("adaptformer", {"num_prompts": 4}, r"allowed options: bottleneck, scale"),
        ("frozen", {"rank": 4}, r"'rank' for tuning 'frozen'; allowed options: none"),
        ("rein", {"x": 1}, r"allowed options: none"),
        ("lora", {"rank": 0}, r"'rank' must be a positive integer"),
        ("lora", {"rank": True}, r"'rank' must be a positive integer"),
        ("lora", {"alpha": -1}, r"'alpha' must be > 0"),
        ("lora", {"targets": []}, r"'targets' must be a non-empty list"),
        ("vpt", {"num_prompts": 2.5}, r"'num_prompts' must be a positive integer"),
        ("adaptformer", {"scale": "big"}, r"'scale' must be a number"),
        ("prompt", {}, r"unknown tuning method 'prompt'"),
    ],
)
def test_bad_options_raise(tuning, options, match):
    with pytest.raises(ValueError, match=match):
        resolve_tuning_options(tuning, options)


def test_bad_lora_target_names_the_available_layers():
    with pytest.raises(ValueError, match=r"target 'qkvx'.*attn.qkv, attn.proj, mlp.fc1, mlp.fc2"):
        build("lora", targets=["qkvx"])


def test_build_rejects_unknown_options_from_the_config():
    with pytest.raises(ValueError, match=r"'bottleneck' for tuning 'vpt'"):
        build("vpt", bottleneck=8)


def test_cannot_adapt_twice_or_mix_with_rein():
    m = build("adaptformer")
    with pytest.raises(ValueError, match="already has adaptformer"):
        apply_tuning(m, "vpt")
    with pytest.raises(ValueError, match="has Rein"):
        apply_tuning(build("rein"), "lora")


def test_wrapped_models_deepcopy():
    m = build("vpt")
    m2 = copy.deepcopy(m)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m.eval().seg_scores(x), m2.eval().seg_scores(x))


@pytest.mark.parametrize("tuning", PEFT)
def test_blocks_after_the_last_output_are_not_adapted(tuning):
    need_peft(tuning)
    cfg = tiny_model_config(tuning)
    cfg.backbone.out_indices = [0, 1, 1, 2]  # block 3 never runs
    m = build_segmentor(cfg).train()
    adapted = {n.split(".")[3] for n, _ in m.named_parameters() if param_group(n) == tuning}
    assert adapted == {"0", "1", "2"}
    loss_step(m).backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_vpt_with_register_tokens():
    cfg = tiny_model_config("vpt")
    cfg.backbone.name = "vit_small_patch14_reg4_dinov2"
    m = build_segmentor(cfg).train()
    assert m.backbone.num_prefix_tokens == 5
    assert all(b.num_prefix_tokens == 5 for b in m.backbone.vit.blocks)
    loss_step(m).backward()
    assert all(b.prompts.grad is not None for b in m.backbone.vit.blocks)


@pytest.mark.parametrize("method", PEFT)
def test_backbones_without_transformer_blocks_are_rejected(method):
    need_peft(method)

    class NoBlocks(nn.Module):
        reins = None

        def freeze(self) -> None:
            pass

    model = nn.Module()
    model.backbone, model.decode_head = NoBlocks(), nn.Linear(2, 2)
    with pytest.raises(ValueError, match=f"tuning '{method}' adapts transformer blocks"):
        apply_tuning(model, method)
