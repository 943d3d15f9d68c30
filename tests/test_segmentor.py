import pytest
import torch
from conftest import tiny_segmentor

from rein.segmentor import slide_windows


def test_forward_shapes_and_predictions():
    m = tiny_segmentor()
    cls_preds, mask_preds = m(torch.randn(2, 3, 64, 64))
    assert len(cls_preds) == len(mask_preds) == 4  # 3 decoder layers + the initial prediction
    assert cls_preds[-1].shape == (2, 8, 20) and mask_preds[-1].shape == (2, 8, 16, 16)
    scores = m.inference(torch.randn(1, 3, 64, 64), mode="whole")
    assert scores.shape == (1, 19, 64, 64)
    assert torch.all(scores >= 0)  # sums of probabilities, not logits


def test_slide_equals_whole_when_one_window_covers_the_image():
    m = tiny_segmentor().eval()
    x = torch.randn(1, 3, 64, 96)
    whole = m.inference(x, mode="whole")
    slide = m.inference(x, mode="slide", crop_size=(64, 96), stride=(32, 48))
    torch.testing.assert_close(slide, whole)


def test_slide_windows_follow_mmseg():
    # Cityscapes at 1024x512 with crop 512 / stride 341: 1 x 3 windows, the last one clipped.
    wins = list(slide_windows(512, 1024, 512, 341))
    assert wins == [(0, 512, 0, 512), (0, 512, 341, 853), (0, 512, 512, 1024)]


def _grid(rows, cols):
    """Row-major (y1, y2, x1, x2) boxes from hand-written row and column spans."""
    return [(y1, y2, x1, x2) for y1, y2 in rows for x1, x2 in cols]


# Expected windows written by hand: grids = max(H - crop + stride - 1, 0) // stride + 1, the
# last window of a row / column shifted back to end at the image edge.
@pytest.mark.parametrize(
    ("h", "w", "crop", "stride", "expected"),
    [
        # 2 rows x 4 columns; 40 divides neither 100 - 64 nor 150 - 64
        (
            100,
            150,
            64,
            40,
            _grid([(0, 64), (36, 100)], [(0, 64), (40, 104), (80, 144), (86, 150)]),
        ),
        # stride divides the extent: 3 rows, no shift
        (128, 64, 64, 32, _grid([(0, 64), (32, 96), (64, 128)], [(0, 64)])),
        # the crop covers the image exactly: one window
        (64, 64, 64, 32, [(0, 64, 0, 64)]),
        # image smaller than the crop: one window, the whole image
        (30, 50, 64, 42, [(0, 30, 0, 50)]),
        # smaller than the crop in height only
        (30, 100, 64, 48, [(0, 30, 0, 64), (0, 30, 36, 100)]),
        # non-square crop (48 x 64) and stride (30 x 40): 3 x 3
        (
            90,
            120,
            (48, 64),
            (30, 40),
            _grid([(0, 48), (30, 78), (42, 90)], [(0, 64), (40, 104), (56, 120)]),
        ),
    ],
)
def test_slide_window_geometry(h, w, crop, stride, expected):
    assert list(slide_windows(h, w, crop, stride)) == expected


def _explicit_slide(model, image, windows):
    """One image (1, 3, H, W): crop each window by hand, sum the scores, divide by the count."""
    canvas = torch.zeros(1, 19, *image.shape[-2:])
    count = torch.zeros(1, 1, *image.shape[-2:])
    for y1, y2, x1, x2 in windows:
        canvas[..., y1:y2, x1:x2] += model.seg_scores(image[..., y1:y2, x1:x2])
        count[..., y1:y2, x1:x2] += 1
    assert count.min() >= 1
    return canvas / count


