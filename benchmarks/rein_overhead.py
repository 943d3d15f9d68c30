"""What Rein adds to a frozen ViT: per block, and for the whole segmentor, in one process.

1. Per block: one frozen block alone vs. the same block followed by Rein, in inference and in
   training (forward + backward, gradients flowing through the frozen block as in Rein
   training), and Rein's parts (token attention, ``mlp_delta_f``) timed alone.
2. Whole model: Rein vs. the frozen baseline, whole-image inference, the two models alternating
   so that both see the same machine load.

    python benchmarks/rein_overhead.py --backbone l --size 512
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from tuning_methods import BACKBONES  # this folder is on sys.path when run as a script


def median_ms(fn: Callable[[], object], reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def per_block(name: str, size: int, reps: int) -> None:
    import timm

    from rein.reins import LoRAReins

    torch.manual_seed(0)
    vit = timm.create_model(name, pretrained=False, img_size=size, patch_size=16)
    vit.requires_grad_(False).eval()
    block, dim = vit.blocks[0], vit.embed_dim
    tokens = 1 + (size // 16) ** 2
    reins = LoRAReins(num_layers=1, embed_dims=dim, patch_size=16, token_length=100)
    x = torch.randn(1, tokens, dim, requires_grad=True)  # gradients flow through the block

    def train(with_rein: bool) -> None:
        y = block(x)
        if with_rein:
            y = reins(y, 0, num_prefix_tokens=1)
        y.square().mean().backward()

    with torch.inference_mode():
        xi = x.detach()
        patches = xi[:, 1:]
        tok = reins.get_tokens(0)
        infer_block = median_ms(lambda: block(xi), reps)
        infer_both = median_ms(lambda: reins(block(xi), 0, num_prefix_tokens=1), reps)
        attn = median_ms(lambda: (patches @ tok.t() * dim**-0.5).softmax(-1), reps)
        mlp = median_ms(lambda: reins.mlp_delta_f(patches), reps)
    train_block = median_ms(lambda: train(False), reps)
    train_both = median_ms(lambda: train(True), reps)

    print(f"# one block of {name} ({tokens} tokens x {dim} ch), ms, median of {reps}")
    print("| | block | block + Rein | Rein adds |")
    print("|---|---:|---:|---:|")
    for what, a, b in (
        ("inference", infer_block, infer_both),
        ("training (fwd + bwd)", train_block, train_both),
    ):
        print(f"| {what} | {a:.1f} | {b:.1f} | {b - a:.1f} ({(b - a) / a:.0%}) |")
    print(
        f"\nRein parts, inference: token attention + softmax {attn:.1f} ms, mlp_delta_f {mlp:.1f} ms"
    )


def whole_model(name: str, size: int, reps: int) -> None:
    from rein.config import default_config
    from rein.segmentor import build_segmentor

    torch.manual_seed(0)
    models = {}
    for method in ("rein", "frozen"):
        cfg = default_config()
        cfg.model.tuning = method
        cfg.model.backbone.name = name
        cfg.model.backbone.img_size = size
        models[method] = build_segmentor(cfg.model, load_weights=False).eval()
    x = torch.randn(1, 3, size, size)
    times: dict[str, list[float]] = {m: [] for m in models}
    with torch.inference_mode():
        for model in models.values():
            model.seg_scores(x)
        for _ in range(reps):
            for method, model in models.items():
                t = time.perf_counter()
                model.seg_scores(x)
                times[method].append(time.perf_counter() - t)
    rein, frozen = (statistics.median(times[m]) for m in ("rein", "frozen"))
    print(f"\n# whole segmentor, {size}x{size}, inference, alternating, median of {reps}")
    print("| method | inference s | vs frozen |")
    print("|---|---:|---:|")
    print(f"| rein | {rein:.2f} | {rein / frozen:.2f}x |")
    print(f"| frozen | {frozen:.2f} | 1.00x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="s")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    per_block(BACKBONES[args.backbone], args.size, args.reps)
    whole_model(BACKBONES[args.backbone], args.size, max(3, args.reps - 1))


if __name__ == "__main__":
    main()
