"""The training loop, top to bottom, in plain PyTorch.

``train(cfg)`` builds the model, the data stream, AdamW and the poly schedule, then iterates.
Every ``checkpoint_interval`` iterations it writes ``latest`` (and ``best`` after a better
validation), atomically. A run restarted with the same output directory resumes from
``latest`` and ends bit-identical to an uninterrupted run, because everything random is a
function of (seed, iteration): the order of samples, their augmentation, and the loss's point
sampling. Multi-GPU / multi-node runs are launched with ``torchrun`` and use DDP.

Crash safety: a checkpoint save is atomic (``rein.engine.checkpoint``), so a run killed at any
moment resumes from the newest complete checkpoint; at start the trainer finishes or discards
what a killed save left. Before anything is written to an existing run, the config is compared
with the one the checkpoint was trained with: changes to the model, the training data, the
optimizer, the schedule (``train.max_iters`` included), the seed, precision, EMA or
``grad_accum`` are refused (:class:`ResumeConfigError`, naming the keys); the intervals, the
evaluation settings and validation sets, ``data.num_workers``, ``train.deterministic``,
``train.compile`` (both change only the rounding), ``name`` and ``output_dir`` may change.
``metrics.jsonl`` rows (and TensorBoard events) logged after the resumed checkpoint are dropped.
Ctrl-C raises :class:`TrainingInterrupted` (a ``KeyboardInterrupt``) whose message names the
iteration and the last checkpoint.
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from rein.config import Config, config_from_dict, config_to_dict, save_config
from rein.engine.checkpoint import (
    CheckpointError,
    _json_bytes,
    atomic_write_bytes,
    capture_rng_state,
    checkpoint_iteration,
    clean_checkpoint_dir,
    list_checkpoints,
    load_checkpoint,
    load_into,
    restore_rng_state,
    save_checkpoint,
    write_json_atomic,
)
from rein.engine.distributed import barrier, init_distributed, is_main
from rein.engine.ema import WeightEMA
from rein.engine.evaluate import evaluate_domains
from rein.engine.optim import build_optimizer, build_schedules

__all__ = [
    "train",
    "StreamSampler",
    "SeededStream",
    "build_train_set",
    "build_val_sets",
    "run_dir",
    "ResumeConfigError",
    "TrainingInterrupted",
]


# -- data stream -------------------------------------------------------------------------------
class StreamSampler(Sampler):
    """Infinite sample stream: position ``p`` -> (p, dataset index), sharded over ranks.

    Epoch ``e`` is a permutation drawn from ``(seed, e)``; global position ``g`` belongs to rank
    ``g % world``. Starting at ``start`` (a global position) resumes the stream exactly.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        if size < 1:
            raise ValueError("the training set is empty")
        self.size, self.seed, self.rank, self.world, self.start = size, seed, rank, world, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = self.start + self.rank
        perm_epoch, perm = -1, None
        while True:
            epoch, offset = divmod(g, self.size)
            if epoch != perm_epoch:
                gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                perm, perm_epoch = torch.randperm(self.size, generator=gen).tolist(), epoch
            yield g, perm[offset]  # type: ignore[index]
            g += self.world

    def __len__(self) -> int:  # pragma: no cover - infinite
        return 2**62


class SeededStream(Dataset):
    """Wraps datasets so sample ``(position, index)`` is augmented with rng ``(seed, position)``."""

    def __init__(self, datasets: list[Dataset], pipeline: Callable, seed: int) -> None:
        self.datasets = datasets
        self.pipeline = pipeline
        self.seed = seed
        self.offsets = np.cumsum([0] + [len(d) for d in datasets])  # type: ignore[arg-type]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        position, index = key
        k = int(np.searchsorted(self.offsets, index, side="right") - 1)
        rng = np.random.default_rng([self.seed, position])
        return self.datasets[k].sample(index - int(self.offsets[k]), self.pipeline, rng)


