"""Pretrained weights for the frozen backbone, for every family (ViT, EVA, SAM, ConvNet).

Sources, in the order :func:`load_backbone_weights` tries them:

* ``"timm"`` (or ``"timm:NAME"``): timm's pretrained weights for the configured model name (a
  pretrained tag such as ``vit_large_patch16_224.mae`` selects them), from the local Hugging Face
  cache or the network, at the model's native patch size and resolution, then converted to ours.
* a local ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` file in timm's layout or, for DINOv2,
  in the **original torch-hub layout** (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``,
  ``blocks.{i}.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}.*``,
  ``norm.*``, ``mask_token``; registers as ``register_tokens``; the giant's SwiGLU as
  ``mlp.w12`` / ``mlp.w3``). Wrappers such as ``{"state_dict": ...}``, ``{"model": ...}`` or
  ``{"teacher": ...}`` and the prefixes ``module.``/``backbone.`` are removed, and classifier
  keys the headless model lacks (``fc.*``, ``head.*``) are dropped.
* for DINOv3 (a timm ``Eva``), the **original Meta layout** (``storage_tokens``,
  ``rope_embed.periods``, ``blocks.{i}.attn.qkv.{bias,bias_mask}``, ``ls1.gamma``, H+'s SwiGLU
  as ``mlp.w1/w2/w3``, ``mask_token``): :func:`dinov3_to_timm` converts it with timm's own
  ``checkpoint_filter_fn``.

Conversions to the model's shapes, by family:

* ViT / EVA: the official Rein code converts (offline) patch 14 to patch 16 and the positional
  grid to 32x32: the patch kernel is resized 14x14 -> 16x16 and the patch positional embedding
  37x37 -> 32x32, both bicubic with ``align_corners=False``. :func:`convert_vit_state_dict` does
  exactly that and ``rein convert-backbone`` writes the result to disk.
* SAM: the 2-D positional embedding (1, H, W, C) is resampled as timm's SAM does at run time
  (bicubic, antialiased) and the relative-position tables of the global-attention blocks are
  resized linearly as SAM's ``get_rel_pos`` does (:func:`convert_sam_state_dict`), so a 1024-px
  SAM file gives the same outputs at 512 px as the original model run at 512 px.
* ConvNeXt / ResNet: none.

Then keys and shapes must match exactly; nothing is loaded partially.
``torch.load`` always runs with ``weights_only=True``: no pickled code is executed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "WeightsError",
    "read_state_dict",
    "write_state_dict",
    "normalize_vit_keys",
    "convert_vit_state_dict",
    "convert_sam_state_dict",
    "dinov3_to_timm",
    "load_backbone_weights",
]

_WRAPPERS = ("state_dict", "model", "teacher", "module")
_PREFIXES = ("module.", "backbone.", "encoder.")


class WeightsError(ValueError):
    """Weights that cannot be read or do not fit the model."""


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a flat ``{name: tensor}`` dict from a safetensors or torch file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated or pickled code
        raise WeightsError(
            f"cannot read weights from {path}: {exc}. Is the file complete and a "
            f"safetensors/torch checkpoint (torch files are loaded with weights_only=True)?"
        ) from exc
    while isinstance(obj, Mapping) and not _is_flat(obj):
        key = next((k for k in _WRAPPERS if k in obj), None)
        if key is None:
            raise WeightsError(
                f"{path} holds a dict without tensors at the top; expected keys like "
                f"'blocks.0.attn.qkv.weight' or a wrapper among {list(_WRAPPERS)}; "
                f"found {sorted(obj)[:8]}"
            )
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def _is_flat(d: Mapping) -> bool:
    return any(isinstance(v, Tensor) for v in d.values())


def write_state_dict(state: Mapping[str, Tensor], path: str | Path) -> None:
    """Write tensors atomically to ``.safetensors`` (or ``.pth`` by suffix)."""
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        tensors = {k: v.detach().contiguous().cpu().clone() for k, v in state.items()}
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, tmp)
        else:
            torch.save(tensors, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def normalize_vit_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Strip wrapper prefixes and map DINOv2 names to timm's (``register_tokens``)."""
    out = dict(state)
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if out and all(k.startswith(prefix) for k in out):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                changed = True
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
    # DINOv2-g's SwiGLU ("mlp.w12" packed gate+value, "mlp.w3" out) -> timm's "mlp.fc1"/"mlp.fc2"
    out = {_swiglu_name(k): v for k, v in out.items()}
    # DINOv2's chunked blocks ("blocks.0.3.attn...") -> flat ("blocks.3.attn...")
    if any(k.startswith("blocks.") and k.split(".")[2].isdigit() for k in out if k.count(".") > 2):
        out = {_unchunk(k): v for k, v in out.items()}
    return out


