"""RewardBench-style quality of reward models built on the embedded backbone.

Every model is trained on the same prefix of a seeded order of the training files (``--config full``: every
pair with non-empty texts and every rated row)
and scored on all non-Extra pairs of an evaluation file (default
``eval_dev.jsonl``). Features come from one :class:`rmkit.BackboneFeaturizer`
and its on-disk cache, so repeated runs only pay for training.

Models are entries of ``MODELS``: a name mapped to a function
``build(data) -> (chosen_scores, rejected_scores)`` on ``data.eval``. To add a
row, add an entry (e.g. ``MODELS["dmoerm"] = my_builder``).

Usage::

    python benchmarks/quality.py --config small            # minutes
    python benchmarks/quality.py --config full             # reported numbers (all 20,413 pairs)
    python benchmarks/quality.py --eval path/to/other_eval.jsonl --models length bt_probe

On a GPU machine, as the reported tables were made::

    python benchmarks/quality_layers.py --pairs 2000 --batch-size 64          # the feature layer, by CV
    python benchmarks/quality.py --config full --featurize-only --batch-size 64
    python benchmarks/quality.py --config lora_gpu --models length dmoerm single_lora

then, with the GPU's feature cache copied to a CPU machine (bfloat16 keys)::

    python benchmarks/quality.py --config full --dtype bfloat16 --models length bt_probe objective_mean armorm armorm_ref
    python benchmarks/quality.py --replot benchmarks/results/quality.json --add-rows benchmarks/results/quality_lora_gpu.json

Results go to ``benchmarks/results/quality[_<config>].md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.frozen import FrozenEstimator
from threadpoolctl import threadpool_limits

from rmkit import (
    ArmoRM,
    BackboneFeaturizer,
    GatedScalarizer,
    MultiObjectiveRegressor,
    ObjectiveUnion,
    VerbosityDecorrelator,
)
from rmkit.backbones import resolve_dtype
from rmkit.datasets import load_eval, load_pairwise, load_ratings
from rmkit.layout import read_layout, select_side
from rmkit.metrics import rewardbench_scores
from rmkit.objectives import response_token_lengths

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model():
    """The CPU's model name and whether it runs bfloat16 natively (printed in every table)."""
    from rmkit.backbones import cpu_has_native_bf16

    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, native bf16: {'yes' if cpu_has_native_bf16() else 'no'}"

# Backbone layer of the features (chosen once by the lead on training data; see the report).
DEFAULT_LAYER = 10

# Training data: every pair and every rated row, in a seeded random order; configs take prefixes of it. The
# first 2,000 pairs are the 2,000-pair sample of earlier tables (``DataFrame.sample`` draws a permutation prefix).
SHUFFLE_SEED = 0
# The 2,000-pair / 1,500-row samples of earlier tables, which ``bon.py`` trains on (= the "2k" config's rows).
PAIR_SAMPLE = dict(n=2000, random_state=SHUFFLE_SEED)
RATING_SAMPLE = dict(n=1500, random_state=SHUFFLE_SEED)
CONFIGS = {
    "small": dict(n_pairs=400, n_ratings=300, n_eval=400, cv=3),
    "medium": dict(n_pairs=1000, n_ratings=300, n_eval=None, cv=5),
    "2k": dict(n_pairs=2000, n_ratings=1500, n_eval=None, cv=5),  # the CPU-affordable config of earlier tables
    "full": dict(n_pairs=None, n_ratings=None, n_eval=None, cv=5),  # all 20,418 pairs and 4,469 rated rows
}
# Where the gates (ArmoRM stage 2, DMoERM's aggregator) train: the GPU when there is one.
GATE_DEVICE = "auto"
RATING_COLUMNS = ["gpt4_ref_score_1to10", "autoj_gpt4_rating_1to10", "prometheus_rubric_score_1to5"]

# ArmoRM hyperparameters, chosen on a length-balanced validation split of the training pairs
# (see ``armorm`` below); never on the evaluation file.
ARMORM_GATING = dict(hidden_size=128, n_hidden_layers=2, dropout=0.2, temperature=1.0, lr=1e-3,
                     max_epochs=60, batch_size=128, validation_fraction=0.1, patience=10)
ARMORM_DECORRELATION = dict(threshold=0.03, drop_verbosity=True)

# ArmoRM as its authors ran it (RLHFlow's reference code, stage 2): gating temperature 10, 3 hidden layers of
# 1024, ~2000 AdamW steps of batch 1024 without early stopping, verbosity threshold 0.028, ridge alpha grid
# 1e-4..1e4 (``MultiObjectiveRegressor``'s default grid). Steps = max_epochs x ceil(n_pairs / batch_size):
# ``max_epochs`` is derived from the number of training pairs in ``armorm_reference`` below.
ARMORM_REFERENCE_STEPS = 2000
ARMORM_REFERENCE_GATING = dict(hidden_size=1024, n_hidden_layers=3, dropout=0.2, temperature=10.0, lr=1e-3,
                               batch_size=1024, validation_fraction=None)
ARMORM_REFERENCE_DECORRELATION = dict(threshold=0.028, drop_verbosity=True)

# RMB helpfulness scenarios with fewer training pairs than this share one "other" objective (fine split).
MIN_SCENARIO_PAIRS = 40


