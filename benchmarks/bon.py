"""Best-of-N over-optimisation on AlpacaEval outputs with a judge's gold score.

For a bounded subset of the prompts of ``bon_alpacaeval.jsonl.gz``, every
candidate response that carries the GPT-4-turbo judge's gold score
(``gold_turbo``: the probability that it beats GPT-4-1106's output) is scored
by each reward model; :func:`rmkit.evaluation.best_of_n` then draws N
candidates per prompt (with replacement, 200 seeded draws), picks the
highest-reward one and reports its mean gold score against N and against
KL_bon = log N - (N - 1) / N, with a 95% bootstrap interval over prompts.

Reward models are trained on ``benchmarks/quality.py``'s training sample of
``pairwise_train.jsonl.gz`` (whose features its runs cached) with every prompt
of the best-of-N file removed (they occur there as ``alpaca_eval:*`` pairs);
the rated rows of ArmoRM likewise. Features come from one
:class:`rmkit.BackboneFeaturizer` (layer 10, ``dtype="auto"``: float32 on a CPU
without native bfloat16, max 512 tokens) and its on-disk cache, so every model
reuses one backbone pass per text.

Usage::

    python benchmarks/bon.py --warm              # only fill the feature cache (resumable)
    python benchmarks/bon.py --fitted DIR        # table + curves; fitted models saved in / reused from DIR
    python benchmarks/bon.py --models dmoerm --merge
    python benchmarks/bon.py --replot --note ... # redraw from bon.json, replacing the notes

Results go to ``benchmarks/results/bon.md``, ``.json`` and ``bon.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
LAYER = 10
FEATURIZER = dict(layer=LAYER, max_length=512, dtype="auto", batch_size=16)  # auto: float32 on a CPU without bf16
# The training set is benchmarks/quality.py's (PAIR_SAMPLE, RATING_SAMPLE: the samples its feature cache was
# filled with, so the learned rows cost no new featurizing) minus every pair / rated row whose prompt is a
# best-of-N prompt. Only the candidates need new backbone passes (AlpacaEval responses: ~300-500 tokens each);
# n_prompts is a prefix of a seeded permutation of the prompts, so a larger run reuses a smaller one's cache.
BOUNDS = dict(n_prompts=399, n_draws=200, n_boot=1000)  # all prompts (fits on a 2-core CPU: see bon.md)
GOLD = "gold_turbo"
N_VALUES = (1, 2, 4, 8, 16)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import (  # noqa: E402
    ARMORM_DECORRELATION,
    ARMORM_GATING,
    LORA,
    PAIR_SAMPLE,
    RATING_COLUMNS,
    RATING_SAMPLE,
    cpu_model,
    dmoerm_frame,
    pair_objective,
)


def _norm(text):
    return " ".join(str(text).split()).lower()


def load_data(bounds=BOUNDS, seed=0):
    """The bounded best-of-N candidates, the training pairs and rated rows (bon prompts left out)."""
    from rmkit.datasets import load_bon, load_pairwise, load_ratings

    bon = load_bon()
    bon_prompts = set(bon["prompt"].map(_norm))
    bon = bon[bon[GOLD].notna() & (bon["response"].fillna("").str.strip() != "")]
    # a seeded permutation of the prompts: a smaller n_prompts is a prefix of a larger one
    ids = np.random.default_rng(seed).permutation(np.sort(bon["prompt_id"].unique()))[:bounds["n_prompts"]]
    rank = {pid: k for k, pid in enumerate(ids)}
    bon = bon[bon["prompt_id"].isin(ids)]
    bon = bon.sort_values("prompt_id", key=lambda c: c.map(rank), kind="stable").reset_index(drop=True)

    all_pairs = load_pairwise()
    overlap = all_pairs["prompt"].map(_norm).isin(bon_prompts)
    sample = load_pairwise(**PAIR_SAMPLE)  # quality.py's training sample (its features are cached)
    s_overlap = sample["prompt"].map(_norm).isin(bon_prompts)
    train = sample[~s_overlap]
    if bounds.get("n_pairs"):
        train = train.head(bounds["n_pairs"])
    train = train.reset_index(drop=True)
    train = train.assign(objective=train.apply(pair_objective, axis=1))

    ratings = load_ratings(**RATING_SAMPLE)
    ratings = ratings[ratings["response"].fillna("").str.strip() != ""]  # as quality.py: a few are empty
    r_overlap = ratings["prompt"].map(_norm).isin(bon_prompts)
    ratings = ratings[~r_overlap]
    if bounds.get("n_ratings"):
        ratings = ratings.head(bounds["n_ratings"])
    ratings = ratings.reset_index(drop=True)
    info = dict(pairs_total=int(len(all_pairs)), pairs_removed=int(overlap.sum()),
                pairs_removed_sources=all_pairs.loc[overlap, "source"].value_counts().to_dict(),
                pairs_left=int((~overlap).sum()), pair_sample=int(len(sample)),
                pairs_removed_of_sample=int(s_overlap.sum()),
                pairs_removed_of_sample_sources=sample.loc[s_overlap, "source"].value_counts().to_dict(),
                rating_sample=int(len(r_overlap)), rated_rows_removed_of_sample=int(r_overlap.sum()),
                n_prompts=int(bon["prompt_id"].nunique()), n_candidates=int(len(bon)))
    return bon, train, ratings, info


_SMOKE_CACHE = str(Path(__import__("tempfile").gettempdir()) / "rmkit-bon-smoke-features")
SMOKE = dict(BOUNDS, n_prompts=8, n_pairs=60, n_ratings=40, n_draws=20, n_boot=50)  # --smoke: tiny backbone, minutes


def featurizer(backbone=None):
    from rmkit import BackboneFeaturizer

    # the smoke run's tiny backbone gets its own throw-away cache folder (shared by the models of one run)
    extra = {} if backbone is None else dict(backbone=backbone, layer=-1, cache=_SMOKE_CACHE)
    return BackboneFeaturizer(**{**FEATURIZER, **extra}, verbose=1).fit()


def warm(bon, train, ratings, chunk=24):
    """Fill the on-disk feature cache in small chunks (a stop loses at most one chunk).

    The training pairs and rated rows first (quality.py's sample: normally all cache hits, a check that the
    settings match), then the candidates in prompt order, so a stop leaves a prefix of the prompts warm.
    """
    feat = featurizer()
    feat.verbose = 0
    t0 = time.time()
    jobs = [("train", train[["prompt", "chosen", "rejected"]]), ("ratings", ratings[["prompt", "response"]]),
            ("bon candidates", bon[["prompt", "response"]])]
    for name, frame in jobs:
        for i in range(0, len(frame), chunk):
            t = time.time()
            feat.transform(frame.iloc[i:i + chunk])
            st = feat.last_stats_
            print(f"warm {name} {min(i + chunk, len(frame))}/{len(frame)} rows, {time.time() - t0:.0f} s "
                  f"(chunk {time.time() - t:.0f} s, {st['real_tokens']} tokens), {st['cache_hits']} cache hits",
                  flush=True)


# -- reward models: ctx -> proxy scores of the candidates ------------------------------------------------

class Context:
    def __init__(self, bon, train, ratings, seed=0, backbone=None):
        self.bon, self.train, self.ratings, self.seed = bon, train, ratings, seed
        self.backbone = backbone  # None: the embedded backbone; --smoke: a tiny one (also for the LoRA rows)
        self.featurizer = featurizer(backbone)
        self.pairs = train[["prompt", "chosen", "rejected"]].reset_index(drop=True)
        self.candidates = bon[["prompt", "response"]].reset_index(drop=True)
        self.notes = {}
        self.fitted_dir = None  # --fitted DIR: fitted models are saved there and reused by a later run
        self.fit_seconds = {}

    def fit(self, name, model, *args, **kwargs):
        """``model.fit(*args, **kwargs)``, or the model a previous run with the same training set saved.

        The models depend only on the training set (never on the candidates), so a run can fit them while the
        candidates' features are still being computed and a later, larger run only scores.
        """
        import joblib

        path = None
        if self.fitted_dir is not None:
            path = Path(self.fitted_dir) / f"{name}-pairs{len(self.pairs)}-ratings{len(self.ratings)}-seed{self.seed}.joblib"
            if path.exists():
                self.notes.setdefault("reused_fits", []).append(name)
                self.fit_seconds[name] = json.loads(path.with_suffix(".json").read_text())["fit_seconds"]
                return joblib.load(path)
        t = time.time()
        model.fit(*args, **kwargs)
        self.fit_seconds[name] = time.time() - t
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            joblib.dump(model, path)
            path.with_suffix(".json").write_text(json.dumps({"fit_seconds": self.fit_seconds[name]}))
        return model

    def probe(self):
        from sklearn.base import clone
        from sklearn.pipeline import Pipeline

        from rmkit.ensemble import BradleyTerryProbe

        return Pipeline([("featurizer", clone(self.featurizer)),
                         ("probe", BradleyTerryProbe(random_state=self.seed))])  # penalty: prompt-grouped CV


def longer_wins(ctx):
    from rmkit.objectives import response_token_lengths

    return {"length": response_token_lengths(list(ctx.candidates["response"]), ctx.featurizer.backbone)}


def bt_probe(ctx):
    return {"bt_probe": ctx.fit("bt_probe", ctx.probe(), ctx.pairs).predict(ctx.candidates)}


def bt_probe_dmoerm_pairs(ctx):
    """The BT probe on DMoERM's training prefix only: separates the recipe from the smaller training set."""
    n = DMOERM["n_pairs"]
    return {"bt_probe_dmoerm_pairs": ctx.fit(f"bt_probe-first{n}", ctx.probe(), ctx.pairs.head(n)).predict(
        ctx.candidates)}


