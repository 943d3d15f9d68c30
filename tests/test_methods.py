"""The tuning-method contract: the registry, typed options, and a method added from outside."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_model_config

from rein.config import ConfigError, config_from_dict
from rein.engine.optim import build_optimizer
from rein.methods import (
    METHODS,
    TuningMethod,
    build_method,
    method_names,
    register_method,
)
from rein.segmentor import build_segmentor


def test_every_builtin_method_is_registered():
    assert method_names()[:6] == ("rein", "frozen", "full", "lora", "vpt", "adaptformer")


def test_options_are_typed_dataclasses():
    lora = build_method("lora", {"rank": 4})
    assert dataclasses.is_dataclass(lora.options)
    assert (lora.options.rank, lora.options.alpha, lora.options.targets) == (4, 4.0, ["qkv"])


def test_unknown_option_suggests_the_nearest_name():
    with pytest.raises(ValueError, match=r"unknown option 'rnak'.*did you mean 'rank'"):
        build_method("lora", {"rnak": 4})


def test_config_rejects_bad_tuning_options_when_read():
    with pytest.raises(ConfigError, match=r"model.tuning_options.*'bottleneck' for tuning 'vpt'"):
        config_from_dict({"model": {"tuning": "vpt", "tuning_options": {"bottleneck": 8}}})
    with pytest.raises(ConfigError, match=r"model.tuning.*expected one of: rein, frozen"):
        config_from_dict({"model": {"tuning": "bitfit"}})


@dataclasses.dataclass
class BitFitOptions:
    blocks: int = 2  # the last `blocks` blocks train their biases


class BitFit(TuningMethod):
    """A method written outside the package: train the biases of the last blocks."""

    name = "bitfit_test"
    Options = BitFitOptions

    def is_trainable(self, name: str) -> bool:
        parts = name.split(".")
        if not (name.startswith("backbone.vit.blocks.") and name.endswith(".bias")):
            return False
        return int(parts[3]) >= 4 - self.options.blocks

    def report_group(self, name: str) -> str | None:
        return "bitfit" if self.is_trainable(name) else None


@pytest.fixture
def bitfit():
    register_method(BitFit)
    yield BitFit
    METHODS.pop(BitFit.name)


def test_a_method_is_one_class_plugged_in_by_name(bitfit):
    cfg = tiny_model_config()
    cfg = config_from_dict(
        {"model": {**dataclasses.asdict(cfg), "tuning": "bitfit_test", "tuning_options": {}}}
    ).model
    torch.manual_seed(0)
    model = build_segmentor(cfg)
    assert isinstance(model.method, BitFit)
    assert model.backbone.reins is None  # no block adapter: the head learns its queries
    assert hasattr(model.decode_head, "query_embed")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    backbone = {n for n in trainable if n.startswith("backbone.")}
    assert backbone and all(
        n.startswith(("backbone.vit.blocks.2.", "backbone.vit.blocks.3.")) for n in backbone
    )
    assert all(n.endswith(".bias") for n in backbone)
    assert model.parameter_groups()["bitfit"][1] == sum(
        p.numel() for n, p in model.named_parameters() if n in backbone
    )
    # its parameters are method parameters: the backbone lr multiplier does not apply
    from rein.config import OptimConfig

    opt = build_optimizer(model, OptimConfig(lr=1e-3, backbone_lr_mult=0.1))
    lrs = {n: g["lr"] for g in opt.param_groups for n in g["names"]}
    assert {lrs[n] for n in backbone} == {1e-3}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(2, 3, 64, 64)
    y = torch.randint(0, 19, (2, 64, 64))
    model.train()
    model.loss(x, y, generator=torch.Generator().manual_seed(0))["loss"].backward()
    opt.step()
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        if n.startswith("backbone."):
            assert moved == (n in backbone), n


def test_registering_a_taken_name_is_refused():
    class Other(TuningMethod):
        name = "rein"

    with pytest.raises(ValueError, match="already registered"):
        register_method(Other)
