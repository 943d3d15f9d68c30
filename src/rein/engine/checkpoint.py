"""Crash-safe checkpoints: trainable weights (safetensors) + metadata (JSON) + train state (torch).

A checkpoint ``tag`` in a folder is up to three files::

    {tag}.safetensors   trainable weights only (contiguous CPU tensors)
    {tag}.json          metadata: config, iteration, metric, rein version, tensor shapes
    {tag}.state.pt      optional: optimizer / scheduler / grad-scaler / RNG states

Every file records the iteration and a random ``save_id``. A save is one atomic unit:

1. every file of the save is written (fsync'ed) under a new name unique to the save,
   ``.{tag}.{save_id}.safetensors`` / ``.state.pt`` / ``.json``, next to the previous
   checkpoint, which is not touched;
2. the commit: one ``os.replace`` of ``.{tag}.{save_id}.json`` onto ``{tag}.json``;
3. the new weights and train state are renamed onto their plain names.

A kill before 2 leaves the previous checkpoint complete (the new files are garbage, removed by
:func:`clean_checkpoint_dir`); a kill after 2 leaves the new one complete: the loader takes
each file of the committed ``save_id`` from its plain name or, when step 3 did not finish,
from its unique name, and :func:`clean_checkpoint_dir` finishes the renames. Loading checks
that the files agree (iteration, save id), so files of two saves are never mixed. Files get
the umask's permissions. Untrusted pickles are never loaded: ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import re
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
    "checkpoint_iteration",
    "clean_checkpoint_dir",
    "trainable_state_dict",
    "load_into",
    "capture_rng_state",
    "restore_rng_state",
]

WEIGHTS_SUFFIX = ".safetensors"
META_SUFFIX = ".json"
STATE_SUFFIX = ".state.pt"
_SUFFIXES = (STATE_SUFFIX, WEIGHTS_SUFFIX, META_SUFFIX)
# the files of a save before / while it is committed: .{tag}.{save_id}{suffix}
_PENDING = re.compile(
    r"^\.(?P<tag>.+)\.(?P<sid>[0-9a-f]{32})(?P<suffix>\.safetensors|\.state\.pt|\.json)$"
)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, inconsistent or does not match the model."""


# --------------------------------------------------------------------------------------
# Atomic file writes
# --------------------------------------------------------------------------------------


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (which must not exist), write ``data`` and fsync it.

    The file gets the umask's permissions (0666 & ~umask), as ``open()`` would give it. On
    failure the partial file is removed (except when closing it fails: the caller cleans up).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags, 0o666)
    done = False
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        done = True
    finally:
        try:
            os.close(fd)
        finally:
            if not done:
                _unlink_quietly(path)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
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
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, rename.

    The file gets the umask's permissions.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        _write_new(tmp, data)
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
    states. The save is atomic (see the module docstring): a kill at any point leaves either
    the previous checkpoint ``tag`` or this one, complete.
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
    directory.mkdir(parents=True, exist_ok=True)
    files = [(STATE_SUFFIX, state_bytes)] if state_bytes is not None else []
    files.append((WEIGHTS_SUFFIX, weights_bytes))
    meta_new = _pending_path(directory, tag, save_id, META_SUFFIX)
    written: list[Path] = []
    meta_written = False
    try:
        # 1. every file under its unique name; the previous checkpoint is untouched
        for suffix, data in (*files, (META_SUFFIX, meta_bytes)):
            written.append(_pending_path(directory, tag, save_id, suffix))
            _write_new(written[-1], data)
        meta_written = True
        _fsync_dir(directory)
        # 2. the commit: from here on {tag} is this save
        os.replace(meta_new, meta_path)
        _fsync_dir(directory)
        # 3. the plain names (a kill here is finished by the loader / clean_checkpoint_dir)
        for suffix, _ in files:
            os.replace(_pending_path(directory, tag, save_id, suffix), directory / f"{tag}{suffix}")
        if state_bytes is None:
            _unlink_quietly(state_path)  # a stale train state from an earlier save of this tag
        _remove_pending(directory, tag)  # files of earlier saves of this tag left by a kill
        _fsync_dir(directory)
    except BaseException:
        if not meta_written or os.path.lexists(meta_new):  # not committed: drop it all
            for new_path in written:
                _unlink_quietly(new_path)
        raise
    return weights_path


def _pending_path(directory: Path, tag: str, save_id: str, suffix: str) -> Path:
    return directory / f".{tag}.{save_id}{suffix}"


def _pending_files(directory: Path) -> list[tuple[Path, str, str, str]]:
    """``(path, tag, save_id, suffix)`` of every file of an unfinished save in ``directory``."""
    out = []
    try:
        names = [p for p in directory.iterdir() if p.name.startswith(".")]
    except OSError:
        return []
    for p in names:
        m = _PENDING.match(p.name)
        if m is not None:
            out.append((p, m["tag"], m["sid"], m["suffix"]))
    return out


def _remove_pending(directory: Path, tag: str) -> None:
    for p, t, _, _ in _pending_files(directory):
        if t == tag:
            _unlink_quietly(p)


