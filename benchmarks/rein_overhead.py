"""What Rein adds to a frozen ViT: per block, and for the whole segmentor, in one process.

1. Per block: one frozen block alone vs. the same block followed by Rein, in inference and in
   training (forward + backward, gradients flowing through the frozen block as in Rein
   training), and Rein's parts (token attention, ``mlp_delta_f``) timed alone.
2. Whole model: Rein vs. the frozen baseline, whole-image inference, the two models alternating
   so that both see the same machine load.

    python benchmarks/rein_overhead.py --backbone l --size 512
    python benchmarks/rein_overhead.py --backbone l --size 512 --precision fp32 bf16

``--precision fp32 bf16`` measures both ``model.precision`` modes in the same run (bf16: the
frozen Linear weights stored in bfloat16, bf16 autocast) and adds a table of bf16 / fp32
ratios.
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


def _autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def per_block(name: str, size: int, reps: int, precision: str = "fp32") -> dict[str, float]:
    """Time one frozen block with and without Rein; return the medians (ms) and print them.

    ``precision="bf16"`` stores the block's Linear weights in bfloat16 (as ``model.precision:
    bf16`` does for the backbone) and runs under bf16 autocast; Rein's weights stay fp32.
    """
    from types import SimpleNamespace

    import timm

    from rein.reins import LoRAReins
    from rein.segmentor import store_frozen_weights

    torch.manual_seed(0)
    vit = timm.create_model(name, pretrained=False, img_size=size, patch_size=16)
    vit.requires_grad_(False).eval()
    block, dim = vit.blocks[0], vit.embed_dim
    if precision == "bf16":
        store_frozen_weights(SimpleNamespace(backbone=block), torch.bfloat16)  # type: ignore[arg-type]
    tokens = 1 + (size // 16) ** 2
    reins = LoRAReins(num_layers=1, embed_dims=dim, patch_size=16, token_length=100)
    x = torch.randn(1, tokens, dim, requires_grad=True)  # gradients flow through the block

    def train(with_rein: bool) -> None:
        with _autocast(precision):
            y = block(x)
            if with_rein:
                y = reins(y, 0, num_prefix_tokens=1)
        y.float().square().mean().backward()

    with torch.inference_mode(), _autocast(precision):
        xi = x.detach()
        patches = xi[:, 1:]
        tok = reins.get_tokens(0)
        t = {
            "infer_block": median_ms(lambda: block(xi), reps),
            "infer_both": median_ms(lambda: reins(block(xi), 0, num_prefix_tokens=1), reps),
            "attn": median_ms(lambda: (patches @ tok.t() * dim**-0.5).softmax(-1), reps),
            "mlp": median_ms(lambda: reins.mlp_delta_f(patches), reps),
        }
    t["train_block"] = median_ms(lambda: train(False), reps)
    t["train_both"] = median_ms(lambda: train(True), reps)

    print(f"# one block of {name} ({tokens} tokens x {dim} ch), {precision}, ms, median of {reps}")
    print("| | block | block + Rein | Rein adds |")
    print("|---|---:|---:|---:|")
    for what, a, b in (
        ("inference", t["infer_block"], t["infer_both"]),
        ("training (fwd + bwd)", t["train_block"], t["train_both"]),
    ):
        print(f"| {what} | {a:.1f} | {b:.1f} | {b - a:.1f} ({(b - a) / a:.0%}) |")
    print(
        f"\nRein parts, inference: token attention + softmax {t['attn']:.1f} ms, "
        f"mlp_delta_f {t['mlp']:.1f} ms\n"
    )
    return t


def whole_model(name: str, size: int, reps: int, precision: str = "fp32") -> dict[str, float]:
    """Rein vs frozen whole-image inference (s, alternating); return the medians and print them."""
    from rein.config import default_config
    from rein.segmentor import build_segmentor

    torch.manual_seed(0)
    models = {}
    for method in ("rein", "frozen"):
        cfg = default_config()
        cfg.model.tuning = method
        cfg.model.backbone.name = name
        cfg.model.backbone.img_size = size
        cfg.model.precision = precision
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
    out = {m: statistics.median(times[m]) for m in ("rein", "frozen")}
    rein, frozen = out["rein"], out["frozen"]
    print(
        f"# whole segmentor, {size}x{size}, {precision}, inference, alternating, median of {reps}"
    )
    print("| method | inference s | vs frozen |")
    print("|---|---:|---:|")
    print(f"| rein | {rein:.2f} | {rein / frozen:.2f}x |")
    print(f"| frozen | {frozen:.2f} | 1.00x |\n")
    return out


def print_ratios(blocks: dict[str, dict[str, float]], whole: dict[str, dict[str, float]]) -> None:
    """The bf16 / fp32 table of every timing measured in both precisions."""
    a, b = blocks["fp32"], blocks["bf16"]
    rows = [
        ("block, inference", a["infer_block"], b["infer_block"]),
        ("block + Rein, inference", a["infer_both"], b["infer_both"]),
        ("block, training", a["train_block"], b["train_block"]),
        ("block + Rein, training", a["train_both"], b["train_both"]),
        ("Rein token attention", a["attn"], b["attn"]),
        ("Rein mlp_delta_f", a["mlp"], b["mlp"]),
    ]
    rows += [
        (f"whole segmentor, {m}, inference", whole["fp32"][m], whole["bf16"][m])
        for m in whole["fp32"]
    ]
    print("# bf16 / fp32 (same run)")
    print("| what | fp32 | bf16 | bf16 / fp32 |")
    print("|---|---:|---:|---:|")
    for what, x, y in rows:
        unit = " s" if what.startswith("whole") else " ms"
        print(f"| {what} | {x:.2f}{unit} | {y:.2f}{unit} | {y / x:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="s")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--precision", nargs="+", default=["fp32"], choices=("fp32", "bf16"), help="model.precision"
    )
    args = parser.parse_args()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    name = BACKBONES[args.backbone]
    blocks = {p: per_block(name, args.size, args.reps, p) for p in args.precision}
    whole = {p: whole_model(name, args.size, max(3, args.reps - 1), p) for p in args.precision}
    if {"fp32", "bf16"} <= set(args.precision):
        print_ratios(blocks, whole)


if __name__ == "__main__":
    main()
