"""``rein train | eval | predict | export | demo``: the engine sub-commands of the CLI."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register"]


def cmd_train(args: argparse.Namespace) -> int:
    from rein.cli import resolve_config
    from rein.engine.trainer import train

    cfg = resolve_config(args.config, args.set)
    if args.work_dir:
        cfg.output_dir = args.work_dir
    result = train(cfg, resume=not args.no_resume, progress=not args.no_progress)
    from rein.engine.distributed import is_main

    if not is_main():
        return 0
    print(f"finished at iteration {result['iteration']}; checkpoints in {result['out_dir']}")
    if result["last_eval"]:
        _print_eval(result["last_eval"])
    return 0


def _load_model(cfg, checkpoint: str):
    from rein.engine.checkpoint import load_checkpoint, load_into
    from rein.segmentor import build_segmentor

    model = build_segmentor(cfg.model, with_criterion=False)
    path = Path(checkpoint)
    if path.suffix == ".pth":  # an official (mmseg) checkpoint
        from rein.interop import load_official

        load_official(model, path)
    else:
        from rein.engine.checkpoint import CheckpointError
        from rein.methods import check_checkpoint_method

        state, meta, _ = load_checkpoint(path, "latest", load_train_state=False)
        check_checkpoint_method(meta, cfg.model, str(path))
        try:
            load_into(model, state)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
    return model.eval()


def _print_eval(results: dict) -> None:
    from rein.data.labels import CLASS_NAMES
    from rein.engine.metrics import format_table

    domains = {k: v for k, v in results.items() if isinstance(v, dict)}
    names = (
        list(CLASS_NAMES)
        if domains and len(next(iter(domains.values()))["IoU"]) == len(CLASS_NAMES)
        else None
    )
    print(format_table(domains, names))
    if "DG avg" in results:
        print(f"DG average mIoU over {len(domains)} target domain(s): {results['DG avg']:.2f}")


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from rein.cli import resolve_config
    from rein.data.labels import CLASS_NAMES
    from rein.engine.checkpoint import write_json_atomic
    from rein.engine.evaluate import evaluate_domains
    from rein.engine.trainer import build_val_sets

    cfg = resolve_config(args.config, args.set)
    if not cfg.data.val:
        raise ValueError("data.val is empty: list the target datasets to evaluate in the config")
    device = torch.device(args.device)
    model = _load_model(cfg, args.checkpoint).to(device)
    if args.corruptions or args.corruption or args.severities:
        return _eval_corruptions(args, cfg, model, device)
    results = evaluate_domains(
        model,
        build_val_sets(cfg),
        cfg.model.head.num_classes,
        cfg.eval,
        class_names=list(CLASS_NAMES) if cfg.model.head.num_classes == len(CLASS_NAMES) else None,
        device=device,
        progress=not args.no_progress,
    )
    _print_eval(results)
    if args.out:
        write_json_atomic(results, args.out)
        print(f"wrote {args.out}")
    return 0


def _eval_corruptions(args: argparse.Namespace, cfg, model, device) -> int:
    """``rein eval --corruptions``: Cityscapes-C style table (corruption x severity)."""
    from rein.engine.checkpoint import write_json_atomic
    from rein.engine.corruptions import (
        CORRUPTIONS,
        SEVERITIES,
        evaluate_corruptions,
        format_corruption_table,
    )
    from rein.engine.trainer import build_val_sets

    corruptions = args.corruption or list(CORRUPTIONS)
    severities = args.severities or list(SEVERITIES)
    results = evaluate_corruptions(
        model,
        build_val_sets(cfg),
        cfg.model.head.num_classes,
        cfg.eval,
        corruptions=corruptions,
        severities=severities,
        seed=args.corruption_seed,
        device=device,
        progress=not args.no_progress,
        num_workers=cfg.data.num_workers,
    )
    print(format_corruption_table(results))
    print(
        f"mean mIoU over {len(results['corruptions'])} corruption(s) x "
        f"{len(results['severities'])} severity(ies): {results['mean']:.2f}"
    )
    if args.out:
        write_json_atomic(results, args.out)
        print(f"wrote {args.out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from rein.cli import resolve_config
    from rein.data.io import read_image
    from rein.data.labels import colorize, overlay
    from rein.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from rein.engine.evaluate import predict_labels

    cfg = resolve_config(args.config, args.set)
    device = torch.device(args.device)
    model = _load_model(cfg, args.checkpoint).to(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for path in args.images:
        image = read_image(path)
        x = (torch.from_numpy(image).permute(2, 0, 1).float() - mean) / std
        h, w = image.shape[:2]
        if args.scale:
            from rein.data.transforms import rescale_size

            nh, nw = rescale_size((h, w), tuple(args.scale))
            x = torch.nn.functional.interpolate(
                x[None], size=(nh, nw), mode="bilinear", align_corners=False
            )[0]
        pred = (
            predict_labels(
                model,
                x[None].to(device),
                (h, w),
                mode=cfg.eval.mode,
                crop_size=cfg.eval.crop_size,
                stride=cfg.eval.stride,
                flip=cfg.eval.flip,
                scales=cfg.eval.scales,
            )[0]
            .cpu()
            .numpy()
            .astype(np.uint8)
        )
        stem = Path(path).stem
        Image.fromarray(pred).save(out / f"{stem}_labelTrainIds.png")
        Image.fromarray(colorize(pred)).save(out / f"{stem}_color.png")
        Image.fromarray(overlay(image, pred)).save(out / f"{stem}_overlay.png")
        print(f"{path} -> {out / (stem + '_overlay.png')}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import sys

    from rein.cli import resolve_config
    from rein.export import ExportError, export_segmentor
    from rein.methods import TuningMethod, merge_model

    cfg = resolve_config(args.config, args.set)
    if not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    height = args.height or cfg.eval.crop_size
    width = args.width or cfg.eval.crop_size
    model = _load_model(cfg, args.checkpoint)
    if type(model.method).merge is not TuningMethod.merge:  # weight-space adapters: merge first
        merge_model(model)
    try:
        result = export_segmentor(
            model,
            args.out,
            fmt=args.format,
            height=height,
            width=width,
            opset=args.opset,
            exporter=args.exporter,
            check=not args.no_check,
        )
    except ExportError as exc:
        print(f"rein export: error: {exc}", file=sys.stderr)
        return 2
    check = (
        "not checked"
        if result.max_abs_diff is None
        else f"max |diff| vs PyTorch {result.max_abs_diff:.2e}"
    )
    print(
        f"wrote {result.path} ({result.format} via {result.exporter}): input image "
        f"{result.input_shape} normalised -> class scores {result.output_shape}; {check}"
    )
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from rein.cli import resolve_config
    from rein.methods import merge_model, plain_backbone_state

    cfg = resolve_config(args.config, args.set)
    if not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must name a .safetensors file, got {out}")
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; name a .safetensors file")
    model = _load_model(cfg, args.checkpoint)
    merge_model(model)
    state = plain_backbone_state(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"merged_from": cfg.model.tuning})
    print(
        f"wrote {out}: the {cfg.model.backbone.name} backbone with {cfg.model.tuning} merged in "
        f"({len(state)} tensors); use it as model.backbone.weights of a 'frozen' config"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rein.demo import run_demo

    run_demo(
        out_dir=args.out,
        backbone=args.backbone,
        compare=args.compare,
        quick=args.quick,
        progress=not args.no_progress,
    )
    return 0


def register(sub, add_set) -> None:
    """Add the engine sub-commands to the ``rein`` parser."""
    p = sub.add_parser("train", help="train a config (resumes from <output_dir>/<name>/latest)")
    p.add_argument("config", help="config YAML or a name in configs/")
    p.add_argument("--work-dir", help="override output_dir")
    p.add_argument(
        "--no-resume", action="store_true", help="start from scratch even if latest exists"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_set(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on the config's target datasets")
    p.add_argument("config")
    p.add_argument("checkpoint", help="our checkpoint (dir or .safetensors) or an official .pth")
    p.add_argument("--out", help="write the results as JSON")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("robustness (Cityscapes-C style)")
    g.add_argument(
        "--corruptions",
        action="store_true",
        help="evaluate under the 15 image corruptions x 5 severities (mIoU table)",
    )
    g.add_argument(
        "--corruption",
        nargs="+",
        action="extend",
        choices=_corruption_names(),
        metavar="NAME",
        help="only these corruptions (implies --corruptions): " + ", ".join(_corruption_names()),
    )
    g.add_argument(
        "--severities",
        nargs="+",
        type=int,
        choices=range(1, 6),
        metavar="S",
        help="only these severities, 1..5 (implies --corruptions)",
    )
    g.add_argument(
        "--corruption-seed", type=int, default=0, help="seed of the per-image corruption noise"
    )
    add_set(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="segment images: label PNGs, colour masks and overlays")
    p.add_argument("config")
    p.add_argument("checkpoint")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--scale",
        type=int,
        nargs=2,
        metavar=("W", "H"),
        help="keep-ratio resize before inference, e.g. 1024 512 for Cityscapes",
    )
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    add_set(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "export", help="export a checkpoint as ONNX or TorchScript (image -> class scores)"
    )
    p.add_argument("config")
    p.add_argument("checkpoint", help="our checkpoint (dir or .safetensors) or an official .pth")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    p.add_argument("--out", required=True, help="output file, e.g. rein.onnx or rein.pt")
    p.add_argument("--height", type=int, help="input height (default: eval.crop_size)")
    p.add_argument("--width", type=int, help="input width (default: eval.crop_size)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 16)")
    p.add_argument(
        "--exporter",
        choices=["auto", "dynamo", "torchscript"],
        default="auto",
        help="ONNX exporter: torch.export-based (needs onnxscript) or legacy TorchScript-based",
    )
    p.add_argument(
        "--no-check", action="store_true", help="skip the check against PyTorch on a random input"
    )
    add_set(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "merge",
        help="fold a weight-space adapter (lora, soma, recyclelora) into a plain backbone file",
    )
    p.add_argument("config")
    p.add_argument("checkpoint", help="our checkpoint (dir or .safetensors) or an official .pth")
    p.add_argument("--out", required=True, help="output .safetensors (timm layout)")
    add_set(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("demo", help="the built-in domain-generalization demo (CPU, no downloads)")
    p.add_argument("--out", default="demo_out", help="output directory (tables, overlays)")
    p.add_argument("--backbone", help="use real weights: a timm name (with hub access) or a file")
    p.add_argument(
        "--compare",
        action="store_true",
        help="also train full fine-tuning, LoRA, SoMA and RecycleLoRA",
    )
    p.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)


def _corruption_names() -> list[str]:
    from rein.engine.corruptions import CORRUPTIONS

    return list(CORRUPTIONS)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
