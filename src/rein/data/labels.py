"""The label space: the 19 Cityscapes train classes, their palette, and the tables that map
each dataset's own label ids onto them.

Every table is a plain ``{source_id: train_id}`` dict (readable, with its source in a
comment) plus a 256-entry ``uint8`` lookup table built from it, so that mapping a label map
is one fancy-indexing step: ``lut[label]``. Ids absent from a table map to ``IGNORE_INDEX``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

__all__ = [
    "CITYSCAPES_ID_TO_TRAINID",
    "CITYSCAPES_LUT",
    "CLASSES",
    "CLASS_NAMES",
    "IGNORE_INDEX",
    "MAPILLARY_CLASSES",
    "MAPILLARY_LUT",
    "MAPILLARY_TO_TRAINID",
    "NUM_CLASSES",
    "PALETTE",
    "SYNTHIA_CLASSES",
    "SYNTHIA_LUT",
    "SYNTHIA_TO_TRAINID",
    "apply_lut",
    "colorize",
    "make_lut",
    "overlay",
]

IGNORE_INDEX = 255

# The 19 Cityscapes evaluation classes, in trainId order 0..18.
CLASSES: tuple[str, ...] = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
NUM_CLASSES = len(CLASSES)
CLASS_NAMES = CLASSES  # alias

# The standard Cityscapes colours (cityscapesScripts ``labels.py``), RGB, in trainId order.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
)

# Cityscapes label id -> trainId, the full official table (cityscapesScripts ``labels.py``).
# GTAV label PNGs hold these ids too. Classes that are not evaluated map to 255.
CITYSCAPES_ID_TO_TRAINID: dict[int, int] = {
    -1: 255,  # license plate
    0: 255,  # unlabeled
    1: 255,  # ego vehicle
    2: 255,  # rectification border
    3: 255,  # out of roi
    4: 255,  # static
    5: 255,  # dynamic
    6: 255,  # ground
    7: 0,  # road
    8: 1,  # sidewalk
    9: 255,  # parking
    10: 255,  # rail track
    11: 2,  # building
    12: 3,  # wall
    13: 4,  # fence
    14: 255,  # guard rail
    15: 255,  # bridge
    16: 255,  # tunnel
    17: 5,  # pole
    18: 255,  # polegroup
    19: 6,  # traffic light
    20: 7,  # traffic sign
    21: 8,  # vegetation
    22: 9,  # terrain
    23: 10,  # sky
    24: 11,  # person
    25: 12,  # rider
    26: 13,  # car
    27: 14,  # truck
    28: 15,  # bus
    29: 255,  # caravan
    30: 255,  # trailer
    31: 16,  # train
    32: 17,  # motorcycle
    33: 18,  # bicycle
}

# Mapillary Vistas v1.2: the 66 class names (``readable`` in config_v1.2.json), index = id.
MAPILLARY_CLASSES: tuple[str, ...] = (
    "Bird",
    "Ground Animal",
    "Curb",
    "Fence",
    "Guard Rail",
    "Barrier",
    "Wall",
    "Bike Lane",
    "Crosswalk - Plain",
    "Curb Cut",
    "Parking",
    "Pedestrian Area",
    "Rail Track",
    "Road",
    "Service Lane",
    "Sidewalk",
    "Bridge",
    "Building",
    "Tunnel",
    "Person",
    "Bicyclist",
    "Motorcyclist",
    "Other Rider",
    "Lane Marking - Crosswalk",
    "Lane Marking - General",
    "Mountain",
    "Sand",
    "Sky",
    "Snow",
    "Terrain",
    "Vegetation",
    "Water",
    "Banner",
    "Bench",
    "Bike Rack",
    "Billboard",
    "Catch Basin",
    "CCTV Camera",
    "Fire Hydrant",
    "Junction Box",
    "Mailbox",
    "Manhole",
    "Phone Booth",
    "Pothole",
    "Street Light",
    "Pole",
    "Traffic Sign Frame",
    "Utility Pole",
    "Traffic Light",
    "Traffic Sign (Back)",
    "Traffic Sign (Front)",
    "Trash Can",
    "Bicycle",
    "Boat",
    "Bus",
    "Car",
    "Caravan",
    "Motorcycle",
    "On Rails",
    "Other Vehicle",
    "Trailer",
    "Truck",
    "Wheeled Slow",
    "Car Mount",
    "Ego Vehicle",
    "Unlabeled",
)

# Mapillary v1.2 id -> trainId. This is the table the official Rein code uses to build its
# Mapillary evaluation labels (its ``mapillary2cityscape.py``, itself from openseg.pytorch),
# which matches v1.2 class names to Cityscapes names by these rules, written out here:
#   exact name match; any "traffic sign*" (front, back and sign frame) -> traffic sign;
#   "on rails" -> train; bicyclist / motorcyclist / other rider -> rider;
#   pole, utility pole, street light -> pole; curb, curb cut, pedestrian area -> sidewalk;
#   bike lane, crosswalk-plain, parking, service lane, both lane markings -> road.
# Everything else maps to 255 (ignored): bird, ground animal, guard rail, barrier,
# rail track, bridge, tunnel, mountain, sand, snow, water, banner, bench, bike rack,
# billboard, catch basin, CCTV camera, fire hydrant, junction box, mailbox, manhole,
# phone booth, pothole, trash can, boat, caravan, other vehicle, trailer, wheeled slow,
# car mount, ego vehicle, unlabeled.
# Note: DAFormer/HRDA-style tables differ (they send manhole to road and leave bike lane,
# parking, crosswalk, service lane, curb cut, pedestrian area, street light and the sign
# frame/back ignored); numbers computed with them are not comparable to Rein's.
MAPILLARY_TO_TRAINID: dict[int, int] = {
    2: 1,  # Curb -> sidewalk
    3: 4,  # Fence
    6: 3,  # Wall
    7: 0,  # Bike Lane -> road
    8: 0,  # Crosswalk - Plain -> road
    9: 1,  # Curb Cut -> sidewalk
    10: 0,  # Parking -> road
    11: 1,  # Pedestrian Area -> sidewalk
    13: 0,  # Road
    14: 0,  # Service Lane -> road
    15: 1,  # Sidewalk
    17: 2,  # Building
    19: 11,  # Person
    20: 12,  # Bicyclist -> rider
    21: 12,  # Motorcyclist -> rider
    22: 12,  # Other Rider -> rider
    23: 0,  # Lane Marking - Crosswalk -> road
    24: 0,  # Lane Marking - General -> road
    27: 10,  # Sky
    29: 9,  # Terrain
    30: 8,  # Vegetation
    44: 5,  # Street Light -> pole
    45: 5,  # Pole
    46: 7,  # Traffic Sign Frame -> traffic sign
    47: 5,  # Utility Pole -> pole
    48: 6,  # Traffic Light
    49: 7,  # Traffic Sign (Back) -> traffic sign
    50: 7,  # Traffic Sign (Front)
    52: 18,  # Bicycle
    54: 15,  # Bus
    55: 13,  # Car
    57: 17,  # Motorcycle
    58: 16,  # On Rails -> train
    61: 14,  # Truck
}

# SYNTHIA (RAND-CITYSCAPES) class ids, from the README shipped with the release.
SYNTHIA_CLASSES: dict[int, str] = {
    0: "void",
    1: "sky",
    2: "building",
    3: "road",
    4: "sidewalk",
    5: "fence",
    6: "vegetation",
    7: "pole",
    8: "car",
    9: "traffic sign",
    10: "pedestrian",
    11: "bicycle",
    12: "motorcycle",
    13: "parking-slot",
    14: "road-work",
    15: "traffic light",
    16: "terrain",
    17: "rider",
    18: "truck",
    19: "bus",
    20: "train",
    21: "wall",
    22: "lanemarking",
}

# SYNTHIA id -> trainId: the standard table of DG/UDA work (the DAFormer/HRDA converter,
# written from the README above). 17 is rider (not train) and 20 is train. 16 terrain,
# 18 truck and 20 train are in the README but (almost) never occur in RAND-CITYSCAPES.
# Mapped to 255: 0 void, 13 parking-slot, 14 road-work, 22 lanemarking (kept ignored as in
# that converter, although lane markings lie on the road).
SYNTHIA_TO_TRAINID: dict[int, int] = {
    1: 10,  # sky
    2: 2,  # building
    3: 0,  # road
    4: 1,  # sidewalk
    5: 4,  # fence
    6: 8,  # vegetation
    7: 5,  # pole
    8: 13,  # car
    9: 7,  # traffic sign
    10: 11,  # pedestrian -> person
    11: 18,  # bicycle
    12: 17,  # motorcycle
    15: 6,  # traffic light
    16: 9,  # terrain
    17: 12,  # rider
    18: 14,  # truck
    19: 15,  # bus
    20: 16,  # train
    21: 3,  # wall
}


def make_lut(mapping: Mapping[int, int], default: int = IGNORE_INDEX) -> np.ndarray:
    """Build a 256-entry ``uint8`` lookup table from ``{source_id: train_id}``.

    Negative source ids are stored at ``id % 256`` (Cityscapes' -1 "license plate" lands on
    255, which never holds another class). Unlisted ids map to ``default``.
    """
    lut = np.full(256, default, dtype=np.uint8)
    for src, dst in mapping.items():
        src, dst = int(src), int(dst)
        if not -256 <= src <= 255:
            raise ValueError(f"label mapping: source id {src} is outside 0..255")
        if not 0 <= dst <= 255:
            raise ValueError(f"label mapping: target id {dst} (for source {src}) is outside 0..255")
        lut[src % 256] = dst
    return lut


CITYSCAPES_LUT = make_lut(CITYSCAPES_ID_TO_TRAINID)
MAPILLARY_LUT = make_lut(MAPILLARY_TO_TRAINID)
SYNTHIA_LUT = make_lut(SYNTHIA_TO_TRAINID)

_COLOR_LUT = np.zeros((256, 3), dtype=np.uint8)
_COLOR_LUT[: len(PALETTE)] = np.asarray(PALETTE, dtype=np.uint8)


def apply_lut(label: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Map a label array through a 256-entry table; values outside 0..255 raise ValueError."""
    label = np.asarray(label)
    if label.dtype != np.uint8:
        if label.size and (label.min() < 0 or label.max() > 255):
            bad = np.unique(label[(label < 0) | (label > 255)])[:10].tolist()
            raise ValueError(f"label values {bad} do not fit a 256-entry mapping table")
        label = label.astype(np.uint8)
    return lut[label]


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def colorize(label: np.ndarray | torch.Tensor) -> np.ndarray:
    """Paint a (H, W) trainId map with the Cityscapes palette; 255 and unknown ids are black."""
    lab = _as_numpy(label)
    if lab.ndim != 2:
        raise ValueError(f"colorize expects a (H, W) label map, got shape {lab.shape}")
    lab = lab.astype(np.int64, copy=False)
    lab = np.where((lab >= 0) & (lab < 256), lab, IGNORE_INDEX)
    return _COLOR_LUT[lab]


def overlay(
    image: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    alpha: float = 0.5,
) -> np.ndarray:
    """Blend the colourised label over a (H, W, 3) uint8 image; ignored pixels stay untouched."""
    img = _as_numpy(image)
    lab = _as_numpy(label)
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[:2] != lab.shape:
        raise ValueError(
            f"overlay expects image (H, W, 3) and label (H, W); got {img.shape} and {lab.shape}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    color = colorize(lab).astype(np.float32)
    out = img.astype(np.float32)
    valid = ((lab >= 0) & (lab < NUM_CLASSES))[..., None]
    blended = (1.0 - alpha) * out + alpha * color
    out = np.where(valid, blended, out)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
