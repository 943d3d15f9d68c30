"""Typed config: defaults, YAML, inheritance, overrides, validation errors, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rein.config import (
    Config,
    ConfigError,
    DatasetConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    default_config,
    load_config,
    save_config,
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_follow_official_recipe():
    cfg = default_config()
    assert isinstance(cfg, Config)
    assert cfg.model.tuning == "rein"
    assert cfg.model.backbone.name == "vit_large_patch14_dinov2"
    assert cfg.model.backbone.weights is None
    assert cfg.model.backbone.patch_size == 16
    assert cfg.model.rein.token_length == 100 and cfg.model.rein.lora_dim == 16
    assert cfg.model.rein.scale_init == pytest.approx(1e-3)
    assert cfg.model.head.num_classes == 19 and cfg.model.head.num_queries == 100
    assert cfg.model.loss.num_points == 12544
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.optim.weight_decay == pytest.approx(0.05)
    assert cfg.optim.betas == (0.9, 0.999)
    assert cfg.optim.poly_power == pytest.approx(0.9) and cfg.optim.warmup_iters == 0
    assert cfg.optim.grad_clip is None
    assert cfg.train.max_iters == 40000 and cfg.train.amp == "none"
    assert cfg.eval.mode == "slide" and cfg.eval.stride == 341 and cfg.eval.scales == [1.0]
    assert cfg.data.train == [] and cfg.data.batch_size == 4
    # mutable defaults are not shared between instances
    other = default_config()
    other.eval.scales.append(2.0)
    other.model.backbone.timm_kwargs["x"] = 1
    assert cfg.eval.scales == [1.0] and cfg.model.backbone.timm_kwargs == {}


def test_yaml_load(tmp_path):
    path = write(
        tmp_path / "x.yaml",
        """
name: exp
model:
  tuning: frozen
  backbone: {name: vit_small_patch14_dinov2, out_indices: [1, 2, 3, 4], timm_kwargs: {drop_rate: 0.0}}
data:
  train:
    - {name: gtav, root: /data/gta}
  val:
    - {name: acdc, split: val, options: {condition: night}}
optim:
  lr: 2e-4          # YAML 1.1 would read this as a string; we read a float
  betas: [0.8, 0.99]
  weight_decay: 0   # int accepted for a float field