def pair_objective(row, fine=False):
    """Which pairwise objective a training pair belongs to.

    Coarse (``fine=False``): one per source family (RMB helpfulness, RMB harmlessness, AlpacaEval, UltraFeedback).
    Fine: one per RMB helpfulness scenario (``Helpfulness/Code``, ...), RMB harmlessness, one per AlpacaEval judge
    (GPT-4, GPT-4-turbo), UltraFeedback.
    """
    src = str(row["source"])
    if src.startswith("rmb"):
        parts = str(row["category"]).split("/")
        if fine and parts[0].lower() == "helpfulness" and len(parts) > 1:
            return "rmb_help_" + parts[1].lower().replace(" ", "_")
        return "rmb_" + parts[0].lower()
    if src.startswith("alpaca_eval"):
        return ("alpaca_eval_" + ("gpt4_turbo" if "turbo" in src else "gpt4")) if fine else "alpaca_eval"
    if src.startswith("ultrafeedback"):
        return "ultrafeedback"
    return None


def fine_objectives(train):
    """The fine objective column, small RMB helpfulness scenarios pooled into ``rmb_help_other``."""
    fine = train.apply(pair_objective, axis=1, fine=True)
    counts = fine.value_counts()
    small = fine.str.startswith("rmb_help_") & fine.map(counts).lt(MIN_SCENARIO_PAIRS)
    return fine.where(~small, "rmb_help_other")


def text_frame(df, kind):
    """The text columns rmkit reads (multi-turn rows use their flattened ``prompt`` string)."""
    cols = ["prompt"] + (["chosen", "rejected"] if kind == "pairs" else ["response"])
    return pd.DataFrame({c: df[c].to_numpy() for c in cols})


@dataclass
class BenchData:
    """Everything a model builder may use; features are computed once."""

    featurizer: BackboneFeaturizer
    train: pd.DataFrame  # pairs (text columns + source/category/objective)
    ratings: pd.DataFrame  # pointwise rows + rating columns
    eval: pd.DataFrame  # pairs with subset/category
    cv: int
    seed: int = 0
    cache: dict = field(default_factory=dict)
    config: str = "full"

    def features(self, name):
        """Featurizer output for ``train`` (pairs), ``ratings`` (pointwise) or ``eval`` (pairs)."""
        if name not in self.cache:
            df = getattr(self, name)
            kind = "pointwise" if name == "ratings" else "pairs"
            self.cache[name] = self.featurizer.transform(text_frame(df, kind))
        return self.cache[name]

    def pointwise(self, name, side):
        """The pointwise feature frame of one side (``chosen``/``rejected``) of a pairs set."""
        return select_side(self.features(name), side)


# -- model builders: data -> (chosen_scores, rejected_scores) on data.eval ----------------------------

def longer_wins(data):
    """(0) The longer response (in tokens) wins."""
    n = len(data.eval)
    L = response_token_lengths(list(data.eval["chosen"]) + list(data.eval["rejected"]), data.featurizer.backbone)
    return L[:n], L[n:]


def bt_probe(data):
    """(a) One Bradley–Terry linear probe on all training pairs."""
    mor = MultiObjectiveRegressor(random_state=data.seed).fit(data.features("train"))
    R = mor.transform(data.features("eval"))
    return R["chosen:r:preference"].to_numpy(), R["rejected:r:preference"].to_numpy()


def stage1(data):
    """The stage-1 objectives ArmoRM uses: rated objectives + one BT probe per pair source."""
    rated = MultiObjectiveRegressor(random_state=data.seed).fit(data.features("ratings"), data.ratings[RATING_COLUMNS])
    union = ObjectiveUnion([("rated", FrozenEstimator(rated)),
                            ("pairwise", MultiObjectiveRegressor(random_state=data.seed))])
    return union.fit(data.features("train"), pairwise__sources=data.train["objective"].to_numpy())


def objective_mean(data):
    """(b) The unweighted mean of the standardised stage-1 objectives."""
    R = stage1(data).transform(data.features("eval"))
    lay = read_layout(R, step="objective_mean")
    return lay.block(R, "chosen", "r").mean(1), lay.block(R, "rejected", "r").mean(1)


def armorm_model(data, **overrides):
    gating = {**ARMORM_GATING, **overrides.pop("gating", {})}
    dec = {**ARMORM_DECORRELATION, **overrides.pop("decorrelation", {})}
    gating.setdefault("device", device())
    return ArmoRM(data.featurizer, rating_columns=RATING_COLUMNS, pair_objective_column="objective",
                  decorrelator=VerbosityDecorrelator(**dec), gating=GatedScalarizer(**gating), cv=data.cv,
                  random_state=data.seed, **overrides)


def gate_stats(model, eval_pairs):
    """How the fitted gate mixes on the evaluation prompts.

    Gating weights depend on the prompt only, so each evaluation prompt counts once: the mean entropy (nats)
    of the gating softmax, the same divided by ``log k`` (1 = uniform), the mean largest weight, the mean
    weight per gated objective (verbosity included where the gate sees it).
    """
    ex = model.explain(eval_pairs, as_frame=False)["chosen"]
    names = list(model.objective_names_)
    W = pd.DataFrame(ex["gating_weights"], columns=names).dropna(axis=1, how="all")
    W = W[~pd.Series(eval_pairs["prompt"].to_numpy()).duplicated().to_numpy()]
    g = W.to_numpy()
    H = -(g * np.log(np.clip(g, 1e-12, None))).sum(1)
    k = g.shape[1]
    return dict(gate_entropy=float(H.mean()), gate_entropy_stderr=float(H.std(ddof=1) / np.sqrt(len(H))),
                gate_entropy_max=float(np.log(k)), gate_entropy_normalised=float(H.mean() / np.log(k)),
                gate_max_weight=float(g.max(1).mean()), n_gated=int(k), n_prompts=int(len(H)),
                mean_weights={c: float(W[c].mean()) for c in W.columns},
                verbosity_weight=float(W["verbosity"].mean()) if "verbosity" in W else None)


