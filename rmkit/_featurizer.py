"""BackboneFeaturizer: conversations to hidden-state features."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from ._backbones import (
    EMBEDDED_BACKBONE,
    cache_dir,
    load_backbone,
    load_tokenizer,
    resolve_dtype,
    weights_fingerprint,
)
from ._data import read_texts
from ._feature_cache import FeatureCache, feature_key
from ._forward import ForwardStats, resolve_layer, run_prefix_suffix
from ._templating import encode_conversation

__all__ = ["BackboneFeaturizer", "split_feature_blocks"]

_SLICE = 4096  # texts per cache write


def split_feature_blocks(X, hidden_size, kind):
    """Split featurizer output into its named blocks.

    Pointwise rows are laid out ``[response | prompt]`` and preference pairs
    ``[chosen | rejected | prompt]``, each block ``hidden_size`` wide.

    Examples
    --------
    >>> import numpy as np
    >>> blocks = split_feature_blocks(np.zeros((2, 6)), 2, "pairs")
    >>> sorted(blocks), blocks["prompt"].shape
    (['chosen', 'prompt', 'rejected'], (2, 2))
    """
    names = ("chosen", "rejected", "prompt") if kind == "pairs" else ("response", "prompt")
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[1] != len(names) * hidden_size:
        raise ValueError(
            f"Expected {kind} features of width {len(names)} x {hidden_size} = {len(names) * hidden_size} "
            f"({' | '.join(names)}), got shape {X.shape}."
        )
    return {n: X[:, i * hidden_size : (i + 1) * hidden_size] for i, n in enumerate(names)}


class BackboneFeaturizer(TransformerMixin, BaseEstimator):
    """Hidden-state features of a frozen decoder LLM (ArmoRM's featurisation).

    Each conversation is rendered with the tokenizer's chat template (or the
    fallback format of :mod:`rmkit._templating` when it has none), run
    through the backbone without its LM head, and represented by the hidden
    state of ``layer`` at the conversation's closing token (``pooling="last"``)
    or averaged over the response tokens (``pooling="mean"``). The *prompt
    feature* (the gating input of ArmoRM) is the hidden state at the last
    token of the templated prompt, read from the same pass.

    Output layout: pointwise rows (``prompt``/``messages`` + ``response``)
    give ``[response | prompt]``; preference pairs (``prompt`` + ``chosen`` +
    ``rejected``) give ``[chosen | rejected | prompt]``. Each block is
    ``hidden_size_`` wide; :func:`split_feature_blocks` splits them.

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
    verbose : int, default=1
        ``0`` silences the progress bar and truncation warnings.

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
    >>> feats.fit_transform(pairs).shape
    (1, 192)
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
        self._check_params()
        kind = read_texts(X)[0] if X is not None else "pointwise"
        model = self._model()
        self.layer_ = resolve_layer(model, self.layer)
        self.hidden_size_ = int(model.config.hidden_size)
        self.backbone_fingerprint_ = weights_fingerprint(self.backbone)
        self.input_kind_ = kind
        return self

    def _model(self):
        return load_backbone(self.backbone, dtype=self.dtype, device=self.device)

    def _namespace(self):
        return "|".join(map(str, ("rmkit-features-v1", self.backbone_fingerprint_, self.layer_, self.pooling,
                                  resolve_dtype(self.dtype))))

    def _feature_cache(self):
        if self.cache is False or self.cache is None:
            return None
        root = cache_dir() / "features" if self.cache is True else self.cache
        return FeatureCache(root)

    def transform(self, X):
        """Featurize pointwise rows or preference pairs (see the class docstring for the layout)."""
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
        responses = data.responses if kind == "pointwise" else data.chosen + data.rejected
        n_rows = len(convs)
        encoded = [encode_conversation(tokenizer, convs[i % n_rows], r, self.max_length)
                   for i, r in enumerate(responses)]
        namespace = self._namespace()
        keys = [feature_key(namespace, e.prefix, e.suffix) for e in encoded]
        store = self._feature_cache()
        found = store.get_many(keys) if store is not None else {}
        todo = [i for i, k in enumerate(keys) if k not in found]
        stats = ForwardStats()
        if todo:
            found.update(self._compute(tokenizer, [encoded[i] for i in todo], [keys[i] for i in todo], store, stats))
        d = self.hidden_size_
        vecs = np.stack([found[k] for k in keys])  # (n_items, 2d): response | prompt
        n_trunc = sum(e.truncated for e in encoded)
        self.last_stats_ = dict(rows=n_rows, items=len(encoded), cache_hits=len(encoded) - len(todo),
                                truncated=n_trunc, real_tokens=stats.real_tokens,
                                padded_tokens=stats.padded_tokens, padded_fraction=stats.padded_fraction)
        if n_trunc and self.verbose:
            warnings.warn(f"{n_trunc} of {len(encoded)} texts exceeded max_length={self.max_length} and were "
                          "truncated (prompt start first, then response end).", stacklevel=2)
        if kind == "pointwise":
            return np.hstack([vecs[:, :d], vecs[:, d:]])
        return np.hstack([vecs[:n_rows, :d], vecs[n_rows:, :d], vecs[:n_rows, d:]])

    def _compute(self, tokenizer, encoded, keys, store, stats):
        """Run the backbone on ``encoded``; results reach the cache slice by slice, so an interruption
        loses at most one slice of work."""
        from tqdm.auto import tqdm

        model = self._model()
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        out = {}
        with tqdm(total=len(encoded), desc="featurize", unit="text", disable=not self.verbose) as bar:
            for start in range(0, len(encoded), _SLICE):
                part = encoded[start : start + _SLICE]
                if self.share_prompts:
                    index = {}
                    owners = [index.setdefault(e.prefix, len(index)) for e in part]
                    prefixes = list(index)
                else:
                    prefixes, owners = [e.prefix for e in part], list(range(len(part)))
                resp, prompt = run_prefix_suffix(model, prefixes, [e.suffix for e in part], owners,
                                                 layer=self.layer_, pooling=self.pooling,
                                                 batch_size=self.batch_size, pad_id=pad_id, progress=bar,
                                                 stats=stats)
                done = dict(zip(keys[start : start + _SLICE], np.hstack([resp, prompt[owners]])))
                if store is not None:
                    store.put_many(done.items())
                out.update(done)
        return out

    def get_feature_names_out(self, input_features=None):
        """Names of the output columns for the layout of ``input_kind_``."""
        check_is_fitted(self, "hidden_size_")
        blocks = ("chosen", "rejected", "prompt") if self.input_kind_ == "pairs" else ("response", "prompt")
        return np.asarray([f"{b}_{i}" for b in blocks for i in range(self.hidden_size_)], dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        tags.requires_fit = True
        tags.non_deterministic = False
        return tags