def ensemble(ctx):
    """5 BT probes on prompt-grouped bootstrap resamples, combined three ways (one fit)."""
    from rmkit import RewardEnsemble

    ens = ctx.fit("ensemble", RewardEnsemble(estimator=ctx.probe(), n_members=5, bootstrap=True, lam=1.0,
                                             random_state=ctx.seed), ctx.pairs)
    ex = ens.explain(ctx.candidates)
    Z = ex[ens.member_names_].to_numpy()
    ctx.notes["ensemble_member_corr"] = float(np.mean(np.corrcoef(Z.T)[np.triu_indices(Z.shape[1], 1)]))
    # the three combiners from the one explain() pass (each predict() would featurize the candidates again),
    # checked against the ensemble's own predict() on a few candidates
    from rmkit.ensemble._ensemble import combine_rewards

    out, head = {}, ctx.candidates.head(16)
    for key, how in (("ens_mean", "mean"), ("ens_wco", "min"), ("ens_uwo", "uwo")):
        out[key] = combine_rewards(Z, how, ens.lam)
        np.testing.assert_allclose(out[key][:len(head)], ens.set_params(combine=how).predict(head), rtol=1e-6,
                                   atol=1e-9)
    return out


def armorm(ctx):
    from rmkit import ArmoRM, GatedScalarizer, VerbosityDecorrelator

    cols = [c for c in RATING_COLUMNS if ctx.ratings[c].notna().sum() >= 10]  # enough labelled rows to fit
    ctx.notes["armorm_rating_columns"] = {c: int(ctx.ratings[c].notna().sum()) for c in cols}
    counts = ctx.train["objective"].value_counts()
    small = set(counts[counts < 20].index)  # too few pairs to fit (and cross-validate) a probe: left out
    objective = ctx.train["objective"].where(~ctx.train["objective"].isin(small), None)
    ctx.notes["armorm_pair_objectives"] = objective.value_counts().to_dict()
    model = ArmoRM(ctx.featurizer, rating_columns=cols, pair_objective_column="objective",
                   decorrelator=VerbosityDecorrelator(**ARMORM_DECORRELATION), gating=GatedScalarizer(**ARMORM_GATING),
                   cv=3, random_state=ctx.seed)
    train = ctx.pairs.assign(objective=objective.to_numpy())
    # Work-around (rmkit bug, pandas 3): MultiObjectiveRegressor's cross-fitting stratifies folds by
    # pd.Series(sources).astype(str), which keeps None as NaN under pandas 3, and StratifiedGroupKFold then fails
    # sorting NaN among strings. Pairs of no objective are therefore left out of ArmoRM's training here
    # (none in the full run: every objective there has >= 20 pairs; only --smoke's tiny set has such pairs).
    if train["objective"].isna().any():
        ctx.notes["armorm_pairs_without_objective_dropped"] = int(train["objective"].isna().sum())
        train = train[train["objective"].notna()].reset_index(drop=True)
    model = ctx.fit("armorm", model, train, ratings=ctx.ratings[["prompt", "response"]].join(ctx.ratings[cols]))
    return {"armorm": model.predict(ctx.candidates)}


