"""One-GPU check of the bf16 fast path: training speed, peak memory and inference per method.

On the built-in synthetic street world (no download) with a randomly initialised DINOv2-L
(``model.backbone.weights: null``) and the official Mask2Former head at 512x512, batch 4, it
trains each method for a few warm-up and then ``--iters`` timed iterations (forward, fp32
Mask2Former loss, backward, AdamW step and the poly schedule, as the trainer does) and prints
iterations per second, the peak CUDA memory and both as ratios to full fine-tuning. Then it
times Rein's sliding-window inference (512 crops, stride 341) on 1024x512 images.

``--precision bf16`` is ``model.precision: bf16``: the frozen backbone weights are stored in
bf16 and the model runs under bf16 autocast, while the losses, the trainable weights and the
optimizer state stay fp32. ``train.amp`` stays ``none``: ``train.amp: bf16`` would also autocast
the loss, which model.precision keeps in fp32. For ``full`` every weight trains, so bf16 there
is autocast over fp32 weights.

    python benchmarks/gpu_check.py                                   # one CUDA GPU, ~minutes
    python benchmarks/gpu_check.py --methods rein soma full recyclelora fada
    python benchmarks/gpu_check.py --device cpu --tiny --precision fp32   # smoke test, seconds

``--tiny`` swaps in a 4-block, 32-channel ViT, a small head, 64 px crops, 2 iterations and
128x64 images, so the whole script runs on a CPU in seconds (tests/test_gpu_check.py).
SoMA's SVDs run on the GPU (``svd_device``); RecycleLoRA's QRs run on the CPU at build (about
a minute for DINOv2-L), which is why it is not in the default ``--methods``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

METHODS = ("rein", "soma", "full", "recyclelora", "fada")
DEFAULT_METHODS = ("rein", "soma", "full", "fada")


@dataclass
class Setting:
    """What one run measures: model shape, data and iteration counts."""

    crop: int = 512
    batch: int = 4
    iters: int = 50
    warmup: int = 5
    infer_hw: tuple[int, int] = (512, 1024)  # (h, w): 1024x512 images
    stride: int = 341
    infer_images: int = 5
    token_length: int = 100
    model: dict[str, Any] = field(default_factory=dict)  # overrides of the config's model
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-method options


FULL = Setting(options={"soma": {"svd_device": "cuda"}})
TINY = Setting(
    crop=64,
    batch=2,
    iters=2,
    warmup=1,
    infer_hw=(64, 128),
    stride=43,
    infer_images=2,
    token_length=8,
    model={
        "backbone": {
            "name": "vit_small_patch14_dinov2",
            "patch_size": 16,
            "timm_kwargs": {"embed_dim": 32, "depth": 4, "num_heads": 2},
        },
        "rein": {"lora_dim": 4},
        "head": {"feat_channels": 32, "num_decoder_layers": 3, "num_encoder_layers": 1},
        "loss": {"num_points": 256},
    },
    options={
        "soma": {"start_block": 2, "rank": 4},
        "recyclelora": {"r_max": 9, "r_main": 6},
        "fada": {"channel_grid_width": 4},
    },
)


def build_config(method: str, setting: Setting, precision: str, device: str):
    """The experiment config of ``method`` under ``setting`` (random backbone weights)."""
    from rein.config import config_from_dict, config_to_dict, default_config

    raw = config_to_dict(default_config())
    for key, value in setting.model.items():
        raw["model"][key] = _merge(raw["model"].get(key, {}), value)
    model = raw["model"]
    model["tuning"] = method
    model["tuning_options"] = dict(setting.options.get(method, {}))
    if not device.startswith("cuda"):
        model["tuning_options"].pop("svd_device", None)
    model["precision"] = precision
    model["backbone"]["weights"] = None
    model["backbone"]["img_size"] = setting.crop
    model["rein"]["token_length"] = setting.token_length
    model["head"]["num_queries"] = setting.token_length
    raw["data"]["crop_size"] = setting.crop
    raw["data"]["batch_size"] = setting.batch
    raw["train"]["max_iters"] = setting.warmup + setting.iters
    return config_from_dict(raw)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def training_batches(setting: Setting, count: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of synthetic "game" scenes, through the trainer's unaugmented
    pipeline (rendered once, so rendering is not timed)."""
    from rein.data import build_train_pipeline
    from rein.data.synthetic import SyntheticDataset
    from rein.engine.trainer import SeededStream, _collate

    crop = setting.crop
    n = setting.batch * count
    ds = SyntheticDataset(num_images=n, size=(crop, crop), split="train")
    pipeline = build_train_pipeline(
        crop=crop, scales=[crop], cat_max_ratio=1.0, flip_p=0.0, photometric=False
    )
    stream = SeededStream([ds], pipeline, seed=0)
    samples = [stream[(i, i)] for i in range(n)]
    return [_collate(samples[i : i + setting.batch]) for i in range(0, n, setting.batch)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_method(
    cfg, batches: list[tuple[torch.Tensor, torch.Tensor]], setting: Setting, device: torch.device
) -> tuple[dict[str, float], torch.nn.Module]:
    """Warm up, then time ``setting.iters`` training iterations; return the numbers and the model."""
    from rein.engine.optim import build_optimizer, build_schedules
    from rein.segmentor import build_segmentor

    torch.manual_seed(0)
    t = time.perf_counter()
    model = build_segmentor(cfg.model, load_weights=False).to(device).train()
    build_s = time.perf_counter() - t
    optimizer = build_optimizer(model, cfg.optim)
    scheduler, wd_schedule = build_schedules(optimizer, cfg.optim, cfg.train.max_iters)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator(device=device)
    data = [(x.to(device), y.to(device)) for x, y in batches]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    losses = []
    for it in range(setting.warmup + setting.iters):
        if it == setting.warmup:
            _sync(device)
            start = time.perf_counter()
        if wd_schedule is not None:
            wd_schedule.set_iteration(it)
        images, labels = data[it % len(data)]
        gen.manual_seed(it)
        loss = model.loss(images, labels, generator=gen)["loss"]
        loss.backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(float(loss.detach()))
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "it_s": setting.iters / seconds,
        "peak_mib": peak,
        "build_s": build_s,
        "trainable": sum(p.numel() for p in params),
        "last_loss": losses[-1],
    }, model


