"""Atomic checkpoints: trainable weights (safetensors) + metadata (JSON) + train state (torch).

A checkpoint ``tag`` in a folder is up to three files::

    {tag}.safetensors   trainable weights only (contiguous CPU tensors)
    {tag}.json          metadata: config, iteration, metric, rein version, tensor shapes
    {tag}.state.pt      optional: optimizer / scheduler / grad-scaler / RNG states

Every file records the iteration and a random ``save_id``. Saving writes all temporary files
first (fsync'ed), then renames them into place, the JSON last; loading checks that the three
files agree, so a save interrupted between two renames is detected rather than silently
mixing two checkpoints. Untrusted pickles are never loaded: ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import safetensors.torch
import torch
from torch import Tensor, nn

__all__ = [
    "CheckpointError",
    "LoadResult",
    "atomic_write_bytes",
    "write_json_atomic",
    "save_checkpoint",
    "load_checkpoint",
    "list_checkpoints",
    "resolve_checkpoint",
    "trainable_state_dict",
    "load_into",
    "capture_rng_state",
    "restore_rng_state",
]

WEIGHTS_SUFFIX = ".safetensors"
META_SUFFIX = ".json"
STATE_SUFFIX = ".state.pt"
_SUFFIXES = (STATE_SUFFIX, WEIGHTS_SUFFIX, META_SUFFIX)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, inconsistent or does not match the model."""


# --------------------------------------------------------------------------------------
# Atomic file writes
# --------------------------------------------------------------------------------------


def _write_temp(path: Path, data: bytes) -> Path:
    """Write ``data`` to a fsync'ed temporary file next to ``path``; return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _unlink_quietly(Path(tmp))
        raise
    return Path(tmp)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _fsync_dir(directory: Path) -> None:
    """Make renames durable (best effort; not supported everywhere)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, rename."""
    path = Path(path)
    tmp = _write_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(path.parent)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple | set):
        return list(obj)
    if isinstance(obj, Tensor) and obj.numel() == 1:
        return obj.item()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def _sanitize_json(obj: Any) -> Any:
    """Replace non-finite floats by None so the output is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: _sanitize_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_sanitize_json(v) for v in obj]
    return obj


def _json_bytes(obj: Any) -> bytes:
    text = json.dumps(_sanitize_json(obj), indent=2, default=_json_default, allow_nan=False)
    return (text + "\n").encode("utf-8")


