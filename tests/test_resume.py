"""Resuming a run mid-way: weights, schedule, RNG streams and ``best`` continue exactly.

One uninterrupted 6-iteration run ("a") is compared with a run stopped after iteration 2 and
resumed to 6 ("b"), so four iterations follow the restart. The validation metric is scripted
(``evaluate_domains`` is replaced by a fake returning 50, 30, 40 at iterations 2, 4, 6) so the
best checkpoint is known in advance: iteration 2, before the restart.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from test_trainer import tiny_train_config

import rein.engine.trainer as trainer
from rein.engine.checkpoint import load_checkpoint

MAX_ITERS, STOP_AT = 6, 2
LR, MIN_LR, POWER, WARMUP, WARMUP_RATIO = 1e-3, 1e-5, 0.9, 4, 0.1
SCRIPTED_DG = [50.0, 30.0, 40.0]  # "DG avg" returned at iterations 2, 4, 6


class _GlobalRngDataset:
    """Training set whose samples draw from numpy's and python's *global* RNGs.

    Such draws (from user code or libraries) only continue exactly after a resume when the
    trainer restores the checkpointed RNG state. Each draw perturbs the image (so the weights
    depend on it) and is logged with the index and the augmented image's sum.
    """

    def __init__(self, inner, log: list) -> None:
        self.inner, self.log = inner, log

    def __len__(self) -> int:
        return len(self.inner)

    def sample(self, index, pipeline, rng):
        s = self.inner.sample(index, pipeline, rng)
        n, p = float(np.random.standard_normal()), random.random()
        self.log.append((index, float(s["image"].double().sum()), n, p))
        s["image"] = s["image"] + 0.1 * n + 0.1 * p
        return s


def _cfg(out: Path):
    cfg = tiny_train_config(out, max_iters=MAX_ITERS, checkpoint_interval=2, val_interval=2)
    cfg.optim.lr, cfg.optim.min_lr, cfg.optim.poly_power = LR, MIN_LR, POWER
    cfg.optim.warmup_iters, cfg.optim.warmup_ratio = WARMUP, WARMUP_RATIO
    return cfg


def _expected_lr(it: int) -> float:
    """PolyLR written out: poly decay to MIN_LR times a linear warm-up factor (0-based it)."""
    factor = WARMUP_RATIO + (1 - WARMUP_RATIO) * it / WARMUP if it < WARMUP else 1.0
    return ((LR - MIN_LR) * (1 - it / MAX_ITERS) ** POWER + MIN_LR) * factor


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    out: dict = {}
    with pytest.MonkeyPatch.context() as mp:
        for name, stops in (("a", [None]), ("b", [STOP_AT, None])):
            scripted = iter(SCRIPTED_DG)

            def fake_eval(*args, _s=scripted, **kwargs):
                v = next(_s)
                return {"fog": {"mIoU": v}, "DG avg": v}

            mp.setattr(trainer, "evaluate_domains", fake_eval)
            log: list = []
            results = []
            for stop in stops:
                cfg = _cfg(root / name)
                data = [_GlobalRngDataset(trainer.build_train_set(cfg)[0], log)]
                results.append(trainer.train(cfg, progress=False, train_sets=data, stop_after=stop))
            out[name] = {"dir": root / name / "tiny", "results": results, "log": log}
    return out


def test_resume_several_iterations_later_is_bit_identical(runs):
    a, b = runs["a"], runs["b"]
    assert [r["iteration"] for r in b["results"]] == [STOP_AT, MAX_ITERS]
    wa, _, sa = load_checkpoint(a["dir"], "latest")
    wb, _, sb = load_checkpoint(b["dir"], "latest")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert sa["scheduler"]["last_epoch"] == sb["scheduler"]["last_epoch"] == MAX_ITERS


def _lr_log(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iter"]: r["lr"] for r in rows if "lr" in r}


def test_resume_restores_the_lr_schedule(runs):
    """The lr used at iteration k (logged as iter k + 1) follows the closed form after resume."""
    la, lb = _lr_log(runs["a"]["dir"]), _lr_log(runs["b"]["dir"])
    assert sorted(lb) == sorted(la) == list(range(1, MAX_ITERS + 1))
    for step in range(1, MAX_ITERS + 1):
        assert lb[step] == la[step], step
        assert lb[step] == pytest.approx(_expected_lr(step - 1), rel=1e-12), step
    # the schedule really changes over the iterations after the restart
    assert len({round(lb[s], 12) for s in range(STOP_AT + 1, MAX_ITERS + 1)}) == 4


def test_resume_continues_data_order_augmentation_and_global_rng(runs):
    """(index, augmented image, numpy/python global draws) of every sample match run "a"."""
    la, lb = runs["a"]["log"], runs["b"]["log"]
    per_iter = 2  # batch size
    assert len(la) == len(lb) == MAX_ITERS * per_iter
    assert lb[: STOP_AT * per_iter] == la[: STOP_AT * per_iter]
    assert lb[STOP_AT * per_iter :] == la[STOP_AT * per_iter :]
    # the global draws after the restart are not a replay of a freshly seeded stream
    assert [x[2] for x in lb[STOP_AT * per_iter :]] != [x[2] for x in lb[: -STOP_AT * per_iter]]


def test_resume_restores_best(runs):
    """Best metric 50 at iteration 2 (before the restart) stays best after 30 and 40."""
    for name in ("a", "b"):
        run = runs[name]
        assert run["results"][-1]["best"] == SCRIPTED_DG[0], name
        _, best_meta, _ = load_checkpoint(run["dir"], "best", load_train_state=False)
        assert best_meta["iteration"] == 2 and best_meta["best"] == SCRIPTED_DG[0], name
        _, latest_meta, _ = load_checkpoint(run["dir"], "latest", load_train_state=False)
        assert latest_meta["iteration"] == MAX_ITERS and latest_meta["best"] == SCRIPTED_DG[0]
    wa, _, _ = load_checkpoint(runs["a"]["dir"], "best", load_train_state=False)
    wb, _, _ = load_checkpoint(runs["b"]["dir"], "best", load_train_state=False)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _uninterrupted_and_resumed(cfg, tmp_path: Path, stop_after: int):
    """(weights, train state) of ``latest`` after run "a" straight through and run "b" stopped
    after ``stop_after`` iterations and resumed; ``cfg(out)`` builds the config."""
    trainer.train(cfg(tmp_path / "a"), progress=False)
    trainer.train(cfg(tmp_path / "b"), progress=False, stop_after=stop_after)
    trainer.train(cfg(tmp_path / "b"), progress=False)
    out = []
    for run in ("a", "b"):
        weights, _, state = load_checkpoint(tmp_path / run / "tiny", "latest")
        out.append((weights, state))
    return out


def test_resume_with_drop_path_is_bit_identical(tmp_path):
    """Full fine-tuning with drop-path draws from torch's global RNG during training.

    The trainer checkpoints and restores that RNG, so the run must resume exactly.
    """

    def cfg(out):
        c = tiny_train_config(out, max_iters=3, checkpoint_interval=1)
        c.model.tuning = "full"
        c.model.backbone.timm_kwargs["drop_path_rate"] = 0.3
        return c

    (wa, _), (wb, _) = _uninterrupted_and_resumed(cfg, tmp_path, stop_after=1)
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, (
        "resumed drop-path run differs from the uninterrupted one: the DataLoader iterator, "
        "created after restore_rng_state, draws its base seed from the global torch RNG "
        f"(e.g. {differ[:3]})"
    )


@pytest.mark.parametrize("tuning", ["soma", "recyclelora"])
def test_weight_space_adapter_run_with_ema_resumes_bit_identical(tmp_path, tuning):
    """SoMA / RecycleLoRA with their recipe (EMA from iteration 1, cosine weight decay, the
    mmengine poly horizon), killed after iteration 2 of 4: the EMA weights (the checkpoint's)
    and the live weights (the train state's) end exactly as in an uninterrupted run."""

    def cfg(out):
        c = tiny_train_config(out, max_iters=4, checkpoint_interval=1)
        c.model.tuning = tuning
        c.model.tuning_options = (
            {"start_block": 2, "rank": 4} if tuning == "soma" else {"r_max": 9, "r_main": 6}
        )
        c.model.head.num_queries = 8
        c.optim.poly_horizon, c.optim.wd_schedule = "max_iters-1", "cosine"
        c.train.ema_momentum, c.train.ema_begin_iter = 0.3, 1
        return c

    (wa, sa), (wb, sb) = _uninterrupted_and_resumed(cfg, tmp_path, stop_after=2)
    assert wa.keys() == wb.keys() and any(".lora_" in k for k in wa)
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []
    live_a, live_b = sa["live_weights"], sb["live_weights"]
    assert live_a.keys() == live_b.keys()
    assert [k for k in live_a if not torch.equal(live_a[k], live_b[k])] == []
    # the average really differs from the live weights (the EMA is on)
    assert any(not torch.equal(wa[k], live_a[k]) for k in live_a)


# -- honest resume: the config is compared before anything is written ---------------------------
def _stopped_run(root: Path, **train):
    """A 4-iteration tiny run stopped after iteration 2 (latest = 2)."""
    cfg = tiny_train_config(root, **train)
    trainer.train(cfg, progress=False, stop_after=2)
    return cfg, root / "tiny"


def _files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("model.head.num_queries", 4),  # model
        ("model.loss.dice_weight", 1.0),
        ("data.train[0].options.num_images", 8),  # training data
        ("data.batch_size", 1),
        ("train.max_iters", 8),  # schedule
        ("optim.lr", 1e-2),
        ("optim.warmup_iters", 2),
        ("train.seed", 1),
    ],
)
def test_resume_with_a_changed_config_is_refused_before_writing(tmp_path, key, value):
    from rein.config import apply_overrides, config_from_dict, config_to_dict

    cfg, run = _stopped_run(tmp_path)
    before = _files(run)
    override = f"{key.replace('[', '.').replace(']', '')}={value}"  # data.train.0.options...
    changed = config_from_dict(apply_overrides(config_to_dict(cfg), [override]))
    with pytest.raises(trainer.ResumeConfigError) as e:
        trainer.train(changed, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, ValueError)
    assert key in msg and "--no-resume" in msg and "another name or output_dir" in msg
    assert "at iteration 2" in msg
    assert _files(run) == before  # config.yaml, metrics.jsonl and checkpoints untouched
    # starting over is still possible
    result = trainer.train(changed, progress=False, resume=False, stop_after=1)
    assert result["iteration"] == 1


