"""Data augmentation and preprocessing on sample dicts, following mmseg's semantics.

A sample is ``{"image": uint8 (H, W, 3) RGB, "label": (H, W) ints or absent, "meta": dict}``.
Transforms return a new dict (inputs are not modified). ``ToTensorNormalize`` turns the
image into a normalised float32 (3, H, W) tensor and the label into int64 (H, W); ``Pad``
runs after it by default, so padded image pixels are exactly 0 after normalisation (as the
official data preprocessor does) and padded label pixels are 255 (RecycleLoRA pads raw
pixels with 0 before the flip instead: ``build_train_pipeline(pad_position="before_flip")``).

Randomness: a transform's ``__call__(sample, rng=None)`` draws from ``rng`` when given, else
from its own generator (``seed`` argument). ``Compose`` owns one ``numpy.random.Generator``
seeded from ``seed`` and passes it down. Inside a DataLoader worker it re-seeds itself from
``(seed, worker seed)`` the first time it runs there, so workers draw different numbers and
a run is reproducible given ``seed`` and ``torch.manual_seed`` (or the DataLoader's
``generator``).

Geometric resizing matches OpenCV as used by mmcv: bilinear with half-pixel centres and no
antialiasing for images, "floor" nearest neighbour for labels.

Thread count: every transform gives the same pixels whatever ``torch.get_num_threads()`` is, so
a sample is the same in the main process (many intra-op threads) and in a DataLoader worker
(one). The only torch kernel whose result depends on how its work is split over threads, the
bilinear ``F.interpolate``, runs on one thread (:func:`single_thread`); everything else is
numpy or element-wise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .labels import IGNORE_INDEX

__all__ = [
    "EVAL_SCALES",
    "EVAL_SCALES_1024",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PAD_POSITIONS",
    "Compose",
    "Pad",
    "PhotoMetricDistortion",
    "RandomCrop",
    "RandomFlip",
    "RandomResizeShortEdge",
    "Resize",
    "ToTensorNormalize",
    "build_eval_pipeline",
    "build_train_pipeline",
    "eval_scale",
    "rescale_size",
    "short_edge_scales",
    "single_thread",
]

Sample = dict[str, Any]

# Where build_train_pipeline pads (see its docstring); also the choices of data.pad_position.
PAD_POSITIONS = ("after_normalize", "before_flip")

# ImageNet statistics on the 0-255 scale, RGB order (spec section 4).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

# Evaluation resize (w, h) with keep_ratio, per dataset, as in the official configs.
# 512 setting: Cityscapes 2048x1024 -> 1024x512; BDD100K stays 1280x720; Mapillary: the
# official code first halves the validation images offline and then applies (1024, 512)
# keep-ratio, which is (to rounding) the same as applying (1024, 512) to the full-size image
# (long side <= 1024, short side <= 512), so that is what we use; ACDC 1920x1080 -> 960x540.
# The source domains and UrbanSyn (not evaluated in the paper) get sizes of the same scale.
EVAL_SCALES: dict[str, tuple[int, int] | None] = {
    "cityscapes": (1024, 512),
    "bdd100k": (1280, 720),
    "mapillary": (1024, 512),
    "acdc": (960, 540),
    "gtav": (1280, 720),
    "synthia": (1280, 760),
    "urbansyn": (1024, 512),
    "folder": None,
    "synthetic": None,
}
# 1024 setting (Cityscapes -> ACDC at 1024x1024): full resolution.
EVAL_SCALES_1024: dict[str, tuple[int, int] | None] = {
    **EVAL_SCALES,
    "cityscapes": (2048, 1024),
    "acdc": (1920, 1080),
    "urbansyn": (2048, 1024),
}


def short_edge_scales(base: int = 512) -> list[int]:
    """The official short-edge choices ``int(base * 0.1 * k)`` for k = 5..20.

    For base 512: 256, 307, 358, ..., 972, 1024.
    """
    return [int(base * k * 0.1) for k in range(5, 21)]


# --------------------------------------------------------------------------- helpers


@contextmanager
def single_thread() -> Iterator[None]:
    """Run the enclosed torch ops on one intra-op thread (restored afterwards).

    CPU ``F.interpolate`` (bilinear) splits its output over the threads, and the last bit of
    some results depends on where the chunks start, hence (after rounding to uint8) some
    pixels: 1 thread (a DataLoader worker) and 2 (the main process) gave different training
    images. One thread gives the worker's result everywhere. A no-op where torch already runs
    on one thread (in workers).
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _resize_image(img: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a uint8 (H, W, 3) image (OpenCV INTER_LINEAR semantics).

    The same pixels whatever the thread count (see :func:`single_thread`).
    """
    h, w = size_hw
    if img.shape[:2] == (h, w):
        return img.copy()
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
    with single_thread():
        out = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)
    return out[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()


def _resize_label(label: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a (H, W) label (OpenCV INTER_NEAREST: floor(x * in/out))."""
    h, w = size_hw
    ih, iw = label.shape
    if (ih, iw) == (h, w):
        return label.copy()
    ys = np.minimum(np.floor(np.arange(h) * (ih / h)).astype(np.int64), ih - 1)
    xs = np.minimum(np.floor(np.arange(w) * (iw / w)).astype(np.int64), iw - 1)
    return label[ys[:, None], xs[None, :]]


def rescale_size(hw: tuple[int, int], scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv keep-ratio rescale: the (h, w) that fits ``scale`` = (long, short) bounds.

    factor = min(max(scale) / max(h, w), min(scale) / min(h, w)); sizes rounded half up.
    """
    h, w = hw
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def _resized(sample: Sample, size_hw: tuple[int, int], resize_label: bool = True) -> Sample:
    out = dict(sample)
    meta = dict(sample.get("meta", {}))
    out["image"] = _resize_image(sample["image"], size_hw)
    if resize_label and sample.get("label") is not None:
        out["label"] = _resize_label(sample["label"], size_hw)
    oh, ow = meta.get("ori_shape", sample["image"].shape[:2])
    meta["img_shape"] = tuple(size_hw)
    meta["scale_factor"] = (size_hw[1] / ow, size_hw[0] / oh)
    out["meta"] = meta
    return out


class _RandomTransform:
    """Base for transforms that draw random numbers."""

    def __init__(self, seed: int | None = None) -> None:
        self._rng = np.random.default_rng(seed)

    def _gen(self, rng: np.random.Generator | None) -> np.random.Generator:
        return rng if rng is not None else self._rng


# --------------------------------------------------------------------------- geometry


class RandomResizeShortEdge(_RandomTransform):
    """Resize so the short edge is a random choice of ``scales``, keeping the aspect ratio,
    with the long edge capped at ``max_long`` (mmseg RandomChoiceResize + ResizeShortestEdge).
    """

    def __init__(
        self,
        scales: Sequence[int] | None = None,
        max_long: int | None = 2048,
        seed: int | None = None,
    ) -> None:
        super().__init__(seed)
        self.scales = list(short_edge_scales(512) if scales is None else scales)
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"scales must be positive ints, got {self.scales}")
        self.max_long = max_long

    def output_size(self, hw: tuple[int, int], short: int) -> tuple[int, int]:
        """The (h, w) for short edge ``short``, exactly as mmseg computes it."""
        h, w = hw
        size = float(short)
        factor = size / min(h, w)
        new_h, new_w = (size, factor * w) if h < w else (factor * h, size)
        if self.max_long and max(new_h, new_w) > self.max_long:
            f = self.max_long / max(new_h, new_w)
            new_h, new_w = new_h * f, new_w * f
        target = (int(new_w + 0.5), int(new_h + 0.5))
        return rescale_size(hw, target)  # mmseg then resizes with keep_ratio to that scale

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        short = self.scales[int(self._gen(rng).integers(len(self.scales)))]
        return _resized(sample, self.output_size(sample["image"].shape[:2], short))

    def __repr__(self) -> str:
        return f"RandomResizeShortEdge(scales={self.scales}, max_long={self.max_long})"


class Resize:
    """Deterministic resize to ``scale`` = (w, h) (mmseg ``Resize``).

    With ``keep_ratio`` the image is rescaled by
    ``min(max(scale) / max(h, w), min(scale) / min(h, w))``. For evaluation pass
    ``resize_label=False``: metrics are computed on the label at its original resolution and
    the prediction is resized back to ``meta["ori_shape"]``.
    """

    def __init__(
        self, scale: tuple[int, int], keep_ratio: bool = True, resize_label: bool = True
    ) -> None:
        if len(scale) != 2 or min(scale) <= 0:
            raise ValueError(f"scale must be (w, h) with positive sides, got {scale}")
        self.scale = (int(scale[0]), int(scale[1]))
        self.keep_ratio = keep_ratio
        self.resize_label = resize_label

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        hw = sample["image"].shape[:2]
        if self.keep_ratio:
            size = rescale_size(hw, self.scale)
        else:
            size = (self.scale[1], self.scale[0])
        return _resized(sample, size, self.resize_label)

    def __repr__(self) -> str:
        return (
            f"Resize(scale={self.scale}, keep_ratio={self.keep_ratio}, "
            f"resize_label={self.resize_label})"
        )


class RandomCrop(_RandomTransform):
    """Random crop of ``size`` = (h, w) with mmseg's ``cat_max_ratio`` rule.

    Up to 10 times, a crop is redrawn unless its label holds more than one non-ignored class
    and the most frequent one covers less than ``cat_max_ratio`` of the non-ignored pixels;
    after 10 rejections the 11th crop is kept unchecked. Images smaller than the crop are
    cropped to their own size along that side (padding happens later).
    """

    def __init__(
        self,
        size: int | tuple[int, int] = (512, 512),
        cat_max_ratio: float = 0.75,
        ignore_index: int = IGNORE_INDEX,
        seed: int | None = None,
    ) -> None:
        super().__init__(seed)
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index

    def _bbox(self, hw: tuple[int, int], rng: np.random.Generator) -> tuple[int, int, int, int]:
        margin_h = max(hw[0] - self.size[0], 0)
        margin_w = max(hw[1] - self.size[1], 0)
        y0 = int(rng.integers(0, margin_h + 1))
        x0 = int(rng.integers(0, margin_w + 1))
        return y0, y0 + self.size[0], x0, x0 + self.size[1]

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        gen = self._gen(rng)
        hw = sample["image"].shape[:2]
        label = sample.get("label")
        box = self._bbox(hw, gen)
        if self.cat_max_ratio < 1.0 and label is not None:
            for _ in range(10):
                y0, y1, x0, x1 = box
                values, counts = np.unique(label[y0:y1, x0:x1], return_counts=True)
                counts = counts[values != self.ignore_index]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                box = self._bbox(hw, gen)
        y0, y1, x0, x1 = box
        out = dict(sample)
        out["image"] = sample["image"][y0:y1, x0:x1].copy()
        if label is not None:
            out["label"] = label[y0:y1, x0:x1].copy()
        meta = dict(sample.get("meta", {}))
        meta["img_shape"] = out["image"].shape[:2]
        meta["crop_box"] = (y0, y1, x0, x1)
        out["meta"] = meta
        return out

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size}, cat_max_ratio={self.cat_max_ratio})"


class RandomFlip(_RandomTransform):
    """Horizontal flip of image and label with probability ``p``."""

    def __init__(self, p: float = 0.5, seed: int | None = None) -> None:
        super().__init__(seed)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        flip = bool(self._gen(rng).random() < self.p)
        out = dict(sample)
        meta = dict(sample.get("meta", {}))
        meta["flip"] = flip
        out["meta"] = meta
        if flip:
            out["image"] = sample["image"][:, ::-1].copy()
            if sample.get("label") is not None:
                out["label"] = sample["label"][:, ::-1].copy()
        return out

    def __repr__(self) -> str:
        return f"RandomFlip(p={self.p})"


# --------------------------------------------------------------------------- photometric

_HSV_SHIFT = 12
_SDIV = np.zeros(256, dtype=np.int64)
_HDIV = np.zeros(256, dtype=np.int64)
_SDIV[1:] = np.rint((255 << _HSV_SHIFT) / np.arange(1, 256, dtype=np.float64))
_HDIV[1:] = np.rint((180 << _HSV_SHIFT) / (6.0 * np.arange(1, 256, dtype=np.float64)))
# For each hue sector: which of (v, p, q, t) lands in (r, g, b) (OpenCV's sector table).
_SECTOR_RGB = np.array([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])


def rgb_to_hsv(img: np.ndarray) -> np.ndarray:
    """uint8 RGB -> uint8 HSV with hue in [0, 180), OpenCV's 8-bit integer arithmetic."""
    rgb = img.astype(np.int64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(axis=-1)
    diff = v - rgb.min(axis=-1)
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * _SDIV[v] + half) >> _HSV_SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + half) >> _HSV_SHIFT
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], axis=-1).astype(np.uint8)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """uint8 HSV (hue in [0, 180)) -> uint8 RGB, OpenCV's float32 path."""
    h = hsv[..., 0].astype(np.float32) * np.float32(6.0 / 180.0)
    s = hsv[..., 1].astype(np.float32) * np.float32(1.0 / 255.0)
    v = hsv[..., 2].astype(np.float32) * np.float32(1.0 / 255.0)
    h = np.mod(h, np.float32(6.0))
    sector = np.floor(h).astype(np.int64)
    frac = (h - sector).astype(np.float32)
    bad = (sector < 0) | (sector >= 6)
    sector = np.where(bad, 0, sector)
    frac = np.where(bad, np.float32(0), frac)
    one = np.float32(1.0)
    tab = np.stack([v, v * (one - s), v * (one - s * frac), v * (one - s * (one - frac))], -1)
    idx = _SECTOR_RGB[sector]  # (..., 3)
    rgb = np.take_along_axis(tab, idx, axis=-1)
    rgb = np.where((s == 0)[..., None], v[..., None], rgb)
    # OpenCV's vectorised path truncates (its scalar tail rounds); we follow the former.
    return np.clip(rgb * np.float32(255.0), 0, 255).astype(np.uint8)


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """mmseg's ``convert``: float32 affine, clip to [0, 255], truncate to uint8."""
    y = x.astype(np.float32) * np.float32(alpha) + np.float32(beta)
    return np.clip(y, 0, 255).astype(np.uint8)


