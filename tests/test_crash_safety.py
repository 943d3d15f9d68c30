"""Crash safety: a save killed at any file operation, Ctrl-C, and resuming afterwards.

Every file operation ``rein.engine.checkpoint`` performs (``os.open / write / fsync / close /
replace / unlink``) goes through a proxy of the ``os`` module. A kill (SIGKILL: no clean-up
runs) just before operation k is simulated by copying the folder at that moment; an
exception raised at operation k (Ctrl-C, a full disk) lets the clean-up code run. Either way,
the folder must hold one complete checkpoint, the previous one or the new one, and a run
resumed from it must end bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from test_checkpoint import Toy, save
from test_trainer import tiny_train_config

import rein.engine.trainer as trainer
from rein.config import save_config
from rein.engine import checkpoint as ckpt
from rein.engine.checkpoint import (
    CheckpointError,
    checkpoint_iteration,
    clean_checkpoint_dir,
    list_checkpoints,
    load_checkpoint,
)

_OPS = ("open", "write", "fsync", "close", "replace", "unlink")


class _Kill(Exception):
    """Stands in for a kill / Ctrl-C / I/O error at one file operation."""


class _FsProxy:
    """The ``os`` module as checkpoint.py sees it, with a hook before each file operation.

    ``changes_only``: count only the operations that change the folder (creating a file,
    writing, renaming, deleting); a kill at an fsync or close leaves what the previous one left.
    """

    def __init__(self, hook, changes_only: bool = False) -> None:
        self._hook = hook
        self.armed = True
        self.count = 0
        self.changes_only = changes_only

    def __getattr__(self, name):
        real = getattr(os, name)
        if name not in _OPS:
            return real

        def op(*args, **kwargs):
            counts = (
                not self.changes_only
                or name in ("write", "replace", "unlink")
                or (name == "open" and args[1] & os.O_CREAT)
            )
            if self.armed and counts:
                self.count += 1
                self._hook(self.count, name, args)
            return real(*args, **kwargs)

        return op


def _snapshot(directory: Path, into: Path) -> Path:
    """Copy the top-level files of ``directory`` (what a kill leaves there) to ``into``."""
    into.mkdir(parents=True)
    for p in directory.iterdir():
        if p.is_file():
            shutil.copy2(p, into / p.name)
    return into


def _dotfiles(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# -- save_checkpoint alone -------------------------------------------------------------------
def _content(directory: Path, tag: str):
    state, meta, train_state = load_checkpoint(directory, tag)
    return state, meta["iteration"], train_state


def _assert_same(got, want, what: str) -> None:
    state, it, ts = got
    w_state, w_it, w_ts = want
    assert it == w_it, what
    assert state.keys() == w_state.keys(), what
    assert all(torch.equal(state[k], w_state[k]) for k in state), what
    assert (ts is None) == (w_ts is None), what
    if ts is not None:
        assert ts["iteration"] == w_ts["iteration"], what
        assert torch.equal(ts["rng"]["torch"], w_ts["rng"]["torch"]), what
        assert ts["optimizer"]["state"].keys() == w_ts["optimizer"]["state"].keys(), what


def _save_new(model: Toy, directory: Path, tag: str, with_state: bool) -> None:
    """The save under test: always from the same model and RNG state."""
    torch.manual_seed(5)
    save(copy.deepcopy(model), directory, tag, 2, with_state=with_state)


@pytest.mark.parametrize("overwrite", [True, False], ids=["same-tag", "new-tag"])
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "no-state"])
def test_a_save_killed_at_any_file_operation_leaves_one_complete_checkpoint(
    tmp_path, monkeypatch, overwrite, with_state
):
    model = Toy()
    old_dir, ref_dir = tmp_path / "old", tmp_path / "ref"
    save(model, old_dir, "c", 1)
    old = _content(old_dir, "c")
    with torch.no_grad():
        model.out.weight.add_(1.0)
    new_tag = "c" if overwrite else "d"

    # the reference save of the new checkpoint, counting its file operations
    shutil.copytree(old_dir, ref_dir)
    proxy = _FsProxy(lambda k, name, args: None)
    monkeypatch.setattr(ckpt, "os", proxy)
    _save_new(model, ref_dir, new_tag, with_state)
    monkeypatch.setattr(ckpt, "os", os)
    n_ops = proxy.count
    assert n_ops >= 10
    new = _content(ref_dir, new_tag)
    assert new[1] == 2 and (new[2] is None) == (not with_state)

    def check(directory: Path, what: str) -> str:
        """Which checkpoint ``directory`` holds as ``new_tag``; asserts it is complete."""
        if not overwrite:  # the other checkpoint is never touched
            _assert_same(_content(directory, "c"), old, what)
        try:
            got = _content(directory, new_tag)
        except CheckpointError:
            assert not overwrite, f"{what}: the previous checkpoint was lost"
            assert [t for t, _ in list_checkpoints(directory)] == ["c"], what
            return "old"
        _assert_same(got, new if got[1] == 2 else old, what)
        return "new" if got[1] == 2 else "old"

    kills = []
    for k in range(1, n_ops + 1):
        for mode in ("kill", "raise"):
            d = tmp_path / f"{mode}{k}"
            shutil.copytree(old_dir, d)
            snap = tmp_path / f"{mode}{k}_snap"

            def hook(count, name, args, _k=k, _d=d, _snap=snap, _mode=mode):
                if count == _k:
                    if _mode == "kill":
                        _snapshot(_d, _snap)
                    raise _Kill(f"op {count}: {name}")

            monkeypatch.setattr(ckpt, "os", _FsProxy(hook))
            with pytest.raises(_Kill):
                _save_new(model, d, new_tag, with_state)
            monkeypatch.setattr(ckpt, "os", os)
            target = snap if mode == "kill" else d
            what = f"{mode} at op {k}"
            which = check(target, what)
            if which == "old" and mode == "raise":
                assert _dotfiles(d) == [], f"{what}: temp files left by a failed save"
            # the trainer's clean-up at start finishes or discards, never loses a checkpoint
            clean_checkpoint_dir(target)
            assert _dotfiles(target) == [], what
            assert check(target, what + " + clean-up") == which
            if mode == "kill":
                kills.append(which)
    # early kills keep the previous checkpoint, later ones the new: no moment without one
    assert kills[0] == "old" and kills[-1] == "new"
    assert kills == sorted(kills, key=lambda w: w == "new")


def test_clean_checkpoint_dir_removes_stale_temp_files_of_older_versions(tmp_path):
    save(Toy(), tmp_path, "latest", 1)
    # what the old implementation (tempfile.mkstemp) and save_config leave after a kill
    for name in (".latest.state.pt.k3j_x1.tmp", ".latest.json.abc.tmp", ".config.yaml.q.tmp"):
        (tmp_path / name).write_bytes(b"partial")
    (tmp_path / f".latest.{'0' * 32}.safetensors").write_bytes(b"uncommitted")
    clean_checkpoint_dir(tmp_path)
    assert _dotfiles(tmp_path) == []
    assert load_checkpoint(tmp_path)[1]["iteration"] == 1


# -- the trainer: kill the save of iteration 2 of 3 at every file operation --------------------
KILLED_SAVE, MAX_ITERS = 2, 3


def _cfg(root: Path):
    cfg = tiny_train_config(root, max_iters=MAX_ITERS, checkpoint_interval=1)
    # a smaller model than the other trainer tests: this test trains ~30 times
    cfg.model.backbone.timm_kwargs["depth"] = 2
    cfg.model.head.num_decoder_layers = 1
    cfg.model.loss.num_points = 64
    return cfg


def _final(run: Path):
    state, meta, train_state = load_checkpoint(run, "latest")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("sec_per_iter", None)
    return state, meta["iteration"], train_state, rows


def _assert_same_run(got, want, what: str) -> None:
    state, it, ts, rows = got
    w_state, w_it, w_ts, w_rows = want
    assert it == w_it == MAX_ITERS, what
    assert [k for k in w_state if not torch.equal(state[k], w_state[k])] == [], what
    for pid, s in w_ts["optimizer"]["state"].items():
        for name, t in s.items():
            assert torch.equal(ts["optimizer"]["state"][pid][name], t), (what, pid, name)
    assert ts["scheduler"]["last_epoch"] == w_ts["scheduler"]["last_epoch"], what
    assert torch.equal(ts["rng"]["torch"], w_ts["rng"]["torch"]), what
    assert rows == w_rows, f"{what}: metrics.jsonl rows differ (repeated or lost rows?)"


def _arm_on_killed_save(monkeypatch, proxy: _FsProxy, after=None) -> None:
    """Count file operations only inside the trainer's save of ``latest`` at KILLED_SAVE;
    ``after()`` runs when that save returns."""
    real = ckpt.save_checkpoint

    def armed(directory, tag, model_state, meta, train_state=None):
        target = tag == "latest" and meta["iteration"] == KILLED_SAVE
        proxy.armed = target
        try:
            out = real(directory, tag, model_state, meta, train_state)
        finally:
            proxy.armed = False
        if target and after is not None:
            after()
        return out

    monkeypatch.setattr(trainer, "save_checkpoint", armed)
    monkeypatch.setattr(ckpt, "os", proxy)
    proxy.armed = False


def test_training_killed_at_any_file_operation_of_a_save_resumes_bit_identically(
    tmp_path, monkeypatch
):
    """Kills (folder photographed before each operation that changes it, and after the save)
    and Ctrl-C at each such operation of the save of iteration 2: every one resumes to the
    uninterrupted run's weights, optimizer / RNG state and metrics rows. (Every operation,
    fsync and close included, is covered for save_checkpoint itself above.)"""
    ref_run = tmp_path / "ref" / "tiny"
    photos: list[Path] = []

    def photograph(count=None, name="done", args=()):
        photos.append(_snapshot(ref_run, tmp_path / "photos" / f"{len(photos):03d}_{name}"))

    proxy = _FsProxy(photograph, changes_only=True)
    _arm_on_killed_save(monkeypatch, proxy, after=photograph)
    trainer.train(_cfg(tmp_path / "ref"), progress=False)
    n_ops = proxy.count
    monkeypatch.setattr(ckpt, "os", os)
    want = _final(ref_run)
    assert n_ops >= 8 and len(photos) == n_ops + 1
    assert checkpoint_iteration(photos[0]) == 1 and checkpoint_iteration(photos[-1]) == 2

    # Ctrl-C at operation k of the same save (the clean-up code runs), in a run resumed from
    # the folder as it was before the save: the message names the checkpoint the folder holds.
    failed: list[tuple[str, Path]] = []
    for k in range(1, n_ops + 1):
        root = tmp_path / f"ctrl_c{k}"
        shutil.copytree(photos[0], root / "tiny")

        def fail(count, name, args, _k=k):
            if count == _k:
                raise KeyboardInterrupt

        _arm_on_killed_save(monkeypatch, _FsProxy(fail, changes_only=True))
        with pytest.raises(trainer.TrainingInterrupted) as e:
            trainer.train(_cfg(root), progress=False)
        monkeypatch.setattr(ckpt, "os", os)
        held = load_checkpoint(root / "tiny", "latest")[1]["iteration"]
        assert e.value.iteration == KILLED_SAVE and e.value.checkpoint == held in (1, 2)
        failed.append((f"Ctrl-C at op {k}", root / "tiny"))
    monkeypatch.setattr(trainer, "save_checkpoint", ckpt.save_checkpoint)

    resumed_from = []
    for i, (what, folder) in enumerate([(f"kill at {p.name}", p) for p in photos] + failed):
        root = tmp_path / "resume" / str(i)
        shutil.copytree(folder, root / "tiny")
        resumed_from.append(checkpoint_iteration(root / "tiny"))
        trainer.train(_cfg(root), progress=False)
        assert _dotfiles(root / "tiny") == [], what
        _assert_same_run(_final(root / "tiny"), want, what)
    assert set(resumed_from) == {1, 2}  # kills before and after the commit were exercised


# -- Ctrl-C ------------------------------------------------------------------------------------
class _InterruptAt:
    """Training set raising KeyboardInterrupt (as Ctrl-C does) at its ``at``-th sample."""

    def __init__(self, inner, at: int) -> None:
        self.inner, self.at, self.calls = inner, at, 0

    def __len__(self) -> int:
        return len(self.inner)

    def sample(self, index, pipeline, rng):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.inner.sample(index, pipeline, rng)


def test_ctrl_c_prints_one_line_exits_130_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    """Ctrl-C in iteration 4 of 4 (checkpoint at 2; rows 1-3 logged): one line, exit code
    130, the checkpoint kept; the same command resumes, and the result equals an
    uninterrupted run, with no repeated metrics.jsonl row."""
    from rein.cli import main

    trainer.train(tiny_train_config(tmp_path / "ref"), progress=False)
    want = _final_rows(tmp_path / "ref" / "tiny")

    cfg = tiny_train_config(tmp_path / "run")
    cfg_path = tmp_path / "tiny.yaml"
    save_config(cfg, cfg_path)
    run = tmp_path / "run" / "tiny"
    build = trainer.build_train_set
    monkeypatch.setattr(
        trainer, "build_train_set", lambda *a, **k: [_InterruptAt(build(*a, **k)[0], 7)]
    )
    assert main(["train", str(cfg_path), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert err == (
        f"rein train: interrupted at iteration 4; the last checkpoint is iteration 2 in {run}; "
        "run the same command to resume\n"
    )
    _, meta, train_state = load_checkpoint(run, "latest")  # the completed checkpoint is kept
    assert meta["iteration"] == train_state["iteration"] == 2
    rows = [json.loads(line)["iter"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3]

    monkeypatch.setattr(trainer, "build_train_set", build)
    assert main(["train", str(cfg_path), "--no-progress"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    got = _final_rows(run)
    assert [r["iter"] for r in got[1]] == [1, 2, 3, 4]
    assert got[1] == want[1]
    assert [k for k in want[0] if not torch.equal(got[0][k], want[0][k])] == []


def test_ctrl_c_before_the_first_checkpoint_says_so(tmp_path, monkeypatch):
    build = trainer.build_train_set
    monkeypatch.setattr(
        trainer, "build_train_set", lambda *a, **k: [_InterruptAt(build(*a, **k)[0], 1)]
    )
    with pytest.raises(trainer.TrainingInterrupted) as e:
        trainer.train(tiny_train_config(tmp_path), progress=False)
    assert isinstance(e.value, KeyboardInterrupt)
    assert str(e.value).startswith("interrupted at iteration 1; no checkpoint was written yet")
    assert list_checkpoints(tmp_path / "tiny") == []


def _final_rows(run: Path):
    state = load_checkpoint(run, "latest")[0]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("sec_per_iter", None)
    return state, rows
