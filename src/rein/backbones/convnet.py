"""A frozen timm ConvNet (ConvNeXt, ResNet) with Rein after every stage.

:class:`ReinConvNet` wraps an unmodified timm ``ConvNeXt`` or ``ResNet`` and runs it itself: the
stem, then the four stages (``stages.0..3`` for ConvNeXt, ``layer1..4`` for ResNet) whose outputs
are at strides 4, 8, 16 and 32, like timm's ``features_only`` maps. After each stage the map
(B, C_i, H_i, W_i) is flattened to (B, H_i*W_i, C_i), refined by that stage's Rein (see
:class:`~rein.backbones.stage_reins.StageReins`: per-stage width, tokens and MLPs) and folded
back; the refined map is both an output and the input of the next stage. The classifier head
(and ConvNeXt's final ``norm_pre``/head norm) is not used.

Inputs must be multiples of 32 (``patch_size = 32``) so that every stage halves exactly; the
segmentor pads to it. The frozen model stays in eval mode, so BatchNorm uses its running
statistics and is never updated.
"""

from __future__ import annotations

from torch import Tensor, nn

from rein.backbones.base import ReinBackbone, check_input_size
from rein.backbones.stage_reins import StageReins

__all__ = ["ReinConvNet", "STAGE_STRIDES"]

STAGE_STRIDES = (4, 8, 16, 32)


def _layout(net: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the stem modules (run in order) and of the four stages of a timm ConvNet."""
    from timm.models.convnext import ConvNeXt
    from timm.models.resnet import ResNet

    if isinstance(net, ResNet):
        return ["conv1", "bn1", "act1", "maxpool"], ["layer1", "layer2", "layer3", "layer4"]
    if isinstance(net, ConvNeXt):
        return ["stem"], [f"stages.{i}" for i in range(len(net.stages))]
    raise TypeError(f"ReinConvNet supports timm ConvNeXt and ResNet, not {type(net).__name__}")


class ReinConvNet(ReinBackbone):
    """Frozen timm ConvNeXt / ResNet + a Rein after each of the four stages.

    Args:
        net: a timm ``ConvNeXt`` or ``ResNet`` (weights under ``net.*``).
        reins: a :class:`StageReins` whose stage widths equal the network's, or ``None``.
        freeze: freeze the network (no weight gradients, always in eval mode).
    """

    patch_size = 32

    stage_strides = STAGE_STRIDES

    def __init__(
        self, net: nn.Module, reins: StageReins | None = None, freeze: bool = True
    ) -> None:
        super().__init__()
        self.net = net
        self.stem_names, self.stage_names = _layout(net)
        info = {f["module"]: f for f in net.feature_info}
        missing = [n for n in self.stage_names if n not in info]
        strides = tuple(info[n]["reduction"] for n in self.stage_names) if not missing else ()
        if missing or strides != STAGE_STRIDES:
            raise ValueError(
                f"{type(net).__name__} must have 4 stages at strides {STAGE_STRIDES} "
                f"(no dilation / output_stride); got {strides or missing}"
            )
        self.stage_channels: list[int] = [int(info[n]["num_chs"]) for n in self.stage_names]
        self.out_indices = [0, 1, 2, 3]
        if reins is not None and reins.embed_dims != self.stage_channels:
            raise ValueError(
                f"Rein stage widths {reins.embed_dims} do not match the backbone's "
                f"{self.stage_channels}"
            )
        self.reins = reins
        if freeze:
            self.freeze()

    @property
    def timm_model(self) -> nn.Module:
        return self.net

    @property
    def out_channels(self) -> list[int]:
        return list(self.stage_channels)

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor | None]:
        """Images (B, 3, H, W) -> ([4 stage maps at strides 4/8/16/32], queries or None)."""
        check_input_size(x.shape[-2], x.shape[-1], self.patch_size)
        for name in self.stem_names:
            x = self.net.get_submodule(name)(x)
        feats = []
        for i, name in enumerate(self.stage_names):
            x = self.net.get_submodule(name)(x)  # (B, C_i, H/s_i, W/s_i)
            if self.reins is not None:
                batch, dim, h, w = x.shape
                flat = self.reins(x.flatten(2).transpose(1, 2), i)  # (B, h*w, C_i)
                x = flat.transpose(1, 2).reshape(batch, dim, h, w)
            feats.append(x)
        return feats, self.link_queries()
