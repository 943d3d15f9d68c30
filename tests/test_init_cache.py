"""The disk cache of SoMA / RecycleLoRA initialisations (rein.methods.init_cache)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model_config

from rein.methods import init_cache
from rein.methods.init_cache import cache_dir, cached_factors, weight_digest
from rein.segmentor import build_segmentor


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "adapter_init"


def _build(tuning, **options):
    cfg = tiny_model_config(tuning)
    ranks = {"soma": {"start_block": 2, "rank": 4}, "recyclelora": {"r_max": 9, "r_main": 6}}
    cfg.tuning_options = {**ranks[tuning], **options}
    torch.manual_seed(0)
    return build_segmentor(cfg, with_criterion=False)


def test_cache_dir_follows_the_environment(cache):
    assert cache_dir() == cache


def test_digest_sees_dtype_shape_and_every_byte():
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert weight_digest(w) == weight_digest(w.clone())
    assert weight_digest(w) != weight_digest(w.reshape(4, 3))
    assert weight_digest(w) != weight_digest(w.double())
    v = w.clone()
    v[2, 3] = torch.nextafter(v[2, 3], torch.tensor(100.0))
    assert weight_digest(w) != weight_digest(v)


def test_second_call_reads_the_file_and_a_broken_file_is_recomputed(cache):
    calls = []

    def compute():
        calls.append(1)
        return {"A": torch.randn(2, 3)}

    w = torch.randn(5, 5)
    first = cached_factors("k", w, {"r": 2}, compute)
    second = cached_factors("k", w, {"r": 2}, compute)
    assert len(calls) == 1 and torch.equal(first["A"], second["A"])
    cached_factors("k", w, {"r": 3}, compute)  # other parameters: another entry
    assert len(calls) == 2 and len(list(cache.glob("*.safetensors"))) == 2
    for f in cache.glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    again = cached_factors("k", w, {"r": 2}, compute)
    assert len(calls) == 3 and again["A"].shape == (2, 3)
    assert cached_factors("k", w, {"r": 2}, compute, enabled=False) and len(calls) == 4


def test_unwritable_cache_warns_once_and_still_computes(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("REIN_CACHE", str(blocker))  # a file: no folder can be made under it
    init_cache._warned.clear()
    out = [cached_factors("k", torch.ones(2, 2), {}, lambda: {"A": torch.ones(1)}) for _ in "ab"]
    assert all(torch.equal(o["A"], torch.ones(1)) for o in out)
    assert sum("cannot write" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("tuning", ["soma", "recyclelora"])
def test_a_cached_build_equals_a_fresh_one_bit_for_bit(cache, tuning):
    fresh = _build(tuning, init_cache=False).state_dict()
    assert not cache.exists()
    first = _build(tuning).state_dict()
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == (2 * 6 if tuning == "soma" else 4 * 4)  # one per decomposed matrix
    stamps = [f.stat().st_mtime_ns for f in files]
    second = _build(tuning).state_dict()
    assert [f.stat().st_mtime_ns for f in files] == stamps  # read, not rewritten
    for state in (first, second):
        assert all(torch.equal(state[k], fresh[k]) for k in fresh)


def test_init_cache_must_be_a_bool():
    with pytest.raises(ValueError, match="'init_cache' must be true or false, got 'yes'"):
        _build("soma", init_cache="yes")