def _collate(batch: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([s["image"] for s in batch]), torch.stack([s["label"] for s in batch])


def build_train_set(cfg: Config, subset_seeds: Sequence[int | None] | None = None) -> list[Dataset]:
    """The ``data.train`` datasets, each wrapped in a ``RandomSubsetDataset`` when it has a
    ``subset``. Its seed is ``subset_seeds[i]`` when given (not None), else the config's, else
    one drawn from OS entropy (the wrapper's ``seed`` attribute tells which).
    """
    from rein.data import RandomSubsetDataset, build_dataset

    if not cfg.data.train:
        raise ValueError("data.train is empty: list at least one training dataset in the config")
    out: list[Dataset] = []
    for i, d in enumerate(cfg.data.train):
        ds = build_dataset(
            d.name, root=d.root, split=d.split, skip_bad=cfg.data.skip_bad, **d.options
        )
        if d.subset is not None:
            seed = subset_seeds[i] if subset_seeds is not None else None
            seed = d.subset.seed if seed is None else seed
            ds = RandomSubsetDataset(ds, d.subset.num_samples, seed)
        out.append(ds)
    return out


def _subset_seeds(
    cfg: Config, resumed_from: Path | None, recorded: list[dict[str, Any]] | None, world: int
) -> tuple[list[int | None], list[str]]:
    """The subset seed of every ``data.train`` entry (None: no subset) and how it was chosen.

    The config's seed, else the one recorded in the checkpoint being resumed, else a fresh
    draw from OS entropy. Rank 0's seeds go to every rank: all ranks train on one subset (the
    official code draws one per process; we deliberately do not).
    """
    from rein.data import draw_subset_seed

    by_index = {int(r["index"]): r for r in recorded or []}
    seeds: list[int | None] = []
    how: list[str] = []
    for i, d in enumerate(cfg.data.train):
        key = f"data.train[{i}].subset"
        if d.subset is None:
            seeds.append(None)
            how.append("")
            continue
        rec = by_index.get(i)
        if resumed_from is not None and rec is None and d.subset.seed is None:
            raise ValueError(
                f"{resumed_from} records no subset seed for data.train[{i}] ({d.name}): that "
                f"run trained without {key}; set {key}.seed to resume with a subset anyway, "
                "or start a new run (another name or output_dir)"
            )
        if rec is not None:
            if rec.get("name") != d.name or int(rec["num_samples"]) != d.subset.num_samples:
                raise ValueError(
                    f"{resumed_from} was trained on a subset of {rec['num_samples']} samples of "
                    f"data.train[{i}] ({rec.get('name')}); resume with the same {key}"
                )
            if d.subset.seed is not None and d.subset.seed != int(rec["seed"]):
                raise ValueError(
                    f"{resumed_from} was trained on the subset with seed {rec['seed']} of "
                    f"data.train[{i}]; resume with {key}.seed={rec['seed']} (or null)"
                )
        if d.subset.seed is not None:
            seeds.append(d.subset.seed)
            how.append("from the config")
        elif rec is not None:
            seeds.append(int(rec["seed"]))
            how.append(f"recorded in {resumed_from}")
        else:
            seeds.append(draw_subset_seed())
            how.append("drawn from OS entropy; saved with the checkpoints, a resume reuses it")
    if world > 1 and any(s is not None for s in seeds):
        shared: list[Any] = [seeds]
        torch.distributed.broadcast_object_list(shared, src=0)
        seeds = shared[0]
    return seeds, how


def build_val_sets(cfg: Config) -> dict[str, Dataset]:
    """Target-domain datasets with their evaluation pipelines, keyed by a unique name.

    Each is resized (keep-ratio) to its ``eval_scale`` when set, else to the dataset's default
    for ``eval.crop_size`` (``rein.data.transforms.eval_scale``).
    """
    from rein.data import build_dataset, build_eval_pipeline

    out: dict[str, Dataset] = {}
    for d in cfg.data.val:
        name = d.name if d.name not in out else f"{d.name}_{len(out)}"
        if d.name == "acdc" and d.options.get("condition"):
            name = f"acdc_{d.options['condition']}"
        if d.name == "synthetic" and d.options.get("style"):
            name = str(d.options["style"])
        out[name] = build_dataset(
            d.name,
            root=d.root,
            split=d.split,
            skip_bad=cfg.data.skip_bad,
            transform=build_eval_pipeline(d.name, crop=cfg.eval.crop_size, scale=d.eval_scale),
            **d.options,
        )
    return out


def _subset_records(
    cfg: Config,
    datasets: list[Dataset],
    how: list[str],
    recorded: list[dict[str, Any]] | None,
) -> list[dict[str, Any]]:
    """Log each training subset in one line and return what the checkpoints record of it."""
    from rein.data import RandomSubsetDataset

    by_index = {int(r["index"]): r for r in recorded or []}
    records = []
    for i, ds in enumerate(datasets):
        if not isinstance(ds, RandomSubsetDataset):
            continue
        name = cfg.data.train[i].name
        records.append(
            {
                "index": i,
                "name": name,
                "num_samples": ds.num_samples,
                "seed": ds.seed,
                "total": ds.total,
                "kept": len(ds),
            }
        )
        rec = by_index.get(i)
        if rec is not None and rec.get("total") not in (None, ds.total):
            warnings.warn(
                f"data.train[{i}] ({name}) now has {ds.total} samples, the resumed run had "
                f"{rec['total']}: the recorded seed selects a different subset",
                stacklevel=3,
            )
        if is_main():
            print(f"data.train[{i}]: {ds.describe(how[i])}")
    return records


def run_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir) / cfg.name


