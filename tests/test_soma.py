"""``tuning: soma`` (SoMA, CVPR 2025): minor-component SVD adapters (spec docs/methods/soma.md)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
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
from rein.engine.optim import build_optimizer, build_schedules
from rein.methods import build_method, merge_model
from rein.methods.soma import SoMALinear, SoMAQKV
from rein.segmentor import build_segmentor

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "soma_dinov2-l_mask2former_gta_512.yaml"
C, L, HIDDEN = 32, 4, 128  # the tiny model of conftest: width 32, 4 blocks, MLP hidden 128
START = 2  # the tiny model adapts blocks 2 and 3
LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def build(tuning: str = "soma", torch_seed: int = 0, **options):
    cfg = tiny_model_config(tuning)
    if tuning == "soma":
        cfg.tuning_options = {"start_block": START, **options}
    torch.manual_seed(torch_seed)
    return build_segmentor(cfg)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def pretrained_blocks(model) -> dict[str, torch.Tensor]:
    """The per-layer weights of a plain (frozen) model, q/k/v split by rows."""
    out = {}
    for i, block in enumerate(model.backbone.vit.blocks):
        qkv = block.attn.qkv.weight.detach()
        for j, part in enumerate("qkv"):
            out[f"{i}.{part}"] = qkv[j * C : (j + 1) * C]
        out[f"{i}.proj"] = block.attn.proj.weight.detach()
        out[f"{i}.fc1"] = block.mlp.fc1.weight.detach()
        out[f"{i}.fc2"] = block.mlp.fc2.weight.detach()
    return out


def soma_blocks(model) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(W_res rows, A, B)`` of every adapted layer of a soma model, q/k/v split."""
    out = {}
    for i, block in enumerate(model.backbone.vit.blocks):
        qkv = block.attn.qkv
        if not isinstance(qkv, SoMAQKV):
            continue
        w = qkv.base_layer.weight.detach()
        for j, part in enumerate("qkv"):
            ad = getattr(qkv, part)
            out[f"{i}.{part}"] = (w[j * C : (j + 1) * C], ad.lora_A.weight, ad.lora_B.weight)
        for key, layer in (
            ("proj", block.attn.proj),
            ("fc1", block.mlp.fc1),
            ("fc2", block.mlp.fc2),
        ):
            out[f"{i}.{key}"] = (
                layer.base_layer.weight.detach(),
                layer.lora_A.weight,
                layer.lora_B.weight,
            )
    return out


def wrapped_name(name: str) -> str:
    """The name a plain backbone parameter gets once its Linear is wrapped (``base_layer``)."""
    for i in range(START, L):
        for layer in LINEARS:
            prefix = f"vit.blocks.{i}.{layer}."
            if name.startswith(prefix):
                return name.replace(prefix, f"{prefix}base_layer.")
    return name


def minor_part(w: torch.Tensor, r: int) -> torch.Tensor:
    """The sum of the r smallest singular components of ``w`` (reference, plain torch)."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (u[:, -r:] * s[-r:]) @ vh[-r:]


# -- a fake backbone holding hand-built layers -------------------------------------------------
class _Block(nn.Module):
    def __init__(self, qkv: torch.Tensor | None = None, fc1: torch.Tensor | None = None):
        super().__init__()
        self.attn = nn.Module()
        self.mlp = nn.Module()
        if qkv is not None:
            self.attn.qkv = nn.Linear(qkv.shape[1], qkv.shape[0])
            self.attn.qkv.weight.data.copy_(qkv)
        if fc1 is not None:
            self.mlp.fc1 = nn.Linear(fc1.shape[1], fc1.shape[0])
            self.mlp.fc1.weight.data.copy_(fc1)


def fake_backbone(block: nn.Module) -> nn.Module:
    backbone = nn.Module()
    backbone.vit = nn.Module()
    backbone.vit.blocks = nn.ModuleList([block])
    return backbone


def hand_built(out_features: int, in_features: int, s: list[float], seed: int) -> tuple:
    """``W = U diag(S) V^T`` with orthonormal U, V and the given singular values."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_features, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_features, len(s), generator=g, dtype=torch.float64))
    w = (u * torch.tensor(s, dtype=torch.float64)) @ v.T
    return w.float(), u, v


