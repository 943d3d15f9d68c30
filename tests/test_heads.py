"""Tests for the Mask2Former decode head: deformable attention, positional encoding,
pixel decoder, transformer decoder, state-dict layout and parameter counts."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rein.heads.mask2former import Mask2FormerDecoderLayer, Mask2FormerHead
from rein.heads.ms_deform_attn import MultiScaleDeformableAttention, ms_deform_attn_core
from rein.heads.pixel_decoder import MSDeformAttnPixelDecoder
from rein.heads.positional_encoding import SinePositionalEncoding

# copied from ../shared/docs/official_state_dict_keys.txt (the official model, instantiated)
KEYS_FILE = Path(__file__).resolve().parent / "data" / "official_state_dict_keys.txt"

# a small head that still exercises every code path (GN needs feat_channels % 32 == 0)
SMALL = dict(
    in_channels=[8, 16, 24, 32],
    num_classes=5,
    feat_channels=64,
    out_channels=64,
    num_queries=7,
    num_heads=8,
    feedforward_channels=96,
    encoder_feedforward_channels=80,
)


def _feats(batch: int, height: int, width: int, channels=(8, 16, 24, 32)) -> list[torch.Tensor]:
    """Backbone-like maps at strides 4, 8, 16, 32 of a height x width image."""
    return [
        torch.randn(batch, c, height // s, width // s)
        for c, s in zip(channels, (4, 8, 16, 32), strict=True)
    ]


# --------------------------------------------------------------------------- (a) core op


def _bilinear_reference(value_map: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Sample a (C, h, w) map at normalised (x, y) by hand: pixel centres at (i + 0.5) / w,
    four explicit corner weights, zeros outside the map (align_corners=False)."""
    _, h, w = value_map.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    dx, dy = px - x0, py - y0
    out = torch.zeros(value_map.shape[0], dtype=value_map.dtype)
    for xi, yi, weight in (
        (x0, y0, (1 - dx) * (1 - dy)),
        (x0 + 1, y0, dx * (1 - dy)),
        (x0, y0 + 1, (1 - dx) * dy),
        (x0 + 1, y0 + 1, dx * dy),
    ):
        if 0 <= xi < w and 0 <= yi < h:
            out += weight * value_map[:, yi, xi]
    return out


def _core_reference(value, shapes, locations, weights) -> torch.Tensor:
    batch, _, heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = locations.shape
    value, locations, weights = value.double(), locations.double(), weights.double()
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(batch, num_queries, heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        for m in range(heads):
            for lvl, (h, w) in enumerate(shapes):
                # (h*w, Dh) -> (Dh, h, w)
                value_map = value[b, starts[lvl] : starts[lvl + 1], m].T.reshape(head_dim, h, w)
                for q in range(num_queries):
                    for p in range(num_points):
                        x, y = locations[b, q, m, lvl, p].tolist()
                        sample = _bilinear_reference(value_map, x, y)
                        out[b, q, m] += weights[b, q, m, lvl, p] * sample
    return out.reshape(batch, num_queries, heads * head_dim)


def test_ms_deform_attn_core_matches_hand_bilinear_reference() -> None:
    torch.manual_seed(0)
    shapes = [(3, 4), (2, 5), (1, 1)]
    batch, heads, head_dim, num_queries, num_points = 2, 3, 4, 5, 3
    num_value = sum(h * w for h, w in shapes)
    value = torch.randn(batch, num_value, heads, head_dim)
    # include points outside [0, 1] to exercise the zero padding
    locations = torch.rand(batch, num_queries, heads, len(shapes), num_points, 2) * 1.6 - 0.3
    weights = torch.rand(batch, num_queries, heads, len(shapes), num_points)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)

    out = ms_deform_attn_core(value, spatial_shapes, locations, weights)
    ref = _core_reference(value, shapes, locations, weights)
    assert out.shape == (batch, num_queries, heads * head_dim)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    # nested ints are accepted too
    out_list = ms_deform_attn_core(value, shapes, locations, weights)
    torch.testing.assert_close(out_list, out, atol=0, rtol=0)


