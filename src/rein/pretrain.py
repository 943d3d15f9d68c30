"""Label-free pretraining of a small ViT on the synthetic street world (the demo's "VFM").

No pretrained foundation-model weights exist offline, so the demo makes its own small one, the
honest way: a timm ViT learns from **images only**, rendered in every style of the synthetic
world (the source style ``game`` and all target styles), without ever seeing a label map. This
mirrors how a real VFM has seen diverse data without labels; the segmentation labels of the
source style are used later, only by the supervised training of the demo.

The task is **dense cross-style contrastive learning** (patch-level InfoNCE):

* a scene is rendered in two different styles; the renders are pixel-aligned because the layout
  depends on the scene seed only (like two photographs of one street in other weather);
* both renders are resized by a common random factor, then each is cropped at its own random
  offset (a multiple of the patch size) and flipped at random, so a patch of one view sits at a
  known, usually different, grid position in the other view (absolute position alone does not
  tell which patch matches);
* the ViT's patch tokens go through a small projector; every patch of view A whose location is
  visible in view B must pick its partner among all visible patches of all B views of the batch
  (symmetric InfoNCE, temperature ``temperature``).

The features thus become invariant to appearance (style, weather, light) and discriminative of
local structure. Labels never enter: :func:`render_unlabeled_pool` keeps only the images that
:func:`rein.data.synthetic.render_scene` returns and everything downstream sees image tensors.

The result is the timm ViT's ``state_dict`` (timm keys), written as safetensors in a cache
directory keyed by a hash of :class:`PretrainSettings` (:func:`pretrained_backbone`), and loaded
by the segmentor through ``model.backbone.weights`` like any other weights file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rein.data.synthetic import STYLES, SyntheticDataset, render_scene
from rein.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "PretrainSettings",
    "UnlabeledViews",
    "build_vit",
    "cache_dir",
    "dense_infonce",
    "map_in_processes",
    "pretrain_vit",
    "pretrained_backbone",
    "render_unlabeled_pool",
]

# Bump when the pretraining code changes in a way that changes its result.
_VERSION = 1


@dataclass(frozen=True)
class PretrainSettings:
    """Everything that determines the pretrained weights (their cache key hashes all of it)."""

    arch: str = "vit_small_patch14_dinov2"  # the timm architecture (DINOv2-shaped ViT)
    embed_dim: int = 128
    # 8 blocks (6 before): chosen on the source style's held-out scenes only (frozen + Rein
    # source mIoU, seed 0) among 6 / 8 blocks, 128 / 160 channels and 1200 / 1500 / 1800 steps;
    # 8 blocks x 1500 steps scored 0.3 higher but took 9 min 20 s, too close to the demo's
    # 10-minute budget. See the README's demo section.
    depth: int = 8
    num_heads: int = 4
    patch_size: int = 8
    img_size: int = 64  # the crop the ViT sees (8x8 patches)
    init_values: float = 0.1  # LayerScale init (DINOv2's 1e-5 learns too slowly from scratch)
    render_size: int = 96  # scenes are rendered at this size, then rescaled and cropped
    num_scenes: int = 320
    styles: tuple[str, ...] = STYLES  # source and target styles, images only
    steps: int = 1200
    batch_size: int = 8  # scenes per step (two views each)
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    temperature: float = 0.2
    proj_dim: int = 128
    rescale: tuple[int, ...] = (64, 72, 80, 88, 96, 112, 128)  # common view size, pixels
    jitter: float = 0.4  # range of the per-view contrast / brightness change
    seed: int = 0

    def timm_kwargs(self) -> dict[str, Any]:
        """The constructor arguments of the timm model (besides patch and image size)."""
        return {
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "init_values": self.init_values,
        }

    def key(self) -> str:
        """A short hash of the settings and the code version: the cache key."""
        blob = json.dumps({"version": _VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------
# Unlabelled data
# --------------------------------------------------------------------------------------


def _render_images(jobs: Sequence[tuple[int, str]], size: int) -> list[np.ndarray]:
    """Render ``(scene seed, style)`` jobs and return the images only (labels are dropped)."""
    out = []
    with np.errstate(invalid="ignore", divide="ignore"):  # harmless NaN tests in the renderer
        for seed, style in jobs:
            image, _ = render_scene(seed, (size, size), style)  # the label map is never kept
            out.append(image)
    return out


def map_in_processes(
    fn: Callable[..., list[Any]], items: Sequence[Any], workers: int, *args: Any
) -> list[Any]:
    """``fn(items, *args)`` computed in ``workers`` spawned processes, results in item order.

    ``fn`` maps a list of items to a list of results and must be a module-level function.
    With ``workers`` <= 1, or when processes cannot start (e.g. a ``__main__`` read from
    stdin), it runs in this process.
    """
    if workers > 1 and len(items) > 1:
        chunks = [list(items[w::workers]) for w in range(workers)]
        try:
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as ex:
                parts = list(ex.map(fn, chunks, *([a] * workers for a in args)))
        except (BrokenProcessPool, OSError):
            parts = None
        if parts is not None:
            out: list[Any] = [None] * len(items)
            for w, part in enumerate(parts):
                out[w::workers] = part
            return out
    return fn(list(items), *args)


def render_unlabeled_pool(settings: PretrainSettings, workers: int = 0) -> np.ndarray:
    """Images ``(num_scenes, len(styles), H, W, 3)`` uint8 of the pretraining scenes.

    Scenes come from their own split (``"pretrain"``), disjoint from the demo's labelled
    training scenes and from the evaluation scenes. ``workers`` > 1 renders in that many
    processes. No label leaves this function.
    """
    seeds = SyntheticDataset(settings.num_scenes, split="pretrain", seed=settings.seed)
    jobs = [(seeds.scene_seed(i), s) for i in range(settings.num_scenes) for s in settings.styles]
    images = map_in_processes(_render_images, jobs, workers, settings.render_size)
    pool = np.stack(images)
    return pool.reshape(settings.num_scenes, len(settings.styles), *pool.shape[1:])


class UnlabeledViews:
    """Pairs of views of one scene in two styles, and their patch correspondences.

    Holds only images: ``pool`` is ``(scenes, styles, H, W, 3)`` uint8 (no labels exist here).
    """

    def __init__(self, pool: np.ndarray, settings: PretrainSettings) -> None:
        if pool.ndim != 5 or pool.shape[-1] != 3 or pool.dtype != np.uint8:
            raise ValueError(f"expected (scenes, styles, H, W, 3) uint8 images, got {pool.shape}")
        if pool.shape[1] < 2:
            raise ValueError("cross-style pairs need at least two styles")
        self.images = torch.from_numpy(pool)
        self.s = settings
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def batch(self, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(views_a, views_b, idx_a, idx_b)``: two (B, 3, c, c) normalised batches and the
        flat patch indices (into ``B * g * g``) of corresponding patches."""
        s, p, c = self.s, self.s.patch_size, self.s.img_size
        g = c // p
        n_scenes, n_styles = self.images.shape[:2]
        b = s.batch_size
        scene = torch.randint(n_scenes, (b,), generator=gen)
        style_a = torch.randint(n_styles, (b,), generator=gen)
        style_b = (style_a + torch.randint(1, n_styles, (b,), generator=gen)) % n_styles
        pair = torch.cat([self.images[scene, style_a], self.images[scene, style_b]])
        x = (pair.permute(0, 3, 1, 2).float() - self.mean) / self.std  # (2B, 3, H, W)
        size = s.rescale[int(torch.randint(len(s.rescale), (1,), generator=gen))]
        if size != x.shape[-1]:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        span = (size - c) // p + 1  # possible offsets, in patches
        off = torch.randint(span, (2, b, 2), generator=gen)  # (view, sample, (y, x))
        flip = torch.rand(2, b, generator=gen) < 0.5
        views = []
        for v in range(2):
            crops = []
            for i in range(b):
                y0, x0 = int(off[v, i, 0]) * p, int(off[v, i, 1]) * p
                crop = x[v * b + i, :, y0 : y0 + c, x0 : x0 + c]
                crops.append(crop.flip(-1) if flip[v, i] else crop)
            views.append(torch.stack(crops))
        # Photometric jitter on top of the style change (contrast and brightness per view).
        for v in range(2):
            gain = 1.0 + s.jitter * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
            bias = s.jitter * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
            views[v] = views[v] * gain + bias
        idx_a, idx_b = self.correspondences(off, flip, g)
        return views[0], views[1], idx_a, idx_b

    @staticmethod
    def correspondences(off: Tensor, flip: Tensor, g: int) -> tuple[Tensor, Tensor]:
        """Flat indices of matching patches given per-view offsets (2, B, 2) and flips (2, B)."""
        b = off.shape[1]
        rows = torch.arange(g).view(1, g, 1).expand(b, g, g)
        cols = torch.arange(g).view(1, 1, g).expand(b, g, g)
        # column of the crop before the flip, then the position in the rescaled scene
        crop_col_a = torch.where(flip[0].view(b, 1, 1), g - 1 - cols, cols)
        scene_r = rows + off[0, :, 0].view(b, 1, 1)
        scene_c = crop_col_a + off[0, :, 1].view(b, 1, 1)
        rb = scene_r - off[1, :, 0].view(b, 1, 1)
        cb_crop = scene_c - off[1, :, 1].view(b, 1, 1)
        cb = torch.where(flip[1].view(b, 1, 1), g - 1 - cb_crop, cb_crop)
        valid = (rb >= 0) & (rb < g) & (cb_crop >= 0) & (cb_crop < g)
        sample = torch.arange(b).view(b, 1, 1).expand(b, g, g)
        idx_a = sample * g * g + rows * g + cols
        idx_b = sample * g * g + rb * g + cb
        return idx_a[valid], idx_b[valid]


