"""The ``rein`` command line: train | eval | predict | export | merge | demo | params | convert."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rein.config import resolve_config  # re-exported: rein.cli.resolve_config

__all__ = ["main", "resolve_config"]


# -- params ------------------------------------------------------------------------------------
def cmd_params(args: argparse.Namespace) -> int:
    import torch

    from rein.segmentor import build_segmentor

    cfg = resolve_config(args.config, args.set)
    with torch.device("meta"):
        model = build_segmentor(cfg.model, load_weights=False, with_criterion=False)
    groups = model.parameter_groups()
    print(f"{args.config}: tuning={cfg.model.tuning}, backbone={cfg.model.backbone.name}")
    print(f"{'group':<10}{'total':>16}{'trainable':>16}{'frozen':>16}")
    tot = [0, 0]
    for name, (total, trainable) in groups.items():
        if total == 0:
            continue
        print(f"{name:<10}{total:>16,}{trainable:>16,}{total - trainable:>16,}")
        tot[0] += total
        tot[1] += trainable
    print(f"{'total':<10}{tot[0]:>16,}{tot[1]:>16,}{tot[0] - tot[1]:>16,}")
    print(f"trainable share: {100.0 * tot[1] / max(tot[0], 1):.2f}%")
    return 0


# -- convert-backbone --------------------------------------------------------------------------
def cmd_convert_backbone(args: argparse.Namespace) -> int:
    from rein.backbones.weights import (
        convert_vit_state_dict,
        normalize_vit_keys,
        read_state_dict,
        write_state_dict,
    )

    state = normalize_vit_keys(read_state_dict(args.src))
    grid = args.img_size // args.patch_size
    out = convert_vit_state_dict(state, args.patch_size, grid, num_prefix_pos=args.prefix_pos)
    if "reg_token" in out and not args.timm_names:
        out["register_tokens"] = out.pop("reg_token")
    write_state_dict(out, args.dst)
    pe = out.get("patch_embed.proj.weight")
    pos = out.get("pos_embed")
    print(
        f"wrote {args.dst}: {len(out)} tensors; patch kernel "
        f"{tuple(pe.shape) if pe is not None else '-'}, pos_embed "
        f"{tuple(pos.shape) if pos is not None else '-'}"
    )
    return 0


# -- convert (official <-> ours) ---------------------------------------------------------------
def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from rein.config import config_to_dict
    from rein.engine.checkpoint import (
        load_checkpoint,
        load_into,
        save_checkpoint,
        trainable_state_dict,
    )
    from rein.interop import export_official, load_official
    from rein.methods import METHODS, check_checkpoint_method
    from rein.segmentor import build_segmentor

    cfg = resolve_config(args.config, args.set)
    whole = METHODS[cfg.model.tuning].official_saves_whole_model
    if args.to_official:
        # SoMA / RecycleLoRA files hold the whole model: the frozen weights must be the real ones
        with torch.device("cpu"):
            model = build_segmentor(cfg.model, load_weights=whole, with_criterion=False)
        state, meta, _ = load_checkpoint(args.src, load_train_state=False)
        check_checkpoint_method(meta, cfg.model, str(args.src))
        load_into(model, state)
        n = export_official(model, args.dst, meta={"source": str(args.src), "rein": "export"})
        print(f"wrote official-layout checkpoint {args.dst} ({n} keys)")
        return 0
    options = dict(cfg.model.tuning_options or {})
    if cfg.model.tuning == "soma" and options.get("init", "pretrained") != "official_random":
        # official SoMA files (Runner checkpoints and releases) run on base = the full W
        options["init"] = "official_random"
        cfg.model.tuning_options = options
        print(
            "note: official SoMA checkpoints run on base = the full pretrained W; the converted "
            "checkpoint records model.tuning_options.init: official_random (evaluate it with "
            "--set model.tuning_options.init=official_random)"
        )
    with torch.device("cpu"):
        model = build_segmentor(cfg.model, load_weights=False, with_criterion=False)
    if args.trust_pickle:
        from rein.commands import _warn_trust_pickle

        _warn_trust_pickle()
    keys = load_official(model, args.src, trust_pickle=args.trust_pickle)
    trainable = trainable_state_dict(model)
    if args.keep_frozen:
        loaded = set(keys)
        state = {k: v for k, v in model.state_dict().items() if k in loaded or k in trainable}
    else:
        state = dict(trainable)
    out = Path(args.dst)
    save_checkpoint(
        out,
        "converted",
        state,
        meta={"config": config_to_dict(cfg), "iteration": 0, "source": str(args.src)},
    )
    frozen = len(set(keys) - set(trainable))
    print(f"loaded {len(keys)} keys from {args.src}; wrote {out / 'converted.safetensors'}")
    if frozen and not args.keep_frozen:
        rebuilt = "residuals (pivoted QR) and " if cfg.model.tuning == "recyclelora" else ""
        print(
            f"note: the file's {frozen} frozen tensors were not stored: the model rebuilds its "
            f"{rebuilt}frozen weights from model.backbone.weights; pass --keep-frozen to store "
            "them as the file has them"
        )
    return 0


class _PrecisionOverride(argparse.Action):
    """``--precision X``: the same as ``--set model.precision=X``."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        overrides = list(getattr(namespace, "set", None) or [])
        namespace.set = [*overrides, f"model.precision={values}"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rein",
        description="Rein: domain-generalized semantic segmentation on frozen foundation models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add_set(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config value, e.g. --set train.max_iters=100 (repeatable)",
        )
        p.add_argument(
            "--precision",
            choices=("fp32", "bf16"),
            action=_PrecisionOverride,
            help="model.precision: bf16 stores the frozen backbone weights in bfloat16 and runs "
            "under bf16 autocast (trainable weights stay float32)",
        )

    p = sub.add_parser("params", help="count total / trainable / frozen parameters per group")
    p.add_argument("config", help="config YAML, a name in configs/, or a timm backbone name")
    add_set(p)
    p.set_defaults(func=cmd_params)

    p = sub.add_parser(
        "convert-backbone",
        help="convert a ViT checkpoint (e.g. original DINOv2) to another patch size / grid",
    )
    p.add_argument(
        "src", help="original weights (.pth/.safetensors), e.g. dinov2_vitl14_pretrain.pth"
    )
    p.add_argument("dst", help="output file (.safetensors or .pth)")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--img-size", type=int, default=512)
    p.add_argument("--prefix-pos", type=int, default=1, help="prefix tokens stored in pos_embed")
    p.add_argument("--timm-names", action="store_true", help="write reg_token (timm) names")
    p.set_defaults(func=cmd_convert_backbone)

    p = sub.add_parser("convert", help="import an official Rein checkpoint, or export ours")
    p.add_argument("config", help="config describing the model of the checkpoint")
    p.add_argument("src", help="official .pth (import) or our checkpoint dir/file (--to-official)")
    p.add_argument("dst", help="output directory (import) or .pth file (--to-official)")
    p.add_argument("--to-official", action="store_true", help="export ours to the official layout")
    p.add_argument(
        "--keep-frozen",
        action="store_true",
        help="import: also store the file's frozen tensors (e.g. a RecycleLoRA run's residuals)",
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow full unpickling of a trusted official file (never by default)",
    )
    add_set(p)
    p.set_defaults(func=cmd_convert)

    from rein import commands  # train / eval / predict / demo

    commands.register(sub, add_set)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rein`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    import os

    from rein.engine.checkpoint import CheckpointError

    # Configuration, data, weights and checkpoint errors (all ValueError subclasses, or
    # CheckpointError) are the user's to fix: one clear line, no traceback (REIN_DEBUG=1
    # shows it).
    known: tuple[type[BaseException], ...] = (
        ValueError,
        FileNotFoundError,
        CheckpointError,
        NotImplementedError,
    )
    if os.environ.get("REIN_DEBUG"):
        known = ()
    try:
        return int(args.func(args) or 0)
    except known as exc:
        print(f"rein {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