def test_ms_deform_attn_core_matches_the_stacked_mmcv_reduction() -> None:
    """The level-by-level weighted sum equals mmcv's one reduction over the stacked levels."""
    torch.manual_seed(1)
    shapes = [(6, 5), (3, 3), (2, 1)]
    batch, heads, head_dim, num_queries, num_points = 2, 4, 8, 9, 4
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, head_dim)
    locations = torch.rand(batch, num_queries, heads, len(shapes), num_points, 2)
    weights = torch.rand(batch, num_queries, heads, len(shapes), num_points).softmax(-1)
    sampled = []
    for level, ((h, w), v) in enumerate(zip(shapes, value.split([h * w for h, w in shapes], 1))):
        v = v.permute(0, 2, 3, 1).reshape(batch * heads, head_dim, h, w)
        g = (2 * locations[:, :, :, level] - 1).transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", align_corners=False))
    w = weights.transpose(1, 2).reshape(batch * heads, 1, num_queries, -1)
    ref = (torch.stack(sampled, dim=-2).flatten(-2) * w).sum(-1)
    ref = ref.view(batch, heads * head_dim, num_queries).transpose(1, 2)
    out = ms_deform_attn_core(value, shapes, locations, weights)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_attention_block_equals_the_explicit_softmax_path() -> None:
    """The fused attention (need_weights=False) equals the explicit softmax(QK^T + mask) V
    path of the reference, with a boolean mask that hides most keys from some queries."""
    from rein.heads.mask2former import MultiheadAttentionBlock

    torch.manual_seed(2)
    block = MultiheadAttentionBlock(embed_dims=32, num_heads=4)
    q, k, pos = torch.randn(2, 7, 32), torch.randn(2, 11, 32), torch.randn(2, 7, 32)
    mask = torch.rand(2 * 4, 7, 11) > 0.4
    mask[:, :, 0] = False  # every query sees at least one key
    out = block(q, k, query_pos=pos, attn_mask=mask)
    ref = q + block.attn(q + pos, k, k, attn_mask=mask, need_weights=True)[0]
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    out_self = block(q, query_pos=pos)
    ref_self = q + block.attn(q + pos, q + pos, q, need_weights=True)[0]
    torch.testing.assert_close(out_self, ref_self, atol=1e-6, rtol=1e-6)


