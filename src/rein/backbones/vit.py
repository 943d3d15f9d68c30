"""A frozen timm Vision Transformer with Rein after every block.

:class:`ReinViT` wraps an unmodified timm ``VisionTransformer`` (DINOv2 with or without
registers, CLIP, MAE, ...). It runs the patch embedding and the blocks itself so that Rein can
refine the patch tokens after *every* block; the prefix tokens (class, registers) pass through
untouched. It returns four maps taken at ``out_indices`` *without* the final norm, resized from
stride ``patch`` to strides 4/8/16/32 (x4, x2, x1, x0.5 bilinear, as the official code), plus the
Rein-link queries.

Positional embeddings follow the DINOv2 rule of the official code: they are interpolated
(bicubic with ``scale_factor`` and the "+0.1" trick) only when the patch grid differs from the
stored grid or the input is not square.
"""

from __future__ import annotations

import difflib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rein.reins import Reins

__all__ = ["ReinViT", "default_out_indices", "create_timm_vit", "OUT_SCALES"]

# Resize factors that turn the four stride-16 maps into strides 4, 8, 16 and 32.
OUT_SCALES = (4.0, 2.0, 1.0, 0.5)

_KNOWN_OUT_INDICES = {12: [3, 5, 7, 11], 24: [7, 11, 15, 23], 32: [7, 15, 23, 31], 40: [9, 19, 29, 39]}


def default_out_indices(depth: int) -> list[int]:
    """Default output blocks: [7, 11, 15, 23] for 24 blocks, similar fractions otherwise."""
    if depth in _KNOWN_OUT_INDICES:
        return list(_KNOWN_OUT_INDICES[depth])
    return [max(0, round(depth * f) - 1) for f in (1 / 3, 1 / 2, 2 / 3)] + [depth - 1]


