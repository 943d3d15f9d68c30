from pathlib import Path

import pytest
import torch

from rein.config import load_config
from rein.methods import method_names
from rein.segmentor import build_segmentor

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.model.tuning in method_names()


@pytest.mark.parametrize(
    "name",
    ["full_dinov2-l_mask2former_gta_512", "rein_dinov2-l_mask2former_citys2acdc_1024"],
)
def test_paper_settings_build(name):
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    with torch.device("meta"):
        model = build_segmentor(cfg.model, load_weights=False, with_criterion=False)
    groups = model.parameter_groups()
    assert groups["backbone"][0] == 304_199_680


METHOD_CONFIGS = [p for p in CONFIGS if p.stem.startswith(("soma_", "recyclelora_"))]


@pytest.mark.parametrize("path", METHOD_CONFIGS, ids=[p.stem for p in METHOD_CONFIGS])
def test_soma_and_recyclelora_configs_build_with_the_official_evaluation(path):
    """Each builds on the meta device; the 512 ones evaluate at the official SoMA/RecycleLoRA
    sizes (Cityscapes / Mapillary fit to 2048x1024, BDD 1280x720); RecycleLoRA's GTAV is the
    12,403-image random subset, drawn per run."""
    from rein.data import build_eval_pipeline, build_train_pipeline

    cfg = load_config(path)
    with torch.device("meta"):
        build_segmentor(cfg.model, load_weights=False, with_criterion=False)
    build_train_pipeline(crop=cfg.data.crop_size, pad_position=cfg.data.pad_position)
    for d in cfg.data.val:
        build_eval_pipeline(d.name, crop=cfg.eval.crop_size, scale=d.eval_scale)
        if cfg.eval.crop_size == 512:
            want = {"cityscapes": (2048, 1024), "mapillary": (2048, 1024), "bdd100k": (1280, 720)}
            assert d.eval_scale == want[d.name], d.name
    for d in cfg.data.train:
        if path.stem.startswith("recyclelora_") and d.name == "gtav":
            assert (d.subset.num_samples, d.subset.seed) == (12403, None)
        else:
            assert d.subset is None
    pad = "before_flip" if path.stem in PADDED else "after_normalize"
    assert cfg.data.pad_position == pad


PADDED = {
    "recyclelora_dinov2-l_mask2former_gta_512",
    "recyclelora_dinov2-l_mask2former_citys2bm_512",
    *(f"recyclelora_dinov3-{size}_mask2former_gta_512" for size in ("s", "b", "l", "hplus")),
}