def test_ms_deform_attn_module_init_and_forward() -> None:
    torch.manual_seed(0)
    attn = MultiScaleDeformableAttention(embed_dims=16, num_heads=4, num_levels=2, num_points=3)
    assert torch.count_nonzero(attn.sampling_offsets.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.bias) == 0
    bias = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    # head 1 of 4 points at 90 degrees: direction (0, 1), point i scaled by i + 1
    torch.testing.assert_close(bias[1, :, :, 0], torch.zeros(2, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[1, 0, :, 1], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(bias[0, 1, :, 0], torch.tensor([1.0, 2.0, 3.0]))

    shapes = torch.tensor([[2, 3], [4, 2]])
    batch, num_value = 2, 6 + 8
    query = torch.randn(batch, num_value, 16)
    query_pos = torch.randn(1, num_value, 16)
    reference = torch.rand(1, num_value, 2, 2)
    out = attn(query, reference_points=reference, spatial_shapes=shapes, query_pos=query_pos)
    assert out.shape == (batch, num_value, 16)

    # the same computation spelled out
    q = query + query_pos
    value = attn.value_proj(query).view(batch, num_value, 4, 4)
    offsets = attn.sampling_offsets(q).view(batch, num_value, 4, 2, 3, 2)
    weights = attn.attention_weights(q).view(batch, num_value, 4, 6).softmax(-1)
    normalizer = torch.tensor([[3.0, 2.0], [2.0, 4.0]])  # (w, h)
    loc = reference[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    expected = query + attn.output_proj(
        ms_deform_attn_core(value, shapes, loc, weights.view(batch, num_value, 4, 2, 3))
    )
    torch.testing.assert_close(out, expected)


# --------------------------------------------------------------------- (b) positional enc


def test_sine_positional_encoding_hand_computed() -> None:
    num_feats, temperature = 4, 10
    enc = SinePositionalEncoding(num_feats=num_feats, temperature=temperature)
    height, width = 2, 3
    pos = enc(torch.zeros(1, height, width, dtype=torch.bool))
    assert pos.shape == (1, 2 * num_feats, height, width)
    scale, eps = 2 * math.pi, 1e-6
    expected = torch.empty(2 * num_feats, height, width, dtype=torch.float64)
    for i in range(height):
        for j in range(width):
            y = (i + 1) / (height + eps) * scale
            x = (j + 1) / (width + eps) * scale
            for k in range(num_feats):
                dim_t = temperature ** (2 * (k // 2) / num_feats)
                fn = math.sin if k % 2 == 0 else math.cos
                expected[k, i, j] = fn(y / dim_t)  # y channels first
                expected[num_feats + k, i, j] = fn(x / dim_t)
    torch.testing.assert_close(pos[0].double(), expected, atol=1e-6, rtol=1e-6)
    # spot values: channel 0 is sin(y), channel num_feats + 1 is cos(x)
    assert pos[0, 0, 1, 0].item() == pytest.approx(math.sin(2 / (2 + eps) * scale), abs=1e-6)
    assert pos[0, num_feats + 1, 0, 2].item() == pytest.approx(
        math.cos(3 / (3 + eps) * scale), abs=1e-6
    )


def test_sine_positional_encoding_for_shape_and_batch() -> None:
    enc = SinePositionalEncoding(num_feats=8)
    full = enc(torch.zeros(3, 5, 4, dtype=torch.bool))
    single = enc.for_shape(5, 4)
    assert single.shape == (1, 16, 5, 4)
    torch.testing.assert_close(full, single.expand(3, -1, -1, -1), atol=0, rtol=0)


# ---------------------------------------------------------------------------- (c) shapes


def test_pixel_decoder_shapes_and_reference_points() -> None:
    torch.manual_seed(0)
    decoder = MSDeformAttnPixelDecoder(
        [8, 16, 24, 32], feat_channels=64, out_channels=48, feedforward_channels=80
    )
    feats = _feats(2, 64, 96)
    mask_features, multi_scale = decoder(feats)
    assert mask_features.shape == (2, 48, 16, 24)
    assert [tuple(f.shape) for f in multi_scale] == [(2, 64, 2, 3), (2, 64, 4, 6), (2, 64, 8, 12)]
    ref = decoder._reference_points(2, 3, torch.device("cpu"))
    expected = torch.tensor(
        [
            [1 / 6, 1 / 4],
            [3 / 6, 1 / 4],
            [5 / 6, 1 / 4],
            [1 / 6, 3 / 4],
            [3 / 6, 3 / 4],
            [5 / 6, 3 / 4],
        ]
    )
    torch.testing.assert_close(ref, expected)
    # batch elements are independent
    single_mask, single_ms = decoder([f[1:] for f in feats])
    torch.testing.assert_close(single_mask[0], mask_features[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single_ms[0][0], multi_scale[0][1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("query_source", ["rein", "learned"])
def test_head_outputs_ten_predictions(query_source: str) -> None:
    torch.manual_seed(0)
    head = Mask2FormerHead(query_source=query_source, **SMALL)
    feats = _feats(2, 64, 96)
    queries = torch.randn(7, 64) if query_source == "rein" else None
    cls_preds, mask_preds = head(feats, queries)
    assert len(cls_preds) == len(mask_preds) == 10
    for cls_pred, mask_pred in zip(cls_preds, mask_preds, strict=True):
        assert cls_pred.shape == (2, 7, 6)
        assert mask_pred.shape == (2, 7, 16, 24)
        assert torch.isfinite(cls_pred).all() and torch.isfinite(mask_pred).all()
    seg = head.predict_seg(cls_preds[-1], mask_preds[-1], (64, 96))
    assert seg.shape == (2, 5, 64, 96)
    # sums of probabilities over queries: within [0, num_queries]
    assert seg.min() >= 0 and seg.max() <= 7


def test_rein_queries_batched_equals_shared() -> None:
    torch.manual_seed(0)
    head = Mask2FormerHead(**SMALL).eval()
    feats = _feats(2, 32, 32)
    queries = torch.randn(7, 64)
    with torch.no_grad():
        shared = head(feats, queries)
        batched = head(feats, queries.expand(2, -1, -1).clone())
    torch.testing.assert_close(shared[0][-1], batched[0][-1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="Rein-link queries"):
        head(feats)
    learned = Mask2FormerHead(query_source="learned", **SMALL)
    with pytest.raises(ValueError, match="learns its own queries"):
        learned(feats, queries)


def test_predict_seg_formula() -> None:
    torch.manual_seed(0)
    cls_pred = torch.randn(1, 3, 4)
    mask_pred = torch.randn(1, 3, 2, 2)
    seg = Mask2FormerHead.predict_seg(cls_pred, mask_pred, (4, 4))
    up = F.interpolate(mask_pred, size=(4, 4), mode="bilinear", align_corners=False).sigmoid()
    probs = cls_pred.softmax(-1)[..., :3]
    expected = (probs[0, :, :, None, None] * up[0, :, None]).sum(0, keepdim=True)
    torch.testing.assert_close(seg, expected)


# ----------------------------------------------------------------- (d) keys and counts


def _official_decode_head_shapes() -> dict[str, tuple[int, ...]]:
    lines = KEYS_FILE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#") and "SAVED" in line)
    shapes: dict[str, tuple[int, ...]] = {}
    for line in lines[start + 1 :]:
        if not line.strip() or line.startswith("#"):
            break
        key, shape, _ = line.split("\t")
        if key.startswith("decode_head."):
            shapes[key.removeprefix("decode_head.")] = tuple(ast.literal_eval(shape))
    return shapes


def _num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_official_key_set_and_shapes() -> None:
    assert KEYS_FILE.is_file(), f"{KEYS_FILE} is missing: it ships with the repository"
    official = _official_decode_head_shapes()
    with torch.device("meta"):
        head = Mask2FormerHead([1024] * 4)
    ours = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert set(ours) == set(official), (
        f"missing {sorted(set(official) - set(ours))}, extra {sorted(set(ours) - set(official))}"
    )
    mismatched = {k: (ours[k], official[k]) for k in ours if ours[k] != official[k]}
    assert not mismatched
    assert list(ours) == list(official)  # same order too
    assert sum(math.prod(s) for s in official.values()) == 20_579_796


def test_parameter_counts() -> None:
    with torch.device("meta"):
        rein_head = Mask2FormerHead([1024] * 4, num_classes=19, num_queries=100)
        learned_head = Mask2FormerHead(
            [1024] * 4, num_classes=19, num_queries=100, query_source="learned"
        )
    assert _num_params(rein_head) == 20_579_796
    assert _num_params(learned_head) == 20_565_204
    learned_keys = set(learned_head.state_dict())
    rein_keys = set(rein_head.state_dict())
    assert learned_keys - rein_keys == {"query_embed.weight", "query_feat.weight"}
    assert rein_keys - learned_keys == {"querys2feat.weight", "querys2feat.bias"}


def test_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    head = Mask2FormerHead(**SMALL)
    other = Mask2FormerHead(**SMALL)
    other.load_state_dict(head.state_dict(), strict=True)
    feats, queries = _feats(1, 32, 32), torch.randn(7, 64)
    with torch.no_grad():
        torch.testing.assert_close(head(feats, queries)[1][-1], other(feats, queries)[1][-1])


# ------------------------------------------------------------------ (e) fully masked rows


def test_fully_masked_rows_are_unmasked() -> None:
    torch.manual_seed(0)
    head = Mask2FormerHead(**SMALL).eval()
    with torch.no_grad():
        # mask features all 1 and a query-independent mask embedding: every mask logit is
        # sum(bias), the same at every pixel and in every stage
        head.pixel_decoder.mask_feature.weight.zero_()
        head.pixel_decoder.mask_feature.bias.fill_(1.0)
        head.mask_embed[4].weight.zero_()
        feats, queries = _feats(2, 64, 64), torch.randn(7, 64)
        head.mask_embed[4].bias.fill_(-0.1)  # every pixel masked -> rows unmasked
        cls_masked, mask_masked = head(feats, queries)
        head.mask_embed[4].bias.fill_(0.1)  # nothing masked
        cls_open, _ = head(feats, queries)
    assert (mask_masked[0] < 0).all()
    for pred in cls_masked + mask_masked:
        assert torch.isfinite(pred).all()
    # a fully masked row attends everywhere, exactly like an unmasked one
    for a, b in zip(cls_masked, cls_open, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _wrap_first_mask(head: Mask2FormerHead, mask: torch.Tensor) -> None:
    """Replace the attention mask of prediction 0 (the one layer 0 uses) by ``mask``."""
    original = head._forward_head
    calls = []

    def patched(*args):
        cls_pred, mask_pred, attn_mask = original(*args)
        calls.append(1)
        return cls_pred, mask_pred, (mask if len(calls) == 1 else attn_mask)

    head._forward_head = patched  # type: ignore[method-assign]


def _capture_layer_inputs(head: Mask2FormerHead) -> list[tuple[torch.Tensor, ...]]:
    seen: list[tuple[torch.Tensor, ...]] = []
    for layer in head.transformer_decoder.layers:
        layer.register_forward_pre_hook(lambda _m, args: seen.append(args))
    return seen


def test_head_unmasks_fully_masked_rows_only() -> None:
    torch.manual_seed(0)
    head = Mask2FormerHead(**SMALL).eval()
    feats, queries = _feats(2, 64, 64), torch.randn(7, 64)
    hw = 2 * 2  # level 0 is stride 32: a 2 x 2 map
    crafted = torch.zeros(2, 7, hw, dtype=torch.bool)
    crafted[0, 0] = True  # fully masked
    crafted[0, 1, :3] = True  # partially masked
    crafted[1, 2] = True  # fully masked
    crafted[1, 3, 1] = True  # partially masked
    _wrap_first_mask(head, crafted)
    seen = _capture_layer_inputs(head)
    with torch.no_grad():
        head(feats, queries)
    expected = crafted.clone()
    expected[0, 0] = False
    expected[1, 2] = False
    # (B, Q, hw) -> (B*heads, Q, hw), index b * heads + h
    expected = expected.repeat_interleave(SMALL["num_heads"], dim=0)
    assert torch.equal(seen[0][4], expected)


def _layer_norm(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def _mha_reference(mha, query, key, value, num_heads, attn_mask=None) -> torch.Tensor:
    """Multi-head attention by hand from in_proj / out_proj; attn_mask True = masked."""
    batch, nq, c = query.shape
    d = c // num_heads
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    q, k, v = query @ wq.t() + bq, key @ wk.t() + bk, value @ wv.t() + bv
    out = torch.empty(batch, nq, c)
    for b in range(batch):
        for h in range(num_heads):
            sl = slice(h * d, (h + 1) * d)
            scores = q[b, :, sl] @ k[b, :, sl].t() / math.sqrt(d)
            if attn_mask is not None:
                scores = scores.masked_fill(attn_mask[b * num_heads + h], float("-inf"))
            out[b, :, sl] = torch.softmax(scores, dim=-1) @ v[b, :, sl]
    return out @ mha.out_proj.weight.t() + mha.out_proj.bias


def test_decoder_layer_matches_explicit_masked_attention() -> None:
    torch.manual_seed(0)
    c, heads, batch, nq, hw = 16, 4, 2, 5, 12
    layer = Mask2FormerDecoderLayer(embed_dims=c, num_heads=heads, feedforward_channels=24)
    with torch.no_grad():  # non-trivial biases and norms
        for name, p in layer.named_parameters():
            if "bias" in name or "norms" in name:
                p.copy_(torch.randn(p.shape))
    query, query_pos = torch.randn(batch, nq, c), torch.randn(batch, nq, c)
    memory, memory_pos = torch.randn(batch, hw, c), torch.randn(1, hw, c)
    mask = torch.rand(batch * heads, nq, hw) < 0.5  # per head, True = masked
    mask[:, 0] = False  # some rows unmasked
    mask[:, 1, 1:] = True  # one row masked everywhere but position 0
    mask[..., 2] = False  # never a fully masked row
    assert mask.any(-1).sum() > 0 and not mask.all(-1).any()

    with torch.no_grad():
        out = layer(query, query_pos, memory, memory_pos, mask)
        # masked cross-attention: q = query + pos, k = memory + pos, v = memory
        x = query + _mha_reference(
            layer.cross_attn.attn, query + query_pos, memory + memory_pos, memory, heads, mask
        )
        x = _layer_norm(x, layer.norms[0])
        # self-attention: q = k = x + pos, v = x
        x = x + _mha_reference(layer.self_attn.attn, x + query_pos, x + query_pos, x, heads)
        x = _layer_norm(x, layer.norms[1])
        lin1, lin2 = layer.ffn.layers[0][0], layer.ffn.layers[1]
        x = x + torch.relu(x @ lin1.weight.t() + lin1.bias) @ lin2.weight.t() + lin2.bias
        expected = _layer_norm(x, layer.norms[2])
        unmasked = layer(query, query_pos, memory, memory_pos, None)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, unmasked, atol=1e-3)  # the mask matters


def _head_probe(query_source: str = "rein"):
    """A SMALL head with non-trivial post_norm, plus hooks for its decoder inputs."""
    torch.manual_seed(0)
    head = Mask2FormerHead(query_source=query_source, **SMALL).eval()
    with torch.no_grad():
        head.transformer_decoder.post_norm.weight.copy_(torch.randn(64))
        head.transformer_decoder.post_norm.bias.copy_(torch.randn(64))
    pixel_out: list = []
    head.pixel_decoder.register_forward_hook(lambda _m, _a, out: pixel_out.append(out))
    return head, _capture_layer_inputs(head), pixel_out


def test_rein_queries_roles_in_the_decoder() -> None:
    head, seen, _ = _head_probe()
    feats, queries = _feats(2, 64, 64), torch.randn(7, 64)
    with torch.no_grad():
        cls_preds, _ = head(feats, queries)
        content = queries @ head.querys2feat.weight.t() + head.querys2feat.bias
        # prediction 0 comes from post_norm(content query) before any decoder layer
        cls0 = _layer_norm(content, head.transformer_decoder.post_norm)
        cls0 = cls0 @ head.cls_embed.weight.t() + head.cls_embed.bias
    query_feat, query_pos = seen[0][0], seen[0][1]
    assert query_feat.shape == query_pos.shape == (2, 7, 64)
    for b in range(2):
        torch.testing.assert_close(query_feat[b], content, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(query_pos[b], queries)
        torch.testing.assert_close(cls_preds[0][b], cls0, rtol=1e-5, atol=1e-5)
    for args in seen:  # every layer gets the same positional query
        torch.testing.assert_close(args[1], queries.expand(2, -1, -1))
    # changing querys2feat changes prediction 0 (it would not if the roles were swapped)
    with torch.no_grad():
        head.querys2feat.weight.mul_(-1.5)
        changed = head(feats, queries)[0][0]
    assert not torch.allclose(changed, cls_preds[0], atol=1e-3)


def test_memories_carry_the_level_embedding() -> None:
    head, seen, pixel_out = _head_probe()
    feats, queries = _feats(2, 64, 64), torch.randn(7, 64)
    with torch.no_grad():
        cls_preds, mask_preds = head(feats, queries)
    _, multi_scale = pixel_out[0]
    level_embed = head.level_embed.weight
    assert len(seen) == 9
    for i, args in enumerate(seen):
        level = i % 3  # levels cycled low -> high resolution
        feat = multi_scale[level]  # (B, C, h, w)
        b, c, h, w = feat.shape
        expected = feat.reshape(b, c, h * w).permute(0, 2, 1) + level_embed[level][None, None]
        torch.testing.assert_close(args[2], expected)
    with torch.no_grad():
        head.level_embed.weight.zero_()
        cls_zero, mask_zero = head(feats, queries)
    assert not torch.allclose(cls_zero[-1], cls_preds[-1], atol=1e-4)
    assert not torch.allclose(mask_zero[-1], mask_preds[-1], atol=1e-4)


def test_attention_masks_come_from_the_previous_prediction() -> None:
    head, seen, pixel_out = _head_probe()
    feats, queries = _feats(2, 64, 64), torch.randn(7, 64)
    with torch.no_grad():
        _, mask_preds = head(feats, queries)
    _, multi_scale = pixel_out[0]
    partial = 0
    for i, args in enumerate(seen):
        size = multi_scale[i % 3].shape[-2:]
        # prediction i, resized bilinearly to the level of layer i; sigmoid < 0.5 = masked
        resized = F.interpolate(mask_preds[i], size=size, mode="bilinear", align_corners=False)
        masked = torch.sigmoid(resized).flatten(2) < 0.5  # (B, Q, hw)
        full = masked.all(-1, keepdim=True)
        partial += int((masked.any(-1) & ~masked.all(-1)).sum())
        expected = (masked & ~full).repeat_interleave(SMALL["num_heads"], dim=0)
        assert torch.equal(args[4], expected), f"layer {i}"
    assert partial > 10  # enough partially masked rows for the check to mean something


# ------------------------------------------------------------------------ (f) gradients


def test_gradients_reach_rein_queries() -> None:
    torch.manual_seed(0)
    head = Mask2FormerHead(**SMALL)
    queries = torch.randn(7, 64, requires_grad=True)
    cls_preds, mask_preds = head(_feats(2, 32, 32), queries)
    loss = sum(c.square().mean() for c in cls_preds) + sum(m.square().mean() for m in mask_preds)
    loss.backward()
    assert queries.grad is not None
    assert torch.isfinite(queries.grad).all() and queries.grad.abs().sum() > 0
    assert head.querys2feat.weight.grad is not None
    # the deformable attention's zero-initialised offsets still learn
    offsets = head.pixel_decoder.encoder.layers[0].self_attn.sampling_offsets.weight
    assert offsets.grad is not None and offsets.grad.abs().sum() > 0