# -- resuming honestly -------------------------------------------------------------------------
class ResumeConfigError(ValueError):
    """The config differs from the run's in keys that a resume cannot honour."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; ``str()`` is the one line to show (iteration, last checkpoint)."""

    def __init__(self, iteration: int, checkpoint: int | None, out_dir: Path) -> None:
        self.iteration, self.checkpoint, self.out_dir = iteration, checkpoint, out_dir
        if checkpoint is None:
            what = (
                f"no checkpoint was written yet in {out_dir}; run the same command to start again"
            )
        else:
            what = (
                f"the last checkpoint is iteration {checkpoint} in {out_dir}; run the same "
                "command to resume"
            )
        super().__init__(f"interrupted at iteration {iteration}; {what}")


# Keys a resume may change: how often to log / validate / save, how to evaluate, where the run
# lives, how data is loaded. Everything else (model, training data, optimizer, schedule,
# iterations, seed, precision, EMA) shaped the iterations already trained.
_RESUME_FREE = (
    "name",
    "output_dir",
    "train.log_interval",
    "train.val_interval",
    "train.checkpoint_interval",
    "train.deterministic",
    "train.compile",
    "data.num_workers",
    "data.val",
    "eval",
)
_SUBSET_SEED = re.compile(r"^data\.train\[\d+\]\.subset\.seed$")  # checked by _subset_seeds


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys (``data.train[0].options.size``) -> leaf values."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = obj
    return out


def _free(key: str) -> bool:
    return any(key == k or key.startswith((k + ".", k + "[")) for k in _RESUME_FREE)