def inference_seconds(model: torch.nn.Module, setting: Setting, device: torch.device) -> float:
    """Median seconds per image of sliding-window inference on synthetic target-style images."""
    from rein.data import build_eval_pipeline
    from rein.data.synthetic import SyntheticDataset

    ds = SyntheticDataset(
        num_images=setting.infer_images + 1,
        size=setting.infer_hw,
        style="realistic",
        split="val",
        transform=build_eval_pipeline("synthetic", resize=False),
    )
    model.eval()
    times = []
    with torch.inference_mode():
        for i in range(len(ds)):
            x = ds[i]["image"].unsqueeze(0).to(device)
            _sync(device)
            t = time.perf_counter()
            model.inference(x, mode="slide", crop_size=setting.crop, stride=setting.stride)
            _sync(device)
            if i:  # the first image warms up
                times.append(time.perf_counter() - t)
    return statistics.median(times)


def print_table(rows: dict[str, dict[str, float]]) -> None:
    full = rows.get("full")
    print("| method | trainable params | build s | it/s | vs full | peak MiB | vs full |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for method, r in rows.items():
        speed = f"{r['it_s'] / full['it_s']:.2f}x" if full else "-"
        peak, mem = "n/a (CPU)", "-"
        if r["peak_mib"] is not None:
            peak = f"{r['peak_mib']:,.0f}"
            if full and full["peak_mib"]:
                mem = f"{r['peak_mib'] / full['peak_mib']:.2f}x"
        print(
            f"| {method} | {r['trainable']:,} | {r['build_s']:.1f} | {r['it_s']:.2f} | {speed} "
            f"| {peak} | {mem} |"
        )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the check; print the tables and return the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model: a CPU smoke test")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS))
    parser.add_argument("--iters", type=int, help="timed training iterations (default 50)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"gpu_check: error: --device {args.device} but torch {torch.__version__} sees no "
            "CUDA GPU; run it on a GPU machine, or --device cpu --tiny for a smoke test"
        )
    setting = TINY if args.tiny else FULL
    if args.iters is not None:
        setting = Setting(**{**setting.__dict__, "iters": args.iters})
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    shape = "tiny ViT" if args.tiny else "DINOv2-L (random weights)"
    print(
        f"# gpu_check: {shape}, {setting.crop}x{setting.crop}, batch {setting.batch}, "
        f"{args.precision}, {setting.warmup} warm-up + {setting.iters} timed iterations, "
        f"{where}, torch {torch.__version__}"
    )
    batches = training_batches(setting)
    rows: dict[str, dict[str, float]] = {}
    infer_s = None
    for method in args.methods:
        cfg = build_config(method, setting, args.precision, args.device)
        rows[method], model = train_method(cfg, batches, setting, device)
        if method == "rein":
            infer_s = inference_seconds(model, setting, device)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(rows)
    if infer_s is not None:
        h, w = setting.infer_hw
        print(
            f"\nrein inference, {w}x{h} slide ({setting.crop} crops, stride {setting.stride}), "
            f"{args.precision}: {infer_s:.3f} s per image (median of {setting.infer_images})"
        )
    return {"train": rows, "rein_infer_s": infer_s}


if __name__ == "__main__":
    main(sys.argv[1:])