def _swiglu_name(key: str) -> str:
    parts = key.split(".")
    if len(parts) == 5 and parts[0] == "blocks" and parts[2] == "mlp" and parts[3] in ("w12", "w3"):
        parts[3] = "fc1" if parts[3] == "w12" else "fc2"
        return ".".join(parts)
    return key


def _unchunk(key: str) -> str:
    parts = key.split(".")
    if parts[0] == "blocks" and len(parts) > 3 and parts[1].isdigit() and parts[2].isdigit():
        return ".".join(["blocks", parts[2], *parts[3:]])
    return key


def convert_vit_state_dict(
    state: Mapping[str, Tensor],
    patch_size: int,
    grid: tuple[int, int] | int,
    num_prefix_pos: int = 1,
) -> dict[str, Tensor]:
    """Resize the patch kernel to ``patch_size`` and the patch pos-embed to ``grid``.

    Both resizes are bicubic with ``align_corners=False`` (the official offline conversion).
    ``num_prefix_pos`` is the number of prefix tokens stored in ``pos_embed`` (1 for DINOv2's
    class token, 0 for models with ``no_embed_class``).
    """
    out = dict(state)
    grid_hw = (grid, grid) if isinstance(grid, int) else tuple(grid)
    _resize_patch_kernel(out, patch_size)
    pos = out.get("pos_embed")
    if pos is not None:
        prefix, patch = pos[:, :num_prefix_pos], pos[:, num_prefix_pos:]
        old = math.isqrt(patch.shape[1])
        if old * old != patch.shape[1]:
            raise WeightsError(f"pos_embed {tuple(pos.shape)} is not a square grid + prefix")
        if (old, old) != grid_hw:
            dim = patch.shape[-1]
            patch = patch.float().reshape(1, old, old, dim).permute(0, 3, 1, 2)
            patch = F.interpolate(patch, size=grid_hw, mode="bicubic", align_corners=False)
            patch = patch.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos.dtype)
            out["pos_embed"] = torch.cat([prefix, patch], dim=1)
    return out


def _resize_patch_kernel(state: dict[str, Tensor], patch_size: int) -> None:
    """Resize ``patch_embed.proj.weight`` in place to ``patch_size`` (bicubic, as official)."""
    w = state.get("patch_embed.proj.weight")
    if w is not None and tuple(w.shape[-2:]) != (patch_size, patch_size):
        state["patch_embed.proj.weight"] = F.interpolate(
            w.float(), size=(patch_size, patch_size), mode="bicubic", align_corners=False
        ).to(w.dtype)


def convert_sam_state_dict(
    state: Mapping[str, Tensor], target: Mapping[str, Tensor], patch_size: int
) -> dict[str, Tensor]:
    """Fit a SAM encoder state to a model of another resolution (shapes of ``target``).

    The patch kernel is resized as for ViTs; the (1, H, W, C) positional embedding is resampled
    with timm's ``resample_abs_pos_embed_nhwc`` (what timm's SAM does at run time) and every
    ``rel_pos_h`` / ``rel_pos_w`` table whose length differs is resized linearly along the
    relative distances (what SAM's ``get_rel_pos`` does at run time).
    """
    from timm.layers import resample_abs_pos_embed_nhwc

    out = dict(state)
    _resize_patch_kernel(out, patch_size)
    pos, want = out.get("pos_embed"), target.get("pos_embed")
    if (
        pos is not None
        and want is not None
        and pos.dim() == 4
        and pos.shape[1:3] != want.shape[1:3]
    ):
        out["pos_embed"] = resample_abs_pos_embed_nhwc(pos, list(want.shape[1:3]))
    for key, rel in state.items():
        if not key.endswith(("rel_pos_h", "rel_pos_w")) or key not in target:
            continue
        length = target[key].shape[0]
        if rel.dim() == 2 and rel.shape[0] != length:
            resized = F.interpolate(
                rel.float().reshape(1, rel.shape[0], -1).permute(0, 2, 1),
                size=length,
                mode="linear",
            )
            out[key] = resized.reshape(-1, length).permute(1, 0).to(rel.dtype)
    return out


