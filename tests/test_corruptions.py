"""Robustness evaluation: Cityscapes-C style corruptions, their evaluation and CLI, and TTA."""

import colorsys
import io
import json
import math
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_run, tiny_segmentor
from PIL import Image
from scipy import ndimage
from torch import nn

from rein.cli import main
from rein.config import EvalConfig
from rein.data import SyntheticDataset, build_eval_pipeline, render_scene
from rein.engine.corruptions import (
    CORRUPTIONS,
    SEVERITIES,
    Corrupt,
    CorruptedDataset,
    corrupt,
    evaluate_corruptions,
    format_corruption_table,
)
from rein.engine.evaluate import evaluate_dataset, predict_labels, predict_scores


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    img, _ = render_scene(7, (64, 96), "realistic")
    return img


def _val_set(**kw) -> SyntheticDataset:
    return SyntheticDataset(
        num_images=2, size=(64, 64), style="game", split="val",
        transform=build_eval_pipeline("synthetic", crop=64), **kw,
    )  # fmt: skip


# ---------------------------------------------------------------------------- corruptions


def test_there_are_the_15_cityscapes_c_corruptions():
    assert len(CORRUPTIONS) == 15 and len(set(CORRUPTIONS)) == 15
    assert {"gaussian_noise", "glass_blur", "frost", "fog", "jpeg_compression"} <= set(CORRUPTIONS)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_every_corruption_keeps_shape_and_dtype_and_changes_the_image(name, image):
    for severity in (1, 5):
        out = corrupt(image, name, severity, rng=3)
        assert out.shape == image.shape and out.dtype == np.uint8
        assert not np.array_equal(out, image)
    assert image.shape == (64, 96, 3)  # the input is not modified in place


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruption_is_deterministic_and_depends_on_severity(name, image):
    a = corrupt(image, name, 3, rng=11)
    b = corrupt(image, name, 3, rng=np.random.default_rng(11))
    assert a.tobytes() == b.tobytes()
    assert corrupt(image, name, 4, rng=11).tobytes() != a.tobytes()


def test_severity_makes_it_worse(image):
    for name in ("gaussian_noise", "contrast", "defocus_blur", "brightness"):
        err = [np.abs(corrupt(image, name, s).astype(int) - image).mean() for s in (1, 3, 5)]
        assert err[0] < err[1] < err[2], name


def test_bad_arguments_are_clear_errors(image):
    with pytest.raises(ValueError, match="did you mean 'gaussian_noise'"):
        corrupt(image, "gausian_noise", 1)
    with pytest.raises(ValueError, match="1..5"):
        corrupt(image, "fog", 6)
    with pytest.raises(ValueError, match="before normalisation"):
        corrupt(image.astype(np.float32), "fog", 1)


def test_corrupt_transform_seeds_per_image_corruption_and_severity():
    ds = _val_set()
    s0, s1 = ds.load(0), ds.load(1)
    t = Corrupt("gaussian_noise", 2)
    a, b = t(s0)["image"], Corrupt("gaussian_noise", 2)(ds.load(0))["image"]
    assert a.tobytes() == b.tobytes()  # rerun: identical bytes
    assert t(s0)["meta"]["corruption"] == {"name": "gaussian_noise", "severity": 2}
    assert "corruption" not in s0["meta"]  # the input sample is not modified
    noise0 = a.astype(int) - s0["image"]
    noise1 = t(s1)["image"].astype(int) - s1["image"]
    assert not np.array_equal(noise0, noise1)  # another image draws other noise
    assert Corrupt("gaussian_noise", 3)(s0)["image"].tobytes() != a.tobytes()
    assert Corrupt("gaussian_noise", 2, seed=1)(s0)["image"].tobytes() != a.tobytes()
    with pytest.raises(ValueError):
        Corrupt("blizzard", 1)