# DMoERM trains LoRA experts through the backbone and scores every candidate with it (no cached feature applies):
# on a shared 2-core CPU it runs at smaller bounds than the table's other rows (see bon_dmoerm.md). float32:
# quality.py's LORA says bfloat16, which is ~6x slower on a CPU without native bf16 ("auto" picks float32 there).
DMOERM = dict(n_pairs=160, lora=dict(max_epochs=1, dtype="auto"), chunk=16)


def _text_key(prompt, response):
    import hashlib

    return hashlib.sha1(f"{prompt}\x00{response}".encode()).hexdigest()[:16]


def dmoerm(ctx):
    """DMoERM with LoRA experts (slow on a CPU: every candidate runs through the adapted backbone).

    Trained on a prefix of the training pairs (``DMOERM["n_pairs"]``; capability labels from the data's own
    columns, as ``quality.py``: the embedded judge is too weak to label them). With ``--fitted DIR`` the
    fitted model and the candidates' scores (per text, in chunks) are kept there, so a stopped run resumes and
    a larger ``--n-prompts`` only scores the new prompts.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    from rmkit import CapabilityAggregator, CapabilityExperts, DMoERM

    n = DMOERM["n_pairs"]
    lora = {**LORA, **DMOERM["lora"], **({} if ctx.backbone is None else {"backbone": ctx.backbone})}
    train = dmoerm_frame(ctx.train.head(n))
    model = DMoERM(["preference", "refusal", "conciseness"],
                   experts=CapabilityExperts(**lora, random_state=ctx.seed, verbose=0),
                   aggregator=CapabilityAggregator(hidden_size=64, max_epochs=100, validation_fraction=0.15,
                                                   patience=10, random_state=ctx.seed),
                   featurizer=TfidfVectorizer(sublinear_tf=True), drop_unlabelled=True, random_state=ctx.seed,
                   verbose=0)
    tag = f"dmoerm-n{n}-len{lora['max_length']}-ep{lora['max_epochs']}-{lora['dtype']}"
    model = ctx.fit(tag, model, train)
    ctx.notes["dmoerm"] = dict(n_pairs=int(len(train)), lora=lora, tasks=train["task"].value_counts().to_dict(),
                               labels={c: int(train[c].notna().sum()) for c in ("preference", "refusal",
                                                                                "conciseness")},
                               routing_accuracy_train=float(model.routing_accuracy(train)))
    cands = ctx.candidates
    keys = [_text_key(p, r) for p, r in zip(cands["prompt"], cands["response"])]
    cache, path = {}, None
    if ctx.fitted_dir is not None:
        path = Path(ctx.fitted_dir) / f"{tag}-seed{ctx.seed}-scores.json"
        if path.exists():
            cache = json.loads(path.read_text())
    todo = [i for i, k in enumerate(keys) if k not in cache]
    t0, step = time.time(), DMOERM["chunk"]
    for j in range(0, len(todo), step):
        rows = todo[j:j + step]
        for i, v in zip(rows, model.predict(cands.iloc[rows])):
            cache[keys[i]] = float(v)
        if path is not None:
            path.write_text(json.dumps(cache))
        print(f"dmoerm scored {j + len(rows)}/{len(todo)} new candidates, {time.time() - t0:.0f} s", flush=True)
    ctx.notes["dmoerm"]["scored_new"] = len(todo)
    ctx.notes["dmoerm"]["score_seconds_new"] = time.time() - t0
    return {"dmoerm": np.asarray([cache[k] for k in keys])}


def oracle(ctx):
    return {"oracle": ctx.bon[GOLD].to_numpy(float)}


MODELS = {"oracle": oracle, "length": longer_wins, "bt_probe": bt_probe,
          "bt_probe_dmoerm_pairs": bt_probe_dmoerm_pairs, "ensemble": ensemble, "armorm": armorm,
          "dmoerm": dmoerm}
LABELS = {
    "oracle": "oracle (gold as proxy; reference)",
    "length": "(0) longer wins",
    "bt_probe": "(a) BT probe",
    "bt_probe_dmoerm_pairs": "(a') BT probe on DMoERM's training pairs only",
    "ens_mean": "(b) 5-probe ensemble, mean",
    "ens_wco": "(b) 5-probe ensemble, WCO (min)",
    "ens_uwo": "(b) 5-probe ensemble, UWO (mean - 1.0 std)",
    "armorm": "(c) ArmoRM",
    "dmoerm": "(d) DMoERM (LoRA experts, 256 tok)",  # bounds: DMOERM
}


# -- evaluation and report -------------------------------------------------------------------------------

def evaluate(scores, bon, bounds, seed=0):
    from rmkit.evaluation import best_of_n

    res = best_of_n(scores, bon, gold=GOLD, group="prompt_id", n_values=N_VALUES, n_draws=bounds["n_draws"],
                    n_boot=bounds["n_boot"], random_state=seed)
    return {"table": res.to_dict("list"), "per_prompt": res.attrs["per_prompt"].tolist()}


def compare(results, reference="bt_probe", n_boot=BOUNDS["n_boot"], seed=0):
    """Gain@16 of every model minus the reference's, with a paired bootstrap over prompts; and the goal check."""
    if reference not in results:
        out = {}
        for name, r in results.items():
            curve = np.asarray(r["per_prompt"]).mean(0)
            out[name] = dict(gain16_minus_probe=float("nan"), low=float("nan"), high=float("nan"),
                             gain16=float(curve[-1] - curve[0]), holds_where_probe_falls=None, meets_goal=None,
                             peak_n=int(N_VALUES[int(np.argmax(curve))]))
        return out, None
    ref = np.asarray(results[reference]["per_prompt"])
    ref_curve = ref.mean(0)
    falls = [i for i in range(1, len(N_VALUES)) if ref_curve[i] < ref_curve[i - 1]]
    rng = np.random.RandomState(seed)
    boot = rng.randint(ref.shape[0], size=(n_boot, ref.shape[0]))
    out = {}
    for name, r in results.items():
        P = np.asarray(r["per_prompt"])
        d = (P[:, -1] - P[:, 0]) - (ref[:, -1] - ref[:, 0])
        dist = d[boot].mean(1)
        curve = P.mean(0)
        out[name] = dict(gain16_minus_probe=float(d.mean()), low=float(np.quantile(dist, 0.025)),
                         high=float(np.quantile(dist, 0.975)),
                         gain16=float(curve[-1] - curve[0]),
                         holds_where_probe_falls=bool(all(curve[i] >= curve[i - 1] for i in falls)),
                         peak_n=int(N_VALUES[int(np.argmax(curve))]))
    probe_gain = out[reference]["gain16"]
    for name, c in out.items():
        c["meets_goal"] = bool(name != reference and c["gain16"] >= probe_gain and c["holds_where_probe_falls"])
    return out, [f"{N_VALUES[i - 1]}->{N_VALUES[i]}" for i in falls]


