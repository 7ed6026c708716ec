"""Cost of LoRA reward experts on the embedded backbone.

Measures, in one run, seconds per training pair and per scored response and
the peak memory of

(a) one full-depth LoRA reward model (``LoRAExpertRegressor``, LoRA on every layer),
(b) K=4 ``CapabilityExperts`` with LoRA on the top quarter of the layers, shared trunk,
(c) the same 4 experts without the shared trunk,

plus one plain backbone pass over the same texts (the unit of the scoring
target). Each configuration runs in its own process so its peak memory is its
own. Run it with ``nice -n 10 python benchmarks/experts.py``; it writes
``benchmarks/results/experts.md``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import queue as queue_mod
import resource
import time
from pathlib import Path

import numpy as np

K = 4
CAPABILITIES = ["correctness", "safety", "relevance", "overall"][:K]


def _data(n_pairs, n_score):
    from rmkit.datasets import make_preference_pairs

    pairs = make_preference_pairs(n_pairs, random_state=0)[["prompt", "chosen", "rejected"]]
    other = make_preference_pairs(n_score, random_state=1)
    rows = other[["prompt"]].assign(response=other["chosen"])
    return pairs, rows


def _peak_mib():
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return rss, gpu


def _backbone_pass(args, queue):
    """One plain backbone pass over the scored texts, batched like the estimators."""
    import torch

    from rmkit.backbones import encode_conversation, load_backbone, load_tokenizer
    from rmkit.lora._net import pad

    _, rows = _data(args.pairs, args.score)
    model = load_backbone(args.backbone, device=args.device)
    tok = load_tokenizer(args.backbone)
    encoded = [encode_conversation(tok, [{"role": "user", "content": p}], r, args.max_length)
               for p, r in zip(rows["prompt"], rows["response"])]
    seqs = [torch.tensor(e.prefix + e.suffix) for e in encoded]
    order = np.argsort([len(s) for s in seqs], kind="stable")
    device = next(model.parameters()).device
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(order), args.batch_size):
            ids, mask = pad([seqs[j] for j in order[i : i + args.batch_size]])
            pos = torch.arange(ids.shape[1]).expand_as(ids)
            model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                  use_cache=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    score_s = time.perf_counter() - start
    queue.put(dict(name="backbone pass (no LoRA)", layers="-", score_s=score_s / len(rows),
                   tokens=float(np.mean([len(s) for s in seqs])), peak=_peak_mib()))


def _estimator_run(args, queue, config):
    import torch

    from rmkit import CapabilityExperts, LoRAExpertRegressor
    from rmkit.backbones import load_backbone

    torch.manual_seed(0)
    pairs, rows = _data(args.pairs, args.score)
    load_backbone(args.backbone, device=args.device)  # loading is not training time
    common = dict(rank=8, alpha=16, dropout=0.0, lr=1e-4, max_epochs=args.epochs, batch_size=args.batch_size,
                  max_length=args.max_length, random_state=0, device=args.device, verbose=0)
    if config == "a":
        est = LoRAExpertRegressor(args.backbone, layers=None, **common)
        fit = lambda: est.fit(pairs)  # noqa: E731
        n_experts, name = 1, "(a) 1 full-depth LoRA reward model"
    else:
        trunk = config == "b"
        est = CapabilityExperts(args.backbone, layers=0.25, shared_trunk=trunk, **common)
        labels = {c: np.ones(len(pairs)) for c in CAPABILITIES}
        fit = lambda: est.fit(pairs, labels)  # noqa: E731
        n_experts = K
        name = f"({config}) {K} experts, top-quarter LoRA, " + ("shared trunk" if trunk else "no shared trunk")
    start = time.perf_counter()
    fit()
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    scores = est.predict(rows)
    score_s = time.perf_counter() - start
    assert np.isfinite(scores).all()
    layers = est.lora_layers_
    queue.put(dict(name=name, layers=f"{layers[0]}-{layers[-1]} of {est.n_layers_}",
                   train_s=train_s / (len(pairs) * args.epochs * n_experts), score_s=score_s / len(rows),
                   peak=_peak_mib()))


def _in_child(target, *args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args[:1], queue, *args[1:]))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except queue_mod.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"benchmark child {target.__name__}{args[1:]} died (exit code {proc.exitcode})")
    proc.join()
    if proc.exitcode:
        raise RuntimeError(f"benchmark child failed with exit code {proc.exitcode}")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=24, help="training pairs")
    parser.add_argument("--score", type=int, default=48, help="pointwise rows scored")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "experts.md"))
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    results = [_in_child(_backbone_pass, args)]
    for config in "abc":
        results.append(_in_child(_estimator_run, args, config))
        print(results[-1], flush=True)
    load_after = os.getloadavg()[0]
    base, a, b, c = results
    gpu = base["peak"][1] is not None
    lines = [
        "# LoRA experts: training and scoring cost",
        "",
        f"Backbone `{args.backbone}`, {args.pairs} synthetic pairs (`make_preference_pairs`, "
        f"~{base['tokens']:.0f} tokens per text), {args.epochs} epochs, batch {args.batch_size}, rank 8, "
        f"{args.score} scored responses, max_length {args.max_length}; device `{args.device}` on "
        f"{platform.machine()} ({'CUDA' if gpu else 'CPU'}). Command: `nice -n 10 python benchmarks/experts.py`.",
        "",
        "Training seconds are per pair, per epoch and per expert (fit time, tokenisation and trunk pass "
        "included). Scoring seconds are per response for all of a configuration's experts. Peak memory is "
        "the process's peak resident set (each configuration in its own process)"
        + (" and the peak CUDA allocation." if gpu else ".")
        + f" Load average at start / end of the run: {load_before:.1f} / {load_after:.1f} on {os.cpu_count()} "
        "CPUs (other jobs share the machine: absolute times are inflated by contention; ratios carry noise).",
        "",
        "| configuration | LoRA layers | train s / pair / expert | score s / response | score ÷ backbone pass | "
        "peak RSS MiB |" + (" peak GPU MiB |" if gpu else ""),
        "|---|---|---|---|---|---|" + ("---|" if gpu else ""),
    ]
    for r in results:
        train = f"{r['train_s']:.4f}" if "train_s" in r else "-"
        row = (f"| {r['name']} | {r['layers']} | {train} | {r['score_s']:.4f} | {r['score_s'] / base['score_s']:.2f} "
               f"| {r['peak'][0]:.0f} |")
        if gpu:
            row += f" {r['peak'][1]:.0f} |"
        lines.append(row)
    mem_ratio = b["peak"][1] / a["peak"][1] if gpu else b["peak"][0] / a["peak"][0]
    checks = [
        ("scoring 4 shared-trunk experts ≤ 2× one backbone pass", b["score_s"] / base["score_s"], 2.0, "≤"),
        ("expert training (b) ≥ 3× faster per pair than full-depth LoRA (a)", a["train_s"] / b["train_s"], 3.0, "≥"),
        ("peak memory of 4 experts (b) ≤ 1.3× one model (a)", mem_ratio, 1.3, "≤"),
    ]
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for text, value, bound, op in checks:
        ok = value <= bound if op == "≤" else value >= bound
        lines.append(f"| {text} | {value:.2f}× | {'yes' if ok else 'no'} |")
    lines += ["", f"Without the shared trunk (c), scoring costs {c['score_s'] / base['score_s']:.2f} backbone passes "
              f"and training {a['train_s'] / c['train_s']:.2f}× less than (a) per pair per expert.", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
