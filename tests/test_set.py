"""SET (``model.tuning: set``): the FFT split, the two branches, the modes, counts, checkpoints.

Spec: ../shared/docs/methods/fada.md section 12 (and sections 4, 8, 9 it builds on). The
references below are written from the spec's formulas in the official seq-first layout
(N, B, C), not from the module's code.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import (
    assert_groups_match,
    build_on_meta,
    convert_and_back,
    official_round_trip,
    params_rows,
    perturb_trainable,
    seg,
    tiny_model_config,
    train_steps_move_only_trainable,
)
from torch import nn
from torch.nn import functional as F

from rein.config import load_config
from rein.engine.optim import build_optimizer
from rein.interop import InteropError, export_official, load_official, official_method
from rein.methods import build_method, check_checkpoint_method
from rein.methods.set_tokens import SETReins, replace_denormals
from rein.segmentor import build_segmentor

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "set_dinov2-l_mask2former_gta_512.yaml"
C, L, M, R, Q = 32, 4, 8, 4, 32  # the tiny model of conftest: width, blocks, tokens, rank, query


def module(channels=16, mode="faithful", lora=4, layers=2, tokens=5, seed=0, **kw) -> SETReins:
    torch.manual_seed(seed)
    return SETReins(
        num_layers=layers,
        embed_dims=channels,
        patch_size=16,
        query_dims=8,
        token_length=tokens,
        lora_dim=lora,
        fft_mode=mode,
        **kw,
    )


def build(mode: str = "faithful", seed: int = 0, **rein_kw):
    cfg = tiny_model_config("set")
    cfg.tuning_options = {"fft_mode": mode}
    for key, value in rein_kw.items():
        setattr(cfg.rein, key, value)
    torch.manual_seed(seed)
    return build_segmentor(cfg)


def spec_delta(m: SETReins, f: torch.Tensor, layer: int, inorm_first: bool = True):
    """Section 12 on the seq-first (N, B, C) patch features ``f``: fft2 over the last two dims,
    phase / amplitude with the 1e-5 thresholds, Rein on each (instance norm on the amplitude
    branch), z = (cos D1 + i sin D1) D2 / sqrt(2C), irfft2(s=(B, C), norm='ortho')."""
    n_tok, batch, c = f.shape
    spec = torch.fft.fft2(f)
    re, im = spec.real, spec.imag
    re_ = torch.where((re > -1e-5) & (re < 1e-5), torch.full_like(re, 1e-5), re)
    power = re**2 + im**2
    power = torch.where((power > -1e-5) & (power < 1e-5), torch.full_like(power, 1e-5), power)
    phase, amp = torch.atan2(im, re_), power.sqrt()
    t1 = m.learnable_tokens_a[layer] @ m.learnable_tokens_b[layer]
    t2 = m.learnable_tokens2[layer]
    p1 = torch.softmax(phase @ t1.T / math.sqrt(c), dim=-1)
    d1 = m.mlp_delta_f(p1[..., 1:] @ m.mlp_token2feat(t1[1:]) + phase)
    s2 = amp @ t2.T  # (N, B, m): F.instance_norm takes N as the batch, B as the channels
    if inorm_first:
        p2 = torch.softmax(F.instance_norm(s2) / math.sqrt(c), dim=-1)
    else:
        p2 = F.instance_norm(torch.softmax(s2 / math.sqrt(c), dim=-1))
    d2 = m.mlp_delta_f2(p2[..., 1:] @ m.mlp_token2feat2(t2[1:]) + amp)
    z = torch.stack([torch.cos(d1) * d2, torch.sin(d1) * d2], dim=-1) / math.sqrt(2 * c)
    return torch.fft.irfft2(torch.view_as_complex(z), s=(batch, c), norm="ortho")


# -- the split and the module -------------------------------------------------------------------
def test_thresholds_replace_small_values_by_plus_1e5():
    x = torch.tensor([0.0, 5e-6, -5e-6, -9.9e-6, 1e-5, -1e-5, -2e-5, 3.0])
    want = torch.tensor([1e-5, 1e-5, 1e-5, 1e-5, 1e-5, -1e-5, -2e-5, 3.0])
    assert torch.equal(replace_denormals(x), want)
    # zero features: Re = Im = 0, so phase = atan2(0, 1e-5) = 0 and amplitude = sqrt(1e-5)
    phase, amp = module().split(torch.zeros(2, 3, 16))
    assert torch.equal(phase, torch.zeros(2, 3, 16))
    torch.testing.assert_close(amp, torch.full((2, 3, 16), math.sqrt(1e-5)))


def test_per_image_split_is_the_dft_of_each_tokens_channels():
    m = module(channels=8, mode="per_image")
    f = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    k = torch.arange(8, dtype=torch.float64)
    angle = -2 * math.pi * torch.outer(k, k) / 8  # F[v] = sum_k f[k] exp(-2 pi i v k / C)
    re, im = f @ torch.cos(angle), f @ torch.sin(angle)
    phase, amp = m.split(f)
    torch.testing.assert_close(amp, (re**2 + im**2).sqrt())
    torch.testing.assert_close(torch.cos(phase) * amp, re)
    torch.testing.assert_close(torch.sin(phase) * amp, im)


@pytest.mark.parametrize("batch", [1, 3])
def test_faithful_forward_is_the_official_seq_first_computation(batch):
    m = module()
    with torch.no_grad():
        m.scale.fill_(0.7)
    x = torch.randn(batch, 1 + 9, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = m(x, 1)
        delta = spec_delta(m, x[:, 1:].transpose(0, 1), 1).transpose(0, 1)
    assert out.shape == x.shape and torch.equal(out[:, :1], x[:, :1])  # cls untouched
    torch.testing.assert_close(out[:, 1:], x[:, 1:] + 0.7 * delta, rtol=1e-5, atol=1e-6)


def test_instance_norm_sits_before_the_softmax_on_the_amplitude_branch_only():
    m = module()
    f = torch.randn(9, 2, 16, generator=torch.Generator().manual_seed(2))  # seq-first
    with torch.no_grad():
        ours = m.delta_feat(f.transpose(0, 1), 0).transpose(0, 1)
        torch.testing.assert_close(ours, spec_delta(m, f, 0), rtol=1e-5, atol=1e-6)
        late = spec_delta(m, f, 0, inorm_first=False)
        assert not torch.allclose(ours, late, atol=1e-4)
        # branch 1 has no instance norm: its softmax is the plain temperature one
        phase, _ = m.split(f.transpose(0, 1))
        t1 = m.get_tokens(0)
        plain = m._branch(phase, t1, m.mlp_token2feat, m.mlp_delta_f, inorm=False)
        normed = m._branch(phase, t1, m.mlp_token2feat, m.mlp_delta_f, inorm=True)
        assert not torch.allclose(plain, normed, atol=1e-4)


def test_shapes_and_queries_from_the_branch_1_tokens():
    m = module(channels=16, layers=3, tokens=5, lora=4)
    assert m.branch_dims == (16, 16) and m.branch_lora == (True, False)
    phase, amp = m.split(torch.randn(2, 9, 16))
    assert phase.shape == amp.shape == (2, 9, 16)
    assert m.get_tokens(-1).shape == (3, 5, 16) and m.get_tokens2(1).shape == (5, 16)
    assert m.transform.in_features == 16 and m.queries().shape == (5, 8)
    want = m.merge(
        torch.stack(
            [m.transform(m.get_tokens(-1)).amax(0), m.transform(m.get_tokens(-1)).mean(0),
             m.transform(m.get_tokens(-1))[-1]], dim=-1,
        ).flatten(-2)
    )  # fmt: skip
    torch.testing.assert_close(m.queries(), want)


def test_per_image_equals_faithful_at_batch_one():
    a, b = module(mode="faithful"), module(mode="per_image")
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 10, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for t in (a, b):
            t.scale.fill_(1.0)
        torch.testing.assert_close(a(x, 0), b(x, 0), rtol=1e-5, atol=1e-6)


def test_faithful_depends_on_the_batch_and_per_image_does_not():
    """An image's output alone (batch 1) and next to another image (batch 2), on the model."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 64, 64, generator=g)
    faithful = perturb_trainable(build("faithful"), std=0.2)
    per_image = build("per_image")
    per_image.load_state_dict(faithful.state_dict())
    for model in (faithful, per_image):
        with torch.no_grad():
            model.backbone.reins.scale.fill_(1.0)
    alone, paired = seg(faithful, x[:1]), seg(faithful, x)[:1]
    assert (alone - paired).abs().max() > 1e-3
    torch.testing.assert_close(seg(per_image, x[:1]), alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(seg(per_image, x)[:1], alone, rtol=1e-4, atol=1e-5)


def test_zero_mlp_delta_f_starts_as_the_identity_with_scale_one():
    m = module(zero_mlp_delta_f=True)
    assert "scale" not in dict(m.named_parameters())
    x = torch.randn(2, 10, 16)
    with torch.no_grad():
        torch.testing.assert_close(m(x, 0), x)


@pytest.mark.parametrize("mode", ["faithful", "per_image"])
def test_bf16_features_run_the_fft_in_float32(mode):
    m = module(mode=mode)
    with torch.no_grad():
        m.scale.fill_(1.0)
    x = torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = m(x, 0)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # model.precision: bf16
            mixed = m(x.bfloat16(), 0)
        whole = m.to(torch.bfloat16)(x.bfloat16(), 0)  # every weight in bf16
    for got in (mixed, whole):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)


