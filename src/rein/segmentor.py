"""Backbone + Mask2Former head: training loss and whole / sliding-window inference.

Inference follows the official (mmseg) semantics exactly:

* the head's last prediction is upsampled (bilinear) to the input size and turned into class
  scores ``sum_q softmax(cls)[:-1] * sigmoid(mask)`` (sums of probabilities, not logits);
* **slide** mode runs the whole model on ``crop x crop`` windows with ``stride``, sums the window
  scores into the canvas and divides by the per-pixel window count;
* the scores are resized (bilinear, ``align_corners=False``) to the original image size.

Inputs whose sides are not multiples of the patch size are padded (bottom/right, zeros) before
the backbone and the scores are cropped back, so any image size works.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rein.backbones.base import ReinBackbone
from rein.heads.mask2former import Mask2FormerHead
from rein.losses import Mask2FormerCriterion

__all__ = ["Segmentor", "build_segmentor", "slide_windows", "store_frozen_weights"]


class Segmentor(nn.Module):
    """A frozen (or tuned) backbone with Rein, and a Mask2Former decode head.

    ``backbone(images) -> (features, queries)``; ``decode_head(features, queries)`` returns the
    class and mask predictions of every decoder layer.
    """

    def __init__(
        self,
        backbone: ReinBackbone,
        decode_head: Mask2FormerHead,
        criterion: Mask2FormerCriterion | None = None,
        num_classes: int = 19,
        window_batch: int = 4,
        precision: str = "fp32",
    ) -> None:
        super().__init__()
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        self.backbone = backbone
        self.decode_head = decode_head
        self.criterion = criterion
        self.num_classes = num_classes
        self.window_batch = window_batch
        self.precision = precision

    # -- training -----------------------------------------------------------------------------
    def forward(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Images (B, 3, H, W) -> per-layer class logits (B, Q, K+1) and masks (B, Q, H/4, W/4).

        With ``precision="bf16"`` the model runs under bf16 autocast and the predictions are
        returned in float32 (the losses and scores are computed in float32).
        """
        if self.precision == "fp32":
            feats, queries = self.backbone(images)
            return self.decode_head(feats, queries)
        if images.device.type == "cpu":
            _warn_if_slow_cpu_bf16()
        with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16):
            feats, queries = self.backbone(images)
            cls_preds, mask_preds = self.decode_head(feats, queries)
        return [c.float() for c in cls_preds], [m.float() for m in mask_preds]

    def loss(
        self, images: Tensor, labels: Tensor, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Mask2Former losses for a batch; ``labels`` (B, H, W) with 255 = ignore."""
        if self.criterion is None:
            raise RuntimeError("this Segmentor was built without a criterion (inference only)")
        cls_preds, mask_preds = self(images)
        return self.criterion(cls_preds, mask_preds, labels, generator=generator)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Only the weights that train (Rein + head, or whatever the tuning method unfroze)."""
        from rein.engine.checkpoint import trainable_state_dict

        return trainable_state_dict(self)

    def parameter_groups(self) -> dict[str, tuple[int, int]]:
        """``{group: (total, trainable)}`` for backbone, rein, head (and lora / vpt / adaptformer)."""
        method = getattr(self, "method", None)
        groups: dict[str, list[int]] = {"backbone": [0, 0], "rein": [0, 0], "head": [0, 0]}
        for name, p in self.named_parameters():
            group = "rein" if name.startswith("backbone.reins.") else name.split(".")[0]
            group = (method.report_group(name) if method is not None else None) or group
            group = {"decode_head": "head"}.get(group, group)
            groups.setdefault(group, [0, 0])
            groups[group][0] += p.numel()
            groups[group][1] += p.numel() if p.requires_grad else 0
        return {k: (v[0], v[1]) for k, v in groups.items()}

    # -- inference ----------------------------------------------------------------------------
    def seg_scores(self, images: Tensor) -> Tensor:
        """Class scores (B, K, H, W) at the input size, padding to the patch size if needed."""
        h, w = images.shape[-2:]
        p = self.backbone.patch_size
        pad_h, pad_w = (-h) % p, (-w) % p
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        cls_preds, mask_preds = self(images)
        scores = self.decode_head.predict_seg(cls_preds[-1], mask_preds[-1], images.shape[-2:])
        return scores[..., :h, :w]

    @torch.no_grad()
    def inference(
        self,
        images: Tensor,
        mode: str = "slide",
        crop_size: int | tuple[int, int] = 512,
        stride: int | tuple[int, int] = 341,
        out_size: tuple[int, int] | None = None,
        flip: bool = False,
    ) -> Tensor:
        """Class scores (B, K, *out_size) for normalised images (B, 3, H, W).

        ``mode`` is ``"whole"`` or ``"slide"``; ``out_size`` (the original image size) defaults to
        the input size; ``flip`` averages with the horizontally flipped image.
        """
        if mode not in ("whole", "slide"):
            raise ValueError(f"unknown inference mode '{mode}'; use 'whole' or 'slide'")
        run = (
            self.seg_scores
            if mode == "whole"
            else (lambda x: self.slide_scores(x, crop_size, stride))
        )
        scores = run(images)
        if flip:
            scores = (scores + run(images.flip(-1)).flip(-1)) / 2
        if out_size is not None and tuple(out_size) != tuple(scores.shape[-2:]):
            scores = F.interpolate(
                scores, size=tuple(out_size), mode="bilinear", align_corners=False
            )
        return scores

    def slide_scores(
        self, images: Tensor, crop_size: int | tuple[int, int], stride: int | tuple[int, int]
    ) -> Tensor:
        """mmseg ``slide_inference``: sum of window scores divided by the overlap count."""
        batch, _, h_img, w_img = images.shape
        windows = list(slide_windows(h_img, w_img, crop_size, stride))
        scores = images.new_zeros((batch, self.num_classes, h_img, w_img))
        count = images.new_zeros((1, 1, h_img, w_img))
        # Windows of equal size run as one batch (at most `window_batch` windows at a time).
        for chunk in _chunks(windows, max(1, self.window_batch // batch)):
            by_size: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
            for win in chunk:
                by_size.setdefault((win[1] - win[0], win[3] - win[2]), []).append(win)
            for wins in by_size.values():
                crops = torch.cat([images[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in wins])
                out = self.seg_scores(crops)
                for i, (y1, y2, x1, x2) in enumerate(wins):
                    scores[:, :, y1:y2, x1:x2] += out[i * batch : (i + 1) * batch]
                    count[:, :, y1:y2, x1:x2] += 1
        return scores / count


def slide_windows(
    h_img: int, w_img: int, crop_size: int | tuple[int, int], stride: int | tuple[int, int]
) -> Iterator[tuple[int, int, int, int]]:
    """Window boxes ``(y1, y2, x1, x2)`` of mmseg's sliding-window inference."""
    h_crop, w_crop = (crop_size, crop_size) if isinstance(crop_size, int) else crop_size
    h_stride, w_stride = (stride, stride) if isinstance(stride, int) else stride
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * h_stride, w_idx * w_stride
            y2, x2 = min(y1 + h_crop, h_img), min(x1 + w_crop, w_img)
            y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
            yield y1, y2, x1, x2


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def build_segmentor(model_cfg, load_weights: bool = True, with_criterion: bool = True) -> Segmentor:
    """Segmentor from a :class:`rein.config.ModelConfig` (tuning policy applied)."""
    from rein.backbones import build_backbone
    from rein.methods import apply_tuning, build_method

    method = build_method(model_cfg.tuning, model_cfg.tuning_options)
    backbone = build_backbone(model_cfg, load_weights=load_weights, method=method)
    hcfg = model_cfg.head
    query_source = "rein" if method.supplies_queries(backbone) else "learned"
    num_queries = backbone.reins.token_length if query_source == "rein" else hcfg.num_queries
    head = Mask2FormerHead(
        in_channels=backbone.out_channels,
        num_classes=hcfg.num_classes,
        feat_channels=hcfg.feat_channels,
        num_queries=num_queries,
        num_decoder_layers=hcfg.num_decoder_layers,
        num_encoder_layers=hcfg.num_encoder_layers,
        num_heads=hcfg.num_heads,
        feedforward_channels=hcfg.feedforward_channels,
        encoder_feedforward_channels=hcfg.encoder_feedforward_channels,
        num_points=hcfg.num_points,
        out_channels=hcfg.out_channels,
        query_source=query_source,
    )
    criterion = None
    if with_criterion:
        lc = model_cfg.loss
        criterion = Mask2FormerCriterion(
            num_classes=hcfg.num_classes,
            class_weight=lc.class_weight,
            no_object_weight=lc.no_object_weight,
            mask_weight=lc.mask_weight,
            dice_weight=lc.dice_weight,
            num_points=lc.num_points,
            oversample_ratio=lc.oversample_ratio,
            importance_sample_ratio=lc.importance_sample_ratio,
        )
    precision = getattr(model_cfg, "precision", "fp32")
    model = Segmentor(backbone, head, criterion, num_classes=hcfg.num_classes, precision=precision)
    apply_tuning(model, method)
    if precision == "bf16":
        store_frozen_weights(model, torch.bfloat16)
    return model


_WEIGHT_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_bf16_warned = False


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX); without them
    torch emulates bf16, which is far slower than fp32."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def _warn_if_slow_cpu_bf16() -> None:
    global _bf16_warned
    if _bf16_warned or cpu_has_native_bf16():
        return
    _bf16_warned = True
    import logging

    logging.getLogger("rein").warning(
        "warning: model.precision bf16 on a CPU without AVX512-BF16 / AMX (torch reports %s): "
        "bf16 is emulated there and much slower than fp32; use --precision fp32 on this machine",
        torch.backends.cpu.get_cpu_capability(),
    )


def store_frozen_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast, in place, the frozen (``requires_grad=False``) weights and biases of every Linear /
    Conv layer of ``model.backbone`` to ``dtype``; returns how many tensors were cast.

    These hold nearly all of a foundation model's parameters; norms, embeddings, LayerScale and
    every trainable tensor keep their dtype. Under autocast the matmuls then read the stored
    weights directly instead of casting them on every call.
    """
    cast = 0
    for module in model.backbone.modules():  # type: ignore[union-attr]
        if not isinstance(module, _WEIGHT_MODULES):
            continue
        for param in module.parameters(recurse=False):
            if param.requires_grad or not param.is_floating_point() or param.dtype == dtype:
                continue
            param.data = param.data.to(dtype)
            cast += 1
    return cast
