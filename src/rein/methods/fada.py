"""``fada``: FADA (NeurIPS 2024), Rein with a two-band ("wavelet") refinement after every block.

Spec: ../shared/docs/methods/fada.md (the official code, github JingjunYi/FADA at b83bbc0).
FADA is Rein-LoRA + Rein-link with one change. The patch features ``f`` (B, N, C) of block ``l``
are split into a low band ``f_L`` (C/4 wide) and a high band ``f_H`` (3C/4 wide) by 2x2 Haar
filters, and each band gets its own Rein refinement::

    S_L  = softmax(f_L @ T_L^T * C**-0.5)                        # temperature of the full C
    D_L  = mlp_delta_f(S_L[..., 1:] @ mlp_token2feat(T_L[1:]) + f_L)
    S_H  = softmax(instance_norm(f_H @ T_H^T) * C**-0.5)         # norm over the m tokens
    D_H  = mlp_delta_f2(S_H[..., 1:] @ mlp_token2feat2(T_H[1:]) + f_H)
    f'   = f + scale * concat(D_L, D_H)                          # no inverse transform

``T_L = A_L[l] @ B_L[l]`` and ``T_H = A_H[l] @ B_H[l]`` (``learnable_tokens_a/_b`` and
``_a2/_b2``; full-rank ``learnable_tokens`` / ``learnable_tokens2`` when ``model.rein.lora_dim``
is null). The MLPs, ``scale``, the filters, ``transform`` and ``merge`` are shared by all
layers; the Rein-link queries come from the low-band tokens only. The two-branch skeleton is
:class:`~rein.methods.two_branch.TwoBranchReins`, shared with SET; this file is FADA's split
(the Haar bands) and combine (a concatenation).

How the bands are formed (``model.tuning_options.wavelet_mode``):

* ``faithful`` (default): the official numerics. The official module reads the raw buffer of the
  seq-first features (N, B, C) as an image batch (B, C, h, h), h = sqrt(N), runs four depthwise
  2x2 stride-2 convolutions (``wavepool.{LL,LH,HL,HH}.weight``, (C, 1, 2, 2), Haar at init,
  **trained** like every other ``reins`` tensor) and reads the results back as (N, B, C/4)
  rows. At 512 crops (N = C = 1024) each token's channel vector is thereby Haar-split as a
  32x32 grid, with a filter picked by the token's position in the *batch* (so trained, per
  channel different filters make an image's features depend on its batch size and slot). The
  official code crashes on a token grid that is not square with an even side; so does this
  mode, with a one-line error.
* ``fixed``: one frozen, shared Haar bank on each token's own channels, laid out as a
  (C / k) x k grid, k = ``channel_grid_width`` (32). It depends on nothing but the token, works
  on any grid (whole-image and non-square inference) and any width divisible by 2k, and equals
  ``faithful`` at init when k = sqrt(N) and C is a multiple of 2k (the official 512 setting).
  It has no filter parameters (DINOv2-L trains 16,384 fewer); loading an official file drops
  the file's filters (with a warning when they are not the Haar ones), and an export writes the
  Haar bank under the official names.

Parameter names and order follow the official ``LoRAReins`` so that its checkpoints (313 keys
for DINOv2-L: 21 ``backbone.reins.*`` + 292 ``decode_head.*``) map one to one.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Container, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rein.methods.base import positive_int
from rein.methods.two_branch import TwoBranchMethod, TwoBranchReins

if TYPE_CHECKING:
    from rein.config import ModelConfig

__all__ = [
    "WAVELET_MODES",
    "FADAOptions",
    "FADAReins",
    "FADAMethod",
    "WavePool",
    "haar_kernels",
]

WAVELET_MODES = ("faithful", "fixed")
BANDS = ("LL", "LH", "HL", "HH")
#: keys only FADA's official module has (Rein's has ``learnable_tokens*`` / ``mlp_*`` too)
FADA_ONLY_KEYS = ("backbone.reins.learnable_tokens_a2", "backbone.reins.wavepool.")


def haar_kernels() -> Tensor:
    """The 2x2 Haar kernels (4, 2, 2) in the order LL, LH, HL, HH, as (row, column) and applied
    as cross-correlation: outer products of L = [1, 1]/sqrt 2 and H = [-1, 1]/sqrt 2."""
    low = torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2.0)
    high = torch.tensor([-1.0, 1.0], dtype=torch.float64) / math.sqrt(2.0)
    pairs = ((low, low), (low, high), (high, low), (high, high))  # (rows, columns)
    return torch.stack([torch.outer(r, c) for r, c in pairs]).float()  # exactly +-0.5


# -- options ------------------------------------------------------------------------------------
@dataclasses.dataclass
class FADAOptions:
    """``model.tuning_options`` of ``fada`` (token count, rank, scale: ``model.rein``)."""

    wavelet_mode: str = "faithful"  # or "fixed" (see the module docstring)
    channel_grid_width: int = 32  # fixed: each token's channels as rows of this many

    def validate(self, method: str) -> None:
        if self.wavelet_mode not in WAVELET_MODES:
            raise ValueError(
                f"tuning '{method}': option 'wavelet_mode' must be one of "
                f"{', '.join(WAVELET_MODES)}, got {self.wavelet_mode!r}"
            )
        positive_int(method, "channel_grid_width", self.channel_grid_width)
        if self.channel_grid_width % 2:
            raise ValueError(
                f"tuning '{method}': option 'channel_grid_width' must be even (2x2 blocks), "
                f"got {self.channel_grid_width}"
            )


# -- the module ---------------------------------------------------------------------------------
class _Filter(nn.Module):
    """One band's depthwise 2x2 kernels, ``weight`` (C, 1, 2, 2) (the official Conv2d's key)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, 2, 2))