# -- counts, names and init ---------------------------------------------------------------------
def test_parameter_counts_and_names_follow_the_formulas():
    model = build()
    reins = model.backbone.reins
    names = [n for n, _ in reins.named_parameters()]
    assert names == [
        "scale", "learnable_tokens2", "learnable_tokens_a", "learnable_tokens_b",
        "mlp_token2feat.weight", "mlp_token2feat.bias", "mlp_delta_f.weight", "mlp_delta_f.bias",
        "mlp_token2feat2.weight", "mlp_token2feat2.bias", "mlp_delta_f2.weight",
        "mlp_delta_f2.bias", "transform.weight", "transform.bias", "merge.weight", "merge.bias",
    ]  # fmt: skip
    want = 1 + L * M * C + L * M * R + L * R * C + 4 * (C * C + C) + (C * Q + Q) + (3 * Q * Q + Q)
    assert model.parameter_groups()["set"] == (want, want)
    full = build(lora_dim=None).backbone.reins
    assert sum(p.numel() for p in full.parameters()) == want - L * M * R - L * R * C + L * M * C
    assert {"learnable_tokens", "learnable_tokens2"} <= dict(full.named_parameters()).keys()


def test_init_bounds_are_reins_at_the_full_width():
    m = module(channels=1024, layers=1, tokens=100, lora=16)
    lora_bound, full_bound = m._token_bounds()
    assert math.isclose(lora_bound, math.sqrt(6 / (768 + math.sqrt(1024 * 16))))  # 0.081832
    assert math.isclose(full_bound, math.sqrt(6 / (768 + 1024)))  # 0.057864
    assert m.learnable_tokens_a.abs().max() <= lora_bound
    assert m.learnable_tokens_b.abs().max() <= lora_bound
    assert 0.05 < m.learnable_tokens2.abs().max() <= full_bound
    assert m.scale.item() == pytest.approx(1e-3)
    w = m.mlp_delta_f2.weight  # kaiming_uniform(a=sqrt 5): U(+-1/sqrt(fan_in))
    assert 0.9 / 32 < w.abs().max() <= 1 / 32


