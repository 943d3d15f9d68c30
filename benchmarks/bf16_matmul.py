"""Whether this CPU computes bf16 matmuls natively: one 1025x1024 @ 1024x4096 product (a DINOv2-L
fc1 on a 512-px image) in fp32 and in bf16, each timed --repeats times after a warm-up.

    python benchmarks/bf16_matmul.py --repeats 2
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    a, b = torch.randn(1025, 1024), torch.randn(1024, 4096)
    print(
        f"# CPU capability {torch.backends.cpu.get_cpu_capability()}, AVX512-BF16 "
        f"{torch.cpu._is_avx512_bf16_supported()}, AMX {torch.cpu._is_amx_tile_supported()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print("| dtype | seconds per product (each run) |")
    print("|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        torch.mm(x, y)  # warm-up
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            torch.mm(x, y)
            times.append(time.perf_counter() - t)
        print(f"| {dtype} | {', '.join(f'{s:.3f}' for s in times)} |")


if __name__ == "__main__":
    main()
