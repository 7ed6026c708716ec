"""Prompt-grouped cross-validation on the training pairs for ArmoRM design choices (issue 16).

Chooses settings on training data only, never on the evaluation file: each variant of ArmoRM (the tuned
row of ``quality.py`` with one setting changed) is fitted on k-1 prompt-grouped folds of the ``--config
2k`` training pairs (its 1,500 rated rows every time) and scored on the held-out fold: pair accuracy, overall
and split by whether the chosen response is shorter or longer (tokens), and the weight the gate puts on
verbosity.

Usage::

    python benchmarks/quality_cv.py                 # drop_verbosity True vs False -> results/quality_cv.md/.json
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
from rmkit.model_selection import PromptGroupKFold  # noqa: E402
from rmkit.objectives import response_token_lengths  # noqa: E402

VARIANTS = {
    "drop_verbosity=True": dict(decorrelation=dict(drop_verbosity=True)),
    "drop_verbosity=False": dict(decorrelation=dict(drop_verbosity=False)),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--inner-cv", type=int, default=3, help="ArmoRM's cross-fitting folds inside each fit")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    t0 = time.time()
    data = Q.load_data("2k", "eval_dev.jsonl", Q.DEFAULT_LAYER)  # the 2,000-pair config its table reports
    data = replace(data, cv=args.inner_cv)
    pairs = Q.text_frame(data.train, "pairs")
    n = len(pairs)
    L = response_token_lengths(list(pairs["chosen"]) + list(pairs["rejected"]), data.featurizer.backbone)
    longer = np.asarray(L[:n]) > np.asarray(L[n:])
    shorter = np.asarray(L[:n]) < np.asarray(L[n:])
    folds = list(PromptGroupKFold(n_splits=args.folds).split(pairs))
    res = {}
    for name, overrides in VARIANTS.items():
        correct, vw, H = np.zeros(n, bool), [], []
        for k, (tr, te) in enumerate(folds):
            d = replace(data, train=data.train.iloc[tr].reset_index(drop=True), eval=data.train.iloc[te],
                        cache={"ratings": data.features("ratings")})
            d.eval = d.eval.reset_index(drop=True)
            c, r = Q.fit_armorm(d, "cv", **{key: dict(v) for key, v in overrides.items()})
            correct[te] = np.asarray(c) > np.asarray(r)
            vw.append(d.cache["cv"]["verbosity_weight"])
            H.append(d.cache["cv"]["gate_entropy"])
            print(f"{name} fold {k}: accuracy {correct[te].mean():.3f}, verbosity weight {vw[-1]}, "
                  f"gate entropy {H[-1]:.3f}", flush=True)
        acc = lambda m: dict(accuracy=float(correct[m].mean()), stderr=float(correct[m].std() / np.sqrt(m.sum())),
                             n=int(m.sum()))
        res[name] = dict(overall=acc(np.ones(n, bool)), chosen_shorter=acc(shorter), chosen_longer=acc(longer),
                         verbosity_weight=vw, gate_entropy=H)
    meta = dict(folds=args.folds, inner_cv=args.inner_cv, n_train_pairs=n, n_ratings=len(data.ratings),
                layer=data.featurizer.layer_, backbone=data.featurizer.backbone, cpu=Q.cpu_model(),
                dtype=str(resolve_dtype(data.featurizer.dtype, data.featurizer.device)).removeprefix("torch."),
                seconds=time.time() - t0, machine=f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)")
    f = lambda a: f"{100 * a['accuracy']:.1f} ± {100 * a['stderr']:.1f}"
    vwf = lambda v: "–" if v[0] is None else ", ".join(f"{x:.3f}" for x in v)
    lines = [f"| variant | all (n={n}) | chosen shorter (n={int(shorter.sum())}) | chosen longer (n={int(longer.sum())}) "
             "| verbosity weight per fold | gate entropy per fold |", "|---|---|---|---|---|---|"]
    for name, r in res.items():
        lines.append(f"| ArmoRM tuned, {name} | {f(r['overall'])} | {f(r['chosen_shorter'])} | "
                     f"{f(r['chosen_longer'])} | {vwf(r['verbosity_weight'])} | "
                     + ", ".join(f"{h:.3f}" for h in r["gate_entropy"]) + " |")
    md = [
        "# ArmoRM choices by prompt-grouped CV on the training pairs",
        "",
        f"Backbone `{meta['backbone']}`, layer {meta['layer']}, {meta['dtype']} features (`dtype=\"auto\"` on "
        f"{meta['cpu']}). The {n} training pairs of `--config 2k` in {args.folds} prompt-grouped folds "
        f"(`PromptGroupKFold`); each fit uses the other folds and all {meta['n_ratings']} rated rows, ArmoRM's "
        f"own cross-fitting with {args.inner_cv} folds (5 in `quality.py`, fewer here for CPU time). "
        "No evaluation-file pair is used.",
        "",
        "Held-out pair accuracy in % ± one binomial standard error, overall and by whether the chosen "
        "response has fewer / more tokens than the rejected one; ties wrong.",
        "",
        *lines,
        "",
        f"Generated by `python benchmarks/quality_cv.py` ({meta['seconds']:.0f} s, {meta['machine']}).",
    ]
    stem = Path(args.out) if args.out else Q.RESULTS / "quality_cv"
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": res}, indent=1, default=float))
    print(f"wrote {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
