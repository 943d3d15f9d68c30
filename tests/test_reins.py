import pytest
import torch

from rein.reins import LoRAReins, Reins


def count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_lora_reins_dinov2_large_parameter_count():
    m = LoRAReins(num_layers=24, embed_dims=1024, patch_size=16, token_length=100, lora_dim=16)
    assert count(m) == 2_990_081


@pytest.mark.parametrize(
    ("cls", "kwargs", "expected"),
    [
        # Rein-core: per-layer tokens and per-layer MLPs, no link.
        (
            Reins,
            dict(share_mlps=False, link_token_to_query=False),
            24 * (100 * 1024 + 2 * 1049600) + 1,
        ),
        # + share: one pair of MLPs for all layers.
        (Reins, dict(link_token_to_query=False), 24 * 100 * 1024 + 2 * 1049600 + 1),
        # + LoRA: tokens A (100x16) @ B (16x1024) per layer.
        (LoRAReins, dict(link_token_to_query=False), 24 * (1600 + 16384) + 2 * 1049600 + 1),
        # + link: transform (1024->256) and merge (768->256).
        (LoRAReins, dict(), 24 * (1600 + 16384) + 2 * 1049600 + 1 + 262400 + 196864),
    ],
)
def test_ablation_switches_change_parameter_count(cls, kwargs, expected):
    m = cls(num_layers=24, embed_dims=1024, patch_size=16, **kwargs)
    assert count(m) == expected


def test_switch_ordering_matches_paper_story():
    core = count(Reins(24, 1024, 16, share_mlps=False, link_token_to_query=False))
    share = count(Reins(24, 1024, 16, link_token_to_query=False))
    lora = count(LoRAReins(24, 1024, 16, link_token_to_query=False))
    link = count(LoRAReins(24, 1024, 16))
    assert core > share > lora and link > lora  # link adds a little, share/LoRA remove a lot


def _reference_delta(m: Reins, feats: torch.Tensor, layer: int) -> torch.Tensor:
    tokens = m.get_tokens(layer)
    attn = torch.softmax(torch.einsum("bnc,mc->bnm", feats, tokens) / m.embed_dims**0.5, dim=-1)
    delta = torch.einsum("bnm,mc->bnc", attn[:, :, 1:], m.mlp_token2feat(tokens[1:]))
    return m.mlp_delta_f(delta + feats)


def test_forward_matches_formula_and_keeps_prefix_tokens():
    torch.manual_seed(0)
    m = LoRAReins(
        num_layers=3, embed_dims=16, patch_size=4, token_length=6, lora_dim=4, query_dims=8
    )
    with torch.no_grad():
        m.scale.fill_(0.5)
    x = torch.randn(2, 1 + 9, 16)
    out = m(x, layer=1, num_prefix_tokens=1)
    assert torch.equal(out[:, :1], x[:, :1])
    expected = x[:, 1:] + 0.5 * _reference_delta(m, x[:, 1:], 1)
    torch.testing.assert_close(out[:, 1:], expected, rtol=1e-5, atol=1e-6)
    out_reg = m(torch.randn(2, 5 + 9, 16), layer=0, num_prefix_tokens=5)
    assert out_reg.shape == (2, 14, 16)


def test_first_token_is_a_sink():
    """Token 0 enters the softmax normaliser but never the value path."""
    torch.manual_seed(0)
    m = Reins(num_layers=1, embed_dims=8, patch_size=2, token_length=4, query_dims=8)
    x = torch.randn(1, 5, 8)
    base = m.delta_feat(x, 0)
    tokens = m.learnable_tokens[0].detach()
    # Without the sink (softmax over tokens 1.. only) the result would differ.
    no_sink = torch.softmax(x @ tokens[1:].t() / 8**0.5, dim=-1) @ m.mlp_token2feat(tokens[1:])
    assert not torch.allclose(base, m.mlp_delta_f(no_sink + x))
    # Changing token 0 changes the normaliser, hence the output.
    with torch.no_grad():
        m.learnable_tokens[0, 0] = torch.randn(8) * 3
    assert not torch.allclose(base, m.delta_feat(x, 0))
    torch.testing.assert_close(m.delta_feat(x, 0), _reference_delta(m, x, 0))


def test_token0_value_is_never_read():
    torch.manual_seed(1)
    m = Reins(num_layers=1, embed_dims=8, patch_size=2, token_length=4, query_dims=8)
    x = torch.randn(2, 6, 8)
    tokens = m.learnable_tokens[0].detach()
    attn = torch.softmax(x @ tokens.t() / 8**0.5, dim=-1)
    # Same attention, different token-0 value: replace mlp_token2feat output for row 0 only.
    values = m.mlp_token2feat(tokens)
    values_alt = values.clone()
    values_alt[0] += 100.0
    d1 = attn[..., 1:] @ values[1:]
    d2 = attn[..., 1:] @ values_alt[1:]
    torch.testing.assert_close(d1, d2)
    torch.testing.assert_close(m.mlp_delta_f(d1 + x), m.delta_feat(x, 0))


def test_link_queries_are_interleaved_per_channel():
    torch.manual_seed(0)
    m = Reins(num_layers=3, embed_dims=8, patch_size=2, token_length=5, query_dims=4)
    t = m.transform(m.learnable_tokens)  # (L, m, Q)
    mx, mean, last = t.max(0).values, t.mean(0), t[-1]
    interleaved = torch.stack([mx, mean, last], dim=-1).reshape(5, 12)
    assert torch.equal(interleaved[:, :3], torch.stack([mx[:, 0], mean[:, 0], last[:, 0]], -1))
    torch.testing.assert_close(m.queries(), m.merge(interleaved))
    blocks = torch.cat([mx, mean, last], dim=-1)  # the wrong (block) order differs
    assert not torch.allclose(m.merge(blocks), m.queries())
    assert m.queries().shape == (5, 4)


def test_no_link_means_no_queries():
    m = Reins(2, 8, 2, token_length=3, link_token_to_query=False)
    with pytest.raises(RuntimeError, match="link_token_to_query"):
        m.queries()


def test_initialisation_bounds_and_scale():
    m = Reins(4, 64, 16, token_length=10)
    bound = (6.0 / (3 * 16 * 16 + 64)) ** 0.5
    assert m.learnable_tokens.abs().max() <= bound
    assert m.scale.item() == pytest.approx(1e-3)
    lm = LoRAReins(4, 64, 16, token_length=10, lora_dim=4)
    lb = (6.0 / (3 * 16 * 16 + (64 * 4) ** 0.5)) ** 0.5
    assert lm.learnable_tokens_a.abs().max() <= lb and lm.learnable_tokens_b.abs().max() <= lb
    z = Reins(2, 8, 2, token_length=3, zero_mlp_delta_f=True)
    assert float(z.scale) == 1.0 and "scale" not in dict(z.named_parameters())
    assert torch.count_nonzero(z.mlp_delta_f.weight) == 0


def test_unshared_mlps_are_per_layer():
    m = Reins(3, 8, 2, token_length=4, share_mlps=False)
    x = torch.randn(1, 5, 8)
    assert len(m.mlp_token2feat) == 3
    assert not torch.allclose(m(x, 0), m(x, 1))


def test_wrong_width_is_a_clear_error():
    m = Reins(2, 8, 2, token_length=3)
    with pytest.raises(ValueError, match="embed_dims=8"):
        m(torch.randn(1, 4, 16), 0)
