"""Train a DMoERM reward model on the embedded backbone: route by task, then mix capability experts.

Data: RMB preference pairs from ``pairwise_train.jsonl.gz``. The task of a
pair is the top level of its RMB scenario (``category``): ``Helpfulness`` or
``Harmlessness``. The router (outer layer) learns it from the prompt; each
task gets its own inner model, trained on that task's pairs only.

Capabilities and where their labels come from (+1: chosen better, -1:
rejected better, NaN: no label):

* ``rmb_judgement``: RMB's own label. RMB judges Helpfulness pairs on
  helpfulness and Harmlessness pairs on harmlessness (GPT-4, human-checked),
  so in each task it is that task's core capability.
* ``refusal``: derived from the text: +1 when only the chosen response
  declines or warns (a fixed list of refusal phrases), -1 when only the
  rejected one does, NaN when both or neither do.
* ``conciseness``: derived from the text: +1 when the chosen response is
  at least 20% shorter, -1 when it is at least 20% longer, NaN otherwise.

Why not the local LLM judge: ``CapabilityLabeler`` with the embedded
SmolLM2-135M-Instruct answers "A" to nearly every question, whichever
response is shown first, so the swap-consistency filter (rightly) keeps
almost no labels. ``--judge-pairs N`` runs it on N pairs and prints its
agreement report; with an OpenAI-compatible endpoint (``--judge-url``,
``--judge-model``, key in ``$OPENAI_API_KEY``) its labels can replace the
derived ones (``--judge-labels``).

    python examples/dmoerm.py                       # 50 pairs per task: a few minutes on 2 idle cores
    python examples/dmoerm.py --n-train 300 --n-test 200 --max-chars 3000 --max-length 512 --task-finetune

Backbone features and judge replies are cached on disk, so reruns only pay
for training.
"""

import argparse
import os
import re
import time

import numpy as np
import pandas as pd

REFUSAL = re.compile(
    r"\b(?:I can(?:no|')t|I cannot|I'm sorry|I am sorry|I apologi[sz]e|I won't|I will not|I'm not able|"
    r"I am not able|I'm unable|I am unable|as an AI|not appropriate|I must decline|I strongly advise)\b",
    re.IGNORECASE,
)
CAPABILITIES = {
    "rmb_judgement": "the quality RMB judges for this scenario (helpfulness or harmlessness)",
    "refusal": "declines or warns against harmful requests",
    "conciseness": "says what is needed in few words",
}


def derived_labels(df):
    """Capability labels derived from the data (see the module docstring)."""
    rc, rr = df["chosen"].str.contains(REFUSAL), df["rejected"].str.contains(REFUSAL)
    lc, lr = df["chosen"].str.len(), df["rejected"].str.len()
    return pd.DataFrame({
        "rmb_judgement": 1.0,  # the chosen response is RMB's preferred one
        "refusal": np.where(rc & ~rr, 1.0, np.where(rr & ~rc, -1.0, np.nan)),
        "conciseness": np.where(lc <= 0.8 * lr, 1.0, np.where(lr <= 0.8 * lc, -1.0, np.nan)),
    }, index=df.index)