def fit_armorm(data, key, objective="objective", **overrides):
    """Fit an ArmoRM variant, keep its fitted summary under ``data.cache[key]``, score the evaluation pairs."""
    train = text_frame(data.train, "pairs").assign(objective=data.train[objective].to_numpy())
    model = armorm_model(data, **overrides).fit(train, ratings=text_frame(data.ratings, "pointwise").join(
        data.ratings[RATING_COLUMNS]))
    ev = text_frame(data.eval, "pairs")
    s = model.reward_pairs(ev)
    gate = model.gating_
    batches = int(np.ceil(len(train) * (1 - (gate.validation_fraction or 0)) / gate.batch_size))
    data.cache[key] = dict(objectives=list(model.objective_names_), gated=list(model.gated_names_),
                           gating={k: v for k, v in gate.get_params().items() if k not in ("device", "verbose")},
                           decorrelation=dict(threshold=model.decorrelator_.threshold,
                                              drop_verbosity=model.decorrelator_.drop_verbosity),
                           lambdas=model.decorrelator_.lambdas_.tolist(),
                           spearman_before=model.decorrelator_.spearman_before_.tolist(),
                           spearman_after=model.decorrelator_.spearman_after_.tolist(),
                           beta=float(gate.module_.beta.detach()), epochs=len(gate.history_),
                           steps=int(len(gate.history_) * batches), **gate_stats(model, ev))
    data.cache.setdefault("models", {})[key] = model
    return s[:, 0], s[:, 1]


def armorm(data):
    """(c) ArmoRM, tuned settings: stage 1 + verbosity decorrelation (length-derived, dropped) + gating."""
    return fit_armorm(data, "armorm")


def armorm_verbosity(data):
    """(c') ArmoRM, tuned settings, the verbosity objective kept in the gate (``drop_verbosity=False``)."""
    return fit_armorm(data, "armorm_verbosity", decorrelation=dict(drop_verbosity=False))


def armorm_fine(data):
    """(c'') ArmoRM, tuned settings, one BT objective per RMB helpfulness scenario and per AlpacaEval judge."""
    return fit_armorm(data, "armorm_fine", objective="objective_fine")


def reference_gating(n_pairs, steps=None):
    """The reference gating settings, ``max_epochs`` set so that training takes ~``steps`` AdamW steps
    (default ``ARMORM_REFERENCE_STEPS``; ``--reference-steps`` lowers it where the CPU cannot afford it)."""
    steps = steps or ARMORM_REFERENCE_STEPS
    batches = int(np.ceil(n_pairs / ARMORM_REFERENCE_GATING["batch_size"]))
    return {**ARMORM_REFERENCE_GATING, "max_epochs": max(1, round(steps / batches))}


def armorm_reference(data):
    """(r) ArmoRM with the reference code's settings (tau 10, 3x1024 MLP, ~2000 steps of batch 1024, thr 0.028)."""
    return fit_armorm(data, "armorm_ref", gating=reference_gating(len(data.train), data.cache.get("reference_steps")),
                      decorrelation=ARMORM_REFERENCE_DECORRELATION)


def armorm_reference_verbosity(data):
    """(r') The reference settings with the verbosity objective kept in the gate."""
    return fit_armorm(data, "armorm_ref_verbosity",
                      gating=reference_gating(len(data.train), data.cache.get("reference_steps")),
                      decorrelation={**ARMORM_REFERENCE_DECORRELATION, "drop_verbosity": False})


MODELS = {
    "length": ("(0) longer response wins", longer_wins),
    "bt_probe": ("(a) BT linear probe", bt_probe),
    "objective_mean": ("(b) mean of objectives", objective_mean),
    "armorm": ("(c) ArmoRM, tuned", armorm),
    "armorm_verbosity": ("(c') ArmoRM, tuned, verbosity kept", armorm_verbosity),
    "armorm_fine": ("(c'') ArmoRM, tuned, per-scenario BT", armorm_fine),
    "armorm_ref": ("(r) ArmoRM, reference settings", armorm_reference),
    "armorm_ref_verbosity": ("(r') ArmoRM, reference, verbosity kept", armorm_reference_verbosity),
}
GATED = [m for m in MODELS if m.startswith("armorm")]


# -- DMoERM and a single LoRA reward model: same pairs, same LoRA settings, ~same LoRA pair passes -----

LORA = dict(rank=8, alpha=16, layers=0.25, lr=5e-4, batch_size=8, max_length=256, max_epochs=2, dtype="auto")
# LoRA models score every evaluation text with the backbone (no feature cache): lighter configs for CPUs, and
# the fair-scale one for a GPU (full-length inputs, thousands of pairs per task, phase 1 on).
CONFIGS["lora_small"] = dict(n_pairs=160, n_ratings=300, n_eval=120, cv=3)
CONFIGS["lora_medium"] = dict(n_pairs=600, n_ratings=300, n_eval=240, cv=3)
CONFIGS["lora_gpu"] = dict(n_pairs=6000, n_ratings=300, n_eval=None, cv=3,
                           lora=dict(max_length=512, batch_size=16), task_finetune=True)
REFUSAL = (r"\b(?:I can(?:no|')t|I cannot|I'm sorry|I am sorry|I apologi[sz]e|I won't|I will not|I'm not able|"
           r"I am not able|I'm unable|I am unable|as an AI|not appropriate|I must decline|I strongly advise)\b")


