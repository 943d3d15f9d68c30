"""Which kernels of a Rein training step gain from bf16 on this machine, at DINOv2-L 512 shapes.

Times forward and backward, fp32 against bf16 (median of --repeats after a warm-up), of:

* a block's linear layer (1370 tokens, 1024 -> 4096), the bulk of the backbone's matmuls;
* the block's attention, 16 heads of 64 over 1370 tokens: ``F.scaled_dot_product_attention``
  as torch dispatches it (the flash-attention kernel on CPU), its math backend, and the
  explicit ``softmax(q k^T) v``;
* the deformable attention's ``F.grid_sample`` at the 1/8 level of a 512 image (8 heads x 32
  channels, 64x64 values, 5376 queries x 4 points), which bf16 autocast runs in fp32 anyway.

    python benchmarks/bf16_kernels.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

TOKENS, HEADS, HEAD_DIM = 1370, 16, 64


def _time(fn: Callable[..., Tensor], inputs: list[Tensor], repeats: int) -> tuple[float, float]:
    """Median forward and backward seconds of ``fn(*inputs).sum().backward()``."""
    fwd, bwd = [], []
    for i in range(repeats + 1):
        for t in inputs:
            t.grad = None
        t0 = time.perf_counter()
        out = fn(*inputs)
        t1 = time.perf_counter()
        out.float().sum().backward()
        t2 = time.perf_counter()
        if i:  # the first call is the warm-up
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    return statistics.median(fwd), statistics.median(bwd)


def _explicit_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return ((q * HEAD_DIM**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v


def _math_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q, k, v)


def _grid_sample(value: Tensor, grid: Tensor) -> Tensor:
    return F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(
        f"# CPU capability {torch.backends.cpu.get_cpu_capability()}, AVX512-BF16 "
        f"{torch.cpu._is_avx512_bf16_supported()}, AMX {torch.cpu._is_amx_tile_supported()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, scale: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=gen) * scale

    weight = rand(4096, 1024, scale=0.02)
    cases: list[tuple[str, Callable[..., Tensor], list[Tensor]]] = [
        ("linear 1024->4096", lambda x, w: F.linear(x, w), [rand(1, TOKENS, 1024), weight]),
    ]
    qkv = [rand(1, HEADS, TOKENS, HEAD_DIM) for _ in range(3)]
    cases += [
        ("SDPA (default kernel)", F.scaled_dot_product_attention, qkv),
        ("SDPA (math backend)", _math_attention, qkv),
        ("softmax(q k^T) v", _explicit_attention, qkv),
    ]
    grid = torch.rand(8, 5376, 4, 2, generator=gen) * 2 - 1
    cases.append(("grid_sample", _grid_sample, [rand(8, 32, 64, 64), grid]))

    print(
        "| kernel | fp32 fwd ms | bf16 fwd ms | bf16/fp32 | fp32 bwd ms | bf16 bwd ms | bf16/fp32 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, fn, inputs in cases:
        row = {}
        for dtype in (torch.float32, torch.bfloat16):
            typed = [t.to(dtype).requires_grad_() for t in inputs]
            row[dtype] = _time(fn, typed, args.repeats)
        (f32f, f32b), (bff, bfb) = row[torch.float32], row[torch.bfloat16]
        print(
            f"| {name} | {f32f * 1e3:.1f} | {bff * 1e3:.1f} | {bff / f32f:.2f}x | "
            f"{f32b * 1e3:.1f} | {bfb * 1e3:.1f} | {bfb / f32b:.2f}x |"
        )


if __name__ == "__main__":
    main()
