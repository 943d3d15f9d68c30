import atexit
import os
import shutil
import tempfile

import pytest
import torch

from rein.backbones.vit import ReinViT, create_timm_vit
from rein.reins import LoRAReins

# The adapter-init cache (rein.methods.init_cache) lives in a fresh folder per test session,
# never in the user's ~/.cache; subprocesses inherit it.
os.environ["REIN_CACHE"] = tempfile.mkdtemp(prefix="rein-test-cache-")
atexit.register(shutil.rmtree, os.environ["REIN_CACHE"], ignore_errors=True)


def tiny_vit(
    embed_dim: int = 32,
    depth: int = 4,
    heads: int = 2,
    img_size: int = 64,
    patch: int = 16,
    name: str = "vit_small_patch14_dinov2",
    **kw,
):
    torch.manual_seed(0)
    return create_timm_vit(
        name,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=heads,
        img_size=img_size,
        patch_size=patch,
        **kw,
    )


def tiny_rein_vit(embed_dim: int = 32, depth: int = 4, token_length: int = 6, **kw) -> ReinViT:
    vit = tiny_vit(embed_dim=embed_dim, depth=depth, **kw)
    reins = LoRAReins(
        num_layers=depth,
        embed_dims=embed_dim,
        patch_size=16,
        token_length=token_length,
        lora_dim=4,
        query_dims=16,
    )
    return ReinViT(vit, reins, mask_token=True)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def tiny_model_config(tuning: str = "rein", **head):
    """A ModelConfig for a tiny DINOv2-shaped model (32 channels, 4 blocks, 64 px)."""
    from rein.config import config_from_dict

    return config_from_dict(
        {
            "model": {
                "tuning": tuning,
                "backbone": {
                    "name": "vit_small_patch14_dinov2",
                    "patch_size": 16,
                    "img_size": 64,
                    "timm_kwargs": {"embed_dim": 32, "depth": 4, "num_heads": 2},
                },
                "rein": {"token_length": 8, "lora_dim": 4},
                "head": {
                    "feat_channels": 32,
                    "num_queries": 8,
                    "num_decoder_layers": 3,
                    "num_encoder_layers": 1,
                    **head,
                },
                "loss": {"num_points": 256},
            }
        }
    ).model


def tiny_segmentor(tuning: str = "rein", seed: int = 0):
    from rein.segmentor import build_segmentor

    torch.manual_seed(seed)
    return build_segmentor(tiny_model_config(tuning))


def tiny_run(tmp_path, style: str = "night", mode: str = "slide"):
    """A config file for the tiny model (synthetic val set) and a checkpoint of its weights."""
    from dataclasses import asdict
    from pathlib import Path

    import yaml

    from rein.engine.checkpoint import save_checkpoint

    cfg = {
        "model": asdict(tiny_model_config()),
        "data": {
            "val": [
                {
                    "name": "synthetic",
                    "split": "val",
                    "options": {"num_images": 2, "size": [64, 64], "style": style},
                }
            ]
        },
        "eval": {"mode": mode, "crop_size": 64, "stride": 48},
    }
    path = Path(tmp_path) / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    model = tiny_segmentor()
    save_checkpoint(
        Path(tmp_path) / "ckpt", "latest", model.trainable_state_dict(), {"iteration": 0}
    )
    return path, Path(tmp_path) / "ckpt"


# -- shared by the weight-space adapter tests (test_soma, test_recyclelora) ----------------
def open_layerscale(model):
    """DINOv2's LayerScale starts at 1e-5, which hides what a block does: set it to 1."""
    with torch.no_grad():
        for name, p in model.backbone.vit.named_parameters():
            if name.endswith(".gamma"):
                p.fill_(1.0)
    return model


def seg(model, x):
    model.eval()
    with torch.no_grad():
        return model.seg_scores(x)