# --------------------------------------------------------------------------------------
# Model and loss
# --------------------------------------------------------------------------------------


def build_vit(settings: PretrainSettings) -> nn.Module:
    """The timm ViT being pretrained (the same architecture the demo's segmentor builds)."""
    from rein.backbones.base import create_timm_model

    return create_timm_model(
        settings.arch,
        patch_size=settings.patch_size,
        img_size=settings.img_size,
        **settings.timm_kwargs(),
    )


def dense_infonce(za: Tensor, zb: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE between matched rows of ``za`` and ``zb`` (N, D), L2-normalised here."""
    za, zb = F.normalize(za, dim=-1), F.normalize(zb, dim=-1)
    logits = za @ zb.t() / temperature
    target = torch.arange(za.shape[0], device=za.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def _patch_tokens(vit: nn.Module, x: Tensor) -> Tensor:
    """Final (normed) patch tokens (B, N, C) of a timm ViT."""
    tokens = vit.forward_features(x)
    return tokens[:, getattr(vit, "num_prefix_tokens", 1) :]


def pretrain_vit(
    settings: PretrainSettings,
    pool: np.ndarray | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    workers: int = 2,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Pretrain the ViT with dense cross-style InfoNCE; return (timm state_dict, stats).

    ``pool`` (images only, see :func:`render_unlabeled_pool`) is rendered when not given.
    """
    t0 = time.perf_counter()
    if pool is None:
        pool = render_unlabeled_pool(settings, workers=workers)
    t_render = time.perf_counter() - t0
    data = UnlabeledViews(pool, settings)
    torch.manual_seed(settings.seed)
    vit = build_vit(settings)
    dim = settings.embed_dim
    proj = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, settings.proj_dim))
    params = [*vit.parameters(), *proj.parameters()]
    decay = [q for q in params if q.ndim >= 2]
    no_decay = [q for q in params if q.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay}],
        lr=settings.lr,
        weight_decay=0.0,
    )

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay
        if step < settings.warmup_steps:
            return settings.lr * (step + 1) / settings.warmup_steps
        t = (step - settings.warmup_steps) / max(settings.steps - settings.warmup_steps, 1)
        return settings.lr * 0.5 * (1 + math.cos(math.pi * t))

    gen = torch.Generator().manual_seed(settings.seed)
    vit.train()
    bar = None
    if progress:
        from rein.progress import progress_bar

        bar = progress_bar(settings.steps, desc="pretrain (no labels)")
    losses: list[float] = []
    for step in range(settings.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        view_a, view_b, idx_a, idx_b = data.batch(gen)
        b = view_a.shape[0]
        tokens = _patch_tokens(vit, torch.cat([view_a, view_b]))
        z = proj(tokens.reshape(-1, tokens.shape[-1]))
        n = z.shape[0] // 2
        loss = dense_infonce(z[:n][idx_a], z[n:][idx_b], settings.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", pairs=int(idx_a.numel()), batch=b)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    tail = losses[-20:]
    stats = {
        "seconds": seconds,
        "render_seconds": t_render,
        "first_loss": losses[0] if losses else math.nan,
        "final_loss": sum(tail) / max(len(tail), 1),
        "chance_loss": math.log(max(int(idx_a.numel()), 1)) if losses else math.nan,
    }
    log(
        f"pretraining done in {seconds:.0f}s (rendering {t_render:.0f}s): InfoNCE "
        f"{stats['first_loss']:.2f} -> {stats['final_loss']:.2f}"
    )
    return {k: v.detach().clone() for k, v in vit.state_dict().items()}, stats


# --------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$REIN_CACHE/demo`` when ``REIN_CACHE`` is set, else ``~/.cache/rein/demo``."""
    root = os.environ.get("REIN_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "rein"
    return base / "demo"


def pretrained_backbone(
    settings: PretrainSettings,
    directory: str | os.PathLike[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    workers: int = 2,
) -> tuple[Path, bool, dict[str, Any]]:
    """The cached pretrained weights for ``settings``, pretraining first when missing.

    Returns ``(path of the .safetensors file, whether it came from the cache, stats)``. The
    file and a JSON sidecar (settings and stats) are written atomically.
    """
    from rein.backbones.weights import write_state_dict
    from rein.engine.checkpoint import write_json_atomic

    folder = Path(directory) if directory is not None else cache_dir()
    path = folder / f"vit_{settings.key()}.safetensors"
    meta_path = path.with_suffix(".json")
    if path.is_file():
        stats: dict[str, Any] = {}
        if meta_path.is_file():
            try:
                stats = json.loads(meta_path.read_text(encoding="utf-8")).get("stats", {})
            except (OSError, ValueError):
                stats = {}
        return path, True, stats
    state, stats = pretrain_vit(settings, progress=progress, log=log, workers=workers)
    write_state_dict(state, path)
    write_json_atomic(
        {"settings": dataclasses.asdict(settings), "stats": stats, "version": _VERSION},
        meta_path,
    )
    return path, False, stats
