"""The Mask2Former head's training step alone (forward, loss, backward), fp32 and bf16, in one run.

The head is the official DINOv2-L configuration (4 levels of 1024 channels at strides 4-32, 256
feature channels, 6 deformable encoder layers, 9 decoder layers, 100 queries) and the loss its
12,544 importance-sampled points per mask. The inputs are random features and a random blocky
label map, so that the backbone's cost is left out. Prints the seconds of each part per
precision (the best of ``--steps`` after one warm-up) and the bf16/fp32 ratios.

    python benchmarks/head_step.py --size 512 --batch 2 --steps 2

To compare two versions of the code, time this script under each with ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import time

import torch

from rein.heads.mask2former import Mask2FormerHead
from rein.losses import Mask2FormerCriterion


def _inputs(size: int, batch: int, channels: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    feats = [torch.randn(batch, channels, size // s, size // s) for s in (4, 8, 16, 32)]
    cells = torch.randint(0, 19, (batch, size // 8, size // 8))
    labels = cells.repeat_interleave(8, 1).repeat_interleave(8, 2)
    return feats, labels


def time_step(
    head: Mask2FormerHead,
    criterion: Mask2FormerCriterion,
    feats: list[torch.Tensor],
    queries: torch.Tensor,
    labels: torch.Tensor,
    precision: str,
) -> tuple[float, float, float]:
    """Seconds of (forward, loss, backward) of one step."""
    head.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    if precision == "bf16":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cls_preds, mask_preds = head(feats, queries)
        cls_preds = [c.float() for c in cls_preds]
        mask_preds = [m.float() for m in mask_preds]
    else:
        cls_preds, mask_preds = head(feats, queries)
    t1 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    loss = criterion(cls_preds, mask_preds, labels, generator=gen)["loss"]
    t2 = time.perf_counter()
    loss.backward()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps (after 1 warm-up)")
    parser.add_argument(
        "--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"]
    )
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    head = Mask2FormerHead([1024] * 4, num_queries=100)
    criterion = Mask2FormerCriterion()
    feats, labels = _inputs(args.size, args.batch, 1024)
    queries = torch.randn(args.batch, 100, 256, requires_grad=True)
    rows = {}
    for precision in args.precision:
        time_step(head, criterion, feats, queries, labels, precision)  # warm-up
        runs = [
            time_step(head, criterion, feats, queries, labels, precision) for _ in range(args.steps)
        ]
        rows[precision] = [min(r[i] for r in runs) for i in range(3)]
    print(
        f"# Mask2Former head step, {args.size}x{args.size}, batch {args.batch}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print("| precision | forward s | loss s | backward s | step s |")
    print("|---|---:|---:|---:|---:|")
    for precision, (f, lo, b) in rows.items():
        print(f"| {precision} | {f:.2f} | {lo:.2f} | {b:.2f} | {f + lo + b:.2f} |")
    if "fp32" in rows and "bf16" in rows:
        ratio = [b / f for b, f in zip(rows["bf16"], rows["fp32"])]
        step = sum(rows["bf16"]) / sum(rows["fp32"])
        print(
            f"| bf16 / fp32 | {ratio[0]:.2f}x | {ratio[1]:.2f}x | {ratio[2]:.2f}x | {step:.2f}x |"
        )


if __name__ == "__main__":
    main()
