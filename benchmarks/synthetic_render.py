"""Render time of the built-in synthetic street world, per style (a table, not a test).

The demo and the synthetic val sets render scenes on the fly; this shows what one costs.
Each style is warmed up once, then timed over ``--reps`` rounds of ``--scenes`` scenes (distinct
seeds); the table gives the best and the median per-scene time.

    python benchmarks/synthetic_render.py --size 128 128 --scenes 10 --reps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

from rein.data import SOURCE_STYLE, STYLES, render_scene


def time_style(style: str, size: tuple[int, int], scenes: int, reps: int) -> list[float]:
    """Per-scene seconds of each round of ``scenes`` renders."""
    render_scene(0, size, style)  # warm-up
    rounds = []
    for rep in range(reps):
        t0 = time.perf_counter()
        for i in range(scenes):
            render_scene(1000 + rep * scenes + i, size, style)
        rounds.append((time.perf_counter() - t0) / scenes)
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, nargs=2, default=[128, 128], metavar=("H", "W"))
    parser.add_argument("--scenes", type=int, default=10, help="scenes per timed round")
    parser.add_argument("--reps", type=int, default=5, help="timed rounds per style")
    args = parser.parse_args()
    size = (args.size[0], args.size[1])
    print(f"synthetic scenes of {size[0]}x{size[1]} px, {args.reps} x {args.scenes} per style")
    print(f"{'style':<12}{'best ms':>10}{'median ms':>12}{'scenes/s':>10}")
    for style in STYLES:
        rounds = time_style(style, size, args.scenes, args.reps)
        best, median = min(rounds), statistics.median(rounds)
        name = f"{style} (src)" if style == SOURCE_STYLE else style
        print(f"{name:<12}{best * 1e3:>10.2f}{median * 1e3:>12.2f}{1 / median:>10.0f}")


if __name__ == "__main__":
    main()
