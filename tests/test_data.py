"""Label tables, file reading and the dataset classes, on tiny fake dataset trees."""

from __future__ import annotations

import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rein.data import (
    CITYSCAPES_LUT,
    CLASSES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAPILLARY_LUT,
    PALETTE,
    SYNTHIA_LUT,
    ACDCDataset,
    BDD100KDataset,
    CityscapesDataset,
    DataError,
    FolderDataset,
    GTAVDataset,
    MapillaryDataset,
    SynthiaDataset,
    UrbanSynDataset,
    build_dataset,
    collate_samples,
    colorize,
    load_mapping,
    overlay,
    read_image,
    read_label,
)
from rein.data.labels import MAPILLARY_CLASSES, make_lut

H, W = 6, 8


# --------------------------------------------------------------------------- file helpers


def write_rgb(path: Path, h: int = H, w: int = W, value: int | None = None) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    if value is None:
        img = np.random.default_rng(len(str(path))).integers(0, 256, (h, w, 3), dtype=np.uint8)
    else:
        img = np.full((h, w, 3), value, np.uint8)
    Image.fromarray(img).save(path)
    return img


def write_label(path: Path, values: np.ndarray | int, palette: bool = False) -> np.ndarray:
    """A single-channel label PNG; ``palette=True`` writes palette indices (GTAV, Mapillary)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lab = np.full((H, W), values, np.uint8) if np.isscalar(values) else np.asarray(values, np.uint8)
    if palette:
        im = Image.new("P", (lab.shape[1], lab.shape[0]))
        im.putpalette([(i * 7) % 256 for i in range(768)])
        im.putdata(lab.flatten().tolist())
    else:
        im = Image.fromarray(lab)
    im.save(path)
    return lab


def write_png16(path: Path, channels: np.ndarray) -> None:
    """A 16-bit RGB PNG (colour type 2), rows filtered with all five PNG filters."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w, _ = channels.shape
    rows = [channels[r].astype(">u2").tobytes() for r in range(h)]
    bpp, prev, out = 6, bytes(len(rows[0])), b""
    for r, row in enumerate(rows):
        filt = r % 5
        enc = bytearray()
        for i, x in enumerate(row):
            a = row[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            paeth = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            pred = (0, a, b, (a + b) // 2, paeth)[filt]
            enc.append((x - pred) % 256)
        out += bytes([filt]) + bytes(enc)
        prev = row

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(out))
        + chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------- labels


def test_cityscapes_table():
    assert len(CLASSES) == 19 and len(PALETTE) == 19
    assert CITYSCAPES_LUT.shape == (256,) and CITYSCAPES_LUT.dtype == np.uint8
    expected = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10}
    expected |= {24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    for i in range(256):
        assert CITYSCAPES_LUT[i] == expected.get(i, 255), i


def test_mapillary_table_follows_the_official_name_rule():
    # The official Rein converter matches lower-cased names without spaces/dashes.
    city = {n.replace(" ", ""): i for i, n in enumerate(CLASSES)}
    rule = []
    for name in MAPILLARY_CLASSES:
        n = name.lower().replace(" ", "").replace("-", "")
        if n in city:
            rule.append(city[n])
        elif "trafficsign" in n or "front" in n or "back" in n:
            rule.append(7)
        elif "onrail" in n:
            rule.append(16)
        elif "cyclist" in n or "rider" in n:
            rule.append(12)
        elif "pole" in n or "streetlight" in n:
            rule.append(5)
        elif "curb" in n or "pedestrianarea" in n:
            rule.append(1)
        elif any(k in n for k in ("crosswalkplain", "parking", "bikelane", "servicelane")):
            rule.append(0)
        elif "lanemarking" in n:
            rule.append(0)
        else:
            rule.append(255)
    assert len(MAPILLARY_CLASSES) == 66
    assert MAPILLARY_LUT[:66].tolist() == rule
    assert (MAPILLARY_LUT[66:] == 255).all()
    for src, dst in {13: 0, 55: 13, 24: 0, 19: 11, 20: 12, 46: 7, 58: 16, 41: 255, 65: 255}.items():
        assert MAPILLARY_LUT[src] == dst


def test_synthia_table():
    for src, dst in {
        1: 10,
        2: 2,
        3: 0,
        8: 13,
        10: 11,
        15: 6,
        17: 12,
        19: 15,
        20: 16,
        21: 3,
    }.items():
        assert SYNTHIA_LUT[src] == dst
    for src in (0, 13, 14, 22, 23, 255):
        assert SYNTHIA_LUT[src] == 255


def test_make_lut_validates():
    with pytest.raises(ValueError):
        make_lut({300: 1})
    assert make_lut({-1: 4})[255] == 4


def test_colorize_and_overlay():
    lab = np.array([[0, 13], [255, 200]], np.uint8)
    col = colorize(lab)
    assert col.dtype == np.uint8 and col.shape == (2, 2, 3)
    assert tuple(col[0, 0]) == PALETTE[0] and tuple(col[0, 1]) == (0, 0, 142)
    assert tuple(col[1, 0]) == (0, 0, 0) and tuple(col[1, 1]) == (0, 0, 0)
    assert (colorize(torch.tensor(lab, dtype=torch.long)) == col).all()
    img = np.full((2, 2, 3), 100, np.uint8)
    out = overlay(img, lab, alpha=0.5)
    assert (out[1, 0] == 100).all()  # ignored pixel untouched
    assert tuple(out[0, 1]) == (50, 50, 121)


# --------------------------------------------------------------------------- io


def test_read_image_formats(tmp_path):
    img = write_rgb(tmp_path / "a.png")
    got = read_image(tmp_path / "a.png")
    assert got.dtype == np.uint8 and got.shape == (H, W, 3) and (got == img).all()
    Image.fromarray(img[..., 0]).save(tmp_path / "grey.png")
    assert read_image(tmp_path / "grey.png").shape == (H, W, 3)
    write_rgb(tmp_path / "b.jpg")
    assert read_image(tmp_path / "b.jpg").shape == (H, W, 3)


def test_read_image_errors_name_the_file(tmp_path):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"this is not an image at all")
    with pytest.raises(DataError, match="corrupt.png"):
        read_image(bad)
    write_rgb(tmp_path / "full.png", 40, 40)
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated.png"):
        read_image(tmp_path / "truncated.png")
    with pytest.raises(DataError, match="not found.*missing.png"):
        read_image(tmp_path / "missing.png")
    assert issubclass(DataError, ValueError)


