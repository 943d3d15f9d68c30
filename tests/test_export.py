"""Deployment export: ONNX / TorchScript files match the PyTorch model."""

from dataclasses import asdict

import pytest
import torch
import yaml
from conftest import tiny_model_config, tiny_segmentor

from rein.cli import main
from rein.engine.checkpoint import load_checkpoint, load_into, save_checkpoint
from rein.export import ExportError, SegScores, export_segmentor, run_exported
from rein.segmentor import build_segmentor


def _reference(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return SegScores(model.eval())(x)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A config file for the tiny model and a checkpoint of its (random) trainable weights."""
    tmp = tmp_path_factory.mktemp("export")
    cfg = {"model": asdict(tiny_model_config()), "eval": {"mode": "whole", "crop_size": 64}}
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    model = tiny_segmentor(seed=3)
    save_checkpoint(tmp / "ckpt", "latest", model.trainable_state_dict(), {"iteration": 0})
    return tmp, path, tmp / "ckpt"


def _load(ckpt):
    model = build_segmentor(tiny_model_config(), with_criterion=False)
    state, _, _ = load_checkpoint(ckpt)
    load_into(model, state)
    return model.eval()


def test_torchscript_export_via_cli_matches_pytorch(run, capsys):
    tmp, cfg, ckpt = run
    out = tmp / "rein.pt"
    torch.manual_seed(5)  # the frozen backbone is random here (not in the checkpoint)
    assert main(["export", str(cfg), str(ckpt), "--format", "torchscript", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "torchscript" in printed and "(1, 19, 64, 64)" in printed and "max |diff|" in printed
    torch.manual_seed(5)
    model = _load(ckpt)
    x = torch.randn(1, 3, 64, 64)
    loaded = torch.jit.load(str(out))
    with torch.no_grad():
        got = loaded(x)
    want = _reference(model, x)
    assert got.shape == (1, 19, 64, 64)
    assert (got - want).abs().max().item() <= 1e-4
    assert torch.equal(torch.from_numpy(run_exported(out, x)), got)


class _ShapeDependent(torch.nn.Module):
    """A toy 'segmentor' whose Python code turns shapes into float scale factors, as the ViT
    positional-embedding interpolation does for non-square inputs: plain tracing fails."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def seg_scores(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.avg_pool2d(self.conv(x), 2)
        scale = ((x.shape[-2] + 0.1) / y.shape[-2], (x.shape[-1] + 0.1) / y.shape[-1])
        return torch.nn.functional.interpolate(y, scale_factor=scale, mode="bicubic")


def test_torchscript_export_falls_back_to_torch_export_for_shape_dependent_code(tmp_path):
    model = _ShapeDependent()
    with pytest.raises(TypeError):  # what plain tracing does with it
        torch.jit.trace(SegScores(model), torch.randn(1, 3, 8, 12))
    res = export_segmentor(model, tmp_path / "toy.pt", "torchscript", height=8, width=12)
    assert res.exporter == "export+trace" and res.output_shape == (1, 4, 8, 12)
    assert res.max_abs_diff <= 1e-5
    assert model.training and all(p.requires_grad for p in model.parameters())  # restored
    x = torch.randn(1, 3, 8, 12)
    got = torch.from_numpy(run_exported(res.path, x))
    assert torch.allclose(got, _reference(model, x), atol=1e-5)


def test_onnx_export_matches_pytorch_in_onnxruntime(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model = tiny_segmentor(seed=1)
    res = export_segmentor(model, tmp_path / "rein.onnx", "onnx", 64, 64, exporter="torchscript")
    assert res.exporter == "torchscript" and res.max_abs_diff <= 1e-4
    proto = onnx.load(str(res.path))
    assert [i.name for i in proto.graph.input] == ["image"]
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 16
    assert any(n.op_type == "GridSample" for n in proto.graph.node)  # MSDeformAttn
    x = torch.randn(1, 3, 64, 64)
    got = torch.from_numpy(run_exported(res.path, x))
    assert got.shape == (1, 19, 64, 64)
    assert (got - _reference(model, x)).abs().max().item() <= 1e-4


def test_onnx_dynamo_export_of_a_non_square_size_via_cli(run, capsys):
    for module in ("onnx", "onnxruntime", "onnxscript"):
        pytest.importorskip(module)
    tmp, cfg, ckpt = run
    out = tmp / "rein.onnx"
    argv = ["export", str(cfg), str(ckpt), "--format", "onnx", "--out", str(out)]
    torch.manual_seed(6)
    assert main([*argv, "--height", "64", "--width", "96"]) == 0
    assert "via dynamo" in capsys.readouterr().out
    torch.manual_seed(6)
    model = _load(ckpt)
    x = torch.randn(1, 3, 64, 96)
    got = torch.from_numpy(run_exported(out, x))
    assert got.shape == (1, 19, 64, 96)
    assert (got - _reference(model, x)).abs().max().item() <= 1e-4


def test_export_errors_are_clear(run, capsys, tmp_path):
    tmp, cfg, ckpt = run
    model = tiny_segmentor()
    with pytest.raises(ExportError, match="unknown export format 'tflite'; choose one of onnx"):
        export_segmentor(model, tmp_path / "m.tflite", "tflite")
    with pytest.raises(ExportError, match="opset >= 16"):
        export_segmentor(model, tmp_path / "m.onnx", "onnx", opset=13)
    with pytest.raises(ExportError, match="unknown ONNX exporter"):
        export_segmentor(model, tmp_path / "m.onnx", "onnx", exporter="fx")
    with pytest.raises(ExportError, match="Segmentor"):
        export_segmentor(torch.nn.Linear(2, 2), tmp_path / "m.pt", "torchscript")
    missing = tmp_path / "no_such_ckpt"
    argv = ["export", str(cfg), str(missing), "--format", "torchscript", "--out", "x.pt"]
    assert main(argv) == 2
    assert f"checkpoint not found: {missing}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(cfg), str(ckpt), "--format", "tflite", "--out", "x"])
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
