"""Scoring-server load test on loopback (issue: reward models in the RLHF loop).

A cheap ArmoRM is fitted on the embedded backbone (``--train-pairs`` pairs of
pairwise_train.jsonl.gz, three sources as objectives), then served three ways,
each on a fresh in-process server on 127.0.0.1 with the same model:

(a) one request at a time: no batching across requests, no prefix sharing
    (each request is scored by its own ``predict`` call);
(b) dynamic batching across requests, prefix sharing off;
(c) dynamic batching + prefix sharing (the default).

The load is GRPO-like and OpenRLHF-shaped: ``--prompts`` prompts of
bon_alpacaeval.jsonl.gz with ``--group`` real responses each (cut to
``--response-chars`` characters to bound the run), sent as ``/get_reward``
requests of one rendered query each (as OpenRLHF's rollout workers send
them) by ``--clients`` concurrent clients that take the next response in
prompt order, so the responses of one prompt arrive together. Measured:
responses/s over the whole run, and the p50/p99 latency of one request
(send to answer). Every mode scores the same responses; the rewards of all
modes are checked to agree (batching must not change scores).

The machine is shared (2 cores, other jobs running): absolute numbers move
with its load, so compare the modes' ratios within one run. The load average
is recorded beside each mode.

Usage: python benchmarks/serve.py [--prompts 16] [--group 8] [--clients 8] [--train-pairs 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

RESULTS = Path(__file__).parent / "results"
DATA = Path(os.environ.get("RMKIT_DATA_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))


def data_file(name):
    for root in (DATA, Path("/work/shared/data")):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"{name} not found under {DATA}; set RMKIT_DATA_DIR.")


def fit_model(n_pairs, seed, max_length):
    from rmkit import ArmoRM, BackboneFeaturizer, GatedScalarizer

    df = pd.read_json(data_file("pairwise_train.jsonl.gz"), lines=True)
    df = df[(df["chosen"].str.len() + df["rejected"].str.len() + df["prompt"].str.len()) < 1500]
    df["group"] = df["source"].str.split(":").str[0]
    per = n_pairs // df["group"].nunique()
    pairs = pd.concat([g.sample(min(per, len(g)), random_state=seed) for _, g in df.groupby("group")])
    pairs = pairs[["prompt", "chosen", "rejected", "group"]].reset_index(drop=True)
    featurizer = BackboneFeaturizer(max_length=max_length, verbose=0)
    model = ArmoRM(featurizer, pair_objective_column="group", cv=None, random_state=seed,
                   gating=GatedScalarizer(max_epochs=30, validation_fraction=None))
    start = time.perf_counter()
    model.fit(pairs)
    return model, len(pairs), time.perf_counter() - start


def load_requests(n_prompts, group, response_chars, seed):
    """``n_prompts`` prompts with ``group`` responses each, in prompt order."""
    from rmkit._backbones import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    df = pd.read_json(data_file("bon_alpacaeval.jsonl.gz"), lines=True)
    df = df[df["candidates"].map(len) >= group].sample(n_prompts, random_state=seed)
    items = []
    for prompt, cands in zip(df["prompt"], df["candidates"]):
        outs = [c["output"].strip()[:response_chars] for c in cands if c["output"].strip()][:group]
        for out in outs:
            messages = [{"role": "user", "content": prompt}]
            query = tok.apply_chat_template(messages + [{"role": "assistant", "content": out}], tokenize=False)
            items.append({"prompt": prompt, "response": out, "query": query.rstrip("\n")})
    return items


async def run_load(url, items, n_clients):
    import httpx

    queue = asyncio.Queue()
    for i, item in enumerate(items):
        queue.put_nowait((i, item))
    rewards, latencies = [None] * len(items), [None] * len(items)

    async def client():
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            while True:
                try:
                    i, item = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                start = time.perf_counter()
                r = await http.post("/get_reward", json={"query": [item["query"]]})
                r.raise_for_status()
                latencies[i] = time.perf_counter() - start
                rewards[i] = r.json()["rewards"][0]

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(n_clients)))
    return np.asarray(rewards), np.asarray(latencies), time.perf_counter() - start


def batch_stats(url):
    import httpx

    text = httpx.get(url + "/metrics").text

    def value(name):
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0

    batches = value("rmkit_batch_rows_count")
    return batches, value("rmkit_batch_rows_sum") / max(batches, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--train-pairs", type=int, default=100)
    parser.add_argument("--response-chars", type=int, default=600)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from rmkit.serving import running_server

    model, n_pairs, fit_s = fit_model(args.train_pairs, args.seed, args.max_length)
    items = load_requests(args.prompts, args.group, args.response_chars, args.seed)
    print(f"fitted ArmoRM on {n_pairs} pairs in {fit_s:.0f}s; {len(items)} responses to score", flush=True)
    # warm-up: load the backbone and run each code path once
    warm = items[: args.group]
    modes = [
        ("(a) one request at a time, no prefix sharing", dict(batching=False, prefix_sharing=False)),
        ("(b) dynamic batching, no prefix sharing", dict(batching=True, prefix_sharing=False)),
        ("(c) dynamic batching + prefix sharing", dict(batching=True, prefix_sharing=True)),
    ]
    rows, all_rewards = [], []
    for label, settings in modes:
        with running_server(model, batch_window_ms=10, max_batch_rows=64, **settings) as url:
            asyncio.run(run_load(url, warm, args.clients))
            base_batches, _ = batch_stats(url)
            load_before = os.getloadavg()[0]
            cpu0 = time.process_time()
            rewards, lat, wall = asyncio.run(run_load(url, items, args.clients))
            cpu = time.process_time() - cpu0
            batches, _ = batch_stats(url)
            load_after = os.getloadavg()[0]
        n_batches = batches - base_batches
        rows.append(dict(mode=label, responses=len(items), wall_s=wall, responses_per_s=len(items) / wall,
                         p50_s=float(np.percentile(lat, 50)), p99_s=float(np.percentile(lat, 99)),
                         predict_calls=int(n_batches), mean_batch=len(items) / max(n_batches, 1),
                         cpu_s=cpu, load=f"{load_before:.1f} → {load_after:.1f}"))
        all_rewards.append(rewards)
        print(json.dumps(rows[-1]), flush=True)
    max_diff = max(float(np.max(np.abs(r - all_rewards[0]))) for r in all_rewards)

    base, best = rows[0], rows[-1]
    speedup = best["responses_per_s"] / base["responses_per_s"]
    lines = [
        f"# Scoring server load test ({len(items)} responses = {args.prompts} prompts x {args.group} "
        f"responses, {args.clients} concurrent clients, smollm2-135m-instruct ArmoRM, fp32, "
        f"{torch.get_num_threads()} torch threads)",
        "",
        "Loopback HTTP, OpenRLHF-shaped `/get_reward` requests of one query each; responses of "
        f"bon_alpacaeval.jsonl.gz cut to {args.response_chars} characters, featurizer max_length "
        f"{args.max_length}. The model: ArmoRM fitted on {n_pairs} pairs of pairwise_train.jsonl.gz "
        f"({fit_s:.0f} s). **Shared, loaded machine** (2 cores, other jobs running; load average in the "
        "table): compare the ratios within this run, not absolute numbers across runs.",
        "",
        "| mode | responses/s | p50 latency (s) | p99 latency (s) | predict calls | mean rows per call | "
        "wall (s) | load avg |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['responses_per_s']:.2f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | "
                     f"{r['predict_calls']} | {r['mean_batch']:.1f} | {r['wall_s']:.0f} | {r['load']} |")
    lines += [
        "",
        "| measure | value | target |",
        "|---|---:|---|",
        f"| (c) vs (a) responses/s | {speedup:.2f}x | >= 2x |",
        f"| (b) vs (a) responses/s (batching alone) | {rows[1]['responses_per_s'] / base['responses_per_s']:.2f}x | |",
        f"| (c) vs (a) p99 latency | {best['p99_s'] / base['p99_s']:.2f}x | <= 1x |",
        f"| largest reward difference between modes | {max_diff:.2e} | < 1e-5 |",
        "",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve.md").write_text("\n".join(lines))
    (RESULTS / "serve.json").write_text(json.dumps(dict(args=vars(args), rows=rows, max_reward_diff=max_diff,
                                                        train_pairs=n_pairs, fit_s=fit_s), indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
