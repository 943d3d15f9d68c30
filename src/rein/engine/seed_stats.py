"""Results over several seeds: mean and spread per domain, and whether two methods differ.

A single seed says little when methods are within about 1 mIoU: the sign of the difference can
flip with the seed. :func:`aggregate_seeds` turns the per-seed results of one method into means
and sample standard deviations; :func:`compare_methods` tells whether the difference of two
methods' means exceeds twice its standard error (the spread of both methods over their seeds).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["aggregate_seeds", "compare_methods", "Comparison", "mean_std", "format_mean_std"]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the std is NaN for fewer than 2 values."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, math.nan
    mean = statistics.fmean(vals)
    return mean, statistics.stdev(vals) if len(vals) > 1 else math.nan


def format_mean_std(mean: float, std: float, digits: int = 1) -> str:
    """``"34.5 ± 0.6"``; just the mean when there is no spread (one seed)."""
    if math.isnan(mean):
        return "-"
    if math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def aggregate_seeds(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One method's per-seed results -> means and spreads.

    Each run holds ``seed``, ``mIoU`` (domain -> %), ``dg_avg``, ``source`` and the run's
    costs (``sec_per_iter``, ``train_seconds``, ``eval_seconds``, parameter counts). The result
    has the same keys, as means over the seeds, plus ``mIoU_std``, ``dg_avg_std``,
    ``source_std``, ``seeds`` and every run under ``runs``.
    """
    if not runs:
        raise ValueError("no runs to aggregate")
    domains = list(runs[0]["mIoU"])
    for r in runs[1:]:
        if list(r["mIoU"]) != domains:
            raise ValueError(f"seed {r.get('seed')} has domains {list(r['mIoU'])}, not {domains}")
    out: dict[str, Any] = {"seeds": [r.get("seed") for r in runs]}
    means, stds = {}, {}
    for d in domains:
        means[d], stds[d] = mean_std([r["mIoU"][d] for r in runs])
    out["mIoU"], out["mIoU_std"] = means, stds
    for key in ("dg_avg", "source"):
        out[key], out[f"{key}_std"] = mean_std([r[key] for r in runs])
    for key in ("sec_per_iter", "train_seconds", "eval_seconds"):
        out[key] = statistics.fmean(float(r[key]) for r in runs)
    for key in ("trainable_params", "total_params"):
        out[key] = runs[0][key]
    out["runs"] = [dict(r) for r in runs]
    return out


@dataclass(frozen=True)
class Comparison:
    """Method ``a`` minus method ``b`` on one metric, over their seeds."""

    a: str
    b: str
    difference: float  # mean(a) - mean(b)
    standard_error: float  # sqrt(std_a^2 / n_a + std_b^2 / n_b); NaN with a single seed
    exceeds_spread: bool | None  # |difference| > 2 standard errors; None: no spread measured

    def sentence(self, metric: str = "DG avg") -> str:
        """One line for the console and results.md."""
        head = f"{self.a} - {self.b}, {metric}: {self.difference:+.1f} mIoU"
        if self.exceeds_spread is None:
            return f"{head}; one seed only, so its spread is unknown: read no ranking into it"
        verdict = (
            "exceeds twice its standard error: a difference beyond the seeds' spread"
            if self.exceeds_spread
            else "is within twice its standard error: no difference beyond the seeds' spread"
        )
        return f"{head} (standard error {self.standard_error:.1f} over the seeds) {verdict}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_methods(
    a: str, values_a: Sequence[float], b: str, values_b: Sequence[float]
) -> Comparison:
    """Compare two methods' per-seed values (e.g. their DG averages)."""
    mean_a, std_a = mean_std(values_a)
    mean_b, std_b = mean_std(values_b)
    diff = mean_a - mean_b
    if math.isnan(std_a) or math.isnan(std_b):
        return Comparison(a, b, diff, math.nan, None)
    se = math.sqrt(std_a**2 / len(values_a) + std_b**2 / len(values_b))
    return Comparison(a, b, diff, se, abs(diff) > 2.0 * se)
