"""``tuning: recyclelora`` (RecycleLoRA, CVPR 2026 Findings): dual LoRA from a pivoted QR
(spec docs/methods/recyclelora.md)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import (
    assert_groups_match,
    build_on_meta,
    loss_of,
    open_layerscale,
    seg,
    tiny_model_config,
    train_steps_move_only_trainable,
)
from torch import nn

from rein.config import load_config
from rein.engine.checkpoint import load_into, trainable_state_dict
from rein.engine.optim import build_optimizer, build_schedules
from rein.methods import build_method, merge_model
from rein.methods.recyclelora import RecycleLoRALinear
from rein.segmentor import build_segmentor

CONFIG = (
    Path(__file__).resolve().parents[1]
    / "configs"
    / "recyclelora_dinov2-l_mask2former_gta_512.yaml"
)
C, L, HIDDEN = 32, 4, 128  # the tiny model of conftest: width 32, 4 blocks, MLP hidden 128
LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
R_MAX, R_MAIN = 9, 6  # the tiny layers are 32 wide: the default r_max 36 does not fit
TINY = {"r_max": R_MAX, "r_main": R_MAIN}


def build(tuning: str = "recyclelora", torch_seed: int = 0, **options):
    cfg = tiny_model_config(tuning)
    if tuning == "recyclelora":
        cfg.tuning_options = {**TINY, **options}
    torch.manual_seed(torch_seed)
    return build_segmentor(cfg)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def plain_layers(model) -> dict[str, nn.Linear]:
    return {
        f"{i}.{name}": block.get_submodule(name)
        for i, block in enumerate(model.backbone.vit.blocks)
        for name in LINEARS
    }


def delta_of(layer: RecycleLoRALinear) -> torch.Tensor:
    """``B_m A_m + B_s A_s`` written out (float64)."""
    d = layer.lora_B_main.double() @ layer.lora_A_main.double()
    if layer.lora_A_sub is not None:
        d = d + layer.lora_B_sub.double() @ layer.lora_A_sub.double()
    return d


# -- a fake backbone holding hand-built layers ------------------------------------------------
class _Block(nn.Module):
    def __init__(self, qkv: torch.Tensor, fc2: torch.Tensor):
        super().__init__()
        self.attn = nn.Module()
        self.mlp = nn.Module()
        self.attn.qkv = nn.Linear(qkv.shape[1], qkv.shape[0])
        self.attn.qkv.weight.data.copy_(qkv)
        self.mlp.fc2 = nn.Linear(fc2.shape[1], fc2.shape[0])
        self.mlp.fc2.weight.data.copy_(fc2)


def adapt_hand_built(qkv: torch.Tensor, fc2: torch.Tensor, **options) -> nn.Module:
    block = _Block(qkv, fc2)
    backbone = nn.Module()
    backbone.vit = nn.Module()
    backbone.vit.blocks = nn.ModuleList([block])
    build_method("recyclelora", {"targets": ["qkv", "fc2"], **options}).adapt(backbone)
    return block


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))
    return q


def assert_columns(b: torch.Tensor, expected: list[torch.Tensor]) -> None:
    """Column j of ``b`` is +-``expected[j]`` (a unit vector; QR fixes directions up to sign)."""
    assert b.shape[1] == len(expected)
    for j, u in enumerate(expected):
        col = b[:, j].double()
        sign = torch.sign(col @ u)
        torch.testing.assert_close(col, sign * u, atol=1e-6, rtol=0)


def assert_selects(a: torch.Tensor, columns: list[int]) -> None:
    """``a`` is the 0/1 matrix with one 1 per row, row i at input column ``columns[i]``."""
    expected = torch.zeros_like(a)
    for i, c in enumerate(columns):
        expected[i, c] = 1.0
    assert torch.equal(a, expected)


# -- initialisation ------------------------------------------------------------------------------
@pytest.mark.parametrize(("r_max", "r_main", "alpha"), [(R_MAX, R_MAIN, 1.0), (5, 4, 3.0)])
def test_adapted_layers_start_as_the_pretrained_ones(r_max, r_main, alpha):
    plain = {
        k: (v.weight.detach().clone(), v.bias.detach().clone())
        for k, v in plain_layers(build("frozen")).items()
    }
    m = build(r_max=r_max, r_main=r_main, alpha=alpha)
    s = alpha / r_max
    r_s = r_max - r_main
    layers = plain_layers(m)
    assert sorted(layers) == sorted(plain)  # every linear of every block, qkv fused
    for key, layer in layers.items():
        assert isinstance(layer, RecycleLoRALinear), key
        w0, b0 = plain[key]
        out_f, in_f = w0.shape
        k = min(out_f, in_f)
        assert layer.lora_A_main.shape == (r_main, in_f)
        assert layer.lora_B_main.shape == (out_f, r_main)
        assert layer.lora_A_sub.shape == (r_s, in_f)
        assert layer.lora_B_sub.shape == (out_f, r_s)
        w_res = layer.base_layer.weight
        assert rel_err(w_res.double() + s * delta_of(layer), w0) < 1e-5, key
        assert rel_err(w_res, w0) > 1e-3, key  # the selected directions really moved
        assert torch.equal(layer.base_layer.bias, b0), key  # bias unchanged
        # The reference: scipy's pivoted QR of W0, called here on its own.
        q, _, piv = scipy.linalg.qr(w0.numpy(), pivoting=True, mode="economic")
        q = torch.from_numpy(q)
        torch.testing.assert_close(layer.lora_B_main, q[:, k - r_main : k], atol=0, rtol=0)
        torch.testing.assert_close(layer.lora_B_sub, q[:, :r_s], atol=0, rtol=0)
        assert_selects(layer.lora_A_main, piv[k - r_main : k].tolist())
        assert_selects(layer.lora_A_sub, piv[:r_s].tolist())


def test_whole_model_output_is_unchanged_by_adapting():
    x = torch.randn(1, 3, 64, 64)
    ref = seg(open_layerscale(build("frozen")), x)
    m = open_layerscale(build())
    assert rel_err(seg(m, x), ref) < 1e-5
    with torch.no_grad():  # the comparison is sensitive to the adapters
        m.backbone.vit.blocks[1].mlp.fc1.lora_B_sub.add_(0.5)
    assert rel_err(seg(m, x), ref) > 1e-3


def test_pivot_selection_on_hand_built_tall_and_wide_matrices():
    # Tall (qkv-like, out 6 > in 4): orthogonal columns of norms 3, 9, 1, 5, so the pivoted QR
    # takes them by norm: P = [1, 3, 0, 2] and Q's columns are the normalised columns.
    u = orthonormal(6, 4, seed=1)
    norms = [3.0, 9.0, 1.0, 5.0]
    tall = (u * torch.tensor(norms, dtype=torch.float64)).float()
    # Wide (fc2-like, out 4 < in 8, k = 4): four orthogonal columns of norms 10, 8, 6, 4 at
    # inputs 5, 1, 6, 2, and four small ones (norm 0.5) at 0, 3, 4, 7 that never lead.
    v = orthonormal(4, 4, seed=2)
    wide = torch.zeros(4, 8, dtype=torch.float64)
    for col, norm, j in ((5, 10.0, 0), (1, 8.0, 1), (6, 6.0, 2), (2, 4.0, 3)):
        wide[:, col] = norm * v[:, j]
    g = torch.Generator().manual_seed(3)
    for col in (0, 3, 4, 7):
        noise = torch.randn(4, generator=g, dtype=torch.float64)
        wide[:, col] = 0.5 * noise / noise.norm()
    wide = wide.float()

    r_max, r_main, alpha = 3, 2, 1.5  # r_m 2 (minor), r_s 1 (major), s = 0.5
    block = adapt_hand_built(tall, wide, r_max=r_max, r_main=r_main, alpha=alpha)
    s = alpha / r_max
    qkv, fc2 = block.attn.qkv, block.mlp.fc2
    assert isinstance(qkv, RecycleLoRALinear) and isinstance(fc2, RecycleLoRALinear)

    # Tall: pivot positions k-2, k-1 = 2, 3 -> inputs 0, 2 (norms 3, 1); position 0 -> input 1.
    assert_selects(qkv.lora_A_main, [0, 2])
    assert_columns(qkv.lora_B_main, [u[:, 0], u[:, 2]])
    assert_selects(qkv.lora_A_sub, [1])
    assert_columns(qkv.lora_B_sub, [u[:, 1]])

    # Wide: "minor" is pivot positions 2, 3 of the first k = 4 (inputs 6, 2), never the last
    # pivots of all 8 inputs (the small columns); the sub adapter takes input 5.
    assert_selects(fc2.lora_A_main, [6, 2])
    assert_columns(fc2.lora_B_main, [v[:, 2], v[:, 3]])
    assert_selects(fc2.lora_A_sub, [5])
    assert_columns(fc2.lora_B_sub, [v[:, 0]])

    for layer, w0 in ((qkv, tall), (fc2, wide)):
        # W_res = W0 - s * (B_m A_m + B_s A_s) and the forward is exactly its formula.
        ref_res = w0.double() - s * delta_of(layer)
        torch.testing.assert_close(layer.base_layer.weight.double(), ref_res, atol=1e-6, rtol=0)
        x = torch.randn(3, w0.shape[1])
        with torch.no_grad():
            w_res, b = layer.base_layer.weight, layer.base_layer.bias
            ref = nn.functional.linear(x, w_res, b)
            ref = ref + s * ((x @ layer.lora_A_main.T) @ layer.lora_B_main.T)
            ref = ref + s * ((x @ layer.lora_A_sub.T) @ layer.lora_B_sub.T)
            torch.testing.assert_close(layer(x), ref, atol=1e-6, rtol=0)
            torch.testing.assert_close(layer(x), nn.functional.linear(x, w0, b), atol=1e-5, rtol=0)
    # The wide residual: only the selected inputs (5, 6, 2) changed, each by s times one
    # direction of Q; input 1 (pivot position 1, in neither adapter) and the small ones did not.
    for col, direction in ((5, fc2.lora_B_sub[:, 0]), (6, fc2.lora_B_main[:, 0])):
        moved = wide[:, col] - fc2.base_layer.weight[:, col]
        torch.testing.assert_close(moved, s * direction, atol=1e-6, rtol=0)
    for col in (0, 1, 3, 4, 7):
        assert torch.equal(fc2.base_layer.weight[:, col], wide[:, col]), col


@pytest.mark.parametrize(
    ("r_max", "r_main", "has_main", "has_sub"),
    [
        (4, 4, True, False),  # r_s = 0: no sub tensors
        (4, 10, True, False),  # r_m = min(r_main, r_max) = 4
        (3, 0, False, True),  # main-free: only the sub adapter
    ],
)
def test_an_adapter_of_rank_zero_has_no_tensors(r_max, r_main, has_main, has_sub):
    m = build(r_max=r_max, r_main=r_main)
    names = {n.rsplit(".", 1)[-1] for n in trainable_state_dict(m) if ".lora_" in n}
    expected = set()
    if has_main:
        expected |= {"lora_A_main", "lora_B_main"}
    if has_sub:
        expected |= {"lora_A_sub", "lora_B_sub"}
    assert names == expected
    x = torch.randn(1, 3, 64, 64)
    ref = seg(open_layerscale(build("frozen")), x)
    assert rel_err(seg(open_layerscale(m), x), ref) < 1e-5
    layer = m.backbone.vit.blocks[0].attn.qkv
    rank = min(r_main, r_max) if has_main else r_max
    a = layer.lora_A_main if has_main else layer.lora_A_sub
    assert a.shape == (rank, C)


def test_meta_device_allocates_without_running_the_qr(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the QR ran on meta tensors")

    monkeypatch.setattr(scipy.linalg, "qr", refuse)
    cfg = tiny_model_config("recyclelora")
    cfg.tuning_options = TINY
    with torch.device("meta"):
        m = build_segmentor(cfg, load_weights=False, with_criterion=False)
    layer = m.backbone.vit.blocks[0].mlp.fc2
    assert isinstance(layer, RecycleLoRALinear)
    assert layer.lora_A_main.is_meta and layer.lora_A_main.shape == (R_MAIN, HIDDEN)
    assert layer.lora_B_sub.is_meta and layer.lora_B_sub.shape == (C, R_MAX - R_MAIN)


# -- merging -------------------------------------------------------------------------------------
def test_merged_equals_unmerged_and_merge_is_idempotent():
    m = open_layerscale(build())
    with torch.no_grad():  # move the adapters away from the init so the merge matters
        for name, p in m.named_parameters():
            if ".lora_" in name:
                p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(1, 3, 64, 64)
    before = seg(m, x)
    assert m.method.merge(m) is True
    once = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    assert m.method.merge(m) is True  # a second merge changes nothing (no toggle)
    m.eval()
    m.eval()  # nor does eval(): merging is not tied to the mode
    for k, v in m.backbone.state_dict().items():
        assert torch.equal(v, once[k]), k
    wrappers = [mod for mod in m.modules() if isinstance(mod, RecycleLoRALinear)]
    assert len(wrappers) == L * 4 and all(w.merged for w in wrappers)
    torch.testing.assert_close(seg(m, x), before, atol=1e-5, rtol=1e-5)
    # Merged, a layer is the plain linear with W_res + s * dW.
    layer = m.backbone.vit.blocks[2].mlp.fc1
    h = torch.randn(5, C)
    with torch.no_grad():
        ref = nn.functional.linear(h, layer.base_layer.weight, layer.base_layer.bias)
        assert torch.equal(layer(h), ref)
    merge_model(m)  # strips the merged wrappers: plain timm Linear layers again
    assert not any(isinstance(mod, RecycleLoRALinear) for mod in m.modules())
    for block in m.backbone.vit.blocks:
        assert all(type(block.get_submodule(n)) is nn.Linear for n in LINEARS)
    torch.testing.assert_close(seg(m, x), before, atol=1e-5, rtol=1e-5)
    merge_model(m)
    torch.testing.assert_close(seg(m, x), before, atol=1e-5, rtol=1e-5)


def test_checkpoint_round_trip_reproduces_the_trained_model():
    trained = build().train()
    opt = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        opt.zero_grad()
        loss_of(trained, step).backward()
        opt.step()
    state = {k: v.clone() for k, v in trainable_state_dict(trained).items()}
    assert all(
        k.startswith("decode_head.") or k == "backbone.mask_token" or ".lora_" in k for k in state
    )
    fresh = build().eval()  # the same QR init of the same pretrained weights
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(fresh.seg_scores(x), seg(trained, x))
        result = load_into(fresh, state)
        assert result.missing_keys == [] and result.unexpected_keys == []
        torch.testing.assert_close(fresh.seg_scores(x), seg(trained, x), rtol=0, atol=0)


# -- what trains ---------------------------------------------------------------------------------
def _should_train(name: str) -> bool:
    if name.startswith("decode_head.") or name == "backbone.mask_token":
        return True
    return any(
        name == f"backbone.vit.blocks.{i}.{layer}.lora_{ab}_{part}"
        for i in range(L)
        for layer in LINEARS
        for ab in "AB"
        for part in ("main", "sub")
    )


def test_exactly_the_spec_tensors_train_and_get_gradients():
    m = build().train()
    loss_of(m).backward()
    names = [n for n, _ in m.named_parameters()]
    assert sum(".lora_" in n for n in names) == L * 4 * 4
    assert "backbone.vit.blocks.0.attn.qkv.lora_B_main" in names  # the official leaf names
    assert "backbone.vit.blocks.3.mlp.fc2.lora_A_sub" in names
    for name, p in m.named_parameters():
        expected = _should_train(name)
        assert p.requires_grad == expected, name
        # mask_token trains but is never used (spec 5): no gradient, like the frozen weights.
        assert (p.grad is not None) == (expected and name != "backbone.mask_token"), name
    assert all(not mod.training for mod in m.backbone.vit.modules())
    groups = m.parameter_groups()
    n_adapters = L * R_MAX * ((C + 3 * C) + (C + C) + (C + HIDDEN) * 2)
    assert groups["recyclelora"] == (n_adapters, n_adapters)
    assert groups["backbone"][1] == C  # mask_token only: biases stay frozen


def test_training_steps_lower_the_loss_and_move_only_trainable_tensors():
    torch.manual_seed(0)
    m = build().train()
    train_steps_move_only_trainable(m, lambda k: ".lora_" in k)


# -- optimizer groups ----------------------------------------------------------------------------
def _spec_group(model, name: str) -> tuple[float, float]:
    """(lr, wd) at iteration 0 by the spec's table (section 8), lr 1e-4, wd 0.05."""
    if name.endswith(("lora_A_main", "lora_B_main")):
        return 1e-4, 0.0
    if name.endswith(("lora_A_sub", "lora_B_sub")):
        return 5e-5, 0.0
    if name.startswith("backbone."):
        return 5e-5, 0.05
    owner = model.get_submodule(name.rsplit(".", 1)[0])
    keys = ("norm", "query_embed", "level_embed")
    if any(k in name for k in keys) or isinstance(owner, nn.GroupNorm | nn.LayerNorm):
        return 1e-4, 0.0
    return 1e-4, 0.05


