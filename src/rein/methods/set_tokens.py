"""``set``: SET (ACM MM 2024), Spectral-dEcomposed Tokens: Rein on the phase and amplitude of an FFT.

Spec: ../shared/docs/methods/fada.md, section 12 (the official code, github JingjunYi/SET at
5377b66), on the skeleton of :class:`~rein.methods.two_branch.TwoBranchReins`. The patch
features ``f`` of block ``l`` are Fourier transformed; branch 1 refines the phase, branch 2 (with
instance norm) the amplitude, both at the full width C, and the two outputs are recombined as
a phase and an amplitude by an inverse real FFT::

    F       = FFT(f);  phase = atan2(Im F, Re' F);  amp = sqrt((Re^2 + Im^2)')
    D1      = branch 1 (phase, T1),  T1 = A[l] @ B[l]       # learnable_tokens_a / _b (LoRA)
    D2      = branch 2 (amp, T2),    T2 = T2[l]             # learnable_tokens2 (full rank)
    f'      = f + scale * IRFFT((cos D1 + i sin D1) * D2 / sqrt(2 C), norm="ortho")

``x'`` replaces values in (-1e-5, 1e-5) by +1e-5 (the official ``replace_denormals``). Branch 2's
tokens are full rank even with ``model.rein.lora_dim`` set (the official ``LoRAReins`` only
replaces the first token set); with ``lora_dim: null`` both are full rank. The four MLPs are
C x C, ``transform`` is Linear(C -> Q) on the branch-1 tokens. Parameter names and order follow
the official module, so its checkpoints (``scale``, ``learnable_tokens2``,
``learnable_tokens_a/_b``, the four MLPs, ``transform``, ``merge`` + the Rein head) map one to one.

Initialisation (the spec gives FADA's bounds, section 9, not SET's): FADA's pattern at SET's
widths, which is Rein's at C. Branch-1 LoRA factors U(+-sqrt(6 / (3 p^2 + sqrt(C r)))) (0.081832
for DINOv2-L), branch-2 tokens U(+-sqrt(6 / (3 p^2 + C))) (0.057864), kaiming-uniform(a=sqrt 5)
MLP weights with torch's default biases, ``scale`` 1e-3; the official ``reins.py`` draws the
same distributions (seeded parity is not a goal: load state dicts instead).

Which FFT (``model.tuning_options.fft_mode``):

* ``faithful`` (default): the official numerics. The official module works on the seq-first
  tensor (N, B, C) and takes ``fft2`` over its last two dims, i.e. over (image, channel) for
  each token, and the inverse is ``irfft2(s=(B, C))``. At batch 1 this is a 1-D FFT over each
  token's channels; at batch > 1 it mixes the images of the batch, so an image's output depends
  on the batch size and on the other images (training runs at batch 4, testing at batch 1).
* ``per_image``: a 1-D FFT over each token's C channels and a 1-D inverse real FFT of length C
  (same thresholds, norm and 1/sqrt(2C)). Independent of the batch; equal to ``faithful`` at
  batch 1. Same parameters as ``faithful``, so checkpoints move freely between the two.

The FFTs run in float32: half-precision features are cast up, and the branch inputs and the
delta are cast back to the features' / branch outputs' dtype.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from rein.methods.fada import FADA_ONLY_KEYS  # a file with these is FADA's, not SET's
from rein.methods.two_branch import TwoBranchMethod, TwoBranchReins

if TYPE_CHECKING:
    from rein.config import ModelConfig

__all__ = ["FFT_MODES", "SETOptions", "SETReins", "SETMethod", "replace_denormals"]

FFT_MODES = ("faithful", "per_image")
#: keys of SET's official module that no Rein checkpoint has (FADA's also has its filters)
SET_KEYS = ("backbone.reins.learnable_tokens2",)
DENORMAL = 1e-5


def replace_denormals(x: Tensor, threshold: float = DENORMAL) -> Tensor:
    """``x`` with the values in (-threshold, threshold) replaced by +threshold."""
    return x.masked_fill((x > -threshold) & (x < threshold), threshold)


@dataclasses.dataclass
class SETOptions:
    """``model.tuning_options`` of ``set`` (token count, rank, scale: ``model.rein``)."""

    fft_mode: str = "faithful"  # or "per_image" (see the module docstring)

    def validate(self, method: str) -> None:
        if self.fft_mode not in FFT_MODES:
            raise ValueError(
                f"tuning '{method}': option 'fft_mode' must be one of {', '.join(FFT_MODES)}, "
                f"got {self.fft_mode!r}"
            )


class SETReins(TwoBranchReins):
    """SET's module after every block: Rein on the phase (LoRA tokens) and on the amplitude
    (full-rank tokens, instance norm) of the features' FFT.

    Args: those of :class:`~rein.methods.two_branch.TwoBranchReins` (keywords) but the branch
    layout, which is SET's (both C wide; branch 1 LoRA unless ``lora_dim`` is None, branch 2
    always full rank), and:
        fft_mode: ``faithful`` (official: FFT over image and channel) or ``per_image``.
    """

    token_order = (2, 1)  # the official LoRAReins adds learnable_tokens_a/_b last

    def __init__(self, *, embed_dims: int, fft_mode: str = "faithful", **kwargs: Any) -> None:
        if fft_mode not in FFT_MODES:
            raise ValueError(f"fft_mode must be one of {FFT_MODES}, got {fft_mode!r}")
        self.fft_mode = fft_mode
        super().__init__(
            embed_dims=embed_dims,
            branch_dims=(embed_dims, embed_dims),
            branch_lora=(True, False),
            **kwargs,
        )

    def split(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        """Patch features (B, N, C) -> phase (B, N, C), amplitude (B, N, C)."""
        x = feats.float() if feats.dtype in (torch.float16, torch.bfloat16) else feats
        if self.fft_mode == "faithful":  # seq-first (N, B, C): fft2 over (image, channel)
            spectrum = torch.fft.fft2(x, dim=(0, 2))
        else:
            spectrum = torch.fft.fft(x, dim=-1)
        re, im = spectrum.real, spectrum.imag
        phase = torch.atan2(im, replace_denormals(re))
        amplitude = replace_denormals(re * re + im * im).sqrt()
        return phase.to(feats.dtype), amplitude.to(feats.dtype)

    def combine(self, delta1: Tensor, delta2: Tensor) -> Tensor:
        """Branch 1's output as a phase, branch 2's as an amplitude, back through the inverse
        real FFT (only the first C/2 + 1 channel bins count)."""
        batch, _, channels = delta1.shape
        phase, amplitude = delta1.float(), delta2.float()
        norm = math.sqrt(2 * channels)  # the official divisor: x.shape[2] * x.shape[3] = C * 2
        z = torch.complex(torch.cos(phase) * amplitude, torch.sin(phase) * amplitude) / norm
        if self.fft_mode == "faithful":
            out = torch.fft.irfft2(z, s=(batch, channels), dim=(0, 2), norm="ortho")
        else:
            out = torch.fft.irfft(z, n=channels, dim=-1, norm="ortho")
        return out.to(delta1.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fft_mode={self.fft_mode}"


class SETMethod(TwoBranchMethod):
    """The foundation model is frozen; SET (``backbone.reins.*``) and the decode head train."""

    name = "set"
    Options = SETOptions
    official_keys = SET_KEYS
    #: faithful and per_image share every tensor (they differ only at batch > 1)
    training_only_options = ("fft_mode",)

    def block_adapter(self, backbone: nn.Module, model_cfg: ModelConfig) -> nn.Module:
        return SETReins(**self.module_kwargs(backbone, model_cfg), fft_mode=self.options.fft_mode)

    @classmethod
    def claims_official(cls, keys: Collection[str]) -> bool:
        keys = list(keys)
        return super().claims_official(keys) and not any(k.startswith(FADA_ONLY_KEYS) for k in keys)
