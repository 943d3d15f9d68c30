"""Interoperability with the official Rein checkpoints (mmsegmentation 1.x layout).

An official checkpoint is ``{"meta": ..., "state_dict": ...}`` whose state dict holds only the
trainable weights: ``backbone.reins.*`` and ``decode_head.*`` (303 keys for DINOv2-L). Our
:class:`~rein.segmentor.Segmentor` uses the same names for these, so the mapping is the identity
on them; the frozen DINOv2 weights, which the official model keeps at ``backbone.<dinov2 key>``,
live at ``backbone.vit.<dinov2 key>`` here (``mask_token`` at ``backbone.mask_token``).

Checkpoints are read with ``torch.load(weights_only=True)``. mmengine checkpoints sometimes
pickle extra objects in ``meta``; those fail to load safely, and only an explicit
``trust_pickle=True`` (``--trust-pickle`` on the command line) reads them with full unpickling.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "InteropError",
    "read_official_checkpoint",
    "official_to_ours",
    "ours_to_official",
    "load_official",
    "export_official",
]

_TRAINABLE_PREFIXES = ("backbone.reins.", "decode_head.")


class InteropError(ValueError):
    """An official checkpoint that does not fit the model."""


def read_official_checkpoint(path: str | Path, trust_pickle: bool = False) -> dict[str, Tensor]:
    """The ``state_dict`` of an official (mmseg) checkpoint file."""
    path = Path(path)
    if not path.is_file():
        raise InteropError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        if trust_pickle:
            raise InteropError(f"cannot read {path}: {_first_line(exc)}") from exc
        # torch's refusal spans several lines (with terminal escapes): name the global only
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f" (e.g. {found.group(1)})" if found else ""
        raise InteropError(
            f"cannot read {path}: it pickles objects beyond tensors{what}; if it comes from a "
            "source you trust, pass --trust-pickle (trust_pickle=True)"
        ) from exc
    except Exception as exc:
        raise InteropError(f"cannot read {path}: {_first_line(exc)}") from exc
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or not any(isinstance(v, Tensor) for v in state.values()):
        raise InteropError(f"{path} has no 'state_dict' of tensors (got {type(obj).__name__})")
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def official_to_ours(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename official keys to ours (trainable keys unchanged, DINOv2 keys under ``vit.``)."""
    out = {}
    for key, value in state.items():
        if key.startswith(_TRAINABLE_PREFIXES) or not key.startswith("backbone."):
            out[key] = value
        elif key == "backbone.mask_token":
            out[key] = value
        else:
            out["backbone.vit." + key[len("backbone.") :]] = value
    return out


def ours_to_official(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`official_to_ours`."""
    out = {}
    for key, value in state.items():
        if key.startswith("backbone.vit."):
            out["backbone." + key[len("backbone.vit.") :]] = value
        else:
            out[key] = value
    return out


def _check(state: Mapping[str, Tensor], target: Mapping[str, Tensor], src: str) -> None:
    missing = sorted(k for k in target if k not in state)
    unexpected = sorted(k for k in state if k not in target)
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
        for k in target
        if k in state and tuple(state[k].shape) != tuple(target[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return
    lines = [f"{src} does not fit this model (nothing was loaded):"]
    if shapes:
        lines.append(f"  {len(shapes)} shape mismatches, e.g. " + "; ".join(shapes[:3]))
    if missing:
        lines.append(f"  {len(missing)} missing, e.g. " + ", ".join(missing[:5]))
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected, e.g. " + ", ".join(unexpected[:5]))
    lines.append(
        "  hint: the config must match the checkpoint's backbone size (S/B/L/g), token_length, "
        "lora_dim and number of classes"
    )
    raise InteropError("\n".join(lines))


def load_official(
    model: nn.Module, path: str | Path, trust_pickle: bool = False, strict: bool = True
) -> list[str]:
    """Load an official checkpoint's Rein + head weights into ``model``.

    Backbone keys in the file (a "full weights" checkpoint) are loaded too when present. Returns
    the loaded keys. Raises :class:`InteropError` naming missing/unexpected keys and shapes.
    """
    state = official_to_ours(read_official_checkpoint(path, trust_pickle))
    model_state = model.state_dict()
    trainable = {k: v for k, v in model_state.items() if k.startswith(_TRAINABLE_PREFIXES)}
    file_trainable = {k: v for k, v in state.items() if k.startswith(_TRAINABLE_PREFIXES)}
    extra = {k: v for k, v in state.items() if not k.startswith(_TRAINABLE_PREFIXES)}
    if strict:
        _check(file_trainable, trainable, str(path))
    _check(extra, {k: model_state[k] for k in extra if k in model_state}, str(path))
    to_load = {**file_trainable, **extra}
    with torch.no_grad():
        for k, v in to_load.items():
            model_state[k].copy_(v.to(model_state[k].dtype))
    return sorted(to_load)


def export_official(model: nn.Module, path: str | Path, meta: dict | None = None) -> int:
    """Write ``{'meta', 'state_dict'}`` with the Rein + head weights, as the official code saves.

    Returns the number of keys written.
    """
    import os
    import tempfile

    state = {
        k: v.detach().cpu().clone()
        for k, v in ours_to_official(model.state_dict()).items()
        if k.startswith(_TRAINABLE_PREFIXES)
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"meta": dict(meta or {}), "state_dict": state}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return len(state)