@pytest.mark.parametrize(
    ("size", "crop", "stride", "windows", "window_batch"),
    [
        # 2 x 2 windows of 64 x 64, the last column shifted back to end at 80; with B = 2,
        # window_batch 4 runs 2 windows (4 crops) per pass, in 2 chunks
        ((96, 80), 64, 32, _grid([(0, 64), (32, 96)], [(0, 64), (16, 80)]), 4),
        # non-square 56 x 72 windows (not multiples of the patch: each one is padded);
        # window_batch 6 runs chunks of 3 and 1 windows
        ((80, 100), (56, 72), (24, 40), _grid([(0, 56), (24, 80)], [(0, 72), (28, 100)]), 6),
    ],
)
def test_slide_batch_equals_single_images_and_explicit_reference(
    size, crop, stride, windows, window_batch
):
    # (All windows of one image have the same size, min(crop, image side), so every chunk
    # is a single same-size group.)
    m = tiny_segmentor().eval()
    m.window_batch = window_batch
    x = torch.randn(2, 3, *size)
    batched = m.inference(x, mode="slide", crop_size=crop, stride=stride)
    assert batched.shape == (2, 19, *size)
    with torch.no_grad():
        for b in range(2):
            single = m.inference(x[b : b + 1], mode="slide", crop_size=crop, stride=stride)
            torch.testing.assert_close(batched[b : b + 1], single, rtol=1e-4, atol=1e-5)
        ref = _explicit_slide(m, x[1:2], windows)
        torch.testing.assert_close(single, ref, rtol=1e-4, atol=1e-5)
    # the two images really differ, so mixing them up would show
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)


def test_seg_scores_pads_bottom_right_with_zeros():
    m = tiny_segmentor().eval()
    h, w = 40, 60  # patch 16: pad 8 rows at the bottom and 4 columns at the right
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        got = m.seg_scores(x)
        padded = torch.nn.functional.pad(x, (0, 4, 0, 8))  # (left, right, top, bottom)
        assert padded.shape[-2:] == (48, 64)
        expected = m.seg_scores(padded)[..., :h, :w]
        top_left = m.seg_scores(torch.nn.functional.pad(x, (4, 0, 8, 0)))[..., 8:, 4:]
    assert got.shape == (1, 19, h, w)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, top_left, atol=1e-3)  # where the padding goes matters


def test_small_and_odd_images_work_in_both_modes():
    m = tiny_segmentor().eval()
    x = torch.randn(1, 3, 40, 50)  # smaller than the crop, not a multiple of the patch
    assert m.inference(x, mode="slide", crop_size=64, stride=42).shape == (1, 19, 40, 50)
    assert m.inference(x, mode="whole", out_size=(80, 100)).shape == (1, 19, 80, 100)


def test_flip_tta_is_symmetric():
    m = tiny_segmentor().eval()
    x = torch.randn(1, 3, 64, 64)
    a = m.inference(x, mode="whole", flip=True)
    b = m.inference(x.flip(-1), mode="whole", flip=True).flip(-1)
    torch.testing.assert_close(a, b)


def test_training_step_decreases_the_loss():
    torch.manual_seed(0)
    m = tiny_segmentor()
    m.train()
    x = torch.randn(2, 3, 64, 64)
    y = torch.zeros(2, 64, 64, dtype=torch.long)
    y[:, 32:] = 13
    y[:, :, :10] = 255
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(6):
        g = torch.Generator().manual_seed(step)
        loss = m.loss(x, y, generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("tuning", ["rein", "frozen", "full"])
def test_tuning_policy_trains_exactly_what_it_should(tuning):
    m = tiny_segmentor(tuning)
    m.train()
    m.loss(torch.randn(1, 3, 64, 64), torch.randint(0, 19, (1, 64, 64)))["loss"].backward()
    for name, p in m.named_parameters():
        is_vit = name.startswith("backbone.vit.")
        is_rein = name.startswith("backbone.reins.")
        should_train = (
            name.startswith("decode_head.")
            or (tuning == "rein" and is_rein)
            or (tuning == "full" and is_vit)
        )
        assert p.requires_grad == should_train, name
        if not should_train:
            assert p.grad is None, name
    assert m.backbone.vit.training == (tuning == "full")
    if tuning == "frozen":
        assert m.backbone.reins is None and hasattr(m.decode_head, "query_embed")
    groups = m.parameter_groups()
    trainable = sum(t for _, t in groups.values())
    assert trainable == sum(v.numel() for v in m.trainable_state_dict().values())