def markdown(results, comparison, probe_falls, meta):
    head = ["model"] + [f"gold@{n}" for n in N_VALUES] + ["gain@16", "gain − probe's (paired)", "peak N", "goal",
                                                          "ρ gold", "ρ length"]
    rank = meta.get("rank_diagnostics", {})
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        t, c = r["table"], comparison[name]
        cells = [LABELS.get(name, name)]
        cells += [f"{t['gold'][i]:.3f} [{t['gold_low'][i]:.3f}, {t['gold_high'][i]:.3f}]" for i in range(len(N_VALUES))]
        cells.append(f"{t['gain'][-1]:+.3f} [{t['gain_low'][-1]:+.3f}, {t['gain_high'][-1]:+.3f}]")
        cells.append("–" if name == "bt_probe" or c["meets_goal"] is None else
                     f"{c['gain16_minus_probe']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]")
        cells.append(str(c["peak_n"]))
        cells.append("ref" if name in ("bt_probe", "oracle") else
                     "– (baseline, not a recipe)" if name == "length" and c["meets_goal"] is not None else
                     {True: "yes", False: "no", None: "– (no probe row)"}[c["meets_goal"]])
        cells += [f"{rank[name][k]:+.2f}" if name in rank else "–" for k in ("gold", "length")]
        lines.append("| " + " | ".join(cells) + " |")
    info = meta["data"]
    text = [
        "# Best-of-N over-optimisation (AlpacaEval outputs, GPT-4-turbo judge as gold)",
        "",
        f"Gold: `{GOLD}` (AlpacaEval's weighted GPT-4-turbo judge: P(candidate beats GPT-4-1106's output)), "
        f"{info['n_prompts']} prompts (a seeded permutation's first) of `bon_alpacaeval.jsonl.gz`, only candidates "
        "carrying the gold "
        f"score: {info['n_candidates']} candidates (~{info['n_candidates'] / info['n_prompts']:.1f} per prompt). "
        f"For each prompt and N, N candidates are drawn with replacement ({meta['bounds']['n_draws']} seeded draws, "
        "the same draws for every model), the highest-reward one is picked and its gold recorded; "
        f"brackets: 95% percentile bootstrap over prompts ({meta['bounds']['n_boot']} resamples). "
        "KL_bon = log N − (N−1)/N = 0, 0.19, 0.64, 1.21, 1.84 nats for N = 1, 2, 4, 8, 16.",
        "",
        ("Training (the learned rows): " if any(k in results for k in ("bt_probe", "ens_mean", "armorm", "dmoerm"))
         else "No learned reward model is in this table (see the notes below); their training set would be: ") +
        f"{meta['n_train_pairs']} pairs: `benchmarks/quality.py`'s training sample of `pairwise_train.jsonl.gz` "
        f"({info.get('pair_sample')} pairs, `load_pairwise(n=2000, random_state=0)`, whose features were cached) "
        f"minus every pair whose prompt is a best-of-N prompt: **{info.get('pairs_removed_of_sample')} of its "
        f"{info.get('pair_sample')} pairs removed** ({info.get('pairs_removed_of_sample_sources')}; in the whole "
        f"file the best-of-N prompts cover {info['pairs_removed']} of {info['pairs_total']} pairs, "
        f"{info['pairs_removed_sources']}). "
        f"ArmoRM also uses {meta['n_ratings']} rated rows of `multiobjective_sparse.jsonl.gz` (quality.py's "
        f"{info.get('rating_sample')}-row sample minus {info['rated_rows_removed_of_sample']} rows whose prompt is "
        "a best-of-N prompt). "
        f"Features: `{meta['backbone']}` layer {LAYER}, {meta.get('dtype', 'bfloat16')} (`dtype=\"auto\"` on "
        f"{meta.get('cpu', 'this CPU')}), max 512 tokens, one cached pass per text shared by every model.",
        "",
        *lines,
        "",
        *model_notes(results, meta),
        "",
        f"Segments where the BT probe's curve falls: "
        f"{'(no BT probe row)' if probe_falls is None else (probe_falls or 'none')}. "
        "`gain − probe's`: gain@16 minus the "
        "probe's gain@16, paired bootstrap over prompts. `goal` (rmkit's recipes only) = gain@16 ≥ the probe's "
        "gain@16 and the curve does not fall on any segment where the probe's falls. `ρ gold`, `ρ length`: "
        "Spearman correlation of the model's reward with the gold score and with the response's token count among "
        "one prompt's candidates, averaged over prompts.",
        "",
        *[line for note in meta.get("notes", []) for line in (note, "")],
        "",
        f"Generated by `python benchmarks/bon.py` ({meta['seconds']:.0f} s after the feature cache was warm: "
        f"{', '.join(f'{k} {v:.0f} s' for k, v in meta.get('model_seconds', {}).items())}"
        + (f"; fitting (once, on the training set only{', saved with --fitted and reused' if meta.get('reused_fits') else ''}): "
           f"{', '.join(f'{k} {v:.0f} s' for k, v in meta['fit_seconds'].items())}" if meta.get("fit_seconds") else "")
        + f"; {meta['machine']}; {meta.get('cpu', '')}, {meta.get('dtype', '')} features).",
    ]
    return "\n".join(text) + "\n"


