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
