"""Reading images and label maps from disk, with errors that name the file and the problem.

Images come back as ``uint8`` (H, W, 3) RGB in stored pixel order (EXIF orientation is not
applied, so an image always lines up with its label). Greyscale images are repeated over the
three channels; an alpha channel is dropped (not composited). 16-bit images keep their high
byte (``value >> 8``, a fixed scale that does not depend on the image's own range): the same
rule Pillow applies to 16-bit RGB PNGs, so every 16-bit image is read alike. Label maps come
back as (H, W) integer arrays: palette PNGs give their palette indices, 16-bit PNGs their
full values.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DataError
from .labels import IGNORE_INDEX, apply_lut

__all__ = ["check_same_size", "read_image", "read_label"]

PathLike = str | os.PathLike


def _open(path: PathLike, what: str) -> Image.Image:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{what} file not found: {p}")
    if not p.is_file():
        raise DataError(f"{what} path is not a file: {p}")
    try:
        img = Image.open(p)
    except Exception as exc:  # UnidentifiedImageError, OSError, DecompressionBombError...
        raise DataError(f"cannot read {what} file {p}: not a readable image ({exc})") from exc
    return img


def _load(img: Image.Image, path: PathLike, what: str) -> None:
    try:
        img.load()
    except Exception as exc:  # truncated or corrupt data surfaces only when decoding
        raise DataError(f"cannot decode {what} file {path}: corrupt or truncated ({exc})") from exc


def _grey16_to_rgb8(img: Image.Image, path: PathLike) -> np.ndarray:
    """(H, W, 3) ``uint8`` from a 16-bit (``I;16*``) or 32-bit integer (``I``) greyscale image.

    The high byte is kept (``value >> 8``): 0..65535 maps onto 0..255 whatever the image's own
    range. Pillow's ``convert("RGB")`` would clip every value above 255 to white instead.
    """
    arr = np.asarray(img).astype(np.int64)
    if arr.ndim != 2:
        raise DataError(f"image {path} (mode {img.mode}) decoded to shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise DataError(
            f"image {path} is a 32-bit integer image with values {int(arr.min())}..."
            f"{int(arr.max())}, outside the 16-bit range 0..65535; convert it to an 8- or "
            "16-bit image"
        )
    grey = (arr >> 8).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def read_image(path: PathLike) -> np.ndarray:
    """Read an image file as a ``uint8`` (H, W, 3) RGB array; raise DataError if unusable.

    Greyscale (8- or 16-bit) becomes three equal channels, 16-bit values keep their high byte
    (``>> 8``), and RGBA / LA / palette images lose their alpha (see the module docstring).
    """
    with _open(path, "image") as img:
        _load(img, path, "image")
        if img.mode == "I" or img.mode.startswith("I;16"):
            arr = _grey16_to_rgb8(img, path)
        else:
            if img.mode != "RGB":
                try:
                    img = img.convert("RGB")
                except Exception as exc:
                    raise DataError(
                        f"cannot convert image {path} (mode {img.mode}) to RGB ({exc})"
                    ) from exc
            arr = np.array(img, dtype=np.uint8)  # a writable copy
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.size == 0:
        raise DataError(f"image {path} decoded to an unusable array of shape {arr.shape}")
    return arr


# Multi-channel 16-bit PNGs (SYNTHIA labels): Pillow decodes them to 8 bits per channel by
# keeping the high byte only. Decoding the same data a second time with the little-endian
# unpacker yields the low bytes, so the two passes together give the exact 16-bit values.
_PNG16_RAWMODES = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L"}


def _with_rawmode(tile: tuple, rawmode: str) -> tuple:
    if hasattr(tile, "_replace"):  # Pillow >= 11 tiles are named tuples
        return tile._replace(args=rawmode)
    return (tile[0], tile[1], tile[2], rawmode)


def _read_png16_channels(path: PathLike) -> np.ndarray | None:
    """Return (H, W, C) uint16 for a multi-channel 16-bit PNG, or None for any other file."""
    with Image.open(path) as probe:
        if probe.format != "PNG" or len(probe.tile) != 1:
            return None
        rawmode = probe.tile[0][3]
        rawmode = rawmode[0] if isinstance(rawmode, tuple) else rawmode
    if rawmode == "LA;16B":  # grey+alpha: decode the 4 bytes per pixel as 8-bit RGBA
        with Image.open(path) as img:
            img.tile = [_with_rawmode(img.tile[0], "RGBA")]
            _load(img, path, "label")
            b = np.asarray(img, dtype=np.uint16)
        return np.stack([b[..., 0] * 256 + b[..., 1], b[..., 2] * 256 + b[..., 3]], axis=-1)
    if rawmode not in _PNG16_RAWMODES:
        return None
    planes = []
    for mode in (rawmode, _PNG16_RAWMODES[rawmode]):
        with Image.open(path) as img:
            img.tile = [_with_rawmode(img.tile[0], mode)]
            _load(img, path, "label")
            planes.append(np.asarray(img, dtype=np.uint16))
    return planes[0] * 256 + planes[1]


def _decode_label(path: PathLike, channel: int | None) -> np.ndarray:
    with _open(path, "label") as img:
        mode = img.mode
        if mode in ("RGB", "RGBA"):
            try:
                wide = _read_png16_channels(path)
            except DataError:
                raise
            except Exception as exc:
                raise DataError(f"cannot decode 16-bit label file {path} ({exc})") from exc
            if wide is not None:
                return wide[..., 0 if channel is None else channel].astype(np.int32)
        _load(img, path, "label")
        if mode in ("P", "L", "1"):
            arr = np.array(img.convert("L") if mode == "1" else img)
        elif mode.startswith("I"):  # 16/32-bit greyscale
            arr = np.asarray(img).astype(np.int32)
        elif mode == "LA":
            arr = np.array(img)[..., 0 if channel is None else channel]
        elif mode in ("RGB", "RGBA"):
            arr = np.array(img)
            if channel is not None:
                arr = arr[..., channel]
            elif (arr[..., :3] == arr[..., :1]).all():
                arr = arr[..., 0]
            else:
                raise DataError(
                    f"label file {path} is a colour ({mode}) image with differing channels; "
                    "expected a single-channel id/trainId map (a colourised label cannot be "
                    "mapped back to ids)"
                )
        else:
            raise DataError(f"label file {path} has unsupported image mode {mode}")
    if arr.ndim != 2:
        raise DataError(f"label file {path} decoded to shape {arr.shape}, expected (H, W)")
    return arr


def read_label(
    path: PathLike,
    mapping: np.ndarray | None = None,
    num_classes: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    channel: int | None = None,
) -> np.ndarray:
    """Read a label map as (H, W) integers, map it and check its values.

    Args:
        path: label image (PNG, palette or greyscale; 16-bit is read exactly).
        mapping: optional 256-entry lookup table from stored id to trainId.
        num_classes: if given, every value (after mapping) must be in
            ``[0, num_classes)`` or equal ``ignore_index``.
        ignore_index: the "no label" value, 255.
        channel: for multi-channel label images, which channel holds the ids (SYNTHIA: 0).
            By default a colour label is accepted only when its channels are equal.

    Returns ``uint8`` when the values fit, else ``int32``. Raises DataError otherwise.
    """
    arr = _decode_label(path, channel)
    if mapping is not None:
        try:
            arr = apply_lut(arr, mapping)
        except ValueError as exc:
            raise DataError(f"label file {path}: {exc}") from exc
    elif arr.dtype != np.uint8 and arr.size and 0 <= arr.min() and arr.max() <= 255:
        arr = arr.astype(np.uint8)
    if num_classes is not None:
        bad_mask = (arr >= num_classes) & (arr != ignore_index)
        if arr.dtype != np.uint8:
            bad_mask |= arr < 0
        if bad_mask.any():
            bad = np.unique(arr[bad_mask])
            shown = ", ".join(str(int(v)) for v in bad[:10]) + (" ..." if bad.size > 10 else "")
            raise DataError(
                f"label file {path} has values outside [0, {num_classes}) and not "
                f"{ignore_index}: {shown} ({int(bad_mask.sum())} pixels). Is the label in "
                "trainIds, or does it need an id -> trainId mapping?"
            )
    return arr


def check_same_size(
    image: np.ndarray, label: np.ndarray, image_path: PathLike, label_path: PathLike
) -> None:
    """Raise DataError if an image and its label map differ in height or width."""
    if image.shape[:2] != label.shape[:2]:
        (ih, iw), (lh, lw) = image.shape[:2], label.shape[:2]
        raise DataError(
            f"image and label sizes differ: image {image_path} is {iw}x{ih} (WxH) but "
            f"label {label_path} is {lw}x{lh}"
        )