# -- training -----------------------------------------------------------------------------------
def _spec_group(model, name: str) -> tuple[float, float]:
    """(lr, wd) by the spec (section 8): lr 1e-4; wd 0 for learnable_tokens*, reins.scale,
    norms, query_embed and level_embed, else 0.05."""
    owner = model.get_submodule(name.rsplit(".", 1)[0])
    keys = ("learnable_tokens", "norm", "query_embed", "level_embed")
    if name == "backbone.reins.scale" or any(k in name for k in keys):
        return 1e-4, 0.0
    if isinstance(owner, nn.GroupNorm | nn.LayerNorm):
        return 1e-4, 0.0
    return 1e-4, 0.05


@pytest.mark.parametrize("mode", ["faithful", "per_image"])
def test_optimizer_groups_and_a_few_steps_move_only_trainable_weights(mode):
    model = build(mode)
    opt = build_optimizer(model, load_config(CONFIG).optim)
    seen = assert_groups_match(model, opt, _spec_group)
    assert {n for n in seen if n.startswith("backbone.")} == {
        "backbone.reins." + k for k, _ in model.backbone.reins.named_parameters()
    }
    wd = {n: g["weight_decay"] for g in opt.param_groups for n in g["names"]}
    assert wd["backbone.reins.learnable_tokens2"] == 0.0
    assert wd["backbone.reins.mlp_delta_f2.weight"] == 0.05
    model.train()
    assert not model.backbone.vit.training and model.backbone.reins.training
    train_steps_move_only_trainable(model, lambda k: k.startswith("backbone.reins."))