def test_param_groups_follow_the_spec_at_iteration_zero():
    cfg = load_config(CONFIG)
    m = build()
    opt = build_optimizer(m, cfg.optim)
    _, wd_schedule = build_schedules(opt, cfg.optim, cfg.train.max_iters)
    wd_schedule.set_iteration(0)
    seen = assert_groups_match(m, opt, _spec_group)
    assert "decode_head.query_feat.weight" in seen
    assert any("level_encoding" in n for n in seen)
    # sub_lr_mult and optim.backbone_lr_mult (on top of the method's 0.5, mask_token only).
    cfg.optim.backbone_lr_mult = 2.0
    m2 = build(sub_lr_mult=0.25)
    lrs = {n: g["lr"] for g in m2.method.param_groups(m2, cfg.optim) for n in g["names"]}
    assert math.isclose(lrs["backbone.mask_token"], 1e-4)
    assert math.isclose(lrs["backbone.vit.blocks.0.attn.qkv.lora_A_sub"], 2.5e-5)
    assert math.isclose(lrs["backbone.vit.blocks.0.attn.qkv.lora_A_main"], 1e-4)


# -- full size -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def large_on_meta():
    return build_on_meta(CONFIG)


def test_dinov2_large_counts_on_meta(large_on_meta):
    _, m = large_on_meta
    groups = m.parameter_groups()
    assert groups["recyclelora"] == (14_155_776, 14_155_776)
    assert groups["backbone"] == (304_198_656 + 1_024, 1_024)
    assert groups["head"] == (20_565_204, 20_565_204)
    total = sum(t for t, _ in groups.values())
    trainable = sum(t for _, t in groups.values())
    assert (total, trainable) == (338_920_660, 34_722_004)
    wrappers = [mod for mod in m.modules() if isinstance(mod, RecycleLoRALinear)]
    assert len(wrappers) == 96
    qkv = m.backbone.vit.blocks[0].attn.qkv
    assert qkv.lora_B_main.shape == (3072, 32) and qkv.lora_A_sub.shape == (4, 1024)
    assert m.backbone.vit.blocks[0].mlp.fc2.lora_A_sub.shape == (4, 4096)
    assert m.decode_head.query_feat.weight.shape == (100, 256)


