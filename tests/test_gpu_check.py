"""benchmarks/gpu_check.py: its tiny CPU mode runs end to end in-process, and without a GPU
``--device cuda`` is a one-line error. The GPU run itself is never part of the suite."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


def test_tiny_cpu_mode_trains_every_method_and_times_inference(gpu_check, capsys):
    methods = ["rein", "full", "soma"]
    out = gpu_check.main(
        ["--device", "cpu", "--tiny", "--precision", "fp32", "--methods", *methods]
    )
    text = capsys.readouterr().out
    assert list(out["train"]) == methods
    for method, row in out["train"].items():
        assert row["it_s"] > 0 and math.isfinite(row["last_loss"]) and row["trainable"] > 0
        assert row["peak_mib"] is None  # CUDA only
        assert f"| {method} |" in text
    assert out["train"]["full"]["trainable"] > out["train"]["rein"]["trainable"]
    assert "| full |" in text and "1.00x" in text
    assert out["rein_infer_s"] > 0 and "128x64 slide" in text


def test_the_config_is_the_documented_setting(gpu_check):
    cfg = gpu_check.build_config("soma", gpu_check.FULL, "bf16", "cuda")
    assert cfg.model.backbone.name == "vit_large_patch14_dinov2"
    assert cfg.model.backbone.weights is None and cfg.model.backbone.img_size == 512
    assert cfg.model.precision == "bf16" and cfg.train.amp == "none"
    assert cfg.data.batch_size == 4 and cfg.model.tuning_options["svd_device"] == "cuda"
    assert (
        "svd_device"
        not in gpu_check.build_config("soma", gpu_check.FULL, "bf16", "cpu").model.tuning_options
    )


def test_cuda_without_a_gpu_is_one_line(gpu_check, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as info:
        gpu_check.main(["--device", "cuda"])
    msg = str(info.value.code)
    assert msg.startswith("gpu_check: error:") and "\n" not in msg and "--tiny" in msg