def test_read_label_palette_and_values(tmp_path):
    lab = np.arange(H * W, dtype=np.uint8).reshape(H, W) % 34
    write_label(tmp_path / "p.png", lab, palette=True)
    assert Image.open(tmp_path / "p.png").mode == "P"
    assert (read_label(tmp_path / "p.png") == lab).all()
    mapped = read_label(tmp_path / "p.png", mapping=CITYSCAPES_LUT, num_classes=19)
    assert (mapped == CITYSCAPES_LUT[lab]).all()


def test_read_label_out_of_range(tmp_path):
    lab = np.zeros((H, W), np.uint8)
    lab[0, :3] = [19, 40, 255]
    write_label(tmp_path / "bad.png", lab)
    with pytest.raises(DataError) as err:
        read_label(tmp_path / "bad.png", num_classes=19)
    assert "bad.png" in str(err.value) and "19, 40" in str(err.value)
    assert "255" not in str(err.value).split(":")[-1].split("(")[0]
    # checked after mapping: ids 40 -> 255 are fine through the Cityscapes table
    assert read_label(tmp_path / "bad.png", mapping=CITYSCAPES_LUT, num_classes=19).max() == 255


def test_read_label_16bit_first_channel(tmp_path):
    ch = np.zeros((H, W, 3), np.uint16)
    ch[..., 0] = np.arange(H * W).reshape(H, W) % 23  # SYNTHIA ids
    ch[0, 0, 0] = 300  # needs the full 16 bits
    ch[..., 1] = 4000  # instance ids in another channel
    write_png16(tmp_path / "s.png", ch)
    got = read_label(tmp_path / "s.png")
    assert got.dtype == np.int32 and (got == ch[..., 0]).all()
    ch[0, 0, 0] = 3
    write_png16(tmp_path / "s.png", ch)
    mapped = read_label(tmp_path / "s.png", mapping=SYNTHIA_LUT, num_classes=19, channel=0)
    assert (mapped == SYNTHIA_LUT[ch[..., 0]]).all()


