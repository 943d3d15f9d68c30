"""Segmentation datasets: a file-pair base class and one class per dataset release.

Each dataset finds (image, label) file pairs in the directory layout of its official
release, maps the stored label ids to the 19 Cityscapes trainIds, and yields
``{"image": float32 (3, H, W) normalised tensor, "label": int64 (H, W) tensor with 255 =
ignore, "meta": dict}``. A wrong root, split or layout raises DataError showing the
expected directory tree and the path that was tried.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import DataError
from .io import check_same_size, read_image, read_label
from .labels import (
    CITYSCAPES_LUT,
    IGNORE_INDEX,
    MAPILLARY_LUT,
    NUM_CLASSES,
    SYNTHIA_LUT,
    make_lut,
)
from .transforms import ToTensorNormalize

__all__ = [
    "ACDCDataset",
    "BDD100KDataset",
    "CityscapesDataset",
    "FolderDataset",
    "GTAVDataset",
    "MapillaryDataset",
    "SegDataset",
    "SynthiaDataset",
    "UrbanSynDataset",
    "collate_samples",
    "load_mapping",
    "no_substitution",
]

PathLike = str | os.PathLike
Sample = dict[str, Any]
Pair = tuple[Path, Path | None]
# A label option: (file suffix, lookup table or None, short description).
LabelOption = tuple[str, np.ndarray | None, str]

_TO_TENSOR = ToTensorNormalize()


class SegDataset(Dataset):
    """A list of (image, label) files with a label mapping, a transform and bad-file policy.

    Args:
        pairs: (image_path, label_path) pairs; a label path of None gives an image-only
            sample (no ``"label"`` key), e.g. for unlabeled test splits.
        mapping: 256-entry lookup table from stored label id to trainId, or None when the
            files already hold trainIds.
        transform: callable on the numpy sample dict (see ``rein.data.transforms``). If the
            image is still a numpy array afterwards, it is normalised and converted to tensors.
        skip_bad: if True, a sample whose files are unusable emits a warning naming the file,
            increments ``num_bad`` and is replaced by the next index (or, with
            ``substitute_bad = False``, comes back as None: evaluation must count every image
            once, see :func:`no_substitution`); otherwise DataError.
        num_classes / ignore_index: the valid label values after mapping.
        label_channel: for multi-channel label images, which channel holds the ids.
        name: dataset name, stored in ``meta["dataset"]``.

    ``num_bad`` also counts images dropped at construction for lack of a label file. With
    DataLoader workers each worker has its own copy, so it counts per process.
    """

    name = "custom"
    LAYOUT = ""
    #: with ``skip_bad``: replace a bad sample by the next good one (True: training, which
    #: needs a sample at every position) or return None for it (False: evaluation)
    substitute_bad: bool = True

    def __init__(
        self,
        pairs: Sequence[tuple[PathLike, PathLike | None]],
        mapping: np.ndarray | None = None,
        transform: Callable[[Sample], Sample] | None = None,
        skip_bad: bool = False,
        num_classes: int = NUM_CLASSES,
        ignore_index: int = IGNORE_INDEX,
        label_channel: int | None = None,
        name: str | None = None,
    ) -> None:
        self.pairs: list[Pair] = [(Path(i), None if a is None else Path(a)) for i, a in pairs]
        if mapping is not None:
            mapping = np.asarray(mapping, dtype=np.uint8)
            if mapping.shape != (256,):
                raise ValueError(f"mapping must be a 256-entry lookup table, got {mapping.shape}")
        self.mapping = mapping
        self.transform = transform
        self.skip_bad = skip_bad
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.label_channel = label_channel
        if name is not None:
            self.name = name
        self.num_bad = 0
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> Sample:
        """Read sample ``index`` as numpy arrays (no transform). Raises DataError."""
        image_path, label_path = self.pairs[index]
        image = read_image(image_path)
        meta: dict[str, Any] = {
            "dataset": self.name,
            "index": index,
            "image_path": str(image_path),
            "label_path": None if label_path is None else str(label_path),
            "ori_shape": tuple(image.shape[:2]),
            "img_shape": tuple(image.shape[:2]),
        }
        sample: Sample = {"image": image, "meta": meta}
        if label_path is not None:
            label = read_label(
                label_path,
                mapping=self.mapping,
                num_classes=self.num_classes,
                ignore_index=self.ignore_index,
                channel=self.label_channel,
            )
            check_same_size(image, label, image_path, label_path)
            sample["label"] = label
        return sample

    def __getitem__(self, index: int) -> Sample:
        return self.sample(index, self.transform)

    def sample(
        self,
        index: int,
        transform: Callable[..., Sample] | None = None,
        rng: np.random.Generator | None = None,
    ) -> Sample | None:
        """Sample ``index`` through ``transform`` (``__getitem__`` uses ``self.transform``).

        With ``rng``, the transform is called as ``transform(sample, rng)`` so its randomness
        comes from that generator: e.g. one seeded from (seed, stream position) makes every
        sample's augmentation reproducible regardless of workers, threads or resumption (the
        transforms give the same numbers whatever the thread count).

        None only for a bad sample with ``skip_bad`` and ``substitute_bad = False``.
        """
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {self.name} dataset of size {n}")
        out = self._load_or_skip(index)
        if out is None:
            return None
        if transform is not None:
            out = transform(out) if rng is None else transform(out, rng)
        if isinstance(out["image"], np.ndarray):
            out = _TO_TENSOR(out)
        return out

    def _load_or_skip(self, index: int) -> Sample | None:
        n = len(self)
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                if not self.substitute_bad:
                    return None
                continue
            try:
                return self.load(i)
            except DataError as exc:
                if not self.skip_bad:
                    raise
                self._bad.add(i)
                self.num_bad += 1
                warnings.warn(f"{self.name}: skipping bad sample {i}: {exc}", stacklevel=3)
                if not self.substitute_bad:
                    return None
        raise DataError(f"{self.name}: all {n} samples are unusable (see the warnings above)")

    def check(self) -> list[str]:
        """Read every sample once and return one message per unusable sample."""
        problems = []
        for i in range(len(self)):
            try:
                self.load(i)
            except DataError as exc:
                problems.append(str(exc))
        return problems

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, num_samples={len(self)})"


def _seg_datasets(dataset: Any, seen: set[int] | None = None) -> list[SegDataset]:
    """The SegDatasets inside ``dataset`` and its wrappers (``.dataset`` / ``.datasets``)."""
    seen = set() if seen is None else seen
    if id(dataset) in seen:
        return []
    seen.add(id(dataset))
    if isinstance(dataset, SegDataset):
        return [dataset]
    found: list[SegDataset] = []
    inner = getattr(dataset, "dataset", None)
    if inner is not None:
        found += _seg_datasets(inner, seen)
    for d in getattr(dataset, "datasets", None) or ():
        found += _seg_datasets(d, seen)
    return found


@contextmanager
def no_substitution(dataset: Any) -> Iterator[None]:
    """Inside the block, bad samples of ``dataset`` (``skip_bad``) come back as None.

    Training replaces a bad sample by the next good one (its stream needs a sample at every
    position); an evaluation that did so would count the next image twice. The evaluator
    skips the Nones. Works through wrappers that keep the dataset in ``.dataset`` or
    ``.datasets`` (Subset, RandomSubsetDataset, CorruptedDataset, ConcatDataset). A
    DataLoader started inside the block copies the setting into its workers.
    """
    targets = [d for d in _seg_datasets(dataset) if d.skip_bad]
    saved = [d.__dict__.get("substitute_bad") for d in targets]
    for d in targets:
        d.substitute_bad = False
    try:
        yield
    finally:
        for d, old in zip(targets, saved):
            if old is None:
                d.__dict__.pop("substitute_bad", None)
            else:
                d.substitute_bad = old


def collate_samples(batch: Sequence[Sample]) -> dict[str, Any]:
    """Batch samples: stack images/labels when their shapes agree, else keep lists; metas
    are kept as a list of dicts (torch's default collate would transpose them)."""
    out: dict[str, Any] = {"meta": [s.get("meta", {}) for s in batch]}
    for key in ("image", "label"):
        if key not in batch[0]:
            continue
        items = [s[key] for s in batch]
        same = all(isinstance(x, torch.Tensor) and x.shape == items[0].shape for x in items)
        out[key] = torch.stack(items) if same else items
    return out


# --------------------------------------------------------------------------- helpers


def _layout_error(
    cls: type[SegDataset],
    root: PathLike,
    tried: PathLike,
    problem: str,
    layout: str | None = None,
) -> DataError:
    layout = cls.LAYOUT if layout is None else layout
    return DataError(
        f"{cls.__name__}: {problem}: {tried}\n"
        f"Expected layout under the dataset root ({root}):\n{layout.rstrip()}"
    )


def _need_dir(cls: type[SegDataset], root: PathLike, path: Path, what: str) -> None:
    if not Path(root).is_dir():
        raise _layout_error(cls, root, root, "dataset root not found")
    if not path.is_dir():
        raise _layout_error(cls, root, path, f"{what} folder not found")


def _files(folder: Path, suffix: str, recursive: bool) -> list[Path]:
    pattern = "*" + suffix
    found = folder.rglob(pattern) if recursive else folder.glob(pattern)
    return sorted(p for p in found if p.is_file())


def _suffix_counts(folder: Path, recursive: bool) -> list[tuple[str, int]]:
    """The file suffixes in ``folder`` with their counts, most frequent first."""
    counts: dict[str, int] = {}
    found = folder.rglob("*") if recursive else folder.glob("*")
    for p in found:
        if p.is_file() and not p.name.startswith("."):
            key = p.suffix or "(no suffix)"
            counts[key] = counts.get(key, 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def _suffixes_found(folder: Path, recursive: bool, limit: int = 5) -> str:
    """``"12 x .jpg, 1 x .txt"`` for the files in ``folder`` (``"no files"``)."""
    top = _suffix_counts(folder, recursive)
    if not top:
        return "no files"
    shown = ", ".join(f"{n} x {suffix}" for suffix, n in top[:limit])
    return shown + (", ..." if len(top) > limit else "")


def _match_labels(
    images: list[Path],
    img_dir: Path,
    img_suffix: str,
    ann_dir: Path,
    options: Sequence[LabelOption],
    recursive: bool,
) -> tuple[list[Pair], list[Path], LabelOption | None]:
    """Pair images with labels by relative path; use the first label option that matches any
    image (so one dataset never mixes label encodings). Returns pairs, unmatched images and
    the chosen option."""
    for option in options:
        suffix = option[0]
        existing = {str(p.relative_to(ann_dir)) for p in _files(ann_dir, suffix, recursive)}
        if not existing:
            continue
        pairs: list[Pair] = []
        missing: list[Path] = []
        for img in images:
            rel = str(img.relative_to(img_dir))[: -len(img_suffix)] + suffix
            if rel in existing:
                pairs.append((img, ann_dir / rel))
            else:
                missing.append(img)
        return pairs, missing, option
    return [], list(images), None


def _read_split_list(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            names.add(Path(line.split()[0]).name.split(".")[0])
    return names


def _split_images(
    cls: type[SegDataset],
    root: Path,
    split: str,
    split_file: PathLike | None,
    images: list[Path],
) -> list[Path]:
    """Keep the images whose stem is listed in the split file (one stem per line).

    Without a split file, "all" and "train" keep every image (the official recipe trains
    on the whole release); other split names need a list.
    """
    if split_file is None:
        for cand in (root / f"{split}.txt", root / "splits" / f"{split}.txt"):
            if cand.is_file():
                split_file = cand
                break
    if split_file is None:
        if split in ("all", "train"):
            return images
        raise _layout_error(
            cls, root, root / f"{split}.txt", f"no split list for split {split!r} (use 'all')"
        )
    path = Path(split_file)
    if not path.is_file():
        raise DataError(f"{cls.__name__}: split file not found: {path}")
    wanted = _read_split_list(path)
    kept = [p for p in images if p.stem in wanted]
    if not kept:
        raise DataError(f"{cls.__name__}: none of the names in split file {path} match an image")
    return kept


class _ReleaseDataset(SegDataset):
    """Shared constructor logic: collect pairs, handle missing labels, report empty results."""

    def _init_from(
        self,
        root: PathLike,
        pairs: list[Pair],
        missing: list[Path],
        mapping: np.ndarray | None,
        transform: Callable[[Sample], Sample] | None,
        skip_bad: bool,
        tried: PathLike,
        label_channel: int | None = None,
    ) -> None:
        if missing and pairs:
            shown = "\n  ".join(str(m) for m in missing[:5])
            msg = (
                f"{type(self).__name__}: {len(missing)} image(s) have no label file, e.g.\n"
                f"  {shown}"
            )
            if not skip_bad:
                raise DataError(msg + "\n(pass skip_bad=True to drop them)")
            warnings.warn(msg + "\n(dropped because skip_bad=True)", stacklevel=3)
        if not pairs:
            raise _layout_error(type(self), root, tried, "found no image/label pairs in")
        super().__init__(
            pairs,
            mapping=mapping,
            transform=transform,
            skip_bad=skip_bad,
            label_channel=label_channel,
        )
        self.root = Path(root)
        self.num_bad = len(missing)


# --------------------------------------------------------------------------- releases


class GTAVDataset(_ReleaseDataset):
    """GTAV (Playing for Data). Labels hold Cityscapes ids and are mapped to trainIds, unless
    converted ``*_labelTrainIds.png`` files (as the official Rein code uses) are present, in
    which case those are used as they are.

    ``split``: "all" (every image; also what "train" means without a split list, as in the
    official recipe) or a name with a list file ``{root}/{split}.txt`` or
    ``{root}/splits/{split}.txt`` (one image stem per line), or pass ``split_file``.
    """

    name = "gtav"
    LAYOUT = """\
gtav/
  images/00001.png ...
  labels/00001.png ...                (palette PNGs holding Cityscapes label ids)
  labels/00001_labelTrainIds.png ...  (optional, already converted; preferred if present)
  train.txt / val.txt / test.txt      (optional split lists, one image stem per line)
"""

    def __init__(
        self,
        root: PathLike,
        split: str = "all",
        transform: Callable[[Sample], Sample] | None = None,
        skip_bad: bool = False,
        split_file: PathLike | None = None,
    ) -> None:
        root = Path(root)
        img_dir, ann_dir = root / "images", root / "labels"
        _need_dir(type(self), root, img_dir, "images")
        _need_dir(type(self), root, ann_dir, "labels")
        images = _files(img_dir, ".png", recursive=False)
        images = _split_images(type(self), root, split, split_file, images)
        options: list[LabelOption] = [
            ("_labelTrainIds.png", None, "trainIds"),
            (".png", CITYSCAPES_LUT, "Cityscapes ids"),
        ]
        pairs, missing, opt = _match_labels(images, img_dir, ".png", ann_dir, options, False)
        self.split = split
        self._init_from(root, pairs, missing, opt[1] if opt else None, transform, skip_bad, img_dir)


class SynthiaDataset(_ReleaseDataset):
    """SYNTHIA RAND-CITYSCAPES. ``GT/LABELS`` are 16-bit PNGs whose first channel holds
    SYNTHIA class ids (mapped with ``SYNTHIA_TO_TRAINID``); converted
    ``GT/LABELS/*_labelTrainIds.png`` files are preferred when present. ``split`` as GTAV.
    """

    name = "synthia"
    LAYOUT = """\
synthia/                           (RAND_CITYSCAPES)
  RGB/0000000.png ...
  GT/LABELS/0000000.png ...        (16-bit PNG, channel 0 = SYNTHIA class id)
  GT/LABELS/0000000_labelTrainIds.png ...  (optional, already converted; preferred)
  train.txt / val.txt              (optional split lists, one image stem per line)
"""

    def __init__(
        self,
        root: PathLike,
        split: str = "all",
        transform: Callable[[Sample], Sample] | None = None,
        skip_bad: bool = False,
        split_file: PathLike | None = None,
    ) -> None:
        root = Path(root)
        img_dir, ann_dir = root / "RGB", root / "GT" / "LABELS"
        _need_dir(type(self), root, img_dir, "RGB")
        _need_dir(type(self), root, ann_dir, "GT/LABELS")
        images = _files(img_dir, ".png", recursive=False)
        images = _split_images(type(self), root, split, split_file, images)
        options: list[LabelOption] = [
            ("_labelTrainIds.png", None, "trainIds"),
            (".png", SYNTHIA_LUT, "SYNTHIA ids"),
        ]
        pairs, missing, opt = _match_labels(images, img_dir, ".png", ann_dir, options, False)
        self.split = split
        mapping = opt[1] if opt else None
        channel = 0 if mapping is not None else None
        self._init_from(root, pairs, missing, mapping, transform, skip_bad, img_dir, channel)


class UrbanSynDataset(_ReleaseDataset):
    """UrbanSyn. Assumed layout (the public release): ``rgb/rgb_XXXX.png`` with
    ``ss/ss_XXXX.png`` single-channel semantic maps in Cityscapes trainIds (255 = ignore).
    Label files named like the image (``ss/rgb_XXXX.png``, as in the official Rein config)
    or ``*_labelTrainIds.png`` are accepted too. Pass ``label_ids=True`` if your ``ss``
    maps hold Cityscapes label ids instead. ``split`` as GTAV.
    """

    name = "urbansyn"
    LAYOUT = """\
urbansyn/
  rgb/rgb_0001.png ...
  ss/ss_0001.png ...        (Cityscapes trainIds; also accepted: ss/rgb_0001.png,
                             ss/ss_0001_labelTrainIds.png)
  train.txt / val.txt       (optional split lists, one image stem per line)
"""

    def __init__(
        self,
        root: PathLike,
        split: str = "all",
        transform: Callable[[Sample], Sample] | None = None,
        skip_bad: bool = False,
        split_file: PathLike | None = None,
        label_ids: bool = False,
    ) -> None:
        root = Path(root)
        img_dir, ann_dir = root / "rgb", root / "ss"
        _need_dir(type(self), root, img_dir, "rgb")
        _need_dir(type(self), root, ann_dir, "ss")
        images = _files(img_dir, ".png", recursive=False)
        images = _split_images(type(self), root, split, split_file, images)
        labels = {p.name: p for p in _files(ann_dir, ".png", recursive=False)}
        pairs: list[Pair] = []
        missing: list[Path] = []
        for img in images:
            key = img.stem[4:] if img.stem.startswith("rgb_") else img.stem
            names = [f"ss_{key}.png", img.name, f"ss_{key}_labelTrainIds.png", f"{key}.png"]
            hit = next((labels[n] for n in names if n in labels), None)
            if hit is None:
                missing.append(img)
            else:
                pairs.append((img, hit))
        self.split = split
        mapping = CITYSCAPES_LUT if label_ids else None
        self._init_from(root, pairs, missing, mapping, transform, skip_bad, img_dir)


class CityscapesDataset(_ReleaseDataset):
    """Cityscapes (gtFine). Uses ``*_gtFine_labelTrainIds.png`` (from cityscapesScripts'
    createTrainIdLabelImgs) when present, else ``*_gtFine_labelIds.png`` mapped to trainIds.
    ``split``: train, val or test.
    """

    name = "cityscapes"
    LAYOUT = """\
cityscapes/
  leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
  gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelTrainIds.png
      (or *_gtFine_labelIds.png, mapped id -> trainId)
  split: train | val | test
"""

    def __init__(
        self,
        root: PathLike,
        split: str = "val",
        transform: Callable[[Sample], Sample] | None = None,
        skip_bad: bool = False,
    ) -> None:
        root = Path(root)
        img_dir, ann_dir = root / "leftImg8bit" / split, root / "gtFine" / split
        _need_dir(type(self), root, img_dir, f"leftImg8bit/{split}")
        _need_dir(type(self), root, ann_dir, f"gtFine/{split}")
        suffix = "_leftImg8bit.png"
        images = _files(img_dir, suffix, recursive=True)
        options: list[LabelOption] = [
            ("_gtFine_labelTrainIds.png", None, "trainIds"),
            ("_gtFine_labelIds.png", CITYSCAPES_LUT, "Cityscapes ids"),
        ]
        pairs, missing, opt = _match_labels(images, img_dir, suffix, ann_dir, options, True)
        self.split = split
        self._init_from(root, pairs, missing, opt[1] if opt else None, transform, skip_bad, img_dir)


class BDD100KDataset(_ReleaseDataset):
    """BDD100K semantic segmentation (10K images); masks already hold trainIds.
    Also accepts the older ``seg/`` release. ``split``: train, val or test (test has no
    public labels; its samples are image-only).
    """

    name = "bdd100k"
    LAYOUT = """\
bdd100k/
  images/10k/{split}/xxxxxxxx-xxxxxxxx.jpg
  labels/sem_seg/masks/{split}/xxxxxxxx-xxxxxxxx.png   (trainIds, 255 = ignore)
or the older release:
  seg/images/{split}/xxxxxxxx-xxxxxxxx.jpg
  seg/labels/{split}/xxxxxxxx-xxxxxxxx_train_id.png
  split: train | val | test
"""

    def __init__(
        self,
        root: PathLike,
        split: str = "val",
        transform: Callable[[Sample], Sample] | None = None,
        skip_bad: bool = False,
    ) -> None:
        root = Path(root)
        new_img, new_ann = root / "images" / "10k" / split, root / "labels/sem_seg/masks" / split
        old_img, old_ann = root / "seg" / "images" / split, root / "seg" / "labels" / split
        if new_img.is_dir() or not old_img.is_dir():
            img_dir, ann_dir, ann_suffix = new_img, new_ann, ".png"
        else:
            img_dir, ann_dir, ann_suffix = old_img, old_ann, "_train_id.png"
        _need_dir(type(self), root, img_dir, "image")
        images = _files(img_dir, ".jpg", recursive=False)
        self.split = split
        if split == "test" and not ann_dir.is_dir():
            pairs: list[Pair] = [(p, None) for p in images]
            self._init_from(root, pairs, [], None, transform, skip_bad, img_dir)
            return
        _need_dir(type(self), root, ann_dir, "label")
        options: list[LabelOption] = [(ann_suffix, None, "trainIds")]
        pairs, missing, _ = _match_labels(images, img_dir, ".jpg", ann_dir, options, False)
        self._init_from(root, pairs, missing, None, transform, skip_bad, img_dir)


class MapillaryDataset(_ReleaseDataset):
    """Mapillary Vistas v1.2; the 66 class ids are mapped with ``MAPILLARY_TO_TRAINID``
    (the official Rein table). ``split``: "training" / "validation" ("train" / "val" work
    too), or "half": the official Rein evaluation set (``half/val_img``, ``half/val_label``,
    validation images halved offline, labels already in trainIds).
    """

    name = "mapillary"
    LAYOUT = """\
mapillary/
  {split}/images/xxxxxxxxxxxxxxxxxxxxxx.jpg          split: training | validation
  {split}/v1.2/labels/xxxxxxxxxxxxxxxxxxxxxx.png     (66-class v1.2 ids)
      (or {split}/labels/*.png, the v1.0/v1.1 layout)
or, for split 'half' (the official Rein evaluation copy):
  half/val_img/*.jpg
  half/val_label/*.png                               (trainIds)
"""

    _ALIASES = {"train": "training", "val": "validation", "test": "testing"}

    def __init__(
        self,
        root: PathLike,
        split: str = "validation",
        transform: Callable[[Sample], Sample] | None = None,
        skip_bad: bool = False,
    ) -> None:
        root = Path(root)
        split = self._ALIASES.get(split, split)
        self.split = split
        if split == "half":
            img_dir, ann_dir, mapping = root / "half" / "val_img", root / "half" / "val_label", None
        else:
            img_dir = root / split / "images"
            ann_dir = root / split / "v1.2" / "labels"
            if not ann_dir.is_dir() and (root / split / "labels").is_dir():
                ann_dir = root / split / "labels"
            mapping = MAPILLARY_LUT
        _need_dir(type(self), root, img_dir, "images")
        images = _files(img_dir, ".jpg", recursive=False)
        if split == "testing" and not ann_dir.is_dir():
            pairs: list[Pair] = [(p, None) for p in images]
            self._init_from(root, pairs, [], None, transform, skip_bad, img_dir)
            return
        _need_dir(type(self), root, ann_dir, "labels")
        options: list[LabelOption] = [(".png", mapping, "labels")]
        pairs, missing, _ = _match_labels(images, img_dir, ".jpg", ann_dir, options, False)
        self._init_from(root, pairs, missing, mapping, transform, skip_bad, img_dir)


class ACDCDataset(_ReleaseDataset):
    """ACDC (Adverse Conditions Dataset with Correspondences), trainId labels.
    ``condition``: fog, night, rain, snow, or "all" (the four together). ``split``: train,
    val or test (test has no public labels; its samples are image-only).
    """

    name = "acdc"
    CONDITIONS = ("fog", "night", "rain", "snow")
    LAYOUT = """\
acdc/
  rgb_anon/{condition}/{split}/{sequence}/{sequence}_frame_xxxxxx_rgb_anon.png
  gt/{condition}/{split}/{sequence}/{sequence}_frame_xxxxxx_gt_labelTrainIds.png
      (or *_gt_labelIds.png, mapped id -> trainId)
  condition: fog | night | rain | snow      split: train | val | test
"""

    def __init__(
        self,
        root: PathLike,
        split: str = "val",
        condition: str = "all",
        transform: Callable[[Sample], Sample] | None = None,
        skip_bad: bool = False,
    ) -> None:
        root = Path(root)
        if condition != "all" and condition not in self.CONDITIONS:
            raise DataError(
                f"ACDCDataset: unknown condition {condition!r}; use one of "
                f"{', '.join(self.CONDITIONS)} or 'all'"
            )
        conditions = self.CONDITIONS if condition == "all" else (condition,)
        suffix = "_rgb_anon.png"
        options: list[LabelOption] = [
            ("_gt_labelTrainIds.png", None, "trainIds"),
            ("_gt_labelIds.png", CITYSCAPES_LUT, "Cityscapes ids"),
        ]
        pairs: list[Pair] = []
        missing: list[Path] = []
        chosen: LabelOption | None = None
        for cond in conditions:
            img_dir = root / "rgb_anon" / cond / split
            ann_dir = root / "gt" / cond / split
            _need_dir(type(self), root, img_dir, f"rgb_anon/{cond}/{split}")
            images = _files(img_dir, suffix, recursive=True)
            if split == "test" and not ann_dir.is_dir():
                pairs += [(p, None) for p in images]
                continue
            _need_dir(type(self), root, ann_dir, f"gt/{cond}/{split}")
            opts = [chosen] if chosen is not None else options
            found, miss, opt = _match_labels(images, img_dir, suffix, ann_dir, opts, True)
            chosen = chosen or opt
            pairs += found
            missing += miss
        self.split, self.condition = split, condition
        mapping = chosen[1] if chosen else None
        tried = root / "rgb_anon" / conditions[0] / split
        self._init_from(root, pairs, missing, mapping, transform, skip_bad, tried)


def load_mapping(mapping: Mapping[Any, Any] | np.ndarray | PathLike) -> np.ndarray:
    """A 256-entry lookup table from a dict, an existing table, or a YAML/JSON file holding
    ``{source_id: train_id}`` (ids not listed map to 255; a null target means 255)."""
    if isinstance(mapping, np.ndarray):
        if mapping.shape != (256,):
            raise ValueError(f"mapping table must have 256 entries, got shape {mapping.shape}")
        return mapping.astype(np.uint8)
    if isinstance(mapping, (str, os.PathLike)):
        path = Path(mapping)
        if not path.is_file():
            raise DataError(f"label mapping file not found: {path}")
        text = path.read_text()
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as exc:
            raise DataError(f"cannot parse label mapping file {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise DataError(
                f"label mapping file {path} must hold a mapping {{source_id: train_id}}, "
                f"got {type(data).__name__}"
            )
        where = str(path)
    else:
        data, where = dict(mapping), "label mapping"
    table: dict[int, int] = {}
    for src, dst in data.items():
        try:
            s = int(src)
            d = IGNORE_INDEX if dst is None else int(dst)
        except (TypeError, ValueError) as exc:
            raise DataError(f"{where}: entry {src!r}: {dst!r} is not an integer pair") from exc
        if not (0 <= d < NUM_CLASSES or d == IGNORE_INDEX):
            raise DataError(
                f"{where}: source id {s} maps to {d}, which is neither a trainId "
                f"(0..{NUM_CLASSES - 1}) nor {IGNORE_INDEX}"
            )
        table[s] = d
    try:
        return make_lut(table)
    except ValueError as exc:
        raise DataError(f"{where}: {exc}") from exc


class FolderDataset(_ReleaseDataset):
    """Any folder of images with label maps of the same relative name (recursively).

    The label for ``img_dir/a/b.jpg`` (``img_suffix=".jpg"``) is
    ``ann_dir/a/b{ann_suffix}``. Labels hold trainIds unless ``mapping`` is given: a dict,
    a 256-entry table, or a YAML/JSON file of ``{source_id: train_id}`` (unlisted ids -> 255).
    ``ann_dir=None`` gives image-only samples.
    """

    name = "folder"
    LAYOUT = """\
{img_dir}/**/name{img_suffix}
{ann_dir}/**/name{ann_suffix}   (same relative path; trainIds, or ids plus a mapping)
"""

    def __init__(
        self,
        img_dir: PathLike,
        ann_dir: PathLike | None = None,
        img_suffix: str = ".png",
        ann_suffix: str = ".png",
        mapping: Mapping[Any, Any] | np.ndarray | PathLike | None = None,
        transform: Callable[[Sample], Sample] | None = None,
        skip_bad: bool = False,
        recursive: bool = True,
    ) -> None:
        img_dir = Path(img_dir)
        lut = None if mapping is None else load_mapping(mapping)
        layout = self.LAYOUT.format(
            img_dir=img_dir,
            ann_dir=ann_dir if ann_dir is not None else "(no labels)",
            img_suffix=img_suffix,
            ann_suffix=ann_suffix,
        )
        if not img_dir.is_dir():
            raise _layout_error(type(self), img_dir, img_dir, "image folder not found", layout)
        images = _files(img_dir, img_suffix, recursive)
        if not images:
            found = [suf for suf, _ in _suffix_counts(img_dir, recursive) if suf != img_suffix]
            example = found[0] if found and found[0].startswith(".") else ".jpg"
            raise DataError(
                f"FolderDataset: no images ending in {img_suffix!r} in {img_dir} (found: "
                f"{_suffixes_found(img_dir, recursive)}); set the dataset's option "
                f"img_suffix (data.train[i].options / data.val[i].options) to the images' "
                f"suffix, e.g. img_suffix: {example}"
            )
        if ann_dir is None:
            pairs: list[Pair] = [(p, None) for p in images]
            self._init_from(img_dir, pairs, [], None, transform, skip_bad, img_dir)
            return
        ann_dir = Path(ann_dir)
        if not ann_dir.is_dir():
            raise _layout_error(type(self), ann_dir, ann_dir, "label folder not found", layout)
        options: list[LabelOption] = [(ann_suffix, lut, "labels")]
        pairs, missing, _ = _match_labels(images, img_dir, img_suffix, ann_dir, options, recursive)
        if not pairs:
            raise DataError(
                f"FolderDataset: none of the {len(images)} images in {img_dir} has a label "
                f"{ann_dir}/<same relative name>{ann_suffix} (e.g. "
                f"{_label_for(images[0], img_dir, img_suffix, ann_dir, ann_suffix)}; found in "
                f"{ann_dir}: {_suffixes_found(ann_dir, recursive)}"
                f"{_first_file(ann_dir, recursive)}); set the dataset's option "
                "ann_suffix (the part of a label's name after the image's stem, e.g. "
                "ann_suffix: _labelTrainIds.png) or ann_dir"
            )
        self._init_from(img_dir, pairs, missing, lut, transform, skip_bad, img_dir)


def _first_file(folder: Path, recursive: bool) -> str:
    found = sorted(p for p in (folder.rglob("*") if recursive else folder.glob("*")) if p.is_file())
    return f", e.g. {found[0].relative_to(folder)}" if found else ""


def _label_for(image: Path, img_dir: Path, img_suffix: str, ann_dir: Path, ann_suffix: str) -> Path:
    rel = str(image.relative_to(img_dir))[: -len(img_suffix)] + ann_suffix
    return ann_dir / rel
