"""Rein / LoRA-Rein: forward, tokens, link queries and parameter counts.

Every reference below is written out with plain torch ops from the module's raw parameters
(``learnable_tokens*``, the ``weight`` / ``bias`` of each Linear), never by calling the
method under test.
"""

import pytest
import torch

from rein.reins import LoRAReins, Reins


def count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def linear(x: torch.Tensor, lin: torch.nn.Linear) -> torch.Tensor:
    """``x W^T + b`` from a Linear's raw weights."""
    return x @ lin.weight.t() + lin.bias


def rein_reference(
    f: torch.Tensor,
    tokens: torch.Tensor,
    token2feat: torch.nn.Linear,
    delta_f: torch.nn.Linear,
    scale: float,
) -> torch.Tensor:
    """f' = f + s * mlp_delta_f(softmax(f T^T / sqrt(C))[..., 1:] @ mlp_token2feat(T[1:]) + f)."""
    c = f.shape[-1]
    attn = torch.softmax((f @ tokens.t()) * c**-0.5, dim=-1)  # over the m tokens
    values = linear(tokens[1:], token2feat)  # (m-1, C): the first token is a sink
    delta = linear(attn[..., 1:] @ values + f, delta_f)
    return f + scale * delta


def _perturb(m: Reins, seed: int) -> None:
    """Non-trivial weights: O(1) tokens (a peaked softmax), random biases, scale 0.5."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("learnable_tokens"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
        m.scale.fill_(0.5)


# ----------------------------------------------------------------------------- LoRA tokens


def test_lora_tokens_are_a_times_b_per_layer():
    m = LoRAReins(num_layers=3, embed_dims=8, patch_size=4, token_length=5, lora_dim=2)
    _perturb(m, 0)
    a, b = m.learnable_tokens_a.detach(), m.learnable_tokens_b.detach()
    explicit = [a[layer] @ b[layer] for layer in range(3)]
    # the layers really have distinct tokens, so a layer mix-up shows
    assert not torch.allclose(explicit[0], explicit[1], atol=1e-2)
    assert not torch.allclose(explicit[1], explicit[2], atol=1e-2)
    for layer in range(3):
        torch.testing.assert_close(m.get_tokens(layer), explicit[layer])
    torch.testing.assert_close(m.get_tokens(-1), torch.stack(explicit))


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_lora_rein_forward_matches_explicit_math(layer):
    torch.manual_seed(0)
    m = LoRAReins(
        num_layers=3, embed_dims=16, patch_size=4, token_length=6, lora_dim=4, query_dims=8
    )
    _perturb(m, 1)
    x = torch.randn(2, 1 + 9, 16)
    tokens = m.learnable_tokens_a[layer] @ m.learnable_tokens_b[layer]  # (m, C), by hand
    with torch.no_grad():
        out = m(x, layer=layer, num_prefix_tokens=1)
        expected = rein_reference(x[:, 1:], tokens, m.mlp_token2feat, m.mlp_delta_f, 0.5)
    assert torch.equal(out[:, :1], x[:, :1])  # the class token passes through
    torch.testing.assert_close(out[:, 1:], expected, rtol=1e-5, atol=1e-5)
    assert (out[:, 1:] - x[:, 1:]).abs().mean() > 0.1  # not a near no-op


def test_prefix_tokens_pass_through_untouched():
    m = Reins(num_layers=2, embed_dims=8, patch_size=2, token_length=4, query_dims=8)
    _perturb(m, 2)
    x = torch.randn(2, 5 + 7, 8)
    with torch.no_grad():
        out = m(x, layer=1, num_prefix_tokens=5)
        expected = rein_reference(
            x[:, 5:], m.learnable_tokens[1], m.mlp_token2feat, m.mlp_delta_f, 0.5
        )
    assert torch.equal(out[:, :5], x[:, :5])
    torch.testing.assert_close(out[:, 5:], expected, rtol=1e-5, atol=1e-5)


def test_first_token_is_a_sink():
    """Token 0 enters the softmax normaliser but never the value path."""
    m = Reins(num_layers=1, embed_dims=8, patch_size=2, token_length=4, query_dims=8)
    _perturb(m, 3)
    x = torch.randn(2, 6, 8)
    t = m.learnable_tokens[0].detach()
    with torch.no_grad():
        got = m.delta_feat(x, 0)
        sink = linear(
            torch.softmax(x @ t.t() / 8**0.5, -1)[..., 1:] @ linear(t[1:], m.mlp_token2feat) + x,
            m.mlp_delta_f,
        )
        # the two plausible misreadings: softmax over tokens 1.. only, or token 0's value used
        no_sink = linear(
            torch.softmax(x @ t[1:].t() / 8**0.5, -1) @ linear(t[1:], m.mlp_token2feat) + x,
            m.mlp_delta_f,
        )
        all_values = linear(
            torch.softmax(x @ t.t() / 8**0.5, -1) @ linear(t, m.mlp_token2feat) + x,
            m.mlp_delta_f,
        )
    torch.testing.assert_close(got, sink, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, no_sink, atol=1e-3)
    assert not torch.allclose(got, all_values, atol=1e-3)


# ------------------------------------------------------------------------- Rein-core MLPs


def test_unshared_mlps_are_used_per_layer():
    L = 3
    m = Reins(L, 8, 2, token_length=4, share_mlps=False, link_token_to_query=False)
    _perturb(m, 4)
    assert len(m.mlp_token2feat) == L and len(m.mlp_delta_f) == L
    x = torch.randn(2, 1 + 5, 8)
    with torch.no_grad():
        for layer in range(L):
            out = m(x, layer)
            expected = rein_reference(
                x[:, 1:],
                m.learnable_tokens[layer],
                m.mlp_token2feat[layer],
                m.mlp_delta_f[layer],
                0.5,
            )
            torch.testing.assert_close(out[:, 1:], expected, rtol=1e-5, atol=1e-5)
            # with the same tokens, layer 0's MLPs would give something else
            wrong = rein_reference(
                x[:, 1:], m.learnable_tokens[layer], m.mlp_token2feat[0], m.mlp_delta_f[0], 0.5
            )
            if layer:
                assert not torch.allclose(out[:, 1:], wrong, atol=1e-3)


# --------------------------------------------------------------------------- link queries


@pytest.mark.parametrize("lora", [False, True])
def test_link_queries_are_interleaved_per_channel(lora):
    L, tl, C, Q = 3, 5, 8, 4
    cls = LoRAReins if lora else Reins
    m = cls(num_layers=L, embed_dims=C, patch_size=2, token_length=tl, query_dims=Q)
    _perturb(m, 5)
    with torch.no_grad():
        tokens = m.learnable_tokens_a @ m.learnable_tokens_b if lora else m.learnable_tokens
        t = tokens @ m.transform.weight.t() + m.transform.bias  # (L, m, Q)
        mx, mean, last = t.amax(0), t.mean(0), t[-1]
        inter = torch.empty(tl, 3 * Q)
        for j in range(Q):  # [q0_max, q0_mean, q0_last, q1_max, ...]
            inter[:, 3 * j] = mx[:, j]
            inter[:, 3 * j + 1] = mean[:, j]
            inter[:, 3 * j + 2] = last[:, j]
        expected = inter @ m.merge.weight.t() + m.merge.bias
        blocks = torch.cat([mx, mean, last], -1) @ m.merge.weight.t() + m.merge.bias
        got = m.queries()
    assert got.shape == (tl, Q)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, blocks, atol=1e-3)  # the block order is wrong


def test_no_link_means_no_queries():
    m = Reins(2, 8, 2, token_length=3, link_token_to_query=False)
    with pytest.raises(RuntimeError, match="link_token_to_query"):
        m.queries()


# ----------------------------------------------------------------------- init and counts


def test_initialisation_bounds_and_scale():
    m = Reins(4, 64, 16, token_length=10)
    bound = (6.0 / (3 * 16 * 16 + 64)) ** 0.5
    assert m.learnable_tokens.abs().max() <= bound
    assert m.learnable_tokens.abs().max() > 0.9 * bound  # uniform over the whole range
    assert m.scale.item() == pytest.approx(1e-3)
    lm = LoRAReins(4, 64, 16, token_length=10, lora_dim=4)
    lb = (6.0 / (3 * 16 * 16 + (64 * 4) ** 0.5)) ** 0.5
    assert lm.learnable_tokens_a.abs().max() <= lb and lm.learnable_tokens_b.abs().max() <= lb
    z = Reins(2, 8, 2, token_length=3, zero_mlp_delta_f=True)
    assert float(z.scale) == 1.0 and "scale" not in dict(z.named_parameters())
    assert torch.count_nonzero(z.mlp_delta_f.weight) == 0


# DINOv2-L: L blocks, m tokens, LoRA rank r, C channels, Q query channels.
L, M, R, C, Q = 24, 100, 16, 1024, 256
MLP = C * C + C  # one Linear(C, C)


def test_lora_reins_dinov2_large_parameter_count():
    # tokens A_l (m x r) and B_l (r x C), two shared MLPs, transform C->Q, merge 3Q->Q, scale
    formula = L * (M * R + R * C) + 2 * MLP + (C * Q + Q) + (3 * Q * Q + Q) + 1
    assert formula == 2_990_081
    with torch.device("meta"):
        m = LoRAReins(num_layers=L, embed_dims=C, patch_size=16, token_length=M, lora_dim=R)
    assert count(m) == formula


@pytest.mark.parametrize(
    ("cls", "kwargs", "formula"),
    [
        # Rein-core: per-layer tokens and per-layer MLPs, no link
        (Reins, dict(share_mlps=False, link_token_to_query=False), L * M * C + 2 * L * MLP + 1),
        # + share: one pair of MLPs for all layers
        (Reins, dict(link_token_to_query=False), L * M * C + 2 * MLP + 1),
        # + LoRA: tokens A (m x r) @ B (r x C) per layer
        (LoRAReins, dict(link_token_to_query=False), L * (M * R + R * C) + 2 * MLP + 1),
        # zero-init mlp_delta_f: the scale is a fixed buffer, not a parameter
        (Reins, dict(link_token_to_query=False, zero_mlp_delta_f=True), L * M * C + 2 * MLP),
    ],
)
def test_ablation_switches_change_parameter_count(cls, kwargs, formula):
    with torch.device("meta"):
        m = cls(num_layers=L, embed_dims=C, patch_size=16, token_length=M, **kwargs)
    assert count(m) == formula


def test_wrong_width_is_a_clear_error():
    m = Reins(2, 8, 2, token_length=3)
    with pytest.raises(ValueError, match="embed_dims=8"):
        m(torch.randn(1, 4, 16), 0)