def dmoerm_frame(train):
    """Training pairs with a task (RMB Harmlessness vs everything else) and capability labels.

    ``preference`` is each pair's own label; ``refusal`` (+1 when only the
    chosen response declines or warns) and ``conciseness`` (+1 when the
    chosen response is at least 20% shorter) are derived from the text,
    NaN where they say nothing. The same derivation as ``examples/dmoerm.py``.
    """
    df = text_frame(train, "pairs")
    df["task"] = np.where(train["objective"].to_numpy() == "rmb_harmlessness", "harmlessness", "helpfulness")
    rc, rr = df["chosen"].str.contains(REFUSAL, case=False), df["rejected"].str.contains(REFUSAL, case=False)
    lc, lr = df["chosen"].str.len(), df["rejected"].str.len()
    df["preference"] = 1.0
    df["refusal"] = np.where(rc & ~rr, 1.0, np.where(rr & ~rc, -1.0, np.nan))
    df["conciseness"] = np.where(lc <= 0.8 * lr, 1.0, np.where(lr <= 0.8 * lc, -1.0, np.nan))
    return df


def _scores(model, eval_pairs):
    """Chosen and rejected rewards on the evaluation pairs (pointwise, so ties stay visible)."""
    c = model.predict(eval_pairs[["prompt", "chosen"]].rename(columns={"chosen": "response"}))
    r = model.predict(eval_pairs[["prompt", "rejected"]].rename(columns={"rejected": "response"}))
    return c, r


def lora_settings(data):
    """``LORA`` with the config's overrides (e.g. full-length inputs on a GPU)."""
    return {**LORA, **CONFIGS[data.config].get("lora", {})}


def dmoerm_pair_passes(train, epochs, expert_fraction=0.6, task_finetune=False):
    """LoRA pair passes DMoERM spends on ``train``, counted from its labels before it trains: per task, the
    expert split (``expert_fraction`` of the pairs) times (1 for phase 1 when on + the labelled share of each
    capability), times ``epochs``. A single LoRA RM run in another process gets its epochs from this."""
    df = dmoerm_frame(train)
    caps = ["preference", "refusal", "conciseness"]
    per_pair = df[caps].notna().sum(1) + (1 if task_finetune else 0)
    return int(round(expert_fraction * per_pair.sum() * epochs))


def dmoerm(data):
    """(d) DMoERM: task router + per-task LoRA capability experts + aggregator MLP.

    The router is TF-IDF + logistic regression on the prompt (cheap on a CPU; ``DMoERM``'s default is the
    backbone's prompt feature).
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    from rmkit import CapabilityAggregator, CapabilityExperts, DMoERM

    train = dmoerm_frame(data.train)
    lora = lora_settings(data)
    finetune = CONFIGS[data.config].get("task_finetune", False)
    model = DMoERM(["preference", "refusal", "conciseness"],
                   experts=CapabilityExperts(**lora, random_state=data.seed, verbose=0),
                   aggregator=CapabilityAggregator(hidden_size=64, max_epochs=100, validation_fraction=0.15,
                                                   patience=10, random_state=data.seed, device=device()),
                   featurizer=TfidfVectorizer(sublinear_tf=True), drop_unlabelled=True, task_finetune=finetune,
                   random_state=data.seed, verbose=0).fit(train)
    phase1 = sum(len(m.expert_rows_) for m in model.estimators_.values()) if finetune else 0
    passes = (sum(sum(m.n_labels_.values()) for m in model.estimators_.values()) + phase1) * lora["max_epochs"]
    data.cache["dmoerm"] = dict(lora_pair_passes=int(passes), tasks=train["task"].value_counts().to_dict(),
                                routing_accuracy_train=model.routing_accuracy(train), task_finetune=bool(finetune),
                                estimated_pair_passes=dmoerm_pair_passes(data.train, lora["max_epochs"],
                                                                         task_finetune=finetune))
    return _scores(model, text_frame(data.eval, "pairs"))


def single_lora(data):
    """(e) One LoRA reward model (Bradley–Terry) on the same pairs, its epochs matched to DMoERM's LoRA passes."""
    from rmkit import LoRAExpertRegressor

    train = text_frame(data.train, "pairs")
    lora = lora_settings(data)
    passes = data.cache.get("dmoerm", {}).get("lora_pair_passes") or dmoerm_pair_passes(
        data.train, lora["max_epochs"], task_finetune=CONFIGS[data.config].get("task_finetune", False))
    epochs = max(1, int(round(passes / len(train))))
    model = LoRAExpertRegressor(**{**lora, "max_epochs": epochs}, random_state=data.seed, verbose=0).fit(train)
    data.cache["single_lora"] = dict(lora_pair_passes=int(epochs * len(train)), epochs=epochs)
    return _scores(model, text_frame(data.eval, "pairs"))


MODELS["dmoerm"] = ("(d) DMoERM (LoRA experts, 256 tok)", dmoerm)
MODELS["single_lora"] = ("(e) single LoRA RM (256 tok)", single_lora)
LORA_MODELS = ["dmoerm", "single_lora"]  # run only when named in --models


def device():
    """The torch device the gates train on (``GATE_DEVICE``; ``"auto"``: CUDA when available)."""
    from rmkit.backbones import resolve_device

    return resolve_device(GATE_DEVICE)


def accelerator_name():
    """The GPU's name when the gates or the backbone run on one, else the CPU's (printed in every table)."""
    if device().startswith("cuda"):
        return f"{torch.cuda.get_device_name()} ({cpu_model()} host)"
    return cpu_model()


def chosen_layer(default=DEFAULT_LAYER):
    """The layer picked by the prompt-grouped layer sweep (``quality_layers.py``) when it has run, else ``default``."""
    path = RESULTS / "quality_layers.json"
    if path.exists():
        return int(json.loads(path.read_text())["meta"]["best_layer"])
    return default


