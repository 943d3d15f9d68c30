"""A disk cache of adapter initialisations: SoMA's SVDs and RecycleLoRA's pivoted QRs.

Both methods decompose every adapted pretrained weight once, at build time. On a CPU that takes
about a minute (SoMA, DINOv2-L) to several minutes (RecycleLoRA). The result depends only on the
weight and a few numbers (ranks, scaling), so it is stored in
``$REIN_CACHE/adapter_init/`` (default ``~/.cache/rein``), one safetensors file per weight, named
by a SHA-256 of the method's kind, those numbers and the weight's bytes. A later build of the same
model reads the factors back, bit for bit, instead of decomposing again. A file that cannot be
read is recomputed and rewritten; a cache directory that cannot be written is skipped with one
warning. ``tuning_options.init_cache: false`` turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["CACHE_ENV", "cache_dir", "weight_digest", "cached_factors"]

CACHE_ENV = "REIN_CACHE"
_log = logging.getLogger("rein")
_warned: set[str] = set()


def cache_dir() -> Path:
    """Where initialisations are cached: ``$REIN_CACHE/adapter_init`` or ``~/.cache/rein/...``."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rein"
    return Path(root) / "adapter_init"


def weight_digest(weight: Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    data = weight.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{data.dtype}|{tuple(data.shape)}|".encode())
    h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        _log.warning(message)


def cached_factors(
    kind: str,
    weight: Tensor,
    params: Mapping[str, Any],
    compute: Callable[[], dict[str, Tensor]],
    enabled: bool = True,
) -> dict[str, Tensor]:
    """``compute()`` (a dict of CPU tensors), or its cached result for this ``kind``, ``params``
    and ``weight``."""
    if not enabled:
        return compute()
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(
        json.dumps({"kind": kind, "params": dict(params)}, sort_keys=True).encode()
        + weight_digest(weight).encode()
    ).hexdigest()
    directory = cache_dir()
    path = directory / f"{kind}-{key[:40]}.safetensors"
    if path.is_file():
        try:
            return load_file(path)
        except Exception as exc:  # a truncated or foreign file: recompute and rewrite it
            _warn_once(f"adapter init cache: ignoring unreadable {path} ({type(exc).__name__})")
    result = compute()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in result.items()}, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as exc:
        _warn_once(
            f"adapter init cache: cannot write to {directory} ({exc.strerror or exc}); "
            f"set {CACHE_ENV} to a writable folder or tuning_options.init_cache: false"
        )
    return result
