"""Golden outputs: tiny models of every backbone family and tuning method, recorded once.

Each case is a tiny model config. Its weights do not come from the model's initialisation:
every parameter (and every BatchNorm running statistic) is set from a NumPy PCG64 stream seeded
by the parameter's *name* (:func:`set_golden_weights`), so the values do not depend on the
order in which modules are built and no path is a near no-op (LayerScale, Rein's scale, zero-init
adapters and LoRA ``B`` all get sizeable values). The inputs come from the same kind of stream.

For each case the files in ``tests/data/golden/`` hold, from the implementation that was checked
against the official code:

* ``feats.{i}``: the backbone's 4 feature maps; ``queries``: the Rein-link queries (if any);
* ``cls.{l}`` / ``mask.{l}``: every decoder prediction's class and mask logits;
* ``seg.whole`` / ``seg.slide`` (B=2, several windows) / ``seg.nonsquare`` (padded, non-square):
  the class scores, subsampled every 3rd pixel to keep the files small;
* ``loss.*``: every loss term with a fixed point-sampling generator;
* ``grad.{name}``: a fingerprint of each trainable parameter's gradient of the total loss
  (norm and three projections on fixed random directions).

``tests/test_golden.py`` compares the current code with these files (1e-5 relative).
Regenerating them is a deliberate act, to be noted in the commit message::

    python tests/golden.py            # compare only; prints the largest deviation per case
    python tests/golden.py --write    # overwrite tests/data/golden/*.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

GOLDEN_DIR = Path(__file__).resolve().parent / "data" / "golden"
SUBSAMPLE = 3  # seg scores are stored every 3rd pixel in both directions
RTOL = 1e-5

TINY_VIT = {"embed_dim": 32, "depth": 4, "num_heads": 2}
# The head is small but has every official part: 8 heads, 3 levels, 4 points, GN(32).
TINY_HEAD = {
    "num_classes": 5,
    "feat_channels": 32,
    "out_channels": 32,
    "num_queries": 8,
    "num_decoder_layers": 3,
    "num_encoder_layers": 2,
    "feedforward_channels": 64,
    "encoder_feedforward_channels": 48,
}
_SAM = {**TINY_VIT, "window_size": 3, "global_attn_indexes": [1, 3], "neck_chans": 16}
_CONVNEXT = {"dims": [8, 16, 32, 64], "depths": [1, 1, 2, 1]}
_RESNET = {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8}

# case -> (timm name, timm kwargs, tuning, tuning options, rein overrides)
CASES: dict[str, tuple[str, dict, str, dict, dict]] = {
    "dinov2_rein_lora": ("vit_small_patch14_dinov2", TINY_VIT, "rein", {}, {}),
    "dinov2_rein_core": (
        "vit_small_patch14_dinov2",
        TINY_VIT,
        "rein",
        {},
        {"lora_dim": None, "share_mlps": False, "link_token_to_query": False},
    ),
    "dinov2_rein_share_link": (
        "vit_small_patch14_dinov2",
        TINY_VIT,
        "rein",
        {},
        {"lora_dim": None},
    ),
    "dinov2_frozen": ("vit_small_patch14_dinov2", TINY_VIT, "frozen", {}, {}),
    "dinov2_full": ("vit_small_patch14_dinov2", TINY_VIT, "full", {}, {}),
    "dinov2_lora": (
        "vit_small_patch14_dinov2",
        TINY_VIT,
        "lora",
        {"rank": 4, "targets": ["qkv", "fc2"]},
        {},
    ),
    "dinov2_vpt": ("vit_small_patch14_dinov2", TINY_VIT, "vpt", {"num_prompts": 3}, {}),
    "dinov2_adaptformer": (
        "vit_small_patch14_dinov2",
        TINY_VIT,
        "adaptformer",
        {"bottleneck": 8},
        {},
    ),
    "dinov2_reg_rein": ("vit_small_patch14_reg4_dinov2", TINY_VIT, "rein", {}, {}),
    "clip_rein": ("vit_large_patch14_clip_quickgelu_224.openai", TINY_VIT, "rein", {}, {}),
    "eva02_rein": ("eva02_large_patch14_224.mim_m38m", TINY_VIT, "rein", {}, {}),
    "sam_rein": ("samvit_base_patch16", _SAM, "rein", {}, {}),
    "convnext_rein": ("convnext_large", _CONVNEXT, "rein", {}, {}),
    "resnet_rein": ("resnet50", _RESNET, "rein", {}, {}),
}
NEEDS = {"dinov2_lora": "peft"}

# Inference settings of the recorded outputs.
WHOLE_SHAPE = (2, 3, 64, 64)
NONSQUARE_SHAPE = (1, 3, 40, 68)  # padded by 8 x 12 (16) or 24 x 28 (32); non-square grid
SLIDE_SHAPE = (2, 3, 80, 112)  # crop 64, stride 40: 2 x 3 windows, the last ones clamped
SLIDE_CROP, SLIDE_STRIDE = 64, 40
LOSS_SEED = 1234


def case_config(case: str) -> dict[str, Any]:
    """The model section of the case's config, as a plain dict (also stored in the file)."""
    name, kwargs, tuning, options, rein = CASES[case]
    return {
        "tuning": tuning,
        "tuning_options": dict(options),
        "backbone": {
            "name": name,
            "patch_size": 16,
            "img_size": 64,
            "timm_kwargs": dict(kwargs),
        },
        "rein": {"token_length": 8, "lora_dim": 4, **rein},
        "head": dict(TINY_HEAD),
        "loss": {"num_points": 64},
    }