def model_notes(results, meta):
    notes = []
    if "bt_probe" in results or "ens_mean" in results:
        notes.append("BT probe: Bradley-Terry logistic probe (`rmkit.ensemble.BradleyTerryProbe`, penalty chosen "
                     "by 5-fold prompt-grouped CV on the training pairs).")
    if "ens_mean" in results:
        notes.append("Ensemble: `RewardEnsemble` of 5 such probes, each on a prompt-grouped bootstrap resample, "
                     "members standardised on the training responses; mean / WCO (min) / UWO (mean − 1.0·std) "
                     "combine the same fitted members (mean pairwise correlation of the members' candidate rewards: "
                     f"{meta.get('ensemble_member_corr', float('nan')):.3f}).")
    if "armorm" in results:
        notes.append(f"ArmoRM: `benchmarks/quality.py`'s gating and decorrelation settings, cv = 3, rated objectives "
                     f"{meta.get('armorm_rating_columns')}, pair objectives {meta.get('armorm_pair_objectives')}.")
    if "dmoerm" in results and meta.get("dmoerm"):
        d = meta["dmoerm"]
        lora = ", ".join(f"{k} {v}" for k, v in d["lora"].items())
        notes.append(f"DMoERM: trained on the first {d['n_pairs']} of those training pairs only (its own bounds: "
                     f"LoRA experts are trained and every candidate is scored through the backbone, no cached "
                     f"feature applies), tasks {d['tasks']} (RMB harmlessness vs the rest; TF-IDF router, training "
                     f"routing accuracy {d['routing_accuracy_train']:.2f}), experts preference / refusal / "
                     f"conciseness with labels from the data's own columns ({d['labels']} labelled pairs; "
                     "`quality.py`'s `dmoerm_frame`), 60/40 prompt split between the experts and the aggregator "
                     f"MLP (64 hidden); LoRA: {lora} (top quarter of the layers adapted, shared frozen trunk; "
                     "prompt + response truncated to max_length tokens: the prompt's start goes first, then the response's end).")
    if "length" in results:
        notes.append("Longer wins: the candidate with the most response tokens (backbone tokenizer) is picked.")
    return [" ".join(notes)] if notes else []


