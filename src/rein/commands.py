"""``rein train | eval | predict | export | demo``: the engine sub-commands of the CLI."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

__all__ = ["register"]


def cmd_train(args: argparse.Namespace) -> int:
    from rein.config import resolve_config
    from rein.engine.trainer import train

    cfg = resolve_config(args.config, args.set)
    if args.work_dir:
        cfg.output_dir = str(_check_out_dir(args.work_dir, "--work-dir"))
    from rein.engine.distributed import is_main

    try:
        result = train(cfg, resume=not args.no_resume, progress=not args.no_progress)
    except KeyboardInterrupt as exc:  # Ctrl-C: one line, no traceback, exit code 130
        import sys

        from rein.engine.checkpoint import checkpoint_iteration
        from rein.engine.trainer import TrainingInterrupted, run_dir

        if is_main():
            if isinstance(exc, TrainingInterrupted):
                msg = str(exc)
            else:  # before the first iteration (building the model, loading data...)
                out, last = run_dir(cfg), checkpoint_iteration(run_dir(cfg))
                msg = (
                    f"interrupted before training started; the last checkpoint is iteration "
                    f"{last} in {out}; run the same command to resume"
                    if last is not None
                    else "interrupted before training started; run the same command to start"
                )
            print(f"rein train: {msg}", file=sys.stderr)
        return 130

    if not is_main():
        return 0
    print(f"finished at iteration {result['iteration']}; checkpoints in {result['out_dir']}")
    if result["last_eval"]:
        _print_eval(result["last_eval"])
    return 0


def _load_model(cfg, checkpoint: str, trust_pickle: bool = False):
    from rein.engine.checkpoint import CheckpointError, load_checkpoint, load_into
    from rein.segmentor import build_segmentor

    if trust_pickle:
        _warn_trust_pickle()
    path = Path(checkpoint)
    if path.suffix == ".pth":  # an official (mmseg) checkpoint
        from rein.interop import load_official

        model = build_segmentor(cfg.model, with_criterion=False)
        load_official(model, path, trust_pickle=trust_pickle)
        return model.eval()
    from rein.methods import check_checkpoint_method

    # read and check the checkpoint before building (SoMA / RecycleLoRA builds decompose weights)
    state, meta, _ = load_checkpoint(path, "latest", load_train_state=False)
    check_checkpoint_method(meta, cfg.model, str(path))
    _check_random_backbone(meta, cfg.model, str(path))
    model = build_segmentor(cfg.model, with_criterion=False)
    try:
        load_into(model, state)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return model.eval()


def _warn_trust_pickle() -> None:
    """The loud one-line warning of ``--trust-pickle`` (stderr)."""
    import sys

    print(
        "WARNING: --trust-pickle: an official .pth checkpoint is fully unpickled, which can run "
        "arbitrary code from the file; use it only for files from a source you trust",
        file=sys.stderr,
    )


def _device(name: str):
    """``torch.device(name)``, or a one-line ValueError for an unknown or absent device."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(
            f"unknown device '{name}'; use cpu, cuda or cuda:N (e.g. --device cpu)"
        ) from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("CUDA is not available on this machine; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"--device {name}: this machine has {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}"
            )
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("MPS is not available on this machine; use --device cpu")
        return device
    raise ValueError(f"unsupported device '{name}'; use cpu, cuda or cuda:N (e.g. --device cpu)")


def _check_out_dir(path: str | Path, flag: str = "--out") -> Path:
    """A directory argument (``--out``, ``--work-dir``): refuse an existing file (or one on the
    way to it) in one line. Nothing is created."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                where = "" if p == path else f" (in {path})"
                raise ValueError(
                    f"{flag} {p} is an existing file{where}; name a directory for the outputs"
                )
            break
    return path


def _check_out_file(path: str | Path, flag: str = "--out") -> Path:
    """A file argument (e.g. ``rein eval --out results.json``): refuse a directory, or a path
    below an existing file, in one line."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; name a file")
    for p in path.parents:
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"{flag} {path}: {p} is an existing file, not a folder")
            break
    return path