class WavePool(nn.Module):
    """Four depthwise 2x2 / stride-2 filters (``LL``, ``LH``, ``HL``, ``HH``), one per channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        for band in BANDS:
            setattr(self, band, _Filter(channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every channel starts with the Haar kernel."""
        with torch.no_grad():
            for band, kernel in zip(BANDS, haar_kernels()):
                weight = getattr(self, band).weight
                weight.copy_(kernel.to(weight.dtype).expand_as(weight))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, C, 4, h/2, w/2), the bands in the order LL, LH, HL, HH."""
        weight = torch.stack([getattr(self, b).weight for b in BANDS], dim=1)  # (C, 4, 1, 2, 2)
        y = F.conv2d(x, weight.flatten(0, 1), stride=2, groups=self.channels)
        return y.unflatten(1, (self.channels, len(BANDS)))


class FADAReins(TwoBranchReins):
    """FADA's module after every block: two Rein branches on the low / high Haar bands.

    Args: those of :class:`~rein.methods.two_branch.TwoBranchReins` (keywords) but the branch
    layout, which is FADA's (C/4 and 3C/4, both LoRA unless ``lora_dim`` is None), and:
        wavelet_mode: ``faithful`` (official layout, trainable per-channel filters) or ``fixed``.
        channel_grid_width: ``fixed``: row length k of each token's channel grid.
    """

    def __init__(
        self,
        *,
        embed_dims: int,
        wavelet_mode: str = "faithful",
        channel_grid_width: int = 32,
        **kwargs: Any,
    ) -> None:
        if wavelet_mode not in WAVELET_MODES:
            raise ValueError(f"wavelet_mode must be one of {WAVELET_MODES}, got {wavelet_mode!r}")
        if embed_dims % 4:
            raise ValueError(
                f"tuning 'fada' splits the {embed_dims} channels into C/4 + 3C/4 bands: the "
                "backbone width must be divisible by 4"
            )
        k = channel_grid_width
        if wavelet_mode == "fixed" and (k % 2 or embed_dims % (2 * k)):
            raise ValueError(
                f"tuning 'fada' (wavelet_mode fixed) lays each token's {embed_dims} channels out "
                f"in rows of channel_grid_width={k}: the width must be a multiple of {2 * k}; "
                "set model.tuning_options.channel_grid_width to a divisor (e.g. 16 or 8)"
            )
        self.wavelet_mode = wavelet_mode
        self.channel_grid_width = channel_grid_width
        self.low_dims = embed_dims // 4
        self.high_dims = embed_dims - self.low_dims
        #: (rows, columns) of the last input's patch grid, for error messages only
        self.grid_hint: tuple[int, int] | None = None
        super().__init__(
            embed_dims=embed_dims,
            branch_dims=(self.low_dims, self.high_dims),
            branch_lora=(True, True),
            **kwargs,
        )

    # -- the filters (official order: after the four MLPs, before transform and merge) --------
    def create_split_params(self) -> None:
        if self.wavelet_mode == "faithful":
            self.wavepool = WavePool(self.embed_dims)
        else:
            self.register_buffer("haar", haar_kernels(), persistent=False)

    def reset_split_params(self) -> None:
        if self.wavelet_mode == "faithful":
            self.wavepool.reset_parameters()

    # -- the band split -----------------------------------------------------------------------
    def split(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        """Patch features (B, N, C) -> low band (B, N, C/4), high band (B, N, 3C/4)."""
        if self.wavelet_mode == "faithful":
            return self._split_faithful(feats)
        return self._split_fixed(feats)

    def _split_faithful(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        batch, n, channels = feats.shape
        side = math.isqrt(n)
        if side * side != n or side % 2:
            raise ValueError(self._grid_error(n))
        lo = self.low_dims
        # The official module works seq-first: its (N, B, C) buffer, read as an image batch.
        x = feats.transpose(0, 1).reshape(batch, channels, side, side)
        y = self.wavepool(x)  # (B, C, 4, side/2, side/2); each band's buffer read as rows
        low = y[:, :, 0].reshape(n, batch, lo)
        high = torch.cat([y[:, :, j].reshape(batch * n, lo) for j in (1, 2, 3)], dim=-1)
        return low.transpose(0, 1), high.reshape(n, batch, 3 * lo).transpose(0, 1)

    def _split_fixed(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        batch, n, channels = feats.shape
        k = self.channel_grid_width
        # each token's channels as a (C/k, k) grid, cut into 2x2 blocks (i, r, j, s)
        grid = feats.reshape(batch, n, channels // (2 * k), 2, k // 2, 2)
        bands = torch.einsum("bnirjs,frs->bnfij", grid, self.haar.to(feats.dtype))
        return bands[:, :, 0].flatten(-2), bands[:, :, 1:].flatten(-3)

    def _grid_error(self, n: int) -> str:
        side = math.isqrt(n)
        if self.grid_hint is not None and self.grid_hint[0] * self.grid_hint[1] == n:
            grid = f"{self.grid_hint[0]}x{self.grid_hint[1]}"
        elif side * side == n:
            grid = f"{side}x{side}"
        else:
            grid = f"of {n} patch tokens"
        return (
            f"tuning 'fada' (wavelet_mode faithful, the official layout) needs a square token "
            f"grid with an even side, got a grid {grid}; set model.tuning_options.wavelet_mode: "
            "fixed, or use slide inference with square crops (eval.mode: slide)"
        )

    def combine(self, delta1: Tensor, delta2: Tensor) -> Tensor:
        """Low channels first, then high: no inverse transform (spec section 4, step 5)."""
        return torch.cat([delta1, delta2], dim=-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, wavelet_mode={self.wavelet_mode}"


def _remember_grid(backbone: nn.Module, args: tuple[Any, ...]) -> None:
    """Forward pre-hook of the backbone: the input's patch grid, for FADA's error message."""
    reins = getattr(backbone, "reins", None)
    x = args[0] if args else None
    if isinstance(reins, FADAReins) and isinstance(x, Tensor) and x.dim() == 4:
        p = int(getattr(backbone, "patch_size", 1) or 1)
        reins.grid_hint = (x.shape[-2] // p, x.shape[-1] // p)


# -- the method ---------------------------------------------------------------------------------
class FADAMethod(TwoBranchMethod):
    """The foundation model is frozen; FADA (``backbone.reins.*``) and the decode head train."""

    name = "fada"
    Options = FADAOptions
    official_keys = FADA_ONLY_KEYS

    def block_adapter(self, backbone: nn.Module, model_cfg: ModelConfig) -> nn.Module:
        module = FADAReins(
            **self.module_kwargs(backbone, model_cfg),
            wavelet_mode=self.options.wavelet_mode,
            channel_grid_width=self.options.channel_grid_width,
        )
        backbone.register_forward_pre_hook(_remember_grid)
        return module

    # -- official checkpoints -----------------------------------------------------------------
    def official_to_ours(
        self, state: Mapping[str, Tensor], model_keys: Container[str]
    ) -> dict[str, Tensor]:
        out = super().official_to_ours(state, model_keys)
        if self.options.wavelet_mode != "fixed":
            return out
        filters = {k: out.pop(k) for k in list(out) if k.startswith("backbone.reins.wavepool.")}
        haar = dict(zip(BANDS, haar_kernels()))
        trained = [
            k
            for k, v in filters.items()
            if not torch.equal(v.float(), haar[k.split(".")[-2]].expand_as(v))
        ]
        if trained:
            warnings.warn(
                f"wavelet_mode fixed uses one frozen Haar bank: the checkpoint's {len(trained)} "
                f"trained filter tensors ({trained[0]}, ...) are dropped, so its outputs differ "
                "from the official ones; use wavelet_mode faithful to keep them",
                stacklevel=2,
            )
        return out

    def official_export(self, model: nn.Module) -> dict[str, Tensor]:
        state = super().official_export(model)
        reins = model.backbone.reins  # type: ignore[attr-defined]
        if self.options.wavelet_mode == "fixed":  # the official layout always has the filters
            for band, kernel in zip(BANDS, haar_kernels()):
                state[f"backbone.reins.wavepool.{band}.weight"] = kernel.expand(
                    reins.embed_dims, 1, 2, 2
                ).clone()
        return state