def test_corrupted_dataset_corrupts_before_the_eval_pipeline():
    ds = _val_set()
    ds.transform = build_eval_pipeline("synthetic", scale=(48, 48))  # resize 64 -> 48
    wrapped = CorruptedDataset(ds, "motion_blur", 3)
    got = wrapped[1]
    expected = ds.transform(Corrupt("motion_blur", 3)(ds.load(1)))
    assert len(wrapped) == 2 and got["image"].shape == (3, 48, 48)
    assert torch.equal(got["image"], expected["image"])
    assert torch.equal(got["label"], ds[1]["label"])  # labels untouched, full resolution
    assert not torch.equal(got["image"], ds[1]["image"])
    assert torch.equal(wrapped[1]["image"], got["image"])  # rerun: identical
    with pytest.raises(TypeError, match="SegDataset"):
        CorruptedDataset([1, 2], "fog", 1)


# ---------------------------------------------------------------------------- parameters
# The per-severity constants of ImageNet-C (Hendrycks & Dietterich, 2019) as used for
# Cityscapes-C through the ``imagecorruptions`` package (which rescales elastic_transform to
# any image size). Written here from the reference code, not read from rein: every test
# below derives what the corrupted image must look like from this table, independently of
# rein's implementation, so changing any one severity constant in rein fails a test.
PARAMS: dict[str, list] = {
    "gaussian_noise": [0.08, 0.12, 0.18, 0.26, 0.38],  # noise std (image in [0, 1])
    "shot_noise": [60, 25, 12, 5, 3],  # photons per unit intensity
    "impulse_noise": [0.03, 0.06, 0.09, 0.17, 0.27],  # salt-and-pepper amount
    "defocus_blur": [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)],  # radius, alias
    "glass_blur": [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)],
    "motion_blur": [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)],  # radius, sigma
    "zoom_blur": [(1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02),
                  (1, 1.31, 0.03)],  # np.arange(start, stop, step) of zoom factors
    "snow": [  # mean, std, zoom, threshold, blur radius, blur sigma, image blend
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
        (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
        (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
        (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
    ],
    "frost": [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)],  # image, frost
    "fog": [(1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)],  # strength, decay
    "brightness": [0.1, 0.2, 0.3, 0.4, 0.5],  # added to HSV value
    "contrast": [0.4, 0.3, 0.2, 0.1, 0.05],  # scale of the deviation from the mean
    "elastic_transform": [250 * a for a in (0.05, 0.065, 0.085, 0.1, 0.12)],  # alpha
    "pixelate": [0.6, 0.5, 0.4, 0.3, 0.25],  # downscale factor
    "jpeg_compression": [25, 18, 15, 10, 7],  # quality
}  # fmt: skip


def test_the_parameter_table_covers_every_corruption():
    assert set(PARAMS) == set(CORRUPTIONS) and tuple(SEVERITIES) == (1, 2, 3, 4, 5)
    assert all(len(v) == 5 for v in PARAMS.values())


def _flat(value: int, size: int = 256) -> np.ndarray:
    return np.full((size, size, 3), value, dtype=np.uint8)


def _close(out: np.ndarray, ref: np.ndarray, frac: float = 0.01) -> None:
    """uint8 ``out`` equals ``ref`` (float in [0, 255], truncated) to one grey level, and
    (float rounding at integer boundaries aside) exactly almost everywhere."""
    ref = np.clip(np.nan_to_num(ref.astype(np.float32)), 0, 255).astype(np.uint8)
    diff = np.abs(out.astype(int) - ref.astype(int))
    assert diff.max() <= 1, f"max |diff| {diff.max()}"
    assert (diff > 0).mean() <= frac, f"{(diff > 0).mean():.3%} of values differ"


@pytest.mark.parametrize("s", SEVERITIES)
def test_gaussian_noise_std(s):
    # grey 128 + N(0, (255 c)^2), truncated: the share of pixels at least m grey levels
    # away is exactly 2 Phi(-m / (255 c)) whatever the clipping and the truncation.
    c = PARAMS["gaussian_noise"][s - 1]
    out = corrupt(_flat(128, 160), "gaussian_noise", s, rng=1).astype(int)
    m = round(255 * c)
    share = np.mean((out < 128 - m) | (out >= 128 + m))
    sigma = m / -NormalDist().inv_cdf(share / 2)
    assert sigma / 255 == pytest.approx(c, rel=0.015)


@pytest.mark.parametrize("s", SEVERITIES)
def test_shot_noise_photon_count(s):
    # Poisson(x c) / c: a pixel is black exactly when no photon arrived, P = exp(-x c).
    c = PARAMS["shot_noise"][s - 1]
    v = round(255 / c)  # about one photon per pixel
    out = corrupt(_flat(v), "shot_noise", s, rng=2)
    c_hat = -math.log(np.mean(out == 0)) / (v / 255)
    assert c_hat == pytest.approx(c, rel=0.015)
    assert np.all(out[out > 0] >= math.floor(255 / c))  # one photon is 1/c of full scale


@pytest.mark.parametrize("s", SEVERITIES)
def test_impulse_noise_amount(s):
    c = PARAMS["impulse_noise"][s - 1]
    out = corrupt(_flat(128), "impulse_noise", s, rng=3)
    hit = out != 128
    n = hit.size
    assert set(np.unique(out[hit]).tolist()) <= {0, 255}
    assert hit.mean() == pytest.approx(c, abs=5 * math.sqrt(c * (1 - c) / n))
    assert np.mean(out == 255) == pytest.approx(c / 2, abs=5 * math.sqrt(c / 2 / n))


def _ref_disk(radius: float, alias_blur: float) -> np.ndarray:
    # ImageNet-C disk(): a normalised disk on a 17 x 17 grid (radius <= 8, blurred with a
    # 3 x 3 Gaussian) or on (2r + 1)^2 (5 x 5 Gaussian); cv2 borders = reflect-101.
    if radius <= 8:
        grid, ksize = np.arange(-8, 9), 3
    else:
        grid, ksize = np.arange(-radius, radius + 1), 5
    xx, yy = np.meshgrid(grid, grid)
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    taps = np.arange(ksize) - ksize // 2
    g = np.exp(-(taps**2) / (2 * alias_blur**2))
    g /= g.sum()
    return ndimage.convolve(disk, np.outer(g, g), mode="mirror")


@pytest.mark.parametrize("s", SEVERITIES)
def test_defocus_blur_kernel(s, image):
    radius, alias = PARAMS["defocus_blur"][s - 1]
    kernel = _ref_disk(radius, alias)
    x = image / 255.0
    ref = np.stack([ndimage.correlate(x[..., i], kernel, mode="mirror") for i in range(3)], -1)
    _close(corrupt(image, "defocus_blur", s), np.clip(ref, 0, 1) * 255)


def _gauss(x: np.ndarray, sigma: float, mode: str = "nearest") -> np.ndarray:
    # skimage.filters.gaussian(multichannel=True): spatial axes only, truncate 4
    return ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0), mode=mode, truncate=4.0)


