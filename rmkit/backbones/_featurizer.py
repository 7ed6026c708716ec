"""BackboneFeaturizer: conversations to hidden-state features."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from rmkit.base import TextInputMixin
from rmkit.layout import GROUP_COLUMN, column, make_frame, read_layout, sides_of
from rmkit.model_selection._groups import group_ids_of_conversations
from rmkit.utils._validation import read_texts

from ._feature_cache import FeatureCache, feature_key
from ._forward import ForwardStats, run_prefix_suffix
from ._loading import (
    EMBEDDED_BACKBONE,
    cache_dir,
    load_backbone,
    load_tokenizer,
    resolve_backbone,
    resolve_dtype,
    weights_fingerprint,
)
from ._templating import encode_conversation

__all__ = ["BackboneFeaturizer", "split_feature_blocks"]

_SLICE = 4096  # texts tokenized, run and written to the cache together


def split_feature_blocks(X):
    """The hidden-state blocks of a featurizer output, by name.

    Returns ``{"chosen", "rejected", "prompt"}`` arrays for pairs and
    ``{"response", "prompt"}`` for pointwise rows.

    Examples
    --------
    >>> from rmkit import BackboneFeaturizer
    >>> from rmkit.testing import tiny_backbone
    >>> F = BackboneFeaturizer(tiny_backbone(), cache=False, verbose=0).fit_transform(
    ...     [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}])
    >>> blocks = split_feature_blocks(F)
    >>> sorted(blocks), blocks["prompt"].shape
    (['chosen', 'prompt', 'rejected'], (1, 64))
    """
    lay = read_layout(X, step="split_feature_blocks", need=[("side", "h"), ("prompt", "h")])
    return {b: lay.block(X, b, "h") for b in (*lay.sides, "prompt")}


def _layer_index(n_layers, layer):
    """Map ``layer`` (HF ``hidden_states`` index, negative from the end) to ``1..n_layers``."""
    idx = n_layers + 1 + layer if layer < 0 else layer
    if not 1 <= idx <= n_layers:
        raise ValueError(
            f"layer={layer} is out of range for a backbone with {n_layers} layers: use 1..{n_layers} or "
            f"-{n_layers}..-1 (-1 is the final, normalised layer; 0, the embeddings, is not supported)."
        )
    return idx


def _place_features(out, items, values, n_rows, d):
    """Write per-text ``[response | prompt]`` rows into the output layout.

    Item ``r`` is row ``r``'s pointwise or chosen response; item
    ``n_rows + r`` is row ``r``'s rejected response.
    """
    if out.shape[1] == 2 * d:
        out[items] = values
        return
    first = items < n_rows
    out[items[first], :d] = values[first, :d]
    out[items[first], 2 * d :] = values[first, d:]
    out[items[~first] - n_rows, d : 2 * d] = values[~first, :d]


class _TokenBar:
    """Progress in tokens through the backbone, prompt passes included, so the bar moves from the start.

    The bar appears with the first computed batch (a transform served from the cache stays quiet); its
    total grows slice by slice as the work of each slice becomes known.
    """

    def __init__(self, enabled):
        self.enabled, self.bar, self.total = enabled, None, 0

    def add_work(self, tokens):
        self.total += int(tokens)
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def update(self, tokens):
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc="featurize", unit="tok", unit_scale=True)
        self.bar.update(int(tokens))

    def close(self):
        if self.bar is not None:
            self.bar.close()


class BackboneFeaturizer(TextInputMixin, TransformerMixin, BaseEstimator):
    """Hidden-state features of a frozen decoder LLM (ArmoRM's featurisation).

    Each conversation is rendered with the tokenizer's chat template (or the
    fallback format of :mod:`rmkit.backbones._templating` when it has none), run
    through the backbone without its LM head, and represented by the hidden
    state of ``layer`` at the conversation's closing token (``pooling="last"``)
    or averaged over the response tokens (``pooling="mean"``). The *prompt
    feature* (the gating input of ArmoRM) is the hidden state at the last
    token of the templated prompt, read from the same pass.

    Output: a feature frame (a DataFrame with named blocks, see
    :mod:`rmkit.layout`). Pointwise rows (``prompt``/``messages`` +
    ``response``) give the blocks ``response:h:*`` and ``prompt:h:*``;
    preference pairs (``prompt`` + ``chosen`` + ``rejected``) give
    ``chosen:h:*``, ``rejected:h:*`` and ``prompt:h:*``, each
    ``hidden_size_`` wide (float32). Metadata columns travel along:
    ``{side}:m:tokens`` (the response's length in tokens before truncation,
    with the template's closing tokens: ArmoRM's verbosity signal) and ``prompt:m:group`` (the prompt group id every split uses).
    :func:`split_feature_blocks` returns the hidden-state blocks as arrays.

    Parameters
    ----------
    backbone : str, default="smollm2-135m-instruct"
        The embedded default, ``"rmkit-tiny"``, a local folder or a Hugging
        Face id.
    layer : int, default=-1
        Index into the model's hidden states (HF ``output_hidden_states``
        convention, negative from the end; ``-1`` is the final normalised
        layer). Layers above it are not computed.
    pooling : {"last", "mean"}, default="last"
    max_length : int or None, default=1024
        Longer conversations are truncated: first from the start of the
        prompt, then the end of the response, never the closing tokens.
    batch_size : int, default=16
        Sequences per forward pass.
    share_prompts : bool, default=True
        Run each distinct prompt once and every response on its key/value
        cache (exact: equal to separate passes within float tolerance).
    cache : bool or str, default=True
        On-disk feature cache: ``True`` uses ``<rmkit cache>/features``, a
        string names a folder, ``False`` disables it.
    device : str, default="auto"
        ``"auto"`` uses CUDA when available.
    dtype : str, default="float32"
        ``"float32"``, ``"bfloat16"``, ``"float16"``, or ``"auto"``: bfloat16
        where the device runs it natively (a CUDA GPU with bf16 support, a
        CPU with AMX or AVX512-BF16), float32 elsewhere (emulated bfloat16
        on a CPU without them is several times slower than float32).
    verbose : int, default=1
        ``0`` silences the progress bar and truncation warnings. The bar
        appears only when the backbone has work to do (texts not in the
        cache), so predictions inside a search over later steps stay quiet.

    Attributes
    ----------
    hidden_size_ : int
    layer_ : int
        Resolved non-negative layer index.
    backbone_fingerprint_ : str
        SHA-256 of the backbone's weight files.
    input_kind_ : {"pointwise", "pairs"}
        Kind of the data seen in ``fit``; names the output features.
    last_stats_ : dict
        Counts of the latest ``transform``: rows, truncated rows, cache hits,
        real and padded tokens computed.

    Notes
    -----
    SmolLM2's chat template inserts a default system prompt when the
    conversation has none. rmkit keeps it: it is the format the model was
    trained on, and the prompt truncation never removes it.

    Pickling stores the parameters and fitted attributes only, never the
    backbone weights; the backbone is reloaded (and shared in-process) on the
    next ``transform``.

    scikit-learn's ``check_estimator`` does not apply: its checks feed numeric
    arrays, and this transformer's input is text. The sklearn protocol
    (``get_params``/``set_params``, ``clone``, ``fit`` returning self, fitted
    attributes ending in ``_``, ``get_feature_names_out``) is tested
    directly.

    Examples
    --------
    >>> from rmkit import BackboneFeaturizer
    >>> from rmkit.testing import tiny_backbone
    >>> pairs = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}]
    >>> feats = BackboneFeaturizer(backbone=tiny_backbone(), cache=False, verbose=0)
    >>> F = feats.fit_transform(pairs)
    >>> F.shape, list(F.columns[[0, 64, 128, -1]])
    ((1, 195), ['chosen:h:0', 'rejected:h:0', 'prompt:h:0', 'prompt:m:group'])
    """

    def __init__(self, backbone=EMBEDDED_BACKBONE, *, layer=-1, pooling="last", max_length=1024, batch_size=16,
                 share_prompts=True, cache=True, device="auto", dtype="float32", verbose=1):
        self.backbone = backbone
        self.layer = layer
        self.pooling = pooling
        self.max_length = max_length
        self.batch_size = batch_size
        self.share_prompts = share_prompts
        self.cache = cache
        self.device = device
        self.dtype = dtype
        self.verbose = verbose

    def _check_params(self):
        if self.pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got {self.pooling!r}.")
        if not isinstance(self.batch_size, (int, np.integer)) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}.")
        if self.max_length is not None and (not isinstance(self.max_length, (int, np.integer)) or self.max_length < 8):
            raise ValueError(f"max_length must be None or an integer >= 8, got {self.max_length!r}.")
        resolve_dtype(self.dtype)

    def fit(self, X=None, y=None):
        """Validate parameters and record the backbone; no weights are learned.

        ``X`` may be omitted; when given it is validated and names the output
        layout (``input_kind_``).
        """
        from transformers import AutoConfig

        self._check_params()
        kind = read_texts(X)[0] if X is not None else "pointwise"
        config = AutoConfig.from_pretrained(str(resolve_backbone(self.backbone)))  # the config, not the weights
        config = getattr(config, "text_config", None) or config
        self.layer_ = _layer_index(int(config.num_hidden_layers), self.layer)
        self.hidden_size_ = int(config.hidden_size)
        self.backbone_fingerprint_ = weights_fingerprint(self.backbone)
        self.input_kind_ = kind
        return self

    def _model(self):
        return load_backbone(self.backbone, dtype=self.dtype, device=self.device)

    def _namespace(self):
        return "|".join(map(str, ("rmkit-features-v1", self.backbone_fingerprint_, self.layer_, self.pooling,
                                  resolve_dtype(self.dtype, self.device))))

    def _feature_cache(self):
        if self.cache is False or self.cache is None:
            return None
        root = cache_dir() / "features" if self.cache is True else self.cache
        return FeatureCache(root)

    def transform(self, X):
        """Featurize pointwise rows or preference pairs into a feature frame (see the class docstring)."""
        check_is_fitted(self, "hidden_size_")
        self._check_params()
        current = weights_fingerprint(self.backbone)  # memoised beside the weights: cheap
        if current != self.backbone_fingerprint_:
            raise ValueError(
                f"The backbone {self.backbone!r} has different weights than when this featurizer was fitted "
                f"(SHA-256 {current[:12]}… vs {self.backbone_fingerprint_[:12]}…); refit it."
            )
        kind, data = read_texts(X)
        tokenizer = load_tokenizer(self.backbone)
        convs = data.conversations
        sides = [data.responses] if kind == "pointwise" else [data.chosen, data.rejected]
        n_rows, d = len(convs), self.hidden_size_
        # Results go straight into the output and rows are tokenized a slice at a time, so memory
        # beyond the output is bounded by one slice, not by the dataset.
        out = np.empty((n_rows, (len(sides) + 1) * d), dtype=np.float32)
        tokens = np.empty((n_rows, len(sides)), dtype=np.float64)
        stats, counts = ForwardStats(), dict(hits=0, truncated=0)
        store, namespace = self._feature_cache(), self._namespace()
        step = max(1, _SLICE // len(sides))  # a row's responses stay in one slice: they share its prompt
        bar = _TokenBar(enabled=bool(self.verbose))
        try:
            for start in range(0, n_rows, step):
                rows = range(start, min(start + step, n_rows))
                encoded = [encode_conversation(tokenizer, convs[r], side[r], self.max_length)
                           for side in sides for r in rows]
                items = np.asarray([s * n_rows + r for s in range(len(sides)) for r in rows])
                for e, item in zip(encoded, items):
                    tokens[item % n_rows, item // n_rows] = len(e.suffix) + e.n_response_dropped  # untruncated
                self._featurize_slice(encoded, items, out, store, namespace, tokenizer, stats, counts, bar)
        finally:
            bar.close()
        n_items = n_rows * len(sides)
        self.last_stats_ = dict(rows=n_rows, items=n_items, cache_hits=counts["hits"],
                                truncated=counts["truncated"], real_tokens=stats.real_tokens,
                                padded_tokens=stats.padded_tokens, padded_fraction=stats.padded_fraction)
        if counts["truncated"] and self.verbose:
            warnings.warn(f"{counts['truncated']} of {n_items} texts exceeded max_length={self.max_length} and "
                          "were truncated (prompt start first, then response end).", stacklevel=2)
        return self._frame(out, tokens, group_ids_of_conversations(convs), kind, X)

    def _frame(self, out, tokens, groups, kind, X):
        d, names = self.hidden_size_, range(self.hidden_size_)
        sides = sides_of(kind)
        blocks = {(b, "h", names): out[:, i * d:(i + 1) * d] for i, b in enumerate((*sides, "prompt"))}
        for i, b in enumerate(sides):
            blocks[(b, "m", ("tokens",))] = tokens[:, i]
        blocks[("prompt", "m", ("group",))] = groups.astype(np.float64)
        index = X.index if isinstance(X, pd.DataFrame) else None
        return make_frame(blocks, index=index)

    def _featurize_slice(self, encoded, items, out, store, namespace, tokenizer, stats, counts, bar):
        """Features of one slice of texts, from the cache or the backbone, written into ``out``.

        Computed features reach the cache before the next slice starts, so an interruption loses at
        most one slice of work. Identical texts run once.
        """
        n_rows, d = out.shape[0], self.hidden_size_
        where = {}  # key -> positions in the slice with that exact input
        for pos, e in enumerate(encoded):
            where.setdefault(feature_key(namespace, e.prefix, e.suffix), []).append(pos)
        counts["truncated"] += sum(e.truncated for e in encoded)

        def place(keys, values):
            pos = [p for k in keys for p in where[k]]
            values = np.repeat(values, [len(where[k]) for k in keys], axis=0)
            _place_features(out, items[pos], values, n_rows, d)

        found = store.get_many(list(where)) if store is not None else {}
        if found:
            place(list(found), np.stack(list(found.values())))
            hits = sum(len(where[k]) for k in found)
            counts["hits"] += hits
        todo = [k for k in where if k not in found]
        if not todo:
            return
        part = [encoded[where[k][0]] for k in todo]
        if self.share_prompts:
            index = {}
            owners = [index.setdefault(e.prefix, len(index)) for e in part]
            prefixes = list(index)
        else:
            prefixes, owners = [e.prefix for e in part], list(range(len(part)))
        bar.add_work(sum(len(p) for p in prefixes) + sum(len(e.suffix) for e in part))
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        resp, prompt = run_prefix_suffix(self._model(), prefixes, [e.suffix for e in part], owners,
                                         layer=self.layer_, pooling=self.pooling, batch_size=self.batch_size,
                                         pad_id=pad_id, progress=bar, stats=stats)
        values = np.hstack([resp, prompt[owners]])  # response | prompt
        if store is not None:
            store.put_many(zip(todo, values))
        place(todo, values)

    def get_feature_names_out(self, input_features=None):
        """Names of the output columns for the layout of ``input_kind_``."""
        check_is_fitted(self, "hidden_size_")
        sides = sides_of(self.input_kind_)
        names = [column(b, "h", i) for b in (*sides, "prompt") for i in range(self.hidden_size_)]
        names += [column(b, "m", "tokens") for b in sides] + [GROUP_COLUMN]
        return np.asarray(names, dtype=object)