class PhotoMetricDistortion(_RandomTransform):
    """mmseg's PhotoMetricDistortion on the image only (the label is untouched).

    In order: brightness (+U(-delta, delta)), then contrast (x U(lo, hi)) first or last at
    random, saturation (x U(lo, hi) on S), hue (+ randint(-delta, delta) on H mod 180,
    upper bound exclusive as in mmseg). Each step applies with probability 0.5; the HSV
    steps use OpenCV's 8-bit HSV.
    """

    def __init__(
        self,
        brightness_delta: int = 32,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: int = 18,
        seed: int | None = None,
    ) -> None:
        super().__init__(seed)
        self.brightness_delta = brightness_delta
        self.contrast_range = contrast_range
        self.saturation_range = saturation_range
        self.hue_delta = hue_delta

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        gen = self._gen(rng)
        img = sample["image"]

        def coin() -> bool:
            return bool(gen.integers(2))

        if coin():
            d = self.brightness_delta
            img = _convert(img, beta=gen.uniform(-d, d))
        contrast_first = bool(gen.integers(2))
        if contrast_first and coin():
            img = _convert(img, alpha=gen.uniform(*self.contrast_range))
        if coin():
            hsv = rgb_to_hsv(img)
            hsv[..., 1] = _convert(hsv[..., 1], alpha=gen.uniform(*self.saturation_range))
            img = hsv_to_rgb(hsv)
        if coin():
            hsv = rgb_to_hsv(img)
            shift = int(gen.integers(-self.hue_delta, self.hue_delta))
            hsv[..., 0] = (hsv[..., 0].astype(np.int64) + shift) % 180
            img = hsv_to_rgb(hsv)
        if not contrast_first and coin():
            img = _convert(img, alpha=gen.uniform(*self.contrast_range))
        out = dict(sample)
        out["image"] = img if img is not sample["image"] else img.copy()
        return out

    def __repr__(self) -> str:
        return (
            f"PhotoMetricDistortion(brightness_delta={self.brightness_delta}, "
            f"contrast_range={self.contrast_range}, saturation_range={self.saturation_range}, "
            f"hue_delta={self.hue_delta})"
        )


