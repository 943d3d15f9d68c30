"""Atomic checkpoints: round trip, crash consistency, corruption, load_into errors, RNG state."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from rein.engine import checkpoint as ckpt
from rein.engine.checkpoint import (
    CheckpointError,
    capture_rng_state,
    list_checkpoints,
    load_checkpoint,
    load_into,
    resolve_checkpoint,
    restore_rng_state,
    save_checkpoint,
    trainable_state_dict,
    write_json_atomic,
)


class Toy(nn.Module):
    """A frozen 'backbone' plus a trainable head with BatchNorm and a tied weight."""

    def __init__(self, hidden: int = 4) -> None:
        super().__init__()
        self.backbone = nn.Linear(3, hidden)
        self.backbone.requires_grad_(False)
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden))
        self.out = nn.Linear(hidden, hidden, bias=False)
        self.out_tied = nn.Linear(hidden, hidden, bias=False)
        self.out_tied.weight = self.out.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_tied(self.out(self.head(self.backbone(x))))


def train_state_of(model: nn.Module, iteration: int) -> dict:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0)
    model(torch.randn(6, 3)).pow(2).mean().backward()
    opt.step()
    sched.step()
    return {
        "optimizer": opt.state_dict(),
        "scheduler": {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"},
        "rng": capture_rng_state(),
        "iteration": iteration,
    }


def save(model: nn.Module, directory, tag: str, iteration: int, with_state: bool = True):
    return save_checkpoint(
        directory,
        tag,
        trainable_state_dict(model),
        {"iteration": iteration, "config": {"name": "toy"}, "metric": {"mIoU": 50.0 + iteration}},
        train_state_of(model, iteration) if with_state else None,
    )


def test_trainable_state_dict_skips_frozen():
    keys = set(trainable_state_dict(Toy()))
    assert keys == {
        "head.0.weight",
        "head.0.bias",
        "head.1.weight",
        "head.1.bias",
        "head.1.running_mean",
        "head.1.running_var",
        "head.1.num_batches_tracked",
        "out.weight",
    }


def test_round_trip_bit_identical(tmp_path):
    model = Toy()
    path = save(model, tmp_path, "iter_3", 3)
    assert path == tmp_path / "iter_3.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_3.json",
        "iter_3.safetensors",
        "iter_3.state.pt",
    ]
    state, meta, train_state = load_checkpoint(tmp_path, "iter_3")
    expected = trainable_state_dict(model)
    assert state.keys() == expected.keys()
    for k, v in expected.items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k
    assert meta["iteration"] == 3 and meta["config"] == {"name": "toy"}
    assert meta["metric"] == {"mIoU": 53.0}
    assert meta["tensors"]["out.weight"]["shape"] == [4, 4]
    assert "rein_version" in meta
    assert train_state["iteration"] == 3
    assert set(train_state) >= {"optimizer", "scheduler", "rng"}
    # the meta file is plain JSON
    assert json.loads((tmp_path / "iter_3.json").read_text())["iteration"] == 3
    # loading by file name and by "latest"
    for spec in (path, tmp_path / "iter_3.json", tmp_path / "iter_3.state.pt"):
        assert load_checkpoint(spec)[1]["save_id"] == meta["save_id"]
    assert load_checkpoint(tmp_path)[1]["save_id"] == meta["save_id"]


def test_tied_and_shared_tensors_are_saved(tmp_path):
    w = torch.arange(12.0).reshape(3, 4)
    state = {"a": w, "b": w, "c": w[1:], "d": w.t()}  # shared storage, a view, non-contiguous
    save_checkpoint(tmp_path, "t", state, {"iteration": 0})
    loaded, _, train_state = load_checkpoint(tmp_path, "t")
    assert train_state is None
    for k, v in state.items():
        assert torch.equal(loaded[k], v)
    assert w.data_ptr() != loaded["a"].data_ptr()


def test_latest_picks_highest_iteration_and_load_into(tmp_path):
    model = Toy()
    save(model, tmp_path, "iter_1", 1, with_state=False)
    with torch.no_grad():
        model.out.weight.add_(1.0)
    save(model, tmp_path, "iter_2", 2, with_state=False)
    assert [t for t, _ in list_checkpoints(tmp_path)] == ["iter_1", "iter_2"]
    assert resolve_checkpoint(tmp_path) == (tmp_path, "iter_2")
    state, meta, train_state = load_checkpoint(tmp_path)
    assert meta["iteration"] == 2 and train_state is None
    fresh = Toy()
    fresh.backbone.load_state_dict(model.backbone.state_dict())
    result = load_into(fresh, state)
    assert result.missing_keys == [] and result.unexpected_keys == []
    x = torch.randn(5, 3)
    model.eval()
    fresh.eval()
    assert torch.equal(fresh(x), model(x))
    assert fresh.out_tied.weight is fresh.out.weight  # tie preserved
    with pytest.raises(CheckpointError, match="'iter_9' not found.*iter_1, iter_2"):
        load_checkpoint(tmp_path, "iter_9")


def test_crash_at_a_rename_leaves_a_complete_checkpoint(tmp_path, monkeypatch):
    """A save's first rename is its commit: failing at it keeps the previous checkpoint whole
    (and removes the new files); failing at a later rename keeps the new one whole."""
    model = Toy()
    save(model, tmp_path, "latest", 1)
    real_replace = os.replace

    def failing_at(n):
        calls = []

        def replace(src, dst):
            calls.append(dst)
            if len(calls) == n:
                raise OSError("simulated crash")
            real_replace(src, dst)

        return replace

    monkeypatch.setattr(ckpt.os, "replace", failing_at(1))
    with pytest.raises(OSError, match="simulated crash"):
        save(model, tmp_path, "latest", 2)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temps removed
    _, meta, train_state = load_checkpoint(tmp_path, "latest")
    assert meta["iteration"] == train_state["iteration"] == 1

    monkeypatch.setattr(ckpt.os, "replace", failing_at(2))
    with pytest.raises(OSError, match="simulated crash"):
        save(model, tmp_path, "latest", 3)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    _, meta, train_state = load_checkpoint(tmp_path, "latest")  # committed: the new files
    assert meta["iteration"] == train_state["iteration"] == 3
    assert list_checkpoints(tmp_path) == [("latest", 3)]
    ckpt.clean_checkpoint_dir(tmp_path)  # finishes the renames
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest.json",
        "latest.safetensors",
        "latest.state.pt",
    ]
    _, meta, train_state = load_checkpoint(tmp_path / "latest.state.pt")
    assert meta["iteration"] == train_state["iteration"] == 3


def test_old_layout_inconsistency_is_still_detected(tmp_path):
    """A run saved by an older rein and killed between its renames: a new state.pt next to
    the old weights and JSON is refused, not mixed; the weights alone still load."""
    model = Toy()
    save(model, tmp_path, "latest", 1)
    save(model, tmp_path / "newer", "latest", 2)
    os.replace(tmp_path / "newer" / "latest.state.pt", tmp_path / "latest.state.pt")
    with pytest.raises(CheckpointError, match="inconsistent.*iteration 1.*latest.state.pt.*2"):
        load_checkpoint(tmp_path, "latest")
    state, meta, _ = load_checkpoint(tmp_path, "latest", load_train_state=False)
    assert meta["iteration"] == 1 and state.keys() == trainable_state_dict(model).keys()


def test_latest_falls_back_past_an_inconsistent_checkpoint(tmp_path):
    model = Toy()
    save(model, tmp_path, "iter_1", 1)
    save(model, tmp_path, "iter_2", 2)
    # iter_2's weights come from another save (e.g. a crash mid-way through overwriting)
    save(model, tmp_path / "other", "iter_2", 2)
    os.replace(tmp_path / "other" / "iter_2.safetensors", tmp_path / "iter_2.safetensors")
    with pytest.raises(CheckpointError, match="save_id"):
        load_checkpoint(tmp_path, "iter_2")
    assert load_checkpoint(tmp_path)[1]["iteration"] == 1


def test_saving_without_train_state_removes_stale_one(tmp_path):
    model = Toy()
    save(model, tmp_path, "best", 1)
    save(model, tmp_path, "best", 5, with_state=False)
    assert not (tmp_path / "best.state.pt").exists()
    _, meta, train_state = load_checkpoint(tmp_path, "best")
    assert meta["iteration"] == 5 and train_state is None


@pytest.mark.parametrize("cut", [4, 40, -7])
def test_truncated_safetensors_names_file(tmp_path, cut):
    save(Toy(), tmp_path, "c", 1)
    path = tmp_path / "c.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path, "c")
    assert str(path) in str(e.value)


def test_corrupt_meta_and_state_name_file(tmp_path):
    save(Toy(), tmp_path, "c", 1)
    (tmp_path / "c.state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path, "c")
    assert str(tmp_path / "c.state.pt") in str(e.value)
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path, "c")
    assert str(tmp_path / "c.json") in str(e.value)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing")


class Custom:
    """Picklable, but not loadable with weights_only=True."""


def test_train_state_must_be_weights_only_loadable(tmp_path):
    class Local:
        pass

    with pytest.raises(CheckpointError, match="weights_only"):
        save_checkpoint(tmp_path, "x", {}, {"iteration": 0}, {"obj": Custom()})
    with pytest.raises(CheckpointError, match="cannot be serialized"):
        save_checkpoint(tmp_path, "x", {}, {"iteration": 0}, {"obj": Local()})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="iteration"):
        save_checkpoint(tmp_path, "x", {}, {})


def test_load_into_reports_missing_unexpected_and_shapes():
    src = Toy(hidden=4)
    state = trainable_state_dict(src)
    state = {k: v for k, v in state.items() if k != "head.0.bias"}
    state["decode_head.extra"] = torch.zeros(2)
    target = Toy(hidden=4)
    target.out = nn.Linear(4, 4, bias=False)
    target.out.weight = nn.Parameter(torch.zeros(5, 4))
    target.out_tied.weight = target.out.weight
    with pytest.raises(CheckpointError) as e:
        load_into(target, state)
    msg = str(e.value)
    assert "missing keys (1): head.0.bias" in msg
    assert "unexpected keys (1): decode_head.extra" in msg
    assert "out.weight: checkpoint (4, 4) vs model (5, 4)" in msg
    assert "another config/backbone" in msg
    # non-strict: missing / unexpected tolerated and reported, shapes still fatal
    ok = {k: v for k, v in state.items() if k != "out.weight"}
    before = target.head[0].bias.clone()
    result = load_into(target, ok, strict=False)
    assert result.missing_keys == ["head.0.bias", "out.weight"]
    assert result.unexpected_keys == ["decode_head.extra"]
    assert torch.equal(target.head[0].weight, src.head[0].weight)
    assert torch.equal(target.head[0].bias, before)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_into(target, state, strict=False)


def draws() -> tuple:
    return (
        [random.random() for _ in range(3)],
        random.gauss(0, 1),
        np.random.rand(3).tolist(),
        np.random.randn(),
        torch.rand(3).tolist(),
        torch.randint(0, 1000, (4,)).tolist(),
    )


def test_rng_state_capture_restore_reproduces_draws(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leave a cached gaussian in python's and numpy's state
    np.random.randn(1)
    state = capture_rng_state()
    first = draws()
    # through a checkpoint file (weights_only=True load)
    save_checkpoint(tmp_path, "r", {}, {"iteration": 7}, {"rng": state})
    loaded = load_checkpoint(tmp_path, "r")[2]["rng"]
    draws()
    restore_rng_state(loaded)
    assert draws() == first
    restore_rng_state(state)
    assert draws() == first


def test_write_json_atomic(tmp_path):
    path = tmp_path / "sub" / "m.json"
    write_json_atomic({"a": [1, 2], "b": float("inf"), "c": (1, 2)}, path)
    write_json_atomic({"a": 3}, path)
    assert json.loads(path.read_text()) == {"a": 3}
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_get_the_umask_mode_not_0600(tmp_path, umask):
    old = os.umask(umask)
    try:
        save(Toy(), tmp_path, "c", 1)
        write_json_atomic({"a": 1}, tmp_path / "eval.json")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {
        n: 0o666 & ~umask for n in ("c.json", "c.safetensors", "c.state.pt", "eval.json")
    }


def test_lone_safetensors_loads_as_weights(tmp_path):
    """Weights without their JSON (copied alone, or written by another tool) load for
    evaluation: the metadata is optional, the config supplies the rest."""
    model = Toy()
    save(model, tmp_path, "c", 7)
    (tmp_path / "c.json").unlink()
    (tmp_path / "c.state.pt").unlink()
    expected = trainable_state_dict(model)
    for spec, tag in ((tmp_path / "c.safetensors", "latest"), (tmp_path, "c")):
        state, meta, train_state = load_checkpoint(spec, tag)
        assert train_state is None and meta["has_metadata"] is False
        assert meta["iteration"] == 7  # recorded in the safetensors header
        assert all(torch.equal(state[k], v) for k, v in expected.items())
    import safetensors.torch

    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in expected.items()}, str(plain))
    state, meta, _ = load_checkpoint(plain, load_train_state=False)
    assert meta["iteration"] is None and state.keys() == expected.keys()
    fresh = Toy()
    load_into(fresh, state)


def test_missing_safetensors_is_reported_as_missing(tmp_path):
    for name in ("X.safetensors", "X.json", "X.state.pt"):
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(tmp_path / name)
        assert str(e.value) == f"checkpoint not found: {tmp_path / name}"
