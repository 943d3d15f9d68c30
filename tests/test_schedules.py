"""Per-iteration schedules of the successors' recipes: mmengine's poly horizon, cosine
weight-decay annealing and the EMA of the weights (through the training loop, with resume)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_trainer import tiny_train_config

from rein.engine.checkpoint import load_checkpoint
from rein.engine.ema import WeightEMA
from rein.engine.optim import CosineWeightDecay, PolyLR
from rein.engine.trainer import train


def _optimizer(*wds: float) -> torch.optim.AdamW:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "weight_decay": wd} for wd in wds]
    return torch.optim.AdamW(groups, lr=1e-4)


def test_mmengine_poly_horizon_reaches_zero_at_the_last_iteration():
    sched = PolyLR(_optimizer(0.05), 40_000, power=0.9, horizon="max_iters-1")
    # spec: 5.35875e-5 at t = 20,000 for a 1e-4 group; exactly 0 at t = 39,999
    assert sched.lr_at(20_000)[0] == pytest.approx(1e-4 * (1 - 20_000 / 39_999) ** 0.9, rel=1e-12)
    assert sched.lr_at(20_000)[0] == pytest.approx(5.35875e-5, abs=5e-10)
    assert sched.lr_at(39_999) == [0.0]
    default = PolyLR(_optimizer(0.05), 40_000, power=0.9)
    assert default.lr_at(39_999)[0] == pytest.approx(1e-4 * (1 / 40_000) ** 0.9)


@pytest.mark.parametrize(("warmup", "ratio"), [(1500, 1e-2), (10_000, 1e-6)])
def test_linear_warmup_then_poly_from_its_end_matches_mmengine(warmup, ratio):
    """SoMA c2bm / ACDC: LinearLR(start_factor=ratio, begin 0, end W) then PolyLR(begin W, end
    40k): lr0 * (ratio + (1 - ratio) t / (W - 1)) for t < W, lr0 (1 - (t - W) / (40k - W - 1))^0.9
    after (mmengine's horizon is end - begin - 1)."""
    sched = PolyLR(
        _optimizer(0.05),
        40_000,
        warmup_iters=warmup - 1,
        warmup_ratio=ratio,
        horizon="max_iters-1",
        begin=warmup,
    )
    for t in (0, 1, warmup // 2, warmup - 1):
        want = 1e-4 * (ratio + (1 - ratio) * t / (warmup - 1))
        assert sched.lr_at(t)[0] == pytest.approx(want, rel=1e-12), t
    for t in (warmup, warmup + 1, 20_000, 39_998):
        want = 1e-4 * (1 - (t - warmup) / (40_000 - warmup - 1)) ** 0.9
        assert sched.lr_at(t)[0] == pytest.approx(want, rel=1e-12), t
    assert sched.lr_at(39_999) == [0.0]
    if warmup == 10_000:  # the values the config header quotes
        assert sched.lr_at(20_000)[0] == pytest.approx(6.94e-5, abs=5e-8)
    with pytest.raises(ValueError, match=r"optim.poly_begin must be in \[0, max_iters\)"):
        PolyLR(_optimizer(0.0), 10, begin=10)


def test_bad_poly_horizon_is_refused():
    with pytest.raises(ValueError, match="poly horizon"):
        PolyLR(_optimizer(0.0), 10, horizon="T")


def test_cosine_weight_decay_anneals_and_raises_zero_groups():
    opt = _optimizer(0.05, 0.0)
    sched = CosineWeightDecay(opt, 40_000, wd_min=1e-5)
    assert sched.wd_at(0) == pytest.approx([0.05, 0.0])
    # spec: 0.025005 and 5e-6 at t = 20,000; wd_min at the end
    assert sched.wd_at(20_000) == pytest.approx([0.025005, 5e-6], rel=1e-9)
    assert sched.wd_at(40_000) == pytest.approx([1e-5, 1e-5])
    t = 12_345
    cos = (1 + math.cos(math.pi * t / 40_000)) / 2
    sched.set_iteration(t)
    assert [g["weight_decay"] for g in opt.param_groups] == pytest.approx(
        [1e-5 + (0.05 - 1e-5) * cos, 1e-5 * (1 - cos)]
    )


def test_ema_follows_the_weights_then_averages():
    lin = torch.nn.Linear(2, 1)
    frozen = torch.nn.Parameter(torch.ones(1), requires_grad=False)
    lin.register_parameter("frozen", frozen)
    ema = WeightEMA(lin, momentum=0.25, begin_iter=2)
    assert set(ema.shadow) == {"weight", "bias"}
    history = []
    for it in range(4):
        with torch.no_grad():
            lin.weight.fill_(float(it + 1))
        ema.update(it)
        history.append(ema.shadow["weight"][0, 0].item())
    # it 0, 1: copies (1, 2); it 2: 2 + 0.25 (3 - 2); it 3: 2.25 + 0.25 (4 - 2.25)
    assert history == [1.0, 2.0, 2.25, 2.6875]
    with ema.swapped():
        assert lin.weight[0, 0].item() == 2.6875
    assert lin.weight[0, 0].item() == 4.0


@pytest.mark.parametrize("momentum", [0.0, 1.5])
def test_bad_ema_momentum_is_refused(momentum):
    with pytest.raises(ValueError, match="ema_momentum"):
        WeightEMA(torch.nn.Linear(1, 1), momentum=momentum)


def _ema_config(out, **train_kw):
    cfg = tiny_train_config(out, ema_momentum=0.5, ema_begin_iter=2, **train_kw)
    cfg.optim.wd_schedule = "cosine"
    cfg.optim.poly_horizon = "max_iters-1"
    return cfg


def test_checkpoints_hold_the_average_and_resume_bit_identically(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train(_ema_config(a), progress=False)
    train(_ema_config(b), progress=False, stop_after=3)
    train(_ema_config(b), progress=False)
    state_a, meta_a, ts_a = load_checkpoint(a / "tiny", "latest")
    state_b, _, ts_b = load_checkpoint(b / "tiny", "latest")
    assert meta_a["iteration"] == 4
    live = ts_a["live_weights"]
    assert state_a.keys() == live.keys() == state_b.keys()
    differs = [k for k in state_a if not torch.equal(state_a[k], live[k])]
    assert differs, "the checkpoint should hold the EMA weights, not the live ones"
    for k in state_a:
        assert torch.equal(state_a[k], state_b[k]), k
        assert torch.equal(live[k], ts_b["live_weights"][k]), k
    # the weight decay of the last step (iteration 3 of 4) is the cosine value of each group
    groups = ts_a["optimizer"]["param_groups"]
    cos = (1 + math.cos(math.pi * 3 / 4)) / 2
    assert {g["initial_weight_decay"] for g in groups} == {0.0, 0.05}
    for g in groups:
        assert g["weight_decay"] == pytest.approx(1e-5 + (g["initial_weight_decay"] - 1e-5) * cos)


def test_resuming_an_ema_run_without_ema_is_refused(tmp_path):
    train(_ema_config(tmp_path), progress=False, stop_after=2)
    cfg = tiny_train_config(tmp_path)
    with pytest.raises(ValueError, match="ema_momentum"):
        train(cfg, progress=False)


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_OPTIONS = {"soma": {"start_block": 2, "rank": 4}, "recyclelora": {"r_max": 9, "r_main": 6}}


@pytest.mark.parametrize("tuning", ["soma", "recyclelora"])
def test_every_group_follows_the_spec_at_iterations_0_1_12k_and_the_last(tuning):
    """The config's optimizer and schedules: lr_t = lr0 (1 - t / 39999)^0.9 and wd_t = 1e-5 +
    (wd0 - 1e-5)(1 + cos(pi t / 40000)) / 2 for every tensor's own lr0 / wd0 (spec tables)."""
    from conftest import tiny_model_config

    from rein.config import load_config
    from rein.engine.optim import build_optimizer, build_schedules
    from rein.segmentor import build_segmentor

    cfg = load_config(CONFIGS / f"{tuning}_dinov2-l_mask2former_gta_512.yaml")
    model_cfg = tiny_model_config(tuning)
    model_cfg.tuning_options = {**cfg.model.tuning_options, **TINY_OPTIONS[tuning]}
    model = build_segmentor(model_cfg)
    optimizer = build_optimizer(model, cfg.optim)
    lr_schedule, wd_schedule = build_schedules(optimizer, cfg.optim, cfg.train.max_iters)
    assert cfg.train.max_iters == 40_000 and wd_schedule is not None
    import test_recyclelora
    import test_soma

    spec_group = {"soma": test_soma, "recyclelora": test_recyclelora}[tuning]._spec_group
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    seen = set()
    for t in (0, 1, 12_000, 39_999):
        lrs, wds = lr_schedule.lr_at(t), wd_schedule.wd_at(t)
        for group, lr, wd in zip(optimizer.param_groups, lrs, wds, strict=True):
            for name in group["names"]:
                lr0, wd0 = spec_group(model, name)  # the spec's table at iteration 0
                want_lr = lr0 * (1 - t / 39_999) ** 0.9
                want_wd = 1e-5 + (wd0 - 1e-5) * (1 + math.cos(math.pi * t / 40_000)) / 2
                assert lr == pytest.approx(want_lr, rel=1e-12, abs=0), (name, t)
                assert wd == pytest.approx(want_wd, rel=1e-12), (name, t)
                seen.add(name)
    assert seen == trainable  # every trainable tensor is in exactly the groups checked
    assert lr_schedule.lr_at(39_999) == [0.0] * len(optimizer.param_groups)