@pytest.mark.parametrize("s", SEVERITIES)
def test_glass_blur(s, image):
    # ImageNet-C: blur, then for every pixel from bottom-right to top-left (inside a border
    # of delta) copy in the pixel displaced by (dx, dy) in [-delta, delta), then blur again.
    sigma, delta, iterations = PARAMS["glass_blur"][s - 1]
    rng = np.random.default_rng(5)
    x = np.uint8(np.clip(_gauss(image / 255.0, sigma), 0, 1) * 255)
    h, w = x.shape[:2]
    rows, cols = range(h - delta, delta, -1), range(w - delta, delta, -1)
    for _ in range(iterations):
        d = rng.integers(-delta, delta, size=(len(rows) * len(cols), 2))
        i = 0
        for r in rows:
            for c in cols:
                dx, dy = d[i]
                i += 1
                x[r, c] = x[r + dy, c + dx]
    ref = np.clip(_gauss(x / 255.0, sigma), 0, 1) * 255
    _close(corrupt(image, "glass_blur", s, rng=5), ref)


def _ref_shift(x: np.ndarray, dx: int, dy: int) -> np.ndarray:
    # imagecorruptions' shift(): roll and replicate the edge row / column
    out = x
    if dx < 0:
        out = np.roll(out, x.shape[1] + dx, axis=1)
        out[:, dx:] = out[:, dx - 1 : dx]
    elif dx > 0:
        out = np.roll(out, dx, axis=1)
        out[:, :dx] = out[:, dx : dx + 1]
    if dy < 0:
        out = np.roll(out, x.shape[0] + dy, axis=0)
        out[dy:] = out[dy - 1 : dy]
    elif dy > 0:
        out = np.roll(out, dy, axis=0)
        out[:dy] = out[dy : dy + 1]
    return out


