"""Cityscapes-C style robustness evaluation: 15 image corruptions x 5 severities.

The corruptions follow the ImageNet-C definitions (Hendrycks & Dietterich, 2019) in the form
used for Cityscapes-C (Kamann & Rother, 2020; the ``imagecorruptions`` parameter tables):
noise (gaussian, shot, impulse), blur (defocus, glass, motion, zoom), weather (snow, frost,
fog, brightness) and digital (contrast, elastic, pixelate, JPEG). They are implemented here in
numpy / scipy / Pillow, because ``imagecorruptions`` 1.1.2 no longer runs with numpy 2 and
scikit-image >= 0.19 (``glass_blur`` and ``fog`` fail) and draws from numpy's global RNG.

Differences from the reference code, on purpose:

* every random draw comes from a ``numpy.random.Generator`` seeded from
  ``(seed, corruption, severity, image key)``, so a rerun corrupts every image identically
  whatever the order, the worker or the machine;
* ``frost`` blends a procedurally generated ice texture instead of the six frost photographs
  that ship with ``imagecorruptions``, so frost numbers are close to, but not strictly
  comparable with, published Cityscapes-C frost numbers;
* ``glass_blur`` reproduces what the reference code actually does: its tuple "swap" of numpy
  views copies the displaced pixel one way (the pixel at the displaced position is kept).

The corruption is applied to the uint8 RGB image *before* the evaluation pipeline (resize,
normalisation), by :class:`CorruptedDataset`, which wraps any :class:`rein.data.SegDataset`.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage, signal
from torch import nn
from torch.utils.data import Dataset

__all__ = [
    "CORRUPTIONS",
    "SEVERITIES",
    "Corrupt",
    "CorruptedDataset",
    "corrupt",
    "corruption_seed",
    "evaluate_corruptions",
    "format_corruption_table",
]

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

Array = np.ndarray


# =========================================================================== helpers


def _blur(
    x: Array, sigma: float | Sequence[float], mode: str = "nearest", truncate: float = 4.0
) -> Array:
    """Gaussian blur over the two spatial axes only (channels stay independent)."""
    sig = [sigma, sigma] if np.isscalar(sigma) else list(sigma)
    if x.ndim == 3:
        sig = [*sig, 0.0]
    return ndimage.gaussian_filter(x, sigma=sig, mode=mode, truncate=truncate)


def _disk_kernel(radius: float, alias_blur: float) -> Array:
    """Normalised disk (defocus) kernel, slightly blurred against aliasing."""
    half = 8 if radius <= 8 else int(radius)
    ksize = 3 if radius <= 8 else 5
    coords = np.arange(-half, half + 1)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float32)
    disk /= disk.sum()
    taps = np.arange(ksize) - ksize // 2
    g = np.exp(-(taps**2) / (2.0 * alias_blur**2))
    g /= g.sum()
    disk = ndimage.correlate1d(disk, g, axis=0, mode="mirror")
    return ndimage.correlate1d(disk, g, axis=1, mode="mirror")


def _plasma(size: int, decay: float, rng: np.random.Generator) -> Array:
    """Diamond-square fractal height map (``size`` a power of two, toroidal), in [0, 1]."""
    grid = np.zeros((size, size), dtype=np.float64)
    step, wibble = size, 100.0

    def jitter(total: Array) -> Array:
        return total / 4.0 + wibble * rng.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        corners = grid[0::step, 0::step]
        square = corners + np.roll(corners, -1, axis=0)
        square = square + np.roll(square, -1, axis=1)
        grid[half::step, half::step] = jitter(square)
        centres = grid[half::step, half::step]
        grid[0::step, half::step] = jitter(
            centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        )
        grid[half::step, 0::step] = jitter(
            centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        )
        step = half
        wibble /= decay
    grid -= grid.min()
    return grid / max(grid.max(), 1e-12)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _clipped_zoom(x: Array, factor: float) -> Array:
    """Zoom into the centre by ``factor`` (>= 1); the result is at least the input size."""
    h, w = x.shape[:2]
    ch, cw = math.ceil(h / factor), math.ceil(w / factor)
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[top : top + ch, left : left + cw]
    zoom = (factor, factor) + (1,) * (x.ndim - 2)
    return ndimage.zoom(crop, zoom, order=1)


def _shift_edge(x: Array, dx: int, dy: int) -> Array:
    """Translate by (dx, dy) pixels, replicating the border."""
    h, w = x.shape[:2]
    rows = np.clip(np.arange(h) - dy, 0, h - 1)
    cols = np.clip(np.arange(w) - dx, 0, w - 1)
    return x[rows][:, cols]


def _motion_blur(x: Array, radius: int, sigma: float, angle: float) -> Array:
    """Directional blur: a half-Gaussian weighted sum of copies shifted along ``angle``."""
    width = 2 * radius + 1
    taps = np.exp(-(np.arange(width) ** 2) / (2.0 * sigma**2))
    taps /= taps.sum()
    sin, cos = math.sin(math.radians(angle)), math.cos(math.radians(angle))
    out = np.zeros(x.shape, dtype=np.float32)
    for i in range(width):
        dy = -math.ceil(i * sin - 0.5)
        dx = -math.ceil(i * cos - 0.5)
        if abs(dy) >= x.shape[0] or abs(dx) >= x.shape[1]:
            break  # the motion left the image
        out += taps[i] * _shift_edge(x, dx, dy)
    return out


def _gray(x: Array) -> Array:
    """ITU-R 601 luma of an RGB image (H, W, 3) -> (H, W, 1)."""
    return (x @ np.array([0.299, 0.587, 0.114], dtype=x.dtype))[..., None]


# =========================================================================== corruptions
# Each takes float RGB in [0, 255] (H, W, 3), a severity in 1..5 and a Generator, and returns
# float values in [0, 255] of the same shape.


def _gaussian_noise(x: Array, s: int, rng: np.random.Generator) -> Array:
    c = (0.08, 0.12, 0.18, 0.26, 0.38)[s - 1]
    x = x / 255.0
    return np.clip(x + rng.normal(0.0, c, x.shape), 0, 1) * 255


def _shot_noise(x: Array, s: int, rng: np.random.Generator) -> Array:
    c = (60, 25, 12, 5, 3)[s - 1]
    x = x / 255.0
    return np.clip(rng.poisson(x * c) / float(c), 0, 1) * 255


def _impulse_noise(x: Array, s: int, rng: np.random.Generator) -> Array:
    c = (0.03, 0.06, 0.09, 0.17, 0.27)[s - 1]
    x = x / 255.0
    hit = rng.random(x.shape) <= c
    salt = rng.random(x.shape) <= 0.5
    x = np.where(hit & salt, 1.0, x)
    x = np.where(hit & ~salt, 0.0, x)
    return x * 255


def _defocus_blur(x: Array, s: int, rng: np.random.Generator) -> Array:
    radius, alias = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))[s - 1]
    kernel = _disk_kernel(radius, alias)  # symmetric: correlation == convolution
    x = (x / 255.0).astype(np.float64)
    r = kernel.shape[0] // 2
    # Mirror padding without repeating the edge (OpenCV's default border), then an FFT
    # convolution: the same as ndimage.correlate(mode="mirror"), several times faster.
    padded = np.pad(x, ((r, r), (r, r), (0, 0)), mode="reflect")
    out = signal.fftconvolve(padded, kernel[..., None], mode="valid", axes=(0, 1))
    return np.clip(out, 0, 1) * 255


def _glass_blur(x: Array, s: int, rng: np.random.Generator) -> Array:
    sigma, delta, iterations = ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2))[
        s - 1
    ]
    x = np.clip(_blur(x / 255.0, sigma), 0, 1)
    x = (x * 255).astype(np.uint8)
    h, w = x.shape[:2]
    rows = np.arange(h - delta, delta, -1)
    cols = np.arange(w - delta, delta, -1)
    if rows.size and cols.size:
        # Pixel (r, c) takes the value at (r + dy, c + dx), visiting pixels bottom-right to
        # top-left, sequentially (a later pixel may read an already displaced one). Tracking
        # the source index of every pixel makes this exact and fast.
        src = list(range(h * w))
        tgt = (rows[:, None] * w + cols[None, :]).ravel()
        for _ in range(iterations):
            d = rng.integers(-delta, delta, size=(tgt.size, 2))
            for t, f in zip(tgt.tolist(), (tgt + d[:, 1] * w + d[:, 0]).tolist()):
                src[t] = src[f]
        x = x.reshape(h * w, -1)[np.asarray(src)].reshape(x.shape)
    return np.clip(_blur(x / 255.0, sigma), 0, 1) * 255


def _motion_blur_c(x: Array, s: int, rng: np.random.Generator) -> Array:
    radius, sigma = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))[s - 1]
    angle = rng.uniform(-45, 45)
    return np.clip(_motion_blur(x.astype(np.float32), radius, sigma, angle), 0, 255)


def _zoom_blur(x: Array, s: int, rng: np.random.Generator) -> Array:
    factors = (
        np.arange(1, 1.11, 0.01),
        np.arange(1, 1.16, 0.01),
        np.arange(1, 1.21, 0.02),
        np.arange(1, 1.26, 0.02),
        np.arange(1, 1.31, 0.03),
    )[s - 1]
    x = (x / 255.0).astype(np.float32)
    h, w = x.shape[:2]
    acc = x.copy()
    for f in factors:
        acc += _clipped_zoom(x, float(f))[:h, :w]
    return np.clip(acc / (len(factors) + 1), 0, 1) * 255


def _snow(x: Array, s: int, rng: np.random.Generator) -> Array:
    mean, std, zoom, thresh, radius, sigma, keep = (
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
        (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
        (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
        (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
    )[s - 1]
    x = (x / 255.0).astype(np.float32)
    h, w = x.shape[:2]
    flakes = _clipped_zoom(rng.normal(mean, std, (h, w)), zoom)
    flakes[flakes < thresh] = 0
    flakes = np.clip(flakes, 0, 1).astype(np.float32)
    flakes = _motion_blur(flakes, radius, sigma, rng.uniform(-135, -45))
    flakes = (np.round(np.clip(flakes, 0, 1) * 255) / 255.0)[:h, :w, None]
    x = keep * x + (1 - keep) * np.maximum(x, _gray(x) * 1.5 + 0.5)
    return np.clip(x + flakes + np.rot90(flakes, k=2), 0, 1) * 255


def _frost_texture(h: int, w: int, rng: np.random.Generator) -> Array:
    """A procedural ice-crystal texture (H, W, 3) in [0, 255]: thin bright ridges of fractal
    noise at two scales over patchy cover and fine grain, tinted blue-white. Its brightness
    statistics (mean about 160, spread about 28 grey levels, blue > green > red) are those
    of the frost photographs used by ImageNet-C."""
    size = _next_pow2(max(h, w))

    def window(decay: float) -> Array:
        return _plasma(size, decay, rng)[:h, :w]

    veins = 1.0 - np.abs(2.0 * window(1.6) - 1.0)  # ridges where the fractal crosses 0.5
    fine = 1.0 - np.abs(2.0 * window(1.3) - 1.0)
    cover = window(2.6)
    ice = 0.55 * veins**6 + 0.35 * fine**10 + 0.35 * cover + 0.08 * rng.random((h, w))
    ice = _blur(ice, 0.6)
    ice = (ice - ice.mean()) / max(float(ice.std()), 1e-6)
    grey = np.clip(0.63 + 0.11 * ice, 0, 1)
    tint = np.array([0.89, 1.0, 1.08]) / 0.99
    return np.clip(grey[..., None] * tint, 0, 1) * 255.0


def _frost(x: Array, s: int, rng: np.random.Generator) -> Array:
    keep, amount = ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75))[s - 1]
    frost = _frost_texture(x.shape[0], x.shape[1], rng)
    return np.clip(keep * x + amount * frost, 0, 255)


def _fog(x: Array, s: int, rng: np.random.Generator) -> Array:
    strength, decay = ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))[s - 1]
    h, w = x.shape[:2]
    x = x / 255.0
    peak = x.max()
    haze = _plasma(_next_pow2(max(h, w)), decay, rng)[:h, :w, None]
    x = x + strength * haze
    return np.clip(x * peak / (peak + strength), 0, 1) * 255


def _brightness(x: Array, s: int, rng: np.random.Generator) -> Array:
    c = (0.1, 0.2, 0.3, 0.4, 0.5)[s - 1]
    x = x / 255.0
    # HSV value + c with hue and saturation kept: every channel scales with V (= max).
    v = x.max(axis=2, keepdims=True)
    v_new = np.clip(v + c, 0, 1)
    out = np.where(v > 0, x * (v_new / np.maximum(v, 1e-12)), v_new)
    return np.clip(out, 0, 1) * 255


def _contrast(x: Array, s: int, rng: np.random.Generator) -> Array:
    c = (0.4, 0.3, 0.2, 0.1, 0.05)[s - 1]
    x = x / 255.0
    mean = x.mean(axis=(0, 1), keepdims=True)
    return np.clip((x - mean) * c + mean, 0, 1) * 255


def _elastic_transform(x: Array, s: int, rng: np.random.Generator) -> Array:
    alpha = 250 * (0.05, 0.065, 0.085, 0.1, 0.12)[s - 1]
    x = (x / 255.0).astype(np.float32)
    h, w = x.shape[:2]
    sigma = (h * 0.01, w * 0.01)
    max_d = h * 0.005
    dx = _blur(rng.uniform(-max_d, max_d, (h, w)), sigma, mode="reflect", truncate=3) * alpha
    dy = _blur(rng.uniform(-max_d, max_d, (h, w)), sigma, mode="reflect", truncate=3) * alpha
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    coords = np.stack([yy + dy, xx + dx]).astype(np.float32)
    out = np.stack(
        [
            ndimage.map_coordinates(x[..., ch], coords, order=1, mode="reflect")
            for ch in range(x.shape[2])
        ],
        -1,
    )
    return np.clip(out, 0, 1) * 255


def _pixelate(x: Array, s: int, rng: np.random.Generator) -> Array:
    c = (0.6, 0.5, 0.4, 0.3, 0.25)[s - 1]
    h, w = x.shape[:2]
    img = Image.fromarray(x.astype(np.uint8))
    small = img.resize((max(1, int(w * c)), max(1, int(h * c))), Image.Resampling.BOX)
    return np.asarray(small.resize((w, h), Image.Resampling.NEAREST), dtype=np.float32)


def _jpeg_compression(x: Array, s: int, rng: np.random.Generator) -> Array:
    quality = (25, 18, 15, 10, 7)[s - 1]
    buf = io.BytesIO()
    Image.fromarray(x.astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float32)


_FUNCS: dict[str, Callable[[Array, int, np.random.Generator], Array]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "glass_blur": _glass_blur,
    "motion_blur": _motion_blur_c,
    "zoom_blur": _zoom_blur,
    "snow": _snow,
    "frost": _frost,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "elastic_transform": _elastic_transform,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
}


def _check(name: str, severity: int) -> None:
    if name not in _FUNCS:
        import difflib

        close = difflib.get_close_matches(name, CORRUPTIONS, n=1)
        hint = (
            f"; did you mean '{close[0]}'?" if close else f"; choose from {', '.join(CORRUPTIONS)}"
        )
        raise ValueError(f"unknown corruption '{name}'{hint}")
    if isinstance(severity, bool) or int(severity) != severity or severity not in SEVERITIES:
        raise ValueError(f"corruption severity must be an integer in 1..5, got {severity!r}")


def corruption_seed(name: str, severity: int, key: str | int, seed: int = 0) -> int:
    """A 64-bit seed from ``(seed, corruption, severity, image key)``, stable across runs,
    processes and machines (no Python ``hash``)."""
    text = f"{int(seed)}|{name}|{int(severity)}|{key}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def corrupt(
    image: Array,
    name: str,
    severity: int,
    rng: np.random.Generator | int | None = None,
) -> Array:
    """Corrupt an RGB uint8 image (H, W, 3) with corruption ``name`` at ``severity`` (1..5).

    ``rng`` is a Generator or a seed (None: seed 0), so the same arguments always give the
    same bytes. Returns a new uint8 array of the same shape (values truncated, as in
    ImageNet-C).
    """
    _check(name, severity)
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"corrupt() needs an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}; "
            "apply corruptions before normalisation"
        )
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(0 if rng is None else rng)
    out = _FUNCS[name](image.astype(np.float32), int(severity), rng)
    out = np.clip(np.nan_to_num(np.asarray(out, dtype=np.float32)), 0, 255)
    return out.astype(np.uint8)


def _image_key(meta: Mapping[str, Any]) -> str:
    """The per-image part of the seed: index and file name (not the machine-specific root)."""
    index = meta.get("index", "")
    path = meta.get("image_path")
    name = Path(str(path)).name if path else ""
    if path and str(path).startswith("synthetic://"):
        name = str(path)
    return f"{index}:{name}"


class Corrupt:
    """Sample transform: corrupt ``sample["image"]`` (uint8 RGB) deterministically per image.

    The seed comes from ``(seed, name, severity, meta index + file name)``; the corruption is
    recorded in ``meta["corruption"]``. Put it *before* resizing and normalisation.
    """

    def __init__(self, name: str, severity: int, seed: int = 0) -> None:
        _check(name, severity)
        self.name, self.severity, self.seed = name, int(severity), int(seed)

    def __call__(
        self, sample: dict[str, Any], rng: np.random.Generator | None = None
    ) -> dict[str, Any]:
        image = sample["image"]
        if not isinstance(image, np.ndarray):
            raise TypeError(
                "Corrupt needs the raw uint8 image (numpy); it must run before the "
                "normalising transform"
            )
        meta = dict(sample.get("meta", {}))
        key = _image_key(meta)
        local = np.random.default_rng(corruption_seed(self.name, self.severity, key, self.seed))
        out = dict(sample)
        out["image"] = corrupt(image, self.name, self.severity, local)
        meta["corruption"] = {"name": self.name, "severity": self.severity}
        out["meta"] = meta
        return out

    def __repr__(self) -> str:
        return f"Corrupt({self.name!r}, severity={self.severity}, seed={self.seed})"


class _Then:
    """``second(first(sample))``; picklable for DataLoader workers."""

    def __init__(self, first: Callable, second: Callable | None) -> None:
        self.first, self.second = first, second

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        sample = self.first(sample)
        return sample if self.second is None else self.second(sample)


class CorruptedDataset(Dataset):
    """A :class:`rein.data.SegDataset` whose images are corrupted before its own transform.

    Sample ``i`` is ``dataset.sample(i, Corrupt(...) then dataset.transform)``: the raw uint8
    image is corrupted, then the dataset's evaluation pipeline (resize, normalisation) runs
    as usual. Labels are untouched.
    """

    def __init__(self, dataset: Any, name: str, severity: int, seed: int = 0) -> None:
        if not (hasattr(dataset, "sample") and hasattr(dataset, "load")):
            raise TypeError(
                f"CorruptedDataset wraps a rein SegDataset (with load/sample), got "
                f"{type(dataset).__name__}"
            )
        self.dataset = dataset
        self.corruption = Corrupt(name, severity, seed)
        self.name = f"{getattr(dataset, 'name', 'dataset')}-{name}-{int(severity)}"

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        transform = _Then(self.corruption, getattr(self.dataset, "transform", None))
        return self.dataset.sample(index, transform)

    def __repr__(self) -> str:
        return f"CorruptedDataset({self.dataset!r}, {self.corruption!r})"


# =========================================================================== evaluation


def evaluate_corruptions(
    model: nn.Module,
    datasets: Mapping[str, Dataset],
    num_classes: int,
    eval_cfg: Any,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    seed: int = 0,
    device: Any = "cpu",
    progress: bool = False,
    distributed: bool = False,
    num_workers: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """mIoU for every (corruption, severity) over the target ``datasets``.

    With several target datasets a cell is their average mIoU (the DG average). Returns::

        {"corruptions": [...], "severities": [...],
         "mIoU": {corruption: {"1": miou, ..., "mean": mean over severities}},
         "severity_mean": {"1": mean over corruptions, ..., "mean": overall},
         "mean": overall mean, "seed": seed,
         "domains": {corruption: {"1": {dataset: miou}}}}

    Severities are string keys, so the dict is the same after a JSON round trip. Corrupting
    a full-size image costs up to a few CPU seconds; ``num_workers`` DataLoader workers do
    it in parallel (results do not depend on it: the noise is seeded per image).
    """
    from rein.engine.evaluate import evaluate_domains

    corruptions = list(dict.fromkeys(corruptions))
    severities = sorted({int(s) for s in severities})
    if not corruptions or not severities:
        raise ValueError("evaluate_corruptions needs at least one corruption and one severity")
    for c in corruptions:
        for s in severities:
            _check(c, s)
    if not datasets:
        raise ValueError("no target datasets to evaluate")
    table: dict[str, dict[str, float]] = {}
    per_domain: dict[str, dict[str, dict[str, float]]] = {}
    for c in corruptions:
        table[c], per_domain[c] = {}, {}
        for s in severities:
            wrapped = {name: CorruptedDataset(ds, c, s, seed) for name, ds in datasets.items()}
            res = evaluate_domains(
                model,
                wrapped,
                num_classes,
                eval_cfg,
                device=device,
                progress=progress,
                distributed=distributed,
                desc=f"{c} s{s}",
                num_workers=num_workers,
            )
            per_domain[c][str(s)] = {k: v["mIoU"] for k, v in res.items() if isinstance(v, dict)}
            table[c][str(s)] = float(res["DG avg"])
            if log is not None:
                log(f"{c} severity {s}: mIoU {table[c][str(s)]:.2f}")
        table[c]["mean"] = _mean(table[c][str(s)] for s in severities)
    sev_mean = {str(s): _mean(table[c][str(s)] for c in corruptions) for s in severities}
    overall = _mean(table[c][str(s)] for c in corruptions for s in severities)
    sev_mean["mean"] = overall
    return {
        "corruptions": corruptions,
        "severities": severities,
        "mIoU": table,
        "severity_mean": sev_mean,
        "mean": overall,
        "seed": int(seed),
        "domains": per_domain,
    }


def _mean(values: Any) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def format_corruption_table(results: Mapping[str, Any], digits: int = 2) -> str:
    """Markdown table of :func:`evaluate_corruptions` results: one row per corruption, one
    column per severity, then the mean; a last row averages over the corruptions."""
    from rein.engine.metrics import markdown_table

    sevs = [str(s) for s in results["severities"]]

    def fmt(v: float) -> str:
        return "-" if v is None or math.isnan(v) else f"{v:.{digits}f}"

    rows = [
        [c, *(fmt(results["mIoU"][c][s]) for s in sevs), fmt(results["mIoU"][c]["mean"])]
        for c in results["corruptions"]
    ]
    rows.append(["mean", *(fmt(results["severity_mean"][s]) for s in sevs), fmt(results["mean"])])
    return markdown_table(["corruption", *(f"s{s}" for s in sevs), "mean"], rows)
