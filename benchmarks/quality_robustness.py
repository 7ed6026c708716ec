"""Label noise and learning curves for the models of ``benchmarks/quality.py`` (issue 16).

Both experiments reuse the ``--config full`` sample and its feature cache, so nothing new goes through the
backbone:

* ``noise``: flip 0 / 20 / 40 % of the training pairs (swap chosen and rejected), whole prompt groups at a
  time (all pairs of a prompt flip together; groups drawn with a seeded RNG until the share is reached), and
  refit the BT probe, the objective mean and ArmoRM (tuned). Only the pairs are flipped: the rated rows of
  stage 1 (absolute 1-10 / 1-5 scores) stay clean, so the MoE recipes keep a clean rated signal the probe
  does not have; the tables say so.
* ``curve``: the same models on the first 2,000 / 5,000 / all 20,418 training pairs of the seeded order
  (all rated rows every time).

Usage::

    python benchmarks/quality_robustness.py noise      # -> results/quality_noise.md/.json
    python benchmarks/quality_robustness.py curve      # -> results/quality_curve.md/.json/.png
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as Q  # noqa: E402

from rmkit.backbones import resolve_dtype  # noqa: E402
from rmkit.metrics import rewardbench_scores  # noqa: E402
from rmkit.model_selection import prompt_groups  # noqa: E402

MODELS = ["bt_probe", "objective_mean", "armorm"]
NOISE = [0.0, 0.2, 0.4]
SIZES = [2000, 5000, None]  # None: every pair


def flip_by_prompt(train, share, seed=0):
    """Swap chosen/rejected for whole prompt groups, drawn in a seeded random order, until ``share`` of the
    pairs is flipped (the last group may overshoot by its size). Returns the new frame and the flip mask."""
    groups = prompt_groups(Q.text_frame(train, "pairs"))
    order = np.random.RandomState(seed).permutation(np.unique(groups))
    sizes = {g: int(n) for g, n in zip(*np.unique(groups, return_counts=True))}
    target, chosen, total = share * len(train), [], 0
    for g in order:
        if total >= target:
            break
        chosen.append(g)
        total += sizes[g]
    flip = np.isin(groups, chosen)
    out = train.copy()
    out.loc[flip, ["chosen", "rejected"]] = train.loc[flip, ["rejected", "chosen"]].to_numpy()
    return out.reset_index(drop=True), flip


def variant(data, train):
    """The same benchmark data with other training pairs (rated-row and evaluation features reused)."""
    cache = {k: v for k, v in data.cache.items() if k in ("ratings", "eval")}
    return replace(data, train=train.reset_index(drop=True), cache=cache)


def run_models(data, models):
    out = {}
    for name in models:
        label, build = Q.MODELS[name]
        t = time.time()
        c, r = build(data)
        s = rewardbench_scores(data.eval, c, r)
        out[name] = dict(label=label, scores=s, seconds=time.time() - t)
        if name in data.cache and name in Q.GATED:
            f = data.cache[name]
            out[name]["gate"] = {k: f[k] for k in ("gate_entropy", "gate_entropy_stderr", "verbosity_weight",
                                                   "steps", "beta")}
        print(f"  {label:36s} overall {100 * s['overall']:.1f} ± {100 * s['overall_stderr']:.1f}  "
              + "  ".join(f"{k} {100 * v:.1f}" for k, v in s["sections"].items())
              + f"  ({out[name]['seconds']:.0f} s)", flush=True)
    return out


def header(meta, title, what):
    return [
        f"# {title}",
        "",
        f"Backbone `{meta['backbone']}`, layer {meta['layer']}, {meta['dtype']} features (`dtype=\"auto\"` on "
        f"{meta['cpu']}), max_length 512. {what} Evaluation: the {meta['n_eval']} non-Extra pairs of "
        f"`{meta['eval']}`. Models and settings as in `quality.md` (ArmoRM: the tuned row, "
        "`drop_verbosity=True`).",
        "",
        "Scores are RewardBench-style overall accuracies in % ± one standard error (sections: example-weighted "
        "subset means; overall = (2·Chat + 2·Chat Hard + 2·Safety + 2·Reasoning + Prior) / 9). Ties count as "
        "wrong.",
        "",
    ]


def pct(s):
    return f"{100 * s['overall']:.1f} ± {100 * s['overall_stderr']:.1f}"


def noise_markdown(res, meta):
    NOISE = meta["noise"]
    head = ["model"] + [f"{int(100 * p)}% flipped" for p in NOISE] + [f"drop at {int(100 * p)}%" for p in NOISE[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in meta["models"]:
        base = res["0.0"]["models"][name]["scores"]["overall"]
        cells = [res["0.0"]["models"][name]["label"]] + [pct(res[str(p)]["models"][name]["scores"]) for p in NOISE]
        cells += [f"{100 * (base - res[str(p)]['models'][name]['scores']['overall']):.1f}" for p in NOISE[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    sec = ["| model | noise | " + " | ".join(Q.SECTIONS) + " |", "|" + "---|" * (2 + len(Q.SECTIONS))]
    for name in meta["models"]:
        for p in NOISE:
            s = res[str(p)]["models"][name]["scores"]
            sec.append(f"| {res[str(p)]['models'][name]['label']} | {int(100 * p)}% | " + " | ".join(
                f"{100 * s['sections'][k]:.1f} ± {100 * s['section_stderr'][k]:.1f}" for k in Q.SECTIONS) + " |")
    flips = "; ".join(f"{int(100 * p)}%: {res[str(p)]['n_flipped']} pairs ({100 * res[str(p)]['flipped_share']:.1f}%) "
                      f"in {res[str(p)]['n_groups_flipped']} prompt groups" for p in NOISE[1:])
    text = header(meta, "Label noise (full config)",
                  f"Training: the {meta['n_train_pairs']} pairs of the `--config full` sample with a share of "
                  "them flipped (chosen and rejected swapped), whole prompt groups at a time, groups drawn by a "
                  f"seeded RNG (seed {meta['seed']}) until the share is reached ({flips}); the "
                  f"{meta['n_ratings']} rated rows of stage 1 are left clean (absolute scores have no side to "
                  "swap), so ArmoRM and the objective mean keep a clean rated signal the BT probe does not use.")
    text += lines + ["", "`drop at p%` = overall at 0% minus overall at p% (points; the two runs share the "
                     "evaluation pairs, so the drop's own error is smaller than the sum of the two). Per "
                     "section:", ""] + sec
    text += [""] + ([f"Merged runs: {meta['merged']}.", ""] if meta.get("merged") else [])
    text += [f"Generated by `python benchmarks/quality_robustness.py noise` ({meta['seconds']:.0f} s, "
             f"{meta['machine']})."]
    return "\n".join(text) + "\n"


def curve_markdown(res, meta):
    head = ["model"] + [f"{n} pairs" for n in meta["sizes"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in meta["models"]:
        lines.append(f"| {res[str(meta['sizes'][0])]['models'][name]['label']} | "
                     + " | ".join(pct(res[str(n)]["models"][name]["scores"]) for n in meta["sizes"]) + " |")
    sec = ["| model | pairs | " + " | ".join(Q.SECTIONS) + " |", "|" + "---|" * (2 + len(Q.SECTIONS))]
    for name in meta["models"]:
        for n in meta["sizes"]:
            s = res[str(n)]["models"][name]["scores"]
            sec.append(f"| {res[str(n)]['models'][name]['label']} | {n} | " + " | ".join(
                f"{100 * s['sections'][k]:.1f}" for k in Q.SECTIONS) + " |")
    text = header(meta, "Learning curves (full config)",
                  "Training: the first " + " / ".join(f"{n:,}" for n in meta["sizes"]) + " pairs of the "
                  "`--config full` order (all of `pairwise_train.jsonl.gz` in a seeded random order; the first "
                  f"2,000 are the sample of earlier tables) and all {meta['n_ratings']} rated rows.")
    text += lines + ["", "Per section (%):", ""] + sec
    text += [""] + ([f"Merged runs: {meta['merged']}.", ""] if meta.get("merged") else [])
    text += ["The chart is `quality_curve.png` beside this table (the docs' benchmarks page shows it below).", "",
             f"Generated by `python benchmarks/quality_robustness.py curve` ({meta['seconds']:.0f} s, "
             f"{meta['machine']})."]
    return "\n".join(text) + "\n"


def curve_plot(res, meta, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    sizes = meta["sizes"]
    for name in meta["models"]:
        s = [res[str(n)]["models"][name]["scores"] for n in sizes]
        y = np.array([100 * v["overall"] for v in s])
        e = np.array([100 * v["overall_stderr"] for v in s])
        ax.errorbar(sizes, y, yerr=e, marker="o", capsize=3, label=res[str(sizes[0])]["models"][name]["label"])
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.minorticks_off()
    ax.set_xlabel("training pairs")
    ax.set_ylabel("RewardBench-style overall (%)")
    ax.set_title(f"Learning curves ({meta['dtype']}, {meta['cpu'].split(',')[0]})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", choices=["noise", "curve"])
    parser.add_argument("--models", nargs="*", default=MODELS, choices=list(Q.MODELS))
    parser.add_argument("--seed", type=int, default=0, help="which prompt groups flip")
    parser.add_argument("--noise", type=float, nargs="*", default=NOISE, help="shares of flipped pairs (noise)")
    parser.add_argument("--sizes", type=int, nargs="*", default=SIZES, help="training sizes (curve; default: "
                        "2000, 5000 and every pair)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto", help="where the gates train (default: CUDA when available)")
    parser.add_argument("--layer", default="auto", help="backbone layer (default: the layer sweep's choice)")
    parser.add_argument("--dtype", default="auto", help="feature dtype ('bfloat16': features a GPU computed)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--replot", metavar="JSON", help="only redraw the table (and chart) of an earlier run's JSON")
    args = parser.parse_args(argv)
    if args.replot:
        stem, saved = Path(args.replot).with_suffix(""), json.loads(Path(args.replot).read_text())
        res, meta = saved["results"], saved["meta"]
        md = noise_markdown(res, meta) if meta["experiment"] == "noise" else curve_markdown(res, meta)
        stem.with_suffix(".md").write_text(md)
        if meta["experiment"] == "curve":
            curve_plot(res, meta, stem.with_suffix(".png"))
        return
    Q.GATE_DEVICE = args.device
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    t0 = time.time()
    data = Q.load_data("full", "eval_dev.jsonl", args.layer, dtype=args.dtype)
    data.features("ratings"), data.features("eval")
    res = {}
    if args.experiment == "noise":
        for p in args.noise:
            train, flip = flip_by_prompt(data.train, p, seed=args.seed)
            print(f"{int(100 * p)}% flipped: {int(flip.sum())} pairs", flush=True)
            groups = prompt_groups(Q.text_frame(data.train, "pairs"))
            res[str(p)] = dict(n_flipped=int(flip.sum()), flipped_share=float(flip.mean()),
                               n_groups_flipped=int(len(np.unique(groups[flip]))),
                               models=run_models(variant(data, train), args.models))
    else:
        for n in args.sizes:
            n = n or len(data.train)
            print(f"{n} pairs", flush=True)
            res[str(n)] = dict(models=run_models(variant(data, data.train.head(n)), args.models))
    meta = dict(experiment=args.experiment, models=args.models, seed=args.seed, sizes=[n or len(data.train) for n in args.sizes], noise=args.noise,
                eval="eval_dev.jsonl", layer=data.featurizer.layer_, backbone=data.featurizer.backbone,
                n_train_pairs=len(data.train), n_ratings=len(data.ratings), n_eval=len(data.eval),
                dtype=str(resolve_dtype(data.featurizer.dtype, data.featurizer.device)).removeprefix("torch."),
                cpu=Q.accelerator_name(), seconds=time.time() - t0,
                machine=f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)")
    stem = Path(args.out) if args.out else Q.RESULTS / f"quality_{args.experiment}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": res}, indent=1, default=float))
    if args.experiment == "noise" and "0.0" not in res:  # a partial run (e.g. --noise 0.4): merge before the table
        print(f"wrote {stem.with_suffix('.json')} (no 0% run: no table)")
        return
    md = noise_markdown(res, meta) if args.experiment == "noise" else curve_markdown(res, meta)
    stem.with_suffix(".md").write_text(md)
    if args.experiment == "curve":
        curve_plot(res, meta, stem.with_suffix(".png"))
    print(f"wrote {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
