"""``train.compile`` measured: a training step eager against ``torch.compile``, in one process.

The step is what the trainer runs with ``train.compile: true``: the segmentor's forward through
``torch.compile`` (via :func:`rein.engine.compile.compile_forward`), then the Mask2Former loss,
backward and AdamW step eagerly. It prints the first compiled call's time (tracing and code
generation; inductor caches its kernels on disk, so a second run of this script compiles
faster), then the median step time of each mode and their ratio. Eager and compiled steps
alternate after the compile, so drifts of a shared machine hit both alike.

    python benchmarks/compile_step.py --backbone s --size 224 --steps 5
    python benchmarks/compile_step.py --backbone s --size 224 --precision bf16 --backend inductor
"""

from __future__ import annotations

import argparse
import statistics
import time

BACKBONES = {
    "s": "vit_small_patch14_dinov2",
    "b": "vit_base_patch14_dinov2",
    "l": "vit_large_patch14_dinov2",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="s")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--method", default="rein")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    args = parser.parse_args()

    import torch

    from rein.config import default_config
    from rein.engine.compile import compile_forward
    from rein.engine.optim import build_optimizer
    from rein.segmentor import build_segmentor

    torch.manual_seed(0)
    cfg = default_config()
    cfg.model.tuning = args.method
    cfg.model.backbone.name = BACKBONES[args.backbone]
    cfg.model.backbone.img_size = args.size
    cfg.model.precision = args.precision
    model = build_segmentor(cfg.model, load_weights=False).train()
    optimizer = build_optimizer(model, cfg.optim)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 19, (args.batch, args.size, args.size))

    def step(forward) -> float:
        t = time.perf_counter()
        cls_preds, mask_preds = forward(x)
        loss = model.criterion(cls_preds, mask_preds, y, generator=torch.Generator().manual_seed(0))
        loss["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    # inductor goes through the trainer's own wrapper; other backends (eager, aot_eager) directly.
    if args.backend == "inductor":
        compiled = compile_forward(model)
    else:
        compiled = torch.compile(model, backend=args.backend)
    step(model)  # eager warm-up
    first = step(compiled)  # tracing + code generation (+ the step itself)
    step(compiled)  # a second call may recompile once (dynamic shapes, grad mode)
    eager, comp = [], []
    for _ in range(args.steps):
        eager.append(step(model))
        comp.append(step(compiled))
    e, c = statistics.median(eager), statistics.median(comp)
    print(
        f"# {BACKBONES[args.backbone]} {args.method}, {args.size}x{args.size}, batch {args.batch}, "
        f"model.precision {args.precision}, backend {args.backend}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print("| mode | first call s | step s (median) | vs eager |")
    print("|---|---:|---:|---:|")
    print(f"| eager | - | {e:.3f} | 1.00x |")
    print(f"| compiled | {first:.1f} | {c:.3f} | {c / e:.2f}x |")


if __name__ == "__main__":
    main()
