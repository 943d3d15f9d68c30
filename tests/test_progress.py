"""Progress output: tqdm on a terminal, whole lines every few percent in a log."""

from __future__ import annotations

import io

from rein.progress import LineProgress, format_seconds, progress_bar, progress_iter


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_format_seconds():
    assert format_seconds(0.4) == "0s"
    assert format_seconds(42) == "42s"
    assert format_seconds(187) == "3m07s"
    assert format_seconds(3720) == "1h02m"


def test_line_every_five_percent_with_eta_and_postfix():
    out, clock = io.StringIO(), FakeClock()
    bar = LineProgress(600, "train rein", stream=out, clock=clock)
    for i in range(600):
        clock.t = 0.5 * (i + 1)
        bar.update(1)
        bar.set_postfix(loss=f"{1.0 / (i + 1):.3f}")
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 20  # one per 5 %, none added by close at 100 %
    assert "\r" not in out.getvalue()
    assert lines[0] == "train rein: 30/600 (5%) 15s elapsed, ETA 4m45s, loss=0.034"
    assert lines[-1] == "train rein: 600/600 (100%) 5m00s elapsed, loss=0.002"


def test_resumed_run_counts_from_initial_and_estimates_from_its_own_steps():
    out, clock = io.StringIO(), FakeClock()
    bar = LineProgress(100, "x", initial=50, stream=out, clock=clock, every_percent=10)
    for _ in range(10):
        clock.t += 1.0
        bar.update(1)
    bar.close()
    assert out.getvalue().splitlines() == ["x: 60/100 (60%) 10s elapsed, ETA 40s"]


def test_stopped_between_lines_prints_where_it_stopped():
    out = io.StringIO()
    bar = LineProgress(100, "x", stream=out, clock=FakeClock(), every_percent=10)
    bar.update(13)
    bar.close()
    bar.close()  # closing twice prints nothing more
    lines = out.getvalue().splitlines()
    assert [line.split(" ")[1] for line in lines] == ["13/100", "13/100"]


def test_transient_bar_prints_one_line_at_the_end():
    out = io.StringIO()
    items = list(progress_iter(range(40), "eval fog", leave=False, stream=out))
    assert items == list(range(40))
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eval fog: 40/40 (100%)")


def test_unknown_total_prints_every_n_steps():
    out = io.StringIO()
    bar = LineProgress(None, "render", stream=out, clock=FakeClock(), every_steps=10)
    bar.update(25)
    bar.close()
    assert out.getvalue().splitlines() == ["render: 25 0s elapsed", "render: 25 0s elapsed"]


def test_progress_bar_is_tqdm_on_a_terminal_and_lines_otherwise():
    from tqdm import tqdm

    term = Terminal()
    bar = progress_bar(10, "x", stream=term)
    assert isinstance(bar, tqdm)
    bar.update(10)
    bar.close()
    assert "\r" in term.getvalue()
    assert isinstance(progress_bar(10, "x", stream=io.StringIO()), LineProgress)


def test_trainer_progress_in_a_log_is_whole_lines(tmp_path, capsys):
    """A real (tiny) training run with progress on and stderr captured (not a terminal)."""
    from dataclasses import asdict

    from conftest import tiny_model_config

    from rein.config import config_from_dict
    from rein.engine.trainer import train

    cfg = config_from_dict(
        {
            "name": "tiny",
            "output_dir": str(tmp_path),
            "model": asdict(tiny_model_config()),
            "data": {
                "train": [{"name": "synthetic", "options": {"num_images": 4, "size": [64, 64]}}],
                "crop_size": 64,
                "batch_size": 2,
                "num_workers": 0,
            },
            "train": {"max_iters": 4, "val_interval": 0, "checkpoint_interval": 4},
        }
    )
    train(cfg, resume=False, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("train tiny:")]
    assert [line.split(" ")[2] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]


def test_rein_progress_lines_overrides_a_terminal(monkeypatch):
    monkeypatch.setenv("REIN_PROGRESS", "lines")
    assert isinstance(progress_bar(10, "x", stream=Terminal()), LineProgress)
