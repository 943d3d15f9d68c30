"""Typed experiment configuration: dataclasses loaded from YAML, validated strictly.

One :class:`Config` describes an experiment completely. YAML files may inherit from another
file with a top-level ``base: other.yaml`` (relative to the file; chains allowed), and
command-line overrides use dotted keys: ``train.max_iters=100``, ``model.rein.lora_dim=null``,
``data.train=[{name: gtav, root: /x}]``.

Unknown keys, wrong types and invalid choices raise :class:`ConfigError` naming the dotted
key, the file it came from and what was expected.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import tempfile
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "AMP_MODES",
    "PRECISIONS",
    "EVAL_MODES",
    "ConfigError",
    "BackboneConfig",
    "ReinConfig",
    "HeadConfig",
    "LossConfig",
    "ModelConfig",
    "SubsetConfig",
    "DatasetConfig",
    "DataConfig",
    "OptimConfig",
    "TrainConfig",
    "EvalConfig",
    "Config",
    "default_config",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "save_config",
    "apply_overrides",
    "resolve_config",
]

AMP_MODES = ("none", "bf16", "fp16")
PRECISIONS = ("fp32", "bf16")
EVAL_MODES = ("slide", "whole")


class ConfigError(ValueError):
    """An invalid configuration: unknown key, wrong type, bad value or unreadable file."""


def _choices(*values: str) -> dict[str, tuple[str, ...]]:
    return {"choices": values}


def _tuning_methods() -> tuple[str, ...]:
    """The registered tuning methods (:mod:`rein.methods`), looked up when a config is read."""
    from rein.methods import method_names

    return method_names()


def _pad_positions() -> tuple[str, ...]:
    """Where the training pipeline may pad (:data:`rein.data.transforms.PAD_POSITIONS`)."""
    from rein.data.transforms import PAD_POSITIONS

    return PAD_POSITIONS


# --------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------


@dataclass
class BackboneConfig:
    """Frozen vision foundation model (any timm model name)."""

    name: str = "vit_large_patch14_dinov2"
    weights: str | None = None  # None: random init; a .pth/.safetensors path; "timm": hub weights
    # Seed of the random init when weights is null (drawn from its own generator, the global
    # RNG is untouched), so every build (train, eval, predict) has the same frozen weights.
    init_seed: int = 0
    patch_size: int | None = 16
    img_size: int = 512
    out_indices: list[int] | None = None
    mask_token: bool = True
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    # Activation checkpointing of the transformer blocks in training: their activations are
    # recomputed in the backward pass instead of kept (less memory, one more forward per block).
    checkpointing: bool = False


@dataclass
class ReinConfig:
    """Rein adapter hyper-parameters."""

    token_length: int = 100
    lora_dim: int | None = 16  # None: full-rank tokens (Rein-core / Rein-share)
    share_mlps: bool = True
    link_token_to_query: bool = True
    scale_init: float = 1e-3
    zero_mlp_delta_f: bool = False


@dataclass
class HeadConfig:
    """Mask2Former decode head."""

    num_classes: int = 19
    feat_channels: int = 256
    num_queries: int = 100
    num_decoder_layers: int = 9
    num_encoder_layers: int = 6
    num_heads: int = 8  # attention heads of the pixel decoder and the transformer decoder
    feedforward_channels: int = 2048  # FFN width of the transformer decoder layers
    encoder_feedforward_channels: int = 1024  # FFN width of the pixel decoder's encoder layers
    num_points: int = 4  # MSDeformAttn sampling points per head and level
    out_channels: int = 256  # mask-feature width (mask_embed output)


@dataclass
class LossConfig:
    """Mask2Former criterion weights and point sampling."""

    class_weight: float = 2.0
    no_object_weight: float = 0.1
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75


@dataclass
class ModelConfig:
    """Backbone + tuning method + head + loss."""

    tuning: str = field(default="rein", metadata={"choices": _tuning_methods})
    # Options of the tuning method, e.g. {rank: 16, targets: [qkv]} for lora,
    # {num_prompts: 10} for vpt, {bottleneck: 64} for adaptformer.
    tuning_options: dict[str, Any] = field(default_factory=dict)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    rein: ReinConfig = field(default_factory=ReinConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # "bf16": the frozen backbone's Linear / Conv weights are stored in bfloat16 (cast once, after
    # loading) and the forward runs under bf16 autocast; trainable weights, optimizer state,
    # losses and checkpoints stay float32. "fp32": everything in float32 (official parity).
    precision: str = field(default="fp32", metadata=_choices(*PRECISIONS))


@dataclass
class SubsetConfig:
    """A random subset of a training dataset (RecycleLoRA's ``RandomSubsetDataset``).

    Keeps ``sorted(numpy.random.default_rng(seed).choice(N, min(num_samples, N),
    replace=False))`` of the dataset's N samples (in its file order). ``seed: null`` draws a
    seed from OS entropy at the start of a run; the trainer logs it, broadcasts rank 0's
    draw to every rank and records it in the checkpoint, so a resumed run keeps the subset.
    """

    num_samples: int
    seed: int | None = None


@dataclass
class DatasetConfig:
    """One dataset: registry name, root folder, split and dataset-specific options."""

    name: str
    root: str | None = None
    split: str = "train"
    options: dict[str, Any] = field(default_factory=dict)
    # Validation datasets only: the keep-ratio evaluation resize (w, h), e.g. [2048, 1024]
    # (SoMA / RecycleLoRA: Cityscapes and Mapillary at full resolution). null: the dataset's
    # default for eval.crop_size (rein.data.transforms.eval_scale).
    eval_scale: tuple[int, int] | None = None
    # Training datasets only: train on a random subset (null: the whole dataset).
    subset: SubsetConfig | None = None


@dataclass
class DataConfig:
    """Training / validation datasets and loader settings."""

    train: list[DatasetConfig] = field(default_factory=list)
    val: list[DatasetConfig] = field(default_factory=list)
    crop_size: int = 512
    batch_size: int = 4
    num_workers: int = 2
    skip_bad: bool = False
    # False: no random resize / flip / photometric distortion (only crop + pad), e.g. for
    # pre-cropped data or debugging.
    augment: bool = True
    # Where the training pipeline pads a crop smaller than crop_size (bottom/right, label 255):
    # "after_normalize" (Rein, the official preprocessor: padded pixels are 0 after
    # normalisation) or "before_flip" (RecycleLoRA g2cbm / c2bm: raw pixel value 0 right
    # after the random crop, then flip, photometric distortion and normalisation).
    pad_position: str = field(default="after_normalize", metadata={"choices": _pad_positions})


@dataclass
class OptimConfig:
    """AdamW + poly schedule (official recipe by default)."""

    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    poly_power: float = 0.9
    min_lr: float = 0.0
    warmup_iters: int = 0
    warmup_ratio: float = 1e-6
    grad_clip: float | None = None
    backbone_lr_mult: float = 1.0
    # Poly horizon: "max_iters" (lr reaches min_lr after the last iteration) or "max_iters-1"
    # (mmengine's PolyLR, used by the official SoMA / RecycleLoRA configs: the last iteration
    # already runs at min_lr).
    poly_horizon: str = field(default="max_iters", metadata=_choices("max_iters", "max_iters-1"))
    # Iteration at which the poly decay starts (mmengine PolyLR(begin=...) after a LinearLR
    # warm-up: SoMA's c2bm / ACDC configs); 0: from the start, the warm-up factor on top.
    poly_begin: int = 0
    # Weight decay per iteration: "constant", or "cosine" from each group's own decay down to
    # wd_min over max_iters (SoMA / RecycleLoRA; groups whose decay is 0 *rise* to wd_min).
    wd_schedule: str = field(default="constant", metadata=_choices("constant", "cosine"))
    wd_min: float = 1e-5


@dataclass
class TrainConfig:
    """Training loop settings."""

    max_iters: int = 40000
    log_interval: int = 50
    val_interval: int = 4000
    checkpoint_interval: int = 4000
    amp: str = field(default="none", metadata=_choices(*AMP_MODES))
    grad_accum: int = 1
    seed: int = 0
    deterministic: bool = False
    # EMA of the trainable weights (null: none); evaluation and checkpoints use the average.
    ema_momentum: float | None = None
    ema_begin_iter: int = 0  # before it the average follows the live weights
    # torch.compile the training forward (eval / predict stay eager). The first iterations
    # compile (minutes on a CPU); the losses match eager within float rounding.
    compile: bool = False


@dataclass
class EvalConfig:
    """Inference mode for evaluation (sliding window by default)."""

    mode: str = field(default="slide", metadata=_choices(*EVAL_MODES))
    crop_size: int = 512
    stride: int = 341
    flip: bool = False
    scales: list[float] = field(default_factory=lambda: [1.0])


@dataclass
class Config:
    """A complete experiment."""

    name: str = "experiment"
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def default_config() -> Config:
    """The default configuration (official GTAV / DINOv2-L / 512 recipe)."""
    return Config()


# --------------------------------------------------------------------------------------
# YAML loading (YAML 1.2 floats: ``1e-4`` is a float, not the string PyYAML makes of it)
# --------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads exponent floats without a dot (``1e-4``)."""


_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:float"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


def _yaml_load(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse YAML in {source}: {e}") from e


# --------------------------------------------------------------------------------------
# Validation / conversion
# --------------------------------------------------------------------------------------

_NoneType = type(None)


def _type_name(tp: Any) -> str:
    """Human-readable name of a type annotation."""
    if tp is Any:
        return "any"
    if tp is _NoneType:
        return "null"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple, dict):
        args = ", ".join("..." if a is Ellipsis else _type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _where(source: str | None) -> str:
    return source if source else "config"


def _unknown_key_error(
    key: str, name: str, valid: Sequence[str], source: str | None
) -> ConfigError:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    msg = f"unknown key '{key}' in {_where(source)}"
    if close:
        msg += f"; did you mean '{close[0]}'?"
    else:
        msg += f"; valid keys here: {', '.join(valid)}"
    return ConfigError(msg)


class _Mismatch(Exception):
    """Internal: a value does not match a type (turned into ConfigError by the caller)."""


def _convert(value: Any, tp: Any, key: str, source: str | None) -> Any:
    """Check ``value`` against annotation ``tp`` and return the converted value.

    Raises ConfigError for errors inside nested containers (with the precise key), and
    _Mismatch when ``value`` itself has the wrong type.
    """
    if tp is Any:
        return copy.deepcopy(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _Mismatch
        return _build_dataclass(tp, value, key, source)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and _NoneType in args:
            return None
        candidates = [a for a in args if a is not _NoneType]
        for cand in candidates:
            try:
                return _convert(value, cand, key, source)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is list:
        if not isinstance(value, list | tuple):
            raise _Mismatch
        (item_tp,) = args or (Any,)
        return [_checked(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _Mismatch
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_checked(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(
                f"wrong length for '{key}' in {_where(source)}: expected {_type_name(tp)} "
                f"({len(args)} items), got {_show(value)}"
            )
        return tuple(
            _checked(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args))
        )
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch
        key_tp, val_tp = args or (Any, Any)
        out = {}
        for k, v in value.items():
            out[_checked(k, key_tp, f"{key} (key {k!r})", source)] = _checked(
                v, val_tp, _join(key, str(k)), source
            )
        return out
    if tp is bool:
        if not isinstance(value, bool):
            raise _Mismatch
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Mismatch
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Mismatch
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _Mismatch
        return value
    raise TypeError(f"unsupported annotation {tp!r} for config key '{key}'")  # schema bug


def _checked(value: Any, tp: Any, key: str, source: str | None) -> Any:
    try:
        return _convert(value, tp, key, source)
    except _Mismatch:
        raise ConfigError(
            f"wrong type for '{key}' in {_where(source)}: expected {_type_name(tp)}, "
            f"got {type(value).__name__} {_show(value)}"
        ) from None


def _build_dataclass(cls: type, data: Mapping[str, Any], prefix: str, source: str | None) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if not isinstance(name, str) or name not in fields:
            raise _unknown_key_error(_join(prefix, str(name)), str(name), list(fields), source)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing required key '{key}' in {_where(source)}")
            continue
        value = _checked(data[name], hints[name], key, source)
        choices = f.metadata.get("choices")
        if callable(choices):
            choices = choices()
        if choices is not None and value not in choices:
            raise ConfigError(
                f"invalid value for '{key}' in {_where(source)}: {_show(value)}; "
                f"expected one of: {', '.join(choices)}"
            )
        kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(d: Mapping[str, Any], source: str | None = None) -> Config:
    """Build and validate a :class:`Config` from a (partial) nested dict.

    Missing keys take their defaults; ``source`` names the origin in error messages.
    """
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        raise ConfigError(
            f"{_where(source)} must contain a mapping at the top level, got {type(d).__name__}"
        )
    cfg = _build_dataclass(Config, d, "", source)
    _check_tuning_options(cfg.model, "model", source)
    _check_datasets(cfg.data, "data", source)
    _check_train(cfg.train, cfg.data, source)
    return cfg


# (key, minimum, what a value below it would mean / what the key counts)
_POSITIVE_KEYS = (
    ("train.log_interval", 1, "log every N iterations"),
    ("train.checkpoint_interval", 1, "write the 'latest' checkpoint every N iterations"),
    ("train.grad_accum", 1, "micro-batches per optimizer step (1: no accumulation)"),
    ("data.batch_size", 1, "images per micro-batch and process"),
)


def _check_train(train: TrainConfig, data: DataConfig, source: str | None) -> None:
    """Value checks of the loop's counts and intervals (0 would divide by zero or run nothing)."""
    where = _where(source)
    sections = {"train": train, "data": data}
    for key, low, what in _POSITIVE_KEYS:
        section, name = key.split(".")
        value = getattr(sections[section], name)
        if value < low:
            raise ConfigError(
                f"invalid value for '{key}' in {where}: {value}; expected an integer >= {low} "
                f"({what})"
            )
    if train.val_interval < 0:
        raise ConfigError(
            f"invalid value for 'train.val_interval' in {where}: {train.val_interval}; expected "
            "an integer >= 0 (validate every N iterations and after the last; 0: never)"
        )
    if train.max_iters < 0:
        raise ConfigError(
            f"invalid value for 'train.max_iters' in {where}: {train.max_iters}; expected an "
            "integer >= 0 (the number of optimizer steps)"
        )
    if data.num_workers < 0:
        raise ConfigError(
            f"invalid value for 'data.num_workers' in {where}: {data.num_workers}; expected an "
            "integer >= 0 (DataLoader worker processes; 0: load in the main process)"
        )


def _check_datasets(data: DataConfig, prefix: str, source: str | None) -> None:
    """Value checks of the per-dataset options (``eval_scale``, ``subset``)."""
    from rein.data.registry import canonical_name, unknown_option_message

    where = _where(source)
    for kind in ("train", "val"):
        for i, d in enumerate(getattr(data, kind)):
            key = f"{prefix}.{kind}[{i}]"
            if canonical_name(d.name) is not None:  # an unknown name fails when it is built
                for option in d.options:
                    why = unknown_option_message(d.name, str(option))
                    if why is not None:
                        raise ConfigError(
                            f"unknown key '{key}.options.{option}' in {where} (dataset "
                            f"{d.name!r}): {why}"
                        )
            if d.eval_scale is not None:
                if kind == "train":
                    raise ConfigError(
                        f"'{key}.eval_scale' in {where} is only used for validation datasets; "
                        f"remove it or move the dataset to {prefix}.val"
                    )
                if min(d.eval_scale) <= 0:
                    raise ConfigError(
                        f"invalid value for '{key}.eval_scale' in {where}: "
                        f"{_show(list(d.eval_scale))}; expected [w, h] with two positive "
                        "integers, e.g. [2048, 1024], or null for the dataset's default"
                    )
            if d.subset is not None:
                if kind == "val":
                    raise ConfigError(
                        f"'{key}.subset' in {where} is only used for training datasets; "
                        f"remove it or move the dataset to {prefix}.train"
                    )
                if d.subset.num_samples < 1:
                    raise ConfigError(
                        f"invalid value for '{key}.subset.num_samples' in {where}: "
                        f"{d.subset.num_samples}; expected a positive integer (the number of "
                        "samples to keep)"
                    )
                if d.subset.seed is not None and d.subset.seed < 0:
                    raise ConfigError(
                        f"invalid value for '{key}.subset.seed' in {where}: {d.subset.seed}; "
                        "expected a non-negative integer, or null to draw one from OS entropy"
                    )


def _check_tuning_options(model: ModelConfig, prefix: str, source: str | None) -> None:
    """Validate ``tuning_options`` against the method's typed options (a dataclass)."""
    from rein.methods import build_method

    try:
        build_method(model.tuning, model.tuning_options)
    except ValueError as exc:
        raise ConfigError(f"{_join(prefix, 'tuning_options')} in {_where(source)}: {exc}") from None


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (lists instead of tuples) that ``yaml.safe_dump`` can write."""
    return _plain(dataclasses.asdict(cfg))


# --------------------------------------------------------------------------------------
# Files, inheritance, overrides
# --------------------------------------------------------------------------------------


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``top`` over ``base``: mappings merge recursively, anything else replaces."""
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(dict(out[k]), v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_layered(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """Read ``path`` with its ``base`` chain merged underneath; validate each file's keys."""
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise ConfigError(f"circular 'base' inheritance: {cycle}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    data = _yaml_load(text, str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} must contain a mapping at the top level, got {type(data).__name__}"
        )
    data = dict(data)
    bases = data.pop("base", None)
    # Validate this file on its own so errors name the file that holds the bad key.
    config_from_dict(data, source=str(path))
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(
            f"'base' in {path} must be a file path or a list of paths, got {_show(bases)}"
        )
    merged: dict[str, Any] = {}
    for b in bases:
        bpath = Path(b).expanduser()
        if not bpath.is_absolute():
            bpath = path.parent / bpath
        merged = _deep_merge(merged, _read_layered(bpath, (*chain, resolved)))
    return _deep_merge(merged, data)


def _check_override_key(parts: list[str], where: str) -> None:
    """Check that a dotted override key exists in the schema (list indices allowed)."""
    tp: Any = Config
    for i, part in enumerate(parts):
        key = ".".join(parts[: i + 1])
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            non_none = [a for a in typing.get_args(tp) if a is not _NoneType]
            tp = non_none[0] if len(non_none) == 1 else Any
            origin = typing.get_origin(tp)
        if dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            if part not in hints:
                raise _unknown_key_error(key, part, list(hints), where)
            tp = hints[part]
        elif origin is list and _is_index(part):
            tp = typing.get_args(tp)[0]
        elif origin is dict:
            tp = typing.get_args(tp)[1]
        elif tp is Any:
            pass
        else:
            parent = ".".join(parts[:i])
            raise ConfigError(
                f"cannot set '{key}' in {where}: '{parent}' is of type {_type_name(tp)}"
            )


def _is_index(part: str) -> bool:
    return part.lstrip("-").isdigit()


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (value parsed as YAML) to a raw config dict.

    Mappings along the key are created when missing; a numeric component indexes into an
    existing list (``data.train.0.root=/x``). The result is not validated here.
    """
    out = copy.deepcopy(dict(data))
    for item in overrides:
        where = f"override {item!r}"
        key, sep, raw = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or not key or any(not p for p in parts):
            raise ConfigError(f"bad {where}: expected 'key.sub=value'")
        _check_override_key(parts, where)
        value = _yaml_load(raw, where)
        node: Any = out
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                idx = int(part)
                if not -len(node) <= idx < len(node):
                    raise ConfigError(
                        f"index out of range for '{'.'.join(parts[: i + 1])}' in {where}: "
                        f"the list has {len(node)} items"
                    )
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if not isinstance(node.get(part), dict | list):
                        node[part] = {}
                    node = node[part]
            else:
                raise ConfigError(
                    f"cannot set '{key}' in {where}: '{'.'.join(parts[:i])}' is {_show(node)}"
                )
    return out


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (with its ``base`` chain) and apply dotted-key overrides."""
    path = Path(path).expanduser()
    data = _read_layered(path, ())
    cfg = config_from_dict(data, source=str(path))
    if not overrides:
        return cfg
    # Overrides apply on top of the fully resolved config, so list indices into default
    # lists work and each override is validated with its own text as the source.
    full = config_to_dict(cfg)
    for item in overrides:
        full = apply_overrides(full, [item])
        config_from_dict(full, source=f"override {item!r}")
    return config_from_dict(full, source=str(path))


def save_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    """Write ``cfg`` as YAML atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# -- what the command line accepts as a config -------------------------------------------------
def _repo_configs() -> list[Path]:
    here = Path(__file__).resolve()
    return [Path.cwd() / "configs", here.parents[2] / "configs"]


def resolve_config(spec: str, overrides: list[str] | None = None) -> Config:
    """A :class:`Config` from a YAML path, a name in ``configs/`` (of the working directory or
    the repository), or a timm backbone name (the default config on that backbone), with
    ``--set KEY=VALUE`` overrides."""
    overrides = list(overrides or [])
    path = Path(spec)
    if path.is_file():
        return load_config(path, overrides)
    for folder in _repo_configs():
        for cand in (folder / spec, folder / f"{spec}.yaml"):
            if cand.is_file():
                return load_config(cand, overrides)
    if path.suffix in (".yaml", ".yml"):
        raise ConfigError(f"config file not found: {spec}")
    import timm

    if timm.is_model(spec):
        data = config_to_dict(default_config())
        data["model"]["backbone"]["name"] = spec
        return config_from_dict(apply_overrides(data, overrides))
    names = sorted(p.stem for f in _repo_configs() if f.is_dir() for p in f.glob("*.yaml"))
    close = difflib.get_close_matches(spec, names + timm.list_models(), n=4, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"'{spec}' is neither a config file, a name in configs/, nor a timm model{hint}"
    )