# -- initialisation ------------------------------------------------------------------------------
@pytest.mark.parametrize(("rank", "alpha"), [(16, 16), (4, 8)])
def test_adapted_layers_start_as_the_pretrained_ones(rank, alpha):
    plain = pretrained_blocks(build("frozen"))
    m = build(rank=rank, alpha=alpha)
    s = alpha / rank
    adapted = soma_blocks(m)
    assert sorted(adapted) == sorted(
        f"{i}.{k}" for i in range(START, L) for k in ("q", "k", "v", "proj", "fc1", "fc2")
    )
    for key, (w_res, a, b) in adapted.items():
        assert a.shape == (rank, plain[key].shape[1]) and b.shape == (plain[key].shape[0], rank)
        assert rel_err(w_res + s * (b @ a), plain[key]) < 1e-5, key
        assert rel_err(w_res, plain[key]) > 1e-3, key  # the minor part really moved to A, B
    # Blocks before start_block stay plain Linear layers with the pretrained weights.
    for i in range(START):
        block = m.backbone.vit.blocks[i]
        for name in LINEARS:
            layer = block.get_submodule(name)
            assert type(layer) is nn.Linear
        assert torch.equal(block.attn.qkv.weight[:C], plain[f"{i}.q"])


def test_whole_model_output_is_unchanged_by_adapting():
    x = torch.randn(1, 3, 64, 64)
    ref = seg(open_layerscale(build("frozen")), x)
    m = open_layerscale(build())
    assert rel_err(seg(m, x), ref) < 1e-5
    with torch.no_grad():  # the comparison is sensitive to the adapters
        m.backbone.vit.blocks[START].mlp.fc1.lora_B.weight.add_(0.05)
    assert rel_err(seg(m, x), ref) > 1e-3


