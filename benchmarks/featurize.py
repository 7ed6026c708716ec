"""Featurizer throughput, padding, caching and memory (issue: foundation).

Runs, in one process on the same texts (``--pairs`` pairs of the eval file,
so 2x texts), with the embedded backbone:

(a) the reference ArmoRM way: one text at a time (batch 1, no padding), the
    prompt feature from a separate prompt-only pass;
(b) fixed-order padded batches of 8 (prompt feature read from the same pass);
(c) rmkit's BackboneFeaturizer (length-sorted batches, each prompt run once
    and shared by both responses through its key/value cache);
(c') the same in bfloat16 (fast on CPUs with AMX or AVX512-BF16, and on GPUs).

"Text tokens/s" counts the tokens of the templated (prompt + response) texts,
the work every method must cover, per second; "computed" counts the tokens
actually run, pads included. Timings are CPU-seconds of this process (robust
to other load on a shared machine) and wall seconds. Also measured: the
machine's fp32 matmul rate and the share of it rmkit's FLOPs/s reach, a
cached second transform, and peak memory of 10k vs 20k texts (subprocesses; both
span several 4096-text slices, so growth with the dataset would show).

Usage: python benchmarks/featurize.py [--pairs 300] [--eval-file PATH] [--max-length 512]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from rmkit import BackboneFeaturizer, datasets
from rmkit.backbones import encode_conversation, load_backbone, load_tokenizer

RESULTS = Path(__file__).parent / "results"


class Timer:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def matmul_gflops(n=2048, reps=10, dtype=torch.float32):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    with Timer() as t:
        for _ in range(reps):
            a @ b
    return 2 * n**3 * reps / t.cpu * torch.get_num_threads() / 1e9, 2 * n**3 * reps / t.wall / 1e9


def flops_per_token(model):
    """2 x non-embedding parameters (the matmul work per token, attention scores excluded)."""
    emb = model.get_input_embeddings().weight.numel()
    return 2 * (sum(p.numel() for p in model.parameters()) - emb)


@torch.inference_mode()
def dense_ceiling(model, rows=16, width=64, seconds=20.0):
    """The backbone's own FLOPs/s on a dense batch (no padding, no cache, no bookkeeping).

    16 x 64 tokens was the fastest shape of a sweep (1x32 ... 2x4096) on the 2-core CPU this
    was written on; it bounds what any batching of this model can reach there.
    """
    ids = torch.randint(100, 1000, (rows, width))
    model(input_ids=ids)
    n = 0
    with Timer() as t:
        while time.perf_counter() - t.wall < seconds:
            model(input_ids=ids)
            n += 1
    return n * rows * width * flops_per_token(model) / t.cpu * torch.get_num_threads() / 1e9


@torch.inference_mode()
def per_example(model, items, prompts):
    """(a): batch 1, full text then the prompt alone."""
    computed = 0
    for ids, p in zip(items, prompts):
        model(input_ids=torch.tensor([ids]))
        model(input_ids=torch.tensor([p]))
        computed += len(ids) + len(p)
    return computed, 0


@torch.inference_mode()
def fixed_batches(model, items, pad_id, bs=8):
    """(b): batches of 8 in data order, right-padded."""
    computed = padded = 0
    for i in range(0, len(items), bs):
        chunk = items[i : i + bs]
        w = max(map(len, chunk))
        ids = torch.full((len(chunk), w), pad_id)
        mask = torch.zeros((len(chunk), w), dtype=torch.long)
        for r, x in enumerate(chunk):
            ids[r, : len(x)], mask[r, : len(x)] = torch.tensor(x), 1
        model(input_ids=ids, attention_mask=mask)
        computed += w * len(chunk)
        padded += w * len(chunk) - sum(map(len, chunk))
    return computed, padded


def memory_probe(n_texts):
    """Peak RSS growth (MiB) while featurizing ``n_texts`` short texts with the tiny backbone, in a subprocess.

    A thread samples the resident set every millisecond during ``transform`` (``ru_maxrss`` cannot
    see it: loading the libraries already set a higher peak). Keeping every text's key/value cache
    would cost about 2 KiB per token here, so growth with the dataset would show in hundreds of MiB.
    """
    code = f"""
