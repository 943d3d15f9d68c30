"""AdamW parameter groups and the poly learning-rate schedule."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from rein.config import OptimConfig
from rein.engine.optim import PolyLR, build_optimizer, build_param_groups


class Reins(nn.Module):
    """Stand-in for rein.reins.Reins: per-layer tokens, a shared MLP and a scale."""

    def __init__(self) -> None:
        super().__init__()
        self.learnable_tokens = nn.Parameter(torch.zeros(2, 5, 8))
        self.mlp_token2feat = nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.tensor(1e-3))


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.patch = nn.Linear(8, 8)
        self.backbone.ln = nn.LayerNorm(8)  # norm by type; the name has no "norm"
        self.backbone.norm1 = nn.LayerNorm(8)
        self.backbone.reins = Reins()
        self.backbone.frozen = nn.Linear(8, 8)
        self.backbone.frozen.requires_grad_(False)
        self.decode_head = nn.Module()
        self.decode_head.gn = nn.GroupNorm(2, 8)
        self.decode_head.bn = nn.BatchNorm2d(8)
        self.decode_head.query_embed = nn.Embedding(5, 8)
        self.decode_head.level_embed = nn.Embedding(3, 8)
        self.decode_head.cls_embed = nn.Linear(8, 3)
        self.decode_head.gamma = nn.Parameter(torch.ones(8))


def groups_by_name(groups: list[dict]) -> dict[str, tuple[float, float]]:
    out = {}
    for g in groups:
        assert len(g["names"]) == len(g["params"]) > 0
        for name in g["names"]:
            assert name not in out, f"{name} in two groups"
            out[name] = (g["weight_decay"], g["lr"])
    return out


NO_DECAY = {
    "backbone.ln.weight",
    "backbone.ln.bias",
    "backbone.norm1.weight",
    "backbone.norm1.bias",
    "backbone.reins.learnable_tokens",
    "backbone.reins.scale",
    "decode_head.gn.weight",
    "decode_head.gn.bias",
    "decode_head.bn.weight",
    "decode_head.bn.bias",
    "decode_head.query_embed.weight",
    "decode_head.level_embed.weight",
}
DECAY = {
    "backbone.patch.weight",
    "backbone.patch.bias",
    "backbone.reins.mlp_token2feat.weight",
    "backbone.reins.mlp_token2feat.bias",
    "decode_head.cls_embed.weight",
    "decode_head.cls_embed.bias",
    "decode_head.gamma",
}


def test_param_groups_weight_decay():
    model = Toy()
    groups = build_param_groups(model, weight_decay=0.05, lr=1e-4)
    by_name = groups_by_name(groups)
    assert set(by_name) == NO_DECAY | DECAY  # frozen params left out
    for name in NO_DECAY:
        assert by_name[name] == (0.0, 1e-4), name
    for name in DECAY:
        assert by_name[name] == (0.05, 1e-4), name
    assert len(groups) == 2
    # every trainable parameter exactly once, as the same tensor object
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params})
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}


def test_scale_without_reins_module_decays():
    model = nn.Module()
    model.adapter = nn.Module()
    model.adapter.scale = nn.Parameter(torch.ones(1))  # not on a Reins module
    model.reins = Reins()  # 'reins.scale'
    by_name = groups_by_name(build_param_groups(model, 0.05, 1.0))
    assert by_name["adapter.scale"][0] == 0.05
    assert by_name["reins.scale"][0] == 0.0
    inner = nn.Module()
    inner.r = Reins()  # scale found by module type, whatever the attribute name
    assert groups_by_name(build_param_groups(inner, 0.05, 1.0))["r.scale"][0] == 0.0


def test_backbone_lr_mult():
    model = Toy()
    by_name = groups_by_name(build_param_groups(model, 0.05, 1e-4, backbone_lr_mult=0.1))
    assert by_name["backbone.patch.weight"] == (0.05, pytest.approx(1e-5))
    assert by_name["backbone.ln.weight"] == (0.0, pytest.approx(1e-5))
    assert by_name["backbone.reins.learnable_tokens"] == (0.0, 1e-4)  # Rein keeps the base lr
    assert by_name["backbone.reins.mlp_token2feat.weight"] == (0.05, 1e-4)
    assert by_name["decode_head.cls_embed.weight"] == (0.05, 1e-4)


def test_build_optimizer():
    model = Toy()
    cfg = OptimConfig(lr=2e-4, weight_decay=0.01, betas=(0.8, 0.9), eps=1e-6)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.01}
    for g in opt.param_groups:
        assert g["lr"] == 2e-4 and g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(frozen, cfg)


def make_sched(lrs=(1e-4,), **kw) -> tuple[torch.optim.Optimizer, PolyLR]:
    params = [{"params": [nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    opt = torch.optim.AdamW(params, lr=lrs[0])
    return opt, PolyLR(opt, **kw)


def lrs_over(opt, sched, iters: int) -> list[list[float]]:
    """lrs used at iterations 0..iters-1 (scheduler stepped after each optimizer step)."""
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(iters):
            seen.append([g["lr"] for g in opt.param_groups])
            opt.step()
            sched.step()
    return seen


def test_poly_values_hand_computed():
    opt, sched = make_sched(lrs=(1e-4, 1e-5), max_iters=100, power=0.9)
    seen = lrs_over(opt, sched, 101)
    # 0.5 ** 0.9 = 0.5358867, 0.1 ** 0.9 = 0.1258925, 0.99 ** 0.9 = 0.9909954
    assert seen[0] == [1e-4, 1e-5]
    assert seen[1][0] == pytest.approx(0.9909954e-4, rel=1e-6)
    assert seen[50][0] == pytest.approx(0.5358867e-4, rel=1e-6)
    assert seen[50][1] == pytest.approx(0.5358867e-5, rel=1e-6)  # per-group base lr
    assert seen[90][0] == pytest.approx(0.1258925e-4, rel=1e-6)
    assert seen[100] == [0.0, 0.0]
    assert sched.lr_at(250) == [0.0, 0.0]  # clamped after max_iters
    assert all(a[0] >= b[0] for a, b in zip(seen, seen[1:]))  # monotone


def test_poly_min_lr():
    opt, sched = make_sched(max_iters=100, power=1.0, min_lr=1e-6)
    assert sched.lr_at(0) == [pytest.approx(1e-4)]
    assert sched.lr_at(50) == [pytest.approx(0.5 * 99e-6 + 1e-6)]
    assert sched.lr_at(100) == [pytest.approx(1e-6)]


def test_poly_warmup():
    opt, sched = make_sched(max_iters=100, power=0.9, warmup_iters=10, warmup_ratio=0.1)
    seen = [lr[0] for lr in lrs_over(opt, sched, 12)]
    assert seen[0] == pytest.approx(1e-5)  # base * warmup_ratio
    # it=5: 0.95 ** 0.9 = 0.9548854, warm-up factor 0.1 + 0.9 * 5 / 10 = 0.55
    assert seen[5] == pytest.approx(1e-4 * 0.9548854 * 0.55, rel=1e-6)
    # it=10: warm-up over; 0.9 ** 0.9 = 0.9095325
    assert seen[10] == pytest.approx(1e-4 * 0.9095325, rel=1e-6)
    assert all(a < b for a, b in zip(seen[:10], seen[1:11]))  # rising during warm-up


def test_scheduler_state_round_trip():
    opt, sched = make_sched(lrs=(1e-4, 3e-5), max_iters=40, warmup_iters=5, warmup_ratio=1e-3)
    lrs_over(opt, sched, 17)
    opt_state, sched_state = opt.state_dict(), sched.state_dict()
    expected = lrs_over(opt, sched, 10)

    opt2, sched2 = make_sched(lrs=(1e-4, 3e-5), max_iters=40, warmup_iters=5, warmup_ratio=1e-3)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    assert sched2.last_epoch == 17
    assert lrs_over(opt2, sched2, 10) == expected
    # the state is plain data (weights_only-loadable for checkpoints)
    assert all(
        isinstance(v, int | float | bool | str | list | type(None)) for v in sched_state.values()
    )
