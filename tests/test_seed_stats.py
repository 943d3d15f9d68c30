"""Aggregating a method's results over seeds, and comparing two methods by their spread."""

from __future__ import annotations

import math

import pytest

from rein.engine.seed_stats import aggregate_seeds, compare_methods, format_mean_std, mean_std


def _run(seed, a, b, dg):
    return {
        "seed": seed,
        "mIoU": {"src": a, "fog": b},
        "dg_avg": dg,
        "source": a,
        "sec_per_iter": 0.1 * (seed + 1),
        "train_seconds": 10.0,
        "eval_seconds": 1.0,
        "trainable_params": 7,
        "total_params": 9,
    }


def test_mean_and_sample_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)  # n - 1 in the denominator
    m, s = mean_std([5.0])
    assert m == 5.0 and math.isnan(s)
    assert all(math.isnan(v) for v in mean_std([]))


def test_format_mean_std():
    assert format_mean_std(34.56, 0.61) == "34.6 ± 0.6"
    assert format_mean_std(34.56, math.nan) == "34.6"
    assert format_mean_std(math.nan, math.nan) == "-"


def test_aggregate_keeps_every_seed_and_averages_each_domain():
    runs = [_run(0, 30.0, 10.0, 10.0), _run(1, 32.0, 14.0, 14.0), _run(2, 34.0, 12.0, 12.0)]
    agg = aggregate_seeds(runs)
    assert agg["seeds"] == [0, 1, 2]
    assert agg["mIoU"] == {"src": 32.0, "fog": 12.0}
    assert agg["mIoU_std"] == {"src": 2.0, "fog": 2.0}
    assert agg["dg_avg"] == 12.0 and agg["dg_avg_std"] == 2.0
    assert agg["source"] == 32.0 and agg["source_std"] == 2.0
    assert agg["sec_per_iter"] == pytest.approx(0.2)
    assert agg["trainable_params"] == 7
    assert [r["mIoU"]["fog"] for r in agg["runs"]] == [10.0, 14.0, 12.0]


def test_aggregate_refuses_mismatched_domains():
    bad = _run(1, 1.0, 2.0, 2.0)
    bad["mIoU"] = {"src": 1.0}
    with pytest.raises(ValueError, match="seed 1 has domains"):
        aggregate_seeds([_run(0, 1.0, 2.0, 2.0), bad])
    with pytest.raises(ValueError, match="no runs"):
        aggregate_seeds([])


def test_comparison_against_twice_the_standard_error():
    clear = compare_methods("Rein", [14.0, 14.2, 13.8], "Frozen", [13.0, 13.2, 12.8])
    assert clear.difference == pytest.approx(1.0)
    assert clear.standard_error == pytest.approx(math.sqrt(2 * 0.04 / 3))
    assert clear.exceeds_spread is True
    assert "exceeds twice its standard error" in clear.sentence()
    assert clear.sentence().startswith("Rein - Frozen, DG avg: +1.0 mIoU")

    noisy = compare_methods("Rein", [15.0, 13.0, 14.0], "Frozen", [12.0, 14.5, 13.1])
    assert noisy.exceeds_spread is False
    assert "within twice its standard error" in noisy.sentence()

    single = compare_methods("Rein", [14.0], "Frozen", [13.0])
    assert single.exceeds_spread is None and math.isnan(single.standard_error)
    assert "one seed only" in single.sentence()
    assert single.to_dict()["difference"] == pytest.approx(1.0)