def test_resume_allows_interval_logging_eval_and_loader_changes(tmp_path):
    """Intervals, evaluation settings and data.num_workers may change: the run resumes and
    ends bit-identical to an uninterrupted one; config.yaml records the new values."""
    ref = tiny_train_config(tmp_path / "ref")
    trainer.train(ref, progress=False)
    cfg, run = _stopped_run(tmp_path / "b")
    cfg.train.log_interval, cfg.train.checkpoint_interval, cfg.train.val_interval = 3, 1, 0
    cfg.eval.stride = 16
    workers = tiny_train_config(tmp_path / "b")
    workers.data.num_workers = 2  # allowed too (not trained here: it spawns processes)
    trainer._check_resume_config(workers, run, _meta(run), 2)
    assert trainer.train(cfg, progress=False)["iteration"] == 4
    wa = load_checkpoint(tmp_path / "ref" / "tiny", "latest")[0]
    wb = load_checkpoint(run, "latest")[0]
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []
    assert "log_interval: 3" in (run / "config.yaml").read_text()


def _meta(run: Path) -> dict:
    return load_checkpoint(run, "latest", load_train_state=False)[1]


def test_resume_names_every_changed_key_in_one_line(tmp_path):
    cfg, run = _stopped_run(tmp_path)
    cfg.train.max_iters, cfg.optim.lr, cfg.train.log_interval = 16, 0.01, 7
    with pytest.raises(trainer.ResumeConfigError) as e:
        trainer._check_resume_config(cfg, run, _meta(run), 2)
    msg = str(e.value)
    assert "optim.lr 0.001 -> 0.01" in msg and "train.max_iters 4 -> 16" in msg
    assert "log_interval" not in msg and "\n" not in msg
    assert "max_iters cannot be extended" in msg


def test_resume_drops_metrics_rows_logged_after_the_checkpoint(tmp_path):
    """A run killed after logging iteration 3 (checkpoint at 2), mid-way through writing a
    row: the resumed run's metrics.jsonl has each iteration once, as an uninterrupted run's."""

    def rows(run: Path) -> list[dict]:
        out = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "sec_per_iter"} for r in out]

    trainer.train(tiny_train_config(tmp_path / "a"), progress=False)
    cfg, run = _stopped_run(tmp_path / "b")
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"iter": 3, "loss": 123.0}) + "\n" + '{"iter": 4, "lo')
    trainer.train(cfg, progress=False)
    assert [r["iter"] for r in rows(run)] == [1, 2, 3, 4]
    assert rows(run) == rows(tmp_path / "a" / "tiny")
