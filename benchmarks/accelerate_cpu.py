"""The accelerate training path timed against the plain skorch path, on this CPU (issue: multi-GPU with accelerate).

Two bounded workloads, each fitted with ``accelerate=None`` and with
``accelerate={"cpu": True, "mixed_precision": "no"}`` (the same code path a
multi-GPU run takes, on one CPU process), interleaved and repeated so that
machine load hits both alike:

- ``GatedScalarizer`` on synthetic objective frames (``--pairs`` pairs, 8
  objectives, 64-d prompt features);
- ``LoRAExpertRegressor`` on the tiny random backbone (``--lora-pairs``
  pairs), rank 4, all layers.

Reported: median wall seconds per fit, the ratio accelerate / plain, and the
held-out accuracy of each (the two paths must learn the same task).

Usage: python benchmarks/accelerate_cpu.py [--pairs 4000] [--lora-pairs 48] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
ACCELERATE = {"cpu": True, "mixed_precision": "no"}


def gate_data(n, seed, k=8, d=64):
    from rmkit.layout import make_frame

    rng = np.random.default_rng(seed)
    kind = rng.integers(0, k, n)
    prompt = rng.normal(size=(n, d))
    prompt[np.arange(n), kind] += 3.0
    a, b = rng.normal(size=(n, k)), rng.normal(size=(n, k))
    wins = (a[np.arange(n), kind] > b[np.arange(n), kind])[:, None]
    names = tuple(f"o{j}" for j in range(k))
    return make_frame({("chosen", "r", names): np.where(wins, a, b), ("rejected", "r", names): np.where(wins, b, a),
                       ("prompt", "h", range(d)): prompt, ("prompt", "m", ("group",)): seed * 10**6 + np.arange(n)})


def lora_data(n, seed):
    import pandas as pd

    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        a, b = rng.choice(words, 2, replace=False)
        rows.append({"prompt": f"Q {a}?", "chosen": f"yes {a}", "rejected": f"no {b}"})
    return pd.DataFrame(rows)


def timed(make, train, test):
    t = time.perf_counter()
    model = make().fit(train)
    return time.perf_counter() - t, model.score(test)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=4000)
    ap.add_argument("--lora-pairs", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import accelerate
    import torch

    from rmkit import GatedScalarizer, LoRAExpertRegressor
    from rmkit.testing import tiny_backbone

    torch.set_num_threads(args.threads)
    tiny = tiny_backbone()
    workloads = {
        "GatedScalarizer": (lambda acc: (lambda: GatedScalarizer(max_epochs=20, batch_size=256, random_state=0,
                                                                  accelerate=acc)),
                            gate_data(args.pairs, 0), gate_data(1000, 1)),
        "LoRAExpertRegressor (tiny backbone)": (
            lambda acc: (lambda: LoRAExpertRegressor(tiny, rank=4, alpha=8, lr=5e-3, max_epochs=2, batch_size=8,
                                                     random_state=0, device="cpu", verbose=0, accelerate=acc)),
            lora_data(args.lora_pairs, 0), lora_data(16, 1)),
    }
    rows, load_before = [], os.getloadavg()[0]
    for name, (factory, train, test) in workloads.items():
        timed(factory(None), train, test)  # warm-up (imports, backbone load)
        times = {"plain": [], "accelerate": []}
        acc = {}
        for _ in range(args.repeats):
            for label, setting in (("plain", None), ("accelerate", ACCELERATE)):
                s, a = timed(factory(setting), train, test)
                times[label].append(s)
                acc[label] = a
        plain, accel = min(times["plain"]), min(times["accelerate"])
        rows.append(dict(workload=name, plain_s=plain, accelerate_s=accel, ratio=accel / plain,
                         plain_median_s=statistics.median(times["plain"]),
                         accelerate_median_s=statistics.median(times["accelerate"]),
                         plain_accuracy=acc["plain"], accelerate_accuracy=acc["accelerate"], times=times))
    meta = dict(cpu=platform.processor() or platform.machine(), threads=args.threads, repeats=args.repeats,
                accelerate=accelerate.__version__, torch=torch.__version__, load_before=load_before,
                load_after=os.getloadavg()[0], pairs=args.pairs, lora_pairs=args.lora_pairs)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "accelerate_cpu.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"# accelerate vs plain skorch training on this CPU ({args.threads} torch threads, "
             f"{args.repeats} interleaved fits each)", "",
             "Fastest fit of each (the least disturbed by other jobs on the shared cores), the median in brackets.", "",
             "| workload | plain s | accelerate s | ratio (fastest) | accuracy plain | accuracy accelerate |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['plain_s']:.2f} [{r['plain_median_s']:.2f}] | {r['accelerate_s']:.2f} "
                     f"[{r['accelerate_median_s']:.2f}] | {r['ratio']:.2f}x | {r['plain_accuracy']:.3f} | "
                     f"{r['accelerate_accuracy']:.3f} |")
    lines += ["", f"accelerate {accelerate.__version__}, torch {torch.__version__}, `accelerate="
              f"{ACCELERATE}` (one CPU process: the code path of a multi-GPU run, without the GPUs). "
              f"Load average (1 min) {meta['load_before']:.1f} before, {meta['load_after']:.1f} after "
              f"(2 cores shared with other jobs: compare the ratio, not the seconds)."]
    (RESULTS / "accelerate_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
