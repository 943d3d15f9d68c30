"""Interoperability with the official checkpoints of Rein and its successors (mmseg 1.x).

Each official codebase writes ``{"meta": ..., "state_dict": ...}`` in its own layout:

* **Rein** keeps only the trainable weights, ``backbone.reins.*`` and ``decode_head.*`` (303 keys
  for DINOv2-L). Our names are the same; the frozen DINOv2 weights, which the official model
  keeps at ``backbone.<dinov2 key>``, live at ``backbone.vit.<dinov2 key>`` here.
* **SoMA** keeps the whole model under ``backbone.model.*`` with q / k / v split (a Runner
  checkpoint, 923 keys for DINOv2-L) or, in its released files, only the adapters, all biases,
  ``mask_token`` and the head (679 keys). See :mod:`rein.methods.soma`.
* **RecycleLoRA** keeps the whole model in Rein's layout plus ``lora_{A,B}_{main,sub}`` on every
  adapted linear (1019 keys), whose ``weight`` is the residual. See :mod:`rein.methods.recyclelora`.
* **FADA** and **SET**, forks of Rein's code, keep Rein's layout (trainable weights only) with
  their own ``backbone.reins.*`` tensors (FADA: 21 + 292 head keys, SET: 16 + 292 for
  DINOv2-L), told apart by their second token set and FADA's filters. See
  :mod:`rein.methods.fada` and :mod:`rein.methods.set_tokens`.

The tuning method of the model (``model.tuning``) owns its layout: it maps names both ways
(:meth:`~rein.methods.base.TuningMethod.official_to_ours`), checks ranks, and prepares the
model (SoMA releases run on base = the full pretrained W). This module reads files, recognises
which method wrote one, checks keys and shapes, and loads all or nothing.

Checkpoints are read with ``torch.load(weights_only=True)``. mmengine checkpoints sometimes
pickle extra objects in ``meta``; those fail to load safely, and only an explicit
``trust_pickle=True`` (``--trust-pickle`` on the command line) reads them with full unpickling.
A Runner checkpoint's ``state_dict`` holds the EMA weights when EMA was on (its
``ema_state_dict`` the raw ones); the ``state_dict`` is what is read.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Container, Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "InteropError",
    "read_official_checkpoint",
    "official_to_ours",
    "ours_to_official",
    "official_method",
    "check_official_method",
    "with_base_layer",
    "without_base_layer",
    "load_official",
    "official_state",
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


def official_method(keys: Iterable[str]) -> str | None:
    """Name of the tuning method whose official code wrote a state dict with these keys, or
    None when no method claims it (e.g. a head-only or plain-backbone file)."""
    from rein.methods import METHODS

    keys = list(keys)
    for name, cls in METHODS.items():
        if cls.claims_official(keys):
            return name
    return None


def _method_of(model: nn.Module):
    from rein.methods.base import TuningMethod

    method = getattr(model, "method", None)
    return method if isinstance(method, TuningMethod) else TuningMethod()


def check_official_method(keys: Iterable[str], model: nn.Module, src: str) -> None:
    """Raise when the file was written by another method than the model's ``model.tuning``."""
    method = _method_of(model)
    found = official_method(keys)
    if found is None or found == method.name:
        if found is None and any(method.is_method_param(k) for k in model.state_dict()):
            raise InteropError(
                f"{src} holds no {method.name} weights (no key of its official layout); the "
                f"config has model.tuning: {method.name}: is this a checkpoint of another method?"
            )
        return
    raise InteropError(
        f"{src} is a {found} checkpoint but the config has model.tuning: {method.name or '?'}; "
        f"use a {found} config (e.g. configs/{found}_*.yaml)"
    )


def with_base_layer(key: str, model_keys: Container[str]) -> str:
    """``...fc1.weight`` -> ``...fc1.base_layer.weight`` when only the latter is in the model
    (the frozen layer inside an adapter wrapper); else ``key``."""
    head, dot, leaf = key.rpartition(".")
    if key in model_keys or not dot:
        return key
    wrapped = f"{head}.base_layer.{leaf}"
    return wrapped if wrapped in model_keys else key


def without_base_layer(key: str) -> str:
    """Inverse of :func:`with_base_layer`: the name the official code uses."""
    return key.replace(".base_layer.", ".")


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
        "  hint: the config must match the checkpoint's backbone size (S/B/L/g), the method's "
        "options (Rein token_length / lora_dim, SoMA rank / start_block / targets, RecycleLoRA "
        "r_max / r_main / targets) and the number of classes"
    )
    raise InteropError("\n".join(lines))


def load_official(
    model: nn.Module, path: str | Path, trust_pickle: bool = False, strict: bool = True
) -> list[str]:
    """Load an official checkpoint (Rein, SoMA or RecycleLoRA, as ``model.tuning`` says).

    Every trainable tensor of the model must be in the file (unless ``strict=False``); other
    tensors in the file (frozen backbone weights of a "full weights" or Runner checkpoint,
    extra biases of a SoMA release) must exist in the model with the same shape and are loaded
    too. Nothing is loaded when anything does not fit. Returns the loaded (our) keys. Raises
    :class:`InteropError` naming the method, the ranks, or the missing / unexpected keys.
    """
    from rein.engine.checkpoint import trainable_state_dict

    src = str(path)
    raw = read_official_checkpoint(path, trust_pickle)
    check_official_method(raw, model, src)
    method = _method_of(model)
    model_state = model.state_dict()
    state = method.official_to_ours(raw, model_state.keys())
    method.check_official(state, model_state, src)
    trainable = trainable_state_dict(model)
    file_trainable = {k: v for k, v in state.items() if k in trainable}
    unknown = {k: v for k, v in state.items() if k not in model_state}
    frozen = {k: v for k, v in state.items() if k in model_state and k not in trainable}
    if strict:
        _check({**file_trainable, **unknown}, trainable, src)
    else:
        _check({**file_trainable, **unknown}, {k: trainable[k] for k in file_trainable}, src)
    _check(frozen, {k: model_state[k] for k in frozen}, src)
    method.prepare_official_load(model, state)
    with torch.no_grad():
        for k, v in state.items():
            model_state[k].copy_(v.to(model_state[k].dtype))
    return sorted(state)


def official_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's tensors in its method's official layout, as the official code saves them
    (Rein: the trainable weights; SoMA / RecycleLoRA: the whole model)."""
    method = _method_of(model)
    return {k: v.detach().cpu().clone() for k, v in method.official_export(model).items()}


def export_official(model: nn.Module, path: str | Path, meta: dict | None = None) -> int:
    """Write ``{'meta', 'state_dict'}`` in the official layout of the model's method (see
    :func:`official_state`); returns the number of keys written."""
    import os
    import tempfile

    state = official_state(model)
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