def _check_random_backbone(meta, model_cfg, src: str) -> None:
    """A checkpoint trained on a random backbone (``weights: null``) only fits the frozen weights
    drawn from the same ``model.backbone.init_seed``: refuse another seed in one line."""
    from rein.engine.checkpoint import CheckpointError

    saved = ((meta.get("config") or {}).get("model") or {}).get("backbone") or {}
    if model_cfg.backbone.weights is not None or saved.get("weights", None) is not None:
        return
    theirs = saved.get("init_seed", 0)
    if "init_seed" in saved and theirs != model_cfg.backbone.init_seed:
        raise CheckpointError(
            f"{src} was trained on a random backbone drawn from model.backbone.init_seed "
            f"{theirs}, but the config draws it from {model_cfg.backbone.init_seed}; add --set "
            f"model.backbone.init_seed={theirs}"
        )


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
    from rein.config import resolve_config
    from rein.data.labels import CLASS_NAMES
    from rein.engine.checkpoint import write_json_atomic
    from rein.engine.evaluate import evaluate_domains
    from rein.engine.trainer import build_val_sets

    cfg = resolve_config(args.config, args.set)
    if not cfg.data.val:
        raise ValueError("data.val is empty: list the target datasets to evaluate in the config")
    device = _device(args.device)
    if args.out:
        _check_out_file(args.out)
    model = _load_model(cfg, args.checkpoint, trust_pickle=args.trust_pickle).to(device)
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


def _min_input_side(model, eval_cfg, device) -> int:
    """The smallest image side the model runs on, at every test-time scale of ``eval_cfg``.

    Found once by running the model on square inputs of side 1, p + 1, 2p + 1, ... (p: the
    patch size; sides between two of these pad to the same patch grid). A ViT backbone needs
    a 2 x 2 patch grid at least (its stride-32 map halves the grid), and a head whose
    GroupNorm has one channel per group a 4 x 4 grid. Raises ValueError if none works.
    """
    import torch

    patch = int(getattr(model.backbone, "patch_size", 16))
    error: Exception | None = None
    for side in (1, *(k * patch + 1 for k in range(1, 6))):
        try:
            with torch.no_grad():
                model.seg_scores(torch.zeros(1, 3, side, side, device=device))
        except (RuntimeError, ValueError) as exc:
            error = exc
            continue
        smallest = min(float(s) for s in eval_cfg.scales) if eval_cfg.scales else 1.0
        return max(1, math.ceil(side / smallest))
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise ValueError(f"the model fails on every test input up to {side}x{side} px: {first}")


