"""Golden outputs of tiny models of every backbone family and tuning method (see golden.py).

The records were made from the implementation that matches the official code; a change that
moves any feature, query, decoder prediction, seg score, loss or gradient by more than 1e-5
(relative) fails here. Regenerate only on purpose: ``python tests/golden.py --write``, with a
note in the commit message saying why the numbers changed.
"""

from __future__ import annotations

import json

import pytest
import torch
from golden import CASES, NEEDS, case_config, compare, golden_path, load_golden, outputs_in, split


def _assert_matches(ours: dict, golden: dict, what: str) -> None:
    report = compare(ours, golden)
    bad = {k: v for k, v in report.items() if not v <= 1.0}
    worst = sorted(bad.items(), key=lambda kv: -kv[1])[:8]
    assert not bad, f"{what}: {len(bad)} of {len(report)} outputs differ from the record: " + (
        ", ".join(f"{k} ({v:.3g} x tolerance)" for k, v in worst)
    )


@pytest.mark.parametrize("case", list(CASES))
def test_matches_the_golden_record(case: str) -> None:
    if case in NEEDS:
        pytest.importorskip(NEEDS[case])
    assert golden_path(case).is_file(), f"{golden_path(case)} is missing"
    golden, meta = load_golden(case)
    assert json.loads(meta["config"]) == case_config(case), (
        "the case's config changed since it was recorded: regenerate deliberately"
    )
    forward, grads = split(golden)
    _assert_matches(split(outputs_in(case, torch.float32))[0], forward, f"{case} (float32)")
    _assert_matches(split(outputs_in(case, torch.float64))[1], grads, f"{case} gradients")