""",
    )
    cfg = load_config(path)
    assert cfg.name == "exp" and cfg.model.tuning == "frozen"
    assert cfg.model.backbone.out_indices == [1, 2, 3, 4]
    assert cfg.model.backbone.timm_kwargs == {"drop_rate": 0.0}
    assert cfg.data.train == [DatasetConfig(name="gtav", root="/data/gta")]
    assert cfg.data.val[0].options == {"condition": "night"}  # checked against ACDCDataset
    assert cfg.data.val[0].root is None and cfg.data.val[0].split == "val"
    assert cfg.optim.lr == 2e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.8, 0.99) and isinstance(cfg.optim.betas, tuple)
    assert cfg.optim.weight_decay == 0.0 and isinstance(cfg.optim.weight_decay, float)
    assert cfg.train.max_iters == 40000  # untouched defaults


def test_empty_yaml_gives_defaults(tmp_path):
    assert load_config(write(tmp_path / "e.yaml", "")) == default_config()


def test_base_inheritance_chain(tmp_path):
    write(
        tmp_path / "a.yaml",
        "name: a\nmodel: {rein: {token_length: 50, lora_dim: 8}}\ntrain: {max_iters: 10}\n"
        "data: {train: [{name: gtav}, {name: synthia}]}\n",
    )
    write(tmp_path / "sub" / "b.yaml", "base: ../a.yaml\nname: b\nmodel: {rein: {lora_dim: 4}}\n")
    c = write(
        tmp_path / "sub" / "c.yaml",
        "base: b.yaml\nmodel: {rein: {lora_dim: null}}\ndata: {train: [{name: urbansyn}]}\n",
    )
    cfg = load_config(c)
    assert cfg.name == "b"  # from the middle file
    assert cfg.model.rein.token_length == 50  # deep-merged from the root file
    assert cfg.model.rein.lora_dim is None  # null overrides
    assert cfg.train.max_iters == 10
    assert [d.name for d in cfg.data.train] == ["urbansyn"]  # lists replace, not merge


def test_base_cycle_and_missing_files(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yaml")
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(missing)
    write(tmp_path / "c.yaml", "base: gone.yaml\n")
    with pytest.raises(ConfigError, match="gone.yaml"):
        load_config(tmp_path / "c.yaml")


def test_overrides(tmp_path):
    path = write(tmp_path / "x.yaml", "data: {train: [{name: gtav, root: /a}]}\n")
    cfg = load_config(
        path,
        [
            "train.max_iters=100",
            "model.rein.lora_dim=null",
            "optim.lr=3e-4",
            "optim.grad_clip=1",
            "data.val=[{name: cityscapes, root: /x}, {name: bdd100k}]",
            "data.train.0.root=/b",
            "eval.scales=[0.5, 1.0, 1.5]",
            "model.backbone.timm_kwargs.drop_path_rate=0.1",
            "name=a=b",  # only the first '=' splits
        ],
    )
    assert cfg.train.max_iters == 100
    assert cfg.model.rein.lora_dim is None
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.optim.grad_clip == 1.0
    assert cfg.data.val == [DatasetConfig("cityscapes", "/x"), DatasetConfig("bdd100k")]
    assert cfg.data.train[0].root == "/b"
    assert cfg.eval.scales == [0.5, 1.0, 1.5]
    assert cfg.model.backbone.timm_kwargs == {"drop_path_rate": 0.1}
    assert cfg.name == "a=b"


def test_override_errors(tmp_path):
    path = write(tmp_path / "x.yaml", "")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["train.max_iter=5"])
    assert "'train.max_iter'" in str(e.value) and "'max_iters'" in str(e.value)
    assert "override" in str(e.value)
    with pytest.raises(ConfigError, match="train.max_iters.*expected int"):
        load_config(path, ["train.max_iters=many"])
    with pytest.raises(ConfigError, match="expected 'key.sub=value'"):
        load_config(path, ["train.max_iters"])
    with pytest.raises(ConfigError, match="out of range"):
        load_config(path, ["data.train.0.root=/x"])


def test_apply_overrides_on_raw_dict():
    data = {"train": {"seed": 1}}
    out = apply_overrides(data, ["train.seed=2", "model.head.num_classes=7"])
    assert data == {"train": {"seed": 1}}  # input untouched
    assert out == {"train": {"seed": 2}, "model": {"head": {"num_classes": 7}}}
    assert config_from_dict(out).model.head.num_classes == 7


def test_unknown_key_names_dotted_key_file_and_suggestion(tmp_path):
    path = write(tmp_path / "configs" / "x.yaml", "model:\n  rein:\n    token_lenght: 10\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "'model.rein.token_lenght'" in msg
    assert "did you mean 'token_length'?" in msg
    assert str(path) in msg
    assert isinstance(e.value, ValueError)


def test_unknown_key_in_base_names_the_base_file(tmp_path):
    base = write(tmp_path / "base.yaml", "optim: {weight_decai: 0.1}\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\n")
    with pytest.raises(ConfigError) as e:
        load_config(child)
    assert "'optim.weight_decai'" in str(e.value) and str(base) in str(e.value)
    assert "did you mean 'weight_decay'?" in str(e.value)


def test_unknown_keys_in_lists_and_top_level():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"data": {"train": [{"name": "gtav", "roots": "/x"}]}})
    assert "'data.train[0].roots'" in str(e.value) and "'root'" in str(e.value)
    with pytest.raises(ConfigError, match="unknown key 'zzz'.*valid keys"):
        config_from_dict({"zzz": 1})


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"train": {"max_iters": "100"}}, r"'train.max_iters'.*expected int.*'100'"),
        ({"train": {"max_iters": 1.5}}, r"'train.max_iters'.*expected int"),
        ({"train": {"max_iters": True}}, r"'train.max_iters'.*expected int"),
        ({"train": {"deterministic": 1}}, r"'train.deterministic'.*expected bool"),
        ({"optim": {"lr": "fast"}}, r"'optim.lr'.*expected float"),
        ({"optim": {"betas": [0.9]}}, r"'optim.betas'.*2 items"),
        ({"optim": {"betas": 0.9}}, r"'optim.betas'.*expected tuple\[float, float\]"),
        ({"optim": {"grad_clip": "x"}}, r"'optim.grad_clip'.*expected float or null"),
        ({"model": {"backbone": {"timm_kwargs": [1, 2]}}}, r"'model.backbone.timm_kwargs'.*dict"),
        ({"model": {"backbone": {"out_indices": [1, "a"]}}}, r"'model.backbone.out_indices\[1\]'"),
        ({"model": {"rein": 5}}, r"'model.rein'.*mapping"),
        ({"data": {"train": {"name": "gtav"}}}, r"'data.train'.*expected list"),
        ({"data": {"train": [{"root": "/x"}]}}, r"missing required key 'data.train\[0\].name'"),
        ({"eval": {"scales": [1, "big"]}}, r"'eval.scales\[1\]'.*expected float"),
    ],
)
def test_wrong_types(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict(data, source="t.yaml")


def test_wrong_type_in_file_names_file(tmp_path):
    path = write(tmp_path / "w.yaml", "data: {batch_size: four}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "'data.batch_size'" in str(e.value) and str(path) in str(e.value)
    assert "expected int" in str(e.value) and "'four'" in str(e.value)


@pytest.mark.parametrize(
    ("data", "allowed"),
    [
        ({"model": {"tuning": "prompt"}}, "rein, frozen, full, lora, vpt, adaptformer"),
        ({"train": {"amp": "fp32"}}, "none, bf16, fp16"),
        ({"eval": {"mode": "sliding"}}, "slide, whole"),
    ],
)
def test_bad_enum(data, allowed):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert allowed in str(e.value)


def test_invalid_yaml_names_file(tmp_path):
    path = write(tmp_path / "bad.yaml", "model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(path)
    path = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_round_trip_dict_config_dict(tmp_path):
    cfg = load_config(
        write(tmp_path / "x.yaml", "data: {val: [{name: acdc, options: {condition: fog}}]}\n"),
        ["optim.betas=[0.5, 0.6]", "model.rein.lora_dim=null"],
    )
    d = config_to_dict(cfg)
    assert d["optim"]["betas"] == [0.5, 0.6]  # plain YAML types only
    assert yaml.safe_load(yaml.safe_dump(d)) == d
    assert config_from_dict(d) == cfg
    assert config_to_dict(config_from_dict(d)) == d
    # and through a file
    save_config(cfg, tmp_path / "out" / "resolved.yaml")
    assert load_config(tmp_path / "out" / "resolved.yaml") == cfg
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["resolved.yaml"]  # no temp left
