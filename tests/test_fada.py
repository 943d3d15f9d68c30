"""FADA (``model.tuning: fada``): the band split, the two branches, training, counts, checkpoints.

Spec: ../shared/docs/methods/fada.md. The references below are written from the spec's formulas
(section 6's element positions, section 4's per-branch steps), not from the module's code.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from conftest import (
    build_on_meta,
    convert_and_back,
    official_round_trip,
    params_rows,
    perturb_trainable,
    seg,
    tiny_model_config,
)
from torch.nn import functional as F

from rein.config import load_config
from rein.engine.optim import build_optimizer
from rein.interop import InteropError, export_official, load_official, official_method
from rein.methods import build_method
from rein.methods.fada import FADAReins, haar_kernels
from rein.segmentor import build_segmentor

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fada_dinov2-l_mask2former_gta_512.yaml"
KEYS_TXT = Path(__file__).resolve().parent / "data" / "official_state_dict_keys.txt"


def module(channels=32, mode="faithful", k=4, lora=4, layers=2, tokens=6, seed=0, **kw):
    torch.manual_seed(seed)
    return FADAReins(
        num_layers=layers,
        embed_dims=channels,
        patch_size=16,
        query_dims=16,
        token_length=tokens,
        lora_dim=lora,
        wavelet_mode=mode,
        channel_grid_width=k,
        **kw,
    )


def fixed_twin(faithful: FADAReins, k: int) -> FADAReins:
    """A ``fixed`` module with the same weights (and no filters)."""
    twin = module(faithful.embed_dims, "fixed", k, faithful.lora_dim, faithful.num_layers,
                  faithful.token_length)  # fmt: skip
    state = {k: v for k, v in faithful.state_dict().items() if "wavepool" not in k}
    twin.load_state_dict(state, strict=True)
    return twin


def randomise_filters(m: FADAReins, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for band in ("LL", "LH", "HL", "HH"):
            w = getattr(m.wavepool, band).weight
            w.copy_(torch.randn(w.shape, generator=g))


def build(mode: str = "faithful", seed: int = 0, **cfg_kw):
    cfg = tiny_model_config("fada")
    cfg.tuning_options = {"wavelet_mode": mode, "channel_grid_width": 4}
    for key, value in cfg_kw.items():
        setattr(cfg.rein, key, value)
    torch.manual_seed(seed)
    return build_segmentor(cfg)


# -- the band split -----------------------------------------------------------------------------
def official_split_by_positions(f: torch.Tensor, filters: torch.Tensor):
    """Spec section 6, element by element: ``f`` (N, B, C) seq-first, ``filters`` (4, C, 2, 2).
    Returns f_L (N, B, C/4) and f_H (N, B, 3C/4)."""
    n_tok, batch, channels = f.shape
    side = math.isqrt(n_tok)
    half = side // 2
    flat = f.reshape(-1)  # the seq-first buffer: p = (n * B + b) * C + k

    def x(img, q, row, col):  # the buffer read as (B, C, h, w)
        return flat[((img * channels + q) * side + row) * side + col]

    c = channels // 4
    bands = torch.zeros(4, batch * channels * half * half)
    for band in range(4):
        for pos in range(bands.shape[1]):
            img, rest = divmod(pos, channels * half * half)
            q, rest = divmod(rest, half * half)
            i, j = divmod(rest, half)
            bands[band, pos] = sum(
                filters[band, q, r, s] * x(img, q, 2 * i + r, 2 * j + s)
                for r in range(2)
                for s in range(2)
            )
    low = bands[0].reshape(n_tok, batch, c)  # the LL buffer read as (N, B, c)
    rows = [bands[b].reshape(n_tok * batch, c) for b in (1, 2, 3)]  # row rho = n * B + b
    high = torch.cat(rows, dim=-1).reshape(n_tok, batch, 3 * c)
    return low, high


def test_haar_kernels_are_the_specs_plus_minus_half():
    want = 0.5 * torch.tensor(
        [[[1, 1], [1, 1]], [[-1, 1], [-1, 1]], [[-1, -1], [1, 1]], [[1, -1], [-1, 1]]],
        dtype=torch.float32,
    )
    assert torch.equal(haar_kernels(), want)


def test_fixed_split_is_the_haar_split_of_each_tokens_channel_grid_by_hand():
    # one token of 8 channels as a 2 x 4 grid: [[a, b, a', b'], [c, d, c', d']]
    m = module(channels=8, mode="fixed", k=4)
    f = torch.tensor([[[1.0, 2.0, 5.0, 7.0, 3.0, 11.0, -2.0, 4.0]]])  # (B=1, N=1, C=8)
    low, high = m.split(f)
    a, b, c, d = 1.0, 2.0, 3.0, 11.0
    a2, b2, c2, d2 = 5.0, 7.0, -2.0, 4.0
    assert low.tolist() == [[[(a + b + c + d) / 2, (a2 + b2 + c2 + d2) / 2]]]
    assert high.tolist() == [
        [
            [
                (b - a + d - c) / 2,  # LH
                (b2 - a2 + d2 - c2) / 2,
                (c + d - a - b) / 2,  # HL
                (c2 + d2 - a2 - b2) / 2,
                (a - b - c + d) / 2,  # HH
                (a2 - b2 - c2 + d2) / 2,
            ]
        ]
    ]


@pytest.mark.parametrize(("channels", "n_tok", "batch"), [(16, 16, 2), (8, 16, 3), (12, 36, 1)])
def test_faithful_split_reads_the_seq_first_buffer_with_per_channel_filters(channels, n_tok, batch):
    # includes layouts whose 2x2 blocks straddle tokens and images (C not a multiple of 2w)
    m = module(channels=channels)
    randomise_filters(m)
    f = torch.randn(batch, n_tok, channels, generator=torch.Generator().manual_seed(0))
    low, high = m.split(f)
    filters = torch.stack([getattr(m.wavepool, b).weight[:, 0] for b in ("LL", "LH", "HL", "HH")])
    want_low, want_high = official_split_by_positions(f.transpose(0, 1), filters.detach())
    torch.testing.assert_close(low, want_low.transpose(0, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(high, want_high.transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_fixed_equals_faithful_at_init_on_a_32x32_grid():
    faithful = module(channels=1024, layers=1, tokens=4, lora=4)
    fixed = fixed_twin(faithful, k=32)
    f = torch.randn(2, 1 + 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for a, b in zip(faithful.split(f[:, 1:]), fixed.split(f[:, 1:])):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        torch.testing.assert_close(faithful(f, 0), fixed(f, 0), rtol=0, atol=1e-5)


def test_faithful_depends_on_the_batch_once_filters_differ_per_channel_fixed_does_not():
    faithful = module(channels=16)
    with torch.no_grad():
        faithful.scale.fill_(1.0)  # the refinement at full strength
    fixed = fixed_twin(faithful, k=4)
    f = torch.randn(2, 1 + 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # pristine Haar: the same filter on every channel, nothing depends on the batch
        torch.testing.assert_close(faithful(f[:1], 0), faithful(f, 0)[:1], rtol=0, atol=1e-6)
        randomise_filters(faithful)
        alone, in_batch = faithful(f[:1], 0), faithful(f, 0)[:1]
        assert (alone - in_batch).abs().max() > 1e-3
        slot = faithful(f.flip(0), 0)[1:]  # the same image in slot 1
        assert (alone - slot).abs().max() > 1e-3
        torch.testing.assert_close(fixed(f[:1], 0), fixed(f, 0)[:1], rtol=0, atol=1e-6)
        torch.testing.assert_close(fixed(f.flip(0), 0)[1:], fixed(f, 0)[:1], rtol=0, atol=1e-6)


# -- the branches -------------------------------------------------------------------------------
def test_one_layer_follows_the_specs_steps():
    """Section 4 written out: temperature C**-0.5 of the full width in both branches, instance
    norm (F.instance_norm on the seq-first (N, B, m) similarities) before the softmax, token 0
    dropped after it, deltas concatenated and added with the shared scale, cls untouched."""
    m = module(channels=16, layers=2, tokens=5)
    with torch.no_grad():
        m.scale.fill_(0.7)
    x = torch.randn(2, 1 + 16, 16, generator=torch.Generator().manual_seed(0))
    layer = 1
    with torch.no_grad():
        out = m(x, layer)
        f_l, f_h = m.split(x[:, 1:])  # checked against the spec above
        t_l = m.learnable_tokens_a[layer] @ m.learnable_tokens_b[layer]
        t_h = m.learnable_tokens_a2[layer] @ m.learnable_tokens_b2[layer]
        p_l = torch.softmax((f_l @ t_l.T) / math.sqrt(16), dim=-1)
        d_l = m.mlp_delta_f(p_l[..., 1:] @ m.mlp_token2feat(t_l[1:]) + f_l)
        s_h = (f_h @ t_h.T).transpose(0, 1)  # (N, B, m): N as the batch, B as the channels
        s_h = F.instance_norm(s_h).transpose(0, 1)
        p_h = torch.softmax(s_h / math.sqrt(16), dim=-1)
        d_h = m.mlp_delta_f2(p_h[..., 1:] @ m.mlp_token2feat2(t_h[1:]) + f_h)
        want = x[:, 1:] + 0.7 * torch.cat([d_l, d_h], dim=-1)
    assert d_l.shape == (2, 16, 4) and d_h.shape == (2, 16, 12)
    assert torch.equal(out[:, :1], x[:, :1])
    torch.testing.assert_close(out[:, 1:], want, rtol=1e-5, atol=1e-6)
    # the branch width's temperature or an instance norm after the softmax give other values
    with torch.no_grad():
        wrong_t = torch.softmax((f_l @ t_l.T) / math.sqrt(4), dim=-1)
        assert not torch.allclose(wrong_t, p_l, atol=1e-4)
        late = F.instance_norm(torch.softmax((f_h @ t_h.T) / 4, dim=-1).transpose(0, 1))
        assert not torch.allclose(late.transpose(0, 1), p_h, atol=1e-3)


def test_init_bounds_and_shapes_follow_section_9():
    m = module(channels=1024, layers=1, tokens=100, lora=16)
    low, high = m._token_bounds()
    assert math.isclose(low, math.sqrt(6 / 896)) and math.isclose(low, 0.081832, abs_tol=1e-6)
    assert math.isclose(high, 0.082626, abs_tol=1e-6)
    assert m.learnable_tokens_a.abs().max() <= low and m.learnable_tokens_b2.abs().max() <= high
    assert m.learnable_tokens_b2.abs().max() > low  # drawn from the wider high-band bound
    full = module(channels=1024, layers=1, tokens=100, lora=None)
    assert [round(b, 6) for b in full._token_bounds()] == [0.076547, 0.0625]
    assert tuple(full.learnable_tokens.shape) == (1, 100, 256)
    assert tuple(full.learnable_tokens2.shape) == (1, 100, 768)
    assert m.scale.item() == pytest.approx(1e-3)


def test_zero_mlp_delta_f_starts_as_the_identity_with_scale_one():
    m = module(channels=16, zero_mlp_delta_f=True)
    assert "scale" not in dict(m.named_parameters())
    x = torch.randn(1, 17, 16)
    with torch.no_grad():
        torch.testing.assert_close(m(x, 0), x)


# -- the model ----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["faithful", "fixed"])
def test_forward_shapes_queries_and_what_trains(mode):
    model = build(mode)
    reins = model.backbone.reins
    assert isinstance(reins, FADAReins) and reins.wavelet_mode == mode
    assert reins.queries().shape == (8, 32)  # from the low-band tokens (L, m, C/4)
    assert reins.transform.in_features == 8
    x = torch.randn(2, 3, 64, 64)
    cls_preds, mask_preds = model(x)
    assert cls_preds[-1].shape == (2, 8, 20) and mask_preds[-1].shape == (2, 8, 16, 16)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("backbone.")} == {
        "backbone.reins." + k for k, _ in reins.named_parameters()
    }
    assert all(n.startswith(("backbone.reins.", "decode_head.")) for n in trainable)
    filters = {n for n in trainable if "wavepool" in n}
    assert len(filters) == (4 if mode == "faithful" else 0)
    # decay: 0 for the four token factors and scale, 0.05 for the MLPs, filters, transform
    groups = model.method.param_groups(model, load_config(CONFIG).optim)
    wd = {n: g["weight_decay"] for g in groups for n in g["names"]}
    r = "backbone.reins."
    for name in ("learnable_tokens_a", "learnable_tokens_b2", "scale"):
        assert wd[r + name] == 0.0
    for name in ("mlp_token2feat2.weight", "transform.weight", "merge.bias"):
        assert wd[r + name] == 0.05
    if mode == "faithful":
        assert wd[r + "wavepool.HH.weight"] == 0.05


def test_frozen_weights_get_no_grad_and_a_few_steps_lower_the_loss():
    model = build("faithful")
    opt = build_optimizer(model, load_config(CONFIG).optim)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, 64, generator=g)
    y = torch.randint(0, 19, (2, 64, 64), generator=g)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    assert not model.backbone.vit.training and model.backbone.reins.training
    losses = []
    for step in range(6):
        opt.zero_grad(set_to_none=True)
        loss = model.loss(x, y, generator=torch.Generator().manual_seed(step))["loss"]
        loss.backward()
        if step == 0:
            for n, p in model.named_parameters():
                assert (p.grad is not None) == p.requires_grad, n
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == p.requires_grad, n
    filters = model.backbone.reins.wavepool.LL.weight
    assert not torch.equal(filters[0], filters[1])  # trained per channel, as the official code


def test_faithful_refuses_odd_or_non_square_grids_and_fixed_runs_them():
    model = build("faithful").eval()
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"got a grid 4x2; set .*wavelet_mode: fixed, or use"):
            model(torch.randn(1, 3, 64, 32))
        with pytest.raises(ValueError, match=r"grid 5x5.*slide inference") as err:
            model(torch.randn(1, 3, 80, 80))
    assert "\n" not in str(err.value)
    fixed = build("fixed").eval()
    with torch.no_grad():
        assert fixed.seg_scores(torch.randn(1, 3, 64, 32)).shape == (1, 19, 64, 32)
        assert fixed.seg_scores(torch.randn(1, 3, 80, 80)).shape == (1, 19, 80, 80)


def test_fixed_equals_faithful_at_init_on_the_tiny_model():
    a, b = build("faithful"), build("fixed")
    state = {k: v for k, v in a.state_dict().items() if "wavepool" not in k}
    b.load_state_dict(state, strict=False)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(seg(a, x), seg(b, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("width", "mode"), [(48, "faithful"), (64, "fixed"), (384, "fixed")])
def test_other_vit_widths(width, mode):
    m = module(channels=width, mode=mode, k=4 if width < 384 else 32)
    x = torch.randn(2, 1 + 16, width)
    assert m(x, 0).shape == x.shape
    assert (m.low_dims, m.high_dims) == (width // 4, 3 * width // 4)


def test_widths_and_options_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="divisible by 4"):
        module(channels=30)
    with pytest.raises(ValueError, match=r"multiple of 64; set model.tuning_options"):
        module(channels=96, mode="fixed", k=32)
    with pytest.raises(ValueError, match="option 'wavelet_mode' must be one of faithful, fixed"):
        build_method("fada", {"wavelet_mode": "spatial"})
    with pytest.raises(ValueError, match="option 'channel_grid_width' must be even"):
        build_method("fada", {"channel_grid_width": 5})
    assert build_method("fada").options.wavelet_mode == "faithful"


# -- DINOv2-L counts on the meta device ---------------------------------------------------------
@pytest.fixture(scope="module")
def large_on_meta():
    return build_on_meta(CONFIG)


def test_dinov2_large_counts_on_meta(large_on_meta):
    _, m = large_on_meta
    groups = m.parameter_groups()
    assert groups["fada"] == (2_061_825, 2_061_825)
    assert groups["backbone"] == (304_199_680, 0)
    assert groups["head"] == (20_579_796, 20_579_796)
    total = sum(t for t, _ in groups.values())
    trainable = sum(t for _, t in groups.values())
    assert (total, trainable) == (326_841_301, 22_641_621)


def test_dinov2_large_fixed_trains_the_filters_fewer():
    cfg = load_config(CONFIG)
    cfg.model.tuning_options = {"wavelet_mode": "fixed"}
    with torch.device("meta"):
        m = build_segmentor(cfg.model, load_weights=False, with_criterion=False)
    assert m.parameter_groups()["fada"] == (2_045_441, 2_045_441)


def test_params_cli_reports_fada(capsys):
    rows = params_rows(capsys, CONFIG)
    assert rows["tuning"] == "fada"
    assert rows["fada"] == ["2,061,825", "2,061,825"]
    assert rows["total"] == ["326,841,301", "22,641,621"]


def _rein_saved_head_layout() -> dict[str, tuple[int, ...]]:
    lines = KEYS_TXT.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# ") and "SAVED" in line)
    out = {}
    for line in lines[start + 1 :]:
        if not line.strip() or line.startswith("#"):
            break
        key, shape, *_ = line.split("\t")
        if key.startswith("decode_head."):
            out[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


def test_dinov2_large_official_layout_has_313_keys(large_on_meta):
    _, m = large_on_meta
    keys = {k: tuple(v.shape) for k, v in m.method.official_export(m).items()}
    assert len(keys) == 313
    reins = {k[len("backbone.reins.") :]: v for k, v in keys.items() if k.startswith("backbone.")}
    want = {
        "scale": (),
        "learnable_tokens_a": (24, 100, 16),
        "learnable_tokens_b": (24, 16, 256),
        "learnable_tokens_a2": (24, 100, 16),
        "learnable_tokens_b2": (24, 16, 768),
        "mlp_token2feat.weight": (256, 256),
        "mlp_token2feat.bias": (256,),
        "mlp_delta_f.weight": (256, 256),
        "mlp_delta_f.bias": (256,),
        "mlp_token2feat2.weight": (768, 768),
        "mlp_token2feat2.bias": (768,),
        "mlp_delta_f2.weight": (768, 768),
        "mlp_delta_f2.bias": (768,),
        **{f"wavepool.{b}.weight": (1024, 1, 2, 2) for b in ("LL", "LH", "HL", "HH")},
        "transform.weight": (256, 256),
        "transform.bias": (256,),
        "merge.weight": (256, 768),
        "merge.bias": (256,),
    }
    assert list(reins) == list(want) and reins == want  # the official state_dict order
    head = {k: v for k, v in keys.items() if k.startswith("decode_head.")}
    assert head == _rein_saved_head_layout() and len(head) == 292
    assert official_method(keys) == "fada"


# -- official checkpoints -----------------------------------------------------------------------
X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(7))


def test_official_round_trip_is_exact(tmp_path):
    a, b = perturb_trainable(build("faithful")), build("faithful", seed=5)
    state = official_round_trip(a, b, tmp_path, X)
    assert sum(k.startswith("backbone.reins.") for k in state) == 21
    assert official_method(state) == "fada"


def test_fixed_mode_exports_the_haar_bank_and_warns_when_it_drops_trained_filters(tmp_path):
    fixed = perturb_trainable(build("fixed"))
    path = tmp_path / "fixed.pth"
    export_official(fixed, path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert torch.equal(state["backbone.reins.wavepool.HL.weight"][5, 0], haar_kernels()[2])
    faithful = build("faithful", seed=3)
    load_official(faithful, path)  # pristine Haar: the faithful model computes the same
    torch.testing.assert_close(seg(faithful, X), seg(fixed, X), rtol=1e-5, atol=1e-6)
    other = build("fixed", seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_official(other, path)  # Haar filters: nothing is lost, no warning
    trained = tmp_path / "trained.pth"
    export_official(perturb_trainable(build("faithful")), trained)
    with pytest.warns(UserWarning, match="4 trained filter tensors"):
        load_official(build("fixed"), trained)


def test_rein_and_fada_files_are_told_apart_and_refused_across(tmp_path):
    rein_path, fada_path = tmp_path / "rein.pth", tmp_path / "fada.pth"
    torch.manual_seed(0)
    export_official(build_segmentor(tiny_model_config("rein")), rein_path)
    export_official(build("faithful"), fada_path)
    rein_keys = torch.load(rein_path, weights_only=True)["state_dict"]
    assert official_method(rein_keys) == "rein"
    assert official_method(torch.load(fada_path, weights_only=True)["state_dict"]) == "fada"
    with pytest.raises(InteropError, match=r"is a rein checkpoint but the config has model.tuning: fada"):  # fmt: skip
        load_official(build("faithful"), rein_path)
    with pytest.raises(InteropError, match=r"is a fada checkpoint but the config has model.tuning: rein"):  # fmt: skip
        load_official(build_segmentor(tiny_model_config("rein")), fada_path)


def test_full_rank_fada_file_into_a_lora_config_names_the_keys(tmp_path):
    path = tmp_path / "full.pth"
    export_official(build("faithful", lora_dim=None), path)
    keys = torch.load(path, weights_only=True)["state_dict"]
    assert "backbone.reins.learnable_tokens2" in keys and official_method(keys) == "fada"
    with pytest.raises(InteropError, match="learnable_tokens_a"):
        load_official(build("faithful"), path)


def test_cli_convert_and_back_reproduces_the_official_file(tmp_path):
    src = tmp_path / "official.pth"
    export_official(perturb_trainable(build("faithful")), src)
    cfg = tiny_model_config("fada")
    cfg.tuning_options = {"wavelet_mode": "faithful", "channel_grid_width": 4}
    convert_and_back(tmp_path, cfg, src)