# --------------------------------------------------------------------------- tensors


def _writable(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a if a.flags.writeable else a.copy()


class ToTensorNormalize:
    """uint8 (H, W, 3) RGB -> float32 (3, H, W) ``(x - mean) / std``; label -> int64 (H, W)."""

    def __init__(
        self,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        out = dict(sample)
        img = sample["image"]
        if not isinstance(img, torch.Tensor):
            t = torch.from_numpy(_writable(img)).permute(2, 0, 1).float()
            out["image"] = ((t - self.mean) / self.std).contiguous()
        label = sample.get("label")
        if label is not None and not isinstance(label, torch.Tensor):
            out["label"] = torch.from_numpy(np.asarray(label).astype(np.int64))
        return out

    def __repr__(self) -> str:
        return f"ToTensorNormalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


class Pad:
    """Pad bottom/right up to ``size`` = (h, w); sides already larger are left alone.

    Put it after ``ToTensorNormalize`` (as the official preprocessor does) so padded image
    pixels are exactly ``img_pad`` (0) in normalised space; label pixels get ``label_pad``.
    Works on tensors (3, H, W) / (H, W) and on numpy (H, W, 3) / (H, W).
    """

    def __init__(
        self,
        size: int | tuple[int, int] = (512, 512),
        img_pad: float = 0.0,
        label_pad: int = IGNORE_INDEX,
    ) -> None:
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.img_pad = img_pad
        self.label_pad = label_pad

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        out = dict(sample)
        img = sample["image"]
        chw = isinstance(img, torch.Tensor)
        h, w = img.shape[-2:] if chw else img.shape[:2]
        ph, pw = max(self.size[0] - h, 0), max(self.size[1] - w, 0)
        if ph or pw:
            if chw:
                out["image"] = F.pad(img, (0, pw, 0, ph), value=float(self.img_pad))
            else:
                out["image"] = np.pad(img, ((0, ph), (0, pw), (0, 0)), constant_values=self.img_pad)
            label = sample.get("label")
            if label is not None:
                if isinstance(label, torch.Tensor):
                    out["label"] = F.pad(label, (0, pw, 0, ph), value=self.label_pad)
                else:
                    out["label"] = np.pad(label, ((0, ph), (0, pw)), constant_values=self.label_pad)
        meta = dict(sample.get("meta", {}))
        meta["pad_shape"] = (h + ph, w + pw)
        out["meta"] = meta
        return out

    def __repr__(self) -> str:
        return f"Pad(size={self.size}, img_pad={self.img_pad}, label_pad={self.label_pad})"


# --------------------------------------------------------------------------- pipelines

Transform = Callable[..., Sample]


class Compose:
    """Apply transforms in order, feeding the random ones from one owned generator.

    The generator is ``default_rng(seed)`` in the main process. In a DataLoader worker it is
    re-seeded from ``[worker seed, seed]`` when first used there, so workers differ and runs
    are reproducible given ``seed`` and torch's seed. ``reseed(seed)`` resets it by hand.
    """

    def __init__(self, transforms: Iterable[Transform], seed: int | None = None) -> None:
        self.transforms = list(transforms)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self._worker_key: tuple[int, int] | None = None

    def reseed(self, seed: int | None) -> None:
        """Restart the random stream from ``seed``."""
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def _generator(self) -> np.random.Generator:
        info = torch.utils.data.get_worker_info()
        if info is not None:
            key = (info.id, info.seed)
            if key != self._worker_key:
                self._worker_key = key
                entropy = [info.seed] if self.seed is None else [info.seed, self.seed]
                self.rng = np.random.default_rng(entropy)
        return self.rng

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        gen = rng if rng is not None else self._generator()
        for t in self.transforms:
            sample = t(sample, gen)
        return sample

    def __repr__(self) -> str:
        body = "".join(f"\n    {t!r}," for t in self.transforms)
        return f"Compose([{body}\n], seed={self.seed})"


def build_train_pipeline(
    crop: int | tuple[int, int] = 512,
    scales: Sequence[int] | None = None,
    max_long: int | None = 2048,
    cat_max_ratio: float = 0.75,
    flip_p: float = 0.5,
    photometric: bool = True,
    pad: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    seed: int | None = None,
    pad_position: str = "after_normalize",
) -> Compose:
    """The official training pipeline (spec section 4).

    Short-edge resize to a random choice of ``scales`` (default ``short_edge_scales(512)``:
    256, 307, ..., 1024) with long edge <= ``max_long``, random ``crop`` with
    ``cat_max_ratio``, horizontal flip, photometric distortion, normalisation, then padding
    to the crop size (image 0 after normalisation, label 255).

    ``pad_position="before_flip"`` (RecycleLoRA's g2cbm / c2bm pipeline) pads right after the
    crop instead, with the raw pixel value 0 (label 255), so the padding is flipped, goes
    through the photometric distortion and is normalised to ``-mean / std``; nothing is padded
    after normalisation then. ``pad=False`` pads nowhere.
    """
    if pad_position not in PAD_POSITIONS:
        raise ValueError(
            f"pad_position must be one of {', '.join(PAD_POSITIONS)}, got {pad_position!r}"
        )
    crop_hw = (crop, crop) if isinstance(crop, int) else (int(crop[0]), int(crop[1]))
    steps: list[Transform] = [
        RandomResizeShortEdge(scales if scales is not None else short_edge_scales(512), max_long),
        RandomCrop(crop_hw, cat_max_ratio=cat_max_ratio),
    ]
    if pad and pad_position == "before_flip":
        steps.append(Pad(crop_hw, img_pad=0, label_pad=IGNORE_INDEX))
    steps.append(RandomFlip(flip_p))
    if photometric:
        steps.append(PhotoMetricDistortion())
    steps.append(ToTensorNormalize(mean, std))
    if pad and pad_position == "after_normalize":
        steps.append(Pad(crop_hw, img_pad=0.0, label_pad=IGNORE_INDEX))
    return Compose(steps, seed=seed)


def eval_scale(dataset_name: str, crop: int = 512) -> tuple[int, int] | None:
    """The evaluation resize (w, h) for a dataset in the 512 or 1024 setting (None: no resize)."""
    table = EVAL_SCALES_1024 if crop >= 1024 else EVAL_SCALES
    key = dataset_name.lower()
    if key not in table:
        raise KeyError(
            f"no evaluation scale for dataset {dataset_name!r}; known: {', '.join(sorted(table))}"
        )
    return table[key]


def build_eval_pipeline(
    dataset_name: str,
    crop: int = 512,
    scale: tuple[int, int] | None = None,
    resize: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Compose:
    """Evaluation pipeline: keep-ratio resize of the image only (the label stays at its
    original resolution), then normalisation. The resize scale (w, h) is ``scale`` if given,
    else ``eval_scale(dataset_name, crop)``; ``resize=False`` keeps the original size.
    """
    size = scale if scale is not None else eval_scale(dataset_name, crop)
    steps: list[Transform] = []
    if resize and size is not None:
        steps.append(Resize(size, keep_ratio=True, resize_label=False))
    steps.append(ToTensorNormalize(mean, std))
    return Compose(steps)
