import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_config

from rein.config import config_from_dict, save_config
from rein.engine.checkpoint import load_checkpoint
from rein.engine.trainer import StreamSampler, train


def tiny_train_config(out: Path, **train):
    model = config_to_dict_model()
    return config_from_dict(
        {
            "name": "tiny",
            "output_dir": str(out),
            "model": model,
            "data": {
                "train": [
                    {
                        "name": "synthetic",
                        "split": "train",
                        "options": {"num_images": 6, "size": [64, 64]},
                    }
                ],
                "val": [
                    {
                        "name": "synthetic",
                        "split": "val",
                        "options": {"num_images": 2, "size": [64, 64], "style": "fog"},
                    }
                ],
                "crop_size": 64,
                "batch_size": 2,
                "num_workers": 0,
            },
            "optim": {"lr": 1e-3},
            "train": {
                "max_iters": 4,
                "log_interval": 1,
                "val_interval": 0,
                "checkpoint_interval": 2,
                **train,
            },
            "eval": {"mode": "whole", "crop_size": 64, "stride": 32},
        }
    )


def config_to_dict_model():
    from dataclasses import asdict

    return asdict(tiny_model_config())


def _weights(out: Path) -> dict[str, torch.Tensor]:
    state, meta, _ = load_checkpoint(out / "tiny", "latest")
    return state


def test_stream_sampler_is_resumable_and_sharded():
    full = StreamSampler(5, seed=3)
    it = iter(full)
    first = [next(it) for _ in range(12)]
    resumed = iter(StreamSampler(5, seed=3, start=7))
    assert [next(resumed) for _ in range(5)] == first[7:12]
    r0, r1 = iter(StreamSampler(5, 3, rank=0, world=2)), iter(StreamSampler(5, 3, rank=1, world=2))
    merged = sorted([next(r0) for _ in range(3)] + [next(r1) for _ in range(3)])
    assert merged == first[:6]
    assert sorted(i for _, i in first[:5]) == list(range(5))  # an epoch is a permutation


def test_training_writes_checkpoints_logs_and_evaluates(tmp_path):
    cfg = tiny_train_config(tmp_path, val_interval=4)
    result = train(cfg, progress=False)
    out = tmp_path / "tiny"
    assert result["iteration"] == 4
    assert {
        "latest.safetensors",
        "latest.json",
        "latest.state.pt",
        "best.safetensors",
        "config.yaml",
        "metrics.jsonl",
    } <= {p.name for p in out.iterdir()}
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in logs if "loss" in r] == [1, 2, 3, 4]
    assert list((out / "tb").glob("events.out.tfevents.*"))  # TensorBoard scalars
    assert "fog" in result["last_eval"] and 0 <= result["last_eval"]["DG avg"] <= 100
    state = _weights(tmp_path)
    assert any(k.startswith("backbone.reins.") for k in state)
    assert not any(k.startswith("backbone.vit.") for k in state)  # frozen weights never saved