def create_timm_vit(name: str, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=0, **kwargs)`` with a clear error."""
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.5)
        hint = f"; closest timm names: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown backbone '{name}'{hint}")
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


class ReinViT(nn.Module):
    """Frozen timm ViT + :class:`~rein.reins.Reins` after every block.

    Args:
        vit: a timm ``VisionTransformer`` (kept as is; its weights are ``vit.*``).
        reins: the Rein module, or ``None`` for the frozen / fully fine-tuned baselines.
        out_indices: blocks whose (post-Rein) outputs are returned; 4 of them.
        mask_token: keep a (1, C) ``mask_token`` parameter as in the original DINOv2 layout.
            It is unused (as in the official model) but lets the original torch-hub file load
            strictly and makes parameter counts equal the official report.
        freeze: freeze the ViT (no weight gradients, always in eval mode).
    """

    def __init__(
        self,
        vit: nn.Module,
        reins: Reins | None = None,
        out_indices: list[int] | None = None,
        mask_token: bool = False,
        freeze: bool = True,
    ) -> None:
        super().__init__()
        self.vit = vit
        self.embed_dim: int = vit.embed_dim
        self.depth = len(vit.blocks)
        self.patch_size = _patch_size(vit)
        self.num_prefix_tokens: int = getattr(vit, "num_prefix_tokens", 1)
        self.out_indices = list(out_indices) if out_indices else default_out_indices(self.depth)
        if len(self.out_indices) != 4 or not all(0 <= i < self.depth for i in self.out_indices):
            raise ValueError(
                f"out_indices must be 4 block indices in [0, {self.depth}); got {self.out_indices}"
            )
        self.last_index = max(self.out_indices)
        if mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, self.embed_dim))
        if reins is not None:
            if reins.embed_dims != self.embed_dim:
                raise ValueError(
                    f"Rein embed_dims={reins.embed_dims} does not match the backbone width "
                    f"{self.embed_dim}; set it to {self.embed_dim}"
                )
            if reins.num_layers != self.depth:
                raise ValueError(
                    f"Rein num_layers={reins.num_layers} but the backbone has {self.depth} "
                    f"blocks; Rein follows every block, set num_layers={self.depth}"
                )
        self.reins = reins
        self.frozen = freeze
        if freeze:
            self.freeze()

    @property
    def out_channels(self) -> list[int]:
        return [self.embed_dim] * 4

    def frozen_parameters(self):
        """Parameters of the foundation model (everything but Rein)."""
        return (p for n, p in self.named_parameters() if not n.startswith("reins."))

    def freeze(self) -> None:
        """Stop weight gradients of the foundation model; it stays in eval mode."""
        self.frozen = True
        for p in self.frozen_parameters():
            p.requires_grad_(False)
        self.vit.eval()

    def train(self, mode: bool = True) -> ReinViT:
        super().train(mode)
        if self.frozen:
            self.vit.eval()  # no dropout / drop-path in the frozen model
        return self

    # -- tokens -------------------------------------------------------------------------------
    def _prefix_tokens(self, batch: int) -> list[Tensor]:
        out = []
        for name in ("cls_token", "reg_token"):
            tok = getattr(self.vit, name, None)
            if tok is not None:
                out.append(tok.expand(batch, -1, -1))
        return out

    def _pos_embed(self, num_patch_h: int, num_patch_w: int, img_h: int, img_w: int) -> Tensor:
        """Positional embedding for this input, DINOv2 rule (see module docstring)."""
        pos = self.vit.pos_embed
        n_prefix = 0 if getattr(self.vit, "no_embed_class", False) else self.num_prefix_tokens
        grid = math.isqrt(pos.shape[1] - n_prefix)
        if num_patch_h * num_patch_w == grid * grid and img_h == img_w:
            return pos
        prefix_pos, patch_pos = pos[:, :n_prefix], pos[:, n_prefix:]
        dim = pos.shape[-1]
        patch_pos = patch_pos.float().reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(
            patch_pos,
            scale_factor=((num_patch_h + 0.1) / grid, (num_patch_w + 0.1) / grid),
            mode="bicubic",
            align_corners=False,
        )
        if patch_pos.shape[-2:] != (num_patch_h, num_patch_w):  # pragma: no cover - float guard
            raise RuntimeError(f"pos-embed resize gave {tuple(patch_pos.shape[-2:])}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos.dtype)
        return torch.cat([prefix_pos, patch_pos], dim=1)

    def embed(self, x: Tensor) -> tuple[Tensor, int, int]:
        """Patch embedding + prefix tokens + positional embedding -> (B, P + h*w, C), h, w."""
        batch, _, img_h, img_w = x.shape
        p = self.patch_size
        if img_h % p or img_w % p:
            ok_h, ok_w = math.ceil(img_h / p) * p, math.ceil(img_w / p) * p
            raise ValueError(
                f"input size {img_h}x{img_w} is not a multiple of the patch size {p}; "
                f"pad it to {ok_h}x{ok_w} (the segmentor pads automatically)"
            )
        pe = self.vit.patch_embed
        tokens = pe.proj(x)  # (B, C, h, w)
        h, w = tokens.shape[-2:]
        tokens = pe.norm(tokens.flatten(2).transpose(1, 2))  # (B, h*w, C)
        prefix = self._prefix_tokens(batch)
        pos = self._pos_embed(h, w, img_h, img_w) if self.vit.pos_embed is not None else None
        if getattr(self.vit, "no_embed_class", False):
            tokens = tokens + pos if pos is not None else tokens
            tokens = torch.cat([*prefix, tokens], dim=1)
        else:
            tokens = torch.cat([*prefix, tokens], dim=1)
            tokens = tokens + pos if pos is not None else tokens
        tokens = self.vit.pos_drop(tokens)
        tokens = self.vit.norm_pre(tokens)
        return tokens, h, w

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor | None]:
        """Images (B, 3, H, W) -> ([4 maps (B, C, H/4..H/32, ...)], queries (m, Q) or None)."""
        tokens, h, w = self.embed(x)
        batch, n_prefix = x.shape[0], self.num_prefix_tokens
        taken: dict[int, Tensor] = {}
        for i, block in enumerate(self.vit.blocks[: self.last_index + 1]):
            tokens = block(tokens)
            if self.reins is not None:
                tokens = self.reins(tokens, i, num_prefix_tokens=n_prefix)
            if i in self.out_indices:
                taken[i] = tokens[:, n_prefix:].transpose(1, 2).reshape(batch, -1, h, w)
        outs = [taken[i] for i in self.out_indices]
        feats = [
            fmap if s == 1 else F.interpolate(fmap, scale_factor=s, mode="bilinear", align_corners=False)
            for fmap, s in zip(outs, OUT_SCALES)
        ]
        queries = None
        if self.reins is not None and self.reins.link_token_to_query:
            queries = self.reins.queries()
        return feats, queries


def _patch_size(vit: nn.Module) -> int:
    ps = vit.patch_embed.patch_size
    ps = ps if isinstance(ps, int) else ps[0]
    return int(ps)
