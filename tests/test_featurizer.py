import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from transformers import AutoModel, AutoTokenizer

from rmkit import BackboneFeaturizer, split_feature_blocks
from rmkit.backbones._loading import load_tokenizer
from rmkit.testing import tiny_backbone

from .conftest import requires_embedded

D = 64


def _pairs(n=12):
    return pd.DataFrame({
        "prompt": [f"Question {i}: " + "why? " * (1 + 3 * i) for i in range(n)],
        "chosen": [f"Because {i}. " * (1 + (7 * i) % 11) for i in range(n)],
        "rejected": [f"No idea {i}" + "!" * (i % 5) for i in range(n)],
    })


def _h(F):
    """The hidden-state blocks of a feature frame as one array (sides, then the prompt)."""
    return F[[c for c in F.columns if ":h:" in c]].to_numpy()


def _pointwise(pairs):
    return pd.DataFrame({"prompt": pairs["prompt"], "response": pairs["chosen"]})


def _reference(path, prompt, response, layer=-1):
    """One unbatched Hugging Face pass over the templated text: the ground truth."""
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    text = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                                   tokenize=False).rstrip()
    ids = tok(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model(**ids, output_hidden_states=True)
    return out.hidden_states[layer][0, -1].numpy()


def test_features_match_an_unbatched_reference_pass(tiny):
    pairs = _pairs(6)
    feats = BackboneFeaturizer(tiny, cache=False, verbose=0, batch_size=4).fit(pairs)
    blocks = split_feature_blocks(feats.transform(pairs))
    for i in (0, 5):
        np.testing.assert_allclose(blocks["chosen"][i], _reference(tiny, pairs.prompt[i], pairs.chosen[i]), atol=1e-4)
        np.testing.assert_allclose(blocks["rejected"][i], _reference(tiny, pairs.prompt[i], pairs.rejected[i]),
                                   atol=1e-4)


@pytest.mark.parametrize("layer", [2, -2])
def test_intermediate_layer_matches_hidden_states(tiny, layer):
    pairs = _pairs(3)
    X = _h(BackboneFeaturizer(tiny, layer=layer, cache=False, verbose=0).fit_transform(_pointwise(pairs)))
    np.testing.assert_allclose(X[2, :D], _reference(tiny, pairs.prompt[2], pairs.chosen[2], layer), atol=1e-4)


@pytest.mark.slow
def test_batch_invariance_across_batch_sizes_and_padding_side(tiny):
    pairs = _pairs(32)
    pw = _pointwise(pairs)
    alone = BackboneFeaturizer(tiny, cache=False, verbose=0, batch_size=1).fit(pw)
    ref = np.vstack([_h(alone.transform(pw.iloc[[i]])) for i in (0, 7, 31)])
    tok = load_tokenizer(tiny)
    try:
        for side in ("left", "right"):
            tok.padding_side = side
            for bs in (1, 2, 5, 8, 32):
                X = _h(BackboneFeaturizer(tiny, cache=False, verbose=0, batch_size=bs).fit_transform(pw))
                np.testing.assert_allclose(X[[0, 7, 31]], ref, atol=1e-4, err_msg=f"batch_size={bs}, {side}")
    finally:
        tok.padding_side = "right"


def test_prompt_sharing_equals_separate_passes(tiny):
    pairs = _pairs(10)
    shared = BackboneFeaturizer(tiny, cache=False, verbose=0, batch_size=4).fit(pairs)
    separate = BackboneFeaturizer(tiny, cache=False, verbose=0, batch_size=4, share_prompts=False).fit(pairs)
    A, B = _h(shared.transform(pairs)), _h(separate.transform(pairs))
    np.testing.assert_allclose(A, B, atol=1e-4)
    assert shared.last_stats_["real_tokens"] < separate.last_stats_["real_tokens"]  # prompts ran once
    # and pair features equal pointwise features of each side
    P = _h(shared.transform(pd.DataFrame({"prompt": pairs.prompt, "response": pairs.rejected})))
    np.testing.assert_allclose(A[:, D:2 * D], P[:, :D], atol=1e-4)
    np.testing.assert_allclose(A[:, 2 * D:], P[:, D:], atol=1e-4)


def test_prompt_feature_is_hidden_state_at_end_of_prompt(tiny):
    tok = AutoTokenizer.from_pretrained(tiny)
    model = AutoModel.from_pretrained(tiny).eval()
    prompt = "Name a colour."
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        expected = model(**ids).last_hidden_state[0, -1].numpy()
    X = _h(BackboneFeaturizer(tiny, cache=False, verbose=0).fit_transform([{"prompt": prompt, "response": "Blue."}]))
    np.testing.assert_allclose(X[0, D:], expected, atol=1e-4)


def test_mean_pooling_averages_response_tokens(tiny):
    rows = [{"prompt": "Hi", "response": "Hello there, friend."}]
    last = _h(BackboneFeaturizer(tiny, cache=False, verbose=0).fit_transform(rows))
    mean = _h(BackboneFeaturizer(tiny, pooling="mean", cache=False, verbose=0).fit_transform(rows))
    assert not np.allclose(last[0, :D], mean[0, :D])
    np.testing.assert_allclose(last[0, D:], mean[0, D:], atol=1e-5)  # prompt feature unaffected


def test_cache_hit_is_identical_and_changed_setting_misses(tiny, feature_cache):
    pairs = _pairs(5)
    f = BackboneFeaturizer(tiny, cache=feature_cache, verbose=0).fit(pairs)
    first = _h(f.transform(pairs))
    assert f.last_stats_["cache_hits"] == 0
    second = _h(f.transform(pairs))
    assert f.last_stats_["cache_hits"] == 10 and f.last_stats_["real_tokens"] == 0
    np.testing.assert_array_equal(first, second)
    for change in ({"layer": 2}, {"pooling": "mean"}, {"max_length": 80}):
        g = clone(f).set_params(**change).fit(pairs)
        g.transform(pairs)
        assert g.last_stats_["cache_hits"] < 10, change
    other = BackboneFeaturizer(tiny_backbone(seed=1), cache=feature_cache, verbose=0).fit(pairs)
    other.transform(pairs)
    assert other.last_stats_["cache_hits"] == 0


def test_partial_cache_hits_and_duplicates_land_in_the_right_rows(tiny, feature_cache):
    pairs = _pairs(6)
    expected = _h(BackboneFeaturizer(tiny, cache=False, verbose=0).fit(pairs).transform(pairs))
    f = BackboneFeaturizer(tiny, cache=feature_cache, verbose=0).fit(pairs)
    f.transform(pairs.iloc[[4, 1]])  # some rows cached, others not
    mixed = pd.concat([pairs, pairs.iloc[[2, 2]]], ignore_index=True)  # row 2 three times
    got = _h(f.transform(mixed))
    assert f.last_stats_["cache_hits"] == 4
    # rtol: on a GPU, batches of other shapes run other float32 kernels (measured up to 5e-5 relative)
    np.testing.assert_allclose(got[:6], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got[6], got[2])
    np.testing.assert_array_equal(got[7], got[2])
    alone = BackboneFeaturizer(tiny, cache=False, verbose=0).fit(pairs)
    alone.transform(pairs.iloc[[2]])
    tokens_once = alone.last_stats_["real_tokens"]
    alone.transform(pairs.iloc[[2, 2, 2]])
    assert alone.last_stats_["real_tokens"] == tokens_once  # identical inputs run once


@pytest.mark.parametrize("kind", ["pairs", "pointwise"])
def test_slices_give_the_same_features_and_keep_prompt_sharing(tiny, monkeypatch, kind):
    import rmkit.backbones._featurizer as featurizer_module

    X = _pairs(7) if kind == "pairs" else _pointwise(_pairs(7))
    f = BackboneFeaturizer(tiny, cache=False, verbose=0).fit(X)
    whole = _h(f.transform(X))
    tokens = f.last_stats_["real_tokens"]
    monkeypatch.setattr(featurizer_module, "_SLICE", 4)  # 2 pairs or 4 rows per slice
    np.testing.assert_allclose(_h(f.transform(X)), whole, atol=1e-5)
    assert f.last_stats_["real_tokens"] == tokens  # each prompt still runs once


def test_truncation_keeps_closing_tokens_and_drops_prompt_first(tiny):
    from rmkit.backbones._templating import encode_conversation

    tok = load_tokenizer(tiny)
    msgs = [{"role": "user", "content": "P" * 200}]
    full = encode_conversation(tok, msgs, "R" * 50, None)
    n = len(full.prefix) + len(full.suffix)
    cut = encode_conversation(tok, msgs, "R" * 50, n - 100)
    assert cut.n_dropped == 100 and len(cut.prefix) + len(cut.suffix) == n - 100
    assert tok.decode(cut.suffix) == "R" * 50 + "<|im_end|>"  # response untouched: prompt went first
    assert tok.decode(cut.prefix).startswith("<|im_start|>system\nYou are a tiny test model.")
    assert tok.decode(cut.prefix).endswith("<|im_start|>assistant\n")
    tighter = encode_conversation(tok, msgs, "R" * 50, len(full.prefix) - 200 + 20)
    assert tok.decode(tighter.suffix).endswith("R<|im_end|>")
    assert len(tighter.suffix) < len(full.suffix)
    with pytest.raises(ValueError, match="max_length=10 is too small"):
        encode_conversation(tok, msgs, "R", 10)


def test_truncation_is_reported(tiny):
    f = BackboneFeaturizer(tiny, cache=False, max_length=60).fit()
    with pytest.warns(UserWarning, match="1 of 2 texts exceeded max_length=60"):
        f.transform([{"prompt": "x" * 100, "response": "y"}, {"prompt": "a", "response": "b"}])
    assert f.last_stats_["truncated"] == 1


def test_messages_column_and_fallback_template(tiny):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Name a fruit"}]
    X = _h(BackboneFeaturizer(tiny, cache=False, verbose=0).fit_transform(
        pd.DataFrame({"messages": [msgs], "response": ["Apple"]})))
    assert X.shape == (1, 2 * D) and np.isfinite(X).all()
    plain = tiny_backbone(chat_template=False)
    Y = _h(BackboneFeaturizer(plain, cache=False, verbose=0).fit_transform([{"prompt": "Hi", "response": "Hello"}]))
    tok = AutoTokenizer.from_pretrained(plain)
    ids = tok("### User:\nHi\n\n### Assistant:\nHello<|im_end|>", add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        expected = AutoModel.from_pretrained(plain)(**ids).last_hidden_state[0, -1].numpy()
    np.testing.assert_allclose(Y[0, :D], expected, atol=1e-4)


@pytest.mark.parametrize("X, match", [
    ([{"prompt": "", "response": "a"}], "empty text"),
    ([{"prompt": "hi", "response": "   "}], "empty text"),
    ([{"prompt": "hi"}], "missing the column 'response'"),
    ([{"response": "a"}], "missing the column 'prompt'"),
    (pd.DataFrame({"prompt": ["a", None], "response": ["b", "c"]}), "missing value"),
    (pd.DataFrame({"prompt": ["a", np.nan], "response": ["b", "c"]}), "missing value"),
    ([{"prompt": "a", "chosen": "b"}], "missing the column 'rejected'"),
    ([{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}], "response": "r"}],
     "first turn"),
    ([{"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}], "response": "r"}],
     "alternate"),
    ([{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "response": "r"}],
     "end with a 'user' turn"),
    ([{"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], "response": "r"}],
     "system"),
    ([], "empty"),
])
def test_bad_input_gives_clear_error(tiny, X, match):
    f = BackboneFeaturizer(tiny, cache=False, verbose=0).fit()
    with pytest.raises(ValueError, match=match):
        f.transform(X)


def test_non_string_and_array_input_errors(tiny):
    f = BackboneFeaturizer(tiny, cache=False, verbose=0).fit()
    with pytest.raises(TypeError, match="must hold strings"):
        f.transform([{"prompt": 3, "response": "a"}])
    with pytest.raises(TypeError, match="numpy array"):
        f.transform(np.zeros((2, 3)))


def test_unfitted_and_bad_params(tiny):
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        BackboneFeaturizer(tiny).transform([{"prompt": "a", "response": "b"}])
    with pytest.raises(ValueError, match="pooling"):
        BackboneFeaturizer(tiny, pooling="max").fit()
    with pytest.raises(ValueError, match="layer=9 is out of range"):
        BackboneFeaturizer(tiny, layer=9).fit()
    with pytest.raises(ValueError, match="dtype"):
        BackboneFeaturizer(tiny, dtype="float7").fit()


def test_sklearn_protocol_and_pickle_without_weights(tiny):
    f = BackboneFeaturizer(tiny, cache=False, verbose=0)
    assert clone(f).get_params() == f.get_params()
    assert f.fit(_pairs(2)) is f
    names = f.get_feature_names_out()
    assert len(names) == 3 * D + 3 and names[0] == "chosen:h:0" and names[3 * D - 1] == f"prompt:h:{D - 1}"
    assert list(names[-3:]) == ["chosen:m:tokens", "rejected:m:tokens", "prompt:m:group"]
    assert list(f.transform(_pairs(2)).columns) == list(names)  # the names are the output's columns
    blob = pickle.dumps(f)
    assert len(blob) < 10_000  # parameters and fitted attributes, not weights
    g = pickle.loads(blob)
    np.testing.assert_array_equal(_h(g.transform(_pairs(2))), _h(f.transform(_pairs(2))))


def test_features_do_not_depend_on_the_order_of_rows(tiny):
    pw = _pointwise(_pairs(9))
    f = BackboneFeaturizer(tiny, cache=False, verbose=0, batch_size=3).fit()
    perm = np.random.default_rng(0).permutation(9)
    np.testing.assert_allclose(_h(f.transform(pw))[perm], _h(f.transform(pw.iloc[perm])), atol=1e-4)


@requires_embedded
def test_embedded_backbone_loads_offline_and_is_deterministic(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = [{"prompt": "What is 2+2?", "response": "4"}, {"prompt": "Say hi", "response": "Hi!"}]
    a = _h(BackboneFeaturizer(cache=False, verbose=0).fit_transform(rows))
    b = _h(BackboneFeaturizer(cache=False, verbose=0).fit_transform(rows))
    assert a.shape == (2, 2 * 576)
    np.testing.assert_array_equal(a, b)
    tok = load_tokenizer("smollm2-135m-instruct")
    assert tok.pad_token == tok.eos_token == "<|im_end|>"  # the trap the last-token logic must survive


def test_unpickled_featurizer_refuses_a_changed_backbone(tmp_path):
    import shutil

    folder = tmp_path / "bb"
    shutil.copytree(tiny_backbone(seed=0), folder)
    f = BackboneFeaturizer(str(folder), cache=False, verbose=0).fit()
    blob = pickle.dumps(f)
    shutil.copy(f"{tiny_backbone(seed=1)}/model.safetensors", folder / "model.safetensors")
    with pytest.raises(ValueError, match="different weights"):
        pickle.loads(blob).transform([{"prompt": "a", "response": "b"}])


def test_progress_counts_tokens_from_the_first_prompt_pass_and_stays_quiet_on_cache_hits(tiny, feature_cache,
                                                                                       monkeypatch):
    import rmkit.backbones._featurizer as featurizer_module

    bars = []

    class Recorder(featurizer_module._TokenBar):
        def __init__(self, enabled):
            super().__init__(enabled)
            self.updates = []
            bars.append(self)

        def update(self, tokens):
            self.updates.append((int(tokens), self.total))
            super().update(tokens)

    monkeypatch.setattr(featurizer_module, "_TokenBar", Recorder)
    pairs = _pairs(6)
    f = BackboneFeaturizer(tiny, cache=feature_cache, verbose=1, batch_size=2, share_prompts=True).fit(pairs)
    f.transform(pairs)
    first = bars[-1]
    # the first update is a prompt pass (before any response), and the work was known before it started
    assert first.updates and first.updates[0][1] == first.total > 0
    assert sum(n for n, _ in first.updates) == first.total == f.last_stats_["real_tokens"]
    n_prompt_batches = len(first.updates) - int(np.ceil(12 / 2))
    assert n_prompt_batches >= 1
    f.transform(pairs)  # everything from the cache: no work, no bar
    assert bars[-1].updates == [] and bars[-1].bar is None
