"""A frozen timm EVA / EVA02 / DINOv3 with Rein after every block.

EVA02 adds rotary position embeddings (RoPE) to the absolute ones: every block takes the rotary
table of the *actual* patch grid as ``rope=``. :class:`ReinEva` therefore leaves the embedding to
the model itself: the timm ``Eva`` is built with ``dynamic_img_size=True``, so its patch
embedding keeps the grid (NHWC) and its own ``_pos_embed`` resamples the absolute positional
embedding to that grid and computes the rotary table for it (scaled against the model's
``ref_feat_shape``, EVA02's "interpolated frequencies"). The tokens then go through the blocks
exactly as in timm's ``forward_intermediates``, with Rein on the patch tokens after each block
(class token untouched), and the outputs are taken and resized as in :class:`ReinViT`.

DINOv3 (timm ``vit_{small,base,large,huge_plus}_patch16_dinov3``) is an ``Eva`` too: RoPE only
(no absolute positions; timm's ``dinov3`` rotary type, one table for all blocks, not ``mixed``),
a class token and 4 registers (the 5 prefix tokens pass every Rein untouched and are dropped from
the outputs), LayerScale, and a SwiGLU MLP (``mlp.fc1_g`` / ``fc1_x`` / ``fc2``) for H+.

A weight-space method may wrap an attention's fused ``qkv`` (SoMA, RecycleLoRA, LoRA). With a qkv
bias beside it (DINOv3 ``_qkvb``, EVA-CLIP; EVA02 has separate q/k/v linears) timm's
``EvaAttention`` computes ``F.linear(x, qkv.weight, bias)`` and would bypass the wrapper;
:meth:`ReinEva.route_wrapped_qkv` (run by ``train()`` / ``eval()``, which
:func:`rein.methods.apply_tuning` calls after adapting, and by ``forward``) therefore switches
such an attention to ``qkv_bias_separate``: ``qkv(x)``, then the q/k/v bias added.
"""

from __future__ import annotations

from torch import Tensor, nn

from rein.backbones.base import check_input_size
from rein.backbones.vit import ReinViT
from rein.reins import Reins

__all__ = ["ReinEva"]


class ReinEva(ReinViT):
    """Frozen timm ``Eva`` (EVA02, DINOv3; RoPE) + Rein after every block.

    Args:
        eva: a timm ``Eva`` created with ``dynamic_img_size=True`` (weights under ``vit.*``).
        reins: the Rein module, or ``None``.
        out_indices: four blocks whose post-Rein outputs are returned.
        freeze: freeze the EVA (no weight gradients, always in eval mode).
    """

    supports_prompts = False  # rotary positions follow the patch grid: no room for prompts

    def __init__(
        self,
        eva: nn.Module,
        reins: Reins | None = None,
        out_indices: list[int] | None = None,
        freeze: bool = True,
    ) -> None:
        if not getattr(eva, "dynamic_img_size", False):
            raise ValueError(
                "ReinEva needs an Eva built with dynamic_img_size=True (rotary and absolute "
                "positions follow the input grid); build_backbone sets it"
            )
        super().__init__(eva, reins, out_indices=out_indices, mask_token=False, freeze=freeze)

    def embed_with_rope(self, x: Tensor) -> tuple[Tensor, int, int, Tensor | None]:
        """Images -> tokens (B, P + h*w, C), h, w and the rotary table of this grid (or None)."""
        check_input_size(x.shape[-2], x.shape[-1], self.patch_size)
        tokens = self.vit.patch_embed(x)  # (B, h, w, C): dynamic size keeps the grid
        h, w = tokens.shape[1:3]
        tokens, rope = self.vit._pos_embed(tokens)  # abs pos resampled + RoPE for (h, w)
        tokens = self.vit.norm_pre(tokens)
        return tokens, h, w, rope

    def embed(self, x: Tensor) -> tuple[Tensor, int, int]:
        tokens, h, w, _ = self.embed_with_rope(x)
        return tokens, h, w

    def route_wrapped_qkv(self) -> None:
        """Let every attention whose fused ``qkv`` is wrapped call it as a module (see above)."""
        for block in self.vit.blocks:
            attn = getattr(block, "attn", None)
            qkv = getattr(attn, "qkv", None)
            if (
                qkv is not None
                and type(qkv) is not nn.Linear
                and getattr(attn, "q_bias", None) is not None
                and not attn.qkv_bias_separate
            ):
                attn.qkv_bias_separate = True

    def train(self, mode: bool = True) -> ReinEva:
        super().train(mode)
        self.route_wrapped_qkv()
        return self

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor | None]:
        """Images (B, 3, H, W) -> ([4 maps at strides 4/8/16/32], queries (m, Q) or None)."""
        self.route_wrapped_qkv()
        tokens, h, w, rope = self.embed_with_rope(x)
        if rope is not None and getattr(self.vit, "rope_mixed", False):
            return self.forward_tokens(tokens, h, w, lambda i: {"rope": rope[i]})  # per depth
        return self.forward_tokens(tokens, h, w, lambda i: {"rope": rope})