def test_dinov2_large_r_max_34_counts_on_meta():
    cfg = load_config(CONFIG, ["model.tuning_options.r_max=34"])
    with torch.device("meta"):
        m = build_segmentor(cfg.model, load_weights=False, with_criterion=False)
    groups = m.parameter_groups()
    assert groups["recyclelora"] == (13_369_344, 13_369_344)
    total = sum(t for t, _ in groups.values())
    trainable = sum(t for _, t in groups.values())
    assert (total, trainable) == (338_134_228, 33_935_572)


def test_dinov2_large_param_groups_on_meta(large_on_meta):
    cfg, m = large_on_meta
    table: dict[tuple[bool, float, float], tuple[int, int]] = {}
    for g in m.method.param_groups(m, cfg.optim):
        head = not g["names"][0].startswith("backbone.")
        assert all((not n.startswith("backbone.")) == head for n in g["names"])
        key = (head, g["lr"], g["weight_decay"])
        n, count = table.get(key, (0, 0))
        table[key] = (n + len(g["params"]), count + sum(p.numel() for p in g["params"]))
    assert table == {
        (False, 1e-4, 0.0): (192, 12_582_912),  # main adapters
        (False, 5e-5, 0.0): (192, 1_572_864),  # sub adapters
        (False, 5e-5, 0.05): (1, 1_024),  # mask_token
        (True, 1e-4, 0.0): (92, 49_408),
        (True, 1e-4, 0.05): (200, 20_515_796),  # query_feat (25,600) decays
    }