# -- options ------------------------------------------------------------------------------------
def test_options_and_backbones_that_do_not_fit_are_refused():
    assert build_method("set").options.fft_mode == "faithful"
    with pytest.raises(ValueError, match="option 'fft_mode' must be one of faithful, per_image"):
        build_method("set", {"fft_mode": "fixed"})
    cfg = tiny_model_config("set")
    cfg.rein.share_mlps = False
    with pytest.raises(ValueError, match="set model.rein.share_mlps: true"):
        build_segmentor(cfg)


def test_a_faithful_checkpoint_fits_a_per_image_config():
    saved = {"config": {"model": {"tuning": "set", "tuning_options": {"fft_mode": "faithful"}}}}
    cfg = tiny_model_config("set")
    cfg.tuning_options = {"fft_mode": "per_image"}
    check_checkpoint_method(saved, cfg, "ckpt")  # same tensors: no error


# -- DINOv2-L on the meta device ----------------------------------------------------------------
@pytest.fixture(scope="module")
def large_on_meta():
    return build_on_meta(CONFIG)


def test_params_cli_prints_the_dinov2_large_counts(capsys):
    rows = params_rows(capsys, CONFIG)
    assert rows["tuning"] == "set"
    assert rows["set"] == ["7,546,881", "7,546,881"]
    assert rows["backbone"] == ["304,199,680", "0"]
    assert rows["head"] == ["20,579,796", "20,579,796"]
    assert rows["total"] == ["332,326,357", "28,126,677"]


def test_dinov2_large_official_layout(large_on_meta):
    _, m = large_on_meta
    keys = {k: tuple(v.shape) for k, v in m.method.official_export(m).items()}
    reins = {k[len("backbone.reins.") :]: v for k, v in keys.items() if k.startswith("backbone.")}
    want = {
        "scale": (),
        "learnable_tokens2": (24, 100, 1024),
        "learnable_tokens_a": (24, 100, 16),
        "learnable_tokens_b": (24, 16, 1024),
        **{
            f"{mlp}.{p}": (1024, 1024) if p == "weight" else (1024,)
            for mlp in ("mlp_token2feat", "mlp_delta_f", "mlp_token2feat2", "mlp_delta_f2")
            for p in ("weight", "bias")
        },
        "transform.weight": (256, 1024),
        "transform.bias": (256,),
        "merge.weight": (256, 768),
        "merge.bias": (256,),
    }
    assert list(reins) == list(want) and reins == want  # the official state_dict order
    assert sum(k.startswith("decode_head.") for k in keys) == 292 and len(keys) == 308
    assert official_method(keys) == "set"


# -- official checkpoints -----------------------------------------------------------------------
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))


def test_official_round_trip_is_exact(tmp_path):
    state = official_round_trip(perturb_trainable(build()), build(seed=5), tmp_path, X)
    assert sum(k.startswith("backbone.reins.") for k in state) == 16
    assert official_method(state) == "set"


def test_rein_fada_and_set_files_are_told_apart_and_refused_across(tmp_path):
    paths = {name: tmp_path / f"{name}.pth" for name in ("rein", "fada", "set")}
    for name, path in paths.items():
        torch.manual_seed(0)
        export_official(build_segmentor(tiny_model_config(name)), path)
        assert official_method(torch.load(path, weights_only=True)["state_dict"]) == name
    full_rank = tmp_path / "full.pth"
    export_official(build(lora_dim=None), full_rank)
    assert official_method(torch.load(full_rank, weights_only=True)["state_dict"]) == "set"
    for other in ("rein", "fada"):
        with pytest.raises(InteropError, match=rf"is a {other} checkpoint but the config has model.tuning: set"):  # fmt: skip
            load_official(build(), paths[other])
        with pytest.raises(InteropError, match=rf"is a set checkpoint but the config has model.tuning: {other}"):  # fmt: skip
            load_official(build_segmentor(tiny_model_config(other)), paths["set"])
    with pytest.raises(InteropError, match="learnable_tokens_a"):
        load_official(build(), full_rank)


def test_cli_convert_and_back_reproduces_the_official_file(tmp_path):
    src = tmp_path / "set.pth"
    export_official(perturb_trainable(build()), src)
    cfg = tiny_model_config("set")
    cfg.tuning_options = {"fft_mode": "per_image"}  # the same tensors as faithful
    convert_and_back(tmp_path, cfg, src)
