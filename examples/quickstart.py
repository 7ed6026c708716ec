"""rmkit quickstart: train an ArmoRM-style reward model, score, explain, save, load.

Runs offline on the embedded SmolLM2-135M-Instruct backbone in a few minutes
on 2 CPU cores. With no data argument it generates a small preference set
whose right answers are known by construction (correct vs wrong arithmetic,
refusal vs compliance on plainly harmful requests, on-topic vs off-topic
answers); ``--data`` takes a JSONL/CSV/parquet file or a Hugging Face dataset
name with ``prompt``, ``chosen``, ``rejected`` (and optionally ``category``)
columns instead.

    python examples/quickstart.py                 # embedded backbone, generated data
    python examples/quickstart.py --data my_pairs.jsonl --objective-column category
    python examples/quickstart.py --tiny          # seconds: tiny random backbone (CI smoke run)
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

import rmkit
import rmkit.testing
from rmkit import ArmoRM, BackboneFeaturizer, GatedScalarizer
from rmkit.datasets import load_table, make_preference_pairs
from rmkit.metrics import pairwise_accuracy
from rmkit.model_selection import prompt_train_test_split


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="pairs file or HF dataset name (default: generated pairs)")
    ap.add_argument("--objective-column", default="category",
                    help="column naming each pair's objective (one Bradley–Terry probe per value)")
    ap.add_argument("--n", type=int, default=150, help="generated pairs (ignored with --data)")
    ap.add_argument("--backbone", default=rmkit.EMBEDDED_BACKBONE)
    ap.add_argument("--tiny", action="store_true", help="use the tiny random test backbone")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    backbone = rmkit.testing.tiny_backbone() if args.tiny else args.backbone

    pairs = load_table(args.data) if args.data else make_preference_pairs(args.n, random_state=args.seed)
    # held out by prompt: no held-out prompt (and none of its pairs) is seen in training
    train, held_out = prompt_train_test_split(pairs, test_size=0.3, random_state=args.seed)
    train, held_out = train.reset_index(drop=True), held_out.reset_index(drop=True)
    print(f"data: {len(train)} training and {len(held_out)} held-out pairs"
          + (f", objectives from '{args.objective_column}'" if args.objective_column in pairs else ""))

    t0 = time.perf_counter()
    model = ArmoRM(
        BackboneFeaturizer(backbone, max_length=512, verbose=1),
        pair_objective_column=args.objective_column if args.objective_column in pairs else None,
        gating=GatedScalarizer(max_epochs=60, hidden_size=64, lr=3e-3),
        cv=3,
        random_state=args.seed,
    ).fit(train)
    print(f"fitted in {time.perf_counter() - t0:.0f} s; objectives: {list(model.objective_names_)}")

    print("as a pipeline of public parts:", " -> ".join(model.pipeline_.named_steps))
    p = model.predict_proba(held_out)[:, 1]  # P(chosen > rejected)
    print(f"held-out pairwise accuracy: {model.score(held_out):.3f}")
    chosen = model.predict(held_out[["prompt", "chosen"]].rename(columns={"chosen": "response"}))
    rejected = model.predict(held_out[["prompt", "rejected"]].rename(columns={"rejected": "response"}))
    print(f"pointwise scores agree: accuracy {pairwise_accuracy(chosen, rejected):.3f}")
    if "category" in held_out:
        for cat, part in held_out.groupby("category"):
            print(f"  {cat:>10}: {np.mean(p[part.index] > 0.5):.3f} on {len(part)} pairs")

    entropy = model.gating_entropy(held_out).mean()
    print(f"mean gate entropy: {entropy:.3g} nats (0: one objective per prompt; "
          f"{np.log(len(model.gating_.objective_names_)):.3g}: an even mix)")
    print("\nwhy the model scores two held-out responses as it does:")
    sample = held_out[["prompt", "chosen"]].rename(columns={"chosen": "response"}).head(2)
    print(model.explain(sample).to_string(index=False, max_colwidth=40, float_format=lambda v: f"{v:.3g}"))

    with tempfile.TemporaryDirectory() as tmp:
        rmkit.save(model, f"{tmp}/armorm")
        again = rmkit.load(f"{tmp}/armorm")
        same = np.allclose(again.predict_proba(held_out)[:, 1], p, atol=1e-6)
        print(f"\nsaved with rmkit.save (safetensors + JSON) and loaded back: predictions identical = {same}")
        if not same:
            raise SystemExit("reloaded model predicts differently")


if __name__ == "__main__":
    main()