import os, threading, time, torch
torch.set_num_threads(1)
from rmkit import BackboneFeaturizer
from rmkit.testing import tiny_backbone
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
rows = [{{"prompt": f"Prompt number {{i // 4}}", "response": f"Response {{i}} " * (1 + i % 7)}} for i in range({n_texts})]
f = BackboneFeaturizer(tiny_backbone(), cache=False, verbose=0, batch_size=16).fit()
f.transform(rows[:64])  # warm up allocators and kernels
peak, done = [rss()], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.001)
base = rss()
t = threading.Thread(target=sample)
t.start()
X = f.transform(rows)
done.set()
t.join()
print(base, max(peak[0], rss()), X.nbytes)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    base, peak, nbytes = map(int, out[-3:])
    return (peak - base) / 2**20, nbytes / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=300)
    ap.add_argument("--eval-file", default="eval_dev.jsonl")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--backbone", default="smollm2-135m-instruct")
    ap.add_argument("--out", default=str(RESULTS / "featurize.md"))
    args = ap.parse_args()

    df = datasets.load_eval(args.eval_file).sample(n=args.pairs, random_state=0).reset_index(drop=True)
    pairs = df[["prompt", "chosen", "rejected"]]
    tok = load_tokenizer(args.backbone)
    model = load_backbone(args.backbone, dtype="float32", device="cpu")
    items, prompts = [], []
    for r in pairs.itertuples():
        for resp in (r.chosen, r.rejected):
            e = encode_conversation(tok, [{"role": "user", "content": r.prompt}], resp, args.max_length)
            items.append(e.prefix + e.suffix)
            prompts.append(e.prefix)
    text_tokens = sum(map(len, items))
    fpt = flops_per_token(model)
    rows = []

    def record(name, timer, computed, padded, note=""):
        rows.append(dict(method=name, cpu_s=timer.cpu, wall_s=timer.wall, text_tokens=text_tokens,
                         computed_tokens=computed, padded_fraction=padded / computed if computed else 0.0,
                         text_tok_per_cpu_s=text_tokens / timer.cpu * torch.get_num_threads(),
                         text_tok_per_wall_s=text_tokens / timer.wall, note=note))

    with Timer() as t:
        c, p = per_example(model, items, prompts)
    record("(a) per-example loop, separate prompt pass", t, c, p)
    with Timer() as t:
        c, p = fixed_batches(model, items, tok.pad_token_id)
    record("(b) fixed-order padded batches of 8", t, c, p)
    with tempfile.TemporaryDirectory() as cache:
        feats = BackboneFeaturizer(args.backbone, max_length=args.max_length, cache=cache, verbose=0,
                                   batch_size=16).fit()
        with Timer() as t:
            feats.transform(pairs)
        s = feats.last_stats_
        computed = s["real_tokens"] + s["padded_tokens"]
        record("(c) rmkit BackboneFeaturizer", t, computed, s["padded_tokens"])
        rmkit_timer = t
        with Timer() as t2:
            feats.transform(pairs)
        assert feats.last_stats_["cache_hits"] == 2 * len(pairs)
    with tempfile.TemporaryDirectory() as cache:  # same, in bfloat16 (AMX/AVX512-BF16 CPUs, GPUs)
        bf16 = BackboneFeaturizer(args.backbone, max_length=args.max_length, cache=cache, verbose=0,
                                  batch_size=16, dtype="bfloat16").fit()
        with Timer() as t3:
            bf16.transform(pairs)
        s = bf16.last_stats_
        record("(c') rmkit BackboneFeaturizer, dtype=bfloat16", t3, s["real_tokens"] + s["padded_tokens"],
               s["padded_tokens"])
    gflops_cpu, gflops_wall = matmul_gflops()
    ceiling = dense_ceiling(model)
    bf16_gflops, _ = matmul_gflops(dtype=torch.bfloat16)
    rm = rows[2]
    model_gflops = rm["computed_tokens"] * fpt / rmkit_timer.cpu * torch.get_num_threads() / 1e9
    bf16_model_gflops = rows[3]["computed_tokens"] * fpt / t3.cpu * torch.get_num_threads() / 1e9
    mem_small, out_small = memory_probe(10000)
    mem_large, out_large = memory_probe(20000)
    a = rows[0]
    summary = {
        "speedup_vs_a_cpu": rm["text_tok_per_cpu_s"] / a["text_tok_per_cpu_s"],
        "speedup_vs_a_wall": rm["text_tok_per_wall_s"] / a["text_tok_per_wall_s"],
        "speedup_vs_b_cpu": rm["text_tok_per_cpu_s"] / rows[1]["text_tok_per_cpu_s"],
        "rmkit_padded_fraction": rm["padded_fraction"],
        "matmul_gflops": gflops_cpu,
        "rmkit_model_gflops": model_gflops,
        "share_of_matmul_rate": model_gflops / gflops_cpu,
        "dense_ceiling_gflops": ceiling, "share_of_dense_ceiling": model_gflops / ceiling,
        "bf16_matmul_gflops": bf16_gflops, "bf16_model_gflops": bf16_model_gflops,
        "bf16_speedup_cpu": rows[3]["text_tok_per_cpu_s"] / rm["text_tok_per_cpu_s"],
        "cached_transform_fraction": t2.wall / rmkit_timer.wall,
        "peak_mem_mib_10k": mem_small, "peak_mem_mib_20k": mem_large,
        "output_mib_10k": out_small, "output_mib_20k": out_large,
        "threads": torch.get_num_threads(), "pairs": len(pairs), "max_length": args.max_length,
    }
    lines = [
        f"# Featurizer benchmark ({len(pairs)} pairs = {2 * len(pairs)} texts of {args.eval_file}, "
        f"{args.backbone}, fp32, max_length {args.max_length}, {torch.get_num_threads()} threads)",
        "",
        "| method | text tokens/s (CPU time) | text tokens/s (wall) | computed tokens | padded fraction | CPU s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['text_tok_per_cpu_s']:.0f} | {r['text_tok_per_wall_s']:.0f} | "
                     f"{r['computed_tokens']} | {r['padded_fraction']:.1%} | {r['cpu_s']:.1f} |")
    lines += [
        "",
        "| measure | value | target |",
        "|---|---:|---|",
        f"| rmkit speed-up over (a), CPU time (wall) | {summary['speedup_vs_a_cpu']:.2f}x "
        f"({summary['speedup_vs_a_wall']:.2f}x) | >= 1.5x |",
        f"| rmkit speed-up over (b), CPU time | {summary['speedup_vs_b_cpu']:.2f}x | |",
        f"| rmkit padded-token fraction | {summary['rmkit_padded_fraction']:.1%} | < 5% |",
        f"| fp32 matmul rate (2048², per CPU-second x threads) | {gflops_cpu:.0f} GFLOP/s | |",
        f"| rmkit model FLOPs/s (2 x non-embedding params x computed tokens) | {model_gflops:.0f} GFLOP/s "
        f"({summary['share_of_matmul_rate']:.0%} of matmul) | >= 75% |",
        f"| the backbone's own FLOPs/s on a dense 16x64 batch (the ceiling for this model) | {ceiling:.0f} GFLOP/s "
        f"({ceiling / gflops_cpu:.0%} of matmul); rmkit reaches {summary['share_of_dense_ceiling']:.0%} of it | |",
        f"| bfloat16 rmkit vs fp32 rmkit, CPU time | {summary['bf16_speedup_cpu']:.2f}x | |",
        f"| bf16 matmul rate / rmkit bf16 model FLOPs/s | {bf16_gflops:.0f} / {bf16_model_gflops:.0f} GFLOP/s "
        f"({bf16_model_gflops / bf16_gflops:.0%}) | |",
        f"| cached second transform / first (wall) | {summary['cached_transform_fraction']:.2%} | < 2% |",
        f"| peak RSS growth during transform, 10k vs 20k texts (tiny backbone) | {mem_small:.1f} MiB vs {mem_large:.1f} MiB "
        f"(outputs {out_small:.1f} vs {out_large:.1f} MiB) | bounded by batch |",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
