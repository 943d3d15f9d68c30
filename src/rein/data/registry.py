"""Build a dataset by name: ``build_dataset("cityscapes", root, "val")``."""

from __future__ import annotations

import difflib
import inspect
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

__all__ = [
    "DATASET_NAMES",
    "build_dataset",
    "canonical_name",
    "dataset_options",
    "unknown_option_message",
]


def _folder(root: str | os.PathLike | None, split: str | None, **kw: Any) -> FolderDataset:
    """``root/{img_dir}[/{split}]`` with labels in ``root/{ann_dir}[/{split}]``; a relative
    ``mapping`` file is ``root/{mapping}`` too (absolute paths and ``~`` are kept)."""
    if root is None:
        raise ValueError("build_dataset('folder', ...) needs a root folder")
    img_dir = Path(root) / kw.pop("img_dir", "images")
    ann = kw.pop("ann_dir", "labels")
    ann_dir = None if ann is None else Path(root) / ann
    if split not in (None, "", "all"):
        img_dir = img_dir / split
        ann_dir = None if ann_dir is None else ann_dir / split
    mapping = kw.get("mapping")
    if isinstance(mapping, str | os.PathLike):
        kw["mapping"] = Path(root) / Path(mapping).expanduser()  # root / absolute = absolute
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


# Keyword arguments the caller sets (from data.skip_bad / the pipelines), never options.
_NOT_OPTIONS = ("self", "root", "split", "transform", "skip_bad")
_CLASSES: dict[str, type[SegDataset]] = {
    "gtav": GTAVDataset,
    "synthia": SynthiaDataset,
    "urbansyn": UrbanSynDataset,
    "cityscapes": CityscapesDataset,
    "bdd100k": BDD100KDataset,
    "mapillary": MapillaryDataset,
    "acdc": ACDCDataset,
    "folder": FolderDataset,
    "synthetic": SyntheticDataset,
}


def canonical_name(name: str) -> str | None:
    """The registry name of ``name`` (case, ``-`` and aliases folded), or None if unknown."""
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    return key if key in _BUILDERS else None


def dataset_options(name: str) -> tuple[str, ...]:
    """The keys a config may put in ``data.*.options`` for dataset ``name``: the dataset
    class's constructor arguments but those the trainer sets (root, split, transform,
    skip_bad); the folder dataset's ``img_dir`` / ``ann_dir`` are relative to the root."""
    key = canonical_name(name)
    if key is None:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    params = inspect.signature(_CLASSES[key].__init__).parameters
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(n for n, p in params.items() if n not in _NOT_OPTIONS and p.kind in kinds)


def unknown_option_message(name: str, option: str) -> str | None:
    """Why ``option`` is not an option of dataset ``name`` (nearest name suggested), or None."""
    valid = dataset_options(name)
    if option in valid:
        return None
    if option == "skip_bad":
        return "skip_bad is set for every dataset by data.skip_bad, not per dataset"
    if option in ("root", "split"):
        return f"{option} is a key of the dataset entry itself, next to options"
    close = difflib.get_close_matches(option, valid, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{hint}valid options of {canonical_name(name)}: {', '.join(valid) or '(none)'}"


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
    for option in kw:
        if option in ("transform", "skip_bad"):
            continue
        why = unknown_option_message(key, option)
        if why is not None:
            raise ValueError(f"unknown option {option!r} for dataset {key!r}: {why}")
    return _BUILDERS[key](root, split, **kw)