def test_minor_components_of_a_hand_built_matrix():
    sv = [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    w, u, v = hand_built(8, 6, sv, seed=1)
    backbone = fake_backbone(_Block(fc1=w))
    rank, alpha = 2, 4.0  # s = 2
    build_method(
        "soma", {"rank": rank, "alpha": alpha, "start_block": 0, "targets": ["fc1"]}
    ).adapt(backbone)
    layer = backbone.vit.blocks[0].mlp.fc1
    assert isinstance(layer, SoMALinear)
    a, b = layer.lora_A.weight.double(), layer.lora_B.weight.double()
    s = alpha / rank
    # The two smallest components, written out: 2 * u5 v5^T + 1 * u6 v6^T.
    expected = 2.0 * torch.outer(u[:, 4], v[:, 4]) + 1.0 * torch.outer(u[:, 5], v[:, 5])
    torch.testing.assert_close(s * (b @ a), expected, atol=1e-5, rtol=0)
    # A = diag(sqrt(S_r / s)) Vh_r and B = U_r diag(sqrt(S_r / s)), up to a sign per component.
    root = torch.tensor([math.sqrt(2.0 / s), math.sqrt(1.0 / s)], dtype=torch.float64)
    sign = torch.sign((a * v[:, 4:].T).sum(1))
    torch.testing.assert_close(a, sign[:, None] * root[:, None] * v[:, 4:].T, atol=1e-5, rtol=0)
    torch.testing.assert_close(b, sign[None] * u[:, 4:] * root[None], atol=1e-5, rtol=0)
    # The residual keeps the four largest.
    major = (u[:, :4] * torch.tensor(sv[:4], dtype=torch.float64)) @ v[:, :4].T
    torch.testing.assert_close(layer.base_layer.weight.double(), major, atol=1e-5, rtol=0)
    # The forward is exactly F.linear(x, W_res, b) + s * ((x A^T) B^T).
    x = torch.randn(3, 6)
    with torch.no_grad():
        ref = nn.functional.linear(x, layer.base_layer.weight, layer.base_layer.bias) + s * (
            (x @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
        )
        assert torch.equal(layer(x), ref)


def test_fused_qkv_gets_one_svd_per_row_block():
    c, rank = 6, 2
    blocks = [hand_built(c, c, [9.0, 7.0, 5.0, 3.0, 2.0, 1.0], seed=k) for k in range(3)]
    blocks[1] = hand_built(c, c, [30.0, 20.0, 10.0, 0.5, 0.4, 0.3], seed=11)
    w = torch.cat([blk[0] for blk in blocks])  # (3c, c)
    backbone = fake_backbone(_Block(qkv=w))
    build_method("soma", {"rank": rank, "alpha": rank, "start_block": 0, "targets": ["qkv"]}).adapt(
        backbone
    )
    layer = backbone.vit.blocks[0].attn.qkv
    assert isinstance(layer, SoMAQKV)
    fused_minor = minor_part(w, rank)
    for j, part in enumerate("qkv"):
        ad = getattr(layer, part)
        delta = (ad.lora_B.weight @ ad.lora_A.weight).double()
        _, u, v = blocks[j]
        smallest = [0.4, 0.3] if part == "k" else [2.0, 1.0]  # the block's own two smallest
        own = (u[:, -2:] * torch.tensor(smallest, dtype=torch.float64)) @ v[:, -2:].T
        torch.testing.assert_close(delta, own, atol=1e-5, rtol=0)
        # ... which is not what one SVD of the fused 3c x c matrix would give for these rows.
        assert (delta - fused_minor[j * c : (j + 1) * c]).abs().max() > 1e-2
        rows = layer.base_layer.weight[j * c : (j + 1) * c].double()
        torch.testing.assert_close(rows + delta, w[j * c : (j + 1) * c].double(), atol=1e-5, rtol=0)
    # The output is the fused residual linear plus the three deltas, concatenated per block.
    x = torch.randn(2, c)
    with torch.no_grad():
        base = nn.functional.linear(x, layer.base_layer.weight, layer.base_layer.bias)
        deltas = [
            (x @ getattr(layer, p).lora_A.weight.T) @ getattr(layer, p).lora_B.weight.T
            for p in "qkv"
        ]
        assert torch.equal(layer(x), base + torch.cat(deltas, dim=-1))
        torch.testing.assert_close(
            layer(x), nn.functional.linear(x, w, layer.base_layer.bias), atol=1e-5, rtol=0
        )


def test_official_random_keeps_w_and_takes_the_minor_factors_of_a_seeded_init():
    seed, rank = 3, 4
    frozen = build("frozen")
    plain = pretrained_blocks(frozen)
    m = build(init="official_random", seed=seed, rank=rank)
    adapted = soma_blocks(m)
    # The draws, in the documented order: blocks ascending, qkv (q, k, v rows), proj, fc1, fc2.
    g = torch.Generator().manual_seed(seed)
    for i in range(START, L):
        for key in ("q", "k", "v", "proj", "fc1", "fc2"):
            w_res, a, b = adapted[f"{i}.{key}"]
            assert torch.equal(w_res, plain[f"{i}.{key}"])  # base = the full pretrained W
            out_f, in_f = plain[f"{i}.{key}"].shape
            bound = 1.0 / math.sqrt(in_f)
            random = torch.empty(out_f, in_f).uniform_(-bound, bound, generator=g)
            torch.testing.assert_close(
                (16 / rank) * (b @ a).double(), minor_part(random, rank), atol=1e-5, rtol=0
            )
    # Every pretrained tensor (weights and biases) is kept bit for bit.
    soma_params = dict(m.backbone.named_parameters())
    for name, p in frozen.backbone.named_parameters():
        assert torch.equal(soma_params[wrapped_name(name)], p), name
    # A different seed gives different adapters; the start is not the pretrained function.
    other = soma_blocks(build(init="official_random", seed=seed + 1, rank=rank))
    assert not torch.allclose(other[f"{START}.fc1"][1], adapted[f"{START}.fc1"][1])
    with torch.no_grad():
        for name in LINEARS:
            x = torch.randn(5, HIDDEN if name == "mlp.fc2" else C)
            ours = m.backbone.vit.blocks[START].get_submodule(name)(x)
            theirs = frozen.backbone.vit.blocks[START].get_submodule(name)(x)
            assert rel_err(ours, theirs) > 1e-3, name


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
    for k, v in m.backbone.state_dict().items():
        assert torch.equal(v, once[k]), k
    wrappers = [mod for mod in m.modules() if isinstance(mod, SoMALinear | SoMAQKV)]
    assert wrappers and all(w.merged for w in wrappers)
    torch.testing.assert_close(seg(m, x), before, atol=1e-5, rtol=1e-5)
    merge_model(m)  # strips the merged wrappers: plain timm Linear layers again
    assert not any(isinstance(mod, SoMALinear | SoMAQKV) for mod in m.modules())
    for block in m.backbone.vit.blocks:
        assert all(type(block.get_submodule(n)) is nn.Linear for n in LINEARS)
    torch.testing.assert_close(seg(m, x), before, atol=1e-5, rtol=1e-5)
    merge_model(m)
    torch.testing.assert_close(seg(m, x), before, atol=1e-5, rtol=1e-5)


# -- what trains ---------------------------------------------------------------------------------
def _should_train(name: str) -> bool:
    if name.startswith("decode_head.") or name == "backbone.mask_token":
        return True
    for i in range(START, L):
        prefix = f"backbone.vit.blocks.{i}."
        for layer in LINEARS:
            if name == f"{prefix}{layer}.base_layer.bias":
                return True
            if layer == "attn.qkv":
                if any(name == f"{prefix}{layer}.{p}.lora_{m}.weight" for p in "qkv" for m in "AB"):
                    return True
            elif name in (f"{prefix}{layer}.lora_A.weight", f"{prefix}{layer}.lora_B.weight"):
                return True
    return False


def test_exactly_the_spec_tensors_train_and_get_gradients():
    m = build().train()
    loss_of(m).backward()
    names = [n for n, _ in m.named_parameters()]
    n_blocks = L - START
    assert sum(".lora_" in n for n in names) == n_blocks * 6 * 2
    assert sum(n.endswith(".base_layer.bias") for n in names) == n_blocks * 4
    for name, p in m.named_parameters():
        expected = _should_train(name)
        assert p.requires_grad == expected, name
        # mask_token trains but is never used (spec 6): no gradient, like the frozen weights.
        assert (p.grad is not None) == (expected and name != "backbone.mask_token"), name
    assert all(not mod.training for mod in m.backbone.vit.modules())
    groups = m.parameter_groups()
    n_soma = n_blocks * 16 * (4 * 2 * C + (C + HIDDEN) * 2)
    assert groups["soma"] == (n_soma, n_soma)
    assert groups["backbone"][1] == n_blocks * (3 * C + C + HIDDEN + C) + C


def test_training_steps_lower_the_loss_and_move_only_trainable_tensors():
    torch.manual_seed(0)
    m = build().train()
    train_steps_move_only_trainable(m, lambda k: ".lora_" in k or k.endswith("base_layer.bias"))


# -- optimizer groups ----------------------------------------------------------------------------
def _spec_group(model, name: str) -> tuple[float, float]:
    """(lr, wd) at iteration 0 by the spec's table (section 8), lr 1e-4, wd 0.05."""
    if name.startswith("backbone."):
        return 5e-5, 0.05
    owner = model.get_submodule(name.rsplit(".", 1)[0])
    keys = ("norm", "query_embed", "query_feat", "level_embed")
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
    assert any("query_feat" in n for n in seen)
    # optim.backbone_lr_mult multiplies on top of the method's own multiplier.
    cfg.optim.backbone_lr_mult = 2.0
    lrs = {n: g["lr"] for g in m.method.param_groups(m, cfg.optim) for n in g["names"]}
    assert math.isclose(lrs["backbone.mask_token"], 1e-4)


# -- full size -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def large_on_meta():
    return build_on_meta(CONFIG)


def test_dinov2_large_counts_on_meta(large_on_meta):
    _, m = large_on_meta
    groups = m.parameter_groups()
    assert groups["soma"] == (4_718_592, 4_718_592)
    assert groups["backbone"] == (304_199_680, 147_456 + 1_024)
    assert groups["head"] == (20_565_204, 20_565_204)
    total = sum(t for t, _ in groups.values())
    trainable = sum(t for _, t in groups.values())
    assert (total, trainable) == (329_483_476, 25_432_276)
    wrappers = [mod for mod in m.modules() if isinstance(mod, SoMALinear | SoMAQKV)]
    assert len(wrappers) == 16 * 4  # 96 linears: qkv counts as its three q / k / v
    assert m.decode_head.query_feat.weight.shape == (100, 256)


def test_dinov2_large_param_groups_on_meta(large_on_meta):
    cfg, m = large_on_meta
    groups = m.method.param_groups(m, cfg.optim)
    table = {}
    for g in groups:
        head = not g["names"][0].startswith("backbone.")
        assert all((not n.startswith("backbone.")) == head for n in g["names"])
        key = (head, g["lr"], g["weight_decay"])
        n, count = table.get(key, (0, 0))
        table[key] = (n + len(g["params"]), count + sum(p.numel() for p in g["params"]))
    assert table == {
        # official: 289 tensors, with q / k / v biases as three; ours is the fused qkv bias
        (False, 5e-5, 0.05): (289 - 2 * 16, 4_867_072),
        (True, 1e-4, 0.0): (93, 75_008),
        (True, 1e-4, 0.05): (199, 20_490_196),
    }


def test_params_cli_reports_soma(capsys):
    from rein.cli import main

    main(["params", str(CONFIG)])
    out = capsys.readouterr().out
    assert "tuning=soma" in out
    rows = {line.split()[0]: line.split()[1:3] for line in out.splitlines() if line.strip()}
    assert rows["soma"] == ["4,718,592", "4,718,592"]
    assert rows["total"] == ["329,483,476", "25,432,276"]


# -- options -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"init": "sora_niter_4"}, "option 'init' must be one of pretrained, official_random"),
        ({"init": "random"}, "option 'init'"),
        ({"rank": 0}, "option 'rank' must be a positive integer"),
        ({"alpha": -1}, "option 'alpha' must be > 0"),
        ({"start_block": -1}, "option 'start_block' must be >= 0"),
        ({"targets": []}, "option 'targets' must be a non-empty list"),
        ({"backbone_lr_mult": 0}, "option 'backbone_lr_mult' must be > 0"),
        ({"ranks": 4}, "unknown option 'ranks' for tuning 'soma'"),
    ],
)
def test_bad_options_are_refused_when_read(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        build_method("soma", options)


def test_bad_options_are_refused_at_adaptation():
    with pytest.raises(ValueError, match=r"rank 33 exceeds min\(out, in\) of blocks.2.attn.qkv"):
        build(rank=33)
    with pytest.raises(ValueError, match="rank 129 exceeds"):
        build(rank=129, targets=["fc1"])
    with pytest.raises(
        ValueError,
        match="target 'q' matches no Linear layer of blocks.2; its Linear layers are: "
        "attn.qkv, attn.proj, mlp.fc1, mlp.fc2",
    ):
        build(targets=["qkv", "q"])
    with pytest.raises(ValueError, match="start_block 4 leaves no block to adapt"):
        build(start_block=4)


def test_targets_choose_the_wrapped_layers_and_their_trainable_biases():
    m = build(targets=["attn.qkv", "fc2"])
    for i, block in enumerate(m.backbone.vit.blocks):
        assert isinstance(block.attn.qkv, SoMAQKV) == (i >= START)
        assert isinstance(block.mlp.fc2, SoMALinear) == (i >= START)
        assert type(block.attn.proj) is nn.Linear and type(block.mlp.fc1) is nn.Linear
    trainable = {n for n, p in m.backbone.named_parameters(prefix="backbone") if p.requires_grad}
    biases = {n for n in trainable if n.endswith("bias")}
    assert biases == {
        f"backbone.vit.blocks.{i}.{layer}.base_layer.bias"
        for i in range(START, L)
        for layer in ("attn.qkv", "mlp.fc2")
    }


def test_trainable_state_round_trips_into_a_fresh_model():
    from rein.engine.checkpoint import load_into, trainable_state_dict

    m = open_layerscale(build())
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    state = trainable_state_dict(m)
    assert any(".attn.qkv.q.lora_A.weight" in k for k in state)
    fresh = open_layerscale(build())
    load_into(fresh, state)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(seg(fresh, x), seg(m, x))
