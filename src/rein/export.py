"""Deployment export: a trained segmentor as an ONNX or TorchScript file.

The exported model takes a normalised image tensor ``(1, 3, H, W)`` (ImageNet mean/std, RGB,
at the fixed export size) and returns the class scores ``(1, num_classes, H, W)`` of
whole-image inference: the head's last prediction upsampled to the input size,
``sum_q softmax(cls)[:-1] * sigmoid(mask)``; ``argmax`` over dim 1 gives the labels. Sliding
windows, flip and multi-scale TTA stay in Python (run the exported model per window).

Rein depends on the input (its attention over tokens uses the features), so it stays a
module in the graph — it cannot be folded into the backbone weights.

ONNX: with ``onnxscript`` installed the torch.export-based exporter (the default of
``torch.onnx.export`` since torch 2.9) is used; without it, the legacy TorchScript-based
exporter (deprecated) runs on a traced module. The opset is 18 by default (the deformable
attention's ``grid_sample`` needs >= 16). TorchScript: ``torch.jit.trace``; where the
Python code reads tensor shapes in a way tracing cannot record (e.g. the positional-embedding
interpolation of non-square inputs), the module is first captured by ``torch.export`` and
that graph is traced. Every export is checked against the PyTorch model on a random input.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "EXPORT_FORMATS",
    "ONNX_EXPORTERS",
    "ExportError",
    "ExportResult",
    "SegScores",
    "export_segmentor",
    "run_exported",
]

EXPORT_FORMATS: tuple[str, ...] = ("onnx", "torchscript")
ONNX_EXPORTERS: tuple[str, ...] = ("auto", "dynamo", "torchscript")
DEFAULT_OPSET = 18
_MIN_OPSET = 16  # GridSample (MSDeformAttn)
_PROTO_LIMIT = 2 * 1024**3 - 64 * 1024**2  # leave room under protobuf's 2 GiB


class ExportError(RuntimeError):
    """An export that cannot be done: unknown format, missing package, failed check."""


class SegScores(nn.Module):
    """``image (B, 3, H, W) -> class scores (B, K, H, W)``: whole-image inference of a
    :class:`rein.segmentor.Segmentor` (input padded to the patch size inside, if needed)."""

    def __init__(self, segmentor: nn.Module) -> None:
        super().__init__()
        self.segmentor = segmentor

    def forward(self, image: Tensor) -> Tensor:
        return self.segmentor.seg_scores(image)


@dataclass
class ExportResult:
    """What :func:`export_segmentor` wrote and how closely it matches PyTorch."""

    path: Path
    format: str
    exporter: str
    input_shape: tuple[int, int, int, int]
    output_shape: tuple[int, ...]
    max_abs_diff: float | None  # None: not checked (e.g. onnxruntime missing)


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode, no grad and ``requires_grad=False`` for the duration, restored after."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _quiet() -> contextlib.AbstractContextManager:
    """Silence the tracer / deprecation chatter of the exporters (errors still raise)."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
    warnings.simplefilter("ignore", category=DeprecationWarning)
    warnings.simplefilter("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*_decide_input_format.*")
    for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export"):
        logger = logging.getLogger(name)
        stack.callback(logger.setLevel, logger.level)
        logger.setLevel(logging.ERROR)
    return stack


def _capture(module: nn.Module, example: Tensor) -> Any:
    """``torch.export`` the module (strict first: the head converts shape tensors to ints,
    which non-strict export cannot specialise); the error of the last attempt is raised."""
    error: Exception | None = None
    for strict in (True, False):
        try:
            return torch.export.export(module, (example,), strict=strict)
        except Exception as exc:  # try the other mode; report the last error
            error = exc
    raise ExportError(f"torch.export could not capture the model: {error}") from error


def _trace(module: nn.Module, example: Tensor) -> tuple[torch.jit.ScriptModule, str]:
    """TorchScript by tracing; falls back to tracing the ``torch.export`` graph."""
    with _quiet():
        try:
            return torch.jit.trace(module, (example,), check_trace=False), "trace"
        except Exception:  # shape-dependent Python code that tracing cannot record
            graph = _capture(module, example).module()
            return torch.jit.trace(graph, (example,), check_trace=False), "export+trace"