def clean_checkpoint_dir(directory: str | os.PathLike[str]) -> None:
    """Finish or discard what interrupted saves left in ``directory``.

    The renames of a committed save (its ``{tag}.json`` holds the save id) are completed;
    the files of an uncommitted or superseded save, and stale ``.*.tmp`` files of atomic
    writes, are removed. Complete checkpoints are never touched. Run it when no other
    process writes to ``directory`` (the trainer does, at start, on the main rank).
    """
    directory = Path(directory)
    for p, tag, sid, suffix in _pending_files(directory):
        if suffix != META_SUFFIX:
            try:
                committed = _read_meta(directory / f"{tag}{META_SUFFIX}").get("save_id") == sid
            except CheckpointError:
                committed = False
            if committed:
                os.replace(p, directory / f"{tag}{suffix}")
                continue
        _unlink_quietly(p)
    try:
        stale = [
            p for p in directory.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")
        ]
    except OSError:
        stale = []
    for p in stale:
        if p.is_file():
            _unlink_quietly(p)
    _fsync_dir(directory)


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


def _file_of(directory: Path, tag: str, save_id: Any, suffix: str) -> Path:
    """Where the ``suffix`` file of save ``save_id`` of ``tag`` is: its unique name while the
    save's last renames are unfinished, else its plain name."""
    if isinstance(save_id, str) and re.fullmatch(r"[0-9a-f]{32}", save_id):
        pending = _pending_path(directory, tag, save_id, suffix)
        if pending.is_file():
            return pending
    return directory / f"{tag}{suffix}"


def list_checkpoints(directory: str | os.PathLike[str]) -> list[tuple[str, int]]:
    """``(tag, iteration)`` of every checkpoint with readable metadata, oldest first."""
    directory = Path(directory)
    found = []
    for meta_path in directory.glob(f"*{META_SUFFIX}"):
        tag = meta_path.name[: -len(META_SUFFIX)]
        if tag.startswith("."):
            continue
        try:
            meta = _read_meta(meta_path)
            mtime = meta_path.stat().st_mtime
        except (CheckpointError, OSError):
            continue
        if not _file_of(directory, tag, meta.get("save_id"), WEIGHTS_SUFFIX).is_file():
            continue
        found.append((mtime, int(meta["iteration"]), tag))
    return [(tag, it) for _, it, tag in sorted(found, key=lambda x: (x[1], x[0]))]


def checkpoint_iteration(directory: str | os.PathLike[str], tag: str = "latest") -> int | None:
    """The iteration of the committed checkpoint ``tag`` in ``directory`` (None: there is none).

    Reads the metadata only; :func:`load_checkpoint` verifies the files.
    """
    try:
        return int(_read_meta(Path(directory) / f"{tag}{META_SUFFIX}")["iteration"])
    except (CheckpointError, TypeError, ValueError):
        return None


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
        # a missing file is missing, unless its checkpoint is committed (the file still has
        # its unique name: the save's last renames were interrupted)
        if not path.is_file() and not (split[0] / f"{split[1]}{META_SUFFIX}").is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
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


def _load_lone_weights(
    weights_path: Path, tag: str
) -> tuple[dict[str, Tensor], dict[str, Any], None]:
    """A ``.safetensors`` file without its JSON: the weights, and what its header records."""
    tensors, st_meta = _load_weights(weights_path)
    it = st_meta.get("iteration")
    meta: dict[str, Any] = {
        "iteration": int(it) if isinstance(it, str) and it.isdigit() else None,
        "tag": tag,
        "has_metadata": False,
    }
    if st_meta.get("save_id"):
        meta["save_id"] = st_meta["save_id"]
    return tensors, meta, None


def _load_tag(
    directory: Path, tag: str, load_train_state: bool
) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any] | None]:
    _, meta_path, _ = _paths(directory, tag)
    plain_weights = directory / f"{tag}{WEIGHTS_SUFFIX}"
    if not meta_path.exists() and plain_weights.is_file():
        return _load_lone_weights(plain_weights, tag)  # metadata is optional for the weights
    meta = _read_meta(meta_path)
    it, sid = meta["iteration"], meta.get("save_id")
    weights_path = _file_of(directory, tag, sid, WEIGHTS_SUFFIX)
    tensors, st_meta = _load_weights(weights_path)

    def mismatch(other: Path, field: str, a: Any, b: Any) -> CheckpointError:
        return CheckpointError(
            f"checkpoint '{tag}' in {directory} is inconsistent (interrupted save?): "
            f"{meta_path.name} has {field} {a} but {other.name} has {b}"
        )

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
    state_path = _file_of(directory, tag, sid, STATE_SUFFIX)
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
    loads consistently, skipping one left inconsistent by an interrupted save. A lone
    ``.safetensors`` file (no JSON next to it) loads as weights only: ``meta`` then holds
    ``has_metadata: False`` and the iteration its header records (or None).
    """
    candidates = _candidates(path, tag)
    errors: list[str] = []
    for directory, cand in candidates:
        for attempt in range(2):
            try:
                return _load_tag(directory, cand, load_train_state)
            except CheckpointError as e:
                # a concurrent save may have renamed a file between finding and reading it
                if attempt == 0 and "not found" in str(e):
                    continue
                if len(candidates) == 1:
                    raise
                errors.append(str(e))
                break
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
