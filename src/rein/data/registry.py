"""Build a dataset by name: ``build_dataset("cityscapes", root, "val")``."""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .datasets import (
    ACDCDataset,
    BDD100KDataset,
    CityscapesDataset,
    FolderDataset,
    GTAVDataset,
    MapillaryDataset,
    SegDataset,
    SynthiaDataset,
    UrbanSynDataset,
)
from .synthetic import SyntheticDataset

__all__ = ["DATASET_NAMES", "build_dataset"]


def _folder(root: str | os.PathLike | None, split: str | None, **kw: Any) -> FolderDataset:
    """``root/{img_dir}[/{split}]`` with labels in ``root/{ann_dir}[/{split}]``."""
    if root is None:
        raise ValueError("build_dataset('folder', ...) needs a root folder")
    img_dir = Path(root) / kw.pop("img_dir", "images")
    ann = kw.pop("ann_dir", "labels")
    ann_dir = None if ann is None else Path(root) / ann
    if split not in (None, "", "all"):
        img_dir = img_dir / split
        ann_dir = None if ann_dir is None else ann_dir / split
    return FolderDataset(img_dir, ann_dir, **kw)


def _synthetic(root: str | os.PathLike | None, split: str | None, **kw: Any) -> SyntheticDataset:
    kw.pop("skip_bad", None)  # rendered scenes are never bad
    if "size" in kw:
        kw["size"] = tuple(kw["size"])
    return SyntheticDataset(split=split or "train", **kw)


def _release(cls: type[SegDataset]) -> Callable[..., SegDataset]:
    def build(root: str | os.PathLike | None, split: str | None, **kw: Any) -> SegDataset:
        if root is None:
            raise ValueError(f"{cls.__name__} needs a dataset root")
        if split is None:
            return cls(root, **kw)
        return cls(root, split, **kw)

    return build


_BUILDERS: dict[str, Callable[..., SegDataset]] = {
    "gtav": _release(GTAVDataset),
    "synthia": _release(SynthiaDataset),
    "urbansyn": _release(UrbanSynDataset),
    "cityscapes": _release(CityscapesDataset),
    "bdd100k": _release(BDD100KDataset),
    "mapillary": _release(MapillaryDataset),
    "acdc": _release(ACDCDataset),
    "folder": _folder,
    "synthetic": _synthetic,
}
DATASET_NAMES: tuple[str, ...] = tuple(_BUILDERS)

_ALIASES = {
    "gta": "gtav",
    "gta5": "gtav",
    "citys": "cityscapes",
    "bdd": "bdd100k",
    "map": "mapillary",
    "mapillary_vistas": "mapillary",
}


def build_dataset(
    name: str, root: str | os.PathLike | None = None, split: str | None = None, **kw: Any
) -> SegDataset:
    """Construct a dataset from its registry name.

    Names: gtav, synthia, urbansyn, cityscapes, bdd100k, mapillary, acdc, folder, synthetic
    (case-insensitive; gta/gta5, citys, bdd, map are accepted aliases). ``split=None`` uses
    the dataset's default. Extra keyword arguments go to the dataset class, e.g.
    ``transform=``, ``skip_bad=``, ``condition=`` (acdc), ``img_dir=``/``ann_dir=``/
    ``mapping=`` (folder, relative to root), ``style=``/``num_images=``/``size=`` (synthetic).
    """
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _BUILDERS:
        near = difflib.get_close_matches(key, list(_BUILDERS) + list(_ALIASES), n=1, cutoff=0.5)
        hint = f" Did you mean {_ALIASES.get(near[0], near[0])!r}?" if near else ""
        raise ValueError(f"unknown dataset {name!r}.{hint} Valid names: {', '.join(DATASET_NAMES)}")
    return _BUILDERS[key](root, split, **kw)