def write_json_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write ``obj`` as indented, strict JSON (NaN/inf become null), atomically."""
    atomic_write_bytes(path, _json_bytes(obj))


# --------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Snapshot python ``random``, numpy's global RNG, torch CPU and CUDA RNG states.

    The result holds only tensors, ints, floats and lists, so it survives
    ``torch.load(weights_only=True)``.
    """
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
        "numpy": {
            "bit_generator": np_name,
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64).copy()),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore a snapshot from :func:`capture_rng_state` exactly."""
    if "python" in state:
        py = state["python"]
        random.setstate((py["version"], tuple(int(x) for x in py["state"]), py["gauss_next"]))
    if "numpy" in state:
        npst = state["numpy"]
        keys = npst["keys"]
        keys = keys.numpy() if isinstance(keys, Tensor) else np.asarray(keys)
        np.random.set_state(
            (
                npst["bit_generator"],
                keys.astype(np.uint32),
                int(npst["pos"]),
                int(npst["has_gauss"]),
                float(npst["cached_gaussian"]),
            )
        )
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
        else:  # different GPU count on resume: restore what overlaps
            for i, s in enumerate(cuda_states[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s.cpu(), i)


# --------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------


def _rein_version() -> str:
    try:
        from rein import __version__

        return str(__version__)
    except ImportError:  # pragma: no cover
        return "unknown"


def _prepare_tensors(model_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors; tensors sharing storage are cloned apart."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in model_state.items():
        if not isinstance(key, str):
            raise TypeError(f"state dict keys must be str, got {key!r}")
        if not isinstance(value, Tensor):
            raise TypeError(f"state dict value for '{key}' is {type(value).__name__}, not a Tensor")
        t = value.detach().to("cpu").contiguous()
        storage = t.untyped_storage().data_ptr()
        if t.numel() > 0 and storage in seen:
            t = t.clone()  # tied / shared weights: safetensors wants one storage per tensor
        seen.add(storage)
        out[key] = t
    return out


def _check_weights_only(data: bytes, what: str) -> None:
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{what} cannot be loaded back with torch.load(weights_only=True); store plain "
            f"tensors, numbers, strings, lists and dicts only ({type(e).__name__}: {e})"
        ) from e


def _paths(directory: Path, tag: str) -> tuple[Path, Path, Path]:
    return (
        directory / f"{tag}{WEIGHTS_SUFFIX}",
        directory / f"{tag}{META_SUFFIX}",
        directory / f"{tag}{STATE_SUFFIX}",
    )


def save_checkpoint(
    directory: str | os.PathLike[str],
    tag: str,
    model_state: Mapping[str, Tensor],
    meta: Mapping[str, Any],
    train_state: Mapping[str, Any] | None = None,
) -> Path:
    """Save checkpoint ``tag`` in ``directory``; return the path of its ``.safetensors``.

    ``meta`` must hold ``iteration`` (or ``train_state`` must); the config dict, metric and
    anything JSON-able may go with it. ``train_state`` (optimizer, scheduler, scaler, RNG
    states...) must be ``weights_only``-loadable; :func:`capture_rng_state` gives such RNG
    states. Temp files are written first, then renamed in the order state, weights, JSON.
    """
    directory = Path(directory)
    if not tag or any(sep in tag for sep in ("/", "\\")) or tag.startswith("."):
        raise ValueError(f"invalid checkpoint tag {tag!r}")
    iteration = meta.get("iteration")
    if iteration is None and train_state is not None:
        iteration = train_state.get("iteration")
    if isinstance(iteration, bool) or not isinstance(iteration, int):
        raise ValueError(f"meta['iteration'] must be an int, got {iteration!r}")
    save_id = uuid.uuid4().hex

    tensors = _prepare_tensors(model_state)
    st_meta = {"iteration": str(iteration), "save_id": save_id, "format": "pt", "tag": tag}
    weights_bytes = safetensors.torch.save(tensors, metadata=st_meta)

    full_meta: dict[str, Any] = dict(meta)
    full_meta.update(
        iteration=iteration,
        save_id=save_id,
        tag=tag,
        rein_version=full_meta.get("rein_version", _rein_version()),
        saved_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        has_train_state=train_state is not None,
        tensors={
            k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for k, t in tensors.items()
        },
    )
    meta_bytes = _json_bytes(full_meta)

    state_bytes = None
    if train_state is not None:
        payload = dict(train_state)
        payload.update(iteration=iteration, save_id=save_id)
        buf = io.BytesIO()
        try:
            torch.save(payload, buf)
        except Exception as e:
            raise CheckpointError(
                f"train state of checkpoint '{tag}' cannot be serialized: {type(e).__name__}: {e}"
            ) from e
        state_bytes = buf.getvalue()
        _check_weights_only(state_bytes, f"train state of checkpoint '{tag}'")

    weights_path, meta_path, state_path = _paths(directory, tag)
    # Phase 1: every temp file, fsync'ed. Phase 2: renames, the JSON (commit record) last.
    pending: list[tuple[Path, Path]] = []
    try:
        if state_bytes is not None:
            pending.append((_write_temp(state_path, state_bytes), state_path))
        pending.append((_write_temp(weights_path, weights_bytes), weights_path))
        pending.append((_write_temp(meta_path, meta_bytes), meta_path))
        while pending:
            tmp, final = pending[0]
            os.replace(tmp, final)
            pending.pop(0)
    finally:
        for tmp, _ in pending:
            _unlink_quietly(tmp)
    if state_bytes is None:
        _unlink_quietly(state_path)  # a stale train state from an earlier save of this tag
    _fsync_dir(directory)
    return weights_path


# --------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------


def _split_file(path: Path) -> tuple[Path, str] | None:
    for suffix in _SUFFIXES:
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return path.parent, path.name[: -len(suffix)]
    return None


def _read_meta(meta_path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint metadata not found: {meta_path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"corrupt checkpoint metadata {meta_path}: {e}") from e
    if not isinstance(meta, dict) or "iteration" not in meta:
        raise CheckpointError(f"corrupt checkpoint metadata {meta_path}: no 'iteration' recorded")
    return meta


def list_checkpoints(directory: str | os.PathLike[str]) -> list[tuple[str, int]]:
    """``(tag, iteration)`` of every checkpoint with readable metadata, oldest first."""
    directory = Path(directory)
    found = []
    for meta_path in directory.glob(f"*{META_SUFFIX}"):
        tag = meta_path.name[: -len(META_SUFFIX)]
        if tag.startswith(".") or not (directory / f"{tag}{WEIGHTS_SUFFIX}").is_file():
            continue
        try:
            meta = _read_meta(meta_path)
        except CheckpointError:
            continue
        found.append((meta_path.stat().st_mtime, int(meta["iteration"]), tag))
    return [(tag, it) for _, it, tag in sorted(found, key=lambda x: (x[1], x[0]))]


def _candidates(path: str | os.PathLike[str], tag: str) -> list[tuple[Path, str]]:
    """Checkpoints to try for ``path`` + ``tag``, best first."""
    path = Path(path).expanduser()
    if path.is_file() or (not path.is_dir() and _split_file(path) is not None):
        split = _split_file(path)
        if split is None:
            raise CheckpointError(
                f"not a checkpoint file: {path} (expected *{WEIGHTS_SUFFIX}, *{META_SUFFIX} "
                f"or *{STATE_SUFFIX})"
            )
        return [split]
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    if (path / f"{tag}{META_SUFFIX}").is_file() or (path / f"{tag}{WEIGHTS_SUFFIX}").is_file():
        return [(path, tag)]
    available = list_checkpoints(path)
    if tag == "latest":
        if not available:
            raise CheckpointError(f"no checkpoint found in {path}")
        return [(path, t) for t, _ in reversed(available)]
    names = ", ".join(t for t, _ in available) or "none"
    raise CheckpointError(f"checkpoint '{tag}' not found in {path} (available: {names})")


def resolve_checkpoint(path: str | os.PathLike[str], tag: str = "latest") -> tuple[Path, str]:
    """Resolve a folder + tag, or one of a checkpoint's files, to ``(folder, tag)``.

    In a folder, tag ``latest`` means ``latest.json`` if it exists, else the checkpoint
    with the highest iteration (files are not verified here; :func:`load_checkpoint` does).
    """
    return _candidates(path, tag)[0]


def _load_weights(weights_path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    if not weights_path.is_file():
        raise CheckpointError(f"checkpoint weights not found: {weights_path}")
    try:
        with safetensors.safe_open(str(weights_path), framework="pt", device="cpu") as f:
            st_meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(
            f"corrupt or truncated checkpoint weights {weights_path}: {type(e).__name__}: {e}"
        ) from e
    return tensors, st_meta


def _load_state(state_path: Path) -> dict[str, Any]:
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint train state not found: {state_path}")
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"corrupt or unsafe checkpoint train state {state_path} (loaded with "
            f"weights_only=True): {type(e).__name__}: {e}"
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"corrupt checkpoint train state {state_path}: not a dict")
    return state


def _load_tag(
    directory: Path, tag: str, load_train_state: bool
) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any] | None]:
    weights_path, meta_path, state_path = _paths(directory, tag)
    meta = _read_meta(meta_path)
    tensors, st_meta = _load_weights(weights_path)

    def mismatch(other: Path, field: str, a: Any, b: Any) -> CheckpointError:
        return CheckpointError(
            f"checkpoint '{tag}' in {directory} is inconsistent (interrupted save?): "
            f"{meta_path.name} has {field} {a} but {other.name} has {b}"
        )

    it, sid = meta["iteration"], meta.get("save_id")
    if "iteration" in st_meta and str(it) != st_meta["iteration"]:
        raise mismatch(weights_path, "iteration", it, st_meta["iteration"])
    if sid is not None and st_meta.get("save_id") not in (None, sid):
        raise mismatch(weights_path, "save_id", sid, st_meta["save_id"])
    expected = meta.get("tensors")
    if isinstance(expected, dict):
        got = {k: list(t.shape) for k, t in tensors.items()}
        want = {k: list(v["shape"]) for k, v in expected.items()}
        if got != want:
            raise CheckpointError(
                f"checkpoint '{tag}' in {directory} is inconsistent: the tensors in "
                f"{weights_path.name} differ from those listed in {meta_path.name}"
            )

    train_state = None
    if load_train_state and meta.get("has_train_state", state_path.is_file()):
        train_state = _load_state(state_path)
        if train_state.get("iteration") != it:
            raise mismatch(state_path, "iteration", it, train_state.get("iteration"))
        if sid is not None and train_state.get("save_id") not in (None, sid):
            raise mismatch(state_path, "save_id", sid, train_state.get("save_id"))
    return tensors, meta, train_state


def load_checkpoint(
    path: str | os.PathLike[str], tag: str = "latest", load_train_state: bool = True
) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any] | None]:
    """Load ``(state_dict, meta, train_state | None)`` from a folder + tag or a checkpoint file.

    The files of a checkpoint must agree (iteration and save id), else CheckpointError. In
    a folder without a ``latest`` tag, ``tag="latest"`` picks the newest checkpoint that
    loads consistently, skipping one left inconsistent by an interrupted save.
    """
    candidates = _candidates(path, tag)
    errors: list[str] = []
    for directory, cand in candidates:
        try:
            return _load_tag(directory, cand, load_train_state)
        except CheckpointError as e:
            if len(candidates) == 1:
                raise
            errors.append(str(e))
    raise CheckpointError(f"no valid checkpoint in {path}:\n  " + "\n  ".join(errors))


# --------------------------------------------------------------------------------------
# Model <-> state dict
# --------------------------------------------------------------------------------------


def _persistent_buffers(module: nn.Module) -> dict[str, Tensor]:
    return {
        name: buf
        for name, buf in module.named_buffers(recurse=False)
        if buf is not None and name not in module._non_persistent_buffers_set
    }


def trainable_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Parameters with ``requires_grad``, plus persistent buffers of modules that own one.

    The buffers cover e.g. BatchNorm running stats in a trained head; a frozen backbone's
    buffers are left out. Tensors are detached views, not copies.
    """
    out = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for mod_name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            prefix = f"{mod_name}." if mod_name else ""
            for n, b in _persistent_buffers(module).items():
                out[f"{prefix}{n}"] = b.detach()
    return out