@pytest.mark.parametrize(
    ("overrides", "adapters", "total"),
    [
        ([], "14,155,776", ["338,920,660", "34,722,004"]),
        (["--set", "model.tuning_options.r_max=34"], "13,369,344", ["338,134,228", "33,935,572"]),
    ],
)
def test_params_cli_reports_recyclelora(capsys, overrides, adapters, total):
    from rein.cli import main

    main(["params", str(CONFIG), *overrides])
    out = capsys.readouterr().out
    assert "tuning=recyclelora" in out
    rows = {line.split()[0]: line.split()[1:3] for line in out.splitlines() if line.strip()}
    assert rows["recyclelora"] == [adapters, adapters]
    assert rows["total"] == total


# -- options -------------------------------------------------------------------------------------
def test_default_options():
    opts = build_method("recyclelora").options
    assert (opts.r_max, opts.r_main, opts.alpha, opts.sub_lr_mult) == (36, 32, 1.0, 0.5)
    assert opts.targets == ["qkv", "proj", "fc1", "fc2"]
    assert (opts.rank_main, opts.rank_sub) == (32, 4)
    assert math.isclose(build_method("recyclelora").scaling, 1 / 36)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"r_max": 0}, "option 'r_max' must be a positive integer"),
        ({"r_max": 2.5}, "option 'r_max' must be a positive integer"),
        ({"r_main": -1}, "option 'r_main' must be an integer >= 0"),
        ({"alpha": 0}, "option 'alpha' must be > 0"),
        ({"alpha": "x"}, "option 'alpha' must be a number"),
        ({"targets": []}, "option 'targets' must be a non-empty list"),
        ({"sub_lr_mult": -0.5}, "option 'sub_lr_mult' must be > 0"),
        ({"backbone_lr_mult": float("nan")}, "option 'backbone_lr_mult' must be a number"),
        ({"rank": 4}, "unknown option 'rank' for tuning 'recyclelora'"),
    ],
)
def test_bad_options_are_refused_when_read(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        build_method("recyclelora", options)


def test_bad_options_are_refused_at_adaptation():
    with pytest.raises(
        ValueError, match=r"r_max 33 exceeds min\(out, in\) of blocks.0.attn.qkv \(it is 96 x 32\)"
    ):
        build(r_max=33)
    with pytest.raises(
        ValueError,
        match="target 'q' matches no Linear layer of blocks.0; its "
        "Linear layers are: attn.qkv, attn.proj, mlp.fc1, mlp.fc2",
    ):
        build(targets=["qkv", "q"])
    with pytest.raises(ValueError, match="r_max 36 exceeds"):
        build(r_max=36, r_main=32)  # the default ranks do not fit the 32-wide tiny model
    # Every layer is checked before any is changed: a failure leaves the backbone plain.
    block = _Block(torch.randn(12, 7), torch.randn(5, 9))
    backbone = nn.Module()
    backbone.vit = nn.Module()
    backbone.vit.blocks = nn.ModuleList([block])
    method = build_method("recyclelora", {"targets": ["qkv", "fc2"], "r_max": 6, "r_main": 4})
    with pytest.raises(ValueError, match=r"r_max 6 exceeds min\(out, in\) of blocks.0.mlp.fc2"):
        method.adapt(backbone)
    assert type(block.attn.qkv) is nn.Linear and type(block.mlp.fc2) is nn.Linear


def test_pivots_match_an_independent_greedy_on_a_random_matrix():
    # The greedy of spec 3, in numpy float64: pick the column with the largest remaining norm,
    # project it out. On a random matrix (no near ties) it gives scipy's pivots.
    w = torch.randn(12, 7)
    block = adapt_hand_built(w, torch.randn(7, 9), r_max=7, r_main=4)
    res = w.double().numpy().copy()
    order: list[int] = []
    for _ in range(7):
        norms = np.linalg.norm(res, axis=0)
        norms[order] = -1.0
        j = int(np.argmax(norms))
        order.append(j)
        q = res[:, j] / np.linalg.norm(res[:, j])
        res = res - np.outer(q, q @ res)
    assert_selects(block.attn.qkv.lora_A_main, order[3:7])
    assert_selects(block.attn.qkv.lora_A_sub, order[:3])
