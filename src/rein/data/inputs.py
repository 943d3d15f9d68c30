"""The image inputs of ``rein predict``: finding the files, naming their outputs, and the
evaluation preprocessing of one image.

* :func:`find_images` expands directories recursively to the files with an image suffix
  (:data:`IMAGE_SUFFIXES`, any letter case); files named explicitly are kept whatever their
  suffix.
* :func:`output_names` gives every file a distinct output name: its path relative to the
  folder all inputs share, without the suffix (``a/x.png`` and ``b/x.png`` -> ``a/x`` and
  ``b/x``), so two inputs never write the same outputs.
* :func:`eval_input` turns a ``uint8`` image into the normalised tensor evaluation feeds the
  model: :func:`rein.data.transforms.build_eval_pipeline` (keep-ratio resize of the ``uint8``
  image, then normalisation), exactly the transform of the evaluation datasets.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from .transforms import build_eval_pipeline

__all__ = ["IMAGE_SUFFIXES", "eval_input", "find_images", "is_image_file", "output_names"]

# Suffixes searched for in directories (compared in lower case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` has one of :data:`IMAGE_SUFFIXES` (any letter case)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def _inside(path: str, folder: str | None) -> bool:
    return folder is not None and (
        path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)
    )


def find_images(
    inputs: Iterable[str | os.PathLike], exclude: str | os.PathLike | None = None
) -> tuple[list[Path], list[str]]:
    """The image files named by ``inputs``, and a one-line problem per unusable input.

    A directory contributes every file below it (recursively) with an image suffix, sorted;
    files under ``exclude`` (e.g. the output folder) are left out of directory searches. A file
    is kept as named. A file reached twice is listed once. Problems: an input that does not
    exist, or a directory with no image file.
    """
    excluded = os.path.abspath(exclude) if exclude is not None else None
    files: list[Path] = []
    problems: list[str] = []
    seen: set[str] = set()

    def add(path: Path) -> None:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            files.append(path)

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if is_image_file(p) and p.is_file() and not _inside(os.path.abspath(p), excluded)
            )
            if not found:
                problems.append(
                    f"no image files ({', '.join(IMAGE_SUFFIXES)}) found in directory {path}"
                )
            for p in found:
                add(p)
        elif path.is_file():
            add(path)
        elif path.exists():
            problems.append(f"{path} is neither a file nor a directory")
        else:
            problems.append(f"input not found: {path}")
    return files, problems


def output_names(files: Sequence[str | os.PathLike]) -> list[str]:
    """A distinct output name per file: the POSIX path relative to the folder the files share,
    without the suffix (``street.png`` -> ``street``; ``a/x.png``, ``b/x.png`` -> ``a/x``,
    ``b/x``).

    Files that would still share a name (``x.png`` next to ``x.jpg``) get their suffix
    appended (``x_png``, ``x_jpg``), then a counter if needed. Names are compared ignoring
    letter case, so they stay distinct on case-insensitive file systems too.
    """
    if not files:
        return []
    absolute = [Path(os.path.abspath(f)) for f in files]
    common = Path(os.path.commonpath([str(p.parent) for p in absolute]))
    bases = [p.relative_to(common).with_suffix("").as_posix() for p in absolute]
    counts: dict[str, int] = {}
    for b in bases:
        counts[b.casefold()] = counts.get(b.casefold(), 0) + 1
    names: list[str] = []
    used: set[str] = set()
    for base, path in zip(bases, absolute):
        name = base
        if counts[base.casefold()] > 1:
            ext = path.suffix.lstrip(".").lower()
            name = f"{base}_{ext}" if ext else base
        candidate, n = name, 2
        while candidate.casefold() in used or (
            candidate != base and candidate.casefold() in counts
        ):
            candidate = f"{name}_{n}"
            n += 1
        used.add(candidate.casefold())
        names.append(candidate)
    return names


def eval_input(
    image: np.ndarray,
    scale: tuple[int, int] | None = None,
    crop_size: int = 512,
    min_side: int = 1,
) -> tuple[torch.Tensor, bool]:
    """The normalised (3, H, W) tensor evaluation feeds the model for a ``uint8`` RGB image.

    ``scale`` = (w, h) is the keep-ratio evaluation resize (None: the original size), applied
    by :func:`build_eval_pipeline` to the ``uint8`` image before normalisation, as for every
    evaluation dataset. An image whose short side would come out below ``min_side`` (the
    smallest input the model can run on) is instead resized, keeping its ratio, from the
    original so that its short side is ``min_side``; the second value says whether that
    happened.
    """
    h, w = image.shape[:2]
    sample = {"image": image, "meta": {"ori_shape": (h, w), "img_shape": (h, w)}}
    pipeline = build_eval_pipeline("folder", crop=crop_size, scale=scale, resize=scale is not None)
    x = pipeline(sample)["image"]
    if min(x.shape[-2:]) >= min_side:
        return x, False
    factor = min_side / min(h, w)
    long_bound = math.ceil(max(h, w) * factor) + 1  # loose: the short side decides
    pipeline = build_eval_pipeline("folder", crop=crop_size, scale=(long_bound, min_side))
    return pipeline(sample)["image"], True