def _model_tensors(model: nn.Module) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = dict(model.named_parameters(remove_duplicate=False))
    for mod_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for n, b in _persistent_buffers(module).items():
            tensors[f"{prefix}{n}"] = b
    return tensors


class LoadResult(NamedTuple):
    """Keys that did not line up in a non-strict :func:`load_into`."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _fmt_keys(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _shape(t: Any) -> str:
    return str(tuple(int(s) for s in t.shape))


def load_into(
    model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True
) -> LoadResult:
    """Copy ``state_dict`` into ``model`` in place.

    Missing keys are the model's trainable keys (:func:`trainable_state_dict`) absent from
    the checkpoint; unexpected keys are checkpoint keys the model does not have at all.
    Checkpoint keys for frozen model tensors are loaded too. Shape mismatches always raise;
    missing / unexpected keys raise when ``strict``.
    """
    model_tensors = _model_tensors(model)
    expected = trainable_state_dict(model)
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in model_tensors)
    shapes = [
        f"{k}: checkpoint {_shape(state_dict[k])} vs model {_shape(model_tensors[k])}"
        for k in sorted(state_dict)
        if k in model_tensors and tuple(state_dict[k].shape) != tuple(model_tensors[k].shape)
    ]
    if shapes or (strict and (missing or unexpected)):
        lines = ["checkpoint does not match the model:"]
        if missing and strict:
            lines.append(f"  missing keys ({len(missing)}): {_fmt_keys(missing)}")
        if unexpected and strict:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_fmt_keys(unexpected)}")
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}):")
            lines.extend(f"    {s}" for s in shapes[:20])
            if len(shapes) > 20:
                lines.append(f"    ... ({len(shapes) - 20} more)")
        lines.append("hint: was this checkpoint trained with another config/backbone?")
        raise CheckpointError("\n".join(lines))
    with torch.no_grad():
        for k, v in state_dict.items():
            if k in model_tensors:
                model_tensors[k].copy_(v)
    return LoadResult(missing, unexpected)