def write_plot(stem, results):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from rmkit.plotting import plot_best_of_n
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    curves = {LABELS.get(k, k): r["table"] for k, r in results.items() if k != "oracle"}
    plot_best_of_n(curves, x="n", ax=axes[0])
    plot_best_of_n(curves, x="kl_bon", ax=axes[1], intervals=False)
    axes[0].set_title("gold@N (95% bootstrap band)")
    axes[1].set_title("gold vs KL_bon")
    fig.savefig(stem.with_suffix(".png"), dpi=110)
    plt.close(fig)
    return stem.with_suffix(".png")


def within_prompt_spearman(a, b, groups):
    """Mean over prompts of the Spearman correlation of a and b among one prompt's candidates."""
    from scipy.stats import spearmanr

    a, b, groups = np.asarray(a, float), np.asarray(b, float), np.asarray(groups)
    rhos = []
    for g in np.unique(groups):
        m = groups == g
        if m.sum() >= 3 and np.ptp(a[m]) > 0 and np.ptp(b[m]) > 0:
            rhos.append(spearmanr(a[m], b[m])[0])
    return float(np.mean(rhos)) if rhos else float("nan")


def rank_diagnostics(results, meta):
    """Within-prompt Spearman of every model's reward with the gold and with the response length."""
    ref = meta.get("candidates")
    if not ref or "length" not in results or "scores" not in results["length"]:
        return {}
    gold, groups, length = ref["gold"], ref["prompt_id"], results["length"]["scores"]
    return {k: dict(gold=within_prompt_spearman(r["scores"], gold, groups),
                    length=within_prompt_spearman(r["scores"], length, groups))
            for k, r in results.items() if "scores" in r and len(r["scores"]) == len(gold)}


