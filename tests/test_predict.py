"""``rein predict``: directory inputs, unreadable files, distinct output names, image modes,
tiny images, and the evaluation preprocessing (a prediction equals its evaluated one)."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_run
from PIL import Image

from rein.cli import main
from rein.data.inputs import IMAGE_SUFFIXES, find_images, output_names
from rein.data.io import read_image


def _image(path: Path, hw=(52, 72), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*hw, 3), dtype=np.uint8)).save(path)
    return path


def _label(out: Path, name: str) -> np.ndarray:
    return np.array(Image.open(out / f"{name}_labelTrainIds.png"))


def _outputs(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*.png")}


# -- reading images --------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_greyscale_keeps_its_high_byte(tmp_path, suffix):
    grey = (np.arange(48 * 64, dtype=np.int64).reshape(48, 64) * 21).astype(np.uint16)
    path = tmp_path / f"g16{suffix}"
    Image.fromarray(grey).save(path)
    assert Image.open(path).mode.startswith("I")
    img = read_image(path)
    assert img.dtype == np.uint8 and img.shape == (48, 64, 3)
    want = (grey >> 8).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(img[..., c], want)
    assert img.min() == 0 and img.max() == want.max() > 200  # not uniform white


def test_32bit_integer_image_out_of_16bit_range_is_refused(tmp_path):
    from rein.data.errors import DataError

    path = tmp_path / "i32.tif"
    Image.fromarray(np.full((8, 8), 70000, dtype=np.int32)).save(path)
    with pytest.raises(DataError, match=r"i32\.tif.*0\.\.65535"):
        read_image(path)


def test_8bit_greyscale_and_rgba_become_rgb(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 255, (20, 30), dtype=np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "l.png")
    np.testing.assert_array_equal(read_image(tmp_path / "l.png"), np.stack([grey] * 3, -1))
    rgba = rng.integers(0, 255, (20, 30, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), rgba[..., :3])


# -- inputs and output names -----------------------------------------------------------------
def test_find_images_recursive_by_suffix_any_case(tmp_path):
    root = tmp_path / "in"
    for rel in ["a.png", "b.JPG", "sub/c.jpeg", "sub/deep/d.BMP", "e.tif", "f.TIFF", "g.webp"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    (root / "notes.txt").write_text("x")
    (root / "out" / "old.png").parent.mkdir()
    (root / "out" / "old.png").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    files, problems = find_images(
        [root, root / "a.png", tmp_path / "empty", tmp_path / "nope.png"], exclude=root / "out"
    )
    rel = [p.relative_to(root).as_posix() for p in files]
    assert rel == sorted(rel) and len(rel) == 7 and "notes.txt" not in rel
    assert "out/old.png" not in rel
    assert {Path(r).suffix.lower() for r in rel} == set(IMAGE_SUFFIXES)
    assert len(problems) == 2 and "empty" in problems[0] and "nope.png" in problems[1]


def test_output_names_mirror_paths_and_never_collide(tmp_path):
    assert output_names([tmp_path / "street.png"]) == ["street"]
    assert output_names([tmp_path / "a/x.png", tmp_path / "b/x.png"]) == ["a/x", "b/x"]
    names = output_names([tmp_path / "x.png", tmp_path / "x.jpg", tmp_path / "x_png.png"])
    assert len({n.casefold() for n in names}) == 3 and names[:2] == ["x_png_2", "x_jpg"]
    names = output_names([tmp_path / "X.png", tmp_path / "x.png"])
    assert len({n.casefold() for n in names}) == 2


# -- the command -----------------------------------------------------------------------------
def test_predict_a_directory_recursively(tmp_path, capsys):
    cfg, ckpt = tiny_run(tmp_path)
    src = tmp_path / "images"
    _image(src / "top.png", seed=1)
    _image(src / "a" / "x.JPG", seed=2)
    _image(src / "b" / "x.png", (30, 33), seed=3)
    (src / "readme.txt").write_text("not an image")
    out = tmp_path / "pred"
    assert main(["predict", str(cfg), str(ckpt), str(src), "--out", str(out)]) == 0
    kinds = ("labelTrainIds", "color", "overlay")
    assert _outputs(out) == {f"{n}_{k}.png" for n in ("top", "a/x", "b/x") for k in kinds}
    assert _label(out, "b/x").shape == (30, 33) and _label(out, "a/x").shape == (52, 72)
    # a second run does not pick up its own outputs when --out lies inside the inputs
    inner = src / "pred"
    assert main(["predict", str(cfg), str(ckpt), str(src), "--out", str(inner)]) == 0
    assert main(["predict", str(cfg), str(ckpt), str(src), "--out", str(inner)]) == 0
    assert len(_outputs(inner)) == 9


def test_inputs_sharing_a_stem_keep_their_own_outputs(tmp_path, capsys):
    cfg, ckpt = tiny_run(tmp_path)
    one = _image(tmp_path / "a" / "x.png", (52, 72), seed=1)
    two = _image(tmp_path / "b" / "x.png", (60, 50), seed=2)
    out = tmp_path / "pred"
    assert main(["predict", str(cfg), str(ckpt), str(one), str(two), "--out", str(out)]) == 0
    assert _label(out, "a/x").shape == (52, 72) and _label(out, "b/x").shape == (60, 50)
    same = tmp_path / "same"
    png = _image(tmp_path / "c" / "x.png", (52, 72), seed=3)
    jpg = tmp_path / "c" / "x.jpg"
    Image.open(two).save(jpg)
    assert main(["predict", str(cfg), str(ckpt), str(png), str(jpg), "--out", str(same)]) == 0
    assert _label(same, "x_png").shape == (52, 72) and _label(same, "x_jpg").shape == (60, 50)


def test_unreadable_files_are_skipped_with_a_warning_or_stop_with_strict(tmp_path, capsys):
    cfg, ckpt = tiny_run(tmp_path)
    src = tmp_path / "images"
    _image(src / "good.png")
    (src / "bad.png").write_bytes(b"this is not a png")
    full = src / "good.png"
    (src / "cut.jpg").write_bytes(full.read_bytes()[:60])
    out = tmp_path / "pred"
    argv = ["predict", str(cfg), str(ckpt), str(src), str(tmp_path / "missing.png")]
    assert main([*argv, "--out", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    warnings = [line for line in err if line.startswith("warning:")]
    assert len(warnings) == 3, err
    for name in ("bad.png", "cut.jpg", "missing.png"):
        assert sum(name in line for line in warnings) == 1
    assert _outputs(out) == {f"good_{k}.png" for k in ("labelTrainIds", "color", "overlay")}

    assert main(["predict", str(cfg), str(ckpt), str(src), "--out", str(out), "--strict"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "bad.png" in err and err.startswith("rein predict: error:")


def test_nothing_readable_is_an_error(tmp_path, capsys):
    cfg, ckpt = tiny_run(tmp_path)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    assert main(["predict", str(cfg), str(ckpt), str(bad), "--out", str(tmp_path / "p")]) == 2
    assert "could be read" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["slide", "whole"])
@pytest.mark.parametrize("hw", [(1, 1), (10, 10), (3, 40)])
def test_tiny_images_are_upscaled_not_a_traceback(tmp_path, capsys, mode, hw):
    cfg, ckpt = tiny_run(tmp_path, mode=mode)
    img = _image(tmp_path / "tiny.png", hw)
    out = tmp_path / "pred"
    assert main(["predict", str(cfg), str(ckpt), str(img), "--out", str(out)]) == 0
    assert _label(out, "tiny").shape == hw
    err = capsys.readouterr().err
    assert "tiny.png" in err and "upscaled" in err


def test_16bit_greyscale_prediction_matches_its_8bit_version(tmp_path, monkeypatch, capsys):
    import rein.commands as commands

    cfg, ckpt = tiny_run(tmp_path)
    from rein.cli import resolve_config

    model = commands._load_model(resolve_config(str(cfg)), str(ckpt))
    monkeypatch.setattr(commands, "_load_model", lambda *a, **k: model)
    grey = (np.random.default_rng(0).integers(0, 65535, (52, 72))).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    Image.fromarray((grey >> 8).astype(np.uint8), "L").save(tmp_path / "g8.png")
    out = tmp_path / "pred"
    files = [str(tmp_path / "g16.png"), str(tmp_path / "g8.png")]
    assert main(["predict", str(cfg), str(ckpt), *files, "--out", str(out)]) == 0
    np.testing.assert_array_equal(_label(out, "g16"), _label(out, "g8"))
    o16 = np.array(Image.open(out / "g16_overlay.png"))
    o8 = np.array(Image.open(out / "g8_overlay.png"))
    np.testing.assert_array_equal(o16, o8)


def test_predicted_image_equals_its_evaluated_prediction(tmp_path, monkeypatch, capsys):
    """The same model and image through the eval dataset path and through ``rein predict``:
    the same model input tensor and the same labels, pixel for pixel."""
    import rein.commands as commands
    import rein.engine.evaluate as evaluate
    from rein.cli import resolve_config
    from rein.engine.trainer import build_val_sets

    cfg_path, ckpt = tiny_run(tmp_path)
    root = tmp_path / "ds"
    sizes = [(100, 140), (90, 150), (96, 96)]  # resized to 80x112, 67x112, 80x80
    for i, hw in enumerate(sizes):
        yy, xx = np.mgrid[: hw[0], : hw[1]]
        smooth = np.stack([xx * 255 // hw[1], yy * 255 // hw[0], (xx + yy) % 256], -1)
        noise = np.random.default_rng(i).integers(0, 40, (*hw, 3))
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8)).save(
            root / "images" / f"img{i}.png"
        )
        (root / "labels").mkdir(exist_ok=True)
        Image.fromarray(np.zeros(hw, np.uint8), "L").save(root / "labels" / f"img{i}.png")
    data = yaml.safe_load(cfg_path.read_text())
    data["data"]["val"] = [
        {"name": "folder", "root": str(root), "split": "all", "eval_scale": [112, 80]}
    ]
    cfg_path.write_text(yaml.safe_dump(data))
    cfg = resolve_config(str(cfg_path))
    model = commands._load_model(cfg, str(ckpt))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a head of unit scale predicts several classes
        for p in model.decode_head.parameters():
            p.copy_(torch.randn(p.shape, generator=g))

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = evaluate.predict_labels

    def spy(model, image, *args, **kwargs):
        out = real(model, image, *args, **kwargs)
        seen.append((image.detach().clone(), out.detach().clone()))
        return out

    monkeypatch.setattr(evaluate, "predict_labels", spy)
    (ds,) = build_val_sets(cfg).values()
    evaluate.evaluate_dataset(model, ds, cfg.model.head.num_classes, cfg.eval)
    evaluated = list(seen)
    assert len(evaluated) == len(sizes)
    seen.clear()

    monkeypatch.setattr(commands, "_load_model", lambda *a, **k: model)
    out = tmp_path / "pred"
    files = [str(root / "images" / f"img{i}.png") for i in range(len(sizes))]
    argv = ["predict", str(cfg_path), str(ckpt), *files, "--out", str(out), "--scale", "112", "80"]
    assert main(argv) == 0
    assert len(seen) == len(sizes)
    for i, ((x_eval, y_eval), (x_pred, _)) in enumerate(zip(evaluated, seen)):
        assert tuple(x_eval.shape[-2:]) != sizes[i]  # the evaluation resize applied
        assert torch.equal(x_eval, x_pred), f"img{i}: predict fed the model another tensor"
        label = _label(out, f"img{i}")
        np.testing.assert_array_equal(label, y_eval[0].numpy().astype(np.uint8))
    assert len(np.unique(_label(out, "img0"))) > 1  # the comparison is not trivial


def test_dataset_option_resizes_as_eval_does(tmp_path, monkeypatch, capsys):
    import rein.engine.evaluate as evaluate

    cfg, ckpt = tiny_run(tmp_path)  # eval.crop_size 64: the 512 setting, cityscapes 1024x512
    img = _image(tmp_path / "wide.png", (100, 400))
    seen = []

    def spy(model, image, out_size, **kwargs):
        seen.append(tuple(image.shape[-2:]))
        return torch.zeros((1, *out_size), dtype=torch.long)

    monkeypatch.setattr(evaluate, "predict_labels", spy)
    out = tmp_path / "pred"
    argv = ["predict", str(cfg), str(ckpt), str(img), "--out", str(out), "--dataset", "cityscapes"]
    assert main(argv) == 0
    assert seen == [(256, 1024)] and _label(out, "wide").shape == (100, 400)
    with pytest.raises(SystemExit):  # --scale and --dataset exclude each other
        main([*argv, "--scale", "64", "64"])
