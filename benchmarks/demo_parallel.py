"""Why ``rein demo`` runs its training runs two at a time on one thread each.

Times the demo's training step (the default demo model, batch 8 at 64 px, random weights) for
one run on 2 threads against two runs at once on 1 thread each, and prints the throughput ratio.

    python benchmarks/demo_parallel.py [steps]
"""

from __future__ import annotations

import json
import subprocess
import sys

STEP = r"""
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[1]))
from rein.demo import DEFAULT, demo_config
from rein.segmentor import build_segmentor
cfg = demo_config(sys.argv[2], DEFAULT, None, "/tmp/rein_demo_parallel")
torch.manual_seed(0)
m = build_segmentor(cfg.model)
x = torch.randn(8, 3, 64, 64)
y = torch.randint(0, 19, (8, 64, 64))
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
def step():
    c, mk = m(x)
    loss = m.criterion(c, mk, y)["loss"]
    opt.zero_grad()
    loss.backward()
    opt.step()
for _ in range(3):
    step()
n = int(sys.argv[3])
t = time.perf_counter()
for _ in range(n):
    step()
print(json.dumps((time.perf_counter() - t) / n))
"""


def seconds_per_step(threads: int, method: str, steps: int, runs: int) -> list[float]:
    """Start ``runs`` processes at once; each returns its seconds per training step."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", STEP, str(threads), method, str(steps)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(runs)
    ]
    return [json.loads(p.communicate()[0]) for p in procs]


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    for method in ("frozen", "rein"):
        for _ in range(2):
            (one,) = seconds_per_step(2, method, steps, 1)
            two = seconds_per_step(1, method, steps, 2)
            both = 1 / two[0] + 1 / two[1]
            print(
                f"{method}: 1 run x 2 threads {one:.3f} s/step -> {1 / one:.2f} steps/s; "
                f"2 runs x 1 thread {two[0]:.3f}/{two[1]:.3f} s/step -> {both:.2f} steps/s; "
                f"throughput ratio {both * one:.2f}x"
            )


if __name__ == "__main__":
    main()