def build_case(case: str) -> nn.Module:
    """The case's Segmentor with the golden weights."""
    from rein.config import config_from_dict
    from rein.segmentor import build_segmentor

    model_cfg = config_from_dict({"model": case_config(case)}).model
    torch.manual_seed(0)
    model = build_segmentor(model_cfg)
    set_golden_weights(model)
    return model


# --------------------------------------------------------------------------------------
# Deterministic values from names
# --------------------------------------------------------------------------------------


def _uniform(key: str, shape: tuple[int, ...]) -> Tensor:
    """U(-1, 1) of ``shape`` from a PCG64 stream seeded by ``key`` (stable across versions)."""
    rng = np.random.Generator(np.random.PCG64(zlib.crc32(key.encode())))
    values = rng.random(int(np.prod(shape, dtype=np.int64))) * 2.0 - 1.0
    return torch.from_numpy(values.astype(np.float32)).reshape(shape)


def _normal(key: str, shape: tuple[int, ...]) -> Tensor:
    rng = np.random.Generator(np.random.PCG64(zlib.crc32(key.encode())))
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))


def _golden_value(name: str, shape: tuple[int, ...], norm_weight: bool) -> Tensor:
    u = _uniform(name, shape)
    if len(shape) == 0:  # Rein's scale
        return 0.5 + 0.2 * u
    if norm_weight:  # LayerNorm / GroupNorm / BatchNorm weight
        return 1.0 + 0.25 * u
    leaf = name.rsplit(".", 1)[-1]
    if len(shape) == 1:
        if "gamma" in leaf:  # LayerScale (official init 1e-5 would make the blocks no-ops)
            return 0.3 + 0.2 * u
        return 0.1 * u  # biases
    if len(shape) == 4:  # conv kernels: unit gain over the receptive field
        fan_in = int(np.prod(shape[1:]))
    else:  # linear weights, tokens, embeddings, prompts: unit gain over the last dim
        fan_in = shape[-1]
    return u * (3.0 / fan_in) ** 0.5


@torch.no_grad()
def set_golden_weights(model: nn.Module) -> None:
    """Overwrite every parameter and BatchNorm statistic with name-seeded values."""
    norm_weights = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.LayerNorm | nn.GroupNorm | nn.modules.batchnorm._BatchNorm):
            norm_weights.add(f"{mod_name}.weight")
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None:
            mod.running_mean.copy_(0.1 * _uniform(f"{mod_name}.running_mean", (mod.num_features,)))
            mod.running_var.copy_(
                1.0 + 0.5 * _uniform(f"{mod_name}.running_var", (mod.num_features,)).abs()
            )
    for name, p in model.named_parameters():
        p.copy_(_golden_value(name, tuple(p.shape), name in norm_weights))


def golden_inputs() -> dict[str, Tensor]:
    """Images for whole, non-square and slide inference, and labels for the losses."""
    labels = (_uniform("labels", (2, 8, 8)) * 0.5 + 0.5) * TINY_HEAD["num_classes"]
    labels = labels.long().clamp_max(TINY_HEAD["num_classes"] - 1)
    labels[0, :2, :3] = 255  # an ignored region
    labels[1][labels[1] == 0] = 1  # image 1 has no class 0: different mask counts per image
    labels = labels.repeat_interleave(8, 1).repeat_interleave(8, 2)  # (2, 64, 64) blocks
    return {
        "whole": _normal("image.whole", WHOLE_SHAPE),
        "nonsquare": _normal("image.nonsquare", NONSQUARE_SHAPE),
        "slide": _normal("image.slide", SLIDE_SHAPE),
        "labels": labels,
    }


# --------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------


def _sub(scores: Tensor) -> Tensor:
    return scores[..., ::SUBSAMPLE, ::SUBSAMPLE].contiguous()


def grad_fingerprint(name: str, grad: Tensor) -> Tensor:
    """(4,): the gradient's norm and its projections on three name-seeded directions."""
    g = grad.detach().flatten().double()
    dirs = _normal(f"direction.{name}", (3, g.numel())).double()
    return torch.cat([g.norm().view(1), dirs @ g]).float()