def _saved_config(out: Path, meta: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The config the resumed checkpoint was trained with (its metadata's, else config.yaml)."""
    if isinstance(meta.get("config"), dict):
        return meta["config"], f"{out / 'latest.json'}"
    path = out / "config.yaml"
    if path.is_file():
        import yaml

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            data = None
        if isinstance(data, dict):
            return data, str(path)
    return None, ""


def _check_resume_config(cfg: Config, out: Path, meta: dict[str, Any], start: int) -> list[str]:
    """Refuse (one line naming the keys) a resume whose config changes what was trained;
    return the changes it accepts (``"key old -> new"``)."""
    saved, source = _saved_config(out, meta)
    if saved is None:
        return []
    new = json.loads(_json_bytes(config_to_dict(cfg)))
    common_only = False
    try:  # fill in the defaults of keys added since the run was saved
        old = json.loads(_json_bytes(config_to_dict(config_from_dict(saved))))
    except Exception:  # keys of another rein version: compare the shared ones
        old, common_only = json.loads(_json_bytes(saved)), True
    a, b = _flatten(old), _flatten(new)
    keys = sorted(set(a) & set(b)) if common_only else sorted(set(a) | set(b))
    unset = "(unset)"

    def show(v: Any) -> str:
        return v if v is unset else json.dumps(v)

    diffs = [
        (k, a.get(k, unset), b.get(k, unset)) for k in keys if a.get(k, unset) != b.get(k, unset)
    ]
    changed = [d for d in diffs if not _free(d[0]) and not _SUBSET_SEED.match(d[0])]
    if not changed:
        return [f"{k} {show(x)} -> {show(y)}" for k, x, y in diffs if _free(k)]

    shown = ", ".join(f"{k} {show(x)} -> {show(y)}" for k, x, y in changed[:8])
    if len(changed) > 8:
        shown += f", ... ({len(changed) - 8} more)"
    kinds = {
        "model" if k.startswith("model.") else "data" if k.startswith("data.") else "schedule"
        for k, _, _ in changed
    }
    if kinds & {"model", "data"}:
        why = "the checkpoint was trained with another model / training data"
    else:
        why = (
            f"the {start} iterations already trained used the saved optimizer, schedule and "
            "training settings, so the change would not apply to them (max_iters cannot be "
            "extended in place: the poly schedule of the trained iterations depends on it)"
        )
    raise ResumeConfigError(
        f"cannot resume {out} at iteration {start} with a changed config ({shown}; saved in "
        f"{source}): {why}; resume with the saved values, or start a new run with another "
        "name or output_dir, or pass --no-resume to start this one over"
    )


def _truncate_metrics(path: Path, start: int) -> None:
    """Drop the ``metrics.jsonl`` rows after iteration ``start`` (logged after the checkpoint
    that is resumed, by a run that was killed) and a row cut short by the kill."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("iter"), int) and row["iter"] <= start:
            keep.append(line if line.endswith("\n") else line + "\n")
    if keep != lines:
        atomic_write_bytes(path, "".join(keep).encode("utf-8"))


# -- the loop ----------------------------------------------------------------------------------
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _autocast(amp: str, device: torch.device):
    if amp == "none":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class _Logger:
    """JSONL (always) and TensorBoard (when installed) scalars, main rank only."""

    def __init__(self, out: Path, enabled: bool, start: int = 0) -> None:
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.jsonl = open(out / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        try:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run hides the events a killed run logged after its last checkpoint
            self.tb = SummaryWriter(str(out / "tb"), purge_step=start + 1 if start else None)
        except Exception:  # tensorboard is optional
            self.tb = None

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"iter": step, **values}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


def train(
    cfg: Config,
    resume: bool = True,
    progress: bool = True,
    model: nn.Module | None = None,
    train_sets: list[Dataset] | None = None,
    val_sets: dict[str, Dataset] | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train ``cfg``; return ``{"iteration", "best", "last_eval", "out_dir"}``.

    ``model``/``train_sets``/``val_sets`` replace the ones the config describes (the demo and
    tests use them). ``stop_after`` ends the run early after that many iterations of this call
    (as an interruption would), after writing ``latest``.

    Raises :class:`ResumeConfigError` (before writing anything) when resuming with a config
    that changes what was trained, and :class:`TrainingInterrupted` on Ctrl-C.
    """
    from rein.data import build_train_pipeline
    from rein.data.labels import CLASS_NAMES
    from rein.data.transforms import short_edge_scales
    from rein.segmentor import build_segmentor

    rank, world, _, device = init_distributed()
    out = run_dir(cfg)
    if is_main() and out.is_dir():
        clean_checkpoint_dir(out)  # finish / discard what a killed save left
    barrier()
    tcfg, seed = cfg.train, cfg.train.seed

    # 1. what to resume: checked against the config before anything is written to the run
    start, best, live = 0, -math.inf, None
    resumed_from, recorded_subsets, ckpt = None, None, None
    if resume and list_checkpoints(out):
        ckpt = load_checkpoint(out, "latest")
        state, meta, train_state = ckpt
        if train_state is None:
            raise CheckpointError(
                f"cannot resume {out}: its newest checkpoint ('{meta.get('tag')}') has no "
                "train state; pass --no-resume to start over"
            )
        start = int(meta["iteration"])
        accepted = _check_resume_config(cfg, out, meta, start)
        if accepted and is_main():
            print(f"resuming {out} with a changed {', '.join(accepted)}")
        best = -math.inf if meta.get("best") is None else float(meta["best"])
        live = train_state.get("live_weights")
        resumed_from, recorded_subsets = out / "latest", train_state.get("data_subsets")
    subset_seeds: tuple[list[int | None], list[str]] | None = None
    if train_sets is None:
        subset_seeds = _subset_seeds(cfg, resumed_from, recorded_subsets, world)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        _truncate_metrics(out / "metrics.jsonl", start)
    if tcfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    # 2. model (same init on every rank), optimizer, schedule; the resumed state
    _seed_everything(seed)
    if model is None:
        model = build_segmentor(cfg.model)
    model.to(device)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler, wd_schedule = build_schedules(optimizer, cfg.optim, tcfg.max_iters)
    scaler = torch.amp.GradScaler(device.type, enabled=tcfg.amp == "fp16")
    if ckpt is not None:
        state, meta, train_state = ckpt
        load_into(model, state)
        optimizer.load_state_dict(train_state["optimizer"])
        scheduler.load_state_dict(train_state["scheduler"])
        scaler.load_state_dict(train_state["scaler"])
        restore_rng_state(train_state["rng"])
        del ckpt, state, train_state
    ema = WeightEMA(model, tcfg.ema_momentum, tcfg.ema_begin_iter) if tcfg.ema_momentum else None
    if start and live is not None:
        # the checkpoint's weights are the average; the live weights train on
        if ema is None:
            raise ValueError(
                f"{out / 'latest'} was saved with an EMA of the weights (train.ema_momentum); "
                "resume with the same train.ema_momentum"
            )
        load_into(model, live)
    if start and is_main():
        print(f"resumed from {out / 'latest.safetensors'} at iteration {start}")

    ddp_model: nn.Module = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    forward: Callable[..., Any] = ddp_model
    if tcfg.compile:  # train.compile: the training forward only; eval and saving use `model`
        from rein.engine.compile import compile_forward

        forward = compile_forward(ddp_model)

    # 3. data: an infinite stream whose position is a function of the iteration
    subsets: list[dict[str, Any]] = []
    if train_sets is not None:
        datasets = train_sets
    else:
        assert subset_seeds is not None
        seeds, how = subset_seeds
        datasets = build_train_set(cfg, seeds)
        subsets = _subset_records(cfg, datasets, how, recorded_subsets)
    crop = cfg.data.crop_size
    pad_position = cfg.data.pad_position
    # The spec's short-edge scales (256..1024 for 512 crops) scale with the crop size.
    if cfg.data.augment:
        pipeline = build_train_pipeline(
            crop=crop, scales=short_edge_scales(crop), max_long=4 * crop, pad_position=pad_position
        )
    else:
        pipeline = build_train_pipeline(
            crop=crop,
            scales=[crop],
            cat_max_ratio=1.0,
            flip_p=0.0,
            photometric=False,
            pad_position=pad_position,
        )
    stream = SeededStream(datasets, pipeline, seed)
    per_rank_batch = cfg.data.batch_size
    samples_per_iter = per_rank_batch * world * tcfg.grad_accum
    sampler = StreamSampler(len(stream), seed, rank, world, start=start * samples_per_iter)
    loader = DataLoader(
        stream,
        batch_size=per_rank_batch,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.data.num_workers > 0,
        # the loader's base seed comes from its own generator, not the global torch RNG, so a
        # resumed run's global stream (dropout, drop-path) continues where it stopped
        generator=torch.Generator().manual_seed(seed),
    )
    batches = iter(loader)
    if val_sets is None:
        val_sets = build_val_sets(cfg) if cfg.data.val else {}

    # 4. iterate
    save = functools.partial(
        _save, cfg, model, optimizer, scheduler, scaler, out, ema, subsets=subsets
    )
    logger = _Logger(out, is_main(), start)
    params = [p for p in model.parameters() if p.requires_grad]
    end = tcfg.max_iters if stop_after is None else min(tcfg.max_iters, start + stop_after)
    bar = None
    if progress and is_main():
        from rein.progress import progress_bar

        bar = progress_bar(tcfg.max_iters, desc=f"train {cfg.name}", initial=start)
    model.train()
    last_eval: dict[str, Any] = {}
    loss_gen = torch.Generator(device=device)
    t0, it = time.perf_counter(), start
    try:
        for it in range(start, end):
            logs: dict[str, float] = {}
            if wd_schedule is not None:
                wd_schedule.set_iteration(it)
            for micro in range(tcfg.grad_accum):
                images, labels = next(batches)
                images, labels = (
                    images.to(device, non_blocking=True),
                    labels.to(device, non_blocking=True),
                )
                loss_gen.manual_seed(
                    seed * 1_000_003 + (it * tcfg.grad_accum + micro) * world + rank
                )
                sync = micro == tcfg.grad_accum - 1 or world == 1
                ctx = nullcontext() if sync else ddp_model.no_sync()  # type: ignore[operator]
                with ctx, _autocast(tcfg.amp, device):
                    cls_preds, mask_preds = forward(images)
                    losses = model.criterion(cls_preds, mask_preds, labels, generator=loss_gen)  # type: ignore[union-attr, operator]
                scaler.scale(losses["loss"] / tcfg.grad_accum).backward()
                for k in ("loss", "loss_cls", "loss_mask", "loss_dice"):
                    logs[k] = logs.get(k, 0.0) + float(losses[k].detach()) / tcfg.grad_accum
            if cfg.optim.grad_clip:
                scaler.unscale_(optimizer)
                logs["grad_norm"] = float(
                    torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
                )
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(it)
            logs["lr"] = optimizer.param_groups[0]["lr"]
            scheduler.step()
            done = it + 1
            if not math.isfinite(logs["loss"]):
                raise FloatingPointError(
                    f"loss is {logs['loss']} at iteration {done}; lower optim.lr, enable "
                    f"optim.grad_clip, or use train.amp=bf16 instead of fp16"
                )
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{logs['loss']:.3f}", lr=f"{logs['lr']:.2e}")
            if done % tcfg.log_interval == 0 or done == end:
                logs["sec_per_iter"] = (time.perf_counter() - t0) / max(done - start, 1)
                logger.log(done, logs)

            evaluated = False
            if (
                val_sets
                and tcfg.val_interval
                and (done % tcfg.val_interval == 0 or done == tcfg.max_iters)
            ):
                with ema.swapped() if ema is not None else nullcontext():
                    last_eval = evaluate_domains(
                        model,
                        val_sets,
                        cfg.model.head.num_classes,
                        cfg.eval,
                        class_names=list(CLASS_NAMES)
                        if cfg.model.head.num_classes == len(CLASS_NAMES)
                        else None,
                        device=device,
                        progress=progress,
                        distributed=world > 1,
                    )
                evaluated = True
                logger.log(
                    done,
                    {
                        f"val/{k}": (v["mIoU"] if isinstance(v, dict) else v)
                        for k, v in last_eval.items()
                    },
                )
            is_ckpt = done % tcfg.checkpoint_interval == 0 or done == end
            improved = evaluated and last_eval.get("DG avg", -math.inf) > best
            if improved:
                best = float(last_eval["DG avg"])
            if is_ckpt or evaluated:
                save(done, best, last_eval, evaluated)
            if improved:
                save(done, best, last_eval, True, tag="best")
    except KeyboardInterrupt:
        # Ctrl-C: a save in progress either completed or left the previous checkpoint intact
        raise TrainingInterrupted(it + 1, checkpoint_iteration(out), out) from None
    finally:
        if bar is not None:
            bar.close()
        logger.close()
    if last_eval and is_main():
        write_json_atomic(last_eval, out / "eval_last.json")
    barrier()
    return {
        "iteration": it + 1 if end > start else start,
        "best": best,
        "last_eval": last_eval,
        "out_dir": out,
    }


def _save(
    cfg,
    model,
    optimizer,
    scheduler,
    scaler,
    out,
    ema,
    done,
    best,
    last_eval,
    evaluated,
    tag="latest",
    subsets=None,
):
    if not is_main():
        return
    weights = model.trainable_state_dict()
    train_state: dict[str, Any] = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": capture_rng_state(),
        "iteration": done,
    }
    if subsets:  # the RandomSubsetDataset seeds, so that a resumed run keeps its subsets
        train_state["data_subsets"] = subsets
    if ema is not None:  # the checkpoint holds the average; the live weights go with the state
        train_state["live_weights"] = {k: v.detach().clone() for k, v in weights.items()}
        with ema.swapped():
            weights = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    meta = {"config": config_to_dict(cfg), "iteration": done, "best": best}
    if subsets:
        meta["data_subsets"] = subsets
    if evaluated:
        meta["eval"] = {k: (v["mIoU"] if isinstance(v, dict) else v) for k, v in last_eval.items()}
    save_checkpoint(out, tag, weights, meta, train_state if tag == "latest" else None)