def test_interrupted_and_resumed_run_is_bit_identical(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train(tiny_train_config(a), progress=False)
    r1 = train(tiny_train_config(b), progress=False, stop_after=3)  # "killed" after iteration 3
    assert r1["iteration"] == 3
    _, meta, _ = load_checkpoint(b / "tiny", "latest")
    assert meta["iteration"] == 3
    r2 = train(tiny_train_config(b), progress=False)
    assert r2["iteration"] == 4
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_nonfinite_loss_stops_with_advice(tmp_path):
    cfg = tiny_train_config(tmp_path, max_iters=2)
    cfg.optim.lr = 1e30
    with pytest.raises(FloatingPointError, match="grad_clip"):
        train(cfg, progress=False)


def _two_class_folder(root: Path, n: int = 4) -> None:
    """Images whose labels hold exactly two classes each (equal class-loss weights per image)."""
    import numpy as np
    from PIL import Image

    (root / "img" / "train").mkdir(parents=True)
    (root / "ann" / "train").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        label = np.full((64, 64), i % 19, dtype=np.uint8)
        label[:, 20 + 5 * i :] = (i + 7) % 19
        image[label == (i + 7) % 19] //= 2
        Image.fromarray(image).save(root / "img" / "train" / f"{i}.png")
        Image.fromarray(label).save(root / "ann" / "train" / f"{i}.png")


@pytest.mark.skipif(sys.platform != "linux", reason="gloo test on linux")
def test_ddp_two_processes_match_one_process(tmp_path):
    """torchrun + gloo: 2 ranks x batch 1 == 1 process x batch 2, within float tolerance.

    The loss is made deterministic (dense points instead of random ones) and every image has
    two classes, so per-rank loss normalisers equal the global ones.
    """
    _two_class_folder(tmp_path / "data")

    def cfg_for(out, batch):
        cfg = tiny_train_config(out, max_iters=1, checkpoint_interval=1)
        cfg.data.batch_size = batch
        cfg.data.augment = False
        cfg.model.loss.num_points = 0  # dense point "sampling": no randomness in the loss
        # eps=1 turns AdamW's first steps into plain gradient steps (lr * g): Adam's g/|g|
        # would otherwise magnify float noise in near-zero gradients (e.g. biases before a
        # GroupNorm) into differences of 2*lr, hiding what this test checks: the gradients.
        cfg.optim.eps, cfg.optim.lr, cfg.optim.weight_decay = 1.0, 1.0, 0.0
        cfg.data.train = config_from_dict(
            {
                "data": {
                    "train": [
                        {
                            "name": "folder",
                            "root": str(tmp_path / "data"),
                            "options": {"img_dir": "img", "ann_dir": "ann"},
                        }
                    ]
                }
            }
        ).data.train
        return cfg

    one = cfg_for(tmp_path / "one", 2)
    train(one, progress=False)
    two = cfg_for(tmp_path / "two", 1)
    cfg_path = tmp_path / "two.yaml"
    save_config(two, cfg_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "rein.cli",
        "train",
        str(cfg_path),
        "--no-progress",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert w1.keys() == w2.keys()
    from rein.engine.trainer import _seed_everything
    from rein.segmentor import build_segmentor

    _seed_everything(one.train.seed)
    init = build_segmentor(one.model).trainable_state_dict()
    change = max((w1[k] - init[k]).abs().max().item() for k in w1)
    assert change > 100 * 2e-5  # the runs really trained, far beyond the tolerance
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=2e-5, msg=k)


def _folder_train_config(out: Path, data_root: Path, batch: int, **train):
    """Deterministic 1-iteration run on the two-class folder (see the DDP test for eps=1)."""
    cfg = tiny_train_config(out, max_iters=1, checkpoint_interval=1, **train)
    cfg.data.batch_size = batch
    cfg.data.augment = False
    cfg.model.loss.num_points = 0
    cfg.optim.eps, cfg.optim.lr, cfg.optim.weight_decay = 1.0, 1.0, 0.0
    cfg.optim.grad_clip = 1e9  # never clips; makes the trainer log the gradient norm
    cfg.data.train = config_from_dict(
        {
            "data": {
                "train": [
                    {
                        "name": "folder",
                        "root": str(data_root),
                        "options": {"img_dir": "img", "ann_dir": "ann"},
                    }
                ]
            }
        }
    ).data.train
    return cfg


def _last_log(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "tiny" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r][-1]


def test_grad_accum_two_half_batches_equal_one_full_batch(tmp_path):
    """grad_accum=2 x batch 1 == grad_accum=1 x batch 2 (same two samples, same order).

    Equality holds here because of how the criterion normalises: the class loss is a weighted
    mean over the micro-batch's queries, the mask/dice losses divide by the micro-batch's
    number of matched masks. Every image has exactly 2 classes, so both micro-batches have the
    same normalisers (2 masks, class weight 2 * 1 + 6 * 0.1), each half of the full batch's.
    Hence mean(micro losses) == full-batch loss, and the trainer dividing each micro loss by
    grad_accum makes the accumulated gradient the full-batch gradient (not twice it).
    """
    _two_class_folder(tmp_path / "data")
    full, accum = tmp_path / "full", tmp_path / "accum"
    train(_folder_train_config(full, tmp_path / "data", 2), progress=False)
    train(_folder_train_config(accum, tmp_path / "data", 1, grad_accum=2), progress=False)
    lf, la = _last_log(full), _last_log(accum)
    assert la["loss"] == pytest.approx(lf["loss"], rel=1e-5)
    assert la["grad_norm"] == pytest.approx(lf["grad_norm"], rel=1e-4)
    assert lf["grad_norm"] > 1e-3
    wf, wa = _weights(full), _weights(accum)
    for k in wf:
        torch.testing.assert_close(wa[k], wf[k], rtol=1e-4, atol=2e-5, msg=k)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_trains_with_fp32_parameters(tmp_path, amp):
    """Autocast runs on CPU: finite losses, the weights move, parameters stay float32.

    fp16 uses a GradScaler starting at 2**16: the first steps overflow and are skipped (the
    scale halves each time), so that run is longer.
    """
    from conftest import tiny_segmentor

    try:
        with torch.autocast("cpu", dtype=torch.float16 if amp == "fp16" else torch.bfloat16):
            torch.ones(2, 2) @ torch.ones(2, 2)
    except RuntimeError as e:  # pragma: no cover - depends on the CPU build
        pytest.skip(f"CPU autocast {amp} unsupported: {e}")
    model = tiny_segmentor()
    init = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}
    iters = 6 if amp == "fp16" else 2
    train(tiny_train_config(tmp_path, max_iters=iters, amp=amp), progress=False, model=model)
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "tiny" / "metrics.jsonl").open())]
    assert len(losses) == iters and all(math.isfinite(v) for v in losses)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    saved = _weights(tmp_path)
    assert {v.dtype for v in saved.values() if v.is_floating_point()} == {torch.float32}
    moved = max((saved[k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-5
    _, _, state = load_checkpoint(tmp_path / "tiny", "latest")
    if amp == "fp16":
        assert state["scaler"]["scale"] < 2.0**16  # the scaler saw (and skipped) overflows