def load_data(config, eval_path, layer, seed=0, batch_size=16, dtype="auto"):
    cfg = CONFIGS[config]
    train = load_pairwise().sample(frac=1.0, random_state=SHUFFLE_SEED).reset_index(drop=True)
    empty = np.zeros(len(train), bool)
    for col in ("prompt", "chosen", "rejected"):  # a few pairs of the file have an empty response
        empty |= train[col].fillna("").astype(str).str.strip().eq("").to_numpy()
    train = train[~empty].reset_index(drop=True)
    ratings = load_ratings().sample(frac=1.0, random_state=SHUFFLE_SEED).reset_index(drop=True)
    ratings = ratings[ratings["response"].fillna("").str.strip() != ""]  # a few rated responses are empty
    ev = load_eval(eval_path)
    if cfg["n_pairs"]:
        train = train.head(cfg["n_pairs"])
    if cfg["n_ratings"]:
        ratings = ratings.head(cfg["n_ratings"])
    if cfg["n_eval"] and cfg["n_eval"] < len(ev):
        ev = ev.sample(n=cfg["n_eval"], random_state=seed).reset_index(drop=True)
    train = train.assign(objective=train.apply(pair_objective, axis=1)).reset_index(drop=True)
    train["objective_fine"] = fine_objectives(train)
    if layer == "auto":
        layer = chosen_layer()
    feat = BackboneFeaturizer(layer=int(layer), max_length=512, dtype=dtype, batch_size=batch_size, verbose=1).fit()
    return BenchData(feat, train, ratings.reset_index(drop=True), ev, cv=cfg["cv"], seed=seed, config=config)


SECTIONS = ["Chat", "Chat Hard", "Safety", "Reasoning", "Prior"]
SUBSETS = ["xstest-should-respond", "alpacaeval-length", "llmbar-adver-neighbor", "llmbar-natural"]