def _ref_motion_blur(x: np.ndarray, radius: int, sigma: float, angle: float) -> np.ndarray:
    # imagecorruptions' _motion_blur (replacing ImageMagick's in ImageNet-C)
    width = 2 * radius + 1
    k = np.exp(-(np.arange(width) ** 2) / (2 * sigma**2))
    k /= k.sum()
    py, px = width * np.sin(np.deg2rad(angle)), width * np.cos(np.deg2rad(angle))
    hypot = math.hypot(py, px)
    out = np.zeros(x.shape, dtype=np.float64)
    for i in range(width):
        dy = -math.ceil(i * py / hypot - 0.5)
        dx = -math.ceil(i * px / hypot - 0.5)
        if abs(dy) >= x.shape[0] or abs(dx) >= x.shape[1]:
            break
        out += k[i] * _ref_shift(x, dx, dy)
    return out


@pytest.mark.parametrize("s", SEVERITIES)
def test_motion_blur(s, image):
    radius, sigma = PARAMS["motion_blur"][s - 1]
    angle = np.random.default_rng(6).uniform(-45, 45)
    ref = np.clip(_ref_motion_blur(image.astype(np.float64), radius, sigma, angle), 0, 255)
    _close(corrupt(image, "motion_blur", s, rng=6), ref)


def _ref_clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    ch, cw = int(np.ceil(x.shape[0] / factor)), int(np.ceil(x.shape[1] / factor))
    top, left = (x.shape[0] - ch) // 2, (x.shape[1] - cw) // 2
    zoom = (factor, factor, 1) if x.ndim == 3 else (factor, factor)
    return ndimage.zoom(x[top : top + ch, left : left + cw], zoom, order=1)


@pytest.mark.parametrize("s", SEVERITIES)
def test_zoom_blur(s, image):
    factors = np.arange(*PARAMS["zoom_blur"][s - 1])
    x = (image / 255.0).astype(np.float32)
    h, w = x.shape[:2]
    out = np.zeros_like(x)
    for f in factors:
        out += _ref_clipped_zoom(x, f)[:h, :w]
    _close(corrupt(image, "zoom_blur", s), np.clip((x + out) / (len(factors) + 1), 0, 1) * 255)