def cmd_predict(args: argparse.Namespace) -> int:
    import sys

    import numpy as np
    from PIL import Image

    from rein.config import resolve_config
    from rein.data.errors import DataError
    from rein.data.inputs import eval_input, find_images, output_names
    from rein.data.io import read_image
    from rein.data.labels import colorize, overlay
    from rein.data.transforms import eval_scale
    from rein.engine.evaluate import predict_labels

    cfg = resolve_config(args.config, args.set)
    device = _device(args.device)
    out = _check_out_dir(args.out)
    files, problems = find_images(args.images, exclude=out)
    for problem in problems:
        if args.strict:
            raise FileNotFoundError(problem)
        print(f"warning: skipping: {problem}", file=sys.stderr)
    if not files:
        raise FileNotFoundError(f"no image files to predict among: {' '.join(args.images)}")
    scale = tuple(args.scale) if args.scale else None
    if args.dataset:
        scale = eval_scale(args.dataset, cfg.eval.crop_size)
    model = _load_model(cfg, args.checkpoint, trust_pickle=args.trust_pickle).to(device)
    min_side = _min_input_side(model, cfg.eval, device)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create --out directory {out}: {exc.strerror or exc}") from None
    done = skipped = 0
    for path, name in zip(files, output_names(files)):
        try:
            image = read_image(path)
        except DataError as exc:
            if args.strict:
                raise
            print(f"warning: skipping: {exc}", file=sys.stderr)  # the message names the file
            skipped += 1
            continue
        h, w = image.shape[:2]
        x, upscaled = eval_input(image, scale, cfg.eval.crop_size, min_side)
        if upscaled:
            print(
                f"note: {path} ({w}x{h}) is smaller than the model's smallest input "
                f"({min_side} px a side); ran it upscaled to {x.shape[-1]}x{x.shape[-2]} "
                f"(the outputs stay {w}x{h})",
                file=sys.stderr,
            )
        pred = (
            predict_labels(
                model,
                x[None].to(device),
                (h, w),
                mode=cfg.eval.mode,
                crop_size=cfg.eval.crop_size,
                stride=cfg.eval.stride,
                flip=cfg.eval.flip,
                scales=tuple(cfg.eval.scales),
            )[0]
            .cpu()
            .numpy()
            .astype(np.uint8)
        )
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pred).save(f"{target}_labelTrainIds.png")
        Image.fromarray(colorize(pred)).save(f"{target}_color.png")
        Image.fromarray(overlay(image, pred)).save(f"{target}_overlay.png")
        print(f"{path} -> {target}_overlay.png")
        done += 1
    if not done:
        raise ValueError(f"none of the {skipped} image file(s) could be read (see the warnings)")
    if skipped:
        print(f"predicted {done} image(s) into {out}; skipped {skipped} unreadable file(s)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import sys

    from rein.config import resolve_config
    from rein.export import ExportError, export_segmentor
    from rein.methods import TuningMethod, merge_model

    cfg = resolve_config(args.config, args.set)
    if not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    _check_out_file(args.out)
    if cfg.model.precision == "bf16" and args.format == "onnx":
        raise ValueError(
            "ONNX export of a bf16 model (model.precision: bf16) is not supported (torch.export "
            "cannot capture the autocast region): export with --precision fp32, or use "
            "--format torchscript"
        )
    height = args.height or cfg.eval.crop_size
    width = args.width or cfg.eval.crop_size
    model = _load_model(cfg, args.checkpoint, trust_pickle=args.trust_pickle)
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

    from rein.config import resolve_config
    from rein.methods import merge_model, plain_backbone_state

    cfg = resolve_config(args.config, args.set)
    if not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must name a .safetensors file, got {out}")
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; name a .safetensors file")
    model = _load_model(cfg, args.checkpoint, trust_pickle=args.trust_pickle)
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
        precision=args.precision,
        seeds=args.seeds,
        jobs=args.jobs,
        methods=args.methods,
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
    _add_device(p)
    p.add_argument("--no-progress", action="store_true")
    _add_trust_pickle(p)
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

    p = sub.add_parser(
        "predict",
        help="segment images: label PNGs, colour masks and overlays",
        description=(
            "Segment images with the evaluation preprocessing of `rein eval`. Directories are "
            "searched recursively for " + ", ".join(_image_suffixes()) + " files (any case); "
            "outputs mirror the inputs' paths relative to the folder they share "
            "(a/x.png -> OUT/a/x_overlay.png). Unreadable files are skipped with a warning "
            "(--strict: stop). 16-bit greyscale images are scaled to 8 bits by >> 8."
        ),
    )
    p.add_argument("config")
    p.add_argument("checkpoint")
    p.add_argument("images", nargs="+", help="image files and / or directories (recursive)")
    p.add_argument("--out", required=True, help="output directory")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--scale",
        type=int,
        nargs=2,
        metavar=("W", "H"),
        help="keep-ratio resize before inference, e.g. 1024 512 for Cityscapes",
    )
    g.add_argument(
        "--dataset",
        choices=_eval_scale_names(),
        metavar="NAME",
        help="resize as `rein eval` does for this dataset (e.g. cityscapes: 1024 512 at "
        "eval.crop_size 512): " + ", ".join(_eval_scale_names()),
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first unreadable or missing input instead of skipping it",
    )
    _add_device(p)
    _add_trust_pickle(p)
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
    _add_trust_pickle(p)
    add_set(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "merge",
        help="fold a weight-space adapter (lora, soma, recyclelora) into a plain backbone file",
    )
    p.add_argument("config")
    p.add_argument("checkpoint", help="our checkpoint (dir or .safetensors) or an official .pth")
    p.add_argument("--out", required=True, help="output .safetensors (timm layout)")
    _add_trust_pickle(p)
    add_set(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("demo", help="the built-in domain-generalization demo (CPU, no downloads)")
    p.add_argument("--out", default="demo_out", help="output directory (tables, overlays)")
    p.add_argument("--backbone", help="use real weights: a timm name (with hub access) or a file")
    p.add_argument(
        "--compare",
        action="store_true",
        help="also train full fine-tuning, LoRA, SoMA, RecycleLoRA and FADA",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        metavar="METHOD",
        help="exactly these tuning methods (e.g. frozen rein set); overrides --compare",
    )
    p.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="training seeds of every method (default 0 1 2; --quick: 0 1)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        help="training runs at once, one thread each (default: one per CPU core; 0: in-process)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="bf16: frozen backbone weights in bfloat16, bf16 autocast (model.precision)",
    )
    p.set_defaults(func=cmd_demo)


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default="cuda" if _cuda() else "cpu",
        help="cpu, cuda or cuda:N (default: cuda when available)",
    )


def _add_trust_pickle(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow full unpickling of a trusted official .pth checkpoint (never by default)",
    )


def _image_suffixes() -> list[str]:
    from rein.data.inputs import IMAGE_SUFFIXES

    return list(IMAGE_SUFFIXES)


def _eval_scale_names() -> list[str]:
    from rein.data.transforms import EVAL_SCALES

    return [k for k, v in EVAL_SCALES.items() if v is not None]


def _corruption_names() -> list[str]:
    from rein.engine.corruptions import CORRUPTIONS

    return list(CORRUPTIONS)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