def _export_onnx(module: nn.Module, example: Tensor, out: Path, opset: int, exporter: str) -> str:
    if not _has("onnx"):
        raise ExportError("ONNX export needs the 'onnx' package: pip install 'rein[export]'")
    if exporter == "auto":
        exporter = "dynamo" if _has("onnxscript") else "torchscript"
    if exporter == "dynamo" and not _has("onnxscript"):
        raise ExportError(
            "the torch.export-based ONNX exporter needs 'onnxscript': pip install onnxscript "
            "(or use exporter='torchscript')"
        )
    big = sum(p.numel() * p.element_size() for p in module.parameters()) > _PROTO_LIMIT
    with _quiet():
        if exporter == "dynamo":
            program = _capture(module, example)
            onnx_program = torch.onnx.export(
                program,
                (example,),
                dynamo=True,
                opset_version=opset,
                verbose=False,
                input_names=["image"],
                output_names=["scores"],
            )
            onnx_program.save(str(out), external_data=big)
        else:
            scripted, _ = _trace(module, example)
            torch.onnx.export(
                scripted,
                (example,),
                str(out),
                dynamo=False,
                opset_version=opset,
                input_names=["image"],
                output_names=["scores"],
            )
    return exporter


def run_exported(
    path: str | os.PathLike, image: Tensor | np.ndarray, fmt: str | None = None
) -> np.ndarray:
    """Run an exported file on a normalised image batch (1, 3, H, W); returns the class
    scores as a numpy array. ``fmt`` (default: ``onnx`` for a ``.onnx`` suffix, else
    ``torchscript``) picks onnxruntime or ``torch.jit.load``."""
    path = Path(path)
    fmt = fmt or ("onnx" if path.suffix.lower() == ".onnx" else "torchscript")
    array = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    array = np.ascontiguousarray(array, dtype=np.float32)
    if fmt == "onnx":
        if not _has("onnxruntime"):
            raise ExportError(
                "running an ONNX file needs 'onnxruntime': pip install 'rein[export]'"
            )
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: array})[0]
    with _quiet():
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return module(torch.from_numpy(array)).numpy()


def export_segmentor(
    model: nn.Module,
    out: str | os.PathLike,
    fmt: str = "onnx",
    height: int = 512,
    width: int = 512,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
    check: bool = True,
    atol: float = 1e-4,
) -> ExportResult:
    """Export ``model`` (a Segmentor) for a fixed input size; see the module docstring.

    ``fmt`` is ``"onnx"`` or ``"torchscript"``; ``exporter`` (ONNX only) ``"auto"``,
    ``"dynamo"`` or ``"torchscript"``. With ``check`` the file is loaded and run on a random
    input, and an output further than ``atol`` from PyTorch raises :class:`ExportError`.
    The model runs on the CPU in float32 for the export.
    """
    if fmt not in EXPORT_FORMATS:
        raise ExportError(
            f"unknown export format '{fmt}'; choose one of {', '.join(EXPORT_FORMATS)}"
        )
    if exporter not in ONNX_EXPORTERS:
        raise ExportError(
            f"unknown ONNX exporter '{exporter}'; choose one of {', '.join(ONNX_EXPORTERS)}"
        )
    if height <= 0 or width <= 0:
        raise ExportError(f"export size must be positive, got {height}x{width}")
    if fmt == "onnx" and opset < _MIN_OPSET:
        raise ExportError(f"ONNX opset {opset} is too old: grid_sample needs opset >= {_MIN_OPSET}")
    if not hasattr(model, "seg_scores"):
        raise ExportError(f"expected a rein Segmentor, got {type(model).__name__}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    model.to("cpu")
    try:
        with _frozen(model):
            module = SegScores(model).eval()
            gen = torch.Generator().manual_seed(0)
            example = torch.randn(1, 3, int(height), int(width), generator=gen)
            if fmt == "torchscript":
                scripted, used = _trace(module, example)
                scripted.save(str(out))
            else:
                used = _export_onnx(module, example, out, int(opset), exporter)
            probe = torch.randn(1, 3, int(height), int(width), generator=gen)
            reference = module(probe).numpy()
    finally:
        model.to(device)
    diff: float | None = None
    got_shape: tuple[int, ...] = tuple(reference.shape)
    if check and (fmt == "torchscript" or _has("onnxruntime")):
        got = run_exported(out, probe, fmt)
        got_shape = tuple(got.shape)
        if got.shape != reference.shape:
            raise ExportError(f"exported model returns {got.shape}, PyTorch {reference.shape}")
        diff = float(np.abs(got - reference).max())
        if not diff <= atol:
            raise ExportError(
                f"exported model differs from PyTorch by {diff:.3g} (> {atol:g}); file kept at {out}"
            )
    return ExportResult(
        path=out,
        format=fmt,
        exporter=used,
        input_shape=(1, 3, int(height), int(width)),
        output_shape=got_shape,
        max_abs_diff=diff,
    )