def is_dinov3_original(state: Mapping[str, Tensor]) -> bool:
    """Whether ``state`` (prefixes stripped) is in the original Meta DINOv3 layout."""
    return "storage_tokens" in state


def dinov3_to_timm(state: Mapping[str, Tensor], model: nn.Module, src: str) -> dict[str, Tensor]:
    """An original Meta DINOv3 state dict in timm's ``Eva`` layout, by timm's own filter.

    timm's ``checkpoint_filter_fn`` renames ``storage_tokens`` -> ``reg_token``, ``ls{1,2}.gamma``
    -> ``gamma_{1,2}``, ``mlp.w1/w2/w3`` -> ``mlp.fc1_g/fc1_x/fc2``, splits ``attn.qkv.bias`` into
    ``q_bias`` / ``v_bias`` (DINOv3 masks the k part to 0, timm keeps it a zero buffer) and drops
    ``mask_token``, ``rope_embed.periods`` and the ``bias_mask`` buffers. For a model without a
    qkv bias (the timm names without ``_qkvb``) it drops the bias (timm: the released distilled
    models' biases are all zero); here that is allowed only when its q and v parts are zero, as
    otherwise the load would change the model: a :class:`WeightsError` names the ``_qkvb`` name.
    """
    from timm.models.eva import checkpoint_filter_fn

    out = dict(state)
    for key in [k for k in out if k.endswith(".attn.qkv.bias")]:
        try:
            model.get_parameter(key.replace("qkv.bias", "q_bias"))
            continue  # the model has q_bias / v_bias: timm's filter splits the bias
        except AttributeError:
            pass
        q, _, v = out[key].chunk(3, dim=-1)  # the k part is masked (bias_mask) in DINOv3
        if q.any() or v.any():
            raise WeightsError(
                f"{key} in {src} is not zero but the model has no qkv bias; use the timm name "
                f"with '_qkvb' (e.g. vit_large_patch16_dinov3_qkvb) for this file"
            )
        del out[key]
    return checkpoint_filter_fn(out, model)


def _timm_pretrained_state(name: str) -> dict[str, Tensor]:
    import timm

    try:
        model = timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as exc:  # no network / no cache
        raise WeightsError(
            f"could not get timm's pretrained weights for '{name}' ({exc}). Without network, "
            f"download them elsewhere and point `model.backbone.weights` at the local file"
        ) from exc
    return model.state_dict()