def test_read_label_rejects_colour_labels(tmp_path):
    img = np.zeros((H, W, 3), np.uint8)
    img[..., 0] = 128
    Image.fromarray(img).save(tmp_path / "color.png")
    with pytest.raises(DataError, match="colour"):
        read_label(tmp_path / "color.png")


# --------------------------------------------------------------------------- datasets


def make_gtav(root: Path, n: int = 3, converted: bool = False) -> None:
    for i in range(n):
        write_rgb(root / "images" / f"{i:05d}.png")
        write_label(root / "labels" / f"{i:05d}.png", 26, palette=True)  # Cityscapes car
        if converted:
            write_label(root / "labels" / f"{i:05d}_labelTrainIds.png", 5)


def test_gtav_ids_mapped(tmp_path):
    make_gtav(tmp_path)
    ds = GTAVDataset(tmp_path)
    assert len(ds) == 3
    s = ds[0]
    assert s["image"].shape == (3, H, W) and s["image"].dtype == torch.float32
    assert s["label"].dtype == torch.int64 and (s["label"] == 13).all()
    assert s["meta"]["ori_shape"] == (H, W) and s["meta"]["image_path"].endswith("00000.png")


def test_gtav_prefers_converted_trainids(tmp_path):
    make_gtav(tmp_path, converted=True)
    ds = GTAVDataset(tmp_path, split="train")
    assert len(ds) == 3 and (ds[1]["label"] == 5).all()
    assert ds.pairs[0][1].name == "00000_labelTrainIds.png"


def test_gtav_split_file(tmp_path):
    make_gtav(tmp_path, n=4)
    (tmp_path / "val.txt").write_text("00001\n00003.png\n")
    ds = GTAVDataset(tmp_path, split="val")
    assert [p[0].name for p in ds.pairs] == ["00001.png", "00003.png"]
    with pytest.raises(DataError, match="test"):
        GTAVDataset(tmp_path, split="test")


def test_image_normalisation(tmp_path):
    write_rgb(tmp_path / "images" / "a.png", value=0)
    write_label(tmp_path / "labels" / "a.png", 26, palette=True)
    img = GTAVDataset(tmp_path)[0]["image"]
    expect = -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(img[:, 0, 0], expect)


def test_synthia_16bit_labels(tmp_path):
    ch = np.zeros((H, W, 3), np.uint16)
    ch[..., 0] = 17  # rider in SYNTHIA
    ch[:2, :, 0] = 20  # train
    ch[..., 2] = 999
    write_rgb(tmp_path / "RGB" / "0000000.png")
    write_png16(tmp_path / "GT" / "LABELS" / "0000000.png", ch)
    lab = SynthiaDataset(tmp_path)[0]["label"]
    assert (lab[2:] == 12).all() and (lab[:2] == 16).all()


def test_urbansyn_pairs(tmp_path):
    for i in (1, 2):
        write_rgb(tmp_path / "rgb" / f"rgb_{i:04d}.png")
        write_label(tmp_path / "ss" / f"ss_{i:04d}.png", 8)
    ds = UrbanSynDataset(tmp_path)
    assert len(ds) == 2 and ds.pairs[1][1].name == "ss_0002.png"
    assert (ds[0]["label"] == 8).all()


def make_cityscapes(root: Path, split: str = "val", kind: str = "labelTrainIds") -> None:
    for city, frame in (("aachen", 19), ("bonn", 20)):
        stem = f"{city}_000000_{frame:06d}"
        write_rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
        value = 13 if kind == "labelTrainIds" else 26
        write_label(root / "gtFine" / split / city / f"{stem}_gtFine_{kind}.png", value)


def test_cityscapes_trainids_and_fallback(tmp_path):
    make_cityscapes(tmp_path / "a", "val", "labelTrainIds")
    ds = CityscapesDataset(tmp_path / "a", "val")
    assert len(ds) == 2 and (ds[0]["label"] == 13).all()
    make_cityscapes(tmp_path / "b", "train", "labelIds")
    ds = CityscapesDataset(tmp_path / "b", "train")
    assert len(ds) == 2 and (ds[1]["label"] == 13).all()  # id 26 -> car 13
    assert ds.pairs[0][1].name.endswith("_gtFine_labelIds.png")