def loss_of(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 64, 64, generator=g)
    y = torch.zeros(2, 64, 64, dtype=torch.long)
    y[:, 32:] = 13
    y[:, :, :10] = 255
    return model.loss(x, y, generator=g)["loss"]


def perturb_trainable(model, seed: int = 1, std: float = 0.05):
    """Move every trainable tensor away from its init (as training would); returns the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def build_on_meta(config_path):
    """``(config, model)`` of a full-size config, built on the meta device (counts, layouts)."""
    from rein.config import load_config
    from rein.segmentor import build_segmentor

    cfg = load_config(config_path)
    with torch.device("meta"):
        model = build_segmentor(cfg.model, load_weights=False, with_criterion=False)
    return cfg, model


def train_steps_move_only_trainable(model, must_move, steps: int = 6, lr: float = 1e-3):
    """A few AdamW steps on :func:`loss_of`: the loss falls, every trainable tensor named by
    ``must_move(name)`` changes and every other tensor of the state dict stays as it was."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        loss = loss_of(model, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for k, v in model.state_dict().items():
        if k in trainable:
            if must_move(k):
                assert not torch.equal(v, before[k]), f"{k} did not train"
        else:
            assert torch.equal(v, before[k]), k


def assert_groups_match(model, optimizer, spec_group) -> set[str]:
    """Every optimizer group's lr and weight decay equal ``spec_group(model, name)`` for each of
    its tensors, and the groups hold exactly the trainable tensors; returns their names."""
    import math

    seen = set()
    for group in optimizer.param_groups:
        for name in group["names"]:
            lr, wd = spec_group(model, name)
            assert math.isclose(group["lr"], lr, rel_tol=1e-12), name
            assert math.isclose(group["weight_decay"], wd, rel_tol=1e-12, abs_tol=1e-12), name
            seen.add(name)
    assert seen == {n for n, p in model.named_parameters() if p.requires_grad}
    return seen


# -- shared by the official-checkpoint tests (test_fada, test_set, test_official_checkpoints) --
def official_round_trip(a, b, tmp_path, x) -> dict:
    """Export ``a`` in its method's official layout, load the file into ``b`` (whose outputs on
    ``x`` then equal ``a``'s) and export ``b`` again: the same tensors in the same key order.
    Returns the file's state dict."""
    from rein.interop import export_official, load_official

    path, again = tmp_path / "official.pth", tmp_path / "again.pth"
    n = export_official(a, path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert n == len(state)
    load_official(b, path)
    assert torch.equal(seg(a, x), seg(b, x))
    export_official(b, again)
    back = torch.load(again, weights_only=True)["state_dict"]
    assert list(back) == list(state) and all(torch.equal(back[k], state[k]) for k in state)
    return state


def convert_and_back(tmp_path, model_cfg, src, *import_flags: str) -> None:
    """``rein convert`` of the official file ``src`` with a config of ``model_cfg`` (a
    ModelConfig), then ``--to-official``: the result is ``src`` again, tensor for tensor."""
    from dataclasses import asdict

    import yaml

    from rein.cli import main

    config = tmp_path / "convert.yaml"
    config.write_text(yaml.safe_dump({"model": asdict(model_cfg)}))
    out, back = tmp_path / "ours", tmp_path / "back.pth"
    assert main(["convert", str(config), str(src), str(out), *import_flags]) == 0
    converted = str(out / "converted.safetensors")
    assert main(["convert", str(config), converted, str(back), "--to-official"]) == 0
    want = torch.load(src, weights_only=True)["state_dict"]
    got = torch.load(back, weights_only=True)["state_dict"]
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def params_rows(capsys, config, *args: str) -> dict:
    """``rein params CONFIG ARGS`` as ``{group: [total, trainable]}`` (the printed strings),
    plus ``tuning``: the method named in the header."""
    import re

    from rein.cli import main

    assert main(["params", str(config), *args]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:3] for line in out.splitlines() if line.strip()}
    rows["tuning"] = re.search(r"tuning=(\S+?),", out).group(1)
    return rows
