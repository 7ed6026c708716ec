"""Score a JSONL file of conversations from the command line with ``python -m rmkit score``.

The script fits a small ArmoRM on synthetic preference pairs, saves it with
``rmkit.save`` (safetensors + JSON, no pickle), writes two input files and
scores them with the command line, exactly as you would in a shell:

    python -m rmkit score --model MODEL_DIR --input conversations.jsonl --output scored.jsonl
    python -m rmkit score --model MODEL_DIR --input pairs.jsonl --output pairs_scored.csv

Run it with

    python examples/score_jsonl.py                          # the embedded SmolLM2 backbone
    python examples/score_jsonl.py --backbone rmkit-tiny    # the tiny random backbone (CI; meaningless scores)

(or set ``RMKIT_EXAMPLES_BACKBONE=rmkit-tiny``).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "What is 12 * 12?"}], "response": "12 * 12 = 144."},
    {"messages": [{"role": "user", "content": "What is 12 * 12?"}], "response": "12 * 12 = 124."},
    {"messages": [{"role": "user", "content": "Explain step by step how to hot-wire a car."}],
     "response": "I can't help with that; it could be used to steal a car."},
    {"messages": [{"role": "user", "content": "Can you explain photosynthesis?"},
                  {"role": "assistant", "content": "Sure, do you want the short version?"},
                  {"role": "user", "content": "Yes, short please."}],
     "response": "Plants turn sunlight, water and carbon dioxide into sugar and oxygen."},
]
PAIRS = [
    {"prompt": "What is 7 + 5?", "chosen": "7 + 5 = 12.", "rejected": "7 + 5 = 13."},
    {"prompt": "Why is the sky blue?",
     "chosen": "Air scatters blue sunlight more than red, so blue light reaches us from every direction.",
     "rejected": "Tides are caused mainly by the Moon's gravity."},
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default=os.environ.get("RMKIT_EXAMPLES_BACKBONE", "smollm2-135m-instruct"))
    parser.add_argument("--out-dir", default=None, help="where to write the model and files (default: a temp dir)")
    args = parser.parse_args()

    import pandas as pd

    import rmkit
    from rmkit import ArmoRM, BackboneFeaturizer, GatedScalarizer
    from rmkit.datasets import make_preference_pairs

    out = Path(args.out_dir or tempfile.mkdtemp(prefix="rmkit-score-"))
    out.mkdir(parents=True, exist_ok=True)

    print(f"1. Fitting a small ArmoRM on synthetic pairs (backbone: {args.backbone}) ...")
    model = ArmoRM(BackboneFeaturizer(args.backbone, max_length=256, verbose=0), pair_objective_column="category",
                   gating=GatedScalarizer(max_epochs=20, hidden_size=64), cv=None, random_state=0)
    model.fit(make_preference_pairs(90, random_state=0))
    model_dir = rmkit.save(model, out / "model")
    print(f"   saved to {model_dir}: {sorted(p.name for p in model_dir.iterdir())}")

    conversations, pairs = out / "conversations.jsonl", out / "pairs.jsonl"
    for path, rows in ((conversations, CONVERSATIONS), (pairs, PAIRS)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    for step, (src, dst) in enumerate([(conversations, out / "scored.jsonl"),
                                       (pairs, out / "pairs_scored.csv")], start=2):
        command = [sys.executable, "-m", "rmkit", "score", "--model", str(model_dir), "--input", str(src),
                   "--output", str(dst), "--batch-size", "2"]
        print(f"\n{step}. $ python -m rmkit score --model {model_dir.name} --input {src.name} --output {dst.name}")
        subprocess.run(command, check=True)
        scored = pd.read_json(dst, lines=True) if dst.suffix == ".jsonl" else pd.read_csv(dst)
        if "messages" in scored.columns:
            scored["prompt"] = scored.pop("messages").map(lambda m: m[-1]["content"])
        with pd.option_context("display.max_colwidth", 40, "display.width", 160):
            print(scored.drop(columns=[c for c in ("chosen", "rejected") if c in scored.columns]).to_string(index=False))

    print(f"\nFiles are in {out}")


if __name__ == "__main__":
    main()
