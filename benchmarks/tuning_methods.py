"""Speed, memory and parameters of each tuning method, side by side in one run.

For every method (rein, frozen, full, lora, vpt, adaptformer, soma, recyclelora, fada, set) on
the same backbone, head and input size, one fresh process builds the model with random weights and
measures:

* training step time: forward + Mask2Former loss + backward + AdamW step (median of --steps);
* peak training memory: the process's peak RSS during the training steps minus its RSS
  before them (activations, gradients and optimizer state; CPU) or CUDA peak allocated;
* inference time: one whole-image forward to class scores (median of --infer-steps), and for
  the weight-space adapters (lora, soma, recyclelora) again after ``merge_model`` folds them
  into the frozen weights (the "merged" column);
* trainable parameters, and the build time (SoMA's SVDs and RecycleLoRA's QRs run at build;
  a second run reads them from the init cache, ``$REIN_CACHE/adapter_init``).

SoMA and RecycleLoRA use their official options (SoMA: rank 16 on blocks >= 8; RecycleLoRA:
r_max 36 on every block) and, like every method here, the same 100 learned / Rein queries.
FADA and SET run in their default (official) modes, wavelet_mode / fft_mode faithful; a square
input keeps FADA's token grid square, as its faithful mode needs.

Ratios: training time and memory relative to full fine-tuning, inference relative to the
frozen backbone. Each method runs in its own process, one after another, so their memory
peaks do not mix. Absolute times are noisy on a shared machine; compare the ratios.

    python benchmarks/tuning_methods.py --backbone l --size 512
    python benchmarks/tuning_methods.py --backbone l --methods rein frozen full --precision fp32 bf16
    python benchmarks/tuning_methods.py --backbone s --sweep
    python benchmarks/tuning_methods.py --backbone l --methods --profile --precision bf16 fp32

``--precision fp32 bf16`` measures every method in both ``model.precision`` modes (bf16: frozen
weights stored in bfloat16, bf16 autocast) and adds a table of the bf16 / fp32 ratios.
``--profile`` adds a ``torch.profiler`` breakdown of one Rein training step per precision: by
region (backbone, head, loss, backward, optimizer), by operator family and the top operators;
``--methods`` with no names skips the method tables.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import resource
import statistics
import time

BACKBONES = {
    "s": "vit_small_patch14_dinov2",
    "b": "vit_base_patch14_dinov2",
    "l": "vit_large_patch14_dinov2",
    "g": "vit_giant_patch14_dinov2",
}
METHODS = (
    "rein",
    "frozen",
    "full",
    "lora",
    "vpt",
    "adaptformer",
    "soma",
    "recyclelora",
    "fada",
    "set",
)
MERGEABLE = ("lora", "soma", "recyclelora")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(
    method: str,
    backbone: str,
    size: int,
    steps: int,
    token_length: int,
    device: str,
    batch: int,
    infer_steps: int,
    queue,
    precision: str = "fp32",
    checkpointing: bool = False,
) -> None:
    """Run in a child process; put a result dict on ``queue``."""
    import torch

    from rein.config import default_config
    from rein.engine.optim import build_optimizer
    from rein.segmentor import build_segmentor

    torch.manual_seed(0)
    cfg = default_config()
    cfg.model.tuning = method
    cfg.model.backbone.name = BACKBONES[backbone]
    cfg.model.backbone.img_size = size
    cfg.model.rein.token_length = token_length
    cfg.model.head.num_queries = token_length
    cfg.model.precision = precision
    cfg.model.backbone.checkpointing = checkpointing
    t_build = time.perf_counter()
    model = build_segmentor(cfg.model, load_weights=False).to(device)
    build_s = time.perf_counter() - t_build
    optimizer = build_optimizer(model, cfg.optim)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.full((batch, size, size), 255, dtype=torch.long, device=device)
    for k, cls in enumerate((0, 2, 8, 10, 13)):  # a few stripes of classes
        y[:, :, k * size // 5 : (k + 1) * size // 5] = cls
    cuda = device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def time_inference() -> float:
        model.eval()
        times = []
        with torch.inference_mode():
            for i in range(infer_steps + 1):
                sync()
                t = time.perf_counter()
                model.seg_scores(x)
                sync()
                if i:
                    times.append(time.perf_counter() - t)
        return statistics.median(times)

    # Inference first (no optimizer state or gradients yet).
    infer_s = time_inference()

    model.train()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base_rss = _rss_mib()
    train = []
    for i in range(steps + 1):
        g = torch.Generator(device=device).manual_seed(i)
        sync()
        t = time.perf_counter()
        loss = model.loss(x, y, generator=g)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if i:
            train.append(time.perf_counter() - t)
    mem = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_mib() - base_rss
    merged_s = None
    if method in MERGEABLE:
        from rein.methods import merge_model

        merge_model(model)
        merged_s = time_inference()
    queue.put(
        {
            "method": method,
            "precision": precision,
            "trainable": trainable,
            "train_s": statistics.median(train),
            "train_mem_mib": mem,
            "infer_s": infer_s,
            "merged_s": merged_s,
            "build_s": build_s,
        }
    )


# Operator families for the profile summary: the first family with a pattern in an op's name
# wins ("=name": that exact name only).
OP_FAMILIES = (
    (
        "matrix products",
        (
            "aten::mm",
            "aten::addmm",
            "aten::bmm",
            "aten::linear",
            "aten::matmul",
            "aten::baddbmm",
            "aten::_mkldnn",
            "mkldnn",
            "aten::convolution",
            "aten::_convolution",
            "aten::mkldnn_convolution",
        ),
    ),
    ("attention (SDPA)", ("scaled_dot_product", "_flash_attention", "_efficient_attention")),
    (
        "copies and casts",
        (
            "=aten::copy_",
            "=aten::to",
            "=aten::_to_copy",
            "=aten::clone",
            "=aten::contiguous",
            "=aten::cat",
            "=aten::stack",
            "=aten::index",
            "=aten::index_put_",
            "=aten::fill_",
            "=aten::zero_",
            "=aten::empty",
            "=aten::empty_strided",
            "=aten::zeros",
        ),
    ),
    ("layer norm", ("layer_norm", "group_norm")),
    ("GELU / softmax", ("gelu", "softmax", "sigmoid")),
    ("grid_sample", ("grid_sampler",)),
    (
        "point sampling and loss",
        ("topk", "uniform_", "log_sigmoid", "binary_cross_entropy", "nll_loss", "gather"),
    ),
    (
        "elementwise",
        (
            "aten::mul",
            "aten::add",
            "aten::sub",
            "aten::div",
            "aten::pow",
            "aten::sum",
            "aten::mean",
            "aten::abs",
            "aten::sqrt",
            "aten::exp",
            "aten::where",
            "aten::clamp",
            "aten::neg",
            "aten::lerp",
            "aten::addcmul",
            "aten::addcdiv",
            "aten::_foreach",
        ),
    ),
)


def _family(name: str) -> str:
    for family, patterns in OP_FAMILIES:
        if any(name == p[1:] if p[0] == "=" else p in name for p in patterns):
            return family
    return "other"


def profile(method: str, backbone: str, size: int, precision: str = "fp32") -> None:
    """Print where the time of one training step goes (torch.profiler, CPU).

    Three tables: the step's regions (backbone forward, head forward, loss, backward,
    optimizer), the operator families by self CPU time, and the top operators.
    """
    import torch
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as tprofile

    from rein.config import default_config
    from rein.engine.optim import build_optimizer
    from rein.segmentor import build_segmentor

    torch.manual_seed(0)
    cfg = default_config()
    cfg.model.tuning = method
    cfg.model.backbone.name = BACKBONES[backbone]
    cfg.model.backbone.img_size = size
    cfg.model.precision = precision
    model = build_segmentor(cfg.model, load_weights=False)
    optimizer = build_optimizer(model, cfg.optim)

    def labelled(fn, label):
        def wrapper(*args, **kwargs):
            with record_function(label):
                return fn(*args, **kwargs)

        return wrapper

    model.backbone.forward = labelled(model.backbone.forward, "region: backbone forward")
    model.decode_head.forward = labelled(model.decode_head.forward, "region: head forward")
    model.criterion.forward = labelled(model.criterion.forward, "region: loss")
    x = torch.randn(1, 3, size, size)
    y = torch.randint(0, 19, (1, size, size))
    model.loss(x, y)["loss"].backward()  # warm-up
    optimizer.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        loss = model.loss(x, y)["loss"]
        with record_function("region: backward"):
            loss.backward()
        with record_function("region: optimizer"):
            optimizer.step()
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in events) / 1e6
    print(
        f"\n# torch.profiler: one {method} training step, {BACKBONES[backbone]}, {size}px, "
        f"model.precision {precision} ({wall:.1f} s under the profiler)"
    )
    print("\n| region | CPU s (incl. children) | share |")
    print("|---|---:|---:|")
    for e in events:
        if e.key.startswith("region: "):
            t = e.cpu_time_total / 1e6
            print(f"| {e.key[8:]} | {t:.2f} | {t / total_self:.0%} |")
    families: dict[str, float] = {}
    for e in events:
        if e.key.startswith("region: "):
            continue
        fam = _family(e.key)
        families[fam] = families.get(fam, 0.0) + e.self_cpu_time_total / 1e6
    print("\n| operator family | self CPU s | share |")
    print("|---|---:|---:|")
    for fam, t in sorted(families.items(), key=lambda kv: -kv[1]):
        print(f"| {fam} | {t:.2f} | {t / total_self:.0%} |")
    print("\n| operator | calls | self CPU s | share |")
    print("|---|---:|---:|---:|")
    top = sorted(
        (e for e in events if not e.key.startswith("region: ")),
        key=lambda e: -e.self_cpu_time_total,
    )[:15]
    for e in top:
        t = e.self_cpu_time_total / 1e6
        print(f"| `{e.key}` | {e.count} | {t:.2f} | {t / total_self:.0%} |")


def run(
    method: str, args: argparse.Namespace, size: int, token_length: int, precision: str = "fp32"
) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(
        target=measure,
        args=(
            method,
            args.backbone,
            size,
            args.steps,
            token_length,
            args.device,
            args.batch,
            args.infer_steps,
            queue,
            precision,
            args.checkpointing,
        ),
    )
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="s")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="timed steps (after 1 warm-up)")
    parser.add_argument(
        "--infer-steps", type=int, default=5, help="timed inference passes (after 1 warm-up)"
    )
    parser.add_argument(
        "--methods",
        nargs="*",
        default=list(METHODS),
        choices=METHODS,
        help="methods to measure (none: only the --profile / --sweep extras)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--checkpointing",
        action="store_true",
        help="model.backbone.checkpointing: recompute the blocks' activations in backward",
    )
    parser.add_argument(
        "--precision", nargs="+", default=["fp32"], choices=("fp32", "bf16"), help="model.precision"
    )
    parser.add_argument(
        "--sweep", action="store_true", help="also Rein step time vs input size and vs token_length"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile one Rein training step per --precision (regions, operator families)",
    )
    args = parser.parse_args()

    import torch

    where = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else (
            f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        )
    )
    print(
        f"# {BACKBONES[args.backbone]} (random weights), {args.size}x{args.size}, batch "
        f"{args.batch}, {where}, torch {torch.__version__}"
    )
    by_precision = {
        prec: {m: run(m, args, args.size, 100, prec) for m in args.methods}
        for prec in args.precision
    }
    for prec, rows in by_precision.items():
        if not rows:
            continue
        print(f"\n## model.precision: {prec}")
        _print_rows(rows, args)
    if {"fp32", "bf16"} <= set(by_precision) and args.methods:
        print("\n## bf16 / fp32 (same method)")
        print("| method | train step | train memory | inference |")
        print("|---|---:|---:|---:|")
        for m in args.methods:
            a, b = by_precision["fp32"][m], by_precision["bf16"][m]
            print(
                f"| {m} | {b['train_s'] / a['train_s']:.2f}x | "
                f"{b['train_mem_mib'] / a['train_mem_mib']:.2f}x | "
                f"{b['infer_s'] / a['infer_s']:.2f}x |"
            )
    _extras(args)


def _print_rows(rows: dict, args: argparse.Namespace) -> None:
    full, frozen = rows.get("full"), rows.get("frozen")
    mem_unit = "MiB (CUDA peak)" if args.device.startswith("cuda") else "MiB (RSS peak - base)"
    print(
        f"| method | trainable params | build s | train step s | vs full | train memory "
        f"{mem_unit} | vs full | inference s | vs frozen | merged inference s | vs frozen |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m, r in rows.items():
        t_ratio = f"{r['train_s'] / full['train_s']:.2f}x" if full else "-"
        m_ratio = f"{r['train_mem_mib'] / full['train_mem_mib']:.2f}x" if full else "-"
        i_ratio = f"{r['infer_s'] / frozen['infer_s']:.2f}x" if frozen else "-"
        merged, mg_ratio = "-", "-"
        if r["merged_s"] is not None:
            merged = f"{r['merged_s']:.2f}"
            mg_ratio = f"{r['merged_s'] / frozen['infer_s']:.2f}x" if frozen else "-"
        print(
            f"| {m} | {r['trainable']:,} | {r['build_s']:.1f} | {r['train_s']:.2f} | "
            f"{t_ratio} | {r['train_mem_mib']:,.0f} | {m_ratio} | {r['infer_s']:.2f} | "
            f"{i_ratio} | {merged} | {mg_ratio} |"
        )


def _extras(args: argparse.Namespace) -> None:
    if args.profile:
        for prec in args.precision:
            profile("rein", args.backbone, args.size, prec)

    if args.sweep:
        print("\n# Rein training step vs input size (token_length 100)")
        print("| size | train step s | vs 512 |")
        print("|---:|---:|---:|")
        by_size = {s: run("rein", args, s, 100)["train_s"] for s in (256, 512, 768)}
        for s, t in by_size.items():
            print(f"| {s} | {t:.2f} | {t / by_size[512]:.2f}x |")
        print(f"\n# Rein training step vs token_length ({args.size}x{args.size})")
        print("| token_length | trainable params | train step s | vs 100 |")
        print("|---:|---:|---:|---:|")
        by_tokens = {m: run("rein", args, args.size, m) for m in (25, 50, 100, 200)}
        for m, r in by_tokens.items():
            print(
                f"| {m} | {r['trainable']:,} | {r['train_s']:.2f} | "
                f"{r['train_s'] / by_tokens[100]['train_s']:.2f}x |"
            )


if __name__ == "__main__":
    main()