def load_backbone_weights(backbone: nn.Module, source: str | Path, model_name: str = "") -> None:
    """Load frozen-backbone weights into any backbone wrapper (``ReinViT``, ``ReinEva``,
    ``ReinSAM``, ``ReinConvNet``): the weights of its ``timm_model`` (+ DINOv2's ``mask_token``).

    ViT patch kernels and positional grids (and SAM's relative positions) are converted when they
    differ from the model's. Any missing, unexpected or misshapen key raises
    :class:`WeightsError` naming the key and both shapes; nothing is loaded partially.
    """
    src = str(source)
    if src == "timm" or src.startswith("timm:"):
        name = src.split(":", 1)[1] if ":" in src else model_name
        state = _timm_pretrained_state(name)
    else:
        state = read_state_dict(src)
    state = normalize_vit_keys(state)
    model = backbone.timm_model  # type: ignore[attr-defined]
    if is_dinov3_original(state) and _is_eva(model):
        state = dinov3_to_timm(state, model, src)
    prefix = next(n for n, m in backbone.named_children() if m is model)
    own = model.state_dict()
    state = _drop_classifier(state, model, own)
    pos = own.get("pos_embed")
    if pos is not None and pos.dim() == 4:  # SAM: (1, H, W, C) grid + relative positions
        state = convert_sam_state_dict(state, own, backbone.patch_size)  # type: ignore[arg-type]
    elif hasattr(model, "patch_embed"):
        state = _fit_vit_state(state, backbone, model)
    renamed = {
        ("mask_token" if k == "mask_token" else f"{prefix}.{k}"): v for k, v in state.items()
    }
    target = {f"{prefix}.{k}": v for k, v in own.items()}
    if hasattr(backbone, "mask_token"):
        target["mask_token"] = backbone.mask_token
        if "mask_token" not in renamed:
            renamed["mask_token"] = torch.zeros_like(target["mask_token"])  # timm files lack it
    else:
        renamed.pop("mask_token", None)
    check_state_dict(renamed, target, src)
    with torch.no_grad():
        params = dict(backbone.named_parameters())
        buffers = dict(backbone.named_buffers())
        for k, v in renamed.items():
            dst = params.get(k, buffers.get(k))
            dst.copy_(v.to(dst.dtype))  # type: ignore[union-attr]


def _is_eva(model: nn.Module) -> bool:
    from timm.models.eva import Eva

    return isinstance(model, Eva)


def _drop_classifier(
    state: dict[str, Tensor], model: nn.Module, own: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Drop classifier keys (timm's ``pretrained_cfg['classifier']``) the headless model lacks."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    if not names:
        return state
    return {
        k: v
        for k, v in state.items()
        if k in own or not any(k == n or k.startswith(f"{n}.") for n in names)
    }


def _fit_vit_state(
    state: dict[str, Tensor], backbone: nn.Module, vit: nn.Module
) -> dict[str, Tensor]:
    """Class-position folding (registers) + patch-kernel / positional-grid conversion."""
    if getattr(vit, "pos_embed", None) is None:  # RoPE only (DINOv3): the patch kernel only
        _resize_patch_kernel(state, backbone.patch_size)  # type: ignore[arg-type]
        return state
    n_prefix = getattr(backbone, "num_prefix_tokens", 1)
    n_prefix_pos = 0 if getattr(vit, "no_embed_class", False) else n_prefix
    pos = state.get("pos_embed")
    if (
        n_prefix_pos == 0
        and pos is not None
        and math.isqrt(pos.shape[1] - 1) ** 2 == pos.shape[1] - 1
    ):
        # Original DINOv2-with-registers files store the class position in pos_embed; timm keeps
        # it out (no_embed_class), so fold it into the class token (same sum, same output).
        state["cls_token"] = state["cls_token"] + pos[:, :1]
        state["pos_embed"] = pos[:, 1:]
    grid = _grid_of(vit, n_prefix_pos)
    return convert_vit_state_dict(state, backbone.patch_size, grid, n_prefix_pos)  # type: ignore[arg-type]


def _grid_of(vit: nn.Module, n_prefix_pos: int) -> tuple[int, int]:
    n = vit.pos_embed.shape[1] - n_prefix_pos
    g = math.isqrt(n)
    return (g, g)


def check_state_dict(state: Mapping[str, Tensor], target: Mapping[str, Tensor], src: str) -> None:
    """Raise :class:`WeightsError` unless keys and shapes match exactly."""
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
        for k in target
        if k in state and tuple(state[k].shape) != tuple(target[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"shape mismatch ({len(shapes)}), first: {shapes[0]}")
        if missing:
            parts.append(f"missing ({len(missing)}): {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"unexpected ({len(unexpected)}): {', '.join(unexpected[:5])}")
        raise WeightsError(
            f"weights in {src} do not fit the backbone: {'; '.join(parts)}; hint: check "
            "`model.backbone.name` (family, size S/B/L/g, registers) matches the file"
        )
