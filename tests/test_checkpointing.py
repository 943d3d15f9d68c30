"""``model.backbone.checkpointing``: activation checkpointing of the transformer blocks."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model_config

from rein.segmentor import build_segmentor

OPTIONS = {"soma": {"start_block": 2, "rank": 4}, "full": {}, "rein": {}}


def _grads(tuning: str, checkpointing: bool, drop_path: float = 0.0):
    cfg = tiny_model_config(tuning)
    cfg.tuning_options = OPTIONS[tuning]
    cfg.backbone.checkpointing = checkpointing
    cfg.backbone.timm_kwargs["drop_path_rate"] = drop_path
    torch.manual_seed(0)
    model = build_segmentor(cfg).train()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 64, 64, generator=g)
    y = torch.randint(0, 19, (2, 64, 64), generator=g)
    torch.manual_seed(1)  # drop-path draws from the global RNG
    loss = model.loss(x, y, generator=torch.Generator().manual_seed(5))["loss"]
    loss.backward()
    assert model.backbone.checkpointing is checkpointing
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("tuning", "drop_path"), [("rein", 0.0), ("soma", 0.0), ("full", 0.3)])
def test_checkpointing_gives_the_same_loss_and_gradients(tuning, drop_path):
    loss, grads = _grads(tuning, False, drop_path)
    loss_ckpt, grads_ckpt = _grads(tuning, True, drop_path)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 0
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    if tuning == "full":  # the backbone's own weights get their gradients through it too
        assert any(n.startswith("backbone.vit.blocks.") for n in grads)


def test_checkpointing_is_off_in_eval_and_without_grad():
    cfg = tiny_model_config()
    cfg.backbone.checkpointing = True
    model = build_segmentor(cfg).eval()
    calls = []
    import torch.utils.checkpoint as ckpt

    real = ckpt.checkpoint
    ckpt.checkpoint = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        with torch.no_grad():
            model.seg_scores(torch.randn(1, 3, 64, 64))
        model.train()
        model.loss(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.long))
    finally:
        ckpt.checkpoint = real
    assert len(calls) == 4  # the 4 blocks, in the training forward only


def test_checkpointing_on_a_convnet_is_one_line():
    cfg = tiny_model_config()
    cfg.backbone.name = "resnet18"
    cfg.backbone.timm_kwargs = {}
    cfg.backbone.checkpointing = True
    with pytest.raises(ValueError, match="for transformer backbones .* set it to false"):
        build_segmentor(cfg)