def test_missing_root_prints_layout(tmp_path):
    with pytest.raises(DataError) as err:
        CityscapesDataset(tmp_path / "nowhere", "val")
    msg = str(err.value)
    assert "nowhere" in msg and "leftImg8bit/{split}/{city}" in msg and "gtFine" in msg
    tmp_path.joinpath("leftImg8bit").mkdir()
    with pytest.raises(DataError) as err:
        CityscapesDataset(tmp_path, "val")
    assert str(tmp_path / "leftImg8bit" / "val") in str(err.value)


def test_zero_pairs_prints_layout(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(DataError) as err:
        GTAVDataset(tmp_path)
    assert "no image/label pairs" in str(err.value) and "_labelTrainIds.png" in str(err.value)


def test_missing_label_file(tmp_path):
    make_gtav(tmp_path, n=2)
    write_rgb(tmp_path / "images" / "00009.png")
    with pytest.raises(DataError, match="00009.png"):
        GTAVDataset(tmp_path)
    with pytest.warns(UserWarning, match="00009.png"):
        ds = GTAVDataset(tmp_path, skip_bad=True)
    assert len(ds) == 2


def test_bdd100k_layouts(tmp_path):
    new = tmp_path / "new"
    for name in ("a", "b"):
        write_rgb(new / "images" / "10k" / "val" / f"{name}.jpg")
        write_label(new / "labels" / "sem_seg" / "masks" / "val" / f"{name}.png", 2)
    assert len(BDD100KDataset(new, "val")) == 2
    old = tmp_path / "old"
    write_rgb(old / "seg" / "images" / "train" / "x.jpg")
    write_label(old / "seg" / "labels" / "train" / "x_train_id.png", 255)
    ds = BDD100KDataset(old, "train")
    assert len(ds) == 1 and (ds[0]["label"] == 255).all()
    write_rgb(new / "images" / "10k" / "test" / "t.jpg")
    test = BDD100KDataset(new, "test")
    assert "label" not in test[0]


def test_mapillary_mapping_and_layouts(tmp_path):
    lab = np.full((H, W), 13, np.uint8)  # road
    lab[0] = 55  # car
    lab[1] = 41  # manhole -> ignored
    lab[2] = 46  # traffic sign frame -> traffic sign (official Rein table)
    write_rgb(tmp_path / "validation" / "images" / "k1.jpg")
    write_label(tmp_path / "validation" / "v1.2" / "labels" / "k1.png", lab, palette=True)
    s = MapillaryDataset(tmp_path, "val")[0]["label"]
    assert (s[0] == 13).all() and (s[1] == 255).all() and (s[2] == 7).all() and (s[3:] == 0).all()
    write_rgb(tmp_path / "training" / "images" / "k2.jpg")
    write_label(tmp_path / "training" / "labels" / "k2.png", 30)  # v1.0 layout, vegetation
    assert (MapillaryDataset(tmp_path, "training")[0]["label"] == 8).all()
    write_rgb(tmp_path / "half" / "val_img" / "k3.jpg")
    write_label(tmp_path / "half" / "val_label" / "k3.png", 10)  # already trainIds
    assert (MapillaryDataset(tmp_path, "half")[0]["label"] == 10).all()


def make_acdc(root: Path, split: str = "val") -> None:
    for cond in ACDCDataset.CONDITIONS:
        seq = "GOPR0475"
        stem = f"{seq}_frame_000041"
        write_rgb(root / "rgb_anon" / cond / split / seq / f"{stem}_rgb_anon.png")
        if split != "test":
            path = root / "gt" / cond / split / seq / f"{stem}_gt_labelTrainIds.png"
            write_label(path, 10)


def test_acdc_conditions(tmp_path):
    make_acdc(tmp_path)
    assert len(ACDCDataset(tmp_path, "val", "all")) == 4
    night = ACDCDataset(tmp_path, "val", condition="night")
    assert len(night) == 1 and "/night/" in night[0]["meta"]["image_path"]
    assert (night[0]["label"] == 10).all()
    with pytest.raises(DataError, match="fog, night, rain, snow"):
        ACDCDataset(tmp_path, "val", condition="haze")
    make_acdc(tmp_path, "test")
    assert "label" not in ACDCDataset(tmp_path, "test")[0]


def test_folder_dataset_mapping_files(tmp_path):
    for i in range(2):
        write_rgb(tmp_path / "img" / "sub" / f"{i}.jpg")
        write_label(tmp_path / "ann" / "sub" / f"{i}_seg.png", 7)
    (tmp_path / "map.yaml").write_text("7: 0\n8: 1\n")
    ds = FolderDataset(
        tmp_path / "img", tmp_path / "ann", ".jpg", "_seg.png", tmp_path / "map.yaml"
    )
    assert len(ds) == 2 and (ds[0]["label"] == 0).all()
    (tmp_path / "map.json").write_text(json.dumps({"7": 18}))
    ds = FolderDataset(
        tmp_path / "img", tmp_path / "ann", ".jpg", "_seg.png", tmp_path / "map.json"
    )
    assert (ds[1]["label"] == 18).all()
    (tmp_path / "bad.json").write_text(json.dumps({"7": 40}))
    with pytest.raises(DataError, match="bad.json"):
        load_mapping(tmp_path / "bad.json")
    unmapped = FolderDataset(tmp_path / "img", tmp_path / "ann", ".jpg", "_seg.png", {8: 1})
    assert (unmapped[0]["label"] == 255).all()


def test_corrupt_image_and_skip_bad(tmp_path):
    make_gtav(tmp_path, n=3)
    (tmp_path / "images" / "00001.png").write_bytes(b"garbage")
    ds = GTAVDataset(tmp_path)
    with pytest.raises(DataError, match="00001.png"):
        ds[1]
    ds = GTAVDataset(tmp_path, skip_bad=True)
    with pytest.warns(UserWarning, match="00001.png"):
        s = ds[1]
    assert s["meta"]["index"] == 2 and ds.num_bad == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ds[1]["meta"]["index"] == 2  # known bad: skipped silently
    assert ds.num_bad == 1
    assert len(ds.check()) == 1


def test_size_mismatch_names_both_files(tmp_path):
    write_rgb(tmp_path / "images" / "a.png", h=H, w=W)
    lab = np.full((H + 1, W), 26, np.uint8)
    write_label(tmp_path / "labels" / "a.png", lab, palette=True)
    with pytest.raises(DataError) as err:
        GTAVDataset(tmp_path)[0]
    msg = str(err.value)
    assert "images/a.png" in msg and "labels/a.png" in msg and "8x6" in msg and "8x7" in msg


def test_out_of_range_label_in_dataset(tmp_path):
    for i in range(2):
        write_rgb(tmp_path / "images" / "10k" / "val" / f"{i}.jpg")
        write_label(tmp_path / "labels" / "sem_seg" / "masks" / "val" / f"{i}.png", 19 + i)
    ds = BDD100KDataset(tmp_path, "val")
    with pytest.raises(DataError, match=r"0\.png.*19"):
        ds[0]


def test_collate_and_dataloader(tmp_path):
    make_gtav(tmp_path, n=3)
    loader = torch.utils.data.DataLoader(
        GTAVDataset(tmp_path), batch_size=2, collate_fn=collate_samples
    )
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 3, H, W) and batch["label"].shape == (2, H, W)
    assert len(batch["meta"]) == 2 and batch["meta"][1]["index"] == 1


def test_registry(tmp_path):
    make_cityscapes(tmp_path / "cs", "val")
    assert len(build_dataset("cityscapes", tmp_path / "cs", "val")) == 2
    assert len(build_dataset("Citys", tmp_path / "cs", "val")) == 2
    make_gtav(tmp_path / "gta")
    assert len(build_dataset("gta5", tmp_path / "gta")) == 3
    write_rgb(tmp_path / "f" / "images" / "val" / "a.png")
    write_label(tmp_path / "f" / "labels" / "val" / "a.png", 3)
    assert len(build_dataset("folder", tmp_path / "f", "val")) == 1
    syn = build_dataset("synthetic", None, "val", num_images=2, size=(32, 48), style="fog")
    assert len(syn) == 2 and syn[0]["image"].shape == (3, 32, 48)
    with pytest.raises(ValueError) as err:
        build_dataset("cityscape", tmp_path)
    assert "'cityscapes'" in str(err.value) and "mapillary" in str(err.value)
