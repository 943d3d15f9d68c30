"""``train.compile: true``: the training forward through ``torch.compile``, or one clear error.

``torch.compile`` is lazy: it traces and generates code on the first call (and again when a
guard fails), so a missing C++ compiler or an unsupported construct only shows there. The
wrapper turns any compile failure, at setup or at a call, into one :class:`ConfigError` line
that names the way out (``train.compile: false``). Only the training forward is compiled;
evaluation, prediction and checkpoints use the plain module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch._dynamo
from torch import nn
from torch._dynamo.exc import TorchDynamoException

from rein.config import ConfigError

__all__ = ["compile_forward"]

_HINT = "set train.compile: false"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip().rstrip(":")


def compile_forward(module: nn.Module) -> Callable[..., Any]:
    """``torch.compile(module)``, called like ``module``; compile failures raise
    :class:`~rein.config.ConfigError` in one line."""
    try:
        if not torch._dynamo.is_dynamo_supported():
            raise RuntimeError("torch.compile does not support this Python / platform")
        compiled = torch.compile(module)
    except Exception as exc:
        raise ConfigError(
            f"train.compile: torch.compile is unavailable ({_one_line(exc)}); {_HINT}"
        ) from exc

    def forward(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled(*args, **kwargs)
        except TorchDynamoException as exc:
            inner = getattr(exc, "inner_exception", None) or exc
            raise ConfigError(
                f"train.compile: torch.compile failed ({_one_line(inner)}); {_HINT}"
            ) from exc

    return forward