def markdown(results, meta):
    head = ["model", "overall"] + SECTIONS + ["gate entropy"] + SUBSETS
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        s = r["scores"]
        cells = [r["label"], f"{100 * s['overall']:.1f} ± {100 * s['overall_stderr']:.1f}"]
        cells += [f"{100 * s['sections'][k]:.1f} ± {100 * s['section_stderr'][k]:.1f}" if k in s["sections"]
                  else "–" for k in SECTIONS]
        f = r.get("fitted")
        cells.append(f"{f['gate_entropy']:.2f} ± {f['gate_entropy_stderr']:.2f}" if f else "–")
        cells += [f"{100 * s['subsets'][k]:.1f}" if k in s["subsets"] else "–" for k in SUBSETS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += gating_table(results)
    notes = [
        f"# Reward-model quality ({meta['config']} config)",
        "",
        f"Backbone `{meta['backbone']}`, layer {meta['layer']}, {meta.get('dtype', 'bfloat16')} features "
        f"(`dtype=\"auto\"` on {meta.get('cpu', 'this CPU')}), max_length 512. "
        f"Training: the first {meta['n_train_pairs']} pairs of a seeded order of `pairwise_train.jsonl.gz` "
        f"({'all pairs with non-empty texts' if meta['config'] == 'full' else 'a seeded sample'}), "
        f"{meta['n_ratings']} rated rows of `multiobjective_sparse.jsonl.gz`. "
        f"Evaluation: {meta['n_eval']} non-Extra pairs of `{meta['eval']}`.",
        "",
        "Scores are accuracies in % (RewardBench sections: example-weighted subset means; overall = "
        "(2·Chat + 2·Chat Hard + 2·Safety + 2·Reasoning + Prior) / 9) ± one standard error. Subsets "
        "prefixed `approx-` in the data are stand-ins for RewardBench's. Ties count as wrong.",
        "",
        *lines,
        *lora_notes(meta),
        "",
        "Seconds per row (fit + scoring, features from the cache): " + ", ".join(
            f"{r['label']} {r.get('seconds', float('nan')):.0f}" for r in results.values()) + ".",
        "",
        *reference_notes(results, meta),
        *([f"Rows marked with their own training size come from `{meta['added_rows']}` (same evaluation pairs; "
            "merged with `--replot quality.json --add-rows`).", ""] if meta.get("added_rows") else []),
        f"Generated by `python benchmarks/quality.py --config {meta['config']}"
        + (f" --reference-steps {meta['reference_steps']}" if meta.get("reference_steps") else "") + "` "
        f"({meta['seconds']:.0f} s, {meta['machine']}).",
    ]
    return "\n".join(notes) + "\n"


def reference_notes(results, meta):
    """What the ArmoRM rows are, and where the reference row departs from the reference code."""
    out = ["ArmoRM rows: stage 1 = ridge probes on the 3 rated attributes + one Bradley–Terry probe per pair source "
           "family (RMB helpfulness, RMB harmlessness, AlpacaEval, UltraFeedback; the per-scenario row splits RMB "
           "helpfulness into its scenarios and AlpacaEval into its two judges), cross-fitted by prompt group; "
           "verbosity = standardised log token count; ridge/logistic penalty grid 1e-4..1e4. Tuned gate: "
           + ", ".join(f"{k} {v}" for k, v in ARMORM_GATING.items())
           + f"; decorrelation {ARMORM_DECORRELATION}."]
    ref = results.get("armorm_ref", {}).get("fitted")
    if ref:
        out[0] += (f" Reference row: temperature 10, 3 hidden layers of 1024, dropout 0.2, AdamW lr 1e-3 "
                   f"(weight decay {ref['gating']['weight_decay']}, the library default), batch 1024, no early "
                   f"stopping, verbosity threshold 0.028, {ref['steps']} steps ({ref['epochs']} epochs)")
        if ref["steps"] < ARMORM_REFERENCE_STEPS:
            out[0] += (f": the reference code's {ARMORM_REFERENCE_STEPS} steps of batch 1024 would be "
                       f"{ARMORM_REFERENCE_STEPS * 1024 // max(meta['n_train_pairs'], 1)} passes over these "
                       f"{meta['n_train_pairs']} pairs, too slow on this CPU, so the run was capped with "
                       "`--reference-steps`")
        out[0] += "."
    return ["", out[0], ""] if "armorm" in results or ref else []


def gating_table(results):
    """How each gated model mixes its objectives on the evaluation prompts, and how it was trained."""
    rows = [(r["label"], r["fitted"]) for r in results.values() if r.get("fitted")]
    if not rows:
        return []
    out = ["", "Gates on the evaluation prompts (each prompt once): mean entropy of the gating softmax in nats "
           "± one standard error (0 = one-hot, log k = uniform), the same divided by log k, the mean largest "
           "weight, the mean weight on the verbosity objective (– where `drop_verbosity=True` leaves it out of "
           "the gate) and the largest mean weights; training steps of the gate and its learned scale β.", "",
           "| model | k | entropy | entropy / log k | max weight | verbosity weight | top mean weights | "
           "τ | MLP | steps | β |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, f in rows:
        g = f["gating"]
        top = sorted(f["mean_weights"].items(), key=lambda kv: -kv[1])[:3]
        vw = "–" if f["verbosity_weight"] is None else f"{f['verbosity_weight']:.3f}"
        out.append(f"| {label} | {f['n_gated']} | {f['gate_entropy']:.3f} ± {f['gate_entropy_stderr']:.3f} | "
                   f"{f['gate_entropy_normalised']:.3f} | {f['gate_max_weight']:.3f} | {vw} | "
                   + ", ".join(f"{k} {v:.3f}" for k, v in top) +
                   f" | {g['temperature']:g} | {g['n_hidden_layers']}×{g['hidden_size']} | {f['steps']} "
                   f"({f['epochs']} epochs × batch {g['batch_size']}) | {f['beta']:.2f} |")
    return out


def length_controlled(data, scores):
    """Accuracy on the evaluation pairs split by whether the chosen response is shorter or longer (tokens).

    ``scores``: name -> (label, chosen_scores, rejected_scores). Plain pair accuracy within each bucket (all
    non-Extra sections pooled, ties wrong) ± its binomial standard error, plus the same per section.
    """
    n = len(data.eval)
    L = response_token_lengths(list(data.eval["chosen"]) + list(data.eval["rejected"]), data.featurizer.backbone)
    Lc, Lr = np.asarray(L[:n]), np.asarray(L[n:])
    buckets = {"chosen shorter": Lc < Lr, "chosen longer": Lc > Lr, "same length": Lc == Lr}
    cats = data.eval["category"].to_numpy()
    out = {"_buckets": {k: int(v.sum()) for k, v in buckets.items()},
           "_sections": {b: {sec: int((m & (cats == sec)).sum()) for sec in SECTIONS} for b, m in buckets.items()}}
    for name, (label, c, r) in scores.items():
        ok = np.asarray(c) > np.asarray(r)
        row = {"label": label}
        for b, m in buckets.items():
            acc = float(ok[m].mean()) if m.any() else float("nan")
            row[b] = dict(accuracy=acc, stderr=float(np.sqrt(acc * (1 - acc) / max(m.sum(), 1))), n=int(m.sum()),
                          sections={sec: float(ok[m & (cats == sec)].mean()) if (m & (cats == sec)).any()
                                    else None for sec in SECTIONS})
        row["gap"] = row["chosen longer"]["accuracy"] - row["chosen shorter"]["accuracy"]
        row["gap_stderr"] = float(np.hypot(row["chosen longer"]["stderr"], row["chosen shorter"]["stderr"]))
        out[name] = row
    return out


def length_markdown(length, meta):
    nb = length["_buckets"]
    head = ["model", f"chosen shorter (n={nb['chosen shorter']})", f"chosen longer (n={nb['chosen longer']})",
            "longer − shorter", f"same length (n={nb['same length']})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    sec_head = ["model"] + [f"{sec} shorter / longer" for sec in SECTIONS]
    sec_lines = ["| " + " | ".join(sec_head) + " |", "|" + "---|" * len(sec_head)]
    pct = lambda v: "–" if v is None or v != v else f"{100 * v:.1f}"
    for name, row in length.items():
        if name.startswith("_"):
            continue
        cell = lambda b: f"{100 * row[b]['accuracy']:.1f} ± {100 * row[b]['stderr']:.1f}"
        lines.append(f"| {row['label']} | {cell('chosen shorter')} | {cell('chosen longer')} | "
                     f"{100 * row['gap']:+.1f} ± {100 * row['gap_stderr']:.1f} | {cell('same length')} |")
        sec_lines.append(f"| {row['label']} | " + " | ".join(
            f"{pct(row['chosen shorter']['sections'][sec])} / {pct(row['chosen longer']['sections'][sec])}"
            for sec in SECTIONS) + " |")
    ns = length["_sections"]
    text = [
        f"# Length-controlled accuracy ({meta['config']} config)",
        "",
        f"Backbone `{meta['backbone']}`, layer {meta['layer']}, {meta['dtype']} features (`dtype=\"auto\"` on "
        f"{meta['cpu']}). Same models and training data as `quality{'' if meta['config'] == 'full' else '_' + meta['config']}.md`; "
        f"evaluation: the {meta['n_eval']} non-Extra pairs of `{meta['eval']}`, split by whether the chosen "
        "response has fewer or more tokens (backbone tokenizer, response only) than the rejected one, as in "
        "RewardBench's length categories.",
        "",
        "Plain pair accuracy in % within each bucket (sections pooled, not RewardBench-weighted; ties wrong) ± "
        "one binomial standard error. A length-neutral model scores about the same in both buckets; "
        "`longer − shorter` > 0 is a reward for length.",
        "",
        *lines,
        "",
        "Per section, accuracy in % where the chosen response is shorter / longer (pairs per section: "
        + "; ".join(f"{sec} {ns['chosen shorter'][sec]} / {ns['chosen longer'][sec]}" for sec in SECTIONS) + "):",
        "",
        *sec_lines,
        "",
        f"Generated by `python benchmarks/quality.py --config {meta['config']}"
        + (f" --reference-steps {meta['reference_steps']}" if meta.get("reference_steps") else "")
        + "` (with `quality.md`; per-pair scores in `quality_length_scores.npz`).",
    ]
    return "\n".join(text) + "\n"


def lora_notes(meta):
    """How the LoRA rows were trained, so the compute match can be checked."""
    if "dmoerm" not in meta and "single_lora" not in meta:
        return []
    lora = ", ".join(f"{k} {v}" for k, v in meta.get("lora", LORA).items())
    notes = ["", f"LoRA rows: {lora} (top quarter of the layers adapted, the rest a frozen shared trunk)."]
    if "dmoerm" in meta:
        d = meta["dmoerm"]
        notes.append(f"DMoERM: tasks {d['tasks']} (RMB harmlessness vs the rest; training routing accuracy "
                     f"{d['routing_accuracy_train']:.2f}), experts preference/refusal/conciseness"
                     + (" on a phase-1 task fine-tune merged into each task's backbone, expert value heads "
                        "initialised from the phase-1 head" if d.get("task_finetune") else "")
                     + f", {d['lora_pair_passes']} LoRA pair passes.")
    if "single_lora" in meta:
        s = meta["single_lora"]
        notes.append(f"Single LoRA RM: {s['epochs']} epochs, {s['lora_pair_passes']} LoRA pair passes "
                     "(matched to DMoERM's).")
    return notes


def write_plot(stem, results):
    """RewardBench section scores of every model as grouped bars, next to the table (needs matplotlib)."""
    try:
        from rmkit.plotting import plot_rewardbench
    except ImportError:
        return None
    ax = plot_rewardbench({r["label"]: r["scores"] for r in results.values()})
    ax.set_title(f"{stem.name}: RewardBench-style section scores")
    ax.figure.set_size_inches(10, 4.5)
    ax.figure.tight_layout()
    ax.figure.savefig(stem.with_suffix(".png"), dpi=110)
    return stem.with_suffix(".png")


def add_rows(saved, other, name):
    """``saved`` with the rows of ``other`` that it lacks (same evaluation pairs required), labelled with their
    own training size; the LoRA settings and DMoERM notes come along."""
    if other["meta"]["n_eval"] != saved["meta"]["n_eval"] or other["meta"]["eval"] != saved["meta"]["eval"]:
        raise ValueError(f"{name} was scored on other evaluation pairs; its rows cannot share this table.")
    results = dict(saved["results"])
    for key, row in other["results"].items():
        if key not in results:
            results[key] = {**row, "label": f"{row['label']}, {other['meta']['n_train_pairs']:,} pairs"}
    meta = {**saved["meta"], **{k: other["meta"][k] for k in ("dmoerm", "single_lora", "lora") if k in other["meta"]},
            "added_rows": Path(name).name}
    return {"meta": meta, "results": results}


def featurize_only(data, args):
    """Fill the feature cache for every set of the config, timing each (the one-time cost of the tables).

    Tokens are the featurizer's own count of what it ran through the backbone (``last_stats_["real_tokens"]``:
    after truncation and prompt sharing, padding excluded), so cache hits cost none.
    """
    rows = []
    for name in ("train", "ratings", "eval"):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.time()
        data.features(name)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        sec = time.time() - t
        st = data.featurizer.last_stats_
        rows.append(dict(set=name, rows=st["rows"], texts=st["items"], cache_hits=st["cache_hits"],
                         tokens=int(st["real_tokens"]), seconds=sec, tokens_per_second=st["real_tokens"] / max(sec, 1e-9)))
        print(f"{name}: {st['rows']} rows, {st['real_tokens']} tokens forwarded, {sec:.1f} s", flush=True)
    meta = dict(config=args.config, layer=data.featurizer.layer_, backbone=data.featurizer.backbone,
                batch_size=data.featurizer.batch_size, accelerator=accelerator_name(),
                dtype=str(resolve_dtype(data.featurizer.dtype, data.featurizer.device)).removeprefix("torch."))
    lines = [f"# Featurizing the {args.config} config (one-time cost; the feature cache serves every later run)", "",
             f"Backbone `{meta['backbone']}`, layer {meta['layer']}, {meta['dtype']} (`dtype=\"auto\"`) on "
             f"{meta['accelerator']}, batch size {meta['batch_size']}, max_length 512, prompts shared between a "
             "pair's two responses. Tokens: what the featurizer ran through the backbone (chat template included, "
             "after truncation and prompt sharing, padding excluded); cache hits cost none.", "",
             "| set | rows | texts | cache hits | tokens | seconds | tokens / s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['set']} | {r['rows']} | {r['texts']} | {r['cache_hits']} | {r['tokens']} | {r['seconds']:.1f} | "
              f"{r['tokens_per_second']:.0f} |" for r in rows]
    lines += ["", f"Generated by `python benchmarks/quality.py --config {args.config} --featurize-only "
              f"--batch-size {data.featurizer.batch_size}`."]
    (RESULTS / "quality_featurize.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "quality_featurize.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--eval", default="eval_dev.jsonl", help="evaluation file (path or name in the data dir)")
    parser.add_argument("--layer", default="auto",
                        help=f"backbone layer of the features; 'auto' (default): the layer the prompt-grouped sweep "
                             f"of quality_layers.py chose on training data, {DEFAULT_LAYER} before it has run")
    parser.add_argument("--device", default="auto", help="where the gates train (default: CUDA when available)")
    parser.add_argument("--batch-size", type=int, default=16, help="featurizer batch size (scores do not depend on it)")
    parser.add_argument("--dtype", default="auto", help="feature dtype; 'bfloat16' reuses features a GPU computed "
                        "(the cache keys name the dtype), 'auto' picks what this machine runs natively")
    parser.add_argument("--models", nargs="*", default=[m for m in MODELS if m not in LORA_MODELS],
                        choices=list(MODELS),
                        help=f"default: all but the LoRA models {LORA_MODELS} (hours on a CPU: ask for them, e.g. "
                             "with --config lora_small)")
    parser.add_argument("--out", default=None, help="output stem (default benchmarks/results/quality[_small])")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (features are cached)")
    parser.add_argument("--reference-steps", type=int, default=None,
                        help=f"gate steps of the reference-settings rows (default {ARMORM_REFERENCE_STEPS})")
    parser.add_argument("--replot", metavar="JSON", help="only redraw the table and PNG of an earlier run's JSON")
    parser.add_argument("--add-rows", metavar="JSON", help="with --replot: add the rows of another run on the same "
                        "evaluation pairs (e.g. the LoRA rows of --config lora_gpu) to the table")
    parser.add_argument("--featurize-only", action="store_true",
                        help="only fill the feature cache for the config and time it (-> results/quality_featurize.md)")
    args = parser.parse_args(argv)
    if args.replot:  # redraw the table and chart of an earlier run
        stem, saved = Path(args.replot).with_suffix(""), json.loads(Path(args.replot).read_text())
        if args.add_rows:
            saved = add_rows(saved, json.loads(Path(args.add_rows).read_text()), args.add_rows)
            stem.with_suffix(".json").write_text(json.dumps(saved, indent=1, default=float))
        stem.with_suffix(".md").write_text(markdown(saved["results"], saved["meta"]))
        return write_plot(stem, saved["results"])
    global GATE_DEVICE
    GATE_DEVICE = args.device
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)  # BLAS threads too: oversubscribed cores make small fits crawl
    t0 = time.time()
    data = load_data(args.config, args.eval, args.layer, batch_size=args.batch_size, dtype=args.dtype)
    if args.featurize_only:
        return featurize_only(data, args)
    results, pair_scores = {}, {}
    data.cache["reference_steps"] = args.reference_steps
    for name in args.models:
        label, build = MODELS[name]
        if name in LORA_MODELS:
            label = label.replace("256 tok", f"{lora_settings(data)['max_length']} tok")
        t = time.time()
        c, r = build(data)
        results[name] = {"label": label, "scores": rewardbench_scores(data.eval, c, r), "seconds": time.time() - t}
        if name in data.cache and name in GATED:
            results[name]["fitted"] = data.cache[name]
        pair_scores[name] = (np.asarray(c, float), np.asarray(r, float))
        s = results[name]["scores"]
        print(f"{label:32s} overall {100 * s['overall']:.1f} ± {100 * s['overall_stderr']:.1f}  " +
              "  ".join(f"{k} {100 * v:.1f}" for k, v in s["sections"].items()), flush=True)
    meta = dict(config=args.config, eval=str(args.eval), layer=data.featurizer.layer_, backbone=data.featurizer.backbone,
                n_train_pairs=len(data.train), n_ratings=len(data.ratings), n_eval=len(data.eval),
                seconds=time.time() - t0, machine=f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)",
                dtype=str(resolve_dtype(data.featurizer.dtype, data.featurizer.device)).removeprefix("torch."),
                cpu=accelerator_name(), reference_steps=args.reference_steps, gate_device=device(),
                armorm=dict(gating=ARMORM_GATING, decorrelation=ARMORM_DECORRELATION),
                armorm_reference=dict(gating=reference_gating(len(data.train), args.reference_steps),
                                      decorrelation=ARMORM_REFERENCE_DECORRELATION),
                objectives_fine=data.train["objective_fine"].value_counts().to_dict())
    meta.update({k: data.cache[k] for k in ("dmoerm", "single_lora") if k in data.cache})
    if any(m in LORA_MODELS for m in args.models):
        meta["lora"] = lora_settings(data)
    stem = Path(args.out) if args.out else RESULTS / ("quality" if args.config == "full" else f"quality_{args.config}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=float))
    length_stem = (stem.with_name(stem.name.replace("quality", "quality_length", 1)) if "quality" in stem.name
                   else stem.with_name(stem.name + "_length"))  # never the main table's own name
    np.savez_compressed(length_stem.with_name(length_stem.name + "_scores.npz"),
                        **{f"{n}__{side}": v for n, cr in pair_scores.items() for side, v in zip("cr", cr)})
    stem.with_suffix(".md").write_text(markdown(results, meta))
    write_plot(stem, results)
    length = length_controlled(data, {n: (results[n]["label"], *pair_scores[n]) for n in results})
    length_stem.with_suffix(".md").write_text(length_markdown(length, meta))
    length_stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": length}, indent=1,
                                                           default=float))
    print(f"wrote {stem.with_suffix('.md')}, .json and .png; {length_stem.with_suffix('.md')}")
    return results


if __name__ == "__main__":
    main()
