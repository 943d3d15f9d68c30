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


def test_slide_averages_overlaps():
    m = tiny_segmentor().eval()
    x = torch.randn(1, 3, 64, 96)
    slide = m.inference(x, mode="slide", crop_size=64, stride=32)
    # Reference: the windows one by one, summed and divided by the count.
    ref = torch.zeros(1, 19, 64, 96)
    count = torch.zeros(1, 1, 64, 96)
    for y1, y2, x1, x2 in slide_windows(64, 96, 64, 32):
        ref[..., y1:y2, x1:x2] += m.seg_scores(x[..., y1:y2, x1:x2])
        count[..., y1:y2, x1:x2] += 1
    torch.testing.assert_close(slide, ref / count)


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