def compute_outputs(model: nn.Module, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every recorded output of ``model`` (a Segmentor with golden weights)."""
    out: dict[str, Tensor] = {}
    model.eval()
    with torch.no_grad():
        feats, queries = model.backbone(inputs["whole"])
        for i, f in enumerate(feats):
            out[f"feats.{i}"] = f
        if queries is not None:
            out["queries"] = queries
        cls_preds, mask_preds = model.decode_head(feats, queries)
        for i, (c, m) in enumerate(zip(cls_preds, mask_preds)):
            out[f"cls.{i}"] = c
            out[f"mask.{i}"] = m
        out["seg.whole"] = _sub(model.inference(inputs["whole"], mode="whole"))
        out["seg.nonsquare"] = _sub(model.inference(inputs["nonsquare"], mode="whole"))
        out["seg.slide"] = _sub(
            model.inference(
                inputs["slide"], mode="slide", crop_size=SLIDE_CROP, stride=SLIDE_STRIDE
            )
        )
    model.train()
    model.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(LOSS_SEED)
    losses = model.loss(inputs["whole"], inputs["labels"], generator=generator)
    losses["loss"].backward()
    for key, value in losses.items():
        out[f"loss.{key}"] = value.detach()
    for name, p in model.named_parameters():
        if p.requires_grad:  # unused weights (full fine-tuning: the final norm) get zeros
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            out[f"grad.{name}"] = grad_fingerprint(name, grad)
    model.zero_grad(set_to_none=True)
    model.eval()
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def golden_path(case: str) -> Path:
    return GOLDEN_DIR / f"{case}.safetensors"


def load_golden(case: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = golden_path(case)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return load_file(str(path)), meta


def compare(ours: dict[str, Tensor], golden: dict[str, Tensor]) -> dict[str, float]:
    """Per key: max |ours - golden| / (1e-5-scaled tolerance); <= 1 passes (inf: key or shape)."""
    # Gradients that are zero in exact arithmetic (a conv bias before a one-channel-per-group
    # GroupNorm) are fp32 noise: a floor of 1e-2 rtol of the largest gradient norm covers them.
    grad_floor = 1e-2 * max(
        (v[0].item() for k, v in golden.items() if k.startswith("grad.")), default=0.0
    )
    report: dict[str, float] = {}
    for key in sorted(set(ours) | set(golden)):
        if key not in ours or key not in golden or ours[key].shape != golden[key].shape:
            report[key] = float("inf")
            continue
        ref, got = golden[key].double(), ours[key].double()
        # rtol per element plus rtol of the tensor's largest value (a gradient fingerprint:
        # of the gradient's norm, its first entry)
        tol = RTOL * (ref.abs() + max(ref.abs().max().item(), grad_floor * key.startswith("grad.")))
        report[key] = ((got - ref).abs() / tol.clamp_min(1e-30)).max().item()
    return report


def outputs_in(case: str, dtype: torch.dtype) -> dict[str, Tensor]:
    """:func:`compute_outputs` of the case with the model and the images in ``dtype``."""
    model = build_case(case).to(dtype)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in golden_inputs().items()}
    return compute_outputs(model, inputs)


def split(outputs: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(forward outputs and losses, gradient fingerprints)."""
    grads = {k: v for k, v in outputs.items() if k.startswith("grad.")}
    return {k: v for k, v in outputs.items() if k not in grads}, grads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="overwrite the golden files")
    parser.add_argument("cases", nargs="*", default=list(CASES))
    args = parser.parse_args(argv)
    from safetensors.torch import save_file

    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    worst_all = 0.0
    for case in args.cases:
        # The record is computed in float64; the test compares the float32 forward (and losses)
        # with it, and the gradients of a float64 run (fp32 backward noise reaches ~1e-5).
        ref = outputs_in(case, torch.float64)
        fp32 = max(compare(split(outputs_in(case, torch.float32))[0], split(ref)[0]).values())
        if args.write:
            meta = {
                "config": json.dumps(case_config(case), sort_keys=True),
                "torch": torch.__version__,
                "fp32_forward_deviation": f"{fp32:.3g}",
            }
            save_file(ref, str(golden_path(case)), metadata=meta)
            print(f"{case:24s} written ({len(ref)} tensors; fp32 forward: {fp32:.3g} x tol)")
        elif golden_path(case).is_file():
            report = compare(ref, load_golden(case)[0])
            key = max(report, key=report.get)
            worst_all = max(worst_all, report[key], fp32)
            print(
                f"{case:24s} fp64 worst {report[key]:.3g} x tol at {key}; fp32 forward {fp32:.3g}"
            )
        else:
            print(f"{case:24s} no golden file; run with --write")
        if fp32 > 0.5:
            print(
                f"  warning: {case}: the fp32 forward deviates by {fp32:.3g} x tol", file=sys.stderr
            )
    return 0 if worst_all <= 1.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