@pytest.mark.parametrize("s", SEVERITIES)
def test_snow(s, image):
    mean, std, zoom, thresh, radius, sigma, keep = PARAMS["snow"][s - 1]
    rng = np.random.default_rng(7)
    x = (image / 255.0).astype(np.float32)
    h, w = x.shape[:2]
    flakes = _ref_clipped_zoom(rng.normal(mean, std, (h, w)), zoom)
    flakes[flakes < thresh] = 0
    flakes = _ref_motion_blur(np.clip(flakes, 0, 1), radius, sigma, rng.uniform(-135, -45))
    flakes = (np.round(np.clip(flakes, 0, 1) * 255) / 255.0)[:h, :w, None]
    grey = (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[..., None]
    x = keep * x + (1 - keep) * np.maximum(x, grey * 1.5 + 0.5)
    ref = np.clip(x + flakes + np.rot90(flakes, k=2), 0, 1) * 255
    _close(corrupt(image, "snow", s, rng=7), ref)


def test_frost_blends_image_and_ice():
    # rein draws its own ice texture F (not the photographs), so check the blend
    # keep * x + amount * F linearly: F is the same for a given seed and image size.
    black, grey = _flat(0, 64), _flat(100, 64)
    base = corrupt(black, "frost", 1, rng=8).astype(float)  # floor(0.4 F)
    assert (base.mean() + 0.5) / PARAMS["frost"][0][1] == pytest.approx(160, abs=12)
    for s in SEVERITIES:
        keep, amount = PARAMS["frost"][s - 1]
        ice = corrupt(black, "frost", s, rng=8).astype(float)  # floor(amount F)
        mixed = corrupt(grey, "frost", s, rng=8).astype(float)  # floor(100 keep + amount F)
        ratio = (ice.mean() + 0.5) / (base.mean() + 0.5)
        assert ratio == pytest.approx(amount / PARAMS["frost"][0][1], rel=0.005), s
        ok = mixed < 255
        assert ok.mean() > 0.9
        assert (mixed - ice)[ok].mean() / 100 == pytest.approx(keep, abs=0.005), s


def _ref_plasma(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    # ImageNet-C plasma_fractal (diamond-square), drawing from ``rng``
    m = np.zeros((size, size))
    step, wibble = size, 100.0

    def wibbled(a):
        return a / 4 + wibble * rng.uniform(-wibble, wibble, a.shape)

    while step >= 2:
        half = step // 2
        corner = m[0:size:step, 0:size:step]
        sq = corner + np.roll(corner, -1, axis=0)
        sq += np.roll(sq, -1, axis=1)
        m[half:size:step, half:size:step] = wibbled(sq)
        dr = m[half:size:step, half:size:step]
        ul = m[0:size:step, 0:size:step]
        lt = dr + np.roll(dr, 1, axis=0) + ul + np.roll(ul, -1, axis=1)
        m[0:size:step, half:size:step] = wibbled(lt)
        tt = dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=0)
        m[half:size:step, 0:size:step] = wibbled(tt)
        step //= 2
        wibble /= decay
    m -= m.min()
    return m / m.max()


@pytest.mark.parametrize("s", SEVERITIES)
def test_fog(s, image):
    strength, decay = PARAMS["fog"][s - 1]
    x = image / 255.0
    peak = x.max()
    haze = _ref_plasma(128, decay, np.random.default_rng(9))[:64, :96, None]
    ref = np.clip((x + strength * haze) * peak / (peak + strength), 0, 1) * 255
    _close(corrupt(image, "fog", s, rng=9), ref)
    # white image, 128 x 128 (the whole fractal): the haze-free pixel is 255 / (1 + strength)
    white = corrupt(_flat(255, 128), "fog", s, rng=9)
    assert abs(int(white.min()) - 255 / (1 + strength)) <= 1


@pytest.mark.parametrize("s", SEVERITIES)
def test_brightness_adds_c_to_the_hsv_value(s, image):
    c = PARAMS["brightness"][s - 1]
    small = image[::2, ::3]
    ref = np.empty(small.shape)
    for idx in np.ndindex(small.shape[:2]):
        h, sat, v = colorsys.rgb_to_hsv(*(small[idx] / 255.0))
        ref[idx] = colorsys.hsv_to_rgb(h, sat, min(v + c, 1.0))
    # the brightest channel lands exactly on an integer (v + c) * 255: rounding may go
    # either way there, so only the one-level bound holds for every value
    _close(corrupt(small, "brightness", s), np.clip(ref, 0, 1) * 255, frac=0.4)


@pytest.mark.parametrize("s", SEVERITIES)
def test_contrast_scales_the_deviation_from_the_mean(s, image):
    c = PARAMS["contrast"][s - 1]
    x = image / 255.0
    mean = x.mean(axis=(0, 1), keepdims=True)
    _close(corrupt(image, "contrast", s), np.clip((x - mean) * c + mean, 0, 1) * 255)


@pytest.mark.parametrize("s", SEVERITIES)
def test_elastic_transform(s, image):
    # imagecorruptions: a smooth random displacement field (sigma 1 % of the size, values
    # up to 0.5 % of the height, times alpha), bilinear resampling with reflected borders.
    alpha = PARAMS["elastic_transform"][s - 1]
    rng = np.random.default_rng(10)
    x = (image / 255.0).astype(np.float32)
    h, w = x.shape[:2]
    sigma, max_d = (h * 0.01, w * 0.01), h * 0.005

    def field():
        u = rng.uniform(-max_d, max_d, (h, w))
        return ndimage.gaussian_filter(u, sigma, mode="reflect", truncate=3) * alpha

    dx, dy = field()[..., None], field()[..., None]
    xx, yy, zz = np.meshgrid(np.arange(w), np.arange(h), np.arange(3))
    coords = [(yy + dy).ravel(), (xx + dx).ravel(), zz.ravel()]
    ref = ndimage.map_coordinates(x, coords, order=1, mode="reflect").reshape(x.shape)
    _close(corrupt(image, "elastic_transform", s, rng=10), np.clip(ref, 0, 1) * 255, 0.02)
    assert np.abs(dx).max() > 0.5  # the field moves pixels noticeably


@pytest.mark.parametrize("s", SEVERITIES)
def test_pixelate_block_count(s):
    c = PARAMS["pixelate"][s - 1]
    img = np.random.default_rng(11).integers(0, 256, (40, 100, 3), dtype=np.uint8)
    out = corrupt(img, "pixelate", s)
    # box-downscale to int(100 c) x int(40 c), nearest-neighbour back up
    assert (np.any(out[:, 1:] != out[:, :-1], axis=(0, 2))).sum() == int(100 * c) - 1
    assert (np.any(out[1:] != out[:-1], axis=(1, 2))).sum() == int(40 * c) - 1
    small = Image.fromarray(img).resize((int(100 * c), int(40 * c)), Image.Resampling.BOX)
    ref = np.asarray(small.resize((100, 40), Image.Resampling.NEAREST))
    assert np.array_equal(out, ref)


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


@pytest.mark.parametrize("s", SEVERITIES)
def test_jpeg_quality(s, image):
    out = corrupt(image, "jpeg_compression", s)
    matching = [q for q in range(2, 41) if np.array_equal(_jpeg(image, q), out)]
    assert matching == [PARAMS["jpeg_compression"][s - 1]]


# ---------------------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_segmentor().eval()


def test_corruption_evaluation_table(tiny_model):
    cfg = EvalConfig(mode="whole")
    results = evaluate_corruptions(
        tiny_model, {"game": _val_set()}, 19, cfg,
        corruptions=["fog", "gaussian_noise"], severities=[3, 1],
    )  # fmt: skip
    assert results["corruptions"] == ["fog", "gaussian_noise"]
    assert results["severities"] == [1, 3]
    cells = [results["mIoU"][c][s] for c in ("fog", "gaussian_noise") for s in ("1", "3")]
    assert all(0 <= v <= 100 for v in cells)
    assert results["mean"] == pytest.approx(sum(cells) / 4)
    assert results["mIoU"]["fog"]["mean"] == pytest.approx(
        (results["mIoU"]["fog"]["1"] + results["mIoU"]["fog"]["3"]) / 2
    )
    assert results["severity_mean"]["mean"] == pytest.approx(results["mean"])
    assert results["domains"]["fog"]["3"]["game"] == results["mIoU"]["fog"]["3"]
    table = format_corruption_table(results)
    lines = table.splitlines()
    assert lines[0].split("|")[1].strip() == "corruption"
    assert [c.strip() for c in lines[0].split("|")[2:-1]] == ["s1", "s3", "mean"]
    assert lines[2].startswith("| fog") and lines[-1].startswith("| mean")
    again = evaluate_corruptions(
        tiny_model, {"game": _val_set()}, 19, cfg, corruptions=["fog"], severities=[3]
    )
    assert again["mIoU"]["fog"]["3"] == results["mIoU"]["fog"]["3"]  # rerun: identical


def test_corruption_evaluation_rejects_bad_requests(tiny_model):
    with pytest.raises(ValueError, match="unknown corruption"):
        evaluate_corruptions(tiny_model, {"g": _val_set()}, 19, EvalConfig(), corruptions=["x"])
    with pytest.raises(ValueError, match="1..5"):
        evaluate_corruptions(tiny_model, {"g": _val_set()}, 19, EvalConfig(), severities=[0])


def _tiny_run(tmp_path: Path) -> tuple[Path, Path]:
    return tiny_run(tmp_path, style="game", mode="whole")


def test_eval_corruptions_cli(tmp_path, capsys):
    cfg, ckpt = _tiny_run(tmp_path)
    out = tmp_path / "c.json"
    argv = ["eval", str(cfg), str(ckpt), "--corruptions", "--corruption", "snow", "pixelate"]
    argv += ["--severities", "2", "5", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "| snow" in text and "| pixelate" in text and "s2" in text and "s5" in text
    assert "mean mIoU over 2 corruption(s) x 2 severity(ies)" in text
    res = json.loads(out.read_text())
    assert res["corruptions"] == ["snow", "pixelate"] and res["severities"] == [2, 5]
    assert set(res["mIoU"]["snow"]) == {"2", "5", "mean"}
    assert res["mean"] == pytest.approx(
        np.mean([res["mIoU"][c][s] for c in ("snow", "pixelate") for s in ("2", "5")])
    )
    with pytest.raises(SystemExit):
        main(["eval", str(cfg), str(ckpt), "--corruption", "blizzard"])
    assert "invalid choice" in capsys.readouterr().err


# ---------------------------------------------------------------------------- TTA


class _SizeModel(nn.Module):
    """Stub segmentor: scores = the input width everywhere; records the input sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[int, int]] = []

    def inference(self, x, mode, crop_size, stride, out_size, flip):
        self.sizes.append(tuple(x.shape[-2:]))
        scores = torch.full((x.shape[0], 3, *x.shape[-2:]), float(x.shape[-1]))
        return F.interpolate(scores, size=out_size, mode="bilinear", align_corners=False)


def test_multi_scale_resizes_scores_to_the_original_size_then_averages():
    stub = _SizeModel()
    image = torch.randn(2, 3, 20, 40)
    scores = predict_scores(stub, image, (30, 60), scales=(0.5, 1.0, 1.5))
    assert stub.sizes == [(10, 20), (20, 40), (30, 60)]
    assert scores.shape == (2, 3, 30, 60)
    assert torch.allclose(scores, torch.full_like(scores, (20 + 40 + 60) / 3))
    with pytest.raises(ValueError, match="positive"):
        predict_scores(stub, image, (30, 60), scales=(1.0, 0.0))
    with pytest.raises(ValueError, match="non-empty"):
        predict_scores(stub, image, (30, 60), scales=())


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_multi_scale_tta_on_the_segmentor(tiny_model, mode):
    image = torch.randn(1, 3, 64, 96)
    out_size = (80, 112)  # the original image size: larger than the eval-scale input
    kw = dict(mode=mode, crop_size=64, stride=48, flip=True)
    scores = predict_scores(tiny_model, image, out_size, scales=(0.75, 1.0, 1.25), **kw)
    assert scores.shape == (1, 19, 80, 112)
    manual = []
    for s, size in ((0.75, (48, 72)), (1.0, (64, 96)), (1.25, (80, 120))):
        x = image if s == 1.0 else F.interpolate(image, size=size, mode="bilinear")
        manual.append(tiny_model.inference(x, out_size=out_size, **kw))
        assert manual[-1].shape == (1, 19, 80, 112)
    assert torch.allclose(scores, torch.stack(manual).mean(0), atol=1e-6)
    labels = predict_labels(tiny_model, image, out_size, scales=(0.75, 1.0, 1.25), **kw)
    assert torch.equal(labels, scores.argmax(1))
    single = predict_scores(tiny_model, image, out_size, scales=[1.0], **kw)
    assert torch.allclose(single, manual[1])


def test_evaluation_with_flip_and_multi_scale(tiny_model):
    cfg = EvalConfig(mode="whole", flip=True, scales=[1.0, 1.5])
    cm = evaluate_dataset(tiny_model, _val_set(), 19, cfg)
    assert int(cm.mat.sum()) == 2 * 64 * 64
    assert 0 <= cm.miou() <= 100
