"""Which backbone layer to read features from, chosen by prompt-grouped cross-validation on training pairs.

Issue 16 asks for the layer to be decided on training data, never on the evaluation file. For each candidate
layer the first ``--pairs`` training pairs of ``quality.py``'s seeded order are featurized, and a Bradley–Terry
linear probe is scored by 5-fold prompt-grouped cross-validation (pairs of one prompt never straddle a fold;
the probe's penalty is picked inside each training fold by a 3-fold prompt-grouped search over ArmoRM's grid
1e-4..1e4). The chosen layer follows the one-standard-error rule: the lowest (cheapest to run) layer whose
accuracy is within one standard error of the best. The best two layers are also tried concatenated when one
run measured both. ``quality.py --layer auto`` (its default) reads the choice from ``results/quality_layers.json``.

Usage::

    python benchmarks/quality_layers.py                     # 4,000 pairs, layers 4..30 -> results/quality_layers.md
    python benchmarks/quality_layers.py --pairs 1000 --layers 6 10 -1
    python benchmarks/quality_layers.py --merge a.json b.json      # one table from runs of single layers

The probe here is plain scikit-learn on feature differences, so concatenated layers are scored the same way.
It is the same kind of model as ``MultiObjectiveRegressor``'s pairwise objective, not the identical fit: it uses a
3-fold inner search instead of 5, and standardises the differences rather than the features.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegressionCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as Q  # noqa: E402

from rmkit import BackboneFeaturizer  # noqa: E402
from rmkit.backbones import resolve_dtype  # noqa: E402
from rmkit.layout import read_layout  # noqa: E402
from rmkit.model_selection import PromptGroupKFold, prompt_groups  # noqa: E402
from rmkit.objectives import DEFAULT_ALPHAS  # noqa: E402

LAYERS = [4, 8, 10, 12, 16, 20, 24, -1]  # SmolLM2-135M has 30; -1 is the final, normalised layer


def probe_cv(C, R, groups, folds=5, seed=0):
    """Held-out pair accuracy of a BT probe per prompt-grouped fold (list of floats)."""
    D = C - R
    rng = np.random.RandomState(seed)
    swap = rng.rand(len(D)) < 0.5  # both classes present; a pair and its mirror never share a fold
    Xd, yd = np.where(swap[:, None], -D, D), (~swap).astype(int)
    accs = []
    for tr, te in PromptGroupKFold(folds).split(Xd, groups=groups):
        inner = list(PromptGroupKFold(3).split(Xd[tr], groups=groups[tr]))
        model = make_pipeline(StandardScaler(), LogisticRegressionCV(
            Cs=1.0 / DEFAULT_ALPHAS, cv=inner, scoring="neg_log_loss", max_iter=300, fit_intercept=False))
        model.fit(Xd[tr], yd[tr])
        # score the unswapped pairs: the chosen response wins when C - R falls on class 1's side
        accs.append(float((model.decision_function(D[te]) > 0).mean()))
    return accs


def choose(rows):
    """The one-standard-error rule: the lowest layer within one standard error of the best mean accuracy."""
    best = max(rows, key=lambda r: r["accuracy"])
    return min((r for r in rows if r["accuracy"] >= best["accuracy"] - best["stderr"]), key=lambda r: r["layer"])


def report(rows, concat, meta, stem):
    """Write the table and JSON (after every layer, so a killed run keeps what it measured)."""
    rows = sorted(rows, key=lambda r: r["layer"])
    chosen, best = choose(rows), max(rows, key=lambda r: r["accuracy"])
    meta = {**meta, "layers": [r["layer"] for r in rows], "best_layer": chosen["layer"],
            "highest_mean_layer": best["layer"]}
    lines = [
        "# Feature layer by prompt-grouped cross-validation (training pairs only)", "",
        f"Backbone `{meta['backbone']}`, {meta['dtype']} features (`dtype=\"auto\"` on {meta['accelerator']}), "
        f"max_length 512. Data: the first {meta['pairs']} pairs ({meta['prompts']} prompts) of `quality.py`'s "
        "seeded order of `pairwise_train.jsonl.gz`; `eval_dev.jsonl` is not read. Score: held-out pair accuracy "
        "of a Bradley–Terry linear probe (logistic regression on standardised feature differences, penalty from "
        "ArmoRM's grid 1e-4..1e4 by an inner 3-fold prompt-grouped search), 5 prompt-grouped folds, mean ± "
        "standard error over folds. Choice: the one-standard-error rule (the lowest layer within one standard "
        "error of the highest mean; lower layers stop the forward pass earlier).", "",
        "| layer | CV accuracy | featurizing (s) |", "|---|---|---|",
    ]
    lines += [f"| {r['layer']}{' (chosen)' if r is chosen else ''}{' (highest mean)' if r is best else ''} | "
              f"{100 * r['accuracy']:.1f} ± {100 * r['stderr']:.1f} | {r['featurize_seconds']:.0f} |" for r in rows]
    if concat:
        lines += ["", f"Best two layers concatenated ({concat['layers'][0]} + {concat['layers'][1]}): "
                  f"{100 * concat['accuracy']:.1f} ± {100 * concat['stderr']:.1f} "
                  f"({100 * (concat['accuracy'] - best['accuracy']):+.1f} points over layer {best['layer']} alone)."]
    else:
        lines += ["", "Concatenated layers: not measured in this run (the layers were featurized by separate "
                  "processes; `--layers A B` in one run measures the best two concatenated)."]
    lines += ["", f"`quality.py --layer auto` uses layer {chosen['layer']}.", "",
              f"Generated by `python benchmarks/quality_layers.py --pairs {meta['pairs']}`"
              + (" (single-layer runs merged with `--merge`)" if meta.get("merged") else "") + "."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "concat": concat}, indent=1))
    return stem


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=4000)
    parser.add_argument("--layers", type=int, nargs="*", default=LAYERS)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--merge", nargs="*", metavar="JSON", help="only merge earlier runs' JSON into one table")
    args = parser.parse_args(argv)
    stem = Path(args.out) if args.out else Q.RESULTS / "quality_layers"
    if args.merge:
        runs = [json.loads(Path(f).read_text()) for f in args.merge]
        rows = {r["layer"]: r for run in runs for r in run["rows"]}
        meta = {**runs[0]["meta"], "merged": True, "complete": all(run["meta"].get("complete") for run in runs)}
        concat = next((run["concat"] for run in runs if run.get("concat")), None)
        return report(list(rows.values()), concat, meta, stem)
    warnings.filterwarnings("ignore", category=FutureWarning)  # sklearn 1.9's LogisticRegressionCV transition notes
    warnings.filterwarnings("ignore", category=ConvergenceWarning)  # weak penalties on separable folds; CV drops them
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    t0 = time.time()
    data = Q.load_data("full", "eval_dev.jsonl", Q.DEFAULT_LAYER, batch_size=args.batch_size)
    train = Q.text_frame(data.train.head(args.pairs), "pairs")
    groups = prompt_groups(train)
    meta = dict(pairs=len(train), prompts=int(len(np.unique(groups))), backbone=data.featurizer.backbone,
                accelerator=Q.accelerator_name(),
                dtype=str(resolve_dtype("auto", data.featurizer.device)).removeprefix("torch."))
    blocks, rows = {}, []
    for layer in args.layers:
        t = time.time()
        feat = BackboneFeaturizer(layer=layer, max_length=512, dtype="auto", batch_size=args.batch_size,
                                  verbose=0).fit()
        F = feat.transform(train)
        lay = read_layout(F, step="quality_layers")
        C, R = lay.block(F, "chosen", "h", np.float64), lay.block(F, "rejected", "h", np.float64)
        featurize_s = time.time() - t
        accs = probe_cv(C, R, groups)
        blocks[feat.layer_] = (C, R)
        rows.append(dict(layer=int(feat.layer_), accuracy=float(np.mean(accs)),
                         stderr=float(np.std(accs, ddof=1) / np.sqrt(len(accs))), folds=accs,
                         featurize_seconds=featurize_s))
        print(f"layer {feat.layer_:2d}: {100 * np.mean(accs):.1f} ± {100 * rows[-1]['stderr']:.1f}  "
              f"(featurized in {featurize_s:.0f} s)", flush=True)
        report(rows, None, {**meta, "seconds": time.time() - t0, "complete": False}, stem)
    concat = None
    if len(rows) > 1:
        a, b = [r["layer"] for r in sorted(rows, key=lambda r: -r["accuracy"])[:2]]
        accs = probe_cv(np.hstack([blocks[a][0], blocks[b][0]]), np.hstack([blocks[a][1], blocks[b][1]]), groups)
        concat = dict(layers=[a, b], accuracy=float(np.mean(accs)),
                      stderr=float(np.std(accs, ddof=1) / np.sqrt(len(accs))), folds=accs)
        print(f"layers {a}+{b} concatenated: {100 * concat['accuracy']:.1f} ± {100 * concat['stderr']:.1f}")
    report(rows, concat, {**meta, "seconds": time.time() - t0, "complete": True}, stem)
    print(f"wrote {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
