"""Train an ArmoRM reward model on the embedded backbone and explain its scores.

Stage 1 fits one linear head per objective: the three absolute-rating
sources of ``multiobjective_sparse.jsonl.gz`` (ridge, missing labels masked)
and one Bradley–Terry probe per preference source of
``pairwise_train.jsonl.gz``. A verbosity objective derived from response
length is decorrelated from the others, and a gating network on the prompt
weights the objectives per prompt.

    python examples/armorm.py                       # ~400 training pairs, a few minutes with a warm cache
    python examples/armorm.py --data-dir /path/to/data --n-pairs 2000 --n-ratings 1500 --n-eval 0

Features are cached on disk (``~/.cache/rmkit/features``), so a second run
only trains.
"""

import argparse
import os

import pandas as pd


def source_objective(row):
    """One pairwise objective per source (RMB: per top-level scenario, helpfulness / harmlessness)."""
    if row["source"].startswith("rmb"):
        return "rmb_" + row["category"].split("/")[0].lower()
    return row["source"].split(":")[0].split("_subset")[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="folder of the data files (default: rmkit.datasets.data_dir())")
    parser.add_argument("--eval", default="eval_dev.jsonl")
    parser.add_argument("--n-pairs", type=int, default=400)
    parser.add_argument("--n-ratings", type=int, default=300)
    parser.add_argument("--n-eval", type=int, default=400, help="0 = every non-Extra pair")
    parser.add_argument("--layer", type=int, default=None,
                        help="backbone layer (default: 10 of 30 on the embedded backbone, which probes best on "
                             "training data; the last layer elsewhere)")
    parser.add_argument("--backbone", default=os.environ.get("RMKIT_EXAMPLES_BACKBONE", "smollm2-135m-instruct"),
                        help="backbone name or folder ('rmkit-tiny' for a seconds-long smoke run)")
    args = parser.parse_args()
    if args.data_dir:
        os.environ["RMKIT_DATA_DIR"] = args.data_dir
    if args.layer is None:
        args.layer = 10 if args.backbone == "smollm2-135m-instruct" else -1

    from rmkit import ArmoRM, BackboneFeaturizer, GatedScalarizer, VerbosityDecorrelator
    from rmkit.datasets import load_eval, load_pairwise, load_ratings
    from rmkit.metrics import rewardbench_scores

    ratings_cols = ["gpt4_ref_score_1to10", "autoj_gpt4_rating_1to10", "prometheus_rubric_score_1to5"]
    pairs = load_pairwise(n=2000, random_state=0).head(args.n_pairs)
    pairs = pd.DataFrame({"prompt": pairs["prompt"], "chosen": pairs["chosen"], "rejected": pairs["rejected"],
                          "objective": pairs.apply(source_objective, axis=1)})
    ratings = load_ratings(n=1500, random_state=0).head(args.n_ratings)[["prompt", "response", *ratings_cols]]
    ratings = ratings[ratings["response"].str.strip() != ""]  # a few rated responses are empty
    evaluation = load_eval(args.eval)
    if args.n_eval:
        evaluation = evaluation.sample(n=min(args.n_eval, len(evaluation)), random_state=0)

    model = ArmoRM(
        BackboneFeaturizer(args.backbone, layer=args.layer, max_length=512, dtype="bfloat16"),
        pair_objective_column="objective",  # pairs -> one Bradley–Terry objective per source
        decorrelator=VerbosityDecorrelator(threshold=0.03, drop_verbosity=True),
        gating=GatedScalarizer(hidden_size=128, max_epochs=60, batch_size=128),
        random_state=0,
    )
    model.fit(pairs, ratings=ratings)  # ratings -> one ridge objective per rating column
    print("objectives:", list(model.objective_names_))
    print("λ (verbosity penalty per objective):", model.decorrelator_.lambdas_.round(2).tolist())

    scores = model.reward_pairs(evaluation[["prompt", "chosen", "rejected"]])  # (n, 2): chosen, rejected
    result = rewardbench_scores(evaluation, scores[:, 0], scores[:, 1])
    print(f"\nRewardBench-style overall: {100 * result['overall']:.1f} ± {100 * result['overall_stderr']:.1f}")
    for section, value in result["sections"].items():
        print(f"  {section:10s} {100 * value:5.1f} ± {100 * result['section_stderr'][section]:.1f}")

    print("\nWhy the model prefers what it prefers (first three evaluation pairs):")
    few = evaluation.head(3)[["prompt", "chosen", "rejected"]]
    explanation = model.explain(few)
    for i, (_, row) in enumerate(few.iterrows()):
        print(f"\n[{i}] {row['prompt'][:100]!r}")
        part = explanation[explanation["row"] == i]
        table = part.pivot(index="objective", columns="side", values=["reward", "contribution"]).round(3)
        print(table.to_string())
        total = part.groupby("side")["score"].first()
        print(f"score chosen {total['chosen']:.3f} vs rejected {total['rejected']:.3f}")


if __name__ == "__main__":
    main()