def load_rmb(path, n_train, n_test, max_chars, seed):
    from rmkit.datasets import load_pairwise

    df = load_pairwise(path)
    df = df[df["source"].str.startswith("rmb")].copy()
    df["task"] = df["category"].str.split("/").str[0]
    # Keep the example fast on a CPU: leave out very long conversations.
    size = df["prompt"].str.len() + df[["chosen", "rejected"]].apply(lambda c: c.str.len()).max(axis=1)
    df = df[size <= max_chars]
    # Disjoint prompts between training and test pairs.
    prompts = df["prompt"].drop_duplicates().sample(frac=1.0, random_state=seed)
    test_prompts = set(prompts.iloc[: len(prompts) // 3])
    is_test = df["prompt"].isin(test_prompts)
    cols = ["prompt", "chosen", "rejected", "task"]

    def pick(d, n):
        parts = [g.sample(n=min(n, len(g)), random_state=seed) for _, g in d.groupby("task")]
        return pd.concat(parts)[cols].reset_index(drop=True)

    return pick(df[~is_test], n_train), pick(df[is_test], n_test)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None,
                        help="folder of the data files (default: rmkit.datasets.data_dir())")
    parser.add_argument("--pairs", default="pairwise_train.jsonl.gz", help="pairs file (RMB rows are used)")
    parser.add_argument("--n-train", type=int, default=50, help="training pairs per task")
    parser.add_argument("--n-test", type=int, default=40, help="held-out pairs per task")
    parser.add_argument("--max-chars", type=int, default=1000, help="skip longer prompt + response")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per conversation")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", help="backbone dtype (LoRA adapters stay float32)")
    parser.add_argument("--task-finetune", action="store_true", help="run phase 1 (task-level LoRA, merged)")
    parser.add_argument("--judge-pairs", type=int, default=0, help="show the LLM judge's agreement on N pairs")
    parser.add_argument("--judge-url", default=None, help="OpenAI-compatible base URL (default: local SmolLM2)")
    parser.add_argument("--judge-model", default=None)
    parser.add_argument("--judge-labels", action="store_true", help="train on the judge's labels for refusal "
                        "and conciseness instead of the derived ones")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbone", default=os.environ.get("RMKIT_EXAMPLES_BACKBONE", "smollm2-135m-instruct"),
                        help="backbone name or folder ('rmkit-tiny' for a seconds-long smoke run)")
    args = parser.parse_args()
    if args.data_dir:
        os.environ["RMKIT_DATA_DIR"] = args.data_dir

    import torch

    from rmkit import (BackboneFeaturizer, CapabilityAggregator, CapabilityExperts, CapabilityLabeler, DMoERM,
                       OpenAIChatBackend)

    torch.manual_seed(args.seed)
    train, test = load_rmb(args.pairs, args.n_train, args.n_test, args.max_chars, args.seed)
    print(f"train: {train['task'].value_counts().to_dict()}   test: {test['task'].value_counts().to_dict()}")

    labels = derived_labels(train)
    judge = "local" if args.judge_url is None else OpenAIChatBackend(args.judge_url, args.judge_model)
    judged_caps = {k: CAPABILITIES[k] for k in ("refusal", "conciseness")}
    if args.judge_pairs:
        t = time.time()
        labeler = CapabilityLabeler(judged_caps, backend=judge, max_response_chars=800, verbose=1).fit()
        judged = labeler.transform(train[["prompt", "chosen", "rejected"]].head(args.judge_pairs))
        print(f"\nLLM judge on {args.judge_pairs} pairs ({time.time() - t:.0f} s; asked twice, positions swapped):")
        print(labeler.last_report_.to_string())
        print("agreement with the derived labels where both exist:",
              {c: float((judged[c] == labels.loc[judged.index, c])[judged[c].notna() & labels.loc[judged.index, c]
                                                                     .notna()].mean()) for c in judged_caps})
    if args.judge_labels:
        labels = labels[["rmb_judgement"]]  # the model's labeler judges the other two
    X = pd.concat([train, labels], axis=1)
    print("\nlabelled pairs per capability:", labels.notna().sum().to_dict())

    experts = CapabilityExperts(backbone=args.backbone, rank=8, alpha=16, layers=0.25, lr=5e-4, max_epochs=args.epochs, batch_size=8,
                                max_length=args.max_length, dtype=args.dtype, random_state=args.seed, verbose=0)
    model = DMoERM(
        CAPABILITIES,
        experts=experts,
        aggregator=CapabilityAggregator(hidden_size=64, lr=1e-3, max_epochs=100, validation_fraction=0.15,
                                        patience=10, random_state=args.seed),
        labeler=CapabilityLabeler(judged_caps, backend=judge, verbose=0) if args.judge_labels else None,
        task_finetune=args.task_finetune,
        expert_fraction=0.6,  # the paper's split: 60% of a task's pairs for the experts, 40% for the aggregator
        drop_unlabelled=True,  # a task where a capability never gets a label trains without that expert
        featurizer=BackboneFeaturizer(args.backbone, max_length=args.max_length, dtype=args.dtype, verbose=0),
        random_state=args.seed,
        verbose=0,
    )
    t = time.time()
    model.fit(X)
    print(f"fitted in {time.time() - t:.0f} s")
    for task, moe in model.estimators_.items():
        print(f"  {task}: experts trained on {moe.n_labels_}, aggregator on {len(moe.aggregator_rows_)} pairs")

    t = time.time()
    test_pairs = test[["prompt", "chosen", "rejected"]]
    p = model.predict_proba(test_pairs)[:, 1]  # P(chosen > rejected)
    print(f"\nrouting accuracy (held-out prompts): {model.routing_accuracy(test):.3f}")
    print(f"pairwise accuracy (held-out pairs):  {np.mean(p > 0.5):.3f}  (n={len(p)})")
    for task in model.classes_:
        mask = (test["task"] == task).to_numpy()
        print(f"  {task:13s} {np.mean(p[mask] > 0.5):.3f}  (n={mask.sum()})")
    print(f"scored in {time.time() - t:.0f} s")

    print("\nHow the first two test prompts were scored (chosen response):")
    rows = test.head(2)[["prompt", "chosen"]].rename(columns={"chosen": "response"})
    with pd.option_context("display.width", 160, "display.max_columns", 10):
        print(model.explain(rows).round(3).to_string())


if __name__ == "__main__":
    main()