def report(stem, saved):
    results = saved["results"]
    saved["meta"]["rank_diagnostics"] = rank_diagnostics(results, saved["meta"])
    comparison, falls = compare(results)
    saved["comparison"], saved["probe_falls"] = comparison, falls
    stem.with_suffix(".md").write_text(markdown(results, comparison, falls, saved["meta"]))
    stem.with_suffix(".json").write_text(json.dumps(saved, default=float))  # one line: per-candidate scores
    write_plot(stem, results)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warm", action="store_true", help="only fill the feature cache")
    parser.add_argument("--models", nargs="*", default=[m for m in MODELS if m not in ("dmoerm", "bt_probe_dmoerm_pairs")], choices=list(MODELS),
                        help="default: all but dmoerm (LoRA experts: slow on a CPU; add it with --models dmoerm "
                             "--merge)")
    parser.add_argument("--merge", action="store_true", help="add the models to the existing bon.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="output stem (default benchmarks/results/bon; with --smoke a "
                        "temporary folder, so a smoke run never overwrites the reported results)")
    parser.add_argument("--replot", action="store_true", help="only redraw the table and PNG from bon.json")
    parser.add_argument("--smoke", action="store_true", help="tiny random backbone, tiny bounds: checks the code path")
    parser.add_argument("--fitted", default=None, help="save fitted models in this folder and reuse them "
                        "(they depend on the training set only: fit while the candidates are still being warmed)")
    parser.add_argument("--note", action="append", default=[], help="a line added under the table")
    parser.add_argument("--n-pairs", type=int, default=None, help="override BOUNDS['n_pairs'] (a prefix)")
    parser.add_argument("--n-prompts", type=int, default=None, help="override BOUNDS['n_prompts'] (a prefix)")
    parser.add_argument("--dmoerm-pairs", type=int, default=None, help="override DMOERM['n_pairs'] (a prefix)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = str(Path(_SMOKE_CACHE).parent / "rmkit-bon-smoke" / "bon" if args.smoke else RESULTS / "bon")
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    bounds, backbone = BOUNDS, None
    if args.smoke:
        from rmkit.testing import tiny_backbone

        bounds, backbone = SMOKE, tiny_backbone()
    if args.n_pairs:
        bounds = dict(bounds, n_pairs=args.n_pairs)
    if args.n_prompts:
        bounds = dict(bounds, n_prompts=args.n_prompts)
    if args.dmoerm_pairs:
        DMOERM["n_pairs"] = args.dmoerm_pairs
    if args.replot:  # --note replaces the notes under the table
        saved = json.loads(stem.with_suffix(".json").read_text())
        if args.note:
            saved["meta"]["notes"] = args.note
        return report(stem, saved)
    import torch
    from threadpoolctl import threadpool_limits

    from rmkit.backbones import resolve_dtype

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    bon, train, ratings, info = load_data(bounds)
    print(info, flush=True)
    if args.warm:
        return warm(bon, train, ratings)
    t0 = time.time()
    ctx = Context(bon, train, ratings, backbone=backbone)
    ctx.fitted_dir = args.fitted
    saved = json.loads(stem.with_suffix(".json").read_text()) if args.merge else {"results": {}, "meta": {}}
    seconds = saved["meta"].get("model_seconds", {})
    for name in args.models:
        t = time.time()
        for key, scores in MODELS[name](ctx).items():
            saved["results"][key] = evaluate(scores, bon, bounds)
            saved["results"][key]["scores"] = [float(f"{v:.6g}") for v in np.asarray(scores, dtype=float)]
            g = saved["results"][key]["table"]["gold"]
            print(f"{LABELS[key]:45s} " + "  ".join(f"@{n} {v:.3f}" for n, v in zip(N_VALUES, g)), flush=True)
        seconds[name] = time.time() - t
    if "scores" not in saved["results"].get("length", {}):  # the length diagnostic needs the token counts
        lengths = longer_wins(ctx)["length"]
        saved["results"]["length"] = dict(evaluate(lengths, bon, bounds), scores=np.asarray(lengths, float).tolist())
    order = [k for k in LABELS if k in saved["results"]]
    saved["results"] = {k: saved["results"][k] for k in order}
    meta = saved["meta"]
    meta["candidates"] = dict(gold=bon[GOLD].astype(float).tolist(), prompt_id=bon["prompt_id"].astype(str).tolist())
    if args.note:
        meta["notes"] = meta.get("notes", []) + args.note
    meta.update(data=info, bounds=bounds, n_train_pairs=len(train), n_ratings=len(ratings),
                backbone=ctx.featurizer.backbone, model_seconds=seconds,
                seconds=sum(seconds.values()) if args.merge else time.time() - t0,
                machine=f"{platform.machine()}, {torch.get_num_threads()} torch threads, 2 shared cores",
                fit_seconds={**meta.get("fit_seconds", {}), **ctx.fit_seconds}, cpu=cpu_model(),
                dtype=str(resolve_dtype(ctx.featurizer.dtype, ctx.featurizer.device)).removeprefix("torch."))
    meta.update({k: v for k, v in ctx.notes.items()})
    stem.parent.mkdir(parents=True, exist_ok=True)
    report(stem, saved)
    print(f"wrote {stem.with_suffix('.md')}, .json and .png")


if __name__ == "__main__":
    main()
